"""Annotation parsers. Each benchmark has one parser returning `Record`s; one dataset class serves them all."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class AnnotationError(ValueError):
    """An annotation file exists but is not in the expected format."""


@dataclass(frozen=True)
class Record:
    """One caption of one video. `start`/`end` (seconds) restrict decoding to a segment when set."""

    video_id: str
    caption: str
    start: float | None = None
    end: float | None = None


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. See data/README.md for the expected layout.")
    return path


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with open(_require(path, "annotation file"), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = list(reader)
    for i, row in enumerate(rows, start=2):
        if any(not row.get(c) for c in columns):
            raise AnnotationError(f"{path}, line {i}: empty value in column(s) {list(columns)}: {row}")
    return rows


def _msrvtt_captions(root: Path) -> dict[str, list[str]]:
    path = _require(root / "MSRVTT_data.json", "MSR-VTT annotation file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from err
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise AnnotationError(f"{path}: expected an object with a 'sentences' list of {{video_id, caption}}")
    captions: dict[str, list[str]] = defaultdict(list)
    for i, sentence in enumerate(data["sentences"]):
        if not isinstance(sentence, dict) or "video_id" not in sentence or "caption" not in sentence:
            raise AnnotationError(f"{path}: sentences[{i}] lacks 'video_id' or 'caption': {sentence!r}")
        captions[sentence["video_id"]].append(sentence["caption"])
    return captions


def held_out_videos(video_ids: list[str], count: int, seed: int) -> set[str]:
    """A seeded subset of `count` videos, independent of the input order (ids are sorted first)."""
    if count <= 0:
        return set()
    ids = sorted(video_ids)
    if count >= len(ids):
        raise ValueError(f"cannot hold out {count} of {len(ids)} training videos for validation")
    order = np.random.default_rng(seed).permutation(len(ids))[:count]
    return {ids[i] for i in order}


def parse_msrvtt(
    root: str | Path, split: str, train_list: str = "9k", val_videos: int = 0, val_seed: int = 0
) -> list[Record]:
    """MSR-VTT in the CLIP4Clip layout (also what the synthetic generator writes).

    Args:
        root: folder with MSRVTT_data.json, MSRVTT_train.{9k,7k}.csv and MSRVTT_JSFUSION_test.csv.
        split: "train" (every caption of every training video, minus the held-out ones), "val" (every caption of
            the `val_videos` held-out training videos) or "test" (the 1k-A list, one caption per video).
        train_list: "9k" or "7k".
        val_videos: how many training videos to hold out for model selection; the test split is never used for it.
        val_seed: seed of the held-out draw.
    """
    root = Path(root)
    if split == "test":
        rows = _read_csv(root / "MSRVTT_JSFUSION_test.csv", ("video_id", "sentence"))
        return [Record(r["video_id"], r["sentence"]) for r in rows]
    if split not in ("train", "val"):
        raise ValueError(f"unknown MSR-VTT split {split!r}; expected train, val or test")
    if train_list not in ("9k", "7k"):
        raise ValueError(f"data.train_list must be '9k' or '7k', got {train_list!r}")
    train_ids = [r["video_id"] for r in _read_csv(root / f"MSRVTT_train.{train_list}.csv", ("video_id",))]
    captions = _msrvtt_captions(root)
    missing = [v for v in train_ids if v not in captions]
    if missing:
        raise AnnotationError(
            f"{len(missing)} training video(s) have no caption in MSRVTT_data.json, e.g. {missing[:5]}"
        )
    held_out = held_out_videos(train_ids, val_videos, val_seed)
    keep = [v for v in train_ids if (v in held_out) == (split == "val")]
    return [Record(v, c) for v in keep for c in captions[v]]


PARSERS = {"msrvtt": parse_msrvtt}
