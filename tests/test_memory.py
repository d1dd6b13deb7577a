"""The memory planner (rlhf_ds/memory.py): its formulas on hand-computed cases, the largest batch that fits, the
parameter counts of real models, the CLI and the trainer's warning. Predicted against measured peaks:
tests/test_rehearsal.py."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from rlhf_ds import memory
from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.memory import ModelShape, Setup, engine_states, largest_rollout_batch, parse_bytes, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def shape(numels, role="policy", trainable=None, **dims):
    config = dataclasses.make_dataclass("Dims", [])()
    for key, value in dict(num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=100, **dims).items():
        setattr(config, key, value)
    return ModelShape(config=config, role=role, param_numels=tuple(numels),
                      trainable_numels=tuple(numels if trainable is None else trainable))


def setup(stage, dtype, world_size=2, touched=False, **zero):
    numels = (800, 30, 5000)  # N = 5830; the 30-element tensor is under the persistence threshold below
    ds = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 100,
                                "reduce_bucket_size": 1000, **zero}}
    return Setup(config=PPOConfig(zero_stage=stage), policy=shape(numels), critic=shape(numels, "critic"),
                 reward=shape(numels, "reward"), world_size=world_size, dtype=dtype,
                 ds_configs={role: ds for role in ("actor", "critic", "reference", "reward")}, touched=touched,
                 reward_max_len=64, runtime=0)


def test_zero2_states_by_hand():
    states = engine_states(setup(2, torch.bfloat16), "actor")
    assert states == {"actor parameters": 5830 * 2, "actor master weights": 4 * 5830 // 2,
                      "actor Adam moments": 8 * 5830 // 2}
    assert engine_states(setup(2, torch.bfloat16), "reward") == {"reward parameters": 5830 * 2}


def test_zero3_states_by_hand_partition_persistence_and_buckets():
    # partition: ceil(800 / 2) + 30 (persistent, whole) + ceil(5000 / 2) = 400 + 30 + 2500 = 2930 elements
    states = engine_states(setup(3, torch.float32), "critic")
    assert states == {"critic parameters": 2930 * 4, "critic master weights": 4 * 5830 // 2,
                      "critic Adam moments": 8 * 5830 // 2, "critic gradient buffers": 4 * (2915 + 1000)}
    bf16 = engine_states(setup(3, torch.bfloat16, world_size=4), "actor")
    assert bf16["actor parameters"] == 2 * (200 + 30 + 1250)
    assert bf16["actor master weights"] == 4 * 5830 // 4
    # a CPU's resident set only sees the part of the bucket the gradients write
    assert engine_states(setup(3, torch.bfloat16, touched=True, reduce_bucket_size=10**6), "actor")[
        "actor gradient buffers"] == 2 * (2915 + 5830)


def test_offloaded_states_leave_the_device_table():
    offloaded = setup(3, torch.bfloat16, offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    result = plan(offloaded)
    assert "actor Adam moments (host)" in result.host and "actor parameters (host)" in result.host
    assert not any("Adam" in name or "master" in name for name in result.resident)
    on_device = plan(setup(3, torch.bfloat16))
    for phase in memory.PHASES:
        assert on_device.peak(phase) - result.peak(phase) == sum(result.host.values())


def test_largest_rollout_batch_is_the_edge_of_fitting():
    base = setup(2, torch.float32)
    mini = base.config.mini_batch_size
    capacity = plan(dataclasses.replace(base, config=dataclasses.replace(base.config, rollout_batch_size=40 * mini))
                    ).peak("generation") + 1
    best = largest_rollout_batch(base, capacity)
    assert best % mini == 0 and best >= 40 * mini

    def peak(batch):
        return plan(dataclasses.replace(base, config=dataclasses.replace(base.config, rollout_batch_size=batch)))

    assert peak(best).peak("generation") <= capacity < peak(best + mini).peak("generation")
    assert largest_rollout_batch(base, 1) == 0


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GIB), ("80GB", 80 * 10**9), ("141 GB", 141 * 10**9),
                                           ("0.5TiB", 2**39), ("24", 24 * GIB)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_refuses_what_is_not_an_amount():
    with pytest.raises(ConfigError, match="gpu_memory"):
        parse_bytes("eighty")


def test_parameter_counts_are_those_of_the_loaded_models(tmp_path):
    """The meta-device count equals the count of the models rlhf-ds loads (tied embeddings once, value head)."""
    from rlhf_ds import embedded
    from rlhf_ds.models import load_critic, load_policy, load_reward_model
    from transformers import AutoConfig

    models = embedded.build()
    for role, path, load in (("policy", models.policy, load_policy), ("critic", models.policy, load_critic),
                             ("reward", models.reward, load_reward_model)):
        loaded = sum(p.numel() for p in load(path, torch.float32).parameters())
        assert memory.model_shape(AutoConfig.from_pretrained(path), role).params == loaded, role


def run_cli(capsys, *args):
    """``python -m rlhf_ds.memory ARGS`` in this process (its ``__main__`` is ``run_main(main)``): (exit code,
    stdout, stderr)."""
    from rlhf_ds.errors import run_main

    code = run_main(lambda: memory.main(list(args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plans_the_real_run_and_says_what_fits(capsys):
    real = ["--config", os.path.join(REPO, "launch", "configs", "qwen2_hh.yaml"), "--policy_model",
            "qwen2-0.5b-shape", "--critic_model", "qwen2-0.5b-shape", "--reward_model", "deberta-v3-large-shape"]
    code, out, err = run_cli(capsys, *real, "--gpus", "8", "--gpu_memory", "80GiB")
    assert code == 0, err
    assert "8 rank(s), ZeRO-2, bfloat16" in out and "fits: peak" in out
    for phase in memory.PHASES:
        assert phase in out
    code, out, _ = run_cli(capsys, *real, "--gpus", "1", "--gpu_memory", "4GiB")
    assert code == 1 and "does not fit" in out
    # the module's own entry point, once: a bad value is one line and exit code 2
    bad = subprocess.run([sys.executable, "-m", "rlhf_ds.memory", *real, "--gpu_memory", "lots"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --gpu_memory 'lots'")


def test_trainer_warns_before_loading_when_the_plan_does_not_fit(monkeypatch, capsys):
    from rlhf_ds import device_memory

    monkeypatch.setattr(device_memory, "capacity_bytes", lambda device: 2**20)
    summary = memory.plan_this_run(PPOConfig(), world_size=1)
    out, err = capsys.readouterr()
    assert summary["fits"] is False and "does not fit" in out
    assert "warning: the memory plan predicts" in err


def test_an_architecture_without_the_sizes_it_reads_is_a_plan_error():
    from transformers import GPT2Config

    with pytest.raises(memory.PlanError, match="GPT2Config. has no intermediate_size"):
        memory.model_shape(GPT2Config(n_layer=1, n_embd=8, n_head=2), "policy")


def test_a_critic_free_estimator_plans_no_critic_and_more_generation_rows():
    gae = memory.make_setup(PPOConfig().validate(), world_size=2, device_type="cuda")
    grpo_config = PPOConfig(advantage_estimator="grpo", samples_per_prompt=4).validate()
    grpo = memory.make_setup(grpo_config, world_size=2, device_type="cuda")
    assert grpo.critic is None and "critic" not in grpo.roles
    with_critic, without = plan(gae), plan(grpo)
    assert any(name.startswith("critic") for name in with_critic.resident)
    assert not any(name.startswith("critic") for name in without.resident)
    assert "critic activations" not in without.working["update"]
    # four samples per prompt: generation holds four times the rows of the same rollout_batch_size
    kv = "KV cache, prefill, sampling"
    assert without.working["generation"][kv] > 3 * with_critic.working["generation"][kv]


def test_lora_states_by_hand_and_no_reference():
    """With LoRA the optimizer's states and the gradients cover the trained elements only (adapters, the critic's
    value head), the parameters all of them, and there is no reference engine. Counted on the meta device:
    r x (in + out) per adapted linear layer of the embedded policy."""
    config = PPOConfig(lora_rank=4, lora_target_modules=["q_proj", "down_proj"]).validate()
    full, lora = (memory.make_setup(c, world_size=2, device_type="cuda") for c in (PPOConfig().validate(), config))
    hidden, intermediate = full.policy.hidden, full.policy.intermediate
    adapters = full.policy.layers * 4 * ((hidden + hidden) + (intermediate + hidden))
    assert lora.policy.params == full.policy.params + adapters and lora.policy.trainable == adapters
    assert lora.critic.trainable == adapters + hidden + 1  # the value head trains in full
    assert lora.roles == ("actor", "critic", "reward")
    states = engine_states(lora, "actor")
    assert states["actor master weights"] == 4 * adapters // 2 and states["actor Adam moments"] == 8 * adapters // 2
    assert states["actor parameters"] == lora.policy.params * 2  # bf16 (a GPU's default), ZeRO-2: whole
    assert not any(name.startswith("reference") for name in plan(lora).resident)
    untouched = memory.make_setup(dataclasses.replace(config, lora_critic=False), world_size=2, device_type="cuda")
    assert untouched.critic.trainable == untouched.critic.params == full.critic.params
