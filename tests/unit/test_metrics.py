"""Ranks, recall and median/mean rank from similarity matrices (spec §7), with the pessimistic tie rule."""

import pytest
import torch

from neighborretr.eval.metrics import (
    V2T_PROTOCOLS,
    format_table,
    positive_ranks,
    rank_metrics,
    retrieval_metrics,
    v2t_ranks,
)

SIM_4X4 = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.2],  # t2v: nothing above 0.9 -> 0
        [0.8, 0.3, 0.1, 0.4],  # 0.8 and 0.4 above 0.3 -> 2
        [0.2, 0.7, 0.6, 0.1],  # 0.7 above 0.6 -> 1
        [0.3, 0.9, 0.8, 0.5],  # 0.9 and 0.8 above 0.5 -> 2
    ]
)  # v2t (columns): col 0 -> 0, col 1 (0.3 vs 0.7, 0.9) -> 2, col 2 (0.6 vs 0.8) -> 1, col 3 -> 0


def reference_ranks(sim, caption_to_video):
    """Plain loop: t2v and all_captions v2t 0-based ranks under the 'negatives >= best positive' rule."""
    n_text, n_video = sim.shape
    t2v, v2t = [], []
    for i in range(n_text):
        best = float(sim[i, caption_to_video[i]])
        t2v.append(sum(float(sim[i, j]) >= best for j in range(n_video) if j != caption_to_video[i]))
    for v in range(n_video):
        caps = [i for i in range(n_text) if caption_to_video[i] == v]
        best = max(float(sim[i, v]) for i in caps)
        v2t.append(sum(float(sim[i, v]) >= best for i in range(n_text) if i not in caps))
    return torch.tensor(t2v), torch.tensor(v2t)


def reference_best_caption_ranks(sim, caption_to_video):
    """Plain loop of CLIP4Clip's multi-caption v2t: a video against each video's best caption, other videos
    scoring >= its own best caption count against it."""
    n_text, n_video = sim.shape
    ranks = []
    for v in range(n_video):
        best = [max(float(sim[i, v]) for i in range(n_text) if caption_to_video[i] == u) for u in range(n_video)]
        ranks.append(sum(best[u] >= best[v] for u in range(n_video) if u != v))
    return torch.tensor(ranks)


def test_identity_is_perfect():
    out = retrieval_metrics(torch.eye(6), torch.arange(6))
    for direction in ("t2v", "v2t"):
        assert out[direction] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.0}


def test_4x4_by_hand_both_directions():
    eye = torch.eye(4, dtype=torch.bool)
    assert positive_ranks(SIM_4X4, eye).tolist() == [0, 2, 1, 2]
    assert positive_ranks(SIM_4X4.T, eye).tolist() == [0, 2, 1, 0]
    out = retrieval_metrics(SIM_4X4, torch.arange(4))
    assert out["t2v"] == pytest.approx({"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.5, "MnR": 2.25})
    assert out["v2t"] == pytest.approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.5, "MnR": 1.75})


def test_tie_with_a_negative_counts_against_the_query():
    sim = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.7, 0.7]])
    pos = torch.tensor([[True, False, False], [False, False, True]])
    assert positive_ranks(sim, pos).tolist() == [1, 1]


def test_all_equal_scores_give_the_worst_rank():
    ranks = positive_ranks(torch.zeros(3, 5), torch.eye(3, 5, dtype=torch.bool))
    assert ranks.tolist() == [4, 4, 4]
    assert rank_metrics(ranks)["R@1"] == 0.0


