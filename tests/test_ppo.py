"""Tests for rlhf_ds.ppo: each function against a slow plain-Python reference
(loops over b, t with python floats and the math module) on seeded random
inputs with ragged prefix masks, plus small hand-worked examples."""
import math

import pytest
import torch

from rlhf_ds import ppo

B, T, V = 4, 6, 11
LENGTHS = [6, 3, 1, 4]  # ragged, including a row with a single valid token


def make_mask(lengths, num_tokens, dtype=torch.float32):
    return torch.tensor([[1 if t < n else 0 for t in range(num_tokens)] for n in lengths], dtype=dtype)


def randn(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def assert_close(actual, expected, tol=1e-9):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ---- plain-Python references -------------------------------------------------

def valid_items(x, mask):
    return [x[b][t] for b in range(len(x)) for t in range(len(x[b])) if mask[b][t]]


def ref_mean(items):
    return sum(items) / len(items)


def ref_var(items, unbiased=True):
    mean = ref_mean(items)
    return sum((v - mean) ** 2 for v in items) / (len(items) - 1 if unbiased else len(items))


def ref_whiten(x, mask, shift_mean=True):
    items = valid_items(x, mask)
    mean, var = ref_mean(items), ref_var(items)
    out = []
    for row, mask_row in zip(x, mask):
        out_row = []
        for value, valid in zip(row, mask_row):
            whitened = (value - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean)
            out_row.append(whitened if valid else 0.0)
        out.append(out_row)
    return out


def ref_logsumexp(z):
    top = max(z)
    return top + math.log(sum(math.exp(v - top) for v in z))


def ref_logprobs(logits, labels):
    return [[logits[b][t][labels[b][t]] - ref_logsumexp(logits[b][t]) for t in range(len(labels[b]))]
            for b in range(len(labels))]


def ref_entropy(logits):
    out = []
    for row in logits:
        out_row = []
        for z in row:
            lse = ref_logsumexp(z)
            out_row.append(-sum(math.exp(v - lse) * (v - lse) for v in z))
        out.append(out_row)
    return out


def ref_kl(logprob, ref_logprob, estimator):
    r = logprob - ref_logprob
    return {"k1": r, "k2": r * r / 2, "k3": math.exp(-r) - 1 + r}[estimator]


def ref_shape_rewards(score, kl, mask, kl_coef, reward_clip=None):
    out = []
    for b in range(len(kl)):
        length = sum(1 for valid in mask[b] if valid)
        s = score[b] if reward_clip is None else min(max(score[b], -reward_clip), reward_clip)
        row = [-kl_coef * kl[b][t] if mask[b][t] else 0.0 for t in range(len(kl[b]))]
        row[length - 1] += s
        out.append(row)
    return out


def ref_gae(rewards, values, mask, gamma, lam):
    advantages, returns = [], []
    for b in range(len(rewards)):
        length = sum(1 for valid in mask[b] if valid)
        adv_row = [0.0] * len(rewards[b])
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[b][t + 1] if t + 1 < length else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            adv_row[t] = running
        advantages.append(adv_row)
        returns.append([adv_row[t] + values[b][t] if t < length else 0.0 for t in range(len(adv_row))])
    return advantages, returns


def ref_policy_loss(logprobs, old_logprobs, advantages, mask, eps):
    losses, clipped_count = [], 0
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logprobs[b][t] - old_logprobs[b][t])
            unclipped = -advantages[b][t] * ratio
            clipped = -advantages[b][t] * min(max(ratio, 1 - eps), 1 + eps)
            losses.append(max(unclipped, clipped))
            clipped_count += clipped > unclipped
    return ref_mean(losses), clipped_count / len(losses)


def ref_value_loss(values, old_values, returns, mask, clip=None):
    losses = []
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            loss = (values[b][t] - returns[b][t]) ** 2
            if clip is not None:
                clipped_value = old_values[b][t] + min(max(values[b][t] - old_values[b][t], -clip), clip)
                loss = max(loss, (clipped_value - returns[b][t]) ** 2)
            losses.append(loss)
    return ref_mean(losses)


# ---- masked statistics ---------------------------------------------------------

@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool])
def test_masked_mean_matches_reference(mask_dtype):
    x, mask = randn(B, T, seed=0), make_mask(LENGTHS, T, mask_dtype)
    xs, ms = x.tolist(), mask.tolist()
    assert_close(ppo.masked_mean(x, mask), ref_mean(valid_items(xs, ms)))
    assert_close(ppo.masked_mean(x, mask, dim=1), [ref_mean(valid_items([row], [m])) for row, m in zip(xs, ms)])
    columns = [[[xs[b][t]] for b in range(B)] for t in range(T)]
    column_masks = [[[ms[b][t]] for b in range(B)] for t in range(T)]
    assert_close(ppo.masked_mean(x, mask, dim=0),
                 [ref_mean(valid_items(c, m)) for c, m in zip(columns, column_masks)])


def test_masked_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert ppo.masked_mean(x, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert ppo.masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 3.0])


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_reference(unbiased):
    x, mask = randn(B, T, seed=1), make_mask(LENGTHS, T)
    assert_close(ppo.masked_var(x, mask, unbiased), ref_var(valid_items(x.tolist(), mask.tolist()), unbiased))


def test_masked_var_single_valid_element():
    x, mask = torch.tensor([[5.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="at least 2 valid"):
        ppo.masked_var(x, mask)
    with pytest.raises(ValueError, match="at least 2 valid"):
        ppo.masked_whiten(x, mask)
    assert ppo.masked_var(x, mask, unbiased=False).item() == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shift_mean):
    x, mask = randn(B, T, seed=2) * 3 + 1, make_mask(LENGTHS, T)
    assert_close(ppo.masked_whiten(x, mask, shift_mean), ref_whiten(x.tolist(), mask.tolist(), shift_mean))


def test_masked_whiten_by_hand():
    # valid [1, 2, 3]: mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1]; padding -> 0
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[1, 1, 1, 0]])
    assert ppo.masked_whiten(x, mask).tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert ppo.masked_whiten(x, mask, shift_mean=False).tolist()[0] == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_masked_whiten_ignores_padded_values():
    x, mask = randn(B, T, seed=3), make_mask(LENGTHS, T)
    poisoned = torch.where(mask.bool(), x, 1e30)
    expected = ppo.masked_whiten(x, mask)
    assert torch.equal(ppo.masked_whiten(poisoned, mask), expected)
    assert torch.all(expected[~mask.bool()] == 0)


# ---- logits ----------------------------------------------------------------------

def test_logprobs_from_logits_matches_reference_and_log_softmax():
    logits = randn(B, T, V, seed=4).float() * 4
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    logprobs = ppo.logprobs_from_logits(logits, labels)
    assert logprobs.shape == (B, T) and logprobs.dtype == torch.float32
    assert_close(logprobs, ref_logprobs(logits.tolist(), labels.tolist()), tol=1e-5)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


def test_logprobs_from_logits_by_hand():
    # uniform logits over 4 tokens: log p = -log 4 whatever the label
    logits, labels = torch.zeros(1, 2, 4), torch.tensor([[0, 3]])
    assert ppo.logprobs_from_logits(logits, labels).tolist()[0] == pytest.approx([-math.log(4)] * 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_from_logits_low_precision(dtype):
    logits = (randn(B, T, V, seed=6) * 4).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    logprobs = ppo.logprobs_from_logits(logits, labels)
    assert logprobs.dtype == torch.float32
    # computed in float32 on the rounded logits, so it matches the exact value of those logits
    assert_close(logprobs, ref_logprobs(logits.float().tolist(), labels.tolist()), tol=1e-5)


def test_entropy_from_logits_matches_reference():
    logits = randn(B, T, V, seed=8) * 3
    assert_close(ppo.entropy_from_logits(logits), ref_entropy(logits.tolist()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_entropy_from_logits_low_precision_is_float32_accurate(dtype):
    """Real-vocabulary-size bf16 logits: the entropy is computed in float32 from the rounded logits, within 1e-3
    nats of a float64 computation on the same logits (in bf16 arithmetic the error was 0.12-0.21 nats), and a
    small entropy is not rounded to 0 (its bonus keeps a gradient)."""
    generator = torch.Generator().manual_seed(44)
    logits = (torch.randn(2, 3, 151936, generator=generator) * 2).to(dtype)
    logits[1, 0, 7] = 22  # one dominant token: entropy ~1e-3, which bf16 arithmetic rounds to 0
    entropy = ppo.entropy_from_logits(logits)
    assert entropy.dtype == torch.float32
    reference = ppo.entropy_from_logits(logits.double())
    assert (entropy.double() - reference).abs().max().item() <= 1e-3
    assert entropy[1, 0].item() > 0
    logits.requires_grad_()
    ppo.entropy_from_logits(logits).sum().backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()


def test_entropy_from_logits_by_hand():
    # uniform over 5 tokens: H = log 5; one overwhelming logit: H ~ 0
    logits = torch.tensor([[[0.0] * 5, [100.0, 0.0, 0.0, 0.0, 0.0]]])
    assert ppo.entropy_from_logits(logits).tolist()[0] == pytest.approx([math.log(5), 0.0], abs=1e-6)


# ---- KL -------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ppo.KL_ESTIMATORS)
def test_kl_penalty_matches_reference(estimator):
    logprobs, ref_logprobs = -randn(B, T, seed=9).abs(), -randn(B, T, seed=10).abs()
    expected = [[ref_kl(a, b, estimator) for a, b in zip(row, ref_row)]
                for row, ref_row in zip(logprobs.tolist(), ref_logprobs.tolist())]
    assert_close(ppo.kl_penalty(logprobs, ref_logprobs, estimator), expected)


def test_kl_penalty_by_hand():
    # r = logprobs - ref_logprobs = [0.5, -1, 0]
    logprobs, ref_logprobs = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -1.0, -3.0])
    assert ppo.kl_penalty(logprobs, ref_logprobs).tolist() == pytest.approx([0.5, -1.0, 0.0])
    # r^2 / 2 = [0.125, 0.5, 0]
    assert ppo.kl_penalty(logprobs, ref_logprobs, "k2").tolist() == pytest.approx([0.125, 0.5, 0.0])
    # exp(-r) - 1 + r = [e^-0.5 - 0.5, e - 2, 0] = [0.1065307, 0.7182818, 0]
    assert ppo.kl_penalty(logprobs, ref_logprobs, "k3").tolist() == pytest.approx([0.1065307, 0.7182818, 0.0])


def test_kl_statistic_is_k3_capped_by_hand_and_against_a_loop():
    """The controller's statistic: k3 per token, at most KL_STATISTIC_CAP nats (a forced token with d = -17 gave
    k3 = 2.4e7 and drowned a rollout's mean)."""
    # d = logprobs - ref_logprobs = [0.5, -1, 0, -17]: k3 = [e^-0.5 - 0.5, e - 2, 0, e^17 - 18 -> the cap]
    logprobs, ref_logprobs = torch.tensor([-1.0, -2.0, -3.0, -20.0]), torch.tensor([-1.5, -1.0, -3.0, -3.0])
    assert ppo.kl_statistic(logprobs, ref_logprobs).tolist() == pytest.approx([0.1065307, 0.7182818, 0.0, 10.0])
    logprobs, ref_logprobs = -randn(B, T, seed=21).abs() * 8, -randn(B, T, seed=22).abs()
    expected = [[min(math.exp(b - a) - 1 + (a - b), ppo.KL_STATISTIC_CAP) for a, b in zip(row, ref_row)]
                for row, ref_row in zip(logprobs.tolist(), ref_logprobs.tolist())]
    assert any(value == ppo.KL_STATISTIC_CAP for row in expected for value in row)  # the cap is exercised
    assert_close(ppo.kl_statistic(logprobs, ref_logprobs), expected)


def test_kl_penalty_unknown_estimator():
    with pytest.raises(ValueError, match="'k4'.*k1.*k2.*k3"):
        ppo.kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


# ---- rewards and advantages ----------------------------------------------------------

@pytest.mark.parametrize("reward_clip", [None, 0.5])
def test_shape_rewards_matches_reference(reward_clip):
    score, kl, mask = randn(B, seed=11) * 2, randn(B, T, seed=12), make_mask(LENGTHS, T)
    expected = ref_shape_rewards(score.tolist(), kl.tolist(), mask.tolist(), 0.1, reward_clip)
    assert_close(ppo.shape_rewards(score, kl, mask, 0.1, reward_clip), expected)


def test_shape_rewards_by_hand():
    score = torch.tensor([2.0, -3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # -0.5 * kl on valid tokens, score at the last valid one (clipped to +-1 in the second call)
    assert ppo.shape_rewards(score, kl, mask, 0.5).tolist() == [
        pytest.approx([-0.05, -0.1, -0.15 + 2.0]), pytest.approx([-0.2 - 3.0, 0.0, 0.0])]
    assert ppo.shape_rewards(score, kl, mask, 0.5, reward_clip=1.0).tolist() == [
        pytest.approx([-0.05, -0.1, 0.85]), pytest.approx([-1.2, 0.0, 0.0])]


def test_shape_rewards_empty_row_raises():
    mask = torch.tensor([[1, 1], [0, 0]])
    with pytest.raises(ValueError, match="at least one valid token"):
        ppo.shape_rewards(torch.ones(2), torch.zeros(2, 2), mask, 0.1)


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (0.99, 1.0)])
def test_gae_matches_reference(gamma, lam):
    rewards, values, mask = randn(B, T, seed=13), randn(B, T, seed=14), make_mask(LENGTHS, T)
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = ref_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert_close(advantages, expected_advantages)
    assert_close(returns, expected_returns)


def test_gae_by_hand():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72), rewards [0, 0, 1], values [0.5, 0.4, 0.3]:
    # t=2: delta = 1 + 0.9 * 0   - 0.3 =  0.7   A2 = 0.7
    # t=1: delta = 0 + 0.9 * 0.3 - 0.4 = -0.13  A1 = -0.13 + 0.72 * 0.7   = 0.374
    # t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14  A0 = -0.14 + 0.72 * 0.374 = 0.12928
    # returns = A + V = [0.62928, 0.774, 1.0]; the 4th (padded) position holds garbage and must give 0
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0]], dtype=torch.float64)
    advantages, returns = ppo.gae(rewards, values, torch.tensor([[1, 1, 1, 0]]), 0.9, 0.8)
    assert advantages.tolist()[0] == pytest.approx([0.12928, 0.374, 0.7, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.62928, 0.774, 1.0, 0.0])


def test_gae_undiscounted_is_reward_to_go_minus_value():
    rewards, values, mask = randn(B, T, seed=15), randn(B, T, seed=16), make_mask(LENGTHS, T)
    advantages, returns = ppo.gae(rewards, values, mask, 1.0, 1.0)
    rs, vs = rewards.tolist(), values.tolist()
    expected_returns = [[sum(rs[b][t:n]) if t < n else 0.0 for t in range(T)] for b, n in enumerate(LENGTHS)]
    expected_advantages = [[expected_returns[b][t] - vs[b][t] if t < n else 0.0 for t in range(T)]
                           for b, n in enumerate(LENGTHS)]
    assert_close(advantages, expected_advantages)
    assert_close(returns, expected_returns)


def test_gae_does_not_track_gradients():
    values = randn(B, T, seed=17).requires_grad_()
    advantages, returns = ppo.gae(randn(B, T, seed=18), values, make_mask(LENGTHS, T), 0.9, 0.9)
    assert not advantages.requires_grad and not returns.requires_grad


# ---- losses -----------------------------------------------------------------------------

def test_policy_loss_matches_reference():
    logprobs, old_logprobs = randn(B, T, seed=19) * 0.3, randn(B, T, seed=20) * 0.3
    advantages, mask = randn(B, T, seed=21), make_mask(LENGTHS, T)
    loss, clipfrac = ppo.policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    expected_loss, expected_clipfrac = ref_policy_loss(
        logprobs.tolist(), old_logprobs.tolist(), advantages.tolist(), mask.tolist(), 0.2)
    assert 0 < expected_clipfrac < 1  # the random case exercises both branches
    assert_close(loss, expected_loss)
    assert_close(clipfrac, expected_clipfrac)


def test_policy_loss_by_hand():
    # clip_range 0.2, old_logprobs 0:
    # ratio 1.1, A= 1: -1.1 vs -1.1          -> -1.1  not clipped (inside [0.8, 1.2])
    # ratio 1.5, A= 2: -3.0 vs -2 * 1.2=-2.4 -> -2.4  clipped
    # ratio 0.5, A= 1: -0.5 vs -1 * 0.8=-0.8 -> -0.5  not clipped (pessimistic term is the unclipped one)
    # loss = (-1.1 - 2.4 - 0.5) / 3 = -4/3, clipfrac = 1/3; the padded token must not count
    logprobs = torch.log(torch.tensor([[1.1, 1.5, 0.5, 9.0]], dtype=torch.float64))
    advantages = torch.tensor([[1.0, 2.0, 1.0, 5.0]], dtype=torch.float64)
    loss, clipfrac = ppo.policy_loss(logprobs, torch.zeros_like(logprobs), advantages,
                                     torch.tensor([[1, 1, 1, 0]]), 0.2)
    assert loss.item() == pytest.approx(-4 / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_reference(clip):
    values, old_values = randn(B, T, seed=22), randn(B, T, seed=23)
    returns, mask = randn(B, T, seed=24), make_mask(LENGTHS, T)
    expected = ref_value_loss(values.tolist(), old_values.tolist(), returns.tolist(), mask.tolist(), clip)
    assert_close(ppo.value_loss(values, old_values, returns, mask, clip), expected)


def test_value_loss_clipped_vs_unclipped_by_hand():
    # token 0: v=1, old=0, R=2: unclipped (1-2)^2 = 1; clipped value 0 + 0.2 -> (0.2-2)^2 = 3.24; max 3.24
    # token 1: v=2, old=2, R=3: both (2-3)^2 = 1
    # unclipped mean (1 + 1) / 2 = 1; clipped mean (3.24 + 1) / 2 = 2.12; padded token ignored
    values = torch.tensor([[1.0, 2.0, 50.0]])
    old_values = torch.tensor([[0.0, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert ppo.value_loss(values, old_values, returns, mask).item() == pytest.approx(1.0)
    assert ppo.value_loss(values, old_values, returns, mask, 0.2).item() == pytest.approx(2.12)


def test_entropy_loss_matches_reference():
    entropy, mask = randn(B, T, seed=25).abs(), make_mask(LENGTHS, T)
    expected = -0.01 * ref_mean(valid_items(entropy.tolist(), mask.tolist()))
    assert_close(ppo.entropy_loss(entropy, mask, 0.01), expected)


def test_total_loss_by_hand():
    # 1 + 0.5 * 2 + (-0.1) = 1.9
    loss = ppo.total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(-0.1), 0.5)
    assert loss.item() == pytest.approx(1.9)


def test_token_mean_divides_the_valid_sum_by_the_given_count():
    # valid 1 + 2 + 4 = 7 (the padded 100 is selected away, not multiplied); 7 / 3 by default, 7 / 14 given
    x, mask = torch.tensor([[1.0, 2.0, 100.0], [4.0, float("nan"), 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert ppo.token_mean(x, mask).item() == pytest.approx(7 / 3)
    assert ppo.token_mean(x, mask, num_tokens=14).item() == pytest.approx(0.5)


def test_global_token_mean_over_ranks_equals_the_union_mean():
    """Two "ranks" with 2 and 9 valid tokens: the average of their token_mean with num_tokens = global / 2
    (what DeepSpeed's gradient average sees) is the mean over the union; the mean of the ranks' own means is
    not (the short rank's tokens would weigh 4.5 times more)."""
    lengths = ([2, 0 + 1, 0 + 1], [6, 3, 1])
    xs = [randn(3, 6, seed=40 + r) for r in range(2)]
    masks = [make_mask([n if n else 1 for n in lengths_r], 6) for lengths_r in lengths]
    total = sum(int(m.sum()) for m in masks)
    union = ref_mean(valid_items(xs[0].tolist(), masks[0].tolist()) + valid_items(xs[1].tolist(), masks[1].tolist()))
    averaged = sum(ppo.token_mean(x, m, num_tokens=total / 2) for x, m in zip(xs, masks)) / 2
    assert_close(averaged, union)
    own_means = sum(ppo.token_mean(x, m) for x, m in zip(xs, masks)) / 2
    assert abs(own_means.item() - union) > 1e-3


@pytest.mark.parametrize("loss", ["policy", "value", "entropy"])
def test_losses_take_the_global_token_count(loss):
    a, b, c = randn(B, T, seed=41) * 0.3, randn(B, T, seed=42) * 0.3, randn(B, T, seed=43)
    mask = make_mask(LENGTHS, T)
    valid = int(mask.sum())
    compute = {"policy": lambda n: ppo.policy_loss(a, b, c, mask, 0.2, num_tokens=n)[0],
               "value": lambda n: ppo.value_loss(a, b, c, mask, 0.2, num_tokens=n),
               "entropy": lambda n: ppo.entropy_loss(c.abs(), mask, 0.01, num_tokens=n)}[loss]
    assert_close(compute(4 * valid), compute(None) / 4)


def test_approx_kl_is_the_k3_estimate_of_old_against_new():
    logprobs, old = torch.tensor([[0.1, -0.2, 5.0]], dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    expected = ((math.exp(0.1) - 1 - 0.1) + (math.exp(-0.2) - 1 + 0.2)) / 2
    assert ppo.approx_kl(logprobs, old, torch.tensor([[1, 1, 0]])).item() == pytest.approx(expected)
