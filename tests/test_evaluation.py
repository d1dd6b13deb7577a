"""rlhf_ds.evaluation and launch/evaluate.py on the embedded default (8 held-out prompts, 8 new tokens) and on
tiny random Qwen2 models: a model against itself, the KL against a per-sequence loop, the JSONL against the
summary, a perturbed policy, and bad inputs."""
import importlib.util
import json
import os

import pytest
import torch

from rlhf_ds.config import PPOConfig
from rlhf_ds.data import load_prompts
from rlhf_ds.catalog import resolve_model_paths
from rlhf_ds.corpus import about_subject
from rlhf_ds.evaluation import evaluate, evaluate_policy, format_summary, load_models, sequence_kl, summarize
from rlhf_ds.sampling import Sampler, Sampling
from rlhf_ds.models import load_tokenizer, tiny_qwen2_config

import forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROMPTS, NEW_TOKENS, BATCH = 8, 8, 4


def _launcher():
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(ROOT, "launch", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: on a few shared cores, torch's default thread pool only adds contention (measured:
    10x slower evaluation on this project's 2-core machine under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paths():
    policy, _, reward = resolve_model_paths(PPOConfig())  # builds the embedded default once, else a no-op
    return policy, reward


@pytest.fixture(scope="module")
def perturbed_policy(paths, tmp_path_factory):
    """The SFT policy with Gaussian noise (30% of each tensor's std) on every weight, saved as an HF dir."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            scale = 0.3 * param.std() if param.numel() > 1 else 0.0
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    out = str(tmp_path_factory.mktemp("perturbed") / "policy")
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(paths[0]).save_pretrained(out)
    return out


def _config(**overrides):
    return PPOConfig(max_new_tokens=NEW_TOKENS, **overrides)


def test_policy_against_itself_gives_identical_samples_win_rate_half_and_zero_kl(paths):
    policy_path, reward_path = paths
    models = load_models(policy_path, policy_path, reward_path, torch.device("cpu"))  # two separate copies
    assert models["policy"] is not models["reference"]
    prompts, _ = load_prompts("embedded", "test", NUM_PROMPTS)
    rng_before = torch.get_rng_state()
    records = evaluate(**models, prompts=prompts, sampling=Sampling(max_new_tokens=NEW_TOKENS), max_prompt_len=128,
                       batch_size=BATCH, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeded sampling leaves the global RNG alone
    summary = summarize(records)
    assert summary["num_prompts"] == NUM_PROMPTS
    assert summary["win_rate"] == 0.5 and summary["tie_fraction"] == 1.0
    assert summary["kl_mean"] == 0.0 and summary["kl_per_token"] == 0.0
    assert all(r["kl"] == 0.0 for r in records)
    for r in records:
        assert r["policy_response"] == r["reference_response"] and r["policy_score"] == r["reference_score"]
    assert summary["policy_reward_mean"] == summary["reference_reward_mean"]
    assert any(r["policy_response"] for r in records)
    assert 1 <= summary["policy_response_length"] <= NEW_TOKENS

    # The agreement comes from the shared seed, not from deterministic decoding: another seed samples other text.
    tokenizer = models["policy_tokenizer"]
    sampler = Sampler(Sampling(max_new_tokens=NEW_TOKENS), tokenizer)
    batch = tokenizer(prompts[:BATCH], add_special_tokens=False, padding=True, return_tensors="pt")
    samples = [sampler.sample(models["policy"], batch["input_ids"], batch["attention_mask"], seed=seed)[0]
               for seed in (0, 0, 1)]
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])


def test_extra_reference_answers_leave_the_coupled_pair_alone_and_rank_the_policy(paths, perturbed_policy):
    policy_path, reward_path = paths
    prompts, _ = load_prompts("embedded", "test", NUM_PROMPTS)
    settings = dict(prompts=prompts, sampling=Sampling(max_new_tokens=NEW_TOKENS), max_prompt_len=128,
                    batch_size=BATCH, seed=0)
    itself = load_models(policy_path, policy_path, reward_path, torch.device("cpu"))
    plain = evaluate(**itself, **settings)
    records = evaluate(**itself, **settings, reference_samples=3)
    assert all(len(r["reference_scores"]) == 3 for r in records)
    assert [{k: v for k, v in r.items() if k != "reference_scores"} for r in records] == plain
    # seeds of their own: the extra answers are not copies of the coupled reference answer
    assert any(score != r["reference_score"] for r in records for score in r["reference_scores"])
    summary = summarize(records, reward_clip=5.0)
    assert summary["reference_samples"] == 3
    assert summary["win_rate_ceiling"] == pytest.approx(0.5, abs=1e-12)  # KL 0: no room to move
    assert summary["win_rate_ppo_optimum"] == pytest.approx(0.5, abs=1e-12)
    assert "win_rate_independent" not in summarize(plain)

    perturbed = load_models(perturbed_policy, policy_path, reward_path, torch.device("cpu"))
    records = evaluate(**perturbed, **settings, reference_samples=3)
    summary = summarize(records, reward_clip=5.0)
    expected = sum(sum(1.0 if s < r["policy_score"] else 0.5 if s == r["policy_score"] else 0.0
                       for s in r["reference_scores"]) / 3 for r in records) / NUM_PROMPTS
    assert summary["win_rate_independent"] == pytest.approx(expected, abs=1e-12)
    assert 0 < summary["frontier_kl"] <= summary["kl_mean"] + 1e-6  # less where 3 answers cannot reach the KL
    assert 0.5 < summary["win_rate_ceiling"] and summary["win_rate_ppo_optimum"] <= summary["win_rate_ceiling"]
    assert "PPO's optimum would win" in format_summary(summary)


def _tiny_qwen2(seed):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = tiny_qwen2_config(vocab_size=40, bos_token_id=1, eos_token_id=1, pad_token_id=1, hidden_size=32,
                               num_layers=2, num_heads=4, num_kv_heads=2)
    return Qwen2ForCausalLM(config).eval()


def test_sequence_kl_equals_a_per_sequence_loop_over_unpadded_rows():
    eos, temperature = 1, 0.7
    policy, reference = _tiny_qwen2(1), _tiny_qwen2(2)
    generator = torch.Generator().manual_seed(3)
    prompt_lens, prompt_width, response_len = [3, 5, 2, 4], 5, 6
    valid = [6, 3, 1, 4]  # tokens up to and including the first EOS; row 0 has no EOS
    prompt_ids = torch.full((4, prompt_width), eos)
    prompt_mask = torch.zeros(4, prompt_width, dtype=torch.long)
    response = torch.randint(2, 40, (4, response_len), generator=generator)
    for row, (n_prompt, n_valid) in enumerate(zip(prompt_lens, valid)):
        prompt_ids[row, prompt_width - n_prompt:] = torch.randint(2, 40, (n_prompt,), generator=generator)
        prompt_mask[row, prompt_width - n_prompt:] = 1
        if n_valid < response_len or row == 3:
            response[row, n_valid - 1] = eos
    from rlhf_ds.sampling import response_mask_from_tokens

    response_mask = response_mask_from_tokens(response, eos)
    assert response_mask.sum(1).tolist() == valid
    sequences = torch.cat([prompt_ids, response], dim=1)
    batched = sequence_kl(policy, reference, sequences, prompt_mask, response_mask, temperature)

    expected = []
    with torch.no_grad():
        for row, (n_prompt, n_valid) in enumerate(zip(prompt_lens, valid)):
            ids = torch.cat([prompt_ids[row, prompt_width - n_prompt:], response[row, :n_valid]])[None]
            total = 0.0
            for t in range(n_valid):
                token = ids[0, n_prompt + t]
                logp = torch.log_softmax(policy(ids).logits[0, n_prompt - 1 + t].double() / temperature, -1)
                ref_logp = torch.log_softmax(reference(ids).logits[0, n_prompt - 1 + t].double() / temperature, -1)
                total += (logp[token] - ref_logp[token]).item()
            expected.append(total)
    assert batched.dtype == torch.float32 and batched.shape == (4,)
    assert torch.allclose(batched.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    assert batched.abs().min() > 1e-3  # different random models: a real, non-zero KL in every row

    # Tokens after the first EOS do not count, and a model against itself has exactly zero KL.
    scrambled = sequences.clone()
    scrambled[1, prompt_width + 3:] = torch.randint(2, 40, (response_len - 3,), generator=generator)
    assert torch.allclose(sequence_kl(policy, reference, scrambled, prompt_mask, response_mask, temperature), batched)
    assert torch.equal(sequence_kl(policy, policy, sequences, prompt_mask, response_mask, temperature),
                       torch.zeros(4))


def test_cli_writes_samples_whose_means_are_the_summary(paths, perturbed_policy, tmp_path, capsys):
    samples, summary_path = tmp_path / "s.jsonl", tmp_path / "summary.json"
    code = _launcher().main(["--policy", perturbed_policy, "--num_prompts", str(NUM_PROMPTS), "--batch_size", "3",
                             "--max_new_tokens", str(NEW_TOKENS), "--reference_samples", "2", "--samples",
                             str(samples), "--json",
                             str(summary_path), "--device", "cpu", "--output_dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "win rate" in out and "reward mean" in out
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    summary = json.loads(summary_path.read_text())
    assert len(records) == summary["num_prompts"] == NUM_PROMPTS
    assert set(records[0]) >= {"prompt", "policy_response", "reference_response", "policy_score",
                               "reference_score", "kl"}
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    assert summary["policy_reward_mean"] == pytest.approx(mean("policy_score"), abs=1e-12)
    assert summary["reference_reward_mean"] == pytest.approx(mean("reference_score"), abs=1e-12)
    assert summary["kl_mean"] == pytest.approx(mean("kl"), abs=1e-12)
    assert summary["kl_per_token"] == pytest.approx(
        sum(r["kl"] for r in records) / sum(r["policy_length"] for r in records), abs=1e-12)
    wins = [1.0 if r["policy_score"] > r["reference_score"] else 0.5 if r["policy_score"] == r["reference_score"]
            else 0.0 for r in records]
    assert summary["win_rate"] == pytest.approx(sum(wins) / len(wins), abs=1e-12)
    assert summary["tie_fraction"] == pytest.approx(wins.count(0.5) / len(wins), abs=1e-12)
    assert summarize(records, summary["settings"]["reward_clip"])["win_rate_ppo_optimum"] == pytest.approx(
        summary["win_rate_ppo_optimum"], abs=1e-12)
    assert summary["policy_response_length"] == pytest.approx(mean("policy_length"), abs=1e-12)
    assert summary["reference_eos_fraction"] == pytest.approx(mean("reference_ended"), abs=1e-12)
    assert summary["settings"]["policy"] == perturbed_policy and summary["settings"]["max_new_tokens"] == NEW_TOKENS
    assert len({r["reference_score"] for r in records}) > 1  # real, varied scores
    # each response judged by the corpus's rule; the summary is the fraction, shown in the table
    assert all(r["policy_about_subject"] == about_subject(r["prompt"], r["policy_response"]) for r in records)
    assert summary["policy_about_subject"] == pytest.approx(mean("policy_about_subject"), abs=1e-12)
    assert "about the subject" in out


def test_about_subject_is_summarised_only_where_the_rule_judged_every_prompt():
    def record(about):
        return {"policy_score": 1.0, "reference_score": 0.0, "kl": 0.1, "policy_length": 4, "reference_length": 4,
                "policy_ended": True, "reference_ended": True, "policy_about_subject": about,
                "reference_about_subject": about}

    assert summarize([record(True), record(False), record(True), record(True)])["policy_about_subject"] == 0.75
    assert "policy_about_subject" not in summarize([record(True), record(None)])  # a prompt from elsewhere


def test_ties_are_counted_and_the_win_rate_over_the_rest_is_reported():
    def record(policy_score, reference_score):
        return {"policy_score": policy_score, "reference_score": reference_score, "kl": 0.0, "policy_length": 4,
                "reference_length": 4, "policy_ended": True, "reference_ended": True}

    # 2 ties, 3 wins, 1 loss: win rate (3 + 2 * 0.5) / 6; 2 of 6 tied; 3 of the 4 decided won
    summary = summarize([record(1.0, 1.0), record(2.0, 1.0), record(0.5, 0.5), record(3.0, -1.0),
                         record(0.0, 1.0), record(1.5, 1.0)])
    assert summary["win_rate"] == pytest.approx(4 / 6)
    assert summary["tie_fraction"] == pytest.approx(2 / 6)
    assert summary["win_rate_decided"] == pytest.approx(3 / 4)
    assert "ties (the same score): 0.33; win rate where not tied: 0.750" in format_summary(summary)
    all_tied = summarize([record(1.0, 1.0), record(0.0, 0.0)])
    assert all_tied["tie_fraction"] == 1.0 and all_tied["win_rate_decided"] is None
    assert "win rate where not tied: none" in format_summary(all_tied)


def test_a_perturbed_policy_has_positive_kl(paths, perturbed_policy):
    policy_path, reward_path = paths
    records, summary = evaluate_policy(_config(), perturbed_policy, policy_path, reward_path, NUM_PROMPTS,
                                       BATCH, 0, torch.device("cpu"))
    assert summary["kl_mean"] > 0.05 and summary["kl_per_token"] > 0
    assert any(r["policy_response"] != r["reference_response"] for r in records)


def test_cli_bad_policy_path_is_one_line_and_exit_2(tmp_path):
    proc = forked.run(os.path.join(ROOT, "launch", "evaluate.py"), ["--policy", str(tmp_path / "no_such_dir")],
                      env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --policy") and "no_such_dir" in lines[0], proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["--policy", "{empty_dir}"], "no config.json"),
    (["--num_prompts", "0"], "--num_prompts 0"),
    (["--reference_samples", "-1"], "--reference_samples -1"),
    (["--dataset", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    (["--temperature", "0"], "temperature=0.0 is invalid"),
    pytest.param(["--device", "cuda"], "no usable CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="checks the message of a torch without CUDA")),
])
def test_cli_bad_inputs_are_one_line_and_exit_2(args, needle, paths, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty_dir=tmp_path / "empty", tmp=tmp_path) for a in args]
    code = _launcher().main(["--device", "cpu"] + argv + ["--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
