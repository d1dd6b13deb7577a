"""The trainer's update and step on hand-made and degenerate rollouts, for test_update.py.

    deepspeed --num_gpus 2 --no_local_rank run_update.py MODELS OUT SGD_JSON    # 2 ranks
    python run_update.py MODELS OUT SGD_JSON                                   # 1 rank, the union of their data

Writes OUT/rank{R}.json (each rank's figures) and OUT/params.safetensors (actor and critic after the first
update). Scenarios, in this order on the same engines:

1. ``update``: one SGD step (lr 0.1, no clipping) on a rollout whose response lengths differ 6x between the
   ranks (rank 0: 1-2 tokens, rank 1: 9-12). On one rank the rollout is both ranks' rows together: the global
   token mean makes the two parameter updates equal. Also counts the actor's decoder-layer calls with gradient
   checkpointing on and off.
2. ``skip`` (2 ranks): a PPO iteration whose second mini-batch has a non-finite policy loss on rank 0 only; the
   first mini-batch's ratio and clipfrac at temperature 0.7; prompts cut at max_prompt_len 7; what a
   ``StepObserver`` is shown.
3. ``degenerate``: rollout_batch_size 1 and a response that is only EOS (on rank 1; on the only rank when W=1),
   for two iterations.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

import fixtures
from rlhf_ds import ppo
from rlhf_ds.config import PPOConfig
from rlhf_ds.distributed import exit_process, get_rank, get_world_size, init_distributed
from rlhf_ds.engines import build_engines
from rlhf_ds.experience import Experience, response_logits
from rlhf_ds.zero3 import gathered
from rlhf_ds.trainer import PPOTrainer, StepObserver
from run_engines import gathered_state

PROMPT_LEN, RESPONSE_LEN, ROWS = 12, 12, 4
LENGTHS = {0: [1, 2, 1, 2], 1: [12, 10, 9, 11]}
PROMPTS = [s.split("Assistant:")[0] + "Assistant:" for s in fixtures.SENTENCES] * 4


def config(sgd_json: str, **overrides) -> PPOConfig:
    values = dict(zero_stage=2, ds_config=sgd_json, actor_lr=0.1, critic_lr=0.1, max_grad_norm=0.0,
                  gradient_checkpointing=True, rollout_batch_size=ROWS * 2 // get_world_size(),
                  mini_batch_size=ROWS * 2 // get_world_size(), ppo_epochs=1, temperature=0.7, max_new_tokens=8,
                  kl_coef_min=None, kl_coef_max=None, tensorboard=False, stop_strings=[])
    return PPOConfig(**{**values, **overrides}).validate()


def rows_of(rank: int, tokenizer, device) -> dict:
    """Rank ``rank``'s part of the hand-made rollout (the same tensors whichever process builds them)."""
    generator = torch.Generator().manual_seed(100 + rank)
    texts = [s.split("Assistant:")[0] + "Assistant:" for s in fixtures.SENTENCES]
    prompts = tokenizer([texts[(rank + i) % len(texts)] for i in range(ROWS)], return_tensors="pt",
                        padding="max_length", max_length=PROMPT_LEN)
    response = torch.randint(3, len(tokenizer), (ROWS, RESPONSE_LEN), generator=generator)
    response_mask = (torch.arange(RESPONSE_LEN)[None] < torch.tensor(LENGTHS[rank])[:, None]).long()
    return {"sequences": torch.cat([prompts["input_ids"], response], 1).to(device),
            "attention_mask": torch.cat([prompts["attention_mask"], response_mask], 1).to(device),
            "response_mask": response_mask.float().to(device),
            "noise": (torch.rand(ROWS, RESPONSE_LEN, generator=generator) - 0.5).to(device) * 0.2,
            "values": torch.randn(ROWS, RESPONSE_LEN, generator=generator).to(device),
            "returns": torch.randn(ROWS, RESPONSE_LEN, generator=generator).to(device),
            "advantages": torch.randn(ROWS, RESPONSE_LEN, generator=generator).to(device)}


def hand_made_rollout(engines, ranks: list[int]) -> Experience:
    parts = [rows_of(rank, engines.policy_tokenizer, engines.actor.device) for rank in ranks]
    data = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    with torch.no_grad(), gathered(engines.actor):  # old log-probs near the actor's own: ratios near 1
        logits = response_logits(engines.actor, data["sequences"], data["attention_mask"], PROMPT_LEN, 0.7)
        old_logprobs = ppo.logprobs_from_logits(logits, data["sequences"][:, PROMPT_LEN:]) + data.pop("noise")
    return Experience(sequences=data["sequences"], attention_mask=data["attention_mask"],
                      response_mask=data["response_mask"], old_logprobs=old_logprobs, ref_logprobs=old_logprobs,
                      values=data["values"], scores=torch.zeros(len(data["values"])),
                      advantages=data["advantages"], returns=data["returns"])


