"""Per-rank half of the engine tests: ``deepspeed --num_gpus 2 --no_local_rank run_engines.py ...``.

For each configuration of ``RUNS``, one after the other in the same processes (one launch for all): builds
the four engines on the tiny fixture models, generates with the hybrid engine (and, under ZeRO-3, also the
partitioned way, and with "auto" falling back to it when one rank lacks memory), takes two optimizer steps on
actor and critic with a generation in between (ZeRO-3 hooks must come back). Writes one JSON per rank,
configuration name -> tokens, masks, losses and SHA-256 digests of every engine's full (gathered) parameters
before and after training.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import time
import warnings

import deepspeed
import torch

import fixtures
from rlhf_ds.config import PPOConfig
from rlhf_ds.distributed import exit_process, get_rank
from rlhf_ds.engines import build_engine, build_engines
from rlhf_ds.zero3 import gather_bytes
from rlhf_ds import device_memory
from rlhf_ds.hybrid import HybridEngine
from rlhf_ds.models import position_ids_from_mask
from rlhf_ds.sampling import Sampling

BATCH = 3
MAX_NEW_TOKENS = 12
GENERATION_SEED = 1234


def digest(engine, frozen_only: bool = False) -> str:
    """SHA-256 of all parameters (only those without grad with ``frozen_only``: a LoRA model's base weights),
    gathered first under ZeRO-3 (each rank holds only shards)."""
    params = list(engine.module.parameters())
    gathered = (deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_partition_weights()
                else contextlib.nullcontext())
    sha = hashlib.sha256()
    with gathered:
        for name, param in engine.module.named_parameters():
            if frozen_only and param.requires_grad:
                continue
            sha.update(name.encode())
            sha.update(param.detach().float().cpu().numpy().tobytes())
    return sha.hexdigest()


def gathered_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's module, whole (gathered under ZeRO-3), as CPU float32 copies."""
    params = list(engine.module.parameters())
    with (deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_partition_weights()
          else contextlib.nullcontext()):
        return {name: param.detach().float().cpu().clone() for name, param in engine.module.named_parameters()}


def actor_loss(engine, sequences, attention_mask, response_mask, prompt_len):
    """Negative mean log-prob of the sampled response tokens (a stand-in for the PPO loss)."""
    logits = engine(input_ids=sequences, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask)).logits[:, prompt_len - 1:-1]
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, sequences[:, prompt_len:, None]).squeeze(-1)
    return -(logprobs * response_mask).sum() / response_mask.sum()


def critic_loss(engine, sequences, attention_mask, response_mask, prompt_len):
    values = engine(sequences, attention_mask)[:, prompt_len - 1:-1]
    return ((values - 1.0).square() * response_mask).sum() / response_mask.sum()


# name -> PPOConfig fields; "zero3_json" stands for --zero3-config (every parameter partitioned). bf16 with
# gradient checkpointing: the critic's head made outside zero.Init must match the backbone dtype, and
# generation must run with the KV cache although checkpointing is on.
RUNS = {"zero2": {"zero_stage": 2},
        "zero3": {"zero_stage": 3, "ds_config": "zero3_json"},
        "zero3_bf16": {"zero_stage": 3, "ds_config": "zero3_json", "precision": "bf16",
                       "gradient_checkpointing": True}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help="directory written by fixtures.build_models")
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero3-config", required=True, help="the DeepSpeed JSON of the ZeRO-3 runs")
    args = parser.parse_args()
    results = {}
    for name, fields in RUNS.items():
        fields = {k: args.zero3_config if v == "zero3_json" else v for k, v in fields.items()}
        config = PPOConfig(mini_batch_size=BATCH, rollout_batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS,
                           **fields).validate()
        results[name] = run(config, args.models)
    with open(os.path.join(args.out, f"rank{get_rank()}.json"), "w") as fh:
        json.dump(results, fh)


