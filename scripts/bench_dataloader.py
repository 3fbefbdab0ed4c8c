"""Training-loader throughput: the naive decode-everything loader, ours on raw videos (each backend), on prepared
copies, and from the frame cache, with the same frames, transforms, batch and worker count.

    python scripts/bench_dataloader.py                                   # 32 generated clips, workers 1 and 2
    python scripts/bench_dataloader.py --videos 64 --captions 6 --workers 2 4 8

The videos imitate MSR-VTT clips: 15 s, 320x240, 30 fps, H.264 at libx264's defaults (CRF 23, preset medium,
B-frames, a keyframe at most every 250 frames; `--keyint` shortens that), with a panning textured scene, moving
objects, sensor noise and two hard cuts per clip. The results give the keyframes per clip actually written.
Their prepared copies come from scripts/prepare_videos.py's code (3 fps, short side 224); the frame cache from
neighborretr.data.frame_cache (built from the raw clips with PyAV, by as many processes as the loader has workers).
Every loader yields the same thing: 12 frames per clip drawn at random from the clip's frames at
`--framerate` fps (1: the official loaders' 1 frame per second; 0: every frame), one inside each twelfth,
resized and centre-cropped to 224 px, CLIP-normalised, plus the tokenised caption; the draw depends on
(seed, epoch, item) only, so every loader draws the same frames. The naive loader is the pattern common in this
field: OpenCV reads every frame of the video into memory, then the 12 are picked.

Each (videos, loader, workers) runs `--epochs` epochs (workers restarted every epoch, as in training). Reported:
steady-state clips/s (every epoch's first batch left out), the one-off preparation (prepared copies) or build
(cache) time, and the wall time of all epochs plus that one-off time. One JSON line per row goes to
benchmarks/dataloader.jsonl and a table with the ratios to the naive loader at the same worker count to
docs/results/dataloader.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from neighborretr.data.annotations import Record
from neighborretr.data.dataset import VideoTextDataset
from neighborretr.data.frame_cache import CacheSpec, FrameCache, build_frame_cache, cache_requests
from neighborretr.data.transforms import CaptionTokenizer, clip_frames
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import BackendUnavailable, check_backend, choose_frames, read_frames

FRAMES, SIZE, WORDS = 12, 224, 32
LOADERS = ("naive-opencv", "ours-pyav", "ours-torchcodec", "ours-decord", "ours-cache")


def _scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random texture twice as wide as the frame (the camera pans across it)."""
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 8 + 2, 3)).astype(np.float32)
    big = np.kron(coarse, np.ones((16, 16, 1), np.float32))[:height, : 2 * width]
    return big


def make_clip(
    path: Path,
    seed: int,
    keyint: int | None = None,
    seconds: float = 15,
    width: int = 320,
    height: int = 240,
    fps: int = 30,
) -> None:
    """An MSR-VTT-like clip (see the module docstring), written with PyAV's libx264 at its default settings, except
    the keyframe interval when `keyint` is given."""
    import av

    rng = np.random.default_rng(seed)
    total = int(seconds * fps)
    cuts = set(rng.choice(np.arange(1, total), min(2, total - 1), replace=False).tolist())
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if keyint:
            stream.options = {"g": str(keyint)}
        for i in range(total):
            if i == 0 or i in cuts:
                scene = _scene(rng, height, width)
                objects = rng.uniform([0, 0, -3, -2, 15], [width, height, 3, 2, 40], (3, 5))
                colours = rng.integers(0, 256, (3, 3))
                start = i
            t = i - start
            shift = int(t * 1.5) % width
            img = scene[:, shift : shift + width].copy()
            for (x0, y0, vx, vy, r), colour in zip(objects, colours):
                img[(xx - (x0 + vx * t) % width) ** 2 + (yy - (y0 + vy * t) % height) ** 2 < r * r] = colour
            img += rng.normal(0, 4, img.shape).astype(np.float32)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _make(job: tuple[str, int, int | None, float]) -> None:
    make_clip(Path(job[0]), job[1], job[2], job[3])


def generate(folder: Path, count: int, workers: int, keyint: int | None = None, seconds: float = 15) -> list[Path]:
    """`count` clips of `seconds` in `folder`, reusing the ones already there."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"video{i}.mp4" for i in range(count)]
    jobs = [(str(p), i, keyint, seconds) for i, p in enumerate(paths) if not p.is_file()]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make, jobs))
    return paths


class NaiveOpenCVDataset(Dataset):
    """The common pattern: cv2 decodes every frame of the video, then FRAMES are picked (same draw as ours)."""

    def __init__(self, records: list[Record], videos: VideoIndex, framerate: float | None, seed: int = 0):
        self.records, self.videos, self.framerate, self.seed = records, videos, framerate, seed
        self.tokenizer = CaptionTokenizer(WORDS)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import cv2

        record = self.records[index]
        capture = cv2.VideoCapture(str(self.videos.find(record)))
        fps = capture.get(cv2.CAP_PROP_FPS)
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        capture.release()
        rng = np.random.default_rng([self.seed, self.epoch, index])
        chosen = choose_frames(len(frames), fps, FRAMES, "random", rng, framerate=self.framerate)
        ids, mask = self.tokenizer(record.caption)
        video = clip_frames(np.stack([frames[i] for i in chosen]), SIZE, length=FRAMES)
        return {"text_ids": ids, "text_mask": mask, "video": video}


def cache_spec(framerate: float | None) -> CacheSpec:
    """The frame cache the benchmark's training loader reads (PyAV, random draws, model input size)."""
    return CacheSpec("pyav", framerate, FRAMES, SIZE, ("random",))


