"""rlhf-ds: PPO-RLHF on DeepSpeed (Qwen2 actor and critic, a reward model with its own tokenizer, HH-RLHF)."""
__version__ = "0.1.0"
