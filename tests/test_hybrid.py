"""The generation memory estimate on hand-written cases (the generation path
itself, gathered, partitioned and the "auto" fallback, is tested on 2 ranks in test_distributed.py)."""
import pytest
import torch

from transformers import Qwen2Config

from rlhf_ds.hybrid import HybridEngine, generation_memory_bytes
from rlhf_ds.zero3 import gather_bytes
from rlhf_ds.sampling import Sampling



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
        HybridEngine(None, None, Sampling(), zero3_generation="fast")
