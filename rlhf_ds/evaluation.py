"""Evaluate a policy against a reference on held-out prompts: reward-model scores, win rate and KL.

One process, plain transformers (no DeepSpeed), CPU or one GPU, float32. For each prompt the policy and the
reference each sample one response from the same left-padded batch with the same seed (common random numbers:
two identical models give identical samples, so a model against itself scores a win rate of exactly 0.5 and a
KL of exactly 0). Both responses are scored by the reward model through its own tokenizer, exactly as in
training (``reward.decode_rollout`` -> ``reward.score_pairs``), and the policy's response gets its KL to the
reference, sum over its tokens of log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) (k1), from one forward of
each model with the trainer's own ``experience.response_logits`` (attention mask, positions from the mask,
logits divided by the sampling temperature). On the embedded corpus's questions each response is also judged
by a rule that needs no reward model: is it about the subject asked (``corpus.about_subject``)?

With ``reference_samples`` K > 0 the reference also answers each prompt K more times from seeds of its own, so
the policy's answer is also ranked against the reference's answer distribution (the win rate as usually
defined, with independent samples, and far less noisy than one coupled pair) and ``rlhf_ds.frontier`` says the
best win rate PPO's objective, and any policy, could reach at the policy's KL.

Shapes: B prompts, P prompt tokens (left-padded), R = max_new_tokens, L = P + R.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Callable, Iterator, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_ds.corpus import about_subject
from rlhf_ds.data import PromptCollator, looks_like_path, load_prompts
from rlhf_ds.errors import KnownError
from rlhf_ds.experience import response_logits
from rlhf_ds.frontier import frontier_point, mid_ranks, self_mid_ranks
from rlhf_ds.lora import ADAPTER_CONFIG_FILE
from rlhf_ds.models import load_policy, load_reward_model, load_reward_tokenizer, load_tokenizer
from rlhf_ds.ppo import clip_scores, kl_penalty, logprobs_from_logits
from rlhf_ds.reward import decode_rollout, resolve_reward_max_len, score_pairs
from rlhf_ds.sampling import Sampler, Sampling

CHECKPOINT_MARKER = "trainer_state.json"  # a training checkpoint directory holds this file


class EvaluationError(KnownError, ValueError):
    """A problem with the evaluation's inputs, reported as one line naming the input and the fix."""


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


def is_checkpoint_dir(path: str) -> bool:
    """True for a training checkpoint directory (it holds ``trainer_state.json``), not an exported model."""
    return os.path.isfile(os.path.join(path, CHECKPOINT_MARKER))


def check_model_path(path: str, what: str) -> None:
    """Refuse a local path that is not a model directory, before anything loads.

    A string that does not look like a local path (``org/name``) is left to ``from_pretrained`` as a hub name.
    """
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if not any(os.path.isfile(os.path.join(local, name))
                   for name in ("config.json", ADAPTER_CONFIG_FILE, CHECKPOINT_MARKER)):
            raise EvaluationError(f"{what} {path}: not a Hugging Face model directory (no config.json), a LoRA "
                                  f"adapter (no {ADAPTER_CONFIG_FILE}) nor a training checkpoint (no "
                                  f"{CHECKPOINT_MARKER}); point it at e.g. runs/ppo/policy")
    elif os.path.exists(local):
        raise EvaluationError(f"{what} {path}: is a file; point it at a model directory such as runs/ppo/policy")
    elif looks_like_path(path) or not path.strip():
        raise EvaluationError(f"{what} {path!r}: no such directory; fix the path (hub names look like 'org/name')")


