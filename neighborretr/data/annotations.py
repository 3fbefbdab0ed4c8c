"""Annotation parsers. Each benchmark has one parser returning `Record`s; one dataset class serves them all."""

from __future__ import annotations

import csv
import json
import logging
import math
import pickle
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file exists but is not in the expected format."""


@dataclass(frozen=True)
class Record:
    """One caption (or paragraph) of one video.

    `start`/`end` (seconds) restrict decoding to a segment when set. `file_stems` are other names the video's
    file may carry besides `video_id` (ActivityNet copies exist with and without the "v_" prefix).
    """

    video_id: str
    caption: str
    start: float | None = None
    end: float | None = None
    file_stems: tuple[str, ...] = ()


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


def _read_json(path: Path, what: str):
    try:
        return json.loads(_require(path, what).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from err


def _read_id_list(path: Path, what: str) -> list[str]:
    """One id per line; blank lines are ignored, repeated ids are kept (validate_data.py reports them)."""
    ids = [line.strip() for line in _require(path, what).read_text(encoding="utf-8").splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise AnnotationError(f"{path} lists no videos")
    return ids


def _msrvtt_captions(root: Path) -> dict[str, list[str]]:
    path = root / "MSRVTT_data.json"
    data = _read_json(path, "MSR-VTT annotation file")
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
    return [Record(v, c) for v in _train_val(train_ids, split, val_videos, val_seed) for c in captions[v]]


def _train_val(ids: list[str], split: str, val_videos: int, val_seed: int) -> list[str]:
    held_out = held_out_videos(sorted(set(ids)), val_videos, val_seed)
    return [v for v in ids if (v in held_out) == (split == "val")]


def _check_split(split: str, splits: tuple[str, ...], benchmark: str) -> None:
    if split not in splits:
        raise ValueError(f"unknown {benchmark} split {split!r}; expected one of {splits}")


def _msvd_captions(root: Path) -> dict[str, list[str]]:
    """raw-captions.pkl (CLIP4Clip: id -> list of token lists) or captions_msvd.json (X-Pool: id -> strings)."""
    pkl, js = root / "raw-captions.pkl", root / "captions_msvd.json"
    if pkl.is_file():
        try:
            with open(pkl, "rb") as f:
                raw = pickle.load(f)  # the format the field distributes; only load files you trust
        except Exception as err:
            raise AnnotationError(f"{pkl} cannot be unpickled ({type(err).__name__}: {err})") from err
    elif js.is_file():
        raw = _read_json(js, "MSVD caption file")
    else:
        raise FileNotFoundError(f"MSVD captions not found: neither {pkl} nor {js}. See data/README.md.")
    source = pkl if pkl.is_file() else js
    if not isinstance(raw, dict):
        raise AnnotationError(f"{source}: expected a dict video_id -> list of captions, got {type(raw).__name__}")
    captions = {}
    for video_id, caps in raw.items():
        if not isinstance(caps, list) or not caps:
            raise AnnotationError(f"{source}: video {video_id!r} has no caption list: {caps!r}")
        captions[video_id] = [c if isinstance(c, str) else " ".join(c) for c in caps]
    return captions


def parse_msvd(root: str | Path, split: str) -> list[Record]:
    """MSVD in the CLIP4Clip layout: {train,val,test}_list.txt and raw-captions.pkl; every caption is a record
    (about 40 per video, so the test split is scored with many captions per video)."""
    _check_split(split, ("train", "val", "test"), "MSVD")
    root = Path(root)
    ids = _read_id_list(root / f"{split}_list.txt", "MSVD split list")
    captions = _msvd_captions(root)
    missing = [v for v in ids if v not in captions]
    if missing:
        raise AnnotationError(f"{len(missing)} MSVD {split} video(s) have no captions, e.g. {missing[:5]}")
    return [Record(v, c) for v in ids for c in captions[v]]


DIDEMO_END_SECONDS = 31.0  # the official loader decodes [0, 31] s whatever the annotated moments


def parse_didemo(root: str | Path, split: str) -> list[Record]:
    """DiDeMo in the CLIP4Clip layout: {split}_list.txt (file names) and {split}_data.json (a list of
    {video, description, times}). One record per video: its descriptions joined in file order, [0, 31] s.
    Listed videos without any description are left out (the official loader does the same) and counted in the
    log; the video id keeps its extension, and a re-encoded copy with another extension is found too."""
    _check_split(split, ("train", "val", "test"), "DiDeMo")
    root = Path(root)
    ids = _read_id_list(root / f"{split}_list.txt", "DiDeMo split list")
    path = root / f"{split}_data.json"
    data = _read_json(path, "DiDeMo annotation file")
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a list of {{video, description, times}} objects")
    paragraphs: dict[str, list[str]] = defaultdict(list)
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("video"), str) or "description" not in item:
            raise AnnotationError(f"{path}: entry {i} lacks 'video' or 'description': {item!r}")
        paragraphs[item["video"]].append(str(item["description"]).strip())
    kept = [v for v in ids if v in paragraphs]
    if len(kept) < len(ids):
        log.warning("DiDeMo %s: %d listed video(s) have no description in %s", split, len(ids) - len(kept), path)
    return [Record(v, " ".join(paragraphs[v]), 0.0, DIDEMO_END_SECONDS) for v in kept]


def _activitynet_stems(video_id: str) -> tuple[str, ...]:
    # HBI/NeighborRetr name files v_<id>.mp4, CLIP4Clip <id>.mp4: accept both.
    return (video_id[2:],) if video_id.startswith("v_") else (f"v_{video_id}",)


def parse_activitynet(root: str | Path, split: str, val_videos: int = 0, val_seed: int = 0) -> list[Record]:
    """ActivityNet Captions, paragraph-to-video: train.json / val_1.json ({id: {duration, sentences}}) with the
    optional train_ids.json / val_ids.json. One record per video: its sentences joined, [0, ceil(duration)] s.

    "test" is val_1 (the field's protocol); "val" is a seeded held-out slice of `val_videos` training videos,
    so model selection never looks at val_1.
    """
    _check_split(split, ("train", "val", "test"), "ActivityNet")
    root = Path(root)
    stem = "val_1" if split == "test" else "train"
    path = root / f"{stem}.json"
    data = _read_json(path, "ActivityNet annotation file")
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected an object video_id -> {{duration, sentences}}")
    ids_path = root / ("val_ids.json" if split == "test" else "train_ids.json")
    if ids_path.is_file():
        ids = _read_json(ids_path, "ActivityNet id list")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise AnnotationError(f"{ids_path}: expected a JSON list of video ids like 'v_QOlSCBRmfWY'")
        missing = [v for v in ids if v not in data]
        if missing:
            raise AnnotationError(f"{len(missing)} id(s) of {ids_path} are not in {path}, e.g. {missing[:5]}")
    else:
        log.info("%s not found: using every video of %s", ids_path.name, path)
        ids = list(data)
    if split != "test":
        ids = _train_val(ids, split, val_videos, val_seed)
    records = []
    for video_id in ids:
        entry = data[video_id]
        if not isinstance(entry, dict) or "duration" not in entry or not entry.get("sentences"):
            raise AnnotationError(f"{path}: {video_id!r} lacks 'duration' or 'sentences': {entry!r}")
        paragraph = " ".join(str(s).strip() for s in entry["sentences"])
        end = float(math.ceil(float(entry["duration"])))
        records.append(Record(video_id, paragraph, 0.0, end, _activitynet_stems(video_id)))
    return records


PARSERS = {"msrvtt": parse_msrvtt, "msvd": parse_msvd, "didemo": parse_didemo, "activitynet": parse_activitynet}
"""Benchmark name (data.benchmark) -> parser(root, split, **options)."""
