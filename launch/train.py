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

from rlhf_ds.config import ConfigHelp, PPOConfig  # noqa: E402
from rlhf_ds.errors import KnownError, fail  # noqa: E402


def prepare(config: PPOConfig):
    """Everything before the first iteration, cheapest checks first: the output directory, trackers, prompts,
    model paths and kinds, the DeepSpeed configs and the checkpoint to resume are checked before any model loads;
    then the engines and the trainer. Returns the trainer. Every known failure is an exception whose message is
    one line (``main`` prints it, ``errors.fail``); all ranks meet the same failure at the same point. Rank 0 prints
    the memory plan (``rlhf_ds.memory``) before loading, with a warning when it predicts more than the device has."""
    from rlhf_ds.checkpoint import check_resume_config, find_checkpoint, verify_checkpoint
    from rlhf_ds.data import PromptLoader, load_prompts
    from rlhf_ds.distributed import barrier, get_rank, get_world_size, init_distributed, is_main_process
    from rlhf_ds.catalog import resolve_model_paths
    from rlhf_ds.engines import build_ds_config, build_engines, describe_placement, engine_roles
    from rlhf_ds.openmp import thread_settings
    from rlhf_ds.memory import plan_this_run
    from rlhf_ds.models import check_model_source
    from rlhf_ds.tracking import check_output_dir, check_trackers, clear_previous_run, write_run_info
    from rlhf_ds.trainer import PPOTrainer

    check_output_dir(config)
    check_trackers(config)
    policy, critic, reward = resolve_model_paths(config)
    prompts, stats = load_prompts(config.dataset, config.train_split, config.max_prompts)
    for path, field in ((policy, "policy_model"), (critic, "critic_model"), (reward, "reward_model")):
        if field != "critic_model" or config.needs_critic:
            check_model_source(path, field, config.trust_remote_code)
    init_distributed()
    world_size = get_world_size()
    if stats.warning() and is_main_process():
        print(f"warning: {stats.warning()}", file=sys.stderr, flush=True)
    for role in engine_roles(config):  # a DeepSpeed JSON that contradicts the config fails here, before loading
        build_ds_config(config, role, world_size)
    PromptLoader(prompts, config.rollout_batch_size, config.seed, get_rank(), world_size)  # enough prompts?
    checkpoint = find_checkpoint(config.resume, config.output_dir) if config.resume else None
    saved_state = verify_checkpoint(checkpoint) if checkpoint else None
    changes = check_resume_config(saved_state, config, world_size) if checkpoint else []
    if config.overwrite_output_dir and is_main_process():
        removed = clear_previous_run(config.output_dir)
        if removed:
            print(f"overwrite_output_dir: deleted {', '.join(removed)} of the previous run in {config.output_dir}")
    memory_plan = plan_this_run(config, world_size) if is_main_process() else None
    barrier()
    engines = build_engines(config, policy, critic, reward)
    if is_main_process():
        os.makedirs(config.output_dir, exist_ok=True)
        config.save(os.path.join(config.output_dir, "config.json"))
        write_run_info(config, world_size, memory_plan=memory_plan)
        print(f"rlhf-ds: {world_size} rank(s); effective config (saved to {config.output_dir}/config.json):")
        print(config.describe())
        critic_text = critic if config.needs_critic else f"none ({config.advantage_estimator})"
        print(f"models: policy {policy}, critic {critic_text}, reward {reward}")
        print(f"prompts: {stats.summary()}")
        print("cpu threads per rank: " + ", ".join(f"{k} {v}" for k, v in thread_settings().items()))
        print("placement (rank 0):\n" + describe_placement(engines), flush=True)
        if config.resume and not checkpoint:
            print(f"--resume {config.resume}: no checkpoint in {config.output_dir} yet, starting from iteration 0")
        if changes:
            print(f"warning: forced resume with changes {', '.join(changes)}: not an exact continuation")
    trainer = PPOTrainer(config, engines, prompts)
    if checkpoint:
        trainer.resume(checkpoint, saved_state)
    return trainer


def main(argv: list[str]) -> int:
    """Exit codes: 0 done (or stopped by a signal with a checkpoint), 2 bad input found before training,
    1 a failure during training (e.g. a full disk while saving, too many non-finite rollouts)."""
    try:
        config = PPOConfig.from_args(argv)
    except ConfigHelp as help_text:
        print(help_text)
        return 0
    except KnownError as err:
        return fail(err, 2)
    try:
        trainer = prepare(config)
    except (KnownError, OSError) as err:
        return fail(err, 2)
    try:
        trainer.train()
    except KnownError as err:
        return fail(err, 1)
    from rlhf_ds.distributed import is_main_process

    if trainer.stopped_by and is_main_process():
        print(f"{trainer.stopped_by} received: stopped after iteration {trainer.iteration} with a checkpoint in "
              f"{config.output_dir}/checkpoints; to continue, run the same command with --resume auto", flush=True)
    return 0


if __name__ == "__main__":
    from rlhf_ds.distributed import exit_process

    exit_process(main(sys.argv[1:]))
