"""Tests for rlhf_ds.data: HH prompt extraction, loading, collation, batching."""

import gzip
import json

import pytest
import torch

from rlhf_ds.data import (
    ASSISTANT_MARKER,
    HUMAN_MARKER,
    DataError,
    PromptCollator,
    PromptLoader,
    extract_prompt,
    load_prompts,
    load_records,
    question_from_prompt,
    records_to_prompts,
)

SINGLE = "\n\nHuman: Why is the sea salty?\n\nAssistant: Rivers carry dissolved minerals into it."
MULTI = (
    "\n\nHuman: Can you suggest a name for my goldfish?"
    "\n\nAssistant: How about Bubbles?"
    "\n\nHuman: Something less common, please."
    "\n\nAssistant: Try Marmalade."
)


def _dialogue(i):
    return f"{HUMAN_MARKER} Question number {i} about gardens?{ASSISTANT_MARKER} Answer {i}."


def _write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- text


def test_extract_prompt_single_turn():
    assert extract_prompt(SINGLE) == "\n\nHuman: Why is the sea salty?\n\nAssistant:"


def test_extract_prompt_multi_turn_cuts_at_last_marker():
    prompt = extract_prompt(MULTI)
    assert prompt.endswith(ASSISTANT_MARKER)
    assert "How about Bubbles?" in prompt and "Something less common" in prompt
    assert "Marmalade" not in prompt
    assert prompt == MULTI[: MULTI.rindex(ASSISTANT_MARKER) + len(ASSISTANT_MARKER)]


def test_extract_prompt_without_marker_raises():
    with pytest.raises(DataError, match="Assistant"):
        extract_prompt("\n\nHuman: only a question here")
    assert issubclass(DataError, ValueError)


def test_question_from_prompt():
    q = question_from_prompt(extract_prompt(MULTI))
    assert q.startswith("Human: Can you suggest")
    assert q.endswith("Something less common, please.")
    assert not q.endswith("Assistant:")


# --------------------------------------------------------------------------- records


def test_records_to_prompts_mixed_counts():
    records = [
        {"chosen": SINGLE, "rejected": "x"},  # good, from chosen
        {"prompt": "Name three colours."},  # good, plain prompt -> wrapped
        {"prompt": "\n\nHuman: Hi there\n\nAssistant:"},  # good, as-is
        {"prompt": "\n\nHuman: Hello\n\nAssistant: Hey\n\nHuman: Bye"},  # good, marker appended
        {"chosen": "no markers at all"},  # malformed
        {"rejected": SINGLE},  # neither field
        {"prompt": 42},  # non-string
        {"prompt": "   "},  # empty
        "just a string",  # not a dict
    ]
    prompts, stats = records_to_prompts(records, "mixed.jsonl")
    assert prompts == [
        "\n\nHuman: Why is the sea salty?\n\nAssistant:",
        "\n\nHuman: Name three colours.\n\nAssistant:",
        "\n\nHuman: Hi there\n\nAssistant:",
        "\n\nHuman: Hello\n\nAssistant: Hey\n\nHuman: Bye\n\nAssistant:",
    ]
    assert (stats.total, stats.used, stats.skipped_malformed) == (9, 4, 5)
    assert (stats.from_chosen, stats.from_prompt) == (1, 3)
    assert sum(stats.skip_reasons.values()) == 5
    line = stats.summary()
    assert "\n" not in line and "4/9" in line and "mixed.jsonl" in line


def test_records_to_prompts_none_usable_names_source():
    with pytest.raises(DataError, match="bad_source") as info:
        records_to_prompts([{"chosen": "nope"}, 3], "bad_source")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- files


def test_load_jsonl_file(tmp_path):
    path = tmp_path / "p.jsonl"
    _write_jsonl(path, [{"chosen": _dialogue(i)} for i in range(3)])
    with open(path, "a") as f:
        f.write("\n")  # trailing blank line is ignored
    assert len(load_records(str(path))) == 3
    prompts, stats = load_prompts(str(path))
    assert prompts[2] == f"{HUMAN_MARKER} Question number 2 about gardens?{ASSISTANT_MARKER}"
    assert stats.used == 3


def test_load_json_list_and_json_lines(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=2))
    as_lines = tmp_path / "lines.json"
    _write_jsonl(as_lines, [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    assert [r["prompt"] for r in load_records(str(as_list))] == ["a", "b"]
    assert [r["prompt"] for r in load_records(str(as_lines))] == ["a", "b", "c"]


def test_load_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"chosen": [_dialogue(i) for i in range(4)], "rejected": ["r"] * 4}), path)
    prompts, stats = load_prompts(str(path), max_prompts=3)
    assert len(prompts) == 3 and prompts[0].endswith(ASSISTANT_MARKER)
    assert (stats.total, stats.used, stats.dropped_over_limit) == (4, 3, 1)


def test_load_hh_layout_directory_by_split(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl.gz", [{"chosen": _dialogue(i), "rejected": "r"} for i in range(5)], gz=True)
    _write_jsonl(tmp_path / "test.jsonl.gz", [{"chosen": _dialogue(100 + i), "rejected": "r"} for i in range(2)], gz=True)
    train, _ = load_prompts(str(tmp_path), split="train")
    test, stats = load_prompts(str(tmp_path), split="test")
    assert len(train) == 5 and len(test) == 2
    assert "Question number 100" in test[0]
    assert stats.from_chosen == 2
    with pytest.raises(DataError, match="validation"):
        load_records(str(tmp_path), split="validation")


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    class FakeDataset:
        def to_list(self):
            return [{"chosen": SINGLE}]

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    prompts, _ = load_prompts("someorg/some-prefs", split="test")
    assert calls == [("someorg/some-prefs", "test")]
    assert prompts == [extract_prompt(SINGLE)]


def test_missing_file_names_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "prompts.jsonl")
    with pytest.raises(DataError) as info:
        load_records(missing)
    assert missing in str(info.value)
    with pytest.raises(DataError, match="no_such_file.parquet"):
        load_records("no_such_file.parquet")


