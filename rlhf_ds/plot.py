"""Plots of a run's metrics.jsonl: ``python -m rlhf_ds.plot RUN_DIR [--out DIR]`` (default RUN_DIR/plots).

The questions a PPO-RLHF run raises are always the same: does the score rise, does KL stay near its target,
what does the controller do with kl_coef, do the losses behave, where does the time go. One PNG answers each,
from the file every run writes, so a run on a remote machine can be judged without TensorBoard. Skipped
iterations (no update happened, they carry ``skip_reason``) have no losses or KL and are left out.
Figures are drawn on matplotlib's Agg canvas directly (no pyplot): no display needed, no global state touched.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_ds.errors import KnownError, run_main

DEFAULT_TARGET_KL = 0.01  # PPOConfig's default, for runs whose config.json is missing
LOSSES = ("policy_loss", "value_loss", "entropy_loss", "kl_loss")  # those a run logged (no critic: no value_loss)
PHASES = ("time_generation_s", "time_experience_s", "time_update_s")


class PlotError(KnownError, ValueError):
    """Input that cannot be plotted; the message is one line naming the file and the fix."""


def load_metrics(path: str) -> list[dict]:
    """Every record of a metrics.jsonl (blank lines ignored); one-line PlotError if it is missing or malformed."""
    if not os.path.isfile(path):
        raise PlotError(f"{path} not found: pass the output_dir of a run (the directory holding metrics.jsonl)")
    records = []
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise PlotError(f"{path} line {number} is not valid JSON ({err.msg}): fix or delete that line "
                                f"(a run killed mid-write can leave a torn last line)") from None
            if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
                raise PlotError(f"{path} line {number} is not a metrics record (an object with an integer "
                                f"'iteration'): fix or delete that line")
            records.append(record)
    if not records:
        raise PlotError(f"{path} is empty: the run has not finished an iteration yet; plot it after the first one")
    return records


def load_target_kl(run_dir: str) -> float:
    """target_kl from the run's config.json (written by PPOConfig.save); the default when there is none."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return DEFAULT_TARGET_KL
    try:
        with open(path) as fh:
            return float(json.load(fh).get("target_kl", DEFAULT_TARGET_KL))
    except (ValueError, TypeError, AttributeError):
        raise PlotError(f"{path} is not a JSON object of config fields with a numeric target_kl: fix it, "
                        f"or delete it to use target_kl={DEFAULT_TARGET_KL}") from None


def _series(records: list[dict], key: str) -> list[float]:
    """One metric across iterations; a missing or null value becomes NaN (a gap in the curve)."""
    value = [r.get(key) for r in records]
    return [float(v) if isinstance(v, (int, float)) else math.nan for v in value]


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_reward(records: list[dict], path: str) -> str:
    x = [r["iteration"] for r in records]
    score, std = _series(records, "score_mean"), _series(records, "score_std")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, score, label="score_mean (reward model)")
    ax.fill_between(x, [m - s for m, s in zip(score, std)], [m + s for m, s in zip(score, std)], alpha=0.25,
                    label="± score_std")
    ax.plot(x, _series(records, "reward_mean"), label="reward_mean (score − kl_coef·KL)")
    ax.set(xlabel="iteration", ylabel="reward", title="Reward-model score and shaped reward")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_kl(records: list[dict], target_kl: float, path: str) -> str:
    x = [r["iteration"] for r in records]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.axhspan(0.5 * target_kl, 2 * target_kl, color="tab:green", alpha=0.15,
               label="[0.5, 2]·target: step controller leaves kl_coef alone")
    ax.axhline(target_kl, color="tab:green", linestyle="--", label=f"target_kl = {target_kl:g}")
    ax.plot(x, _series(records, "kl_divergence"), color="tab:blue", label="kl_divergence (k3, the controller's)")
    # the penalty's own estimator (k1 by default: the same KL, noisier); absent from runs before it was logged
    ax.plot(x, _series(records, "kl_penalty_mean"), color="tab:gray", linewidth=0.8, alpha=0.7,
            label="kl_penalty_mean (kl_estimator)")
    ax.set(xlabel="iteration", ylabel="KL (nats per token)", title="KL divergence from the reference policy")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_kl_coef(records: list[dict], path: str) -> str:
    x = [r["iteration"] for r in records]
    values = _series(records, "kl_coef")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, values, drawstyle="steps-post")
    # The step controller multiplies by 1.5 or 0.5: equal steps on a log axis. A zero coefficient
    # (a fixed kl_coef of 0) has no logarithm, so that run keeps a linear axis.
    if all(v > 0 for v in values if not math.isnan(v)):
        ax.set_yscale("log")
    ax.set(xlabel="iteration", ylabel="kl_coef", title="KL penalty coefficient used for each rollout")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_losses(records: list[dict], path: str) -> str:
    x = [r["iteration"] for r in records]
    names = [name for name in LOSSES if any(name in r for r in records)] or list(LOSSES[:1])
    fig = Figure(figsize=(8, 7), layout="constrained")
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        ax.plot(x, _series(records, name))
        ax.set(ylabel=name)
        ax.grid(alpha=0.3)
    axes[0].set_title("Losses (means over each iteration's mini-batches)")
    axes[-1].set_xlabel("iteration")
    return _save(fig, path)


