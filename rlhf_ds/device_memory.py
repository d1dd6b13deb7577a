"""Device memory as measured: how much is free now (for the ZeRO-3 generation gather), how much a device has and
the process holds (for the memory planner, ``rlhf_ds/memory.py``), and the peak of one phase (for the trainer's
per-phase metrics and the benchmark).

GPU: torch's caching allocator (``max_memory_allocated``, reset per phase). CPU: the process's resident set;
its high-water mark (``VmHWM``) is reset per phase through ``/proc/self/clear_refs`` on Linux, which resets
what the kernel reports as the process's peak (``VmHWM``, ``ru_maxrss``) for every other reader too. Where that
file is missing (macOS) the CPU peak is ``ru_maxrss``, the peak since the process started: per-phase figures
there are cumulative.
"""
from __future__ import annotations

import os
import re
import resource

import torch
from deepspeed.accelerator import get_accelerator

from rlhf_ds.distributed import local_world_size

_STATUS, _CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"
_RESET_HIGH_WATER_MARK = "5"  # proc(5): writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS


def free_bytes(device: torch.device) -> int:
    """Bytes this rank can still allocate. GPU: the driver's free memory plus what torch's caching allocator
    holds unused. CPU: the host's available memory split between the ranks on it (they allocate at once)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return get_accelerator().available_memory() // local_world_size()
    return get_accelerator().available_memory(device.index)


def capacity_bytes(device: torch.device) -> int:
    """Bytes one rank may plan to use: a GPU's total memory; on a CPU, the host's available memory split between
    the ranks on it (``free_bytes``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return free_bytes(device)


def resident_bytes() -> int:
    """The process's resident set now (``VmRSS``), what the process itself holds before any model loads; where
    ``/proc`` is missing, its peak so far (``ru_maxrss``)."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", _read(_STATUS), re.MULTILINE) if os.path.exists(_STATUS) else None
    return int(match.group(1)) * 1024 if match else int(_max_rss_mb() * 2**20)


def reset_peak(device: torch.device) -> None:
    """Start a new peak: the next ``peak_mb`` covers only what happens from here on."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists(_CLEAR_REFS):
        with open(_CLEAR_REFS, "w") as fh:
            fh.write(_RESET_HIGH_WATER_MARK)


def peak_mb(device: torch.device) -> float:
    """Peak memory since the last ``reset_peak`` (process start if none), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    match = re.search(r"^VmHWM:\s+(\d+) kB", _read(_STATUS), re.MULTILINE) if os.path.exists(_STATUS) else None
    return int(match.group(1)) / 1024 if match else _max_rss_mb()


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _max_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024
