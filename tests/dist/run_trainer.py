"""Per-rank half of the trainer tests: ``deepspeed --num_gpus 2 --no_local_rank run_trainer.py OUT [--field value]``.

Runs PPO iterations exactly as launch/train.py does (same config parsing, engines and trainer) and writes per
rank: every iteration's metrics, each rollout's tokens, masks, scores and log-probs (to recompute the global
statistics and the reference log-probs independently), digests of the actor (gathered), reference and reward
parameters, and how far the exported policy's logits are from the trained engine's.
"""
import json
import os
import sys

import contextlib
import dataclasses

import deepspeed
from safetensors.torch import load_file

from rlhf_ds import ppo
from rlhf_ds.config import PPOConfig
from rlhf_ds.data import load_prompts
from rlhf_ds.distributed import exit_process, get_rank, init_distributed
from rlhf_ds.catalog import resolve_model_paths
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

    def recording_make(prompt_mask, sequences, response_mask):
        exp = make(prompt_mask, sequences, response_mask)
        kl = ppo.kl_penalty(exp.old_logprobs, exp.ref_logprobs, config.kl_estimator) * exp.response_mask
        rollouts.append({"kl_sum": kl.double().sum().item(), "tokens": exp.response_mask.sum().item(),
                         "scores": exp.scores.tolist(), "lengths": exp.response_mask.sum(1).tolist(),
                         "prompt_mask": prompt_mask.tolist(), "sequences": sequences.tolist(),
                         "response_mask": response_mask.tolist(), "old_logprobs": exp.old_logprobs.tolist(),
                         "ref_logprobs": exp.ref_logprobs.tolist()})
        return exp

    trainer.experience_maker.make = recording_make
    history = trainer.train()
    # Compare the export's tensors with the engine's gathered parameters (loading a model here would go through
    # zero.Init on one rank only while ZeRO-3 is configured, a collective the other rank never joins).
    exported = load_file(os.path.join(config.output_dir, "policy", "model.safetensors"))
    params = list(engines.actor.module.parameters())
    partitioned = engines.actor.zero_optimization_partition_weights()
    with deepspeed.zero.GatheredParameters(params) if partitioned else contextlib.nullcontext():
        export_diff = max((exported[name] - param.detach().cpu()).abs().max().item()
                          for name, param in engines.actor.module.named_parameters() if name in exported)
    result = {
        "config": dataclasses.asdict(config),
        "export_max_abs_diff": export_diff,
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
    exit_process(0)
