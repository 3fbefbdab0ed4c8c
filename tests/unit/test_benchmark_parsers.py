"""MSVD, DiDeMo and ActivityNet parsers and file lookup, on fixtures in each benchmark's real format."""

import json
import pickle

import pytest

from neighborretr.data.annotations import (
    PARSERS,
    AnnotationError,
    Record,
    parse_activitynet,
    parse_didemo,
    parse_msvd,
)
from neighborretr.data.dataset import VideoTextDataset
from neighborretr.data.validation import find_bad_videos
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import VideoDecodeError
from tests.benchmark_files import write_activitynet, write_didemo, write_msvd, write_video
from tests.conftest import AVAILABLE_BACKENDS, frame_numbers


def test_msvd_every_caption_is_a_record(tmp_path):
    write_msvd(tmp_path)
    train, val, test = (parse_msvd(tmp_path, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (5, 2, 7)
    assert train[0] == Record("-4wsuPCjDBc_5_15", "a clip -4wsuPCjDBc_5_15 number 0")  # tokens joined by spaces
    assert [r.video_id for r in test] == ["t1_0_5"] * 4 + ["t2_3_7"] * 3  # multi-caption test split
    assert {r.video_id for r in val}.isdisjoint({r.video_id for r in train} | {r.video_id for r in test})


def test_msvd_json_captions_and_errors(tmp_path):
    write_msvd(tmp_path)
    raw = pickle.loads((tmp_path / "raw-captions.pkl").read_bytes())
    (tmp_path / "raw-captions.pkl").unlink()
    (tmp_path / "captions_msvd.json").write_text(json.dumps({v: [" ".join(c) for c in cs] for v, cs in raw.items()}))
    assert parse_msvd(tmp_path, "test")[4] == Record("t2_3_7", "a clip t2_3_7 number 0")
    (tmp_path / "test_list.txt").write_text("t1_0_5\nunknown_1_2\n")
    with pytest.raises(AnnotationError, match=r"1 MSVD test video\(s\) have no captions, e.g. \['unknown_1_2'\]"):
        parse_msvd(tmp_path, "test")
    (tmp_path / "captions_msvd.json").unlink()
    with pytest.raises(FileNotFoundError, match="raw-captions.pkl"):
        parse_msvd(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown MSVD split 'dev'"):
        parse_msvd(tmp_path, "dev")


def test_didemo_paragraphs(tmp_path, caplog):
    write_didemo(tmp_path)
    train = parse_didemo(tmp_path, "train")
    assert train == [
        Record("10015567@N08_3655084291.mov", "a dog runs in. the dog stops.", 0.0, 31.0),
        Record("10034074@N03_2813470470.avi", "a car turns left", 0.0, 31.0),
    ]
    assert "1 listed video(s) have no description" in caplog.text
    assert [r.video_id for r in parse_didemo(tmp_path, "test")] == ["test_a.mov", "test_b.m4v"]  # list order
    assert [r.caption for r in parse_didemo(tmp_path, "val")] == ["a val clip"]
    (tmp_path / "val_data.json").write_text(json.dumps([{"description": "no video key"}]))
    with pytest.raises(AnnotationError, match="entry 0 lacks 'video'"):
        parse_didemo(tmp_path, "val")


def test_activitynet_paragraphs_segments_and_splits(tmp_path):
    write_activitynet(tmp_path)
    test = parse_activitynet(tmp_path, "test")
    assert test[0] == Record("v_QOlSCBRmfWY", "A young woman is seen.", 0.0, 83.0, ("QOlSCBRmfWY",))
    assert test[1].caption == "A man plays. He stops." and test[1].end == 62.0
    train = parse_activitynet(tmp_path, "train")
    assert [r.video_id for r in train] == [f"v_train{i}" for i in range(4)]
    assert train[1].caption == "Video 1 starts. Then it ends 1." and train[1].end == 12.0  # ceil(11.2)
    kept = parse_activitynet(tmp_path, "train", val_videos=1, val_seed=3)
    val = parse_activitynet(tmp_path, "val", val_videos=1, val_seed=3)
    assert len(kept) == 3 and len(val) == 1 and val[0].video_id not in {r.video_id for r in kept}
    assert not {r.video_id for r in val} & {r.video_id for r in test}  # selection never sees val_1


def test_activitynet_without_id_lists_and_errors(tmp_path):
    write_activitynet(tmp_path, with_ids=False)
    assert len(parse_activitynet(tmp_path, "train")) == 4 and len(parse_activitynet(tmp_path, "test")) == 2
    (tmp_path / "val_ids.json").write_text(json.dumps(["v_QOlSCBRmfWY", "v_gone"]))
    with pytest.raises(AnnotationError, match=r"1 id\(s\) of .*val_ids.json are not in .*val_1.json.*v_gone"):
        parse_activitynet(tmp_path, "test")
    (tmp_path / "train.json").write_text(json.dumps({"v_x": {"duration": 3.0}}))
    with pytest.raises(AnnotationError, match="'v_x' lacks 'duration' or 'sentences'"):
        parse_activitynet(tmp_path, "train")


def test_every_configured_benchmark_has_a_parser():
    assert sorted(PARSERS) == ["activitynet", "didemo", "msrvtt", "msvd"]


def test_activitynet_files_with_and_without_v_prefix(tmp_path):
    write_activitynet(tmp_path / "ann")
    write_video(tmp_path / "videos" / "QOlSCBRmfWY.mp4")  # CLIP4Clip naming
    write_video(tmp_path / "videos" / "sub" / "v_ehGHCYKzyZ8.mkv")  # HBI/NeighborRetr naming, in a subfolder
    videos = VideoIndex(tmp_path / "videos")
    test = parse_activitynet(tmp_path / "ann", "test")
    assert videos.find(test[0]) == tmp_path / "videos" / "QOlSCBRmfWY.mp4"
    assert videos.find(test[1]) == tmp_path / "videos" / "sub" / "v_ehGHCYKzyZ8.mkv"
    ds = VideoTextDataset(test, tmp_path / "videos", 16, 4, 32, videos=videos)
    assert ds[0]["video_mask"].tolist() == [1, 1, 1, 1]


def test_didemo_containers_reencoded_copies_missing_and_empty_files(tmp_path):
    write_didemo(tmp_path / "ann")
    vdir = tmp_path / "videos"
    write_video(vdir / "10015567@N08_3655084291.mov", num_frames=12)
    write_video(vdir / "10034074@N03_2813470470.avi", num_frames=12)
    write_video(vdir / "test_b.m4v", num_frames=12)
    write_video(vdir / "test_a.mp4", num_frames=12)  # listed as .mov, present as a re-encoded .mp4
    (vdir / "val_clip.mp4").write_bytes(b"")  # zero bytes
    videos = VideoIndex(vdir)
    records = [r for s in ("train", "val", "test") for r in parse_didemo(tmp_path / "ann", s)]
    assert videos.find(records[-2]) == vdir / "test_a.mp4"
    for backend in AVAILABLE_BACKENDS:
        assert find_bad_videos(records, videos, backend, progress=False) == {
            "val_clip.mp4": f"{vdir / 'val_clip.mp4'}: the file is empty (0 bytes)"
        }
    good = [r for r in records if r.video_id != "val_clip.mp4"]
    ds = VideoTextDataset(good, vdir, 16, 3, 32, videos=videos, framerate=2)  # 10 fps thinned to 2: frames 0, 5, 10
    for i in range(len(good)):
        video, mask = ds._video(good[i], i)
        assert mask.tolist() == [1, 1, 1], good[i].video_id
    frames = ds.videos.find(good[1])
    assert frames.suffix == ".avi"
    missing = Record("not_downloaded.mov", "x")
    with pytest.raises(
        VideoDecodeError, match=r"no file for video 'not_downloaded.mov' .*looked for not_downloaded\.\*"
    ):
        VideoTextDataset([missing], vdir, 16, 3, 32, videos=videos)[0]


def test_ambiguous_files_are_ordered_by_extension_rank(tmp_path):
    write_video(tmp_path / "video7.webm")
    write_video(tmp_path / "video7.mp4")
    assert VideoIndex(tmp_path).candidates(Record("video7", "x")) == [tmp_path / "video7.mp4", tmp_path / "video7.webm"]
    with pytest.raises(FileNotFoundError, match="video folder not found"):
        VideoIndex(tmp_path / "nope")


def test_every_container_gives_the_requested_frames(tmp_path):
    from neighborretr.data.video_io import read_frames

    for name in ("a.avi", "b.mov", "c.m4v", "d.webm", "e.3gp"):
        path = write_video(tmp_path / name, num_frames=10)
        for backend in AVAILABLE_BACKENDS:
            frames, idx = read_frames(path, 3, "head", backend=backend, framerate=5)
            assert idx.tolist() == frame_numbers(frames) == [0, 2, 4], (name, backend)
