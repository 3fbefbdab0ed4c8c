"""Hubness normalisation inside evaluation: bank similarities for our token-wise model, β selection on the
validation split, and one report with a row per method and direction.

Directions and banks (HUBNESS_METHODS §1.2):
- t2v: queries are test captions, the gallery is test videos; the query bank is training captions and the
  gallery bank is training videos (video-video similarity).
- v2t: queries are test videos, the gallery is test captions; the query bank is training videos and the gallery
  bank is training captions (caption-caption similarity).

Intra-modal similarity. The model scores text against video with a token-wise head and has no video-video score
of its own. We define one from the same head: each clip (or caption) is summarised by the average of its
L2-normalised tokens weighted by the head's own token weights (the softmax over valid tokens that the
cross-modal score uses), re-normalised; the intra-modal similarity is the cosine of two summaries. It is on the
cosine scale like the cross-modal score, symmetric, 1 for an item with itself, and ignores padded tokens.

Multi-caption test sets need no reshaping: matrices stay [captions, videos] and metrics read the
caption-to-video map, so every method normalises the full matrix.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neighborretr.eval.hubness import METHODS, normalize
from neighborretr.eval.hubness_metrics import direction_report_pair, k_occurrence
from neighborretr.eval.metrics import retrieval_metrics

# β / τ / NNN grids searched on the validation split (cosine scale). NNN's α spans the paper's range (0.25-0.5
# with out-of-domain banks, 0.75 in-domain); its k values larger than the query bank are dropped.
DEFAULT_GRID = {
    "beta_query_bank": (5.0, 10.0, 20.0, 50.0, 100.0),
    "beta_gallery_bank": (0.5, 1.0, 3.0, 10.0),
    "tau": (0.01, 0.02, 0.05, 0.1),
    "nnn_alpha": (0.25, 0.5, 0.75, 1.0),
    "nnn_k": (1, 8, 16, 64),
}
# Which grid axes each method uses.
METHOD_PARAMS = {
    "none": (),
    "is": ("beta_query_bank",),
    "dis": ("beta_query_bank",),
    "dualis": ("beta_query_bank", "beta_gallery_bank"),
    "dualdis": ("beta_query_bank", "beta_gallery_bank"),
    "sn": ("tau",),
    "dbsn": ("tau",),
    "nnn": ("nnn_alpha", "nnn_k"),
}


@torch.no_grad()
def pooled_tokens(tokens: Tensor, mask: Tensor, token_weights: nn.Module) -> Tensor:
    """[N, T, D] tokens and [N, T] mask -> [N, D] unit summaries (head-weighted mean of unit tokens)."""
    weights = token_weights(tokens, mask)  # [N, T], zero on padding, rows sum to 1
    summary = torch.einsum("nt,ntd->nd", weights, F.normalize(tokens.float(), dim=-1))
    return F.normalize(summary, dim=-1)


@torch.no_grad()
def intra_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity [Na, Nb] of unit summaries a [Na, D] and b [Nb, D]."""
    return a @ b.t()


@torch.no_grad()
def split_matrices(model: nn.Module, test: dict, bank: dict, device: torch.device, chunk_size: int = 256) -> dict:
    """All similarity matrices the methods need, in both directions, on the cosine scale, left on `device` so
    that the normalisations and metrics run there too (the GPU when there is one).

    Args:
        test, bank: encoded features {"text", "text_mask", "video", "video_mask"} (see `encode_split`).

    Returns:
        {"t2v": {"sim", "query_bank", "gallery_bank", "query_gallery_bank"}, "v2t": {...}} with
        t2v sim [Nt, Nv], query_bank [Bq, Nv], gallery_bank [Bv, Nv], query_gallery_bank [Bq, Bv], and the
        v2t counterparts [Nv, Nt], [Bv, Nt], [Bq, Nt], [Bv, Bq].
    """

    def cross(texts: dict, videos: dict) -> Tensor:
        args = [t.to(device) for t in (texts["text"], texts["text_mask"], videos["video"], videos["video_mask"])]
        return model.chunked_similarity(*args, chunk_size=chunk_size)

    def pooled(feats: dict, kind: str) -> Tensor:
        head = model.sim_head.text_weights if kind == "text" else model.sim_head.video_weights
        return pooled_tokens(feats[kind].to(device), feats[f"{kind}_mask"].to(device), head)

    sim = cross(test, test)
    bank_text_test_video = cross(bank, test)  # [Bq, Nv]
    test_text_bank_video = cross(test, bank)  # [Nt, Bv]
    bank_text_bank_video = cross(bank, bank)  # [Bq, Bv]
    test_v, bank_v = pooled(test, "video"), pooled(bank, "video")
    test_t, bank_t = pooled(test, "text"), pooled(bank, "text")
    return {
        "t2v": {
            "sim": sim,
            "query_bank": bank_text_test_video,
            "gallery_bank": intra_similarity(bank_v, test_v),
            "query_gallery_bank": bank_text_bank_video,
        },
        "v2t": {
            "sim": sim.t().contiguous(),
            "query_bank": test_text_bank_video.t().contiguous(),
            "gallery_bank": intra_similarity(bank_t, test_t),
            "query_gallery_bank": bank_text_bank_video.t().contiguous(),
        },
    }


