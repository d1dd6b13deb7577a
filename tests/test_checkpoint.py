"""Checkpoints: exact resume on 2 real ranks, survival of SIGKILL (mid-run and mid-save) and of a full disk, and
one-line errors for missing or corrupt checkpoints; HF export from a checkpoint. (SIGTERM: tests/test_slurm.py.)

Every 2-rank run goes through launch/train.py (tests/dist/run_cli.py adds sample hashing and fault injection)
with the same small configuration, and is compared with one straight run of it: metrics at every iteration,
the hash of every rollout's sampled tokens on every rank, and the final policy weights.
"""
import copy
import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from rlhf_ds.checkpoint import (CheckpointError, check_resume_config, checkpoint_name,
                                find_checkpoint, rng_state, set_rng_state, verify_checkpoint)
from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.embedded import build
from rlhf_ds.evaluation import load_models
import forked
from test_distributed import LAUNCH_TIMEOUT_S, RANKS, REPO, launch_script, prepare_training_runs

ITERATIONS = 4
RUN_ARGS = ["--iterations", str(ITERATIONS), "--save_interval", "2", "--rollout_batch_size", "4",
            "--mini_batch_size", "2", "--max_new_tokens", "8", "--tensorboard", "false"]
RUN_CLI = REPO / "tests" / "dist" / "run_cli.py"
TRAIN, EXPORT = REPO / "launch" / "train.py", REPO / "launch" / "export.py"

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < RANKS,
                                reason=f"the launcher would start {RANKS} ranks on one GPU")


def start(output_dir: Path, fault: str = "none", *extra: str) -> forked.Job:
    """Start launch/train.py on RANKS ranks (tests/forked.py) through tests/dist/run_cli.py."""
    prepare_training_runs()
    return forked.start(RUN_CLI, [fault, *RUN_ARGS, "--output_dir", str(output_dir), *extra], ranks=RANKS, cwd=REPO)


def run(output_dir: Path, fault: str = "none", *extra: str) -> tuple[int, str]:
    proc = start(output_dir, fault, *extra).wait(LAUNCH_TIMEOUT_S)
    return proc.returncode, proc.stdout + proc.stderr


def wait_for_lines(path: Path, count: int, job: forked.Job) -> None:
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while not (path.exists() and len(path.read_text().splitlines()) >= count):
        assert job.poll() is None, f"run ended before {count} iterations:\n{(job.stdout() + job.stderr())[-4000:]}"
        assert time.time() < deadline
        time.sleep(0.2)


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the machine's measurements (wall clock, throughput, memory)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith(("time_", "peak_memory_")) and k != "tokens_per_s"}
            for m in lines]


