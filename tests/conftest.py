"""Shared fixtures: a tiny generated MSR-VTT-format dataset and helpers to run the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core: one torch thread each
    import torch

    torch.set_num_threads(1)


def _loads(backend: str) -> bool:
    import importlib.util

    from neighborretr.data.video_io import BackendUnavailable, check_backend

    if backend == "decord":  # not imported here: decord loaded before PyAV breaks PyAV's VP9 encoder
        return importlib.util.find_spec("decord") is not None
    try:
        check_backend(backend)
    except BackendUnavailable:
        return False
    return True


# The video backends that load on this machine (PyAV always; torchcodec needs the system's FFmpeg libraries,
# decord the optional extra), and the same as pytest parameters that say why one is skipped.
AVAILABLE_BACKENDS = [b for b in ("pyav", "torchcodec", "decord") if _loads(b)]
BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.skipif(b not in AVAILABLE_BACKENDS, reason=f"the {b} backend does not load here"))
    for b in ("pyav", "torchcodec", "decord")
]


def generate_tiny_synthetic(root: Path, num_train: int = 24) -> Path:
    """`num_train` train / 8 test synthetic videos, 2 captions each, 8 frames of 32 px (the tests configure the
    tiny model for 32 px)."""
    from neighborretr.data.synthetic import generate_synthetic_msrvtt

    generate_synthetic_msrvtt(
        root,
        num_train=num_train,
        num_test=8,
        captions_per_video=2,
        frame_size=32,
        num_frames=8,
        fps=8,
        seed=0,
        workers=1,
        progress=False,
    )
    return root


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """24 train / 8 test synthetic videos at 32 px."""
    return generate_tiny_synthetic(tmp_path_factory.mktemp("synthetic"))


# Overrides that make the entry points fast on the tiny dataset.
TINY_OVERRIDES = [
    "experiment=synthetic_tiny",
    "model.image_size=32",
    "data.image_size=32",
    "data.max_frames=4",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "data.val_videos=4",
    "trainer.epochs=2",
    "trainer.log_every=1",
    "logger=none",
    "eval.k=3",
]
# Pick one loss after TINY_OVERRIDES (the demo experiment's own loss is NeighborRetr with a batch-64 setup).
INFONCE = ["loss=infonce"]
NEIGHBORRETR = ["loss=neighborretr", "loss.num_neighbors=4", "loss.memory_size=16", "loss.mb_batch=2"]


def run_script(script: str, overrides: list[str], cwd: Path, launcher: list[str] | None = None, check: bool = True):
    """Runs scripts/<script> in a subprocess (optionally under a launcher such as torchrun); returns the result."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "scripts" / script), *overrides]
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        log = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{log}")
    return result


def write_numbered_video(
    path: Path, num_frames: int, fps: int = 10, size: int = 32, codec: str = "libx264", options: dict | None = None
) -> Path:
    """A video (container from the suffix) whose frame i is a flat grey of level 6·i + 16, so decoded pixels reveal
    the frame index. Default: lossless H.264 without B-frames; `options` replaces the encoder options."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"} if options is None else options
        for i in range(num_frames):
            frame = np.full((size, size, 3), 6 * i + 16, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_numbers(frames) -> list[int]:
    """Inverse of write_numbered_video's grey levels."""
    return [int(round((float(f.mean()) - 16) / 6)) for f in frames]


def run_two_processes(script: str, *args: str) -> None:
    """Runs tests/integration/<script> in 2 gloo processes (torchrun, loopback only) and fails with its stderr."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "integration" / script),
        *args,
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
