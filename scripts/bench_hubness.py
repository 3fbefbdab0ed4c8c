"""Hubness bank-pass benchmark: streamed torch ``bank_stats`` vs a plain full-matrix numpy implementation.

    python scripts/bench_hubness.py                      # every case, CPU, torch's default thread count
    python scripts/bench_hubness.py --cases msrvtt_gallery_bank

The bank pass is the log-sum-exp normaliser ``Z(g) = LSE_b beta s(b, g)`` plus the top-1 k-occurrence of every
gallery column (HUBNESS_METHODS §3.5), from random unit float32 embeddings (d = 512):

* torch: ``bank_stats`` over ``embedding_blocks`` (bank rows computed blockwise as ``bank[s:e] @ gallery.T``), so
  the bank matrix is never built;
* numpy: ``S = B @ G.T`` materialised, ``scipy.special.logsumexp`` over axis 0 in float64, argmax per row and
  bincount. Skipped when its estimated footprint (28 bytes per entry) exceeds ``--numpy-limit-gb``.

Each implementation runs in a fresh subprocess and is timed twice: ``seconds`` is the first full-size call
(cold: it pays for faulting in fresh pages, as a one-shot bank pass does), ``repeat_seconds`` a second call;
``matmul_only_seconds`` times the torch block matmuls alone (warm). Peak memory is the growth of the process's
resident set during the first call: the kernel's high-water mark (VmHWM) is reset through ``/proc/self/clear_refs``
just before it, so the growth is ``VmHWM after - VmRSS before``; embeddings and imports are excluded. Each case
appends one JSON line (settings, machine, times, memory, ratios, agreement) to benchmarks/hubness_bank_pass.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy.special import logsumexp

from neighborretr.eval.hubness import bank_stats, embedding_blocks

DIM = 512
# Measured peak growth of numpy_bank_pass (scipy 1.17): float32 S + float64 copy + logsumexp's temporaries.
NUMPY_BYTES_PER_ENTRY = 56


@dataclass(frozen=True)
class Case:
    name: str
    n_bank: int
    n_gallery: int
    beta: float
    chunk_size: int
    note: str


CASES = {
    c.name: c
    for c in [
        Case("msrvtt_query_bank", 180_000, 1_000, 20.0, 4096, "MSR-VTT 9k: training captions x 1k-A test videos"),
        Case("msrvtt_gallery_bank", 9_000, 1_000, 1.0, 4096, "MSR-VTT 9k: training videos x 1k-A test videos"),
        Case("gallery_100k", 9_000, 100_000, 20.0, 512, "9k bank x 100k-item gallery, 512-row blocks"),
        Case("gallery_100k_chunk4096", 9_000, 100_000, 20.0, 4096, "same with the default 4096-row blocks"),
        Case("gallery_100k_bank1k", 1_000, 100_000, 20.0, 512, "1k bank x 100k gallery: small enough for numpy"),
    ]
}


# ------------------------------------------------------------------------------------------------ worker


def unit_embeddings(n: int, seed: int) -> torch.Tensor:
    """[n, DIM] float32 unit rows, normalised in place so no full-size temporary is left behind."""
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return x.div_(x.norm(dim=1, keepdim=True))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measured(fn) -> tuple[object, dict]:
    """Result of ``fn()`` and its timing: the first call (cold: fresh pages are faulted in) with its peak RSS
    growth in MiB (high-water mark reset just before), then a repeat call (warm)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kb("VmRSS")
    tic = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - tic
    growth = (_status_kb("VmHWM") - before) / 1024
    del result
    gc.collect()
    tic = time.perf_counter()
    result = fn()
    return result, {"seconds": seconds, "repeat_seconds": time.perf_counter() - tic, "peak_rss_growth_mib": growth}


def matmul_only(blocks, case: Case) -> None:
    """The block matmuls alone (each block dropped at once), to separate them from the statistics' cost."""
    for start in range(0, case.n_bank, case.chunk_size):
        blocks(start, min(start + case.chunk_size, case.n_bank))


