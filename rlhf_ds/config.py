"""Every knob of an rlhf-ds run in one dataclass, loaded from a file and ``--field value`` overrides.

One config path: ``PPOConfig.from_args(argv)`` reads ``--config FILE`` (YAML or JSON), applies the
``--field value`` overrides on top, and validates. ``validate()`` raises ``ConfigError`` with one line that
names the field, the bad value and the fix, so a typo never becomes a silently ignored knob. ``--help`` (or
``-h``) raises ``ConfigHelp`` instead, whose text lists every field with its default and meaning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

from rlhf_ds.errors import KnownError
from rlhf_ds.kl_control import KL_CONTROLLERS
from rlhf_ds.ppo import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, KL_ESTIMATORS

if typing.TYPE_CHECKING:
    from rlhf_ds.sampling import Sampling

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ZERO3_GENERATION = ("auto", "gathered", "partitioned")
REAL_POLICY = "Qwen/Qwen2-0.5B"
REAL_REWARD = "OpenAssistant/reward-model-deberta-v3-large-v2"
REAL_DATASET = "Anthropic/hh-rlhf"
LORA_QWEN2_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(KnownError, ValueError):
    """A bad configuration value; the message is one line naming the field and the fix."""


class ConfigHelp(Exception):
    """``--help``/``-h`` was asked for: ``str()`` is the help text, which a launcher prints to stdout, exiting 0.

    Not a ConfigError, so that a launcher's error path (stderr, exit 2) cannot swallow a request for help.
    """


def _doc(default: Any, help: str) -> Any:
    """A dataclass field carrying its one-line help (shown by ``describe()`` and the README table)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class PPOConfig:
    # --- models and data -------------------------------------------------------------------------------
    policy_model: str = _doc("embedded", "actor/reference weights: 'embedded', 'qwen2-0.5b-shape[:LAYERS]' (random "
                             "stand-in of the real shape), a hub name or a local HF directory")
    critic_model: Optional[str] = _doc(None, "critic backbone weights; None = same as policy_model")
    reward_model: str = _doc("embedded", "reward model (sequence classifier, num_labels=1), with its own tokenizer: "
                             "'embedded', 'deberta-v3-large-shape[:LAYERS]', a hub name or a local directory")
    dataset: str = _doc("embedded", "prompts: 'embedded', a hub dataset (Anthropic/hh-rlhf), a local dir or file")
    train_split: str = _doc("train", "dataset split used for training prompts")
    eval_split: str = _doc("test", "dataset split used for held-out evaluation prompts")
    max_prompts: Optional[int] = _doc(None, "use only the first N training prompts (None = all)")
    trust_remote_code: bool = _doc(False, "allow model repos to run their own code (off unless you trust them)")
    # --- generation ------------------------------------------------------------------------------------
    max_prompt_len: int = _doc(128, "prompt tokens kept (longer prompts are cut at the front and counted)")
    max_new_tokens: int = _doc(32, "response tokens generated per prompt")
    temperature: float = _doc(1.0, "sampling temperature (the log-probs of every phase use the same one)")
    top_k: int = _doc(0, "must stay 0: PPO needs the log-probs of the distribution that sampled (README: the real run)")
    top_p: float = _doc(1.0, "must stay 1.0, for the same reason as top_k")
    stop_strings: list = _doc(["\n\nHuman:"], "a response also ends where one of these is complete (its tokens "
                              "count, like EOS; the reward model reads the answer before it); [] = EOS only")
    reward_max_len: Optional[int] = _doc(None, "reward-model tokens per (question, answer) pair, question cut from "
                                         "the left; None = the reward model's limit (DeBERTa-v3: 512)")
    # --- PPO -------------------------------------------------------------------------------------------
    iterations: int = _doc(60, "PPO iterations (one rollout + update each)")
    time_budget_s: float = _doc(0.0, "end the run (checkpoint and export, as at the last iteration) after the "
                                "iteration in which this process's training time reached this many seconds; "
                                "0 = no budget")
    rollout_batch_size: int = _doc(16, "prompts generated per rank per iteration")
    mini_batch_size: int = _doc(8, "sequences per rank per optimizer step; must divide rollout_batch_size")
    ppo_epochs: int = _doc(2, "passes over each rollout")
    actor_lr: float = _doc(5e-5, "actor learning rate (embedded default; real models: 1e-6..1e-5)")
    critic_lr: float = _doc(5e-4, "critic learning rate (embedded default; real models: 1e-6..1e-5)")
    weight_decay: float = _doc(0.0, "AdamW weight decay")
    warmup_steps: int = _doc(0, "linear learning-rate warmup, in optimizer steps")
    max_grad_norm: float = _doc(1.0, "gradient clipping norm (DeepSpeed gradient_clipping; 0 = off)")
    clip_range: float = _doc(0.2, "PPO ratio clip epsilon, in (0, 1)")
    clip_range_value: Optional[float] = _doc(0.2, "value clip around old values (None = plain MSE)")
    vf_coef: float = _doc(0.1, "weight of value_loss in total_loss")
    entropy_coef: float = _doc(0.01, "entropy bonus weight: entropy_loss = -entropy_coef * mean entropy")
    gamma: float = _doc(1.0, "discount factor")
    lam: float = _doc(0.95, "GAE lambda")
    whiten_advantages: bool = _doc(True, "normalise advantages over all valid tokens of all ranks")
    reward_clip: Optional[float] = _doc(5.0, "clip reward-model scores to +-value (None = off)")
    normalize_reward: bool = _doc(False, "standardise scores with running mean/std before clipping")
    max_skipped_batches: int = _doc(3, "stop with an error after this many consecutive non-finite rollouts")
    # --- KL control -----------------------------------------------------------------------------------
    kl_coef: float = _doc(0.2, "initial KL penalty coefficient: adjusted_reward = reward - kl_coef * kl")
    target_kl: float = _doc(0.01, "target mean per-token KL for the adaptive controller")
    adaptive_kl: bool = _doc(True, "adapt kl_coef (False = fixed kl_coef)")
    kl_controller: str = _doc("step", "adaptive rule: step (x1.5 above 2*target, x0.5 below target/2), proportional")
    kl_horizon: int = _doc(10000, "horizon of the proportional controller, in samples")
    kl_coef_min: Optional[float] = _doc(0.05, "lower bound on kl_coef (None = unbounded)")
    kl_coef_max: Optional[float] = _doc(2.0, "upper bound on kl_coef (None = unbounded)")
    kl_estimator: Optional[str] = _doc(None, "per-token KL estimator: k1 (log-ratio), k2, k3; None = k1 in the "
                                       "reward, k3 as a loss term (kl_in_loss)")
    # --- advantage estimator ----------------------------------------------------------------------------
    advantage_estimator: str = _doc("gae", "gae (PPO with a critic), or critic-free: grpo, rloo, reinforce_pp (no "
                                    "critic engine is built)")
    samples_per_prompt: int = _doc(1, "responses sampled per prompt, all on the prompt's rank (grpo and rloo "
                                   "compare them: >= 2)")
    kl_in_loss: Optional[bool] = _doc(None, "the KL to the reference as a loss term (kl_coef * token mean of the "
                                      "KL) instead of in the reward; None = on for grpo, off otherwise")
    # --- LoRA ------------------------------------------------------------------------------------------
    lora_rank: int = _doc(0, "rank of LoRA adapters (peft) on the actor; 0 = full fine-tuning. With adapters the "
                          "reference is the actor with its adapters off: no reference engine")
    lora_alpha: float = _doc(16.0, "LoRA scaling numerator: the adapters' output is multiplied by lora_alpha / "
                             "lora_rank")
    lora_dropout: float = _doc(0.0, "dropout on the adapters' input in the update's forwards (the rollout's have "
                               "none, so > 0 adds noise to PPO's ratio)")
    lora_target_modules: list = _doc(list(LORA_QWEN2_MODULES), "module names that get adapters (default: "
                                     "Qwen2's attention and MLP projections)")
    lora_critic: bool = _doc(True, "with lora_rank > 0, adapters on the critic's backbone too (False: the critic "
                             "trains in full); its value head always trains")
    # --- system ----------------------------------------------------------------------------------------
    zero_stage: int = _doc(2, "DeepSpeed ZeRO stage for actor and critic (0-3)")
    offload_optimizer: bool = _doc(False, "ZeRO CPU offload of optimizer states")
    offload_params: bool = _doc(False, "ZeRO-3 CPU offload of parameters (also for reference and reward)")
    precision: str = _doc("auto", "auto (bf16 on GPUs that support it, else fp32), fp32, bf16, fp16")
    gradient_checkpointing: bool = _doc(False, "recompute activations in backward (saves memory)")
    zero3_generation: str = _doc("auto", "ZeRO-3 generation: gathered (fast: the whole actor on each rank), "
                                 "partitioned (slow, least memory), auto (gathered when it fits in free memory)")
    ds_config: Optional[str] = _doc(None, "your own DeepSpeed JSON for actor/critic (batch fields filled in)")
    seed: int = _doc(42, "random seed (each rank samples with seed + rank)")
    output_dir: str = _doc("runs/ppo", "where config, metrics.jsonl and checkpoints go")
    save_interval: int = _doc(20, "checkpoint (resumable) every N iterations; 0 = only at the end")
    keep_checkpoints: int = _doc(2, "complete checkpoints kept in output_dir/checkpoints (older ones deleted)")
    resume: Optional[str] = _doc(None, "'auto' (newest complete checkpoint in output_dir) or a checkpoint path")
    force_resume: bool = _doc(False, "resume although the config changed something that breaks exactness")
    overwrite_output_dir: bool = _doc(False, "start afresh in an output_dir that holds another run, deleting its "
                                      "checkpoints and metrics (without it that is an error)")
    log_interval: int = _doc(1, "print metrics every N iterations (when stdout is not a terminal)")
    tensorboard: bool = _doc(True, "write TensorBoard logs to output_dir/tensorboard")
    wandb: bool = _doc(False, "also log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = _doc("rlhf-ds", "Weights & Biases project name")

    # ---------------------------------------------------------------------------------------------------
    def validate(self) -> "PPOConfig":
        """Check types and ranges; raise ConfigError naming the first bad field and how to fix it."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: {rule}")

        types = _field_types()
        for f in fields(self):
            value = _checked(f.name, getattr(self, f.name), types[f.name])
            setattr(self, f.name, value)
            # inf and nan pass most range checks (inf > 0) and would only surface as a diverged run
            need(not isinstance(value, float) or math.isfinite(value), f.name,
                 f"use a finite number, e.g. {f.default!r}")

        need(0 < self.clip_range < 1, "clip_range", "use a value in (0, 1), e.g. 0.2")
        need(self.clip_range_value is None or self.clip_range_value > 0, "clip_range_value", "use > 0 or null")
        need(self.target_kl > 0, "target_kl", "use a positive target, e.g. 0.01")
        need(self.kl_coef >= 0, "kl_coef", "use kl_coef >= 0, e.g. 0.2")
        need(0 <= self.gamma <= 1, "gamma", "use a value in [0, 1], e.g. 1.0")
        need(0 <= self.lam <= 1, "lam", "use a value in [0, 1], e.g. 0.95")
        need(self.actor_lr > 0, "actor_lr", "use a positive learning rate (real models: 1e-6..1e-5)")
        need(self.critic_lr > 0, "critic_lr", "use a positive learning rate (real models: 1e-6..1e-5)")
        need(self.vf_coef >= 0, "vf_coef", "use vf_coef >= 0, e.g. 0.1")
        need(self.entropy_coef >= 0, "entropy_coef", "use entropy_coef >= 0, e.g. 0.01")
        need(self.max_new_tokens >= 1, "max_new_tokens", "generate at least 1 token")
        need(self.max_prompt_len >= 1, "max_prompt_len", "keep at least 1 prompt token")
        need(self.reward_max_len is None or self.reward_max_len >= 8, "reward_max_len",
             "use at least 8 reward-model tokens, or null for the reward model's limit")
        need(self.temperature > 0, "temperature", "use a positive temperature, e.g. 1.0")
        truncation = ("PPO's ratio, KL and entropy need the log-probs of the distribution that sampled, and a "
                      "truncated one has no counterpart in the reference; tune temperature instead")
        need(self.top_k == 0, "top_k", f"{truncation} (use 0)")
        need(self.top_p == 1.0, "top_p", f"{truncation} (use 1.0)")
        need(all(isinstance(stop, str) and stop for stop in self.stop_strings), "stop_strings",
             "use a list of non-empty strings, e.g. [\"\\n\\nHuman:\"], or [] for EOS only")
        need(self.iterations >= 1, "iterations", "run at least 1 iteration")
        need(self.time_budget_s >= 0, "time_budget_s", "use seconds >= 0 (0 = no budget)")
        need(self.rollout_batch_size >= 1, "rollout_batch_size", "use at least 1 prompt per rank")
        need(self.mini_batch_size >= 1, "mini_batch_size", "use at least 1 sequence per step")
        need(self.advantage_estimator in ADVANTAGE_ESTIMATORS, "advantage_estimator",
             f"choose one of {', '.join(ADVANTAGE_ESTIMATORS)}")
        need(self.samples_per_prompt >= 1, "samples_per_prompt", "sample at least 1 response per prompt")
        need(self.samples_per_prompt >= 2 or self.advantage_estimator not in GROUP_ESTIMATORS, "samples_per_prompt",
             f"{self.advantage_estimator} compares the responses to one prompt with each other: use "
             "samples_per_prompt >= 2, e.g. 4")
        need(self.rollout_batch_size * self.samples_per_prompt % self.mini_batch_size == 0, "rollout_batch_size",
             f"rollout_batch_size x samples_per_prompt (the sequences per rank) must be divisible by "
             f"mini_batch_size={self.mini_batch_size}")
        need(self.ppo_epochs >= 1, "ppo_epochs", "use at least 1 epoch")
        need(self.max_grad_norm >= 0, "max_grad_norm", "use >= 0 (0 = off)")
        need(self.weight_decay >= 0, "weight_decay", "use >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "use >= 0")
        need(self.reward_clip is None or self.reward_clip > 0, "reward_clip", "use > 0 or null")
        need(self.max_skipped_batches >= 1, "max_skipped_batches", "use at least 1")
        if self.kl_in_loss is None:  # resolved here, so the saved config says what ran
            self.kl_in_loss = self.advantage_estimator == "grpo"
        if self.kl_estimator is None:
            self.kl_estimator = "k3" if self.kl_in_loss else "k1"
        need(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"choose one of {', '.join(KL_ESTIMATORS)}")
        need(self.kl_controller in KL_CONTROLLERS, "kl_controller", f"choose one of {', '.join(KL_CONTROLLERS)}")
        need(self.kl_horizon >= 1, "kl_horizon", "use a positive horizon, e.g. 10000")
        need(self.kl_coef_min is None or self.kl_coef_min >= 0, "kl_coef_min", "use >= 0 or null")
        need(self.kl_coef_max is None or self.kl_coef_max > 0, "kl_coef_max", "use > 0 or null")
        if self.kl_coef_min is not None and self.kl_coef_max is not None:
            need(self.kl_coef_min <= self.kl_coef_max, "kl_coef_min", f"must be <= kl_coef_max={self.kl_coef_max}")
        need(self.lora_rank >= 0, "lora_rank", "use a rank >= 1 for LoRA (e.g. 8), or 0 for full fine-tuning")
        need(self.lora_alpha > 0, "lora_alpha", "use a positive scaling numerator, e.g. 16")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "use a probability in [0, 1), e.g. 0.0")
        need(len(self.lora_target_modules) > 0 and all(isinstance(name, str) and name
                                                       for name in self.lora_target_modules),
             "lora_target_modules", f"name the modules that get adapters, e.g. {list(LORA_QWEN2_MODULES)}")
        need(self.zero_stage in (0, 1, 2, 3), "zero_stage", "choose 0, 1, 2 or 3")
        need(not self.offload_params or self.zero_stage == 3, "offload_params", "parameter offload needs zero_stage=3")
        need(self.precision in PRECISIONS, "precision", f"choose one of {', '.join(PRECISIONS)}")
        need(self.zero3_generation in ZERO3_GENERATION, "zero3_generation",
             f"choose one of {', '.join(ZERO3_GENERATION)}")
        need(self.save_interval >= 0, "save_interval", "use >= 0 (0 = only at the end)")
        need(self.log_interval >= 1, "log_interval", "use >= 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "keep at least 1 checkpoint")
        need(self.output_dir.strip() != "", "output_dir", "name a directory, e.g. runs/ppo")
        need(not (self.overwrite_output_dir and self.resume), "overwrite_output_dir",
             f"it deletes the run that resume={self.resume!r} would continue: pass only one of them")
        need(not self.wandb_project.strip() == "", "wandb_project", "name a Weights & Biases project")
        need(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "use a positive count or null")
        need(self.ds_config is None or os.path.isfile(self.ds_config), "ds_config",
             "point it at an existing DeepSpeed JSON file")
        return self

    @property
    def needs_critic(self) -> bool:
        """Only GAE estimates advantages with a value function; the other estimators build no critic engine."""
        return self.advantage_estimator == "gae"

    # --- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "PPOConfig":
        """Build from a plain dict; unknown keys are a ConfigError suggesting the closest field."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else "see README for the list of fields"
                raise ConfigError(f"unknown field '{key}' in {source}: {hint}")
        return cls(**values).validate()

    @classmethod
    def from_file(cls, path: str) -> "PPOConfig":
        """Load a YAML (.yaml/.yml) or JSON file of field values."""
        return cls.from_dict(read_config_file(path), source=path)

    @classmethod
    def from_args(cls, argv: Sequence[str]) -> "PPOConfig":
        """``[--config FILE] [--field value ...]``; ``--local_rank N`` from the deepspeed launcher is accepted.

        ``--help`` or ``-h`` anywhere raises ConfigHelp before anything else is read, so a typo or a missing file
        elsewhere on the line cannot hide the help.
        """
        if "--help" in argv or "-h" in argv:
            raise ConfigHelp(help_text())
        values: dict = {}
        source = "command line"
        overrides: dict = {}
        args = list(argv)
        i = 0
        types = _field_types()
        while i < len(args):
            arg = args[i]
            if not arg.startswith("--"):
                raise ConfigError(f"unexpected argument '{arg}': use --field value")
            key, _, inline = arg[2:].partition("=")
            key = key.replace("-", "_")
            if inline == "" and "=" not in arg:
                if i + 1 >= len(args):
                    raise ConfigError(f"--{key} needs a value: use --{key} VALUE")
                inline = args[i + 1]
                i += 1
            i += 1
            if key == "local_rank":
                continue
            if key == "config":
                values, source = read_config_file(inline), inline
                continue
            if key not in types:
                close = difflib.get_close_matches(key, types, n=1)
                hint = f"did you mean '--{close[0]}'?" if close else "see README for the list of fields"
                raise ConfigError(f"unknown option '--{key}': {hint}")
            overrides[key] = parse_value(key, inline, types[key])
        # every override is a known field by now, so an unknown key can only be the file's: name the file
        return cls.from_dict({**values, **overrides}, source=source)

    def sampling(self) -> "Sampling":
        """The one value generation, the log-prob computations and evaluation all sample and score with."""
        from rlhf_ds.sampling import Sampling

        return Sampling(temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                        stop_strings=tuple(self.stop_strings))

    # --- output ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """Write the effective config as JSON (saved with every run so it can be reproduced)."""
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=False)
            fh.write("\n")

    def describe(self) -> str:
        """The effective config, one ``field = value`` per line (printed at the start of a run)."""
        width = max(len(f.name) for f in fields(self))
        return "\n".join(f"  {f.name:<{width}} = {getattr(self, f.name)!r}" for f in fields(self))


