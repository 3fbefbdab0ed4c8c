"""scripts/prepare_videos.py and neighborretr.data.prepare, on tiny clips generated here with PyAV."""

import gc
import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from neighborretr.data import prepare
from neighborretr.data.prepare import (
    PrepareError,
    is_good_output,
    partial_path,
    prepare_folder,
    prepare_video,
    scaled_size,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_videos.py"
SOURCE_FPS, SOURCE_FRAMES = 25, 50  # 2 s


def _write_clip(path: Path, width: int, height: int, codec="libx264", fmt=None, audio=False, rotation=None) -> None:
    """A 2 s clip whose top-left quadrant is white (to check orientation), optionally with an aac track."""
    with av.open(str(path), "w", format=fmt) as container:
        video = container.add_stream(codec, rate=SOURCE_FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            video.options = {"preset": "ultrafast"}
        if rotation is not None:
            video.set_display_rotation(rotation)
        sound = _add_audio(container) if audio else None  # every stream must exist before the first packet
        picture = np.zeros((height, width, 3), np.uint8)
        picture[: height // 2, : width // 2] = 255
        for t in range(SOURCE_FRAMES):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = t
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            _write_silence(container, sound)


def _add_audio(container, rate=8000):
    return container.add_stream("aac", rate=rate, layout="mono")


def _write_silence(container, stream, rate=8000, seconds=2) -> None:
    for start in range(0, rate * seconds, 1024):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


# name -> (writer kwargs, displayed width / height of the source)
CLIPS = {
    "land.mp4": (dict(width=64, height=48), 64 / 48),
    "sub/port.mp4": (dict(width=48, height=64), 48 / 64),
    "sub/deeper/talk.MOV": (dict(width=64, height=48, fmt="mov", audio=True), 64 / 48),
    "old.avi": (dict(width=64, height=48, codec="mpeg4"), 64 / 48),
    "phone.mp4": (dict(width=64, height=48, rotation=90), 48 / 64),  # stored landscape, displayed portrait
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    for name, (kwargs, _) in CLIPS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _write_clip(root / name, **kwargs)
    return root


@pytest.fixture
def src(sources, tmp_path) -> Path:
    """A fresh copy of the clips, plus a text file that is not a video."""
    copy = tmp_path / "src"
    shutil.copytree(sources, copy)
    (copy / "notes.txt").write_text("not a video")
    return copy


def test_sources_are_what_the_tests_assume(sources):
    with av.open(str(sources / "sub/deeper/talk.MOV")) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
    with av.open(str(sources / "old.avi")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    with av.open(str(sources / "phone.mp4")) as container:
        assert next(container.decode(video=0)).rotation == 90


def _probe(path: Path) -> dict:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = list(container.decode(video))
        return {
            "types": [s.type for s in container.streams],
            "codec": video.codec_context.name,
            "pix_fmt": frames[0].format.name,
            "size": (video.width, video.height),
            "rate": video.average_rate,
            "times": [f.time for f in frames],
            "first": frames[0].to_ndarray(format="gray"),
        }


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*.mp4")}


@pytest.mark.parametrize(
    ("width", "height", "short", "expected"),
    [(1920, 1080, 224, (398, 224)), (1080, 1920, 224, (224, 398)), (640, 480, 224, (298, 224)), (99, 99, 32, (32, 32))],
)
def test_scaled_size_keeps_aspect_with_even_sides(width, height, short, expected):
    assert scaled_size(width, height, short) == expected


# fps=25 outputs more frames than x264 holds back, so packets are muxed while frames are still being encoded
@pytest.mark.parametrize(("fps", "short_side"), [(3, 32), (3, 224), (25, 32)])
@pytest.mark.parametrize("name", list(CLIPS))
def test_prepare_video_rate_size_and_streams(sources, tmp_path, name, fps, short_side):
    dst = tmp_path / "out" / "clip.mp4"
    prepare_video(sources / name, dst, fps=fps, short_side=short_side)
    info = _probe(dst)
    assert info["types"] == ["video"]  # the aac track of talk.MOV is dropped
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert info["rate"] == fps
    assert abs(len(info["times"]) - SOURCE_FRAMES / SOURCE_FPS * fps) <= 1
    assert np.allclose(np.diff(info["times"]), 1 / fps, atol=1e-3)
    width, height = info["size"]
    assert min(width, height) == short_side and width % 2 == 0 and height % 2 == 0
    aspect = CLIPS[name][1]
    assert (width > height) == (aspect > 1)
    assert abs(width / height - aspect) <= 2 / short_side * aspect  # at most one even-rounding step off
    assert not partial_path(dst).exists()


def test_prepare_video_other_rate_and_rotation_direction(sources, tmp_path):
    dst = tmp_path / "phone.mp4"
    prepare_video(sources / "phone.mp4", dst, fps=5, short_side=32)
    info = _probe(dst)
    assert info["rate"] == 5 and abs(len(info["times"]) - 10) <= 1
    # a 90° counter-clockwise display rotation moves the white top-left quadrant to the bottom left
    first = info["first"]
    height, width = first.shape
    assert first[-height // 4, width // 4] > 200 and first[height // 4, width // 4] < 50


def test_prepare_video_chooses_its_own_keyframes(tmp_path):
    """x264 copies the frame types it is given; frames of an all-intra source must not all become keyframes."""
    src, dst = tmp_path / "intra.mp4", tmp_path / "out.mp4"
    with av.open(str(src), "w") as container:
        video = container.add_stream("libx264", rate=SOURCE_FPS, options={"preset": "ultrafast", "g": "1"})
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for t in range(SOURCE_FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * t, np.uint8), format="rgb24")
            frame.pts = t
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    prepare_video(src, dst, fps=5, short_side=32)
    with av.open(str(dst)) as container:
        keyframes = [packet.is_keyframe for packet in container.demux(video=0) if packet.size]
    assert len(keyframes) == 10 and sum(keyframes) == 1


def test_a_crash_while_encoding_leaves_no_output(sources, tmp_path, monkeypatch):
    dst = tmp_path / "out.mp4"
    stamped, seen = prepare._stamped, []

    def crash_midway(frames):
        for index, frame in enumerate(stamped(frames)):
            if index == 40:
                seen.append(partial_path(dst).exists())
                raise KeyboardInterrupt  # also what Ctrl-C looks like
            yield frame

    monkeypatch.setattr(prepare, "_stamped", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_video(sources / "land.mp4", dst, fps=25, short_side=32)
    assert seen == [True]  # the partial output had been written to ...
    assert not partial_path(dst).exists() and not dst.exists()  # ... and is gone


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        _write_silence(container, _add_audio(container))


def _garbled(path: Path) -> None:
    """A clip whose index is intact but whose every packet is noise: it opens, then decodes nothing."""
    _write_clip(path, 64, 48)
    data = bytearray(path.read_bytes())
    start = data.index(b"mdat") + 4
    end = start - 8 + int.from_bytes(data[start - 8 : start - 4], "big")
    data[start:end] = np.random.default_rng(0).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "cannot open"),
        (lambda p: p.write_bytes(b""), r"the file is empty \(0 bytes\)"),
        (lambda p: p.write_bytes(os.urandom(5000)), "cannot open"),
        (_audio_only, "no video stream"),
        (_garbled, "no frame could be decoded"),  # fails after the partial output was opened
    ],
    ids=["missing", "empty", "junk", "audio-only", "garbled"],
)
def test_prepare_video_errors_name_the_file_and_leave_nothing(tmp_path, make, reason):
    src, dst = tmp_path / "bad.mp4", tmp_path / "out" / "bad.mp4"
    make(src)
    with pytest.raises(PrepareError, match=reason) as info:
        prepare_video(src, dst, fps=3, short_side=32)
    assert str(src) in str(info.value)
    assert not dst.exists() and not partial_path(dst).exists()


def test_is_good_output(sources, tmp_path):
    good = tmp_path / "good.mp4"
    prepare_video(sources / "land.mp4", good, short_side=32)
    truncated, empty = tmp_path / "truncated.mp4", tmp_path / "empty.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty.write_bytes(b"")
    assert is_good_output(good)
    assert not any(is_good_output(p) for p in (truncated, empty, tmp_path / "missing.mp4"))


def test_prepare_folder_mirrors_reports_failures_and_resumes(src, tmp_path):
    (src / "empty.mp4").write_bytes(b"")
    (src / "sub" / "junk.avi").write_bytes(os.urandom(4000))
    shutil.copy(src / "old.avi", src / "land.webm")  # same output as land.mp4, which sorts first
    dst = tmp_path / "dst"
    first = prepare_folder(src, dst, fps=3, short_side=32, workers=2, progress=False)
    good = sorted(CLIPS)
    assert first.converted == good and first.skipped == []
    assert sorted(first.failed) == ["empty.mp4", "land.webm", "sub/junk.avi"]
    assert "same output land.mp4 as land.mp4" in first.failed["land.webm"]
    assert first.failed["empty.mp4"] == "the file is empty (0 bytes)"
    assert all(first.failed.values())
    assert sorted(_mtimes(dst)) == sorted(str(Path(n).with_suffix(".mp4").as_posix()) for n in good)
    assert _probe(dst / "land.mp4")["types"] == ["video"]  # from land.mp4, not the mpeg4 land.webm
    manifest = json.loads((dst / "prepare_videos.json").read_text())
    assert manifest["fps"] == 3 and manifest["short_side"] == 32 and manifest["complete"]
    assert manifest["source"] == str(src.resolve()) and manifest["counts"] == {
        "converted": 5,
        "skipped": 0,
        "failed": 3,
    }

    before = _mtimes(dst)
    second = prepare_folder(src, dst, fps=3, short_side=32, workers=2, progress=False)
    assert second.converted == [] and second.skipped == good and second.failed == first.failed
    assert _mtimes(dst) == before  # nothing rewritten


def test_prepare_folder_redoes_outputs_of_an_interrupted_run(src, tmp_path):
    dst = tmp_path / "dst"
    prepare_folder(src, dst, fps=3, short_side=32, workers=1, progress=False)
    # crash leftovers: a partial file without its output, a truncated output and an empty one
    (dst / "land.mp4").rename(partial_path(dst / "land.mp4"))
    port = dst / "sub" / "port.mp4"
    port.write_bytes(port.read_bytes()[:300])
    (dst / "old.mp4").write_bytes(b"")
    summary = prepare_folder(src, dst, fps=3, short_side=32, workers=2, progress=False)
    assert summary.converted == ["land.mp4", "old.avi", "sub/port.mp4"] and not summary.failed
    assert summary.skipped == ["phone.mp4", "sub/deeper/talk.MOV"]
    assert all(is_good_output(dst / n) for n in ("land.mp4", "old.mp4", "sub/port.mp4"))
    assert not list(dst.rglob("*.partial"))


def test_prepare_folder_refuses_other_settings_and_its_own_source(src, tmp_path):
    dst = tmp_path / "dst"
    prepare_folder(src, dst, fps=3, short_side=32, workers=1, progress=False)
    with pytest.raises(ValueError, match="short_side=32"):
        prepare_folder(src, dst, fps=3, short_side=64, workers=1, progress=False)
    with pytest.raises(ValueError, match="must differ"):
        prepare_folder(src, src, workers=1, progress=False)
    nested = prepare_folder(src, src / "prepared", fps=3, short_side=32, workers=1, progress=False)
    again = prepare_folder(src, src / "prepared", fps=3, short_side=32, workers=1, progress=False)
    assert len(nested.converted) == len(again.skipped) == len(CLIPS)  # its own outputs are not sources
    assert again.converted == [] and again.failed == {}


def _crash_on_old(job):
    """A worker that dies on old.avi the way a libav segfault kills it (module level: workers import it)."""
    if job.src.name == "old.avi":
        os._exit(1)
    return prepare._run_job(job)


def test_a_crashing_worker_fails_only_its_file(src, tmp_path):
    jobs, _ = prepare._plan(src, tmp_path / "dst", 3, 32, threads=1)
    reports = []
    prepare._run_jobs(jobs, 2, lambda job, *result: reports.append((job.name, *result)), work=_crash_on_old)
    assert sorted(name for name, *_ in reports) == sorted(CLIPS)  # every job reported exactly once
    outcome = {name: result for name, *result in reports}
    status, reason = outcome.pop("old.avi")
    assert status == "failed" and "crashed" in reason
    # A job in flight beside the crash may have finished its file before the pool went down; its re-run then
    # finds the good output and says "skipped". Either way every other file ends converted.
    assert all(result in (["converted", ""], ["skipped", ""]) for result in outcome.values()), outcome
    assert all(is_good_output(job.dst) for job in jobs if job.name != "old.avi")


def _collect_then_run(job):
    """A worker that first frees every object cycle it inherited (what its garbage collector does sooner or later)."""
    gc.collect()
    return prepare._run_job(job)


HOLD_A_DECODER_THEN_CONVERT = """
import gc, sys
from pathlib import Path
import av
sys.path.insert(0, sys.argv[1])
from neighborretr.data import prepare
from tests.unit.test_prepare_videos import _collect_then_run

class Holder:
    pass

if __name__ == "__main__":
    gc.disable()  # keeps a cycle holding an open, threaded decoder alive while the workers start
    holder = Holder()
    holder.me, holder.container = holder, av.open(sys.argv[2] + "/land.mp4")
    stream = holder.container.streams.video[0]
    stream.thread_type, stream.codec_context.thread_count = "AUTO", 4
    next(holder.container.decode(stream))
    del holder, stream
    jobs, _ = prepare._plan(Path(sys.argv[2]), Path(sys.argv[3]), 3, 32, threads=1)
    results = []
    prepare._run_jobs(jobs, 2, lambda job, *result: results.append(result[0]), work=_collect_then_run)
    print(sorted(results))
"""


def test_workers_do_not_inherit_the_callers_libav_objects(src, tmp_path):
    """Under plain fork, a worker freeing an inherited threaded codec context hangs forever."""
    args = [str(Path(__file__).resolve().parents[2]), str(src), str(tmp_path / "dst")]
    done = subprocess.run(
        [sys.executable, "-c", HOLD_A_DECODER_THEN_CONVERT, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(["converted"] * len(CLIPS))


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args, "--short-side", "32", "--workers", "2", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_exit_status_and_failure_listing(src, tmp_path):
    ok = _cli(str(src), str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr
    assert "converted: 5" in ok.stdout and "failed: 0" in ok.stdout
    (src / "sub" / "broken.mkv").write_bytes(b"\x1a\x45\xdf\xa3 truncated")
    bad = _cli(str(src), str(tmp_path / "ok"))
    assert bad.returncode == 1
    assert "skipped (already done): 5" in bad.stdout and "failed: 1" in bad.stdout
    assert "sub/broken.mkv: cannot open" in bad.stdout
    assert json.loads((tmp_path / "ok" / "prepare_videos.json").read_text())["failed"] == {
        "sub/broken.mkv": bad.stdout.split("sub/broken.mkv: ", 1)[1].strip()
    }
    assert Fraction(_probe(tmp_path / "ok" / "land.mp4")["rate"]) == 3
