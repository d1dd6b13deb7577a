"""build_ds_config: which JSON, what PPOConfig overrides, what the inference roles get (no processes)."""
import json
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.engines import DS_CONFIG_DIR, _warmup_factor, build_ds_config, resolve_precision

WORLD = 2


def _config(**values) -> PPOConfig:
    return PPOConfig(**values).validate()


def _all_values(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _all_values(value)
    else:
        yield node


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_training_config_takes_ppo_values(stage):
    config = _config(zero_stage=stage, mini_batch_size=4, rollout_batch_size=8, actor_lr=1e-5, critic_lr=2e-5,
                     weight_decay=0.1, max_grad_norm=0.5)
    for role, lr in (("actor", 1e-5), ("critic", 2e-5)):
        ds = build_ds_config(config, role, WORLD)
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) \
            == (4, 1, 8)
        assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == stage
        assert ds["optimizer"]["params"]["lr"] == lr and ds["optimizer"]["params"]["weight_decay"] == 0.1
        assert "offload_optimizer" not in ds["zero_optimization"] and "offload_param" not in ds["zero_optimization"]
        assert "auto" not in list(_all_values(ds))
        assert ds["steps_per_print"] >= 10**6 and ds["wall_clock_breakdown"] is False
        DeepSpeedConfig(build_ds_config(config, role, 1))  # DeepSpeed itself accepts it (one process here)


def test_cpu_defaults_fp32_and_torch_adamw():
    config = _config()
    assert resolve_precision(config) == torch.float32
    ds = build_ds_config(config, "actor", WORLD)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True


def test_the_json_chooses_the_optimizer_implementation(tmp_path):
    """A user JSON's torch_adam / fused win over the CPU defaults (e.g. DeepSpeed's JIT-built FusedAdam)."""
    base = json.loads((Path(DS_CONFIG_DIR) / "zero2.json").read_text())
    for params, expected in (({"torch_adam": False}, {"torch_adam": False}),
                             ({"fused": False}, {"torch_adam": True, "fused": False})):
        path = tmp_path / "ds.json"
        user = json.loads(json.dumps(base))
        user["optimizer"]["params"].update(params)
        path.write_text(json.dumps(user))
        chosen = build_ds_config(_config(ds_config=str(path)), "actor", WORLD)["optimizer"]["params"]
        assert {key: chosen[key] for key in ("torch_adam", "fused") if key in chosen} == expected


def test_explicit_precision():
    assert resolve_precision(_config(precision="bf16")) == torch.bfloat16
    ds = build_ds_config(_config(precision="fp16"), "reward", WORLD)
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False


def test_offload_uses_zero3_offload_json_and_deepspeed_cpu_adam():
    config = _config(zero_stage=3, offload_optimizer=True, offload_params=True)
    ds = build_ds_config(config, "actor", WORLD)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_param"]["pin_memory"] is True, "settings other than the device come from the JSON"
    assert "torch_adam" not in ds["optimizer"]["params"], "ZeRO-Offload needs DeepSpeedCPUAdam"
    assert "offload_param" not in build_ds_config(_config(zero_stage=3, offload_optimizer=True), "actor", WORLD)[
        "zero_optimization"]


def test_optimizer_offload_below_stage_3():
    ds = build_ds_config(_config(zero_stage=2, offload_optimizer=True), "critic", WORLD)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("role", ["reference", "reward"])
def test_inference_roles_follow_the_actor(role):
    ds = build_ds_config(_config(zero_stage=3, offload_optimizer=True, offload_params=True), role, WORLD)
    assert "optimizer" not in ds and "gradient_clipping" not in ds
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero and zero["offload_param"]["device"] == "cpu"
    assert build_ds_config(_config(zero_stage=2), role, WORLD)["zero_optimization"] == {"stage": 0}
    DeepSpeedConfig(build_ds_config(_config(zero_stage=3, offload_params=True), role, 1))


def test_user_ds_config_keeps_its_tuning_and_gets_the_trainer_fields_filled(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": 123},
                                "optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}))
    ds = build_ds_config(_config(ds_config=str(path), zero_stage=2, mini_batch_size=2, rollout_batch_size=2),
                         "actor", WORLD)
    assert ds["train_batch_size"] == 4 and ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 123}
    assert ds["optimizer"]["params"]["eps"] == 1e-6 and ds["optimizer"]["params"]["lr"] == PPOConfig().actor_lr


@pytest.mark.parametrize("setting, needle", [
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3 but this run needs 2 (from zero_stage)"),
    ({"train_batch_size": 999}, "train_batch_size=999"),
    ({"train_micro_batch_size_per_gpu": 1}, "train_micro_batch_size_per_gpu=1"),
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 but this run needs 1.0 (from max_grad_norm)"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}, "optimizer.params.lr=1.0"),
    ({"bf16": {"enabled": True}}, "bf16.enabled=True but this run needs False (from precision)"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer.device='cpu'"),
])
def test_user_ds_config_that_contradicts_the_config_is_one_line_naming_the_file(tmp_path, setting, needle):
    """A JSON value that the run would override is refused, never silently dropped (it used to be replaced)."""
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(setting))
    with pytest.raises(ConfigError) as caught:
        build_ds_config(_config(ds_config=str(path), precision="fp32"), "actor", WORLD)
    message = str(caught.value)
    assert str(path) in message and needle in message and '"auto"' in message and "\n" not in message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_malformed_ds_config_is_one_line_naming_the_file(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"ds_config {path}"):
        build_ds_config(_config(ds_config=str(path)), "actor", WORLD)


def test_user_ds_config_without_optimizer_gets_the_shipped_one(tmp_path):
    path = tmp_path / "no_optimizer.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    ds = build_ds_config(_config(ds_config=str(path)), "actor", WORLD)
    shipped = build_ds_config(_config(), "actor", WORLD)
    assert ds["optimizer"] == shipped["optimizer"]


def test_scheduler_section_is_an_error(tmp_path):
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ValueError, match="warmup_steps"):
        build_ds_config(_config(ds_config=str(path)), "actor", WORLD)


def test_unfilled_auto_is_an_error(tmp_path):
    path = tmp_path / "auto.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size"):
        build_ds_config(_config(ds_config=str(path)), "actor", WORLD)


def test_unknown_role():
    with pytest.raises(ValueError, match="unknown role"):
        build_ds_config(_config(), "policy", WORLD)


def test_linear_warmup_reaches_full_lr_without_a_zero_step():
    assert [_warmup_factor(step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _warmup_factor(0, 0) == 1.0
