"""Built-in synthetic text-video benchmark, written in MSR-VTT's exact file format.

Every clip shows one filled shape (circle, square or triangle) of one colour moving in a straight line
(left, right, up or down) over a uniform background. Its captions name the colour, the shape, the motion
direction and the background colour, with synonyms and varied word order. Because a clip played backwards
shows the opposite direction, a model must use the temporal order of the frames to match every caption.

The output folder reads like an MSR-VTT root (layout of every benchmark: data/README.md)::

    root/
      videos/video{i}.mp4        H.264 clips; train videos first (0 .. num_train-1), then test videos
      MSRVTT_data.json           {"info", "videos", "sentences"}: every caption of every video
      MSRVTT_train.9k.csv        video_id: all train videos
      MSRVTT_train.7k.csv        video_id: the first 70% of the train videos
      MSRVTT_JSFUSION_test.csv   key,vid_key,video_id,sentence: one caption per test video
      synthetic_meta.json        generation parameters; marks the folder complete (written last)

Everything is a function of ``seed``: clip i draws from ``np.random.default_rng([seed, i])``, so the
output does not depend on the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

# Bump when the pixels, the captions or the file layout change, so that old folders are regenerated.
FORMAT_VERSION = 2  # 2: test clips take distinct attribute combinations

# RGB values far apart from each other and from every background, so that H.264 at crf 18 keeps them
# distinguishable and a test can find the object as "the pixels far from the background colour".
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 40),
    "blue": (50, 90, 255),
    "yellow": (240, 225, 40),
    "white": (245, 245, 245),
    "purple": (190, 50, 220),
}
# "navy" rather than "dark blue" so that no background name contains an object colour word.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (120, 120, 120),
    "navy": (15, 25, 95),
    "brown": (105, 65, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit motion (dx, dy) in image coordinates: y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Synonym lists and templates are chosen so that every caption has at most MAX_CAPTION_TOKENS CLIP BPE tokens:
# with the start and end tokens it fits max_words=16, so truncation never cuts off the background or direction.
MAX_CAPTION_TOKENS = 14
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "round shape", "disc", "ball"),
    "square": ("square", "box", "block", "square shape"),
    "triangle": ("triangle", "triangle shape"),
}
# No phrase of one direction may occur inside a phrase of another, so a caption names exactly one direction.
DIRECTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left", "leftward", "left", "toward the left"),
    "right": ("to the right", "rightward", "right", "toward the right"),
    "up": ("upward", "up", "toward the top", "upwards"),
    "down": ("downward", "down", "toward the bottom", "downwards"),
}
# (third person, participle) pairs, so templates can use either form.
VERBS: tuple[tuple[str, str], ...] = (
    ("moves", "moving"),
    ("travels", "traveling"),
    ("slides", "sliding"),
    ("glides", "gliding"),
    ("drifts", "drifting"),
)
BACKGROUND_NOUNS: tuple[str, ...] = ("background", "backdrop")

TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} {verb} {direction} on a {bg} {bg_noun}",
    "on a {bg} {bg_noun}, a {color} {shape} {verb} {direction}",
    "a {color} {shape} {verb} {direction} over a {bg} {bg_noun}",
    "a {color} {shape} that {verb} {direction} against a {bg} {bg_noun}",
    "{verb_ing} {direction}, a {color} {shape} crosses a {bg} {bg_noun}",
    "a {bg} {bg_noun} with a {color} {shape} {verb_ing} {direction}",
    "the {color} {shape} {verb} {direction} across the {bg} {bg_noun}",
    "{color} {shape} {verb_ing} {direction} on a {bg} {bg_noun}",
    "the {bg} {bg_noun} shows a {color} {shape} {verb_ing} {direction}",
)

OBJECT_SIZE_RANGE = (0.25, 0.31)  # object diameter / side as a fraction of the frame size (16-20 px at 64)
TRAVEL_RANGE = (0.65, 0.95)  # fraction of the free span along the motion axis covered during the clip
PIXEL_NOISE = 4  # per-pixel uniform noise in [-4, 4] (std ~2.6), so frames are not perfectly flat
TRAIN_7K_FRACTION = 0.7  # MSR-VTT's 7k list is ~78% of its 9k list; we keep the first 70%

META_FILE = "synthetic_meta.json"
ANNOTATION_FILES = ("MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv")


@dataclass(frozen=True)
class ObjectSpec:
    """One extra moving object of a busy scene (same geometry conventions as ``ClipSpec``)."""

    color: str
    shape: str
    size: int
    start: tuple[float, float]
    end: tuple[float, float]
    direction: str = ""  # where it moves (captions of busy scenes may describe it); rendering uses start/end


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip and to describe it.

    ``start`` and ``end`` are the object's centre (x, y) in pixels at the first and last frame; the
    object stays fully inside the frame throughout. ``captions[0]`` is the clip's first caption draw.
    """

    index: int
    color: str
    shape: str
    direction: str
    background: str
    size: int
    start: tuple[float, float]
    end: tuple[float, float]
    captions: tuple[str, ...]
    others: tuple[ObjectSpec, ...] = ()  # further moving objects drawn under the main one (hub-prone scenes)


