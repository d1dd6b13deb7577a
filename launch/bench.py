"""Performance figures of one PPO iteration and of its parts, as a table and one flat JSON object.

    python launch/bench.py                          # the CPU set (embedded default, 1 and 2 ranks), < 5 minutes
    python launch/bench.py --json new.json          # also write the figures
    python launch/bench.py --compare old.json new.json   # per-key ratios; regressions > 10% flagged (exit 1)
    python launch/bench.py --model qwen2-small      # random-init Qwen2, 8 layers x 512 (40M parameters)
    python launch/bench.py --model qwen2-0.5b-shape:2   # the real models' stand-ins, 2 of 24 layers (full depth: GPU)
    python launch/bench.py --model dschat-step3 --only ranks [--zero_stage 3]   # vs DeepSpeed-Chat's step 3
    python launch/bench.py --only main --contention 1 --iterations 10   # next to a busy process, every iteration
    python launch/bench.py --only main --first_iteration   # a fresh machine's wait for the first iteration
    python launch/bench.py --quick [--ranks 1]      # smoke run, tiny sizes (what tests/test_bench.py runs)
    python launch/bench.py --only main,generation   # some of the sections below (default: all)
    python launch/bench.py [...] --field value      # PPOConfig overrides, e.g. --rollout_batch_size 32

What it measures (every section records the 1-minute load average next to its figures):
  main        PPO iterations as training runs them (natural response lengths): seconds and response tokens/s
              per phase, peak memory, model FLOPs and MFU of the update against a matmul timed in the same run
  experience  ExperienceMaker.make on the whole rollout vs one sequence at a time (same sequences)
  scaling     iteration time vs rollout batch size and vs response length (fixed-length responses), 1 rank
  generation  the same prompts, fixed length, on N ranks: ZeRO-2 (unpartitioned) vs ZeRO-3 hybrid (parameters
              gathered once per generate call) vs ZeRO-3 naive (partitioned, synced_gpus)
  ranks       the largest scaling point on N ranks (same prompts per rank), vs 1 rank
  --contention N       the main section again next to N busy processes: its slowest iteration over the idle median
  --first_iteration    on empty caches: the embedded build alone, then N-rank launch/train.py to its first iteration

The parent process starts the workers: ``--worker`` on 1 rank with python for main/experience/scaling (and
everything when --ranks 1), and on N ranks through the deepspeed launcher for generation/ranks; each writes
its JSON, the parent merges them. Every measurement follows one untimed warm-up (none with --quick) and
reports the median of its timed runs. Figures, formulas and what was measured with them: docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rlhf_ds import bench_models, benchmark  # noqa: E402  (torch only; the heavy imports wait for the workers)
from rlhf_ds.distributed import launcher_command  # noqa: E402
from rlhf_ds.errors import fail, run_main  # noqa: E402
from rlhf_ds.openmp import thread_settings  # noqa: E402

PHASES = ("generation", "experience", "update")
TARGETS = {"generation_ratio_hybrid_over_zero2": ("<=", 1.15), "generation_ratio_naive_over_hybrid": (">=", 3.0)}
QUICK = ["--rollout_batch_size", "4", "--mini_batch_size", "2", "--max_new_tokens", "8", "--ppo_epochs", "1",
         "--max_prompts", "64"]
WORKER_TIMEOUT_S = 1200


# --- the worker: runs on every rank ---------------------------------------------------------------------------

def _config(args, overrides: list[str]):
    """The PPOConfig of this benchmark: --quick sizes, then the user's overrides (which win)."""
    from rlhf_ds.config import PPOConfig

    return PPOConfig.from_args([*(QUICK if args.quick else []), *overrides,
                                "--output_dir", os.path.join(args.out, "run")])


def _fixed_length(generator, on: bool = True) -> None:
    """Suppress EOS until max_new_tokens (HF ``min_new_tokens``): every response has the same length."""
    sampler = generator.sampler
    sampler.generation_config.min_new_tokens = sampler.sampling.max_new_tokens if on else None


def _warmup(args) -> int:
    """Untimed warm-up runs before each measurement: one, none in a --quick smoke run."""
    return 0 if args.quick else 1


SECTIONS = ("main", "experience", "scaling", "generation", "ranks")


def _sections(names: str) -> list[str]:
    return [name for name in names.split(",") if name]


def chosen_sections(only: str) -> list[str]:
    """The sections ``--only`` names (all when empty), in the order they run, with "scaling" added to "ranks"
    (which compares N ranks with scaling's 1-rank point); an unknown name is an error."""
    names = set(_sections(only) or SECTIONS)
    unknown = sorted(names - set(SECTIONS))
    if unknown:
        from rlhf_ds.config import ConfigError

        raise ConfigError(f"--only {only!r}: unknown section(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(SECTIONS)}")
    if "ranks" in names:
        names.add("scaling")
    return [name for name in SECTIONS if name in names]


