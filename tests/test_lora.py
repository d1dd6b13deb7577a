"""LoRA through peft (rlhf_ds/lora.py), in one process on a tiny Qwen2: seeded adapters that start as the base
model, the reference they make free (adapters off = the base model, bit for bit), merging for export, and the
one-line error for target modules that match nothing. On 2 ranks: tests/test_trainer.py (the reference log-probs,
ZeRO-2) and tests/test_checkpoint.py (ZeRO-3, bf16, resume after SIGKILL, exports)."""
import copy

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from rlhf_ds import lora
from rlhf_ds.config import ConfigError, PPOConfig
from rlhf_ds.models import CriticModel, load_critic, load_policy, save_critic, tiny_qwen2_config

IDS = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(1))


def tiny_policy(dtype=torch.float32):
    torch.manual_seed(0)
    config = tiny_qwen2_config(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def adapters(**fields):
    return lora.lora_config(PPOConfig(lora_rank=4, **fields).validate(), "actor")


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def nudge_adapters(model, seed=3):
    """Random B matrices (peft starts them at zero), so that the adapters change the model's output."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05


def test_full_fine_tuning_makes_no_adapters():
    assert lora.lora_config(PPOConfig().validate(), "actor") is None
    assert lora.lora_config(PPOConfig(lora_rank=8, lora_critic=False).validate(), "critic") is None
    assert lora.lora_config(PPOConfig(lora_rank=8).validate(), "critic").r == 8


def test_adapters_are_seeded_start_as_the_base_and_leave_the_global_rng_alone():
    base = tiny_policy()
    expected = logits(base)
    rng = torch.get_rng_state()
    first, second = (lora.add_adapters(copy.deepcopy(base), adapters(), seed=7) for _ in range(2))
    other = lora.add_adapters(copy.deepcopy(base), adapters(), seed=8)
    assert torch.equal(torch.get_rng_state(), rng)
    a = {n: p for n, p in first.named_parameters() if p.requires_grad}
    b = {n: p for n, p in second.named_parameters() if p.requires_grad}
    c = {n: p for n, p in other.named_parameters() if p.requires_grad}
    assert a and a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a if "lora_A" in n)
    assert all("lora_" in name for name in a)  # the base weights are frozen
    assert torch.equal(logits(first), expected)  # B = 0: the wrapped model is the base model


def test_adapters_off_is_the_base_model_bit_for_bit():
    base = tiny_policy()
    expected = logits(base)
    model = lora.add_adapters(copy.deepcopy(base), adapters(), seed=0)
    nudge_adapters(model)
    assert (logits(model) - expected).abs().max() > 1e-3
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model), expected)
    assert (logits(model) - expected).abs().max() > 1e-3  # switched back on


def test_adapters_take_the_base_dtype():
    model = lora.add_adapters(tiny_policy(torch.bfloat16), adapters(), seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_target_modules_that_match_nothing_are_one_line():
    with pytest.raises(ConfigError) as err:
        lora.add_adapters(tiny_policy(), adapters(lora_target_modules=["query", "value"]), seed=0)
    assert "lora_target_modules=['query', 'value'] match no module of Qwen2ForCausalLM" in str(err.value)
    assert "\n" not in str(err.value)


def test_merging_a_state_dict_gives_the_adapted_models_outputs(tmp_path):
    """A policy's state dict without its tied LM head (as DeepSpeed consolidates it) and a critic's (adapters on
    the backbone, value head beside them), filled into meta skeletons, merged and saved: ordinary models that load
    without peft and give the adapted models' outputs."""
    policy = lora.add_adapters(tiny_policy(), adapters(), seed=0)
    nudge_adapters(policy)
    state = {k: v.clone() for k, v in policy.state_dict().items() if not k.endswith("lm_head.weight")}
    with torch.device("meta"):
        skeleton = type(lora.base_model(policy))(copy.deepcopy(policy.config))
    merged = lora.merge(lora.filled(lora.on_meta(skeleton, lora.adapter_config(policy)), state))
    assert type(merged).__name__ == "Qwen2ForCausalLM" and not lora.has_adapters(merged)
    assert not any("lora" in name for name in merged.state_dict())
    merged.save_pretrained(tmp_path / "policy", state_dict=merged.state_dict())
    torch.testing.assert_close(logits(load_policy(str(tmp_path / "policy"), torch.float32)), logits(policy),
                               rtol=0, atol=1e-5)

    critic = CriticModel(AutoModel.from_config(policy.config))
    critic.backbone = lora.add_adapters(critic.backbone, lora.lora_config(PPOConfig(lora_rank=4).validate(),
                                                                          "critic"), seed=0)
    nudge_adapters(critic)
    torch.nn.init.normal_(critic.value_head.weight)
    mask = torch.ones_like(IDS)
    with torch.device("meta"):
        skeleton = CriticModel(lora.on_meta(AutoModel.from_config(policy.config),
                                            lora.adapter_config(critic.backbone)))
    merged_critic = lora.merge(lora.filled(skeleton, {k: v.clone() for k, v in critic.state_dict().items()}))
    assert not lora.has_adapters(merged_critic.backbone)
    save_critic(merged_critic, str(tmp_path / "critic"), merged_critic.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(load_critic(str(tmp_path / "critic"), torch.float32)(IDS, mask),
                                   critic(IDS, mask), rtol=0, atol=1e-5)


def test_generation_with_adapters_samples_as_the_base_model_and_feeds_the_head_a_contiguous_input():
    """A fresh LoRA actor (B = 0) samples exactly the base model's tokens from the same seed: peft's generate
    takes our generation config. Its frozen LM head reads contiguous inputs only (sampling.py: a strided prefill
    input to a head without grad made torch copy the weight per row, 10x slower generation at Qwen2's
    vocabulary)."""
    from rlhf_ds.embedded import build
    from rlhf_ds.models import load_tokenizer
    from rlhf_ds.sampling import Sampler, Sampling

    path = build().policy
    tokenizer = load_tokenizer(path)
    base = load_policy(path, torch.float32).eval()
    adapted = lora.add_adapters(load_policy(path, torch.float32), adapters(), seed=0).eval()
    seen = []
    adapted.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0]))
    batch = tokenizer(["\n\nHuman: How do I keep basil alive?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"],
                      return_tensors="pt", padding=True)
    sampler = Sampler(Sampling(temperature=1.0, max_new_tokens=6, stop_strings=()), tokenizer)
    expected, _ = sampler.sample(base, batch["input_ids"], batch["attention_mask"], seed=5)
    sequences, _ = sampler.sample(adapted, batch["input_ids"], batch["attention_mask"], seed=5)
    assert torch.equal(sequences, expected)
    assert seen and seen[0].shape[1] == 1 and all(hidden.is_contiguous() for hidden in seen)
