"""Per-rank half of the trainer tests: ``deepspeed --num_gpus 2 --no_local_rank run_trainer.py OUT [--field value]``.

Runs PPO iterations exactly as launch/train.py does (same config parsing, engines and trainer) and writes per
rank: every iteration's metrics, each rollout's KL sum and valid-token count (to recompute the global KL
statistic independently), and digests of the actor (gathered), reference and reward parameters.
"""
import json
import os
import sys

from rlhf_ds.config import PPOConfig
from rlhf_ds.data import load_prompts
from rlhf_ds.distributed import get_rank, init_distributed
from rlhf_ds.embedded import resolve_model_paths
from rlhf_ds.engines import build_engines
from rlhf_ds.trainer import PPOTrainer
from run_engines import digest


def main() -> None:
    out, config = sys.argv[1], PPOConfig.from_args(sys.argv[2:])
    init_distributed()
    policy, critic, reward = resolve_model_paths(config)
    prompts, _ = load_prompts(config.dataset, config.train_split, config.max_prompts)
    engines = build_engines(config, policy, critic, reward)
    frozen_before = {role: digest(getattr(engines, role)) for role in ("reference", "reward")}
    trainer = PPOTrainer(config, engines, prompts)

    rollouts = []
    make = trainer.experience_maker.make

    def recording_make(*args):
        exp = make(*args)
        log_ratio = (exp.old_logprobs - exp.ref_logprobs) * exp.response_mask  # k1 per token
        rollouts.append({"kl_sum": log_ratio.double().sum().item(), "tokens": exp.response_mask.sum().item()})
        return exp

    trainer.experience_maker.make = recording_make
    history = trainer.train()
    result = {
        "rank": get_rank(),
        "history": history,
        "rollouts": rollouts,
        "actor": digest(engines.actor),
        "frozen_unchanged": {role: digest(getattr(engines, role)) == before for role, before in frozen_before.items()},
    }
    with open(os.path.join(out, f"rank{get_rank()}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
