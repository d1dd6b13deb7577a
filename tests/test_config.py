"""PPOConfig: defaults of the original script, file and CLI loading, and one-line errors for bad values."""
import json
from pathlib import Path

import pytest

from rlhf_ds.config import ConfigError, ConfigHelp, PPOConfig

ROOT = Path(__file__).resolve().parents[1]


def test_original_defaults():
    c = PPOConfig().validate()
    assert (c.kl_coef, c.target_kl, c.adaptive_kl) == (0.2, 0.01, True)
    assert (c.entropy_coef, c.clip_range, c.vf_coef) == (0.01, 0.2, 0.1)
    assert (c.gamma, c.lam, c.kl_estimator, c.kl_controller) == (1.0, 0.95, "k1", "step")
    assert c.policy_model == c.reward_model == c.dataset == "embedded"
    assert 4 <= c.rollout_batch_size <= 16 and 4 <= c.mini_batch_size <= 16


@pytest.mark.parametrize("estimator, samples, kl_in_loss, kl_estimator, critic", [
    ("gae", 1, False, "k1", True), ("grpo", 4, True, "k3", False), ("rloo", 2, False, "k1", False),
    ("reinforce_pp", 1, False, "k1", False)])
def test_estimator_defaults_resolve_the_kl_placement_and_the_critic(estimator, samples, kl_in_loss, kl_estimator,
                                                                  critic):
    c = PPOConfig(advantage_estimator=estimator, samples_per_prompt=samples).validate()
    assert (c.kl_in_loss, c.kl_estimator, c.needs_critic) == (kl_in_loss, kl_estimator, critic)
    forced = PPOConfig(advantage_estimator=estimator, samples_per_prompt=samples, kl_in_loss=not kl_in_loss,
                       kl_estimator="k2").validate()
    assert (forced.kl_in_loss, forced.kl_estimator) == (not kl_in_loss, "k2")  # what the user sets stays
    assert PPOConfig(rollout_batch_size=3, samples_per_prompt=2, mini_batch_size=6).validate()  # 6 rows per rank


def test_shipped_configs_load():
    real = PPOConfig.from_file(str(ROOT / "launch/configs/qwen2_hh.yaml"))
    assert real.policy_model == "Qwen/Qwen2-0.5B"
    assert real.reward_model == "OpenAssistant/reward-model-deberta-v3-large-v2"
    assert real.dataset == "Anthropic/hh-rlhf"
    assert 1e-6 <= real.actor_lr <= 1e-5 and 1e-6 <= real.critic_lr <= 1e-5
    embedded = PPOConfig.from_file(str(ROOT / "launch/configs/embedded.yaml"))
    assert embedded.policy_model == "embedded"


def test_from_args_overrides_file_and_parses_types(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"kl_coef": 0.5, "iterations": 3}))
    c = PPOConfig.from_args(["--local_rank=1", "--config", str(path), "--kl_coef", "0.3",
                             "--adaptive_kl", "false", "--reward_clip", "none", "--max_new_tokens=5"])
    assert c.kl_coef == 0.3 and c.iterations == 3 and c.adaptive_kl is False
    assert c.reward_clip is None and c.max_new_tokens == 5


def test_int_accepted_for_float_field():
    c = PPOConfig.from_dict({"kl_coef": 1})
    assert isinstance(c.kl_coef, float) and c.kl_coef == 1.0


