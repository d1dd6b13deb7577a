"""The embedded default: a tiny Qwen2 SFT policy and a tiny DeBERTa-v2 reward model, built by rlhf-ds itself.

No model hub is needed: ``build()`` trains both tokenizers and both models on the synthetic HH-format corpus
(``rlhf_ds.corpus``) and saves them with ``save_pretrained`` (safetensors) into a cache directory that the
ordinary ``from_pretrained`` calls load with ``trust_remote_code=False``. They are the same architectures as
Qwen2-0.5B and DeBERTa-v3 with *different* tokenizers (byte-level BPE vs WordPiece), so PPO runs the exact code
path of the real models, cross-tokenizer reward included, on a CPU in minutes.

The cache is ``$RLHF_DS_CACHE/embedded/<recipe hash>`` (``RLHF_DS_CACHE`` defaults to ``~/.cache/rlhf_ds``),
built and verified by ``cache.cached_build``: a partial or corrupted cache is detected, reported and rebuilt.

    python -m rlhf_ds.embedded build      # build (or verify) and print the quality report
    python -m rlhf_ds.embedded path       # print the cache directory
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ds import corpus
from rlhf_ds.cache import BuiltModels, cache_root, cached_build, recipe_digest
from rlhf_ds.data import PromptCollator, extract_prompt, question_from_prompt
from rlhf_ds.errors import run_main
from rlhf_ds.reward import REWARD_INPUTS, score_pairs
from rlhf_ds.sampling import Sampler, Sampling
from rlhf_ds.supervised import (Schedule, evaluate_reward_model, preference_pairs, train_reward_model, train_sft)

EOS = "<|endoftext|>"  # Qwen2's end-of-text token, also its padding token
POLICY_SPECIALS = (EOS, "<|im_start|>", "<|im_end|>")
REWARD_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FLAW_FREE = "none"


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the embedded models; its hash names the cache directory."""

    seed: int = 0
    policy_vocab_size: int = 1024
    policy_hidden_size: int = 128
    policy_layers: int = 4
    policy_heads: int = 4
    policy_kv_heads: int = 2
    policy_intermediate_size: int = 384
    reward_vocab_size: int = 1024
    reward_hidden_size: int = 96
    reward_layers: int = 2
    reward_heads: int = 4
    max_seq_len: int = 160
    sft_rejected_fraction: float = 0.4
    sft_steps: int = 1200
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    reward_relevance_steps: int = 50
    reward_steps: int = 250
    reward_batch_size: int = 32
    reward_lr: float = 1e-3
    eval_pairs: int = 400
    eval_prompts: int = 128
    eval_new_tokens: int = 32
    corpus_version: int = 2

    def digest(self) -> str:
        return recipe_digest(self)


class EmbeddedModels(BuiltModels):
    """Where a built embedded default lives, with the quality figures its build measured."""

    @property
    def quality(self) -> dict:
        return self.manifest["quality"]


# --- tokenizers -----------------------------------------------------------------------------------------
def _texts(records: list[dict]) -> list[str]:
    return [r["chosen"] for r in records] + [r["rejected"] for r in records]


def build_policy_tokenizer(texts: list[str], vocab_size: int):
    """A ``Qwen2Tokenizer`` whose BPE vocabulary is trained on ``texts``.

    It uses Qwen2's own normaliser and pre-tokeniser (NFC, Qwen's split regex, byte level), so
    ``AutoTokenizer.from_pretrained`` rebuilds exactly this tokenizer; EOS doubles as padding, as in Qwen2.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(POLICY_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    return Qwen2Tokenizer(vocab=bpe["vocab"], merges=merges, eos_token=EOS, pad_token=EOS,
                          additional_special_tokens=list(POLICY_SPECIALS[1:]))


def build_reward_tokenizer(texts: list[str], vocab_size: int):
    """WordPiece with a BERT-style pair template ``[CLS] question [SEP] answer [SEP]`` (a different vocabulary),
    returning segment ids (0 question, 1 answer) as DeBERTa's tokenizer does.

    The vocabulary is counted here rather than by the ``tokenizers`` WordPiece trainer, whose merges break ties
    in hash order (different ids from run to run): every character (alone and as a ``##`` continuation), then
    the most frequent words, ties broken alphabetically. Unseen words fall back to characters.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(word for text in texts
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in words for c in word})
    vocab = list(REWARD_SPECIALS) + chars + ["##" + c for c in chars]
    ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab += ranked[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", padding_side="right",
                                   truncation_side="left", model_input_names=list(REWARD_INPUTS))


