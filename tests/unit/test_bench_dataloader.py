"""The data-loader benchmark's pieces: its clips, and the naive OpenCV baseline reading the same frames as ours."""

import sys

import numpy as np
import pytest
import torch

from neighborretr.data.annotations import Record
from tests.conftest import ROOT, write_numbered_video

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


def test_naive_loader_reads_the_same_frames_as_ours(tmp_path):
    write_numbered_video(tmp_path / "v.mp4", num_frames=36, size=32)
    records = [Record("v", "a clip"), Record("v", "the same clip")]
    for name in ("ours-decord", "ours-pyav"):
        naive, ours = (bench.loader_dataset(n, records, tmp_path) for n in ("naive-opencv", name))
        for i in range(2):
            a, b = naive[i]["video"], ours[i]["video"]
            assert a.shape == b.shape == (12, 3, 224, 224)
            torch.testing.assert_close(a, b, atol=0.05, rtol=0)  # same frames; codecs may differ by a level
    assert not torch.equal(naive[0]["video"], naive[1]["video"])  # each index draws its own frames


def test_throughput_and_table(tmp_path):
    write_numbered_video(tmp_path / "v.mp4", num_frames=12, size=32)
    dataset = bench.loader_dataset("ours-pyav", [Record("v", "x")] * 6, tmp_path)
    rate, seconds = bench.clips_per_second(dataset, workers=0, batch_size=2)
    assert rate > 0 and seconds > 0 and np.isclose(rate * seconds, 4)  # 2 of 3 batches timed
    rows = [{"videos": "raw", "loader": "ours-pyav", "workers": 1, "clips_per_s": 20.0, "ratio_to_naive": 2.5}]
    assert "| raw | ours-pyav | 1 | 20.0 | 2.50x |" in bench.markdown(rows, "test machine")
