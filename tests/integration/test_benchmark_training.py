"""train.py on benchmarks other than MSR-VTT: the synthetic clips rewritten in ActivityNet's, MSVD's and DiDeMo's
formats."""

import json
import pickle
import shutil

import pytest

from neighborretr.data.annotations import parse_msrvtt
from tests.conftest import INFONCE, TINY_OVERRIDES, run_script

pytestmark = pytest.mark.integration


def _as_activitynet(synthetic, root):
    """Training clips -> train.json, test clips -> val_1.json (one paragraph per video); files keep their
    CLIP4Clip-style names (videoN.mp4) while the ids carry the "v_" prefix."""
    root.mkdir()
    for split, name in (("train", "train.json"), ("test", "val_1.json")):
        entries = {}
        for r in parse_msrvtt(synthetic, split):
            entries.setdefault(f"v_{r.video_id}", {"duration": 1.3, "timestamps": [], "sentences": []})
            entries[f"v_{r.video_id}"]["sentences"].append(r.caption)
        (root / name).write_text(json.dumps(entries))
    shutil.copytree(synthetic / "videos", root / "videos")


def _as_msvd(synthetic, root):
    """Training clips split into train and val lists, test clips -> test list; captions as token lists."""
    root.mkdir()
    captions = {}
    for split in ("train", "test"):
        for r in parse_msrvtt(synthetic, split):
            captions.setdefault(r.video_id, []).append(r.caption.split())
    train = sorted({r.video_id for r in parse_msrvtt(synthetic, "train")}, key=lambda v: int(v[5:]))
    test = sorted({r.video_id for r in parse_msrvtt(synthetic, "test")}, key=lambda v: int(v[5:]))
    lists = {"train": train[:-4], "val": train[-4:], "test": test}
    for split, ids in lists.items():
        (root / f"{split}_list.txt").write_text("\n".join(ids) + "\n")
    with open(root / "raw-captions.pkl", "wb") as f:
        pickle.dump(captions, f)
    (root / "videos").mkdir()
    for path in (synthetic / "videos").glob("*.mp4"):  # MSVD ships .avi clips; the container must not matter
        shutil.copy(path, root / "videos" / path.name)


def _as_didemo(synthetic, root):
    """Training clips split into train and val, test clips -> test; ids are file names, here re-encoded .avi
    names while the files are .mp4 (the copy most users train on); one description per caption."""
    root.mkdir()
    train = parse_msrvtt(synthetic, "train")
    val_ids = sorted({r.video_id for r in train}, key=lambda v: int(v[5:]))[-4:]
    splits = {
        "train": [r for r in train if r.video_id not in val_ids],
        "val": [r for r in train if r.video_id in val_ids],
        "test": parse_msrvtt(synthetic, "test"),
    }
    for split, recs in splits.items():
        ids = list(dict.fromkeys(f"{r.video_id}.avi" for r in recs))
        (root / f"{split}_list.txt").write_text("\n".join(ids) + "\n")
        data = [{"video": f"{r.video_id}.avi", "description": r.caption, "times": [[0, 0]]} for r in recs]
        (root / f"{split}_data.json").write_text(json.dumps(data))
    shutil.copytree(synthetic / "videos", root / "videos")


@pytest.mark.parametrize("benchmark", ["activitynet", "msvd", "didemo"])
def test_training_runs_on_other_benchmark_formats(tiny_synthetic, tmp_path, benchmark):
    root = tmp_path / benchmark
    {"activitynet": _as_activitynet, "msvd": _as_msvd, "didemo": _as_didemo}[benchmark](tiny_synthetic, root)
    out = tmp_path / "out"
    args = [
        *TINY_OVERRIDES,
        *INFONCE,
        f"data={benchmark}",
        f"data.root={root}",
        f"output_root={out}",
        "data.max_words=32",
        "data.max_frames=4",
        "data.video_framerate=4",  # 8 fps clips thinned to 4 fps, then 4 frames
        "data.train_sampling=random",
        "data.rand_augment=rand-m7-n4-mstd0.5-inc1",
        "trainer.epochs=1",
    ]
    if benchmark in ("msvd", "didemo"):
        args.remove("data.val_videos=4")  # these have their own val list; the option is refused for them
    result = run_script("train.py", args, cwd=tmp_path)
    # 24 training clips with 2 captions each (4 held out / listed for val), 8 test clips with 1 caption
    counts = {
        "activitynet": "train 20 captions / 20 videos, val 4 captions / 4 videos, test 8 captions / 8 videos",
        "msvd": "train 40 captions / 20 videos, val 8 captions / 4 videos, test 8 captions / 8 videos",
        "didemo": "train 20 captions / 20 videos, val 4 captions / 4 videos, test 8 captions / 8 videos",
    }[benchmark]
    assert f"{benchmark}: {counts}" in result.stdout, result.stdout[-2000:]
    (run,) = sorted((out / "synthetic_tiny").glob("*"))
    results = json.loads((run / "results.json").read_text())
    assert set(results["test"]) == {"t2v", "v2t"}
    config = (run / "config.yaml").read_text()
    assert f"benchmark: {benchmark}" in config and "rand_augment: rand-m7-n4-mstd0.5-inc1" in config


def test_a_parser_option_the_benchmark_does_not_use_is_refused(tiny_synthetic, tmp_path):
    root = tmp_path / "msvd"
    _as_msvd(tiny_synthetic, root)
    args = [*TINY_OVERRIDES, *INFONCE, "data=msvd", f"data.root={root}", f"output_root={tmp_path / 'out'}"]
    result = run_script("train.py", args, cwd=tmp_path, check=False)  # TINY_OVERRIDES set data.val_videos
    assert result.returncode == 1 and "Could not override 'data.val_videos'" in result.stderr  # Hydra's struct
    args[args.index("data.val_videos=4")] = "+data.val_videos=4"  # forced in: our own check names it
    result = run_script("train.py", args, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "data.benchmark=msvd does not use data.val_videos" in result.stderr
