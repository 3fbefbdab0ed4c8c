"""k-occurrence, skewness, hub/anti-hub occurrence, per-direction reports, table and plot (HUBNESS_METHODS.md §4)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from neighborretr.eval.hubness_metrics import (
    antihub_occurrence,
    direction_report,
    direction_report_pair,
    format_method_table,
    hub_occurrence,
    hubness_report,
    k_occurrence,
    plot_k_occurrence,
    skewness,
)
from neighborretr.eval.metrics import retrieval_metrics

SCORES_3X4 = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.0],  # top-2 {0, 2}
        [0.7, 0.1, 0.9, 0.2],  # top-2 {2, 0}
        [0.8, 0.1, 0.2, 0.9],  # top-2 {3, 0}
    ]
)  # item 1 is never retrieved -> N_2 = [3, 0, 2, 1]

# 5 captions over 2 videos: captions 0-2 show video 0, captions 3-4 video 1.
CAPTION_TO_VIDEO = torch.tensor([0, 0, 0, 1, 1])
SIM_5X2 = torch.tensor(
    [
        [0.9, 0.1],  # top-1 video 0
        [0.65, 0.6],  # top-1 video 0 (wrong)
        [0.7, 0.2],  # top-1 video 0
        [0.3, 0.8],  # top-1 video 1
        [0.5, 0.45],  # top-1 video 0 (wrong)
    ]
)  # v2t top-1: video 0 -> caption 0 (0.9), video 1 -> caption 3 (0.8)


def test_k_occurrence_hand_made_3x4():
    for chunk_size in (1, 2, 4096):
        assert k_occurrence(SCORES_3X4, k=2, chunk_size=chunk_size).tolist() == [3, 0, 2, 1]


@pytest.mark.parametrize("shape,k", [((50, 30), 5), ((20, 64), 10), ((7, 7), 7)])
def test_k_occurrence_sums_to_k_times_queries(shape, k):
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    counts = k_occurrence(scores, k=k, chunk_size=8)
    assert counts.shape == (shape[1],) and counts.dtype == torch.long
    assert int(counts.sum()) == k * shape[0]


def test_k_occurrence_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        k_occurrence(SCORES_3X4, k=5)
    with pytest.raises(ValueError, match="NaN"):
        k_occurrence(torch.tensor([[0.1, float("nan")]]), k=1)


@pytest.mark.parametrize("seed,shape,k", [(0, (100, 80), 10), (1, (40, 200), 5), (2, (300, 50), 1)])
def test_skewness_matches_scipy_on_random_matrices(seed, shape, k):
    rng = np.random.default_rng(seed)
    # A shared random "popularity" per column creates hubs, so the skewness is far from 0.
    scores = rng.standard_normal(shape) + rng.standard_normal(shape[1])[None, :]
    topk_idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    expected = stats.skew(np.bincount(topk_idx.ravel(), minlength=shape[1]))
    counts = k_occurrence(torch.from_numpy(scores), k=k)
    assert skewness(counts) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_skewness_by_hand_and_constant():
    # values [1, 0, 0, 1, 0]: mean 0.4, m2 = 0.24, m3 = 0.048 -> 0.048 / 0.24**1.5 = 1 / sqrt(6)
    assert skewness(torch.tensor([1, 0, 0, 1, 0])) == pytest.approx(1 / math.sqrt(6))
    assert skewness(torch.full((6,), 10)) == 0.0  # scipy gives NaN here; we document 0.0


def test_hub_and_antihub_occurrence_by_hand():
    counts = torch.tensor([5, 0, 1, 4, 0, 2])  # k = 2, Q = 6: 12 slots
    assert hub_occurrence(counts, k=2, n_queries=6) == pytest.approx(9 / 12)  # hubs: N >= 4 -> 5 + 4
    assert hub_occurrence(counts, k=2, n_queries=6, hub_factor=2.5) == pytest.approx(5 / 12)  # N >= 5
    assert hub_occurrence(torch.ones(6, dtype=torch.long), k=1, n_queries=6) == 0.0
    assert antihub_occurrence(counts) == pytest.approx(2 / 6)


def test_hubness_report_keys_on_3x4():
    report = hubness_report(SCORES_3X4, k=2)  # N_2 = [3, 0, 2, 1], 6 slots, hubs need N >= 4
    assert set(report) == {"skewness", "hub_occurrence", "antihub_occurrence", "k"}
    assert report["skewness"] == pytest.approx(0.0)  # symmetric around 1.5
    assert report["hub_occurrence"] == 0.0
    assert report["antihub_occurrence"] == pytest.approx(0.25)
    assert report["k"] == 2.0


def test_direction_report_multi_caption_by_hand():
    out = direction_report(SIM_5X2, CAPTION_TO_VIDEO, k=1)
    ranks = retrieval_metrics(SIM_5X2, CAPTION_TO_VIDEO)
    for d in ("t2v", "v2t"):
        assert {key: out[d][key] for key in ranks[d]} == ranks[d]
    # t2v counts videos: N_1 = [4, 1]; a two-point distribution has skew 0; hub (N >= 2) video 0 holds 4 of 5 slots.
    assert out["t2v"]["skewness"] == pytest.approx(0.0)
    assert out["t2v"]["hub_occurrence"] == pytest.approx(4 / 5)
    assert out["t2v"]["antihub_occurrence"] == 0.0
    # v2t counts captions: N_1 = [1, 0, 0, 1, 0] -> skew 1/sqrt(6), no hubs, 3 of 5 captions never retrieved.
    assert out["v2t"]["skewness"] == pytest.approx(1 / math.sqrt(6))
    assert out["v2t"]["hub_occurrence"] == 0.0
    assert out["v2t"]["antihub_occurrence"] == pytest.approx(3 / 5)


def test_direction_report_pair_uses_each_matrix():
    assert direction_report_pair(SIM_5X2, SIM_5X2.T, CAPTION_TO_VIDEO, k=1) == direction_report(
        SIM_5X2, CAPTION_TO_VIDEO, k=1
    )
    sim_v2t = torch.tensor([[0.1, 0.2, 0.9, 0.3, 0.4], [0.5, 0.1, 0.2, 0.3, 0.6]])  # top-1 captions 2 and 4
    out = direction_report_pair(SIM_5X2, sim_v2t, CAPTION_TO_VIDEO, k=1)
    assert out["t2v"] == direction_report(SIM_5X2, CAPTION_TO_VIDEO, k=1)["t2v"]
    # video 0's captions {0,1,2}: best 0.9 is first -> rank 0; video 1's {3,4}: best 0.6 is first -> rank 0
    assert out["v2t"]["R@1"] == 100.0
    assert out["v2t"]["skewness"] == pytest.approx(skewness(torch.tensor([0, 0, 1, 0, 1])))
    with pytest.raises(ValueError, match="sim_v2t"):
        direction_report_pair(SIM_5X2, SIM_5X2, CAPTION_TO_VIDEO)


def test_format_method_table_has_every_row():
    rows = {
        "none": direction_report(SIM_5X2, CAPTION_TO_VIDEO, k=1),
        "is": direction_report(SIM_5X2 * 0.5, CAPTION_TO_VIDEO, k=1),
    }
    table = format_method_table(rows, title="MSR-VTT")
    lines = table.splitlines()
    assert lines[0] == "MSR-VTT"
    assert all(col in lines[1] for col in ("R@1", "R@10", "MdR", "MnR", "Skew@1", "HubOcc", "AntiHub"))
    labels = [tuple(line.split()[:2]) for line in lines[2:]]
    assert labels == [("none", "t2v"), ("none", "v2t"), ("is", "t2v"), ("is", "v2t")]
    assert "0.600" in lines[3]  # none / v2t anti-hub occurrence, 3 decimals
    assert len({len(line) for line in lines[1:]}) == 1  # aligned


def test_plot_k_occurrence_writes_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(60, 40, generator=gen) + 2 * torch.randn(1, 40, generator=gen)
    counts = {"is": k_occurrence(torch.randn(60, 40, generator=gen), 5), "none": k_occurrence(raw, 5)}
    path = plot_k_occurrence(counts, tmp_path / "sub" / "kocc.png", k=5, title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    single = plot_k_occurrence({"qb": counts["is"]}, str(tmp_path / "single.png"), k=5)
    assert single.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
