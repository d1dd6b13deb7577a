"""Tiny, deterministic stand-ins for the real models, shared by the multi-rank test scripts.

A word-level policy tokenizer and a random Qwen2 (the policy architecture at toy size), and a separate
word-level reward tokenizer ([CLS] ... [SEP], lower-cased, different ids) with a random DeBERTa-v2
classifier, so the reward side really uses its own vocabulary. Built once by the test process into a tmp
directory; the ranks only load them.
"""
from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (DebertaV2ForSequenceClassification, PreTrainedTokenizerBase, PreTrainedTokenizerFast,
                          Qwen2ForCausalLM)

from rlhf_ds.models import tiny_deberta_config, tiny_qwen2_config

SENTENCES = [
    "Human: how do I bake bread ? Assistant: mix flour water salt and yeast then bake it",
    "Human: what is the capital of France ? Assistant: the capital of France is Paris",
    "Human: can you help me ? Assistant: yes I can help you with that",
    "Human: tell me a joke . Assistant: a cat sat on a mat and the dog ran to it",
]
POLICY_SPECIALS = ["<pad>", "<|endoftext|>", "<unk>"]
REWARD_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
SEED = 0
# A random policy samples EOS with probability ~1/vocab per token; scaling up the EOS row of the tied
# embedding makes its logit swing widely, so some responses end early (mask and padding get exercised).
EOS_EMBEDDING_SCALE = 20.0


def _word_vocab(specials: list[str], lowercase: bool) -> dict[str, int]:
    words = sorted({w.lower() if lowercase else w for s in SENTENCES for w in s.split()})
    return {token: i for i, token in enumerate(specials + words)}


def policy_tokenizer() -> PreTrainedTokenizerBase:
    """Word-level tokenizer with distinct pad and eos, so padding after EOS is visible in tests."""
    tok = Tokenizer(models.WordLevel(_word_vocab(POLICY_SPECIALS, lowercase=False), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def reward_tokenizer() -> PreTrainedTokenizerBase:
    """A different vocabulary (lower-cased, BERT-style specials) as DeBERTa-v3 has its own tokenizer."""
    vocab = _word_vocab(REWARD_SPECIALS, lowercase=True)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]")


def build_models(root: str) -> dict[str, str]:
    """Save a tiny policy and reward model (with tokenizers) under root; returns their directories."""
    paths = {"policy": os.path.join(root, "policy"), "reward": os.path.join(root, "reward")}
    torch.manual_seed(SEED)
    ptok = policy_tokenizer()
    policy = Qwen2ForCausalLM(tiny_qwen2_config(len(ptok), bos_token_id=ptok.eos_token_id,
                                                eos_token_id=ptok.eos_token_id, pad_token_id=ptok.pad_token_id))
    with torch.no_grad():
        policy.get_input_embeddings().weight[ptok.eos_token_id] *= EOS_EMBEDDING_SCALE
    policy.save_pretrained(paths["policy"])
    ptok.save_pretrained(paths["policy"])
    rtok = reward_tokenizer()
    reward = DebertaV2ForSequenceClassification(tiny_deberta_config(len(rtok), pad_token_id=rtok.pad_token_id))
    reward.save_pretrained(paths["reward"])
    rtok.save_pretrained(paths["reward"])
    return paths


def prompts(tokenizer: PreTrainedTokenizerBase, rank: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (the text up to 'Assistant:'), a different ragged batch on every rank."""
    texts = [s.split("Assistant:")[0] + "Assistant:" for s in SENTENCES]
    chosen = [texts[(rank + i) % len(texts)] for i in range(batch_size)]
    return tokenizer(chosen, return_tensors="pt", padding=True)
