"""Prompt data for PPO-RLHF in the Anthropic HH-RLHF format: PPO only needs the
prompts (the policy writes the answers), so every source -- a local .jsonl /
.json / .parquet file, a local directory of split files such as
``train.jsonl.gz``, a Hugging Face Hub dataset name, or the built-in
``"embedded"`` corpus -- is reduced to a list of prompt strings that end with
``"\\n\\nAssistant:"``; ``PromptCollator`` turns a list of prompts into
left-padded token tensors ready for generation, and ``PromptLoader`` streams
deterministic, seeded, rank-sharded, resumable batches of prompts.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch

from rlhf_ds.errors import KnownError

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


class DataError(KnownError, ValueError):
    """A data problem reported as one line naming the path/field and the fix."""


def _one_line(text: object) -> str:
    """Collapse an (often multi-line) message so DataError stays one line."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- #
# Dialogue text
# --------------------------------------------------------------------------- #


def extract_prompt(text: str) -> str:
    """Cut an HH dialogue right after its last "\\n\\nAssistant:" marker.

    Everything before the final assistant turn is context, so the returned
    prompt ends with the marker and the policy writes the final answer.
    """
    if not isinstance(text, str):
        raise DataError(f"dialogue must be a string, got {type(text).__name__}")
    cut = text.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise DataError(
            f"dialogue has no {ASSISTANT_MARKER!r} marker; HH-RLHF text must look like "
            f"'\\n\\nHuman: ...\\n\\nAssistant: ...' (starts with {text[:40]!r})"
        )
    return text[: cut + len(ASSISTANT_MARKER)]


def split_dialogue(text: str) -> tuple[str, str]:
    """(prompt, final answer) of an HH dialogue: what SFT and reward-model training learn from."""
    prompt = extract_prompt(text)
    return prompt, text[len(prompt):].strip()


def question_from_prompt(prompt: str) -> str:
    """Drop the trailing "\\n\\nAssistant:" and surrounding whitespace.

    The reward model scores a (question, answer) text pair, so it gets the
    dialogue context without the dangling assistant marker.
    """
    text = prompt.rstrip()
    if text.endswith(ASSISTANT_MARKER):
        text = text[: -len(ASSISTANT_MARKER)]
    return text.strip()


# --------------------------------------------------------------------------- #
# Records -> prompts
# --------------------------------------------------------------------------- #


@dataclass
class LoadStats:
    """How many records a source had and what became of them.

    Invariant: ``total == used + skipped_malformed + dropped_over_limit``.
    """

    source: str = ""
    total: int = 0
    used: int = 0
    skipped_malformed: int = 0
    dropped_over_limit: int = 0
    from_chosen: int = 0
    from_prompt: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        """Count one malformed record under ``reason``."""
        self.skipped_malformed += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

    def warning(self, threshold: float = 0.05) -> Optional[str]:
        """A line for the user when more than ``threshold`` of the records were malformed (a wrong file or
        format, rather than a few bad lines), else None."""
        if self.total and self.skipped_malformed > threshold * self.total:
            return (f"{self.skipped_malformed} of {self.total} records of {self.source} are malformed and were "
                    f"skipped ({self.skipped_malformed / self.total:.0%}): check the file's format")
        return None

    def summary(self) -> str:
        """One line for logs."""
        line = (
            f"{self.source}: {self.used}/{self.total} records used "
            f"({self.from_chosen} from 'chosen', {self.from_prompt} from 'prompt'), "
            f"{self.skipped_malformed} malformed skipped"
        )
        if self.skip_reasons:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skip_reasons.items()))
            line += f" [{reasons}]"
        if self.dropped_over_limit:
            line += f", {self.dropped_over_limit} dropped by max_prompts"
        return line


def _prompt_from_plain(text: str) -> str:
    """Put a plain `prompt` field into HH form ending with the Assistant marker."""
    text = text.rstrip()
    if text.endswith(ASSISTANT_MARKER):
        return text  # already an HH prompt (e.g. Dahoas/rm-static style)
    if text.startswith(HUMAN_MARKER):
        return text + ASSISTANT_MARKER  # an HH dialogue that ends on a human turn
    return f"{HUMAN_MARKER} {text.strip()}{ASSISTANT_MARKER}"


