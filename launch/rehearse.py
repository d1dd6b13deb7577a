"""Rehearse the real run here: launch/configs/qwen2_hh.yaml with the stand-ins of its models, on N ranks.

    python launch/rehearse.py                          # 2 ranks, 2 of 24 layers, ZeRO-2/3 x fp32/bf16, 2 iterations
    python launch/rehearse.py --layers 24 --ranks 8    # the real depth, on a GPU node
    python launch/rehearse.py --quick                  # 1 layer, short dialogues, few tokens
    python launch/rehearse.py --quick --stages 3 --precisions bf16 --no_resume   # what CI runs
    python launch/rehearse.py [...] --field value      # PPOConfig overrides for every run, e.g. --max_new_tokens 32

The stand-ins (``rlhf_ds/standins.py``) are random-weight models of the real architectures at their exact widths,
vocabularies and tokenizer types: a 151,936-token Qwen2 with tied embeddings and GQA 14/2, and a DeBERTa-v3-large
with relative attention read through a SentencePiece (Unigram) tokenizer. Only the depth is reduced. The prompts
are long multi-turn dialogues written for the rehearsal, so prompts are cut at ``max_prompt_len`` and the reward
model's (question, answer) pairs at ``reward_max_len``, from the left, as long HH-RLHF dialogues are.

Each (ZeRO stage, precision) is one run of ``launch/train.py`` through the DeepSpeed launcher for ``--iterations``
iterations, then the same command with ``--resume auto`` for one more (unless ``--no_resume``), then
``launch/export.py`` of its last checkpoint. A run passes when its metrics are finite, no rollout was skipped,
prompts and reward inputs were cut (``prompts_truncated``, ``reward_inputs_truncated`` > 0), the last iteration
(the resumed one, unless ``--no_resume``) continues the KL controller where the one before left it, and the
export loads as a causal LM with the real vocabulary. One line per run, then a table; exit 1 on a failure.
Logs and outputs stay in ``--out`` (default: a new directory under /tmp); a passing run's checkpoints (several GB
each) are deleted once checked and exported, unless ``--keep_checkpoints``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rlhf_ds.distributed import launcher_command  # noqa: E402
from rlhf_ds.errors import run_main  # noqa: E402

CONFIG = os.path.join(REPO, "launch", "configs", "qwen2_hh.yaml")
# --quick: a few tokens everywhere, and limits small enough that the dialogues are still cut
QUICK = ["--rollout_batch_size", "2", "--mini_batch_size", "2", "--max_new_tokens", "8", "--max_prompt_len", "96",
         "--reward_max_len", "64"]
RUN_TIMEOUT_S = 3600


def rehearsal_dialogues(path: str, count: int, turns: int) -> str:
    """Write ``count`` HH-format records whose dialogues chain ``turns`` exchanges of the embedded corpus (each
    several hundred tokens long) to ``path``; returns it. Chosen and rejected share the dialogue and differ in
    the last answer, as in HH-RLHF."""
    from rlhf_ds.corpus import make_split

    records = make_split("train")
    with open(path, "w") as fh:
        for i in range(count):
            start = (i * turns) % (len(records) - turns)
            history = "".join(r["chosen"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: Sure." for r in
                              records[start:start + turns - 1])
            last = records[start + turns - 1]
            fh.write(json.dumps({"chosen": history + last["chosen"], "rejected": history + last["rejected"]}) + "\n")
    return path


# glibc keeps freed heap memory and fragments it: without these, a ZeRO-3 run's RSS peaks grow 50-180 MiB per
# iteration (1 layer, bf16) although the live tensors do not, and the peaks measure the allocator, not the run.
# Large blocks mmap'd (returned to the system on free) make RSS follow the live bytes, as a GPU's allocated-bytes
# counter does; set either variable yourself to override.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _run(cmd: list[str], log: str) -> int:
    env = {**ALLOCATOR_ENV, **os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT_S).returncode


def _train(args, ranks: int, out: str, iterations: int, stage: int, precision: str, data: str,
           overrides: list[str], log: str) -> int:
    policy, reward = f"qwen2-0.5b-shape:{args.layers}", f"deberta-v3-large-shape:{args.layers}"
    cmd = launcher_command(os.path.join(REPO, "launch", "train.py"), ranks, [
        "--config", CONFIG, "--policy_model", policy, "--critic_model", policy, "--reward_model", reward,
        "--dataset", data, "--iterations", str(iterations), "--save_interval", str(iterations),
        "--zero_stage", str(stage), "--precision", precision, "--output_dir", out, "--tensorboard", "false",
        "--resume", "auto", *(QUICK if args.quick else []), *overrides])
    return _run(cmd, log)


def check_run(out: str, iterations: int, export_dir: str) -> list[str]:
    """What is wrong with a finished rehearsal run of ``iterations`` iterations in all (empty when nothing):
    see the module docstring."""
    problems = []
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    if [m["iteration"] for m in metrics] != list(range(iterations)):
        problems.append(f"iterations logged {[m['iteration'] for m in metrics]}, expected 0..{iterations - 1}")
    bad = sorted({k for m in metrics for k, v in m.items()
                  if isinstance(v, float) and not math.isfinite(v)})
    if bad:
        problems.append(f"non-finite metrics: {', '.join(bad)}")
    if any(m.get("skipped_batches", 0) or "skip_reason" in m for m in metrics):
        problems.append("a rollout was skipped")
    for metric, limit in (("prompts_truncated", "max_prompt_len"), ("reward_inputs_truncated", "reward_max_len")):
        if not any(m.get(metric, 0) > 0 for m in metrics):
            problems.append(f"{metric} is 0: no input was cut at {limit} (the long dialogues should be)")
    if len(metrics) > 1 and metrics[-1]["kl_coef"] != metrics[-2]["next_kl_coef"]:
        problems.append(f"last iteration's kl_coef {metrics[-1]['kl_coef']} != the iteration before's "
                        f"next_kl_coef {metrics[-2]['next_kl_coef']}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(export_dir)
    if config.vocab_size != 151936 or not os.path.isfile(os.path.join(export_dir, "model.safetensors")):
        problems.append(f"the export {export_dir} is not the 151,936-token Qwen2 in safetensors")
    return problems


def rehearse(args, overrides: list[str]) -> int:
    import torch

    from rlhf_ds.catalog import resolve_model_paths
    from rlhf_ds.config import PPOConfig

    cuda = torch.cuda.is_available()
    ranks = args.ranks or (torch.cuda.device_count() if cuda else 2)
    root = args.out or tempfile.mkdtemp(prefix="rlhf_rehearsal_")
    os.makedirs(root, exist_ok=True)
    data = rehearsal_dialogues(os.path.join(root, "dialogues.jsonl"), count=64, turns=5 if args.quick else 32)
    layers = f"{args.layers}"
    resolve_model_paths(PPOConfig(policy_model=f"qwen2-0.5b-shape:{layers}",
                                  reward_model=f"deberta-v3-large-shape:{layers}"))  # build once, before the ranks
    rows, failed = [], False
    for stage in args.stages:
        for precision in args.precisions:
            name = f"zero{stage}_{precision}"
            out, log = os.path.join(root, name), os.path.join(root, f"{name}.log")
            start = time.perf_counter()
            iterations = args.iterations + (0 if args.no_resume else 1)
            codes = [_train(args, ranks, out, args.iterations, stage, precision, data, overrides, log)]
            if not args.no_resume:
                codes.append(_train(args, ranks, out, iterations, stage, precision, data, overrides, log))
            export_dir = os.path.join(root, f"{name}_policy")  # outside the run directory, as export requires
            codes.append(_run([sys.executable, os.path.join(REPO, "launch", "export.py"), out, export_dir,
                               "--overwrite"], log))
            problems = ([f"exit codes {codes} (train, {'' if args.no_resume else 'resume, '}export): see {log}"]
                        if any(codes) else check_run(out, iterations, export_dir))
            failed |= bool(problems)
            if not problems and not args.keep_checkpoints:  # several GB per run, checked and exported
                shutil.rmtree(os.path.join(out, "checkpoints"))
            seconds = time.perf_counter() - start
            print(f"[rehearse] {name}: {'FAILED: ' + '; '.join(problems) if problems else 'ok'} ({seconds:.0f} s)",
                  flush=True)
            rows.append((name, problems, seconds, out))
    print(format_table(rows, ranks, args.layers))
    print(f"logs and outputs in {root}")
    return 1 if failed else 0


def memory_comparison(out: str) -> dict[str, tuple[float, float]]:
    """phase -> (measured, predicted) peak MiB per rank: the last iteration's per-phase peaks (the largest over
    the ranks) against the memory plan the run saved before loading (``run_info.json``, ``rlhf_ds.memory``)."""
    last = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    planned = json.load(open(os.path.join(out, "run_info.json")))["memory_plan"]["predicted_peak_mb"]
    return {phase: (last[f"peak_memory_{phase}_mb"], planned[phase]) for phase in planned}


def format_table(rows: list, ranks: int, layers: int) -> str:
    """One line per run: verdict, wall time, and the last iteration's seconds, peak memory per phase measured and
    as the memory plan predicted it, and reward figures."""
    lines = [f"rehearsal: {ranks} rank(s), stand-ins at {layers} of 24 layers; peak MiB per rank measured/predicted",
             f"  {'run':<12} {'verdict':<7} {'wall s':>7} {'iter s':>7} {'generation':>12} {'experience':>12} "
             f"{'update':>12} {'score':>7} {'KL':>8} {'cut':>5}"]
    for name, problems, seconds, out in rows:
        path = os.path.join(out, "metrics.jsonl")
        last = json.loads(open(path).read().splitlines()[-1]) if os.path.isfile(path) else {}
        if not last:
            lines.append(f"  {name:<12} {'FAILED':<7} {seconds:7.0f}")
            continue
        iteration_s = sum(last[f"time_{p}_s"] for p in ("generation", "experience", "update"))
        peaks = "".join(f" {measured:6.0f}/{predicted:<5.0f}" for measured, predicted in
                        memory_comparison(out).values())
        lines.append(f"  {name:<12} {'FAILED' if problems else 'ok':<7} {seconds:7.0f} {iteration_s:7.1f}{peaks} "
                     f"{last['score_mean']:7.3f} {last['kl_divergence']:8.4f} {last['reward_inputs_truncated']:5.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="layers of both stand-ins (of 24; default 2, "
                        "--quick 1)")
    parser.add_argument("--ranks", type=int, default=None, help="ranks per run (default: 2 on CPU, every GPU)")
    parser.add_argument("--stages", default="2,3", help="ZeRO stages, comma-separated (default 2,3)")
    parser.add_argument("--precisions", default="fp32,bf16", help="precisions, comma-separated (default fp32,bf16)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations before the resume (default 2, "
                        "--quick 1)")
    parser.add_argument("--quick", action="store_true", help="1 layer, short dialogues, 8 new tokens")
    parser.add_argument("--no_resume", action="store_true", help="train and export only, no resumed run (CI's "
                        "rehearsal: tests/test_checkpoint.py resumes ZeRO-3 bf16 bit for bit on tiny models)")
    parser.add_argument("--out", help="directory for the runs (default: a new one under /tmp)")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep a passing run's checkpoints (by "
                        "default deleted once checked and exported: several GB per run)")
    args, overrides = parser.parse_known_args(argv)
    args.layers = args.layers or (1 if args.quick else 2)
    args.iterations = args.iterations or (1 if args.quick else 2)
    args.stages = [int(s) for s in args.stages.split(",")]
    args.precisions = args.precisions.split(",")
    return run_main(lambda: rehearse(args, overrides))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