# --- models -------------------------------------------------------------------------------------------------
def _policy_model(recipe: Recipe, tokenizer):
    from transformers import Qwen2ForCausalLM

    from rlhf_ds.models import tiny_qwen2_config

    config = tiny_qwen2_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               hidden_size=recipe.policy_hidden_size, num_layers=recipe.policy_layers,
                               num_heads=recipe.policy_heads, num_kv_heads=recipe.policy_kv_heads,
                               intermediate_size=recipe.policy_intermediate_size,
                               max_position_embeddings=2 * recipe.max_seq_len)
    return Qwen2ForCausalLM(config)


def _reward_model(recipe: Recipe, tokenizer):
    """DeBERTa-v3's architecture with two segment embeddings (question, answer), no dropout, and a copy head."""
    from transformers import DebertaV2ForSequenceClassification

    from rlhf_ds.models import tiny_deberta_config

    config = tiny_deberta_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 hidden_size=recipe.reward_hidden_size, num_layers=recipe.reward_layers,
                                 num_heads=recipe.reward_heads, max_position_embeddings=2 * recipe.max_seq_len,
                                 type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = DebertaV2ForSequenceClassification(config)
    plant_copy_head(model, torch.Generator().manual_seed(recipe.seed))
    return model


@torch.no_grad()
def plant_copy_head(model, generator: torch.Generator, match_scale: float = 2.0, segment_gain: float = 4.0) -> None:
    """Make layer 0's first attention head a fixed detector of answer words that also occur in the question.

    Why: whether an answer is about the subject asked ("goldfish" in the question, "rabbit" in the answer) is
    only visible by comparing the two, and this reward model does not learn that comparison from Bradley-Terry
    pairs within the build's budget (README, "What the reward model learns", has the attempts); given the
    comparison, it learns to read it within 50 steps of wrong-subject pairs. The head:

    - query and key both project the token embedding onto the same random d-dimensional subspace P (d = head
      size), orthogonal to the segment embeddings and to the all-ones direction that LayerNorm removes, so a
      token attends to itself and to its copies (the answer's "goldfish": 0.32 to itself, 0.59 to the question's);
    - the relative-position embeddings are made orthogonal to P, so position does not swamp the match (DeBERTa
      shares the attention keys between content and position);
    - its value reads the segment (answer minus question) and its output writes one random direction, so an
      answer token's output says which share of its attention went to copies in the question.

    These weights, and the relative-position embeddings, are kept fixed in training (gradient hooks, and
    ``requires_grad`` off for the position table); everything else trains. The saved model is a plain
    ``DebertaV2ForSequenceClassification``.
    """
    config = model.config
    hidden, size = config.hidden_size, config.hidden_size // config.num_attention_heads
    segments = model.deberta.embeddings.token_type_embeddings.weight            # (2, hidden)
    avoid = torch.linalg.qr(torch.stack([torch.ones(hidden), segments[0], segments[1]], dim=1))[0]  # (hidden, 3)
    project = torch.randn(size, hidden, generator=generator)
    project = torch.linalg.qr((project - project @ avoid @ avoid.T).T)[0].T     # (size, hidden), orthonormal rows
    relative = model.deberta.encoder.rel_embeddings.weight                     # (buckets, hidden)
    basis = torch.linalg.qr(torch.cat([avoid, project.T], dim=1))[0]
    relative -= relative @ basis @ basis.T
    relative.requires_grad_(False)

    attention = model.deberta.encoder.layer[0].attention
    head = slice(0, size)
    value = torch.zeros(size, hidden)
    value[0] = segment_gain * _centred_unit(segments[1] - segments[0])
    for linear, weight in ((attention.self.query_proj, match_scale * project),
                           (attention.self.key_proj, match_scale * project),
                           (attention.self.value_proj, value)):
        linear.weight[head], linear.bias[head] = weight, 0.0
        _keep_fixed(linear.weight, (head,))
        _keep_fixed(linear.bias, (head,))
    dense = attention.output.dense.weight                                       # (hidden, hidden): columns read heads
    dense[:, head] = 0.0
    dense[:, 0] = _centred_unit(torch.randn(hidden, generator=generator))
    _keep_fixed(dense, (slice(None), head))


