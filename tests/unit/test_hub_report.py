"""Good and bad hubs on hand-made score matrices whose hubs are known, the plots, and the report's files."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neighborretr.eval.hub_report import (
    HubCounts,
    counts_from_report,
    hub_counts,
    hub_report,
    hub_summary,
    hub_table,
    plot_hubs,
)
from neighborretr.eval.hubness_metrics import k_occurrence
from neighborretr.eval.pipeline import gallery_ids, write_report

PNG = b"\x89PNG\r\n\x1a\n"

# 6 videos with 2 captions each (captions 2v and 2v+1 describe video v); each caption's top-1 video:
#   video 0: its own two captions and both captions of videos 2 and 3 -> N_1 = 6, 2 correct: a bad hub
#   video 1: only its own two captions                                -> N_1 = 2, 2 correct: a good hub
#   video 4: caption 8 (its own)                                      -> N_1 = 1, 1 correct: good, not a hub
#   video 5: its own captions 10, 11 and caption 9 (of video 4)       -> N_1 = 3, 2 correct: a good hub
#   videos 2, 3: never retrieved (anti-hubs)
# 7 of the 12 top-1 slots are correct (mean share 7/12); the 5 wrong ones: 4 at video 0, 1 at video 5.
C2V = torch.arange(6).repeat_interleave(2)
TOP1 = [0, 0, 1, 1, 0, 0, 0, 0, 4, 5, 5, 5]


def t2v_scores() -> torch.Tensor:
    """[12 captions, 6 videos]: each row's TOP1 video scores 1, the others distinct values below 0.5."""
    scores = torch.linspace(0.0, 0.4, 72).reshape(12, 6)
    scores[torch.arange(12), torch.tensor(TOP1)] = 1.0
    return scores


def test_t2v_counts_good_and_bad_hubs_of_a_hand_made_matrix():
    counts = hub_counts(t2v_scores(), C2V, "t2v", k=1)
    assert counts.n_k.tolist() == [6, 2, 0, 0, 1, 3]
    assert counts.correct.tolist() == [2, 2, 0, 0, 1, 2]
    assert counts.positives.tolist() == [2] * 6
    assert counts.is_hub.tolist() == [True, True, False, False, False, True]  # N_1 >= 2
    rows = hub_table(t2v_scores(), C2V, "t2v", k=1, ids=[f"video{i}" for i in range(6)])
    got = [(r["index"], r["id"], r["n_k"], r["correct"], r["wrong"], r["hub"], r["label"]) for r in rows]
    assert got == [
        (0, "video0", 6, 2, 4, True, "bad"),
        (5, "video5", 3, 2, 1, True, "good"),
        (1, "video1", 2, 2, 0, True, "good"),
        (4, "video4", 1, 1, 0, False, "good"),
    ]  # never-retrieved videos 2 and 3 are left out
    assert rows[0]["correct_share"] == pytest.approx(1 / 3) and [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert hub_summary(counts) == pytest.approx(
        {
            "k": 1,
            "hub_factor": 2.0,
            "n_queries": 12,
            "n_gallery": 6,
            "max_positives": 2,
            "n_hubs": 3,
            "n_good_hubs": 2,
            "n_bad_hubs": 1,
            "bad_hub_share": 1 / 3,
            "correct_share": 7 / 12,
            "hub_slot_share": 11 / 12,
            "wrong_to_bad_hubs": 4 / 5,
            "wrong_to_hubs": 5 / 5,
        }
    )
    assert len(hub_table(t2v_scores(), C2V, "t2v", k=1, top=2)) == 2


def test_v2t_counts_a_caption_as_correct_for_its_own_video():
    # 3 videos, 6 captions (2 each); each video's top-2 captions: video 0 -> 0, 1 (both its own);
    # video 1 -> 0 (wrong), 2 (own); video 2 -> 0 (wrong), 5 (own). Caption 0 is retrieved 3 times, once correctly.
    c2v = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.zeros(3, 6)
    for video, captions in enumerate([(0, 1), (0, 2), (0, 5)]):
        scores[video, list(captions)] = torch.tensor([0.9, 0.8])
    counts = hub_counts(scores, c2v, "v2t", k=2, hub_factor=1.5)  # hub: N_2 >= 3
    assert counts.n_k.tolist() == [3, 1, 1, 0, 0, 1]
    assert counts.correct.tolist() == [1, 1, 1, 0, 0, 1]
    assert counts.positives.tolist() == [1] * 6  # a caption has one positive query: its video
    rows = hub_table(scores, c2v, "v2t", k=2, hub_factor=1.5)
    assert [(r["index"], r["hub"], r["label"]) for r in rows] == [
        (0, True, "bad"),  # 1/3 correct, below the mean 4/6
        (1, False, "good"),
        (2, False, "good"),
        (5, False, "good"),
    ]
    summary = hub_summary(counts)
    assert (summary["n_hubs"], summary["n_bad_hubs"], summary["wrong_to_bad_hubs"]) == (1, 1, 1.0)


def test_counts_match_k_occurrence_and_every_positive_is_found_at_full_k():
    g = torch.Generator().manual_seed(0)
    c2v = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    sim = torch.randn(8, 5, generator=g)
    for direction, scores in (("t2v", sim), ("v2t", sim.t())):
        for k in (1, 3):
            counts = hub_counts(scores, c2v, direction, k=k, chunk_size=3)
            assert torch.equal(counts.n_k, k_occurrence(scores, k=k))
            assert (counts.correct <= counts.n_k).all()
    # with the whole gallery in every top-k, each caption's video is found once per direction
    assert int(hub_counts(sim, c2v, "t2v", k=5).correct.sum()) == 8
    assert int(hub_counts(sim.t(), c2v, "v2t", k=8).correct.sum()) == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(12, 6), C2V, "x2y", 1), "direction"),
        ((torch.zeros(12, 6), C2V[:5], "t2v", 1), "caption_to_video"),
        ((torch.zeros(12, 6), C2V, "t2v", 7), "k must be"),
        ((torch.full((12, 6), float("nan")), C2V, "t2v", 1), "NaN"),
    ],
)
def test_bad_inputs_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        hub_counts(*args)


