"""The PPO-RLHF loop: generate -> experience -> shape rewards -> advantages -> KL control -> update -> log.

``PPOTrainer.step`` reads like the iteration in the README's diagram; the maths lives in ``ppo.py``, the
collectives in ``distributed.py``, the engines in ``engines.py``. Every rank runs the same code on its own
prompts; statistics that steer training (the KL fed to the controller, advantage whitening, metrics) are
all-reduced, so every rank holds the same ``kl_coef`` at every iteration.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch

from rlhf_ds import benchmark, device_memory, ppo
from rlhf_ds.checkpoint import export_model, load_checkpoint, save_checkpoint
from rlhf_ds.config import PPOConfig
from rlhf_ds.data import PromptCollator, PromptLoader
from rlhf_ds.distributed import (all_reduce_max, all_reduce_mean, any_rank, get_rank, get_world_size,
                                 global_explained_variance, global_masked_mean, global_masked_moments,
                                 global_masked_whiten, global_token_counts, is_main_process)
from rlhf_ds.engines import Engines
from rlhf_ds.errors import KnownError
from rlhf_ds.experience import Experience, ExperienceMaker, response_logits, response_values
from rlhf_ds.hybrid import HybridEngine
from rlhf_ds.kl_control import make_kl_controller
from rlhf_ds.reward import RunningMoments, resolve_reward_max_len
from rlhf_ds.signals import StopSignals
from rlhf_ds.tracking import RunLogger


class TrainingError(KnownError, RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite rollouts); the message says why."""


class PhaseMeter:
    """Wall-clock seconds and peak memory (MiB, see ``device_memory.peak_mb``) per phase of one iteration."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        device_memory.reset_peak(device)
        self._start = time.perf_counter()

    def lap(self, phase: str) -> None:
        benchmark.synchronize(self.device)  # on a GPU the phase's kernels end here, not in the next phase
        now = time.perf_counter()
        self.seconds[f"time_{phase}_s"] = now - self._start
        self.peak_mb[f"peak_memory_{phase}_mb"] = device_memory.peak_mb(self.device)
        device_memory.reset_peak(self.device)
        self._start = now


@contextlib.contextmanager
def training_mode(*engines):
    """Inside: the engines in training mode, which transformers needs to recompute checkpointed activations
    (``gradient_checkpointing``; dropout is off in every mode, ``models.disable_dropout``); eval mode after,
    for generation and the experience forwards."""
    for engine in engines:
        engine.train()
    try:
        yield
    finally:
        for engine in engines:
            engine.eval()


class StepObserver:
    """What a measuring tool (``launch/bench.py``) may watch inside an iteration, on the trainer's own code path.

    The base class watches nothing and costs nothing; a subclass overrides what it needs.
    """

    def experience(self, exp: Experience) -> None:
        """Called with each rollout's experience as soon as it is made (before rewards and advantages)."""

    def update_part(self, part: str) -> contextlib.AbstractContextManager:
        """Wraps each "forward" (a mini-batch's losses: actor and critic forwards and the loss maths),
        "backward" and "step" (actor's, then critic's) of the update."""
        return contextlib.nullcontext()


