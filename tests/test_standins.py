"""The stand-ins: real configs and tokenizer layouts after a round trip through disk, forwards, and the cache.

One 1-layer build (about 1.2 GB of fp32 weights, the embeddings dominate) in a temporary RLHF_DS_CACHE is shared
by every test; the last test corrupts it and checks the rebuild, so it must stay last.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from rlhf_ds import corpus
from rlhf_ds.cache import verify
from rlhf_ds.models import (load_policy, load_reward_model, load_reward_tokenizer, load_saved_tokenizer,
                            load_tokenizer, qwen2_0_5b_config)
from rlhf_ds.reward import encode_pairs
from rlhf_ds.standins import (POLICY_STANDIN, REWARD_STANDIN, STANDINS, ShapeRecipe, StandinError, build_standins,
                              cache_dir, main, resolve_standin)

TINY = ShapeRecipe(policy_layers=1, reward_layers=1)
EOS_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(BuiltModels, seconds the build took) in a cache of this module's own, deleted afterwards (1.2 GB)."""
    cache = tmp_path_factory.mktemp("standin_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_DS_CACHE", str(cache))
        start = time.perf_counter()
        models = build_standins(TINY)
        yield models, time.perf_counter() - start
    shutil.rmtree(cache)


def config_json(path: str) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def dialogues(count: int) -> list[str]:
    return [r["chosen"] for r in corpus.make_split("test")[:count]]


def test_recipe_refuses_depths_the_real_models_do_not_have():
    for bad in (dict(policy_layers=0), dict(policy_layers=25), dict(reward_layers=0), dict(reward_layers=25)):
        with pytest.raises(StandinError, match="1 to 24 layers"):
            ShapeRecipe(**bad)
    assert ShapeRecipe().digest() != TINY.digest()


def test_policy_config_is_qwen2_0_5b_but_for_depth(built):
    models, _ = built
    saved = config_json(models.policy)
    assert (saved["hidden_size"], saved["intermediate_size"], saved["num_attention_heads"],
            saved["num_key_value_heads"], saved["vocab_size"]) == (896, 4864, 14, 2, 151936)
    assert saved["tie_word_embeddings"] is True and saved["rope_parameters"]["rope_theta"] == 1e6
    assert saved["num_hidden_layers"] == saved["max_window_layers"] == len(saved["layer_types"]) == 1
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (EOS_ID, EOS_ID, EOS_ID)
    assert saved["architectures"] == ["Qwen2ForCausalLM"] and saved["dtype"] == "float32"
    loaded, real = AutoConfig.from_pretrained(models.policy).to_diff_dict(), qwen2_0_5b_config().to_diff_dict()
    differs = {key for key in real.keys() | loaded.keys() if real.get(key) != loaded.get(key)}
    assert differs <= {"num_hidden_layers", "max_window_layers", "layer_types", "pad_token_id", "dtype",
                       "architectures"}, differs


def test_reward_config_is_deberta_v3_large_but_for_depth(built):
    models, _ = built
    saved = config_json(models.reward)
    assert saved["architectures"] == ["DebertaV2ForSequenceClassification"] and saved["num_hidden_layers"] == 1
    assert (saved["hidden_size"], saved["num_attention_heads"], saved["intermediate_size"], saved["vocab_size"],
            saved["max_position_embeddings"], saved["pad_token_id"]) == (1024, 16, 4096, 128100, 512, 0)
    assert AutoConfig.from_pretrained(models.reward).num_labels == 1
    assert (saved["relative_attention"], saved["position_buckets"], saved["pos_att_type"], saved["norm_rel_ebd"],
            saved["share_att_key"], saved["position_biased_input"], saved["type_vocab_size"],
            saved["max_relative_positions"]) == (True, 256, ["p2c", "c2p"], "layer_norm", True, False, 0, -1)
    assert (saved["layer_norm_eps"], saved["hidden_act"], saved["pooler_hidden_size"], saved["pooler_dropout"],
            saved["pooler_hidden_act"]) == (1e-7, "gelu", 1024, 0.0, "gelu")


def test_policy_tokenizer_has_qwen2_layout(built):
    models, _ = built
    tokenizer = load_tokenizer(models.policy)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == 151646
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|endoftext|>", EOS_ID, EOS_ID)
    assert tokenizer.bos_token is None and tokenizer.bos_token_id is None
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        EOS_ID, IM_START_ID, IM_END_ID]
    text = dialogues(1)[0]
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text and max(ids) < 2000  # learnt tokens come first, fillers after
    # A random-weight policy samples any id: every regular one decodes to text of its own.
    sampled = list(range(0, EOS_ID, 997)) + [EOS_ID - 1]
    assert all(piece.strip() for piece in tokenizer.batch_decode([[i] for i in sampled]))
    assert tokenizer.decode([EOS_ID - 1, EOS_ID], skip_special_tokens=True).strip()


