"""Stage 1 of RLHF: supervised fine-tuning of a causal LM on the final answers of HH-format dialogues.

    python launch/train_sft.py --model PATH_OR_HUB_NAME --data SOURCE --out DIR [--steps N --lr LR ...]

SOURCE is anything ``rlhf_ds.data.load_records`` reads (a hub dataset, a local HH directory or file, 'embedded');
each record's ``chosen`` dialogue is a training example (loss on the final answer only). The result is an
ordinary Hugging Face directory (safetensors + tokenizer) usable as ``--policy_model`` of launch/train.py.
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
    return stage_arguments(__doc__.splitlines()[0], "causal LM: hub name or local directory",
                           "HH-format dialogues source", steps=500).parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_main(lambda: train(args))


def train(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ds.models import load_tokenizer, pretrained_kwargs
    from rlhf_ds.supervised import Schedule, train_sft

    dialogues = [r["chosen"] for r in load_records(args.data, args.split) if isinstance(r.get("chosen"), str)]
    if not dialogues:
        raise DataError(f"{args.data} has no record with a 'chosen' dialogue: SFT needs HH-format dialogues")
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(args.model, **pretrained_kwargs(args.trust_remote_code))
    schedule = Schedule(args.steps, args.batch_size, args.lr, args.warmup_steps, seed=args.seed)
    losses = train_sft(model, tokenizer, dialogues, schedule, args.max_len)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"SFT done: {len(dialogues)} dialogues, final loss {sum(losses[-20:]) / len(losses[-20:]):.4f}, "
          f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
