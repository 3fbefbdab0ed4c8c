"""Building, updating and loading a search index (format: `neighborretr.search.format`, docs/search.md)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from neighborretr.eval.hubness import DEFAULT_BETA_GALLERY_BANK, DEFAULT_BETA_QUERY_BANK, BankStats
from neighborretr.search.encode import Encoded, concat, encode_video_files, list_videos
from neighborretr.search.format import (
    TOKEN_DTYPES,
    Manifest,
    Sampling,
    SearchIndexError,
    check_fingerprint,
    read_arrays,
    read_manifest,
    write_index,
)
from neighborretr.search.scoring import (
    BETA_KEYS,
    METHOD_BANKS,
    bank_columns,
    gallery_bank_block,
    merge_tops,
    occurrence,
    query_bank_block,
)

log = logging.getLogger(__name__)


@dataclass
class Banks:
    """Encoded banks for hub-aware scoring: query-bank captions (`Encoded` [B, L, D]) and/or gallery-bank video
    summaries [Bg, D]; `sources` says where they came from (recorded in the manifest)."""

    query: Encoded | None = None
    gallery: Tensor | None = None
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class IndexUpdate:
    """What one indexing run did: files added, already indexed (skipped), failed (path -> reason), total items."""

    added: int
    skipped: int
    failed: dict[str, str]
    total: int


def default_betas(banks: dict[str, bool], overrides: dict[str, dict[str, float]] | None = None) -> dict:
    """{method: {beta_query_bank, beta_gallery_bank}} for every bank-based method the available banks allow.

    Args:
        banks: {"query": bool, "gallery": bool}, which banks the index holds.
        overrides: per-method betas, e.g. those a run chose on its validation split (results.json
            ``normalization_params[method]["t2v"]``); the hubness defaults otherwise.
    """
    defaults = {"beta_query_bank": DEFAULT_BETA_QUERY_BANK, "beta_gallery_bank": DEFAULT_BETA_GALLERY_BANK}
    out = {}
    for method, needed in METHOD_BANKS.items():
        if needed and all(banks.get(b) for b in needed):
            given = (overrides or {}).get(method, {})
            out[method] = {BETA_KEYS[b]: float(given.get(BETA_KEYS[b], defaults[BETA_KEYS[b]])) for b in needed}
    return out


def _stat_key(bank: str, beta: float) -> str:
    return f"{bank}@{beta!r}.lse"


def _bank_block(bank: str, banks: Banks, items: Encoded):
    if bank == "query":
        return query_bank_block(banks.query, items), banks.query.tokens.shape[0]
    return gallery_bank_block(banks.gallery, items.pooled), banks.gallery.shape[0]


def compute_stats(items: Encoded, banks: Banks, methods: dict, k: int, old: dict | None = None) -> dict[str, Tensor]:
    """Stored bank statistics of `items`: per (bank, beta) ``"<bank>@<beta>.lse"`` [N], and per bank each bank
    row's top-k (``"<bank>.top_scores"``, ``"<bank>.top_items"`` [n_bank, k]) from which the occurrence follows.

    With `old` (the statistics of the items before these, same banks and betas) the new columns are appended:
    the normalisers are concatenated and each bank row's top-k is merged with the old one.
    """
    n_old = 0 if old is None else int(next(v for key, v in old.items() if key.endswith(".lse")).shape[0])
    out: dict[str, Tensor] = {}
    for bank in sorted({b for m in methods for b in METHOD_BANKS[m]}):
        betas = sorted({cfg[BETA_KEYS[bank]] for m, cfg in methods.items() if bank in METHOD_BANKS[m]})
        fresh = bank_columns(*_bank_block(bank, banks, items), betas, k)
        tops = {"top_scores": fresh["top_scores"], "top_items": fresh["top_items"]}
        if old is not None:
            previous = {key: old[f"{bank}.{key}"] for key in tops}
            tops = merge_tops(previous, tops, n_old, k)
        for beta in betas:
            lse = fresh[f"lse@{beta!r}"].cpu()
            out[_stat_key(bank, beta)] = lse if old is None else torch.cat([old[_stat_key(bank, beta)], lse])
        out |= {f"{bank}.{key}": value.cpu() for key, value in tops.items()}
    return out


def _encoded_from(arrays: dict) -> Encoded | None:
    if "tokens" not in arrays:
        return None
    return Encoded(arrays["tokens"], arrays["mask"], arrays["weights"], arrays["pooled"])


def _banks_from(arrays: dict, sources: dict) -> Banks:
    query = None
    if "query_tokens" in arrays:
        query = Encoded(arrays["query_tokens"], arrays["query_mask"], arrays["query_weights"], arrays["query_pooled"])
    return Banks(query=query, gallery=arrays.get("gallery_pooled"), sources=sources)


def _bank_arrays(banks: Banks) -> dict[str, Tensor]:
    out = {}
    if banks.query is not None:
        q = banks.query
        out |= {"query_tokens": q.tokens, "query_mask": q.mask, "query_weights": q.weights, "query_pooled": q.pooled}
    if banks.gallery is not None:
        out["gallery_pooled"] = banks.gallery
    return out


def _open_existing(out: Path, fingerprint: str, sampling: Sampling, root: Path, token_dtype: str):
    """(manifest, items, banks, stats) of an index being extended, after checking it was built the same way."""
    manifest = read_manifest(out)
    check_fingerprint(manifest, fingerprint, out)
    if manifest.sampling != sampling:
        raise SearchIndexError(
            f"{out} was built with other sampling settings ({manifest.sampling}); index into a new folder"
        )
    if Path(manifest.video_root) != root:
        raise SearchIndexError(f"{out} indexes {manifest.video_root}, not {root}; index this folder into a new one")
    if token_dtype is not None and manifest.token_dtype != token_dtype:
        raise SearchIndexError(f"{out} stores {manifest.token_dtype} tokens, not {token_dtype}; keep the same setting")
    features, bank_arrays, stats = read_arrays(out)
    return manifest, _encoded_from(features), _banks_from(bank_arrays, manifest.banks.get("sources", {})), stats


@torch.no_grad()
def build_index(
    out: Path,
    model: nn.Module,
    video_root: Path,
    sampling: Sampling,
    fingerprint: str,
    device: torch.device,
    banks: Banks | None = None,
    betas: dict[str, dict[str, float]] | None = None,
    k: int = 1,
    token_dtype: str | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    progress: bool = True,
    model_info: dict | None = None,
) -> IndexUpdate:
    """Indexes every video under `video_root` into `out`, or adds the files an existing index lacks.

    Args:
        model: a `RetrievalModel` (encode_video and the similarity head's token weights), on `device`.
        sampling: decoding settings (the evaluation's); an existing index must have the same.
        fingerprint: the model's identity (`format.model_fingerprint`); an existing index must have the same.
        banks: new banks (replace the stored ones, and every item's statistics are recomputed); None keeps the
            stored banks, whose statistics are computed for the new items only.
        betas: per-method betas (see `default_betas`); None keeps the stored ones, or the defaults.
        k: top-k of the bank occurrence (DIS / DualDIS activation sets).
        token_dtype: "float16" (half the size; scores move by ~1e-3) or "float32"; None: the existing index's, or
            float16 for a new one.
        model_info: recorded in the manifest (e.g. {"weights": path}) to name the model in refusals.

    Returns:
        `IndexUpdate`; unreadable files are listed there and in the manifest, never fatal.
    """
    if token_dtype is not None and token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"token_dtype must be one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}")
    out, video_root = Path(out), Path(video_root).resolve()
    if not video_root.is_dir():
        raise FileNotFoundError(f"video folder not found: {video_root}")
    if (out / "manifest.json").is_file():
        manifest, items, stored_banks, stats = _open_existing(out, fingerprint, sampling, video_root, token_dtype)
    else:
        manifest = Manifest(fingerprint, sampling, str(video_root), token_dtype or "float16")
        items, stored_banks, stats = None, Banks(), {}
    manifest.model = model_info or manifest.model
    indexed = {item["path"] for item in manifest.items}
    paths = list_videos(video_root)
    new = [p for p in paths if p not in indexed]
    failed: dict[str, str] = {}
    parts = [] if items is None else [items]
    added = []
    for positions, durations, encoded, bad in encode_video_files(
        model, video_root, new, sampling, device, batch_size, num_workers, progress
    ):
        failed |= {new[p]: reason for p, reason in bad}
        if encoded is None:
            continue
        encoded.tokens = encoded.tokens.to(TOKEN_DTYPES[manifest.token_dtype])
        parts.append(encoded)
        added += [{"path": new[p], "duration": _finite(d)} for p, d in zip(positions, durations)]
    for path, reason in failed.items():
        log.warning("cannot index %s: %s", path, reason)
    manifest.items += added
    manifest.failed = failed
    all_items = concat(parts) if parts else None
    stats = _update_stats(manifest, all_items, stats, stored_banks, banks, betas, k, len(added))
    final_banks = banks if banks is not None else stored_banks
    write_index(out, manifest, _feature_arrays(all_items), _bank_arrays(final_banks), stats)
    return IndexUpdate(added=len(added), skipped=len(paths) - len(new), failed=failed, total=len(manifest.items))


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _feature_arrays(items: Encoded | None) -> dict[str, Tensor]:
    if items is None:
        return {}
    return {"tokens": items.tokens, "mask": items.mask, "weights": items.weights, "pooled": items.pooled}


def _update_stats(
    manifest: Manifest,
    items: Encoded | None,
    stats: dict,
    stored: Banks,
    banks: Banks | None,
    betas: dict | None,
    k: int,
    added: int,
) -> dict[str, Tensor]:
    """Bank statistics of every item: all recomputed for new banks or betas, else the new rows appended."""
    current = banks if banks is not None else stored
    if current.query is None and current.gallery is None or items is None:
        manifest.banks = {"sources": current.sources} if current.sources else {}
        return {}
    have = {"query": current.query is not None, "gallery": current.gallery is not None}
    methods = default_betas(have, betas) if betas is not None or banks is not None else manifest.banks.get("methods")
    methods = methods or default_betas(have)
    recompute = banks is not None or methods != manifest.banks.get("methods") or k != manifest.banks.get("k")
    manifest.banks = {
        "sources": current.sources,
        "query_size": int(current.query.tokens.shape[0]) if have["query"] else 0,
        "gallery_size": int(current.gallery.shape[0]) if have["gallery"] else 0,
        "k": k,
        "methods": methods,
    }
    if recompute:
        return compute_stats(items, current, methods, k)
    if added == 0:
        return stats
    n_old = items.tokens.shape[0] - added
    new_items = Encoded(*(getattr(items, f)[n_old:] for f in ("tokens", "mask", "weights", "pooled")))
    return compute_stats(new_items, current, methods, k, old=stats)


@dataclass
class SearchIndex:
    """A loaded index: manifest, items (`Encoded`, tokens in the stored dtype) and per-method bank statistics."""

    folder: Path
    manifest: Manifest
    items: Encoded
    stats: dict[str, dict[str, BankStats]]

    @property
    def size(self) -> int:
        return len(self.manifest.items)

    def to(self, device: torch.device) -> SearchIndex:
        """The same index with its tensors on `device` (scoring runs there)."""
        items = Encoded(*(getattr(self.items, f).to(device) for f in ("tokens", "mask", "weights", "pooled")))
        stats = {
            m: {b: BankStats(s.lse.to(device), s.occurrence.to(device), s.beta, s.k, s.n_bank) for b, s in per.items()}
            for m, per in self.stats.items()
        }
        return SearchIndex(self.folder, self.manifest, items, stats)


def load_index(folder: Path, fingerprint: str | None = None) -> SearchIndex:
    """Reads an index; refuses another format version, and another model when `fingerprint` is given."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if fingerprint is not None:
        check_fingerprint(manifest, fingerprint, folder)
    if not manifest.items:
        raise SearchIndexError(
            f"{folder} holds no videos ({len(manifest.failed)} unreadable): index a folder with readable videos into it"
        )
    features, _, arrays = read_arrays(folder)
    items = _encoded_from(features)
    if items is None or items.tokens.shape[0] != len(manifest.items):
        raise SearchIndexError(f"{folder}: the features do not match the manifest's {len(manifest.items)} items")
    banks = manifest.banks
    sizes = {"query": banks.get("query_size", 0), "gallery": banks.get("gallery_size", 0)}
    stats = {}
    for method, cfg in banks.get("methods", {}).items():
        stats[method] = {
            b: BankStats(
                arrays[_stat_key(b, cfg[BETA_KEYS[b]])],
                occurrence(arrays[f"{b}.top_items"], len(manifest.items)),
                cfg[BETA_KEYS[b]],
                banks["k"],
                sizes[b],
            )
            for b in METHOD_BANKS[method]
        }
    return SearchIndex(folder, manifest, items, stats)
