"""Stand-ins for the real run's models: their exact architectures, random weights, tokenizers of their own types.

Why: the real run (a Qwen2-0.5B policy and critic, OpenAssistant's DeBERTa-v3-large reward model) cannot be
downloaded everywhere, yet what a rehearsal must get right is mostly its shape: 151,936 logits per token, the
128,100-row reward embedding, the memory of each engine, the tokenizer classes transformers picks and how they
pad, truncate and decode. A stand-in has all of that and nothing else (its weights are noise), so a config that
names one runs the real run's shapes end to end, on a CPU if need be, without learning anything. Token counts
are not the real ones: both vocabularies are learnt on the small corpus, and a random policy's filler tokens
(below) become several reward tokens each.

- ``qwen2-0.5b-shape``: ``Qwen2ForCausalLM`` with Qwen2-0.5B's config (``models.qwen2_0_5b_config``) and a
  ``Qwen2Tokenizer`` (byte-level BPE, Qwen2's normaliser and split regex) whose regular vocabulary fills ids
  0..151642 and whose special tokens sit at Qwen2's ids 151643..151645.
- ``deberta-v3-large-shape``: ``DebertaV2ForSequenceClassification`` with DeBERTa-v3-large's config and one
  logit, and a ``DebertaV2Tokenizer`` (SentencePiece Unigram) with DeBERTa-v3's special ids, pair template,
  right padding, left truncation and 512-token limit.

Both tokenizers are trained on the synthetic corpus (``rlhf_ds.corpus``). The depths are reducible
(``ShapeRecipe``); every other dimension is exact. At full depth the fp32 safetensors take about 2.0 GB (policy)
and 1.7 GB (reward); one layer each, about 0.6 GB each (the embeddings dominate).

The cache is ``$RLHF_DS_CACHE/standins/<recipe hash>``, built and verified like the embedded default's
(``cache.cached_build``). The same recipe gives the same bytes.

    python -m rlhf_ds.standins build [--policy_layers N] [--reward_layers N] [--force]
    python -m rlhf_ds.standins path [--policy_layers N] [--reward_layers N]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from rlhf_ds import corpus
from rlhf_ds.cache import BuiltModels, cache_root, cached_build, recipe_digest
from rlhf_ds.embedded import EOS, POLICY_SPECIALS, build_policy_tokenizer
from rlhf_ds.errors import KnownError, run_main
from rlhf_ds.models import qwen2_0_5b_config, tiny_deberta_config, tiny_qwen2_config

POLICY_STANDIN = "qwen2-0.5b-shape"
REWARD_STANDIN = "deberta-v3-large-shape"
STANDINS = (POLICY_STANDIN, REWARD_STANDIN)

# Qwen2's tokenizer: byte-level BPE tokens at ids 0..151642, then <|endoftext|>, <|im_start|>, <|im_end|>.
QWEN2_REGULAR_TOKENS = 151643
QWEN2_MAX_LENGTH = 32768  # model_max_length of Qwen2-0.5B's tokenizer_config.json
QWEN2_LAYERS = qwen2_0_5b_config().num_hidden_layers
# microsoft/deberta-v3-large config.json, the sizes (the rest: models._DEBERTA_V3_FAMILY, via tiny_deberta_config).
_DEBERTA_V3_LARGE = dict(vocab_size=128100, hidden_size=1024, num_heads=16, intermediate_size=4096,
                         max_position_embeddings=512)
DEBERTA_V3_LAYERS = 24
DEBERTA_V3_SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")  # ids 0..3; [MASK] comes last
DEBERTA_V3_PIECES = 128000  # pieces of DeBERTa-v3's spm model, the Unigram trainer's target (the corpus gives fewer)
_SEED_MARK = "\ue000"  # a private-use character that no corpus text contains


class StandinError(KnownError, ValueError):
    """A stand-in name or depth that does not exist; the message names the valid ones."""


@dataclass(frozen=True)
class ShapeRecipe:
    """Everything that determines the stand-ins' bytes; its hash names the cache directory.

    policy_layers / reward_layers: decoder / encoder layers, 1..24 (24 is the real depth of both).
    tokenizer_version / corpus_version: raised when the tokenizers' construction or the corpus changes, so that
    a cache built the old way is not reused.
    """

    policy_layers: int = QWEN2_LAYERS
    reward_layers: int = DEBERTA_V3_LAYERS
    seed: int = 0
    tokenizer_version: int = 1
    corpus_version: int = 2

    def __post_init__(self):
        for field, layers, full in (("policy_layers", self.policy_layers, QWEN2_LAYERS),
                                    ("reward_layers", self.reward_layers, DEBERTA_V3_LAYERS)):
            if not 1 <= layers <= full:
                raise StandinError(f"{field}={layers}: a stand-in has 1 to {full} layers (the real model: {full})")

    def digest(self) -> str:
        return recipe_digest(self)


# --- tokenizers -----------------------------------------------------------------------------------------------
def filler_tokens(taken: set[str]) -> Iterator[str]:
    """Byte-level tokens "Ġaa", "Ġab", ... (" aa", " ab", ... once decoded) not in ``taken``, in a fixed order.

    They fill the ids that training on the small corpus leaves empty. No merge produces them, so encoding never
    does; but a random-weight policy samples every id, and each of these decodes to a word of its own.
    """
    for length in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            token = "Ġ" + "".join(letters)
            if token not in taken:
                yield token


def build_qwen2_tokenizer(texts: list[str], regular_tokens: int = QWEN2_REGULAR_TOKENS):
    """A ``Qwen2Tokenizer`` laid out like Qwen2's: BPE tokens learnt on ``texts`` from id 0, filler tokens up to
    id ``regular_tokens - 1`` (Qwen2: 151642), then <|endoftext|> (EOS and padding, no BOS), <|im_start|>,
    <|im_end|> (Qwen2: at 151643..151645).

    The BPE is ``embedded.build_policy_tokenizer``'s (Qwen2's NFC normaliser and split regex, byte level);
    only the ids move. ``len(tokenizer)`` is ``regular_tokens + 3``: 151,646 by default, below the model's
    151,936 rows, as in the real pair.
    """
    from transformers import Qwen2Tokenizer

    trained = build_policy_tokenizer(texts, vocab_size=regular_tokens)
    bpe = json.loads(trained.backend_tokenizer.to_str())["model"]
    learnt = sorted((t for t in bpe["vocab"] if t not in POLICY_SPECIALS), key=bpe["vocab"].get)
    regular = learnt + list(itertools.islice(filler_tokens(set(learnt)), regular_tokens - len(learnt)))
    vocab = {token: i for i, token in enumerate(regular)}
    vocab.update({token: regular_tokens + i for i, token in enumerate(POLICY_SPECIALS)})
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=EOS, pad_token=EOS,
                          additional_special_tokens=list(POLICY_SPECIALS[1:]), model_max_length=QWEN2_MAX_LENGTH)


def _every_word_twice(texts: list[str]) -> Iterator[str]:
    """Each text, then the text with a mark after every word.

    The ``tokenizers`` Unigram trainer seeds its candidate pieces from the *distinct* pre-tokenised words and keeps
    only substrings found in two of them, whatever their counts: a frequent word that never varies ("▁How") would
    never become a piece and would be spelt letter by letter (2.7 tokens a word on this corpus instead of 1.1).
    The marked copy makes every word occur in two distinct forms; pieces holding the mark are dropped afterwards.
    """
    for text in texts:
        yield text
        yield " ".join(word + _SEED_MARK for word in text.split())


def canonical_pieces(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The trainer's (piece, log-probability) list in an order and with scores that do not vary between runs.

    The ``tokenizers`` Unigram trainer returns the same pieces every run, but in a run-dependent order, with noise
    in the last digits of the scores, and it scores the characters it must add (those no piece kept) lowest + 0,
    lowest + 1e-4, lowest + 2e-4, ... in hash order. Here scores are rounded to 1e-6, those characters all get the
    lowest score (a change of at most 1e-4 per such character), and pieces are sorted by score, then text.
    """
    pieces = [(piece, round(score, 6)) for piece, score in pieces]
    lowest = min(score for _, score in pieces)
    ladder_top = lowest + 1e-4 * sum(len(piece) == 1 for piece, _ in pieces)
    pieces = [(piece, lowest if len(piece) == 1 and score <= ladder_top else score) for piece, score in pieces]
    return sorted(pieces, key=lambda item: (-item[1], item[0]))


