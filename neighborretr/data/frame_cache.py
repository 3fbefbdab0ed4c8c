"""Decode-once frame cache: every video decoded once, its frames kept in a few memory-mapped files.

A training epoch decodes every video again although the frames it can draw never change. The cache decodes
each video (each record segment) once, at the run's `video_framerate`, and keeps, per entry:

- for deterministic sampling ("head", "uniform"), exactly the frames that sampling picks;
- for "random" sampling, every candidate frame the draw chooses from (the segment's frames at
  `video_framerate`), as long as there are at most `max_candidates` of them (default 256, i.e. 4 min at
  1 fps; a longer entry keeps only its deterministic frames and random draws of it are decoded as before).

Frames are stored as uint8 after `resize_crop` (the model's input size, S x S: "clip" form), which is exactly
the first half of `clip_frames`, so the cached and the decoded paths give identical tensors. They are kept
channels-first ([k, 3, H, W]) and handed out as a channels-last view of that: `clip_frames` then turns them back
into its channels-first float output with a contiguous copy (faster than a transposing one). When the training
clips are augmented (`rand_augment`), augmentation runs on the decoded frames before the resize, so those frames
are kept as decoded ("source" form, the video's own size) and the resize runs at load time as before.

On disk (`folder/`): `index.json` (format version, the settings the cache serves, build counts),
`entries.jsonl` (one line per cached entry: shard, byte offset, candidate count, stored positions, shape),
`shard-NNNN.u8` (raw uint8 frames, appended; a new shard starts past `shard_bytes`) and `failures.txt`
(one `key<TAB>reason` line per video that could not be decoded). The reader maps the shards read-only.

Where the raw frames do not fit (ActivityNet at 64 frames of 224 px is about 145 GB), `compress="jpeg"` stores
each frame as a JPEG (quality 95 by default, about a fifth of the size): then the cached frames are no longer the
decoded ones bit for bit (a few levels of difference per pixel, like a re-encode), which the folder records.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from neighborretr.data.annotations import Record
from neighborretr.data.transforms import resize_crop
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import (
    SAMPLING_MODES,
    VideoDecodeError,
    decode_frames,
    sample_frame_indices,
    segment_frames,
)

FORMAT = 1
INDEX, ENTRIES, FAILURES = "index.json", "entries.jsonl", "failures.txt"
DEFAULT_MAX_CANDIDATES = 256
DEFAULT_SHARD_BYTES = 4 * 2**30
COMPRESSIONS = ("none", "jpeg")


@dataclass(frozen=True)
class CacheSpec:
    """What a cache serves: frames decoded by `backend` at `framerate` (None: every frame), `max_frames` per clip
    drawn by the sampling `modes`, stored in `form` "clip" (uint8 S x S after `resize_crop`, S = `image_size`)
    or "source" (as decoded, for clips augmented before the resize)."""

    backend: str
    framerate: float | None
    max_frames: int
    image_size: int
    modes: tuple[str, ...]
    form: str = "clip"

    def __post_init__(self):
        unknown = set(self.modes) - set(SAMPLING_MODES)
        if unknown or not self.modes:
            raise ValueError(f"frame cache modes {self.modes}: choose from {SAMPLING_MODES}")
        if self.form not in ("clip", "source"):
            raise ValueError(f"frame cache form {self.form!r}: choose clip or source")
        object.__setattr__(self, "modes", tuple(sorted(set(self.modes))))
        object.__setattr__(self, "framerate", None if self.framerate is None else float(self.framerate))

    def mismatches(self, run: CacheSpec) -> list[str]:
        """The settings of `run` this cache cannot serve, as `name: cache value != run value` strings."""
        out = [
            f"{name}: {getattr(self, name)!r} != {getattr(run, name)!r}"
            for name in ("backend", "framerate", "max_frames", "image_size", "form")
            if getattr(self, name) != getattr(run, name)
        ]
        missing = sorted(set(run.modes) - set(self.modes))
        if missing:
            out.append(f"sampling: built for {list(self.modes)}, the run also uses {missing}")
        return out


def cache_key(video_id: str, start: float | None = None, end: float | None = None) -> str:
    """The entry name of a video (or of its [start, end] segment)."""
    return video_id if start is None and end is None else f"{video_id}@{start!r},{end!r}"


def stored_positions(count: int, spec: CacheSpec, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> np.ndarray:
    """Increasing positions among an entry's `count` candidate frames that the cache keeps (see the module doc)."""
    if "random" in spec.modes and count <= max_candidates:
        return np.arange(count, dtype=np.int64)
    keep: set[int] = set()
    for mode in spec.modes:
        if mode != "random":  # the deterministic modes need no rng
            keep.update(sample_frame_indices(count, spec.max_frames, mode).tolist())
    return np.array(sorted(keep), dtype=np.int64)


