"""The memory planner: the bytes one rank of a PPO run needs, phase by phase, predicted from the config before
any model loads.

    python -m rlhf_ds.memory --config launch/configs/qwen2_hh.yaml --gpus 8 --gpu_memory 80GiB [--field value ...]

Every rank holds the four engines (``engines.py``) and goes through three phases per iteration
(``trainer.PPOTrainer.step``). A phase's peak is the *resident* bytes, which live through every phase, plus the
largest *working* set of that phase. With N a model's parameters (with LoRA: base weights and adapters), N_t those
that train (all of them, or with LoRA the adapters and the critic's value head), W ranks, b bytes per element of
the run's precision (4 fp32, 2 bf16/fp16), and the DeepSpeed config each engine gets (``engines.build_ds_config``):

Resident, per engine
    parameters       N b; under ZeRO-3 N b / W, except tensors under ``stage3_param_persistence_threshold``
                     elements, which every rank keeps whole
    master weights   4 N_t / W: DeepSpeed's fp32 copy of the rank's partition, made in fp32 runs too (ZeRO-3
                     skips it when the partition is fp32 on the optimizer's own device; on the CPU
                     accelerator it copies: counted everywhere)                                 trained engines
    Adam moments     8 N_t / W (exp_avg, exp_avg_sq in fp32)                                    trained engines
    gradient buffers ZeRO-3: the gradient partition N_t b / W and the reduce bucket (``reduce_bucket_size`` b),
                     both kept between steps                                                    trained engines
    ``offload_optimizer`` moves master weights and moments to host memory, ``offload_params`` ZeRO-3's
    parameter partitions: they leave the device's table (and are shown as host bytes).

Without a critic (``advantage_estimator`` other than gae) the critic's states and activations are absent; with
LoRA the reference engine is (the actor with its adapters off is the reference).

Working sets (B = rollout_batch_size x samples_per_prompt, m = mini_batch_size, P = max_prompt_len, R = max_new_tokens,
T = P + R, Q = reward_max_len, V = vocabulary, h = hidden, i = intermediate, kv = kv heads x head dim)
    generation   the gathered actor (ZeRO-3 unless ``zero3_generation`` is "partitioned": ``gathered_bytes``)
                 and ``hybrid.generation_memory_bytes`` (KV cache, prefill MLP, sampling logits) for B rows
    experience   the largest of the four no-grad forwards on one micro-batch of m rows, each with its model
                 gathered under ZeRO-3 (``experience_working_bytes``): the logits and their log-sum-exp
                 (``logits_workspace_bytes``), one layer's intermediates (``layer_workspace_bytes``), the
                 reward model's attention matrices over Q tokens (``encoder_attention_bytes``)
    update       the actor's and the critic's forwards with grad on one mini-batch, then the actor's backward
                 (``update_working_bytes``): saved activations over T tokens (``activation_bytes``), the
                 response logits and what the losses keep of them (``loss_logits_bytes``), the gradients in
                 flight (``gradient_bytes``)

On the CPU accelerator the device is host memory and what the trainer measures is the process's resident
set: the prediction then adds the process itself (``runtime``: interpreter, libraries, tokenizers and data,
measured in the planning process) and counts a buffer allocated but never written (a reduce bucket larger
than the gradients that flow through it) only for the bytes written. On a GPU it adds ``CUDA_CONTEXT_BYTES``
(the CUDA context and communication buffers, which torch's allocator does not see).

Validated against the per-phase peaks the trainer measures (README, "Memory planner"): ZeRO-2 and ZeRO-3,
fp32 and bf16, on this machine's CPU ranks. ZeRO-0/1 follow the same formulas but were not measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.errors import KnownError

PHASES = ("generation", "experience", "update")
CUDA_CONTEXT_BYTES = 2**30  # CUDA context, NCCL buffers: device memory torch's allocator does not report
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


class PlanError(KnownError, ValueError):
    """The planner cannot read a model's dimensions from its config (an architecture it does not know)."""


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of one model: its transformers config (dimensions), its role ("policy", "critic":
    backbone plus a hidden -> 1 value head, "reward": a sequence classifier), the element count of each
    parameter tensor (tied ones once, LoRA adapters included) and of each one that trains (all of them, or the
    adapters and the critic's value head with LoRA)."""
    config: object
    role: str
    param_numels: tuple[int, ...]
    trainable_numels: tuple[int, ...]

    @property
    def params(self) -> int:
        return sum(self.param_numels)

    @property
    def largest(self) -> int:
        return max(self.param_numels)

    @property
    def trainable(self) -> int:
        """Elements with gradients, master weights and Adam moments."""
        return sum(self.trainable_numels)

    @property
    def largest_trainable(self) -> int:
        return max(self.trainable_numels)

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate(self) -> int:
        return self.config.intermediate_size

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def kv_width(self) -> int:
        """Key/value heads x head dim: the width of K (and of V) per token."""
        from rlhf_ds.models import head_dim

        return (getattr(self.config, "num_key_value_heads", None) or self.heads) * head_dim(self.config)

    @property
    def vocab(self) -> int:
        return self.config.vocab_size


def model_shape(hf_config, role: str, adapters=None) -> ModelShape:
    """The ``ModelShape`` of a transformers config in ``role``, counted on the meta device: no weights load.
    ``adapters``: the model's ``peft.LoraConfig`` (``lora.lora_config``), or None when it trains in full."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_ds.lora import on_meta

    model_class = {"policy": AutoModelForCausalLM, "critic": AutoModel,
                   "reward": AutoModelForSequenceClassification}[role]
    missing = [f for f in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if not isinstance(getattr(hf_config, f, None), int)]
    if missing:
        raise PlanError(f"the {role} model's config ({type(hf_config).__name__}) has no {', '.join(missing)}: the "
                        "memory planner knows decoder and encoder transformers that name their sizes that way")
    with torch.device("meta"):
        model = model_class.from_config(hf_config)
    if adapters is not None:
        model = on_meta(model, adapters)
    numels = tuple(p.numel() for p in model.parameters())
    trainable = tuple(p.numel() for p in model.parameters() if p.requires_grad)
    if role == "critic":
        numels, trainable = numels + (hf_config.hidden_size, 1), trainable + (hf_config.hidden_size, 1)
    return ModelShape(config=hf_config, role=role, param_numels=numels, trainable_numels=trainable)


def parse_bytes(text: str) -> int:
    """"80GiB", "80GB", "141 GiB", "2.5TiB" -> bytes (GiB = 2**30, GB = 10**9); a bare number is GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = (match.group(2) or "GiB").upper() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(f"--gpu_memory {text!r} is not an amount of memory: write e.g. 80GiB or 80GB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Setup:
    """The run as the planner sees it: the config's sizes, each model's shape, ranks and the target device.

    ``touched``: count a buffer only for the bytes written into it (the CPU's resident set) instead of the
    bytes allocated (a GPU's caching allocator)."""
    config: PPOConfig
    policy: ModelShape
    critic: Optional[ModelShape]  # None when the advantage estimator builds no critic
    reward: ModelShape
    world_size: int
    dtype: torch.dtype
    ds_configs: dict  # role -> DeepSpeed config (engines.build_ds_config)
    touched: bool
    reward_max_len: int
    runtime: int  # the process's own bytes: its resident set before loading (CPU), CUDA_CONTEXT_BYTES (GPU)

    @property
    def b(self) -> int:
        return self.dtype.itemsize

    def zero(self, role: str) -> dict:
        return self.ds_configs[role]["zero_optimization"]

    @property
    def roles(self) -> tuple[str, ...]:
        """The engines this run builds (``engines.engine_roles``)."""
        from rlhf_ds.engines import engine_roles

        return engine_roles(self.config)

    def shape(self, role: str) -> ModelShape:
        return {"actor": self.policy, "reference": self.policy, "critic": self.critic, "reward": self.reward}[role]


def partition_bytes(shape: ModelShape, zero: dict, world_size: int, element_size: int) -> int:
    """Bytes of the parameters one rank holds: all of them below ZeRO-3; under ZeRO-3 a 1/W slice of each
    tensor (rounded up), except tensors under the persistence threshold, which every rank keeps whole."""
    if zero.get("stage", 0) < 3:
        return shape.params * element_size
    threshold = zero.get("stage3_param_persistence_threshold", 10**5)
    return element_size * sum(n if n < threshold else -(-n // world_size) for n in shape.param_numels)


def engine_states(setup: Setup, role: str) -> dict[str, int]:
    """Resident bytes of one engine on one rank, by component (see the module docstring); components that
    offloading moves to host memory are named "... (host)"."""
    shape, zero, W, b = setup.shape(role), setup.zero(role), setup.world_size, setup.b
    stage, n = zero.get("stage", 0), shape.trainable
    offload_params = "offload_param" in zero
    states = {f"{role} parameters" + (" (host)" if offload_params else ""): partition_bytes(shape, zero, W, b)}
    if role not in ("actor", "critic"):
        return states
    optimizer_host = " (host)" if "offload_optimizer" in zero else ""
    states[f"{role} master weights{optimizer_host}"] = 4 * n // W if stage >= 1 else 4 * n * (b != 4)
    states[f"{role} Adam moments{optimizer_host}"] = 8 * n // (W if stage >= 1 else 1)
    if stage == 3:
        bucket = zero.get("reduce_bucket_size", 5 * 10**8)
        states[f"{role} gradient buffers"] = b * (-(-n // W) + (min(bucket, n) if setup.touched else bucket))
    return states


def gathered_bytes(setup: Setup, role: str) -> int:
    """What gathering a ZeRO-3 engine whole adds on each rank at its peak: every partitioned tensor at full
    size (``zero3.gather_bytes``; the shard stays allocated), twice, because DeepSpeed's coalesced all-gather
    lands in one flat buffer that is then copied into the parameters (measured); 0 below ZeRO-3."""
    zero = setup.zero(role)
    if zero.get("stage", 0) < 3:
        return 0
    threshold = zero.get("stage3_param_persistence_threshold", 10**5)
    return 2 * setup.b * sum(n for n in setup.shape(role).param_numels if n >= threshold)


def layer_workspace_bytes(shape: ModelShape, rows: int, tokens: int, element_size: int) -> int:
    """One transformer layer's no-grad intermediates on rows x tokens: (4h + 3i) per token (the attention's
    q, k, v and output; the MLP's two projections and their product)."""
    return rows * tokens * (4 * shape.hidden + 3 * shape.intermediate) * element_size


def encoder_attention_bytes(shape: ModelShape, rows: int, tokens: int, element_size: int) -> int:
    """A DeBERTa layer's attention matrices: scores, probabilities and the c2p and p2c terms,
    each rows x heads x tokens x tokens."""
    return 4 * rows * shape.heads * tokens * tokens * element_size


def logits_workspace_bytes(rows: int, response_len: int, vocab: int, element_size: int) -> int:
    """No-grad response log-probs (``experience.response_logits`` + ``ppo.logprobs_from_logits``): the
    rows x (R+1) x V logits in the model's dtype and one float32 copy of their size for the log-sum-exp."""
    return rows * (response_len + 1) * vocab * element_size + rows * response_len * vocab * 4


def experience_working_bytes(setup: Setup) -> dict[str, int]:
    """The largest no-grad forward of the experience phase (each model gathered under ZeRO-3, one at a time)."""
    cfg, b = setup.config, setup.b
    m, P, R, Q = cfg.mini_batch_size, cfg.max_prompt_len, cfg.max_new_tokens, setup.reward_max_len
    forwards = {}
    for role in setup.roles:
        shape = setup.shape(role)
        tokens = Q if role == "reward" else P + R
        work = layer_workspace_bytes(shape, m, tokens, b)
        if role in ("actor", "reference"):
            work += logits_workspace_bytes(m, R, shape.vocab, b)
        if role == "reward":
            work += encoder_attention_bytes(shape, m, tokens, b)
        forwards[role] = gathered_bytes(setup, role) + work
    role = max(forwards, key=forwards.get)
    return {f"{role} forward (largest, gathered + workspace)": forwards[role]}


def activation_bytes(shape: ModelShape, rows: int, tokens: int, element_size: int, checkpointing: bool) -> int:
    """What a decoder's forward with grad keeps for its backward, rows x tokens:
    per layer and token 9h + kv + 4i (the two RMSNorms' inputs and outputs, q and k after RoPE, v, K and V
    repeated to the query heads, the attention output, the output projection's input; the MLP's gate, up,
    activated gate and product). With gradient checkpointing each layer keeps only its input (h) and one layer
    is recomputed at a time during the backward."""
    per_layer = 9 * shape.hidden + shape.kv_width + 4 * shape.intermediate
    if checkpointing:
        return rows * tokens * element_size * (shape.layers * shape.hidden + per_layer)
    return rows * tokens * element_size * shape.layers * per_layer


def loss_logits_bytes(rows: int, response_len: int, vocab: int, element_size: int) -> int:
    """The actor's response logits rows x (R+1) x V in the model's dtype, and what the losses keep of them and
    add in the backward, in float32 units of rows x R x V: the softmax of the entropy term, its float32
    inputs when the logits are bf16/fp16 (``ppo.entropy_from_logits``, ``ppo.logprobs_from_logits`` upcast),
    and the gradient of the logits with its softmax workspace (2)."""
    unit = rows * response_len * vocab * 4
    upcasts = 0 if element_size == 4 else 2
    return rows * (response_len + 1) * vocab * element_size + unit * (1 + upcasts + 2)


def gradient_bytes(setup: Setup, role: str) -> dict[str, int]:
    """One trained engine's gradients in flight during its backward and step, on one rank.

    Every stage: the largest tensor's full gradient (the embedding, tied to the LM head, accumulates its two
    gradients before it is reduced). ZeRO-1/2 (``contiguous_gradients``): the reduce buckets (two with
    ``overlap_comm``, each ``reduce_bucket_size`` elements of b; written only as far as the gradients fill
    them), the rank's gradient partition in b and, at the step, its float32 copy. ZeRO-3: the parameters
    gathered for the forward and backward (the largest tensor whole, others up to ``stage3_max_live_parameters``)
    and, unless the run is fp32, the float32 copy of the gradient partition at the step. ZeRO-0: the full
    gradients (N b)."""
    shape, zero, W, b = setup.shape(role), setup.zero(role), setup.world_size, setup.b
    stage, n = zero.get("stage", 0), shape.trainable
    largest = {f"{role} largest gradient": shape.largest_trainable * b}
    if stage == 0:
        return {f"{role} gradients": n * b}
    if stage == 3:
        live = min(zero.get("stage3_max_live_parameters", 10**9), shape.params - shape.largest)
        return {**largest, f"{role} gathered parameters": (2 * shape.largest + live) * b,
                f"{role} float32 gradient partition": 4 * n // W if b != 4 else 0}
    bucket = zero.get("reduce_bucket_size", 5 * 10**8)
    buckets = 2 if zero.get("overlap_comm", False) else 1
    bucket_elements = min(n, buckets * bucket) if setup.touched else buckets * bucket
    return {**largest, f"{role} reduce buckets": bucket_elements * b,
            f"{role} gradient partition": -(-n // W) * b + 4 * n // W}


def update_working_bytes(setup: Setup) -> dict[str, int]:
    """The update's peak, during the actor's backward on one mini-batch: both forwards' saved activations,
    the logits and loss terms, and the actor's gradients in flight (the critic's come after the actor's
    activations are freed, and are no larger)."""
    cfg, b = setup.config, setup.b
    m, T, R = cfg.mini_batch_size, cfg.max_prompt_len + cfg.max_new_tokens, cfg.max_new_tokens
    ckpt = cfg.gradient_checkpointing
    critic = {} if setup.critic is None else {"critic activations": activation_bytes(setup.critic, m, T, b, ckpt)}
    return {"actor activations": activation_bytes(setup.policy, m, T, b, ckpt), **critic,
            "actor logits and loss terms": loss_logits_bytes(m, R, setup.policy.vocab, b),
            **gradient_bytes(setup, "actor")}


def generation_working_bytes(setup: Setup) -> dict[str, int]:
    """The gathered actor (ZeRO-3, unless ``zero3_generation`` is "partitioned") and ``generate``'s own memory."""
    from rlhf_ds.hybrid import generation_memory_bytes

    cfg = setup.config
    gather = gathered_bytes(setup, "actor") if cfg.zero3_generation != "partitioned" else 0
    return {"gathered actor": gather,
            "KV cache, prefill, sampling": generation_memory_bytes(setup.policy.config, setup.dtype,
                                                                   cfg.rollout_batch_size * cfg.samples_per_prompt,
                                                                   cfg.max_prompt_len,
                                                                   cfg.max_new_tokens)}


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted bytes of one rank: ``resident`` components (every phase), each phase's ``working`` components,
    what offloading keeps in ``host`` memory, and ``capacity``, the bytes one device has (None: unknown)."""
    setup: Setup
    resident: dict[str, int]
    working: dict[str, dict[str, int]]
    host: dict[str, int]
    capacity: int | None

    def peak(self, phase: str) -> int:
        return sum(self.resident.values()) + sum(self.working[phase].values())

    @property
    def largest_phase(self) -> str:
        return max(PHASES, key=self.peak)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak(self.largest_phase) <= self.capacity

    def table(self) -> str:
        """One row per component, one column per phase (GiB), the peaks, then the verdict."""
        cfg, s = self.setup.config, self.setup
        width = max(map(len, [*self.resident, *self.host, *(k for w in self.working.values() for k in w)])) + 2
        lines = [f"memory plan per rank: {s.world_size} rank(s), ZeRO-{cfg.zero_stage}, "
                 f"{str(s.dtype).removeprefix('torch.')}, rollout_batch_size {cfg.rollout_batch_size}, "
                 f"mini_batch_size {cfg.mini_batch_size}, prompt {cfg.max_prompt_len} + response "
                 f"{cfg.max_new_tokens} tokens, reward {s.reward_max_len} tokens (GiB)",
                 f"  {'component':<{width}}" + "".join(f"{p:>12}" for p in PHASES)]
        for name, value in self.resident.items():
            lines.append(f"  {name:<{width}}" + f"{value / 2**30:12.2f}" * len(PHASES))
        for phase in PHASES:
            for name, value in self.working[phase].items():
                cells = [f"{value / 2**30:12.2f}" if p == phase else f"{'':12}" for p in PHASES]
                lines.append(f"  {name:<{width}}" + "".join(cells))
        lines.append(f"  {'peak':<{width}}" + "".join(f"{self.peak(p) / 2**30:12.2f}" for p in PHASES))
        for name, value in self.host.items():
            lines.append(f"  {name:<{width}}{value / 2**30:12.2f}  (host memory, every phase)")
        return "\n".join(lines)

    def summary(self) -> dict:
        """The plan as JSON-ready MiB figures (saved in the run's ``run_info.json``)."""
        def mib(components: dict) -> dict:
            return {name: round(value / 2**20, 1) for name, value in components.items()}

        return {"predicted_peak_mb": {p: round(self.peak(p) / 2**20, 1) for p in PHASES},
                "capacity_mb": None if self.capacity is None else round(self.capacity / 2**20, 1),
                "fits": self.fits, "resident_mb": mib(self.resident), "host_mb": mib(self.host),
                "working_mb": {phase: mib(self.working[phase]) for phase in PHASES}}

    def verdict(self) -> str:
        phase, peak = self.largest_phase, self.peak(self.largest_phase)
        if self.capacity is None:
            return f"peak {peak / 2**30:.2f} GiB per rank ({phase})"
        room = largest_rollout_batch(self.setup, self.capacity)
        most = (f"largest rollout_batch_size that fits: {room}" if room else
                f"no rollout_batch_size fits with mini_batch_size {self.setup.config.mini_batch_size}")
        return (f"{'fits' if self.fits else 'does not fit'}: peak {peak / 2**30:.2f} GiB per rank ({phase}) of "
                f"{self.capacity / 2**30:.2f} GiB; {most}")


def plan(setup: Setup, capacity: int | None = None) -> MemoryPlan:
    """The ``MemoryPlan`` of ``setup`` on a device of ``capacity`` bytes (None: unknown)."""
    resident, host = {"runtime": setup.runtime}, {}
    for role in setup.roles:
        for name, value in engine_states(setup, role).items():
            (host if name.endswith("(host)") else resident)[name] = value
    if setup.touched:  # host memory is the device: offloaded states count where they are
        resident.update(host)
        host = {}
    working = {"generation": generation_working_bytes(setup), "experience": experience_working_bytes(setup),
               "update": update_working_bytes(setup)}
    return MemoryPlan(setup, resident, working, host, capacity)


def largest_rollout_batch(setup: Setup, capacity: int, limit: int = 2**16) -> int:
    """The largest rollout_batch_size (a multiple of mini_batch_size, at most ``limit``) whose plan fits in
    ``capacity`` bytes; 0 when none does. Only generation grows with it (the other phases work on
    mini-batches)."""
    mini = setup.config.mini_batch_size

    def fits(multiple: int) -> bool:
        config = dataclasses.replace(setup.config, rollout_batch_size=multiple * mini)
        return plan(dataclasses.replace(setup, config=config), capacity).fits

    if not fits(1):
        return 0
    low, high = 1, 2
    while high * mini <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * mini


def make_setup(config: PPOConfig, world_size: int, device_type: str) -> Setup:
    """The ``Setup`` of ``config`` on ``world_size`` ranks of ``device_type`` ("cuda" or "cpu"): reads the three
    models' configs (``catalog.model_configs``: no weights load) and builds each engine's DeepSpeed config.
    Precision "auto" is bf16 on a GPU and fp32 on a CPU, as ``engines.resolve_precision`` chooses."""
    from rlhf_ds.catalog import model_configs
    from rlhf_ds.device_memory import resident_bytes
    from rlhf_ds.engines import ROLES, build_ds_config
    from rlhf_ds.lora import lora_config

    policy, critic, reward = model_configs(config)
    precision = config.precision if config.precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    limit = getattr(reward, "max_position_embeddings", None)
    reward_max_len = min(config.reward_max_len or limit, limit or config.reward_max_len or 512)
    return Setup(config=config, policy=model_shape(policy, "policy", lora_config(config, "actor")),
                 critic=model_shape(critic, "critic", lora_config(config, "critic")) if config.needs_critic else None,
                 reward=model_shape(reward, "reward"), world_size=world_size,
                 dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
                 ds_configs={role: build_ds_config(config, role, world_size) for role in ROLES},
                 touched=device_type == "cpu", reward_max_len=reward_max_len,
                 runtime=resident_bytes() if device_type == "cpu" else CUDA_CONTEXT_BYTES)


def model_states_comparison(setup: Setup) -> str:
    """The actor's and critic's model states as planned (resident states plus the gradients of their step)
    next to DeepSpeed's own estimator for their ZeRO stage (``estimate_zero2_model_states_mem_needs``, stage 3's
    with the largest tensor as its largest layer), per device, all ranks on one node; empty below ZeRO-2, a note
    with LoRA."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    stage = setup.config.zero_stage
    if stage < 2:
        return ""
    if setup.config.lora_rank:
        return "model states: DeepSpeed's estimators count every parameter as trained, LoRA's are mostly frozen"
    lines = [f"model states per device, this plan vs DeepSpeed's ZeRO-{stage} estimator (GiB):"]
    for role in (role for role in ("actor", "critic") if role in setup.roles):
        shape, zero = setup.shape(role), setup.zero(role)
        ours = sum(engine_states(setup, role).values()) + sum(
            value for name, value in gradient_bytes(setup, role).items() if "gathered" not in name)
        offload = "offload_optimizer" in zero
        if stage == 2:
            _, theirs = estimate_zero2_model_states_mem_needs(shape.params, setup.world_size, cpu_offload=offload)
        else:
            _, theirs, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest, setup.world_size,
                                                                 cpu_offload=offload,
                                                                 cpu_offload_params="offload_param" in zero)
        lines.append(f"  {role:<7} {ours / 2**30:6.2f} vs {theirs / 2**30:6.2f}")
    return "\n".join(lines)


def plan_this_run(config: PPOConfig, world_size: int) -> dict | None:
    """The trainer's plan, made before any model loads: printed with its verdict against this device's memory
    (``device_memory.capacity_bytes``), a warning on stderr when the run is predicted not to fit. Returns
    ``MemoryPlan.summary`` for the run's files, or None (with a warning) for an architecture the planner does
    not know: the run goes on."""
    from deepspeed.accelerator import get_accelerator

    from rlhf_ds.device_memory import capacity_bytes

    device = torch.device(get_accelerator().current_device_name())
    try:
        memory_plan = plan(make_setup(config, world_size, device.type), capacity_bytes(device))
    except PlanError as err:
        print(f"warning: no memory plan: {err}", file=sys.stderr, flush=True)
        return None
    print(memory_plan.table())
    print(f"memory plan: {memory_plan.verdict()}", flush=True)
    if not memory_plan.fits:
        print(f"warning: the memory plan predicts {memory_plan.peak(memory_plan.largest_phase) / 2**30:.1f} GiB per "
              f"rank, more than this device's {memory_plan.capacity / 2**30:.1f} GiB: lower rollout_batch_size, "
              "mini_batch_size or the lengths, or turn on gradient_checkpointing, a higher zero_stage or offloading "
              "(python -m rlhf_ds.memory tries settings without loading anything)", file=sys.stderr, flush=True)
    return memory_plan.summary()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ds.memory", description=__doc__.splitlines()[0],
                                     epilog="Any other --field value is a PPOConfig override, as in launch/train.py.")
    parser.add_argument("--gpus", type=int, default=1, help="ranks (GPUs) of the run (default 1)")
    parser.add_argument("--gpu_memory", default=None, help="memory of one device, e.g. 80GiB, 141GB (default: "
                        "no verdict)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default) plans GPUs; cpu plans CPU ranks of this machine")
    args, rest = parser.parse_known_args(argv)
    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus}: the run needs at least 1 rank")
    capacity = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    memory_plan = plan(make_setup(PPOConfig.from_args(rest), args.gpus, args.device), capacity)
    print(memory_plan.table())
    print(model_states_comparison(memory_plan.setup))
    print(memory_plan.verdict())
    return 0 if memory_plan.fits else 1


if __name__ == "__main__":
    from rlhf_ds.errors import run_main

    sys.exit(run_main(lambda: main(sys.argv[1:])))
