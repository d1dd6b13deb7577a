"""RunLogger and run_info: resumed metrics.jsonl equals a straight run's, TensorBoard scalars read back,
progress as plain lines or a tqdm bar, W&B optional with a one-line error, versions and git revision recorded."""
import io
import json
import os
import platform
import re
import subprocess
import sys
import types
from datetime import timezone, datetime
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tqdm import tqdm

import rlhf_ds
from rlhf_ds import tracking
from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.tracking import RunLogger, check_trackers, format_metrics, git_revision, write_run_info
from test_distributed import launch_script

ROOT = Path(__file__).resolve().parents[1]

PACKAGE_DIR = str(Path(rlhf_ds.__file__).resolve().parent)


def completed(i: int) -> dict:
    """A completed iteration's metrics with every key PPOTrainer.step produces (values depend on i)."""
    return {"score_mean": 0.5 + 0.1 * i, "score_std": 0.3, "reward_mean": 0.4 + 0.1 * i, "reward_std": 0.2,
            "response_length": 20.0 + i, "value_explained_var": 0.1, "policy_loss": -0.01 * i,
            "value_loss": 1.0 / (i + 1), "entropy_loss": -0.02, "entropy": 2.0, "clipfrac": 0.05,
            "approx_kl": 0.001, "time_generation_s": 0.25, "time_experience_s": 0.125, "time_update_s": 0.5,
            "iteration": i, "kl_divergence": 0.002 * i, "kl_coef": 0.2, "next_kl_coef": 0.1,
            "skipped_batches": 0, "tokens_per_s": 300.0, "total_loss": 0.1, "generation_partitioned": 0.0,
            "peak_memory_generation_mb": 600.0, "peak_memory_experience_mb": 620.0, "peak_memory_update_mb": 700.0}


def skipped(i: int) -> dict:
    return {"iteration": i, "skipped_batches": 1, "skip_reason": "non-finite loss", "kl_coef": 0.2,
            "time_generation_s": 0.25, "time_experience_s": 0.125, "time_update_s": 0.5}


def config(tmp_path, **overrides) -> PPOConfig:
    values = {"output_dir": str(tmp_path / "run"), "iterations": 8, "tensorboard": False}
    values.update(overrides)
    return PPOConfig(**values).validate()


class Terminal(io.StringIO):
    """A stream that says it is a terminal, so RunLogger draws a bar on it."""

    def isatty(self) -> bool:
        return True


def run(cfg: PPOConfig, records: list, start_iteration: int = 0) -> str:
    with RunLogger(cfg, start_iteration=start_iteration, stream=io.StringIO()) as logger:
        for record in records:
            logger.log(record)
    return logger.metrics_path


def test_format_metrics_lines():
    assert format_metrics(completed(3)) == ("iter    3  score +0.800  reward +0.700  kl 0.0060  kl_coef 0.2000"
                                            "  policy -0.0300  value 0.2500  entropy 2.000  len 23.0  300 tok/s")
    assert format_metrics(skipped(12)) == "iter   12 skipped (non-finite loss), total 1"


def test_resumed_metrics_file_equals_straight_run(tmp_path):
    records = [completed(0), completed(1), skipped(2), completed(3), completed(4), completed(5)]
    straight = Path(run(config(tmp_path / "a"), records)).read_bytes()
    assert [json.loads(line)["iteration"] for line in straight.decode().splitlines()] == [0, 1, 2, 3, 4, 5]

    cfg = config(tmp_path / "b")
    path = Path(run(cfg, records[:5]))  # crashed after iteration 4; the newest checkpoint is at iteration 3
    with open(path, "a") as fh:
        fh.write('{"iteration": 5, "score_m')  # a line torn by the crash
    run(cfg, records[3:], start_iteration=3)
    assert path.read_bytes() == straight
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]

    run(cfg, records[:2])  # a new run (start_iteration 0) starts a new file
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1]