@pytest.mark.parametrize("values, needle", [
    ({"kl_cof": 0.1}, "did you mean 'kl_coef'"),
    ({"clip_range": 1.5}, "clip_range=1.5"),
    ({"clip_range": 0.0}, "clip_range=0.0"),
    ({"clip_range": 1.0}, "clip_range=1.0"),
    ({"clip_range_value": 0.0}, "clip_range_value=0.0"),
    ({"reward_clip": 0.0}, "reward_clip=0.0"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"kl_coef_max": 0.0}, "kl_coef_max=0.0"),
    ({"kl_coef_min": -0.01}, "kl_coef_min=-0.01"),
    ({"reward_max_len": 7}, "reward_max_len=7"),
    ({"warmup_steps": -1}, "warmup_steps=-1"),
    ({"max_grad_norm": -0.1}, "max_grad_norm=-0.1"),
    ({"target_kl": 0.0}, "target_kl=0.0"),
    ({"kl_coef": -0.1}, "kl_coef=-0.1"),
    ({"gamma": 1.1}, "gamma=1.1"),
    ({"lam": -0.5}, "lam=-0.5"),
    ({"actor_lr": 0.0}, "actor_lr=0.0"),
    ({"critic_lr": -1e-5}, "critic_lr=-1e-05"),
    ({"rollout_batch_size": 10, "mini_batch_size": 4}, "must be divisible by mini_batch_size=4"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"kl_estimator": "k9"}, "k1, k2, k3"),
    ({"kl_controller": "pid"}, "step, proportional, fixed"),
    ({"iterations": "ten"}, "expected int"),
    ({"time_budget_s": -1.0}, "time_budget_s=-1.0 is invalid: use seconds >= 0"),
    ({"adaptive_kl": "yes"}, "expected bool"),
    ({"kl_coef_min": 2.0, "kl_coef_max": 1.0}, "kl_coef_min=2.0"),
    ({"offload_params": True, "zero_stage": 2}, "zero_stage=3"),
    ({"ds_config": "/nonexistent/ds.json"}, "ds_config"),
    ({"advantage_estimator": "ppo2"}, "gae, grpo, rloo, reinforce_pp"),
    ({"advantage_estimator": "grpo"}, "samples_per_prompt=1 is invalid: grpo compares the responses"),
    ({"advantage_estimator": "rloo", "samples_per_prompt": 1}, "use samples_per_prompt >= 2"),
    ({"samples_per_prompt": 0}, "samples_per_prompt=0"),
    ({"lora_rank": -1}, "lora_rank=-1 is invalid: use a rank >= 1 for LoRA"),
    ({"lora_alpha": 0.0}, "lora_alpha=0.0"),
    ({"lora_dropout": 1.0}, "lora_dropout=1.0 is invalid: use a probability in [0, 1)"),
    ({"lora_target_modules": []}, "lora_target_modules=[] is invalid: name the modules"),
    ({"lora_target_modules": ["q_proj", ""]}, "lora_target_modules=['q_proj', '']"),
    ({"rollout_batch_size": 4, "samples_per_prompt": 3, "mini_batch_size": 8}, "rollout_batch_size x "
     "samples_per_prompt (the sequences per rank) must be divisible by mini_batch_size=8"),
])
def test_bad_values_give_one_line_naming_the_field(values, needle):
    with pytest.raises(ConfigError) as err:
        PPOConfig.from_dict(values)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_cli_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean '--kl_coef'"):
        PPOConfig.from_args(["--kl_coeff", "0.1"])
    with pytest.raises(ConfigError, match="--kl_coef 'abc' is not a valid float"):
        PPOConfig.from_args(["--kl_coef", "abc"])
    with pytest.raises(ConfigError, match="needs a value"):
        PPOConfig.from_args(["--kl_coef"])
    with pytest.raises(ConfigError, match="not found"):
        PPOConfig.from_args(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("kl_coef: [0.1\n")
    with pytest.raises(ConfigError, match="does not parse"):
        PPOConfig.from_file(str(bad))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        PPOConfig.from_file(str(listed))


def test_save_round_trip(tmp_path):
    c = PPOConfig.from_dict({"kl_coef": 0.05, "reward_clip": None})
    c.save(str(tmp_path / "config.json"))
    again = PPOConfig.from_file(str(tmp_path / "config.json"))
    assert again == c
    assert "kl_coef" in c.describe() and "0.05" in c.describe()


@pytest.mark.parametrize("values", [
    {"clip_range": 1e-9}, {"clip_range": 0.999}, {"gamma": 0.0}, {"gamma": 1.0}, {"lam": 0.0}, {"lam": 1.0},
    {"kl_coef": 0.0}, {"vf_coef": 0.0}, {"entropy_coef": 0.0}, {"max_grad_norm": 0.0}, {"weight_decay": 0.0},
    {"target_kl": 1e-9}, {"temperature": 1e-3}, {"kl_coef_min": 0.0}, {"kl_coef_min": 1.0, "kl_coef_max": 1.0},
    {"reward_max_len": 8}, {"max_new_tokens": 1}, {"save_interval": 0}, {"warmup_steps": 0},
    {"rollout_batch_size": 1, "mini_batch_size": 1}, {"clip_range_value": None, "reward_clip": None},
])
def test_range_boundaries_that_are_accepted(values):
    c = PPOConfig.from_dict(values)
    assert all(getattr(c, name) == value for name, value in values.items())


FLOAT_FIELDS = ["actor_lr", "critic_lr", "kl_coef", "target_kl", "temperature", "reward_clip", "max_grad_norm",
                "clip_range_value", "kl_coef_min", "gamma", "weight_decay"]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("text, shown", [("inf", "inf"), ("-inf", "-inf"), ("1e400", "inf"), ("nan", "nan")])
def test_non_finite_float_from_command_line_is_refused(name, text, shown):
    default = getattr(PPOConfig(), name)
    with pytest.raises(ConfigError) as err:
        PPOConfig.from_args([f"--{name}", text])
    assert str(err.value) == f"{name}={shown} is invalid: use a finite number, e.g. {default!r}"


def test_non_finite_float_from_dict_and_file_is_refused(tmp_path):
    for value in (float("inf"), float("nan"), 10 ** 400):
        with pytest.raises(ConfigError, match="^max_grad_norm=.* is invalid: use a finite number, e.g. 1.0$"):
            PPOConfig.from_dict({"max_grad_norm": value})
    json_file = tmp_path / "c.json"
    json_file.write_text('{"reward_clip": Infinity}')
    with pytest.raises(ConfigError, match="^reward_clip=inf is invalid: use a finite number, e.g. 5.0$"):
        PPOConfig.from_file(str(json_file))
    yaml_file = tmp_path / "c.yaml"
    for text in ("kl_coef: .inf", "kl_coef: 1.0e+400", "kl_coef: 1e400", "kl_coef: .nan"):
        yaml_file.write_text(text + "\n")
        with pytest.raises(ConfigError, match="^kl_coef=(inf|nan) is invalid: use a finite number, e.g. 0.2$"):
            PPOConfig.from_args(["--config", str(yaml_file)])


def test_yaml_number_without_dot_is_read_as_the_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("actor_lr: 1e-6\ncritic_lr: 5E-6\nkl_coef_max: 3e0\niterations: '4'\n")
    for config in (PPOConfig.from_file(str(path)), PPOConfig.from_args(["--config", str(path)])):
        assert (config.actor_lr, config.critic_lr, config.kl_coef_max) == (1e-6, 5e-6, 3.0)
        assert isinstance(config.actor_lr, float) and config.iterations == 4


@pytest.mark.parametrize("text, needle", [
    ("actor_lr: fast", "actor_lr='fast' has type str: expected float"),
    ("iterations: 4.5", "iterations=4.5 has type float: expected int"),
    ("iterations: '4.5'", "iterations='4.5' has type str: expected int"),
    ("kl_horizon: 1e4", "kl_horizon='1e4' has type str: expected int"),
    ("output_dir: 12", "output_dir=12 has type int: expected str"),
])
def test_file_value_that_is_not_a_number_keeps_the_type_error(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        PPOConfig.from_file(str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_config_file_names_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("kl_cof: 0.1\n")
    message = f"unknown field 'kl_cof' in {path}: did you mean 'kl_coef'?"
    for load in (lambda: PPOConfig.from_file(str(path)),
                 lambda: PPOConfig.from_args(["--config", str(path), "--iterations", "3"])):
        with pytest.raises(ConfigError) as err:
            load()
        assert str(err.value) == message
    good = tmp_path / "good.yaml"
    good.write_text("kl_coef: 0.1\n")
    with pytest.raises(ConfigError) as err:
        PPOConfig.from_args(["--config", str(good), "--kl_cof", "1"])
    assert str(err.value) == "unknown option '--kl_cof': did you mean '--kl_coef'?"


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--kl_coef", "0.3", "--help"], ["--kl_cof", "1", "-h"],
                                  ["--config", "missing.yaml", "-h", "--iterations", "3"]])
def test_help_anywhere_in_argv_raises_config_help_with_every_field(argv):
    with pytest.raises(ConfigHelp) as err:
        PPOConfig.from_args(argv)
    assert not isinstance(err.value, ConfigError)
    text = str(err.value)
    lines = text.splitlines()
    assert lines[0] == "usage: [--config FILE] [--field value ...]"
    kl_coef = [line for line in lines if line.split()[:1] == ["--kl_coef"]]
    assert len(kl_coef) == 1 and "0.2" in kl_coef[0]
    assert "initial KL penalty coefficient: adjusted_reward = reward - kl_coef * kl" in kl_coef[0]
    for name in PPOConfig.__dataclass_fields__:
        assert sum(line.split()[:1] == [f"--{name}"] for line in lines) == 1, name


def test_readme_configuration_table_is_the_configs_own():
    from pathlib import Path

    from rlhf_ds.config import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "README's table is stale: paste `python -m rlhf_ds.config` into it"
