"""Switch the actor engine between generation and training (DeepSpeed's hybrid engine has no Qwen2).

Under ZeRO-3 every forward of a partitioned model all-gathers each layer and frees it again, so token-by-
token generation pays a full parameter all-gather per token, and every rank must keep stepping until the
slowest finishes (``synced_gpus``). ``deepspeed.runtime.zero.unwrap_model_for_generation`` gathers the
parameters once per call and removes ZeRO's module hooks while generating; the forward then contains no
collective at all, so each rank stops as soon as its own rows are done (``synced_gpus=False``): several times
faster than partitioned generation, with identical tokens (docs/PERFORMANCE.md has the figures). The
partitioned path stays available for benchmarks and for models too big to gather on one device:
``zero3_generation`` chooses "gathered", "partitioned", or "auto" (the default), which gathers only when the
whole actor plus the generation's KV cache and working set (``generation_memory_bytes``) fits in every rank's
free memory (``device_memory.free_bytes``) and otherwise generates partitioned for that call, with a warning and a
count (``partitioned_calls``).

The no-grad ZeRO-3 tools it uses (gathering once, torch's own linear, the engine's hooks off) live in
``zero3.py``.

Shapes: B prompts, P prompt tokens (left-padded), R = max_new_tokens.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from transformers import PreTrainedTokenizerBase

from rlhf_ds import device_memory
from rlhf_ds.config import ZERO3_GENERATION
from rlhf_ds.distributed import any_rank, is_main_process
from rlhf_ds.models import kv_cache_bytes_per_token
from rlhf_ds.sampling import Sampler, Sampling
from rlhf_ds.zero3 import gather_bytes, gathered, torch_linear


def generation_memory_bytes(model_config, dtype: torch.dtype, batch: int, prompt_len: int,
                            max_new_tokens: int) -> int:
    """What ``generate`` itself allocates, partitioned or not, estimated from the architecture:

    KV cache   2 (K, V) x layers x B x (P + R) x kv_heads x head_dim, in the model's dtype
    prefill    3 x B x P x intermediate_size (the MLP's gate, up and product), in the model's dtype
    sampling   2 x B x vocab float32 (the last position's logits and their softmax)
    """
    kv_cache = kv_cache_bytes_per_token(model_config, dtype) * batch * (prompt_len + max_new_tokens)
    prefill = 3 * batch * prompt_len * model_config.intermediate_size * dtype.itemsize
    return kv_cache + prefill + 2 * batch * model_config.vocab_size * 4


class HybridEngine:
    """Generation with the training engine's own weights: no copy, no second model.

    Samples through a ``sampling.Sampler`` (the one place that knows the sampling distribution and where a
    response ends). ``last_generation`` says how the latest call ran: "unpartitioned" (ZeRO-0/1/2),
    "gathered" or "partitioned" (ZeRO-3).
    """

    def __init__(self, actor_engine, tokenizer: PreTrainedTokenizerBase, sampling: Sampling,
                 zero3_generation: str = "auto"):
        if zero3_generation not in ZERO3_GENERATION:
            raise ValueError(f"zero3_generation={zero3_generation!r}: choose one of {', '.join(ZERO3_GENERATION)}")
        self.engine = actor_engine
        self.sampler = Sampler(sampling, tokenizer)
        self.zero3_generation = zero3_generation
        self.last_generation: Optional[str] = None
        self.partitioned_calls = 0  # "auto" calls that fell back to partitioned generation

    @property
    def zero3(self) -> bool:
        """True under ZeRO-3, where each rank holds only a shard of every parameter."""
        return self.engine.zero_optimization_partition_weights()

    def _mode(self, input_ids: torch.Tensor) -> str:
        """How this call generates; under ZeRO-3 "auto" the answer is agreed by all ranks (a collective)."""
        if not self.zero3:
            return "unpartitioned"
        if self.zero3_generation != "auto":
            return self.zero3_generation
        module = self.engine.module
        need = gather_bytes(module) + generation_memory_bytes(module.config, module.dtype, *input_ids.shape,
                                                              self.sampler.sampling.max_new_tokens)
        free = device_memory.free_bytes(input_ids.device)
        if not any_rank(need > free, input_ids.device):
            return "gathered"
        if self.partitioned_calls == 0 and is_main_process():
            warnings.warn(f"zero3_generation=auto: gathering the actor to generate needs ~{need / 2**30:.2f} GiB "
                          f"per rank and a rank has less free (rank 0: {free / 2**30:.2f} GiB); generating "
                          "partitioned (several times slower). Free memory (smaller rollout_batch_size, "
                          "offload_params) or set zero3_generation=partitioned to silence this.", stacklevel=3)
        self.partitioned_calls += 1
        return "partitioned"

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 generator_seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one response per prompt (``Sampler.sample``: sequences (B, P + R), response_mask (B, R)).

        input_ids, attention_mask: (B, P), left-padded. generator_seed: sample from this seed (restoring the
        RNG afterwards); None uses the global RNG. The actor generates in eval mode (no dropout; transformers
        skips gradient checkpointing outside training) and gets its previous mode back.
        A collective under ZeRO-3: all ranks must call it together. Partitioned generation steps every rank
        until all have finished (``synced_gpus``); gathered generation has no collective after the gather.
        """
        was_training = self.engine.module.training
        self.engine.eval()
        self.last_generation = mode = self._mode(input_ids)
        try:
            with torch_linear(), gathered(self.engine) if mode == "gathered" else contextlib.nullcontext():
                return self.sampler.sample(self.engine.module, input_ids, attention_mask, seed=generator_seed,
                                           synced_gpus=mode == "partitioned")
        finally:
            self.engine.train(was_training)