def run_torch(case: Case, bank: torch.Tensor, gallery: torch.Tensor) -> tuple[dict, np.ndarray, np.ndarray]:
    blocks = embedding_blocks(bank, gallery)
    bank_stats(blocks, case.chunk_size, case.beta, chunk_size=case.chunk_size)  # warm-up: kernels, thread pool
    stats, timing = measured(lambda: bank_stats(blocks, case.n_bank, case.beta, chunk_size=case.chunk_size))
    timing["matmul_only_seconds"] = measured(lambda: matmul_only(blocks, case))[1]["repeat_seconds"]
    return timing, stats.lse.numpy(), stats.occurrence.numpy()


def numpy_bank_pass(bank: np.ndarray, gallery: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    sim = bank @ gallery.T  # [N_bank, G] float32, materialised
    scaled = sim.astype(np.float64)
    scaled *= beta
    lse = logsumexp(scaled, axis=0)
    occurrence = np.bincount(sim.argmax(axis=1), minlength=gallery.shape[0])
    return lse, occurrence


def run_numpy(case: Case, bank: torch.Tensor, gallery: torch.Tensor) -> tuple[dict, np.ndarray, np.ndarray]:
    b, g = bank.numpy(), gallery.numpy()
    numpy_bank_pass(b[:256], g[:256], case.beta)  # warm-up
    (lse, occurrence), timing = measured(lambda: numpy_bank_pass(b, g, case.beta))
    return timing, lse, occurrence


def worker(impl: str, case: Case, out: Path) -> None:
    bank, gallery = unit_embeddings(case.n_bank, 0), unit_embeddings(case.n_gallery, 1)
    timing, lse, occurrence = (run_torch if impl == "torch" else run_numpy)(case, bank, gallery)
    np.savez(out, lse=lse, occurrence=occurrence)
    print(json.dumps(timing))


# ------------------------------------------------------------------------------------------------ parent


def spawn(impl: str, case: Case, tmp: Path) -> tuple[dict, np.lib.npyio.NpzFile]:
    """Runs one implementation in a fresh interpreter; returns its timing and its saved vectors."""
    out = tmp / f"{case.name}_{impl}.npz"
    cmd = [sys.executable, __file__, "--worker", impl, "--cases", case.name, "--tmp", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{impl} worker failed on {case.name}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {
        "cpu_model": cpu or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numpy_blas_threads": "library default",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def bench_case(case: Case, limit_gb: float, tmp: Path) -> dict:
    row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **asdict(case), "dim": DIM, "k": 1}
    row |= {"dtype": "float32", "device": "cpu", "machine": machine()}
    row["memory_method"] = "peak RSS growth: VmHWM (reset via /proc/self/clear_refs) - VmRSS before, fresh process"
    torch_timing, torch_out = spawn("torch", case, tmp)
    row["torch"] = {key: round(value, 3) for key, value in torch_timing.items()}
    estimate_gb = case.n_bank * case.n_gallery * NUMPY_BYTES_PER_ENTRY / 1e9
    row["numpy_estimated_gb"] = round(estimate_gb, 2)
    if estimate_gb > limit_gb:
        row["numpy"] = None
        row["numpy_skipped"] = f"estimated {estimate_gb:.1f} GB > {limit_gb} GB limit"
        return row
    numpy_timing, numpy_out = spawn("numpy", case, tmp)
    row["numpy"] = {key: round(value, 3) for key, value in numpy_timing.items()}
    row["time_ratio_numpy_over_torch"] = round(numpy_timing["seconds"] / torch_timing["seconds"], 2)
    row["repeat_time_ratio_numpy_over_torch"] = round(
        numpy_timing["repeat_seconds"] / torch_timing["repeat_seconds"], 2
    )
    row["memory_ratio_numpy_over_torch"] = round(
        numpy_timing["peak_rss_growth_mib"] / max(torch_timing["peak_rss_growth_mib"], 1.0), 2
    )
    row["max_abs_lse_diff"] = float(np.abs(torch_out["lse"] - numpy_out["lse"]).max())
    row["occurrence_moved"] = int(np.abs(torch_out["occurrence"] - numpy_out["occurrence"]).sum() // 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--numpy-limit-gb", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/hubness_bank_pass.jsonl"))
    parser.add_argument("--worker", choices=["torch", "numpy"], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, CASES[args.cases[0]], args.tmp)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            row = bench_case(CASES[name], args.numpy_limit_gb, Path(tmp))
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
