import csv
import json

import pytest

from neighborretr.data.annotations import AnnotationError, Record, held_out_videos, parse_msrvtt
from neighborretr.data.transforms import CaptionTokenizer

SOT, EOT = 49406, 49407


def test_tokenizer_keeps_start_and_end_when_truncating():
    tok = CaptionTokenizer(max_words=6)
    ids, mask = tok("a person is cooking pasta in a big kitchen tonight")
    assert ids[0] == SOT and ids[5] == EOT and mask.tolist() == [1] * 6
    short_ids, short_mask = tok("a dog")
    assert short_ids.tolist()[:4] == [SOT, 320, 1929, EOT] and short_ids.tolist()[4:] == [0, 0]
    assert short_mask.tolist() == [1, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError):
        CaptionTokenizer(1)


def _write_msrvtt(root, train_ids, test_rows, captions):
    sentences = [{"sen_id": i, "video_id": v, "caption": c} for i, (v, c) in enumerate(captions)]
    videos = [
        {"id": i, "video_id": v, "category": 0, "url": "", "start time": 0, "end time": 10, "split": "train"}
        for i, v in enumerate(train_ids)
    ]
    (root / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    for name, ids in (("9k", train_ids), ("7k", train_ids[:2])):
        with open(root / f"MSRVTT_train.{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["video_id"])
            w.writerows([[v] for v in ids])
    with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        w.writerows(test_rows)


@pytest.fixture
def msrvtt(tmp_path):
    train = ["video0", "video1", "video2", "video3"]
    captions = [(v, f"caption {k} of {v}") for v in train for k in range(3)] + [("video9", "a test clip, with a comma")]
    _write_msrvtt(tmp_path, train, [["ret0", "msr9", "video9", "a test clip, with a comma"]], captions)
    return tmp_path


def test_parse_msrvtt_splits(msrvtt):
    train = parse_msrvtt(msrvtt, "train")
    assert len(train) == 12 and train[0] == Record("video0", "caption 0 of video0")
    assert parse_msrvtt(msrvtt, "test") == [Record("video9", "a test clip, with a comma")]
    assert {r.video_id for r in parse_msrvtt(msrvtt, "train", train_list="7k")} == {"video0", "video1"}
    kept = parse_msrvtt(msrvtt, "train", val_videos=1, val_seed=5)
    val = parse_msrvtt(msrvtt, "val", val_videos=1, val_seed=5)
    assert len(val) == 3 and len(kept) == 9
    assert not {r.video_id for r in val} & {r.video_id for r in kept}
    assert held_out_videos(["b", "a", "c"], 1, 0) == held_out_videos(["c", "b", "a"], 1, 0)  # order-independent


def test_parse_msrvtt_errors(msrvtt):
    (msrvtt / "MSRVTT_data.json").write_text('{"sentences": [')
    with pytest.raises(AnnotationError, match="not valid JSON"):
        parse_msrvtt(msrvtt, "train")
    (msrvtt / "MSRVTT_data.json").write_text(json.dumps({"sentences": [{"video_id": "video0"}]}))
    with pytest.raises(AnnotationError, match=r"sentences\[0\] lacks"):
        parse_msrvtt(msrvtt, "train")
    (msrvtt / "MSRVTT_JSFUSION_test.csv").write_text("key,video\nret0,video9\n")
    with pytest.raises(AnnotationError, match="missing column"):
        parse_msrvtt(msrvtt, "test")
    (msrvtt / "MSRVTT_train.9k.csv").unlink()
    with pytest.raises(FileNotFoundError, match="MSRVTT_train.9k.csv"):
        parse_msrvtt(msrvtt, "train")
    with pytest.raises(ValueError, match="7k"):
        parse_msrvtt(msrvtt, "train", train_list="8k")
