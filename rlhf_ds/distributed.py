"""Rank helpers and token-weighted statistics over all data-parallel ranks.

Every rank holds a different number of valid response tokens, so a statistic averaged per rank and then
across ranks would weight a token on a short-response rank more than one on a long-response rank. The
``global_*`` helpers all-reduce sums and counts instead, giving exactly the value a single process would
compute on the concatenated data. All helpers also work without a process group (world size 1).
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
from typing import NoReturn, Optional

import torch
import torch.distributed as dist

from rlhf_ds.ppo import whiten

# torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher sets LOCAL_SIZE: ranks sharing this machine.
_LOCAL_WORLD_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it), for a single-process rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_command(script: str, ranks: int, args: list[str]) -> list[str]:
    """``deepspeed --num_gpus ranks --no_local_rank script args`` on a free master port: how the launch/ scripts
    start ranks of another script."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
            "--master_port", str(free_port()), script, *args]


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce op.

    On the CPU accelerator ``deepspeed.init_distributed`` JIT-compiles that op (about 50 s on a fresh 2-core
    machine; concurrent builds by the ranks of a first launch made it abort at exit) and maps a 69 MB
    /dev/shm buffer per rank that it never unlinks (a killed run leaves them behind). The op serves only
    ``inference_all_reduce`` (DeepSpeed's tensor-parallel inference); every collective of this trainer goes
    through torch.distributed (gloo). DeepSpeed consults ``deepspeed.ops.__compatible_ops__`` before building
    an op: marking the op incompatible there skips both. No effect on a GPU, whose backend has no such op.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _set_rank_env_from_slurm() -> None:
    """``srun`` starts one task per rank but exports SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS, not
    RANK/LOCAL_RANK/WORLD_SIZE: map them. SLURM_STEP_NUM_TASKS is set by srun only, so a plain ``python``
    inside an sbatch script stays a single process. Each task's CPU share is its affinity mask
    (--cpus-per-task), so LOCAL_WORLD_SIZE is left unset.
    """
    if "RANK" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]


def _set_single_process_env() -> None:
    """Fill the launcher's environment for a plain ``python script.py`` run.

    Without RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT DeepSpeed falls into MPI discovery and fails.
    Defaults are only safe for one process: a multi-process run missing some of them (each process would
    pick its own port) is an error naming what is missing.
    """
    missing = [name for name in _RANK_VARS if name not in os.environ]
    if not missing:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: every rank "
                           "needs the same rendezvous; under SLURM export MASTER_ADDR=$(scontrol show hostnames "
                           "$SLURM_JOB_NODELIST | head -n 1) and a MASTER_PORT before srun")
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name in missing:
        os.environ[name] = defaults[name] if name in defaults else str(free_port())


