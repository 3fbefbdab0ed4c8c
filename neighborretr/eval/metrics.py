"""Retrieval metrics from a similarity matrix: R@1/5/10, median and mean rank (spec §7).

Tie rule: the 0-based rank of a query is the number of *negative* gallery items whose score is ``>=`` the best
score among the query's *positive* items. Ties therefore count against the query (pessimistic), the result is
deterministic and independent of the gallery order, and an all-equal row gets the worst rank instead of a
spurious R@1. (The official ``compute_metrics`` matches ties by float equality, which is order dependent and can
emit several ranks for one row; the two rules agree whenever there are no ties.)

Video-to-text with several captions per video (MSVD) has two protocols (:data:`V2T_PROTOCOLS`):

* ``"best_caption"`` (default, published): the CLIP4Clip protocol that the official code uses
  (``tensor_video_to_text_sim``). Each video u's captions are collapsed into one gallery entry scored by its best
  caption, ``g(v, u) = max_{c of u} s(c, v)``, and video v is ranked among the V entries: its rank counts the
  *other videos* u whose best caption scores ``>= g(v, v)``.
* ``"all_captions"``: every caption is a gallery item; video v's rank counts every *caption* of another video
  scoring ``>=`` v's best caption. Two captions of one wrong video both count, so ranks are ``>=`` those of
  ``best_caption`` (R@K lower or equal, MnR higher or equal); not comparable to published numbers.

With one caption per video the two are identical.

Ranks are computed in row chunks, so the extra memory is O(chunk_size * G) on top of the matrix itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)
COLUMNS = ("R@1", "R@5", "R@10", "MdR", "MnR")
V2T_PROTOCOLS = ("best_caption", "all_captions")

# (start, stop) of a block of query rows -> their BoolTensor [stop - start, G] of positives
PositivesFn = Callable[[int, int], Tensor]


def positive_ranks(sim: Tensor, positives: Tensor, chunk_size: int = 1024) -> Tensor:
    """0-based rank of each query's best positive, with the pessimistic tie rule of the module docstring.

    Args:
        sim: [Q, G] scores of Q queries against G gallery items (higher is more similar).
        positives: [Q, G] bool, True where the gallery item is a correct match for the query; every row
            needs at least one True.
        chunk_size: number of query rows processed at once.

    Returns:
        [Q] int64 ranks in [0, G - 1], on ``sim``'s device.
    """
    _check_sim(sim)
    if positives.shape != sim.shape:
        raise ValueError(f"positives has shape {tuple(positives.shape)}, expected {tuple(sim.shape)}")
    if positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool tensor, got {positives.dtype}")
    positives = positives.to(sim.device)
    return _chunked_ranks(sim, lambda start, stop: positives[start:stop], chunk_size)


def _chunked_ranks(sim: Tensor, positives_fn: PositivesFn, chunk_size: int) -> Tensor:
    """Ranks of the rows of ``sim`` [Q, G], with the positive mask of each row block built by ``positives_fn``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ranks = [torch.empty(0, dtype=torch.long, device=sim.device)]
    for start in range(0, sim.shape[0], chunk_size):
        scores = sim[start : start + chunk_size]
        pos = positives_fn(start, start + scores.shape[0])
        _check_chunk(scores, pos, start)
        ranks.append(_block_ranks(scores, pos))
    return torch.cat(ranks)


def _block_ranks(scores: Tensor, pos: Tensor) -> Tensor:
    """[C] count of negatives in ``scores`` [C, G] scoring >= the row's best positive (``pos`` [C, G])."""
    best = scores.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~pos).sum(dim=1)


def check_v2t_protocol(protocol: str) -> None:
    """Raise ``ValueError`` unless ``protocol`` is one of :data:`V2T_PROTOCOLS`."""
    if protocol not in V2T_PROTOCOLS:
        raise ValueError(f"v2t_protocol must be one of {', '.join(V2T_PROTOCOLS)}, got {protocol!r}")


