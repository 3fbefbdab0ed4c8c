"""First-stage candidate search over the unit summaries: exact below a size threshold, HNSW (faiss) above it.

The summaries are unit vectors, so inner product is cosine. The exact search is one matrix-vector product and a
top-k; faiss's HNSW graph answers in sub-linear time with a recall that grows with ``ef_search``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_ANN_THRESHOLD = 20_000
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 256


class ExactFirstStage:
    """Top candidates by an exact inner product with every summary [N, D]."""

    kind = "exact"

    def __init__(self, pooled: Tensor):
        self.pooled = pooled.float().contiguous()

    def search(self, query: Tensor, depth: int) -> Tensor:
        """query [D] -> [min(depth, N)] row indices, best first."""
        scores = self.pooled @ query.float()
        return scores.topk(min(depth, scores.shape[0])).indices


class HnswFirstStage:
    """Top candidates from a faiss HNSW graph (inner product), built once and cached in the index folder.

    Args:
        pooled: [N, D] unit summaries.
        cache: a file to read the graph from when it holds exactly N vectors, and to write it to otherwise.
        m, ef_construction: graph degree and build beam (larger: better recall, slower build, bigger file).
        ef_search: the search beam; raised to the requested depth when smaller (faiss needs ef >= k).
    """

    kind = "hnsw"

    def __init__(
        self,
        pooled: Tensor,
        cache: Path | None = None,
        m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
    ):
        try:
            import faiss
        except ImportError as err:
            raise ImportError(
                "galleries above the exact-search threshold use faiss: pip install 'neighborretr[search]' "
                "(or raise the threshold)"
            ) from err
        self.faiss, self.ef_search = faiss, ef_search
        vectors = np.ascontiguousarray(pooled.float().numpy())
        self.index = self._load(cache, len(vectors))
        if self.index is None:
            self.index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
            self.index.add(vectors)
            if cache is not None:
                partial = cache.with_name(cache.name + ".partial")
                faiss.write_index(self.index, str(partial))
                partial.replace(cache)

    def _load(self, cache: Path | None, count: int):
        if cache is None or not cache.is_file():
            return None
        index = self.faiss.read_index(str(cache))
        return index if index.ntotal == count else None  # items were added since: rebuild

    def search(self, query: Tensor, depth: int) -> Tensor:
        """query [D] -> [<= depth] row indices, best first (HNSW may return fewer than asked on tiny graphs)."""
        depth = min(depth, self.index.ntotal)
        params = self.faiss.SearchParametersHNSW(efSearch=max(self.ef_search, depth))
        _, ids = self.index.search(np.ascontiguousarray(query.float().numpy()[None]), depth, params=params)
        ids = ids[0]
        return torch.from_numpy(ids[ids >= 0].astype(np.int64))


def first_stage(
    pooled: Tensor,
    threshold: int = DEFAULT_ANN_THRESHOLD,
    cache: Path | None = None,
    ef_search: int = DEFAULT_EF_SEARCH,
) -> ExactFirstStage | HnswFirstStage:
    """Exact search for at most `threshold` items, an HNSW graph above it."""
    if pooled.shape[0] <= threshold:
        return ExactFirstStage(pooled)
    return HnswFirstStage(pooled, cache, ef_search=ef_search)
