"""Checks of a benchmark's annotations against its video folder: what `scripts/validate_data.py` reports."""

from __future__ import annotations

import csv
import math
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from neighborretr.data.annotations import Record
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import EMPTY_FILE, NO_FRAMES, ProbeRequest, probe_videos

ERROR_KINDS = ("missing", "zero-length", "corrupt", "duplicate")  # any of these makes the data unusable as is
NOTE_KINDS = ("ambiguous", "repeated-caption")  # worth knowing, harmless for training


@dataclass(frozen=True)
class Problem:
    """One finding. `kind` is one of ERROR_KINDS or NOTE_KINDS; `path` is empty when there is no file."""

    kind: str
    split: str
    video_id: str
    path: str
    detail: str

    @property
    def is_error(self) -> bool:
        return self.kind in ERROR_KINDS


def duplicate_problems(splits: dict[str, list[Record]]) -> list[Problem]:
    """Videos listed more than once in a split (every record of the video repeated k times), videos present in
    several splits, and identical captions repeated within one video (a note: real datasets have a few).
    A video listed once whose every caption appears exactly k times is indistinguishable from one listed k
    times and is reported as listed k times."""
    problems = []
    owners: dict[str, list[str]] = defaultdict(list)
    for split, records in splits.items():
        by_video: dict[str, Counter] = defaultdict(Counter)
        for r in records:
            by_video[r.video_id][(r.caption, r.start, r.end)] += 1
        for video_id, counts in by_video.items():
            owners[video_id].append(split)
            times = math.gcd(*counts.values())
            if times > 1:
                problems.append(Problem("duplicate", split, video_id, "", f"listed {times} times in the {split} split"))
            repeated = [c for (c, _, _), n in counts.items() if n // times > 1]
            if repeated:
                detail = f"{len(repeated)} caption(s) appear more than once, e.g. {repeated[0]!r}"
                problems.append(Problem("repeated-caption", split, video_id, "", detail))
    for video_id, in_splits in owners.items():
        if len(in_splits) > 1:
            detail = f"in several splits: {', '.join(in_splits)} (evaluation would see training videos)"
            problems += [Problem("duplicate", s, video_id, "", detail) for s in in_splits[1:]]
    return problems


def _kind(reason: str) -> str:
    return "zero-length" if reason in (EMPTY_FILE, NO_FRAMES) else "corrupt"


def video_problems(
    splits: dict[str, list[Record]],
    videos: VideoIndex,
    backend: str = "pyav",
    max_frames: int = 12,
    framerate: float | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> list[Problem]:
    """Finds each distinct video's file and decodes the frames an evaluation would read (`max_frames` spread over
    the record's segment), in `workers` processes (all cores by default). Missing, zero-length (0 bytes or no
    frames) and corrupt files are errors; ids matching several files are notes (the first one is used)."""
    first: dict[str, tuple[str, Record]] = {}
    for split, records in splits.items():
        for r in records:
            first.setdefault(r.video_id, (split, r))
    problems, jobs, owners = [], [], []
    for video_id, (split, record) in sorted(first.items()):
        found = videos.candidates(record)
        if not found:
            problems.append(Problem("missing", split, video_id, "", videos.describe_missing(record)))
            continue
        if len(found) > 1:
            detail = f"{len(found)} files match; using the first: {', '.join(str(p) for p in found)}"
            problems.append(Problem("ambiguous", split, video_id, str(found[0]), detail))
        jobs.append(ProbeRequest(str(found[0]), max_frames, record.start, record.end, framerate))
        owners.append((split, video_id))
    reasons = probe_videos(jobs, backend, (os.cpu_count() or 1) if workers is None else workers, progress)
    for (split, video_id), job, reason in zip(owners, jobs, reasons):
        if reason is not None:
            problems.append(Problem(_kind(reason), split, video_id, job.path, reason))
    return problems


def find_bad_videos(
    records: list[Record],
    videos: VideoIndex,
    backend: str = "pyav",
    progress: bool = True,
    workers: int = 1,
    max_frames: int = 1,
    framerate: float | None = None,
) -> dict[str, str]:
    """The training pre-flight check: `video_problems`' errors as {video_id: "path: reason"} (or the lookup
    message for a missing file), sorted by id."""
    problems = video_problems({"": records}, videos, backend, max_frames, framerate, workers, progress)
    bad = {p.video_id: f"{p.path}: {p.detail}" if p.path else p.detail for p in problems if p.is_error}
    return dict(sorted(bad.items()))


def summary_rows(splits: dict[str, list[Record]], problems: list[Problem]) -> list[dict[str, object]]:
    """One row per split: record and video counts and the number of problems of each kind."""
    rows = []
    for split, records in splits.items():
        counts = Counter(p.kind for p in problems if p.split == split)
        row = {"split": split, "records": len(records), "videos": len({r.video_id for r in records})}
        rows.append(row | {kind: counts.get(kind, 0) for kind in (*ERROR_KINDS, *NOTE_KINDS)})
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """Plain aligned text table of dicts sharing their keys."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.rjust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).rjust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def write_problems(problems: list[Problem], path: Path) -> None:
    """Every problem as a CSV row (kind, split, video_id, path, detail)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(Problem.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(p) for p in problems)