@dataclass(frozen=True)
class CacheRequest:
    """One entry to build: `path` of the video (None: no file, `reason` says why) and its segment in seconds."""

    key: str
    path: str | None
    start: float | None = None
    end: float | None = None
    reason: str | None = None


def cache_requests(records: Iterable[Record], videos: VideoIndex) -> list[CacheRequest]:
    """One entry per distinct (video, segment) of `records`, with its file in `videos` (or why there is none)."""
    requests: dict[str, CacheRequest] = {}
    for r in records:
        key = cache_key(r.video_id, r.start, r.end)
        if key not in requests:
            path = videos.find(r)
            reason = None if path is not None else videos.describe_missing(r)
            requests[key] = CacheRequest(key, None if path is None else str(path), r.start, r.end, reason)
    return list(requests.values())


def decode_entry(
    request: CacheRequest, spec: CacheSpec, max_candidates: int = DEFAULT_MAX_CANDIDATES
) -> tuple[int, np.ndarray, np.ndarray]:
    """(candidate count, stored positions [k], frames [k, 3, H, W] uint8, channels first) of one entry, decoded once.

    Raises VideoDecodeError naming the file when it cannot be decoded."""
    found: dict = {}

    def choose(total: int, fps: float) -> np.ndarray:
        candidates = segment_frames(total, fps, request.start, request.end, spec.framerate)
        found["count"], found["positions"] = len(candidates), stored_positions(len(candidates), spec, max_candidates)
        # an entry that keeps nothing (random only, over the cap) still decodes one frame: the file is checked
        return candidates[found["positions"]] if len(found["positions"]) else candidates[:1]

    frames, _ = decode_frames(request.path, choose, spec.backend)
    frames = frames[: len(found["positions"])]
    if spec.form == "clip" and len(frames):
        return found["count"], found["positions"], resize_crop(frames, spec.image_size).contiguous().numpy()
    return found["count"], found["positions"], np.ascontiguousarray(frames.transpose(0, 3, 1, 2))


def _job(args: tuple[CacheRequest, CacheSpec, int, int | None]) -> tuple[str, object]:
    """Worker side: ("ok", (count, positions, frames or their JPEG files)) or ("failed", reason)."""
    request, spec, max_candidates, quality = args
    try:
        count, positions, frames = decode_entry(request, spec, max_candidates)
        return "ok", (count, positions, frames if quality is None else _compressed(frames, quality))
    except VideoDecodeError as err:
        return "failed", err.reason if err.path else str(err)
    except Exception as err:  # one bad file must not stop the build; its reason is listed instead
        return "failed", f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------------------------------------ writing


class _ShardWriter:
    """Appends entries to the shards and their lines to the journal. Opening resumes an earlier build: the
    journal's complete lines are the entries done, and bytes past the last one (a write cut short) are dropped."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.done = {e["key"]: e for e in _journal(folder)}
        ends: dict[int, int] = {}
        for e in self.done.values():
            ends[e["shard"]] = max(ends.get(e["shard"], 0), e["offset"] + _nbytes(e))
        self.shard = max(ends, default=0)
        for path in folder.glob("shard-*.u8"):  # drop partial writes, and shards no entry reaches
            number = int(path.stem.split("-")[1])
            if number in ends:
                os.truncate(path, ends[number])
            else:
                path.unlink()
        self.offset = ends.get(self.shard, 0)
        self._rewrite_journal()
        self.journal = open(folder / ENTRIES, "a", encoding="utf-8")
        self.data = open(_shard_path(folder, self.shard), "ab")

    def _rewrite_journal(self) -> None:
        """The journal without a torn last line, so that appended lines start on their own line."""
        text = "".join(json.dumps(e) + "\n" for e in self.done.values())
        (self.folder / ENTRIES).write_text(text, encoding="utf-8")

    def append(self, key: str, count: int, positions: np.ndarray, frames: np.ndarray | list[bytes]) -> None:
        """Stores an entry's frames: an array [k, 3, H, W] uint8, or k JPEG files (see `_compressed`)."""
        shape = list(frames.shape) if isinstance(frames, np.ndarray) else None
        blob = np.ascontiguousarray(frames, dtype=np.uint8).tobytes() if shape else b"".join(frames)
        if self.offset and self.offset + len(blob) > self.shard_bytes:
            self.data.close()
            self.shard, self.offset = self.shard + 1, 0
            self.data = open(_shard_path(self.folder, self.shard), "ab")
        self.data.write(blob)
        self.data.flush()  # the frames are on disk before the journal says so
        stored = "all" if len(positions) == count else positions.tolist()
        entry = {"key": key, "shard": self.shard, "offset": self.offset, "count": count, "positions": stored}
        entry |= {"shape": shape} if shape else {"jpeg_bytes": [len(f) for f in frames]}
        self.journal.write(json.dumps(entry) + "\n")
        self.journal.flush()
        self.done[key] = entry
        self.offset += len(blob)

    def close(self) -> None:
        self.data.close()
        self.journal.close()


