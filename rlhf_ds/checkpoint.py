"""Checkpoints a run resumes from exactly, and Hugging Face exports of the trained models.

One checkpoint, ``output_dir/checkpoints/iter_0000020/`` (the number = iterations completed):

    actor/state/, critic/state/   DeepSpeed ``save_checkpoint``: weights, optimizer, scheduler, one shard per rank
                                  (no critic/ nor critic_meta/ when the advantage estimator trains no critic)
    rng/rank_00000.pt             python, numpy, torch (and accelerator) RNG states of each rank
    trainer_state.json            iteration, KL controller, data position, reward moments, skip counters, config
    policy_meta/, critic_meta/    HF configs (+ the policy tokenizer, + peft's adapter_config.json with LoRA):
                                  exporting needs no original model paths
    manifest.json                 every file above with its size and sha256; written last, after all ranks finished

``output_dir/checkpoints/latest`` names the newest complete checkpoint. A checkpoint is written under
``iter_N.tmp`` and renamed only when every rank has written its part, then ``latest`` is replaced atomically:
a kill or a full disk while saving leaves the previous checkpoint and ``latest`` untouched. The frozen models
(reference, reward) are not saved; they are the initial models, loaded again from the config's paths.

``export_model`` writes a live engine's model as an ordinary HF directory (safetensors + tokenizer);
``export_checkpoint`` does the same offline from a checkpoint, and can also write a LoRA run's adapter alone, in
peft's format. A LoRA model is exported merged (``lora.filled`` then ``lora.merge``), so what loads it needs no
peft. Under ZeRO-3 the weights are consolidated first (``zero_to_fp32.py --safe_serialization`` fails on Qwen2's
tied embeddings; ``save_pretrained`` on a consolidated state dict does not).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
import re
import shutil
from typing import Optional

import deepspeed
import numpy as np
import torch

from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.distributed import all_gather_objects, barrier, get_rank, get_world_size, is_main_process
from rlhf_ds.errors import KnownError
from rlhf_ds.files import atomic_write_text, describe_files, first_problem, replace_dir
from rlhf_ds.lora import adapter_config, base_model, filled, has_adapters, merge, on_meta, saved_adapters

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TAG = "state"  # DeepSpeed's tag inside actor/ and critic/; ours is the directory name
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"^iter_(\d+)$")
# Fields that may change between a run and its resume without breaking exactness (zero3_generation:
# gathered and partitioned generation sample the same tokens).
RESUMABLE_CHANGES = ("iterations", "time_budget_s", "output_dir", "save_interval", "keep_checkpoints", "resume",
                     "force_resume", "overwrite_output_dir", "log_interval", "tensorboard", "wandb", "wandb_project",
                     "max_skipped_batches", "zero3_generation")


class CheckpointError(KnownError, RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt); one line naming the file."""


# --- paths -----------------------------------------------------------------------------------------------
def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (renamed from .tmp, with a manifest) under ``output_dir``, oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n) and os.path.isfile(os.path.join(root, n, MANIFEST_FILE)))
    return [os.path.join(root, n) for n in names]


# --- RNG ---------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """This rank's random generators, as tensors/tuples that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": cached}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(path: str, rank: int) -> str:
    return os.path.join(path, "rng", f"rank_{rank:05d}.pt")


# --- saving ------------------------------------------------------------------------------------------------
def _write_json(path: str, value: dict) -> None:
    """The file is either the old one or the whole new one."""
    atomic_write_text(path, json.dumps(value, indent=1))


