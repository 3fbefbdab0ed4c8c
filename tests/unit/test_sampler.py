import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, Dataset

from neighborretr.data.sampler import EpochShuffleSampler
from neighborretr.engine import set_epoch


class _Indexed(Dataset):
    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, self.epoch])


def test_order_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(20, seed=1), EpochShuffleSampler(20, seed=1)
    assert list(a) == list(b) and sorted(a) == list(range(20))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(20))
    assert list(EpochShuffleSampler(20, seed=2)) != first


def test_set_epoch_reaches_sampler_and_dataset_of_a_sharded_loader():
    dataset = _Indexed(16)
    loader = DataLoader(dataset, batch_size=2, sampler=EpochShuffleSampler(16, seed=0), drop_last=True)
    shards = [prepare_data_loader(loader, num_processes=2, process_index=r, put_on_device=False) for r in (0, 1)]
    set_epoch(shards[0], 3)
    assert dataset.epoch == 3  # Accelerate's own set_epoch does not reach the dataset once sharded
    set_epoch(shards[1], 3)
    seen = [torch.cat([b[:, 0] for b in shard]) for shard in shards]
    assert sorted(torch.cat(seen).tolist()) == list(range(16))  # the two ranks split one permutation
    order = EpochShuffleSampler(16, seed=0)
    order.set_epoch(3)
    batches = [list(order)[i : i + 2] for i in range(0, 16, 2)]
    for rank in (0, 1):  # batches alternate between the ranks in the epoch-3 permutation's order
        assert seen[rank].tolist() == [i for b in batches[rank::2] for i in b]
    assert all((b[:, 1] == 3).all() for shard in shards for b in shard)
