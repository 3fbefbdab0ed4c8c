"""Hubness metrics of a retrieval score matrix (HUBNESS_METHODS.md §4), next to R@K in one report.

All figures are computed on the *final* score matrix of one retrieval direction: rows are the queries, columns
the gallery items whose k-occurrence is counted (t2v: caption rows, videos counted; v2t: video rows, captions
counted). The k-occurrence ``N_k(g)`` is the number of queries that have gallery item ``g`` among their top-k
scores; its mean is always ``k * Q / G``, so only the *shape* of its distribution says anything about hubness.

Conventions (§4):

* Zero-occurrence items (anti-hubs) are **included** in every statistic, as in DBSN and scikit-hubness (the
  official DBNorm code drops them, which lowers the skewness).
* Skewness is the population (biased) estimator, scipy's default, in float64.
* Hub occurrence uses the scikit-hubness threshold ``N_k >= hub_factor * k`` and divides by ``k * Q`` (the
  number of k-NN slots), not by ``G``.
* Ties among scores are broken by :func:`torch.topk`, i.e. arbitrarily but deterministically for a given input
  and device. Unlike the pessimistic tie rule of :mod:`neighborretr.eval.metrics`, every query contributes
  exactly ``k`` slots, so ``N_k`` always sums to ``k * Q``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from neighborretr.eval.metrics import COLUMNS, rank_metrics, retrieval_metrics, t2v_ranks, v2t_ranks

HUBNESS_KEYS = ("skewness", "hub_occurrence", "antihub_occurrence")
DIRECTIONS = ("t2v", "v2t")
# Above this many distinct N_k values the histogram bins merge several integers, so a heavy hub tail does not
# turn the plot into hundreds of one-pixel bars.
MAX_HIST_BINS = 60


def k_occurrence(scores: Tensor, k: int = 10, chunk_size: int = 4096) -> Tensor:
    """k-occurrence ``N_k(g)`` of every gallery item: how many query rows rank it among their top-k scores.

    Uses :func:`torch.topk` per block of rows (no full sort), so the extra memory is O(chunk_size * k). Ties at
    the k-th score are resolved by ``torch.topk``'s own choice, so each row contributes exactly ``k`` counts.

    Args:
        scores: [Q, G] scores of Q queries against G gallery items (higher is more similar).
        k: neighbourhood size, 1 <= k <= G.
        chunk_size: number of query rows processed at once.

    Returns:
        [G] int64 counts on ``scores``'s device, summing to ``k * Q``; items never retrieved have count 0.
    """
    _check_scores(scores, k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_gallery = scores.shape[1]
    counts = torch.zeros(n_gallery, dtype=torch.long, device=scores.device)
    for start in range(0, scores.shape[0], chunk_size):
        block = scores[start : start + chunk_size]
        if torch.isnan(block).any():
            # topk ranks NaN above every number, which would silently manufacture hubs.
            row = start + int(torch.isnan(block).any(dim=1).nonzero()[0])
            raise ValueError(f"scores contain NaN (first in query row {row})")
        top = block.topk(k, dim=1, largest=True, sorted=False).indices
        # minlength keeps zero-occurrence items (anti-hubs) in the distribution.
        counts += torch.bincount(top.flatten(), minlength=n_gallery)
    return counts


def skewness(counts: Tensor) -> float:
    """Population skewness ``E[(N - mu)^3] / sigma^3`` of a k-occurrence distribution, in float64.

    Equals ``scipy.stats.skew(counts)`` (``bias=True``). Where scipy returns NaN for a (numerically) constant
    input, this returns 0.0: a perfectly uniform k-occurrence has no hubs, and a NaN would break tables and
    model selection.

    Args:
        counts: [G] k-occurrence of each gallery item (any numeric dtype), zero-occurrence items included.

    Returns:
        The skewness; positive means a long right tail of hubs, about 0 is balanced.
    """
    x = _as_counts(counts).to(torch.float64)
    mean = x.mean()
    centred = x - mean
    m2 = centred.pow(2).mean()
    # scipy's tolerance: a variance below float64 resolution relative to the mean is treated as exactly zero.
    if m2 <= (np.finfo(np.float64).resolution * mean.abs()) ** 2:
        return 0.0
    return float(centred.pow(3).mean() / m2.pow(1.5))


def hub_occurrence(counts: Tensor, k: int, n_queries: int, hub_factor: float = 2.0) -> float:
    """Share of all k-NN slots taken by hubs, the items with ``N_k >= hub_factor * k`` (scikit-hubness).

    Args:
        counts: [G] k-occurrence of each gallery item.
        k: neighbourhood size used to compute ``counts``.
        n_queries: number of query rows Q used to compute ``counts``.
        hub_factor: hub threshold ``h`` in multiples of ``k``.

    Returns:
        ``sum(N_k(g) for hubs g) / (k * Q)`` in [0, 1].
    """
    if k < 1 or n_queries < 1:
        raise ValueError(f"k and n_queries must be >= 1, got k={k}, n_queries={n_queries}")
    x = _as_counts(counts).to(torch.float64)
    hubs = x >= hub_factor * k
    return float(x[hubs].sum() / (k * n_queries))


def antihub_occurrence(counts: Tensor) -> float:
    """Fraction of gallery items that no query retrieves in its top-k.

    Args:
        counts: [G] k-occurrence of each gallery item.

    Returns:
        ``|{g : N_k(g) = 0}| / G`` in [0, 1].
    """
    x = _as_counts(counts)
    return float((x == 0).sum()) / x.numel()


def hubness_report(scores: Tensor, k: int = 10, hub_factor: float = 2.0) -> dict[str, float]:
    """Skewness, hub occurrence and anti-hub occurrence of one retrieval direction's score matrix.

    Args:
        scores: [Q, G] final scores; rows are the queries, columns the gallery items that are counted.
        k: neighbourhood size.
        hub_factor: hub threshold in multiples of ``k`` (see :func:`hub_occurrence`).

    Returns:
        ``{"skewness", "hub_occurrence", "antihub_occurrence", "k"}``; ``k`` is stored as a float so that the
        dict stays homogeneous.
    """
    counts = k_occurrence(scores, k)
    return {
        "skewness": skewness(counts),
        "hub_occurrence": hub_occurrence(counts, k, scores.shape[0], hub_factor),
        "antihub_occurrence": antihub_occurrence(counts),
        "k": float(k),
    }


def direction_report(
    sim: Tensor, caption_to_video: Tensor, k: int = 10, v2t_protocol: str = "best_caption"
) -> dict[str, dict[str, float]]:
    """R@K, ranks and hubness of both directions of one caption-by-video matrix.

    Args:
        sim: [Nt, Nv] scores; row i is caption i, column j is video j.
        caption_to_video: [Nt] int index of each caption's video; every video needs at least one caption.
        k: neighbourhood size of the hubness figures.
        v2t_protocol: the multi-caption video-to-text ranking (``metrics.V2T_PROTOCOLS``); the hubness figures
            always count captions.

    Returns:
        ``{"t2v": ..., "v2t": ...}``, each with R@1, R@5, R@10, MdR, MnR (:func:`retrieval_metrics`) and the
        keys of :func:`hubness_report`. t2v counts videos over caption rows; v2t counts captions over video rows
        (``sim`` transposed).
    """
    ranks = retrieval_metrics(sim, caption_to_video, v2t_protocol=v2t_protocol)
    return {
        "t2v": {**ranks["t2v"], **hubness_report(sim, k)},
        "v2t": {**ranks["v2t"], **hubness_report(sim.T, k)},
    }


def direction_report_pair(
    sim_t2v: Tensor, sim_v2t: Tensor, caption_to_video: Tensor, k: int = 10, v2t_protocol: str = "best_caption"
) -> dict[str, dict[str, float]]:
    """Like :func:`direction_report`, but each direction is scored on its own (e.g. differently normalised) matrix.

    Args:
        sim_t2v: [Nt, Nv] text-to-video scores; row i is caption i.
        sim_v2t: [Nv, Nt] video-to-text scores; row j is video j.
        caption_to_video: [Nt] int index of each caption's video; every video needs at least one caption.
        k: neighbourhood size of the hubness figures.
        v2t_protocol: the multi-caption video-to-text ranking (``metrics.V2T_PROTOCOLS``).

    Returns:
        ``{"t2v": ..., "v2t": ...}`` as in :func:`direction_report`.
    """
    if sim_v2t.ndim != 2 or sim_t2v.ndim != 2 or sim_v2t.shape != sim_t2v.shape[::-1]:
        raise ValueError(
            f"sim_v2t must be [Nv, Nt] = {tuple(sim_t2v.shape[::-1])} for sim_t2v of shape {tuple(sim_t2v.shape)}, "
            f"got {tuple(sim_v2t.shape)}"
        )
    # A v2t rank depends only on its own row, so the [Nt, Nv] view of sim_v2t gives the v2t ranks of that matrix.
    t2v = rank_metrics(t2v_ranks(sim_t2v, caption_to_video))
    v2t = rank_metrics(v2t_ranks(sim_v2t.T, caption_to_video, protocol=v2t_protocol))
    return {
        "t2v": {**t2v, **hubness_report(sim_t2v, k)},
        "v2t": {**v2t, **hubness_report(sim_v2t, k)},
    }


def format_method_table(rows: dict[str, dict[str, dict[str, float]]], title: str | None = None) -> str:
    """Aligned plain-text table with one line per (method, direction).

    Columns: R@1 R@5 R@10 MdR MnR (1 decimal), Skew@k (2 decimals), HubOcc and AntiHub (3 decimals). The skew
    header shows the actual k when every line shares it. A missing metric or direction is shown as ``-``.

    Args:
        rows: method name (``"none"``, ``"is"``, ...) -> ``{"t2v": metrics, "v2t": metrics}``, e.g. the output
            of :func:`direction_report`.
        title: optional first line.

    Returns:
        The table, lines joined by newlines, no trailing newline.
    """
    columns = [(c, c, "{:.1f}") for c in COLUMNS] + [
        (_skew_header(rows), "skewness", "{:.2f}"),
        ("HubOcc", "hub_occurrence", "{:.3f}"),
        ("AntiHub", "antihub_occurrence", "{:.3f}"),
    ]
    directions = [d for d in DIRECTIONS if any(d in r for r in rows.values())] or list(DIRECTIONS)
    body = [
        [method, d] + [fmt.format(r[d][key]) if key in r.get(d, {}) else "-" for _, key, fmt in columns]
        for method, r in rows.items()
        for d in directions
    ]
    header = ["method", "dir"] + [name for name, _, _ in columns]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [title] if title else []
    for line in [header, *body]:
        # Labels left-aligned, numbers right-aligned, two spaces between columns.
        cells = [c.ljust(w) for c, w in zip(line[:2], widths[:2])] + [c.rjust(w) for c, w in zip(line[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _skew_header(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    ks = {m["k"] for r in rows.values() for m in r.values() if "k" in m}
    return f"Skew@{int(ks.pop())}" if len(ks) == 1 else "Skew@k"


def plot_k_occurrence(
    counts: dict[str, Tensor],
    path: str | Path,
    k: int,
    title: str | None = None,
    hub_factor: float = 2.0,
    log_y: bool = False,
) -> Path:
    """Overlaid step histograms of the k-occurrence distribution of several methods, saved as one PNG.

    Drawn on a bare :class:`matplotlib.figure.Figure` (no pyplot), so it neither needs nor changes the global
    backend. ``"none"`` (raw scores) is drawn first, in black, then the other methods in dict order. A dashed line
    marks the hub threshold ``hub_factor * k``. Bins are one N_k value wide, or several once the largest N_k
    would need more than ``MAX_HIST_BINS`` bins.

    Args:
        counts: method name -> [G] k-occurrence of that method (see :func:`k_occurrence`).
        path: output PNG path; missing parent directories are created.
        k: neighbourhood size the counts were computed with (axis label and hub threshold).
        title: optional plot title.
        hub_factor: hub threshold in multiples of ``k``; ``<= 0`` draws no line.
        log_y: log-scale the item counts, which makes the sparse hub tail visible next to the bulk near ``k``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    draw_k_occurrence(ax, counts, k, hub_factor=hub_factor, log_y=log_y, legend=False)
    ax.set_xlabel(f"$N_{{{k}}}$ (number of queries with the item in their top-{k})")
    ax.set_ylabel("number of gallery items")
    ax.set_title(title or f"k-occurrence distribution (k = {k})")
    ax.legend(frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def _raw_first(counts: dict[str, Tensor]) -> dict[str, Tensor]:
    """``counts`` with ``"none"`` (the unnormalised baseline) moved to the front, so it is drawn underneath."""
    return {**({"none": counts["none"]} if "none" in counts else {}), **counts}


def _integer_bin_edges(max_count: int) -> np.ndarray:
    """Bin edges centred on integers 0..max_count, merging integers when there would be > MAX_HIST_BINS bins."""
    width = max(1, math.ceil((max_count + 1) / MAX_HIST_BINS))
    return np.arange(-0.5, max_count + width + 0.5, width)


def _as_counts(counts: Tensor) -> Tensor:
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    return counts


def _check_scores(scores: Tensor, k: int) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D [queries, gallery] matrix, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}] (the gallery size), got {k}")