def save_checkpoint(engines, trainer_state: dict, output_dir: str, keep: int) -> str:
    """Write a complete checkpoint of ``trainer_state["iteration"]`` and point ``latest`` at it. All ranks call it.

    ``trainer_state`` is the trainer's JSON-able state (see ``PPOTrainer.state_dict``). Keeps the newest
    ``keep`` complete checkpoints. An error while writing (e.g. a full disk) propagates: the partly written
    ``.tmp`` directory is never renamed, so ``latest`` still names the previous, intact checkpoint.
    """
    root = checkpoints_root(output_dir)
    final = os.path.join(root, checkpoint_name(trainer_state["iteration"]))
    try:
        return _save(engines, trainer_state, root, final, keep)
    except (OSError, RuntimeError) as err:  # e.g. ENOSPC (torch.save reports it as a RuntimeError): the .tmp
        # directory is never renamed, latest is untouched
        raise CheckpointError(f"saving checkpoint {final} failed: {' '.join(str(err).split())}; "
                              f"{os.path.join(root, LATEST)} still names "
                              "the last complete checkpoint: free space and resume with --resume auto") from err


def _save(engines, trainer_state: dict, root: str, final: str, keep: int) -> str:
    tmp = final + ".tmp"
    if is_main_process():
        os.makedirs(root, exist_ok=True)
        for stale in (n for n in os.listdir(root) if n.endswith(".tmp")):  # left by a killed save
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    barrier()
    for role, engine in engines.trained.items():
        engine.save_checkpoint(os.path.join(tmp, role), tag=TAG, save_latest=False)
    torch.save(rng_state(), _rng_file(tmp, get_rank()))
    if is_main_process():
        for meta, model in (("policy_meta", engines.actor.module),
                            ("critic_meta", engines.critic.module.backbone if engines.critic else None)):
            if model is None:
                continue
            model.config.save_pretrained(os.path.join(tmp, meta))
            if has_adapters(model):
                adapter_config(model).save_pretrained(os.path.join(tmp, meta))
        engines.policy_tokenizer.save_pretrained(os.path.join(tmp, "policy_meta"))
        _write_json(os.path.join(tmp, STATE_FILE), {**trainer_state, "world_size": get_world_size()})
    barrier()  # every file but the manifest is on disk: each rank hashes its share of them
    described = all_gather_objects(describe_files(tmp, part=(get_rank(), get_world_size())))
    if is_main_process():
        _write_json(os.path.join(tmp, MANIFEST_FILE), dict(sorted(kv for part in described for kv in part.items())))
        if os.path.exists(final):  # the same iteration saved again (e.g. a signal right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_text(os.path.join(root, LATEST), os.path.basename(final))
        _prune(root, keep, final)
    barrier()
    return final


