"""The embedded default: quality of the full build, round trip through from_pretrained, cache behaviour.

The full build is shared with the end-to-end training test through the cache (``RLHF_DS_CACHE``); the cache
tests use a tiny recipe in their own directory so they take seconds.
"""
import json
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_ds import corpus
from rlhf_ds.cache import CacheError, cached_build, verify
from rlhf_ds.distributed import available_cpus
from rlhf_ds.embedded import Recipe, build, cache_dir, quality_report, train_models
from rlhf_ds.models import load_reward_model, load_reward_tokenizer

TINY = Recipe(policy_layers=1, policy_hidden_size=32, reward_layers=1, reward_hidden_size=32, sft_steps=4,
              reward_steps=4, sft_batch_size=8, reward_batch_size=8, eval_pairs=10, eval_prompts=4,
              eval_new_tokens=4)


@pytest.fixture(scope="module")
def full_build():
    return build()


def test_full_build_quality(full_build):
    """Recomputed from the saved models (not read from the manifest), with margins a broken build fails."""
    recipe = Recipe()
    policy = AutoModelForCausalLM.from_pretrained(full_build.policy, trust_remote_code=False)
    policy_tok = AutoTokenizer.from_pretrained(full_build.policy, trust_remote_code=False)
    reward, reward_tok = load_reward_model(full_build.reward, torch.float32), load_reward_tokenizer(full_build.reward)
    q = quality_report(policy, policy_tok, reward, reward_tok, recipe)
    assert q["reward_accuracy"] >= 0.90, q
    assert min(q["reward_accuracy_per_flaw"].values()) >= 0.6, q
    gap = q["chosen_score_mean"] - q["rejected_score_mean"]
    assert gap > 2.0, q
    # The SFT policy is clearly between the two, so PPO has room to raise its reward.
    assert q["rejected_score_mean"] + 0.15 * gap < q["policy_score_mean"] < q["chosen_score_mean"] - 0.15 * gap, q
    assert q["policy_eos_fraction"] >= 0.7, q
    # It copies the asked subject into its answers (0.38 with the SFT recipe before 1200 steps × 32), so PPO's
    # answers are about the question asked although the reward model cannot tell.
    assert q["policy_about_subject"] >= 0.55, q


def test_policy_tokenizer_is_qwen2_and_reward_tokenizer_differs(full_build):
    policy_tok = AutoTokenizer.from_pretrained(full_build.policy)
    reward_tok = load_reward_tokenizer(full_build.reward)
    assert type(policy_tok).__name__ == "Qwen2Tokenizer" and policy_tok.eos_token == "<|endoftext|>"
    text = "How do I cook rice at home?"
    assert policy_tok(text)["input_ids"] != reward_tok(text)["input_ids"]
    assert policy_tok.decode(policy_tok(text)["input_ids"]) == text


