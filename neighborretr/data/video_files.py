"""Finding a record's video file in a folder tree, whatever extension or naming variant a mirror used."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from neighborretr.data.annotations import Record
from neighborretr.data.video_io import VIDEO_EXTENSIONS


def _strip_video_extension(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in VIDEO_EXTENSIONS else name


class VideoIndex:
    """Maps records to files under `video_dir` (scanned once, recursively).

    A record's file is, in this order: a file named exactly like the video id (DiDeMo ids carry their
    extension), then a file whose stem is the id, or the id without its video extension (a re-encoded copy),
    then the same for each of the record's `file_stems`. Among several files with the same stem the
    extension order of VIDEO_EXTENSIONS decides, so the choice does not depend on the file system.
    """

    def __init__(self, video_dir: str | Path):
        self.video_dir = Path(video_dir)
        if not self.video_dir.is_dir():
            raise FileNotFoundError(f"video folder not found: {self.video_dir} (set data.video_dir)")
        self._by_name: dict[str, str] = {}
        self._by_stem: dict[str, list[str]] = defaultdict(list)
        rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}
        for folder, dirs, files in os.walk(self.video_dir):
            dirs.sort()  # the first of two same-named files in different folders must not depend on the file system
            for name in sorted(files):
                path = os.path.join(folder, name)
                self._by_name.setdefault(name, path)
                stem, ext = os.path.splitext(name)
                if ext.lower() in rank:
                    self._by_stem[stem].append(path)
        for paths in self._by_stem.values():
            paths.sort(key=lambda p: (rank[os.path.splitext(p)[1].lower()], p))

    def _names(self, record: Record) -> list[str]:
        return [record.video_id, *record.file_stems]

    def candidates(self, record: Record) -> list[Path]:
        """Every file that could be the record's video, best first (more than one means an ambiguous id)."""
        found: list[str] = []
        for name in self._names(record):
            for path in [self._by_name.get(name), *self._by_stem.get(_strip_video_extension(name), [])]:
                if path is not None and path not in found:
                    found.append(path)
        return [Path(p) for p in found]

    def find(self, record: Record) -> Path | None:
        """The record's video file, or None when there is none."""
        found = self.candidates(record)
        return found[0] if found else None

    def describe_missing(self, record: Record) -> str:
        names = ", ".join(f"{_strip_video_extension(n)}.*" for n in self._names(record))
        return f"no file for video {record.video_id!r} under {self.video_dir} (looked for {names})"