def read_config_file(path: str) -> dict:
    """Read a YAML or JSON mapping; a missing or unparsable file is a one-line ConfigError.

    YAML 1.1 reads ``1e-6`` (no dot) as a string: a string that parses as a number, in a float or int field, is
    taken as the number meant (``'4'`` for an int, not ``'4.5'``); any other string is left for validate()'s
    type error.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found: check the --config path")
    with open(path) as fh:
        text = fh.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"config file '{path}' does not parse: {first}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of field: value, not {type(values).__name__}")
    types = _field_types()
    for key, value in values.items():
        kind = _base_type(types[key])[0] if key in types else None
        if kind in (int, float) and isinstance(value, str):
            with contextlib.suppress(ValueError):
                values[key] = kind(value)
    return values


def _field_types() -> dict:
    return typing.get_type_hints(PPOConfig)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(underlying type, optional?) of a field annotation such as Optional[float]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union:
        return args[0], True
    return annotation, False


def parse_value(name: str, text: str, annotation: Any) -> Any:
    """Turn a command-line string into the field's type (booleans as true/false, 'none' for Optional)."""
    kind, optional = _base_type(annotation)
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is list:
            values = json.loads(text)
            if not isinstance(values, list):
                raise ValueError
            return values
        return text
    except ValueError:  # json.JSONDecodeError is one
        raise ConfigError(f"--{name} {text!r} is not a valid {kind.__name__}: "
                          f"use e.g. --{name} {_example(kind)}") from None