def samples(run_dir: Path) -> dict:
    """(rank, sampling seed) -> hash of that rollout's tokens; a rerun iteration overwrites the killed one."""
    return {(rank, json.loads(line)["seed"]): json.loads(line)["sha256"]
            for rank in range(RANKS) for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert metrics(run_dir) == metrics(reference)  # bitwise: every float of every iteration
    assert samples(run_dir) == samples(reference) and len(samples(reference)) == RANKS * ITERATIONS
    final, expected = (load_file(d / "policy" / "model.safetensors") for d in (run_dir, reference))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The reference: ITERATIONS iterations without interruption (checkpoints at 2 and 4)."""
    run_dir = tmp_path_factory.mktemp("straight")
    rc, out = run(run_dir)
    assert rc == 0, out[-6000:]
    return run_dir


# --- exactness and kills (real 2-rank runs) -------------------------------------------------------------
def test_straight_run_keeps_complete_checkpoints_and_latest(straight):
    root = straight / "checkpoints"
    assert (root / "latest").read_text() == checkpoint_name(ITERATIONS)
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(2), checkpoint_name(4), "latest"]
    state = verify_checkpoint(str(root / checkpoint_name(2)))
    assert state["iteration"] == 2 and state["world_size"] == RANKS and state["data"]["index"] == 2
    files = {str(p.relative_to(root / checkpoint_name(2))) for p in (root / checkpoint_name(2)).rglob("*")
             if p.is_file()}  # the ranks hashed a share each: the manifest holds every file
    assert set(json.loads((root / checkpoint_name(2) / "manifest.json").read_text())) == files - {"manifest.json"}
    shards = {p.name for p in (root / checkpoint_name(2) / "actor" / "state").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(RANKS)} <= shards
    assert {p.name for p in (root / checkpoint_name(2) / "rng").iterdir()} == {"rank_00000.pt", "rank_00001.pt"}


def test_sigkill_mid_run_then_during_save_keeps_the_last_checkpoint_and_resume_is_exact(straight, tmp_path):
    """One run killed twice, then finished: SIGKILL to the whole job during iteration 3 (checkpoint 2 complete),
    then the resumed job SIGKILLed while it writes checkpoint 4 (its first save); the last resume must give the
    straight run bit for bit."""
    job = start(tmp_path)
    wait_for_lines(tmp_path / "metrics.jsonl", 3, job)  # iteration 2 logged: checkpoint 2 is complete
    job.kill()
    assert job.wait(timeout=60).returncode == -9  # reaped, and its captured output removed
    rc, out = run(tmp_path, "kill@1", "--resume", "auto")  # killed while writing the iteration-4 checkpoint
    assert rc != 0 and f"resumed from {tmp_path / 'checkpoints' / checkpoint_name(2)}" in out, out[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == checkpoint_name(2)
    assert not (tmp_path / "checkpoints" / checkpoint_name(4)).exists()
    rc, out = run(tmp_path, "none", "--resume", "auto", "--keep_checkpoints", "1")
    assert rc == 0, out[-6000:]
    assert f"resumed from {tmp_path / 'checkpoints' / checkpoint_name(2)} at iteration 2" in out
    assert_same_run(tmp_path, straight)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [checkpoint_name(4), "latest"]


def test_a_critic_free_lora_run_resumes_bitwise_after_sigkill_and_exports_merged_or_adapter_alone(tmp_path, capsys):
    """GRPO (no critic; 2 samples per prompt, the KL as a loss term) with LoRA adapters on the actor (no reference
    engine: the actor with its adapters off) on 2 ranks under ZeRO-3 in bf16, the real run's stage and precision
    (adapters and frozen base partitioned), whose resume the CI rehearsal leaves to this test. No critic is built,
    checkpointed or exportable; SIGKILLed during iteration 3 and resumed, the run gives the straight run's metrics,
    every rank's sampled tokens and final weights bit for bit. From its checkpoint, export writes the merged policy
    (an ordinary model) and the adapter alone, which evaluation loads onto its base model: on the run's own base
    weights (the initial ones rounded to bf16) to the merged policy's logits, and the adapters did train."""
    grpo_lora = ["--advantage_estimator", "grpo", "--samples_per_prompt", "2", "--lora_rank", "4",
                 "--zero_stage", "3", "--precision", "bf16"]
    straight_dir, killed = tmp_path / "straight", tmp_path / "killed"
    rc, out = run(straight_dir, "none", *grpo_lora)
    assert rc == 0, out[-6000:]
    assert "critic    none: the advantage estimator needs no critic" in out
    assert "reference none: the actor with its LoRA adapters off" in out
    assert re.search(r"actor +ZeRO-3 .* LoRA: [0-9.]+M trained", out)
    checkpoint = straight_dir / "checkpoints" / checkpoint_name(ITERATIONS)
    assert {p.name for p in checkpoint.iterdir()} == {"actor", "policy_meta", "rng", "trainer_state.json",
                                                      "manifest.json"}
    job = start(killed, "none", *grpo_lora)
    wait_for_lines(killed / "metrics.jsonl", 3, job)
    job.kill()
    assert job.wait(timeout=60).returncode == -9
    rc, out = run(killed, "none", *grpo_lora, "--resume", "auto")
    assert rc == 0 and f"resumed from {killed / 'checkpoints' / checkpoint_name(2)} at iteration 2" in out, out[-6000:]
    assert_same_run(killed, straight_dir)

    capsys.readouterr()
    assert launch_script("export").main([str(checkpoint), str(tmp_path / "p"), "--critic", str(tmp_path / "c")]) == 2
    assert "has no critic" in capsys.readouterr().err and not (tmp_path / "p").exists()
    policy, adapter = tmp_path / "policy", tmp_path / "adapter"
    assert launch_script("export").main([str(checkpoint), str(policy), "--adapter", str(adapter)]) == 0, \
        capsys.readouterr().err
    assert not any("lora" in name or "base_layer" in name for name in load_file(policy / "model.safetensors"))
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    embedded = build()
    models = {name: load_models(str(path), embedded.policy, embedded.reward, torch.device("cpu"))["policy"]
              for name, path in (("adapter", adapter), ("merged", policy), ("base", embedded.policy))}
    # the run's frozen base weights are the initial ones rounded to bf16: the adapter on such a base is exact
    models["rounded base"] = copy.deepcopy(models["base"])
    for param in models["rounded base"].parameters():  # not the buffers (RoPE's inverse frequencies stay fp32)
        param.data = param.data.bfloat16().float()
    models["adapter on rounded base"] = PeftModel.from_pretrained(copy.deepcopy(models["rounded base"]), adapter)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {name: model(input_ids=ids).logits for name, model in models.items()}
    torch.testing.assert_close(logits["adapter on rounded base"], logits["merged"], rtol=0, atol=1e-4)
    assert (logits["adapter on rounded base"] - logits["rounded base"]).abs().max() > 1e-3  # the adapters trained
    torch.testing.assert_close(logits["adapter"], logits["merged"], rtol=0, atol=0.2)  # bf16's rounding apart
    from transformers import pipeline
    with torch.no_grad():  # the merged export is an ordinary model: the pipeline loads it, without peft
        assert torch.equal(pipeline("text-generation", model=str(policy)).model(ids).logits, logits["merged"])


def test_full_disk_during_save_is_an_error_and_keeps_previous_checkpoint(tmp_path):
    rc, out = run(tmp_path, "enospc@2")
    assert rc != 0
    assert f"saving checkpoint {tmp_path / 'checkpoints' / checkpoint_name(4)} failed: [Errno 28] No space" in out
    assert (tmp_path / "checkpoints" / "latest").read_text() == checkpoint_name(2)
    assert verify_checkpoint(str(tmp_path / "checkpoints" / checkpoint_name(2)))["iteration"] == 2


# --- bad checkpoints and configs ------------------------------------------------------------------------
@pytest.fixture
def damaged(straight, tmp_path) -> Path:
    """A copy of the straight run's iteration-2 checkpoint, to break."""
    path = tmp_path / "checkpoints" / checkpoint_name(2)
    shutil.copytree(straight / "checkpoints" / checkpoint_name(2), path)
    return path


def test_truncated_file_is_named(damaged):
    shard = damaged / "critic" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shard} has 100 bytes, expected .*truncated"):
        verify_checkpoint(str(damaged))