def _run_iterations(trainer, batches, count: int) -> list[dict]:
    """``count`` PPO iterations through ``PPOTrainer.step`` (no metrics file, no export)."""
    history = []
    for _ in range(count):
        metrics = trainer.step(next(batches))
        if "skip_reason" in metrics:
            raise RuntimeError(f"benchmark iteration skipped: {metrics['skip_reason']}")
        history.append(metrics)
        trainer.iteration += 1
    return history


UPDATE_PARTS = ("forward", "backward", "step")


class _Recorder:
    """Watches the trainer's iterations (the interface of ``rlhf_ds.trainer.StepObserver``): records, per
    iteration, the rollout's (B, L, R) (for the FLOPs of the update) and the seconds the update spent in each of
    ``UPDATE_PARTS``, timed with a device synchronisation around each part so that on a GPU the kernels count
    where they ran."""

    def __init__(self, device):
        self.device = device
        self.shapes: list[tuple[int, int, int]] = []
        self.parts: list[dict[str, float]] = []

    def clear(self) -> None:
        del self.shapes[:], self.parts[:]

    def experience(self, exp) -> None:
        self.shapes.append((exp.sequences.shape[0], exp.sequences.shape[1], exp.response_mask.shape[1]))
        self.parts.append(dict.fromkeys(UPDATE_PARTS, 0.0))

    @contextlib.contextmanager
    def update_part(self, part: str):
        benchmark.synchronize(self.device)
        start = time.perf_counter()
        yield
        benchmark.synchronize(self.device)
        self.parts[-1][part] += time.perf_counter() - start


def _median(history: list[dict], key: str) -> float:
    return statistics.median(m[key] for m in history)


def _main_section(config, engines, prompts, args, figures: dict) -> object:
    from rlhf_ds.distributed import get_world_size
    from rlhf_ds.trainer import PPOTrainer

    device = engines.actor.device
    figures["loadavg_main"] = benchmark.loadavg()
    recorder = _Recorder(device)
    trainer = PPOTrainer(config, engines, prompts, observer=recorder)
    batches = iter(trainer.loader)
    _run_iterations(trainer, batches, _warmup(args))
    recorder.clear()
    history = _run_iterations(trainer, batches, args.iterations)
    shapes = recorder.shapes
    for part in UPDATE_PARTS:
        figures[f"update_{part}_s"] = statistics.median(p[part] for p in recorder.parts)
    world = get_world_size()
    for phase in PHASES:
        figures[f"{phase}_s"] = _median(history, f"time_{phase}_s")
    iterations = [sum(m[f"time_{p}_s"] for p in PHASES) for m in history]
    figures["iteration_s"] = statistics.median(iterations)
    figures["iteration_max_s"] = max(iterations)  # the slowest timed iteration: --contention's "every iteration"
    figures["response_length"] = statistics.mean(m["response_length"] for m in history)
    response_tokens = figures["response_length"] * config.rollout_batch_size * world
    for phase in PHASES + ("iteration",):
        figures[f"{phase}_tokens_per_s"] = response_tokens / figures[f"{phase}_s"]
    for phase in PHASES:  # the trainer's own per-phase peaks (rlhf_ds/device_memory.py), largest over the iterations
        figures[f"peak_memory_{phase}_mb"] = max(m[f"peak_memory_{phase}_mb"] for m in history)
    figures["peak_memory_mb"] = max(figures[f"peak_memory_{phase}_mb"] for phase in PHASES)
    # FLOPs of the update: each timed iteration's own (B, L, R), against its own update time.
    flops = [benchmark.update_flops(engines.actor.module, None if engines.critic is None else engines.critic.module,
                                    b, length, r, config.ppo_epochs)
             for b, length, r in shapes]
    figures["update_gflop"] = statistics.mean(flops) / 1e9
    dtype = next(engines.actor.module.parameters()).dtype
    peak, n = benchmark.matmul_peak_flops(dtype, device)
    figures["matmul_peak_gflops"] = peak / 1e9
    figures["matmul_peak_n"] = n
    figures["update_mfu"] = statistics.median(
        benchmark.mfu(f, m["time_update_s"], peak) for f, m in zip(flops, history))
    figures["prompt_len"] = statistics.mean(length - r for _, length, r in shapes)
    return trainer


