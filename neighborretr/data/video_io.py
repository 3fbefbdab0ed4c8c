"""Video decoding (PyAV by default; torchcodec and decord beside it) and temporal frame sampling.

Every backend answers the same request with the same frame indices: a frame's index is its position in
presentation order, the segment [start, end] is given in seconds, and `framerate` thins the segment to the
first frame of every 1/framerate-second step before `max_frames` are sampled from what is left.

PyAV bundles its own FFmpeg, so it works wherever the package installs: it is the default. torchcodec (PyTorch's
decoder, CPU or NVDEC) loads the system's FFmpeg libraries (Debian/Ubuntu: `apt-get install ffmpeg`); decord is
an optional extra (`pip install neighborretr[decord]`, x86-64 wheels only, unmaintained since 2021).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

VIDEO_EXTENSIONS = (
    ".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".3g2", ".wmv", ".flv",
    ".mts", ".m2ts", ".ts", ".qt", ".asf", ".divx",
)  # fmt: skip
SAMPLING_MODES = ("uniform", "random", "head")
BACKENDS = ("pyav", "torchcodec", "decord")


EMPTY_FILE = "the file is empty (0 bytes)"
NO_FRAMES = "the video has no frames"


class BackendUnavailable(RuntimeError):
    """A video backend cannot be loaded on this machine (a missing package or system library); the message says
    what to install. Deliberately not a VideoDecodeError: no video is bad, so nothing may be skipped for it."""


class VideoDecodeError(RuntimeError):
    """A video file is missing, empty or cannot be decoded; `reason` says why, `path` which file (if any)."""

    def __init__(self, reason: str, path: str | Path | None = None):
        super().__init__(reason if path is None else f"{path}: {reason}")
        self.reason = reason
        self.path = path


def sample_frame_indices(
    num_frames: int, max_frames: int, mode: str, rng: np.random.Generator | None = None, first: int = 0
) -> np.ndarray:
    """Picks up to `max_frames` of `num_frames` consecutive positions starting at `first`.

    "head" keeps the first max_frames positions (the official MSR-VTT loader). Otherwise the range is cut into
    min(max_frames, num_frames) equal segments; "uniform" takes each segment's centre (evaluation), "random" a
    uniformly drawn position inside each segment (training). Indices are increasing.
    """
    if num_frames <= 0:
        raise ValueError("a video with no frames cannot be sampled")
    count = min(max_frames, num_frames)
    if mode == "head":
        return first + np.arange(count, dtype=np.int64)
    edges = np.linspace(0, num_frames, count + 1)
    if mode == "uniform":
        positions = (edges[:-1] + edges[1:]) / 2
    elif mode == "random":
        if rng is None:
            raise ValueError("random sampling needs an rng")
        positions = rng.uniform(edges[:-1], edges[1:])
    else:
        raise ValueError(f"unknown frame sampling mode {mode!r}; expected one of {SAMPLING_MODES}")
    return first + np.clip(np.floor(positions).astype(np.int64), 0, num_frames - 1)


def segment_frames(
    total: int, fps: float, start: float | None = None, end: float | None = None, framerate: float | None = None
) -> np.ndarray:
    """Indices of the frames a request may choose from: those of [start, end] seconds (the whole video when
    both are None), thinned to the first frame of each 1/framerate-second step when `framerate` is lower than
    the video's frame rate. A video whose frame rate is unknown (0, NaN, inf) is used whole and not thinned."""
    if not (np.isfinite(fps) and fps > 0):
        return np.arange(total, dtype=np.int64)
    first = 0 if start is None else min(total - 1, max(0, int(round(start * fps))))
    last = total if end is None else int(round(end * fps))
    last = min(total, max(first + 1, last))
    if not framerate or framerate >= fps:
        return np.arange(first, last, dtype=np.int64)
    step = fps / framerate
    return first + np.floor(np.arange(0, (last - first) / step) * step).astype(np.int64)


def choose_frames(
    total: int,
    fps: float,
    max_frames: int,
    mode: str,
    rng: np.random.Generator | None = None,
    start: float | None = None,
    end: float | None = None,
    framerate: float | None = None,
) -> np.ndarray:
    """The increasing frame indices a request decodes (see `segment_frames` and `sample_frame_indices`)."""
    candidates = segment_frames(total, fps, start, end, framerate)
    return candidates[sample_frame_indices(len(candidates), max_frames, mode, rng)]


