"""rlhf-ds: PPO-RLHF on DeepSpeed (Qwen2 actor and critic, a reward model with its own tokenizer, HH-RLHF)."""
from rlhf_ds.openmp import default_spin

__version__ = "0.1.0"

default_spin()  # before any module of the package imports torch
