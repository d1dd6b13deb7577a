"""How long torch's idle CPU threads spin before they sleep: set before torch loads its OpenMP runtime.

Why: torch's OpenMP threads (GNU libgomp in the torch wheels) meet at the end of every parallel region, and a
thread that arrives first spins, by default 300,000 times, before it sleeps. On an idle machine that spin is what
makes the next region start at once. Next to another busy process it is what collapses a run: the thread that
shares a core with that process falls behind, the others spin on the cores it could move to, and iterations of the
default run (one process, two threads on two cores) took 4.5x their idle time with one busy process here, 38x at
a load average of 3.5. A spin of 1000 keeps the idle speed (within the run-to-run spread) and holds the slowest
iteration next to one busy process at 1.4-2.4x the idle median; half the cores should cost about 2x.
``OMP_WAIT_POLICY=PASSIVE`` (no spin) cost 15-50% idle and 300 cost 15-25%; 3000 missed (2.7x), 10000 did
not help (3.5x). Figures: docs/PERFORMANCE.md, section 11, "Steady on shared cores".

The thread count is left alone: it decides how torch splits its reductions, so changing it with the load would
make a run's numbers depend on what else the machine was doing (and break bitwise resume).
"""
from __future__ import annotations

import os
import sys

SPINCOUNT = "1000"


def default_spin() -> None:
    """Set ``GOMP_SPINCOUNT`` for this process and the ranks it starts, unless the user chose a wait policy or
    spin count, or torch (and with it libgomp, which reads its environment once, at load) is already loaded."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT


def thread_settings() -> dict:
    """What decides this process's CPU threads, for a run's header and ``run_info.json``: torch's thread count
    (``distributed.init_distributed`` shares the cores between a host's ranks unless ``OMP_NUM_THREADS`` is set)
    and the OpenMP variables (None where unset)."""
    import torch

    return {"torch_threads": torch.get_num_threads(),
            **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}}
