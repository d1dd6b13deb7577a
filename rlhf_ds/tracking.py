"""What rank 0 does with each iteration's metrics: metrics.jsonl, TensorBoard, W&B, the console.

One metrics writer (``RunLogger``) so that every sink sees the same dict. ``metrics.jsonl`` is the record a
run is judged by: a line is flushed as soon as it is logged, and a resumed run first drops the lines at or
after the iteration it resumes from, so its file equals the one a run without interruption would have
written. TensorBoard and W&B are views of the same numbers; the console gets a tqdm bar on a terminal and
plain lines (``format_metrics``) in log files, where a bar's carriage returns would be noise.
``write_run_info`` records what produced a run (versions, git revision, command line) next to it.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import IO, Optional

from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.files import atomic_write_text
from rlhf_ds.openmp import thread_settings

# Distributions whose versions decide a run's numbers (rlhf_ds is listed under its distribution name).
TRACKED_PACKAGES = {"deepspeed": "deepspeed", "transformers": "transformers",
                    "datasets": "datasets", "accelerate": "accelerate", "safetensors": "safetensors",
                    "tokenizers": "tokenizers", "rlhf_ds": "rlhf-ds"}
WANDB_MISSING = "wandb=true but the wandb package is not installed: pip install wandb, or set --wandb false"
TENSORBOARD_MISSING = ("tensorboard=true but the tensorboard package is not installed: pip install tensorboard, "
                       "or set --tensorboard false")


def format_metrics(metrics: dict) -> str:
    """One console line per iteration: the numbers a user watches."""
    if "skip_reason" in metrics:
        return f"iter {metrics['iteration']:4d} skipped ({metrics['skip_reason']}), total {metrics['skipped_batches']}"
    value = f"  value {metrics['value_loss']:.4f}" if "value_loss" in metrics else ""  # absent without a critic
    return (f"iter {metrics['iteration']:4d}  score {metrics['score_mean']:+.3f}  reward {metrics['reward_mean']:+.3f}"
            f"  kl {metrics['kl_divergence']:.4f}  kl_coef {metrics['kl_coef']:.4f}"
            f"  policy {metrics['policy_loss']:+.4f}{value}"
            f"  entropy {metrics['entropy']:.3f}  len {metrics['response_length']:.1f}"
            f"  {metrics['tokens_per_s']:.0f} tok/s")


def scalar_tag(name: str) -> str:
    """TensorBoard/W&B tag of a metric: reward/ (scores), time/ (throughput), memory/ (peaks), ppo/ (the rest)."""
    if name.startswith(("score_", "reward_")):
        return f"reward/{name}"
    if name.startswith("time_") or name == "tokens_per_s":
        return f"time/{name}"
    if name.startswith("peak_memory_"):
        return f"memory/{name}"
    return f"ppo/{name}"


def scalars(metrics: dict) -> dict[str, float]:
    """The numeric metrics under their tags (``iteration`` is the step, ``skip_reason`` is text)."""
    return {scalar_tag(k): v for k, v in metrics.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _lines_before(path: str, start_iteration: int) -> list[str]:
    """The complete JSON lines of ``path`` whose iteration precedes ``start_iteration`` (a torn line is dropped)."""
    if not os.path.isfile(path):
        return []
    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("iteration"), int) \
                    and record["iteration"] < start_iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class RunLogger:
    """Logs each iteration's metrics dict to every sink the config asks for; a no-op unless ``enabled``.

    ``start_iteration`` > 0 marks a resumed run: metrics.jsonl keeps only the lines before it and TensorBoard
    purges its later events. ``stream`` is where progress goes (default ``sys.stdout``); whether it is a
    terminal decides between a tqdm bar and plain lines every ``log_interval`` iterations.
    """

    def __init__(self, config: PPOConfig, start_iteration: int = 0, enabled: bool = True,
                 stream: Optional[IO[str]] = None):
        self.config = config
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
        self.bar = self.writer = self.wandb_run = self._file = None
        if not enabled:
            return
        check_trackers(config)  # fail before anything is written
        wandb = _import_wandb() if config.wandb else None
        os.makedirs(config.output_dir, exist_ok=True)
        kept = _lines_before(self.metrics_path, start_iteration) if start_iteration > 0 else []
        atomic_write_text(self.metrics_path, "".join(kept))
        self._file = open(self.metrics_path, "a")
        if config.tensorboard:
            self.writer = _summary_writer(os.path.join(config.output_dir, "tensorboard"), start_iteration or None)
            config_json = json.dumps(config.to_dict(), indent=2)
            # Four-space indent: TensorBoard renders the text as markdown, this keeps it a code block.
            self.writer.add_text("config", "\n".join("    " + line for line in config_json.splitlines()),
                                 global_step=start_iteration)
        if wandb is not None:
            self.wandb_run = _start_wandb(wandb, config, start_iteration)
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=config.iterations, initial=start_iteration, file=self.stream, desc="ppo",
                            unit="it", dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        """Record one iteration (a completed or a skipped one) in every sink."""
        if not self.enabled:
            return
        iteration = metrics["iteration"]
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        numbers = scalars(metrics)
        if self.writer is not None:
            for tag, value in numbers.items():
                self.writer.add_scalar(tag, value, global_step=iteration)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=iteration)
        self._progress(metrics)

    def _progress(self, metrics: dict) -> None:
        iteration = metrics["iteration"]
        if self.bar is None:
            if iteration % self.config.log_interval == 0 or iteration == self.config.iterations - 1:
                print(format_metrics(metrics), file=self.stream, flush=True)
            return
        if "skip_reason" in metrics:
            self.bar.write(format_metrics(metrics), file=self.stream)
        else:
            # A dict argument keeps this order (keyword arguments would be sorted by name).
            self.bar.set_postfix({"score": f"{metrics['score_mean']:+.3f}",
                                  "reward": f"{metrics['reward_mean']:+.3f}",
                                  "kl": f"{metrics['kl_divergence']:.4f}", "kl_coef": f"{metrics['kl_coef']:.4f}"},
                                 refresh=False)
        self.bar.update(iteration + 1 - self.bar.n)

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self._file is not None:
            self._file.close()
        self.bar = self.writer = self.wandb_run = self._file = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What a run writes into its output_dir; a fresh run there would truncate, prune or mix with them.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "policy", "config.json", "run_info.json", "wandb_run_id")


def _previous_run(output_dir: str) -> list[str]:
    """The outputs of an earlier run in ``output_dir`` that a fresh run would destroy: any checkpoint, a non-empty
    metrics.jsonl."""
    found = []
    checkpoints = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(checkpoints) and any(name.startswith("iter_") or name == "latest"
                                          for name in os.listdir(checkpoints)):
        found.append("checkpoints/")
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append("metrics.jsonl")
    return found


def check_output_dir(config: PPOConfig) -> None:
    """Before anything loads: ``output_dir`` must be a directory this process can write, and must not hold another
    run unless this run continues it (``resume``) or was told to replace it (``overwrite_output_dir``).
    Raises ConfigError with one line naming the directory and the fix. Reads only (every rank may call it)."""
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir={out!r} is a file: choose a directory (e.g. --output_dir runs/ppo)")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the nearest existing ancestor is where the directory would be made
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"output_dir={out!r} cannot be made: {existing} is a file; choose another --output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={out!r} is not writable ({existing} is read-only for this user): choose "
                          "another --output_dir")
    previous = _previous_run(out) if os.path.isdir(out) else []
    if previous and not config.resume and not config.overwrite_output_dir:
        raise ConfigError(f"output_dir={out!r} already holds a run ({', '.join(previous)}): continue it with "
                          "--resume auto, replace it with --overwrite_output_dir true, or choose another --output_dir")


def clear_previous_run(output_dir: str) -> list[str]:
    """Delete an earlier run's outputs (``RUN_OUTPUTS``) from ``output_dir`` for ``overwrite_output_dir``; other
    files are left alone. Returns what was deleted. Call on one rank, before anything of this run is written."""
    removed = []
    for name in RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def check_trackers(config: PPOConfig) -> None:
    """Raise the one-line ConfigError of a requested but missing tracker (TensorBoard, W&B).

    Only rank 0 builds an enabled RunLogger; every rank calling this before models load makes a missing
    package stop all ranks together instead of leaving the others waiting in a collective.
    """
    if config.tensorboard:
        _summary_writer_class()
    if config.wandb:
        _import_wandb()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(TENSORBOARD_MISSING) from None
    return SummaryWriter


def _summary_writer(log_dir: str, purge_step: Optional[int]):
    return _summary_writer_class()(log_dir=log_dir, purge_step=purge_step)


def _import_wandb():
    """wandb is optional: imported only when asked for, and its absence is a one-line ConfigError."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(WANDB_MISSING) from None
    return wandb


