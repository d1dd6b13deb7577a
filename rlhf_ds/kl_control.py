"""Controllers for the KL-penalty coefficient: after each rollout the trainer
reports the measured KL to the reference policy and the controller returns the
coefficient for the next one, pushing the KL towards a target (step or
proportional control) or leaving it fixed. State is a small JSON-serialisable
dict, so a resumed run continues with the same coefficient.
"""

KL_CONTROLLERS = ("step", "proportional", "fixed")


def _clamp(value, min_coef, max_coef):
    """Keep value inside the optional [min_coef, max_coef] bounds (None = unbounded)."""
    if min_coef is not None:
        value = max(value, min_coef)
    if max_coef is not None:
        value = min(value, max_coef)
    return float(value)


class _KLController:
    """Shared state handling: `value` is the current coefficient, `name` the controller type."""

    name = None

    def state_dict(self):
        return {"type": self.name, "value": self.value}

    def load_state_dict(self, state):
        if state["type"] != self.name:
            raise ValueError(f"cannot load a {state['type']!r} KL controller state into a {self.name!r} controller")
        self.value = float(state["value"])


class StepKLController(_KLController):
    """Multiply the coefficient by `up` when KL > 2 * target, by `down` when KL < target / 2."""

    name = "step"

    def __init__(self, init_kl_coef, target, up=1.5, down=0.5, min_coef=None, max_coef=None):
        self.value = float(init_kl_coef)
        self.target = target
        self.up = up
        self.down = down
        self.min_coef = min_coef
        self.max_coef = max_coef

    def update(self, kl, n_steps):
        """n_steps is unused; it keeps the interface shared with the other controllers."""
        kl = float(kl)
        if kl > 2 * self.target:
            self.value *= self.up
        elif kl < 0.5 * self.target:
            self.value *= self.down
        self.value = _clamp(self.value, self.min_coef, self.max_coef)
        return self.value


class ProportionalKLController(_KLController):
    """Adaptive KL control of Ziegler et al. 2019: a proportional step on the relative
    KL error, clipped to +-20%, scaled by the number of samples over the horizon."""

    name = "proportional"

    def __init__(self, init_kl_coef, target, horizon, min_coef=None, max_coef=None):
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon
        self.min_coef = min_coef
        self.max_coef = max_coef

    def update(self, kl, n_steps):
        error = min(max(float(kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        self.value = _clamp(self.value, self.min_coef, self.max_coef)
        return self.value


class FixedKLController(_KLController):
    """Constant coefficient; update ignores the measured KL."""

    name = "fixed"

    def __init__(self, kl_coef):
        self.value = float(kl_coef)

    def update(self, kl, n_steps):
        return self.value


def make_kl_controller(config):
    """Build the controller named by config.kl_controller.

    Reads kl_controller, adaptive_kl, kl_coef, target_kl, kl_horizon,
    kl_coef_min and kl_coef_max. adaptive_kl=False gives a fixed coefficient
    whatever kl_controller says, but an unknown name is still rejected.
    """
    name = config.kl_controller
    if name not in KL_CONTROLLERS:
        raise ValueError(f"unknown kl_controller {name!r}, expected one of {KL_CONTROLLERS}")
    if not config.adaptive_kl or name == "fixed":
        return FixedKLController(config.kl_coef)
    if name == "step":
        return StepKLController(
            config.kl_coef, config.target_kl, min_coef=config.kl_coef_min, max_coef=config.kl_coef_max
        )
    return ProportionalKLController(
        config.kl_coef, config.target_kl, config.kl_horizon, min_coef=config.kl_coef_min, max_coef=config.kl_coef_max
    )
