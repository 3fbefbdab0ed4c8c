"""Small annotation sets in each benchmark's real file format, and videos in several containers, for tests."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from tests.conftest import write_numbered_video

CODECS = {".avi": "mpeg4", ".webm": "libvpx-vp9"}  # every other container here gets H.264


def write_video(path: Path, num_frames: int = 10, fps: int = 10, size: int = 32) -> Path:
    """A short clip in the container named by the suffix, at its codec's default settings; frame i is a flat grey
    of level 16 + 6·i (see tests.conftest.frame_numbers)."""
    return write_numbered_video(path, num_frames, fps, size, CODECS.get(path.suffix, "libx264"), options={})


def write_msvd(root: Path) -> dict[str, list[str]]:
    """3 train / 1 val / 2 test videos; test videos have 4 and 3 captions. Returns the split lists."""
    splits = {"train": ["-4wsuPCjDBc_5_15", "abc_1_9", "xyz_0_4"], "val": ["val_2_8"], "test": ["t1_0_5", "t2_3_7"]}
    counts = {"-4wsuPCjDBc_5_15": 2, "abc_1_9": 1, "xyz_0_4": 2, "val_2_8": 2, "t1_0_5": 4, "t2_3_7": 3}
    captions = {v: [["a", "clip", v, "number", str(k)] for k in range(n)] for v, n in counts.items()}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "raw-captions.pkl", "wb") as f:
        pickle.dump(captions, f)
    for split, ids in splits.items():
        (root / f"{split}_list.txt").write_text("\n".join(ids) + "\n")
    return splits


def write_didemo(root: Path) -> None:
    """train: 3 listed videos (one without any description); val: 1; test: 2 (a .mov and an .m4v)."""
    root.mkdir(parents=True, exist_ok=True)
    lists = {
        "train": ["10015567@N08_3655084291.mov", "10034074@N03_2813470470.avi", "no_description.mp4"],
        "val": ["val_clip.mp4"],
        "test": ["test_a.mov", "test_b.m4v"],
    }
    data = {
        "train": [
            {"video": "10015567@N08_3655084291.mov", "description": "a dog runs in.", "times": [[0, 0], [0, 1]]},
            {"video": "10034074@N03_2813470470.avi", "description": " a car turns left ", "times": [[2, 3]]},
            {"video": "10015567@N08_3655084291.mov", "description": "the dog stops.", "times": [[4, 5]]},
            {"video": "unlisted.mp4", "description": "not in the list", "times": [[0, 0]]},
        ],
        "val": [{"video": "val_clip.mp4", "description": "a val clip", "times": [[1, 1]]}],
        "test": [
            {"video": "test_b.m4v", "description": "second test video", "times": [[0, 1]]},
            {"video": "test_a.mov", "description": "first test video", "times": [[0, 1]]},
        ],
    }
    for split in lists:
        (root / f"{split}_list.txt").write_text("\n".join(lists[split]) + "\n")
        (root / f"{split}_data.json").write_text(json.dumps(data[split]))


def write_activitynet(root: Path, with_ids: bool = True) -> None:
    """4 training videos and 2 val_1 videos in the train.json / val_1.json format, with or without id lists."""
    root.mkdir(parents=True, exist_ok=True)
    train = {
        f"v_train{i}": {
            "duration": 10.2 + i,
            "timestamps": [[0.0, 3.0], [3.0, 9.5]],
            "sentences": [f"Video {i} starts. ", f" Then it ends {i}."],
        }
        for i in range(4)
    }
    val_1 = {
        "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86]], "sentences": ["A young woman is seen."]},
        "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 5]], "sentences": ["A man plays.", "He stops."]},
    }
    (root / "train.json").write_text(json.dumps(train))
    (root / "val_1.json").write_text(json.dumps(val_1))
    if with_ids:
        (root / "train_ids.json").write_text(json.dumps(sorted(train)))
        (root / "val_ids.json").write_text(json.dumps(list(val_1)))