def video_id(index: int) -> str:
    """MSR-VTT style id of clip ``index`` (``video{index}``)."""
    return f"video{index}"


def make_caption(rng: np.random.Generator, template: str, color: str, shape: str, direction: str, bg: str) -> str:
    """Fill ``template`` with the attributes, drawing one synonym per slot from ``rng``."""
    verb, verb_ing = VERBS[rng.integers(len(VERBS))]
    return template.format(
        color=color,
        shape=rng.choice(SHAPE_WORDS[shape]),
        verb=verb,
        verb_ing=verb_ing,
        direction=rng.choice(DIRECTION_PHRASES[direction]),
        bg=bg,
        bg_noun=rng.choice(BACKGROUND_NOUNS),
    )


def _sample_trajectory(
    rng: np.random.Generator, direction: str, size: int, frame_size: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Start and end centre of a straight move in ``direction`` that keeps the object inside the frame."""
    low, high = size / 2, frame_size - size / 2  # centre range that keeps the whole object visible
    span = high - low
    travel = span * rng.uniform(*TRAVEL_RANGE)
    along_start = low + rng.uniform(0.0, span - travel)  # start near one edge, with jitter
    across = rng.uniform(low, high)
    dx, dy = DIRECTIONS[direction]
    sign = dx + dy
    if sign < 0:  # moving towards smaller coordinates: mirror the start along the axis
        along_start = high - (along_start - low)
    along_end = along_start + sign * travel
    if dx != 0:
        return (along_start, across), (along_end, across)
    return (across, along_start), (across, along_end)


def attribute_combos() -> list[tuple[str, str, str, str]]:
    """Every (colour, shape, direction, background) combination, in a fixed order."""
    return list(itertools.product(OBJECT_COLORS, SHAPES, DIRECTIONS, BACKGROUND_COLORS))


def distinct_combos(seed: int, num_test: int) -> list[tuple[str, str, str, str]]:
    """Attributes of the test clips: distinct combinations (a seeded permutation, cycled only when there are
    more test clips than combinations), so no two test captions describe the same thing."""
    combos = attribute_combos()
    order = np.random.default_rng([seed, len(combos)]).permutation(len(combos))
    return [combos[order[k % len(combos)]] for k in range(num_test)]


def sample_clip_spec(
    seed: int, index: int, frame_size: int, num_captions: int, combo: tuple[str, str, str, str] | None = None
) -> ClipSpec:
    """Draw clip ``index``'s attributes, trajectory and ``num_captions`` captions from ``(seed, index)``.

    Attributes and trajectory are drawn before the captions, so they (and the first caption) do not
    depend on ``num_captions``. Captions use distinct templates until every template has been used.
    ``combo`` (colour, shape, direction, background) replaces the drawn attributes (used for test clips).
    """
    rng = np.random.default_rng([seed, index])
    color = str(rng.choice(list(OBJECT_COLORS)))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(list(DIRECTIONS)))
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    if combo is not None:
        color, shape, direction, background = combo
    size = max(3, round(frame_size * rng.uniform(*OBJECT_SIZE_RANGE)))
    start, end = _sample_trajectory(rng, direction, size, frame_size)
    order = rng.permutation(len(TEMPLATES))
    captions = tuple(
        make_caption(rng, TEMPLATES[order[k % len(order)]], color, shape, direction, background)
        for k in range(num_captions)
    )
    return ClipSpec(index, color, shape, direction, background, size, start, end, captions)


def shape_masks(shape: str, centers: np.ndarray, size: int, frame_size: int) -> np.ndarray:
    """Boolean ``[T, H, W]`` masks of a filled ``shape`` of diameter/side ``size`` at ``centers`` (``[T, 2]`` x, y)."""
    grid = np.arange(frame_size, dtype=np.float32) + 0.5  # pixel centres
    dx = grid[None, None, :] - centers[:, 0, None, None].astype(np.float32)
    dy = grid[None, :, None] - centers[:, 1, None, None].astype(np.float32)
    half = size / 2
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex up, base at the bottom: half-width grows linearly from 0 to ``half``
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_centers(spec: ClipSpec | ObjectSpec, num_frames: int) -> np.ndarray:
    """``[T, 2]`` object centres (x, y), moving at constant speed from ``spec.start`` to ``spec.end``."""
    alpha = np.linspace(0.0, 1.0, num_frames)[:, None]
    return (1 - alpha) * np.asarray(spec.start) + alpha * np.asarray(spec.end)


def render_clip(spec: ClipSpec, frame_size: int, num_frames: int, seed: int) -> np.ndarray:
    """Frames of ``spec`` as a ``[T, H, W, 3]`` uint8 RGB array: background, moving object, light noise."""
    noise_rng = np.random.default_rng([seed, spec.index, 1])  # separate stream: pixels never shift captions
    masks = shape_masks(spec.shape, object_centers(spec, num_frames), spec.size, frame_size)
    frames = np.empty((num_frames, frame_size, frame_size, 3), dtype=np.int16)
    frames[:] = BACKGROUND_COLORS[spec.background]
    for other in spec.others:  # under the main object, so the main object is always fully visible
        frames[shape_masks(other.shape, object_centers(other, num_frames), other.size, frame_size)] = OBJECT_COLORS[
            other.color
        ]
    frames[masks] = OBJECT_COLORS[spec.color]
    # Integer uniform noise: several times cheaper to draw than Gaussian noise, and just as good a nuisance.
    frames += noise_rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, size=frames.shape, dtype=np.int8)
    return np.clip(frames, 0, 255).astype(np.uint8)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> None:
    """Encode ``[T, H, W, 3]`` uint8 RGB frames as an H.264 (yuv420p) mp4 at ``fps`` frames per second."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        # crf 18 keeps the flat colours within a few levels. With its SIMD code on, x264 encoded some clips
        # differently from run to run (decoded pixels up to 20 levels apart), so asm=0 (plain C: bit-exact,
        # ~12 ms a clip) and one thread (also no oversubscription when clips are encoded in parallel processes).
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "asm=0"}
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


