"""Load the four PPO models and their tokenizers, and configs of the architectures they use.

Everything goes through public transformers APIs and safetensors only (no pickled weights);
``trust_remote_code`` is passed through from the config and off by default. Loading under ZeRO-3 is
partitioned when the caller keeps a ``transformers.integrations.HfDeepSpeedConfig`` alive (engines.py does).

Shapes: B sequences, L tokens (prompt + response), H hidden size.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DebertaV2Config, PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config, TokenizersBackend)
from transformers.models.auto.tokenization_auto import get_tokenizer_config

from rlhf_ds.data import looks_like_path
from rlhf_ds.errors import KnownError

VALUE_HEAD_FILE = "value_head.safetensors"

# Qwen/Qwen2-0.5B config.json: the policy architecture. The tiny config keeps everything but the sizes.
_QWEN2_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=131072, max_window_layers=24, bos_token_id=151643,
    eos_token_id=151643,
)
_QWEN2_FAMILY = dict(
    hidden_act="silu", rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True, use_sliding_window=False, attention_dropout=0.0, initializer_range=0.02,
)
# microsoft/deberta-v3-large config.json (the backbone of OpenAssistant/reward-model-deberta-v3-large-v2):
# disentangled relative attention with log buckets, no absolute position input.
_DEBERTA_V3_FAMILY = dict(
    relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=256, max_relative_positions=-1,
    norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0,
    hidden_act="gelu", layer_norm_eps=1e-7, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    initializer_range=0.02,
)
_DEBERTA_V3_MLP_RATIO = 4096 // 1024  # intermediate_size / hidden_size of deberta-v3-large


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for left-padded rows, counted from each row's first real token.

    attention_mask: (B, L) -> (B, L) int64. The same rule HF ``generate`` uses, so a training forward over
    a generated sequence sees every token at the position it was sampled at. Padded positions get 0.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class ModelError(KnownError, ValueError):
    """A model path that cannot serve its role (missing, not a model, the wrong kind of head); one line."""


# The head each role needs, by the suffix of the architecture names transformers writes into config.json.
_ROLE_HEADS = {"policy_model": ("ForCausalLM", "LMHeadModel"), "critic_model": None,
               "reward_model": ("ForSequenceClassification",)}


def check_model_source(path: str, field: str, trust_remote_code: bool = False):
    """Before any weights load: ``path`` (a local directory or a hub name) holds a model that can serve as
    ``field`` ("policy_model", "critic_model" or "reward_model"); returns its config.

    A local path must be a directory with config.json. The policy must be a causal LM; the reward model a
    sequence classifier with one label (a causal LM there would get a randomly initialised head and train PPO
    against noise, with only a warning from transformers). Any failure is a ModelError naming the field.
    """
    from transformers import AutoConfig

    local = os.path.expanduser(path)
    is_local = os.path.exists(local) or looks_like_path(path)
    if is_local:
        if not os.path.isdir(local):
            raise ModelError(f"{field}={path!r} does not exist: give a Hugging Face model directory or a hub name")
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ModelError(f"{field}={path!r} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(local if is_local else path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"{field}={path!r} cannot be loaded ({first}): download it and give its directory") \
            from None
    heads = _ROLE_HEADS[field]
    architectures = getattr(config, "architectures", None) or []
    if heads and architectures and not any(a.endswith(heads) for a in architectures):
        raise ModelError(f"{field}={path!r} is a {', '.join(architectures)}, not a model with a "
                         f"{' or '.join(heads)} head: check the path")
    if field == "reward_model" and getattr(config, "num_labels", 1) != 1:
        raise ModelError(f"reward_model={path!r} has num_labels={config.num_labels}: a reward model gives one score "
                         "(num_labels=1)")
    return config


def _refuse_missing_weights(info: dict, path: str, field: str) -> None:
    """A model whose checkpoint lacked some of its weights got them randomly initialised: refuse it."""
    missing = list(info.get("missing_keys", []))
    if missing:
        raise ModelError(f"{field}={path!r} has no trained weights for {', '.join(sorted(missing)[:3])}"
                         f"{' ...' if len(missing) > 3 else ''} (they would be random): give a model trained "
                         "for this role")


def load_saved_tokenizer(path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The tokenizer saved at ``path``, as saved.

    transformers 5 rebuilds the tokenizer of some model types (qwen2 among them) as that type's own class
    (Qwen2Tokenizer: Qwen's regex, byte-level BPE) whatever tokenizer_config.json declares, which silently
    re-tokenizes a custom tokenizer saved next to a Qwen2 config (the embedded and test models). A generic
    tokenizers-library tokenizer (``TokenizersBackend``, alias ``PreTrainedTokenizerFast``) is therefore
    loaded as itself; everything else (hub Qwen2, DeBERTa, remote code) goes through AutoTokenizer.
    """
    saved = get_tokenizer_config(path)
    if saved.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast") and "auto_map" not in saved:
        return TokenizersBackend.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer at {path} has neither a pad nor an eos token: add a pad token to it")
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The policy tokenizer: left padding so every prompt ends where generation starts; pad = eos if unset."""
    tokenizer = load_saved_tokenizer(path, trust_remote_code)
    _ensure_pad_token(tokenizer, path)
    tokenizer.padding_side = "left"
    return tokenizer


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere, also in training mode (which the update needs for gradient checkpointing): the
    PPO ratio compares the update's forward with the rollout's, and dropout would make it noise. Covers
    ``nn.Dropout`` modules and attention modules that keep their probability as a float attribute (Qwen2's
    ``attention_dropout``, 0 in its released configs anyway)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def pretrained_kwargs(trust_remote_code: bool) -> dict:
    """What every ``from_pretrained`` of a model here passes besides its own arguments. ``use_kernels``: with the
    ``kernels`` package (a dependency of transformers 5.25) ``from_pretrained`` defaults to Hub kernels, which a
    GPU process fetches at its first ``train()``/``eval()`` and runs: compiled code from the Hub, so it comes
    only with ``trust_remote_code`` (and an offline GPU machine stopped there with "not available in the local
    cache")."""
    return dict(trust_remote_code=trust_remote_code, use_kernels=trust_remote_code)


def load_policy(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> PreTrainedModel:
    """Actor or reference: a causal LM, dropout off. KV cache off for training forwards (generation turns it
    back on). A LoRA adapter directory (peft's format, ``launch/export.py --adapter``) loads onto the base model
    its adapter_config.json names, through transformers' own peft integration."""
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                       output_loading_info=True, **pretrained_kwargs(trust_remote_code))
    _refuse_missing_weights(info, path, "policy_model")
    model.config.use_cache = False
    return disable_dropout(model)


class CriticModel(nn.Module):
    """Value function: a transformer backbone and a linear head giving one value per token.

    The head starts at zero (weight and bias): initial values are exactly 0, the same on every rank and
    under every ZeRO stage without any RNG, and the first update still moves it because its gradient is
    hidden_state * dL/dvalue. The head takes the backbone's dtype, since DeepSpeed refuses a module of mixed
    dtypes under bf16/fp16 when it was built outside ``zero.Init``.
    """

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1, dtype=backbone.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, L) -> values (B, L) float32 (value of the state after each token)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()


