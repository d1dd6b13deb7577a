"""Model and tokenizer loading, the critic's value head, and the architecture configs (single process)."""
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM

from rlhf_ds.models import (VALUE_HEAD_FILE, CriticModel, ModelError, check_model_source, load_critic, load_policy,
                            load_reward_model, load_reward_tokenizer, load_tokenizer, position_ids_from_mask,
                            qwen2_0_5b_config, save_critic, tiny_deberta_config, tiny_qwen2_config)

QWEN2_0_5B_PARAMETERS = 494_032_768  # Qwen/Qwen2-0.5B, embeddings tied


def _fixtures():
    spec = importlib.util.spec_from_file_location("dist_fixtures", Path(__file__).parent / "dist" / "fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    fixtures = _fixtures()
    return fixtures, fixtures.build_models(str(tmp_path_factory.mktemp("models")))


def test_qwen2_0_5b_config_is_the_real_architecture():
    config = qwen2_0_5b_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (896, 24, 14, 2, 4864, 151936)
    assert config.rope_parameters["rope_theta"] == 1e6 and config.tie_word_embeddings
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == QWEN2_0_5B_PARAMETERS


def test_tiny_configs_keep_the_families():
    qwen = tiny_qwen2_config(50, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    assert qwen.num_key_value_heads < qwen.num_attention_heads and qwen.tie_word_embeddings
    assert qwen.rope_parameters == qwen2_0_5b_config().rope_parameters
    deberta = tiny_deberta_config(50, pad_token_id=0)
    assert deberta.relative_attention and deberta.pos_att_type == ["p2c", "c2p"] and not deberta.position_biased_input
    assert deberta.position_buckets == 256 and deberta.share_att_key and deberta.num_labels == 1
    assert deberta.type_vocab_size == 0 and deberta.hidden_dropout_prob == 0.1
    segments = tiny_deberta_config(50, pad_token_id=0, type_vocab_size=2, hidden_dropout_prob=0.0)
    assert segments.type_vocab_size == 2 and segments.hidden_dropout_prob == 0.0 and segments.relative_attention
    with pytest.raises(TypeError, match="'dropout'.*not DeBERTa-v3 family settings"):
        tiny_deberta_config(50, pad_token_id=0, dropout=0.0)


def test_position_ids_follow_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(position_ids_from_mask(mask), torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]))


def test_custom_tokenizer_beside_a_qwen2_config_loads_as_saved(tiny):
    """transformers 5 would rebuild it as Qwen2Tokenizer (different pre-tokenizer) and re-tokenize."""
    fixtures, paths = tiny
    text = "Human: tell me a joke . Assistant:"
    tokenizer = load_tokenizer(paths["policy"])
    assert tokenizer(text)["input_ids"] == fixtures.policy_tokenizer()(text)["input_ids"]
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"


def test_missing_pad_token_falls_back_to_eos(tiny, tmp_path):
    fixtures, _ = tiny
    tokenizer = fixtures.policy_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id