@dataclass(frozen=True)
class _RenderJob:
    """One unit of work for a worker process (small and picklable)."""

    spec: ClipSpec
    path: Path
    frame_size: int
    num_frames: int
    fps: int
    seed: int


def _render_job(job: _RenderJob) -> int:
    """Render one clip and write it atomically, so a crash never leaves a truncated ``.mp4`` behind."""
    partial = job.path.with_name(job.path.name + ".partial")
    write_mp4(render_clip(job.spec, job.frame_size, job.num_frames, job.seed), partial, job.fps)
    os.replace(partial, job.path)
    return job.spec.index


def _run_jobs(jobs: list[_RenderJob], workers: int, progress: bool) -> None:
    """Render ``jobs`` in ``workers`` processes (in this process when ``workers <= 1``)."""
    bar = tqdm(total=len(jobs), desc="synthetic videos", unit="clip", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _render_job(job)
            bar.update()
    else:
        chunksize = max(1, len(jobs) // (workers * 32))  # amortises IPC, keeps the load balanced and the bar smooth
        with multiprocessing.get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=chunksize):
                bar.update()
    bar.close()


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so readers never see a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    """CSV text with the csv module's quoting (captions may contain commas)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _msrvtt_data(specs: list[ClipSpec], num_train: int, duration: float, params: dict) -> dict:
    """The ``MSRVTT_data.json`` content: one ``videos`` entry per clip and every caption in ``sentences``."""
    videos = [
        {
            "id": spec.index,
            "video_id": video_id(spec.index),
            "category": 0,
            "url": "",
            "start time": 0.0,
            "end time": duration,
            "split": "train" if spec.index < num_train else "test",
        }
        for spec in specs
    ]
    sentences = [
        {"sen_id": sen_id, "video_id": video_id(spec.index), "caption": caption}
        for sen_id, (spec, caption) in enumerate((spec, caption) for spec in specs for caption in spec.captions)
    ]
    info = {
        "description": "neighborretr synthetic moving-shapes benchmark (MSR-VTT file format)",
        "version": FORMAT_VERSION,
        "params": params,
    }
    return {"info": info, "videos": videos, "sentences": sentences}


def _write_annotations(root: Path, specs: list[ClipSpec], num_train: int, duration: float, params: dict) -> None:
    """Write the four MSR-VTT annotation files for ``specs`` (train clips first, then test clips)."""
    train_ids = [[video_id(spec.index)] for spec in specs[:num_train]]
    num_7k = round(num_train * TRAIN_7K_FRACTION)
    test_rows = [
        [f"ret{row}", f"msr{spec.index}", video_id(spec.index), spec.captions[0]]
        for row, spec in enumerate(specs[num_train:])
    ]
    data = _msrvtt_data(specs, num_train, duration, params)
    _atomic_write_text(root / "MSRVTT_data.json", json.dumps(data))
    _atomic_write_text(root / "MSRVTT_train.9k.csv", _csv_text(["video_id"], train_ids))
    _atomic_write_text(root / "MSRVTT_train.7k.csv", _csv_text(["video_id"], train_ids[:num_7k]))
    _atomic_write_text(
        root / "MSRVTT_JSFUSION_test.csv", _csv_text(["key", "vid_key", "video_id", "sentence"], test_rows)
    )


def _read_meta(root: Path) -> dict | None:
    """The parsed meta file, or None when it is missing or unreadable."""
    try:
        return json.loads((root / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, params: dict, num_videos: int) -> bool:
    """True when ``root`` holds a finished generation with exactly ``params`` and every file exists."""
    meta = _read_meta(root)
    if meta is None or not meta.get("complete") or meta.get("format_version") != FORMAT_VERSION:
        return False
    if meta.get("params") != params:
        return False
    files = [root / name for name in ANNOTATION_FILES]
    files += [root / "videos" / f"{video_id(i)}.mp4" for i in range(num_videos)]
    return all(path.is_file() for path in files)


def _claim_root(root: Path) -> None:
    """Refuse to overwrite a real MSR-VTT folder; otherwise mark ``root`` as an unfinished synthetic folder.

    Writing ``complete: false`` first means a crash mid-way never leaves a meta file claiming completeness,
    while still telling the next run that this folder is ours to overwrite.
    """
    if (root / "MSRVTT_data.json").exists() and not (root / META_FILE).exists():
        raise FileExistsError(
            f"{root} holds MSRVTT_data.json but no {META_FILE}: it looks like a real MSR-VTT folder; "
            "choose another root for the synthetic data"
        )
    (root / "videos").mkdir(parents=True, exist_ok=True)
    _atomic_write_text(root / META_FILE, json.dumps({"format_version": FORMAT_VERSION, "complete": False}))


def _remove_stale_videos(videos_dir: Path, num_videos: int) -> None:
    """Delete clips and partial files left by an earlier, larger or crashed generation."""
    keep = {f"{video_id(i)}.mp4" for i in range(num_videos)}
    for path in videos_dir.glob("video*"):
        if path.name not in keep:
            path.unlink()


def _check_args(
    num_train: int, num_test: int, captions_per_video: int, frame_size: int, num_frames: int, fps: int
) -> None:
    """Raise ValueError for settings that cannot produce a valid benchmark."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"need at least one train and one test video, got {num_train=} {num_test=}")
    if captions_per_video < 1:
        raise ValueError(f"captions_per_video must be >= 1, got {captions_per_video}")
    if frame_size < 16 or frame_size % 2:
        raise ValueError(f"frame_size must be even and >= 16 (yuv420p needs even sizes), got {frame_size}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 to show motion, got {num_frames}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")


def generate_synthetic_msrvtt(
    root: str | Path,
    num_train: int = 1000,
    num_test: int = 200,
    captions_per_video: int = 5,
    frame_size: int = 64,
    num_frames: int = 16,
    fps: int = 8,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate (or reuse) the synthetic benchmark under ``root`` in MSR-VTT's file format.

    Args:
        root: output folder; created if missing. A folder with ``MSRVTT_data.json`` but no
            ``synthetic_meta.json`` is treated as real data and never overwritten (FileExistsError).
        num_train: train clips, ids ``video0 .. video{num_train-1}``, listed in the 9k csv (first 70% in 7k).
        num_test: test clips, the ids after the train ones, one caption each in the JSFusion csv.
        captions_per_video: captions per train clip (distinct templates while templates last).
        frame_size: height and width in pixels (even, >= 16).
        num_frames: frames per clip; the clip lasts ``num_frames / fps`` seconds.
        fps: frame rate written into the mp4 files.
        seed: the only source of randomness; equal seeds give identical captions and pixels.
        workers: processes used to encode clips (default ``os.cpu_count()``); does not change the output.
        progress: show a tqdm progress bar.

    Returns:
        ``{"root", "num_train", "num_test", "num_sentences", "num_test_attribute_combos", "regenerated",
        "seconds"}``. ``num_test_attribute_combos`` counts distinct (colour, shape, direction, background)
        among the test clips; they are all distinct while ``num_test`` <= 288, the number of combinations.
    """
    started = time.perf_counter()
    _check_args(num_train, num_test, captions_per_video, frame_size, num_frames, fps)
    root = Path(root)
    params = {
        "num_train": num_train,
        "num_test": num_test,
        "captions_per_video": captions_per_video,
        "frame_size": frame_size,
        "num_frames": num_frames,
        "fps": fps,
        "seed": seed,
    }
    held_out = distinct_combos(seed, num_test)
    specs = [sample_clip_spec(seed, i, frame_size, captions_per_video) for i in range(num_train)] + [
        sample_clip_spec(seed, num_train + k, frame_size, 1, combo) for k, combo in enumerate(held_out)
    ]
    return write_benchmark(root, specs, params, workers, progress, started)


def write_benchmark(
    root: Path, specs: list[ClipSpec], params: dict, workers: int | None, progress: bool, started: float
) -> dict:
    """Write ``specs`` (train clips first, then ``params["num_test"]`` test clips) under ``root``, or reuse the
    folder when it already holds exactly this generation; returns the summary of ``generate_synthetic_msrvtt``."""
    num_train = params["num_train"]
    regenerated = not _is_complete(root, params, len(specs))
    if regenerated:
        _generate(root, specs, params, workers or os.cpu_count() or 1, progress)
    combos = {(s.color, s.shape, s.direction, s.background) for s in specs[num_train:]}
    return {
        "root": str(root),
        "num_train": num_train,
        "num_test": params["num_test"],
        "num_sentences": sum(len(spec.captions) for spec in specs),
        "num_test_attribute_combos": len(combos),
        "regenerated": regenerated,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _generate(root: Path, specs: list[ClipSpec], params: dict, workers: int, progress: bool) -> None:
    """Write every clip, then the annotations, then the completed meta file (in that order)."""
    _claim_root(root)
    videos_dir = root / "videos"
    _remove_stale_videos(videos_dir, len(specs))
    jobs = [
        _RenderJob(
            spec,
            videos_dir / f"{video_id(spec.index)}.mp4",
            params["frame_size"],
            params["num_frames"],
            params["fps"],
            params["seed"],
        )
        for spec in specs
    ]
    _run_jobs(jobs, min(workers, len(jobs)), progress)
    duration = params["num_frames"] / params["fps"]
    _write_annotations(root, specs, params["num_train"], duration, params)
    meta = {"format_version": FORMAT_VERSION, "complete": True, "params": params, "num_videos": len(specs)}
    _atomic_write_text(root / META_FILE, json.dumps(meta, indent=1))