def loader_dataset(
    name: str, records: list[Record], folder: Path, framerate: float | None, cache: Path | None = None
) -> Dataset:
    """The dataset of loader `name` over the videos in `folder` (ours-cache: reading the cache at `cache`)."""
    videos = VideoIndex(folder)
    if name == "naive-opencv":
        return NaiveOpenCVDataset(records, videos, framerate)
    backend = "pyav" if name == "ours-cache" else name.split("-", 1)[1]
    frame_cache = FrameCache.open(cache, cache_spec(framerate)) if name == "ours-cache" else None
    return VideoTextDataset(
        records,
        folder,
        WORDS,
        FRAMES,
        SIZE,
        train=True,
        backend=backend,
        videos=videos,
        framerate=framerate,
        frame_cache=frame_cache,
    )


def build_cache(records: list[Record], raw: Path, folder: Path, framerate: float | None, workers: int) -> float:
    """Builds the frame cache of `records` into the empty `folder` with `workers` processes; returns the seconds."""
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    requests = cache_requests(records, VideoIndex(raw))
    summary = build_frame_cache(requests, folder, cache_spec(framerate), workers, progress=False)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(f"building the frame cache failed: {summary.failed}")
    return seconds


def run_epochs(dataset: Dataset, workers: int, batch_size: int, epochs: int) -> tuple[float, list[float]]:
    """Loads `epochs` epochs (new draws each, workers restarted each as in training); returns (steady-state clips/s
    with every epoch's first batch left out, the wall seconds of each epoch including worker start-up)."""
    clips, steady, walls = 0, 0.0, []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=True)
        begin = time.perf_counter()
        it = iter(loader)
        next(it)
        start = time.perf_counter()
        for batch in it:
            clips += batch["video"].shape[0]
        end = time.perf_counter()
        steady += end - start
        walls.append(end - begin)
    return clips / steady, walls


def decode_times(clips: list[Path], backends: list[str], framerate: float | None, rounds: int = 3) -> dict:
    """{backend: median ms} to decode one clip's 12 random frames in this process (one thread), the backends
    interleaved clip by clip so that a change in the machine's load hits them alike: the default backend's check."""
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {b: [] for b in backends}
    for round_ in range(rounds):
        for i, clip in enumerate(clips):
            for backend in backends:
                rng = np.random.default_rng([0, round_, i])
                start = time.perf_counter()
                read_frames(clip, FRAMES, "random", rng, backend=backend, framerate=framerate)
                times[backend].append(time.perf_counter() - start)
    return {b: round(float(np.median(t)) * 1000, 1) for b, t in times.items()}


def keyframe_stats(path: Path) -> tuple[int, int]:
    """(frames, keyframes) of a video, read from its packets."""
    import av

    with av.open(str(path)) as container:
        flags = [p.is_keyframe for p in container.demux(container.streams.video[0]) if p.size]
    return len(flags), sum(flags)


