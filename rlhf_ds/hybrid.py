"""Switch the actor engine between generation and training (DeepSpeed's hybrid engine has no Qwen2).

Under ZeRO-3 every forward of a partitioned model all-gathers each layer and frees it again, so token-by-
token generation pays a full parameter all-gather per token, and every rank must keep stepping until the
slowest finishes (``synced_gpus``). ``deepspeed.runtime.zero.unwrap_model_for_generation`` gathers the
parameters once per call and removes ZeRO's module hooks while generating; the forward then contains no
collective at all, so each rank stops as soon as its own rows are done (``synced_gpus=False``). Measured
on 2 CPU ranks: ~4x faster than partitioned generation, identical tokens. The partitioned path stays
available for benchmarks and for models too big to gather on one device: ``zero3_generation`` chooses
"gathered", "partitioned", or "auto" (the default), which gathers only when the whole actor plus the
generation's KV cache and working set (``generation_memory_bytes``) fits in every rank's free memory
(``memory.free_bytes``) and otherwise generates partitioned for that call, with a warning and a count
(``partitioned_calls``).

Loading a model under ZeRO-3 (``zero.Init`` with ``memory_efficient_linear``, DeepSpeed's default) replaces
``torch.nn.functional.linear`` for the whole process with ``zero3_linear_wrap``, an autograd Function that
saves less for backward but costs ~75 us of Python per call (measured on the CPU), every linear layer of every
token. Without grad it saves nothing, so ``torch_linear()`` puts torch's own linear back for the no-grad
phases (generation here, the experience forwards in experience.py); training forwards keep DeepSpeed's.
While the parameters are gathered, the engine's own forward hooks (which walk every module twice per forward
under ZeRO-3 to flag external parameters, i.e. twice per generated token) are also suspended: nothing is
partitioned, so there is nothing to discover.

Shapes: B prompts, P prompt tokens (left-padded), R = max_new_tokens.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.runtime.zero import unwrap_model_for_generation
from deepspeed.runtime.zero.linear import zero3_linear_wrap
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers import PreTrainedTokenizerBase

from rlhf_ds import memory
from rlhf_ds.config import ZERO3_GENERATION
from rlhf_ds.distributed import any_rank, is_main_process
from rlhf_ds.models import kv_cache_bytes_per_token
from rlhf_ds.sampling import Sampler, Sampling


@contextlib.contextmanager
def torch_linear():
    """Inside: ``torch.nn.functional.linear`` is torch's own, even where ZeRO-3 loading replaced it with
    ``zero3_linear_wrap`` (same maths, no Python autograd Function per call). Meant for no-grad forwards:
    with grad, DeepSpeed's version is the one whose backward ZeRO-3 was configured for. Any other
    replacement (e.g. ZeRO++ quantized weights) is left alone."""
    if F.linear is not zero3_linear_wrap:
        yield
        return
    F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = zero3_linear_wrap


@contextlib.contextmanager
def _engine_forward_hooks_off(engine):
    """Suspend the DeepSpeed engine's forward pre/post hooks on its module (the way DeepSpeed itself does for
    DeepCompile), re-creating them on exit; a no-op on an engine without them."""
    pre, post = getattr(engine, "module_forward_pre_hook", None), getattr(engine, "module_forward_post_hook", None)
    if pre is None or post is None or not hasattr(engine, "_create_module_forward_post_hook"):
        yield
        return
    pre.remove()
    post.remove()
    try:
        yield
    finally:
        engine.module_forward_pre_hook = engine._create_module_forward_pre_hook()
        engine.module_forward_post_hook = engine._create_module_forward_post_hook()


@contextlib.contextmanager
def gathered(model):
    """Inside: a ZeRO-3 engine's parameters gathered once and its per-forward hooks off, so
    any number of no-grad forwards run as on an unpartitioned model; a collective, every rank enters it.
    Anything else (a ZeRO-0/1/2 engine, a plain module) is left as it is. Parameters must not change inside."""
    partitioned = getattr(model, "zero_optimization_partition_weights", None)
    if partitioned is None or not partitioned():
        yield
        return
    with unwrap_model_for_generation(model), _engine_forward_hooks_off(model):
        yield


def gather_bytes(model: torch.nn.Module) -> int:
    """Bytes a ZeRO-3 gather allocates on each rank: every parameter not already held whole, at full size
    (its shard stays allocated too). 0 for an unpartitioned model."""
    return sum(p.ds_numel * p.element_size() for p in model.parameters()
               if hasattr(p, "ds_numel") and p.ds_status != ZeroParamStatus.AVAILABLE)


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
        free = memory.free_bytes(input_ids.device)
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