def test_reward_model_pads_right_for_cls_pooling(tiny):
    _, paths = tiny
    model, tokenizer = load_reward_model(paths["reward"], torch.float32), load_reward_tokenizer(paths["reward"])
    batch = tokenizer(["Human: hi", "Human: can you help me ?"], ["yes", "no"], padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "right" and (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert tokenizer.truncation_side == "left"  # a long dialogue keeps its end
    assert model(**batch).logits.shape == (2, 1)


def test_critic_starts_at_zero_and_round_trips(tiny, tmp_path):
    _, paths = tiny
    critic = load_critic(paths["policy"], torch.float32)
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    values = critic(ids, mask)
    assert values.shape == (2, 5) and values.dtype == torch.float32 and torch.all(values == 0)
    with torch.no_grad():
        critic.value_head.weight.normal_()
        critic.value_head.bias.fill_(0.5)
    save_critic(critic, str(tmp_path))
    assert (tmp_path / VALUE_HEAD_FILE).is_file()
    reloaded = load_critic(str(tmp_path), torch.float32)
    torch.testing.assert_close(reloaded(ids, mask), critic(ids, mask))


def test_critic_head_takes_backbone_dtype(tiny):
    """DeepSpeed refuses mixed dtypes under bf16 when the head was built outside zero.Init."""
    _, paths = tiny
    critic = load_critic(paths["policy"], torch.bfloat16)
    assert {p.dtype for p in critic.parameters()} == {torch.bfloat16}
    assert isinstance(critic, CriticModel)


def test_policy_loads_without_kv_cache_for_training(tiny):
    _, paths = tiny
    assert load_policy(paths["policy"], torch.float32).config.use_cache is False


def test_no_hub_kernels_without_trust_remote_code(tiny):
    """transformers 5.25 with ``kernels`` installed defaults to Hub kernels, fetched and run at a GPU model's first
    train()/eval(): remote code, and fatal offline (the first GPU run stopped there). Off for every role."""
    from transformers.utils.import_utils import is_kernels_available

    assert is_kernels_available()  # the test means nothing where transformers would not use them anyway
    _, paths = tiny
    models = {"policy": load_policy(paths["policy"], torch.float32),
              "critic": load_critic(paths["policy"], torch.float32).backbone,
              "reward": load_reward_model(paths["reward"], torch.float32)}
    assert {role: model.use_kernels for role, model in models.items()} == dict.fromkeys(models, False)


# --- the right kind of model for each role, checked before (or while) loading --------------------------------
def test_model_paths_that_cannot_serve_their_role_are_one_line(tiny, tmp_path):
    _, paths = tiny
    (tmp_path / "empty").mkdir()
    cases = [("./no/such/model", "policy_model", "does not exist"),
             (str(tmp_path / "empty"), "policy_model", "not a Hugging Face model directory (no config.json)"),
             (paths["policy"], "reward_model", "is a Qwen2ForCausalLM, not a model with a ForSequenceClassification"),
             (paths["reward"], "policy_model", "is a DebertaV2ForSequenceClassification, not a model with a "
                                               "ForCausalLM or LMHeadModel head")]
    for path, field, needle in cases:
        with pytest.raises(ModelError) as caught:
            check_model_source(path, field)
        assert needle in str(caught.value) and f"{field}=" in str(caught.value) and "\n" not in str(caught.value)
    assert check_model_source(paths["policy"], "policy_model").model_type == "qwen2"
    assert check_model_source(paths["policy"], "critic_model").model_type == "qwen2"


def test_reward_model_with_two_labels_or_without_its_head_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, DebertaV2ForSequenceClassification

    _, paths = tiny
    two = DebertaV2ForSequenceClassification.from_pretrained(paths["reward"], num_labels=2,
                                                             ignore_mismatched_sizes=True)
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(ModelError, match="num_labels=2: a reward model gives one score"):
        check_model_source(str(tmp_path / "two"), "reward_model")
    # A checkpoint without the classification head: transformers would initialise it randomly, with a warning.
    headless = tmp_path / "headless"
    DebertaV2ForSequenceClassification.from_pretrained(paths["reward"]).save_pretrained(headless)
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith(("classifier", "pooler"))},
              headless / "model.safetensors", metadata={"format": "pt"})
    assert AutoConfig.from_pretrained(headless).num_labels == 1  # passes the config check ...
    with pytest.raises(ModelError, match="reward_model=.* has no trained weights for classifier"):
        load_reward_model(str(headless), torch.float32)  # ... and is refused as it loads


def test_a_hub_name_that_cannot_be_fetched_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up
    with pytest.raises(ModelError, match=r"policy_model='rlhf-ds-tests/not-a-model' cannot be loaded .*download it"):
        check_model_source("rlhf-ds-tests/not-a-model", "policy_model")
