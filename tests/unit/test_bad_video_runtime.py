"""A training video that fails to decode at run time (data.check_videos=false, or a file that rots mid-run):
substituted, flagged and logged with data.skip_bad_videos=true, a VideoDecodeError naming the file otherwise;
evaluation datasets never substitute."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from neighborretr.data import dataset as dataset_module
from neighborretr.data.dataset import VideoTextDataset
from neighborretr.data.module import VideoTextData
from neighborretr.data.video_io import VideoDecodeError
from tests.conftest import generate_tiny_synthetic

# 6 training videos of 2 captions each: records 2k and 2k + 1 are video k of the training list.
NUM_TRAIN = 6
BAD = 1  # the training video overwritten with garbage: records 2 and 3
BAD_ITEMS = (2, 3)


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    return generate_tiny_synthetic(tmp_path_factory.mktemp("bad_runtime") / "clean", num_train=NUM_TRAIN)


def corrupt_copy(clean: Path, target: Path, videos: tuple[int, ...]) -> tuple[Path, list[Path]]:
    """A copy of the generated folder whose training videos number `videos` (positions in the training list)
    are garbage bytes; returns (root, the corrupted files)."""
    shutil.copytree(clean, target)
    data = make_data(target)
    train_ids = list(dict.fromkeys(r.video_id for r in data.records("train")))
    paths = []
    for k in videos:
        path = target / "videos" / f"{train_ids[k]}.mp4"
        path.write_bytes(b"\x00garbage, not a video\xff" * 64)
        paths.append(path)
    return target, paths


def make_data(root: Path, skip: bool = False, batch_size: int = 4) -> VideoTextData:
    return VideoTextData(
        "msrvtt",
        str(root),
        str(root / "videos"),
        max_words=16,
        max_frames=4,
        image_size=32,
        batch_size=batch_size,
        eval_batch_size=4,
        num_workers=0,
        check_videos=False,
        skip_bad_videos=skip,
        seed=0,
    )


@pytest.fixture
def bad_root(clean_root, tmp_path) -> tuple[Path, Path]:
    root, (path,) = corrupt_copy(clean_root, tmp_path / "data", (BAD,))
    return root, path


def train_dataset(root: Path, skip: bool) -> VideoTextDataset:
    data = make_data(root, skip)
    return data.train_loader(data.records("train"), num_processes=1).dataset


def test_records_are_grouped_by_video_as_the_tests_assume(bad_root):
    root, path = bad_root
    records = make_data(root).records("train")
    assert len(records) == 2 * NUM_TRAIN
    assert [r.video_id for r in records[2:4]] == [path.stem, path.stem]
    assert all(r.video_id != path.stem for i, r in enumerate(records) if i not in BAD_ITEMS)


def test_skip_on_substitutes_the_next_good_pair_and_flags_it(bad_root, caplog):
    root, path = bad_root
    ds = train_dataset(root, skip=True)
    assert ds.skip_bad
    ds.set_epoch(3)
    with caplog.at_level(logging.WARNING, logger="neighborretr"):
        items = [ds[i] for i in range(len(ds))]
    for i, item in enumerate(items):
        if i in BAD_ITEMS:
            continue
        assert int(item["skipped"]) == 0, i
        assert int(item["caption_index"]) == i
        assert int(item["video_index"]) == ds.video_index(ds.records[i].video_id)
    # Both captions of the bad video are replaced by item 4 (the next item whose video is another one), loaded
    # exactly as item 4 loads on its own: the same caption, the same frame draw, its own indices.
    for i in BAD_ITEMS:
        item, own = items[i], items[4]
        assert int(item["skipped"]) == 1
        assert int(item["caption_index"]) == 4 and int(item["video_index"]) == ds.video_index(ds.records[4].video_id)
        assert int(item["video_index"]) != ds.video_index(path.stem)
        for key in ("text_ids", "text_mask", "video", "video_mask"):
            assert torch.equal(item[key], own[key]), (i, key)
        assert own["video_mask"].sum() == 4 and own["video"].abs().sum() > 0  # a real decoded clip
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(str(path) in w and "cannot decode" in w and "replaced by item 4" in w for w in warnings)


def test_the_substitute_wraps_around_to_the_first_item(bad_root):
    root, path = bad_root
    data = make_data(root, skip=True)
    records = data.records("train")
    rotated = records[4:] + records[:4]  # the bad video's captions are now the last two items
    ds = data.dataset(rotated, train=True, skip_bad=True)
    assert [r.video_id for r in rotated[-2:]] == [path.stem, path.stem]
    last = ds[len(ds) - 1]
    assert int(last["skipped"]) == 1 and int(last["caption_index"]) == 0
    assert torch.equal(last["video"], ds[0]["video"])


def test_skip_off_raises_naming_the_file_and_adds_no_key(bad_root):
    root, path = bad_root
    ds = train_dataset(root, skip=False)
    assert "skipped" not in ds[0]
    with pytest.raises(VideoDecodeError) as err:
        ds[BAD_ITEMS[0]]
    assert err.value.path == path
    assert str(err.value).startswith(f"{path}: cannot decode with pyav")


def test_evaluation_datasets_never_substitute(bad_root):
    root, path = bad_root
    data = make_data(root, skip=True)
    records = data.records("train")
    with pytest.raises(VideoDecodeError, match=str(path)):
        data.dataset(records, train=False)[BAD_ITEMS[0]]
    _, videos = data.eval_loaders(records)
    with pytest.raises(VideoDecodeError, match=str(path)):
        list(videos)
    with pytest.raises(ValueError, match="only for a training dataset"):
        VideoTextDataset(records, root / "videos", 16, 4, 32, train=False, skip_bad=True)


def test_no_substitute_within_the_bound_raises(clean_root, tmp_path, monkeypatch):
    root, paths = corrupt_copy(clean_root, tmp_path / "data", (1, 2))  # items 2..5
    ds = train_dataset(root, skip=True)
    assert int(ds[2]["caption_index"]) == 6 and int(ds[2]["skipped"]) == 1  # video 2 fails too: video 3's item
    monkeypatch.setattr(dataset_module, "MAX_SUBSTITUTE_DECODES", 1)
    with pytest.raises(VideoDecodeError, match="too many bad videos") as err:
        ds[2]
    assert str(paths[0]) in str(err.value)
    only_bad = make_data(root).records("train")[2:6]
    with pytest.raises(VideoDecodeError, match="too many bad videos"):
        VideoTextDataset(only_bad, root / "videos", 16, 4, 32, train=True, skip_bad=True)[0]


def test_worker_error_reaches_the_main_process_naming_the_file(bad_root):
    """torch rebuilds the worker's exception as VideoDecodeError(message); the message's last line is the
    original exception line, which names the file."""
    root, path = bad_root
    ds = train_dataset(root, skip=False)
    loader = DataLoader(torch.utils.data.Subset(ds, [0, BAD_ITEMS[0]]), batch_size=2, num_workers=1)
    with pytest.raises(VideoDecodeError) as err:
        next(iter(loader))
    lines = str(err.value).rstrip().splitlines()
    assert lines[0] == "Caught VideoDecodeError in DataLoader worker process 0."
    assert lines[-1].startswith(f"neighborretr.data.video_io.VideoDecodeError: {path}: cannot decode with pyav (")


def test_worker_batches_count_every_substitute_once_per_epoch(bad_root):
    root, _ = bad_root
    data = make_data(root, skip=True)
    data.num_workers = 1
    loader = data.train_loader(data.records("train"), num_processes=1)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 3 and all(b["skipped"].shape == (4,) for b in batches)
        assert sum(int(b["skipped"].sum()) for b in batches) == 2
        flagged = torch.cat([b["caption_index"][b["skipped"] == 1] for b in batches])
        assert flagged.tolist() == [4, 4]
    refill = data.refill_loader(loader.dataset, batches=3, num_processes=1)
    assert sum(int(b["skipped"].sum()) for b in refill) == 2  # the same dataset, so the same key


def test_loader_workers_ignore_ctrl_c_but_end_on_sigterm():
    """SIGINT (a Ctrl-C to the process group) must not kill a worker; SIGTERM must, or multiprocessing's exit
    handler, which terminates leftover workers with it, would wait for them forever."""
    import os
    import signal
    import time

    from torch.utils.data import DataLoader

    from neighborretr.data.module import ignore_stop_signals

    loader = DataLoader(list(range(64)), batch_size=2, num_workers=1, worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    next(batches)
    (worker,) = batches._workers
    os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)  # the signal is delivered asynchronously
    assert worker.is_alive() and [int(x) for x in next(batches)] == [2, 3]
    worker.terminate()
    worker.join(timeout=10)
    assert not worker.is_alive()
    del batches
