"""The critic-free advantage estimators of ppo.py (GRPO, RLOO, REINFORCE++) and the KL loss term: each against a
plain-Python loop on random ragged rows and against numbers worked out by hand; and the table of
launch/compare_estimators.py, which measures them against each other."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from rlhf_ds import ppo
from test_ppo import assert_close, make_mask, randn

REPO = Path(__file__).resolve().parents[1]

N = 3  # samples per prompt
LENGTHS = [5, 2, 1, 4, 3, 5]  # two groups of three, ragged, one single-token row
T = 5


# ---- plain-Python references -------------------------------------------------

def ref_groups(rewards, n):
    return [rewards[g:g + n] for g in range(0, len(rewards), n)]


def ref_broadcast(per_row, lengths, num_tokens):
    return [[per_row[b] if t < lengths[b] else 0.0 for t in range(num_tokens)] for b in range(len(lengths))]


def ref_grpo(rewards, n, eps):
    out = []
    for group in ref_groups(rewards, n):
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        out += [(r - mean) / (std + eps) for r in group]
    return out


def ref_rloo(rewards, n):
    out = []
    for group in ref_groups(rewards, n):
        for i, r in enumerate(group):
            others = [group[j] for j in range(n) if j != i]
            out.append(r - sum(others) / len(others))
    return out


def ref_returns(rewards, lengths, gamma):
    out = []
    for row, length in zip(rewards, lengths):
        out.append([sum(gamma ** (k - t) * row[k] for k in range(t, length)) if t < length else 0.0
                    for t in range(len(row))])
    return out


# ---- the estimators ----------------------------------------------------------

def test_grpo_advantages_match_a_loop_on_ragged_rows():
    rewards, mask = randn(len(LENGTHS), seed=31), make_mask(LENGTHS, T)
    advantages = ppo.grpo_advantages(rewards, mask, N)
    expected = ref_broadcast(ref_grpo(rewards.tolist(), N, ppo.GROUP_STD_EPS), LENGTHS, T)
    assert_close(advantages, expected)


def test_grpo_by_hand():
    # group [1, 2, 6]: mean 3, sample std sqrt((4 + 1 + 9) / 2) = sqrt(7); A = (r - 3) / sqrt(7)
    # group [5, 5]: std 0, so A = 0 / (0 + eps) = 0 (not nan)
    rewards = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    advantages = ppo.grpo_advantages(rewards, torch.tensor([[1, 1], [1, 0], [1, 1]]), 3, eps=0.0)
    s = math.sqrt(7)
    assert_close(advantages, [[-2 / s, -2 / s], [-1 / s, 0.0], [3 / s, 3 / s]])
    equal = ppo.grpo_advantages(torch.tensor([5.0, 5.0]), torch.ones(2, 3), 2)
    assert torch.equal(equal, torch.zeros(2, 3))


def test_rloo_advantages_match_a_loop_on_ragged_rows():
    rewards, mask = randn(len(LENGTHS), seed=32), make_mask(LENGTHS, T)
    expected = ref_broadcast(ref_rloo(rewards.tolist(), N), LENGTHS, T)
    assert_close(ppo.rloo_advantages(rewards, mask, N), expected)


def test_rloo_by_hand():
    # group [1, 2, 6]: baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5 -> A = -3, -1.5, 4.5
    rewards = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    advantages = ppo.rloo_advantages(rewards, torch.tensor([[1, 1], [1, 0], [1, 1]]), 3)
    assert advantages.tolist() == [[-3.0, -3.0], [-1.5, 0.0], [4.5, 4.5]]
    # RLOO's advantage is n / (n - 1) times the centred reward: the same direction as GRPO's, unscaled
    assert_close(advantages[:, 0], (rewards - rewards.mean()) * 3 / 2)


@pytest.mark.parametrize("estimator", [ppo.grpo_advantages, ppo.rloo_advantages])
def test_group_estimators_refuse_rows_that_do_not_form_groups(estimator):
    with pytest.raises(ValueError, match="cannot form groups of 4"):
        estimator(torch.zeros(6), torch.ones(6, 2), 4)
    with pytest.raises(ValueError, match="groups of 1"):
        estimator(torch.zeros(6), torch.ones(6, 2), 1)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_returns_match_a_loop_on_ragged_rows(gamma):
    rewards, mask = randn(len(LENGTHS), T, seed=33), make_mask(LENGTHS, T)
    rewards[~mask.bool()] = 100.0  # padding must not leak into any return
    expected = ref_returns(rewards.tolist(), LENGTHS, gamma)
    assert_close(ppo.reinforce_pp_returns(rewards, mask, gamma), expected)


def test_reinforce_pp_returns_by_hand():
    # gamma 0.5, rewards [1, 2, 4 | pad 9]: G2 = 4, G1 = 2 + 0.5 * 4 = 4, G0 = 1 + 0.5 * 4 = 3
    rewards = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    assert ppo.reinforce_pp_returns(rewards, torch.tensor([[1, 1, 1, 0]]), 0.5).tolist() == [[3.0, 4.0, 4.0, 0.0]]


def test_estimators_run_without_grad():
    rewards = randn(len(LENGTHS), seed=35).requires_grad_()
    mask = make_mask(LENGTHS, T)
    assert not ppo.grpo_advantages(rewards, mask, N).requires_grad
    assert not ppo.rloo_advantages(rewards, mask, N).requires_grad


# ---- the KL loss term --------------------------------------------------------

def test_kl_loss_is_the_coefficient_times_the_token_mean_of_k3():
    logprobs, ref, mask = randn(len(LENGTHS), T, seed=36), randn(len(LENGTHS), T, seed=37), make_mask(LENGTHS, T)
    items = [math.exp(r - lp) - 1 - (r - lp) for lp_row, r_row, m_row in zip(logprobs.tolist(), ref.tolist(),
                                                                             mask.tolist())
             for lp, r, m in zip(lp_row, r_row, m_row) if m]
    assert_close(ppo.kl_loss(logprobs, ref, mask, 0.3), 0.3 * sum(items) / len(items))
    assert_close(ppo.kl_loss(logprobs, ref, mask, 0.3, num_tokens=40.0), 0.3 * sum(items) / 40.0)


def test_kl_loss_gradient_pulls_toward_the_reference():
    # k3's gradient in log pi: 1 - exp(ref - log pi); positive where the policy is above the reference
    logprobs = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0]])
    ppo.kl_loss(logprobs, ref, torch.ones(1, 2), 1.0).backward()
    expected = [(1 - math.exp(-1.0)) / 2, (1 - math.exp(1.0)) / 2]
    assert logprobs.grad.tolist()[0] == pytest.approx(expected)


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_estimators", REPO / "launch" / "compare_estimators.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comparison_table_gives_each_estimator_its_mean_and_range_over_seeds():
    """launch/compare_estimators.py's table: one line per estimator, the mean over seeds with min..max."""
    compare = _compare_module()
    row = {"iterations": 10, "s_per_iteration": 2.0, "score_end": 1.0, "eval_score": 0.5, "win_rate": 0.5,
           "kl_end": 0.01, "eval_kl_per_token": 0.02, "peak_generation_mb": 100.0, "peak_experience_mb": 110.0,
           "peak_update_mb": 120.0}
    rows = [{**row, "estimator": "gae", "seed": 0}, {**row, "estimator": "gae", "seed": 1, "score_end": 2.0,
                                                      "win_rate": 0.75}, {**row, "estimator": "rloo", "seed": 0}]
    lines = compare.table(rows, ["gae", "rloo"]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == 12
    gae = [cell.strip() for cell in lines[2].split("|")[1:-1]]
    assert gae[:6] == ["`gae`", "10 (10..10)", "2.00 (2.00..2.00)", "+1.50 (+1.00..+2.00)", "+0.50 (+0.50..+0.50)",
                       "0.62 (0.50..0.75)"]
    assert lines[3].split("|")[2].strip() == "10"  # a single seed: no range


def test_comparison_refuses_an_unknown_estimator(capsys):
    with pytest.raises(SystemExit) as stop:
        _compare_module().main(["--estimators", "gae,ppo2"])
    assert stop.value.code == 2 and "--estimators: ppo2 unknown" in capsys.readouterr().err
