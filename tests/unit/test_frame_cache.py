"""The decode-once frame cache: the cached path gives the decoded path's tensors, bit for bit."""

import json

import numpy as np
import pytest
import torch

import neighborretr.data.dataset as dataset_module
from neighborretr.data.annotations import Record
from neighborretr.data.dataset import VideoTextDataset
from neighborretr.data.frame_cache import (
    ENTRIES,
    FAILURES,
    CacheRequest,
    CacheSpec,
    FrameCache,
    build_frame_cache,
    cache_key,
    estimate_bytes,
    stored_positions,
)
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import segment_frames
from tests.unit.test_video_io import write_noisy_video

SIZE, FRAMES = 24, 5


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three 64x48 noisy H.264 clips at 25 fps (B-frames, keyframe every 12): 90, 40 and 7 frames."""
    folder = tmp_path_factory.mktemp("videos")
    for name, n in (("a", 90), ("b", 40), ("c", 7)):
        write_noisy_video(folder / f"{name}.mp4", "libx264", {"bf": "2", "g": "12"}, num_frames=n)
    return folder


RECORDS = [Record("a", "one"), Record("b", "two"), Record("c", "three"), Record("a", "four", start=1.0, end=2.5)]


def requests(folder, records=RECORDS):
    index = VideoIndex(folder)
    keys = {cache_key(r.video_id, r.start, r.end): r for r in records}
    return [CacheRequest(k, str(index.find(r)), r.start, r.end) for k, r in keys.items()]


def make_dataset(folder, cache, sampling, train=False, framerate=None, augment=None):
    return VideoTextDataset(
        RECORDS,
        folder,
        max_words=8,
        max_frames=FRAMES,
        image_size=SIZE,
        train=train,
        backend="pyav",
        seed=3,
        sampling=sampling,
        framerate=framerate,
        frame_cache=cache,
        augment=augment,
    )


def count_decodes(monkeypatch) -> list:
    calls = []
    real = dataset_module.read_frames
    monkeypatch.setattr(dataset_module, "read_frames", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def assert_same_items(decoded, cached, epochs=(0,)):
    for epoch in epochs:
        decoded.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(decoded)):
            a, b = decoded[i], cached[i]
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["video_mask"], b["video_mask"])


@pytest.mark.parametrize(("sampling", "framerate"), [("uniform", None), ("head", 5.0), ("uniform", 3.0)])
def test_cached_frames_equal_decoded_frames_deterministic(videos, tmp_path, monkeypatch, sampling, framerate):
    spec = CacheSpec("pyav", framerate, FRAMES, SIZE, (sampling,))
    summary = build_frame_cache(requests(videos), tmp_path, spec, workers=1, progress=False)
    assert len(summary.cached) == 4 and not summary.failed
    cache = FrameCache.open(tmp_path, spec)
    # deterministic sampling keeps only the frames it picks: min(FRAMES, candidates) per entry
    a = cache.entries["a"]
    assert a.shape == (FRAMES, 3, SIZE, SIZE) and a.count == len(segment_frames(90, 25.0, framerate=framerate))
    calls = count_decodes(monkeypatch)
    cached = make_dataset(videos, cache, sampling, framerate=framerate)
    decoded = make_dataset(videos, None, sampling, framerate=framerate)
    for i in range(len(cached)):
        assert torch.equal(cached[i]["video"], decoded[i]["video"])
    assert len(calls) == len(decoded)  # only the decoded dataset decoded anything


def test_random_draw_uses_the_same_candidates(videos, tmp_path, monkeypatch):
    spec = CacheSpec("pyav", 10.0, FRAMES, SIZE, ("random", "uniform"))
    build_frame_cache(requests(videos), tmp_path, spec, workers=1, progress=False)
    cache = FrameCache.open(tmp_path, spec)
    # every candidate at 10 fps is kept: 90 frames at 25 fps -> 36 candidates, the 1.0-2.5 s segment -> 15
    assert (cache.entries["a"].count, cache.entries["a"].shape[0]) == (36, 36)
    assert cache.entries[cache_key("a", 1.0, 2.5)].count == len(segment_frames(90, 25.0, 1.0, 2.5, 10.0)) == 15
    calls = count_decodes(monkeypatch)
    cached = make_dataset(videos, cache, "random", train=True, framerate=10.0)
    decoded = make_dataset(videos, None, "random", train=True, framerate=10.0)
    assert_same_items(decoded, cached, epochs=(0, 1, 2))  # new draws every epoch, same on both paths
    assert len(calls) == 3 * len(decoded)


def test_entries_over_the_cap_fall_back_to_decoding_with_the_same_draw(videos, tmp_path, monkeypatch):
    spec = CacheSpec("pyav", None, FRAMES, SIZE, ("random", "uniform"))
    summary = build_frame_cache(requests(videos), tmp_path, spec, workers=1, max_candidates=50, progress=False)
    assert summary.over_cap == ["a"]  # 90 candidates > 50; b has 40, the segment of a 37
    cache = FrameCache.open(tmp_path, spec)
    assert cache.entries["a"].shape[0] == FRAMES  # only the uniform frames
    calls = count_decodes(monkeypatch)
    cached = make_dataset(videos, cache, "random", train=True)
    decoded = make_dataset(videos, None, "random", train=True)
    assert_same_items(decoded, cached, epochs=(0, 1))
    assert len(calls) == 2 * len(decoded) + 2  # the cached dataset decoded the whole of a, once per epoch


def test_augmented_clips_are_cached_as_decoded(videos, tmp_path):
    """With augmentation before the resize, the cache keeps frames at the video's size and the result is exact."""

    def augment(frames, seed):  # a seeded, size-dependent change, like RandAugment's geometric ops
        return np.roll(frames, seed % 7, axis=2)

    spec = CacheSpec("pyav", None, FRAMES, SIZE, ("random",), form="source")
    build_frame_cache(requests(videos), tmp_path, spec, workers=1, progress=False)
    cache = FrameCache.open(tmp_path, spec)
    assert cache.entries["b"].shape == (40, 3, 48, 64)  # stored channels first
    cached = make_dataset(videos, cache, "random", train=True, augment=augment)
    decoded = make_dataset(videos, None, "random", train=True, augment=augment)
    assert_same_items(decoded, cached, epochs=(0, 1))


