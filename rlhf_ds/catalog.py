"""Model names that rlhf-ds builds itself instead of loading them.

Where a config's ``policy_model``, ``critic_model`` or ``reward_model`` is one of these names,
``resolve_model_paths`` builds the model (or finds it in the cache) and hands on its directory; any other name
(a hub name, a local directory) passes through unchanged to ``from_pretrained``.

- ``embedded``: the tiny trained default (``rlhf_ds.embedded``): policy and reward model.
- ``qwen2-0.5b-shape[:LAYERS]`` (policy, critic) and ``deberta-v3-large-shape[:LAYERS]`` (reward): random-weight
  stand-ins of the real models at their exact widths, vocabularies and tokenizer types (``rlhf_ds.standins``),
  with LAYERS of the real 24 layers (default 24). Each name is built with both models at its depth, so
  ``qwen2-0.5b-shape:2`` with ``deberta-v3-large-shape:2`` is one build.
"""
from __future__ import annotations

from typing import Optional

from rlhf_ds import embedded, standins

EMBEDDED = "embedded"


def parse_standin(name: str) -> Optional[tuple[str, int]]:
    """(stand-in, layers) of ``name`` when it names a stand-in ("qwen2-0.5b-shape:2"), else None. A stand-in with
    a depth that is not a whole number is a ``StandinError`` (the depth's range is checked by ``ShapeRecipe``)."""
    base, _, depth = name.partition(":")
    if base not in standins.STANDINS:
        return None
    if depth and not depth.isdigit():
        raise standins.StandinError(f"{name!r}: the depth after ':' must be a number of layers, e.g. {base}:2")
    full = standins.QWEN2_LAYERS if base == standins.POLICY_STANDIN else standins.DEBERTA_V3_LAYERS
    return base, int(depth) if depth else full


def resolve_model_paths(config) -> tuple[str, str, str]:
    """(policy, critic, reward) of a PPOConfig as loadable paths, building what the names ask for.

    Every rank may call this at once: the builds are serialised by the caches' file locks, and each build is
    verified once per call (hashing a full-depth stand-in takes seconds).
    """
    built: dict = {}
    return tuple(_resolve(name, role, built) for name, role in _models(config))


def model_configs(config) -> tuple:
    """(policy, critic, reward) transformers configs of a PPOConfig's models, for the memory planner, without
    loading any weights: a stand-in's config is made (``standins.policy_config``), not built; the embedded default
    is built (seconds, cached); anything else is read with ``AutoConfig`` (a hub name fetches only its
    config.json)."""
    from transformers import AutoConfig

    built: dict = {}

    def config_of(name: str, role: str):
        standin = parse_standin(name)
        if standin is not None:
            base, layers = standin
            return standins.policy_config(layers) if base == standins.POLICY_STANDIN else standins.reward_config(layers)
        return AutoConfig.from_pretrained(_resolve(name, role, built), trust_remote_code=config.trust_remote_code)

    return tuple(config_of(name, role) for name, role in _models(config))


def _models(config) -> list[tuple[str, str]]:
    """(name, role) of the policy, the critic (the policy's name when unset) and the reward model."""
    return [(config.policy_model, "policy"), (config.critic_model or config.policy_model, "policy"),
            (config.reward_model, "reward")]


def _resolve(name: str, role: str, built: dict) -> str:
    """The loadable path of ``name`` in ``role`` ("policy" or "reward"), building it into ``built`` (shared by
    the calls of one resolution, so each build is verified once)."""
    if name == EMBEDDED:
        models = built.get(EMBEDDED) or built.setdefault(EMBEDDED, embedded.build())
        return models.policy if role == "policy" else models.reward
    standin = parse_standin(name)
    if standin is None:
        return name
    base, layers = standin
    models = built.get(layers) or built.setdefault(layers, standins.build_standins(
        standins.ShapeRecipe(policy_layers=layers, reward_layers=layers)))
    return models.policy if base == standins.POLICY_STANDIN else models.reward
