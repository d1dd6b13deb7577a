"""DeepSpeed configs and the four engines every rank holds.

Config rule: the JSON (``ds_configs/zero{stage}.json``, ``zero3_offload.json`` when stage 3 offloads, or
the user's ``--ds_config``) owns every DeepSpeed tuning value; PPOConfig owns what the trainer depends on
and fills it in: ZeRO stage, batch sizes, gradient clipping, learning rate, weight decay, precision and the
offload devices. The JSON leaves those out or says ``"auto"``; a value that disagrees with the config is a
one-line ConfigError naming the file, never silently overridden. Another ``"auto"`` is an error too.
A user JSON without an optimizer gets the shipped AdamW settings; a "scheduler" section is an error (the
schedule is a linear warmup over ``warmup_steps``).

Actor and critic are training engines; reference and reward are inference engines (no optimizer) that
follow the actor's partitioning: ZeRO-3 when the actor is ZeRO-3 (with its parameter offload), else
replicated (stage 0). With LoRA (``lora_rank > 0``) the actor, and the critic's backbone unless ``lora_critic``
is off, train adapters on frozen weights, and no reference engine is built: the reference is the actor with
its adapters off (``lora.py``).
"""
from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import PreTrainedTokenizerBase
from transformers.integrations import HfDeepSpeedConfig

from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.distributed import get_world_size, init_distributed
from rlhf_ds.lora import add_adapters, has_adapters, lora_config
from rlhf_ds.models import load_critic, load_policy, load_reward_model, load_reward_tokenizer, load_tokenizer

DS_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")
TRAIN_ROLES = ("actor", "critic")
INFERENCE_ROLES = ("reference", "reward")
ROLES = TRAIN_ROLES + INFERENCE_ROLES
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Keys an inference engine shares with the actor's config; the optimizer side (optimizer, clipping,
# optimizer offload) is dropped.
_INFERENCE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "bf16", "fp16", "steps_per_print", "wall_clock_breakdown")


def resolve_precision(config: PPOConfig) -> torch.dtype:
    """'auto' is bf16 on an accelerator that supports it (CUDA Ampere+), else fp32 (CPU: fp32 is faster
    and exact there); explicit fp32/bf16/fp16 are taken as given."""
    if config.precision != "auto":
        return _DTYPES[config.precision]
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" and accelerator.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _base_config_path(config: PPOConfig) -> str:
    if config.ds_config is not None:
        return config.ds_config
    offload = config.offload_optimizer or config.offload_params
    name = "zero3_offload" if config.zero_stage == 3 and offload else f"zero{config.zero_stage}"
    return os.path.join(DS_CONFIG_DIR, f"{name}.json")


def _own(node: dict, key: str, value: Any, path: str, source: str, field: str) -> None:
    """Set ``node[key]``, a value PPOConfig's ``field`` owns. The JSON may leave it out or say "auto"; any other
    value that differs is a ConfigError naming the file and the key, never silently replaced."""
    current = node.get(key, "auto")
    if current != "auto" and current != value:
        raise ConfigError(f"{source} sets {path}={current!r} but this run needs {value!r} (from {field}): set it "
                          f"to \"auto\" in the file (rlhf-ds fills it in) or change --{field}")
    node[key] = value


def _set_offload(zero: dict, section: str, enabled: bool, source: str, field: str) -> None:
    """Offload to CPU when enabled (keeping the JSON's other settings, e.g. pin_memory), else remove it; a device
    the JSON names explicitly must agree with ``field``."""
    device = zero.get(section, {}).get("device", "auto")
    if device != "auto" and not (device in ("cpu", "none") and (device == "cpu") == enabled):
        raise ConfigError(f"{source} sets zero_optimization.{section}.device={device!r} but {field} is "
                          f"{str(enabled).lower()}: set the device to \"auto\" in the file or change --{field}")
    if enabled:
        zero[section] = {**zero.get(section, {}), "device": "cpu"}
    else:
        zero.pop(section, None)


def _check_no_auto(node: Any, path: str = "") -> None:
    if node == "auto":
        raise ConfigError(f"DeepSpeed config value '{path}' is 'auto' and rlhf-ds does not fill it: set a value")
    if isinstance(node, dict):
        for key, value in node.items():
            _check_no_auto(value, f"{path}.{key}" if path else key)


def _read_json(path: str) -> dict:
    """A DeepSpeed JSON as a dict; unreadable, malformed or not an object is a one-line ConfigError naming it."""
    try:
        with open(path) as fh:
            value = json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"ds_config {path} cannot be read as JSON ({' '.join(str(err).split())}): fix the file "
                          "or leave ds_config unset") from None
    if not isinstance(value, dict):
        raise ConfigError(f"ds_config {path} must hold a JSON object of DeepSpeed settings, not "
                          f"{type(value).__name__}")
    return value


