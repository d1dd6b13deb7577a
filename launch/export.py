"""Export a training checkpoint as Hugging Face model directories (safetensors + tokenizer).

    python launch/export.py CHECKPOINT OUT [--critic CRITIC_OUT] [--adapter ADAPTER_OUT] [--overwrite]

CHECKPOINT is a checkpoint directory (OUTPUT_DIR/checkpoints/iter_N) or a run directory (its latest
checkpoint). OUT loads with ``AutoModelForCausalLM.from_pretrained`` and ``pipeline("text-generation")``;
CRITIC_OUT holds the critic backbone plus ``value_head.safetensors`` (``rlhf_ds.models.load_critic``). A LoRA
run's models are written with their adapters merged; ADAPTER_OUT gets the actor's adapter alone, in peft's format
(``PeftModel.from_pretrained`` and ``launch/evaluate.py --policy`` load it onto its base model). Runs in one
process without DeepSpeed engines, whatever ZeRO stage trained the checkpoint. The checkpoint is verified
(every file's size and sha256) first; OUT must not be the checkpoint, its run directory or inside them, and a
non-empty OUT that is not an earlier export is refused unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_ds.checkpoint import export_checkpoint, find_checkpoint  # noqa: E402
from rlhf_ds.errors import run_main  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="OUTPUT_DIR/checkpoints/iter_N, or a run directory")
    parser.add_argument("out", help="directory for the policy (Hugging Face format)")
    parser.add_argument("--critic", help="also export the critic (backbone + value head) here")
    parser.add_argument("--adapter", help="also export a LoRA run's actor adapter alone (peft's format) here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty OUT (CRITIC_OUT, ADAPTER_OUT) that is not an earlier export")
    args = parser.parse_args(argv)

    def export() -> int:
        path = find_checkpoint(args.checkpoint, args.checkpoint)
        export_checkpoint(path, args.out, critic_out=args.critic, overwrite=args.overwrite, adapter_out=args.adapter)
        print(f"exported {path} -> policy {args.out}" + (f", critic {args.critic}" if args.critic else "")
              + (f", adapter {args.adapter}" if args.adapter else ""))
        return 0

    return run_main(export)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