def _nbytes(entry: dict) -> int:
    return sum(entry["jpeg_bytes"]) if "jpeg_bytes" in entry else int(np.prod(entry["shape"]))


def _compressed(frames: np.ndarray, quality: int) -> list[bytes]:
    """Each frame of [k, 3, H, W] uint8 as a JPEG file."""
    from torchvision.io import encode_jpeg

    return [encode_jpeg(f, quality=quality).numpy().tobytes() for f in torch.from_numpy(frames)]


def _shard_path(folder: Path, number: int) -> Path:
    return folder / f"shard-{number:04d}.u8"


def _journal(folder: Path) -> Iterator[dict]:
    """The journal's complete entries (a line cut short by a crash is ignored)."""
    path = folder / ENTRIES
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


def _read_index(folder: Path) -> dict | None:
    try:
        return json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ValueError(f"{folder / INDEX} is not valid JSON ({err}); delete the folder and rebuild") from err


def _write_index(folder: Path, header: dict) -> None:
    partial = folder / (INDEX + ".partial")
    partial.write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, folder / INDEX)


def _spec_of(header: dict, folder: Path) -> CacheSpec:
    if header.get("format") != FORMAT:
        raise ValueError(
            f"{folder} holds a frame cache of format {header.get('format')}, this version reads format {FORMAT}: "
            "rebuild it with neighborretr-cache-frames into an empty folder"
        )
    return CacheSpec(**{**header["spec"], "modes": tuple(header["spec"]["modes"])})


@dataclass
class CacheSummary:
    """Outcome of `build_frame_cache`, by entry key."""

    cached: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the cache (a resumed build)
    failed: dict[str, str] = field(default_factory=dict)
    over_cap: list[str] = field(default_factory=list)  # random draws of these are decoded (too many candidates)
    bytes: int = 0  # size of the shards
    compress: str = "none"


