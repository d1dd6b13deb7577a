"""The update on 2 CPU ranks against 1 rank on the union of their data (the global token mean), gradient
checkpointing that really recomputes, a mini-batch skipped on every rank when one rank's loss is non-finite,
the first ratio of an update, and rollouts with a single valid token (tests/dist/run_update.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import forked
from test_distributed import DIST, REPO, _fixtures_module, launch

SGD = {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True,
       "zero_optimization": {"stage": 2}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("update")
    _fixtures_module().build_models(str(root / "models"))
    (root / "sgd.json").write_text(json.dumps(SGD))
    args = (str(root / "models"), None, str(root / "sgd.json"))
    two = launch("run_update.py", root / "two", args[0], str(root / "two"), args[2])
    (root / "one").mkdir()
    proc = forked.run(DIST / "run_update.py", [args[0], str(root / "one"), args[2]], cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    one = json.loads((root / "one" / "rank0.json").read_text())
    return root, two, one


def test_two_rank_step_equals_one_rank_step_on_the_union(runs):
    """Rank 0 holds 6 valid tokens, rank 1 holds 42: with each rank's own mean a rank-0 token would weigh 7x
    a rank-1 token. One SGD step on 2 ranks must move actor and critic exactly as one step on the union."""
    root, _, _ = runs
    initial = {f"{role}.{name}": tensor for role in ("actor", "critic")
               for name, tensor in _initial_params(root, role).items()}
    two, one = (load_file(root / name / "params.safetensors") for name in ("two", "one"))
    assert two.keys() == one.keys() == initial.keys()
    for role in ("actor", "critic"):
        keys = [k for k in one if k.startswith(role)]
        update_one = torch.cat([(one[k] - initial[k]).flatten() for k in keys])
        update_two = torch.cat([(two[k] - initial[k]).flatten() for k in keys])
        assert update_one.norm() > 1e-3, role  # the step moved the weights
        relative = ((update_two - update_one).norm() / update_one.norm()).item()
        assert relative < 1e-4, (role, relative)


def _initial_params(root, role):
    from transformers import AutoModel, AutoModelForCausalLM

    path = root / "models" / "policy"
    if role == "actor":
        return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())
    backbone = AutoModel.from_pretrained(path)
    params = {f"backbone.{k}": v for k, v in backbone.named_parameters()}
    params.update({"value_head.weight": torch.zeros(1, backbone.config.hidden_size),
                   "value_head.bias": torch.zeros(1)})
    return {k: v.detach() for k, v in params.items()}


def test_gradient_checkpointing_recomputes_in_the_update(runs):
    _, two, one = runs
    for result in (*two, one):
        update = result["update"]
        assert update["layer_calls_checkpointed"] == 2 * update["layer_calls_plain"] > 0
        assert update["train_mode_after_update"] is False  # back to eval for generation and experience


def test_a_non_finite_loss_on_one_rank_skips_that_minibatch_on_every_rank(runs):
    _, two, _ = runs
    for result in two:
        skip = result["skip"]
        metrics = skip["metrics"]
        assert skip["steps"] == [2, 2]  # 3 mini-batches, the second stepped by no rank
        # a StepObserver sees one experience, every mini-batch's forward, and the backward and step of the two
        # engines on the mini-batches that stepped
        assert skip["observed"] == {"experience": 1, "forward": 3, "backward": 4, "step": 4}
        assert metrics["skipped_minibatches"] == 1 and "skip_reason" not in metrics
        assert metrics["skipped_batches"] == 0 and skip["weights_finite"]
        # the rollout was applied, so the controller moved by the step rule (bounds off in this run)
        expected = _step_rule(metrics["kl_coef"], metrics["kl_divergence"], target=0.01)
        assert metrics["next_kl_coef"] == pytest.approx(expected)


def test_prompts_cut_at_max_prompt_len_are_reported(runs):
    """The metric against the prompts each rank was given, counted here (fixture prompts of 7 to 9 tokens)."""
    _, two, _ = runs
    truncated = (two[0]["skip"]["longer_than_7"] + two[1]["skip"]["longer_than_7"]) / 2
    assert 0 < truncated and two[0]["skip"]["metrics"]["prompts_truncated"] == pytest.approx(truncated)


def test_first_minibatch_of_an_update_has_ratio_one_and_no_clipping(runs):
    """At temperature 0.7 the update's first log-probs (training mode, new batch composition) equal the
    rollout's old_logprobs: ratio 1 to fp32 rounding, clipfrac 0."""
    _, two, _ = runs
    for result in two:
        first = result["skip"]["first_minibatch"]
        assert first["max_ratio_error"] < 1e-5 and first["clipfrac"] == 0.0


def test_single_valid_token_rollouts_go_on(runs):
    """rollout_batch_size 1 and an EOS-only response on the last rank (the only rank of the 1-rank run): no
    crash, no hang; the losses are finite; value_explained_var is absent exactly when fewer than 2 valid tokens
    exist over all ranks."""
    _, two, one = runs
    for history, world in ((two[0]["degenerate"]["history"], 2), (one["degenerate"]["history"], 1)):
        assert len(history) == 2
        for metrics in history:
            assert "skip_reason" not in metrics
            for key in ("policy_loss", "value_loss", "entropy_loss", "kl_divergence", "score_mean"):
                assert metrics[key] == metrics[key] and abs(metrics[key]) < 1e6, key
            tokens = metrics["response_length"] * world
            assert ("value_explained_var" in metrics) == (tokens >= 2)
    assert all("value_explained_var" not in m for m in one["degenerate"]["history"])


def _step_rule(coef, kl, target):
    """The adaptive rule, written out: x1.5 above 2*target, x0.5 below target/2."""
    if kl > 2 * target:
        return coef * 1.5
    if kl < 0.5 * target:
        return coef * 0.5
    return coef
