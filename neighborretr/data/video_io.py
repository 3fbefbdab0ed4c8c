"""Video decoding (decord by default, PyAV as the fallback) and temporal frame sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")


class VideoDecodeError(RuntimeError):
    """A video file is missing, empty or cannot be decoded."""


def sample_frame_indices(
    num_frames: int, max_frames: int, mode: str, rng: np.random.Generator | None = None, first: int = 0
) -> np.ndarray:
    """Frame indices spread over `num_frames` frames starting at `first`.

    The range is cut into min(max_frames, num_frames) equal segments; "uniform" takes each segment's centre
    (evaluation), "random" a uniformly drawn frame inside each segment (training). Indices are increasing.
    """
    if num_frames <= 0:
        raise ValueError("a video with no frames cannot be sampled")
    count = min(max_frames, num_frames)
    edges = np.linspace(0, num_frames, count + 1)
    if mode == "uniform":
        positions = (edges[:-1] + edges[1:]) / 2
    elif mode == "random":
        if rng is None:
            raise ValueError("random sampling needs an rng")
        positions = rng.uniform(edges[:-1], edges[1:])
    else:
        raise ValueError(f"unknown frame sampling mode {mode!r}; expected 'uniform' or 'random'")
    return first + np.clip(np.floor(positions).astype(np.int64), 0, num_frames - 1)


def _segment(fps: float, total: int, start: float | None, end: float | None) -> tuple[int, int]:
    """[first, last) frame range of a segment given in seconds; the whole video when both are None."""
    first = 0 if start is None else min(total - 1, max(0, int(round(start * fps))))
    last = total if end is None else int(round(end * fps))
    return first, min(total, max(first + 1, last))


def _read_decord(path: Path, max_frames: int, mode: str, rng, start, end) -> tuple[np.ndarray, np.ndarray]:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    total = len(reader)
    if total == 0:
        raise VideoDecodeError(f"{path}: the video has no frames")
    first, last = _segment(reader.get_avg_fps(), total, start, end)
    indices = sample_frame_indices(last - first, max_frames, mode, rng, first)
    return reader.get_batch(indices.tolist()).asnumpy(), indices


def _read_pyav(path: Path, max_frames: int, mode: str, rng, start, end) -> tuple[np.ndarray, np.ndarray]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        # Decoding everything is the only exact way to index frames in every container; fine for clips.
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate or stream.guessed_rate or 1)
    if not frames:
        raise VideoDecodeError(f"{path}: the video has no frames")
    first, last = _segment(fps, len(frames), start, end)
    indices = sample_frame_indices(last - first, max_frames, mode, rng, first)
    return np.stack([frames[i] for i in indices]), indices


_BACKENDS = {"decord": _read_decord, "pyav": _read_pyav}


def read_frames(
    path: str | Path,
    max_frames: int,
    mode: str = "uniform",
    rng: np.random.Generator | None = None,
    backend: str = "decord",
    start: float | None = None,
    end: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes up to `max_frames` sampled frames of a video (or of its [start, end] segment, in seconds).

    Returns:
        frames [n, H, W, 3] uint8 RGB with n = min(max_frames, frames in range), and their indices [n].

    Raises:
        VideoDecodeError: with the path and the reason, for a missing, empty or undecodable file.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; expected one of {sorted(_BACKENDS)}")
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: the file is empty (0 bytes)")
    try:
        return _BACKENDS[backend](path, max_frames, mode, rng, start, end)
    except VideoDecodeError:
        raise
    except Exception as err:  # decoders raise many unrelated types; callers need one with the path
        raise VideoDecodeError(f"{path}: cannot decode with {backend} ({type(err).__name__}: {err})") from err


def probe_video(path: str | Path, backend: str = "decord") -> str | None:
    """Returns None when the video opens and its first frame decodes, else the reason it does not."""
    try:
        read_frames(path, max_frames=1, mode="uniform", backend=backend, end=None)
    except VideoDecodeError as err:
        return str(err).split(": ", 1)[-1]
    return None
