import numpy as np
import pytest
import torch

from neighborretr.data.annotations import Record
from neighborretr.data.dataset import VideoTextDataset
from neighborretr.data.validation import find_bad_videos
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import (
    BackendUnavailable,
    VideoDecodeError,
    check_backend,
    choose_frames,
    probe_video,
    read_frames,
    sample_frame_indices,
    segment_frames,
)
from tests.conftest import AVAILABLE_BACKENDS, BACKEND_PARAMS, frame_numbers, write_numbered_video


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


def test_head_keeps_the_first_frames():
    np.testing.assert_array_equal(sample_frame_indices(20, 4, "head"), [0, 1, 2, 3])
    np.testing.assert_array_equal(sample_frame_indices(3, 8, "head", first=2), [2, 3, 4])


def test_framerate_keeps_the_first_frame_of_each_step():
    # 30 fps thinned to 1 fps: the first frame of every second, as the official loaders read them.
    np.testing.assert_array_equal(segment_frames(95, 30.0, framerate=1), [0, 30, 60, 90])
    np.testing.assert_array_equal(segment_frames(100, 25.0, framerate=2), [0, 12, 25, 37, 50, 62, 75, 87])
    np.testing.assert_array_equal(segment_frames(10, 10.0, framerate=25), np.arange(10))  # never upsampled
    # a 2 s .. 4 s segment at 10 fps, thinned to 2 fps
    np.testing.assert_array_equal(segment_frames(100, 10.0, start=2.0, end=4.0, framerate=2), [20, 25, 30, 35])
    # official MSR-VTT: 1 fps, first 12 frames of a 20 s, 30 fps video
    np.testing.assert_array_equal(choose_frames(600, 30.0, 12, "head", framerate=1), np.arange(12) * 30)
    np.testing.assert_array_equal(choose_frames(600, 30.0, 4, "uniform", framerate=1), [60, 210, 360, 510])


def test_unknown_frame_rate_uses_the_whole_video():
    for fps in (0.0, float("nan"), float("inf")):
        np.testing.assert_array_equal(segment_frames(10, fps, start=0.0, end=31.0, framerate=1), np.arange(10))


def test_segment_is_clamped_to_the_video():
    np.testing.assert_array_equal(segment_frames(10, 10.0, start=0.0, end=31.0), np.arange(10))  # DiDeMo [0, 31]
    np.testing.assert_array_equal(segment_frames(10, 10.0, start=0.5, end=0.5), [5])  # never empty


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_read_frames_returns_the_requested_frames(tmp_path, backend):
    path = write_numbered_video(tmp_path / "v.mp4", num_frames=20)
    frames, idx = read_frames(path, 4, "uniform", backend=backend)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert frame_numbers(frames) == idx.tolist() == [2, 7, 12, 17]
    seg, seg_idx = read_frames(path, 2, "uniform", backend=backend, start=1.0, end=2.0)  # 10 fps: frames 10..19
    assert seg_idx.tolist() == [12, 17] and frame_numbers(seg) == [12, 17]


@pytest.mark.parametrize("backend", BACKEND_PARAMS[1:])
def test_backends_agree_with_pyav(tmp_path, backend):
    path = write_numbered_video(tmp_path / "v.mp4", num_frames=13)
    a, ia = read_frames(path, 5, "uniform", backend=backend)
    b, ib = read_frames(path, 5, "uniform", backend="pyav")
    np.testing.assert_array_equal(ia, ib)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # YUV -> RGB may round differently by a level


