"""Multi-rank tests: 2 CPU ranks with gloo (forked with the launcher's environment: tests/forked.py), no mocks.

Each launch runs a script from tests/dist/ that writes one JSON per rank; the assertions here compare
ranks with each other and with a single-process computation on the same data. One launch per
configuration (module-scoped fixtures), so the whole file costs a handful of launches.
"""
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forked

from rlhf_ds.distributed import (all_reduce_max, all_reduce_mean, barrier, free_port, get_rank, get_world_size,
                                 global_explained_variance, global_masked_mean, global_masked_moments,
                                 global_masked_whiten, global_token_counts, is_main_process)
from rlhf_ds.files import describe_files, share
from rlhf_ds.ppo import WHITEN_EPS
from rlhf_ds.sampling import response_mask_from_tokens

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "tests" / "dist"
RANKS = 2
LAUNCH_TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < RANKS,
                                reason=f"the launcher would start {RANKS} ranks on one GPU")


@functools.cache
def prepare_training_runs() -> None:
    """Before launching launch/train.py on several ranks: the embedded default built here with all cores (a rank
    would build it with its share of the threads while the other rank waits)."""
    from rlhf_ds.embedded import build

    build()


def launch_script(name: str):
    """launch/<name>.py as a module, loaded by its path (a package of the same name cannot shadow it)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(script: str, out_dir: Path, *args: str) -> list[dict]:
    """Run tests/dist/<script> on RANKS ranks (forked: tests/forked.py); return each rank's JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    job = forked.start(DIST / script, list(args), ranks=RANKS, cwd=REPO)
    proc = job.wait(LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"{script} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    mapped = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{job.port}_*"))
    assert not mapped, f"DeepSpeed's shm all-reduce op ran (distributed._skip_shm_comm_op): {mapped}"
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(RANKS)]


