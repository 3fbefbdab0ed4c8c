"""Run under `python -m torch.distributed.run --standalone --nproc_per_node 2 memory_bank_ddp.py OUT_DIR`: every
rank enqueues the all-gathered batches into its own MemoryBank and saves `get()` to OUT_DIR/bank_rank{r}.pt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from neighborretr.distributed import all_gather_with_grad
from neighborretr.memory_bank import MemoryBank

# Shared with the test, which rebuilds the expected bank from them.
CAPACITY, PER_RANK, STEPS, L, T, D = 6, 2, 3, 3, 2, 4


def local_batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    """This rank's items at this step; the id 100·rank + 10·step + row is written into every feature too."""
    ids = 100 * rank + 10 * step + torch.arange(PER_RANK)
    return {
        "text": ids.float().view(-1, 1, 1).expand(-1, L, D).clone(),
        "text_mask": torch.ones(PER_RANK, L, dtype=torch.long),
        "video": -ids.float().view(-1, 1, 1).expand(-1, T, D).clone(),
        "video_mask": (ids.view(-1, 1) + torch.arange(T)) % 2,
        "ids": ids,
    }


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        bank = MemoryBank(CAPACITY, (L, D), (T, D))
        for step in range(STEPS):
            gathered = {key: all_gather_with_grad(value) for key, value in local_batch(rank, step).items()}
            bank.enqueue(**gathered)
        torch.save({"world": dist.get_world_size(), **bank.get()}, Path(out_dir) / f"bank_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
