"""Saving what a run produced: the trained policy as an ordinary Hugging Face model directory.

``export_model`` writes ``save_pretrained`` output (safetensors) plus the tokenizer, loadable by
``AutoModelForCausalLM.from_pretrained`` with no rlhf-ds code. Under ZeRO-3 each rank holds only shards, so the
parameters are gathered first (``zero_to_fp32.py --safe_serialization`` fails on Qwen2's tied embeddings; the
gathered module's own ``save_pretrained`` does not). The directory appears with a rename only when complete, so
a crash while saving leaves the previous export intact.
"""
from __future__ import annotations

import contextlib
import os
import shutil

import deepspeed

from rlhf_ds.distributed import barrier, is_main_process


def _replace_dir(tmp: str, final: str) -> None:
    """Move ``tmp`` to ``final``, keeping the old ``final`` until the new one is in place."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export_model(engine, tokenizer, out_dir: str) -> None:
    """Save ``engine``'s model (an HF ``PreTrainedModel``) and ``tokenizer`` to ``out_dir``. All ranks call it."""
    params = list(engine.module.parameters())
    gathered = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                if engine.zero_optimization_partition_weights() else contextlib.nullcontext())
    tmp = out_dir + ".tmp"
    with gathered:  # every rank takes part: under ZeRO-3 reading the full weights is a collective
        model = engine.module
        state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        training_cache, model.config.use_cache = model.config.use_cache, True  # off only for training
        try:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        finally:
            model.config.use_cache = training_cache
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
    barrier()
