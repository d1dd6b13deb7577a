"""A synthetic HH-RLHF-format preference corpus, written for rlhf-ds, deterministic by seed.

Each record is ``{"chosen", "rejected", "flaw", "topic"}``: two dialogues in Anthropic HH format
(``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) that share the prompt and differ in the final answer. The chosen
answer is a polite, on-topic, complete answer to the question; the rejected one fails exactly one criterion
(``flaw``), chosen among those a small reward model can learn:

- ``rude``: the helpful answer wrapped in a dismissive opener and closer;
- ``refusal``: a refusal to help with a harmless question;
- ``off_topic``: chatter that ignores the question (the assistant's weekend, the weather, ...);
- ``rambling``: the answer's sentences repeated until it runs on;
- ``truncated``: the answer cut off mid-sentence;
- ``wrong_subject``: a fluent, polite answer about another subject than the one asked.

Why it is built this way: a reward model latches onto any wording that only chosen answers contain, and PPO
then exploits it. So every chosen answer is assembled from the same openers and sentences the rejected
answers reuse (rude answers wrap the helpful text, rambling and truncated ones are built from the chosen text,
wrong-subject ones are chosen answers about other subjects); only the flaws add wording of their own, and that
wording is what the reward model should penalise. ``wrong_subject`` is the one flaw that cannot be seen in the
answer alone: telling it needs question and answer together (the embedded reward model compares them through a
fixed copy head, ``embedded.plant_copy_head``). ``about_subject`` judges relevance by a rule on the corpus's own
vocabulary, so that a policy's answers can be checked without a reward model.
Test prompts are (topic, subject, question template) combinations held out from training.
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

FLAWS = ("rude", "refusal", "off_topic", "rambling", "truncated", "wrong_subject")
SPLIT_SIZES = {"train": 6000, "test": 400}
SPLIT_SEEDS = {"train": 1234, "test": 4321}
TEST_FRACTION = 8  # one (topic, subject, question) combination in TEST_FRACTION is held out for "test"


@dataclass(frozen=True)
class Topic:
    """Questions and answers about one subject area; ``{s}`` is the subject, ``{t}`` a tip word."""

    name: str
    subjects: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    tips: tuple[str, ...]


TOPICS = (
    Topic(
        "cooking",
        ("rice", "pasta", "soup", "bread", "eggs", "beans", "pancakes", "curry", "noodles", "salad"),
        ("How do I cook {s} at home?", "What is an easy way to make {s}?", "Any advice for making good {s}?",
         "I want to make {s} tonight. Where should I start?"),
        ("Cook the {s} on medium heat and add some {t} at the end.",
         "Keep the {s} simple and add a little {t} for flavour.",
         "Cook the {s} slowly, stir often and finish with {t}."),
        ("salt", "garlic", "lemon", "butter", "pepper", "herbs"),
    ),
    Topic(
        "gardening",
        ("tomatoes", "roses", "herbs", "lettuce", "strawberries", "peppers", "tulips", "carrots", "beans", "mint"),
        ("How can I grow {s} in my garden?", "What do {s} need to grow well?", "Why are my {s} not growing?",
         "When should I plant {s}?"),
        ("Plant the {s} in a sunny spot and mix {t} into the soil.",
         "Give the {s} plenty of light, steady water and some {t}.",
         "Keep the {s} free of weeds and feed them {t} in spring."),
        ("compost", "mulch", "fertiliser", "manure", "leaf mould"),
    ),
    Topic(
        "travel",
        ("Spain", "Japan", "Canada", "Italy", "Peru", "Norway", "Egypt", "Mexico", "Kenya", "Greece"),
        ("What should I pack for a trip to {s}?", "Is {s} a good place for a holiday?",
         "How can I save money on a trip to {s}?", "What should I know before visiting {s}?"),
        ("{s} is lovely. Book early, pack light and carry a {t}.",
         "Plan a few days in {s} and keep a {t} with you.",
         "Check the season for {s} and bring a {t} for long walks."),
        ("map", "water bottle", "small bag", "phone charger", "travel guide"),
    ),
    Topic(
        "pets",
        ("dog", "cat", "rabbit", "hamster", "parrot", "goldfish", "puppy", "kitten", "turtle", "guinea pig"),
        ("How do I take care of a {s}?", "What should I feed my {s}?", "How can I keep my {s} happy?",
         "My {s} seems bored. What can I do?"),
        ("A {s} needs fresh water, good food and a {t}.",
         "Feed your {s} at set times and give it a {t}.",
         "Play with your {s} every day and get it a {t}."),
        ("toy", "treat", "soft bed", "chew stick", "play area"),
    ),
    Topic(
        "fitness",
        ("running", "swimming", "cycling", "yoga", "walking", "push ups", "stretching", "rowing", "hiking", "dancing"),
        ("How do I get started with {s}?", "Is {s} good exercise?", "How often should I do {s}?",
         "What is a good plan for {s} as a beginner?"),
        ("{s} is great exercise. Start slowly and rest with {t}.",
         "Do {s} three times a week and have {t} afterwards.",
         "Begin {s} at an easy pace and recover with {t}."),
        ("water", "a stretch", "a light meal", "a rest day", "fruit"),
    ),
    Topic(
        "computers",
        ("laptop", "printer", "router", "keyboard", "phone", "tablet", "monitor", "mouse", "speaker", "camera"),
        ("My {s} is not working. What should I try?", "How do I make my {s} faster?",
         "How do I set up a new {s}?", "What should I check before buying a {s}?"),
        ("Restart the {s}, check the cables and update the {t}.",
         "Turn the {s} off and on, then look at the {t}.",
         "Make sure the {s} has power, then open the {t}."),
        ("settings", "drivers", "software", "manual", "help page"),
    ),
    Topic(
        "music",
        ("guitar", "piano", "violin", "drums", "flute", "singing", "ukulele", "trumpet", "bass", "cello"),
        ("How can I learn to play the {s}?", "What is the best way to practise {s}?",
         "I am new to {s}. Where should I begin?", "How long does it take to get good at {s}?"),
        ("Practise the {s} a little every day with a {t}.",
         "Learn the basics of the {s} slowly and use a {t}.",
         "Play the {s} for a short time daily and use a {t}."),
        ("metronome", "song book", "teacher", "practice app", "recording"),
    ),
    Topic(
        "study",
        ("maths", "history", "chemistry", "French", "biology", "physics", "reading", "spelling", "geography", "art"),
        ("How can I get better at {s}?", "What is a good way to study {s}?", "I have a {s} test soon. Any tips?",
         "How do I remember what I learn in {s}?"),
        ("Study {s} in short sessions and use {t}.",
         "Review {s} a little each day and try {t}.",
         "Make a plan for {s} and practise with {t}."),
        ("flash cards", "a timer", "a study group", "practice tests", "a notebook"),
    ),
)

OPENERS = ("Sure.", "Good question.", "Happy to help.", "Of course.", "Here is what I would do.", "")
CLOSERS = ("Good luck!", "I hope that helps.", "Have fun with it.", "Let me know how it goes.", "")
RUDE_OPENERS = ("Ugh, that is a silly question.", "Seriously? Everyone knows this.", "Fine, if you must know.",
                "What a waste of my time.", "You should know this already.")
RUDE_CLOSERS = ("Now stop bothering me.", "Do not ask me again.", "Try to think next time.",
                "That was obvious.", "Go figure out the rest yourself.")
REFUSALS = ("I cannot help with that.", "I am not able to answer questions like this.",
            "Sorry, I will not talk about that.", "That is not something I can discuss.",
            "I do not want to answer that question.")
OFF_TOPIC = ("By the way, I spent my weekend watching films about the sea.",
             "That reminds me of a long train ride I took last year. The seats were blue.",
             "Let me tell you about my favourite colour instead. It is green, like old bottles.",
             "The weather here has been grey all week and the clouds never move.",
             "I once read a story about a lighthouse keeper who collected spoons.",
             "My neighbour painted his fence yellow yesterday, which was a surprise.")
SMALL_TALK = (
    ("Hi there.", "Hello! What can I do for you?"),
    ("Can I ask you something?", "Of course, go ahead."),
    ("I have a question for you.", "Sure, what is it?"),
    ("Good morning.", "Good morning! How can I help?"),
)


def _held_out(topic: str, subject: str, question: int) -> bool:
    """Deterministic split of prompt combinations: the same combination is never in both splits."""
    return zlib.crc32(f"{topic}|{subject}|{question}".encode()) % TEST_FRACTION == 0


def _dialogue(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\nHuman: {human}\n\nAssistant: {assistant}" for human, assistant in turns)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _answers(rng: random.Random, topic: Topic, subjects: tuple[str, ...]) -> list[str]:
    """One answer of ``topic`` (opener, template, tip and closer drawn once) about each of ``subjects``."""
    template, tip, opener, closer = (rng.choice(topic.answers), rng.choice(topic.tips), rng.choice(OPENERS),
                                     rng.choice(CLOSERS))
    bodies = (template.format(s=subject, t=tip) for subject in subjects)
    return [_join(opener, body[0].upper() + body[1:], closer) for body in bodies]


def _wrong_subject_pair(rng: random.Random, topic: Topic, subject: str, question: int,
                        split: str) -> tuple[str, str]:
    """(chosen, rejected) where the rejected answer is fluent and polite but not about the asked subject.

    Half the time it is the chosen answer word for word with another subject of the same topic ("Feed your
    rabbit ..." to a goldfish question), which only comparing the subjects can tell; otherwise it is another
    topic's answer, about that topic's subject or about the asked one. In training the swapped-in subject is one
    that also meets this question in chosen answers: a held-out subject/question combination seen only in
    rejected answers would teach that the combination is bad instead of that the subjects differ.
    """
    kind = rng.randrange(4)
    if kind < 2:
        others = [s for s in topic.subjects
                  if s != subject and (split == "test" or not _held_out(topic.name, s, question))]
        chosen, rejected = _answers(rng, topic, (subject, rng.choice(others)))
        return chosen, rejected
    chosen = _answers(rng, topic, (subject,))[0]
    other = rng.choice([t for t in TOPICS if t is not topic])
    return chosen, _answers(rng, other, (rng.choice(other.subjects) if kind == 2 else subject,))[0]


def _bad_answer(rng: random.Random, flaw: str, topic: Topic, subject: str, good: str) -> str:
    if flaw == "rude":
        body = rng.choice(topic.answers).format(s=subject, t=rng.choice(topic.tips))
        return _join(rng.choice(RUDE_OPENERS), body[0].upper() + body[1:], rng.choice(RUDE_CLOSERS))
    if flaw == "refusal":
        return rng.choice(REFUSALS)
    if flaw == "off_topic":
        return _join(rng.choice(OPENERS), rng.choice(OFF_TOPIC), rng.choice(CLOSERS))
    sentences = [s.strip() + "." for s in good.replace("!", ".").split(".") if s.strip()]
    if flaw == "rambling":
        repeats = sentences * rng.randint(3, 4)
        return " ".join(repeats)
    if flaw == "truncated":
        words = good.split()
        cut = rng.randint(3, max(4, len(words) // 2))
        return " ".join(words[:cut]).rstrip(".,!?")
    raise ValueError(f"unknown flaw '{flaw}': choose one of {', '.join(FLAWS)}")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@lru_cache(maxsize=None)
def _topic_words() -> dict[str, frozenset[str]]:
    """Each topic's own answer vocabulary: the words of its answer templates and tips that no other topic's
    templates or tips use and that no shared phrase (openers, closers, the flaws' wording, small talk, any
    question) contains: "stir", "mulch", "metronome", not "good" or "help"."""
    words = {t.name: _words(" ".join(t.answers + t.tips).replace("{s}", " ").replace("{t}", " ")) for t in TOPICS}
    shared = _words(" ".join((*OPENERS, *CLOSERS, *RUDE_OPENERS, *RUDE_CLOSERS, *REFUSALS, *OFF_TOPIC,
                              *(text for turn in SMALL_TALK for text in turn),
                              *(q for t in TOPICS for q in t.questions))))
    return {name: frozenset(own - shared - set().union(*(w for other, w in words.items() if other != name)))
            for name, own in words.items()}


def asked(question: str) -> Optional[tuple[Topic, str]]:
    """(topic, subject) of a corpus question (the text of a Human turn), or None for any other text."""
    for topic in TOPICS:
        for template in topic.questions:
            pattern = re.escape(template).replace(re.escape("{s}"), "(.+)")
            match = re.fullmatch(pattern, question.strip())
            if match and match.group(1) in topic.subjects:
                return topic, match.group(1)
    return None


def last_question(prompt: str) -> str:
    """The text of the last Human turn of an HH prompt (``"\\n\\nHuman: ...\\n\\nAssistant:"``)."""
    turn = prompt.rsplit("\n\nHuman:", 1)[-1]
    return turn.split("\n\nAssistant:", 1)[0].strip()


def about_subject(prompt: str, answer: str) -> Optional[bool]:
    """Whether ``answer`` is about what the last question of ``prompt`` asks, by the corpus's vocabulary: it names
    the asked subject, names no other subject, and uses no word that only another topic's answers use. None when
    the question is not one of the corpus's (a rule needs to know what was asked)."""
    found = asked(last_question(prompt))
    if found is None:
        return None
    topic, subject = found
    text = answer.lower()
    own = _words(" ".join(topic.answers + topic.tips))  # "phone" in a travel tip names no computer
    named = {s.lower() for t in TOPICS for s in t.subjects if re.search(rf"\b{re.escape(s.lower())}\b", text)}
    if subject.lower() not in named or any(s != subject.lower() and not _words(s) <= own for s in named):
        return False
    foreign = set().union(*(words for name, words in _topic_words().items() if name != topic.name))
    return not ((_words(answer) - _words(subject)) & foreign)


def make_corpus(num_pairs: int, seed: int, split: str = "train") -> list[dict]:
    """``num_pairs`` preference records for ``split`` ("train" or "test"), deterministic in ``seed``.

    Flaws cycle so each is equally frequent; about a third of the dialogues open with a small-talk turn,
    so prompts are multi-turn like HH-RLHF's and prompt extraction must find the *last* Assistant marker.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split '{split}': choose one of {', '.join(SPLIT_SIZES)}")
    rng = random.Random(seed)
    records = []
    while len(records) < num_pairs:
        topic = rng.choice(TOPICS)
        subject = rng.choice(topic.subjects)
        q_index = rng.randrange(len(topic.questions))
        if _held_out(topic.name, subject, q_index) != (split == "test"):
            continue
        question = topic.questions[q_index].format(s=subject)
        flaw = FLAWS[len(records) % len(FLAWS)]
        if flaw == "wrong_subject":
            good, bad = _wrong_subject_pair(rng, topic, subject, q_index, split)
        else:
            good = _answers(rng, topic, (subject,))[0]
            bad = _bad_answer(rng, flaw, topic, subject, good)
        history = [rng.choice(SMALL_TALK)] if rng.random() < 0.33 else []
        records.append({
            "chosen": _dialogue(history + [(question, good)]),
            "rejected": _dialogue(history + [(question, bad)]),
            "flaw": flaw,
            "topic": topic.name,
        })
    return records


def make_split(split: str) -> list[dict]:
    """The embedded default's fixed corpus for a split (what ``dataset: embedded`` loads)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split '{split}' for the embedded dataset: choose one of {', '.join(SPLIT_SIZES)}")
    return make_corpus(SPLIT_SIZES[split], SPLIT_SEEDS[split], split)
