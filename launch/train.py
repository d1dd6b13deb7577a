"""PPO-RLHF training entry point.

    python launch/train.py [--config FILE] [--field value ...]              # one process (CPU or one GPU)
    deepspeed --num_gpus N launch/train.py [--config FILE] [--field value ...]
    torchrun --nproc_per_node N launch/train.py ...

With no arguments it trains on the embedded default (built on first use). A bad config value, bad data or an
unusable checkpoint is one line on stderr and exit code 2. ``--resume auto`` continues from the newest
checkpoint in output_dir (or starts fresh if there is none); SIGTERM/SIGINT save a checkpoint and exit 0.
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

    from rlhf_ds.checkpoint import CheckpointError, check_resume_config, find_checkpoint, verify_checkpoint
    from rlhf_ds.data import load_prompts
    from rlhf_ds.distributed import get_world_size, init_distributed, is_main_process
    from rlhf_ds.embedded import resolve_model_paths
    from rlhf_ds.engines import build_engines, describe_placement
    from rlhf_ds.tracking import check_trackers, write_run_info
    from rlhf_ds.trainer import PPOTrainer, TrainingError

    try:
        check_trackers(config)
        policy, critic, reward = resolve_model_paths(config)
        prompts, stats = load_prompts(config.dataset, config.train_split, config.max_prompts)
    except (ConfigError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_distributed()
    checkpoint = None
    try:
        if config.resume:
            checkpoint = find_checkpoint(config.resume, config.output_dir)
        if checkpoint:
            changes = check_resume_config(verify_checkpoint(checkpoint), config, get_world_size())
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    engines = build_engines(config, policy, critic, reward)
    if is_main_process():
        os.makedirs(config.output_dir, exist_ok=True)
        config.save(os.path.join(config.output_dir, "config.json"))
        write_run_info(config, get_world_size())
        print(f"rlhf-ds: {get_world_size()} rank(s); effective config (saved to {config.output_dir}/config.json):")
        print(config.describe())
        print(f"models: policy {policy}, critic {critic}, reward {reward}")
        print(f"prompts: {stats.summary()}")
        print("placement (rank 0):\n" + describe_placement(engines), flush=True)
        if config.resume and not checkpoint:
            print(f"--resume {config.resume}: no checkpoint in {config.output_dir} yet, starting from iteration 0")
        if checkpoint and changes:
            print(f"warning: forced resume with changes {', '.join(changes)}: not an exact continuation")
    trainer = PPOTrainer(config, engines, prompts)
    try:
        if checkpoint:
            trainer.resume(checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except (CheckpointError, TrainingError) as err:  # e.g. a full disk while saving, or too many NaN rollouts
        print(f"error: {err}", file=sys.stderr)
        return 1
    if trainer.stopped_by and is_main_process():
        print(f"{trainer.stopped_by} received: stopped after iteration {trainer.iteration} with a checkpoint in "
              f"{config.output_dir}/checkpoints; to continue, run the same command with --resume auto", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
