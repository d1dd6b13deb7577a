"""Models rlhf-ds builds itself (the embedded default, the stand-ins of the real models), built once and cached.

A build happens in a temporary directory beside its final place and appears there with one rename only when
complete; its ``manifest.json`` holds the sha256 of every file, so a partial or corrupted cache is detected,
reported and rebuilt. Concurrent callers (several ranks, several test processes) serialise on a lock file, so
one builds and the others then find the finished cache.

The caches live under ``$RLHF_DS_CACHE`` (default ``~/.cache/rlhf_ds``), one directory per recipe hash.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from rlhf_ds.distributed import available_cpus
from rlhf_ds.errors import KnownError
from rlhf_ds.files import file_digests, first_problem

MANIFEST = "manifest.json"


def recipe_digest(recipe) -> str:
    """The name of a recipe's cache directory: 12 hex digits of the sha256 of its fields (a dataclass) as sorted
    JSON, so that any change to what determines the bytes gives another directory."""
    text = json.dumps(dataclasses.asdict(recipe), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class BuiltModels:
    """A complete build of a policy and a reward model under ``root``: each directory loads with the usual
    ``from_pretrained``; ``manifest`` is its manifest.json (what ``cached_build`` returned)."""

    root: Path
    manifest: dict

    @property
    def policy(self) -> str:
        return str(self.root / "policy")

    @property
    def reward(self) -> str:
        return str(self.root / "reward")


class CacheError(KnownError, RuntimeError):
    """The cache location cannot be used; the message names the path and the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_DS_CACHE", Path.home() / ".cache" / "rlhf_ds")).expanduser()


def verify(root: Path) -> str | None:
    """None when ``root`` is a complete build, else one line saying what is wrong with it."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return f"{manifest} is unreadable"
    return first_problem(str(root), expected)


@contextlib.contextmanager
def _every_core():
    """Torch threads on every core this process may use, for the length of a build.

    A rank's share of the cores (``distributed._set_torch_threads``: 1 of 2 with 2 ranks) would leave the rest
    idle: the other ranks that started with it wait on the build's lock, blocked in the kernel. OMP_NUM_THREADS,
    when set, is the user's choice and stays.
    """
    previous = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(available_cpus())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cached_build(final: Path, make: Callable[[Path], dict], what: str, force: bool = False) -> dict:
    """The manifest of the complete build at ``final``, made first when there is none (or ``force``).

    ``make(tmp)`` writes the build's files into the empty directory ``tmp`` and returns facts about it (recipe,
    quality figures, timings) for the manifest, to which the sha256 of every file and the torch version are
    added. ``what`` names the build in messages ("the embedded default").
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.parent / f".{final.name}.lock", "w")
    except OSError as err:
        raise CacheError(f"cannot write the cache of {what} at {final.parent} ({err.strerror}): set RLHF_DS_CACHE "
                         "to a writable directory") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            problem = verify(final)
            if problem is None and not force:
                return json.loads((final / MANIFEST).read_text())
            if problem is not None:
                warnings.warn(f"cache of {what} at {final} is broken ({problem}); rebuilding it")
            shutil.rmtree(final)
        print(f"[rlhf_ds] building {what} into {final}", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            with _every_core():
                facts = make(tmp)
            manifest = {**facts, "files": file_digests(str(tmp)), "torch": torch.__version__}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
