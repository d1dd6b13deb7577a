"""Stage 2 of RLHF: a Bradley-Terry reward model on HH-format preference pairs.

    python launch/train_reward.py --model PATH_OR_HUB_NAME --data SOURCE --out DIR [--steps N --lr LR ...]

SOURCE is anything ``rlhf_ds.data.load_records`` reads with ``chosen`` and ``rejected`` dialogues sharing a
prompt. The model is any sequence classifier (loaded with ``num_labels=1``) and reads (question, answer) text
pairs exactly as rlhf-ds's reward scorer feeds it during PPO. Prints held-out pairwise accuracy on --eval_split.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_ds.data import DataError, load_records  # noqa: E402
from rlhf_ds.errors import run_main  # noqa: E402
from rlhf_ds.supervised import stage_arguments  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = stage_arguments(__doc__.splitlines()[0], "sequence classifier or encoder: hub name or local dir",
                             "HH-format preference pairs source", steps=300)
    parser.add_argument("--eval_split", default="test", help="held-out split for accuracy ('' to skip)")
    return parser.parse_args(argv)


def _pairs(source: str, split: str):
    from rlhf_ds.supervised import preference_pairs

    records = [r for r in load_records(source, split)
               if isinstance(r.get("chosen"), str) and isinstance(r.get("rejected"), str)]
    if not records:
        raise DataError(f"{source} ({split}) has no record with both 'chosen' and 'rejected' dialogues")
    return preference_pairs(records)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_main(lambda: train(args))


def train(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf_ds.models import load_reward_tokenizer, pretrained_kwargs
    from rlhf_ds.supervised import Schedule, evaluate_reward_model, train_reward_model

    pairs = _pairs(args.data, args.split)
    held_out = _pairs(args.data, args.eval_split) if args.eval_split else []
    torch.manual_seed(args.seed)
    tokenizer = load_reward_tokenizer(args.model, args.trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1,
                                                               **pretrained_kwargs(args.trust_remote_code))
    schedule = Schedule(args.steps, args.batch_size, args.lr, args.warmup_steps, seed=args.seed)
    train_reward_model(model, tokenizer, pairs, schedule, args.max_len)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    if held_out:
        chosen, rejected = evaluate_reward_model(model, tokenizer, held_out, args.max_len)
        print(f"held-out pairwise accuracy {(chosen > rejected).float().mean().item():.3f} on {len(held_out)} "
              f"pairs; mean score chosen {chosen.mean().item():.3f}, rejected {rejected.mean().item():.3f}")
    print(f"reward model saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
