"""PPO-RLHF training entry point.

    python launch/train.py [--config FILE] [--field value ...]              # one process (CPU or one GPU)
    deepspeed --num_gpus N launch/train.py [--config FILE] [--field value ...]
    torchrun --nproc_per_node N launch/train.py ...

With no arguments it trains on the embedded default (built on first use). A bad config value is one line on
stderr and exit code 2.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_ds.config import ConfigError, PPOConfig  # noqa: E402
from rlhf_ds.data import DataError  # noqa: E402


def main(argv: list[str]) -> int:
    try:
        config = PPOConfig.from_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from rlhf_ds.data import load_prompts
    from rlhf_ds.distributed import get_world_size, init_distributed, is_main_process
    from rlhf_ds.embedded import resolve_model_paths
    from rlhf_ds.engines import build_engines, describe_placement
    from rlhf_ds.trainer import PPOTrainer, TrainingError

    try:
        policy, critic, reward = resolve_model_paths(config)
        prompts, stats = load_prompts(config.dataset, config.train_split, config.max_prompts)
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_distributed()
    engines = build_engines(config, policy, critic, reward)
    if is_main_process():
        os.makedirs(config.output_dir, exist_ok=True)
        config.save(os.path.join(config.output_dir, "config.json"))
        print(f"rlhf-ds: {get_world_size()} rank(s); effective config (saved to {config.output_dir}/config.json):")
        print(config.describe())
        print(f"models: policy {policy}, critic {critic}, reward {reward}")
        print(f"prompts: {stats.summary()}")
        print("placement (rank 0):\n" + describe_placement(engines), flush=True)
    try:
        PPOTrainer(config, engines, prompts).train()
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
