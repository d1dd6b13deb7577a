"""rlhf_ds.plot: every PNG from a synthetic metrics.jsonl, skipped iterations left out, one-line errors (exit 2)."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ds import plot
from rlhf_ds.config import PPOConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["reward.png", "kl.png", "kl_coef.png", "losses.png", "time.png"]
SKIPPED = 3


def record(i: int) -> dict:
    if i == SKIPPED:
        return {"iteration": i, "skipped_batches": 1, "skip_reason": "non-finite loss", "kl_coef": 0.1,
                "time_generation_s": 0.3, "time_experience_s": 0.1, "time_update_s": 0.0}
    return {"iteration": i, "score_mean": 0.8 + 0.05 * i, "score_std": 0.5, "reward_mean": 0.7 + 0.04 * i,
            "reward_std": 0.4, "kl_divergence": 0.002 * i, "kl_coef": 0.2 * 0.5 ** min(i, 2),
            "next_kl_coef": 0.1, "policy_loss": -0.01 * i, "value_loss": 4.0 / (i + 1), "entropy_loss": -0.02,
            "entropy": 2.0, "clipfrac": 0.05, "approx_kl": 0.001, "value_explained_var": 0.2,
            "response_length": 19.0, "tokens_per_s": 300.0, "total_loss": 0.3, "skipped_batches": 0,
            "time_generation_s": 0.26, "time_experience_s": 0.16, "time_update_s": 0.6}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(8)))
    PPOConfig(output_dir=str(path), target_kl=0.02).save(str(path / "config.json"))
    return path


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 400 and height >= 300 and len(data) > 5000, path


def test_plot_run_writes_every_png(run_dir):
    paths = plot.plot_run(str(run_dir))
    assert paths == [str(run_dir / "plots" / name) for name in NAMES]
    for path in paths:
        check_png(Path(path))


def test_skipped_iterations_left_out_and_target_kl_from_config(run_dir, monkeypatch):
    seen = {}

    def spy(name):
        original = getattr(plot, name)

        def wrapper(records, *args):
            seen[name] = ([r["iteration"] for r in records], args[:-1])
            return original(records, *args)
        monkeypatch.setattr(plot, name, wrapper)

    for name in ("plot_reward", "plot_kl", "plot_kl_coef", "plot_losses", "plot_time"):
        spy(name)
    plot.plot_run(str(run_dir), str(run_dir / "elsewhere"))
    assert len(seen) == 5
    assert all(iterations == [0, 1, 2, 4, 5, 6, 7] for iterations, _ in seen.values())
    assert seen["plot_kl"][1] == (0.02,)
    assert sorted(p.name for p in (run_dir / "elsewhere").iterdir()) == sorted(NAMES)

    (run_dir / "config.json").unlink()
    plot.plot_run(str(run_dir))
    assert seen["plot_kl"][1] == (0.01,)  # PPOConfig's default when the run has no config.json


def test_zero_kl_coef_still_plots(tmp_path):
    """A fixed kl_coef of 0 has no logarithm: the log axis must not break the figure."""
    path = tmp_path / "kl_coef.png"
    assert plot.plot_kl_coef([dict(record(i), kl_coef=0.0) for i in range(3)], str(path)) == str(path)
    check_png(path)


def error_of(capsys, run_dir) -> str:
    assert plot.main([str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    return err.strip()


def test_missing_metrics_file(tmp_path, capsys):
    err = error_of(capsys, tmp_path / "nowhere")
    assert err.startswith(f"error: {tmp_path / 'nowhere' / 'metrics.jsonl'} not found:")
    assert "output_dir" in err


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_metrics_file(run_dir, capsys, text):
    (run_dir / "metrics.jsonl").write_text(text)
    err = error_of(capsys, run_dir)
    assert err.startswith(f"error: {run_dir / 'metrics.jsonl'} is empty:")


def test_malformed_line_is_named(run_dir, capsys):
    lines = [json.dumps(record(0)), json.dumps(record(1)), '{"iteration": 2, "score_m']
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    err = error_of(capsys, run_dir)
    assert err.startswith(f"error: {run_dir / 'metrics.jsonl'} line 3 is not valid JSON")
    assert "fix or delete that line" in err

    (run_dir / "metrics.jsonl").write_text(json.dumps(record(0)) + "\n[1, 2]\n")
    assert "line 2 is not a metrics record" in error_of(capsys, run_dir)


def test_only_skipped_iterations(run_dir, capsys):
    (run_dir / "metrics.jsonl").write_text(json.dumps(record(SKIPPED)) + "\n")
    assert "has only skipped iterations (1)" in error_of(capsys, run_dir)
    assert not (run_dir / "plots").exists()


def test_bad_config_json(run_dir, capsys):
    (run_dir / "config.json").write_text("[]")
    err = error_of(capsys, run_dir)
    assert err.startswith(f"error: {run_dir / 'config.json'} is not a JSON object")


def test_module_entry_point(run_dir, tmp_path):
    out = tmp_path / "pngs"
    done = subprocess.run([sys.executable, "-m", "rlhf_ds.plot", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(out / name) for name in NAMES]
    for name in NAMES:
        check_png(out / name)


def _timed(seconds_and_scores: list[tuple[float, float]]) -> list[dict]:
    """Iterations that took ``seconds`` (split over the phases) and logged ``score``."""
    return [{"iteration": i, "score_mean": score, "time_generation_s": seconds / 2, "time_experience_s": seconds / 4,
             "time_update_s": seconds / 4} for i, (seconds, score) in enumerate(seconds_and_scores)]


def test_score_over_time_by_hand(tmp_path):
    """Seed A's iterations end at 1 s and 3 s (scores 0, 1), seed B's at 2 s and 4 s (scores 2, 4): at t, each
    seed counts its last score ended by t, until its last iteration's end."""
    runs = [_timed([(1.0, 0.0), (2.0, 1.0)]), _timed([(2.0, 2.0), (2.0, 4.0)])]
    mean, low, high = plot.score_over_time(runs, [0.5, 1.0, 2.5, 3.0, 3.5, 4.0, 5.0])
    nan = float("nan")
    assert mean == pytest.approx([nan, 0.0, 1.0, 1.5, 2.0, 4.0, nan], nan_ok=True)
    assert low == pytest.approx([nan, 0.0, 0.0, 1.0, 2.0, 4.0, nan], nan_ok=True)
    assert high == pytest.approx([nan, 0.0, 2.0, 2.0, 2.0, 4.0, nan], nan_ok=True)
    path = plot.plot_score_comparison({"a": runs, "b": runs[:1]}, 4.0, str(tmp_path / "scores.png"))
    assert Path(path).read_bytes().startswith(PNG_SIGNATURE)
