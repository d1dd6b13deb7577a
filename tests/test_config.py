"""PPOConfig: defaults of the original script, file and CLI loading, and one-line errors for bad values."""
import json
from pathlib import Path

import pytest

from rlhf_ds.config import ConfigError, PPOConfig

ROOT = Path(__file__).resolve().parents[1]


def test_original_defaults():
    c = PPOConfig().validate()
    assert (c.kl_coef, c.target_kl, c.adaptive_kl) == (0.2, 0.01, True)
    assert (c.entropy_coef, c.clip_range, c.vf_coef) == (0.01, 0.2, 0.1)
    assert (c.gamma, c.lam, c.kl_estimator, c.kl_controller) == (1.0, 0.95, "k1", "step")
    assert c.policy_model == c.reward_model == c.dataset == "embedded"
    assert 4 <= c.rollout_batch_size <= 16 and 4 <= c.mini_batch_size <= 16


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
    ({"target_kl": 0.0}, "target_kl=0.0"),
    ({"kl_coef": -0.1}, "kl_coef=-0.1"),
    ({"gamma": 1.1}, "gamma=1.1"),
    ({"lam": -0.5}, "lam=-0.5"),
    ({"actor_lr": 0.0}, "actor_lr=0.0"),
    ({"critic_lr": -1e-5}, "critic_lr=-1e-05"),
    ({"rollout_batch_size": 10, "mini_batch_size": 4}, "divisible by mini_batch_size=4"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"kl_estimator": "k9"}, "k1, k2, k3"),
    ({"kl_controller": "pid"}, "step, proportional, fixed"),
    ({"iterations": "ten"}, "expected int"),
    ({"adaptive_kl": "yes"}, "expected bool"),
    ({"kl_coef_min": 2.0, "kl_coef_max": 1.0}, "kl_coef_min=2.0"),
    ({"offload_params": True, "zero_stage": 2}, "zero_stage=3"),
    ({"ds_config": "/nonexistent/ds.json"}, "ds_config"),
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