def _check_sim(sim: Tensor) -> None:
    if sim.ndim != 2:
        raise ValueError(f"sim must be a 2-D [queries, gallery] matrix, got shape {tuple(sim.shape)}")
    if not sim.is_floating_point():
        raise ValueError(f"sim must be a floating-point tensor, got {sim.dtype}")


def _check_chunk(scores: Tensor, pos: Tensor, start: int) -> None:
    """Checked per chunk so that no full-size [Q, G] temporary is allocated."""
    if torch.isnan(scores).any():
        row = start + int(torch.isnan(scores).any(dim=1).nonzero()[0])
        raise ValueError(f"sim contains NaN (first in query row {row})")
    missing = ~pos.any(dim=1)
    if missing.any():
        row = start + int(missing.nonzero()[0])
        raise ValueError(f"query row {row} has no positive gallery item; every query needs at least one")


def rank_metrics(ranks: Tensor) -> dict[str, float]:
    """Recall@K and median/mean rank from 0-based ranks.

    Args:
        ranks: [Q] 0-based rank of each query's ground truth.

    Returns:
        ``R@1``, ``R@5``, ``R@10`` in percent (``100 * mean(rank < K)``); ``MdR`` and ``MnR``, the median
        (numpy's, so an even count averages the two middle values) and mean of the 1-based ranks.
    """
    if ranks.ndim != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}")
    r = ranks.detach().cpu().numpy().astype(np.float64)
    metrics = {f"R@{k}": float(100.0 * np.mean(r < k)) for k in RECALL_KS}
    metrics["MdR"] = float(np.median(r) + 1.0)
    metrics["MnR"] = float(np.mean(r) + 1.0)
    return metrics


def retrieval_metrics(
    sim: Tensor, caption_to_video: Tensor, chunk_size: int = 1024, v2t_protocol: str = "best_caption"
) -> dict[str, dict[str, float]]:
    """Text-to-video and video-to-text metrics of a caption-by-video similarity matrix.

    Args:
        sim: [Nt, Nv] scores; row i is caption i, column j is video j.
        caption_to_video: [Nt] int index of each caption's video; every video needs at least one caption.
        chunk_size: number of query rows processed at once in each direction.
        v2t_protocol: how a video is ranked against several captions per video, one of :data:`V2T_PROTOCOLS`
            (see the module docstring); irrelevant with one caption per video.

    Returns:
        ``{"t2v": ..., "v2t": ...}``, each the dict of :func:`rank_metrics`. For t2v a caption's only positive
        is its video; for v2t the queries are the videos (``sim`` transposed), ranked by ``v2t_protocol``.
    """
    check_v2t_protocol(v2t_protocol)
    t2v = t2v_ranks(sim, caption_to_video, chunk_size)
    return {"t2v": rank_metrics(t2v), "v2t": rank_metrics(v2t_ranks(sim, caption_to_video, chunk_size, v2t_protocol))}


def t2v_ranks(sim: Tensor, caption_to_video: Tensor, chunk_size: int = 1024) -> Tensor:
    """[Nt] 0-based text-to-video rank of each caption (its only positive is its video).

    Args:
        sim: [Nt, Nv] caption-by-video scores.
        caption_to_video: [Nt] video index of each caption (every video needs one).
        chunk_size: captions processed at once.
    """
    _check_sim(sim)
    video_of = _check_caption_to_video(caption_to_video, sim.shape).to(sim.device)
    videos = torch.arange(sim.shape[1], device=sim.device)
    # Masks are built per chunk, so no full [Nt, Nv] bool matrix is allocated.
    return _chunked_ranks(sim, lambda a, b: video_of[a:b, None] == videos[None, :], chunk_size)