def _training_config(config: PPOConfig, role: str, world_size: int) -> dict:
    source = _base_config_path(config)
    ds = _read_json(source)
    if "scheduler" in ds:
        raise ConfigError(f"{source} has a 'scheduler' section: remove it, rlhf-ds applies a linear warmup over "
                          "warmup_steps")
    if "optimizer" not in ds:  # a user JSON without one gets the shipped optimizer settings
        ds["optimizer"] = _read_json(os.path.join(DS_CONFIG_DIR, f"zero{config.zero_stage}.json"))["optimizer"]
    mini = config.mini_batch_size
    _own(ds, "train_micro_batch_size_per_gpu", mini, "train_micro_batch_size_per_gpu", source, "mini_batch_size")
    _own(ds, "gradient_accumulation_steps", 1, "gradient_accumulation_steps", source, "mini_batch_size")
    _own(ds, "train_batch_size", mini * world_size, "train_batch_size", source, "mini_batch_size")
    _own(ds, "gradient_clipping", config.max_grad_norm, "gradient_clipping", source, "max_grad_norm")
    dtype = resolve_precision(config)
    for section, section_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        _own(ds.setdefault(section, {}), "enabled", dtype == section_dtype, f"{section}.enabled", source,
             "precision")
    zero = ds.setdefault("zero_optimization", {})
    _own(zero, "stage", config.zero_stage, "zero_optimization.stage", source, "zero_stage")
    _set_offload(zero, "offload_optimizer", config.offload_optimizer, source, "offload_optimizer")
    _set_offload(zero, "offload_param", config.offload_params, source, "offload_params")
    params = ds["optimizer"].setdefault("params", {})
    lr_field = "actor_lr" if role == "actor" else "critic_lr"
    _own(params, "lr", getattr(config, lr_field), "optimizer.params.lr", source, lr_field)
    _own(params, "weight_decay", config.weight_decay, "optimizer.params.weight_decay", source, "weight_decay")
    adam = ds["optimizer"].get("type", "").lower() in ("adam", "adamw")
    if get_accelerator().device_name() == "cpu" and not config.offload_optimizer and adam:
        # On a GPU DeepSpeed's own FusedAdam runs (its default). On the CPU accelerator that FusedAdam is
        # JIT-compiled on every fresh machine for the same step time as torch's fused CPU AdamW, which is
        # faster than torch's per-tensor loop (docs/PERFORMANCE.md has the figures). The
        # JSON may choose otherwise ("torch_adam": false, "fused": false). Optimizer offload keeps
        # DeepSpeedCPUAdam, which ZeRO-Offload needs.
        params.setdefault("torch_adam", True)
        if params["torch_adam"]:
            params.setdefault("fused", True)
    return ds