def load_critic(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> CriticModel:
    """Backbone from any checkpoint of the family (a causal LM's extra lm_head is dropped); the value head from
    ``path/value_head.safetensors`` when ``path`` is a critic saved by ``save_critic``, else zeros."""
    backbone, info = AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=True, output_loading_info=True,
                                               **pretrained_kwargs(trust_remote_code))
    _refuse_missing_weights(info, path, "critic_model")
    backbone.config.use_cache = False
    critic = CriticModel(disable_dropout(backbone))
    head_file = os.path.join(path, VALUE_HEAD_FILE)
    if os.path.isfile(head_file):
        critic.value_head.load_state_dict({k: v.to(dtype) for k, v in load_file(head_file).items()})
    return critic


def save_critic(model: CriticModel, out_dir: str, state_dict: Optional[dict] = None) -> None:
    """Write the backbone as an HF directory plus ``value_head.safetensors``, loadable by ``load_critic``.

    ``state_dict`` (keys ``backbone.*`` and ``value_head.*``) is for ZeRO-3, whose module holds only
    partitions: pass a consolidated one (e.g. from ``get_fp32_state_dict_from_zero_checkpoint``). Call on one
    rank only.
    """
    state = model.state_dict() if state_dict is None else state_dict
    parts: dict[str, dict] = {"backbone.": {}, "value_head.": {}}
    for key, tensor in state.items():
        for prefix, part in parts.items():
            if key.startswith(prefix):
                part[key[len(prefix):]] = tensor
    os.makedirs(out_dir, exist_ok=True)
    model.backbone.save_pretrained(out_dir, state_dict=parts["backbone."])
    save_file({k: v.detach().contiguous().cpu() for k, v in parts["value_head."].items()},
              os.path.join(out_dir, VALUE_HEAD_FILE))


