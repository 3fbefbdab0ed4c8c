"""Text queries against a loaded index, one at a time: text encoding, first stage over the unit summaries,
token-wise re-ranking of the candidates, then the chosen per-query hubness normalisation. Each stage is timed."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from neighborretr.search.encode import Encoded, TextEncoder
from neighborretr.search.first_stage import DEFAULT_ANN_THRESHOLD, DEFAULT_EF_SEARCH, first_stage
from neighborretr.search.index import SearchIndex
from neighborretr.search.scoring import SEARCH_METHODS, normalize_candidates, token_scores

DEFAULT_DEPTH = 200  # first-stage candidates re-ranked per query (scripts/bench_search.py measures the recall)
ANN_CACHE = "ann_hnsw.faiss"


@dataclass
class Hit:
    """One result: rank (1 = best), index row, relative path, duration (s), final score and raw token-wise score."""

    rank: int
    item: int
    path: str
    duration: float | None
    score: float
    raw_score: float


@dataclass
class SearchResult:
    """Results best first and the milliseconds spent in each stage."""

    query: str
    normalization: str
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    first_stage: str = "exact"

    def to_json(self) -> dict:
        return asdict(self)


class Searcher:
    """Searches one index with the model that built it.

    Args:
        index: a loaded index (its tensors on the device scoring should use).
        encoder: the text encoder (None: only `search_encoded` works, e.g. for benchmarks on random features).
        depth: first-stage candidates re-ranked by the token-wise score (all items when the index is smaller).
        ann_threshold: above this many items the first stage is an HNSW graph instead of an exact product.
        ef_search: the HNSW search beam.
    """

    def __init__(
        self,
        index: SearchIndex,
        encoder: TextEncoder | None = None,
        depth: int = DEFAULT_DEPTH,
        ann_threshold: int = DEFAULT_ANN_THRESHOLD,
        ef_search: int = DEFAULT_EF_SEARCH,
    ):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.index, self.encoder, self.depth = index, encoder, depth
        # faiss works on CPU arrays; the exact stage stays on the index's device
        pooled = index.items.pooled.cpu() if index.size > ann_threshold else index.items.pooled
        self.stage = first_stage(pooled, ann_threshold, index.folder / ANN_CACHE, ef_search)

    @property
    def methods(self) -> list[str]:
        """The normalisations this index can serve ("none" plus those with bank statistics)."""
        return ["none", *[m for m in SEARCH_METHODS if m in self.index.stats]]

    def search(self, text: str, top_k: int = 10, normalization: str = "none", depth: int | None = None) -> SearchResult:
        """Encodes `text` and searches (see `search_encoded`)."""
        if self.encoder is None:
            raise RuntimeError("this Searcher has no text encoder; pass one, or call search_encoded")
        if not text.strip():
            raise ValueError("the query is empty; type what the video shows")
        start = time.perf_counter()
        query = self.encoder(text)
        encode_ms = (time.perf_counter() - start) * 1000
        result = self.search_encoded(query, top_k, normalization, depth)
        result.query = text
        result.timings_ms = {"encode_text": encode_ms, **result.timings_ms}
        result.timings_ms["total"] += encode_ms
        return result

    @torch.no_grad()
    def search_encoded(
        self, query: Encoded, top_k: int = 10, normalization: str = "none", depth: int | None = None
    ) -> SearchResult:
        """One encoded query (tokens [1, L, D]) -> the `top_k` best items after re-ranking and normalisation."""
        if normalization not in SEARCH_METHODS:
            raise ValueError(f"unknown normalisation {normalization!r}; choose one of {', '.join(SEARCH_METHODS)}")
        if normalization != "none" and normalization not in self.index.stats:
            raise ValueError(
                f"this index has no bank statistics for {normalization!r}; it serves {', '.join(self.methods)} "
                "(re-run neighborretr-search index with --query-bank / --gallery-bank)"
            )
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        device = self.index.items.tokens.device
        query = Encoded(*(getattr(query, f).to(device) for f in ("tokens", "mask", "weights", "pooled")))
        times: dict[str, float] = {}
        clock = time.perf_counter()
        candidates = self.stage.search(query.pooled[0], max(depth or self.depth, top_k)).to(device)
        times["first_stage"], clock = (time.perf_counter() - clock) * 1000, time.perf_counter()
        items = self.index.items
        subset = Encoded(
            items.tokens[candidates], items.mask[candidates], items.weights[candidates], items.pooled[candidates]
        )
        raw = token_scores(query, subset)[0]
        times["rerank"], clock = (time.perf_counter() - clock) * 1000, time.perf_counter()
        scores = raw if normalization == "none" else self._normalize(raw, normalization, candidates)
        times["normalize"] = (time.perf_counter() - clock) * 1000
        times["total"] = sum(times.values())
        return SearchResult(
            query="",
            normalization=normalization,
            hits=self._hits(scores, raw, candidates, top_k),
            timings_ms=times,
            candidates=len(candidates),
            first_stage=self.stage.kind,
        )

    def _normalize(self, raw: Tensor, method: str, candidates: Tensor) -> Tensor:
        return normalize_candidates(raw, method, self.index.stats[method], candidates)

    def _hits(self, scores: Tensor, raw: Tensor, candidates: Tensor, top_k: int) -> list[Hit]:
        # stable: equal scores keep the first stage's order
        order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices[:top_k]
        items = self.index.manifest.items
        hits = []
        for rank, position in enumerate(order.tolist(), start=1):
            row = int(candidates[position])
            hits.append(
                Hit(
                    rank, row, items[row]["path"], items[row]["duration"], float(scores[position]), float(raw[position])
                )
            )
        return hits