def build_ds_config(config: PPOConfig, role: str, world_size: int) -> dict:
    """The DeepSpeed config dict for one of "actor", "critic", "reference", "reward" (see module docstring).

    Batch: train_micro_batch_size_per_gpu = mini_batch_size, no gradient accumulation (the trainer steps
    once per minibatch), train_batch_size = mini_batch_size * world_size.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role '{role}': choose one of {', '.join(ROLES)}")
    ds = _training_config(config, "actor" if role in INFERENCE_ROLES else role, world_size)
    if role in INFERENCE_ROLES:
        inference = {key: ds[key] for key in _INFERENCE_KEYS if key in ds}
        if config.zero_stage == 3:
            zero = copy.deepcopy(ds["zero_optimization"])
            zero.pop("offload_optimizer", None)
        else:
            zero = {"stage": 0}
        inference["zero_optimization"] = zero
        ds = inference
    _check_no_auto(ds)
    return ds


def _linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * min(1, (step + 1) / warmup_steps): full lr at step warmup_steps - 1, and no wasted lr=0 step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(_warmup_factor, warmup_steps=warmup_steps))


def _warmup_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@dataclass
class Engines:
    """The four DeepSpeed engines of one rank and the two tokenizers.

    ``hf_ds_configs`` keeps the engines' ``HfDeepSpeedConfig`` objects alive: transformers only holds a weak
    reference to the latest, and while a ZeRO-3 one lives ``from_pretrained`` loads partitioned.
    """
    actor: deepspeed.DeepSpeedEngine
    critic: Optional[deepspeed.DeepSpeedEngine]  # None when the advantage estimator needs no critic
    reference: Optional[deepspeed.DeepSpeedEngine]  # None with LoRA: the actor with its adapters off
    reward: deepspeed.DeepSpeedEngine
    policy_tokenizer: PreTrainedTokenizerBase
    reward_tokenizer: PreTrainedTokenizerBase
    hf_ds_configs: list[HfDeepSpeedConfig] = field(default_factory=list)

    @property
    def trained(self) -> dict[str, deepspeed.DeepSpeedEngine]:
        """role -> engine of the engines that train (and are checkpointed): the actor, and the critic if any."""
        return {role: getattr(self, role) for role in TRAIN_ROLES if getattr(self, role) is not None}


def build_engine(config: PPOConfig, role: str, path: str,
                 hf_ds_configs: list[HfDeepSpeedConfig]) -> deepspeed.DeepSpeedEngine:
    """One engine: ``role``'s model loaded from ``path`` and wrapped by DeepSpeed with ``build_ds_config``.

    Training roles get their LoRA adapters (``lora.lora_config``), the warmup schedule and, when configured,
    gradient checkpointing; inference roles are frozen and in eval mode. Before loading, an ``HfDeepSpeedConfig``
    of this engine's own config is made the one transformers reads, so the model loads partitioned exactly when
    this engine is ZeRO-3, whatever was built before it in the process; it is appended to ``hf_ds_configs``, which must outlive the engine
    (transformers holds only a weak reference). Joins the process group if the caller has not.
    """
    init_distributed()
    ds_config = build_ds_config(config, role, get_world_size())
    hf_ds_configs.append(HfDeepSpeedConfig(copy.deepcopy(ds_config)))
    dtype, trust = resolve_precision(config), config.trust_remote_code
    if role in INFERENCE_ROLES:
        model = load_policy(path, dtype, trust) if role == "reference" else load_reward_model(path, dtype, trust)
        return _inference_engine(model, ds_config)
    model = load_policy(path, dtype, trust) if role == "actor" else load_critic(path, dtype, trust)
    adapters = lora_config(config, role, base_path=path)
    if adapters is not None and role == "actor":
        model = add_adapters(model, adapters, config.seed)
    elif adapters is not None:
        model.backbone = add_adapters(model.backbone, adapters, config.seed)
    if config.gradient_checkpointing:
        transformer = model.backbone if role == "critic" else model
        transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    warmup = functools.partial(_linear_warmup, warmup_steps=config.warmup_steps)
    engine, *_ = deepspeed.initialize(model=model, lr_scheduler=warmup, config=ds_config)
    return engine


def engine_roles(config: PPOConfig) -> tuple[str, ...]:
    """The roles this run builds: all four, without the critic when the advantage estimator needs none, without
    the reference with LoRA (the actor with its adapters off is the reference)."""
    absent = {"critic"} if not config.needs_critic else set()
    absent |= {"reference"} if config.lora_rank > 0 else set()
    return tuple(role for role in ROLES if role not in absent)


def build_engines(config: PPOConfig, policy_path: str, critic_path: str, reward_path: str) -> Engines:
    """The engines of ``engine_roles`` (``build_engine``) and the two tokenizers.

    policy_path serves actor and reference; paths are local directories or hub names ("embedded" is
    resolved by the caller). Without a critic, ``Engines.critic`` is None and critic_path is not read; with LoRA,
    ``Engines.reference`` is None.
    """
    hf_ds_configs: list[HfDeepSpeedConfig] = []
    paths = {"actor": policy_path, "critic": critic_path, "reference": policy_path, "reward": reward_path}
    engines = {"critic": None, "reference": None, **{role: build_engine(config, role, paths[role], hf_ds_configs)
                                                     for role in engine_roles(config)}}
    trust = config.trust_remote_code
    return Engines(**engines, policy_tokenizer=load_tokenizer(policy_path, trust),
                   reward_tokenizer=load_reward_tokenizer(reward_path, trust), hf_ds_configs=hf_ds_configs)


def _inference_engine(model: torch.nn.Module, ds_config: dict) -> deepspeed.DeepSpeedEngine:
    """Frozen, eval-mode engine without optimizer (placement and partitioning only)."""
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(ds_config))
    engine.eval()
    return engine


def describe_placement(engines: Engines) -> str:
    """Where each engine lives on this rank: ZeRO stage, device, dtype, parameters, trained or frozen (and how many
    of them train, with LoRA adapters)."""
    absent = {"critic": "none: the advantage estimator needs no critic",
              "reference": "none: the actor with its LoRA adapters off (no engine, no copy of the weights)"}
    lines = []
    for role in ROLES:
        engine = getattr(engines, role)
        if engine is None:
            lines.append(f"  {role:<9} {absent[role]}")
            continue
        params = list(engine.module.parameters())
        count = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        trained = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
        state = "frozen (inference only)" if not trained else "trained"
        if has_adapters(engine.module.backbone if role == "critic" else engine.module):
            state = f"LoRA: {trained / 1e6:.2f}M trained"
        lines.append(f"  {role:<9} ZeRO-{engine.zero_optimization_stage()}  {engine.device}  {params[0].dtype}  "
                     f"{count / 1e6:.2f}M params  {state}")
    return "\n".join(lines)
