"""A synthetic HH-RLHF-format preference corpus, written for rlhf-ds, deterministic by seed.

Each record is ``{"chosen", "rejected", "flaw", "topic"}``: two dialogues in Anthropic HH format
(``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) that share the prompt and differ in the final answer. The chosen
answer is a polite, on-topic, complete answer to the question; the rejected one fails exactly one criterion
(``flaw``), chosen among those a small reward model can learn:

- ``rude``: the helpful answer wrapped in a dismissive opener and closer;
- ``refusal``: a refusal to help with a harmless question;
- ``off_topic``: a fluent answer about a different topic;
- ``rambling``: the answer's sentences repeated until it runs on;
- ``truncated``: the answer cut off mid-sentence.

Why it is built this way: a reward model latches onto any wording that only chosen answers contain, and PPO
then exploits it. So every chosen answer is assembled from the same openers and sentences the rejected
answers reuse (off-topic answers are other topics' chosen answers, rambling and truncated ones are built from
the chosen text); only the flaws add wording of their own, and that wording is what the reward model should
penalise. Test prompts are (topic, subject, question template) combinations held out from training.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

FLAWS = ("rude", "refusal", "off_topic", "rambling", "truncated")
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
        ("Start with fresh ingredients and cook the {s} on medium heat. Taste it as you go and add {t} at the end.",
         "Keep the {s} simple. Prepare everything before you start and add a little {t} for flavour.",
         "Cook the {s} slowly and stir often. A pinch of {t} near the end makes a big difference."),
        ("salt", "garlic", "lemon", "butter", "pepper", "herbs"),
    ),
    Topic(
        "gardening",
        ("tomatoes", "roses", "herbs", "lettuce", "strawberries", "peppers", "tulips", "carrots", "beans", "mint"),
        ("How can I grow {s} in my garden?", "What do {s} need to grow well?", "Why are my {s} not growing?",
         "When should I plant {s}?"),
        ("Plant the {s} in a sunny spot and water them in the morning. Mix some {t} into the soil once a month.",
         "Give the {s} plenty of light and loose soil. Check them every few days and add {t} when they look pale.",
         "Most {s} like sun and steady water. Clear the weeds around them and feed them with {t} in spring."),
        ("compost", "mulch", "fertiliser", "manure", "leaf mould"),
    ),
    Topic(
        "travel",
        ("Spain", "Japan", "Canada", "Italy", "Peru", "Norway", "Egypt", "Mexico", "Kenya", "Greece"),
        ("What should I pack for a trip to {s}?", "Is {s} a good place for a holiday?",
         "How can I save money on a trip to {s}?", "What should I know before visiting {s}?"),
        ("{s} is a great place to visit. Book your travel early, pack light and carry a {t} for the day.",
         "Plan your days in {s} around a few places you really want to see, and keep a {t} with you.",
         "Check the season before you go to {s}. Pack comfortable shoes and bring a {t} for long walks."),
        ("map", "water bottle", "small bag", "phone charger", "travel guide"),
    ),
    Topic(
        "pets",
        ("dog", "cat", "rabbit", "hamster", "parrot", "goldfish", "puppy", "kitten", "turtle", "guinea pig"),
        ("How do I take care of a {s}?", "What should I feed my {s}?", "How can I keep my {s} happy?",
         "My {s} seems bored. What can I do?"),
        ("A {s} needs fresh water, regular food and a clean place to rest. Spend time with it and give it a {t}.",
         "Feed your {s} at the same times each day and keep its home clean. A new {t} can keep it busy.",
         "Play with your {s} every day and watch how it behaves. A visit to the vet once a year and a {t} help."),
        ("toy", "treat", "soft bed", "chew stick", "play area"),
    ),
    Topic(
        "fitness",
        ("running", "swimming", "cycling", "yoga", "walking", "push ups", "stretching", "rowing", "hiking", "dancing"),
        ("How do I get started with {s}?", "Is {s} good exercise?", "How often should I do {s}?",
         "What is a good plan for {s} as a beginner?"),
        ("{s} is a good way to stay fit. Start with short sessions three times a week and rest with {t}.",
         "Begin {s} slowly and build up over a few weeks. Warm up first and drink {t} afterwards.",
         "Do {s} at an easy pace at first and listen to your body. Good sleep and {t} help you recover."),
        ("water", "a stretch", "a light meal", "a rest day", "fruit"),
    ),
    Topic(
        "computers",
        ("laptop", "printer", "router", "keyboard", "phone", "tablet", "monitor", "mouse", "speaker", "camera"),
        ("My {s} is not working. What should I try?", "How do I make my {s} faster?",
         "How do I set up a new {s}?", "What should I check before buying a {s}?"),
        ("First restart the {s} and check the cables. If that does not help, update the {t} and try again.",
         "Turn the {s} off and on again, then look at the {t}. Most problems go away after an update.",
         "Check that the {s} has power and is connected. Then open the {t} and follow the steps there."),
        ("settings", "drivers", "software", "manual", "help page"),
    ),
    Topic(
        "music",
        ("guitar", "piano", "violin", "drums", "flute", "singing", "ukulele", "trumpet", "bass", "cello"),
        ("How can I learn to play the {s}?", "What is the best way to practise {s}?",
         "I am new to {s}. Where should I begin?", "How long does it take to get good at {s}?"),
        ("Practise the {s} a little every day instead of a lot once a week. Learn a simple song and use a {t}.",
         "Start the {s} with the basics and go slowly. A good teacher and a {t} will help you improve.",
         "Set a short practice time for the {s} each day. Record yourself and play along with a {t}."),
        ("metronome", "song book", "teacher", "practice app", "recording"),
    ),
    Topic(
        "study",
        ("maths", "history", "chemistry", "French", "biology", "physics", "reading", "spelling", "geography", "art"),
        ("How can I get better at {s}?", "What is a good way to study {s}?", "I have a {s} test soon. Any tips?",
         "How do I remember what I learn in {s}?"),
        ("Study {s} in short sessions and test yourself often. Write notes in your own words and use {t}.",
         "Break {s} into small parts and review them each day. Explain it to a friend and try {t}.",
         "Make a plan for {s} and stick to it. Practise with old questions and use {t} to remember."),
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


def _good_answer(rng: random.Random, topic: Topic, subject: str) -> str:
    body = rng.choice(topic.answers).format(s=subject, t=rng.choice(topic.tips))
    return _join(rng.choice(OPENERS), body[0].upper() + body[1:], rng.choice(CLOSERS))


def _bad_answer(rng: random.Random, flaw: str, topic: Topic, subject: str, good: str) -> str:
    if flaw == "rude":
        body = rng.choice(topic.answers).format(s=subject, t=rng.choice(topic.tips))
        return _join(rng.choice(RUDE_OPENERS), body[0].upper() + body[1:], rng.choice(RUDE_CLOSERS))
    if flaw == "refusal":
        return rng.choice(REFUSALS)
    if flaw == "off_topic":
        other = rng.choice([t for t in TOPICS if t is not topic])
        return _good_answer(rng, other, rng.choice(other.subjects))
    sentences = [s.strip() + "." for s in good.replace("!", ".").split(".") if s.strip()]
    if flaw == "rambling":
        repeats = sentences * rng.randint(3, 4)
        return " ".join(repeats)
    if flaw == "truncated":
        words = good.split()
        cut = rng.randint(3, max(4, len(words) // 2))
        return " ".join(words[:cut]).rstrip(".,!?")
    raise ValueError(f"unknown flaw '{flaw}': choose one of {', '.join(FLAWS)}")


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
        good = _good_answer(rng, topic, subject)
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