def _load(loader: Callable, path: str, what: str, *args, **kwargs):
    """Run a from_pretrained-style loader, turning its (often multi-line) failure into one EvaluationError line."""
    try:
        return loader(path, *args, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = " ".join(str(err).split())[:300] or type(err).__name__
        raise EvaluationError(f"{what} {path}: cannot load ({type(err).__name__}: {first})") from None


def load_models(policy_path: str, reference_path: str, reward_path: str, device: torch.device,
                trust_remote_code: bool = False) -> dict:
    """Policy, reference, reward model (eval mode, float32, on ``device``) and the two tokenizers.

    Policy and reference must share a vocabulary (the KL compares their log-probs of the same token ids).
    Returns {"policy", "reference", "reward", "policy_tokenizer", "reward_tokenizer"}.
    """
    for path, what in ((policy_path, "--policy"), (reference_path, "--reference"), (reward_path, "--reward")):
        check_model_path(path, what)
    policy_tokenizer = _load(load_tokenizer, policy_path, "--policy", trust_remote_code)
    reference_tokenizer = _load(load_tokenizer, reference_path, "--reference", trust_remote_code)
    if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise EvaluationError(f"--policy {policy_path} and --reference {reference_path} have different tokenizers: "
                              f"the KL needs the reference the policy was trained from")
    policy = _load(load_policy, policy_path, "--policy", torch.float32, trust_remote_code)
    reference = _load(load_policy, reference_path, "--reference", torch.float32, trust_remote_code)
    reward = _load(load_reward_model, reward_path, "--reward", torch.float32, trust_remote_code)
    reward_tokenizer = _load(load_reward_tokenizer, reward_path, "--reward", trust_remote_code)
    return {"policy": policy.to(device).eval(), "reference": reference.to(device).eval(),
            "reward": reward.to(device).eval(), "policy_tokenizer": policy_tokenizer,
            "reward_tokenizer": reward_tokenizer}


@contextlib.contextmanager
def loadable_policy(path: str) -> Iterator[str]:
    """``path`` itself, or, for a training checkpoint directory, a Hugging Face export of it in a temporary
    directory that lives as long as the ``with`` block."""
    if not (os.path.isdir(os.path.expanduser(path)) and is_checkpoint_dir(os.path.expanduser(path))):
        yield path
        return
    from rlhf_ds.checkpoint import CheckpointError, export_checkpoint

    with tempfile.TemporaryDirectory(prefix="rlhf_ds_eval_") as tmp:
        try:
            exported = export_checkpoint(path, os.path.join(tmp, "policy"))
        except CheckpointError as err:
            raise EvaluationError(f"--policy {path}: {' '.join(str(err).split())}") from None
        yield exported


# --------------------------------------------------------------------------- #
# Sampling and KL
# --------------------------------------------------------------------------- #


@torch.no_grad()
def sequence_kl(policy: PreTrainedModel, reference: PreTrainedModel, sequences: torch.Tensor,
                prompt_mask: torch.Tensor, response_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sequence KL estimate (B,) float32: sum over valid response tokens of log pi - log pi_ref (k1).

    sequences (B, P + R), prompt_mask (B, P), response_mask (B, R). Log-probs come from one forward per model
    with the trainer's ``response_logits`` (tokens after the first EOS masked out, positions from the mask,
    logits / temperature), so this is the sum of exactly the per-token KL the trainer penalises.
    """
    prompt_len = prompt_mask.shape[1]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    labels = sequences[:, prompt_len:]
    logprobs = logprobs_from_logits(
        response_logits(policy, sequences, attention_mask, prompt_len, temperature), labels)
    ref_logprobs = logprobs_from_logits(
        response_logits(reference, sequences, attention_mask, prompt_len, temperature), labels)
    kl = kl_penalty(logprobs, ref_logprobs, "k1")
    return torch.where(response_mask.bool(), kl, 0).sum(1).float()


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #


def _check_settings(batch_size: int, reference_samples: int) -> None:
    """Refuse a batch size below 1 or a negative number of extra reference answers."""
    if batch_size < 1:
        raise EvaluationError(f"--batch_size {batch_size}: use at least 1")
    if reference_samples < 0:
        raise EvaluationError(f"--reference_samples {reference_samples}: use 0 (off) or more")


@torch.no_grad()
def evaluate(policy: PreTrainedModel, reference: PreTrainedModel, reward: PreTrainedModel,
             policy_tokenizer: PreTrainedTokenizerBase, reward_tokenizer: PreTrainedTokenizerBase,
             prompts: list[str], *, sampling: Sampling, max_prompt_len: int, reward_max_len: Optional[int] = None,
             batch_size: int = 16, seed: int = 0, reference_samples: int = 0,
             log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """One record per prompt: prompt, both responses (text), both scores, the policy response's KL, both
    response lengths (valid tokens, up to and including EOS or the stop string) and whether each ended with
    EOS; with ``reference_samples`` K > 0 also ``reference_scores``, the scores of K more reference answers.
    ``sampling`` is the training run's (``PPOConfig.sampling()``); ``reward_max_len`` as in training (None: the
    reward model's limit).

    Prompts are taken in order in batches of ``batch_size``; batch i of n is sampled from seed ``seed + i`` by
    both models, and the reference's k-th extra answers from seed ``seed + (k + 1) * n + i``, so the samples
    depend on (seed, batch_size) and on nothing else, and no extra answer shares the coupled pair's seed.
    """
    if not prompts:
        raise EvaluationError("no prompts to evaluate: check --dataset / --eval_split and --num_prompts")
    _check_settings(batch_size, reference_samples)
    device = next(policy.parameters()).device
    sampler = Sampler(sampling, policy_tokenizer)
    reward_max_len, warning = resolve_reward_max_len(reward_max_len, reward.config, reward_tokenizer)
    if warning and log is not None:
        log(f"warning: {warning}")
    collate = PromptCollator(policy_tokenizer, max_prompt_len)
    eos_id = policy_tokenizer.eos_token_id
    num_batches = math.ceil(len(prompts) / batch_size)

    def rollout(model, prompt_ids, prompt_mask, batch_seed):
        """Sample, decode and score one batch: (sequences, response mask, answers, scores, ended with EOS)."""
        sequences, response_mask = sampler.sample(model, prompt_ids, prompt_mask, seed=batch_seed)
        response = sequences[:, prompt_ids.shape[1]:]
        questions, answers = decode_rollout(policy_tokenizer, prompt_ids, prompt_mask, response, response_mask,
                                            sampling.stop_strings)
        scores, _ = score_pairs(reward, reward_tokenizer, questions, answers, reward_max_len)
        return sequences, response_mask, answers, scores, (response == eos_id).any(dim=1)

    records: list[dict] = []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        batch_prompts = prompts[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(batch_prompts).items()}
        prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        rollouts = {name: rollout(model, prompt_ids, prompt_mask, seed + index)
                    for name, model in (("policy", policy), ("reference", reference))}
        extra_scores = [rollout(reference, prompt_ids, prompt_mask, seed + (k + 1) * num_batches + index)[3]
                        for k in range(reference_samples)]
        sequences, response_mask = rollouts["policy"][:2]
        kl = sequence_kl(policy, reference, sequences, prompt_mask, response_mask, sampling.temperature)
        for row, prompt in enumerate(batch_prompts):
            record = {"prompt": prompt}
            for name, (_, mask, answers, scores, ended) in rollouts.items():
                record[f"{name}_response"] = answers[row]
                record[f"{name}_score"] = scores[row].item()
                record[f"{name}_length"] = int(mask[row].sum())
                record[f"{name}_ended"] = bool(ended[row])
                record[f"{name}_about_subject"] = about_subject(prompt, answers[row])
            record["kl"] = kl[row].item()
            if reference_samples:
                record["reference_scores"] = [scores[row].item() for scores in extra_scores]
            records.append(record)
        if log is not None:
            log(f"evaluated {len(records)}/{len(prompts)} prompts")
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (as the trainer's score_std)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarize(records: list[dict], reward_clip: Optional[float] = None) -> dict:
    """The evaluation's figures from its per-prompt records (so the JSONL reproduces the summary exactly).

    win_rate: policy score > reference score on the same prompt counts 1, a tie 0.5. The two samples share their
    random numbers, so a policy near its reference often gives the very same answer: tie_fraction says how often,
    and win_rate_decided is the win rate over the other prompts (None when every prompt is a tie).
    kl_mean: per-sequence KL averaged over prompts; kl_per_token: total KL / total policy response tokens
    (token-weighted, like the trainer's kl_divergence).
    When the records hold ``reference_scores`` (K extra reference answers each): win_rate_independent, the
    policy answer's mid-rank among them averaged over prompts; at KL kl_mean from those answers, the win rate
    of PPO's optimum (reward clipped to +-``reward_clip`` as in training) and the ceiling for any policy
    (``rlhf_ds.frontier``).
    """
    if not records:
        raise EvaluationError("no records to summarise")
    summary: dict = {"num_prompts": len(records)}
    for name in ("policy", "reference"):
        mean, std = _mean_std([r[f"{name}_score"] for r in records])
        summary[f"{name}_reward_mean"], summary[f"{name}_reward_std"] = mean, std
    wins = [1.0 if r["policy_score"] > r["reference_score"] else 0.5 if r["policy_score"] == r["reference_score"]
            else 0.0 for r in records]
    summary["win_rate"] = sum(wins) / len(wins)
    decided = [w for w in wins if w != 0.5]
    summary["tie_fraction"] = 1 - len(decided) / len(wins)
    summary["win_rate_decided"] = sum(decided) / len(decided) if decided else None
    kl_total = sum(r["kl"] for r in records)
    summary["kl_mean"] = kl_total / len(records)
    summary["kl_per_token"] = kl_total / sum(r["policy_length"] for r in records)
    if all("reference_scores" in r for r in records):
        summary.update(_frontier_summary(records, max(summary["kl_mean"], 0.0), reward_clip))
    for name in ("policy", "reference"):
        summary[f"{name}_response_length"] = sum(r[f"{name}_length"] for r in records) / len(records)
        summary[f"{name}_eos_fraction"] = sum(r[f"{name}_ended"] for r in records) / len(records)
        judged = [r[f"{name}_about_subject"] for r in records if r.get(f"{name}_about_subject") is not None]
        if len(judged) == len(records):  # every prompt is an embedded-corpus question: the rule applies
            summary[f"{name}_about_subject"] = sum(judged) / len(judged)
    return summary


def _frontier_summary(records: list[dict], kl: float, reward_clip: Optional[float]) -> dict:
    """win_rate_independent and the frontier at ``kl`` (see ``summarize``); a negative k1 mean counts as 0."""
    reference = torch.tensor([r["reference_scores"] for r in records], dtype=torch.float64)
    policy = torch.tensor([r["policy_score"] for r in records], dtype=torch.float64)
    ceiling = frontier_point(reference, self_mid_ranks(reference), kl)
    optimum = frontier_point(reference, clip_scores(reference, reward_clip), kl)
    return {"reference_samples": reference.shape[1],
            "win_rate_independent": mid_ranks(policy, reference).mean().item(),
            "win_rate_ppo_optimum": optimum["win_rate"], "reward_ppo_optimum": optimum["score"],
            "win_rate_ceiling": ceiling["win_rate"], "frontier_kl": ceiling["kl"]}


def format_summary(summary: dict) -> str:
    """A small table of the summary for the terminal."""
    rows = [("reward mean", "reward_mean", "{:+.3f}"), ("reward std", "reward_std", "{:.3f}"),
            ("response length", "response_length", "{:.1f}"), ("EOS fraction", "eos_fraction", "{:.2f}"),
            ("about the subject", "about_subject", "{:.2f}")]
    lines = [f"{'':<17}{'policy':>10}{'reference':>11}"]
    for label, key, fmt in (row for row in rows if f"policy_{row[1]}" in summary):
        lines.append(f"{label:<17}{fmt.format(summary[f'policy_{key}']):>10}"
                     f"{fmt.format(summary[f'reference_{key}']):>11}")
    lines.append(f"win rate (policy > reference, ties 0.5): {summary['win_rate']:.3f}")
    decided = summary["win_rate_decided"]
    lines.append(f"ties (the same score): {summary['tie_fraction']:.2f}; win rate where not tied: "
                 + ("none" if decided is None else f"{decided:.3f}"))
    lines.append(f"KL(policy || reference), k1: {summary['kl_mean']:.4f} per sequence, "
                 f"{summary['kl_per_token']:.5f} per token")
    if "win_rate_independent" in summary:
        lines.append(f"win rate against {summary['reference_samples']} independent reference answers per prompt: "
                     f"{summary['win_rate_independent']:.3f}")
        lines.append(f"at KL {summary['frontier_kl']:.4f}: PPO's optimum would win "
                     f"{summary['win_rate_ppo_optimum']:.3f} (reward {summary['reward_ppo_optimum']:+.3f}), "
                     f"any policy at most {summary['win_rate_ceiling']:.3f}")
    lines.append(f"prompts: {summary['num_prompts']}")
    return "\n".join(lines)


def write_outputs(records: list[dict], summary: dict, samples_path: str, json_path: Optional[str]) -> None:
    """Samples as JSON lines (one per prompt) and the summary as one JSON object."""
    for path in (samples_path, json_path):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(samples_path, "w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(summary, fh, indent=2)
            fh.write("\n")


def evaluate_policy(config, policy_path: str, reference_path: str, reward_path: str, num_prompts: int,
                    batch_size: int, seed: int, device: torch.device, reference_samples: int = 0,
                    log: Optional[Callable[[str], None]] = None) -> tuple[list[dict], dict]:
    """Load everything and evaluate: the first ``num_prompts`` prompts of ``config.dataset`` split
    ``config.eval_split``, generation and reward settings from ``config`` (a PPOConfig), ``reference_samples``
    extra reference answers per prompt.

    ``policy_path`` may be a training checkpoint (converted first). Returns (records, summary).
    """
    if num_prompts < 1:
        raise EvaluationError(f"--num_prompts {num_prompts}: evaluate at least 1 prompt")
    _check_settings(batch_size, reference_samples)
    check_model_path(policy_path, "--policy")
    prompts, stats = load_prompts(config.dataset, config.eval_split, num_prompts)
    if log is not None:
        log(f"prompts: {stats.summary()}")
    with loadable_policy(policy_path) as policy_dir:
        models = load_models(policy_dir, reference_path, reward_path, device, config.trust_remote_code)
    records = evaluate(**models, prompts=prompts, sampling=config.sampling(), max_prompt_len=config.max_prompt_len,
                       reward_max_len=config.reward_max_len, batch_size=batch_size, seed=seed,
                       reference_samples=reference_samples, log=log)
    # normalize_reward clips standardised scores with the run's running moments, unknown here: no clip then
    return records, summarize(records, None if config.normalize_reward else config.reward_clip)