def _centred_unit(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` minus its mean (the part LayerNorm keeps), scaled to norm 1."""
    centred = vector - vector.mean()
    return centred / centred.norm()


def _keep_fixed(parameter: torch.nn.Parameter, index: tuple) -> None:
    """Zero the gradient of ``parameter[index]``: with AdamW (no weight decay) those entries never move."""
    mask = torch.ones_like(parameter)
    mask[index] = 0.0
    parameter.register_hook(lambda grad: grad * mask)


def sft_mix(records: list[dict], rejected_fraction: float, seed: int) -> list[str]:
    """Dialogues for SFT: a seeded mix of chosen and rejected answers, so the SFT policy writes both kinds.

    Each record gives its rejected answer with probability ``rejected_fraction``, except ``wrong_subject`` records:
    their rejected answer is a good answer to another question, and learning it would unteach what SFT is there to
    teach, copying the asked subject into the answer.
    """
    rng = random.Random(seed)
    return [r["rejected"] if rng.random() < rejected_fraction and r["flaw"] != "wrong_subject" else r["chosen"]
            for r in records]


# --- quality ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_answers(policy, tokenizer, prompts: list[str], max_new_tokens: int, max_prompt_len: int,
                   seed: int, batch_size: int = 64) -> tuple[list[str], float]:
    """Sampled answers (text) of ``policy`` on ``prompts`` and the fraction that ended with EOS; batch i samples
    from seed + i, through the trainer's own ``Sampler``."""
    collate = PromptCollator(tokenizer, max_prompt_len)
    sampler = Sampler(Sampling(max_new_tokens=max_new_tokens), tokenizer)
    answers, ended = [], 0
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        batch = collate(prompts[start:start + batch_size])
        sequences, mask = sampler.sample(policy, batch["input_ids"], batch["attention_mask"], seed=seed + index)
        response = sequences[:, batch["input_ids"].shape[1]:]
        ended += int((response == tokenizer.eos_token_id).any(dim=1).sum())
        answers += [tokenizer.decode(ids[keep.bool()], skip_special_tokens=True).strip()
                    for ids, keep in zip(response, mask)]
    return answers, ended / len(prompts)


@torch.no_grad()
def quality_report(policy, policy_tokenizer, reward, reward_tokenizer, recipe: Recipe) -> dict:
    """Held-out figures the build prints and the tests assert: reward accuracy, score gap, policy samples (their
    score, EOS fraction, and how many are about the subject asked, by ``corpus.about_subject``)."""
    test = corpus.make_split("test")
    pairs = preference_pairs(test[:recipe.eval_pairs])
    chosen, rejected = evaluate_reward_model(reward, reward_tokenizer, pairs, recipe.max_seq_len)
    wins = (chosen > rejected).float()
    per_flaw = {}
    for flaw in corpus.FLAWS:
        idx = [i for i, r in enumerate(test[:recipe.eval_pairs]) if r["flaw"] == flaw]
        per_flaw[flaw] = wins[idx].mean().item()
    prompts = [extract_prompt(r["chosen"]) for r in test[:recipe.eval_prompts]]
    answers, eos_fraction = sample_answers(policy, policy_tokenizer, prompts, recipe.eval_new_tokens,
                                           recipe.max_seq_len, recipe.seed)
    sample_scores, _ = score_pairs(reward, reward_tokenizer, [question_from_prompt(p) for p in prompts], answers,
                                recipe.max_seq_len)
    about = [bool(corpus.about_subject(prompt, answer)) for prompt, answer in zip(prompts, answers)]
    return {
        "reward_accuracy": wins.mean().item(),
        "reward_accuracy_per_flaw": per_flaw,
        "chosen_score_mean": chosen.mean().item(),
        "rejected_score_mean": rejected.mean().item(),
        "policy_eos_fraction": eos_fraction,
        "policy_score_mean": sample_scores.mean().item(),
        "policy_about_subject": sum(about) / len(about),
        "policy_samples": [p[-60:] + " " + a for p, a in zip(prompts[:4], answers[:4])],
    }


# --- build and cache ------------------------------------------------------------------------------------------
def cache_dir(recipe: Recipe = Recipe()) -> Path:
    return cache_root() / "embedded" / recipe.digest()


@dataclass
class TrainedModels:
    """The embedded default in memory, before it is saved."""

    policy: torch.nn.Module
    policy_tokenizer: object
    reward: torch.nn.Module
    reward_tokenizer: object
    report: dict

    def save(self, out: Path) -> None:
        for name, model, tok in (("policy", self.policy, self.policy_tokenizer),
                                 ("reward", self.reward, self.reward_tokenizer)):
            model.save_pretrained(out / name, safe_serialization=True)
            tok.save_pretrained(out / name)


def train_models(recipe: Recipe) -> TrainedModels:
    """Train tokenizers, SFT policy and reward model; the report holds quality figures and time per stage.

    Deterministic algorithms are switched on for the build: DeBERTa's backward otherwise sums in a thread-
    dependent order and the same seed would give different reward-model bytes.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train_models(recipe)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train_models(recipe: Recipe) -> TrainedModels:
    timings = {}
    start = time.time()
    train = corpus.make_split("train")
    policy_tok = build_policy_tokenizer(_texts(train), recipe.policy_vocab_size)
    reward_tok = build_reward_tokenizer(_texts(train), recipe.reward_vocab_size)
    timings["tokenizers_s"] = time.time() - start

    start = time.time()
    torch.manual_seed(recipe.seed)
    policy = _policy_model(recipe, policy_tok)
    train_sft(policy, policy_tok, sft_mix(train, recipe.sft_rejected_fraction, recipe.seed),
              Schedule(recipe.sft_steps, recipe.sft_batch_size, recipe.sft_lr, recipe.sft_steps // 10,
                       seed=recipe.seed), recipe.max_seq_len)
    timings["sft_s"] = time.time() - start

    start = time.time()
    torch.manual_seed(recipe.seed)
    reward = _reward_model(recipe, reward_tok)
    pairs = preference_pairs(train)
    relevance = [pair for pair, record in zip(pairs, train) if record["flaw"] == "wrong_subject"]
    # Relevance first: mixed in from the start, the five flaws seen in the answer alone take the gradient and the
    # copy head is never read. Kept short: longer, it teaches "more of the question's words is better", which
    # rambling answers (the subject over and over) exploit.
    for stage, steps in ((relevance, recipe.reward_relevance_steps), (pairs, recipe.reward_steps)):
        train_reward_model(reward, reward_tok, stage, Schedule(steps, recipe.reward_batch_size, recipe.reward_lr,
                                                               steps // 10, seed=recipe.seed), recipe.max_seq_len)
    timings["reward_s"] = time.time() - start

    start = time.time()
    quality = quality_report(policy, policy_tok, reward, reward_tok, recipe)
    timings["eval_s"] = time.time() - start
    return TrainedModels(policy, policy_tok, reward, reward_tok, {**quality, "timings": timings})


def build(recipe: Recipe = Recipe(), force: bool = False) -> EmbeddedModels:
    """The embedded default, built on first use (``cache.cached_build``); later calls verify the cache."""
    def make(out: Path) -> dict:
        models = train_models(recipe)
        models.save(out)
        return {"recipe": dataclasses.asdict(recipe), "quality": models.report}

    final = cache_dir(recipe)
    return EmbeddedModels(final, cached_build(final, make, f"the embedded default (recipe {recipe.digest()})", force))


def format_report(quality: dict) -> str:
    """The build's quality figures, one per line."""
    lines = [f"reward model held-out pairwise accuracy: {quality['reward_accuracy']:.3f}"]
    per_flaw = quality["reward_accuracy_per_flaw"]
    width = max(map(len, per_flaw), default=0)
    lines += [f"  {flaw:<{width}} {acc:.3f}" for flaw, acc in per_flaw.items()]
    lines += [f"mean score: chosen {quality['chosen_score_mean']:.3f}, rejected {quality['rejected_score_mean']:.3f},"
              f" SFT policy samples {quality['policy_score_mean']:.3f}",
              f"SFT policy samples ending with EOS: {quality['policy_eos_fraction']:.2f}",
              f"SFT policy samples about the subject asked: {quality['policy_about_subject']:.2f}"]
    lines += ["time per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in quality.get("timings", {}).items())]
    lines += ["samples:"] + [f"  ...{s!r}" for s in quality["policy_samples"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "build"
    if command == "path":
        print(cache_dir())
        return 0
    if command != "build":
        print("usage: python -m rlhf_ds.embedded [build [--force] | path]", file=sys.stderr)
        return 2

    def build_and_report() -> int:
        models = build(force="--force" in argv)
        print(f"embedded default at {models.root}\n{format_report(models.quality)}")
        return 0

    return run_main(build_and_report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
