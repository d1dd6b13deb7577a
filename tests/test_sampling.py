"""Where a response ends and which distribution it was sampled from (rlhf_ds/sampling.py), on hand-written token
rows, a hand-built base model that keeps talking after its answer, and a random Qwen2 at temperature 0.7."""
import importlib.util
from pathlib import Path

import pytest
import torch

from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.experience import ExperienceMaker
from rlhf_ds.models import CriticModel, tiny_deberta_config
from rlhf_ds.reward import decode_rollout, score_pairs
from rlhf_ds.sampling import Sampler, Sampling, answer_text, response_mask, response_mask_from_tokens, seeded

EOS, PAD = 1, 0
FIXTURES = Path(__file__).resolve().parent / "dist" / "fixtures.py"


def _fixtures():
    spec = importlib.util.spec_from_file_location("dist_fixtures", FIXTURES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixtures = _fixtures()


def test_mask_covers_tokens_up_to_and_including_first_eos():
    response = torch.tensor([
        [5, 6, 7, 8],        # no EOS: whole row is response
        [EOS, PAD, PAD, PAD],  # EOS first: only the EOS counts
        [5, EOS, 7, EOS],    # tokens after the first EOS do not count, later EOS neither
        [5, 6, 7, EOS],      # EOS last
    ])
    expected = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    mask = response_mask_from_tokens(response, EOS)
    assert mask.dtype == torch.long
    assert torch.equal(mask, expected)


def test_pad_equal_to_eos_as_in_qwen2():
    response = torch.tensor([[4, EOS, EOS, EOS], [4, 4, 4, 4]])
    assert torch.equal(response_mask_from_tokens(response, EOS), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))