def _experience_section(trainer, args, figures: dict) -> None:
    """ExperienceMaker.make on the whole rollout (micro-batches of mini_batch_size) vs one row at a time."""
    figures["loadavg_experience"] = benchmark.loadavg()
    device = trainer.device
    _fixed_length(trainer.generator)
    batch = {k: v.to(device) for k, v in trainer.collate(next(iter(trainer.loader))).items()}
    sequences, response_mask = trainer.generator.generate(batch["input_ids"], batch["attention_mask"],
                                                          generator_seed=0)
    _fixed_length(trainer.generator, False)
    prompt_mask, maker = batch["attention_mask"], trainer.experience_maker
    rows = sequences.shape[0]

    def batched():
        maker.make(prompt_mask, sequences, response_mask)

    def per_sequence():
        for i in range(rows):
            maker.make(prompt_mask[i:i + 1], sequences[i:i + 1], response_mask[i:i + 1])

    seconds = benchmark.interleaved_medians({"batched": batched, "per_sequence": per_sequence}, args.repeats,
                                            device, warmup=_warmup(args))
    for mode, (wall, cpu) in seconds.items():
        figures[f"experience_{mode}_s"] = wall
        figures[f"experience_{mode}_cpu_s"] = cpu
    figures["experience_ratio_per_sequence_over_batched"] = (figures["experience_per_sequence_s"]
                                                             / figures["experience_batched_s"])


