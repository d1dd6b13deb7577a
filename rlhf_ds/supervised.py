"""The two supervised stages before PPO: SFT of the policy and Bradley-Terry training of the reward model.

Both take any Hugging Face model (a causal LM; a sequence classifier with one label) and HH-format dialogues,
so the same code builds the embedded default and a user's own SFT policy or reward model
(``launch/train_sft.py``, ``launch/train_reward.py``). Plain torch on one process: these stages are small next to
PPO. Batches are bucketed by length so little compute goes to padding.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from rlhf_ds.data import question_from_prompt, split_dialogue
from rlhf_ds.reward import encode_pairs, reward_forward


@dataclass(frozen=True)
class Schedule:
    """Optimisation settings shared by both stages: AdamW, linear warmup then cosine decay to 10%."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices: shuffled, then sorted by length within windows of 32 batches.

    Sequences of similar length share a batch (less padding) while batch order stays random.
    """
    rng = random.Random(seed)
    window = batch_size * 32
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        yield from batches


def train_loop(model: torch.nn.Module, batches: Iterator[list[int]], loss_fn: Callable[[list[int]], torch.Tensor],
               schedule: Schedule, name: str, log_every: int = 50) -> list[float]:
    """Run ``schedule.steps`` optimizer steps of ``loss_fn(batch_indices)``; returns the loss per step."""
    torch.manual_seed(schedule.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)

    def lr_factor(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses, start = [], time.time()
    for step in range(schedule.steps):
        loss = loss_fn(next(batches))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}: lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"[{name}] step {step + 1}/{schedule.steps} loss {recent:.4f} ({time.time() - start:.0f}s)",
                  flush=True)
    model.eval()
    return losses


def stage_arguments(description: str, model_help: str, data_help: str, steps: int) -> argparse.ArgumentParser:
    """The command-line options both stage CLIs share (launch/train_sft.py, launch/train_reward.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--data", required=True, help=data_help)
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", required=True, help="output directory (safetensors + tokenizer)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup_steps", type=int, default=steps // 10)
    parser.add_argument("--max_len", type=int, default=512, help="tokens per example (prompt cut from the left)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


# --- SFT -------------------------------------------------------------------------------------------------
def tokenize_for_sft(tokenizer, dialogues: Sequence[str], max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per dialogue: the prompt, then the final answer and EOS.

    Prompt and answer are tokenised separately exactly as PPO will see them (prompt ending in "Assistant:",
    the policy continuing with " answer"); prompts too long lose their start.
    """
    examples = []
    for text in dialogues:
        prompt, answer = split_dialogue(text)
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep = max(1, max_len - len(answer_ids))
        examples.append((prompt_ids[-keep:] + answer_ids, min(len(prompt_ids), keep)))
    return examples


def sft_loss(model, examples: list[tuple[list[int], int]], batch: list[int], pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only (prompt tokens are context, not targets)."""
    rows = [examples[i] for i in batch]
    width = max(len(ids) for ids, _ in rows)
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, prompt_len) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
        attention[r, :len(ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(device))


def train_sft(model, tokenizer, dialogues: Sequence[str], schedule: Schedule, max_len: int) -> list[float]:
    """Supervised fine-tuning of a causal LM on the final answers of HH dialogues."""
    examples = tokenize_for_sft(tokenizer, dialogues, max_len)
    batches = bucketed_batches([len(ids) for ids, _ in examples], schedule.batch_size, schedule.seed)
    return train_loop(model, batches, lambda b: sft_loss(model, examples, b, tokenizer.pad_token_id),
                      schedule, "sft")


# --- reward model --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the question (dialogue context) and its better and worse final answers."""

    question: str
    chosen: str
    rejected: str


def preference_pairs(records: Sequence[dict]) -> list[PreferencePair]:
    """HH records ({chosen, rejected} dialogues sharing the prompt) as (question, chosen, rejected) texts."""
    pairs = []
    for record in records:
        prompt, chosen = split_dialogue(record["chosen"])
        _, rejected = split_dialogue(record["rejected"])
        pairs.append(PreferencePair(question_from_prompt(prompt), chosen, rejected))
    return pairs


def pair_scores(model, tokenizer, pairs: Sequence[PreferencePair], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N,) of the chosen and of the rejected answers, one forward over both."""
    questions = [p.question for p in pairs] * 2
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    scores = reward_forward(model, encode_pairs(tokenizer, questions, answers, max_len))
    return scores[:len(pairs)], scores[len(pairs):]


def train_reward_model(model, tokenizer, pairs: Sequence[PreferencePair], schedule: Schedule,
                       max_len: int) -> list[float]:
    """Bradley-Terry: minimise -log sigmoid(r_chosen - r_rejected) over preference pairs."""
    lengths = [len(p.question) + len(p.chosen) + len(p.rejected) for p in pairs]
    batches = bucketed_batches(lengths, schedule.batch_size, schedule.seed)

    def loss(batch: list[int]) -> torch.Tensor:
        chosen, rejected = pair_scores(model, tokenizer, [pairs[i] for i in batch], max_len)
        return -F.logsigmoid(chosen - rejected).mean()

    return train_loop(model, batches, loss, schedule, "reward")


@torch.no_grad()
def evaluate_reward_model(model, tokenizer, pairs: Sequence[PreferencePair], max_len: int,
                          batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N,) of chosen and rejected answers on held-out pairs (accuracy = mean(chosen > rejected))."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r = pair_scores(model, tokenizer, pairs[start:start + batch_size], max_len)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)