def test_missing_rank_shard_is_named_by_the_cli(damaged, tmp_path):
    shard = damaged / "actor" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.unlink()
    proc = forked.run(TRAIN, [*RUN_ARGS, "--output_dir", str(tmp_path), "--resume", str(damaged)], cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint file {shard} is missing: checkpoint {damaged} cannot be trusted; restore the file or "
        "resume from an older checkpoint")


@pytest.mark.parametrize("target", ["actor/state/mp_rank_00_model_states.pt",
                                    "critic/state/zero_pp_rank_1_mp_rank_00_optim_states.pt", "trainer_state.json"])
def test_one_changed_byte_is_refused_by_resume_export_and_evaluation(damaged, tmp_path, target, capsys):
    """A flipped byte in a weight or optimizer shard (torch.load does not verify its zip checksums) or a
    same-size edit of trainer_state.json: the size is right, the sha256 is not."""
    path = damaged / target
    data = bytearray(path.read_bytes())
    if target.endswith(".json"):
        data = bytearray(bytes(data).replace(b'"iteration": 2', b'"iteration": 1', 1))
        assert len(data) == path.stat().st_size
    else:
        data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path} does not match its sha256"):
        verify_checkpoint(str(damaged))
    if target != "trainer_state.json":
        return  # the entry points all go through verify_checkpoint: one damaged file is enough to see each refuse
    for cli, argv in (("export", [str(damaged), str(tmp_path / "out")]),  # their main in this process
                      ("evaluate", ["--policy", str(damaged), "--output_dir", str(tmp_path / "eval")])):
        capsys.readouterr()
        assert launch_script(cli).main(argv) == 2, cli
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and "does not match its sha256" in err, err
    proc = forked.run(TRAIN, [*RUN_ARGS, "--output_dir", str(tmp_path / "resumed"), "--resume", str(damaged)],
                      cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not match its sha256" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_trainer_state_must_belong_to_its_directory(damaged):
    moved = damaged.parent / checkpoint_name(3)
    damaged.rename(moved)
    with pytest.raises(CheckpointError, match="says iteration 2 but the directory is iter_0000003"):
        verify_checkpoint(str(moved))


def test_export_never_destroys_the_checkpoint_its_run_or_other_files(straight, tmp_path, capsys):
    """launch/export.py's main in this process (its command line runs in test_export_cli_matches_...)."""
    export_cli = launch_script("export")
    ckpt = straight / "checkpoints" / checkpoint_name(ITERATIONS)
    before = sorted(str(p.relative_to(straight)) for p in straight.rglob("*"))
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("do not delete")
    (tmp_path / "a_file").write_text("x")

    def export(out, *extra):
        capsys.readouterr()
        code = export_cli.main([str(ckpt), str(out), *extra])
        return code, capsys.readouterr().err

    for out, needle in ((straight, "would overwrite the"), (ckpt, "would overwrite the"),
                        (ckpt / "policy", "would overwrite the"), (straight / "exported", "would overwrite the run"),
                        (straight.parent, "would overwrite the"), (keep, "is not empty and is not an earlier"),
                        (tmp_path / "a_file", "is a file")):
        code, err = export(out)
        assert code == 2 and err.count("\n") == 1 and needle in err, (out, err)
    assert sorted(str(p.relative_to(straight)) for p in straight.rglob("*")) == before
    assert (keep / "notes.txt").read_text() == "do not delete"
    assert export(tmp_path / "new")[0] == 0
    assert export(tmp_path / "new")[0] == 0  # an earlier export is replaced without --overwrite
    assert export(keep, "--overwrite")[0] == 0 and not (keep / "notes.txt").exists()
    code, err = export(tmp_path / "again", "--adapter", str(tmp_path / "adapter"))  # a run without LoRA
    assert code == 2 and "trained no LoRA adapters (lora_rank 0)" in err and not (tmp_path / "again").exists()


def test_a_write_failure_torch_reports_as_runtime_error_is_a_checkpoint_error(tmp_path):
    """torch.save reports a full disk as a RuntimeError ("file write failed"), not an OSError."""
    from types import SimpleNamespace

    from rlhf_ds.checkpoint import save_checkpoint

    def failing_save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048: file write "
                           "failed")

    engines = SimpleNamespace(trained={"actor": SimpleNamespace(save_checkpoint=failing_save)})
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text(checkpoint_name(2))
    with pytest.raises(CheckpointError, match=r"saving checkpoint .*iter_0000004 failed: \[enforce fail.*file write "
                                              r"failed; .*latest still names the last complete checkpoint"):
        save_checkpoint(engines, {"iteration": 4}, str(tmp_path), keep=2)
    assert (tmp_path / "checkpoints" / "latest").read_text() == checkpoint_name(2)


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    from rlhf_ds.checkpoint import _prune

    root = tmp_path / "checkpoints"
    for iteration in (2, 4, 8):
        (root / checkpoint_name(iteration)).mkdir(parents=True)
        (root / checkpoint_name(iteration) / "manifest.json").write_text("{}")
    _prune(str(root), keep=2, just_saved=str(root / checkpoint_name(4)))  # resumed from 2, saved 4; 8 is newer
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(4), checkpoint_name(8)]
    _prune(str(root), keep=1, just_saved=str(root / checkpoint_name(4)))
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(4)]


