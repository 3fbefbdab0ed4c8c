"""scripts/compare_hubs.py on the hub reports of two hand-made runs: one with known good and bad hubs, one
without hubs."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neighborretr.eval.hub_report import hub_counts
from neighborretr.eval.pipeline import write_hub_report
from tests.unit.test_hub_report import C2V, t2v_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import compare_hubs  # noqa: E402


def _write_run(folder: Path, sim: torch.Tensor) -> Path:
    """<folder>/test_hubs_{t2v,v2t}.json of a [12 captions, 6 videos] matrix, raw only, at k = 1."""
    hubs = {"t2v": {"none": hub_counts(sim, C2V, "t2v", 1)}, "v2t": {"none": hub_counts(sim.t(), C2V, "v2t", 1)}}
    accelerator = SimpleNamespace(is_main_process=True, trackers=[], log=lambda values, step=None: None)
    write_hub_report(accelerator, hubs, folder, "test")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp_path = tmp_path_factory.mktemp("runs")
    hubby = _write_run(tmp_path / "infonce", t2v_scores())
    # every caption's own video first: no video is any other caption's top-1, so there are no bad hubs
    own = torch.zeros(12, 6)
    own[torch.arange(12), C2V] = 1.0
    return hubby, _write_run(tmp_path / "neighborretr", own)


def test_two_runs_side_by_side(runs, tmp_path, capsys):
    out = tmp_path / "cmp" / "hubs"
    out.parent.mkdir()
    text = compare_hubs.main(
        ["--runs", *map(str, runs), "--labels", "A", "B", "--out", str(out), "--directions", "t2v"]
    )
    lines = text.splitlines()
    assert len(lines) == 4  # header, rule, one line per run
    a = [c.strip() for c in lines[2].strip("|").split("|")]
    b = [c.strip() for c in lines[3].strip("|").split("|")]
    # run, dir, method, k, hubs, good, bad, slots at hubs, correct slots, wrong at hubs, wrong at bad hubs, top item
    assert a == ["A", "t2v", "none", "1", "3", "2", "1", "91.7%", "58.3%", "100.0%", "80.0%", "0 (6, 2)"]
    # each video is the top-1 of its own 2 captions: 6 hubs at N_1 = 2 = 2k, all correct, none bad
    assert b[:7] == ["B", "t2v", "none", "1", "6", "6", "0"] and b[9:11] == ["0.0%", "0.0%"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text in out.with_suffix(".md").read_text()


def test_both_directions_by_default(runs, tmp_path):
    text = compare_hubs.main(["--runs", *map(str, runs), "--out", str(tmp_path / "both")])
    assert [line.split("|")[2].strip() for line in text.splitlines()[2:]] == ["t2v", "t2v", "v2t", "v2t"]
    assert "| infonce |" in text  # default labels: the folder names


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", "val"], "val_hubs_t2v.json not found"),
        (["--methods", "is"], "has no 'is' hub report"),
        (["--labels", "only-one"], "--labels has 1 names for 2 runs"),
    ],
)
def test_bad_requests_stop_with_one_line(runs, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        compare_hubs.main(["--runs", *map(str, runs), "--out", str(tmp_path / "x"), *extra])
    assert stop.value.code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
