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


def _lookups(name: str) -> list[tuple[str, str]]:
    """The lookups of one name, best first: ``("name", file name)`` or ``("stem", stem of a video file)``.

    ``x.mov`` gives the file ``x.mov``, then stem ``x.mov`` (``x.mov.mp4``), then stem ``x`` (``x.mp4``); ``x``
    gives stem ``x`` only (a name without an extension cannot be a video file's full name).
    """
    lookups = [("name", name)] if os.path.splitext(name)[1] else []
    for stem in (name, _strip_video_extension(name)):
        if ("stem", stem) not in lookups:
            lookups.append(("stem", stem))
    return lookups


class VideoIndex:
    """Maps records to files under `video_dir` (scanned once, recursively; only file names are read).

    The names of a record are its `video_id`, then each of its `file_stems`. For each name, in this order:

    1. a file named exactly like the name, when the name has an extension (DiDeMo ids carry theirs: ``x.mov``);
    2. a video file whose stem is the whole name (``x.mov.mp4``, as the DiDeMo download scripts save them);
    3. a video file whose stem is the name without its video extension (``x.mp4``, a re-encoded copy).

    A video file is one with an extension of VIDEO_EXTENSIONS (any case). Among several files with the same stem
    the extension order of VIDEO_EXTENSIONS decides, then the path, so the choice does not depend on the file
    system. :meth:`describe_missing` lists every pattern that was looked up.
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

    def _lookups(self, record: Record) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for name in self._names(record):
            found += [lookup for lookup in _lookups(name) if lookup not in found]
        return found

    def candidates(self, record: Record) -> list[Path]:
        """Every file that could be the record's video, best first (more than one means an ambiguous id)."""
        found: list[str] = []
        for kind, key in self._lookups(record):
            paths = [self._by_name.get(key)] if kind == "name" else self._by_stem.get(key, [])
            found += [p for p in paths if p is not None and p not in found]
        return [Path(p) for p in found]

    def find(self, record: Record) -> Path | None:
        """The record's video file, or None when there is none."""
        found = self.candidates(record)
        return found[0] if found else None

    def describe_missing(self, record: Record) -> str:
        """Why :meth:`find` found nothing: the folder and every pattern that was looked up.

        ``stem.*`` stands for ``stem`` plus any extension of VIDEO_EXTENSIONS. Per name, a name with a video
        extension lists the pattern without it first (``x.*, x.mov, x.mov.*`` for ``x.mov``), so the list is
        not the order of preference, which the class docstring gives.
        """
        patterns: list[str] = []
        for name in self._names(record):
            lookups = _lookups(name)
            stripped = ("stem", _strip_video_extension(name))
            if stripped[1] != name:
                lookups = [stripped] + [lookup for lookup in lookups if lookup != stripped]
            for kind, key in lookups:
                pattern = key if kind == "name" else f"{key}.*"
                if pattern not in patterns:
                    patterns.append(pattern)
        return f"no file for video {record.video_id!r} under {self.video_dir} (looked for {', '.join(patterns)})"