def test_reward_tokenizer_is_deberta_v2_with_its_special_ids(built):
    models, _ = built
    tokenizer = AutoTokenizer.from_pretrained(models.reward)
    assert "DebertaV2" in type(tokenizer).__name__
    assert type(load_saved_tokenizer(models.reward, False)) is type(tokenizer)
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]")] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 1, 2)
    assert tokenizer.mask_token_id == len(tokenizer) - 1 < 128100
    assert (tokenizer.padding_side, tokenizer.truncation_side, tokenizer.model_max_length) == ("right", "left", 512)
    pair = tokenizer("How do I cook rice at home?", "Cook the rice slowly.")
    ids, types = pair["input_ids"], pair["token_type_ids"]
    first_sep = ids.index(2)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(2) == 2 and 1 not in ids[1:]
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    # Whole words, not letters: the Unigram model learnt the corpus's words.
    assert {"▁cook", "▁rice", "▁slowly"} <= set(tokenizer.convert_ids_to_tokens(ids))


def test_reward_truncation_cuts_the_question_from_the_left(built):
    models, _ = built
    tokenizer = AutoTokenizer.from_pretrained(models.reward)
    question = "First of all, " + "how do I cook rice? " * 20 + "Thanks at last."
    batch = encode_pairs(tokenizer, [question, "Hi."], ["Cook the rice slowly.", "Hello!"], 24)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 24 and ids[0] == 1 and ids.count(2) == 2
    kept_question = tokenizer.decode(ids[1:ids.index(2)])
    answer = tokenizer.decode(ids[ids.index(2) + 1:-1])
    assert "last" in kept_question and "First" not in kept_question
    assert answer == "Cook the rice slowly."
    assert batch["attention_mask"][1].tolist()[-1] == 0  # the short pair is padded on the right


@torch.no_grad()
def test_loaded_models_give_finite_outputs_of_the_real_shapes(built):
    models, _ = built
    policy, tokenizer = load_policy(models.policy, torch.float32), load_tokenizer(models.policy)
    batch = tokenizer([text[:60] for text in dialogues(2)], padding=True, return_tensors="pt")
    logits = policy(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 151936) and torch.isfinite(logits).all()

    reward = load_reward_model(models.reward, torch.float32)
    pairs = encode_pairs(load_reward_tokenizer(models.reward), ["How do I cook rice?", "Hi."],
                         ["Cook the rice slowly.", "Hello! What can I do for you?"], 512)
    scores = reward(**pairs).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_second_build_reuses_the_cache(built, capsys):
    models, build_seconds = built
    weights = Path(models.policy) / "model.safetensors"
    before = (models.manifest, weights.stat().st_mtime_ns)
    start = time.perf_counter()
    assert main(["build", "--policy_layers", "1", "--reward_layers", "1"]) == 0
    assert time.perf_counter() - start < build_seconds / 2
    printed = capsys.readouterr().out
    assert "building" not in printed and (models.manifest, weights.stat().st_mtime_ns) == before
    assert f"{models.policy} (151,047,936 parameters" in printed and f"{models.reward} (145,349,633" in printed
    assert main(["path", "--policy_layers", "1", "--reward_layers", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(cache_dir(TINY)) == str(models.root)


def test_resolve_standin_names_the_built_directories(built):
    models, _ = built
    assert set(STANDINS) == {POLICY_STANDIN, REWARD_STANDIN}
    assert resolve_standin(POLICY_STANDIN, TINY) == models.policy
    assert resolve_standin(REWARD_STANDIN, TINY) == models.reward
    with pytest.raises(StandinError, match="not a stand-in"):
        resolve_standin("qwen2-7b-shape", TINY)


def test_corrupted_weights_are_detected_and_rebuilt(built):
    models, _ = built
    files = models.manifest["files"]
    weights = Path(models.reward) / "model.safetensors"
    with open(weights, "r+b") as fh:  # flip one byte in the middle of the embedding matrix
        fh.seek(os.path.getsize(weights) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert "reward/model.safetensors does not match its sha256" in verify(models.root)
    with pytest.warns(UserWarning, match="broken"):
        rebuilt = build_standins(TINY)
    assert rebuilt.root == models.root
    assert rebuilt.manifest["files"] == files  # the digests of the rebuilt files: the same recipe, the same bytes
