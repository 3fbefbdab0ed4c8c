"""scripts/validate_data.py on an MSVD fixture with known problems: it must list exactly those and exit 1."""

import csv
import json

import pytest

from tests.benchmark_files import write_msvd, write_video
from tests.conftest import run_script

pytestmark = pytest.mark.integration


def _report(result):
    out = next(line for line in result.stdout.splitlines() if "full list:" in line).split("full list: ")[1]
    with open(out, newline="") as f:
        return {(r["kind"], r["split"], r["video_id"]) for r in csv.DictReader(f)}, json.loads(
            open(out.replace("problems.csv", "summary.json")).read()
        )


def test_validate_lists_exactly_the_known_problems(tmp_path):
    root = tmp_path / "msvd"
    splits = write_msvd(root)
    # a duplicated list entry, and a test video also listed for training
    (root / "train_list.txt").write_text("\n".join([*splits["train"], "-4wsuPCjDBc_5_15", "t2_3_7"]) + "\n")
    vdir = root / "videos"
    for video_id in ("-4wsuPCjDBc_5_15", "t1_0_5", "t2_3_7"):
        write_video(vdir / f"{video_id}.mp4")
    write_video(vdir / "t1_0_5.avi")  # a second file for the same id: a note, not an error
    (vdir / "xyz_0_4.mp4").write_bytes(b"")  # zero bytes
    (vdir / "val_2_8.webm").write_bytes(b"\x1a\x45\xdf\xa3 not really a webm" * 50)  # corrupt
    # abc_1_9 has no file at all
    args = ["data=msvd", f"data.root={root}", "workers=2", f"output_root={tmp_path / 'out'}"]
    result = run_script("validate_data.py", args, cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    found, summary = _report(result)
    assert found == {
        ("missing", "train", "abc_1_9"),
        ("zero-length", "train", "xyz_0_4"),
        ("corrupt", "val", "val_2_8"),
        ("duplicate", "train", "-4wsuPCjDBc_5_15"),
        ("duplicate", "test", "t2_3_7"),
        ("ambiguous", "test", "t1_0_5"),
    }
    assert "listed 2 times in the train split" in result.stdout
    assert "in several splits: train, test" in result.stdout
    assert "5 error(s), 1 note(s)" in result.stdout
    assert summary[0] == {
        "split": "train", "records": 10, "videos": 4, "missing": 1, "zero-length": 1, "corrupt": 0,
        "duplicate": 1, "ambiguous": 0, "repeated-caption": 0,
    }  # fmt: skip

    # fix everything: exit 0 and nothing listed
    (root / "train_list.txt").write_text("\n".join(splits["train"]) + "\n")
    (vdir / "t1_0_5.avi").unlink()
    (vdir / "val_2_8.webm").unlink()
    for video_id in ("abc_1_9", "xyz_0_4", "val_2_8"):
        write_video(vdir / f"{video_id}.mp4")
    fixed = run_script("validate_data.py", args, cwd=tmp_path)
    assert "0 error(s), 0 note(s)" in fixed.stdout and _report(fixed)[0] == set()


def test_validate_reports_unreadable_annotations(tmp_path):
    root = tmp_path / "anet"
    root.mkdir()
    (root / "train.json").write_text("{not json")
    args = ["data=activitynet", f"data.root={root}", f"output_root={tmp_path / 'out'}"]
    result = run_script("validate_data.py", args, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "train.json is not valid JSON" in result.stderr
