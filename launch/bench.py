"""Seconds per PPO iteration, split by phase, and tokens per second: the baseline for performance work.

    python launch/bench.py                                   # embedded default, one process
    python launch/bench.py --model qwen2-0.5b --iterations 2 # random-init model of the exact Qwen2-0.5B shape
    deepspeed --num_gpus 2 launch/bench.py [...]             # several ranks
    python launch/bench.py --json out.json [--field value ...]  # PPOConfig overrides, e.g. --zero_stage 3

The first iteration (warm-up: allocator, kernel selection) is run but not counted. Prints a table on rank 0 and
optionally writes one flat JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("time_generation_s", "time_experience_s", "time_update_s")


def random_qwen2_0_5b(policy_dir: str, out_dir: str) -> str:
    """A random-init model of the exact Qwen2-0.5B architecture with the embedded tokenizer (timing only)."""
    from transformers import Qwen2ForCausalLM

    from rlhf_ds.models import load_tokenizer, qwen2_0_5b_config

    tokenizer = load_tokenizer(policy_dir)
    config = qwen2_0_5b_config()
    config.eos_token_id = config.bos_token_id = config.pad_token_id = tokenizer.eos_token_id
    Qwen2ForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("embedded", "qwen2-0.5b"), default="embedded")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--json", help="write the figures to this file")
    args, overrides = parser.parse_known_args(argv)

    from rlhf_ds.config import PPOConfig
    from rlhf_ds.data import load_prompts
    from rlhf_ds.distributed import get_world_size, init_distributed, is_main_process
    from rlhf_ds.embedded import resolve_model_paths
    from rlhf_ds.engines import build_engines
    from rlhf_ds.trainer import PPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        config = PPOConfig.from_args(["--iterations", str(args.iterations + 1), "--output_dir",
                                      os.path.join(tmp, "run"), *overrides])
        policy, critic, reward = resolve_model_paths(config)
        if args.model == "qwen2-0.5b":
            policy = critic = random_qwen2_0_5b(policy, os.path.join(tmp, "qwen2-0.5b"))
        prompts, _ = load_prompts(config.dataset, config.train_split, config.max_prompts)
        init_distributed()
        trainer = PPOTrainer(config, build_engines(config, policy, critic, reward), prompts)
        timed = trainer.train()[1:]

    figures = {"model": args.model, "world_size": get_world_size(), "zero_stage": config.zero_stage,
               "rollout_batch_size": config.rollout_batch_size, "max_new_tokens": config.max_new_tokens,
               "iterations": len(timed)}
    for key in PHASES + ("tokens_per_s",):
        figures[key] = statistics.mean(m[key] for m in timed)
    figures["iteration_s"] = sum(figures[p] for p in PHASES)
    if is_main_process():
        print(f"\n{args.model}: {figures['world_size']} rank(s), ZeRO-{config.zero_stage}, "
              f"{config.rollout_batch_size} prompts x {config.max_new_tokens} new tokens per rank, "
              f"mean of {len(timed)} iterations")
        print(f"{'phase':<12} {'seconds':>8} {'share':>6}")
        for phase in PHASES:
            name = phase[len("time_"):-len("_s")]
            print(f"{name:<12} {figures[phase]:8.3f} {figures[phase] / figures['iteration_s']:6.1%}")
        print(f"{'iteration':<12} {figures['iteration_s']:8.3f}\nresponse tokens/s (all ranks): "
              f"{figures['tokens_per_s']:.1f}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