def test_multi_caption_v2t_uses_the_best_caption():
    caption_to_video = torch.tensor([0, 0, 0, 1, 1])
    sim = torch.tensor(
        [
            [0.9, 0.1],  # t2v 0
            [0.2, 0.6],  # t2v 1
            [0.4, 0.3],  # t2v 0
            [0.5, 0.55],  # t2v 0
            [0.8, 0.2],  # t2v 1
        ]
    )
    # v2t: video 0's best caption (0.9) beats the other captions -> 0;
    # video 1's best caption scores 0.55, below caption 1's 0.6 -> 1 (its worse caption 0.2 is ignored)
    t2v, v2t = reference_ranks(sim, caption_to_video)
    assert t2v.tolist() == [0, 1, 0, 0, 1] and v2t.tolist() == [0, 1]
    out = retrieval_metrics(sim, caption_to_video, v2t_protocol="all_captions")
    assert out["t2v"] == pytest.approx({"R@1": 60.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.4})
    assert out["v2t"] == pytest.approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.5, "MnR": 1.5})


def _random_case(seed, n_text=30, n_video=20, ties=False):
    gen = torch.Generator().manual_seed(seed)
    # every video gets one caption, then the rest are spread at random
    extra = torch.randint(0, n_video, (n_text - n_video,), generator=gen)
    caption_to_video = torch.cat([torch.arange(n_video), extra])[torch.randperm(n_text, generator=gen)]
    if ties:
        sim = torch.randint(0, 4, (n_text, n_video), generator=gen).float()
    else:
        sim = torch.randn(n_text, n_video, generator=gen)
    return sim, caption_to_video


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "many-ties"])
def test_matches_python_loop_reference(ties):
    sim, caption_to_video = _random_case(seed=3, ties=ties)
    t2v, v2t = reference_ranks(sim, caption_to_video)
    out = retrieval_metrics(sim, caption_to_video, chunk_size=7, v2t_protocol="all_captions")
    assert out == {"t2v": rank_metrics(t2v), "v2t": rank_metrics(v2t)}
    best = reference_best_caption_ranks(sim, caption_to_video)
    assert torch.equal(v2t_ranks(sim, caption_to_video, chunk_size=3, protocol="best_caption"), best)
    assert retrieval_metrics(sim, caption_to_video, chunk_size=7)["v2t"] == rank_metrics(best)  # the default
    assert (best <= v2t).all()  # collapsing a wrong video's captions can only lift a video's rank
    pos = caption_to_video[:, None] == torch.arange(sim.shape[1])[None, :]
    assert torch.equal(positive_ranks(sim, pos, chunk_size=4), t2v)
    assert torch.equal(positive_ranks(sim.T, pos.T, chunk_size=4), v2t)


def test_chunk_size_invariance():
    sim, caption_to_video = _random_case(seed=5, n_text=37, n_video=11)
    pos = caption_to_video[:, None] == torch.arange(11)[None, :]
    full = positive_ranks(sim, pos, chunk_size=sim.shape[0])
    for chunk in (1, 3, 1024):
        assert torch.equal(positive_ranks(sim, pos, chunk_size=chunk), full)
        assert retrieval_metrics(sim, caption_to_video, chunk_size=chunk) == retrieval_metrics(sim, caption_to_video)
        for protocol in V2T_PROTOCOLS:
            assert torch.equal(
                v2t_ranks(sim, caption_to_video, chunk, protocol), v2t_ranks(sim, caption_to_video, 1024, protocol)
            )


# caption_to_video [0, 0, 1, 1, 2]: rows are captions, columns videos.
SIM_PROTOCOLS = torch.tensor(
    [
        [0.5, 0.9, 0.3],
        [0.2, 0.1, 0.25],
        [0.7, 0.3, 0.1],
        [0.6, 0.8, 0.2],
        [0.4, 0.85, 0.2],
    ]
)


