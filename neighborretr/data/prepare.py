"""Re-encode a video collection once into small, uniform H.264 files that decode fast during training.

Every output is an mp4 with one H.264 (yuv420p) video stream at a fixed frame rate, scaled so that its
short side has a fixed length; audio, subtitles and every other stream are dropped. This is the usual
CLIP4Clip-style preprocessing (``ffmpeg -r 3 -vf scale=...:224``), done through PyAV's libav filter graph
so that no ffmpeg binary is needed and frame-rate conversion behaves exactly like ffmpeg's ``fps`` filter.

``prepare_folder`` mirrors a folder tree (``src/a/b.avi`` -> ``dst/a/b.mp4``), runs in parallel processes,
never stops on one bad file, and is resumable: outputs are written atomically, and a re-run skips every
output that already decodes.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
from av.video.frame import PictureType
from tqdm import tqdm

from neighborretr.data.video_io import EMPTY_FILE, VIDEO_EXTENSIONS

MANIFEST_NAME = "prepare_videos.json"
# crf 23 is x264's default quality: artefacts stay far below what a 224 px CLIP input can see. "veryfast" is
# about 3x faster than the default "medium" for files ~10% larger, which matters when a dataset of tens of
# thousands of clips is converted and the outputs are small anyway.
ENCODER_OPTIONS = {"crf": "23", "preset": "veryfast"}


class PrepareError(RuntimeError):
    """A source video cannot be converted; ``reason`` says why (without the path)."""

    def __init__(self, src: Path, reason: str) -> None:
        super().__init__(f"{src}: {reason}")
        self.src = src
        self.reason = reason


@dataclass
class PrepareSummary:
    """Outcome of ``prepare_folder``, by source path relative to the source folder."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # a good output already existed (resumed run)
    failed: dict[str, str] = field(default_factory=dict)  # source -> reason


def scaled_size(width: float, height: float, short_side: int) -> tuple[int, int]:
    """Output (width, height) for a picture displayed at width x height: the short side becomes ``short_side``,
    the long side keeps the aspect ratio, rounded to the nearest even number (yuv420p needs even sizes)."""

    def even(x: float) -> int:
        return max(2, 2 * round(x / 2))

    if width >= height:
        return even(width * short_side / height), short_side
    return short_side, even(height * short_side / width)


def prepare_video(src: str | Path, dst: str | Path, fps: float = 3, short_side: int = 224) -> None:
    """Re-encode ``src`` into ``dst`` (H.264 mp4, video only) at ``fps`` frames per second, scaled so that its
    short side is ``short_side`` pixels. ``dst`` appears only once complete; raises ``PrepareError`` when the
    source cannot be opened, has no video stream, or yields no frames."""
    _convert(Path(src), Path(dst), fps, short_side, threads=0)