def build_deberta_v3_tokenizer(texts: list[str]):
    """A ``DebertaV2Tokenizer`` with a SentencePiece Unigram model trained on ``texts``.

    The trainer sees exactly the normaliser and Metaspace pre-tokeniser the class builds for itself: transformers
    5 rebuilds a saved DebertaV2Tokenizer from its vocabulary alone (whatever normaliser tokenizer.json holds), so
    only that pipeline survives a round trip. Ids as in DeBERTa-v3:
    [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, the pieces, [MASK] last. Pairs are ``[CLS] q [SEP] a [SEP]`` with
    token_type_ids 0 then 1; padding on the right, truncation from the left, at most 512 tokens.
    """
    from tokenizers import Tokenizer, models, trainers
    from transformers import DebertaV2Tokenizer

    template = DebertaV2Tokenizer()
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = template.backend_tokenizer.normalizer
    unigram.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.UnigramTrainer(vocab_size=DEBERTA_V3_PIECES, special_tokens=list(DEBERTA_V3_SPECIALS),
                                      unk_token="[UNK]", show_progress=False)
    unigram.train_from_iterator(_every_word_twice(texts), trainer)
    trained = json.loads(unigram.to_str())["model"]["vocab"]
    pieces = canonical_pieces([(p, s) for p, s in trained if p not in DEBERTA_V3_SPECIALS and _SEED_MARK not in p])
    vocab = [(token, 0.0) for token in DEBERTA_V3_SPECIALS] + pieces + [("[MASK]", 0.0)]
    return DebertaV2Tokenizer(vocab=vocab, model_max_length=_DEBERTA_V3_LARGE["max_position_embeddings"],
                              padding_side="right", truncation_side="left")