def run(config: PPOConfig, models: str) -> dict:
    policy = os.path.join(models, "policy")
    engines = build_engines(config, policy, policy, os.path.join(models, "reward"))
    rank = get_rank()
    device = engines.actor.device
    hybrid = HybridEngine(engines.actor, engines.policy_tokenizer, Sampling(max_new_tokens=MAX_NEW_TOKENS))
    batch = fixtures.prompts(engines.policy_tokenizer, rank, BATCH).to(device)
    prompt_len = batch["input_ids"].shape[1]
    result = {"rank": rank, "prompt_len": prompt_len, "pad_token_id": engines.policy_tokenizer.pad_token_id,
              "eos_token_id": engines.policy_tokenizer.eos_token_id}

    engines.actor.train()
    start = time.perf_counter()
    sequences, response_mask = hybrid.generate(batch["input_ids"], batch["attention_mask"],
                                               generator_seed=GENERATION_SEED + rank)
    result["generate_s"] = time.perf_counter() - start
    result["sequences"] = sequences.tolist()
    result["response_mask"] = response_mask.tolist()
    result["train_mode_restored"] = engines.actor.module.training
    result["generation"] = hybrid.last_generation
    result["gather_bytes"] = gather_bytes(engines.actor.module)
    if hybrid.zero3:
        partitioned = HybridEngine(engines.actor, engines.policy_tokenizer, Sampling(max_new_tokens=MAX_NEW_TOKENS),
                                   zero3_generation="partitioned")
        start = time.perf_counter()
        naive, naive_mask = partitioned.generate(batch["input_ids"], batch["attention_mask"],
                                                 generator_seed=GENERATION_SEED + rank)
        result["naive_generate_s"] = time.perf_counter() - start
        result["naive_sequences"] = naive.tolist()
        result["naive_response_mask"] = naive_mask.tolist()
        # "auto" when rank 1 alone reports no free memory: both ranks must agree to generate partitioned.
        free_bytes = device_memory.free_bytes
        device_memory.free_bytes = lambda device: 0 if rank == 1 else free_bytes(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fallback, _ = hybrid.generate(batch["input_ids"], batch["attention_mask"],
                                          generator_seed=GENERATION_SEED + rank)
        device_memory.free_bytes = free_bytes
        result.update(fallback_sequences=fallback.tolist(), fallback_generation=hybrid.last_generation,
                      fallback_calls=hybrid.partitioned_calls, fallback_warnings=[str(w.message) for w in caught
                                                        if "zero3_generation" in str(w.message)])

    before = {role: digest(getattr(engines, role)) for role in ("actor", "critic", "reference", "reward")}
    losses = []
    for _ in range(2):
        attention_mask = torch.cat([batch["attention_mask"], response_mask], dim=1)
        step_losses = {}
        for role, loss_fn in (("actor", actor_loss), ("critic", critic_loss)):
            engine = getattr(engines, role)
            loss = loss_fn(engine, sequences, attention_mask, response_mask.float(), prompt_len)
            engine.backward(loss)
            engine.step()
            step_losses[role] = loss.item()
        losses.append(step_losses)
        sequences, response_mask = hybrid.generate(batch["input_ids"], batch["attention_mask"])
    after = {role: digest(getattr(engines, role)) for role in ("actor", "critic", "reference", "reward")}
    result.update(losses=losses, before=before, after=after,
                  lr=[group["lr"] for group in engines.actor.optimizer.param_groups])
    # Another engine of another stage in the same process (as the bench builds them): it loads by its own stage,
    # whatever the engines built before it asked transformers for.
    other_stage = 2 if config.zero_stage == 3 else 3
    other = build_engine(dataclasses.replace(config, zero_stage=other_stage, ds_config=None), "reference", policy,
                         engines.hf_ds_configs)
    result["other_stage_partitioned"] = any(hasattr(p, "ds_id") for p in other.module.parameters())
    return result


if __name__ == "__main__":
    main()
    exit_process(0)