def _prune(root: str, keep: int, just_saved: str) -> None:
    """Keep ``keep`` complete checkpoints: the one just saved and the newest others. The one just saved is never
    deleted, also when newer-numbered ones exist (a run resumed from an older checkpoint)."""
    others = [path for path in complete_checkpoints(os.path.dirname(root)) if path != just_saved]
    for old in others[:max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


# --- finding and checking ----------------------------------------------------------------------------------
def verify_checkpoint(path: str) -> dict:
    """Check every file the manifest lists (present, its size, its sha256) and that the trainer state belongs
    to this directory; return the trainer state. Under a process group every rank must call it: each hashes its
    share of the files and all raise the same error.

    Raises CheckpointError naming the first missing, truncated, corrupted or edited file (e.g. a lost rank shard,
    one flipped byte in a weight shard, a hand-edited trainer_state.json).
    """
    if not os.path.isdir(path):
        kind = "is a file, not a checkpoint directory" if os.path.isfile(path) else "does not exist"
        raise CheckpointError(f"checkpoint {path} {kind}: pass a directory like "
                              f"OUTPUT_DIR/{CHECKPOINTS}/iter_0000020, or --resume auto")
    manifest_file = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_file):
        raise CheckpointError(f"{manifest_file} is missing: {path} is not a complete rlhf-ds checkpoint "
                              "(a save that did not finish); resume from an older one")
    try:
        with open(manifest_file) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({err}); resume from an older one") from err
    problem = next(filter(None, all_gather_objects(first_problem(path, manifest,
                                                                 part=(get_rank(), get_world_size())))), None)
    if problem is not None:
        raise CheckpointError(f"checkpoint file {problem}: checkpoint {path} cannot be trusted; restore the file "
                              "or resume from an older checkpoint")
    try:
        with open(os.path.join(path, STATE_FILE)) as fh:
            state = json.load(fh)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({err}); resume from an older one") from err
    match = _NAME.match(os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != state.get("iteration"):
        raise CheckpointError(f"{os.path.join(path, STATE_FILE)} says iteration {state.get('iteration')} but the "
                              f"directory is {os.path.basename(os.path.normpath(path))}: it does not belong here")
    return state


def find_checkpoint(resume: str, output_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` names: 'auto' -> the one ``latest`` names in output_dir (None when the run has
    never saved: a fresh start); a path -> that checkpoint, or a run/checkpoints directory's latest."""
    if resume == "auto":
        root = checkpoints_root(output_dir)
        if not os.path.exists(os.path.join(root, LATEST)):
            if complete_checkpoints(output_dir):
                raise CheckpointError(f"{os.path.join(root, LATEST)} is missing although {root} holds checkpoints: "
                                      "pass one with --resume PATH")
            return None
        return _read_latest(root)
    if not os.path.exists(resume):
        raise CheckpointError(f"checkpoint path {resume} does not exist: pass a checkpoint directory "
                              f"(OUTPUT_DIR/{CHECKPOINTS}/iter_N), a run directory, or (for --resume) auto")
    for root in (resume, checkpoints_root(resume)):
        if os.path.isfile(os.path.join(root, LATEST)):
            return _read_latest(root)
    return resume


def _read_latest(root: str) -> str:
    with open(os.path.join(root, LATEST)) as fh:
        name = fh.read().strip()
    path = os.path.join(root, name)
    if not _NAME.match(name) or not os.path.isdir(path):
        raise CheckpointError(f"{os.path.join(root, LATEST)} names {name!r}, which does not exist: "
                              "pass an existing checkpoint with --resume PATH")
    return path


def check_resume_config(state: dict, config: PPOConfig, world_size: int) -> list[str]:
    """Refuse (ConfigError) a resume whose config or world size differs in a way that breaks exactness, unless
    ``config.force_resume``; returns the differences (empty when exact)."""
    # a field the checkpoint's version did not have yet ran at its default value
    saved = {**dataclasses.asdict(PPOConfig().validate()), **state["config"]}
    current = dataclasses.asdict(config)
    changed = [f"{k}={saved.get(k)!r}->{current[k]!r}" for k in current
               if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if state["world_size"] != world_size:
        changed.append(f"world_size={state['world_size']}->{world_size}")
    if changed and not config.force_resume:
        raise ConfigError(f"resume: this run changes {', '.join(changed)} against the checkpoint, which breaks "
                          "exact resumption; use the checkpoint's values or pass --force_resume true")
    return changed


# --- loading -----------------------------------------------------------------------------------------------
def load_checkpoint(engines, path: str, verified_state: Optional[dict] = None) -> dict:
    """Restore the trained engines and this rank's RNG from a checkpoint; returns the trainer state.

    ``verified_state``: what ``verify_checkpoint(path)`` returned, when the caller has already checked the
    files (launch/train.py does, before any model loads); None verifies them here.
    """
    state = verified_state if verified_state is not None else verify_checkpoint(path)
    for role, engine in engines.trained.items():
        try:
            loaded, _ = engine.load_checkpoint(os.path.join(path, role), tag=TAG,
                                                               load_optimizer_states=True,
                                                               load_lr_scheduler_states=True)
        except Exception as err:  # DeepSpeed raises many kinds; the user needs the checkpoint and the cause
            raise CheckpointError(f"loading {os.path.join(path, role)} failed: {type(err).__name__}: {err}") from err
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no {role} checkpoint in {os.path.join(path, role)}")
    rng_file = _rng_file(path, get_rank())
    if os.path.isfile(rng_file):  # absent only for a forced resume on more ranks
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


# --- Hugging Face exports ----------------------------------------------------------------------------------
EXPORT_MARKER = "rlhf_ds_export.json"  # written into every export: an earlier export may be replaced


def _contains(outer: str, inner: str) -> bool:
    """True when real path ``inner`` is ``outer`` or lies inside it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_export_target(out_dir: str, checkpoint: str, overwrite: bool = False) -> None:
    """Refuse an export target that would destroy something, before anything is written: the checkpoint being
    read, its run directory (OUTPUT_DIR of OUTPUT_DIR/checkpoints/iter_N) or a directory holding either; a file;
    a non-empty directory that is not an earlier export (its files would be deleted), unless ``overwrite``."""
    out, source = os.path.realpath(out_dir), os.path.realpath(checkpoint)
    protected = [(source, "the checkpoint being exported")]
    if os.path.basename(os.path.dirname(source)) == CHECKPOINTS:
        protected.append((os.path.dirname(os.path.dirname(source)), "the run directory of the checkpoint"))
    for path, what in protected:
        if _contains(path, out) or _contains(out, path):
            raise CheckpointError(f"export target {out_dir} would overwrite {what} ({path}): choose a directory "
                                  "outside it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"export target {out_dir} is a file: choose a directory")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, EXPORT_MARKER)) \
            and not overwrite:
        raise CheckpointError(f"export target {out_dir} is not empty and is not an earlier rlhf-ds export: its "
                              "files would be deleted; choose a new directory or pass --overwrite")


def _mark_export(directory: str, source: str) -> None:
    with open(os.path.join(directory, EXPORT_MARKER), "w") as fh:
        json.dump({"exported_from": source}, fh)
        fh.write("\n")
def _save_causal_lm(model, state: dict, tokenizer, out_dir: str, source: str) -> None:
    """``save_pretrained`` (safetensors) + tokenizer into ``out_dir`` atomically, with the KV cache turned on,
    marked as an export of ``source``."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    training_cache, model.config.use_cache = model.config.use_cache, True  # off only for training forwards
    try:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    finally:
        model.config.use_cache = training_cache
    tokenizer.save_pretrained(tmp)
    _mark_export(tmp, source)
    replace_dir(tmp, out_dir)


def export_model(engine, tokenizer, out_dir: str) -> None:
    """Save ``engine``'s model (an HF ``PreTrainedModel``, LoRA adapters merged into it) and ``tokenizer`` to
    ``out_dir``. All ranks call it."""
    module = engine.module
    params = list(module.parameters())
    gathered = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                if engine.zero_optimization_partition_weights() else contextlib.nullcontext())
    with gathered:  # every rank takes part: under ZeRO-3 reading the full weights is a collective
        state = {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
    if is_main_process():
        model = module
        if has_adapters(module):
            base = base_model(module)
            with torch.device("meta"):  # the class itself: from_config would partition under ZeRO-3 (a collective)
                skeleton = type(base)(copy.deepcopy(base.config))
            model = merge(filled(on_meta(skeleton, adapter_config(module)), state))
            state = model.state_dict()
        _save_causal_lm(model, state, tokenizer, out_dir, source="the training run")
    barrier()


def consolidated_state_dict(path: str, role: str) -> dict:
    """The full fp32 state dict of ``role`` ('actor' or 'critic') in checkpoint ``path``, any ZeRO stage.

    DeepSpeed consolidates the trained parameters from their fp32 master copies but returns frozen ones (a LoRA
    model's base weights) in the dtype they trained in: those are cast here, so that merging adapters into them
    happens in fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    role_dir = os.path.join(path, role)
    if any(name.startswith("zero_pp_rank_") for name in os.listdir(os.path.join(role_dir, TAG))):
        state = get_fp32_state_dict_from_zero_checkpoint(role_dir, tag=TAG)
        return {name: tensor.float() for name, tensor in state.items()}
    # ZeRO-0 keeps the whole module in the model-states file.
    states = torch.load(os.path.join(role_dir, TAG, "mp_rank_00_model_states.pt"), weights_only=True,
                        map_location="cpu")
    return {name: tensor.float() for name, tensor in states["module"].items()}


def export_checkpoint(path: str, out_dir: str, critic_out: Optional[str] = None, overwrite: bool = False,
                      adapter_out: Optional[str] = None) -> str:
    """Write checkpoint ``path``'s actor (fp32 master weights, LoRA adapters merged) as an HF directory at
    ``out_dir``; when ``critic_out`` is given, the critic (backbone + ``value_head.safetensors``) there; when
    ``adapter_out`` is given, a LoRA actor's adapter alone there, in peft's format (with the tokenizer). Single
    process, no DeepSpeed engines; returns ``out_dir``. The checkpoint is verified (sizes and sha256) and the
    targets checked (``check_export_target``) before anything is written."""
    from transformers import AutoModel, AutoModelForCausalLM

    from rlhf_ds.models import CriticModel, load_saved_tokenizer, save_critic

    verify_checkpoint(path)
    meta = os.path.join(path, "policy_meta")
    if critic_out is not None and not os.path.isdir(os.path.join(path, "critic")):
        raise CheckpointError(f"checkpoint {path} has no critic (its advantage estimator trains none): export "
                              "the policy alone, without --critic")
    if adapter_out is not None and saved_adapters(meta) is None:
        raise CheckpointError(f"checkpoint {path} trained no LoRA adapters (lora_rank 0): export the whole model, "
                              "without --adapter")
    for target in filter(None, (out_dir, critic_out, adapter_out)):
        check_export_target(target, path, overwrite)
    tokenizer = load_saved_tokenizer(meta, trust_remote_code=False)
    model = _skeleton(AutoModelForCausalLM, meta)
    state = consolidated_state_dict(path, "actor")
    _check_full_state(model, state, path)
    if has_adapters(model):
        filled(model, state)
        if adapter_out is not None:
            _save_adapter(model, tokenizer, adapter_out, source=path)
        model = merge(model)
        state = model.state_dict()
    _save_causal_lm(model, state, tokenizer, out_dir, source=path)
    if critic_out is not None:
        with torch.device("meta"):
            critic = CriticModel(_skeleton(AutoModel, os.path.join(path, "critic_meta")))
        critic_state = consolidated_state_dict(path, "critic")
        _check_full_state(critic, critic_state, path)
        if has_adapters(critic.backbone):
            critic = merge(filled(critic, critic_state))
            critic_state = critic.state_dict()
        tmp = critic_out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_critic(critic, tmp, critic_state)
        _mark_export(tmp, path)
        replace_dir(tmp, critic_out)
    return out_dir


def _skeleton(auto_class, meta_dir: str) -> torch.nn.Module:
    """The model saved in ``meta_dir`` (a checkpoint's policy_meta or critic_meta) on the meta device: structure and
    config only, the weights written being the checkpoint's own; wrapped with its LoRA adapters when it had any."""
    from transformers import AutoConfig

    with torch.device("meta"):
        model = auto_class.from_config(AutoConfig.from_pretrained(meta_dir), dtype=torch.float32)
    adapters = saved_adapters(meta_dir)
    return model if adapters is None else on_meta(model, adapters)


def _save_adapter(model, tokenizer, out_dir: str, source: str) -> None:
    """A peft model's adapter alone (peft's ``save_pretrained``: adapter_config.json naming the base model,
    adapter_model.safetensors) and the tokenizer, atomically, marked as an export of ``source``."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _mark_export(tmp, source)
    replace_dir(tmp, out_dir)


def _check_full_state(model: torch.nn.Module, state: dict, path: str) -> None:
    """``state`` has every tensor of ``model`` (a meta-device model: names and shapes) at its shape; only tied
    weights (Qwen2's lm_head = embeddings) may be absent."""
    expected = model.state_dict()
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        raise CheckpointError(f"checkpoint {path} does not match its saved model config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, other shape {reshaped[:3]})")
