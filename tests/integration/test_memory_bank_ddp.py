"""Two gloo processes that enqueue the all-gathered batches must end up with identical memory banks."""

import pytest
import torch

from tests.conftest import run_two_processes
from tests.integration.memory_bank_ddp import CAPACITY, STEPS, local_batch


@pytest.mark.integration
def test_banks_are_identical_across_ranks(tmp_path):
    run_two_processes("memory_bank_ddp.py", str(tmp_path))
    banks = [torch.load(tmp_path / f"bank_rank{rank}.pt") for rank in range(2)]
    assert banks[0]["world"] == banks[1]["world"] == 2
    assert banks[0].keys() == banks[1].keys()
    for key in banks[0]:
        if key != "world":
            assert torch.equal(banks[0][key], banks[1][key]), key

    # Newest first: the last gathered batch (rank 0's rows, then rank 1's), then the one before, cut at CAPACITY.
    gathered = [torch.cat([local_batch(rank, step)["ids"] for rank in range(2)]) for step in range(STEPS)]
    expected = torch.cat(gathered[::-1])[:CAPACITY]
    assert banks[0]["ids"].tolist() == expected.tolist()
    assert {i // 100 for i in banks[0]["ids"].tolist()} == {0, 1}  # both ranks' data
    features = {
        key: torch.cat([local_batch(r, s)[key] for s in reversed(range(STEPS)) for r in range(2)])[:CAPACITY]
        for key in ("text", "text_mask", "video", "video_mask")
    }
    for key, value in features.items():
        assert torch.equal(banks[0][key], value), key
