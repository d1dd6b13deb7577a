"""How a response is sampled and where it ends, in one place for training, evaluation and the bench.

PPO's ratio, KL penalty and entropy bonus are computed from log-probabilities that must be those of the
distribution the tokens were drawn from. ``Sampling`` holds every setting that shapes that distribution or the
response's extent, and the log-prob code (``experience.response_logits``) reads the same value, so the sampled
and the scored distributions cannot drift apart: softmax(logits / temperature), nothing else (top-k/top-p are
refused by the config: see README, "What the real run depends on").

A response ends at the first EOS or at the end of the first stop string (a base model such as Qwen2-0.5B does
not stop after its answer: it writes "\\n\\nHuman: ..." and goes on). Both count as part of the response, the
way EOS always has: they are the action that ended it, and the score lands on that last token. The reward
model reads the answer without the stop string (``answer_text``).

Shapes: B prompts, P prompt tokens (left-padded), R = max_new_tokens.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from transformers import (GenerationConfig, PreTrainedTokenizerBase, StoppingCriteriaList,
                          StopStringCriteria)


@dataclass(frozen=True)
class Sampling:
    """The sampling distribution and the response's extent; made by ``PPOConfig.sampling()``."""

    temperature: float = 1.0
    max_new_tokens: int = 32
    stop_strings: tuple[str, ...] = ()


def response_mask_from_tokens(response_ids: torch.Tensor,
                              eos_token_id: Union[int, Sequence[int]]) -> torch.Tensor:
    """1 on each response token up to and including the first EOS, 0 after it; a row without EOS is all 1.

    response_ids: (B, R) -> (B, R) int64 (the dtype of attention masks, so it can extend one).
    eos_token_id: one id or several (any of them ends the response).
    """
    eos_ids = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)
    is_eos = torch.isin(response_ids, eos_ids).long()
    eos_before = is_eos.cumsum(-1) - is_eos
    return (eos_before == 0).long()


def _stop_string_end(ids: list[int], tokenizer: PreTrainedTokenizerBase, stop_strings: tuple[str, ...]) -> int:
    """The number of leading tokens of ``ids`` up to and including the one that completes the first stop
    string, or len(ids) when none occurs. Binary search over decoded prefixes (containing a stop string is
    monotone in the prefix length), so a row costs one decode plus log2(R) more only when it has a stop string.
    """
    def has_stop(count: int) -> bool:
        text = tokenizer.decode(ids[:count])
        return any(stop in text for stop in stop_strings)

    if not ids or not has_stop(len(ids)):
        return len(ids)
    low, high = 1, len(ids)  # has_stop(high) holds; find the smallest such count
    while low < high:
        middle = (low + high) // 2
        if has_stop(middle):
            high = middle
        else:
            low = middle + 1
    return high


def response_mask(response_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                  stop_strings: tuple[str, ...] = ()) -> torch.Tensor:
    """1 on each response token up to and including the first EOS or the token completing the first stop
    string, whichever comes first; 0 after. response_ids (B, R) -> (B, R) int64.

    Computed from the tokens alone, not from where ``generate`` stopped: what follows a stopped row is padding,
    and for Qwen2 the pad token is EOS, which must not count as a sampled token.
    """
    mask = response_mask_from_tokens(response_ids, tokenizer.eos_token_id)
    if not stop_strings:
        return mask
    lengths = mask.sum(1).tolist()
    for row, (ids, length) in enumerate(zip(response_ids.tolist(), lengths)):
        end = _stop_string_end(ids[:length], tokenizer, stop_strings)
        mask[row, end:] = 0
    return mask


def answer_text(text: str, stop_strings: tuple[str, ...]) -> str:
    """A response's text without its stop string and anything after it (what the reward model reads)."""
    cut = min((text.find(stop) for stop in stop_strings if stop in text), default=len(text))
    return text[:cut]


@contextlib.contextmanager
def seeded(seed: Optional[int], device: torch.device):
    """Sample from ``seed`` without disturbing the global RNG streams (None: use them as they are)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _contiguous_head_input(model):
    """Inside: the LM head (``get_output_embeddings``) reads a contiguous input.

    ``generate`` gives the head the prompt's last position as a strided view of the prefill's hidden states, and
    when the head's weight needs no grad (LoRA's frozen base) torch's matmul does not fold such a 3-D input into
    one matrix product: it runs a batched product over a copy of the weight for every row (at Qwen2's 151,936-token
    vocabulary 545 MB and ~5 s per prefill on this CPU, measured). A (B, 1, H) copy of the input costs nothing."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


class Sampler:
    """Samples responses of a causal LM under one ``Sampling``, for one tokenizer.

    The model's ``generation_config`` is replaced, for the call, by one holding only our settings, so a
    checkpoint's own generation_config.json (repetition penalty, top-k, ...) cannot bend the sampling
    distribution away from softmax(logits / temperature) that PPO's log-probs assume. Stop strings stop a row
    as soon as they are complete (transformers' ``StopStringCriteria``, built once per sampler).
    """

    def __init__(self, sampling: Sampling, tokenizer: PreTrainedTokenizerBase):
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=sampling.temperature, top_k=0, top_p=1.0,
            max_new_tokens=sampling.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True)
        self._stopping: Optional[StoppingCriteriaList] = None

    def _stopping_criteria(self) -> StoppingCriteriaList:
        """Stop-string criteria for ``generate``. A tokenizer whose vocabulary ``StopStringCriteria`` cannot read
        (it needs to tokenize plain letters; a word-level tokenizer cannot) only loses the early stop: rows run
        on to max_new_tokens and ``response_mask`` still ends each response at its stop string (warned once)."""
        if self._stopping is None:
            stops = []
            if self.sampling.stop_strings:
                try:
                    stops.append(StopStringCriteria(self.tokenizer, list(self.sampling.stop_strings)))
                except ValueError as err:
                    warnings.warn(f"stop_strings: generation cannot stop early with this tokenizer ({err}); "
                                  "responses still end at the stop string", stacklevel=3)
            self._stopping = StoppingCriteriaList(stops)
        return self._stopping

    @torch.no_grad()
    def sample(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: Optional[int] = None,
               synced_gpus: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampled response per prompt.

        input_ids, attention_mask: (B, P), left-padded. Returns sequences (B, P + R) (prompt, then the response
        padded with pad_token_id after an early stop) and response_mask (B, R) int64 (``response_mask``).
        seed: sample from this seed, leaving the global RNG as it was; None uses the global RNG.
        """
        model.generation_config = self.generation_config
        with seeded(seed, input_ids.device), _contiguous_head_input(model):
            sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       stopping_criteria=self._stopping_criteria(), synced_gpus=synced_gpus)
        response = sequences[:, input_ids.shape[1]:]
        response = F.pad(response, (0, self.sampling.max_new_tokens - response.shape[1]),
                         value=self.tokenizer.pad_token_id)
        mask = response_mask(response, self.tokenizer, self.sampling.stop_strings)
        return torch.cat([input_ids, response], dim=1), mask
