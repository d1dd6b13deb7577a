"""Run a script as 1 or N processes forked from a server that imported torch, transformers and DeepSpeed once.

Why: on this 2-core machine a launch through the deepspeed launcher spends ~12 s before a rank runs a line of
its script (the runner and launch.py import torch and DeepSpeed one after the other, then every rank imports
transformers, DeepSpeed and the trainer), and a plain ``python launch/train.py`` ~7 s. Most tests run small
jobs, so those starts were most of the suite's time. multiprocessing's forkserver imports the modules once per
test session and forks every process from there, as ``torch.multiprocessing`` does with the fork start method.
Each process is still its own: the caller's environment (plus, for N ranks, the launcher's RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT), the script run as ``__main__`` with its directory first on
``sys.path``, gloo between the ranks, its own exit status. As under the launcher, a failing rank stops the
others. The real entry points keep their own tests: test_learning.py runs ``python launch/train.py``,
test_slurm.py the deepspeed launcher and srun, launch/bench.py and launch/rehearse.py start their ranks with
the launcher. What a fork cannot give: each rank its own string-hash seed (PYTHONHASHSEED), so an order that
differs between real ranks is the same here; the launcher's tests above keep that case.
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from rlhf_ds.distributed import free_port

# What the scripts import before their first line; the server imports them once.
PRELOAD = ["torch", "transformers", "deepspeed", "rlhf_ds.trainer", "rlhf_ds.evaluation", "rlhf_ds.checkpoint"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def _run_script(script: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """One process: ``python script args`` with ``env`` in ``cwd``, stdout and stderr to the files named."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), fd)
    os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # OpenMP read the server's environment when it loaded; a new process reads this
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  a crash is the process's output and exit status, as for python script
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Job:
    """The processes of one run: ``wait`` for them (a failing one stops the rest), or ``kill`` them all."""

    def __init__(self, args: list[str], processes: list, logs: Path, port: str | None):
        self.args, self.processes, self.logs, self.port = args, processes, logs, port

    def _status(self) -> int | None:
        codes = [p.exitcode for p in self.processes]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            return failed[0]
        return None if None in codes else 0

    def poll(self) -> int | None:
        """The exit status once every process ended (the first failure's, as the launcher reports), else None."""
        if self._status() not in (None, 0):
            self.kill()
        return self._status() if all(p.exitcode is not None for p in self.processes) else None

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired(self.args, timeout, self.stdout(), self.stderr())
            time.sleep(0.05)
        done = subprocess.CompletedProcess(self.args, self._status(), self.stdout(), self.stderr())
        shutil.rmtree(self.logs, ignore_errors=True)
        return done

    def kill(self) -> None:
        """SIGKILL to every process still running (``kill -9`` of the whole job)."""
        for process in self.processes:
            if process.exitcode is None:
                process.kill()
        for process in self.processes:
            process.join()

    def stdout(self) -> str:
        return self._read("stdout")

    def stderr(self) -> str:
        return self._read("stderr")

    def _read(self, name: str) -> str:
        path = self.logs / name
        return path.read_text(errors="replace") if path.exists() else ""


def start(script: Path | str, args: list[str], ranks: int = 1, env: dict[str, str] | None = None,
          cwd: Path | str | None = None) -> Job:
    """Start ``script`` as one plain process (ranks=1: no launcher variables, as ``python script``) or as
    ``ranks`` ranks with the launcher's variables and a fresh MASTER_PORT."""
    base = dict(os.environ if env is None else env)
    logs = Path(tempfile.mkdtemp(prefix="forked-"))
    port = str(free_port()) if ranks > 1 else None
    processes = []
    for rank in range(ranks):
        rank_env = base if ranks == 1 else {
            **base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
            "LOCAL_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        process = _CONTEXT.Process(target=_run_script, args=(
            str(script), [str(a) for a in args], rank_env, str(cwd or os.getcwd()), str(logs / "stdout"),
            str(logs / "stderr")))
        process.start()
        processes.append(process)
    return Job([str(script), *map(str, args)], processes, logs, port)


def run(script: Path | str, args: list[str], ranks: int = 1, env: dict[str, str] | None = None,
        cwd: Path | str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``start`` and ``wait``: like ``subprocess.run([python, script, *args], capture_output=True, text=True)``."""
    return start(script, args, ranks, env, cwd).wait(timeout)