def _start_wandb(wandb, config: PPOConfig, start_iteration: int):
    """A W&B run; a resumed rlhf-ds run continues the W&B run whose id was saved in output_dir."""
    id_path = os.path.join(config.output_dir, "wandb_run_id")
    run_id = None
    if start_iteration > 0 and os.path.isfile(id_path):
        with open(id_path) as fh:
            run_id = fh.read().strip() or None
    run = wandb.init(project=config.wandb_project, config=config.to_dict(), dir=config.output_dir,
                     id=run_id, resume="allow" if run_id else None)
    atomic_write_text(id_path, run.id + "\n")
    return run


def git_revision(directory: str) -> tuple[Optional[str], Optional[bool]]:
    """(HEAD commit, dirty?) of the git checkout that tracks ``directory``; (None, None) if there is none.

    "Tracks" matters: a package installed into a virtualenv that sits inside some other repository must not
    report that repository's revision. A missing git, a non-repository or any git error gives (None, None).
    """
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    if revision is None or git("ls-files", "--error-unmatch", ".") is None:
        return None, None
    status = git("status", "--porcelain")
    return revision.strip(), (None if status is None else bool(status.strip()))


def package_versions() -> dict[str, Optional[str]]:
    """Python's, torch's and the tracked distributions' versions (None for one that is not installed). torch's is
    the running build's own string, not its distribution's: the CUDA wheel on PyPI says ``2.13.0`` in its metadata
    but ``2.13.0+cu130`` in ``torch.__version__``, and which build ran (CPU, which CUDA) is what a run record
    needs."""
    import torch

    versions: dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__}
    for key, distribution in TRACKED_PACKAGES.items():
        try:
            versions[key] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def write_run_info(config: PPOConfig, world_size: int, memory_plan: dict | None = None) -> str:
    """Write ``output_dir/run_info.json`` (what produced this run, the memory it was predicted to need:
    ``memory.MemoryPlan.summary``, and rank 0's CPU thread settings: ``openmp.thread_settings``) atomically;
    returns its path."""
    revision, dirty = git_revision(os.path.dirname(os.path.abspath(__file__)))
    info = {
        "versions": package_versions(),
        "git_revision": revision,
        "git_dirty": dirty,
        "argv": list(sys.argv),
        "world_size": world_size,
        "hostname": socket.gethostname(),
        "start_time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "memory_plan": memory_plan,
        "cpu_threads": thread_settings(),
    }
    os.makedirs(config.output_dir, exist_ok=True)
    path = os.path.join(config.output_dir, "run_info.json")
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")
    return path
