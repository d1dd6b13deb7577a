"""The OpenMP spin default (rlhf_ds/openmp.py) reaches the runtime torch loads, and yields to the user's choice.

Each case is a fresh interpreter with OMP_DISPLAY_ENV=VERBOSE, which makes libgomp print the settings it read
when it loaded: what is checked is the value the runtime runs with, not an environment variable.
"""
import os
import re
import subprocess
import sys

import pytest

from rlhf_ds.openmp import SPINCOUNT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SPIN = "300000"  # libgomp's own spin count when nothing is set


def runtime_spincount(code: str, **env: str) -> tuple[str, str]:
    """(the GOMP_SPINCOUNT that libgomp reports, stdout) after ``code`` ran in a fresh interpreter with ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    assert match, f"libgomp printed no settings: {proc.stderr[-2000:]}"
    return match.group(1), proc.stdout.strip()


LOADED = "import rlhf_ds, torch; torch.ones(8).sum()"  # what every entry point does: the package before torch


@pytest.mark.parametrize("code, env, expected", [
    (LOADED, {}, SPINCOUNT),
    (LOADED, {"GOMP_SPINCOUNT": "20"}, "20"),  # the user's count wins
    (LOADED, {"OMP_WAIT_POLICY": "PASSIVE"}, "0"),  # as does a policy
], ids=["package_first", "user_count", "user_policy"])
def test_the_spin_default_reaches_libgomp_unless_the_user_chose(code, env, expected):
    assert runtime_spincount(code, **env)[0] == expected


def test_a_default_already_too_late_is_neither_applied_nor_claimed():
    """Imported after torch, the package cannot reach the runtime, and leaves GOMP_SPINCOUNT unset, so
    run_info.json and the run's header do not report a spin count the runtime never read."""
    spin, printed = runtime_spincount("import torch, os, rlhf_ds; print(os.environ.get('GOMP_SPINCOUNT'))")
    assert (spin, printed) == (DEFAULT_SPIN, "None")
