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
from rlhf_ds.embedded import (Recipe, _reward_model, _texts, build, build_reward_tokenizer, cache_dir,
                               quality_report, sft_mix, train_models)
from rlhf_ds.models import load_reward_model, load_reward_tokenizer
from rlhf_ds.supervised import Schedule, preference_pairs, train_reward_model

TINY = Recipe(policy_layers=1, policy_hidden_size=32, reward_layers=1, reward_hidden_size=32, sft_steps=4,
              reward_relevance_steps=2, reward_steps=4, sft_batch_size=8, reward_batch_size=8, eval_pairs=10, eval_prompts=4,
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
    # It compares the answer's subject with the question's (0.47-0.55, chance, before the copy head).
    assert q["reward_accuracy_per_flaw"]["wrong_subject"] >= 0.8, q
    gap = q["chosen_score_mean"] - q["rejected_score_mean"]
    assert gap > 2.0, q
    # The SFT policy is clearly between the two, so PPO has room to raise its reward.
    assert q["rejected_score_mean"] + 0.15 * gap < q["policy_score_mean"] < q["chosen_score_mean"] - 0.15 * gap, q
    assert q["policy_eos_fraction"] >= 0.7, q
    # Its complete answers copy the asked subject (0.38 in all with the SFT recipe before 1200 steps × 32); the
    # rest are the mix's rejected answers, wrong-subject ones included, that PPO is there to remove (0.48 now).
    assert q["policy_about_subject"] >= 0.4, q


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


def test_copy_head_attends_to_copies_of_answer_words_in_the_question_and_stays_fixed_in_training():
    """The planted head of the embedded reward model: an answer word puts its attention on itself and its copy in
    the question; a word without a copy keeps it on itself. Training moves every weight but that head's and the
    position table."""
    recipe = Recipe(reward_hidden_size=96)
    tokenizer = build_reward_tokenizer(_texts(corpus.make_split("train")), recipe.reward_vocab_size)
    torch.manual_seed(recipe.seed)  # as the build does
    model = _reward_model(recipe, tokenizer).eval()
    batch = tokenizer(["What should I feed my goldfish?"], ["Feed your goldfish at set times."], return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    asked, answered, uncopied = tokens.index("goldfish"), len(tokens) - 1 - tokens[::-1].index("goldfish"), \
        tokens.index("times")
    with torch.no_grad():
        attention = model(**batch, output_attentions=True).attentions[0][0, 0]      # (L, L) of layer 0, head 0
    # The build's weights give 0.59 and 0.32; over other seeds 0.26-0.59 on the copy, at least 0.87 on both.
    assert attention[answered, asked] > 0.25 and attention[answered, asked] + attention[answered, answered] > 0.8, \
        attention[answered]
    assert attention[uncopied, asked] < 0.1, attention[uncopied]

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pairs = preference_pairs(corpus.make_split("train")[:64])
    train_reward_model(model.train(), tokenizer, pairs, Schedule(3, 8, 1e-2), 64)
    after = dict(model.named_parameters())
    size = model.config.hidden_size // model.config.num_attention_heads
    layer = "deberta.encoder.layer.0.attention."
    for name in ("self.query_proj", "self.key_proj", "self.value_proj"):
        for part in ("weight", "bias"):
            key = layer + name + "." + part
            assert torch.equal(after[key][:size], before[key][:size]), key
            assert not torch.equal(after[key][size:], before[key][size:]), key
    dense = layer + "output.dense.weight"
    assert torch.equal(after[dense][:, :size], before[dense][:, :size])
    assert not torch.equal(after[dense][:, size:], before[dense][:, size:])
    assert torch.equal(after["deberta.encoder.rel_embeddings.weight"], before["deberta.encoder.rel_embeddings.weight"])
    assert not torch.equal(after["deberta.embeddings.word_embeddings.weight"],
                           before["deberta.embeddings.word_embeddings.weight"])


def test_sft_mix_takes_rejected_answers_of_every_flaw_but_wrong_subject():
    """The SFT policy learns to write the flaws PPO then removes, but never a good answer to another question:
    that would unteach copying the asked subject into the answer."""
    records = corpus.make_split("train")
    mix = sft_mix(records, 0.5, seed=0)
    for flaw in corpus.FLAWS:
        taken = [text == r["rejected"] for text, r in zip(mix, records) if r["flaw"] == flaw]
        if flaw == "wrong_subject":
            assert not any(taken)
        else:
            assert 0.45 < sum(taken) / len(taken) < 0.55, (flaw, sum(taken) / len(taken))
    assert all(text in (r["chosen"], r["rejected"]) for text, r in zip(mix, records))


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
