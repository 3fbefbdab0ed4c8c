"""The data-loader benchmark's pieces: its clips, and every loader (naive OpenCV, ours per backend, the frame cache)
reading the same frames through the same transforms."""

import sys

import pytest
import torch

from neighborretr.data.annotations import Record
from tests.conftest import AVAILABLE_BACKENDS, ROOT, write_numbered_video

sys.path.insert(0, str(ROOT / "scripts"))
bench = pytest.importorskip("bench_dataloader")


def test_generated_clip_has_the_advertised_format(tmp_path):
    import av

    bench.make_clip(tmp_path / "c.mp4", seed=0, keyint=15, seconds=1)
    with av.open(str(tmp_path / "c.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 320, 240)
        assert float(stream.average_rate) == 30
    assert bench.keyframe_stats(tmp_path / "c.mp4") == (30, 2)  # keyframes at 0 and 15


def test_every_loader_reads_the_same_frames(tmp_path):
    framerate = 5.0  # 10 fps thinned to 5: 18 candidates for 12 draws
    write_numbered_video(tmp_path / "v.mp4", num_frames=36, size=32)  # 3.6 s at 10 fps
    records = [Record("v", "a clip"), Record("v", "the same clip")]
    bench.build_cache(records, tmp_path, tmp_path / "cache", framerate, workers=1)
    names = ["naive-opencv", *(f"ours-{b}" for b in AVAILABLE_BACKENDS), "ours-cache"]
    sets = {n: bench.loader_dataset(n, records, tmp_path, framerate, tmp_path / "cache") for n in names}
    for epoch in (0, 1):
        for i in range(2):
            items = {}
            for name, dataset in sets.items():
                dataset.set_epoch(epoch)
                items[name] = dataset[i]["video"]
            naive = items.pop("naive-opencv")
            assert naive.shape == (12, 3, 224, 224)
            for name, video in items.items():  # same frames; codecs may differ by a level
                torch.testing.assert_close(video[: len(naive)], naive, atol=0.05, rtol=0, msg=name)
            assert torch.equal(items["ours-cache"], items["ours-pyav"])  # the cache is exact
    assert not torch.equal(sets["naive-opencv"][0]["video"], sets["naive-opencv"][1]["video"])  # own draws


def test_epochs_and_table(tmp_path):
    write_numbered_video(tmp_path / "v.mp4", num_frames=12, size=32)
    dataset = bench.loader_dataset("ours-pyav", [Record("v", "x")] * 6, tmp_path, None)
    rate, walls = bench.run_epochs(dataset, workers=0, batch_size=2, epochs=2)
    assert rate > 0 and len(walls) == 2 and all(w > 0 for w in walls)
    assert rate * sum(walls) > 2 * 4 * 0.5  # 4 of 6 clips timed per epoch, in less than the wall time
    row = {
        "videos": "raw",
        "loader": "ours-cache",
        "workers": 1,
        "clips_per_s": 200.0,
        "ratio_to_naive": 25.0,
        "one_off_s": 3.04,
        "total_s": 20.0,
        "total_speedup": 2.5,
    }
    table = bench.markdown([row], "test machine", "python scripts/bench_dataloader.py", 5)
    assert "| raw | ours-cache | 1 | 200.0 | 25.00x | 3.0 | 20.0 | 2.50x |" in table
    assert "over 5 epochs" in table and "test machine" in table


def test_decode_times_cover_every_backend(tmp_path):
    clip = write_numbered_video(tmp_path / "v.mp4", num_frames=20, size=32)
    times = bench.decode_times([clip], AVAILABLE_BACKENDS, framerate=None, rounds=1)
    assert list(times) == AVAILABLE_BACKENDS and all(t > 0 for t in times.values())


def test_unavailable_backends_are_left_out_with_the_reason(monkeypatch):
    from neighborretr.data.video_io import BackendUnavailable

    def check(backend):
        if backend == "decord":
            raise BackendUnavailable("the decord backend is not installed")

    monkeypatch.setattr(bench, "check_backend", check)
    keep, notes = bench.available(["naive-opencv", "ours-pyav", "ours-decord", "ours-cache"])
    assert keep == ["naive-opencv", "ours-pyav", "ours-cache"]
    assert notes == ["ours-decord left out: the decord backend is not installed"]