def _scaling_points(config) -> list[tuple[int, int]]:
    """(rollout_batch_size, max_new_tokens): the configured point, half the batch, half the length."""
    b, r = config.rollout_batch_size, config.max_new_tokens
    points = [(b, r)]
    if b // 2 >= 1 and (b // 2) % config.mini_batch_size == 0:
        points.append((b // 2, r))
    if r // 2 >= 1:
        points.append((b, r // 2))
    return points


def _fixed_length_iteration(config, engines, prompts, iterations: int, warmup: int) -> dict:
    """Median phase seconds and all-rank response tokens/s of ``iterations`` fixed-length iterations."""
    from rlhf_ds.distributed import get_world_size
    from rlhf_ds.trainer import PPOTrainer

    trainer = PPOTrainer(config, engines, prompts)
    _fixed_length(trainer.generator)
    batches = iter(trainer.loader)
    _run_iterations(trainer, batches, warmup)
    history = _run_iterations(trainer, batches, iterations)
    seconds = statistics.median(sum(m[f"time_{p}_s"] for p in PHASES) for m in history)
    tokens = config.rollout_batch_size * config.max_new_tokens * get_world_size()
    return {"iteration_s": seconds, "tokens_per_s": tokens / seconds,
            **{f"{p}_s": _median(history, f"time_{p}_s") for p in PHASES}}


def _scaling_section(config, engines, prompts, args, figures: dict) -> None:
    figures["loadavg_scaling"] = benchmark.loadavg()
    for b, r in _scaling_points(config):
        point = _fixed_length_iteration(dataclasses.replace(config, rollout_batch_size=b, max_new_tokens=r),
                                        engines, prompts, args.scaling_iterations, _warmup(args))
        figures[f"scaling_b{b}_r{r}_iteration_s"] = point["iteration_s"]
        figures[f"scaling_b{b}_r{r}_tokens_per_s"] = point["tokens_per_s"]


def _ranks_section(config, engines, prompts, args, figures: dict) -> None:
    from rlhf_ds.distributed import get_world_size

    world = get_world_size()
    figures[f"loadavg_ranks{world}"] = benchmark.loadavg()
    point = _fixed_length_iteration(config, engines, prompts, args.scaling_iterations, _warmup(args))
    for key, value in point.items():
        figures[f"ranks{world}_{key}"] = value


def _generation_section(config, policy_path: str, prompts, args, figures: dict) -> None:
    """Same prompts, same fixed length: ZeRO-2 vs ZeRO-3 hybrid vs ZeRO-3 naive actor engines, fresh from disk.

    Runs last in its worker: loading a ZeRO-3 model replaces ``torch.nn.functional.linear`` for the whole process
    (DeepSpeed's memory-efficient linear), which a later section of another stage would then run with.
    """
    import torch
    import torch.distributed as dist

    from rlhf_ds.data import PromptCollator, PromptLoader
    from rlhf_ds.distributed import barrier, get_rank, get_world_size
    from rlhf_ds.engines import build_engine
    from rlhf_ds.hybrid import HybridEngine
    from rlhf_ds.models import load_tokenizer

    world = get_world_size()
    figures["loadavg_generation"] = benchmark.loadavg()
    tokenizer = load_tokenizer(policy_path, config.trust_remote_code)
    hf_ds_configs: list = []  # alive as long as the engines
    engines = {stage: build_engine(dataclasses.replace(config, zero_stage=stage, offload_params=False,
                                                       offload_optimizer=False), "actor", policy_path, hf_ds_configs)
               for stage in (2, 3)}
    # One generator per mode; the two ZeRO-3 ones share the engine.
    generators = {mode: HybridEngine(engines[stage], tokenizer, config.sampling(), zero3_generation)
                  for mode, stage, zero3_generation in (("zero2", 2, "auto"), ("hybrid_zero3", 3, "gathered"),
                                                        ("naive_zero3", 3, "partitioned"))}
    for generator in generators.values():
        _fixed_length(generator)
    device = engines[2].device
    loader = PromptLoader(prompts, config.rollout_batch_size, config.seed, get_rank(), world)
    batch = {k: v.to(device) for k, v in PromptCollator(tokenizer, config.max_prompt_len)(next(iter(loader))).items()}
    seed = config.seed + get_rank()
    outputs = {}

    def run(name):
        def call():
            outputs[name] = generators[name].generate(batch["input_ids"], batch["attention_mask"],
                                                      generator_seed=seed)
        return call

    modes = {name: run(name) for name in generators}
    seconds = benchmark.interleaved_medians(modes, args.repeats, device, before=barrier, warmup=_warmup(args))
    # The slowest rank sets the pace of a step: report the maximum over ranks.
    slowest = torch.tensor([value for mode in modes for value in seconds[mode]], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    for mode, (wall, cpu) in zip(modes, slowest.view(-1, 2).tolist()):
        figures[f"generation_{mode}_s"] = wall
        figures[f"generation_{mode}_cpu_s"] = cpu
    for kind in ("", "cpu_"):
        zero2, hybrid, naive = (figures[f"generation_{mode}_{kind}s"] for mode in modes)
        figures[f"generation_{kind}ratio_hybrid_over_zero2"] = hybrid / zero2
        figures[f"generation_{kind}ratio_naive_over_hybrid"] = naive / hybrid
    figures["generation_fixed_length"] = int(all(bool(outputs[m][1].all()) for m in modes))
    figures["generation_same_tokens"] = int(all(torch.equal(outputs[m][0], outputs["zero2"][0]) for m in modes))
    figures["generation_ranks"] = world
    figures["generation_prompt_len"] = batch["input_ids"].shape[1]
    _roofline(engines[2].module, batch["input_ids"].shape, config.max_new_tokens, device, figures)


def _roofline(model, prompt_shape, new_tokens: int, device, figures: dict) -> None:
    """Generation against the memory-bandwidth roofline: the bytes every decoding step must read (all
    parameters, the KV cache so far) over the copy bandwidth measured now, by every rank at once (on a CPU the
    ranks share the memory bus, as they do while generating)."""
    from rlhf_ds.distributed import all_reduce_mean, barrier
    from rlhf_ds.models import kv_cache_bytes_per_token

    barrier()
    bandwidth = all_reduce_mean({"bandwidth": benchmark.memory_bandwidth(device)})["bandwidth"]
    dtype = next(model.parameters()).dtype
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch, prompt_len = prompt_shape
    read = benchmark.decode_bytes(param_bytes, kv_cache_bytes_per_token(model.config, dtype), batch, prompt_len,
                                  new_tokens)
    figures["memory_bandwidth_gbps"] = bandwidth / 1e9
    figures["generation_decode_gbytes"] = read / 1e9
    for mode in ("zero2", "hybrid_zero3"):
        figures[f"generation_{mode}_roofline_frac"] = read / bandwidth / figures[f"generation_{mode}_s"]


def worker(args, overrides: list[str]) -> int:
    import torch

    from rlhf_ds.data import load_prompts
    from rlhf_ds.distributed import get_world_size, init_distributed, is_main_process
    from rlhf_ds.catalog import resolve_model_paths
    from rlhf_ds.engines import build_engines

    sections = _sections(args.sections)
    config = _config(args, overrides)
    init_distributed()
    policy, critic, reward = resolve_model_paths(config)
    prompts, _ = load_prompts(config.dataset, config.train_split, config.max_prompts)
    figures: dict = {}
    if {"main", "experience", "scaling", "ranks"} & set(sections):
        engines = build_engines(config, policy, critic, reward)
        trainer = None
        if "main" in sections or "experience" in sections:
            trainer = _main_section(config, engines, prompts, args, figures)
        if "experience" in sections:
            _experience_section(trainer, args, figures)
        if "scaling" in sections:
            _scaling_section(config, engines, prompts, args, figures)
        if "ranks" in sections:
            _ranks_section(config, engines, prompts, args, figures)
    if "generation" in sections:  # last: see its docstring
        _generation_section(config, policy, prompts, args, figures)
    figures[f"threads_ranks{get_world_size()}"] = torch.get_num_threads()  # torch threads of each rank
    if is_main_process():
        with open(os.path.join(args.out, f"figures_{'_'.join(sections)}.json"), "w") as fh:
            json.dump(figures, fh)
    return 0


# --- the parent: starts the workers, merges, prints ----------------------------------------------------------

def _start_worker(args, overrides: list[str], sections: list[str], ranks: int, out: str) -> dict:
    script = os.path.abspath(__file__)
    worker_args = ["--worker", "--sections", ",".join(sections), "--out", out, "--iterations", str(args.iterations),
                   "--repeats", str(args.repeats), "--scaling_iterations", str(args.scaling_iterations),
                   *(["--quick"] if args.quick else []), *overrides]
    if ranks == 1:
        cmd = [sys.executable, script, *worker_args]
    else:
        cmd = launcher_command(script, ranks, worker_args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    print(f"[bench] {', '.join(sections)} on {ranks} rank(s) (loadavg {benchmark.loadavg():.2f}) ...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    log = os.path.join(out, f"worker_{'_'.join(sections)}.log")
    with open(log, "w") as fh:
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker ({', '.join(sections)}, {ranks} rank(s)) failed with exit code "
                           f"{proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    print(f"[bench]   done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    with open(os.path.join(out, f"figures_{'_'.join(sections)}.json")) as fh:
        return json.load(fh)


CONTENTION_TARGET = 2.5  # the slowest iteration next to busy processes / the idle median


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes that keep one core busy each (a pure-Python loop), as another user's job would."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _contention(args, overrides: list[str], out: str, idle: dict) -> dict:
    """The main section again, 1 rank, next to ``args.contention`` busy processes: its median and slowest
    iteration, and the slowest over the idle median (target <= CONTENTION_TARGET)."""
    out = os.path.join(out, "contention")
    os.makedirs(out)
    with busy_processes(args.contention):
        busy = _start_worker(args, overrides, ["main"], 1, out)
    return {"contention_processes": args.contention, "loadavg_contention": busy["loadavg_main"],
            "contention_iteration_s": busy["iteration_s"], "contention_iteration_max_s": busy["iteration_max_s"],
            "contention_max_over_idle": busy["iteration_max_s"] / idle["iteration_s"]}


FIRST_ITERATION_TARGET_S = 60.0  # the first iteration line, at most this long after a single-process build
_ITERATION_LINE = re.compile(r"^iter +\d+ ")


def first_iteration(ranks: int, overrides: list[str]) -> dict:
    """What a new user waits for on a fresh machine, both on empty ``RLHF_DS_CACHE`` and
    ``TORCH_EXTENSIONS_DIR``: ``python -m rlhf_ds.embedded build`` alone (one process), then, on other empty
    caches, ``deepspeed --num_gpus N launch/train.py`` up to its first iteration line (which also builds the
    embedded default, on one rank, and starts DeepSpeed). Target: the second at most the first + 60 s."""
    figures = {"first_iteration_ranks": ranks, "loadavg_first_iteration": benchmark.loadavg()}
    with tempfile.TemporaryDirectory(prefix="rlhf_first_") as tmp:
        def fresh(name: str) -> dict:
            return {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_DS_CACHE": os.path.join(tmp, name, "cache"),
                    "TORCH_EXTENSIONS_DIR": os.path.join(tmp, name, "extensions")}

        print("[bench] first iteration: the embedded build alone ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rlhf_ds.embedded", "build"], cwd=REPO, env=fresh("build"), check=True,
                       capture_output=True, timeout=WORKER_TIMEOUT_S)
        figures["first_iteration_build_s"] = time.perf_counter() - start
        print(f"[bench] first iteration: {ranks}-rank launch/train.py ...", file=sys.stderr, flush=True)
        cmd = launcher_command(os.path.join(REPO, "launch", "train.py"), ranks,
                               ["--iterations", "1", "--save_interval", "0", "--tensorboard", "false",
                                "--output_dir", os.path.join(tmp, "run"), *overrides])
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=fresh("run"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        seen = None
        for line in proc.stdout:
            if seen is None and _ITERATION_LINE.match(line):
                seen = time.perf_counter() - start
        if proc.wait() != 0 or seen is None:
            raise RuntimeError(f"first-iteration run failed (exit code {proc.returncode}, iteration line seen: "
                               f"{seen is not None}): {' '.join(cmd)}")
    figures["first_iteration_s"] = seen
    figures["first_iteration_after_build_s"] = seen - figures["first_iteration_build_s"]
    return figures


def _environment(args, config, ranks: int) -> dict:
    import deepspeed
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"model": args.model, "device": torch.cuda.get_device_name(0) if cuda else f"cpu x{os.cpu_count()}",
            "torch_version": torch.__version__, "deepspeed_version": deepspeed.__version__,
            "transformers_version": transformers.__version__, "ranks": ranks, "zero_stage": config.zero_stage,
            "precision": config.precision, "rollout_batch_size": config.rollout_batch_size,
            "mini_batch_size": config.mini_batch_size, "max_new_tokens": config.max_new_tokens,
            "ppo_epochs": config.ppo_epochs, "advantage_estimator": config.advantage_estimator,
            "samples_per_prompt": config.samples_per_prompt, "iterations": args.iterations, "repeats": args.repeats,
            **{name.lower(): value or "unset" for name, value in thread_settings().items()
               if name != "torch_threads"}}  # the workers inherit these; their thread counts: threads_ranks{N}


def run(args, overrides: list[str]) -> dict:
    import torch

    from rlhf_ds.catalog import resolve_model_paths

    cuda = torch.cuda.is_available()
    ranks = args.ranks if args.ranks is not None else (min(2, torch.cuda.device_count()) if cuda else 2)
    with tempfile.TemporaryDirectory(prefix="rlhf_bench_") as out:
        overrides = bench_models.model_overrides(args.model, cuda, out, overrides)
        config = _config(argparse.Namespace(quick=args.quick, out=out), overrides)
        resolve_model_paths(config)  # built here once, before the workers look for it
        figures = {**_environment(args, config, ranks), "loadavg_start": benchmark.loadavg()}
        wanted = [name for name in chosen_sections(args.only) if ranks > 1 or name != "ranks"]  # N against 1
        if args.contention and "main" not in wanted:  # the idle figure that contention is measured against
            wanted.insert(0, "main")
        multi = [name for name in ("generation", "ranks") if name in wanted] if ranks > 1 else []
        single = [name for name in wanted if name not in multi]
        if single:
            figures.update(_start_worker(args, overrides, single, 1, out))
        if multi:
            figures.update(_start_worker(args, overrides, multi, ranks, out))
        if args.contention:
            figures.update(_contention(args, overrides, out, figures))
        if args.first_iteration:
            figures.update(first_iteration(ranks, overrides))
        figures["loadavg_end"] = benchmark.loadavg()
    theirs = bench_models.DSCHAT_STEP3_S.get(config.zero_stage)
    if args.model == "dschat-step3" and ranks == 2 and theirs and "ranks2_iteration_s" in figures:
        figures["dschat_step3_iteration_s"] = theirs
        figures["ratio_over_dschat_step3"] = figures["ranks2_iteration_s"] / theirs
    return figures


def _main_lines(f: dict) -> list[str]:
    lines = [f"main: 1 rank, ZeRO-{f['zero_stage']}, {f.get('advantage_estimator', 'gae')}, "
             f"{f['rollout_batch_size']} prompts x {f['max_new_tokens']} new "
             f"tokens (natural length, mean {f['response_length']:.1f}), prompt {f['prompt_len']:.0f} tokens, median "
             f"of {f['iterations']} iterations  [loadavg {f['loadavg_main']:.2f}]",
             f"  {'phase':<12} {'seconds':>8} {'share':>6} {'resp tok/s':>11}"]
    for phase in PHASES + ("iteration",):
        share = f"{f[f'{phase}_s'] / f['iteration_s']:6.1%}" if phase != "iteration" else ""
        lines.append(f"  {phase:<12} {f[f'{phase}_s']:8.3f} {share:>6} {f[f'{phase}_tokens_per_s']:11.1f}")
    parts = ", ".join(f"{part} {f[f'update_{part}_s']:.3f} s" for part in UPDATE_PARTS)
    trained = "actor and critic" if f.get("advantage_estimator", "gae") == "gae" else "actor (no critic)"
    lines.append(f"  update, {trained}: {parts} (forward: the losses; step: the optimizer step, ZeRO and AdamW)")
    kind = "RSS" if f["device"].startswith("cpu") else "torch.cuda.max_memory_allocated"
    lines.append(f"  peak memory per phase ({kind}): " + ", ".join(
        f"{phase} {f[f'peak_memory_{phase}_mb']:.0f} MiB" for phase in PHASES))
    lines.append(f"  update: {f['update_gflop']:.2f} GFLOP per iteration (6 x params x tokens + attention, {trained} "
                 f"forward+backward), matmul peak {f['matmul_peak_gflops']:.1f} GFLOP/s "
                 f"(n={f['matmul_peak_n']}), MFU {f['update_mfu']:.1%} (GPU target >= 30%, Qwen2-0.5B)")
    return lines


def _experience_lines(f: dict) -> list[str]:
    return [f"experience, {f['rollout_batch_size']} sequences  [loadavg {f['loadavg_experience']:.2f}]",
            f"  batched (micro-batches of {f['mini_batch_size']}) {f['experience_batched_s']:.3f} s, one sequence at "
            f"a time {f['experience_per_sequence_s']:.3f} s: {f['experience_ratio_per_sequence_over_batched']:.1f}x "
            f"(CPU s: {f['experience_batched_cpu_s']:.3f} vs {f['experience_per_sequence_cpu_s']:.3f})"]


def _generation_lines(f: dict) -> list[str]:
    lines = [f"generation, {f['generation_ranks']} rank(s), {f['rollout_batch_size']} prompts x {f['max_new_tokens']} "
             f"tokens per rank (fixed length: {bool(f['generation_fixed_length'])}, same tokens in all three: "
             f"{bool(f['generation_same_tokens'])})  [loadavg {f['loadavg_generation']:.2f}]",
             f"  {'':<14} {'wall s':>8} {'CPU s':>8}   (CPU: this rank's process time, robust to other load)"]
    for mode in ("zero2", "hybrid_zero3", "naive_zero3"):
        lines.append(f"  {mode:<14} {f[f'generation_{mode}_s']:8.3f} {f[f'generation_{mode}_cpu_s']:8.3f}")
    lines.append(f"  roofline: {f['generation_decode_gbytes']:.3f} GB read (parameters + KV cache, every step) at "
                 f"{f['memory_bandwidth_gbps']:.1f} GB/s copy bandwidth per rank: zero2 "
                 f"{f['generation_zero2_roofline_frac']:.1%}, hybrid_zero3 "
                 f"{f['generation_hybrid_zero3_roofline_frac']:.1%} of it (GPU target >= 50%, Qwen2-0.5B)")
    for key, (op, target) in TARGETS.items():
        value, cpu = f[key], f[key.replace("generation_", "generation_cpu_")]
        met = value <= target if op == "<=" else value >= target
        name = key[len("generation_ratio_"):].replace("_over_", "/")
        verdict = "met" if met else "MISSED"
        lines.append(f"  {name:<14} {value:8.2f} {cpu:8.2f}   target {op} {target} (wall): {verdict}")
    return lines


def _scaling_lines(f: dict) -> list[str]:
    lines = [f"scaling, 1 rank, fixed-length responses  [loadavg {f['loadavg_scaling']:.2f}]",
             f"  {'prompts':>7} {'tokens':>6} {'iteration s':>12} {'resp tok/s':>11}"]
    for key in sorted(k for k in f if k.startswith("scaling_") and k.endswith("_iteration_s")):
        b, r = key.split("_")[1:3]
        lines.append(f"  {b[1:]:>7} {r[1:]:>6} {f[key]:12.3f} {f[key.replace('iteration_s', 'tokens_per_s')]:11.1f}")
    return lines


def _ranks_lines(f: dict) -> list[str]:
    b, r = f["rollout_batch_size"], f["max_new_tokens"]
    lines = [f"ranks, {b} prompts x {r} tokens per rank, fixed length"]
    if f"scaling_b{b}_r{r}_iteration_s" in f:
        lines.append(f"  1 rank   {f[f'scaling_b{b}_r{r}_iteration_s']:8.3f} s/iteration  "
                     f"{f[f'scaling_b{b}_r{r}_tokens_per_s']:9.1f} resp tok/s [loadavg {f['loadavg_scaling']:.2f}]")
    for key in sorted(k for k in f if k.startswith("ranks") and k.endswith("_iteration_s")):
        n = key[len("ranks"):-len("_iteration_s")]
        lines.append(f"  {n} ranks  {f[key]:8.3f} s/iteration  {f[f'ranks{n}_tokens_per_s']:9.1f} resp tok/s "
                     f"[loadavg {f[f'loadavg_ranks{n}']:.2f}]")
    if "ratio_over_dschat_step3" in f:
        # No met/missed verdict: their seconds were taken once, on another day, and this machine's speed moves
        # by 2x between days, so only a same-day pair decides the target (docs/PERFORMANCE.md).
        lines.append(f"  DeepSpeed-Chat step 3, same shapes, 2 ranks, ZeRO-{f['zero_stage']} (issue #15, this machine, "
                     f"another day): {f['dschat_step3_iteration_s']:.2f} s/iteration; ours/theirs "
                     f"{f['ratio_over_dschat_step3']:.2f} (target <= {bench_models.DSCHAT_TARGET} on the same day; "
                     "this ratio moves with the machine's speed: see docs/PERFORMANCE.md)")
    return lines


def _contention_lines(f: dict) -> list[str]:
    ratio = f["contention_max_over_idle"]
    verdict = "met" if ratio <= CONTENTION_TARGET else "MISSED"
    return [f"contention: the main section next to {f['contention_processes']} busy process(es)  "
            f"[loadavg {f['loadavg_contention']:.2f}]; GOMP_SPINCOUNT {f['gomp_spincount']}, "
            f"OMP_WAIT_POLICY {f['omp_wait_policy']}",
            f"  iteration median {f['contention_iteration_s']:.3f} s, slowest {f['contention_iteration_max_s']:.3f} s "
            f"(idle median {f['iteration_s']:.3f} s): slowest/idle {ratio:.2f}, target <= {CONTENTION_TARGET}: {verdict}"]


def _first_iteration_lines(f: dict) -> list[str]:
    after = f["first_iteration_after_build_s"]
    verdict = "met" if after <= FIRST_ITERATION_TARGET_S else "MISSED"
    return [f"first iteration on a fresh machine (empty caches)  [loadavg {f['loadavg_first_iteration']:.2f}]",
            f"  embedded build alone {f['first_iteration_build_s']:.0f} s; {f['first_iteration_ranks']}-rank "
            f"launch/train.py to its first iteration line {f['first_iteration_s']:.0f} s: {after:+.0f} s, target <= "
            f"+{FIRST_ITERATION_TARGET_S:.0f} s: {verdict}"]


# Each section's lines, shown when a figure of that section is present.
_SECTION_LINES = ((lambda key: key == "iteration_s", _main_lines),
                  (lambda key: key == "experience_batched_s", _experience_lines),
                  (lambda key: key == "generation_zero2_s", _generation_lines),
                  (lambda key: key.startswith("scaling_") and key.endswith("_iteration_s"), _scaling_lines),
                  (lambda key: key.startswith("ranks") and key.endswith("_iteration_s"), _ranks_lines),
                  (lambda key: key == "contention_max_over_idle", _contention_lines),
                  (lambda key: key == "first_iteration_s", _first_iteration_lines))


def format_figures(f: dict) -> str:
    """The human-readable table of a benchmark run: a header, then one block per section that ran."""
    threads = ", ".join(f"{k[len('threads_ranks'):]} rank(s): {v}" for k, v in sorted(f.items())
                        if k.startswith("threads_ranks"))
    blocks = [[f"rlhf-ds bench: {f['model']} on {f['device']}, torch {f['torch_version']}, deepspeed "
               f"{f['deepspeed_version']}; torch threads per rank with {threads}"]]
    for present, lines in _SECTION_LINES:
        if any(present(key) for key in f):
            blocks.append(lines(f))
    return "\n\n".join("\n".join(block) for block in blocks)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded",
                        help="embedded: the trained default; qwen2-small: a random-init 40M Qwen2; dschat-step3: "
                        "the shapes, prompts and sizes DeepSpeed-Chat's step 3 was timed with (see --only ranks); "
                        "qwen2-0.5b-shape[:LAYERS]: the stand-ins of the real models at LAYERS of 24 layers (timing "
                        "only; the full depth needs a GPU)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations of the main run (after "
                        "one warm-up; default 3)")
    parser.add_argument("--scaling_iterations", type=int, default=None, help="timed iterations per scaling and "
                        "ranks point (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of the generation and experience "
                        "comparisons (after one warm-up; default 3)")
    parser.add_argument("--ranks", type=int, default=None, help="ranks of the generation and ranks sections "
                        "(default 2 on CPU, min(2, GPUs) on GPU; 1 runs everything in one process)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 prompts x 8 tokens, 1 PPO epoch, 1 "
                        "iteration and repeat, no warm-up (checks that everything runs; the figures mean little)")
    parser.add_argument("--only", default="", help=f"comma-separated sections to run (default all: "
                        f"{','.join(SECTIONS)})")
    parser.add_argument("--contention", type=int, default=0, metavar="N", help="also run the main section next to "
                        f"N busy processes (one core each): slowest iteration over the idle median, target <= "
                        f"{CONTENTION_TARGET}")
    parser.add_argument("--first_iteration", action="store_true", help="also time a fresh machine: the embedded "
                        "build alone, then `deepspeed --num_gpus N launch/train.py` to its first iteration line, each on "
                        f"empty caches (target: at most the build + {FIRST_ITERATION_TARGET_S:.0f} s; ~4 minutes here)")
    parser.add_argument("--json", help="write the figures to this file (one flat JSON object)")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two --json files")
    parser.add_argument("--threshold", type=float, default=0.10, help="--compare: flag changes beyond this "
                        "fraction (0.10 = 10%%)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sections", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    for name, default in (("iterations", 3), ("scaling_iterations", 2), ("repeats", 3)):
        if getattr(args, name) is None:
            setattr(args, name, 1 if args.quick else default)

    if args.compare:
        old, new = (json.load(open(path)) for path in args.compare)
        rows, regressions = benchmark.compare(old, new, args.threshold)
        print(benchmark.format_compare(rows, *args.compare))
        if regressions:
            print(f"\n{len(regressions)} regression(s) > {args.threshold:.0%}: {', '.join(regressions)}")
        return 1 if regressions else 0
    if args.worker:
        return worker(args, overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return fail("run `python launch/bench.py` in one process: it starts its own ranks (--ranks N)", 2)


    def bench() -> int:
        chosen_sections(args.only)  # a bad --only fails before anything loads
        figures = run(args, overrides)
        print(format_figures(figures))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(figures, fh, indent=1)
        return 0

    return run_main(bench)


if __name__ == "__main__":
    from rlhf_ds.distributed import exit_process

    exit_process(main(sys.argv[1:]))  # its --worker ranks end as launch/train.py's do
