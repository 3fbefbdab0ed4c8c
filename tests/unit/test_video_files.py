"""VideoIndex lookups. The index only reads file names, so empty files stand in for videos."""

from pathlib import Path

import pytest

from neighborretr.data.annotations import Record
from neighborretr.data.video_files import VideoIndex


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_didemo_file_that_keeps_the_id_extension_is_found(tmp_path):
    _touch(tmp_path, "sub/x.mov.mp4", "other.mp4")
    videos = VideoIndex(tmp_path)
    assert videos.find(Record("x.mov", "c")) == tmp_path / "sub" / "x.mov.mp4"
    assert videos.candidates(Record("x.mov", "c")) == [tmp_path / "sub" / "x.mov.mp4"]


def test_preference_exact_name_then_full_id_stem_then_stripped_stem(tmp_path):
    _touch(tmp_path, "x.mp4", "x.mov.webm", "x.mov.mp4", "x.mov", "x.avi")
    videos = VideoIndex(tmp_path)
    assert videos.candidates(Record("x.mov", "c")) == [
        tmp_path / name for name in ("x.mov", "x.mov.mp4", "x.mov.webm", "x.mp4", "x.avi")
    ]
    (tmp_path / "x.mov").unlink()
    assert VideoIndex(tmp_path).find(Record("x.mov", "c")) == tmp_path / "x.mov.mp4"
    (tmp_path / "x.mov.mp4").unlink()
    (tmp_path / "x.mov.webm").unlink()
    assert VideoIndex(tmp_path).find(Record("x.mov", "c")) == tmp_path / "x.mp4"


def test_names_are_tried_in_record_order_and_non_videos_are_ignored(tmp_path):
    _touch(tmp_path, "v_abc.mkv", "abc.mp4", "abc.mp4.txt", "abc")
    record = Record("v_abc", "c", file_stems=("abc",))
    assert VideoIndex(tmp_path).candidates(record) == [tmp_path / "v_abc.mkv", tmp_path / "abc.mp4"]
    assert VideoIndex(tmp_path).candidates(Record("abc", "c")) == [tmp_path / "abc.mp4"]


@pytest.mark.parametrize(
    ("record", "patterns"),
    [
        (Record("x.mov", "c"), "x.*, x.mov, x.mov.*"),
        (Record("absent", "c"), "absent.*"),
        (Record("v_abc", "c", file_stems=("abc",)), "v_abc.*, abc.*"),
        (Record("clip.xyz", "c"), "clip.xyz, clip.xyz.*"),
    ],
)
def test_describe_missing_lists_the_patterns_tried(tmp_path, record, patterns):
    _touch(tmp_path, "unrelated.mp4", "x.mov.txt", "x", "absent")  # none of these may be found
    videos = VideoIndex(tmp_path)
    assert videos.candidates(record) == []
    assert videos.describe_missing(record) == (
        f"no file for video {record.video_id!r} under {tmp_path} (looked for {patterns})"
    )


def test_each_listed_pattern_is_really_looked_up(tmp_path):
    # One file per pattern of describe_missing for x.mov; each alone must be found.
    for name in ("x.mp4", "x.mov", "x.mov.mkv"):
        folder = tmp_path / name.replace(".", "_")
        _touch(folder, name)
        assert VideoIndex(folder).find(Record("x.mov", "c")) == folder / name