class PPOTrainer:
    """Runs PPO iterations on four engines; ``prompts`` are this run's training prompts (all ranks the same).
    ``observer`` watches the inside of each iteration (``StepObserver``; none by default)."""

    def __init__(self, config: PPOConfig, engines: Engines, prompts: list[str],
                 observer: StepObserver | None = None):
        self.config = config
        self.observer = observer or StepObserver()
        self.engines = engines
        self.rank, self.world_size = get_rank(), get_world_size()
        self.device = engines.actor.device
        tokenizer = engines.policy_tokenizer
        self.collate = PromptCollator(tokenizer, config.max_prompt_len)
        self.loader = PromptLoader(prompts, config.rollout_batch_size, config.seed, self.rank, self.world_size)
        self.sampling = sampling = config.sampling()
        self.generator = HybridEngine(engines.actor, tokenizer, sampling, config.zero3_generation)
        reward_max_len, warning = resolve_reward_max_len(config.reward_max_len, engines.reward.module.config,
                                                         engines.reward_tokenizer)
        if warning and is_main_process():
            print(f"warning: {warning}", flush=True)
        self.experience_maker = ExperienceMaker(engines.actor, engines.critic, engines.reference, engines.reward,
                                                tokenizer, engines.reward_tokenizer, sampling, reward_max_len,
                                                config.mini_batch_size)
        self.kl_controller = make_kl_controller(config)
        self.score_moments = RunningMoments()
        self.iteration = 0
        self.stopped_by: str | None = None  # the signal that ended train() early
        self.skipped_batches = 0
        self.consecutive_skips = 0

    # --- one iteration ----------------------------------------------------------------------------------
    def step(self, prompts: list[str]) -> dict:
        """One PPO iteration on this rank's ``prompts``; returns the all-reduced metrics."""
        cfg = self.config
        meter = PhaseMeter(self.device)
        prompts = [prompt for prompt in prompts for _ in range(cfg.samples_per_prompt)]  # a group: adjacent rows
        truncated_before = self.collate.num_truncated
        batch = {k: v.to(self.device) for k, v in self.collate(prompts).items()}
        prompts_truncated = (self.collate.num_truncated - truncated_before) / len(prompts)
        sequences, response_mask = self.generator.generate(batch["input_ids"], batch["attention_mask"],
                                                           generator_seed=self._sample_seed())
        meter.lap("generation")

        exp = self.experience_maker.make(batch["attention_mask"], sequences, response_mask)
        self.observer.experience(exp)
        meter.lap("experience")
        if any_rank(not torch.isfinite(exp.scores).all(), self.device):
            return self._skip("non-finite reward score", meter)

        mask = exp.response_mask
        kl = ppo.kl_penalty(exp.old_logprobs, exp.ref_logprobs, cfg.kl_estimator)
        kl_coef = self.kl_controller.value
        # with kl_in_loss the KL is a loss term (ppo.kl_loss) and the rewards carry the score alone
        rewards = ppo.shape_rewards(self._normalise(exp.scores), kl, mask, 0.0 if cfg.kl_in_loss else kl_coef,
                                    cfg.reward_clip)
        exp.advantages, exp.returns = self._advantages(rewards, exp.values, mask)
        # token-weighted over all ranks: the penalty's own mean, and the controller's statistic
        kl_penalty_mean = global_masked_mean(kl, mask).item()
        kl_divergence = global_masked_mean(ppo.kl_statistic(exp.old_logprobs, exp.ref_logprobs), mask).item()

        update_metrics, skipped_minibatches = self.update(exp, kl_coef)
        meter.lap("update")
        if not update_metrics:
            return self._skip("non-finite loss", meter, skipped_minibatches)
        self.kl_controller.update(kl_divergence, exp.sequences.shape[0] * self.world_size)  # samples
        self.consecutive_skips = 0
        return self._metrics(exp, rewards, {"kl_divergence": kl_divergence, "kl_penalty_mean": kl_penalty_mean},
                             kl_coef, update_metrics, skipped_minibatches, prompts_truncated, meter)

    def _advantages(self, rewards: torch.Tensor, values: torch.Tensor | None,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages, returns) of the configured estimator from the per-token rewards (B, R); returns is None
        without a critic. GAE and REINFORCE++ are whitened over all ranks' tokens (``whiten_advantages``); GRPO
        and RLOO are already centred within each prompt's group (rows i*n .. i*n + n - 1 of this rank)."""
        cfg = self.config
        estimator, returns = cfg.advantage_estimator, None
        if estimator == "gae":
            advantages, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        elif estimator == "reinforce_pp":
            advantages = ppo.reinforce_pp_returns(rewards, mask, cfg.gamma)
        else:
            group_estimator = ppo.grpo_advantages if estimator == "grpo" else ppo.rloo_advantages
            return group_estimator(rewards.sum(1), mask, cfg.samples_per_prompt), None
        if cfg.whiten_advantages:
            advantages = global_masked_whiten(advantages, mask)
        return advantages, returns

    def update(self, exp: Experience, kl_coef: float) -> tuple[dict, int]:
        """``ppo_epochs`` passes of shuffled mini-batches through actor and critic (when there is one), in
        training mode.

        Actor: policy_loss + entropy_loss (+ kl_loss with ``kl_in_loss``, weighted by this rollout's
        ``kl_coef``). Critic: vf_coef * value_loss. Each steps through its DeepSpeed
        engine (gradient all-reduce, clipping, ZeRO). Every loss is a token mean over the global mini-batch
        (``ppo.token_mean`` with the valid tokens of all ranks, counted in one all-reduce per epoch), so a
        token weighs the same whichever rank holds it. A mini-batch whose loss is non-finite on any rank is
        skipped by every rank before any backward (that agreement is the loop's one host-device
        synchronisation of its own; the metrics stay on the device until the end).

        Returns the metrics averaged over the mini-batches that stepped (empty when none did) and the number
        of skipped mini-batches.
        """
        cfg = self.config
        trained = self.engines.trained
        generator = torch.Generator().manual_seed(self._sample_seed())
        sums: dict[str, torch.Tensor] = {}
        steps = skipped = 0
        with training_mode(*trained.values()):
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(exp.sequences.shape[0], generator=generator)
                minibatches = [exp.select(index.to(self.device)) for index in order.split(cfg.mini_batch_size)]
                global_tokens = global_token_counts([mb.response_mask for mb in minibatches])
                for mb, tokens in zip(minibatches, global_tokens):
                    with self.observer.update_part("forward"):
                        losses = self._minibatch_losses(mb, kl_coef, num_tokens=tokens / self.world_size)
                    engine_losses = {"actor": losses["policy_loss"] + losses["entropy_loss"]
                                     + losses.get("kl_loss", 0.0)}
                    if "critic" in trained:
                        engine_losses["critic"] = cfg.vf_coef * losses["value_loss"]
                    if any_rank(not all(bool(torch.isfinite(loss)) for loss in engine_losses.values()), self.device):
                        skipped += 1
                        continue
                    for role, engine in trained.items():
                        with self.observer.update_part("backward"):
                            engine.backward(engine_losses[role])
                        with self.observer.update_part("step"):
                            engine.step()
                    for name, value in losses.items():
                        sums[name] = sums.get(name, 0.0) + value.detach().double()  # as Python floats would sum
                    steps += 1
        if steps == 0:
            return {}, skipped
        return dict(zip(sums, (torch.stack(list(sums.values())) / steps).tolist())), skipped

    def _minibatch_losses(self, mb: Experience, kl_coef: float, num_tokens: float) -> dict[str, torch.Tensor]:
        """The losses (with grad) and statistics (without) of one mini-batch, each a ``ppo.token_mean`` with
        ``num_tokens`` as denominator; value_loss only with a critic, kl_loss only with ``kl_in_loss``."""
        cfg = self.config
        mask = mb.response_mask
        logits = response_logits(self.engines.actor, mb.sequences, mb.attention_mask, mb.prompt_len,
                                 self.sampling.temperature)
        logprobs = ppo.logprobs_from_logits(logits, mb.sequences[:, mb.prompt_len:])
        entropy = ppo.entropy_from_logits(logits)
        del logits
        policy_loss, clipfrac = ppo.policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, cfg.clip_range,
                                                num_tokens)
        losses = {"policy_loss": policy_loss,
                  "entropy_loss": ppo.entropy_loss(entropy, mask, cfg.entropy_coef, num_tokens)}
        if cfg.kl_in_loss:
            losses["kl_loss"] = ppo.kl_loss(logprobs, mb.ref_logprobs, mask, kl_coef, cfg.kl_estimator, num_tokens)
        if self.engines.critic is not None:
            values = response_values(self.engines.critic, mb.sequences, mb.attention_mask, mb.prompt_len)
            losses["value_loss"] = ppo.value_loss(values, mb.values, mb.returns, mask, cfg.clip_range_value,
                                                  num_tokens)
        with torch.no_grad():
            statistics = {"entropy": ppo.token_mean(entropy, mask, num_tokens), "clipfrac": clipfrac,
                          "approx_kl": ppo.approx_kl(logprobs, mb.old_logprobs, mask, num_tokens)}
        return {**losses, **statistics}

    def _metrics(self, exp: Experience, rewards: torch.Tensor, kl_metrics: dict, kl_coef: float,
                 update_metrics: dict, skipped_minibatches: int, prompts_truncated: float, meter: PhaseMeter) -> dict:
        """The iteration's metrics, the same on every rank: this rank's figures averaged over ranks (equal row
        counts make that the global mean), peaks maxed, token statistics over all ranks' tokens."""
        mask = exp.response_mask
        sequence_reward = (rewards * mask).sum(1)
        local = {
            "response_length": mask.sum(1).mean().item(),
            "tokens": mask.sum().item(),
            "generation_partitioned": float(self.generator.last_generation == "partitioned"),
            "prompts_truncated": prompts_truncated,
            "reward_inputs_truncated": exp.score_truncated.float().mean().item(),
            **update_metrics, **meter.seconds,
        }
        metrics = {**all_reduce_mean(local), **all_reduce_max(meter.peak_mb)}
        for name, values in (("score", exp.scores), ("reward", sequence_reward)):
            mean, var, _ = global_masked_moments(values, torch.ones_like(values), unbiased=False)
            metrics[f"{name}_mean"], metrics[f"{name}_std"] = mean.item(), var.sqrt().item()
        explained_var = None if exp.values is None else global_explained_variance(exp.values, exp.returns, mask)
        if explained_var is not None:  # no critic, or fewer than 2 valid tokens over all ranks: undefined
            metrics["value_explained_var"] = explained_var
        tokens = metrics.pop("tokens") * self.world_size
        metrics.update(iteration=self.iteration, **kl_metrics, kl_coef=kl_coef,
                       next_kl_coef=self.kl_controller.value, skipped_batches=self.skipped_batches,
                       skipped_minibatches=skipped_minibatches, tokens_per_s=tokens / sum(meter.seconds.values()),
                       total_loss=ppo.total_loss(metrics["policy_loss"], metrics.get("value_loss"),
                                                 metrics["entropy_loss"], self.config.vf_coef,
                                                 metrics.get("kl_loss", 0.0)))
        return metrics

    # --- helpers ------------------------------------------------------------------------------------------
    def _sample_seed(self) -> int:
        """A distinct, reproducible seed per (run seed, iteration, rank): sampling that resumes identically."""
        return (self.config.seed * 1_000_003 + self.iteration) * 1009 + self.rank

    def _normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores standardised by running global moments when ``normalize_reward`` is on (same on all ranks)."""
        if not self.config.normalize_reward:
            return scores
        mean, var, count = global_masked_moments(scores, torch.ones_like(scores), unbiased=False)
        self.score_moments.update(mean.item(), var.item(), count)
        return self.score_moments.normalize(scores)

    def _skip(self, reason: str, meter: PhaseMeter, skipped_minibatches: int = 0) -> dict:
        """Count a rollout that changed no weight (a non-finite score, or every mini-batch's loss non-finite):
        no controller update, and the run stops after ``max_skipped_batches`` in a row."""
        self.skipped_batches += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.config.max_skipped_batches:
            raise TrainingError(f"{self.consecutive_skips} consecutive rollouts skipped ({reason}) at iteration "
                                f"{self.iteration}: check the reward model and lower actor_lr/critic_lr "
                                f"(max_skipped_batches={self.config.max_skipped_batches})")
        return {"iteration": self.iteration, "skipped_batches": self.skipped_batches, "skip_reason": reason,
                "skipped_minibatches": skipped_minibatches, "kl_coef": self.kl_controller.value, **meter.seconds}

    # --- state for checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything besides the engines and RNG that the next iteration depends on (JSON-able, rank-independent)."""
        return {"iteration": self.iteration, "kl_controller": self.kl_controller.state_dict(),
                "data": self.loader.state_dict(), "score_moments": self.score_moments.state_dict(),
                "skipped_batches": self.skipped_batches, "consecutive_skips": self.consecutive_skips,
                "config": dataclasses.asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.loader.load_state_dict(state["data"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.skipped_batches, self.consecutive_skips = state["skipped_batches"], state["consecutive_skips"]

    def save_checkpoint(self) -> str:
        """A resumable checkpoint of the current iteration (all ranks call it); returns its path."""
        path = save_checkpoint(self.engines, self.state_dict(), self.config.output_dir, self.config.keep_checkpoints)
        if is_main_process():
            print(f"checkpoint saved to {path} (iteration {self.iteration})", flush=True)
        return path

    def resume(self, path: str, verified_state: dict | None = None) -> None:
        """Continue from checkpoint ``path``: engines, RNG, controller, data position, counters
        (``verified_state``: see ``checkpoint.load_checkpoint``)."""
        state = load_checkpoint(self.engines, path, verified_state)
        self.load_state_dict(state)
        if is_main_process():
            print(f"resumed from {path} at iteration {self.iteration}", flush=True)

    # --- the loop -------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run iterations until ``config.iterations`` (continuing from a resumed iteration); returns their metrics.

        Checkpoints every ``save_interval`` iterations and at the end; exports the policy to
        ``output_dir/policy`` at the end, which ``time_budget_s`` can bring forward (the iteration under way
        finishes). SIGTERM (what SLURM sends before preemption) or SIGINT finishes the
        current iteration, saves a checkpoint and returns early with ``self.stopped_by`` set to the signal name.
        """
        cfg = self.config
        history = []
        batches = iter(self.loader)
        start = time.perf_counter()
        with RunLogger(cfg, self.iteration, enabled=is_main_process()) as logger, StopSignals() as signals:
            while self.iteration < cfg.iterations:
                metrics = self.step(next(batches))
                history.append(metrics)
                logger.log(metrics)
                self.iteration += 1
                self.stopped_by = signals.received(self.device)
                out_of_time = self._out_of_time(start)
                if self.stopped_by or out_of_time or self.iteration == cfg.iterations or (
                        cfg.save_interval and self.iteration % cfg.save_interval == 0):
                    self.save_checkpoint()
                if self.stopped_by:
                    return history
                if out_of_time:
                    if is_main_process():
                        print(f"time budget of {cfg.time_budget_s:g} s reached after iteration {self.iteration}",
                              flush=True)
                    break
        self.save_policy()
        return history

    def _out_of_time(self, start: float) -> bool:
        """Whether ``time_budget_s`` is spent (the slowest rank's clock, so every rank gives the same answer)."""
        if not self.config.time_budget_s:
            return False
        elapsed = all_reduce_max({"elapsed": time.perf_counter() - start})["elapsed"]
        return elapsed >= self.config.time_budget_s

    def save_policy(self) -> str:
        """Export the actor as a Hugging Face model directory (safetensors + tokenizer); returns its path."""
        path = os.path.join(self.config.output_dir, "policy")
        export_model(self.engines.actor, self.engines.policy_tokenizer, path)
        if is_main_process():
            print(f"policy saved to {path} (iteration {self.iteration})", flush=True)
        return path