def test_each_line_is_on_disk_as_soon_as_logged(tmp_path):
    cfg = config(tmp_path)
    logger = RunLogger(cfg, stream=io.StringIO())
    logger.log(completed(0))
    assert json.loads(Path(logger.metrics_path).read_text()) == completed(0)
    logger.close()
    logger.close()


def test_disabled_logger_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would be an error if an enabled logger asked for it
    cfg = config(tmp_path, tensorboard=True, wandb=True)
    stream = Terminal()
    with RunLogger(cfg, enabled=False, stream=stream) as logger:
        logger.log(completed(0))
        logger.log(skipped(1))
    assert not (tmp_path / "run").exists()
    assert stream.getvalue() == "" and logger.bar is None and logger.writer is None


def scalar_series(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_scalars_and_config(tmp_path):
    cfg = config(tmp_path, tensorboard=True)
    run(cfg, [completed(0), completed(1), skipped(2), completed(3)])
    log_dir = tmp_path / "run" / "tensorboard"
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"ppo/kl_divergence", "ppo/kl_coef", "ppo/policy_loss", "ppo/value_loss", "reward/score_mean",
            "reward/reward_mean", "time/time_update_s", "time/tokens_per_s", "ppo/skipped_batches",
            "memory/peak_memory_update_mb"} <= tags
    assert not any(tag.endswith(("iteration", "skip_reason")) for tag in tags)
    kl = [(e.step, e.value) for e in events.Scalars("ppo/kl_divergence")]
    assert kl == [(i, pytest.approx(0.002 * i)) for i in (0, 1, 3)]  # the skipped iteration has no KL
    assert [e.step for e in events.Scalars("ppo/skipped_batches")] == [0, 1, 2, 3]
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"target_kl": 0.01' in text


def test_tensorboard_resume_purges_later_steps(tmp_path):
    cfg = config(tmp_path, tensorboard=True)
    run(cfg, [completed(i) for i in range(5)])
    resumed = [dict(completed(i), score_mean=10.0 + i) for i in (3, 4, 5)]
    run(cfg, resumed, start_iteration=3)
    series = scalar_series(tmp_path / "run" / "tensorboard", "reward/score_mean")
    assert series == [(0, pytest.approx(0.5)), (1, pytest.approx(0.6)), (2, pytest.approx(0.7)),
                      (3, 13.0), (4, 14.0), (5, 15.0)]


def test_plain_lines_every_log_interval_and_at_the_last_iteration(tmp_path):
    cfg = config(tmp_path, iterations=8, log_interval=3)
    stream = io.StringIO()
    records = [completed(i) for i in range(8)]
    records[3] = skipped(3)
    with RunLogger(cfg, stream=stream) as logger:
        for record in records:
            logger.log(record)
        assert logger.bar is None
    assert stream.getvalue().splitlines() == [format_metrics(records[i]) for i in (0, 3, 6, 7)]


def test_terminal_gets_a_tqdm_bar(tmp_path):
    cfg = config(tmp_path, iterations=8, log_interval=1)
    stream = Terminal()
    with RunLogger(cfg, stream=stream) as logger:
        assert isinstance(logger.bar, tqdm) and logger.bar.total == 8 and logger.bar.n == 0
        logger.log(completed(0))
        logger.log(completed(1))
        assert logger.bar.n == 2
        assert logger.bar.postfix == "score=+0.600, reward=+0.500, kl=0.0020, kl_coef=0.2000"
        logger.log(skipped(2))
        assert logger.bar.n == 3
    output = stream.getvalue()
    assert format_metrics(skipped(2)) in output  # a skip is worth a line of its own
    assert format_metrics(completed(1)) not in output  # the bar replaces the plain lines

    with RunLogger(cfg, start_iteration=5, stream=Terminal()) as logger:
        assert logger.bar.n == 5
        logger.log(completed(5))
        assert logger.bar.n == 6