def check_backend(backend: str) -> None:
    """Raises ValueError for an unknown backend name and BackendUnavailable (saying what to install) when the
    backend cannot load here; returns quietly otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torchcodec":
        _torchcodec_decoder()
    elif backend == "decord":
        _decord()


def _decord():
    try:
        import decord
    except ImportError as err:
        raise BackendUnavailable(
            "the decord backend is not installed: pip install 'neighborretr[decord]' (x86-64 only), "
            "or choose data.backend=pyav"
        ) from err
    return decord


def _torchcodec_decoder():
    """torchcodec's VideoDecoder class. Importing torchcodec loads FFmpeg's shared libraries (libavcodec etc.),
    which its wheel does not carry; without them the import fails with a long list of attempts."""
    try:
        from torchcodec.decoders import VideoDecoder
    except ImportError as err:
        raise BackendUnavailable(
            "the torchcodec backend is not installed: pip install 'neighborretr[torchcodec]', "
            "or choose data.backend=pyav"
        ) from err
    except (RuntimeError, OSError) as err:
        raise BackendUnavailable(
            "torchcodec cannot load FFmpeg's libraries (libavcodec 4-9): install them "
            "(Debian/Ubuntu: apt-get install ffmpeg; conda: conda install ffmpeg), or choose data.backend=pyav"
        ) from err
    return VideoDecoder


def _read_torchcodec(path: Path, choose, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    # "exact" scans the file once so that frame i is the i-th in presentation order, as with the other backends;
    # one FFmpeg thread each because the DataLoader workers are the parallelism.
    decoder = _torchcodec_decoder()(
        str(path), seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC", device=device
    )
    meta = decoder.metadata
    if not meta.num_frames:
        raise VideoDecodeError(NO_FRAMES, path)
    # The header's average rate is what decord and PyAV report (the scanned one can differ by a rounding).
    fps = meta.average_fps_from_header or meta.average_fps or 0.0
    indices = choose(meta.num_frames, float(fps))
    return decoder.get_frames_at(indices.tolist()).data.cpu().numpy(), indices


def _read_decord(path: Path, choose) -> tuple[np.ndarray, np.ndarray]:
    decord = _decord()

    # One reader per call and one thread each: readers made before DataLoader workers fork deadlock (decord #294).
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    if len(reader) == 0:
        raise VideoDecodeError(NO_FRAMES, path)
    indices = choose(len(reader), reader.get_avg_fps())
    return reader.get_batch(indices.tolist()).asnumpy(), indices


def _pyav_fps(stream) -> float:
    return float(stream.average_rate or stream.guessed_rate or 1)


def _read_pyav_sparse(container, stream, choose) -> tuple[np.ndarray, np.ndarray] | None:
    """Decodes only what the chosen frames need: it seeks to the last keyframe before a chosen frame when that
    skips work, and asks the decoder to drop non-reference frames that are not chosen (nothing depends on them).

    Returns None whenever the packets cannot be trusted to index the frames (no timestamps, no keyframe first,
    a seek that lands elsewhere than on the keyframe, a chosen frame that never comes out), so that the caller
    decodes everything instead. Packets marked discard (mp4 edit-list pre-roll) are not frames.
    """
    packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and not p.is_discard]
    if not packets or not packets[0][1] or any(pts is None for pts, _ in packets):
        return None
    order = sorted(pts for pts, _ in packets)  # presentation order = frame index order
    if len(set(order)) < len(order) or order[0] < packets[0][0]:  # frames shown before the first keyframe
        return None
    keyframes = sorted(pts for pts, key in packets if key)
    indices = choose(len(order), _pyav_fps(stream))
    wanted = {order[i] for i in indices}
    got: dict[int, np.ndarray] = {}
    codec = stream.codec_context
    position = None  # largest pts decoded since the last seek
    for target in sorted(wanted):
        if target in got:
            continue
        key = keyframes[max(0, np.searchsorted(keyframes, target, side="right") - 1)]
        seeked = position is None or key > position
        if seeked:
            container.seek(key, stream=stream, backward=True, any_frame=False)
        for packet in container.demux(stream):
            if seeked and packet.size:
                if packet.pts != key:  # containers that seek by dts (MPEG-TS, AVI) may land past the keyframe
                    return None
                seeked = False
            codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
            for frame in codec.decode(packet if packet.size else None):
                position = frame.pts if position is None else max(position, frame.pts)
                if frame.pts in wanted and frame.pts not in got:
                    got[frame.pts] = frame.to_ndarray(format="rgb24")
            if target in got:
                break
        if target not in got:  # the decoder is flushed: nothing more can come out of it
            return None
    return np.stack([got[order[i]] for i in indices]), indices


def _read_pyav(path: Path, choose) -> tuple[np.ndarray, np.ndarray]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError("the file has no video stream", path)
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # the DataLoader workers are the parallelism, as with decord
        try:
            result = _read_pyav_sparse(container, stream, choose)
        except av.error.EOFError:
            result = None
        if result is not None:
            return result
        # The packets cannot index the frames (see _read_pyav_sparse): decode everything, index in output order.
        container.seek(0)
        stream.codec_context.skip_frame = "DEFAULT"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = _pyav_fps(stream)
    if not frames:
        raise VideoDecodeError(NO_FRAMES, path)
    indices = choose(len(frames), fps)
    return np.stack([frames[i] for i in indices]), indices


_READERS = {"decord": _read_decord, "pyav": _read_pyav, "torchcodec": _read_torchcodec}


def decode_frames(
    path: str | Path, choose: Callable[[int, float], np.ndarray], backend: str = "pyav", device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes the frames `choose(total_frames, fps) -> increasing indices` picks; `read_frames` for any choice.

    `device` is where torchcodec decodes ("cuda" or "cuda:N": NVDEC); the other backends decode on the CPU only.
    Returns frames [n, H, W, 3] uint8 RGB and their indices [n]; raises VideoDecodeError naming the file, and
    BackendUnavailable when the backend cannot load here.
    """
    if backend not in _READERS:
        raise ValueError(f"unknown video backend {backend!r}; expected one of {BACKENDS}")
    if device != "cpu" and backend != "torchcodec":
        raise ValueError(f"decoding on {device} needs backend torchcodec (the {backend} backend decodes on the CPU)")
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError("file not found", path)
    if path.stat().st_size == 0:
        raise VideoDecodeError(EMPTY_FILE, path)
    try:
        if backend == "torchcodec":
            return _read_torchcodec(path, choose, device)
        return _READERS[backend](path, choose)
    except (VideoDecodeError, BackendUnavailable):
        raise
    except Exception as err:  # decoders raise many unrelated types; callers need one with the path
        raise VideoDecodeError(f"cannot decode with {backend} ({type(err).__name__}: {err})", path) from err


