"""The PPO trainer: 2 CPU ranks under ZeRO-3 (forked: tests/forked.py), experience correctness, and the one-line
errors of launch/train.py.

The run is short (3 iterations of 4 prompts per rank) on the embedded default, built once and cached; it tests
agreement between ranks, not learning (``test_learning.py`` does that). ZeRO-3 is the stage with something to
get wrong here (partitioned actor, reference and export, gathered for generation and the experience). The same
trainer under ZeRO-2 (the default) runs on 2 ranks in test_checkpoint.py (bitwise resume) and learns in
test_learning.py; test_distributed.py keeps ZeRO-2 engines' ranks identical.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf_ds.embedded import build
from rlhf_ds.experience import ExperienceMaker
from rlhf_ds.models import CriticModel, load_critic, load_reward_model, load_reward_tokenizer, load_tokenizer
from rlhf_ds.sampling import Sampling
import forked
from test_distributed import launch, launch_script

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
RUN_ARGS = ["--iterations", "3", "--rollout_batch_size", "4", "--mini_batch_size", "2", "--max_new_tokens", "16",
            "--ppo_epochs", "2", "--max_prompts", "64", "--normalize_reward", "true"]


@pytest.fixture(scope="module")
def embedded():
    return build()  # in this process, before the ranks start, so they find it cached


# PPO-GAE under ZeRO-3, and GRPO (no critic, 2 samples per prompt, the KL as a loss term) with LoRA adapters (no
# reference engine) under ZeRO-2, the default (test_checkpoint.py resumes PPO-GAE under ZeRO-2, GRPO under ZeRO-3
# in bf16 and PPO-GAE with LoRA under ZeRO-3 bit for bit)
RUNS = {"zero3": ["--zero_stage", "3"],
        "grpo_lora": ["--advantage_estimator", "grpo", "--samples_per_prompt", "2", "--lora_rank", "4"]}


@pytest.fixture(scope="module", params=list(RUNS))
def two_rank_run(request, embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return launch("run_trainer.py", out, str(out), *RUN_ARGS, *RUNS[request.param], "--output_dir", str(out / "run"))


def test_metrics_equal_an_independent_recomputation_from_both_ranks(two_rank_run):
    """Each logged statistic against what the two ranks' own rollouts give when pooled by hand (population
    statistics over all rows): an all-reduce that averaged the wrong thing, or one rank's number, fails here."""
    rank0, rank1 = two_rank_run
    assert len(rank0["history"]) == 3
    for i, metrics in enumerate(rank0["history"]):
        r0, r1 = rank0["rollouts"][i], rank1["rollouts"][i]
        scores, lengths = r0["scores"] + r1["scores"], r0["lengths"] + r1["lengths"]
        mean = sum(scores) / len(scores)
        assert metrics["score_mean"] == pytest.approx(mean, rel=1e-6, abs=1e-7)
        assert metrics["score_std"] == pytest.approx((sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5,
                                                     rel=1e-5, abs=1e-6)
        assert metrics["response_length"] == pytest.approx(sum(lengths) / len(lengths))
        assert rank1["history"][i]["score_mean"] == metrics["score_mean"]
        assert all(metrics[f"peak_memory_{phase}_mb"] > 0 for phase in ("generation", "experience", "update"))
        assert metrics["generation_partitioned"] == 0.0 and metrics["skipped_minibatches"] == 0
        # the critic's metrics exist exactly when there is a critic; GRPO's KL is a loss term, not in the reward
        critic = rank0["config"]["advantage_estimator"] == "gae"
        assert ("value_loss" in metrics) == ("value_explained_var" in metrics) == critic
        assert ("kl_loss" in metrics) == (not critic)
        if not critic:
            assert metrics["kl_loss"] >= 0  # k3, which is never negative (k1 would be, half of the time)


def test_group_samples_share_their_prompt_and_rank(two_rank_run):
    """samples_per_prompt: each prompt's n responses are adjacent rows of one rank's rollout, sampled with
    different random numbers; a rank's rollout holds rollout_batch_size distinct prompts."""
    rank0, _ = two_rank_run
    n = rank0["config"]["samples_per_prompt"]
    some_group_differs = False
    for result in two_rank_run:
        for rollout in result["rollouts"]:
            sequences, prompt_len = rollout["sequences"], len(rollout["prompt_mask"][0])
            assert len(sequences) == rank0["config"]["rollout_batch_size"] * n
            groups = [sequences[i:i + n] for i in range(0, len(sequences), n)]
            prompts = [tuple(group[0][:prompt_len]) for group in groups]
            assert len(set(prompts)) == len(groups)  # distinct prompts across groups
            for group in groups:
                assert all(row[:prompt_len] == group[0][:prompt_len] for row in group)
                some_group_differs |= any(row[prompt_len:] != group[0][prompt_len:] for row in group)
    assert some_group_differs or n == 1


def test_reference_logprobs_are_the_initial_policy_and_old_ones_the_actor(two_rank_run, embedded):
    """ref_logprobs recomputed by a plain forward of the initial policy, loaded separately; old_logprobs equal
    them at iteration 0 (the actor is the initial policy) and differ once the actor has trained, so swapping the
    two fields (or scoring with the wrong model) fails here. With LoRA the reference is the actor with its
    adapters off (no reference engine): a switch that did not switch them off fails the same way."""
    model = AutoModelForCausalLM.from_pretrained(embedded.policy).eval()
    for result in two_rank_run:
        for iteration, rollout in enumerate(result["rollouts"]):
            sequences, response_mask = torch.tensor(rollout["sequences"]), torch.tensor(rollout["response_mask"])
            prompt_mask = torch.tensor(rollout["prompt_mask"])
            attention_mask = torch.cat([prompt_mask, response_mask], 1)
            positions = (attention_mask.cumsum(1) - 1).clamp_min(0)
            with torch.no_grad():
                logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions).logits
            prompt_len = prompt_mask.shape[1]
            expected = torch.log_softmax(logits[:, prompt_len - 1:-1].double(), -1).gather(
                -1, sequences[:, prompt_len:, None]).squeeze(-1)
            valid = response_mask.bool()
            for name in ("ref_logprobs",) + (("old_logprobs",) if iteration == 0 else ()):
                torch.testing.assert_close(torch.tensor(rollout[name], dtype=torch.float64)[valid], expected[valid],
                                           rtol=0, atol=1e-4, msg=name)
            if iteration > 0:
                moved = (torch.tensor(rollout["old_logprobs"], dtype=torch.float64) - expected)[valid].abs().max()
                assert moved > 1e-3, iteration