def _fixtures_module():
    spec = importlib.util.spec_from_file_location("dist_fixtures", DIST / "fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    _fixtures_module().build_models(str(root))
    return root


# --- global statistics ------------------------------------------------------------------------------

def last_rank_file(path: Path, world_size: int) -> Path:
    """The first file of the last rank's hashing share of checkpoint ``path`` (``files.share``)."""
    names = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    return path / share(str(path), names, (world_size - 1, world_size))[0]


def damaged_checkpoint(path: Path, world_size: int) -> None:
    """A checkpoint directory (files of several sizes, manifest, trainer state) in which one file of the last
    rank's hashing share has one flipped byte, same size."""
    path.mkdir(parents=True)
    for i in range(6):
        (path / f"shard{i}.bin").write_bytes(os.urandom(1000 * (i + 1)))
    (path / "trainer_state.json").write_text(json.dumps({"iteration": 2}))
    (path / "manifest.json").write_text(json.dumps(describe_files(str(path))))
    victim = last_rank_file(path, world_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats")
    damaged_checkpoint(out / "damaged", RANKS)
    return out, launch("run_stats.py", out, str(out))


def test_rank_helpers(stats_run):
    _, results = stats_run
    assert [r["rank"] for r in results] == list(range(RANKS))
    assert all(r["world_size"] == RANKS for r in results)
    assert [r["is_main"] for r in results] == [True] + [False] * (RANKS - 1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if "OMP_NUM_THREADS" not in os.environ:
        assert all(r["threads"] == max(1, cpus // RANKS) for r in results)


def test_global_masked_stats_equal_single_process(stats_run):
    out, results = stats_run
    data = [torch.load(out / f"data{rank}.pt") for rank in range(RANKS)]
    assert len({int(d["mask"].sum()) for d in data}) == RANKS, "ranks must hold different token counts"
    valid = torch.cat([d["x"][d["mask"].bool()] for d in data]).double()
    mean, var = valid.mean(), valid.var(unbiased=True)
    for d, r in zip(data, results):
        x, mask = d["x"].double(), d["mask"].bool()
        whitened = torch.where(mask, (x - mean) / torch.sqrt(var + WHITEN_EPS), 0.0)
        assert r["mean"] == pytest.approx(mean.item(), rel=1e-6)
        torch.testing.assert_close(torch.tensor(r["whiten"]).double(), whitened, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(r["whiten_no_shift"]).double(),
                                   torch.where(mask, whitened + mean, 0.0), rtol=1e-5, atol=1e-5)


def test_all_reduce_mean_identical_on_all_ranks(stats_run):
    _, results = stats_run
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["metrics"] == pytest.approx({"loss": 1.5, "kl": 0.15, "reward": -1.0})


def test_checkpoint_hashing_is_split_and_every_rank_raises_the_same_error(stats_run):
    """Each rank hashes one share of the files; the flipped byte lies in the last rank's share, yet every rank
    names it (the shares are disjoint and cover every file: tests/test_checkpoint.py's manifest check)."""
    out, results = stats_run
    victim = last_rank_file(out / "damaged", RANKS)
    for r in results:
        assert r["gathered"] == [{"rank": rank} for rank in range(RANKS)]
        assert f"{victim} does not match its sha256" in r["verify_error"], r["verify_error"]


def test_all_reduce_max_and_any_rank(stats_run):
    _, results = stats_run
    for r in results:
        assert r["max"] == {"low": -1.0, "peak": 150.0}
        assert (r["any_rank1"], r["any_none"]) == (True, False), "a flag raised on one rank is seen by all"


def test_helpers_without_process_group():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert get_rank() == 0 and get_world_size() == 1 and is_main_process()
    barrier()
    assert global_masked_mean(x, mask).item() == pytest.approx(2.5)
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).var(unbiased=True).add(WHITEN_EPS).sqrt()
    expected = torch.tensor([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / std
    torch.testing.assert_close(global_masked_whiten(x, mask), expected)
    assert all_reduce_mean({"b": 2, "a": 1.0}) == {"a": 1.0, "b": 2.0}
    assert all_reduce_max({"b": 2, "a": 1.0}) == {"a": 1.0, "b": 2.0}
    # One valid token over all ranks: no spread to divide by, so it is only centred (to 0), never an error.
    one_token = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert global_masked_whiten(x, one_token).tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert global_masked_whiten(x, one_token, shift_mean=False).tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # The critic's explained variance over the pooled tokens, against its definition; absent below 2 tokens.
    values, returns = torch.tensor([[0.5, 1.0, 9.0], [2.0, 0.0, 0.0]]), x
    residual, target = [1.0 - 0.5, 2.0 - 1.0, 3.0 - 9.0, 4.0 - 2.0], [1.0, 2.0, 3.0, 4.0]
    expected_ev = 1 - torch.tensor(residual).var() / torch.tensor(target).var()
    assert global_explained_variance(values, returns, mask) == pytest.approx(expected_ev.item())
    assert global_explained_variance(values, returns, one_token) is None
    assert global_token_counts([mask, one_token]) == [4.0, 1.0]
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, var, count = global_masked_moments(scores, torch.ones_like(scores), unbiased=False)
    assert (mean.item(), var.item(), count) == (2.5, 1.25, 4)  # population variance, as the reward moments need
    assert global_masked_moments(scores, torch.ones_like(scores))[1].item() == pytest.approx(5 / 3)


def _bare_env(**extra: str) -> dict:
    """This environment without any launcher variable, plus ``extra``."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
                "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_plain_python_run_gets_single_process_defaults():
    """No launcher: init_distributed must not fall into DeepSpeed's MPI discovery."""
    code = ("import os, torch; from rlhf_ds.distributed import init_distributed, get_world_size;"
            "init_distributed(); init_distributed();"
            "print(get_world_size(), os.environ['RANK'], os.environ['MASTER_ADDR'], torch.get_num_threads())")
    proc = subprocess.run([sys.executable, "-c", code], env=_bare_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    world, rank, addr, threads = proc.stdout.split()[-4:]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert (world, rank, addr, int(threads)) == ("1", "0", "127.0.0.1", cpus)


def test_srun_tasks_become_ranks():
    """What srun exports (no RANK/WORLD_SIZE) is enough for the tasks to find each other."""
    code = ("import torch; from rlhf_ds.distributed import init_distributed, get_rank, get_world_size, all_reduce_sum;"
            "init_distributed(); print(get_rank(), get_world_size(), all_reduce_sum(torch.ones(1)).item())")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_bare_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                                            SLURM_STEP_NUM_TASKS=str(RANKS), MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=port))
             for rank in range(RANKS)]
    outputs = [proc.communicate(timeout=LAUNCH_TIMEOUT_S) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-3000:] for _, err in outputs]
    assert [out.split()[-3:] for out, _ in outputs] == [[str(rank), str(RANKS), f"{RANKS}.0"] for rank in range(RANKS)]


def test_multi_task_run_without_rendezvous_is_an_error():
    code = "from rlhf_ds.distributed import init_distributed; init_distributed()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env=_bare_env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS=str(RANKS)))
    assert proc.returncode != 0 and "MASTER_ADDR, MASTER_PORT not set" in proc.stderr


# --- engines, training steps and hybrid generation -------------------------------------------------

@pytest.fixture(scope="module")
def zero3_json(tmp_path_factory) -> Path:
    """zero3.json with every parameter partitioned: the shipped persistence threshold would keep all of
    the tiny model's parameters whole, and the test would not exercise ZeRO-3 at all."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_all_partitioned.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def engine_runs(tiny_models, zero3_json, tmp_path_factory) -> list[dict]:
    """One launch for run_engines.py's three configurations (ZeRO-2; ZeRO-3; ZeRO-3 bf16 with gradient
    checkpointing), built one after the other in the same ranks."""
    out = tmp_path_factory.mktemp("engines")
    return launch("run_engines.py", out, "--models", str(tiny_models), "--out", str(out),
                  "--zero3-config", str(zero3_json))


@pytest.fixture(scope="module")
def zero2_run(engine_runs):
    return [r["zero2"] for r in engine_runs]


@pytest.fixture(scope="module")
def zero3_run(engine_runs):
    return [r["zero3"] for r in engine_runs]


@pytest.fixture(scope="module")
def zero3_bf16_run(engine_runs):
    return [r["zero3_bf16"] for r in engine_runs]


@pytest.mark.parametrize("run", ["zero2_run", "zero3_run", "zero3_bf16_run"])
def test_training_steps_keep_ranks_identical(run, request):
    results = request.getfixturevalue(run)
    for role in ("actor", "critic", "reference", "reward"):
        assert len({r["before"][role] for r in results}) == 1, f"{role} differs between ranks at start"
        assert len({r["after"][role] for r in results}) == 1, f"{role} differs between ranks after training"
    for r in results:
        assert r["after"]["actor"] != r["before"]["actor"] and r["after"]["critic"] != r["before"]["critic"]
        assert r["after"]["reference"] == r["before"]["reference"]
        assert r["after"]["reward"] == r["before"]["reward"]
        assert all(math.isfinite(v) for step in r["losses"] for v in step.values())
        assert r["losses"][0]["critic"] == pytest.approx(1.0), "value head must start at 0"
        assert r["train_mode_restored"]


def test_an_engine_loads_by_its_own_stage_whatever_was_built_before(zero2_run, zero3_run):
    """A ZeRO-2 engine built after ZeRO-3 ones loads whole, a ZeRO-3 one after ZeRO-2 ones partitioned."""
    assert all(r["other_stage_partitioned"] for r in zero2_run)
    assert not any(r["other_stage_partitioned"] for r in zero3_run)


def test_zero3_generation_matches_zero2(zero2_run, zero3_run):
    for z2, z3 in zip(zero2_run, zero3_run):
        assert z2["before"]["actor"] == z3["before"]["actor"], "both runs must start from the same weights"
        assert z3["sequences"] == z2["sequences"]
        assert z3["response_mask"] == z2["response_mask"]


@pytest.mark.parametrize("run", ["zero3_run", "zero3_bf16_run"])
def test_zero3_gathered_generation_matches_partitioned(run, request):
    for r in request.getfixturevalue(run):
        assert r["generation"] == "gathered", "auto gathers when the actor fits"
        assert r["naive_sequences"] == r["sequences"]
        assert r["naive_response_mask"] == r["response_mask"]


def test_zero3_auto_generation_falls_back_to_partitioned_on_every_rank(zero3_run):
    """Rank 1 reports no free memory: both ranks generate partitioned (a lone gathering rank would hang the
    other's synced_gpus steps), with the same tokens; rank 0 warns once."""
    for r in zero3_run:
        assert (r["fallback_generation"], r["fallback_calls"]) == ("partitioned", 1)
        assert r["fallback_sequences"] == r["sequences"]
    assert len(zero3_run[0]["fallback_warnings"]) == 1 and "zero3_generation" in zero3_run[0]["fallback_warnings"][0]
    assert zero3_run[1]["fallback_warnings"] == []


def test_zero2_generation_is_unpartitioned(zero2_run):
    assert {r["generation"] for r in zero2_run} == {"unpartitioned"}
    assert {r["gather_bytes"] for r in zero2_run} == {0}


@pytest.mark.parametrize("run, element_size", [("zero3_run", 4), ("zero3_bf16_run", 2)])
def test_gather_bytes_is_the_whole_partitioned_actor(run, element_size, tiny_models, request):
    """Every parameter is partitioned (persistence threshold 0), so a gather allocates the full model."""
    from transformers import AutoModelForCausalLM

    numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_models / "policy").parameters())
    assert {r["gather_bytes"] for r in request.getfixturevalue(run)} == {numel * element_size}


def test_generated_response_mask_and_padding(zero3_run):
    early_stops = full_rows = 0
    for r in zero3_run:
        sequences = torch.tensor(r["sequences"])
        response = sequences[:, r["prompt_len"]:]
        mask = torch.tensor(r["response_mask"])
        assert mask.shape == response.shape and response.shape[1] == 12
        assert torch.equal(mask, response_mask_from_tokens(response, r["eos_token_id"]))
        for row, row_mask in zip(response, mask):
            valid = int(row_mask.sum())
            if valid < len(row):
                early_stops += 1
                assert row[valid - 1] == r["eos_token_id"]
                assert torch.all(row[valid:] == r["pad_token_id"])
            else:
                full_rows += 1
    assert early_stops and full_rows, "fixture/seed no longer produce both kinds of rows: change the seed"