def read_frames(
    path: str | Path,
    max_frames: int,
    mode: str = "uniform",
    rng: np.random.Generator | None = None,
    backend: str = "pyav",
    start: float | None = None,
    end: float | None = None,
    framerate: float | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes up to `max_frames` sampled frames of a video (or of its [start, end] segment, in seconds).

    Args:
        mode: "uniform", "random" (needs `rng`) or "head"; see `sample_frame_indices`.
        framerate: frames per second to sample from (e.g. 1, as the official loaders); None = every frame.
        device: where torchcodec decodes (see `decode_frames`).

    Returns:
        frames [n, H, W, 3] uint8 RGB with n = min(max_frames, frames to choose from), and their indices [n].

    Raises:
        VideoDecodeError: with the path and the reason, for a missing, empty or undecodable file.
        BackendUnavailable: the backend cannot load on this machine (the message says what to install).
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown frame sampling mode {mode!r}; expected one of {SAMPLING_MODES}")

    def choose(total: int, fps: float) -> np.ndarray:
        return choose_frames(total, fps, max_frames, mode, rng, start, end, framerate)

    return decode_frames(path, choose, backend, device)


def probe_video(
    path: str | Path,
    backend: str = "pyav",
    max_frames: int = 1,
    start: float | None = None,
    end: float | None = None,
    framerate: float | None = None,
) -> str | None:
    """Returns None when the video opens and `max_frames` frames spread over [start, end] decode, else the reason
    (`EMPTY_FILE`, `NO_FRAMES` or the decoder's complaint)."""
    try:
        read_frames(path, max_frames, "uniform", backend=backend, start=start, end=end, framerate=framerate)
    except VideoDecodeError as err:
        return err.reason
    return None


@dataclass(frozen=True)
class ProbeRequest:
    """What `probe_video` decodes of one file: `max_frames` spread over [start, end] s at `framerate`."""

    path: str
    max_frames: int = 1
    start: float | None = None
    end: float | None = None
    framerate: float | None = None


def _probe(args: tuple) -> str | None:
    path, max_frames, start, end, framerate, backend = args
    return probe_video(path, backend, max_frames, start, end, framerate)


def probe_videos(
    requests: list[ProbeRequest], backend: str = "pyav", workers: int = 1, progress: bool = True
) -> list[str | None]:
    """`probe_video` for many files, in order, with `workers` processes. The processes are spawned, not forked:
    a forked copy of a process that holds open decoders can hang (decord #294)."""
    jobs = [(*astuple(r), backend) for r in requests]
    bar = dict(total=len(jobs), desc="checking videos", disable=not progress, leave=False)
    if workers <= 1 or len(jobs) < 2 * workers:
        return [_probe(job) for job in tqdm(jobs, **bar)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(_probe, jobs, chunksize=16), **bar))