def test_actor_identical_on_both_ranks_and_frozen_models_unchanged(two_rank_run):
    """The frozen weights are the reference and reward engines', or with LoRA the reward engine's and the actor's
    base weights (only the adapters train), and no reference engine exists."""
    rank0, rank1 = two_rank_run
    assert rank0["actor"] == rank1["actor"]
    lora = rank0["config"]["lora_rank"] > 0
    for result in two_rank_run:
        assert result["frozen_unchanged"] == {"actor base" if lora else "reference": True, "reward": True}
        assert result["reference_engine"] == (not lora)


def test_exported_policy_weights_match_the_trained_engine(two_rank_run):
    """Every trained weight is in the export; with LoRA the export is merged (tests/dist/run_trainer.py merges by
    hand: W + alpha / r * B @ A), an ordinary model."""
    assert two_rank_run[0]["export_max_abs_diff"] < 1e-5


def test_kl_statistic_is_the_token_weighted_global_mean(two_rank_run):
    rank0, rank1 = two_rank_run
    counts_differ = False
    for i, metrics in enumerate(rank0["history"]):
        r0, r1 = rank0["rollouts"][i], rank1["rollouts"][i]
        counts_differ |= r0["tokens"] != r1["tokens"]
        expected = (r0["kl_sum"] + r1["kl_sum"]) / (r0["tokens"] + r1["tokens"])
        assert metrics["kl_divergence"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
        mean_of_means = (r0["kl_sum"] / r0["tokens"] + r1["kl_sum"] / r1["tokens"]) / 2
        if r0["tokens"] != r1["tokens"] and abs(r0["kl_sum"]) > 1e-6:
            assert metrics["kl_divergence"] != pytest.approx(mean_of_means, rel=1e-6)
    assert counts_differ, "ranks had equal valid-token counts: the test would not tell the two means apart"


def step_rule(kl_coef: float, kl: float, target: float, low: float, high: float) -> float:
    """The adaptive KL rule as the brief states it, written out, then clamped to [low, high]."""
    if kl > 2 * target:
        kl_coef *= 1.5
    elif kl < 0.5 * target:
        kl_coef *= 0.5
    return min(max(kl_coef, low), high)


def test_kl_coef_follows_the_step_rule(two_rank_run):
    history = two_rank_run[0]["history"]
    assert history[0]["kl_coef"] == 0.2  # the configured start
    for before, after in zip(history, history[1:]):
        assert after["kl_coef"] == before["next_kl_coef"]
    for metrics in history:
        expected = step_rule(metrics["kl_coef"], metrics["kl_divergence"], 0.01, 0.05, 2.0)
        assert metrics["next_kl_coef"] == pytest.approx(expected)


# --- experience (one process, plain models) --------------------------------------------------------------
def test_batched_experience_equals_per_sequence_and_ignores_left_padding(embedded):
    tok = load_tokenizer(embedded.policy)
    policy = AutoModelForCausalLM.from_pretrained(embedded.policy)
    reward, reward_tok = load_reward_model(embedded.reward, torch.float32), load_reward_tokenizer(embedded.reward)
    torch.manual_seed(0)
    critic = CriticModel(policy.model)
    torch.nn.init.normal_(critic.value_head.weight, std=0.1)
    maker = ExperienceMaker(policy, critic, policy, reward, tok, reward_tok,
                            Sampling(temperature=0.7), reward_max_len=64, micro_batch_size=4)
    prompts = ["\n\nHuman: How do I cook rice?\n\nAssistant:",
               "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: What should I feed my cat?\n\nAssistant:",
               "\n\nHuman: Is yoga good exercise?\n\nAssistant:"]
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    responses = torch.randint(3, len(tok), (3, 6))
    responses[0, 2] = tok.eos_token_id  # first response ends early; tokens after EOS are masked
    response_mask = torch.ones_like(responses)
    response_mask[0, 3:] = 0
    full = maker.make(batch["attention_mask"], torch.cat([batch["input_ids"], responses], 1), response_mask)
    for i, prompt in enumerate(prompts):
        alone = tok([prompt], return_tensors="pt")
        one = maker.make(alone["attention_mask"], torch.cat([alone["input_ids"], responses[i:i + 1]], 1),
                         response_mask[i:i + 1])
        valid = response_mask[i].bool()
        for name in ("old_logprobs", "ref_logprobs", "values"):
            torch.testing.assert_close(getattr(full, name)[i][valid], getattr(one, name)[0][valid],
                                       rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(full.scores[i], one.scores[0], rtol=1e-4, atol=1e-5)


# --- entry point errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--clip_range", "1.5"], "clip_range=1.5"),
    (["--kl_cof", "0.1"], "did you mean '--kl_coef'"),
    (["--dataset", "/nonexistent/prompts.jsonl"], "/nonexistent/prompts.jsonl"),
    (["--iterations", "1"], "is not a Hugging Face model directory (no config.json)"),
    (["--actor_lr", "inf"], "actor_lr=inf is invalid: use a finite number"),
])
def test_train_py_bad_input_is_one_line_and_exit_2(args, needle, tmp_path, capsys):
    """launch/train.py's main in this process (the next test runs the script itself, to its exit code)."""
    code = launch_script("train").main([*args, "--policy_model", str(tmp_path), "--reward_model", str(tmp_path),
                                        "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err


def test_fewer_prompts_than_one_global_batch_is_one_line_before_any_model_loads(embedded, tmp_path):
    proc = forked.run(TRAIN, ["--max_prompts", "8", "--output_dir", str(tmp_path / "run")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "8 prompts is fewer than one global batch" in proc.stderr
    assert "placement" not in proc.stdout  # nothing was loaded


def test_non_finite_scores_are_skipped_counted_and_stop_the_run(embedded, tmp_path):
    """A reward model that returns NaN never reaches an update: each rollout is skipped and counted, and the run
    stops with a clear error after max_skipped_batches in a row."""
    reward, reward_tok = load_reward_model(embedded.reward, torch.float32), load_reward_tokenizer(embedded.reward)
    with torch.no_grad():
        reward.classifier.bias.fill_(float("nan"))
    reward.save_pretrained(tmp_path / "nan_reward")
    reward_tok.save_pretrained(tmp_path / "nan_reward")
    proc = forked.run(TRAIN, ["--reward_model", str(tmp_path / "nan_reward"), "--iterations", "5",
                              "--max_skipped_batches", "2", "--rollout_batch_size", "4", "--mini_batch_size", "4",
                              "--output_dir", str(tmp_path / "run")])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 consecutive rollouts skipped (non-finite reward score)" in proc.stderr
    assert "Traceback" not in proc.stderr
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_batches"] for m in logged] == [1]  # the second skip raised before logging


# REINFORCE++ runs under a time budget that the first iteration spends: the run ends after it as after its last
@pytest.mark.parametrize("estimator, samples, limit, iterations", [
    ("rloo", 2, ["--iterations", "2"], 2), ("reinforce_pp", 1, ["--iterations", "50", "--time_budget_s", "0.001"], 1)])
def test_rloo_and_reinforce_pp_train_through_train_py(estimator, samples, limit, iterations, embedded, tmp_path):
    """`python launch/train.py --advantage_estimator ...` for the critic-free estimators that the 2-rank tests do
    not run (GRPO: above and in test_checkpoint.py): no critic is built or checkpointed, the metrics are finite
    and carry no value terms, the KL is in the reward (neither puts it in the loss by default), the last
    iteration is checkpointed and the policy exported, also when ``time_budget_s`` ends the run."""
    run = tmp_path / "run"
    proc = forked.run(TRAIN, ["--advantage_estimator", estimator, "--samples_per_prompt", str(samples), *limit,
                              "--rollout_batch_size", "2", "--mini_batch_size", str(2 * samples),
                              "--max_new_tokens", "8", "--output_dir", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "critic    none: the advantage estimator needs no critic" in proc.stdout
    assert ("time budget of 0.001 s reached after iteration 1" in proc.stdout) == (estimator == "reinforce_pp")
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in logged] == list(range(iterations)) and not any("skip_reason" in m for m in logged)
    assert all(math.isfinite(v) for m in logged for v in m.values() if isinstance(v, float))
    assert not any(key in m for m in logged for key in ("value_loss", "value_explained_var", "kl_loss"))
    assert json.loads((run / "config.json").read_text())["advantage_estimator"] == estimator
    assert (run / "policy" / "model.safetensors").is_file()
    last = run / "checkpoints" / f"iter_{iterations:07d}"
    assert (run / "checkpoints" / "latest").read_text() == last.name and not (last / "critic").exists()


def test_a_lora_critic_trains_and_exports_merged(embedded, tmp_path, capsys):
    """PPO-GAE with LoRA on actor and critic backbone through `python launch/train.py` (the 2-rank LoRA runs are
    critic-free): both engines train adapters only (the value head in full), no reference engine is built, and
    the exported critic is an ordinary backbone with a trained value head."""
    run = tmp_path / "run"
    proc = forked.run(TRAIN, ["--lora_rank", "4", "--iterations", "2", "--rollout_batch_size", "2",
                              "--mini_batch_size", "2", "--max_new_tokens", "8", "--output_dir", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"critic +ZeRO-2 .* LoRA: 0\.0[0-9]M trained", proc.stdout), proc.stdout[-3000:]
    assert "reference none: the actor with its LoRA adapters off" in proc.stdout
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["value_loss"]) for m in logged)
    capsys.readouterr()
    critic = tmp_path / "critic"
    assert launch_script("export").main([str(run), str(tmp_path / "policy"), "--critic", str(critic)]) == 0
    assert not any("lora" in name or "base_layer" in name for name in load_file(critic / "model.safetensors"))
    assert load_critic(str(critic), torch.float32).value_head.weight.abs().sum() > 0