def test_v2t_protocols_by_hand():
    c2v = torch.tensor([0, 0, 1, 1, 2])
    # Video 0's best caption scores 0.5. all_captions: captions 2 (0.7) and 3 (0.6) of video 1 are above -> 2;
    # best_caption: video 1's best caption 0.7 is above, video 2's 0.4 is not -> 1.
    # Video 1's best is 0.8: caption 0 (0.9, video 0) and caption 4 (0.85, video 2) are above under both -> 2.
    # Video 2's only caption scores 0.2. all_captions: 0.3, 0.25 (video 0) and the tied 0.2 (video 1) -> 3;
    # best_caption: video 0's best 0.3 and video 1's best 0.2 (a tie counts against) -> 2.
    assert v2t_ranks(SIM_PROTOCOLS, c2v, protocol="all_captions").tolist() == [2, 2, 3]
    assert v2t_ranks(SIM_PROTOCOLS, c2v, protocol="best_caption").tolist() == [1, 2, 2]
    published = retrieval_metrics(SIM_PROTOCOLS, c2v)["v2t"]
    assert published == pytest.approx({"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "MdR": 3.0, "MnR": 8 / 3})
    ours_before = retrieval_metrics(SIM_PROTOCOLS, c2v, v2t_protocol="all_captions")["v2t"]
    assert ours_before == pytest.approx({"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "MdR": 3.0, "MnR": 10 / 3})
    # t2v does not depend on the protocol
    t2v = {p: retrieval_metrics(SIM_PROTOCOLS, c2v, v2t_protocol=p)["t2v"] for p in V2T_PROTOCOLS}
    assert t2v["best_caption"] == t2v["all_captions"]


def test_v2t_protocols_agree_with_one_caption_per_video():
    gen = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 3, (9, 9), generator=gen).float()  # many ties
    c2v = torch.randperm(9, generator=gen)  # one caption per video, in any order
    best = v2t_ranks(sim, c2v, chunk_size=4, protocol="best_caption")
    assert torch.equal(best, v2t_ranks(sim, c2v, chunk_size=4, protocol="all_captions"))
    assert torch.equal(best, reference_best_caption_ranks(sim, c2v))


def test_rank_metrics_recall_boundaries_and_median():
    out = rank_metrics(torch.tensor([0, 4, 5, 9, 10, 20]))
    assert out["R@1"] == pytest.approx(100 / 6)
    assert out["R@5"] == pytest.approx(200 / 6)  # ranks 0 and 4 (rank 5 is the 6th item)
    assert out["R@10"] == pytest.approx(400 / 6)
    assert out["MdR"] == 8.0  # 1-based ranks 1 5 6 10 11 21: (6 + 10) / 2
    assert out["MnR"] == pytest.approx(54 / 6)
    assert all(isinstance(v, float) for v in out.values())


def test_errors():
    with pytest.raises(ValueError, match="NaN"):
        positive_ranks(torch.tensor([[0.1, float("nan")]]), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="no positive"):
        positive_ranks(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.zeros(3, 3), torch.tensor([0, 0, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(torch.zeros(3, 3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(torch.zeros(3, 3), torch.tensor([-1, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(torch.zeros(3, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        positive_ranks(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        positive_ranks(torch.zeros(2, 2), torch.eye(2, dtype=torch.bool), chunk_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        rank_metrics(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="v2t_protocol"):
        retrieval_metrics(torch.zeros(3, 3), torch.arange(3), v2t_protocol="best")
    with pytest.raises(ValueError, match="NaN"):
        v2t_ranks(torch.tensor([[0.1, float("nan")], [0.2, 0.3]]), torch.tensor([0, 1]))


def test_format_table():
    table = format_table(
        {"t2v": {"R@1": 49.46, "R@5": 75.0, "R@10": 83.6, "MdR": 2.0, "MnR": 12.34}, "v2t": {"R@1": 48.0}},
        title="MSR-VTT",
    )
    lines = table.splitlines()
    assert lines[0] == "MSR-VTT"
    assert lines[1].split() == ["R@1", "R@5", "R@10", "MdR", "MnR"]
    assert lines[2].split() == ["t2v", "49.5", "75.0", "83.6", "2.0", "12.3"]
    assert lines[3].split() == ["v2t", "48.0", "-", "-", "-", "-"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns
