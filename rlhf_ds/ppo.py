"""PPO-RLHF maths on plain tensors: masked statistics, log-probabilities and
entropy from logits, KL estimators, KL-shaped per-token rewards, generalised
advantage estimation, and the clipped policy/value losses. Nothing here knows
about DeepSpeed, configs or models, so every function can be tested against a
slow reference. Shapes: B sequences, T response tokens, V vocabulary. A `mask`
is (B, T), float or bool, and is 1 on a prefix of each row (the response up to
and including the first EOS) and 0 on the padding after it; padded positions
never influence a statistic or a loss.
"""
import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_STATISTIC_CAP = 10.0  # nats per token: see kl_statistic
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "rloo")  # baselines from the other samples of the same prompt
GROUP_STD_EPS = 1e-6  # added to a group's std (GRPO), so a group of equal rewards gets advantage 0, not nan
WHITEN_EPS = 1e-8  # added to the variance before rsqrt, so a constant batch whitens to 0 instead of nan


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1, so padding does not dilute it.

    x, mask: same shape, e.g. (B, T). dim=None averages over all elements
    (returns a scalar); otherwise averages along dim. Padded entries are
    selected away (not multiplied by 0), so inf/nan there cannot leak in.
    A slice with no valid position gives nan (0 / 0).
    """
    mask = mask.bool()
    return torch.where(mask, x, 0).sum(dim) / mask.sum(dim)


def token_mean(x, mask, num_tokens=None):
    """The one aggregation of every per-token loss and loss statistic: sum of x over valid tokens / num_tokens.

    x, mask: (B, T) -> scalar. num_tokens=None divides by this batch's valid tokens (a plain masked mean).
    Data-parallel training passes the valid tokens of the whole global mini-batch divided by the world size:
    DeepSpeed then averages the ranks' gradients into exactly the token mean over all ranks' tokens, however
    they are split (a rank's own mean would weight a token on a short-response rank more).
    """
    if num_tokens is None:
        return masked_mean(x, mask)
    return torch.where(mask.bool(), x, 0).sum() / num_tokens


def masked_var(x, mask, unbiased=True):
    """Variance of x over valid positions only, as a scalar.

    x, mask: (B, T). unbiased=True applies Bessel's correction (divide by
    n - 1), which needs at least two valid elements, hence the ValueError.
    """
    mask = mask.bool()
    num_valid = int(mask.sum())
    if unbiased and num_valid < 2:
        raise ValueError(f"unbiased masked_var needs at least 2 valid elements, got {num_valid}")
    centered = torch.where(mask, x - masked_mean(x, mask), 0)
    denominator = num_valid - 1 if unbiased else num_valid
    return centered.square().sum() / denominator


def whiten(x, mask, mean, var=None, shift_mean=True):
    """(x - mean) * rsqrt(var + WHITEN_EPS) at valid positions, 0 at padding: the one whitening formula, fed
    with this batch's moments (``masked_whiten``) or all ranks' (``distributed.global_masked_whiten``).

    x, mask: (B, T) -> (B, T); mean, var: scalars (0-d tensors). var=None only centres (one value has no
    spread to divide by). shift_mean=False adds the mean back (rescale only).
    """
    whitened = x - mean if var is None else (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


def masked_whiten(x, mask, shift_mean=True):
    """Normalise x to unit variance (and zero mean) using valid positions only.

    Used on advantages so the policy-loss scale does not depend on the reward scale. x, mask: (B, T) -> (B, T).
    Mean and unbiased variance come from the valid positions (at least 2); padded positions are 0.
    """
    return whiten(x, mask, masked_mean(x, mask), masked_var(x, mask), shift_mean)


def _logprobs_of_labels(logits, labels):
    """log_softmax(logits).gather(labels) without building the log_softmax tensor.

    logits: (..., V), labels: (...) -> (...).
    """
    label_logits = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return label_logits - torch.logsumexp(logits, dim=-1)


def logprobs_from_logits(logits, labels):
    """Log-probability of each label token, the quantity PPO ratios are built from.

    logits: (B, T, V), labels: (B, T) int64 -> (B, T). Avoids a full (B, T, V)
    log_softmax copy. bf16/fp16 logits are upcast to float32 one sequence at a
    time, so only a (T, V) float32 copy exists at once, and the result is
    float32; float32/float64 logits keep their dtype.
    """
    if logits.dtype in (torch.float32, torch.float64):
        return _logprobs_of_labels(logits, labels)
    return torch.stack([
        _logprobs_of_labels(row_logits.float(), row_labels)
        for row_logits, row_labels in zip(logits, labels)
    ])


def _entropy(logits):
    """H = logsumexp(z) - sum(softmax(z) * z) over the last dim, in the logits' dtype."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def entropy_from_logits(logits):
    """Entropy of the categorical distribution at each position, for the entropy bonus.

    logits: (B, T, V) -> (B, T). bf16/fp16 logits are upcast to float32 one sequence at a time, as in
    ``logprobs_from_logits``: in bf16 arithmetic the sum over a 152k vocabulary loses about a tenth of a nat and
    a small entropy comes out 0 (so its bonus has no gradient), while a full (B, T, V) float32 copy would cost
    4 bytes per logit. float32/float64 logits keep their dtype.
    """
    if logits.dtype in (torch.float32, torch.float64):
        return _entropy(logits)
    return torch.stack([_entropy(row_logits.float()) for row_logits in logits])


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    logprobs, ref_logprobs: (B, T) -> (B, T). With r = logprobs - ref_logprobs:
    k1 = r (unbiased, can be negative), k2 = r^2 / 2 (low variance, biased),
    k3 = exp(-r) - 1 + r (unbiased and non-negative); see Schulman,
    "Approximating KL Divergence".
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}, expected one of {KL_ESTIMATORS}")


