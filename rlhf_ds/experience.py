"""The experience of one rollout: what PPO needs to know about each generated sequence, computed without grad.

Shapes: B sequences of one rank, P prompt tokens (left-padded), R response tokens, L = P + R, V vocabulary.
Token t of the response is predicted by the logits at position P - 1 + t, and its value is the critic's value
of the state before it (the same position); ``response_logits`` is the one place that knows this.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from rlhf_ds.models import position_ids_from_mask
from rlhf_ds.ppo import logprobs_from_logits
from rlhf_ds.reward import decode_rollout, score_pairs


@dataclass
class Experience:
    """One rank's rollout. Advantages and returns are filled in by the trainer after reward shaping."""

    sequences: torch.Tensor  # (B, L) prompt then response token ids
    attention_mask: torch.Tensor  # (B, L) 0 on prompt padding and after each response's first EOS
    response_mask: torch.Tensor  # (B, R) float, 1 up to and including the first EOS
    old_logprobs: torch.Tensor  # (B, R) actor log-probs at sampling time
    ref_logprobs: torch.Tensor  # (B, R) reference log-probs
    values: torch.Tensor  # (B, R) critic values
    scores: torch.Tensor  # (B,) raw reward-model scores
    advantages: Optional[torch.Tensor] = None  # (B, R)
    returns: Optional[torch.Tensor] = None  # (B, R)

    @property
    def prompt_len(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows ``index`` (a mini-batch) of every field."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    temperature: float) -> torch.Tensor:
    """Logits (B, R, V) that predicted each response token, divided by the sampling temperature.

    Kept in the model's dtype: ``logprobs_from_logits`` upcasts row by row instead of copying all of (B, R, V).

    Positions follow the attention mask (left padding does not shift them), as in HF ``generate``.
    """
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    logits = logits[:, prompt_len - 1:-1]
    return logits if temperature == 1.0 else logits / temperature


def response_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Critic values (B, R) of the state before each response token."""
    return critic(input_ids=sequences, attention_mask=attention_mask)[:, prompt_len - 1:-1]


class ExperienceMaker:
    """Fills an ``Experience`` with one batched forward per model per micro-batch (no grad).

    The reward model reads text: the rollout is decoded with the policy tokenizer and re-tokenised with the
    reward model's own tokenizer as a (question, answer) pair.
    """

    def __init__(self, actor, critic, reference, reward, policy_tokenizer, reward_tokenizer,
                 temperature: float, reward_max_len: int, micro_batch_size: int):
        self.actor, self.critic, self.reference, self.reward = actor, critic, reference, reward
        self.policy_tokenizer, self.reward_tokenizer = policy_tokenizer, reward_tokenizer
        self.temperature = temperature
        self.reward_max_len = reward_max_len
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def make(self, prompt_mask: torch.Tensor, sequences: torch.Tensor, response_mask: torch.Tensor) -> Experience:
        """prompt_mask (B, P), sequences (B, L), response_mask (B, R) -> Experience."""
        prompt_len = prompt_mask.shape[1]
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
        labels = sequences[:, prompt_len:]
        parts = {"old_logprobs": [], "ref_logprobs": [], "values": [], "scores": []}
        for start in range(0, sequences.shape[0], self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            seq, mask = sequences[rows], attention_mask[rows]
            for name, model in (("old_logprobs", self.actor), ("ref_logprobs", self.reference)):
                logits = response_logits(model, seq, mask, prompt_len, self.temperature)
                parts[name].append(logprobs_from_logits(logits, labels[rows]))
                del logits
            parts["values"].append(response_values(self.critic, seq, mask, prompt_len))
            questions, answers = decode_rollout(self.policy_tokenizer, seq[:, :prompt_len], prompt_mask[rows],
                                                labels[rows], response_mask[rows])
            parts["scores"].append(score_pairs(self.reward, self.reward_tokenizer, questions, answers,
                                               self.reward_max_len).to(seq.device))
        return Experience(sequences=sequences, attention_mask=attention_mask,
                          response_mask=response_mask.float(), **{k: torch.cat(v) for k, v in parts.items()})