@pytest.mark.parametrize("backend", BACKEND_PARAMS[1:])
def test_backends_give_pyavs_pixels_on_a_textured_clip(tmp_path, backend):
    """Noisy colour frames with B-frames: the same frames (indices) and the same pixels up to colour rounding."""
    path = write_noisy_video(tmp_path / "v.mp4", "libx264", {"bf": "2", "g": "12"})
    rng = [np.random.default_rng(5), np.random.default_rng(5)]
    a, ia = read_frames(path, 12, "random", rng[0], backend=backend, framerate=10)
    b, ib = read_frames(path, 12, "random", rng[1], backend="pyav", framerate=10)
    np.testing.assert_array_equal(ia, ib)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_unloadable_backends_say_what_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "torchcodec.decoders":
            raise RuntimeError("Could not load libtorchcodec. Likely causes: FFmpeg is not properly installed ...")
        if name == "decord":
            raise ImportError("No module named 'decord'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(BackendUnavailable, match=r"torchcodec cannot load FFmpeg's libraries .*apt-get install ffmpeg"):
        check_backend("torchcodec")
    with pytest.raises(BackendUnavailable, match=r"pip install 'neighborretr\[decord\]'"):
        check_backend("decord")
    check_backend("pyav")  # bundles its own FFmpeg
    with pytest.raises(ValueError, match="unknown video backend 'opencv'"):
        check_backend("opencv")


def write_counted_video(path, num_frames: int, fps: int = 25, gop: int = 12):
    """An H.264 mp4 with B-frames and a keyframe every `gop` frames (so sparse decoding must seek and skip);
    frame i has the grey level 16 + 6·(i % 40) on its left half and 16 + 6·(i // 40) on its
    right half (see `counted`)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0", "preset": "medium", "g": str(gop), "keyint_min": str(gop), "bf": "3"}
        for i in range(num_frames):
            frame = np.empty((32, 32, 3), dtype=np.uint8)
            frame[:, :16], frame[:, 16:] = 16 + 6 * (i % 40), 16 + 6 * (i // 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def counted(frames) -> list[int]:
    level = lambda x: int(round((float(x.mean()) - 16) / 6))  # noqa: E731
    return [level(f[:, 4:12]) + 40 * level(f[:, 20:28]) for f in frames]


@pytest.mark.parametrize(
    "request_",
    [
        dict(mode="uniform"),
        dict(mode="head", framerate=1),
        dict(mode="uniform", start=2.3, end=5.1),
        dict(mode="random", framerate=5),
        dict(mode="uniform", framerate=1, start=0.0, end=31.0),
    ],
)
def test_backends_give_the_same_frames_with_b_frames_and_seeking(tmp_path, request_):
    path = write_counted_video(tmp_path / "v.mp4", num_frames=200)
    out = {}
    for backend in AVAILABLE_BACKENDS:
        rng = np.random.default_rng(7)
        out[backend] = read_frames(path, 12, backend=backend, rng=rng, **request_)
    b, ib = out["pyav"]
    for a, ia in out.values():
        np.testing.assert_array_equal(ia, ib)
        assert counted(a) == counted(b) == ia.tolist()  # the pixels are those of the requested frames
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def write_noisy_video(path, codec: str, options: dict, num_frames: int = 90):
    """64x48 frames with changing colours and noise: large enough packets that an MPEG-TS seek lands past the
    keyframe (flat test clips are too small to show it)."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = options
        for i in range(num_frames):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:, :, 0], img[:, :, 1] = (i * 37) % 256, (i * 11) % 256
            img[: i % 48 + 1, : i % 64 + 1, 2] = 255
            img = (img + rng.integers(0, 20, img.shape)).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize(
    ("suffix", "codec", "options"),
    [
        (".ts", "libx264", {"bf": "3", "x264-params": "keyint=12:min-keyint=12:scenecut=0"}),
        (".avi", "mpeg4", {"bf": "2", "g": "12"}),
    ],
)
def test_pyav_matches_a_full_decode_where_seeking_is_unreliable(tmp_path, suffix, codec, options):
    """MPEG-TS and AVI seek by decoding timestamp and may land past the keyframe; the reader must notice and
    decode everything rather than fail (the TS case raised EOFError before the check) or return other frames."""
    import av

    path = write_noisy_video(tmp_path / f"v{suffix}", codec, options)
    frames, idx = read_frames(path, 12, "uniform", backend="pyav")
    assert idx.tolist() == [3, 11, 18, 26, 33, 41, 48, 56, 63, 71, 78, 86]
    with av.open(str(path)) as video:
        every = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    for frame, i in zip(frames, idx):
        np.testing.assert_array_equal(frame, every[i])  # exactly the frames of a full decode


def test_reasons_survive_paths_with_colons(tmp_path):
    path = tmp_path / "clip: take 2.mp4"
    path.write_bytes(b"")
    assert probe_video(path) == "the file is empty (0 bytes)"


def test_pyav_decodes_sparsely_on_mp4(tmp_path, monkeypatch):
    """The PyAV reader must take its seek-and-skip path on an ordinary mp4, not the decode-everything one."""
    import neighborretr.data.video_io as vio

    path = write_counted_video(tmp_path / "v.mp4", num_frames=120)
    calls = []
    sparse = vio._read_pyav_sparse
    monkeypatch.setattr(vio, "_read_pyav_sparse", lambda *a: calls.append(result := sparse(*a)) or result)
    frames, idx = read_frames(path, 4, backend="pyav")
    assert calls and calls[0] is not None and counted(frames) == idx.tolist()


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
    bad = find_bad_videos(records, VideoIndex(tmp_path), progress=False)
    assert sorted(bad) == ["absent", "broken"]
    assert bad["absent"] == f"no file for video 'absent' under {tmp_path} (looked for absent.*)"
    assert bad["broken"].startswith(f"{tmp_path / 'broken.mp4'}: cannot decode")


def test_clip_frames_matches_torchvision_reference():
    import torchvision.transforms.v2.functional as TF

    from neighborretr.data.transforms import CLIP_MEAN, CLIP_STD, clip_frames

    frames = np.random.default_rng(0).integers(0, 256, (3, 48, 80, 3), dtype=np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    x = TF.center_crop(TF.resize(x, 32, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [32, 32])
    reference = TF.normalize(x.float() / 255, CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(clip_frames(frames, 32), reference, atol=1e-5, rtol=0)


def test_only_torchcodec_decodes_off_the_cpu(tmp_path):
    path = write_numbered_video(tmp_path / "v.mp4", num_frames=4)
    with pytest.raises(ValueError, match="decoding on cuda needs backend torchcodec"):
        read_frames(path, 2, backend="pyav", device="cuda")