def records_to_prompts(records: Iterable[dict], source_name: str) -> tuple[list[str], LoadStats]:
    """Turn records into HH prompts, skipping (and counting) malformed ones.

    A record gives its prompt through either
      * ``prompt``: a string. Used as-is when it already ends with
        "\\n\\nAssistant:"; an HH dialogue that starts with "\\n\\nHuman:" gets the
        marker appended; plain text becomes "\\n\\nHuman: <text>\\n\\nAssistant:".
        Checked first because datasets that carry both fields (rm-static style)
        store only the response in ``chosen``.
      * ``chosen``: a full HH dialogue, cut by ``extract_prompt``.
    Returns (prompts, stats), len(prompts) == stats.used.
    """
    stats = LoadStats(source=source_name)
    prompts: list[str] = []
    for record in records:
        stats.total += 1
        if not isinstance(record, dict):
            stats.skip("not an object")
            continue
        prompt, chosen = record.get("prompt"), record.get("chosen")
        if isinstance(prompt, str) and prompt.strip():
            prompts.append(_prompt_from_plain(prompt))
            stats.from_prompt += 1
        elif isinstance(chosen, str) and ASSISTANT_MARKER in chosen:
            prompts.append(extract_prompt(chosen))
            stats.from_chosen += 1
        elif isinstance(chosen, str) and chosen.strip():
            stats.skip("'chosen' without Assistant marker")
        elif prompt is None and chosen is None:
            stats.skip("no 'chosen'/'prompt' field")
        else:
            stats.skip("empty or non-string field")
    stats.used = len(prompts)
    if not prompts:
        raise DataError(
            f"{source_name}: no usable prompt in {stats.total} records "
            f"({stats.skip_reasons or 'no records'}); each record needs a 'chosen' HH "
            f"dialogue containing {ASSISTANT_MARKER!r} or a non-empty 'prompt' string"
        )
    return prompts, stats


# --------------------------------------------------------------------------- #
# Loading records
# --------------------------------------------------------------------------- #


def looks_like_path(source: str) -> bool:
    """Tell a mistyped local path from a Hub name ("name" or "org/name").

    Hub names contain at most one "/", so a bare os.sep is not enough here.
    """
    return (
        source.startswith(("/", ".", "~"))
        or source.endswith(FILE_SUFFIXES)
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def _read_json_lines(path: str, text: str) -> list:
    """Parse JSON lines (blank lines ignored); a bad line is reported by number."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove that line"
            ) from None
    return rows


def _read_json_file(path: str) -> list:
    """Read .jsonl / .json (list of objects or JSON lines), optionally gzipped."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read file ({_one_line(e)})") from None
    if path.endswith((".jsonl", ".jsonl.gz")):
        return _read_json_lines(path, text)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # first value parsed, then more: JSON lines
            return _read_json_lines(path, text)
        raise DataError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a JSON list of objects or JSON lines"
        ) from None
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise DataError(
            f"{path}: top-level JSON is {type(data).__name__}; expected a list of objects or JSON lines"
        )
    return data


