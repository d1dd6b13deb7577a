"""response_mask_from_tokens and the generation memory estimate on hand-written cases (the generation path
itself, gathered, partitioned and the "auto" fallback, is tested on 2 ranks in test_distributed.py)."""
import pytest
import torch

from transformers import Qwen2Config

from rlhf_ds.hybrid import HybridEngine, gather_bytes, generation_memory_bytes, response_mask_from_tokens

EOS, PAD = 1, 0


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
    from rlhf_ds.hybrid import _seeded

    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    with _seeded(5, torch.device("cpu")):
        first = torch.rand(1)
    assert torch.equal(torch.rand(1), expected_next)
    with _seeded(5, torch.device("cpu")):
        assert torch.equal(torch.rand(1), first)


def test_generation_memory_bytes_by_hand():
    """2 layers, 4 heads of 8 (2 KV heads), MLP 64, vocab 100; B=3, P=5, R=7:
    KV 2*2*3*12*2*8 = 2304, prefill 3*3*5*64 = 2880 elements; sampling 2*3*100 float32."""
    config = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=100)
    assert generation_memory_bytes(config, torch.float32, 3, 5, 7) == (2304 + 2880) * 4 + 2 * 3 * 100 * 4
    assert generation_memory_bytes(config, torch.bfloat16, 3, 5, 7) == (2304 + 2880) * 2 + 2 * 3 * 100 * 4
    config.head_dim = 16  # an explicit head_dim wins over hidden_size / heads
    assert generation_memory_bytes(config, torch.float32, 3, 5, 7) == (2 * 2304 + 2880) * 4 + 2400


def test_qwen2_0_5b_generation_estimate():
    """The documented limit: Qwen2-0.5B, bf16, 16 prompts x (128 + 256) tokens."""
    from rlhf_ds.models import qwen2_0_5b_config

    config = qwen2_0_5b_config()
    kv = 2 * 24 * 16 * 384 * 2 * 64
    prefill = 3 * 16 * 128 * 4864
    assert generation_memory_bytes(config, torch.bfloat16, 16, 128, 256) == (kv + prefill) * 2 + 2 * 16 * 151936 * 4


def test_gather_bytes_of_an_unpartitioned_model_is_zero():
    assert gather_bytes(torch.nn.Linear(4, 4)) == 0


def test_unknown_zero3_generation_mode_is_refused():
    with pytest.raises(ValueError, match="zero3_generation='fast'"):
        HybridEngine(None, None, 4, zero3_generation="fast")
