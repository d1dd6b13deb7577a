"""Compare the advantage estimators on the same wall-clock budget: PPO-GAE, GRPO, RLOO, REINFORCE++.

    python launch/compare_estimators.py [--budget_s 90] [--seeds 0,1,2] [--ranks 2] [--out DIR] [--field value ...]

For each estimator and seed: ``launch/train.py`` on N ranks (deepspeed launcher) with ``--time_budget_s``
(the run ends after the iteration in which its training time reached the budget, then checkpoints and exports
its policy as at the end of a run), then ``launch/evaluate.py`` of that policy on held-out prompts (reward-model
score, win rate against the reference, KL). Every run has the same config (the embedded default unless
``--field value`` overrides say otherwise) but for ``samples_per_prompt``: 2 for GRPO and RLOO, which compare
a prompt's samples, 1 otherwise; so the group estimators generate twice the sequences per iteration, and the
budget is what makes them comparable. Nothing is tuned per estimator.

Writes ``DIR/comparison.json`` (every run's figures), ``DIR/comparison.md`` (the table, mean and range over
seeds) and ``DIR/score_vs_time.png`` (``plot.plot_score_comparison``). Needs an otherwise idle machine: the
budget is wall-clock time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rlhf_ds.distributed import launcher_command  # noqa: E402
from rlhf_ds.errors import KnownError, run_main  # noqa: E402
from rlhf_ds.ppo import ADVANTAGE_ESTIMATORS  # noqa: E402

GROUP_SAMPLES = {"grpo": 2, "rloo": 2}  # samples_per_prompt of the estimators that need a group; others 1
PHASES = ("generation", "experience", "update")
RUN_TIMEOUT_S = 3600


class ComparisonError(KnownError, RuntimeError):
    """A training or evaluation run of the comparison failed; the message names its log."""


def _run(cmd: list[str], log: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT_S).returncode
    if code:
        raise ComparisonError(f"a run exited {code}: its output is in {log}")


def run_one(estimator: str, seed: int, args, overrides: list[str]) -> dict:
    """Train one (estimator, seed) under the budget, evaluate its policy; returns its figures."""
    out = os.path.join(args.out, f"{estimator}_seed{seed}")
    log = f"{out}.log"
    train = [*overrides, "--advantage_estimator", estimator, "--samples_per_prompt",
             str(GROUP_SAMPLES.get(estimator, 1)), "--seed", str(seed), "--time_budget_s", str(args.budget_s),
             "--iterations", "100000", "--save_interval", "0", "--tensorboard", "false", "--output_dir", out,
             "--overwrite_output_dir", "true"]
    start = time.perf_counter()
    _run(launcher_command(os.path.join(REPO, "launch", "train.py"), args.ranks, train), log)
    wall = time.perf_counter() - start
    _run([sys.executable, os.path.join(REPO, "launch", "evaluate.py"), *overrides, "--policy",
          os.path.join(out, "policy"), "--num_prompts", str(args.eval_prompts), "--output_dir", out], log)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    summary = json.load(open(os.path.join(out, "eval", "summary.json")))
    tail = metrics[-max(1, len(metrics) // 5):]  # the last fifth of the run
    train_s = sum(m[f"time_{p}_s"] for m in metrics for p in PHASES)
    return {"estimator": estimator, "seed": seed, "out": out, "wall_s": wall, "iterations": len(metrics),
            "train_s": train_s, "s_per_iteration": train_s / len(metrics),
            "score_start": metrics[0]["score_mean"], "score_end": sum(m["score_mean"] for m in tail) / len(tail),
            "kl_end": sum(m["kl_divergence"] for m in tail) / len(tail),
            "eval_score": summary["policy_reward_mean"], "eval_reference_score": summary["reference_reward_mean"],
            "win_rate": summary["win_rate"], "eval_kl_per_token": summary["kl_per_token"],
            **{f"peak_{p}_mb": max(m[f"peak_memory_{p}_mb"] for m in metrics) for p in PHASES}}


def table(rows: list[dict], estimators: list[str]) -> str:
    """Markdown: one line per estimator, each figure the mean over seeds with its range."""
    columns = [("iterations", "iterations", "{:.0f}"), ("s/iteration", "s_per_iteration", "{:.2f}"),
               ("train score, last fifth", "score_end", "{:+.2f}"), ("held-out score", "eval_score", "{:+.2f}"),
               ("win rate", "win_rate", "{:.2f}"), ("KL/token, last fifth", "kl_end", "{:.4f}"),
               ("held-out KL/token", "eval_kl_per_token", "{:.4f}"),
               *((f"peak {p} MiB", f"peak_{p}_mb", "{:.0f}") for p in PHASES)]
    lines = ["| estimator | " + " | ".join(name for name, _, _ in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for estimator in estimators:
        runs = [r for r in rows if r["estimator"] == estimator]
        cells = []
        for _, key, fmt in columns:
            values = [r[key] for r in runs]
            mean = fmt.format(sum(values) / len(values))
            cells.append(mean if len(values) == 1 else
                         f"{mean} ({fmt.format(min(values))}..{fmt.format(max(values))})")
        lines.append(f"| `{estimator}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(args, overrides: list[str]) -> int:
    from rlhf_ds.embedded import build
    from rlhf_ds.plot import plot_score_comparison

    os.makedirs(args.out, exist_ok=True)
    build()  # once, with every core, before any rank looks for it
    rows = []
    for seed in args.seeds:  # seeds outermost: a slow spell of the machine hits every estimator alike
        for estimator in args.estimators:
            rows.append(run_one(estimator, seed, args, overrides))
            row = rows[-1]
            print(f"[compare] {estimator} seed {seed}: {row['iterations']} iterations, held-out score "
                  f"{row['eval_score']:+.2f}, win rate {row['win_rate']:.2f} ({row['wall_s']:.0f} s)", flush=True)
            with open(os.path.join(args.out, "comparison.json"), "w") as fh:
                json.dump({"budget_s": args.budget_s, "ranks": args.ranks, "overrides": overrides, "runs": rows},
                          fh, indent=1)
    markdown = table(rows, args.estimators)
    with open(os.path.join(args.out, "comparison.md"), "w") as fh:
        fh.write(markdown + "\n")
    curves = {e: [[json.loads(line) for line in open(os.path.join(r["out"], "metrics.jsonl"))]
                  for r in rows if r["estimator"] == e] for e in args.estimators}
    plot = plot_score_comparison(curves, args.budget_s, os.path.join(args.out, "score_vs_time.png"))
    print(f"{markdown}\n{plot}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_s", type=float, default=90.0, help="training seconds per run (default 90)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    parser.add_argument("--estimators", default=",".join(ADVANTAGE_ESTIMATORS), help="comma-separated "
                        f"(default {','.join(ADVANTAGE_ESTIMATORS)})")
    parser.add_argument("--ranks", type=int, default=2, help="ranks per run (default 2)")
    parser.add_argument("--eval_prompts", type=int, default=64, help="held-out prompts per evaluation")
    parser.add_argument("--out", default="runs/estimators", help="output directory (default runs/estimators)")
    args, overrides = parser.parse_known_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.estimators = args.estimators.split(",")
    unknown = [e for e in args.estimators if e not in ADVANTAGE_ESTIMATORS]
    if unknown:
        parser.error(f"--estimators: {', '.join(unknown)} unknown; choose from {', '.join(ADVANTAGE_ESTIMATORS)}")
    return run_main(lambda: compare(args, overrides))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