def is_good_output(path: str | Path) -> bool:
    """True when ``path`` is a non-empty video file that opens and decodes at least one frame."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with av.open(str(path)) as container:
            if not container.streams.video:
                return False
            next(container.decode(container.streams.video[0]))
    except (av.error.FFmpegError, OSError, StopIteration):
        return False
    return True


def partial_path(dst: Path) -> Path:
    """Where ``dst`` is written before being moved into place. It never ends in ``.mp4``, so it can neither be
    mistaken for a finished output nor collide with another output (``a.partial.mp4`` could)."""
    return dst.with_name(dst.name + ".partial")


def _check_settings(fps: float, short_side: int) -> None:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if short_side < 2 or short_side % 2:
        raise ValueError(f"short_side must be an even number >= 2 (yuv420p), got {short_side}")


def _rate(fps: float) -> Fraction:
    """``fps`` as the exact fraction the filter and the encoder share (29.97 -> 2997/100)."""
    return Fraction(fps).limit_denominator(1001)


def _convert(src: Path, dst: Path, fps: float, short_side: int, threads: int) -> None:
    """``prepare_video`` with a thread count for the decoder, filters and encoder (0: automatic)."""
    _check_settings(fps, short_side)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(dst)
    try:
        _transcode(src, partial, _rate(fps), short_side, threads)
        os.replace(partial, dst)
    except BaseException:  # also on Ctrl-C: a stale partial file would only waste space
        partial.unlink(missing_ok=True)
        raise


def _transcode(src: Path, out_path: Path, rate: Fraction, short_side: int, threads: int) -> None:
    if src.is_file() and src.stat().st_size == 0:
        raise PrepareError(src, EMPTY_FILE)  # say so plainly instead of libav's "Invalid data found"
    try:
        source = av.open(str(src))
    except (av.error.FFmpegError, OSError) as err:
        raise PrepareError(src, f"cannot open: {err}") from err
    with source:
        if not source.streams.video:
            raise PrepareError(src, "no video stream")
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        try:
            with av.open(str(out_path), "w", format="mp4") as out:
                written = _encode_all(_stamped(_decoded(source, stream)), stream, out, rate, short_side, threads)
                if not written:
                    raise PrepareError(src, "no frame could be decoded")
        except av.error.FFmpegError as err:
            raise PrepareError(src, f"conversion failed: {err}") from err


def _decoded(source: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    """The stream's frames. A packet that fails to decode is skipped, as the ffmpeg CLI does, so that a file
    with a few corrupt packets (common in scraped datasets) still converts."""
    for packet in source.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def _stamped(frames: Iterable[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    """Frames with a timestamp: the fps filter drops frames without one, and a decoder may return such frames
    (streams without timestamps); each gets the previous timestamp + 1."""
    last = None
    for frame in frames:
        if frame.pts is None:
            frame.pts = 0 if last is None else last + 1
        last = frame.pts
        yield frame


def _encode_all(
    frames: Iterator[av.VideoFrame],
    stream: av.VideoStream,
    out: av.container.OutputContainer,
    rate: Fraction,
    short_side: int,
    threads: int,
) -> int:
    """Filter and encode every frame into ``out``; returns the number of frames written."""
    first = next(frames, None)
    if first is None:
        return 0
    graph, (width, height) = _filter_graph(first, stream, rate, short_side, threads)
    encoder = out.add_stream("libx264", rate=rate, options={**ENCODER_OPTIONS, "threads": str(threads)})
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    # The encoder's time base. Not encoder.time_base: that is the stream's, which the mp4 muxer replaces
    # (e.g. by 1/12800) when it writes the header, and frames stamped with it would be rescaled to pts 0.
    tick = 1 / rate
    written = 0
    for frame in _filtered(graph, itertools.chain([first], frames), first):
        # The fps filter outputs one frame per tick, so a counter is the timestamp; starting at 0 avoids an
        # edit list when the source starts late. pict_type is reset because x264 would otherwise copy the
        # source's frame types (an all-intra source would give an all-keyframe output), as the ffmpeg CLI does.
        frame.pts, frame.time_base, frame.pict_type = written, tick, PictureType.NONE
        out.mux(encoder.encode(frame))
        written += 1
    out.mux(encoder.encode(None))  # flush the encoder's delayed frames
    return written


def _filtered(graph: av.filter.Graph, frames: Iterable[av.VideoFrame], first: av.VideoFrame) -> Iterator[av.VideoFrame]:
    """What the graph outputs for ``frames``, including the frames it holds back until the end."""
    for frame in frames:
        if (frame.width, frame.height, frame.format.name) != (first.width, first.height, first.format.name):
            # the graph's input is fixed at the first frame's geometry; a mid-stream change is rescaled to it
            frame = frame.reformat(first.width, first.height, first.format.name)
        graph.vpush(frame)
        yield from _pull_ready(graph)
    graph.vpush(None)
    yield from _pull_ready(graph)


def _pull_ready(graph: av.filter.Graph) -> Iterator[av.VideoFrame]:
    while True:
        try:
            frame = graph.vpull()
        except (BlockingIOError, EOFError):  # the graph needs more input / has output everything
            return
        yield frame


def _filter_graph(
    first: av.VideoFrame, stream: av.VideoStream, rate: Fraction, short_side: int, threads: int
) -> tuple[av.filter.Graph, tuple[int, int]]:
    """buffer -> fps -> [rotation] -> scale -> setsar -> format -> buffersink, and the output size.

    The size comes from the displayed picture: non-square pixels (DVD-style anamorphic files) are stretched
    to their display aspect, and a rotation flag (phone videos) is applied, as ffmpeg's autorotate does.
    The output has square pixels and no rotation flag, because training decoders ignore both.
    """
    sar = stream.sample_aspect_ratio or Fraction(1)
    turns = round(-first.rotation / 90) % 4  # clockwise quarter turns; frame.rotation is counter-clockwise
    display = (first.width * sar, first.height)
    if turns % 2:
        display = display[::-1]
    size = scaled_size(*display, short_side)
    graph = av.filter.Graph()
    graph.threads = threads
    time_base = first.time_base or stream.time_base or Fraction(1, 1000)
    nodes = [
        graph.add(
            "buffer",
            video_size=f"{first.width}x{first.height}",
            pix_fmt=first.format.name,
            time_base=str(time_base),
            pixel_aspect=str(sar),
        ),
        graph.add("fps", str(rate)),  # ffmpeg's -r: drops/duplicates frames onto a constant 1/rate grid
        *[graph.add(name, args) for name, args in _rotation_filters(turns)],
        graph.add("scale", f"{size[0]}:{size[1]}:flags=bicubic"),
        graph.add("setsar", "1"),
        graph.add("format", "yuv420p"),
        graph.add("buffersink"),
    ]
    graph.link_nodes(*nodes).configure()
    return graph, size


def _rotation_filters(turns: int) -> list[tuple[str, str | None]]:
    """Filters that turn the picture ``turns`` quarter turns clockwise."""
    return {0: [], 1: [("transpose", "clock")], 2: [("hflip", None), ("vflip", None)], 3: [("transpose", "cclock")]}[
        turns
    ]


# ---------------------------------------------------------------------------------------------- folders


@dataclass(frozen=True)
class _Job:
    """One source file for a worker process (small and picklable)."""

    name: str  # source path relative to the source folder
    src: Path
    dst: Path
    fps: float
    short_side: int
    threads: int


def _run_job(job: _Job) -> tuple[str, str]:
    """("skipped" | "converted" | "failed", reason). Checking the existing output here, not in the parent,
    spreads that decode over the workers too."""
    if is_good_output(job.dst):
        return "skipped", ""
    try:
        _convert(job.src, job.dst, job.fps, job.short_side, job.threads)
    except PrepareError as err:
        return "failed", err.reason
    except Exception as err:  # one bad file must not stop the folder; its reason is reported instead
        return "failed", f"{type(err).__name__}: {err}"
    return "converted", ""


def find_videos(src_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Video files under ``src_dir`` (by extension, any case), sorted, leaving out the ``exclude`` folder."""
    found = []
    for folder, dirs, files in os.walk(src_dir):
        if exclude is not None:
            dirs[:] = [d for d in dirs if Path(folder, d).resolve() != exclude]
        found += [Path(folder, f) for f in files if Path(f).suffix.lower() in VIDEO_EXTENSIONS]
    return sorted(found)