def test_unfinished_save_and_bad_paths_are_errors(damaged, tmp_path):
    (damaged / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="is not a complete rlhf-ds checkpoint"):
        verify_checkpoint(str(damaged))
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        find_checkpoint(str(tmp_path / "nowhere"), str(tmp_path))
    with pytest.raises(CheckpointError, match="trainer_state.json is a file, not a checkpoint directory"):
        verify_checkpoint(str(damaged / "trainer_state.json"))
    (tmp_path / "checkpoints" / "latest").write_text(checkpoint_name(8))
    with pytest.raises(CheckpointError, match="names 'iter_0000008', which does not exist"):
        find_checkpoint("auto", str(tmp_path))
    assert find_checkpoint("auto", str(tmp_path / "fresh")) is None  # a first run under --resume auto


def test_resume_refuses_config_changes_that_break_exactness(straight):
    state = verify_checkpoint(str(straight / "checkpoints" / checkpoint_name(2)))
    same = PPOConfig.from_dict(state["config"])
    assert check_resume_config(state, PPOConfig.from_dict({**state["config"], "iterations": 10}), RANKS) == []
    with pytest.raises(ConfigError, match=r"changes rollout_batch_size=4->8 .*--force_resume true"):
        check_resume_config(state, PPOConfig.from_dict({**state["config"], "rollout_batch_size": 8}), RANKS)
    with pytest.raises(ConfigError, match="world_size=2->1"):
        check_resume_config(state, same, 1)
    forced = PPOConfig.from_dict({**state["config"], "actor_lr": 1e-5, "force_resume": True})
    assert check_resume_config(state, forced, RANKS) == [f"actor_lr={state['config']['actor_lr']}->1e-05"]