def apply_method(matrices: dict, method: str, params: dict) -> Tensor:
    """Normalised [queries, gallery] scores of one direction's matrices with one method and its parameters."""
    return normalize(
        matrices["sim"],
        method,
        query_bank=matrices["query_bank"],
        gallery_bank=matrices["gallery_bank"],
        query_gallery_bank=matrices["query_gallery_bank"],
        **params,
    )


def _grid(method: str, grid: dict, n_query_bank: int) -> list[dict]:
    """Every combination of the method's grid axes; NNN's k is capped by the query bank's rows."""
    axes = METHOD_PARAMS[method]
    candidates = [dict(zip(axes, values)) for values in itertools.product(*(grid[a] for a in axes))]
    if "nnn_k" not in axes:
        return candidates
    fitting = [c for c in candidates if c["nnn_k"] <= n_query_bank]
    # A bank smaller than every k: average over the whole bank rather than fail.
    return fitting or [c | {"nnn_k": n_query_bank} for c in candidates if c["nnn_k"] == min(grid["nnn_k"])]


def _recall(scores: Tensor, direction: str, caption_to_video: Tensor, v2t_protocol: str) -> tuple[float, float]:
    """(R@1, R@5) of one direction's [queries, gallery] scores."""
    as_t2v = scores if direction == "t2v" else scores.t()  # retrieval_metrics takes [captions, videos]
    report = retrieval_metrics(as_t2v, caption_to_video, v2t_protocol=v2t_protocol)[direction]
    return report["R@1"], report["R@5"]


def select_parameters(
    val: dict,
    caption_to_video: Tensor,
    methods: list[str],
    grid: dict | None = None,
    v2t_protocol: str = "best_caption",
) -> dict:
    """Grid-searches each method's parameters on the validation matrices, per direction, by R@1 (then R@5).

    Args:
        val: the validation split's :func:`split_matrices`.
        caption_to_video: [Nt] video index of each validation caption.
        methods: names from ``hubness.METHODS``.
        grid: axes that replace those of :data:`DEFAULT_GRID` (the others keep their defaults).
        v2t_protocol: the multi-caption video-to-text ranking the v2t recalls use (``metrics.V2T_PROTOCOLS``).

    Returns:
        {method: {"t2v": params, "v2t": params}}; the test split is never looked at.
    """
    grid = DEFAULT_GRID | (grid or {})
    caption_to_video = caption_to_video.to(val["t2v"]["sim"].device)
    chosen: dict = {}
    for method in methods:
        chosen[method] = {}
        for direction in ("t2v", "v2t"):
            candidates = _grid(method, grid, val[direction]["query_bank"].shape[0])
            scored = [
                (_recall(apply_method(val[direction], method, p), direction, caption_to_video, v2t_protocol), p)
                for p in candidates
            ]
            chosen[method][direction] = max(scored, key=lambda item: item[0])[1]
    return chosen


def normalized_report(
    test: dict,
    caption_to_video: Tensor,
    methods: list[str],
    params: dict,
    k: int = 10,
    v2t_protocol: str = "best_caption",
) -> tuple[dict, dict]:
    """Applies every method with its selected parameters to the test matrices.

    Args:
        v2t_protocol: the multi-caption video-to-text ranking (``metrics.V2T_PROTOCOLS``).

    Returns:
        (rows {method: {"t2v": metrics, "v2t": metrics}}, counts {direction: {method: k-occurrence [G]}}).
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown normalisation(s) {unknown}; choose from {list(METHODS)}")
    rows, counts = {}, {"t2v": {}, "v2t": {}}
    caption_to_video = caption_to_video.to(test["t2v"]["sim"].device)
    k = effective_k(k, test["t2v"]["sim"].shape)
    for method in methods:
        scores = {d: apply_method(test[d], method, params.get(method, {}).get(d, {})) for d in ("t2v", "v2t")}
        rows[method] = direction_report_pair(scores["t2v"], scores["v2t"], caption_to_video, k, v2t_protocol)
        for direction in ("t2v", "v2t"):
            counts[direction][method] = k_occurrence(scores[direction], k=k).cpu()
    return rows, counts


def effective_k(k: int, shape: tuple[int, int]) -> int:
    """k of the hubness figures, capped by the smaller gallery (videos for t2v, captions for v2t) so that tiny
    splits still get a report; the value used is stored in every row as "k"."""
    return max(1, min(k, *shape))