def build_frame_cache(
    requests: Iterable[CacheRequest],
    folder: str | Path,
    spec: CacheSpec,
    workers: int | None = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    compress: str = "none",
    quality: int = 95,
) -> CacheSummary:
    """Decode every requested entry once into the cache at `folder`, in `workers` processes (default: all CPUs).

    `compress="jpeg"` stores JPEG files of `quality` instead of raw frames (smaller, no longer bit-exact).
    Resumable: entries already in the folder are skipped (a build cut short loses at most the entry being written);
    a folder built for other settings is refused. Failures are listed in `folder/failures.txt` and the summary,
    and are retried by the next build."""
    if compress not in COMPRESSIONS:
        raise ValueError(f"frame cache compression {compress!r}: choose one of {COMPRESSIONS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_resumable(folder, spec, compress)
    header = {"format": FORMAT, "spec": asdict(spec), "max_candidates": max_candidates, "compress": compress}
    header |= {"quality": quality if compress == "jpeg" else None, "complete": False}
    _write_index(folder, header)
    writer = _ShardWriter(folder, shard_bytes)
    unique = list({r.key: r for r in requests}.values())
    summary = CacheSummary(skipped=sorted(k for k in (r.key for r in unique) if k in writer.done))
    todo = [r for r in unique if r.key not in writer.done]
    for r in todo:
        if r.path is None:
            summary.failed[r.key] = r.reason or "no video file"
    jobs = [(r, spec, max_candidates, quality if compress == "jpeg" else None) for r in todo if r.path is not None]
    try:
        with tqdm(total=len(jobs), desc="caching frames", unit="video", disable=not progress) as bar:
            for (request, *_), (status, result) in _run(jobs, workers):
                if status == "ok":
                    count, positions, frames = result
                    writer.append(request.key, count, positions, frames)
                    summary.cached.append(request.key)
                else:
                    summary.failed[request.key] = result
                bar.update()
    finally:
        writer.close()
    summary.over_cap = sorted(
        e["key"] for e in writer.done.values() if "random" in spec.modes and e["positions"] != "all"
    )
    summary.bytes = sum(p.stat().st_size for p in folder.glob("shard-*.u8"))
    summary.compress = compress
    summary.failed = dict(sorted(summary.failed.items()))
    (folder / FAILURES).write_text("".join(f"{k}\t{v}\n" for k, v in summary.failed.items()), encoding="utf-8")
    counts = {"entries": len(writer.done), "failed": len(summary.failed), "over_cap": len(summary.over_cap)}
    _write_index(folder, header | {"complete": True, "counts": counts, "bytes": summary.bytes})
    return summary


def _check_resumable(folder: Path, spec: CacheSpec, compress: str) -> None:
    """Refuses a folder that holds a cache of other settings: resumed entries would mix them."""
    old = _read_index(folder)
    if old is None:
        return
    differ = _spec_of(old, folder).mismatches(spec)
    if old.get("compress", "none") != compress:
        differ.append(f"compress: {old.get('compress', 'none')!r} != {compress!r}")
    if differ or _spec_of(old, folder) != spec:
        raise ValueError(
            f"{folder} holds a frame cache for other settings ({'; '.join(differ) or 'sampling'}); "
            "choose another folder or delete it"
        )


def _pool(workers: int) -> ProcessPoolExecutor:
    """Workers forked from this process, as DataLoader workers are: a fresh interpreter per worker (spawn,
    forkserver) would import torch again, which costs more than small caches take to build. Forking is safe here
    because the builder holds no open decoder when it forks (decode_frames closes each one; decord #294 is about
    readers alive across the fork) and each worker runs torch on one thread (`_one_thread`); where fork does not
    exist, workers are spawned."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_one_thread)


def _one_thread() -> None:
    """A forked child cannot use the OpenMP threads of its parent (libgomp waits on them forever once the parent
    ran a parallel region, e.g. an in-process build's resize); one thread never enters OpenMP, as DataLoader
    workers do. The processes are the parallelism anyway."""
    torch.set_num_threads(1)


def _run(jobs: list[tuple], workers: int | None) -> Iterator[tuple[tuple, tuple[str, object]]]:
    """(job, result) for every job, as they finish, with at most 2 x `workers` decoded entries in memory.

    A worker that dies (a decoder crash on a malformed file) breaks the pool: the jobs then in flight are listed
    as failed (the next build retries them) and the rest continue in a new pool."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(jobs) < 2:
        yield from ((job, _job(job)) for job in jobs)
        return
    queue = list(reversed(jobs))
    while queue:
        with _pool(workers) as pool:
            in_flight: dict[Future, tuple] = {}
            broken = False
            while (queue or in_flight) and not broken:
                while queue and len(in_flight) < 2 * workers:
                    job = queue.pop()
                    in_flight[pool.submit(_job, job)] = job
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    job = in_flight.pop(future)
                    try:
                        yield job, future.result()
                    except BrokenProcessPool:
                        broken = True
                        yield job, ("failed", "the decoding process crashed on this file or beside it")
            for job in in_flight.values():  # only after a break: the pool lost them
                yield job, ("failed", "the decoding process crashed on this file or beside it")


def estimate_bytes(
    requests: list[CacheRequest],
    spec: CacheSpec,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    sample: int = 16,
    seed: int = 0,
    compress: str = "none",
    quality: int = 95,
) -> tuple[int, int]:
    """(estimated shard bytes for all `requests`, entries sampled): the frames kept per entry and their size are
    read from up to `sample` randomly chosen entries (one frame decoded each, JPEG-compressed when `compress` says
    so) and scaled to all entries."""
    usable = [r for r in requests if r.path is not None]
    picked = np.random.default_rng(seed).permutation(len(usable))[:sample]
    sizes = []
    for i in picked:
        request, kept = usable[i], {}

        def choose(total: int, fps: float, request=request, kept=kept) -> np.ndarray:
            candidates = segment_frames(total, fps, request.start, request.end, spec.framerate)
            kept["frames"] = len(stored_positions(len(candidates), spec, max_candidates))
            return candidates[:1]

        try:
            frame, _ = decode_frames(request.path, choose, spec.backend)
        except VideoDecodeError:
            continue
        if spec.form == "clip":
            frame = resize_crop(frame, spec.image_size).contiguous().numpy()
        else:
            frame = np.ascontiguousarray(frame.transpose(0, 3, 1, 2))
        per_frame = len(_compressed(frame, quality)[0]) if compress == "jpeg" else frame.nbytes
        sizes.append(kept["frames"] * per_frame)
    if not sizes:
        return 0, 0
    return int(np.mean(sizes) * len(usable)), len(sizes)


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Entry:
    shard: int
    offset: int
    count: int  # candidate frames of the entry
    stored: np.ndarray | None  # increasing candidate positions kept (row i holds stored[i]); None: every one
    shape: tuple[int, ...] | None  # stored block [k, 3, H, W]; None: JPEG files
    jpeg_ends: np.ndarray | None = None  # end offset of each stored JPEG file after `offset`


class FrameCache:
    """Read side of a frame cache folder: `frames(key, max_frames, mode, rng)` draws exactly as `read_frames`
    would and returns the stored frames, or None when the entry (or a drawn frame) is not in the cache, in which
    case `rng` has not been used, so the caller decodes with the same draw.

    Open it with `FrameCache.open(folder, spec)` to refuse a cache built for other settings. The shards are
    memory-mapped on first use in each process (the object pickles without its maps, for loader workers).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        header = _read_index(self.folder)
        if header is None:
            raise FileNotFoundError(
                f"data.frame_cache={self.folder}: no frame cache there ({INDEX} missing); build it with "
                "neighborretr-cache-frames (same data settings) or set data.frame_cache=null"
            )
        self.spec = _spec_of(header, self.folder)
        self.complete = bool(header.get("complete"))
        self.compress = header.get("compress", "none")
        self.entries = {e["key"]: _entry(e) for e in _journal(self.folder)}
        self._maps: dict[int, np.memmap] = {}

    @classmethod
    def open(cls, folder: str | Path, spec: CacheSpec) -> FrameCache:
        """The cache at `folder`, refused (ValueError saying what differs) when it cannot serve `spec`."""
        cache = cls(folder)
        differ = cache.spec.mismatches(spec)
        if differ:
            raise ValueError(
                f"data.frame_cache={folder} was built for other settings ({'; '.join(differ)}): rebuild it with "
                "neighborretr-cache-frames and this run's data settings, or set data.frame_cache=null"
            )
        return cache

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_maps"} | {"_maps": {}}

    def _shard(self, number: int) -> np.memmap:
        if number not in self._maps:
            self._maps[number] = np.memmap(_shard_path(self.folder, number), dtype=np.uint8, mode="r")
        return self._maps[number]

    def _rows(self, entry: _Entry, rows: np.ndarray) -> np.ndarray:
        """The stored frames `rows` of `entry`, [len(rows), H, W, 3] uint8: a channels-last view of a channels-first
        copy (see the module doc)."""
        shard = self._shard(entry.shard)
        if entry.jpeg_ends is None:
            size = int(np.prod(entry.shape))
            chw = shard[entry.offset : entry.offset + size].reshape(entry.shape)[rows]  # fancy index: a copy
            return np.asarray(chw).transpose(0, 2, 3, 1)
        from torchvision.io import decode_jpeg

        starts = np.concatenate([[0], entry.jpeg_ends[:-1]]) + entry.offset
        files = [torch.from_numpy(np.array(shard[starts[r] : entry.offset + entry.jpeg_ends[r]])) for r in rows]
        return torch.stack([decode_jpeg(f) for f in files]).numpy().transpose(0, 2, 3, 1)

    def frames(self, key: str, max_frames: int, mode: str, rng: np.random.Generator | None = None) -> np.ndarray | None:
        """The frames [n, H, W, 3] uint8 that `read_frames(path, max_frames, mode, rng, ...)` returns for the entry
        (H = W = image_size in "clip" form), or None (rng untouched) when they are not all stored."""
        entry = self.entries.get(key)
        if entry is None or (mode == "random" and entry.stored is not None):
            return None  # random draws are served only from entries that keep every candidate
        positions = sample_frame_indices(entry.count, max_frames, mode, rng)
        rows = positions
        if entry.stored is not None:
            rows = np.minimum(np.searchsorted(entry.stored, positions), len(entry.stored) - 1)
            if len(entry.stored) == 0 or (entry.stored[rows] != positions).any():
                return None
        return self._rows(entry, rows)  # a copy: the map stays read-only and shared


def _entry(line: dict) -> _Entry:
    # the positions only, not a candidate-length map: clips with thousands of candidates keep a few frames
    stored = None if line["positions"] == "all" else np.asarray(line["positions"], dtype=np.int64)
    if "jpeg_bytes" in line:
        ends = np.cumsum(np.asarray(line["jpeg_bytes"], dtype=np.int64))
        return _Entry(line["shard"], line["offset"], line["count"], stored, None, ends)
    return _Entry(line["shard"], line["offset"], line["count"], stored, tuple(line["shape"]))
