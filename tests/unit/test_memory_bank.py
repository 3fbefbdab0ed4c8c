"""MemoryBank: newest-first FIFO on a ring, with its contents in buffers."""

import pytest
import torch

from neighborretr.memory_bank import MemoryBank

L, T, D = 3, 2, 4


def batch(ids: list[int]) -> dict[str, torch.Tensor]:
    """Items whose features and masks encode their id, so any row can be traced back."""
    idx = torch.tensor(ids, dtype=torch.long)
    return {
        "text": idx.float().view(-1, 1, 1).expand(-1, L, D).clone(),
        "text_mask": (idx.view(-1, 1) + torch.arange(L)) % 2,
        "video": -idx.float().view(-1, 1, 1).expand(-1, T, D).clone(),
        "video_mask": (idx.view(-1, 1) + torch.arange(T) + 1) % 2,
        "ids": idx,
    }


def assert_holds(bank: MemoryBank, ids: list[int]) -> None:
    got = bank.get()
    assert len(bank) == len(ids)
    assert got["ids"].tolist() == ids
    expected = batch(ids) if ids else {k: v[:0] for k, v in batch([0]).items()}
    for key, value in expected.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key


def test_fifo_newest_first_and_wrap_around():
    bank = MemoryBank(5, (L, D), (T, D))
    assert len(bank) == 0 and bank  # an empty bank still counts as present
    assert_holds(bank, [])
    bank.enqueue(**batch([0, 1]))
    assert_holds(bank, [0, 1])
    bank.enqueue(**batch([2, 3]))
    assert_holds(bank, [2, 3, 0, 1])
    bank.enqueue(**batch([4, 5]))  # full: cat([4, 5], [2, 3, 0, 1])[:5]
    assert_holds(bank, [4, 5, 2, 3, 0])
    bank.enqueue(**batch([6, 7, 8]))  # the write pointer wraps around the ring
    assert_holds(bank, [6, 7, 8, 4, 5])
    bank.enqueue(**batch([9]))
    assert_holds(bank, [9, 6, 7, 8, 4])


def test_batch_larger_than_capacity_keeps_its_first_rows():
    bank = MemoryBank(4, (L, D), (T, D))
    bank.enqueue(**batch([0, 1, 2]))
    bank.enqueue(**batch([10, 11, 12, 13, 14, 15, 16]))
    assert_holds(bank, [10, 11, 12, 13])
    bank.enqueue(**batch([20]))
    assert_holds(bank, [20, 10, 11, 12])


def test_ring_is_written_in_place():
    bank = MemoryBank(3, (L, D), (T, D))
    pointers = {name: buf.data_ptr() for name, buf in bank.named_buffers()}
    for start in range(0, 12, 2):
        bank.enqueue(**batch([start, start + 1]))
    assert pointers == {name: buf.data_ptr() for name, buf in bank.named_buffers()}
    assert_holds(bank, [10, 11, 8])


def test_state_dict_round_trip():
    bank = MemoryBank(5, (L, D), (T, D))
    for ids in ([0, 1, 2], [3, 4], [5, 6]):
        bank.enqueue(**batch(ids))
    fresh = MemoryBank(5, (L, D), (T, D))
    fresh.load_state_dict(bank.state_dict())
    got, expected = fresh.get(), bank.get()
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key
    fresh.enqueue(**batch([7]))  # the ring position came along too
    bank.enqueue(**batch([7]))
    assert fresh.get()["ids"].tolist() == bank.get()["ids"].tolist() == [7, 5, 6, 3, 4]


def test_to_dtype_keeps_contents():
    bank = MemoryBank(4, (L, D), (T, D))
    bank.enqueue(**batch([0, 1, 2]))
    bank.enqueue(**batch([3, 4]))
    before = bank.get()
    bank = bank.to(torch.float64)
    assert bank.text.dtype == torch.float64 and bank.ids.dtype == torch.long and bank.text_mask.dtype == torch.long
    after = bank.get()
    for key in before:
        assert torch.equal(after[key], before[key].to(after[key].dtype)), key
    bank.enqueue(**batch([5]))  # float32 input is cast into the float64 buffers
    assert_holds(bank, [5, 3, 4, 0])
    bank = bank.to("cpu")
    assert_holds(bank, [5, 3, 4, 0])


def test_reset():
    bank = MemoryBank(3, (L, D), (T, D))
    bank.enqueue(**batch([1, 2, 3, 4]))
    bank.reset()
    assert len(bank) == 0 and int(bank.ptr) == 0
    assert_holds(bank, [])
    bank.enqueue(**batch([5]))
    assert_holds(bank, [5])


def test_get_returns_copies_and_no_grad():
    bank = MemoryBank(3, (L, D), (T, D))
    items = batch([1, 2])
    items["text"].requires_grad_()
    bank.enqueue(**items)
    got = bank.get()
    assert not got["text"].requires_grad
    bank.enqueue(**batch([3, 4, 5]))
    assert got["ids"].tolist() == [1, 2]


def test_validation():
    with pytest.raises(ValueError, match="capacity"):
        MemoryBank(0, (L, D), (T, D))
    bank = MemoryBank(3, (L, D), (T, D))
    bad = batch([1, 2])
    bad["ids"] = bad["ids"][:1]
    with pytest.raises(ValueError, match="same number of rows"):
        bank.enqueue(**bad)
    bad = batch([1, 2])
    bad["video"] = torch.zeros(2, T + 1, D)
    with pytest.raises(ValueError, match="video"):
        bank.enqueue(**bad)
