"""Good hubs and bad hubs of one retrieval direction: which gallery items are retrieved most often, and whether
those retrievals are correct (NeighborRetr's central picture, paper Fig. 2).

Definitions (k and the hub threshold follow :mod:`neighborretr.eval.hubness_metrics`):

* An *appearance* of gallery item ``g`` is one query that has ``g`` among its top-k scores; ``N_k(g)`` counts
  them (the k-occurrence). It is *correct* when ``g`` is one of that query's positives: t2v (queries are
  captions, the gallery is videos) the caption's own video; v2t (queries are videos, the gallery is captions)
  any caption of the query video.
* A *hub* is an item with ``N_k >= hub_factor * k`` (scikit-hubness, ``hub_factor = 2`` as in the hub
  occurrence figure).
* An item is *good* when its correct share ``correct / N_k`` is at least the share of correct appearances over
  all ``k * Q`` top-k slots of the matrix (the slot-weighted gallery mean), and *bad* otherwise. A relative rule
  is needed because with k > 1 most slots are wrong by construction (a t2v query has one positive among its k),
  so a fixed threshold such as 1/2 would call every hub bad. A good hub is retrieved at least as precisely as an
  average slot; a bad hub draws more than its share of wrong retrievals. Items never retrieved get no label.

An item can be retrieved correctly at most once per positive query it has (``positives``: its captions for a t2v
video, 1 for a v2t caption). Where every item has a single positive (v2t; t2v on one-caption splits such as
MSR-VTT 1k-A) a hub's correct share is at most ``1 / (hub_factor * k)`` while the mean is ``R@k / k``, so once
R@k exceeds 1 / hub_factor (50 %) every hub is bad by arithmetic: there the picture's message is how many hubs
there are and how many wrong retrievals they take (``wrong_to_hubs``), and good hubs appear on multi-caption
splits. ``max_positives`` in the summary says which case a report is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from neighborretr.eval.hubness_metrics import draw_k_occurrence

DIRECTIONS = ("t2v", "v2t")


@dataclasses.dataclass(frozen=True)
class HubCounts:
    """Per-gallery-item appearance counts of one direction's score matrix.

    Attributes:
        n_k: [G] int64 k-occurrence of each gallery item (sums to ``k * n_queries``).
        correct: [G] int64 number of those appearances that are a positive of their query (``<= n_k``).
        positives: [G] int64 number of queries that have the item as a positive (its most possible ``correct``).
        k: neighbourhood size.
        n_queries: number of query rows Q.
        hub_factor: hub threshold in multiples of k.
    """

    n_k: Tensor
    correct: Tensor
    positives: Tensor
    k: int
    n_queries: int
    hub_factor: float = 2.0

    @property
    def wrong(self) -> Tensor:
        """[G] appearances that are not a positive of their query."""
        return self.n_k - self.correct

    @property
    def mean_correct_share(self) -> float:
        """Share of all ``k * Q`` top-k slots that hold a positive: the good/bad boundary."""
        return float(self.correct.sum()) / float(self.n_k.sum())

    @property
    def is_hub(self) -> Tensor:
        """[G] bool, ``N_k >= hub_factor * k``."""
        return self.n_k >= self.hub_factor * self.k

    @property
    def is_good(self) -> Tensor:
        """[G] bool, correct share >= the mean correct share (False for items never retrieved)."""
        # correct / n_k >= m  <=>  correct >= m * n_k (no division by a zero N_k); the 1e-12 absorbs float error
        # for items exactly at the mean.
        return (self.n_k > 0) & (self.correct.double() >= self.mean_correct_share * self.n_k.double() - 1e-12)

    @property
    def is_bad(self) -> Tensor:
        """[G] bool, retrieved at least once with a correct share below the mean."""
        return (self.n_k > 0) & ~self.is_good


def hub_counts(
    scores: Tensor, caption_to_video: Tensor, direction: str, k: int, hub_factor: float = 2.0, chunk_size: int = 4096
) -> HubCounts:
    """k-occurrence and correct appearances of every gallery item, in one top-k pass over the query rows.

    The top-k sets come from the same :func:`torch.topk` call as :func:`hubness_metrics.k_occurrence`, so
    ``n_k`` equals it exactly (ties included).

    Args:
        scores: [Q, G] scores, rows are queries. t2v: [Nt, Nv] (caption rows); v2t: [Nv, Nt] (video rows).
        caption_to_video: [Nt] video index of each caption.
        direction: "t2v" or "v2t".
        k: neighbourhood size, 1 <= k <= G.
        hub_factor: hub threshold in multiples of k.
        chunk_size: query rows per top-k block (memory O(chunk_size * k)).

    Returns:
        The :class:`HubCounts` (tensors on the CPU).
    """
    _check(scores, caption_to_video, direction, k)
    c2v = caption_to_video.to(scores.device)
    n_gallery = scores.shape[1]
    n_k = torch.zeros(n_gallery, dtype=torch.long, device=scores.device)
    correct = torch.zeros_like(n_k)
    for start in range(0, scores.shape[0], chunk_size):
        block = scores[start : start + chunk_size]
        if torch.isnan(block).any():  # topk ranks NaN first, which would manufacture hubs
            raise ValueError(f"scores contain NaN (in query rows {start}..{start + len(block) - 1})")
        top = block.topk(k, dim=1, largest=True, sorted=False).indices  # [b, k]
        queries = torch.arange(start, start + len(block), device=scores.device)[:, None]  # [b, 1]
        # t2v: the caption's video is the positive; v2t: a caption is positive when it describes the query video.
        positive = top == c2v[queries] if direction == "t2v" else c2v[top] == queries  # [b, k]
        n_k += torch.bincount(top.flatten(), minlength=n_gallery)
        correct += torch.bincount(top[positive], minlength=n_gallery)
    # t2v: a video is the positive of each of its captions; v2t: a caption is the positive of its one video.
    positives = torch.bincount(c2v, minlength=n_gallery) if direction == "t2v" else torch.ones_like(n_k)
    return HubCounts(n_k.cpu(), correct.cpu(), positives.cpu(), k, scores.shape[0], hub_factor)


def hub_rows(counts: HubCounts, top: int = 20, ids: Sequence[str] | None = None) -> list[dict]:
    """The `top` most retrieved gallery items (N_k descending, then index), never-retrieved items left out.

    Args:
        counts: see :func:`hub_counts`.
        top: number of rows.
        ids: optional [G] names of the gallery items (video ids, captions), added as "id".

    Returns:
        One dict per item: rank, index, [id], n_k, correct, wrong, positives, correct_share, hub (bool) and label
        ("good" or "bad", see the module docstring).
    """
    if ids is not None and len(ids) != len(counts.n_k):
        raise ValueError(f"ids has {len(ids)} names for a gallery of {len(counts.n_k)} items")
    # A stable sort of -N_k keeps equal counts in index order, so the table is deterministic.
    order = torch.sort(-counts.n_k, stable=True).indices
    order = order[counts.n_k[order] > 0][:top].tolist()
    good, hub = counts.is_good, counts.is_hub
    rows = []
    for rank, g in enumerate(order, start=1):
        n, c = int(counts.n_k[g]), int(counts.correct[g])
        row = {"rank": rank, "index": g, **({"id": str(ids[g])} if ids is not None else {})}
        row |= {"n_k": n, "correct": c, "wrong": n - c, "positives": int(counts.positives[g]), "correct_share": c / n}
        rows.append(row | {"hub": bool(hub[g]), "label": "good" if good[g] else "bad"})
    return rows


def hub_summary(counts: HubCounts) -> dict[str, float]:
    """Headline numbers of the good/bad hub split.

    Returns:
        k, hub_factor, n_queries, n_gallery, max_positives (the most positives of any item); n_hubs,
        n_good_hubs, n_bad_hubs; bad_hub_share (bad hubs / hubs, 0 without hubs); correct_share (share of all
        top-k slots that are correct, the good/bad boundary); hub_slot_share (share of all slots taken by hubs,
        the hub occurrence); wrong_to_bad_hubs (share of the wrong slots that go to bad hubs); wrong_to_hubs
        (share of the wrong slots that go to any hub).
    """
    hub, bad = counts.is_hub, counts.is_bad
    wrong = counts.wrong
    n_hubs = int(hub.sum())
    n_bad = int((hub & bad).sum())
    total_wrong = max(int(wrong.sum()), 1)  # a perfect matrix has no wrong slot: shares of 0, not NaN
    return {
        "k": counts.k,
        "hub_factor": counts.hub_factor,
        "n_queries": counts.n_queries,
        "n_gallery": len(counts.n_k),
        "max_positives": int(counts.positives.max()),
        "n_hubs": n_hubs,
        "n_good_hubs": n_hubs - n_bad,
        "n_bad_hubs": n_bad,
        "bad_hub_share": n_bad / n_hubs if n_hubs else 0.0,
        "correct_share": counts.mean_correct_share,
        "hub_slot_share": float(counts.n_k[hub].sum()) / float(counts.n_k.sum()),
        "wrong_to_bad_hubs": float(wrong[hub & bad].sum()) / total_wrong,
        "wrong_to_hubs": float(wrong[hub].sum()) / total_wrong,
    }


def hub_table(
    scores: Tensor,
    caption_to_video: Tensor,
    direction: str,
    k: int,
    top: int = 20,
    ids: Sequence[str] | None = None,
    hub_factor: float = 2.0,
) -> list[dict]:
    """The hub rows (:func:`hub_rows`) of a [Q, G] score matrix; see :func:`hub_counts` for the arguments."""
    return hub_rows(hub_counts(scores, caption_to_video, direction, k, hub_factor), top, ids)


def hub_report(counts: HubCounts, top: int = 20, ids: Sequence[str] | None = None) -> dict:
    """JSON-ready report of one method and direction: {"summary", "hubs" (top rows), "items"}.

    "items" lists every retrieved item sparsely ({"index", "n_k", "correct"}, N_k > 0 only, at most k * Q of
    them) so that plots can be redrawn from the file (:func:`counts_from_report`).
    """
    seen = (counts.n_k > 0).nonzero().flatten()
    items = {
        "index": seen.tolist(),
        "n_k": counts.n_k[seen].tolist(),
        "correct": counts.correct[seen].tolist(),
        "positives": counts.positives[seen].tolist(),
    }
    return {"summary": hub_summary(counts), "hubs": hub_rows(counts, top, ids), "items": items}


def counts_from_report(report: dict) -> HubCounts:
    """The :class:`HubCounts` a :func:`hub_report` dict was written from."""
    summary, items = report["summary"], report["items"]
    n_k = torch.zeros(int(summary["n_gallery"]), dtype=torch.long)
    correct = torch.zeros_like(n_k)
    # Positives of never-retrieved items are not stored; they do not enter any figure.
    positives = torch.zeros_like(n_k)
    index = torch.tensor(items["index"], dtype=torch.long)
    for tensor, key in ((n_k, "n_k"), (correct, "correct"), (positives, "positives")):
        tensor[index] = torch.tensor(items[key], dtype=torch.long)
    return HubCounts(
        n_k, correct, positives, int(summary["k"]), int(summary["n_queries"]), float(summary["hub_factor"])
    )


def format_hub_summary(summaries: dict[str, dict], title: str | None = None) -> str:
    """A few aligned lines, one per method: hubs (good / bad) and where the wrong retrievals go."""
    lines = [title] if title else []
    width = max(len(m) for m in summaries)
    for method, s in summaries.items():
        lines.append(
            f"  {method.ljust(width)}  hubs {s['n_hubs']:>4} (good {s['n_good_hubs']}, bad {s['n_bad_hubs']}); "
            f"{100 * s['hub_slot_share']:.1f}% of top-{s['k']} slots at hubs; "
            f"{100 * s['wrong_to_bad_hubs']:.1f}% of wrong retrievals at bad hubs"
        )
    return "\n".join(lines)


def plot_hubs(counts: dict[str, HubCounts], path: str | Path, title: str | None = None) -> Path:
    """One row per method (raw first): its k-occurrence histogram (the raw one behind it, in black) and a scatter of
    every retrieved gallery item, N_k against correct share, hubs coloured good (green) or bad (red).

    Drawn on a bare :class:`~matplotlib.figure.Figure` (no pyplot, the global backend is left alone).

    Args:
        counts: method name -> :class:`HubCounts` of one direction; all share k.
        path: output PNG; missing parent folders are created.
        title: optional figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not counts:
        raise ValueError("counts is empty; give at least one method")
    counts = {**({"none": counts["none"]} if "none" in counts else {}), **counts}
    fig = Figure(figsize=(11.0, 3.2 * len(counts)), layout="constrained")
    axes = fig.subplots(len(counts), 2, squeeze=False)
    x_max = max(int(c.n_k.max()) for c in counts.values())  # one N_k scale for every method
    for (method, c), (left, right) in zip(counts.items(), axes):
        behind = {"none": counts["none"].n_k} if "none" in counts and method != "none" else {}
        draw_k_occurrence(left, {**behind, method: c.n_k}, c.k, c.hub_factor, log_y=True)
        left.set_title(f"{method}: k-occurrence", fontsize="medium")
        draw_hub_scatter(right, c, x_max)
        s = hub_summary(c)
        right.set_title(
            f"{method}: {s['n_hubs']} hubs ({s['n_good_hubs']} good, {s['n_bad_hubs']} bad); "
            f"{100 * s['wrong_to_bad_hubs']:.0f}% of wrong at bad hubs",
            fontsize="medium",
        )
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def draw_hub_scatter(ax, counts: HubCounts, x_max: int | None = None) -> None:
    """N_k (x) against correct share (y) of every retrieved item on a matplotlib axes; non-hubs grey, good hubs
    green, bad hubs red; dashed lines at the hub threshold and at the mean correct share (the good/bad boundary).
    `x_max` (default: this item's largest N_k) puts panels of several methods or runs on one scale."""
    seen = counts.n_k > 0
    share = counts.correct.double() / counts.n_k.clamp(min=1).double()
    hub, good = counts.is_hub, counts.is_good
    groups = (("other items", seen & ~hub, "lightgrey", 10), ("good hubs", hub & good, "tab:green", 22))
    for label, mask, colour, size in (*groups, ("bad hubs", hub & ~good & seen, "tab:red", 22)):
        ax.scatter(
            counts.n_k[mask].numpy(), share[mask].numpy(), s=size, c=colour, label=f"{label} ({int(mask.sum())})"
        )
    ax.axvline(counts.hub_factor * counts.k, color="grey", linestyle="--", linewidth=1.0)
    ax.axhline(counts.mean_correct_share, color="grey", linestyle=":", linewidth=1.0, label="mean correct share")
    ax.set_xlabel(f"$N_{{{counts.k}}}$ (times retrieved in a top-{counts.k})")
    ax.set_ylabel("correct share of its retrievals")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(0, 1.05 * max(x_max or 0, int(counts.n_k.max()), counts.hub_factor * counts.k) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")


def _check(scores: Tensor, caption_to_video: Tensor, direction: str, k: int) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 2-D floating-point [queries, gallery] matrix, got {tuple(scores.shape)}")
    n_captions = scores.shape[0] if direction == "t2v" else scores.shape[1]
    if caption_to_video.ndim != 1 or len(caption_to_video) != n_captions:
        raise ValueError(
            f"caption_to_video must be [{n_captions}] for {direction} scores of shape {tuple(scores.shape)}, "
            f"got {tuple(caption_to_video.shape)}"
        )
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}] (the gallery size), got {k}")
