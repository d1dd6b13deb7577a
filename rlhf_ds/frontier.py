"""The win-rate frontier: the best win rate against the reference that any policy, or PPO's own optimum, can
reach at a given KL from it. Pure functions, tensors in, numbers out.

Why: a win rate alone does not say whether a run under-optimised or hit a wall. Let u(y) be the probability that
answer y beats an independent reference answer to the same prompt (a tie counts half): its mid-rank among the
reference's answers. A policy pi's win rate is E_pi[u], and among all policies with KL(pi || pi_ref) = D the
highest E_pi[u] belongs to the reference reweighted by exp(beta * u) (the Gibbs variational principle), beta
chosen so the KL is D. PPO does not aim there: maximising E[reward] - kl_coef * KL (the entropy bonus aside) leads
to the reference reweighted by exp(reward / kl_coef), which weighs a big score gap more than a small one where the
win rate weighs both alike. Given K independent reference answers per prompt, both reweightings are computed
exactly on those answers (``frontier_point``), so for the KL a trained policy actually has, the evaluation can say
how far its win rate is from PPO's optimum and from the ceiling for any policy. On answers the reference never
sampled they give no credit, so they are estimates that sharpen with K. ``uniform_ceiling`` is the same ceiling
for a reference whose scores never tie, a bound that holds for every reference and reward model (mid-ranks are a
contraction of the uniform distribution in the convex order, and the Gibbs bound grows with that order).

Shapes: N prompts, K reference answers per prompt.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

_BISECTION_STEPS = 100


def mid_ranks(scores: torch.Tensor, reference_scores: torch.Tensor) -> torch.Tensor:
    """(N,) float64: for each prompt, the fraction of its K reference scores below ``scores`` plus half the
    fraction equal to it, the probability of beating an independent reference answer with a tie counted half.

    scores (N,), reference_scores (N, K).
    """
    reference = reference_scores.double()
    scores = scores.double()[:, None]
    return (reference < scores).double().mean(1) + 0.5 * (reference == scores).double().mean(1)


def self_mid_ranks(reference_scores: torch.Tensor) -> torch.Tensor:
    """(N, K) float64: each reference answer's mid-rank among all K answers to its prompt (itself included, so
    a row's mean is exactly 0.5: the reference against itself)."""
    reference = reference_scores.double()
    return torch.stack([mid_ranks(reference[:, k], reference) for k in range(reference.shape[1])], dim=1)


def _solve_increasing(function: Callable[[float], float], target: float, low: float, limit: float) -> float:
    """The largest beta in [low, limit] with function(beta) < target, to bisection precision, for a function
    increasing in beta: doubling from 1 brackets it, bisection narrows it; ``low`` where function(low) already
    reaches the target, ``limit`` where the target is out of reach."""
    if function(low) >= target:
        return low
    high = 1.0
    while function(high) < target:
        if high >= limit:
            return limit
        low, high = high, min(2 * high, limit)
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if function(middle) < target else (low, middle)
    return low


def _tilt(preference: torch.Tensor, beta: float) -> tuple[torch.Tensor, float]:
    """Weights (N, K) = softmax(beta * preference) per prompt, and their KL from uniform (the reference's own
    weights over its samples) averaged over prompts."""
    log_weights = torch.log_softmax(beta * preference, dim=1)
    weights = log_weights.exp()
    return weights, (weights * (log_weights + math.log(preference.shape[1]))).sum(1).mean().item()


def frontier_point(reference_scores: torch.Tensor, preference: torch.Tensor, kl: float) -> dict:
    """The reference's K answers per prompt reweighted by exp(beta * preference), one beta >= 0 for all prompts
    chosen by bisection so that the mean KL from the reference is ``kl`` (the best split of a KL budget over
    prompts, by the Lagrangian); capped at the largest KL a reweighting can reach.

    reference_scores, preference (N, K). preference = ``self_mid_ranks(reference_scores)`` gives the highest
    win rate at this KL; the clipped reward (``ppo.clip_scores``) gives PPO's optimum. Returns {"win_rate",
    "score", "kl", "beta"}: the reweighted policy's win rate against the reference, its mean score, its KL
    (= ``kl`` unless capped).
    """
    if kl < 0 or not math.isfinite(kl):
        raise ValueError(f"kl={kl}: the frontier needs a finite KL >= 0")
    preference = preference.double()
    # KL grows with beta (its derivative is beta * Var); kl = 0 is beta = 0
    beta = _solve_increasing(lambda b: _tilt(preference, b)[1], kl, 0.0, 1e12)
    weights, reached = _tilt(preference, beta)
    ranks = self_mid_ranks(reference_scores)
    return {"win_rate": (weights * ranks).sum(1).mean().item(),
            "score": (weights * reference_scores.double()).sum(1).mean().item(), "kl": reached, "beta": beta}


def uniform_ceiling(kl: float) -> float:
    """The highest win rate any policy at KL ``kl`` (nats per answer) from its reference can reach, for any
    reference and reward model: the mean of u under the density beta * exp(beta * u) / (exp(beta) - 1) on [0, 1]
    whose KL from uniform is ``kl``. 0.5 at kl = 0; best-of-n sits just below it (win n / (n + 1) at KL
    log n - (n - 1) / n)."""
    if kl < 0 or not math.isfinite(kl):
        raise ValueError(f"kl={kl}: the ceiling needs a finite KL >= 0")

    def mean_u(beta):
        return 1 / -math.expm1(-beta) - 1 / beta

    def kl_of(beta):
        return math.log(beta / math.expm1(beta)) + beta * mean_u(beta)

    if kl == 0:  # beta -> 0, where mean_u loses its digits to cancellation
        return 0.5
    # exp overflows beyond beta = 700; the ceiling there is 1 - 1/beta, within 0.002 of 1
    return mean_u(_solve_increasing(kl_of, kl, 1e-9, 700.0))
