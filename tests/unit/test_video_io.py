import numpy as np
import pytest
import torch

from neighborretr.data.annotations import Record
from neighborretr.data.dataset import VideoTextDataset, find_bad_videos
from neighborretr.data.video_io import VideoDecodeError, probe_video, read_frames, sample_frame_indices
from tests.conftest import frame_numbers, write_numbered_video


def test_uniform_indices_are_segment_centres():
    np.testing.assert_array_equal(sample_frame_indices(20, 4, "uniform"), [2, 7, 12, 17])
    np.testing.assert_array_equal(sample_frame_indices(3, 8, "uniform"), [0, 1, 2])  # short video: every frame
    np.testing.assert_array_equal(sample_frame_indices(10, 2, "uniform", first=5), [7, 12])


def test_random_indices_stay_inside_their_segments():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        idx = sample_frame_indices(20, 4, "random", rng)
        for k, i in enumerate(idx):
            assert 5 * k <= i < 5 * (k + 1)
        seen.update(idx.tolist())
    assert len(seen) == 20  # every frame is reachable


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_read_frames_returns_the_requested_frames(tmp_path, backend):
    path = write_numbered_video(tmp_path / "v.mp4", num_frames=20)
    frames, idx = read_frames(path, 4, "uniform", backend=backend)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert frame_numbers(frames) == idx.tolist() == [2, 7, 12, 17]
    seg, seg_idx = read_frames(path, 2, "uniform", backend=backend, start=1.0, end=2.0)  # 10 fps: frames 10..19
    assert seg_idx.tolist() == [12, 17] and frame_numbers(seg) == [12, 17]


def test_decord_and_pyav_agree(tmp_path):
    path = write_numbered_video(tmp_path / "v.mp4", num_frames=13)
    a, ia = read_frames(path, 5, "uniform", backend="decord")
    b, ib = read_frames(path, 5, "uniform", backend="pyav")
    np.testing.assert_array_equal(ia, ib)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_missing_empty_and_corrupt_videos_are_named(tmp_path):
    with pytest.raises(VideoDecodeError, match="missing.mp4: file not found"):
        read_frames(tmp_path / "missing.mp4", 4)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty.mp4: the file is empty"):
        read_frames(tmp_path / "empty.mp4", 4)
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoDecodeError, match="junk.mp4: cannot decode"):
        read_frames(tmp_path / "junk.mp4", 4)
    assert probe_video(tmp_path / "junk.mp4") is not None


def _dataset(tmp_path, records, **kw):
    return VideoTextDataset(records, tmp_path, max_words=8, max_frames=6, image_size=32, **kw)


def test_dataset_item_masks_and_normalisation(tmp_path):
    write_numbered_video(tmp_path / "short.mp4", num_frames=4)
    write_numbered_video(tmp_path / "long.mp4", num_frames=30)
    records = [Record("short", "a tiny clip"), Record("long", "a much longer clip with many many words in it")]
    ds = _dataset(tmp_path, records)
    short, long = ds[0], ds[1]
    assert short["video"].shape == (6, 3, 32, 32)
    assert short["video_mask"].tolist() == [1, 1, 1, 1, 0, 0]
    assert short["video"][4:].abs().sum() == 0  # padded frames are zeros
    assert long["video_mask"].tolist() == [1] * 6
    # frame 0 is grey 16/255 in every channel, normalised with CLIP's statistics
    expected = (16 / 255 - 0.48145466) / 0.26862954
    assert short["video"][0, 0].mean().item() == pytest.approx(expected, abs=0.02)
    assert ds.video_ids == ["long", "short"] and short["video_index"].item() == 1  # stable sorted-id map
    assert long["text_mask"].tolist() == [1] * 8  # truncated to max_words


def test_training_sampling_is_random_per_epoch_but_reproducible(tmp_path):
    write_numbered_video(tmp_path / "v.mp4", num_frames=40)
    ds = _dataset(tmp_path, [Record("v", "a clip")], train=True, seed=3)
    first = ds[0]["video"]
    torch.testing.assert_close(ds[0]["video"], first)  # same (seed, epoch, index) -> same frames
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["video"], first)


def test_find_bad_videos_lists_missing_and_corrupt(tmp_path):
    write_numbered_video(tmp_path / "good.mp4", num_frames=5)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    records = [Record("good", "x"), Record("broken", "y"), Record("absent", "z"), Record("absent", "w")]
    bad = find_bad_videos(records, tmp_path, progress=False)
    assert sorted(bad) == [str(tmp_path / "absent.mp4"), str(tmp_path / "broken.mp4")]
    assert bad[str(tmp_path / "absent.mp4")] == "file not found"
