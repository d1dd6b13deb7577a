"""Cross-tokenizer reward scoring: policy tokens -> text -> the reward model's own tokens -> one score each.

The policy (Qwen2) and the reward model (DeBERTa-v3) do not share a vocabulary, so a response is decoded with
the policy tokenizer and re-tokenised with the reward tokenizer as a (question, answer) text pair, which is how
the OpenAssistant reward models were trained. The same ``encode_pairs`` is used to train the embedded reward
model, so training and scoring see identical inputs.
"""
from __future__ import annotations

from typing import Optional

import torch

from rlhf_ds.data import question_from_prompt
from rlhf_ds.sampling import answer_text

# Used when neither the reward model's config nor its tokenizer states a length limit.
DEFAULT_REWARD_MAX_LEN = 512
# What a reward model reads of a tokenised pair: DeBERTa's tokenizer makes all three, others may omit segment ids.
REWARD_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def reward_context_limit(model_config, tokenizer) -> Optional[int]:
    """The longest input the reward model was built for: the smaller of its position table
    (``max_position_embeddings``; DeBERTa-v3: 512) and its tokenizer's ``model_max_length``; None when neither
    states one (a tokenizer without a limit reports a huge sentinel)."""
    limits = [getattr(model_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 10**6]
    return min(limits, default=None)


def resolve_reward_max_len(requested: Optional[int], model_config, tokenizer) -> tuple[int, Optional[str]]:
    """(tokens per pair, warning or None): ``requested`` capped at ``reward_context_limit`` (longer inputs
    reach positions the model never saw, DeBERTa's relative buckets included), None meaning the limit itself."""
    limit = reward_context_limit(model_config, tokenizer)
    if requested is None:
        return (limit or DEFAULT_REWARD_MAX_LEN), None
    if limit is not None and requested > limit:
        return limit, (f"reward_max_len={requested} exceeds the reward model's {limit}-token limit: capped at "
                       f"{limit} (set reward_max_len to at most {limit}, or null, to silence this)")
    return requested, None


def encode_pairs(tokenizer, questions: list[str], answers: list[str], max_len: int) -> dict:
    """Tokenise (question, answer) pairs, padded, at most ``max_len`` tokens each.

    Too long: the question is cut from the *left* (the end of the dialogue matters most). Only when the answer
    alone does not fit is it cut too (``longest_first``), which ``only_first`` would refuse to do.
    Returns ``input_ids``/``attention_mask`` (B, L) tensors, ``token_type_ids`` (B, L) (0 for the question, 1
    for the answer) when the tokenizer makes them, as DeBERTa's does, and ``truncated`` (B,) bool, the pairs
    that were cut. The tokenizer must truncate from the left, as ``models.load_reward_tokenizer`` sets it up.
    """
    if tokenizer.truncation_side != "left":
        raise ValueError("encode_pairs needs a reward tokenizer with truncation_side='left' (the question is cut "
                         "from the left): load it with rlhf_ds.models.load_reward_tokenizer")
    kwargs = dict(max_length=max_len, padding=True, return_tensors="pt")
    try:
        batch = tokenizer(questions, answers, truncation="only_first", **kwargs)
    except Exception as err:  # tokenizers raises a bare Exception when an answer alone is too long
        if "truncat" not in str(err).lower():
            raise
        batch = tokenizer(questions, answers, truncation="longest_first", **kwargs)
    inputs = {name: batch[name] for name in REWARD_INPUTS if name in batch}
    return {**inputs, "truncated": _truncated_rows(batch, max_len)}


def reward_forward(model, batch: dict) -> torch.Tensor:
    """The reward model's one logit (B,) float32 for an ``encode_pairs`` batch, on the model's device.

    Segment ids go in when the tokenizer made them: a model with segment embeddings (the embedded one) needs them
    to tell question from answer, and one without (DeBERTa-v3, ``type_vocab_size`` 0) ignores them.
    """
    device = next(model.parameters()).device
    inputs = {name: batch[name].to(device) for name in REWARD_INPUTS if name in batch}
    return model(**inputs).logits[:, 0].float()


def _truncated_rows(batch, max_len: int) -> torch.Tensor:
    """(B,) bool: the pairs that lost tokens to truncation. A tokenizers-backed tokenizer says so exactly (an
    encoding's ``overflowing`` tokens); for any other, a pair that fills all ``max_len`` positions counts as cut."""
    if batch.encodings is not None:
        return torch.tensor([bool(encoding.overflowing) for encoding in batch.encodings])
    return batch["attention_mask"].sum(1) >= max_len


@torch.no_grad()
def score_pairs(model, tokenizer, questions: list[str], answers: list[str],
                max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores (B,) float32 for text pairs, and which pairs were cut to ``max_len`` (B,) bool (see
    ``encode_pairs``); ``model`` is a classifier with one logit (or its engine)."""
    batch = encode_pairs(tokenizer, questions, answers, max_len)
    return reward_forward(model, batch), batch["truncated"]


def decode_rollout(policy_tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   response_ids: torch.Tensor, response_mask: torch.Tensor,
                   stop_strings: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(questions, answers) text of a rollout, as the reward model should read it.

    prompt_ids/prompt_mask (B, P) left-padded; response_ids/response_mask (B, R), mask 1 up to and including
    the token that ended the response (EOS or a stop string's last token). Special tokens (EOS, padding) are
    dropped from the text, and so is a stop string with anything after it: a turn the policy invented for the
    user is not part of its answer.
    """
    questions, answers = [], []
    for ids, keep, resp, resp_keep in zip(prompt_ids, prompt_mask, response_ids, response_mask):
        prompt = policy_tokenizer.decode(ids[keep.bool()], skip_special_tokens=True)
        questions.append(question_from_prompt(prompt))
        answer = policy_tokenizer.decode(resp[resp_keep.bool()], skip_special_tokens=True)
        answers.append(answer_text(answer, stop_strings).strip())
    return questions, answers


class RunningMoments:
    """Running mean and std of reward scores (Chan et al. parallel update), for ``normalize_reward``.

    Every rank feeds it the same all-gathered batch statistics, so every rank normalises identically.
    """

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, batch_mean: float, batch_var: float, batch_count: int) -> None:
        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean += delta * batch_count / total
        self.var, self.count = m2 / total, total

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / (self.var**0.5 + 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
