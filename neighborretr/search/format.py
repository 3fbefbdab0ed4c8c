"""The on-disk search index: a versioned JSON manifest beside safetensors arrays (``docs/search.md``).

An index folder holds

    manifest.json        format name and version, model fingerprint, sampling settings, items, failures, banks
    features.safetensors tokens [N, T, D] (unit-norm, float16 or float32), mask [N, T] bool, weights [N, T] float32
                         (the similarity head's video token weights), pooled [N, D] float32 (unit summaries)
    banks.safetensors    the encoded banks, kept so that videos added later get their statistics:
                         query_tokens [B, L, D], query_mask [B, L], query_weights [B, L], gallery_pooled [Bg, D]
    stats.safetensors    per-item bank normalisers ``<bank>@<beta>.lse`` [N], and each bank row's top-k
                         ``<bank>.top_scores`` / ``<bank>.top_items`` [B, k] (the k-occurrence is their bincount)

Every write goes to a temporary file that is renamed over the old one, manifest last, so a killed indexer leaves
the previous index readable.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_NAME = "neighborretr-search-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.safetensors"
BANKS = "banks.safetensors"
STATS = "stats.safetensors"
TOKEN_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class SearchIndexError(ValueError):
    """An index that this code or this model cannot use (another format version, another model, damaged)."""


@dataclass(frozen=True)
class Sampling:
    """How clips are decoded and encoded; an index is only valid for the settings that built it."""

    max_frames: int
    image_size: int
    max_words: int
    sampling: str = "uniform"
    framerate: float | None = None
    backend: str = "decord"


@dataclass
class Manifest:
    """The JSON half of an index. ``items`` are in row order: {"path": relative posix path, "duration": seconds}."""

    fingerprint: str
    sampling: Sampling
    video_root: str
    token_dtype: str = "float16"
    items: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    banks: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"format": FORMAT_NAME, "version": FORMAT_VERSION} | asdict(self)
        return out

    @classmethod
    def from_json(cls, data: dict, where: Path) -> Manifest:
        if data.get("format") != FORMAT_NAME:
            raise SearchIndexError(f"{where} is not a neighborretr search index (no format {FORMAT_NAME!r})")
        if data.get("version") != FORMAT_VERSION:
            raise SearchIndexError(
                f"{where} was written in index format version {data.get('version')}; this neighborretr reads "
                f"version {FORMAT_VERSION}: rebuild it with `neighborretr-search index --out` to a new folder"
            )
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        fields["sampling"] = Sampling(**fields["sampling"])
        return cls(**fields)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_settings: dict, weights: Path | None) -> str:
    """A short identity of a model: the hash of its settings (JSON, sorted keys) and of its weights file.

    Args:
        model_settings: the plain settings the model was built from (e.g. a run config's ``model`` section).
        weights: the weights file, or None for a model without one (random weights in tests).
    """
    settings = json.dumps(model_settings, sort_keys=True, default=str)
    parts = [hashlib.sha256(settings.encode()).hexdigest(), file_digest(weights) if weights else "no-weights"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, path)


def write_index(
    folder: Path,
    manifest: Manifest,
    features: dict[str, torch.Tensor],
    banks: dict[str, torch.Tensor],
    stats: dict[str, torch.Tensor],
) -> None:
    """Writes the three array files, then the manifest (atomically, each)."""
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save(features, folder / FEATURES)
    _atomic_save(banks, folder / BANKS)
    _atomic_save(stats, folder / STATS)
    partial = folder / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest.to_json(), indent=1))
    os.replace(partial, folder / MANIFEST)


def read_manifest(folder: Path) -> Manifest:
    """The manifest of an index folder, refused with a clear message when missing or of another version."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a search index (no {MANIFEST}); build one with neighborretr-search index"
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise SearchIndexError(f"{path} is not valid JSON ({err}); rebuild the index") from err
    return Manifest.from_json(data, Path(folder))


def read_arrays(folder: Path) -> tuple[dict, dict, dict]:
    """(features, banks, stats) tensors of an index folder; empty dicts for an index without items."""
    out = []
    for name in (FEATURES, BANKS, STATS):
        path = Path(folder) / name
        out.append(load_file(str(path)) if path.is_file() else {})
    return tuple(out)


def check_fingerprint(manifest: Manifest, fingerprint: str, folder: Path) -> None:
    """Refuses an index built by another model than the one given (its features would not be comparable)."""
    if manifest.fingerprint != fingerprint:
        built_by = manifest.model.get("weights", "an unrecorded checkpoint")
        raise SearchIndexError(
            f"{folder} was built by another model (fingerprint {manifest.fingerprint}, this model {fingerprint}; "
            f"it was built from {built_by}): query it with that checkpoint, or index the videos again into a new folder"
        )
