"""LoRA adapters through ``peft``: which models get them, the reference they make free, and merging for export.

With ``lora_rank > 0`` the actor's base weights are frozen and only the adapters train (and, with ``lora_critic``,
the critic backbone's adapters, next to its always-trained value head). The frozen reference is then the actor
itself with its adapters switched off (``adapters_disabled``): no reference engine is built, no second copy of
the policy is held. Generation needs no weight syncing either: the hybrid engine samples with the training
module, adapters included.

Adapters are created from a seeded generator (``add_adapters``): every rank and every rerun starts from the same
weights, which the bitwise resume and the ranks' agreement need. They take the base weights' dtype (peft would
otherwise upcast bf16 adapters to fp32, and DeepSpeed refuses a module of mixed dtypes under bf16/fp16; its fp32
master copies keep the precision).

Merging (``filled`` then ``merge``) runs on a skeleton of the model on the meta device whose tensors are then
assigned from a consolidated state dict: it touches neither the training engine's weights (a merge and unmerge in
place would leave them an ulp off, for good, since frozen weights are never rewritten by the optimizer) nor
ZeRO-3's partitioned loading, which would make building a model on one rank a collective.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from typing import Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from rlhf_ds.config import ConfigError, PPOConfig

ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's name: a directory with it holds an adapter


def lora_config(config: PPOConfig, role: str, base_path: Optional[str] = None) -> Optional[LoraConfig]:
    """The adapters ``role`` ("actor" or "critic") gets under ``config``, or None when it trains in full.

    ``base_path`` is recorded in the config (peft's ``base_model_name_or_path``), so that an adapter exported
    alone names the model it applies to.
    """
    if config.lora_rank == 0 or (role == "critic" and not config.lora_critic):
        return None
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), bias="none",
                      task_type="CAUSAL_LM" if role == "actor" else None, base_model_name_or_path=base_path)


def add_adapters(model: nn.Module, adapters: LoraConfig, seed: int) -> PeftModel:
    """``model`` wrapped by peft with fresh adapters: base weights frozen, adapters in the base dtype, their random
    initialisation (peft's: Kaiming A, zero B, so the wrapped model starts as the base model) drawn from ``seed``
    without touching the global RNG. A target module name the model lacks is a ConfigError."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return _wrap(model, adapters)
        except ValueError as err:
            if "target_modules" not in str(err) and "Target modules" not in str(err):
                raise
            raise ConfigError(f"lora_target_modules={sorted(adapters.target_modules)!r} match no module of "
                              f"{type(model).__name__}: name its linear layers (Qwen2: q_proj, k_proj, v_proj, "
                              "o_proj, gate_proj, up_proj, down_proj)") from None


def _wrap(model: nn.Module, adapters: LoraConfig) -> PeftModel:
    """peft's ``get_peft_model`` on a copy of ``adapters`` (peft writes into it), adapters in the base dtype,
    without the deprecation warning peft's call of ``is_gradient_checkpointing`` raises in transformers 5."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, copy.deepcopy(adapters), autocast_adapter_dtype=False)


def _module(model: nn.Module) -> nn.Module:
    """The module itself, out of its DeepSpeed engine if it has one."""
    return getattr(model, "module", model)


def has_adapters(model: nn.Module) -> bool:
    """True for a peft-wrapped module (or a DeepSpeed engine around one)."""
    return isinstance(_module(model), PeftModel)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under any DeepSpeed engine and peft wrapper (for its type, signature, config)."""
    model = _module(model)
    return model.get_base_model() if isinstance(model, PeftModel) else model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside: ``model`` (an engine or module with adapters) computes with its base weights alone, i.e. as the
    initial policy; peft's own switch, which changes no weight."""
    with _module(model).disable_adapter():
        yield


def adapter_config(model: nn.Module) -> LoraConfig:
    """The LoraConfig of ``model``'s active adapter (an engine or a peft-wrapped module)."""
    model = _module(model)
    return model.peft_config[model.active_adapter]


def on_meta(skeleton: nn.Module, adapters: LoraConfig) -> PeftModel:
    """``skeleton`` (a model on the meta device: structure and config only) wrapped with ``adapters``, still on the
    meta device: the names and shapes a checkpoint of an adapted model holds, for ``filled`` to fill. The
    wrapped model keeps the base model's name that ``adapters`` recorded (peft takes it from the model)."""
    skeleton.name_or_path = adapters.base_model_name_or_path or skeleton.name_or_path
    with torch.device("meta"):
        return _wrap(skeleton, adapters)


def filled(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` (from ``on_meta``, or a module holding one, like the critic) with the tensors of ``state``, tied
    weights tied again. The caller has checked that ``state`` has every tensor but tied ones."""
    model.load_state_dict(state, strict=False, assign=True)
    for child in model.modules():
        if isinstance(child, PeftModel):
            child.get_base_model().tie_weights()
    return model


def merge(model: nn.Module) -> nn.Module:
    """``model`` (or each peft-wrapped module in it) with its adapters merged into the base weights (peft's
    ``merge_and_unload``): an ordinary model again, which loads without peft."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    for name, child in list(model.named_modules()):
        if isinstance(child, PeftModel):
            model.set_submodule(name, child.merge_and_unload())
    return model


def saved_adapters(directory: str) -> Optional[LoraConfig]:
    """The LoraConfig saved in ``directory`` (peft's adapter_config.json), or None when there is none."""
    if not os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_FILE)):
        return None
    return LoraConfig.from_pretrained(directory)
