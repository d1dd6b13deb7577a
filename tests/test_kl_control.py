"""Tests for rlhf_ds.kl_control: hand-derived coefficient sequences, state round trips
and construction from a config object."""
import json
import types

import pytest

from rlhf_ds.kl_control import (
    KL_CONTROLLERS,
    FixedKLController,
    ProportionalKLController,
    StepKLController,
    make_kl_controller,
)


def test_step_controller_sequence():
    # target 0.01: raise above 0.02, lower below 0.005, both comparisons strict
    controller = StepKLController(0.2, target=0.01)
    assert controller.update(0.03, 1) == pytest.approx(0.3)     # 0.03 > 0.02: 0.2 * 1.5
    assert controller.update(0.02, 1) == pytest.approx(0.3)     # exactly 2 * target: unchanged
    assert controller.update(0.01, 1) == pytest.approx(0.3)     # on target: unchanged
    assert controller.update(0.005, 1) == pytest.approx(0.3)    # exactly target / 2: unchanged
    assert controller.update(0.004, 1) == pytest.approx(0.15)   # 0.004 < 0.005: 0.3 * 0.5
    assert controller.value == pytest.approx(0.15)


def test_step_controller_custom_factors_and_bounds():
    controller = StepKLController(0.2, target=0.01, up=2.0, down=0.25, min_coef=0.02, max_coef=0.5)
    assert controller.update(1.0, 1) == pytest.approx(0.4)      # 0.2 * 2
    assert controller.update(1.0, 1) == pytest.approx(0.5)      # 0.8 clamped to max 0.5
    assert controller.update(0.0, 1) == pytest.approx(0.125)    # 0.5 * 0.25
    assert controller.update(0.0, 1) == pytest.approx(0.03125)  # 0.125 * 0.25
    assert controller.update(0.0, 1) == pytest.approx(0.02)     # 0.0078125 clamped to min 0.02


def test_proportional_controller_sequence():
    controller = ProportionalKLController(0.2, target=6.0, horizon=10000)
    # e = clip(9 / 6 - 1 = 0.5, -0.2, 0.2) = 0.2: 0.2 * (1 + 0.2 * 256 / 10000) = 0.2 * 1.00512
    assert controller.update(9.0, 256) == pytest.approx(0.201024)
    # e = 5.4 / 6 - 1 = -0.1: 0.201024 * (1 - 0.1 * 512 / 10000) = 0.201024 * 0.99488
    assert controller.update(5.4, 512) == pytest.approx(0.19999475712)
    # on target: e = 0, unchanged
    assert controller.update(6.0, 512) == pytest.approx(0.19999475712)


def test_proportional_controller_bounds():
    controller = ProportionalKLController(1.0, target=1.0, horizon=100, min_coef=0.9, max_coef=1.1)
    # e clipped to 0.2: 1 * (1 + 0.2 * 100 / 100) = 1.2, clamped to 1.1
    assert controller.update(10.0, 100) == pytest.approx(1.1)
    # e clipped to -0.2: 1.1 * (1 - 0.2 * 50 / 100) = 0.99
    assert controller.update(0.0, 50) == pytest.approx(0.99)
    # 0.99 * 0.8 = 0.792, clamped to 0.9
    assert controller.update(0.0, 100) == pytest.approx(0.9)


def test_fixed_controller_ignores_kl():
    controller = FixedKLController(0.05)
    assert controller.update(100.0, 1000) == 0.05
    assert controller.update(0.0, 1000) == 0.05
    assert controller.value == 0.05


@pytest.mark.parametrize("make", [
    lambda: StepKLController(0.2, target=0.01, min_coef=0.01, max_coef=1.0),
    lambda: ProportionalKLController(0.2, target=0.01, horizon=1000),
    lambda: FixedKLController(0.2),
])
def test_state_dict_round_trip_continues_identically(make):
    kls = [0.03, 0.001, 0.05, 0.012, 0.0]
    original = make()
    for kl in kls:
        original.update(kl, 64)
    restored = make()
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.value == original.value
    for kl in kls:
        assert restored.update(kl, 64) == original.update(kl, 64)


def test_state_dict_is_plain_python():
    controller = StepKLController(0.2, target=0.01)
    controller.update(0.03, 1)
    assert controller.state_dict() == {"type": "step", "value": pytest.approx(0.3)}
    assert all(isinstance(v, (str, float)) for v in controller.state_dict().values())


def test_load_state_dict_of_other_controller_type_raises():
    state = ProportionalKLController(0.2, target=0.01, horizon=1000).state_dict()
    with pytest.raises(ValueError, match="'proportional'.*'step'"):
        StepKLController(0.2, target=0.01).load_state_dict(state)


def make_config(**overrides):
    config = dict(kl_controller="step", adaptive_kl=True, kl_coef=0.2, target_kl=6.0,
                  kl_horizon=10000, kl_coef_min=None, kl_coef_max=None)
    config.update(overrides)
    return types.SimpleNamespace(**config)


def test_make_kl_controller_step():
    controller = make_kl_controller(make_config(kl_coef_min=0.1, kl_coef_max=0.25))
    assert isinstance(controller, StepKLController)
    assert controller.value == 0.2
    assert controller.update(20.0, 1) == pytest.approx(0.25)  # 0.3 clamped by kl_coef_max
    assert controller.update(0.0, 1) == pytest.approx(0.125)  # 0.25 * 0.5, above kl_coef_min


def test_make_kl_controller_proportional():
    controller = make_kl_controller(make_config(kl_controller="proportional"))
    assert isinstance(controller, ProportionalKLController)
    assert controller.update(9.0, 256) == pytest.approx(0.201024)  # same numbers as the hand sequence above


@pytest.mark.parametrize("overrides", [
    dict(kl_controller="fixed"),
    dict(kl_controller="step", adaptive_kl=False),
    dict(kl_controller="proportional", adaptive_kl=False),
])
def test_make_kl_controller_fixed(overrides):
    controller = make_kl_controller(make_config(**overrides))
    assert isinstance(controller, FixedKLController)
    assert controller.update(100.0, 1) == 0.2


@pytest.mark.parametrize("adaptive_kl", [True, False])
def test_make_kl_controller_unknown_name(adaptive_kl):
    with pytest.raises(ValueError, match="'pid'.*step.*proportional.*fixed"):
        make_kl_controller(make_config(kl_controller="pid", adaptive_kl=adaptive_kl))


def test_kl_controllers_names():
    assert KL_CONTROLLERS == ("step", "proportional", "fixed")