def _same_weights_and_outputs(loaded, original, inputs):
    """Bit-identical weights; outputs equal up to float summation order (kernels may pick another order)."""
    original_state = original.state_dict()
    assert all(torch.equal(t, original_state[k]) for k, t in loaded.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, original(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_saved_models_give_the_same_outputs(tmp_path):
    models = train_models(TINY)
    models.save(tmp_path)
    ids = models.policy_tokenizer("\n\nHuman: How do I cook rice?\n\nAssistant:", return_tensors="pt")["input_ids"]
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", trust_remote_code=False)
    assert type(policy).__name__ == "Qwen2ForCausalLM"
    assert policy.config.tie_word_embeddings and policy.config.num_key_value_heads < policy.config.num_attention_heads
    _same_weights_and_outputs(policy, models.policy, {"input_ids": ids})
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward", trust_remote_code=False)
    assert type(reward).__name__ == "DebertaV2ForSequenceClassification" and reward.config.num_labels == 1
    pair = models.reward_tokenizer(["How do I cook rice?"], ["Cook it slowly."], return_tensors="pt")
    _same_weights_and_outputs(reward, models.reward, pair)


def test_cache_reuse_corruption_rebuild_determinism_and_unwritable(tmp_path, monkeypatch):
    """A build is reused, a corrupted one is rebuilt (to the same bytes: the build is deterministic), and an
    unusable cache location is one error naming RLHF_DS_CACHE."""
    monkeypatch.setenv("RLHF_DS_CACHE", str(tmp_path / "cache"))
    first = build(TINY)
    assert first.root == cache_dir(TINY) and verify(first.root) is None
    assert json.loads((first.root / "manifest.json").read_text())["quality"]["reward_accuracy"] >= 0
    built = {name: (first.root / name).read_bytes()
             for name in ("policy/model.safetensors", "reward/model.safetensors", "policy/tokenizer.json")}

    start = time.time()
    assert build(TINY).root == first.root
    assert time.time() - start < 2.0  # verified, not rebuilt

    weights = first.root / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated file
    assert "does not match its sha256" in verify(first.root)
    with pytest.warns(UserWarning, match="broken"):
        rebuilt = build(TINY)
    assert verify(rebuilt.root) is None
    for name, data in built.items():
        assert (rebuilt.root / name).read_bytes() == data, name

    os.remove(rebuilt.root / "reward" / "config.json")
    assert "missing" in verify(rebuilt.root)
    with pytest.warns(UserWarning, match="missing"):
        build(TINY)
    assert not [p for p in (tmp_path / "cache" / "embedded").iterdir() if ".tmp-" in p.name]  # no leftovers

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RLHF_DS_CACHE", str(blocker / "sub"))
    with pytest.raises(CacheError, match="RLHF_DS_CACHE"):
        build(TINY)


def test_corpus_prompts_cover_held_out_test_split():
    assert len(corpus.make_split("test")) >= Recipe().eval_prompts


def test_sft_and_reward_clis_train_any_hf_model_on_hh_files(tmp_path, capsys):
    """launch/train_sft.py and launch/train_reward.py on a local HH jsonl: they run, save, and load back (their
    ``main`` in this process; the ``__main__`` lines are ``sys.exit(main(sys.argv[1:]))``)."""
    from test_distributed import launch_script

    train_sft, train_reward = launch_script("train_sft"), launch_script("train_reward")
    train_models(TINY).save(tmp_path / "base")
    data = tmp_path / "hh.jsonl"
    data.write_text("\n".join(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]})
                              for r in corpus.make_corpus(40, seed=9)))
    common = ["--data", str(data), "--steps", "3", "--batch_size", "4", "--max_len", "96"]
    assert train_sft.main(["--model", str(tmp_path / "base/policy"), "--out", str(tmp_path / "sft"), *common]) == 0
    assert train_reward.main(["--model", str(tmp_path / "base/reward"), "--out", str(tmp_path / "rm"),
                              "--eval_split", "train", *common]) == 0
    assert "held-out pairwise accuracy" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sft").config.model_type == "qwen2"
    assert load_reward_model(str(tmp_path / "rm"), torch.float32).config.num_labels == 1
    capsys.readouterr()
    assert train_sft.main(["--model", "x", "--out", "y", "--data", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "none.jsonl" in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("omp", [None, "1"])
def test_a_build_runs_on_every_core_unless_omp_num_threads_says_otherwise(omp, tmp_path, monkeypatch):
    """A rank builds with 1/N of the cores while the ranks it started with wait on the lock: the build takes
    every core the process may use (then gives the rank its share back), unless OMP_NUM_THREADS is set."""
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    seen = []

    def make(out):
        seen.append(torch.get_num_threads())
        (out / "weights.bin").write_bytes(b"w")
        return {}

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a rank's share of 2 cores
    try:
        cached_build(tmp_path / "build", make, "a test build")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert seen == [available_cpus() if omp is None else 1]