def load_reward_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The reward model's own tokenizer: padding on the right, because DeBERTa pools the first token ([CLS]) and
    left padding would put a pad there; truncation from the left, because a dialogue too long for the reward
    model must keep its end (``reward.encode_pairs``)."""
    tokenizer = load_saved_tokenizer(path, trust_remote_code)
    _ensure_pad_token(tokenizer, path)
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    return tokenizer


def load_reward_model(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> PreTrainedModel:
    """The reward model: a sequence classifier with one logit (its tokenizer: ``load_reward_tokenizer``)."""
    model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                                     output_loading_info=True,
                                                                     **pretrained_kwargs(trust_remote_code))
    _refuse_missing_weights(info, path, "reward_model")
    return model


def head_dim(config) -> int:
    """Width of one attention head: the config's own ``head_dim`` where it sets one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token adds to a decoder: 2 (K, V) x layers x kv_heads x head_dim x element size."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim(config) * dtype.itemsize


def qwen2_0_5b_config() -> Qwen2Config:
    """The exact Qwen2-0.5B architecture (494M parameters, tied embeddings), for random-init benchmarks."""
    return Qwen2Config(**_QWEN2_0_5B, **_QWEN2_FAMILY)


def tiny_qwen2_config(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                      hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                      intermediate_size: Optional[int] = None, max_position_embeddings: int = 256) -> Qwen2Config:
    """Qwen2-0.5B's architecture (GQA, RoPE theta 1e6, SwiGLU, RMSNorm, QKV bias, tied embeddings) at toy size.

    intermediate_size defaults to Qwen2-0.5B's MLP ratio times hidden_size.
    """
    if intermediate_size is None:
        intermediate_size = hidden_size * _QWEN2_0_5B["intermediate_size"] // _QWEN2_0_5B["hidden_size"]
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, max_window_layers=num_layers,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **_QWEN2_FAMILY,
    )


def tiny_deberta_config(vocab_size: int, pad_token_id: int, hidden_size: int = 64, num_layers: int = 2,
                        num_heads: int = 4, intermediate_size: Optional[int] = None,
                        max_position_embeddings: int = 256, **family_overrides) -> DebertaV2Config:
    """DeBERTa-v3's architecture (relative p2c/c2p attention, 256 log position buckets, shared attention keys)
    at toy size, with one output logit (num_labels=1) as a reward model. intermediate_size defaults to
    DeBERTa-v3's MLP ratio times hidden_size; ``family_overrides`` replace DeBERTa-v3's own settings (the
    embedded reward model tells the question and answer segments apart and trains without dropout)."""
    if intermediate_size is None:
        intermediate_size = hidden_size * _DEBERTA_V3_MLP_RATIO
    unknown = set(family_overrides) - set(_DEBERTA_V3_FAMILY)
    if unknown:
        raise TypeError(f"tiny_deberta_config: {sorted(unknown)} are not DeBERTa-v3 family settings")
    return DebertaV2Config(
        vocab_size=vocab_size, pad_token_id=pad_token_id, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, num_labels=1,
        **{**_DEBERTA_V3_FAMILY, **family_overrides},
    )
