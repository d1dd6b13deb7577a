"""The one place a known failure becomes ``error: ...`` and an exit code (rlhf_ds/errors.py)."""
import pytest

from rlhf_ds.checkpoint import CheckpointError
from rlhf_ds.config import ConfigError
from rlhf_ds.data import DataError
from rlhf_ds.errors import run_main


@pytest.mark.parametrize("error", [ConfigError("bad --actor_lr:\n  use a number"), DataError("no prompts"),
                                   CheckpointError("damaged"), FileNotFoundError(2, "No such file", "x.yaml")])
def test_a_known_failure_is_one_line_and_the_exit_code(error, capsys):
    def main() -> int:
        raise error

    assert run_main(main, code=3) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_bug_keeps_its_traceback():
    def main() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main(main)


def test_main_return_value_passes_through():
    assert run_main(lambda: 0) == 0