def decoder_layer_calls(engine, run) -> int:
    """How many times the MLPs of the actor's decoder layers started a forward during ``run()``: inside the
    checkpointed layer, so a recomputation counts (transformers checkpoints a layer's ``forward``, not its hooks,
    and torch stops a recomputation early, before any forward hook of the last module would run)."""
    calls = [0]
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for layer in engine.module.model.layers]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls[0]


def scenario_update(engines, trainer, world: int, out: str) -> dict:
    rollout = hand_made_rollout(engines, [get_rank()] if world == 2 else [0, 1])
    result = {}
    result["layer_calls_checkpointed"] = decoder_layer_calls(engines.actor, lambda: trainer.update(rollout, trainer.kl_controller.value))
    state = {**{f"actor.{k}": v for k, v in gathered_state(engines.actor).items()},
             **{f"critic.{k}": v for k, v in gathered_state(engines.critic).items()}}
    if get_rank() == 0:
        save_file(state, os.path.join(out, "params.safetensors"))
    engines.actor.module.gradient_checkpointing_disable()
    result["layer_calls_plain"] = decoder_layer_calls(engines.actor, lambda: trainer.update(rollout, trainer.kl_controller.value))
    result["train_mode_after_update"] = engines.actor.module.training or engines.critic.module.training
    return result


class CountingObserver(StepObserver):
    """Counts what a StepObserver is shown: experiences and each part of the update."""

    def __init__(self):
        self.calls = dict.fromkeys(("experience", "forward", "backward", "step"), 0)

    def experience(self, exp) -> None:
        self.calls["experience"] += 1

    def update_part(self, part: str):
        self.calls[part] += 1
        return super().update_part(part)


def scenario_skip(engines, sgd_json: str) -> dict:
    observer = CountingObserver()
    trainer = PPOTrainer(config(sgd_json, rollout_batch_size=3, mini_batch_size=1, actor_lr=1e-3, critic_lr=1e-3,
                                max_prompt_len=7), engines, PROMPTS, observer=observer)
    policy_loss, calls, first = ppo.policy_loss, [0], {}

    def injected(logprobs, old_logprobs, *args, **kwargs):
        calls[0] += 1
        loss, clipfrac = policy_loss(logprobs, old_logprobs, *args, **kwargs)
        if calls[0] == 1:
            mask = args[1].bool()
            first.update(max_ratio_error=(logprobs - old_logprobs)[mask].exp().sub(1).abs().max().item(),
                         clipfrac=clipfrac.item())
        if calls[0] == 2 and get_rank() == 0:
            loss = loss * float("nan")
        return loss, clipfrac

    ppo.policy_loss = injected
    steps_before = engines.actor.global_steps, engines.critic.global_steps
    prompts = next(iter(trainer.loader))
    lengths = [len(engines.policy_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    metrics = trainer.step(prompts)
    ppo.policy_loss = policy_loss
    finite = all(torch.isfinite(p).all().item() for p in engines.actor.module.parameters())
    return {"metrics": metrics, "first_minibatch": first, "weights_finite": finite, "observed": observer.calls,
            "longer_than_7": sum(n > 7 for n in lengths) / len(lengths),
            "steps": [engines.actor.global_steps - steps_before[0], engines.critic.global_steps - steps_before[1]]}


def scenario_degenerate(engines, sgd_json: str, world: int) -> dict:
    trainer = PPOTrainer(config(sgd_json, rollout_batch_size=1, mini_batch_size=1, actor_lr=1e-3, critic_lr=1e-3),
                         engines, PROMPTS)
    generate, eos = trainer.generator.generate, engines.policy_tokenizer.eos_token_id

    def only_eos_on_the_last_rank(input_ids, attention_mask, generator_seed=None):
        sequences, mask = generate(input_ids, attention_mask, generator_seed=generator_seed)
        if get_rank() == world - 1:
            sequences[:, input_ids.shape[1]:] = eos
            mask = torch.zeros_like(mask)
            mask[:, 0] = 1
        return sequences, mask

    trainer.generator.generate = only_eos_on_the_last_rank
    batches, history = iter(trainer.loader), []
    for _ in range(2):
        history.append(trainer.step(next(batches)))
        trainer.iteration += 1
    return {"history": history}


def main() -> None:
    models, out, sgd_json = sys.argv[1:4]
    init_distributed()
    world = get_world_size()
    cfg = config(sgd_json)
    policy = os.path.join(models, "policy")
    engines = build_engines(cfg, policy, policy, os.path.join(models, "reward"))
    trainer = PPOTrainer(cfg, engines, PROMPTS)
    result = {"update": scenario_update(engines, trainer, world, out)}
    if world == 2:
        result["skip"] = scenario_skip(engines, sgd_json)
    result["degenerate"] = scenario_degenerate(engines, sgd_json, world)
    with open(os.path.join(out, f"rank{get_rank()}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
    exit_process(0)