def _read_parquet(path: str) -> list:
    """Read a parquet file into a list of row dicts."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several error types
        raise DataError(f"{path}: cannot read parquet ({_one_line(e)})") from None


def _load_with_datasets(source: str, split: str, where: str) -> list:
    """Load a local directory or Hub dataset through `datasets.load_dataset`."""
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises ValueError, FileNotFoundError, StopIteration, ...
        raise DataError(
            f"{source}: cannot load split {split!r} {where} ({type(e).__name__}: {_one_line(e)[:300]})"
        ) from None
    return ds.to_list()


def load_records(source: str, split: str = "train") -> list[dict]:
    """Load raw records (dicts) from a file, directory, Hub name, or "embedded".

    * ``.jsonl``/``.json``/``.parquet`` file (``.jsonl.gz``/``.json.gz`` too):
      read directly; ``split`` is ignored.
    * directory: ``datasets.load_dataset(dir, split=split)``, which maps files
      named ``train.jsonl.gz``/``test.jsonl.gz`` (the HH-RLHF layout) to splits.
    * anything else: a Hub name such as "Anthropic/hh-rlhf".
    """
    if source == "embedded":
        from rlhf_ds.corpus import make_split

        try:
            return make_split(split)
        except ValueError as err:  # an unknown split
            raise DataError(str(err)) from None
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            records = _read_json_file(path)
        elif path.endswith(".parquet"):
            records = _read_parquet(path)
        else:
            raise DataError(
                f"{path}: unsupported file type; use .jsonl, .json, .parquet or a directory of split files"
            )
    elif os.path.isdir(path):
        records = _load_with_datasets(path, split, "from local directory")
    elif looks_like_path(source):
        raise DataError(
            f"{path}: no such file or directory; fix the path (Hub names look like 'org/name')"
        )
    else:
        records = _load_with_datasets(source, split, "from the Hugging Face Hub")
    if not records:
        raise DataError(f"{path}: no records (empty file or split {split!r}); point at a non-empty source")
    return records


def load_prompts(
    source: str, split: str = "train", max_prompts: int | None = None
) -> tuple[list[str], LoadStats]:
    """Load a source and reduce it to at most ``max_prompts`` HH prompts.

    Returns (prompts, stats); the limit keeps the first prompts in file order.
    """
    if max_prompts is not None and (not isinstance(max_prompts, int) or max_prompts < 1):
        raise DataError(f"max_prompts={max_prompts!r}: use a positive integer or None")
    prompts, stats = records_to_prompts(load_records(source, split), source)
    if max_prompts is not None and len(prompts) > max_prompts:
        stats.dropped_over_limit = len(prompts) - max_prompts
        prompts = prompts[:max_prompts]
        stats.used = len(prompts)
    return prompts, stats


# --------------------------------------------------------------------------- #
# Batching
# --------------------------------------------------------------------------- #


class PromptCollator:
    """Tokenize prompts into left-padded tensors for generation.

    Left padding puts every prompt's last token at column P-1, so generated
    tokens follow the prompts directly. Tokenization uses
    ``add_special_tokens=False``: the prompt text is the whole context (policy
    tokenizers such as Qwen2's add no BOS anyway), and a BOS/EOS added here
    would sit in the middle of prompt+response sequences.
    """

    def __init__(self, tokenizer, max_prompt_len: int):
        if max_prompt_len < 1:
            raise DataError(f"max_prompt_len={max_prompt_len}: must be >= 1")
        # Padding is done here, on the left, whatever the tokenizer's own settings (models.load_tokenizer owns
        # those): every prompt then ends where generation starts.
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise DataError("tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token before building "
                            "the collator")
        self.tokenizer = tokenizer
        self.max_prompt_len = max_prompt_len
        self.num_seen = 0
        self.num_truncated = 0

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"input_ids": (B, P) long, "attention_mask": (B, P) long}.

        P is the longest prompt in the batch after truncation to the last
        ``max_prompt_len`` tokens (the end keeps the "\\n\\nAssistant:" cue).
        """
        if not prompts:
            raise DataError("PromptCollator got an empty prompt list; pass at least one prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise DataError("PromptCollator: prompts must be a list of strings")
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        rows = []
        for i, row in enumerate(ids):
            if not row:
                raise DataError(f"prompt {i} in the batch tokenizes to zero tokens; drop empty prompts")
            if len(row) > self.max_prompt_len:
                row = row[-self.max_prompt_len :]
                self.num_truncated += 1
            rows.append(row)
        self.num_seen += len(rows)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class PromptLoader:
    """An endless, resumable stream of per-rank prompt batches.

    Each epoch shuffles all prompts with ``random.Random(seed + epoch)`` (the
    same order on every rank) and cuts it into global batches of
    ``batch_size * world_size``; rank r takes slice [r*batch_size, (r+1)*batch_size)
    of each, so ranks see disjoint prompts. The remainder is dropped.
    Iteration never stops (epochs roll over); drive it by step count, e.g.
    ``batches = iter(loader); batch = next(batches)``. The position
    (epoch, index = global batches consumed this epoch) is shared by all
    ranks, so any rank's ``state_dict()`` resumes every rank.
    """

    def __init__(self, prompts: list[str], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(
                f"PromptLoader: need batch_size >= 1, world_size >= 1, 0 <= rank < world_size "
                f"(got batch_size={batch_size}, rank={rank}, world_size={world_size})"
            )
        global_batch = batch_size * world_size
        if len(prompts) < global_batch:
            raise DataError(
                f"PromptLoader: {len(prompts)} prompts is fewer than one global batch "
                f"(batch_size {batch_size} x world_size {world_size} = {global_batch}); "
                f"add prompts or lower the batch size"
            )
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = len(self.prompts) // global_batch
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        """The shuffled prompt order of ``epoch`` (cached for the current one)."""
        if epoch != self._order_epoch:
            self._order = list(range(len(self.prompts)))
            random.Random(self.seed + epoch).shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[list[str]]:
        """Yield batches (lists of batch_size prompts) forever from the current position."""
        while True:
            if self.index >= self.batches_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
            order = self._permutation(self.epoch)
            start = (self.index * self.world_size + self.rank) * self.batch_size
            batch = [self.prompts[j] for j in order[start : start + self.batch_size]]
            self.index += 1
            yield batch

    def state_dict(self) -> dict:
        """Position plus the settings that must match on resume."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_prompts": len(self.prompts),
            "global_batch": self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position; refuses a state from different data/settings."""
        expected = {"seed": self.seed, "num_prompts": len(self.prompts),
                    "global_batch": self.batch_size * self.world_size}
        for key, value in expected.items():
            if key in state and state[key] != value:
                raise DataError(
                    f"PromptLoader state field {key!r} is {state[key]!r} but this run has {value!r}; "
                    f"resume with the same prompts, seed and batch_size*world_size"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