def kl_statistic(logprobs, ref_logprobs):
    """Per-token KL(policy || reference) for the controller's statistic (``kl_divergence``), whatever the
    penalty's estimator: k3, capped at ``KL_STATISTIC_CAP``.

    logprobs, ref_logprobs: (B, T) -> (B, T). Why k3: it has k1's expectation (both unbiased for tokens sampled
    from the policy), is never negative, and its variance is of order KL^2 where k1's is of order KL. Over one
    embedded rollout (~320 tokens) k1's mean swings by about +-0.008 at a KL of 0.01, as wide as the step rule's
    dead zone [0.005, 0.02], so the rule reacted to noise (README, KL control). Why the cap: k3 grows as
    pi_ref / pi, so one token the policy did not sample (tests/test_update.py forces an EOS-only response: 3e7)
    could alone outweigh a rollout. A sampled token reaches 10 nats only where the reference gives it at least
    13.6 times the policy's probability (r - 1 - log r = 10 at r = 13.6), at most 1/13.6 of the draws, and in the
    measured runs never.
    """
    return kl_penalty(logprobs, ref_logprobs, "k3").clamp(max=KL_STATISTIC_CAP)


def clip_scores(score, reward_clip=None):
    """The reward PPO maximises: reward-model scores (any shape) clipped to +-reward_clip, or as they are."""
    return score if reward_clip is None else score.clamp(-reward_clip, reward_clip)


def shape_rewards(score, kl, mask, kl_coef, reward_clip=None):
    """Per-token rewards: a KL penalty on every token plus the sequence score at the end.

    score: (B,) reward-model score, kl: (B, T), mask: (B, T) -> rewards (B, T).
    Each valid token gets -kl_coef * kl; the score (clipped to +-reward_clip
    when given) is added at each row's last valid token; padding gets 0.
    """
    mask = mask.bool()
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError("shape_rewards: every row needs at least one valid token")
    score = clip_scores(score, reward_clip)
    rewards = torch.where(mask, -kl_coef * kl, 0)
    last_index = (lengths - 1).unsqueeze(1)
    return rewards.scatter_add(1, last_index, score.unsqueeze(1).to(rewards.dtype))


@torch.no_grad()
def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016), computed backwards over T.

    rewards, values, mask: (B, T) -> (advantages, returns), both (B, T).
    Rewards and values at padding count as 0, so the value after a row's last
    valid token is 0 (the episode ends) and both outputs are 0 on padding
    (this relies on the mask being a prefix). returns = advantages + values.
    No whitening here. Runs without grad: advantages and returns are targets.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0)
    values = torch.where(mask, values, 0)
    next_value = torch.zeros_like(values[:, 0])
    running_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running_advantage = delta + gamma * lam * running_advantage
        advantages_reversed.append(running_advantage)
        next_value = values[:, t]
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def _groups(rewards, group_size):
    """(B,) -> (B / n, n): rows g*n .. g*n + n - 1 are the n samples of one prompt (the trainer keeps them
    together, on one rank). A group needs n >= 2 samples to have a baseline."""
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rows cannot form groups of {group_size} (need n >= 2 dividing B)")
    return rewards.reshape(-1, group_size)


def _per_token(sequence_advantages, mask):
    """(B,) -> (B, T): each row's advantage on its valid tokens, 0 on padding."""
    return torch.where(mask.bool(), sequence_advantages.unsqueeze(1), 0).to(sequence_advantages.dtype)


