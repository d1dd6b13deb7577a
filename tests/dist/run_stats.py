"""Per-rank half of the global-statistics test: ``deepspeed --num_gpus 2 run_stats.py OUT_DIR``.

Every rank holds a different number of valid tokens (and nan/inf at padded positions, which must not
leak). Each rank saves its raw data and the helpers' results; the test recomputes the statistics on the
concatenated data in one process and compares. ``OUT_DIR/damaged`` (made by the test) is a checkpoint with one
corrupted file that every rank verifies: the ranks split the hashing (``checkpoint.verify_checkpoint``).
"""
import json
import os
import sys

import torch

from rlhf_ds.checkpoint import CheckpointError, verify_checkpoint
from rlhf_ds.distributed import (all_gather_objects, all_reduce_max, all_reduce_mean, any_rank, exit_process,
                                 get_rank, get_world_size, global_masked_mean, global_masked_whiten, init_distributed,
                                 is_main_process)

# valid tokens per row: rank 0 holds 9, rank 1 holds 16
ROW_LENGTHS = {0: [6, 3, 0], 1: [7, 7, 2]}
COLUMNS = 7


def rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    lengths = torch.tensor(ROW_LENGTHS[rank])
    mask = (torch.arange(COLUMNS) < lengths[:, None]).long()
    x = torch.randn(len(lengths), COLUMNS, generator=gen) * (rank + 1) * 3 + 5 * rank
    padding = float("nan") if rank == 0 else float("inf")
    return torch.where(mask.bool(), x, padding), mask


def verify_error(path: str) -> str:
    try:
        verify_checkpoint(path)
    except CheckpointError as err:
        return str(err)
    return "no error"


def main(out_dir: str) -> None:
    init_distributed()
    init_distributed()  # idempotent
    rank = get_rank()
    x, mask = rank_data(rank)
    torch.save({"x": x, "mask": mask}, os.path.join(out_dir, f"data{rank}.pt"))
    result = {
        "rank": rank,
        "world_size": get_world_size(),
        "is_main": is_main_process(),
        "threads": torch.get_num_threads(),
        "mean": global_masked_mean(x, mask).item(),
        "whiten": global_masked_whiten(x, mask).tolist(),
        "whiten_no_shift": global_masked_whiten(x, mask, shift_mean=False).tolist(),
        "metrics": all_reduce_mean({"loss": 1.0 + rank, "kl": 0.1 * (rank + 1), "reward": -2.0 * rank}),
        "max": all_reduce_max({"peak": 100.0 + 50 * rank, "low": -1.0 - rank}),
        "any_rank1": any_rank(rank == 1, torch.device("cpu")),
        "any_none": any_rank(False, torch.device("cpu")),
        "gathered": all_gather_objects({"rank": rank}),
        "verify_error": verify_error(os.path.join(out_dir, "damaged")),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)
