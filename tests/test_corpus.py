"""The synthetic HH-format corpus: deterministic, balanced, held-out prompts, and no chosen-only wording."""
import collections
import re

import pytest

from rlhf_ds.corpus import FLAWS, TOPICS, about_subject, asked, last_question, make_corpus, make_split
from rlhf_ds.data import extract_prompt, records_to_prompts, split_dialogue


def test_deterministic_by_seed():
    assert make_corpus(50, seed=7) == make_corpus(50, seed=7)
    assert make_corpus(50, seed=7) != make_corpus(50, seed=8)


def test_records_are_hh_pairs_sharing_the_prompt():
    for record in make_corpus(200, seed=0):
        assert record["chosen"].startswith("\n\nHuman: ")
        prompt, chosen = split_dialogue(record["chosen"])
        assert extract_prompt(record["rejected"]) == prompt
        _, rejected = split_dialogue(record["rejected"])
        assert chosen != rejected and chosen and rejected
        assert record["flaw"] in FLAWS


def test_flaws_balanced_and_some_dialogues_multi_turn():
    records = make_corpus(500, seed=1)
    counts = collections.Counter(r["flaw"] for r in records)
    assert set(counts) == set(FLAWS) and max(counts.values()) - min(counts.values()) <= 1
    turns = [r["chosen"].count("\n\nHuman:") for r in records]
    assert 0.2 < sum(t == 2 for t in turns) / len(turns) < 0.5


def test_test_prompts_held_out_from_train():
    def questions(records):
        return {extract_prompt(r["chosen"]).rsplit("\n\nHuman: ", 1)[1] for r in records}

    train, test = make_split("train"), make_split("test")
    assert questions(train).isdisjoint(questions(test))
    prompts, stats = records_to_prompts(test, "embedded")
    assert stats.used == len(test) and all(p.endswith("\n\nAssistant:") for p in prompts)


def test_no_wording_only_in_chosen_answers():
    """A reward model would latch onto it and PPO would exploit it, instead of learning the criteria."""
    records = make_split("train")
    words = lambda text: set(re.findall(r"[A-Za-z']+", text.lower()))
    chosen_words, rejected_words = set(), set()
    for r in records:
        chosen_words |= words(split_dialogue(r["chosen"])[1])
        rejected_words |= words(split_dialogue(r["rejected"])[1])
    assert chosen_words <= rejected_words, sorted(chosen_words - rejected_words)


def test_flaws_are_what_they_say():
    for r in make_corpus(300, seed=3):
        chosen, rejected = split_dialogue(r["chosen"])[1], split_dialogue(r["rejected"])[1]
        if r["flaw"] == "truncated":
            assert not rejected.endswith((".", "!", "?")) and chosen.startswith(rejected)
        elif r["flaw"] == "rambling":
            assert len(rejected) > 2 * len(chosen)
        assert chosen.endswith((".", "!", "?"))


@pytest.mark.parametrize("question, answer, expected", [
    ("How can I keep my goldfish happy?", "Feed your goldfish at set times and give it a treat.", True),
    ("How can I keep my goldfish happy?", "Feed your rabbit at set times and give it a treat.", False),
    ("What should I pack for a trip to Greece?", "Canada is lovely. Book early, pack light and carry a map.", False),
    ("How long does it take to get good at drums?", "Keep the drums free of weeds and feed them mulch in spring.",
     False),
    ("How long does it take to get good at drums?", "Practise the drums a little every day with a metronome.", True),
    ("My phone is not working. What should I try?", "Restart the phone, check the cables and update the software.",
     True),  # "phone" is also a travel tip ("phone charger"): the asked subject's own words never count against it
    ("What should I pack for a trip to Japan?", "Japan is lovely. Book early and carry a phone charger.", True),
    ("How do I cook rice at home?", "I cannot help with that.", False),
    ("How do I cook rice at home?", "By the way, I spent my weekend watching films about the sea.", False),
    ("What is the capital of France?", "Paris.", None),  # not a corpus question: no rule applies
])
def test_about_subject_by_the_corpus_vocabulary(question, answer, expected):
    prompt = f"\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: {question}\n\nAssistant:"
    assert about_subject(prompt, answer) is expected


def test_about_subject_holds_for_every_chosen_answer_and_no_refusal_or_chatter():
    for split in ("train", "test"):
        for r in make_split(split):
            prompt, chosen = split_dialogue(r["chosen"])
            assert about_subject(prompt, chosen) is True, r["chosen"]
            if r["flaw"] in ("refusal", "off_topic", "wrong_subject"):
                assert about_subject(prompt, split_dialogue(r["rejected"])[1]) is False, r["rejected"]
    assert all(asked(q.format(s=s)) == (t, s) for t in TOPICS for q in t.questions for s in t.subjects)


def test_wrong_subject_answers_are_good_answers_about_another_subject():
    """Half are the chosen answer word for word with another subject of the asked topic (only comparing the
    subjects tells them apart); the rest are another topic's answer. In training, the swapped-in subject also meets
    the same question in some chosen answer, so no held-out combination is seen only as bad."""
    train = make_split("train")
    chosen_questions = {last_question(extract_prompt(r["chosen"])) for r in train}
    records = [r for r in train if r["flaw"] == "wrong_subject"]
    swaps = 0
    for r in records:
        prompt, chosen = split_dialogue(r["chosen"])
        rejected = split_dialogue(r["rejected"])[1]
        question = last_question(prompt)
        topic, subject = asked(question)
        others = [s for s in topic.subjects if s != subject and re.search(rf"\b{s}\b", rejected, re.IGNORECASE)]
        if others and chosen.replace(subject, others[0]).replace(subject.capitalize(), others[0].capitalize()) \
                == rejected:
            swaps += 1
            assert question.replace(subject, others[0]) in chosen_questions, (question, others[0])
    assert 0.4 < swaps / len(records) < 0.6, swaps / len(records)


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_split("dev")