def test_export_checks_names_and_shapes_against_a_meta_model_of_the_saved_config():
    """Export builds the model on the meta device (no weights, no init) and checks the checkpoint's tensors
    against its names and shapes; the tied LM head may be absent, nothing else."""
    from transformers import Qwen2ForCausalLM

    from rlhf_ds.checkpoint import _check_full_state
    from rlhf_ds.models import tiny_qwen2_config

    config = tiny_qwen2_config(vocab_size=40, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    state = {k: v for k, v in Qwen2ForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    _check_full_state(model, state, "ckpt")  # complete: no error
    name = "model.layers.0.mlp.up_proj.weight"
    for broken, needle in (({k: v for k, v in state.items() if k != name}, f"missing ['{name}']"),
                           ({**state, "extra.weight": torch.zeros(1)}, "unexpected ['extra.weight']"),
                           ({**state, name: state[name][:-1]}, f"other shape ['{name}']")):
        with pytest.raises(CheckpointError, match=re.escape(needle)):
            _check_full_state(model, broken, "ckpt")


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    def draw():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = draw()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


# --- export from a checkpoint ---------------------------------------------------------------------------
def test_export_cli_matches_the_trained_policy_and_critic(straight, tmp_path):
    from transformers import AutoModelForCausalLM, pipeline

    from rlhf_ds.models import load_critic

    ckpt = straight / "checkpoints" / checkpoint_name(ITERATIONS)
    proc = forked.run(EXPORT, [str(ckpt), str(tmp_path / "policy"), "--critic", str(tmp_path / "critic")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    trained = AutoModelForCausalLM.from_pretrained(straight / "policy")  # exported live from the engine
    ids = torch.randint(0, exported.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)
    loaded = pipeline("text-generation", model=str(tmp_path / "policy")).model
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained(ids).logits)  # the pipeline runs the trained weights
    critic = load_critic(str(tmp_path / "critic"), torch.float32)
    assert critic.value_head.weight.abs().sum() > 0  # trained away from its zero init
    bad = forked.run(EXPORT, [str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def test_evaluate_accepts_a_checkpoint(straight, tmp_path):
    ckpt = straight / "checkpoints" / checkpoint_name(ITERATIONS)
    proc = forked.run(REPO / "launch" / "evaluate.py", ["--policy", str(ckpt), "--num_prompts", "4",
                                                         "--max_new_tokens", "4", "--output_dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_prompts"] == 4 and summary["kl_mean"] > 0  # the trained policy, not the reference
