"""The models ``launch/bench.py --model`` times besides the embedded default: a random 40M Qwen2
(``qwen2-small``), the shapes DeepSpeed-Chat's step 3 was timed with (``dschat-step3``), and the stand-ins of the
real models (``qwen2-0.5b-shape[:LAYERS]``, built in their own cache). Each returns the PPOConfig overrides that
select its models, the first two after building them into a directory; the heavy imports wait until then.
"""
from __future__ import annotations

import json
import os


def random_qwen2_small(out_dir: str, tokenizer_dir: str) -> list[str]:
    """A random-init Qwen2 with the tokenizer of ``tokenizer_dir`` (the configured policy's) as policy and critic,
    for timing only: the family at a size a CPU runs in minutes, large enough that matmuls and memory traffic, not
    per-layer Python, dominate (8 layers, hidden 512, 8 heads of 64 as in Qwen2-0.5B, 2 KV heads, the tokenizer's
    vocabulary; 40M parameters with the embedded tokenizer). Returns the PPOConfig overrides that select it."""
    from transformers import Qwen2ForCausalLM

    from rlhf_ds.models import load_tokenizer, tiny_qwen2_config
    from rlhf_ds.standins import save_random_model

    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id
    config = tiny_qwen2_config(len(tokenizer), eos, eos, tokenizer.pad_token_id, hidden_size=512, num_layers=8,
                               num_heads=8, num_kv_heads=2, max_position_embeddings=1024)
    save_random_model(Qwen2ForCausalLM, config, tokenizer, 0, out_dir)
    return ["--policy_model", out_dir, "--critic_model", out_dir]


# The shapes DeepSpeed-Chat's step 3 was timed with on this project's machine (issue #15), and its seconds per
# iteration there (its unchanged main.py, 2 CPU ranks, 1 thread each): ZeRO stage -> seconds.
DSCHAT_MODEL = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                    intermediate_size=1024)
DSCHAT_PROMPT_TOKENS, DSCHAT_RESPONSE_TOKENS, DSCHAT_PROMPTS_PER_RANK = 64, 32, 8
DSCHAT_STEP3_S = {2: 2.91, 3: 6.70}
DSCHAT_TARGET = 0.67  # ours / theirs: 1.5x faster


def dschat_step3(out_dir: str) -> list[str]:
    """The DeepSpeed-Chat comparison's inputs, built into ``out_dir``; returns the PPOConfig overrides that select
    them.

    Models: random-init Qwen2, hidden 256, 4 layers, 4 heads, MLP 1024, untied embeddings, as actor, critic backbone
    and reference, and a Qwen2 sequence classifier of the same shape as reward model (6.3M parameters each), with
    a 4096-token Qwen2 tokenizer trained on the embedded corpus (``standins.build_qwen2_tokenizer``). Prompts:
    embedded dialogues joined three by three, each at least 64 tokens long, so that ``max_prompt_len`` 64 cuts
    every one to exactly 64. Run: 8 prompts per rank, 32 new tokens (the bench's fixed-length sections suppress
    EOS; no stop strings), fp32, one PPO epoch of one mini-batch.
    """
    import copy

    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from rlhf_ds import corpus, standins
    from rlhf_ds.data import extract_prompt
    from rlhf_ds.models import tiny_qwen2_config

    train = corpus.make_split("train")
    texts = [r["chosen"] for r in train]
    tokenizer = standins.build_qwen2_tokenizer(texts + [r["rejected"] for r in train],
                                               regular_tokens=DSCHAT_MODEL["vocab_size"] - 3)
    eos = tokenizer.eos_token_id
    shape = {k: v for k, v in DSCHAT_MODEL.items() if k != "vocab_size"}
    config = tiny_qwen2_config(len(tokenizer), eos, eos, eos, max_position_embeddings=256, **shape)
    config.tie_word_embeddings = False
    reward_config = copy.deepcopy(config)
    reward_config.num_labels = 1
    policy, reward = os.path.join(out_dir, "policy"), os.path.join(out_dir, "reward")
    standins.save_random_model(Qwen2ForCausalLM, config, tokenizer, 0, policy)
    standins.save_random_model(Qwen2ForSequenceClassification, reward_config, tokenizer, 1, reward)
    dialogues = ["".join(texts[i:i + 3]) for i in range(0, len(texts) - 2, 3)]
    long_enough = [d for d in dialogues if len(tokenizer(extract_prompt(d))["input_ids"]) >= DSCHAT_PROMPT_TOKENS]
    if len(long_enough) < 4 * DSCHAT_PROMPTS_PER_RANK:
        raise RuntimeError(f"only {len(long_enough)} embedded dialogues reach {DSCHAT_PROMPT_TOKENS} tokens")
    prompts = os.path.join(out_dir, "prompts.jsonl")
    with open(prompts, "w") as fh:
        fh.writelines(json.dumps({"chosen": d}) + "\n" for d in long_enough)
    return ["--policy_model", policy, "--critic_model", policy, "--reward_model", reward, "--dataset", prompts,
            "--rollout_batch_size", str(DSCHAT_PROMPTS_PER_RANK), "--mini_batch_size", str(DSCHAT_PROMPTS_PER_RANK),
            "--ppo_epochs", "1", "--max_new_tokens", str(DSCHAT_RESPONSE_TOKENS),
            "--max_prompt_len", str(DSCHAT_PROMPT_TOKENS), "--precision", "fp32", "--stop_strings", "[]"]


MODELS = ("embedded", "qwen2-small", "dschat-step3")


def model_overrides(model: str, cuda: bool, out_dir: str, overrides: list[str]) -> list[str]:
    """The PPOConfig overrides of a run of ``--model``, the user's ``overrides`` included, building its random
    models into ``out_dir`` where it has some. The user's overrides win over the model's, except for
    "qwen2-small", which replaces the configured policy and critic (and takes the policy's tokenizer).

    "embedded": nothing added; "qwen2-small": a random 40M Qwen2; "dschat-step3": the DeepSpeed-Chat comparison's
    models, prompts and sizes; "qwen2-0.5b-shape[:LAYERS]": the stand-ins of the real models at one depth. A CPU
    refuses the stand-ins' full depth: four 0.5B-class models with Adam state exhaust a 24 GiB machine."""
    from rlhf_ds.catalog import parse_standin, resolve_model_paths
    from rlhf_ds.config import ConfigError, PPOConfig
    from rlhf_ds.standins import POLICY_STANDIN, QWEN2_LAYERS, REWARD_STANDIN

    if model == "embedded":
        return overrides
    if model == "qwen2-small":
        policy, _, _ = resolve_model_paths(PPOConfig.from_args([*overrides, "--output_dir", out_dir]))
        return overrides + random_qwen2_small(os.path.join(out_dir, model), policy)
    if model == "dschat-step3":
        return dschat_step3(os.path.join(out_dir, model)) + overrides
    standin = parse_standin(model)
    if standin is None or standin[0] != POLICY_STANDIN:
        raise ConfigError(f"--model {model!r}: choose {', '.join(MODELS)} or {POLICY_STANDIN}[:LAYERS]")
    layers = standin[1]
    if layers == QWEN2_LAYERS and not cuda:
        raise ConfigError(f"--model {model} (full depth) is for a GPU: on a CPU the four models with Adam state "
                          f"exhaust the memory of a 24 GiB machine; use {POLICY_STANDIN}:2 (every width exact)")
    return ["--policy_model", model, "--critic_model", model, "--reward_model", f"{REWARD_STANDIN}:{layers}",
            *overrides]