def _example(kind: type) -> str:
    return {bool: "false", int: "4", float: "0.1", list: "'[\"a\", \"b\"]'"}.get(kind, "text")


def _checked(name: str, value: Any, annotation: Any) -> Any:
    """The value if it has the field's type (an int is accepted, and converted, for a float field)."""
    kind, optional = _base_type(annotation)
    if value is None and optional:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # e.g. 10**400 in a JSON file: beyond float range, so refused as non-finite
            return math.inf if value > 0 else -math.inf
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}={value!r} has type {type(value).__name__}: expected {kind.__name__}"
                          f"{' or null' if optional else ''} (e.g. {name}: {_example(kind)})")
    return value


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def markdown_table() -> str:
    """The README's table of fields: name, default, one-line help (``python -m rlhf_ds.config``)."""
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    for f in fields(PPOConfig):
        rows.append(f"| `{f.name}` | `{_default(f)!r}` | {f.metadata['help']} |")
    return "\n".join(rows)


def help_text() -> str:
    """The text of ConfigHelp: usage, then one ``--field  default  meaning`` line per field."""
    rows = [(f"--{f.name}", repr(_default(f)), f.metadata["help"]) for f in fields(PPOConfig)]
    name_width = max(len(name) for name, _, _ in rows)
    default_width = max(len(default) for _, default, _ in rows)
    lines = ["usage: [--config FILE] [--field value ...]", "",
             "--config FILE reads a YAML or JSON file of field: value; --field value overrides it.",
             "Fields (--field  default  meaning; null/none for None, true/false for booleans):"]
    lines += [f"  {name:<{name_width}}  {default:<{default_width}}  {meaning}" for name, default, meaning in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