def test_wandb_missing_is_a_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    cfg = config(tmp_path, wandb=True)
    with pytest.raises(ConfigError) as err:
        RunLogger(cfg, stream=io.StringIO())
    assert str(err.value) == ("wandb=true but the wandb package is not installed: pip install wandb, "
                              "or set --wandb false")
    assert not (tmp_path / "run").exists()  # failed before writing anything
    with pytest.raises(ConfigError, match="^wandb=true but the wandb package is not installed"):
        check_trackers(cfg)  # what every rank can call before loading models
    check_trackers(config(tmp_path, wandb=False))


def test_tensorboard_missing_is_a_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = config(tmp_path, tensorboard=True)
    with pytest.raises(ConfigError) as err:
        RunLogger(cfg, stream=io.StringIO())
    assert str(err.value) == ("tensorboard=true but the tensorboard package is not installed: "
                              "pip install tensorboard, or set --tensorboard false")
    assert not (tmp_path / "run").exists()
    check_trackers(config(tmp_path, tensorboard=False))


class FakeWandbRun:
    def __init__(self, run_id: str):
        self.id, self.logged, self.finished = run_id, [], False

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


def fake_wandb() -> types.ModuleType:
    """A stand-in for the wandb module that records init() calls (wandb itself is not a dependency)."""
    module = types.ModuleType("wandb")
    module.calls = []

    def init(**kwargs):
        module.calls.append(kwargs)
        module.run = FakeWandbRun(kwargs["id"] or f"run{len(module.calls)}")
        return module.run

    module.init = init
    return module


def test_wandb_logs_tagged_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = config(tmp_path, wandb=True, wandb_project="my-project")
    run(cfg, [completed(0), skipped(1)])
    first = wandb.run
    assert wandb.calls[0]["project"] == "my-project" and wandb.calls[0]["config"] == cfg.to_dict()
    assert wandb.calls[0]["id"] is None
    assert [step for step, _ in first.logged] == [0, 1] and first.finished
    assert first.logged[0][1]["ppo/kl_divergence"] == 0.0 and first.logged[0][1]["reward/score_mean"] == 0.5
    assert "ppo/skip_reason" not in first.logged[1][1]

    run(cfg, [completed(1)], start_iteration=1)
    assert wandb.calls[1]["id"] == first.id and wandb.calls[1]["resume"] == "allow"
    run(cfg, [completed(0)])  # a new run is a new W&B run
    assert wandb.calls[2]["id"] is None


def test_run_info_records_versions_revision_and_command(tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.TRACKED_PACKAGES, "absent", "rlhf-ds-no-such-distribution")
    monkeypatch.setenv("GOMP_SPINCOUNT", "77")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cfg = config(tmp_path)
    path = write_run_info(cfg, world_size=2)
    assert path == str(tmp_path / "run" / "run_info.json")
    info = json.loads(Path(path).read_text())
    versions = info["versions"]
    assert set(versions) == {"python", "torch", "deepspeed", "transformers", "datasets", "accelerate",
                             "safetensors", "tokenizers", "rlhf_ds", "absent"}
    assert versions["python"] == platform.python_version() and versions["torch"] == torch.__version__
    assert versions["rlhf_ds"] == rlhf_ds.__version__ and versions["absent"] is None
    assert all(isinstance(versions[k], str) for k in versions if k != "absent")
    assert re.fullmatch(r"[0-9a-f]{40}", info["git_revision"]), "the tests run from a git checkout of rlhf-ds"
    assert isinstance(info["git_dirty"], bool)
    assert info["argv"] == sys.argv and info["world_size"] == 2 and info["hostname"]
    started = datetime.fromisoformat(info["start_time_utc"])
    assert started.utcoffset() == timezone.utc.utcoffset(None)
    assert abs((datetime.now(timezone.utc) - started).total_seconds()) < 60
    assert info["cpu_threads"] == {"torch_threads": torch.get_num_threads(), "GOMP_SPINCOUNT": "77",
                                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "OMP_WAIT_POLICY": None}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run_info.json"]