# --- models ---------------------------------------------------------------------------------------------------
def policy_config(layers: int):
    """Qwen2-0.5B's config with ``layers`` decoder layers (and as many ``max_window_layers``), every other value
    exact; EOS and padding are <|endoftext|>, the first id after the regular tokens (151643, as in the real
    tokenizer, ``build_qwen2_tokenizer``), as is BOS in the real config."""
    full = qwen2_0_5b_config()
    return tiny_qwen2_config(vocab_size=full.vocab_size, bos_token_id=full.bos_token_id,
                             eos_token_id=QWEN2_REGULAR_TOKENS, pad_token_id=QWEN2_REGULAR_TOKENS,
                             hidden_size=full.hidden_size, num_layers=layers, num_heads=full.num_attention_heads,
                             num_kv_heads=full.num_key_value_heads, intermediate_size=full.intermediate_size,
                             max_position_embeddings=full.max_position_embeddings)


def reward_config(layers: int):
    """DeBERTa-v3-large's config with ``layers`` encoder layers and one output logit; pooler as in the real one."""
    config = tiny_deberta_config(pad_token_id=DEBERTA_V3_SPECIALS.index("[PAD]"), num_layers=layers,
                                 **_DEBERTA_V3_LARGE)
    config.pooler_hidden_size = _DEBERTA_V3_LARGE["hidden_size"]
    config.pooler_dropout, config.pooler_hidden_act = 0.0, "gelu"
    return config


