"""Library side of ``launch/bench.py``: model FLOPs, the machine's matmul peak, timing, and the
comparison of two benchmark JSON files.

Nothing here builds engines; the figures are plain numbers so that a benchmark run is one flat JSON object
(``{"generation_s": 0.31, ...}``) that two revisions can be compared with key by key.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from typing import Callable, Iterable, Optional

import torch

# --- FLOPs ----------------------------------------------------------------------------------------------------


def flop_params(model: torch.nn.Module) -> tuple[int, int]:
    """(body, head): parameters every token is multiplied through, and the LM head's (0 when there is none).

    The input embedding is a lookup (no FLOPs) and is left out of the body; a tied LM head (Qwen2) is counted
    once, as the head. Under ZeRO-3 a parameter's full size is ``ds_numel`` (the local tensor is a shard).
    A critic (``CriticModel``) is its backbone plus its value head, which is counted in the body.
    """
    def numel(param: torch.nn.Parameter) -> int:
        return int(getattr(param, "ds_numel", param.numel()))

    embedded = getattr(model, "backbone", model)
    embedding = embedded.get_input_embeddings().weight
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = output.weight if output is not None else None
    body = sum(numel(p) for p in model.parameters() if p is not embedding and p is not head)
    return body, (numel(head) if head is not None else 0)


def attention_dims(model: torch.nn.Module) -> tuple[int, int]:
    """(layers, attention width = heads * head_dim) of a transformer, from its config."""
    from rlhf_ds.models import head_dim  # here: the bench's parent imports this module without transformers

    config = getattr(model, "backbone", model).config
    return config.num_hidden_layers, config.num_attention_heads * head_dim(config)


def forward_backward_flops(body_params: int, sequences: int, seq_len: int, head_params: int = 0,
                           head_positions: int = 0, layers: int = 0, attention_width: int = 0) -> float:
    """Model FLOPs of one forward + backward over ``sequences`` rows of ``seq_len`` tokens.

    6 FLOPs per parameter per token (2 forward, 4 backward) for the body on every token, for the LM head only
    on the ``head_positions`` positions per row whose logits are used, plus the attention scores and their
    use, 12 * layers * attention_width * seq_len per token (PaLM, appendix B; the causal mask's half is not
    subtracted). Padding tokens count: the hardware computes them.
    """
    tokens = sequences * seq_len
    return (6.0 * body_params * tokens + 6.0 * head_params * sequences * head_positions
            + 12.0 * layers * attention_width * seq_len * tokens)


def update_flops(actor: torch.nn.Module, critic: Optional[torch.nn.Module], sequences: int, seq_len: int,
                 response_len: int, ppo_epochs: int) -> float:
    """Model FLOPs of one PPO update on one rank: ``ppo_epochs`` forward + backward passes of actor and critic
    (None: a critic-free estimator) over ``sequences`` rows of ``seq_len`` (prompt + response) tokens; the actor's LM head only on the
    ``response_len`` positions that predict response tokens. Optimizer steps and the loss maths are not
    counted (they are O(params) and O(tokens x vocab), small next to the matmuls)."""
    total = 0.0
    for model, head_positions in ((actor, response_len), (critic, 0)):
        if model is None:
            continue
        body, head = flop_params(model)
        layers, width = attention_dims(model)
        total += forward_backward_flops(body, sequences, seq_len, head, head_positions, layers, width)
    return ppo_epochs * total


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, min_seconds: float = 0.2,
                      max_n: Optional[int] = None, repeats: int = 3) -> tuple[float, int]:
    """Best FLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` on ``device``: the peak the MFU is measured against.

    n doubles from 256 until one matmul takes ``min_seconds`` / repeats or n reaches ``max_n`` (4096 on CPU,
    16384 on an accelerator), so a slow dtype (bf16 on a CPU without AMX) does not take minutes. Returns
    (FLOP/s, n). Uses this process's torch threads, i.e. what one rank has.
    """
    if max_n is None:
        max_n = 4096 if device.type == "cpu" else 16384
    n, best = 256, 0.0
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up: kernel selection, page faults
        synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - start)
        best = max(best, 2.0 * n**3 / min(times))
        if min(times) * repeats >= min_seconds or n >= max_n:
            return best, n
        n *= 2


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s."""
    return flops / seconds / peak_flops


# --- the memory-bandwidth roofline of decoding ------------------------------------------------------------------


def decode_bytes(param_bytes: int, kv_bytes_per_token: int, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Bytes a decoder must read to generate ``new_tokens`` tokens for ``batch`` rows after ``prompt_len``-token
    prompts: every step reads all parameters once and the whole KV cache so far (step t, counting from 0, reads
    the cache of prompt_len + t tokens per row; step 0 is the prefill, which reads the parameters once too).
    Activations and logits are left out: small next to the weights at the batch sizes RLHF decodes with."""
    cache_tokens = batch * (new_tokens * prompt_len + new_tokens * (new_tokens - 1) // 2)  # sum of (P + t)
    return new_tokens * param_bytes + kv_bytes_per_token * cache_tokens


def memory_bandwidth(device: torch.device, nbytes: Optional[int] = None, repeats: int = 5) -> float:
    """Best bytes/s of copying an ``nbytes`` buffer (read + write counted) on ``device``: the roofline's
    bandwidth, measured in the same run. Default size: 256 MiB on a CPU (beyond any cache), 1 GiB on a GPU."""
    if nbytes is None:
        nbytes = 256 * 2**20 if device.type == "cpu" else 2**30
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page faults
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


# --- timing and memory --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels: a timer around asynchronous GPU work measures only their launch otherwise (and
    the trainer's phase clock would charge one phase's kernels to the next)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) that ``fn()`` takes, kernels included.

    CPU time counts only this process's own threads, so on a shared machine it is far less disturbed by other
    processes than wall time (and with one torch thread per rank it is the work done); on a GPU it misses
    the kernels and only the wall time means anything.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                        before: Callable[[], None] = lambda: None,
                        warmup: int = 1) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each ``fns`` entry over ``repeats`` rounds, after ``warmup`` untimed runs each.

    The entries take turns within each round, so a change of machine load during the measurement hits all of
    them alike instead of biasing the ratio between them. ``before`` runs before every call (e.g. a barrier).
    """
    for _ in range(warmup):
        for fn in fns.values():
            before()
            fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before()
            samples[name].append(timed(fn, device))
    return {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
            for name, values in samples.items()}


def loadavg() -> float:
    """The 1-minute load average (0 where the OS has none): recorded with every figure to spot noisy ones."""
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return 0.0


# --- comparing two runs ---------------------------------------------------------------------------------------

# Ratios whose better direction the key's suffix does not tell.
_RATIO_DIRECTIONS = {
    "generation_ratio_hybrid_over_zero2": "lower",
    "generation_ratio_naive_over_hybrid": "higher",
    "generation_cpu_ratio_hybrid_over_zero2": "lower",
    "generation_cpu_ratio_naive_over_hybrid": "higher",
    "contention_max_over_idle": "lower",
    "ratio_over_dschat_step3": "lower",
    "experience_ratio_per_sequence_over_batched": None,  # two alternatives, either may move: see their seconds
}


def direction(key: str) -> Optional[str]:
    """"lower" or "higher" is better for a figure; None for a setting, an environment fact or a ratio without a
    target (not compared for regressions): seconds and MiB are lower-is-better, rates, MFU and roofline
    fractions higher-is-better, the generation ratios follow their targets (hybrid/zero2 lower, naive/hybrid
    higher)."""
    if key in _RATIO_DIRECTIONS:
        return _RATIO_DIRECTIONS[key]
    if key.startswith(("loadavg", "matmul_peak", "memory_bandwidth")) or "_ratio_" in key:
        return None
    if key.endswith(("_per_s", "_mfu", "_roofline_frac")):
        return "higher"
    if key.endswith(("_s", "_mb")):
        return "lower"
    return None


def compare(old: dict, new: dict, threshold: float = 0.10) -> tuple[list[tuple], list[str]]:
    """Per-key ratios new/old for the keys both runs have.

    Returns (rows, regressions): rows are (key, old, new, ratio or None, flag) with flag "REGRESSION" when the
    figure got worse by more than ``threshold`` (10%) in its better direction, "improved" when it got better
    by more than that, "" otherwise (and for keys without a direction, or non-numbers); regressions lists
    the regressed keys.
    """
    rows, regressions = [], []
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        if not numeric:
            rows.append((key, a, b, None, ""))
            continue
        ratio = b / a if a else (math.inf if b else 1.0)
        better = direction(key)
        flag = ""
        if better is not None and math.isfinite(ratio) and a:
            worse = ratio > 1 + threshold if better == "lower" else ratio < 1 / (1 + threshold)
            improved = ratio < 1 / (1 + threshold) if better == "lower" else ratio > 1 + threshold
            flag = "REGRESSION" if worse else "improved" if improved else ""
        if flag == "REGRESSION":
            regressions.append(key)
        rows.append((key, a, b, ratio, flag))
    return rows, regressions


def format_compare(rows: Iterable[tuple], old_name: str, new_name: str) -> str:
    """The rows of ``compare`` as an aligned text table."""
    def show(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = [f"{'key':<46} {'old':>12} {'new':>12} {'new/old':>8}  ({old_name} -> {new_name})"]
    for key, a, b, ratio, flag in rows:
        shown_ratio = "" if ratio is None else f"{ratio:8.3f}"
        lines.append(f"{key:<46} {show(a):>12} {show(b):>12} {shown_ratio:>8}  {flag}".rstrip())
    return "\n".join(lines)