def plot_time(records: list[dict], path: str) -> str:
    x = [r["iteration"] for r in records]
    phases = [[0.0 if math.isnan(v) else v for v in _series(records, name)] for name in PHASES]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.stackplot(x, *phases, labels=[name[len("time_"):-len("_s")] for name in PHASES], alpha=0.8)
    ax.set(xlabel="iteration", ylabel="seconds", title="Time per iteration by phase")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def score_over_time(runs: Sequence[list[dict]], grid: Sequence[float]) -> tuple[list[float], ...]:
    """Mean, min and max over ``runs`` (one metrics list per seed) of the training score at each time of ``grid``.

    A run's clock is its training time: the running sum of its iterations' phase times, each score belonging
    to the end of its iteration. At time t a run's score is that of its last iteration ended by t (NaN before
    the first, and after the run's last iteration, so a run that stopped early adds nothing there). Returns
    three lists of len(grid); NaN where no run has a score.
    """
    stats: tuple[list[float], ...] = ([], [], [])
    clocks = []
    for records in runs:
        ends = [sum(r.get(name, 0.0) for name in PHASES) for r in records]
        clocks.append(([sum(ends[:i + 1]) for i in range(len(ends))], _series(records, "score_mean")))
    for t in grid:
        values = []
        for ends, scores in clocks:
            done = [score for end, score in zip(ends, scores) if end <= t]
            if done and t <= ends[-1] and not math.isnan(done[-1]):
                values.append(done[-1])
        for out, value in zip(stats, (sum(values) / len(values), min(values), max(values)) if values
                              else (math.nan,) * 3):
            out.append(value)
    return stats


def plot_score_comparison(curves: dict[str, Sequence[list[dict]]], seconds: float, path: str) -> str:
    """One line per label (e.g. an advantage estimator): the seeds' mean training score against training
    seconds, with their min-max band (``score_over_time``)."""
    grid = [seconds * i / 200 for i in range(201)]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, runs in curves.items():
        mean, low, high = score_over_time(runs, grid)
        line, = ax.plot(grid, mean, label=f"{label} (mean of {len(runs)})")
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="training seconds", ylabel="score_mean (reward model)",
           title="Training score against wall-clock time (band: min to max over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> list[str]:
    """Write reward, kl, kl_coef, losses and time PNGs of the run in ``run_dir``; returns their paths."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    records = load_metrics(metrics_path)
    completed = sorted((r for r in records if "skip_reason" not in r), key=lambda r: r["iteration"])
    if not completed:
        raise PlotError(f"{metrics_path} has only skipped iterations ({len(records)}): nothing to plot; "
                        f"see each line's skip_reason")
    target_kl = load_target_kl(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    return [
        plot_reward(completed, os.path.join(out_dir, "reward.png")),
        plot_kl(completed, target_kl, os.path.join(out_dir, "kl.png")),
        plot_kl_coef(completed, os.path.join(out_dir, "kl_coef.png")),
        plot_losses(completed, os.path.join(out_dir, "losses.png")),
        plot_time(completed, os.path.join(out_dir, "time.png")),
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ds.plot", description="Plot a run's metrics.jsonl.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")
    args = parser.parse_args(argv)

    def plot() -> int:
        print("\n".join(plot_run(args.run_dir, args.out)))
        return 0

    return run_main(plot)


if __name__ == "__main__":
    sys.exit(main())
