"""End to end: `python launch/train.py` on the embedded default raises the reward with KL held in check.

One process, the real entry point, the default configuration except the iteration count. Margins are set so a
no-op update (or a broken advantage sign) cannot pass: the SFT policy's score sits well below the chosen answers'.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ds.config import PPOConfig
from rlhf_ds.embedded import build
from test_trainer import step_rule

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    build()
    out = tmp_path_factory.mktemp("learn")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--iterations", str(ITERATIONS),
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return proc.stdout, metrics, PPOConfig.from_file(str(out / "config.json"))


def _mean(metrics, key):
    return sum(m[key] for m in metrics) / len(metrics)


def test_reward_rises(run):
    _, metrics, _ = run
    assert len(metrics) == ITERATIONS and not any("skip_reason" in m for m in metrics)
    first, last = _mean(metrics[:5], "score_mean"), _mean(metrics[-10:], "score_mean")
    assert last > first + 0.8, (first, last)


def test_kl_bounded_and_coefficient_follows_the_rule(run):
    _, metrics, config = run
    assert max(m["kl_divergence"] for m in metrics) < 0.2
    for m in metrics:
        assert config.kl_coef_min <= m["next_kl_coef"] <= config.kl_coef_max
        expected = step_rule(m["kl_coef"], m["kl_divergence"], config.target_kl, config.kl_coef_min,
                             config.kl_coef_max)
        assert m["next_kl_coef"] == pytest.approx(expected)
    assert len({m["kl_coef"] for m in metrics}) > 1  # the controller acted


def test_kl_sits_in_the_dead_zone_after_the_start(run):
    """The shortened KL check of README's "Where KL sits": from iteration 10 on, kl_divergence lies inside the step
    rule's dead zone [0.5, 2]·target_kl in most iterations (0.60 of iterations 10-39 for the default seed; before
    the k3 statistic and actor_lr 5e-5 it was about 0.2, above the zone with kl_coef at its bound)."""
    _, metrics, config = run
    kls = [m["kl_divergence"] for m in metrics[10:]]
    inside = sum(0.5 * config.target_kl <= kl <= 2 * config.target_kl for kl in kls) / len(kls)
    assert inside >= 0.5, (inside, kls)


def test_answers_become_about_the_subject_asked(run):
    """The shortened relevance check of README's "Answers on the question asked": on 64 held-out prompts, judged
    by the corpus's rule (not by the reward model), more of the trained policy's answers are about the subject
    asked than the SFT policy's, and most are (0.94 against 0.84 now). With the SFT recipe before 1200 steps × 32
    the trained policy reached 0.41-0.43 (128 prompts, 60 iterations), below the floor here."""
    import torch

    from rlhf_ds.evaluation import evaluate_policy

    _, _, config = run
    embedded = build()
    _, summary = evaluate_policy(config, f"{config.output_dir}/policy", embedded.policy, embedded.reward,
                                 num_prompts=64, batch_size=16, seed=0, device=torch.device("cpu"))
    assert summary["policy_about_subject"] >= 0.88, summary
    assert summary["policy_about_subject"] >= summary["reference_about_subject"] + 0.05, summary


def test_trained_policy_is_exported_for_transformers(run):
    """pipeline("text-generation") loads the export with exactly the exported (trained, not initial) weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, pipeline

    stdout, _, config = run
    assert f"policy saved to {config.output_dir}/policy" in stdout
    generate = pipeline("text-generation", model=f"{config.output_dir}/policy")
    exported = load_file(f"{config.output_dir}/policy/model.safetensors")
    initial = AutoModelForCausalLM.from_pretrained(build().policy).state_dict()
    loaded = generate.model.state_dict()
    assert exported and all(torch.equal(loaded[name], tensor) for name, tensor in exported.items())
    assert any(not torch.equal(initial[name], tensor) for name, tensor in exported.items())
    answer = generate("\n\nHuman: How do I cook rice?\n\nAssistant:", max_new_tokens=8, do_sample=False,
                      return_full_text=False)[0]["generated_text"]
    assert answer.strip()


def test_start_up_prints_config_and_placement(run):
    stdout, _, config = run
    assert "kl_coef" in stdout and "target_kl" in stdout and "placement" in stdout
    for role in ("actor", "critic", "reference", "reward"):
        assert role in stdout
    assert config == PPOConfig.from_args(["--iterations", str(ITERATIONS), "--output_dir", config.output_dir])