def machine_description() -> str:
    """CPU model, cores, torch version (and the GPU, if torch sees one): the machine the numbers belong to."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{model}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {platform.system()}"


def markdown(rows: list[dict], machine: str, command: str, epochs: int) -> str:
    lines = [
        "# Training-loader throughput",
        "",
        f"Machine: {machine}. Command: `{command}`.",
        f"Steady state: clips/s over {epochs} epochs, each epoch's first batch left out. One-off: preparing the",
        "copies (prepared) or building the frame cache (cache), with as many processes as the loader has workers.",
        f"Total: the one-off time plus the wall time of {epochs} epochs (worker start-up included). Ratios are to the",
        "naive OpenCV loader on the raw videos with the same worker count (higher is better for both).",
        "",
        "| videos | loader | workers | clips/s | ratio to naive | one-off s | total s | speed-up of total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['videos']} | {r['loader']} | {r['workers']} | {r['clips_per_s']:.1f} | "
            f"{r['ratio_to_naive']:.2f}x | {r['one_off_s']:.1f} | {r['total_s']:.1f} | {r['total_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def available(loaders: list[str]) -> tuple[list[str], list[str]]:
    """(loaders whose backend loads here, notes on the ones left out)."""
    keep, notes = [], []
    for name in loaders:
        backend = name.split("-", 1)[1]
        if backend in ("pyav", "torchcodec", "decord"):
            try:
                check_backend(backend)
            except BackendUnavailable as err:
                notes.append(f"{name} left out: {err}")
                continue
        keep.append(name)
    return keep, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=32, help="generated clips")
    parser.add_argument("--captions", type=int, default=3, help="captions per clip (records per pass = videos x this)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    parser.add_argument("--sets", nargs="+", default=["raw", "prepared"], choices=["raw", "prepared"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--framerate", type=float, default=1.0, help="candidate frames per second (0: every frame)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15, help="length of each generated clip")
    parser.add_argument("--keyint", type=int, default=None, help="maximum keyframe interval (default: libx264's 250)")
    parser.add_argument("--cache", type=Path, default=Path("data/bench_videos"), help="generated videos (reused)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/dataloader.jsonl"))
    parser.add_argument("--table", type=Path, default=None, help="default: docs/results/dataloader[_keyintN].md")
    parser.add_argument(
        "--decode-only", action="store_true", help="only print each backend's median in-process decode time per clip"
    )
    args = parser.parse_args()

    from neighborretr.data.prepare import prepare_folder

    cores = os.cpu_count() or 1
    framerate = args.framerate or None
    tag = f"_keyint{args.keyint}" if args.keyint else ""
    tag += "" if args.seconds == 15 else f"_{args.seconds:g}s"
    folders = {"raw": args.cache / f"raw{tag}", "prepared": args.cache / f"prepared{tag}"}
    raw = generate(folders["raw"], args.videos, cores, args.keyint, args.seconds)
    shutil.rmtree(folders["prepared"], ignore_errors=True)  # timed from scratch below
    start = time.perf_counter()
    summary = prepare_folder(folders["raw"], folders["prepared"], fps=3, short_side=224, workers=cores)
    prepare_s = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(f"preparing the benchmark videos failed: {summary.failed}")
    frames, keys = np.sum([keyframe_stats(p) for p in raw], axis=0)
    machine = machine_description()
    records = [Record(p.stem, f"caption {k} of clip {p.stem}") for p in raw for k in range(args.captions)]
    loaders, notes = available(args.loaders)
    for note in notes:
        print(note, flush=True)
    if args.decode_only:
        backends = [n.split("-", 1)[1] for n in loaders if n.split("-", 1)[1] in ("pyav", "torchcodec", "decord")]
        for videos in args.sets:
            clips = sorted(folders[videos].glob("*.mp4"))
            print(videos, "median ms per clip:", decode_times(clips, backends, framerate), flush=True)
        return
    rows, naive_by_workers = [], {}
    for videos in args.sets:
        for workers in args.workers:
            for name in loaders:
                if name == "ours-cache" and videos != "raw":
                    continue  # the cache is built from the raw clips; it does not depend on them afterwards
                one_off = prepare_s if videos == "prepared" else 0.0
                cache = args.cache / f"frame_cache{tag}"
                if name == "ours-cache":
                    one_off = build_cache(records, folders["raw"], cache, framerate, workers)
                dataset = loader_dataset(name, records, folders[videos], framerate, cache)
                rate, walls = run_epochs(dataset, workers, args.batch_size, args.epochs)
                total = one_off + sum(walls)
                if name == "naive-opencv" and videos == "raw":
                    naive_by_workers[workers] = (rate, total)
                naive = naive_by_workers.get(workers)
                row = {
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": machine,
                    "videos": videos,
                    "loader": name,
                    "workers": workers,
                    "clips_per_s": round(rate, 2),
                    "ratio_to_naive": round(rate / naive[0], 2) if naive else float("nan"),
                    "one_off_s": round(one_off, 1),
                    "epoch_s": [round(w, 2) for w in walls],
                    "total_s": round(total, 1),
                    "total_speedup": round(naive[1] / total, 2) if naive else float("nan"),
                    "epochs": args.epochs,
                    "clips": len(records),
                    "frames": FRAMES,
                    "framerate": framerate,
                    "size": SIZE,
                    "batch_size": args.batch_size,
                    "source_clips": (
                        f"{len(raw)} x {args.seconds:g} s 320x240 30 fps H.264, {keys / len(raw):.1f} keyframes/clip"
                    ),
                    "keyint": args.keyint or 250,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table = args.table or Path(f"docs/results/dataloader{tag}.md")
    table.parent.mkdir(parents=True, exist_ok=True)
    command = f"python scripts/bench_dataloader.py {' '.join(sys.argv[1:])}".strip()
    text = markdown(rows, machine, command, args.epochs)
    text += f"\nSource clips: {rows[0]['source_clips']} ({frames} frames).\n"
    text += "".join(f"\n{note}\n" for note in notes)
    table.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