def test_several_eos_ids_any_of_them_ends_the_response():
    response = torch.tensor([[4, 9, 4, 4], [4, 4, 1, 4], [4, 4, 4, 4]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(response_mask_from_tokens(response, [1, 9]), expected)


def test_empty_batch_and_empty_response():
    assert response_mask_from_tokens(torch.zeros(0, 3, dtype=torch.long), EOS).shape == (0, 3)
    assert response_mask_from_tokens(torch.zeros(2, 0, dtype=torch.long), EOS).shape == (2, 0)


def test_generator_seed_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    with seeded(5, torch.device("cpu")):
        first = torch.rand(1)
    assert torch.equal(torch.rand(1), expected_next)
    with seeded(5, torch.device("cpu")):
        assert torch.equal(torch.rand(1), first)


# --- stop strings -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def talker():
    tokenizer = fixtures.byte_level_tokenizer(fixtures.TALKER_TEXTS)
    model, emitted = fixtures.talker(tokenizer)
    return tokenizer, model, emitted


@pytest.fixture(scope="module")
def reward():
    from transformers import DebertaV2ForSequenceClassification

    tokenizer = fixtures.reward_tokenizer()
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(tiny_deberta_config(len(tokenizer), tokenizer.pad_token_id)).eval()
    return model, tokenizer


STOP = (fixtures.TALKER_MARKER,)


def test_base_model_keeps_talking_without_stop_strings(talker):
    tokenizer, model, emitted = talker
    batch = tokenizer([fixtures.TALKER_PROMPT], return_tensors="pt")
    sequences, mask = Sampler(Sampling(max_new_tokens=16), tokenizer).sample(model, **batch, seed=0)
    response = sequences[0, batch["input_ids"].shape[1]:]
    assert mask.sum().item() == 16  # no EOS: the invented turns would be scored and trained on
    assert tokenizer.decode(response).count(fixtures.TALKER_MARKER) >= 2


def test_stop_string_ends_generation_the_mask_and_the_answer(talker, reward):
    tokenizer, model, emitted = talker
    batch = tokenizer([fixtures.TALKER_PROMPT], return_tensors="pt")
    sequences, mask = Sampler(Sampling(max_new_tokens=16, stop_strings=STOP), tokenizer).sample(model, **batch,
                                                                                                 seed=0)
    prompt_len = batch["input_ids"].shape[1]
    response = sequences[:, prompt_len:]
    # Row 0: the answer, then the marker's tokens (the first of which also ends the answer: ".\n\n"); they count.
    assert mask[0].sum().item() == len(emitted)
    assert response[0, :len(emitted)].tolist() == emitted
    # generate stopped the row there: the rest is padding, which (pad = EOS, as in Qwen2) is not in the mask.
    assert (response[0, len(emitted):] == tokenizer.pad_token_id).all()
    questions, answers = decode_rollout(tokenizer, batch["input_ids"], batch["attention_mask"], response, mask,
                                        STOP)
    assert answers[0] == fixtures.TALKER_ANSWER.strip()
    assert fixtures.TALKER_MARKER not in answers[0] and "Human" not in answers[0]

    # The experience maker hands the reward model exactly the answer, not the invented turn.
    reward_model, reward_tokenizer = reward
    critic = CriticModel(model.model)
    maker = ExperienceMaker(model, critic, model, reward_model, tokenizer, reward_tokenizer,
                            Sampling(max_new_tokens=16, stop_strings=STOP), reward_max_len=64, micro_batch_size=2)
    exp = maker.make(batch["attention_mask"], sequences, mask)
    expected, _ = score_pairs(reward_model, reward_tokenizer, questions, answers, 64)
    torch.testing.assert_close(exp.scores, expected, rtol=0, atol=0)
    talking, _ = score_pairs(reward_model, reward_tokenizer, questions[:1],
                          [tokenizer.decode(response[0], skip_special_tokens=True).strip()], 64)
    assert talking.item() != exp.scores[0].item()


def test_response_mask_cuts_at_the_token_that_completes_the_stop_string(talker):
    tokenizer, _, emitted = talker
    answer = tokenizer.encode(fixtures.TALKER_ANSWER, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    width = len(emitted) + 3

    def pad(ids):
        return ids + [eos] * (width - len(ids))

    rows = torch.tensor([pad(emitted + answer[:2]),         # the stop string, then more text: cut after ":"
                         pad(answer + [eos] + emitted[:2]),  # EOS first; "\n\nHuman" after it does not count
                         (answer * 3)[:width]])               # neither: the whole row
    mask = response_mask(rows, tokenizer, STOP)
    assert mask.sum(1).tolist() == [len(emitted), len(answer) + 1, width]
    assert torch.equal(response_mask(rows, tokenizer, ()), response_mask_from_tokens(rows, eos))


def test_answer_text_cuts_at_the_first_stop_string():
    assert answer_text(" Sure.\n\nHuman: and?\n\nAssistant: x", ("\n\nHuman:", "\n\nAssistant:")) == " Sure."
    assert answer_text("no marker", ("\n\nHuman:",)) == "no marker"
    assert answer_text("a\n\nHuman:", ()) == "a\n\nHuman:"


# --- the sampled distribution is the scored one ------------------------------------------------------------
def test_old_logprobs_are_those_generate_sampled_from_at_temperature_0_7(reward):
    """The experience maker's old_logprobs equal log_softmax of generate's processed scores (the distribution
    each token was drawn from) at every valid position, to 1e-5 in fp32."""
    from transformers import Qwen2ForCausalLM

    from rlhf_ds.models import tiny_qwen2_config

    tokenizer = fixtures.policy_tokenizer()
    torch.manual_seed(3)
    policy = Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.eos_token_id,
                                                tokenizer.pad_token_id)).eval()
    with torch.no_grad():
        policy.get_input_embeddings().weight[tokenizer.eos_token_id] *= fixtures.EOS_EMBEDDING_SCALE
    sampling = Sampling(temperature=0.7, max_new_tokens=10)
    sampler = Sampler(sampling, tokenizer)
    batch = fixtures.prompts(tokenizer, 0, 4)
    with seeded(11, torch.device("cpu")):
        out = policy.generate(**batch, generation_config=sampler.generation_config, output_scores=True,
                              return_dict_in_generate=True)
    prompt_len = batch["input_ids"].shape[1]
    response = out.sequences[:, prompt_len:]
    scores = torch.stack(out.scores, dim=1)  # (B, R, V) after the temperature warper
    sampled_from = torch.log_softmax(scores, -1).gather(-1, response[..., None]).squeeze(-1)
    mask = response_mask(response, tokenizer)
    assert 0 < mask.sum() < mask.numel()  # some rows end early: padding is exercised
    reward_model, reward_tokenizer = reward
    maker = ExperienceMaker(policy, CriticModel(policy.model), policy, reward_model, tokenizer, reward_tokenizer,
                            sampling, reward_max_len=64, micro_batch_size=2)
    exp = maker.make(batch["attention_mask"], out.sequences, mask)
    valid = mask.bool()
    torch.testing.assert_close(exp.old_logprobs[valid], sampled_from[valid], rtol=0, atol=1e-5)
    untempered = torch.log_softmax(scores * 0.7, -1).gather(-1, response[..., None]).squeeze(-1)
    assert (exp.old_logprobs[valid] - untempered[valid]).abs().max() > 1e-2  # the check can tell them apart


@pytest.mark.parametrize("field, value", [("top_k", 5), ("top_p", 0.9)])
def test_truncated_sampling_is_refused_with_one_line(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value} is invalid: PPO's ratio, KL and entropy need the "
                                          "log-probs of the distribution that sampled"):
        PPOConfig(**{field: value}).validate()


def test_config_makes_the_sampling_value_and_parses_stop_strings():
    config = PPOConfig.from_args(["--temperature", "0.7", "--stop_strings", '["\\n\\nHuman:", "\\n\\nUser:"]'])
    assert config.sampling() == Sampling(temperature=0.7, max_new_tokens=32,
                                         stop_strings=("\n\nHuman:", "\n\nUser:"))
    assert PPOConfig().sampling().stop_strings == ("\n\nHuman:",)
    assert PPOConfig.from_args(["--stop_strings", "[]"]).sampling().stop_strings == ()
    with pytest.raises(ConfigError, match="stop_strings"):
        PPOConfig.from_args(["--stop_strings", '[""]'])
    with pytest.raises(ConfigError, match="--stop_strings"):
        PPOConfig.from_args(["--stop_strings", "Human:"])
