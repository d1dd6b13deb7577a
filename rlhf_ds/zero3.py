"""No-grad forwards of ZeRO-3 engines at the speed of unpartitioned ones: generation (hybrid.py), the experience
forwards (experience.py) and the bench use these.

Under ZeRO-3 every forward of a partitioned model all-gathers each layer and frees it again. ``gathered`` gathers
the parameters once for any number of no-grad forwards (``deepspeed.runtime.zero.unwrap_model_for_generation``)
and suspends the engine's own forward hooks meanwhile (under ZeRO-3 they walk every module twice per forward to
flag external parameters; with everything gathered there is nothing to discover).

Loading a model under ZeRO-3 (``zero.Init`` with ``memory_efficient_linear``, DeepSpeed's default) replaces
``torch.nn.functional.linear`` for the whole process with ``zero3_linear_wrap``, an autograd Function that saves
less for backward but costs Python time on every call (docs/PERFORMANCE.md has the figure). Without grad it saves
nothing, so ``torch_linear()`` puts torch's own linear back for the no-grad phases; training forwards keep
DeepSpeed's.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from deepspeed.runtime.zero import unwrap_model_for_generation
from deepspeed.runtime.zero.linear import zero3_linear_wrap
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus


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
