"""Evaluate a policy against a reference on held-out prompts (one process, CPU or one GPU, no DeepSpeed).

    python launch/evaluate.py [--policy DIR] [--reference DIR] [--reward DIR] [--num_prompts 64]
                              [--batch_size 16] [--seed 0] [--reference_samples 0]
                              [--samples FILE.jsonl] [--json FILE]
                              [--device auto|cpu|cuda] [--config FILE] [--field value ...]

--policy: a Hugging Face model directory (the trainer's OUTPUT_DIR/policy, an SFT model) or a training
checkpoint directory (converted first); default: the config's policy_model, i.e. the initial policy, so with no
arguments this is the SFT policy against itself (a sanity check: win rate 0.5, KL 0). --reference and --reward
default to the config's policy_model and reward_model. Prompts are the config's dataset, split eval_split; the
generation settings (max_prompt_len, max_new_tokens, temperature, stop_strings, reward_max_len) come from the
config and its --field overrides. Writes OUTPUT_DIR/eval/samples.jsonl and OUTPUT_DIR/eval/summary.json by
default. A bad input is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_ds.config import PPOConfig  # noqa: E402
from rlhf_ds.errors import run_main  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, PPOConfig]:
    """The evaluation's own options, and a PPOConfig from ``--config FILE`` and the remaining ``--field value``."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="model directory or training checkpoint (default: the initial policy)")
    parser.add_argument("--reference", help="reference model (default: the config's policy_model)")
    parser.add_argument("--reward", help="reward model (default: the config's reward_model)")
    parser.add_argument("--num_prompts", type=int, default=64, help="first N prompts of the eval split")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--seed", type=int, default=0, help="batch i is sampled from seed + i by both models")
    parser.add_argument("--reference_samples", type=int, default=0,
                        help="K more reference answers per prompt: the win rate against independent answers and "
                             "the best win rate PPO, or any policy, could reach at the policy's KL (0 = off)")
    parser.add_argument("--samples", help="per-prompt JSON lines (default OUTPUT_DIR/eval/samples.jsonl)")
    parser.add_argument("--json", help="summary JSON (default OUTPUT_DIR/eval/summary.json)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    args, rest = parser.parse_known_args(argv)
    return args, PPOConfig.from_args(rest)


def main(argv: list[str]) -> int:
    return run_main(lambda: evaluate(*parse_args(argv)))


def _device(name: str):
    """The torch device of ``--device``; a name torch does not know, or CUDA without one, is an EvaluationError."""
    import torch

    from rlhf_ds.evaluation import EvaluationError

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise EvaluationError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {name!r}: this torch has no usable CUDA device; use --device cpu (or auto)")
    return device


def evaluate(args: argparse.Namespace, config: PPOConfig) -> int:
    from rlhf_ds.catalog import resolve_model_paths
    from rlhf_ds.evaluation import check_model_path, evaluate_policy, format_summary, write_outputs

    out_dir = os.path.join(config.output_dir, "eval")
    samples_path = args.samples or os.path.join(out_dir, "samples.jsonl")
    json_path = args.json or os.path.join(out_dir, "summary.json")
    device = _device(args.device)
    for path, what in ((args.policy, "--policy"), (args.reference, "--reference"), (args.reward, "--reward")):
        if path is not None:  # a mistyped path fails here, before the embedded models are built
            check_model_path(path, what)
    defaults = (resolve_model_paths(config) if None in (args.policy, args.reference, args.reward)
                else (None, None, None))
    policy = args.policy or defaults[0]
    reference = args.reference or defaults[0]
    reward = args.reward or defaults[2]
    print(f"policy {policy}\nreference {reference}\nreward {reward}\ndevice {device}", flush=True)
    if os.path.abspath(os.path.expanduser(policy)) == os.path.abspath(os.path.expanduser(reference)):
        print("note: policy and reference are the same model (pass --policy runs/ppo/policy to evaluate "
              "a trained one)", flush=True)
    records, summary = evaluate_policy(config, policy, reference, reward, args.num_prompts, args.batch_size,
                                       args.seed, device, args.reference_samples,
                                       log=lambda line: print(line, flush=True))
    summary["settings"] = {
        "policy": policy, "reference": reference, "reward": reward, "dataset": config.dataset,
        "eval_split": config.eval_split, "seed": args.seed, "batch_size": args.batch_size,
        "reference_samples": args.reference_samples,
        **{k: getattr(config, k) for k in ("max_prompt_len", "max_new_tokens", "temperature", "stop_strings",
                                            "reward_max_len", "reward_clip", "normalize_reward")},
    }
    write_outputs(records, summary, samples_path, json_path)
    print(format_summary(summary))
    print(f"wrote {samples_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