def test_empty_file_raises(tmp_path):
    for name in ("empty.jsonl", "empty.json"):
        path = tmp_path / name
        path.write_text("")
        with pytest.raises(DataError, match=name):
            load_records(str(path))
    blank_list = tmp_path / "blank.json"
    blank_list.write_text("[]")
    with pytest.raises(DataError, match="blank.json"):
        load_records(str(blank_list))


def test_malformed_json_names_path_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "also fine"}\n{"prompt": broken\n')
    with pytest.raises(DataError) as info:
        load_records(str(path))
    msg = str(info.value)
    assert f"{path}:3" in msg and "\n" not in msg

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n  {"prompt": "ok"},\n  {"prompt": oops}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3"):
        load_records(str(bad_json))


# --------------------------------------------------------------------------- collator


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [SINGLE, MULTI, _dialogue(1), "The kettle whistles when the water boils."] * 4
    raw.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")


def test_collator_left_pads_with_eos_and_leaves_the_tokenizer_alone(tokenizer):
    """No pad token: the collator pads with EOS (as models.load_tokenizer would set it), on the left, without
    changing the tokenizer's own settings."""
    settings = (tokenizer.pad_token, tokenizer.padding_side)
    collate = PromptCollator(tokenizer, max_prompt_len=512)
    assert (tokenizer.pad_token, tokenizer.padding_side) == settings and tokenizer.pad_token is None
    short, long = extract_prompt(SINGLE), extract_prompt(MULTI)
    n_short = len(tokenizer(short, add_special_tokens=False)["input_ids"])
    n_long = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    assert n_short < n_long
    batch = collate([short, long])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, n_long) and ids.dtype == mask.dtype == torch.long
    pad = n_long - n_short
    assert (ids[0, :pad] == tokenizer.eos_token_id).all()
    assert mask[0].tolist() == [0] * pad + [1] * n_short
    assert mask[1].tolist() == [1] * n_long
    assert tokenizer.decode(ids[0, pad:].tolist()) == short
    assert (collate.num_seen, collate.num_truncated) == (2, 0)


def test_collator_truncation_keeps_end(tokenizer):
    collate = PromptCollator(tokenizer, max_prompt_len=6)
    long = extract_prompt(MULTI)
    full = tokenizer(long, add_special_tokens=False)["input_ids"]
    short = "Human: hi"
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) < 6
    batch = collate([long, short])
    assert batch["input_ids"].shape[1] == 6
    assert batch["input_ids"][0].tolist() == full[-6:]
    assert tokenizer.decode(batch["input_ids"][0].tolist()).endswith(ASSISTANT_MARKER)
    assert (collate.num_seen, collate.num_truncated) == (2, 1)


def test_collator_errors(tokenizer):
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(DataError):
        PromptCollator(tokenizer, max_prompt_len=8)([])
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(DataError, match="eos_token"):
        PromptCollator(bare, max_prompt_len=8)


# --------------------------------------------------------------------------- loader


PROMPTS = [f"prompt {i}" for i in range(23)]


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_shards_are_disjoint_and_cover_global_batch():
    r0 = PromptLoader(PROMPTS, batch_size=3, seed=7, rank=0, world_size=2)
    r1 = PromptLoader(PROMPTS, batch_size=3, seed=7, rank=1, world_size=2)
    assert r0.batches_per_epoch == 3  # 23 // 6, remainder of 5 dropped
    seen = set()
    for b0, b1 in zip(_take(r0, 3), _take(r1, 3)):
        assert len(b0) == len(b1) == 3
        assert not set(b0) & set(b1)
        seen |= set(b0) | set(b1)
    assert len(seen) == 18 and seen <= set(PROMPTS)


def test_loader_deterministic_and_reshuffles_each_epoch():
    a = _take(PromptLoader(PROMPTS, batch_size=4, seed=1), 10)
    b = _take(PromptLoader(PROMPTS, batch_size=4, seed=1), 10)
    c = _take(PromptLoader(PROMPTS, batch_size=4, seed=2), 10)
    assert a == b and a != c
    epoch0, epoch1 = a[:5], a[5:10]
    assert epoch0 != epoch1
    assert len({p for batch in epoch0 for p in batch}) == 20  # no repeats within an epoch


def test_loader_resume_continues_identically():
    reference = _take(PromptLoader(PROMPTS, batch_size=4, seed=3), 12)
    first = PromptLoader(PROMPTS, batch_size=4, seed=3)
    head = _take(first, 7)  # stops mid-epoch 1
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert (state["epoch"], state["index"]) == (1, 2)
    resumed = PromptLoader(PROMPTS, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 5) == reference
    with pytest.raises(DataError, match="seed"):
        PromptLoader(PROMPTS, batch_size=4, seed=4).load_state_dict(state)


def test_loader_too_few_prompts():
    with pytest.raises(DataError, match="fewer than one global batch"):
        PromptLoader(PROMPTS[:5], batch_size=3, seed=0, world_size=2)


def test_many_malformed_records_give_a_warning_line():
    from rlhf_ds.data import LoadStats

    stats = LoadStats(source="x.jsonl", total=100, used=90, skipped_malformed=10)
    assert "10 of 100 records of x.jsonl are malformed" in stats.warning() and "\n" not in stats.warning()
    assert LoadStats(source="x.jsonl", total=100, used=97, skipped_malformed=3).warning() is None
