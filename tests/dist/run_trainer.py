"""Per-rank half of the trainer tests: ``deepspeed --num_gpus 2 --no_local_rank run_trainer.py OUT [--field value]``.

Runs PPO iterations exactly as launch/train.py does (same config parsing, engines and trainer) and writes per
rank: every iteration's metrics, each rollout's tokens, masks, scores and log-probs (to recompute the global
statistics and the reference log-probs independently), digests of the actor (gathered), of the frozen weights
(reference and reward; with LoRA the actor's base weights, there being no reference), and how far the exported
policy's weights are from the trained engine's (with LoRA: from the base weights plus scaling * B @ A, merged by
hand here).
"""
import json
import os
import sys

import contextlib
import dataclasses

import deepspeed
import torch
from safetensors.torch import load_file

from rlhf_ds.config import PPOConfig
from rlhf_ds.data import load_prompts
from rlhf_ds.distributed import exit_process, get_rank, init_distributed
from rlhf_ds.catalog import resolve_model_paths
from rlhf_ds.engines import build_engines
from rlhf_ds.trainer import PPOTrainer
from run_engines import digest


def merged_by_hand(params: dict, scaling: float) -> dict:
    """peft-named parameters -> the plain model's: W + scaling * B @ A for each adapted linear layer."""
    plain = {}
    for name, tensor in params.items():
        name = name.removeprefix("base_model.model.")
        if ".lora_A." in name:
            layer = name.split(".lora_A.")[0]
            b = params["base_model.model." + name.replace(".lora_A.", ".lora_B.")]
            plain[f"{layer}.weight"] = plain.get(f"{layer}.weight", 0) + scaling * b @ tensor
        elif ".lora_B." not in name:
            key = name.replace(".base_layer.", ".")
            plain[key] = plain.get(key, 0) + tensor
    return plain


def main() -> None:
    out, config = sys.argv[1], PPOConfig.from_args(sys.argv[2:])
    init_distributed()
    policy, critic, reward = resolve_model_paths(config)
    prompts, _ = load_prompts(config.dataset, config.train_split, config.max_prompts)
    engines = build_engines(config, policy, critic, reward)
    frozen = {"reference": lambda: digest(engines.reference), "reward": lambda: digest(engines.reward)}
    if config.lora_rank:
        frozen = {"actor base": lambda: digest(engines.actor, frozen_only=True), "reward": frozen["reward"]}
    frozen_before = {role: weights() for role, weights in frozen.items()}
    trainer = PPOTrainer(config, engines, prompts)

    rollouts = []
    make = trainer.experience_maker.make

    def recording_make(prompt_mask, sequences, response_mask):
        exp = make(prompt_mask, sequences, response_mask)
        # the controller's statistic, written out here: k3 = exp(-d) - 1 + d, d = log pi - log pi_ref, at most 10
        d = (exp.old_logprobs - exp.ref_logprobs).double()
        kl = torch.minimum(torch.exp(-d) - 1 + d, torch.tensor(10.0, dtype=torch.float64)) * exp.response_mask
        rollouts.append({"kl_sum": kl.sum().item(), "tokens": exp.response_mask.sum().item(),
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
        trained = {name: param.detach().cpu().clone() for name, param in engines.actor.module.named_parameters()}
    if config.lora_rank:
        trained = merged_by_hand(trained, config.lora_alpha / config.lora_rank)
    assert set(trained) <= set(exported) and len(trained) > 0, sorted(set(trained) - set(exported))[:3]
    export_diff = max((exported[name] - tensor).abs().max().item() for name, tensor in trained.items())
    result = {
        "config": dataclasses.asdict(config),
        "export_max_abs_diff": export_diff,
        "rank": get_rank(),
        "history": history,
        "rollouts": rollouts,
        "actor": digest(engines.actor),
        "reference_engine": engines.reference is not None,
        "frozen_unchanged": {role: frozen[role]() == before for role, before in frozen_before.items()},
    }
    with open(os.path.join(out, f"rank{get_rank()}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
    exit_process(0)