def save_random_model(model_class, config, tokenizer, seed: int, out: Path) -> int:
    """Initialise ``model_class(config)`` from ``seed`` with transformers' own init (normal, std
    ``config.initializer_range``), save it in fp32 safetensors with ``tokenizer`` into ``out``; returns its
    parameter count (tied weights once).

    The module is created without torch's default init, which transformers' init overwrites anyway: on the
    vocabulary-sized embeddings that would be seconds of random numbers thrown away (half the build of one layer).
    """
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    with no_init_weights():
        model = model_class(config)
    model.init_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def save_standins(recipe: ShapeRecipe, out: Path) -> dict:
    """Train both tokenizers, make both models and save them into ``out/policy`` and ``out/reward``; returns the
    parameter counts and seconds per stage (for the manifest). One model is in memory at a time."""
    from transformers import DebertaV2ForSequenceClassification, Qwen2ForCausalLM

    train = corpus.make_split("train")
    texts = [r["chosen"] for r in train] + [r["rejected"] for r in train]
    facts: dict = {"parameters": {}, "timings": {}}
    for name, build_tokenizer, make_config, model_class, layers in (
            ("policy", build_qwen2_tokenizer, policy_config, Qwen2ForCausalLM, recipe.policy_layers),
            ("reward", build_deberta_v3_tokenizer, reward_config, DebertaV2ForSequenceClassification,
             recipe.reward_layers)):
        start = time.time()
        tokenizer = build_tokenizer(texts)
        facts["parameters"][name] = save_random_model(model_class, make_config(layers), tokenizer,
                                                      recipe.seed, out / name)
        facts["timings"][f"{name}_s"] = round(time.time() - start, 2)
    return facts


# --- build and cache ------------------------------------------------------------------------------------------
def cache_dir(recipe: ShapeRecipe = ShapeRecipe()) -> Path:
    return cache_root() / "standins" / recipe.digest()


def build_standins(recipe: ShapeRecipe = ShapeRecipe(), force: bool = False) -> BuiltModels:
    """The stand-ins of ``recipe``, built on first use (``cache.cached_build``); later calls verify the cache.

    Verifying hashes every file (about a second per GB: 4 s at full depth), so a caller that needs both
    directories calls this once.
    """
    def make(out: Path) -> dict:
        return {"recipe": dataclasses.asdict(recipe), **save_standins(recipe, out)}

    final = cache_dir(recipe)
    return BuiltModels(final, cached_build(final, make, f"{', '.join(STANDINS)} (recipe {recipe.digest()})", force))


def resolve_standin(name: str, recipe: ShapeRecipe = ShapeRecipe()) -> str:
    """The directory of stand-in ``name`` (one of ``STANDINS``), built or verified first (``build_standins``)."""
    if name not in STANDINS:
        raise StandinError(f"{name!r} is not a stand-in: use one of {', '.join(STANDINS)}")
    models = build_standins(recipe)
    return models.policy if name == POLICY_STANDIN else models.reward


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ds.standins", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=("build", "path"), default="build")
    parser.add_argument("--policy_layers", type=int, default=QWEN2_LAYERS,
                        help=f"decoder layers of {POLICY_STANDIN}, 1..{QWEN2_LAYERS} (default: the real depth)")
    parser.add_argument("--reward_layers", type=int, default=DEBERTA_V3_LAYERS,
                        help=f"encoder layers of {REWARD_STANDIN}, 1..{DEBERTA_V3_LAYERS} (default: the real depth)")
    parser.add_argument("--force", action="store_true", help="rebuild even a complete cache")
    args = parser.parse_args(argv)

    def run() -> int:
        recipe = ShapeRecipe(policy_layers=args.policy_layers, reward_layers=args.reward_layers)
        if args.command == "path":
            print(cache_dir(recipe))
            return 0
        models = build_standins(recipe, force=args.force)
        parameters = models.manifest["parameters"]
        for name, path, role, layers, full in (
                (POLICY_STANDIN, models.policy, "policy", recipe.policy_layers, QWEN2_LAYERS),
                (REWARD_STANDIN, models.reward, "reward", recipe.reward_layers, DEBERTA_V3_LAYERS)):
            print(f"{name}: {path} ({parameters[role]:,} parameters, {layers} of {full} layers)")
        return 0

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