def local_world_size() -> int:
    """Ranks on this host (the launcher's or SLURM's count; 1 outside a launcher)."""
    for name in _LOCAL_WORLD_SIZE_VARS:
        if name in os.environ:
            return int(os.environ[name])
    return 1


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers and srun restrict)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _set_torch_threads() -> None:
    """Share the machine's cores between the ranks on it unless the user chose OMP_NUM_THREADS.

    The deepspeed launcher does not set OMP_NUM_THREADS, so N ranks would each start one thread per core
    and oversubscribe the CPU N times.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, available_cpus() // local_world_size()))


def init_distributed() -> None:
    """Join the process group (gloo on DeepSpeed's CPU accelerator, nccl on CUDA); safe to call twice."""
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _set_rank_env_from_slurm()
    _set_single_process_env()
    _set_torch_threads()
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        # srun --gpus-per-task=1 shows each task only its own GPU: the local rank is then beyond the ordinals.
        accelerator.set_device(int(os.environ["LOCAL_RANK"]) % accelerator.device_count())
    _skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    """Leave cleanly at exit: destroy the process group (a gloo group left to static destructors can abort a
    finished process with "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a rank that has finished its work with exit status ``code``: leave the process group, flush, and
    ``os._exit``. The interpreter's own teardown can abort a finished rank when it destroys what the
    distributed runtime left behind ("terminate called without an active exception": seen in about one 2-rank
    ZeRO-3 launch in ten on a fresh machine, although every rank had written its results); ``os._exit`` skips
    that teardown. Only for the end of an entry point: atexit handlers do not run after it."""
    _leave_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank (every rank must call it);
    ``[value]`` without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank, the same answer everywhere (every rank must call it)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def _masked_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(sum x, sum x^2, count) over valid positions of this rank, float64, shape (3,).

    Padded entries are selected away rather than multiplied by 0 so inf/nan there cannot leak in; float64
    keeps the one-pass variance (sum of squares minus squared sum) accurate.
    """
    valid = mask.bool()
    values = torch.where(valid, x.double(), 0.0)
    return torch.stack([values.sum(), values.square().sum(), valid.sum().double()])


def global_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the valid tokens of ALL ranks, as a 0-d tensor of x's dtype.

    x, mask: (B, T) on any rank-local shape. One all-reduce of (sum, count); nan when no rank has a valid
    token. Every rank must call it (it is a collective).
    """
    sums = all_reduce_sum(_masked_sums(x, mask)[[0, 2]])
    return (sums[0] / sums[1]).to(x.dtype)


def global_masked_moments(x: torch.Tensor, mask: torch.Tensor,
                          unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, variance, count) of x over the valid tokens of ALL ranks, float64 0-d tensors and an int.

    x, mask: (B, T) or (B,). One all-reduce of (sum, sum of squares, count). The variance is unbiased (n - 1),
    or the population variance (n) with unbiased=False. Undefined moments (the variance of fewer than 2 values
    when unbiased, anything of none) are nan: the callers decide what that means. Every rank must call it.
    """
    total, total_sq, count = all_reduce_sum(_masked_sums(x, mask)).unbind()
    count_int = int(count)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    mean = total / count if count_int > 0 else nan
    if count_int < (2 if unbiased else 1):
        return mean, nan, count_int
    if unbiased:
        var = (total_sq - count * mean.square()) / (count - 1)
    else:
        var = total_sq / count - mean.square()
    return mean, var.clamp_min(0), count_int


def global_masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise x with the mean and unbiased variance of the valid tokens of ALL ranks.

    x, mask: (B, T) -> (B, T) of x's dtype: ``ppo.whiten`` with the global moments, in float64; padded positions
    are 0. With a single valid token over all ranks there is no spread to divide by: it is only centred (to 0,
    or left as is when shift_mean=False), so a rollout of one-token responses on one rank cannot crash the run.
    """
    mean, var, count = global_masked_moments(x, mask)
    return whiten(x.double(), mask, mean, var if count >= 2 else None, shift_mean).to(x.dtype)


def global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> Optional[float]:
    """The critic's debug metric over ALL ranks' valid tokens: 1 - Var(returns - values) / Var(returns).

    values, returns, mask: (B, T). 1 is a perfect critic, 0 one no better than a constant. None (the metric
    is left out) when fewer than 2 valid tokens exist over all ranks; nan/inf when the returns are constant.
    Every rank must call it (two all-reduces) and gets the same answer.
    """
    _, residual_var, count = global_masked_moments(returns - values, mask)
    _, returns_var, _ = global_masked_moments(returns, mask)
    if count < 2:
        return None
    return (1 - residual_var / returns_var).item()


def global_token_counts(masks: list[torch.Tensor]) -> list[float]:
    """Valid tokens of each mask summed over ALL ranks, in one all-reduce: the denominators of the global
    token mean (``ppo.token_mean``) of a list of mini-batches. Every rank must pass the same number of masks."""
    counts = torch.stack([mask.sum().double() for mask in masks])
    return all_reduce_sum(counts).tolist()


def _all_reduce_scalars(metrics: dict[str, float], op) -> dict[str, float]:
    """One float64 all-reduce (``op``) for the whole dict, values ordered by sorted key. Every rank must pass
    the same keys (a collective: different keys would mismatch sizes)."""
    keys = sorted(metrics)
    if get_world_size() == 1:
        return {key: float(metrics[key]) for key in keys}
    from deepspeed.accelerator import get_accelerator

    values = torch.tensor([float(metrics[key]) for key in keys], dtype=torch.float64,
                          device=get_accelerator().current_device_name())
    dist.all_reduce(values, op=op)
    return dict(zip(keys, values.tolist()))


def all_reduce_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks so every rank logs identical numbers."""
    return {key: value / get_world_size()
            for key, value in _all_reduce_scalars(metrics, dist.ReduceOp.SUM).items()}


def all_reduce_max(metrics: dict[str, float]) -> dict[str, float]:
    """The largest value over ranks of each metric (e.g. peak memory: the rank closest to running out)."""
    return _all_reduce_scalars(metrics, dist.ReduceOp.MAX)