def _plan(src_dir: Path, dst_dir: Path, fps: float, short_side: int, threads: int) -> tuple[list[_Job], dict]:
    """One job per source, and the failures of sources whose output name an earlier source already takes."""
    jobs, failed, owner = [], {}, {}
    for src in find_videos(src_dir, exclude=dst_dir.resolve()):
        rel = src.relative_to(src_dir)
        out_rel = rel.with_suffix(".mp4")
        if out_rel in owner:
            failed[rel.as_posix()] = f"same output {out_rel.as_posix()} as {owner[out_rel]}; rename one of them"
            continue
        owner[out_rel] = rel.as_posix()
        jobs.append(_Job(rel.as_posix(), src, dst_dir / out_rel, fps, short_side, threads))
    return jobs, failed


def prepare_folder(
    src_dir: str | Path,
    dst_dir: str | Path,
    fps: float = 3,
    short_side: int = 224,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Convert every video under ``src_dir`` into ``dst_dir/<same relative folder>/<stem>.mp4`` with
    ``prepare_video``, in ``workers`` processes (default: all CPUs).

    Existing good outputs are skipped, so an interrupted run resumes where it stopped. Files that cannot be
    converted (and sources whose output name another source already takes) are listed in ``failed`` with
    their reason; the rest still converts. ``dst_dir/prepare_videos.json`` records the settings and counts.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    _check_settings(fps, short_side)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"source folder {src_dir} does not exist")
    if src_dir.resolve() == dst_dir.resolve():
        raise ValueError("the destination folder must differ from the source folder (outputs would replace sources)")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _check_manifest(dst_dir, fps, short_side)
    # Parallel processes already fill the cores; more threads each would only oversubscribe them.
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs, failed = _plan(src_dir, dst_dir, fps, short_side, threads)
    summary = PrepareSummary(failed=failed)
    _write_manifest(dst_dir, src_dir, fps, short_side, summary, complete=False)
    with tqdm(total=len(jobs), desc="preparing videos", unit="video", disable=not progress) as bar:

        def record(job: _Job, status: str, reason: str) -> None:
            if status == "failed":
                summary.failed[job.name] = reason
            else:
                getattr(summary, status).append(job.name)
            bar.update()

        _run_jobs(jobs, min(workers, max(1, len(jobs))), record)
    summary.converted.sort()
    summary.skipped.sort()
    summary.failed = dict(sorted(summary.failed.items()))
    _write_manifest(dst_dir, src_dir, fps, short_side, summary, complete=True)
    return summary


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers start clean. Under plain fork a worker inherits the caller's live libav
    objects (an open container, a traceback holding one); freeing a threaded codec context there waits for
    threads that were not copied and hangs forever, so workers fork from a fresh forkserver process instead."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def _run_jobs(
    jobs: list[_Job], workers: int, record: Callable[[_Job, str, str], None], work: Callable = _run_job
) -> None:
    """Run ``work(job)`` for every job in ``workers`` processes, calling ``record(job, status, reason)`` as each
    finishes.

    A worker that dies (a libav crash on a malformed file) breaks the whole pool, and every job in flight
    with it. Keeping only ``workers`` jobs in flight bounds those suspects; each is then re-run alone in a
    fresh process, which names the culprit, and the rest continue in a new pool. A suspect that had finished
    its output before the pool went down is reported as skipped by its re-run.
    """
    queue, suspects = list(reversed(jobs)), []
    while queue:
        with _pool(workers) as pool:
            suspects += _drain_pool(pool, queue, workers, record, work)
    for job in suspects:
        with _pool(1) as pool:
            try:
                record(job, *pool.submit(work, job).result())
            except BrokenProcessPool:
                record(job, "failed", "the worker process crashed while converting it (a libav bug on this file?)")