@torch.no_grad()
def grpo_advantages(rewards, mask, group_size, eps=GROUP_STD_EPS):
    """GRPO (Shao et al. 2024): each sample's reward standardised within its prompt's group, on every token.

    rewards: (B,) sequence rewards, mask: (B, T) -> (B, T). A_i = (r_i - mean_g) / (std_g + eps), where the
    std is the sample std of the group (Bessel's correction, n - 1), as DeepSeekMath and TRL compute it.
    The group replaces the critic as baseline; the KL to the reference is a loss term (``kl_loss``) unless
    the trainer folds it into the rewards.
    """
    groups = _groups(rewards, group_size)
    standardised = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    return _per_token(standardised.reshape(-1), mask)


@torch.no_grad()
def rloo_advantages(rewards, mask, group_size):
    """RLOO (Ahmadian et al. 2024): each sample's reward minus the mean of the other n - 1 in its group.

    rewards: (B,) sequence rewards, mask: (B, T) -> (B, T). A_i = r_i - (sum_g - r_i) / (n - 1): a baseline
    independent of the sample it judges, so the estimate stays unbiased.
    """
    groups = _groups(rewards, group_size)
    leave_one_out = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return _per_token((groups - leave_one_out).reshape(-1), mask)


def reinforce_pp_returns(rewards, mask, gamma):
    """REINFORCE++ (Hu 2025) before its whitening: discounted returns of the KL-shaped per-token rewards.

    rewards, mask: (B, T) -> (B, T), G_t = sum_{k >= t} gamma^(k - t) r_k over valid tokens, 0 on padding:
    ``gae``'s advantages with no critic (values 0) and lambda 1, so one backward recursion serves both.
    No group either: the trainer whitens these over the global batch (``distributed.global_masked_whiten``)
    and uses them as advantages.
    """
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return advantages


def kl_loss(logprobs, ref_logprobs, mask, kl_coef, estimator="k3", num_tokens=None):
    """The KL to the reference as a loss term (GRPO's way; the rewards then carry no KL penalty).

    logprobs (with grad), ref_logprobs, mask: (B, T) -> scalar, kl_coef * token_mean(kl_penalty(...)). k3 by
    default: non-negative, unbiased, and its gradient pulls each sampled token's probability toward the
    reference's.
    """
    return kl_coef * token_mean(kl_penalty(logprobs, ref_logprobs, estimator), mask, num_tokens)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range, num_tokens=None):
    """PPO clipped surrogate loss, averaged over valid tokens (``token_mean``, num_tokens as there).

    logprobs, old_logprobs, advantages, mask: (B, T) -> (loss, clipfrac), scalars.
    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))); clipfrac
    is the fraction of valid tokens where the clipped term is strictly larger,
    i.e. where clipping removed the gradient.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    clipfrac = token_mean((clipped > unclipped).to(ratio.dtype), mask, num_tokens)
    return loss, clipfrac


def value_loss(values, old_values, returns, mask, clip_range_value=None, num_tokens=None):
    """Squared error of the value head against returns, optionally PPO-clipped (``token_mean``).

    values, old_values, returns, mask: (B, T) -> scalar. With clip_range_value
    c, the prediction may move at most c from old_values before the loss stops
    rewarding it: mean(max((v - R)^2, (old_v + clamp(v - old_v, -c, c) - R)^2)).
    No 0.5 factor; scale it with vf_coef.
    """
    unclipped = (values - returns).square()
    if clip_range_value is None:
        return token_mean(unclipped, mask, num_tokens)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    clipped = (clipped_values - returns).square()
    return token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)


def entropy_loss(entropy, mask, entropy_coef, num_tokens=None):
    """Negative entropy bonus: minimising it raises entropy and keeps exploration.

    entropy, mask: (B, T) -> scalar (``token_mean``).
    """
    return -entropy_coef * token_mean(entropy, mask, num_tokens)


def total_loss(policy_loss, value_loss, entropy_loss, vf_coef, kl_loss=0.0):
    """The logged sum policy + vf_coef * value + entropy (+ kl_loss) terms (scalars; value_loss None without a
    critic). The actor and critic step separately (their parameters do not overlap), on policy_loss +
    entropy_loss (+ kl_loss) and vf_coef * value_loss: the gradient of each part is the gradient of this sum
    with respect to that engine's parameters."""
    return policy_loss + (0.0 if value_loss is None else vf_coef * value_loss) + entropy_loss + kl_loss


def approx_kl(logprobs, old_logprobs, mask, num_tokens=None):
    """How far one update moved the policy: KL(old || new) by the k3 estimator, token-averaged.

    logprobs, old_logprobs, mask: (B, T) -> scalar, mean of exp(r) - 1 - r with r = log pi - log pi_old.
    """
    log_ratio = logprobs - old_logprobs
    return token_mean(log_ratio.exp() - 1 - log_ratio, mask, num_tokens)