def test_git_revision_of_a_checkout_and_of_no_checkout(tmp_path, monkeypatch):
    revision, dirty = git_revision(PACKAGE_DIR)
    assert re.fullmatch(r"[0-9a-f]{40}", revision) and isinstance(dirty, bool)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not look above tmp_path
    assert git_revision(str(tmp_path)) == (None, None)
    assert git_revision(str(tmp_path / "does-not-exist")) == (None, None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert git_revision(PACKAGE_DIR) == (None, None)


def test_git_revision_needs_the_directory_tracked_and_sees_edits(tmp_path, monkeypatch):
    """A throw-away repository: its revision and dirty flag, and None for an untracked directory inside it."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "untracked").mkdir()
    (repo / "pkg" / "module.py").write_text("x = 1\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c",
                               "commit.gpgsign=false", *args], cwd=repo, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("add", "pkg/module.py")
    git("commit", "-q", "-m", "one file")
    head = git("rev-parse", "HEAD")
    assert git_revision(str(repo / "pkg")) == (head, False)
    (repo / "pkg" / "module.py").write_text("x = 2\n")
    assert git_revision(str(repo / "pkg")) == (head, True)
    assert git_revision(str(repo / "untracked")) == (None, None)  # e.g. a virtualenv inside someone's repo


# --- the run directory ------------------------------------------------------------------------------------
def _previous_run(root: Path) -> Path:
    (root / "checkpoints" / "iter_0000020").mkdir(parents=True)
    (root / "checkpoints" / "latest").write_text("iter_0000020")
    (root / "metrics.jsonl").write_text('{"iteration": 0}\n')
    (root / "notes.txt").write_text("mine")
    return root


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path):
    run = _previous_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"output_dir=.*already holds a run \(checkpoints/, metrics.jsonl\): "
                                          "continue it with --resume auto, replace it with --overwrite_output_dir"):
        tracking.check_output_dir(PPOConfig(output_dir=str(run)))
    tracking.check_output_dir(PPOConfig(output_dir=str(run), resume="auto"))
    tracking.check_output_dir(PPOConfig(output_dir=str(run), overwrite_output_dir=True))
    (tmp_path / "empty_metrics").mkdir()
    (tmp_path / "empty_metrics" / "metrics.jsonl").write_text("")  # a run killed before its first iteration
    tracking.check_output_dir(PPOConfig(output_dir=str(tmp_path / "empty_metrics")))
    tracking.check_output_dir(PPOConfig(output_dir=str(tmp_path / "new" / "deeper")))
    with pytest.raises(ConfigError, match="pass only one of them"):
        PPOConfig(output_dir=str(run), resume="auto", overwrite_output_dir=True).validate()


def test_output_dir_that_is_a_file_or_inside_one_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ConfigError, match="file"):
            tracking.check_output_dir(PPOConfig(output_dir=str(out)))
    with pytest.raises(ConfigError, match="output_dir"):
        PPOConfig(output_dir=" ").validate()


def test_overwrite_deletes_only_the_previous_runs_outputs(tmp_path):
    run = _previous_run(tmp_path / "run")
    assert sorted(tracking.clear_previous_run(str(run))) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_train_py_in_a_used_directory_is_one_line_and_touches_nothing(tmp_path, capsys):
    run = _previous_run(tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert launch_script("train").main(["--output_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume auto" in err and "--overwrite_output_dir" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_train_py_help_lists_every_field_and_exits_zero():
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    for name in ("kl_coef", "stop_strings", "overwrite_output_dir"):
        assert name in proc.stdout


def test_an_unwritable_output_dir_is_one_line(tmp_path, monkeypatch):
    """As root (CI) every directory is writable, so the permission answer is what is replaced here."""
    monkeypatch.setattr(tracking.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"output_dir=.* is not writable .*choose another --output_dir"):
        tracking.check_output_dir(PPOConfig(output_dir=str(tmp_path / "run")))
