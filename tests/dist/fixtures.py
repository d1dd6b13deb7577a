"""Tiny, deterministic stand-ins for the real models, shared by the multi-rank test scripts.

A word-level policy tokenizer and a random Qwen2 (the policy architecture at toy size), and a separate
word-level reward tokenizer ([CLS] ... [SEP], lower-cased, different ids) with a random DeBERTa-v2
classifier, so the reward side really uses its own vocabulary. Built once by the test process into a tmp
directory; the ranks only load them.
"""
from __future__ import annotations

import os

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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
                                   unk_token="[UNK]", padding_side="right", truncation_side="left")


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


# --- a hand-built base model that keeps talking -----------------------------------------------------------
TALKER_PROMPT = "\n\nHuman: How often should I water a cactus?\n\nAssistant:"
TALKER_ANSWER = " Water it weekly."
TALKER_MARKER = "\n\nHuman:"
TALKER_TEXTS = ([TALKER_PROMPT + TALKER_ANSWER + TALKER_MARKER + " Thanks, and a fern?\n\nAssistant: Keep it damp."] * 3
                + ["\n\nHuman: Tell me a joke.\n\nAssistant: A cactus walked into a bar."])
# Qwen2's pre-tokenizer split: "\n\n" stays one piece, and punctuation takes the newlines after it (".\n\n").
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
               r"""\s+(?!\S)|\s+""")


def byte_level_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer like Qwen2's (its split pattern; <|endoftext|> is both EOS and pad, no BOS)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def chain_policy(tokenizer: PreTrainedTokenizerBase, successor: dict[int, int], hidden_size: int = 64,
                 scale: float = 20.0) -> Qwen2ForCausalLM:
    """A Qwen2 whose next token is a fixed function of the current one (``successor``): one layer whose
    attention and MLP write nothing, so the last hidden state is the normalised embedding of the current token,
    and an untied head whose row for ``successor[t]`` is t's embedding direction (other rows 0). The
    successor's logit beats every other by tens of nats: sampling is deterministic."""
    torch.manual_seed(SEED)
    config = tiny_qwen2_config(len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               hidden_size=hidden_size, num_layers=1, num_heads=4, num_kv_heads=2)
    config.tie_word_embeddings = False
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.model.layers.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        head.zero_()
        for current, following in successor.items():
            head[following] = scale * embedding[current] / embedding[current].norm()
    return model


def talker(tokenizer: PreTrainedTokenizerBase) -> tuple[Qwen2ForCausalLM, list[int]]:
    """A base model that answers TALKER_ANSWER after TALKER_PROMPT, then writes TALKER_MARKER and starts a turn
    of its own, for ever: the tokens of answer + marker end with the prompt's last token (":"), which leads back
    into the answer. The answer's last token (".\n\n") holds the marker's start. Returns it with the token ids
    of one answer + marker."""
    emitted = tokenizer.encode(TALKER_ANSWER + TALKER_MARKER, add_special_tokens=False)
    chain = tokenizer.encode(TALKER_PROMPT, add_special_tokens=False)[-1:] + emitted
    assert chain[0] == chain[-1] and len(set(chain)) == len(chain) - 1, "the chain's tokens must not repeat"
    return chain_policy(tokenizer, dict(zip(chain, chain[1:]))), emitted
