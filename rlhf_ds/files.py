"""Files that are either complete or absent, and checked before they are trusted.

Atomic writes: a file or a directory is written under a temporary name and renamed into place, so a reader (or
a crash) sees the old one or the whole new one (checkpoints, metrics.jsonl, run_info.json, exports).

Manifests: the size and sha256 of every file under a directory, written once the directory is complete (training
checkpoints, the embedded default's cache). A size catches a truncated or missing file at once; the sha256
catches what a size cannot: one flipped byte in a weight shard (``torch.load`` does not verify its zip checksums)
or a hand-edited JSON file of the same length. Hashing gigabytes takes seconds, so W processes can split it:
``part=(i, W)`` hashes only the i-th of W shares of the files (``share``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import Optional

_CHUNK = 1 << 20


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (fsynced) through a temporary name in the same directory, then rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def replace_dir(tmp: str, final: str) -> None:
    """Move the complete directory ``tmp`` to ``final``, keeping an old ``final`` until the new one is in place."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoint shards can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: str, exclude: tuple[str, ...]) -> list[str]:
    """Paths of every file under root relative to it, sorted, without the names in ``exclude``."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel not in exclude:
                found.append(rel)
    return sorted(found)


def share(root: str, names: list[str], part: tuple[int, int]) -> list[str]:
    """Share ``part[0]`` of ``part[1]`` of ``names`` (paths relative to ``root``): the files dealt round-robin,
    largest first, so that the shares hold about the same bytes and together hold every name once."""
    index, count = part
    by_size = sorted(names, key=lambda rel: (-os.path.getsize(os.path.join(root, rel)), rel))
    return sorted(by_size[index::count])


def describe_files(root: str, exclude: tuple[str, ...] = (), part: tuple[int, int] = (0, 1)) -> dict[str, dict]:
    """Relative path -> {"size": bytes, "sha256": hex} of every file under ``root`` but ``exclude``, or of the
    share ``part`` of them (the union of all W parts is the whole)."""
    return {rel: {"size": os.path.getsize(os.path.join(root, rel)), "sha256": sha256_file(os.path.join(root, rel))}
            for rel in share(root, _files(root, exclude), part)}


def file_digests(root: str, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> hex sha256 of every file under ``root`` but ``exclude``."""
    return {rel: sha256_file(os.path.join(root, rel)) for rel in _files(root, exclude)}


def first_problem(root: str, expected: dict, part: tuple[int, int] = (0, 1)) -> Optional[str]:
    """None when every file ``expected`` lists is under ``root`` as recorded, else one line naming the first
    that is not. Entries are {"size", "sha256"} dicts, a bare sha256 string, or a bare size (older manifests).
    All sizes are checked before any file is hashed, so a lost or truncated file is reported as such, fast.
    With ``part`` only that share of the files is hashed (every size is still checked)."""
    for rel, entry in expected.items():
        full = os.path.join(root, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = entry if isinstance(entry, int) else entry.get("size") if isinstance(entry, dict) else None
        if size is not None and os.path.getsize(full) != size:
            return f"{full} has {os.path.getsize(full)} bytes, expected {size} (truncated or corrupt)"
    for rel in share(root, list(expected), part):
        entry = expected[rel]
        digest = entry if isinstance(entry, str) else entry.get("sha256") if isinstance(entry, dict) else None
        if digest is not None and sha256_file(os.path.join(root, rel)) != digest:
            return f"{os.path.join(root, rel)} does not match its sha256 (corrupt or edited)"
    return None