def _drain_pool(
    pool: ProcessPoolExecutor,
    queue: list[_Job],
    workers: int,
    record: Callable[[_Job, str, str], None],
    work: Callable,
) -> list[_Job]:
    """Feed ``queue`` (popped from the end) to ``pool`` until it is empty or the pool breaks; returns the jobs
    that were in flight when it broke."""
    in_flight: dict[Future, _Job] = {}
    broken = []
    while (queue or in_flight) and not broken:
        while queue and len(in_flight) < workers:
            job = queue.pop()
            in_flight[pool.submit(work, job)] = job
        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            job = in_flight.pop(future)
            try:
                record(job, *future.result())
            except BrokenProcessPool:
                broken.append(job)
    return broken + list(in_flight.values()) if broken else []


def _read_manifest(dst_dir: Path) -> dict | None:
    try:
        manifest = json.loads((dst_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _check_manifest(dst_dir: Path, fps: float, short_side: int) -> None:
    """Refuse to mix settings in one folder: resumed files would silently keep the old frame rate or size."""
    old = _read_manifest(dst_dir)
    if old is None:
        return
    if _rate(old.get("fps", fps)) != _rate(fps) or old.get("short_side", short_side) != short_side:
        raise ValueError(
            f"{dst_dir} holds videos prepared with fps={old.get('fps')}, short_side={old.get('short_side')}; "
            f"use another destination folder for fps={fps}, short_side={short_side}"
        )


def _write_manifest(
    dst_dir: Path, src_dir: Path, fps: float, short_side: int, summary: PrepareSummary, complete: bool
) -> None:
    """Record the settings (written first, so that an interrupted run is recognised too) and, once complete,
    the counts and failures."""
    manifest = {
        "fps": float(fps),
        "short_side": short_side,
        "codec": "h264 (libx264 " + ", ".join(f"{k} {v}" for k, v in ENCODER_OPTIONS.items()) + "), yuv420p",
        "source": str(src_dir.resolve()),
        "complete": complete,
        "counts": {"converted": len(summary.converted), "skipped": len(summary.skipped), "failed": len(summary.failed)},
        "failed": summary.failed,
    }
    dst_dir.mkdir(parents=True, exist_ok=True)
    path = dst_dir / MANIFEST_NAME
    partial = partial_path(path)
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
