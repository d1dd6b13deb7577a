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


def runtime_spincount(code: str, **env: str) -> str:
    """The GOMP_SPINCOUNT that libgomp reports after ``code`` ran in a fresh interpreter with ``env`` added."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    assert match, f"libgomp printed no settings: {proc.stderr[-2000:]}"
    return match.group(1)


@pytest.mark.parametrize("code, env, expected", [
    ("import rlhf_ds, torch; torch.ones(8).sum()", {}, SPINCOUNT),  # what every entry point does
    ("import rlhf_ds.config, torch; torch.ones(8).sum()", {}, SPINCOUNT),  # any submodule first: the same
    ("import torch, rlhf_ds; torch.ones(8).sum()", {}, DEFAULT_SPIN),  # torch first: the runtime had read its env
    ("import rlhf_ds, torch; torch.ones(8).sum()", {"GOMP_SPINCOUNT": "20"}, "20"),  # the user's count wins
    ("import rlhf_ds, torch; torch.ones(8).sum()", {"OMP_WAIT_POLICY": "PASSIVE"}, "0"),  # as does a policy
], ids=["package", "submodule", "torch_first", "user_count", "user_policy"])
def test_the_spin_default_reaches_libgomp_unless_the_user_chose(code, env, expected):
    assert runtime_spincount(code, **env) == expected


def test_a_default_already_too_late_is_not_claimed():
    """Imported after torch, the package leaves GOMP_SPINCOUNT unset, so run_info.json and the run's header do not
    report a spin count the runtime never read."""
    code = "import torch, os, rlhf_ds; print(os.environ.get('GOMP_SPINCOUNT'))"
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=clean)
    assert proc.stdout.strip() == "None", proc.stderr[-2000:]
