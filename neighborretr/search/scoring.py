"""Token-wise scores of stored items and the per-item bank statistics that make hub-aware scoring per query.

The scores are the model's own (`weighted_token_similarity` with the head's token weights, which the index
stores), so they equal `RetrievalModel.chunked_similarity` on the same features. Bank statistics reuse
`neighborretr.eval.hubness.bank_stats` over the same bank matrices evaluation builds (query bank: captions x
gallery videos, token-wise; gallery bank: the cosine of unit summaries, as `hubness_eval.intra_similarity`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from neighborretr.eval.hubness import BankStats, BlockFn, bank_stats, normalize_scores
from neighborretr.models.similarity import weighted_token_similarity
from neighborretr.search.encode import Encoded

# Which bank statistics each normalisation reads (the bank-based methods of HUBNESS_METHODS; SN/DBSN need the
# whole gallery's Sinkhorn potentials and DSL the whole test set, so they are not offered per query).
METHOD_BANKS: dict[str, tuple[str, ...]] = {
    "none": (),
    "is": ("query",),
    "dis": ("query",),
    "dualis": ("query", "gallery"),
    "dualdis": ("query", "gallery"),
}
SEARCH_METHODS = tuple(METHOD_BANKS)
BETA_KEYS = {"query": "beta_query_bank", "gallery": "beta_gallery_bank"}


PAIR_BUDGET = 1 << 24  # entries of the [Q, chunk, L, T] token-pair tensor built at once (64 MB in float32)


def token_scores(query: Encoded, items: Encoded, chunk_size: int = 4096) -> Tensor:
    """Token-wise similarity [Q, N] of encoded queries against encoded items, in item chunks.

    Args:
        query: tokens [Q, L, D] (unit), mask [Q, L], weights [Q, L].
        items: tokens [N, T, D] (unit, any float dtype), mask [N, T], weights [N, T].
        chunk_size: at most this many items at once; fewer when the [Q, chunk, L, T] pair tensor would exceed
            `PAIR_BUDGET` entries (a bank of 512 captions scores ~100 items at a time, one query thousands).
    """
    per_item = query.tokens.shape[0] * query.tokens.shape[1] * items.tokens.shape[1]
    chunk_size = max(1, min(chunk_size, PAIR_BUDGET // max(1, per_item)))
    parts = []
    for start in range(0, items.tokens.shape[0], chunk_size):
        stop = start + chunk_size
        parts.append(
            weighted_token_similarity(
                query.tokens,
                query.mask,
                query.weights,
                items.tokens[start:stop].float(),
                items.mask[start:stop],
                items.weights[start:stop],
            )
        )
    if not parts:
        return query.tokens.new_zeros(query.tokens.shape[0], 0)
    return torch.cat(parts, dim=1)


def _clamped(sim: Tensor) -> Tensor:
    """Token-wise scores are cosine-scale by construction; float16 tokens can overshoot 1 by a rounding step."""
    return sim.clamp_(-1.0, 1.0)


def query_bank_block(bank: Encoded, items: Encoded) -> BlockFn:
    """Block function of the query bank (captions) x items, token-wise, as evaluation's query-bank matrix."""
    return lambda a, b: _clamped(token_scores(_rows(bank, a, b), items))


def gallery_bank_block(bank_pooled: Tensor, items_pooled: Tensor) -> BlockFn:
    """Block function of the gallery bank (videos) x items: the cosine of unit summaries (intra-modal)."""
    return lambda a, b: _clamped(bank_pooled[a:b] @ items_pooled.T)


def bank_columns(block: BlockFn, n_bank: int, betas: list[float], k: int, chunk_size: int = 512) -> dict[str, Tensor]:
    """Bank statistics of a set of item columns, for later merging with other columns.

    The normaliser ``Z`` of an item depends on its own column only: `bank_stats`'s ``lse`` of each block of bank
    rows, accumulated across blocks with ``logaddexp`` as `bank_stats` itself does, so every block (the costly
    token-wise scores) is computed once for all betas. The k-occurrence depends on every column (an item counts
    when it is in a bank row's top-k of the whole index), so each bank row's own top-k (scores and column
    positions) is kept and merged across updates.

    Returns:
        {"lse@<beta>": [N] per beta, "top_scores": [n_bank, k'], "top_items": [n_bank, k']} with k' = min(k, N).
    """
    lse: dict[float, Tensor] = {}
    top_scores, top_items = [], []
    for start in range(0, n_bank, chunk_size):
        rows = block(start, min(start + chunk_size, n_bank))
        for beta in betas:
            part = bank_stats(rows, None, beta, 1, chunk_size).lse
            lse[beta] = part if beta not in lse else torch.logaddexp(lse[beta], part)
        top = rows.topk(min(k, rows.shape[1]), dim=1)
        top_scores.append(top.values.float())
        top_items.append(top.indices)
    out = {f"lse@{beta!r}": value.float() for beta, value in lse.items()}
    return out | {"top_scores": torch.cat(top_scores), "top_items": torch.cat(top_items)}


def merge_tops(old: dict[str, Tensor], new: dict[str, Tensor], offset: int, k: int) -> dict[str, Tensor]:
    """Each bank row's top-k over old columns and new columns (numbered from `offset`)."""
    scores = torch.cat([old["top_scores"], new["top_scores"]], dim=1)
    items = torch.cat([old["top_items"], new["top_items"] + offset], dim=1)
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return {"top_scores": top.values, "top_items": items.gather(1, top.indices)}


def occurrence(top_items: Tensor, n_items: int) -> Tensor:
    """[N] bank k-occurrence: how many bank rows hold each item in their top-k."""
    return torch.bincount(top_items.flatten(), minlength=n_items)


def _rows(e: Encoded, start: int, stop: int) -> Encoded:
    return Encoded(e.tokens[start:stop], e.mask[start:stop], e.weights[start:stop], e.pooled[start:stop])


def normalize_candidates(
    raw: Tensor, method: str, stats: dict[str, BankStats], candidates: Tensor, gate_mode: str = "per_factor"
) -> Tensor:
    """Per-query normalised scores of one query's candidates.

    Args:
        raw: [C] token-wise scores of the candidates (cosine scale).
        method: one of :data:`SEARCH_METHODS`.
        stats: {"query": BankStats over the whole index, "gallery": ...} as the method needs.
        candidates: [C] row indices of the candidates in the index.

    Returns:
        [C] scores of `neighborretr.eval.hubness.normalize_scores` on the candidates' columns: with every item as a
        candidate they are evaluation's normalised row; DIS / DualDIS gate on the best candidate, which is the
        row's raw top-1 whenever the first stage kept it.
    """
    if method not in METHOD_BANKS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {', '.join(SEARCH_METHODS)}")
    missing = [b for b in METHOD_BANKS[method] if b not in stats]
    if missing:
        raise ValueError(
            f"normalisation {method!r} needs the {' and '.join(missing)} bank statistics, which this index does not "
            "hold: re-run neighborretr-search index with --query-bank (and --gallery-bank for dualis / dualdis)"
        )
    sub = {name: _subset(s, candidates) for name, s in stats.items()}
    scores = normalize_scores(
        _clamped(raw[None].float().clone()), method, sub.get("query"), sub.get("gallery"), gate_mode=gate_mode
    )
    return scores[0]


def _subset(stats: BankStats, rows: Tensor) -> BankStats:
    return BankStats(stats.lse[rows], stats.occurrence[rows], stats.beta, stats.k, stats.n_bank)