def test_stored_positions():
    det = CacheSpec("pyav", 1.0, 4, 8, ("head", "uniform"))
    np.testing.assert_array_equal(stored_positions(20, det), [0, 1, 2, 3, 7, 12, 17])  # head + uniform centres
    rnd = CacheSpec("pyav", 1.0, 4, 8, ("random", "uniform"))
    np.testing.assert_array_equal(stored_positions(20, rnd, max_candidates=20), np.arange(20))
    np.testing.assert_array_equal(stored_positions(21, rnd, max_candidates=20), [2, 7, 13, 18])


def test_resume_skips_done_entries_and_lists_failures(videos, tmp_path):
    spec = CacheSpec("pyav", None, FRAMES, SIZE, ("uniform",))
    reqs = requests(videos) + [CacheRequest("gone", None, reason="no file for video 'gone'")]
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 50)
    reqs.append(CacheRequest("bad", str(tmp_path / "bad.mp4")))
    first = build_frame_cache(reqs[:2], tmp_path / "c", spec, workers=1, progress=False)
    assert first.cached == ["a", "b"]
    # a build cut short in the middle of the next write: half a line in the journal, stray bytes in the shard
    with open(tmp_path / "c" / ENTRIES, "a") as f:
        f.write('{"key": "b", "shard"')
    with open(tmp_path / "c" / "shard-0000.u8", "ab") as f:
        f.write(b"\x01" * 1000)
    second = build_frame_cache(reqs, tmp_path / "c", spec, workers=1, progress=False)
    assert second.skipped == sorted(first.cached) and sorted(second.cached) == [cache_key("a", 1.0, 2.5), "c"]
    assert list(second.failed) == ["bad", "gone"] and second.failed["gone"] == "no file for video 'gone'"
    assert "cannot decode" in second.failed["bad"]
    assert (tmp_path / "c" / FAILURES).read_text().splitlines()[1] == "gone\tno file for video 'gone'"
    assert second.bytes == 4 * FRAMES * SIZE * SIZE * 3  # the stray bytes are gone
    # the resumed cache equals one built in one go
    whole = build_frame_cache(reqs, tmp_path / "w", spec, workers=1, progress=False)
    one, two = FrameCache(tmp_path / "c"), FrameCache(tmp_path / "w")
    for key in two.entries:
        np.testing.assert_array_equal(one.frames(key, FRAMES, "uniform"), two.frames(key, FRAMES, "uniform"))
    assert json.loads((tmp_path / "w" / "index.json").read_text())["counts"] == {
        "entries": 4,
        "failed": 2,
        "over_cap": 0,
    }
    assert whole.bytes == second.bytes