def test_report_round_trips_and_the_plot_is_a_png(tmp_path):
    counts = hub_counts(t2v_scores(), C2V, "t2v", k=1)
    report = json.loads(json.dumps(hub_report(counts, top=3)))
    back = counts_from_report(report)
    assert torch.equal(back.n_k, counts.n_k) and torch.equal(back.correct, counts.correct)
    assert back.positives[counts.n_k > 0].tolist() == [2, 2, 2, 2]
    assert len(report["hubs"]) == 3 and report["items"]["index"] == [0, 1, 4, 5]
    flat = hub_counts(torch.zeros(12, 6) + torch.arange(6.0), C2V, "t2v", k=1)  # every caption picks video 5
    png = plot_hubs({"is": flat, "none": counts}, tmp_path / "sub" / "hubs.png", title="t")
    assert png.read_bytes()[:8] == PNG


class _Tracker:
    """Stands in for Accelerate's wandb tracker: records what is logged."""

    name = "wandb"

    def __init__(self):
        self.images: dict = {}

    def log_images(self, values: dict, step=None):
        self.images |= values


def _report() -> dict:
    sim = t2v_scores()
    rows = {"none": {"t2v": {"R@1": 50.0, "k": 1.0}, "v2t": {"R@1": 40.0, "k": 1.0}}}
    hubs = {"t2v": {"none": hub_counts(sim, C2V, "t2v", 1)}, "v2t": {"none": hub_counts(sim.t(), C2V, "v2t", 1)}}
    return {"rows": rows, "params": {"none": {"t2v": {}, "v2t": {}}}, "counts": {}, "hubs": hubs}


@pytest.mark.parametrize("hubs", [True, False])
def test_write_report_writes_and_logs_the_hub_report_only_when_asked(tmp_path, capsys, hubs):
    tracker, logged = _Tracker(), {}
    accelerator = SimpleNamespace(is_main_process=True, trackers=[tracker], log=None)
    records = [SimpleNamespace(video_id=f"v{i // 2}", caption=f"caption {i}") for i in range(12)]
    write_report(
        accelerator, _report(), tmp_path, "test", 1, 3, lambda v, step: logged.update(v), hubs, gallery_ids(records)
    )
    written = sorted(p.name for p in tmp_path.iterdir())
    if not hubs:
        assert written == ["test_metrics.json"] and not tracker.images
        assert not any("/hubs/" in key for key in logged)
        return
    assert written == [
        "test_hubs_t2v.json",
        "test_hubs_t2v.png",
        "test_hubs_v2t.json",
        "test_hubs_v2t.png",
        "test_metrics.json",
    ]
    t2v = json.loads((tmp_path / "test_hubs_t2v.json").read_text())
    assert t2v["k"] == 1 and t2v["direction"] == "t2v"
    first = t2v["methods"]["none"]["hubs"][0]
    assert (first["id"], first["n_k"], first["label"]) == ("v0", 6, "bad")
    assert json.loads((tmp_path / "test_hubs_v2t.json").read_text())["methods"]["none"]["hubs"][0]["id"].startswith("v")
    assert Path(tracker.images["test/hubs_t2v"][0]).read_bytes()[:8] == PNG
    assert logged["test/hubs/none/t2v/n_bad_hubs"] == 1 and logged["test/hubs/none/t2v/n_hubs"] == 3
    assert "bad 1" in capsys.readouterr().out


def test_good_means_at_least_the_mean_correct_share_not_a_fixed_half():
    # 8 top-1 slots, 6 correct: the boundary is 3/4, so item 0 (2 of 4 correct) is bad although half is right
    counts = HubCounts(torch.tensor([4, 2, 2]), torch.tensor([2, 2, 2]), torch.tensor([2, 2, 2]), k=1, n_queries=8)
    assert counts.is_good.tolist() == [False, True, True] and counts.is_hub.tolist() == [True, True, True]
    # an item exactly at the mean is good
    even = HubCounts(torch.tensor([4, 4, 0]), torch.tensor([2, 2, 0]), torch.tensor([1, 1, 1]), k=1, n_queries=8)
    assert even.is_good.tolist() == [True, True, False] and even.is_bad.tolist() == [False, False, False]
