"""Cross-tokenizer reward path: the reward model reads exactly the text the policy generated."""
import copy
from pathlib import Path

import pytest
import torch

from rlhf_ds import corpus
from rlhf_ds.embedded import build_policy_tokenizer, build_reward_tokenizer
from rlhf_ds.config import PPOConfig
from rlhf_ds.reward import RunningMoments, decode_rollout, encode_pairs, resolve_reward_max_len


@pytest.fixture(scope="module")
def tokenizers():
    texts = [r["chosen"] for r in corpus.make_corpus(300, seed=5)]
    return build_policy_tokenizer(texts, 400), build_reward_tokenizer(texts, 400)


def test_encode_pairs_cuts_the_question_from_the_left(tokenizers):
    _, reward_tok = tokenizers
    question = "Hi there. Can I ask you something? How do I cook rice at home?"
    batch = encode_pairs(reward_tok, [question], ["Cook the rice slowly."], max_len=12)
    tokens = reward_tok.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens == ["[CLS]", "rice", "at", "home", "?", "[SEP]", "cook", "the", "rice", "slowly", ".", "[SEP]"]


def test_segment_ids_reach_the_reward_model(tokenizers):
    """The question is segment 0 and the answer segment 1, and ``score_pairs`` hands them to the model: the
    embedded reward model reads them to compare the answer with the question (they were dropped once, and its
    copy head saw every token as a question token)."""
    from transformers import DebertaV2ForSequenceClassification

    from rlhf_ds.models import tiny_deberta_config
    from rlhf_ds.reward import score_pairs

    _, reward_tok = tokenizers
    batch = encode_pairs(reward_tok, ["How do I cook rice?"], ["Cook the rice slowly."], max_len=32)
    tokens = reward_tok.convert_ids_to_tokens(batch["input_ids"][0])
    assert batch["token_type_ids"][0].tolist() == [0] * (tokens.index("[SEP]") + 1) + [1] * 6
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(
        tiny_deberta_config(len(reward_tok), reward_tok.pad_token_id, type_vocab_size=2)).eval()
    scores, _ = score_pairs(model, reward_tok, ["How do I cook rice?"], ["Cook the rice slowly."], 32)
    with torch.no_grad():
        with_segments = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
        without = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(scores, with_segments[:, 0]) and not torch.allclose(with_segments, without)


def test_encode_pairs_refuses_a_tokenizer_that_would_cut_the_dialogue_end(tokenizers):
    _, reward_tok = tokenizers
    right = copy.deepcopy(reward_tok)
    right.truncation_side = "right"
    with pytest.raises(ValueError, match="truncation_side='left'.*load_reward_tokenizer"):
        encode_pairs(right, ["a question?"], ["an answer."], max_len=12)


def test_encode_pairs_survives_an_answer_longer_than_the_limit(tokenizers):
    _, reward_tok = tokenizers
    batch = encode_pairs(reward_tok, ["short question?"], ["word " * 50], max_len=16)
    assert batch["input_ids"].shape == (1, 16)


def test_decode_rollout_recovers_the_generated_text(tokenizers):
    policy_tok, _ = tokenizers
    prompts = ["\n\nHuman: How do I cook rice?\n\nAssistant:",
               "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: Is Spain a good place for a holiday?\n\nAssistant:"]
    answers = ["Cook the rice slowly.", "Spain is lovely."]
    eos = policy_tok.eos_token_id
    prompt_ids = [policy_tok(p)["input_ids"] for p in prompts]
    answer_ids = [policy_tok(" " + a)["input_ids"] + [eos] for a in answers]
    P, R = max(map(len, prompt_ids)), max(map(len, answer_ids)) + 2
    prompt_t = torch.full((2, P), eos)
    prompt_mask = torch.zeros((2, P), dtype=torch.long)
    resp_t = torch.full((2, R), eos)
    resp_mask = torch.zeros((2, R), dtype=torch.long)
    for i in range(2):
        prompt_t[i, P - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
        prompt_mask[i, P - len(prompt_ids[i]):] = 1
        resp_t[i, :len(answer_ids[i])] = torch.tensor(answer_ids[i])
        resp_mask[i, :len(answer_ids[i])] = 1
    questions, decoded = decode_rollout(policy_tok, prompt_t, prompt_mask, resp_t, resp_mask)
    assert decoded == answers
    assert questions == [p[:-len("\n\nAssistant:")].strip() for p in prompts]


def test_running_moments_match_full_statistics():
    data = torch.randn(100, dtype=torch.float64) * 3 + 1
    moments = RunningMoments()
    for chunk in data.split(17):
        moments.update(chunk.mean().item(), chunk.var(unbiased=False).item(), chunk.numel())
    assert moments.mean == pytest.approx(data.mean().item())
    assert moments.var == pytest.approx(data.var(unbiased=False).item())
    assert moments.normalize(data).mean().item() == pytest.approx(0.0, abs=1e-9)


def test_reward_max_len_is_capped_at_the_reward_models_limit():
    """DeBERTa-v3's 512 positions (the OpenAssistant model's config and tokenizer both say 512): asking for 1024
    is capped with a one-line warning naming the field; None means the model's own limit."""
    from types import SimpleNamespace

    deberta_v3 = SimpleNamespace(max_position_embeddings=512)
    tokenizer = SimpleNamespace(model_max_length=512)
    value, warning = resolve_reward_max_len(1024, deberta_v3, tokenizer)
    assert value == 512 and "reward_max_len=1024" in warning and "\n" not in warning
    assert resolve_reward_max_len(None, deberta_v3, tokenizer) == (512, None)
    assert resolve_reward_max_len(256, deberta_v3, tokenizer) == (256, None)
    no_limit = SimpleNamespace(model_max_length=int(1e30))  # what a tokenizer without a limit reports
    assert resolve_reward_max_len(None, SimpleNamespace(max_position_embeddings=128), no_limit) == (128, None)
    assert resolve_reward_max_len(None, SimpleNamespace(), no_limit) == (512, None)


def test_shipped_real_run_config_fits_the_reward_model():
    config = PPOConfig.from_file(str(Path(__file__).resolve().parents[1] / "launch" / "configs" / "qwen2_hh.yaml"))
    assert config.reward_max_len is None or config.reward_max_len <= 512
    assert config.stop_strings == ["\n\nHuman:"] and config.gradient_checkpointing
