"""rlhf_ds.frontier against loops, hand-derived numbers and brute force: mid-ranks with ties, the closed-form
ceiling at a hand-computed point and against best-of-n, and no random policy above the frontier at its KL."""
import math

import pytest
import torch

from rlhf_ds.frontier import frontier_point, mid_ranks, self_mid_ranks, uniform_ceiling
from rlhf_ds.ppo import clip_scores


def test_mid_ranks_equal_a_loop_with_ties():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 5, (7, 9), generator=generator).float()  # many ties
    scores = torch.randint(0, 6, (7,), generator=generator).float()
    expected = [sum(1.0 if r < s else 0.5 if r == s else 0.0 for r in row.tolist()) / 9
                for s, row in zip(scores.tolist(), reference)]
    assert mid_ranks(scores, reference).tolist() == pytest.approx(expected, abs=1e-12)
    ranks = self_mid_ranks(reference)
    assert ranks[2, 4].item() == pytest.approx(mid_ranks(reference[:, 4], reference)[2].item(), abs=1e-12)
    assert ranks.mean(1).tolist() == pytest.approx([0.5] * 7, abs=1e-12)  # the reference against itself


def test_uniform_ceiling_at_a_hand_computed_point_and_above_best_of_n():
    # beta = 2: mean 1 / (1 - e^-2) - 1/2 = 0.6565176, KL log(2 / (e^2 - 1)) + 2 * mean = -1.1614394 + 1.3130353
    assert uniform_ceiling(0.0) == 0.5
    assert uniform_ceiling(0.1515959) == pytest.approx(0.6565176, abs=2e-6)
    for n in range(2, 9):  # best-of-n: KL log n - (n-1)/n, win rate n / (n+1), nearly optimal
        ceiling = uniform_ceiling(math.log(n) - (n - 1) / n)
        assert n / (n + 1) <= ceiling <= n / (n + 1) + 0.02
    assert uniform_ceiling(0.2) < uniform_ceiling(0.4) < uniform_ceiling(5.0) < 1.0
    with pytest.raises(ValueError, match="kl=-0.1"):
        uniform_ceiling(-0.1)


def test_the_win_rate_frontier_of_many_distinct_scores_is_the_uniform_ceiling():
    scores = torch.randn(2, 3000, generator=torch.Generator().manual_seed(1))
    for kl in (0.1, 0.4):
        point = frontier_point(scores, self_mid_ranks(scores), kl)
        assert point["kl"] == pytest.approx(kl, abs=1e-6)
        assert point["win_rate"] == pytest.approx(uniform_ceiling(kl), abs=3e-3)


def test_no_random_policy_beats_the_frontier_at_its_kl():
    """Brute force on a small reference with ties: 500 random policies over its 6 answers per prompt, each
    with its exact win rate and KL; none above the win-rate frontier or the uniform ceiling at that KL, and
    the reward-optimal reweighting never above the frontier either."""
    generator = torch.Generator().manual_seed(2)
    reference = torch.tensor([[0.0, 1.0, 1.0, 2.0, 5.0, -3.0], [4.0, 4.0, 4.0, -1.0, 0.5, 2.0]])
    ranks = self_mid_ranks(reference)
    for _ in range(500):  # flat to peaked: normalised powers of exponential draws
        sharpness = 3 * torch.rand(1, generator=generator).item()
        draws = (-torch.rand(2, 6, generator=generator, dtype=torch.float64).log()) ** sharpness
        policy = draws / draws.sum(1, keepdim=True)
        kl = (policy * (policy.clamp_min(1e-300).log() + math.log(6))).sum(1).mean().item()
        win = (policy * ranks).sum(1).mean().item()
        assert win <= frontier_point(reference, ranks, kl)["win_rate"] + 1e-9
        assert win <= uniform_ceiling(kl) + 1e-9
    for kl in (0.0, 0.05, 0.3, 0.8):
        best = frontier_point(reference, ranks, kl)
        ppo = frontier_point(reference, clip_scores(reference, 3.0), kl)
        assert ppo["kl"] == pytest.approx(best["kl"], abs=1e-9)
        assert ppo["win_rate"] <= best["win_rate"] + 1e-12 and best["score"] <= ppo["score"] + 1e-12
    zero = frontier_point(reference, ranks, 0.0)
    assert zero["win_rate"] == pytest.approx(0.5, abs=1e-12) and zero["beta"] == 0.0


def test_a_kl_beyond_any_reweighting_is_capped_at_the_best_answers():
    reference = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    point = frontier_point(reference, self_mid_ranks(reference), 10.0)
    assert point["kl"] == pytest.approx(math.log(4), abs=1e-9)  # all weight on the best of 4
    assert point["win_rate"] == pytest.approx(7 / 8) and point["score"] == pytest.approx(3.0)
    assert clip_scores(reference, 1.5).tolist() == [[0.0, 1.0, 1.5, 1.5]]
    assert clip_scores(reference, None) is reference
    with pytest.raises(ValueError, match="kl=nan"):
        frontier_point(reference, reference, float("nan"))