def v2t_ranks(sim: Tensor, caption_to_video: Tensor, chunk_size: int = 1024, protocol: str = "best_caption") -> Tensor:
    """[Nv] 0-based video-to-text rank of each video under ``protocol`` (module docstring).

    Args:
        sim: [Nt, Nv] caption-by-video scores.
        caption_to_video: [Nt] video index of each caption (every video needs one).
        chunk_size: videos processed at once; ``best_caption`` then needs O(Nt * chunk_size) extra memory.
        protocol: one of :data:`V2T_PROTOCOLS`.
    """
    check_v2t_protocol(protocol)
    _check_sim(sim)
    video_of = _check_caption_to_video(caption_to_video, sim.shape).to(sim.device)
    videos = torch.arange(sim.shape[1], device=sim.device)
    if protocol == "all_captions":
        return _chunked_ranks(sim.T, lambda a, b: videos[a:b, None] == video_of[None, :], chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ranks = [torch.empty(0, dtype=torch.long, device=sim.device)]
    for start in range(0, sim.shape[1], chunk_size):
        block = best_caption_scores(sim[:, start : start + chunk_size], video_of)  # [C, Nv]
        own = videos[start : start + block.shape[0], None] == videos[None, :]
        _check_chunk(block, own, start)
        ranks.append(_block_ranks(block, own))
    return torch.cat(ranks)


def best_caption_scores(sim: Tensor, caption_to_video: Tensor) -> Tensor:
    """[C, Nv] score of each video query against each video's best caption (CLIP4Clip's v2t matrix).

    Args:
        sim: [Nt, C] scores of every caption against C query videos (columns of the full [Nt, Nv] matrix).
        caption_to_video: [Nt] int64 video index of each caption, covering all Nv videos.

    Returns:
        ``out[v, u] = max over captions c of video u of sim[c, v]``.
    """
    n_video = int(caption_to_video.max()) + 1
    index = caption_to_video[:, None].expand_as(sim)
    groups = sim.new_empty(n_video, sim.shape[1])
    # include_self=False: every group has a caption, so the uninitialised values never survive.
    groups.scatter_reduce_(0, index, sim, reduce="amax", include_self=False)
    return groups.T


def _check_caption_to_video(caption_to_video: Tensor, shape: torch.Size) -> Tensor:
    """Validate ``caption_to_video`` against ``sim``'s [Nt, Nv] shape and return it as int64."""
    n_text, n_video = shape
    if caption_to_video.shape != (n_text,):
        raise ValueError(f"caption_to_video has shape {tuple(caption_to_video.shape)}, expected ({n_text},)")
    if caption_to_video.is_floating_point() or caption_to_video.dtype == torch.bool:
        raise ValueError(f"caption_to_video must hold integer indices, got {caption_to_video.dtype}")
    video_of = caption_to_video.long()
    if n_text and (video_of.min() < 0 or video_of.max() >= n_video):
        raise ValueError(
            f"caption_to_video values must be in [0, {n_video}), got [{int(video_of.min())}, {int(video_of.max())}]"
        )
    counts = torch.bincount(video_of.cpu(), minlength=n_video)
    if (counts == 0).any():
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"{len(empty)} video(s) have no caption (first: {empty[:5]}); every video needs one")
    return video_of


def format_table(results: dict[str, dict[str, float]], title: str | None = None) -> str:
    """Plain-text table with one row per key of ``results`` and columns R@1 R@5 R@10 MdR MnR (1 decimal).

    A metric missing from a row is shown as ``-``.
    """
    label_width = max([len(k) for k in results] + [0])
    width = max(len(c) for c in COLUMNS) + 2
    lines = [title] if title else []
    lines.append(" " * label_width + "".join(c.rjust(width) for c in COLUMNS))
    for row, metrics in results.items():
        cells = (f"{metrics[c]:.1f}" if c in metrics else "-" for c in COLUMNS)
        lines.append(row.ljust(label_width) + "".join(cell.rjust(width) for cell in cells))
    return "\n".join(lines)