def draw_k_occurrence(
    ax, counts: dict[str, Tensor], k: int, hub_factor: float = 2.0, log_y: bool = False, legend: bool = True
) -> None:
    """Draws the step histograms of :func:`plot_k_occurrence` onto an existing matplotlib axes, for figures
    with several panels (e.g. :func:`neighborretr.eval.hub_report.plot_hubs`); same bins, styles and labels.

    Args:
        ax: a matplotlib ``Axes``.
        counts: method name -> [G] k-occurrence.
        k, hub_factor, log_y: as in :func:`plot_k_occurrence`.
        legend: whether to draw the legend.
    """
    if not counts:
        raise ValueError("counts is empty; give at least one method")
    arrays = {name: _as_counts(c).detach().cpu().numpy() for name, c in _raw_first(counts).items()}
    edges = _integer_bin_edges(max(int(a.max()) for a in arrays.values()))
    for name, values in arrays.items():
        style = {"color": "black", "linewidth": 2.0} if name == "none" else {"linewidth": 1.6}
        ax.hist(
            values,
            bins=edges,
            histtype="step",
            label=f"{name} (skew {skewness(torch.from_numpy(values)):.2f})",
            **style,
        )
    if hub_factor > 0:
        ax.axvline(
            hub_factor * k, color="grey", linestyle="--", linewidth=1.0, label=f"hub threshold ({hub_factor:g}k)"
        )
    ax.set_xlabel(f"$N_{{{k}}}$")
    ax.set_ylabel("gallery items")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(frameon=False, fontsize="small")
