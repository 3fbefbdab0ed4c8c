"""Training-loader throughput (clips/s): our loader per backend vs a naive OpenCV loader, raw and prepared videos.

    python scripts/bench_dataloader.py                      # 32 generated videos, workers 1 and 2
    python scripts/bench_dataloader.py --videos 64 --workers 2 4 8

The videos imitate MSR-VTT clips: 15 s, 320x240, 30 fps, H.264 at libx264's defaults (CRF 23, preset medium,
B-frames, a keyframe at most every 250 frames; `--keyint` shortens that), with a panning textured scene, moving
objects, sensor noise and two hard cuts per clip. The results give the keyframes per clip actually written.
Their prepared copies come from scripts/prepare_videos.py's code (3 fps, short side 224). Every loader yields the
same thing: 12 frames per clip (one drawn at random inside each twelfth of the clip), resized and centre-cropped
to 224 px, CLIP-normalised, plus the tokenised caption. The naive loader is the pattern common in this field:
OpenCV reads every frame of the video into memory, then the 12 are picked.

One JSON line per (videos, loader, workers) goes to benchmarks/dataloader.jsonl and a table with the ratio to
the naive loader at the same worker count to docs/results/dataloader.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from neighborretr.data.transforms import CaptionTokenizer, clip_frames
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import sample_frame_indices

FRAMES, SIZE, WORDS = 12, 224, 32


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


def _make(job: tuple[str, int, int | None]) -> None:
    make_clip(Path(job[0]), job[1], job[2])


def generate(folder: Path, count: int, workers: int, keyint: int | None = None) -> list[Path]:
    """`count` clips in `folder`, reusing the ones already there."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"video{i}.mp4" for i in range(count)]
    jobs = [(str(p), i, keyint) for i, p in enumerate(paths) if not p.is_file()]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make, jobs))
    return paths


class NaiveOpenCVDataset(Dataset):
    """The common pattern: cv2 decodes every frame of the video, then FRAMES are picked (same draw as ours)."""

    def __init__(self, records: list[Record], videos: VideoIndex, seed: int = 0):
        self.records, self.videos, self.seed = records, videos, seed
        self.tokenizer = CaptionTokenizer(WORDS)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import cv2

        record = self.records[index]
        capture = cv2.VideoCapture(str(self.videos.find(record)))
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        capture.release()
        rng = np.random.default_rng([self.seed, 0, index])
        picked = np.stack([frames[i] for i in sample_frame_indices(len(frames), FRAMES, "random", rng)])
        ids, mask = self.tokenizer(record.caption)
        return {"text_ids": ids, "text_mask": mask, "video": clip_frames(picked, SIZE)}


def loader_dataset(name: str, records: list[Record], folder: Path) -> Dataset:
    videos = VideoIndex(folder)
    if name == "naive-opencv":
        return NaiveOpenCVDataset(records, videos)
    backend = name.split("-", 1)[1]
    return VideoTextDataset(records, folder, WORDS, FRAMES, SIZE, train=True, backend=backend, videos=videos)


def clips_per_second(dataset: Dataset, workers: int, batch_size: int) -> tuple[float, float]:
    """(clips/s over the whole pass after the first batch, seconds of the pass). Worker start-up and the first
    batch are left out: they are paid once per epoch, not per clip."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=True)
    it = iter(loader)
    next(it)
    start, clips = time.perf_counter(), 0
    for batch in it:
        clips += batch["video"].shape[0]
    seconds = time.perf_counter() - start
    return clips / seconds, seconds


def keyframe_stats(path: Path) -> tuple[int, int]:
    """(frames, keyframes) of a video, read from its packets."""
    import av

    with av.open(str(path)) as container:
        flags = [p.is_keyframe for p in container.demux(container.streams.video[0]) if p.size]
    return len(flags), sum(flags)


def markdown(rows: list[dict], machine: str) -> str:
    lines = [
        "# Training-loader throughput",
        "",
        f"Machine: {machine}. Command: `python scripts/bench_dataloader.py {' '.join(sys.argv[1:])}`.",
        "One pass over the clips per row, first batch excluded. Ratio = clips/s divided by the naive OpenCV",
        "loader's clips/s on the same videos with the same worker count.",
        "",
        "| videos | loader | workers | clips/s | ratio to naive |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['videos']} | {r['loader']} | {r['workers']} | {r['clips_per_s']:.1f} | {r['ratio_to_naive']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=32, help="generated clips")
    parser.add_argument("--captions", type=int, default=3, help="captions per clip (records per pass = videos x this)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loaders", nargs="+", default=["naive-opencv", "ours-decord", "ours-pyav"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keyint", type=int, default=None, help="maximum keyframe interval (default: libx264's 250)")
    parser.add_argument("--cache", type=Path, default=Path("data/bench_videos"), help="generated videos (reused)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/dataloader.jsonl"))
    parser.add_argument("--table", type=Path, default=None, help="default: docs/results/dataloader[_keyintN].md")
    args = parser.parse_args()

    from neighborretr.data.prepare import prepare_folder

    cores = os.cpu_count() or 1
    tag = f"_keyint{args.keyint}" if args.keyint else ""
    folders = {"raw": args.cache / f"raw{tag}", "prepared": args.cache / f"prepared{tag}"}
    raw = generate(folders["raw"], args.videos, cores, args.keyint)
    summary = prepare_folder(folders["raw"], folders["prepared"], fps=3, short_side=224, workers=cores)
    if summary.failed:
        raise SystemExit(f"preparing the benchmark videos failed: {summary.failed}")
    frames, keys = np.sum([keyframe_stats(p) for p in raw], axis=0)
    machine = f"{platform.machine()} CPU, {cores} cores, torch {torch.__version__}"
    records = [Record(p.stem, f"caption {k} of clip {p.stem}") for p in raw for k in range(args.captions)]
    rows = []
    for videos in ("raw", "prepared"):
        for workers in args.workers:
            naive = None
            for name in args.loaders:
                rate, seconds = clips_per_second(
                    loader_dataset(name, records, args.cache / videos), workers, args.batch_size
                )
                naive = rate if name == "naive-opencv" else naive
                row = {
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": machine,
                    "videos": videos,
                    "loader": name,
                    "workers": workers,
                    "clips_per_s": round(rate, 2),
                    "ratio_to_naive": round(rate / naive, 2) if naive else float("nan"),
                    "seconds": round(seconds, 1),
                    "clips": len(records),
                    "frames": FRAMES,
                    "size": SIZE,
                    "batch_size": args.batch_size,
                    "source_clips": f"{len(raw)} x 15 s 320x240 30 fps H.264, {keys / len(raw):.1f} keyframes/clip",
                    "keyint": args.keyint or 250,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table = args.table or Path(f"docs/results/dataloader{tag}.md")
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(markdown(rows, machine) + f"\nSource clips: {rows[0]['source_clips']} ({frames} frames).\n")
    print(markdown(rows, machine))


if __name__ == "__main__":
    main()
