"""launch/train.py's ``main`` on one rank, instrumented for the checkpoint tests.

    deepspeed --num_gpus 2 --no_local_rank run_cli.py FAULT [train.py arguments]

Every rollout's sampled token ids are hashed into ``output_dir/samples_rank{r}.jsonl`` (one line per
iteration), so two runs can be compared response by response. FAULT injects a failure into the K-th
checkpoint save of this process, after both engines wrote their shards and before the save completes:
``kill@K`` (SIGKILL to this rank), ``enospc@K`` (this rank's next write fails with ENOSPC, rank 1 only), or
``none``.
"""
import errno
import hashlib
import json
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "launch"))

import train  # noqa: E402  launch/train.py

from rlhf_ds import checkpoint  # noqa: E402
from rlhf_ds.config import PPOConfig  # noqa: E402
from rlhf_ds.distributed import exit_process, get_rank  # noqa: E402
from rlhf_ds.hybrid import HybridEngine  # noqa: E402


def record_samples(output_dir: str) -> None:
    generate = HybridEngine.generate

    def recording_generate(self, *args, **kwargs):
        sequences, mask = generate(self, *args, **kwargs)
        digest = hashlib.sha256(sequences.cpu().numpy().tobytes()).hexdigest()
        os.makedirs(output_dir, exist_ok=True)  # rank 0 makes it; another rank may sample first
        with open(os.path.join(output_dir, f"samples_rank{get_rank()}.jsonl"), "a") as fh:
            fh.write(json.dumps({"seed": kwargs.get("generator_seed"), "sha256": digest}) + "\n")
        return sequences, mask

    HybridEngine.generate = recording_generate


def inject_fault(spec: str) -> None:
    if spec == "none":
        return
    kind, at = spec.split("@")
    saves = {"count": 0}
    rng_state = checkpoint.rng_state

    def faulty_rng_state():
        saves["count"] += 1
        if saves["count"] == int(at):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "enospc" and get_rank() == 1:
                raise OSError(errno.ENOSPC, "No space left on device", "rng/rank_00001.pt")
        return rng_state()

    checkpoint.rng_state = faulty_rng_state


if __name__ == "__main__":
    fault, argv = sys.argv[1], sys.argv[2:]
    inject_fault(fault)
    record_samples(PPOConfig.from_args(argv).output_dir)
    exit_process(train.main(argv))