def test_parallel_build_writes_the_same_frames(videos, tmp_path):
    """Also after this process ran an OpenMP region on 2 threads: forked workers then hung in their first parallel
    op (224 px frames make the resize and copies large enough to run in parallel)."""
    spec = CacheSpec("pyav", 5.0, FRAMES, 224, ("random",))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.ones(3, 8_000_000).contiguous(memory_format=torch.contiguous_format).t().contiguous().sum()
        build_frame_cache(requests(videos), tmp_path / "one", spec, workers=1, progress=False)
        build_frame_cache(requests(videos), tmp_path / "two", spec, workers=2, shard_bytes=20_000, progress=False)
    finally:
        torch.set_num_threads(threads)
    one, two = FrameCache(tmp_path / "one"), FrameCache(tmp_path / "two")
    assert len(list((tmp_path / "two").glob("shard-*.u8"))) > 1  # small shards: the entries are spread out
    for key in one.entries:
        a = one.frames(key, FRAMES, "random", np.random.default_rng(1))
        np.testing.assert_array_equal(a, two.frames(key, FRAMES, "random", np.random.default_rng(1)))


def test_a_cache_for_other_settings_is_refused(videos, tmp_path):
    spec = CacheSpec("pyav", 1.0, FRAMES, SIZE, ("head",))
    build_frame_cache(requests(videos)[:1], tmp_path, spec, workers=1, progress=False)
    other = CacheSpec("pyav", 1.0, FRAMES, 32, ("head", "random"))
    with pytest.raises(ValueError, match=r"image_size: 24 != 32; sampling: built for \['head'\], the run also uses"):
        FrameCache.open(tmp_path, other)
    with pytest.raises(ValueError, match="holds a frame cache for other settings"):
        build_frame_cache(requests(videos)[:1], tmp_path, other, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="no frame cache there"):
        FrameCache(tmp_path / "nothing")
    # read directly: frames it does not hold are None, and a random request leaves the rng as it was
    head = CacheSpec("pyav", None, FRAMES, SIZE, ("head",))
    build_frame_cache(requests(videos)[1:2], tmp_path / "head", head, workers=1, progress=False)
    cache = FrameCache(tmp_path / "head")
    assert cache.entries["b"].count == 40 and cache.entries["b"].shape[0] == FRAMES  # positions 0..4 kept
    assert cache.frames("b", 3, "head").shape == (3, SIZE, SIZE, 3)
    assert cache.frames("b", FRAMES, "uniform") is None  # positions 4, 12, 20, ...
    assert cache.frames("zzz", FRAMES, "head") is None
    rng = np.random.default_rng(0)
    assert cache.frames("b", FRAMES, "random", rng) is None
    assert rng.integers(1000) == np.random.default_rng(0).integers(1000)


def test_size_estimate(videos):
    clip = CacheSpec("pyav", None, FRAMES, SIZE, ("uniform",))
    assert estimate_bytes(requests(videos), clip) == (4 * FRAMES * SIZE * SIZE * 3, 4)
    source = CacheSpec("pyav", None, FRAMES, SIZE, ("random",), form="source")
    # every candidate at 64x48: 90 + 40 + 7 + the frames of the 1.0-2.5 s segment, over 4 entries
    kept = 90 + 40 + 7 + len(segment_frames(90, 25.0, 1.0, 2.5))
    assert estimate_bytes(requests(videos), source) == (kept * 48 * 64 * 3, 4)


def test_jpeg_cache_is_smaller_and_close(videos, tmp_path):
    """The compressed form: the same draws, pixels a few levels off (a re-encode), a fraction of the size."""
    spec = CacheSpec("pyav", None, FRAMES, SIZE, ("uniform", "random"))
    raw = build_frame_cache(requests(videos), tmp_path / "raw", spec, workers=1, progress=False)
    jpeg = build_frame_cache(requests(videos), tmp_path / "jpeg", spec, workers=1, progress=False, compress="jpeg")
    estimate, _ = estimate_bytes(requests(videos), spec, compress="jpeg")
    assert jpeg.bytes < raw.bytes / 2 and 0.5 < estimate / jpeg.bytes < 2
    exact, lossy = FrameCache(tmp_path / "raw"), FrameCache(tmp_path / "jpeg")
    assert lossy.compress == "jpeg"
    for key in exact.entries:
        a = exact.frames(key, FRAMES, "random", np.random.default_rng(0))
        b = lossy.frames(key, FRAMES, "random", np.random.default_rng(0))
        diff = np.abs(a.astype(int) - b.astype(int))
        assert a.shape == b.shape and diff.mean() < 4, diff.mean()
    with pytest.raises(ValueError, match="compress: 'jpeg' != 'none'"):
        build_frame_cache(requests(videos), tmp_path / "jpeg", spec, workers=1, progress=False)
