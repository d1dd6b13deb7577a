"""The experience of one rollout: what PPO needs to know about each generated sequence, computed without grad.

Shapes: B sequences of one rank, P prompt tokens (left-padded), R response tokens, L = P + R, V vocabulary.
Token t of the response is predicted by the logits at position P - 1 + t, and its value is the critic's value
of the state before it (the same position); ``response_logits`` is the one place that knows this.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Optional

import torch

from rlhf_ds.lora import adapters_disabled, base_model
from rlhf_ds.models import position_ids_from_mask
from rlhf_ds.ppo import logprobs_from_logits
from rlhf_ds.reward import decode_rollout, score_pairs
from rlhf_ds.sampling import Sampling
from rlhf_ds.zero3 import gathered, torch_linear


@dataclass
class Experience:
    """One rank's rollout. Advantages and returns are filled in by the trainer after reward shaping."""

    sequences: torch.Tensor  # (B, L) prompt then response token ids
    attention_mask: torch.Tensor  # (B, L) 0 on prompt padding and after each response's first EOS
    response_mask: torch.Tensor  # (B, R) float, 1 up to and including the first EOS
    old_logprobs: torch.Tensor  # (B, R) actor log-probs at sampling time
    ref_logprobs: torch.Tensor  # (B, R) reference log-probs
    values: Optional[torch.Tensor]  # (B, R) critic values; None without a critic (critic-free estimators)
    scores: torch.Tensor  # (B,) raw reward-model scores
    score_truncated: Optional[torch.Tensor] = None  # (B,) bool: the reward model read the pair cut to fit
    advantages: Optional[torch.Tensor] = None  # (B, R)
    returns: Optional[torch.Tensor] = None  # (B, R)

    @property
    def prompt_len(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows ``index`` (a mini-batch) of every field."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})


@functools.cache
def _takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def _drop_shared_left_padding(sequences: torch.Tensor, attention_mask: torch.Tensor,
                              prompt_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rows without the leading columns that are padding in every one of them, and the new prompt length.

    Nothing attends to those columns and positions come from the mask, so every kept position's output is the
    same; a batch of short prompts then costs what its own longest prompt costs, not the rollout's.
    """
    has_token = attention_mask[:, :prompt_len].any(0)
    cut = min(int(has_token.long().argmax()) if bool(has_token.any()) else prompt_len, prompt_len - 1)
    return sequences[:, cut:], attention_mask[:, cut:], prompt_len - cut


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    temperature: float) -> torch.Tensor:
    """Logits (B, R, V) that predicted each response token, divided by the sampling temperature.

    Kept in the model's dtype: ``logprobs_from_logits`` upcasts row by row instead of copying all of (B, R, V).
    The forward skips the columns of left padding all rows share, and the LM head runs only on the R + 1 last
    positions (HF ``logits_to_keep``, when the model takes it): the prompt positions' logits are never used,
    and on a real prompt they are most of the (B, L, V) tensor. The positions go in as an index tensor, not
    a count: HF gathers them into a contiguous (B, R + 1, H) copy where a count gives a strided view, and
    torch's CPU ``linear`` on a strided 3-D input leaves its fast kernels (bf16 by two orders of magnitude;
    docs/PERFORMANCE.md has the figures).

    Positions follow the attention mask (left padding does not shift them), as in HF ``generate``.
    """
    response_len = sequences.shape[1] - prompt_len
    sequences, attention_mask, prompt_len = _drop_shared_left_padding(sequences, attention_mask, prompt_len)
    length = sequences.shape[1]
    keep = ({"logits_to_keep": torch.arange(length - response_len - 1, length, device=sequences.device)}
            if _takes_logits_to_keep(type(base_model(model))) else {})
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False, **keep).logits
    logits = logits[:, logits.shape[1] - response_len - 1:-1]
    return logits if temperature == 1.0 else logits / temperature


def response_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Critic values (B, R) of the state before each response token (shared left padding skipped)."""
    sequences, attention_mask, prompt_len = _drop_shared_left_padding(sequences, attention_mask, prompt_len)
    return critic(input_ids=sequences, attention_mask=attention_mask)[:, prompt_len - 1:-1]


class ExperienceMaker:
    """Fills an ``Experience`` with one batched forward per model per micro-batch (no grad).

    ``critic`` is None when the advantage estimator needs no values (``Experience.values`` is then None);
    ``reference`` is None with LoRA, whose reference log-probs are the actor's with its adapters off.
    The reward model reads text: the rollout is decoded with the policy tokenizer and re-tokenised with the
    reward model's own tokenizer as a (question, answer) pair, the answer without its stop string.
    Log-probs are those of the sampling distribution: the logits divided by ``sampling.temperature``.
    """

    def __init__(self, actor, critic, reference, reward, policy_tokenizer, reward_tokenizer,
                 sampling: Sampling, reward_max_len: int, micro_batch_size: int):
        self.actor, self.critic, self.reference, self.reward = actor, critic, reference, reward
        self.policy_tokenizer, self.reward_tokenizer = policy_tokenizer, reward_tokenizer
        self.sampling = sampling
        self.reward_max_len = reward_max_len
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def make(self, prompt_mask: torch.Tensor, sequences: torch.Tensor, response_mask: torch.Tensor) -> Experience:
        """prompt_mask (B, P), sequences (B, L), response_mask (B, R) -> Experience.

        Model by model, each over all micro-batches: under ZeRO-3 each model is gathered once per rollout
        (``zero3.gathered``) instead of layer by layer in every micro-batch's forward, and, no grad being
        needed, with torch's own linear (``zero3.torch_linear``). Micro-batches are buckets of similar
        length: rows sorted by prompt length, so each micro-batch's forwards cost its own longest prompt
        (``response_logits`` drops the left padding all its rows share), and the reward model's text pairs
        sorted by length, each micro-batch padded to its own longest pair.
        Every model runs in eval mode (the trainer switches actor and critic to training mode only for the
        update's passes). A collective under ZeRO-3.
        """
        for model in filter(None, (self.actor, self.critic)):
            model.eval()
        prompt_len = prompt_mask.shape[1]
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
        labels = sequences[:, prompt_len:]
        rows = sequences.shape[0]
        by_prompt = list(torch.sort(prompt_mask.sum(1), stable=True).indices.split(self.micro_batch_size))
        questions, answers = decode_rollout(self.policy_tokenizer, sequences[:, :prompt_len], prompt_mask, labels,
                                            response_mask, self.sampling.stop_strings)
        by_text = sorted(range(rows), key=lambda i: len(questions[i]) + len(answers[i]))
        by_text = [by_text[i:i + self.micro_batch_size] for i in range(0, rows, self.micro_batch_size)]

        def in_row_order(chunks: list[torch.Tensor], buckets: list) -> torch.Tensor:
            out = torch.empty((rows, *chunks[0].shape[1:]), dtype=chunks[0].dtype, device=chunks[0].device)
            out[torch.cat([torch.as_tensor(b, device=out.device) for b in buckets])] = torch.cat(chunks)
            return out

        def logprobs_of(model) -> torch.Tensor:
            return in_row_order([logprobs_from_logits(
                response_logits(model, sequences[b], attention_mask[b], prompt_len, self.sampling.temperature),
                labels[b]) for b in by_prompt], by_prompt)

        parts = {}
        with torch_linear():
            with gathered(self.actor):
                parts["old_logprobs"] = logprobs_of(self.actor)
                if self.reference is None:  # LoRA: the initial policy is the actor without its adapters
                    with adapters_disabled(self.actor):
                        parts["ref_logprobs"] = logprobs_of(self.actor)
            if self.reference is not None:
                with gathered(self.reference):
                    parts["ref_logprobs"] = logprobs_of(self.reference)
            parts["values"] = None
            if self.critic is not None:
                with gathered(self.critic):
                    parts["values"] = in_row_order([response_values(self.critic, sequences[b], attention_mask[b],
                                                                    prompt_len) for b in by_prompt], by_prompt)
            with gathered(self.reward):
                scored = [score_pairs(self.reward, self.reward_tokenizer, [questions[i] for i in b],
                                      [answers[i] for i in b], self.reward_max_len) for b in by_text]
            for name, chunks in (("scores", [s for s, _ in scored]), ("score_truncated", [t for _, t in scored])):
                parts[name] = in_row_order([chunk.to(sequences.device) for chunk in chunks], by_text)
        return Experience(sequences=sequences, attention_mask=attention_mask,
                          response_mask=response_mask.float(), **parts)
