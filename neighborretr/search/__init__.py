"""Text-to-video search with a trained model: index a folder of videos, query it one text at a time.

`build_index` writes a versioned index (token features, head weights, unit summaries, per-item bank statistics);
`load_index` reads it back; `Searcher` answers a query with a first stage over the summaries, token-wise
re-ranking and a per-query hubness normalisation (none, is, dis, dualis, dualdis). See docs/search.md.
"""

from neighborretr.search.encode import Encoded, TextEncoder, encode_captions, encode_video_files, list_videos
from neighborretr.search.format import FORMAT_VERSION, Sampling, SearchIndexError, model_fingerprint
from neighborretr.search.index import Banks, IndexUpdate, SearchIndex, build_index, default_betas, load_index
from neighborretr.search.searcher import DEFAULT_DEPTH, Hit, Searcher, SearchResult

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_DEPTH",
    "Banks",
    "Encoded",
    "Hit",
    "IndexUpdate",
    "Sampling",
    "SearchIndex",
    "SearchIndexError",
    "SearchResult",
    "Searcher",
    "TextEncoder",
    "build_index",
    "default_betas",
    "encode_captions",
    "encode_video_files",
    "list_videos",
    "load_index",
    "model_fingerprint",
]
