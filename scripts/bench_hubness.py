"""Hubness bank-pass benchmark: streamed torch ``bank_stats`` vs a chunked float32 numpy baseline.

    python scripts/bench_hubness.py                                  # every case, CPU, 5 interleaved rounds
    python scripts/bench_hubness.py --cases msrvtt_query_bank --repeats 7 --threads 2

The bank pass is the log-sum-exp normaliser ``Z(g) = LSE_b beta s(b, g)`` plus the top-1 k-occurrence of every
gallery column (HUBNESS_METHODS §3.5), from random unit float32 embeddings (d = 512):

* torch: ``bank_stats`` over ``embedding_blocks`` (bank rows computed blockwise as ``bank[s:e] @ gallery.T``);
* numpy: the same algorithm written directly in numpy, as a baseline should be: float32 throughout, bank rows in
  blocks of the same size, ``S = B[s:e] @ G.T`` per block, top-1 counts by ``argmax`` + ``bincount``, and a running
  max-shifted log-sum-exp per gallery column (no full matrix, no float64 copy).

Fair conditions: both sides get the same number of threads (``torch.set_num_threads`` and numpy's OpenBLAS pool,
set through its C API, with ``OMP/OPENBLAS/MKL_NUM_THREADS`` in the worker's environment; numpy's element-wise
ufuncs are single-threaded whatever the setting). Times come from one fresh worker process: one full-size warm-up
call per implementation, then ``--repeats`` interleaved rounds (torch, numpy, torch matmuls only, numpy matmuls
only); the minimum and median per implementation are reported. The matmul-only rows time the block matmuls alone
(each block dropped at once), which separates the BLAS (MKL in torch's wheels, OpenBLAS in numpy's) from the
statistics that are our code. Peak memory is measured the same way for both, each in its own fresh process: after
a tiny warm-up (8 bank rows), the kernel's high-water mark (VmHWM) is reset through ``/proc/self/clear_refs`` and
the reported figure is ``VmHWM after - VmRSS before`` one full call (embeddings and imports excluded). The two
results must agree (max |dZ|, identical counts). Each case appends one JSON line (settings, machine, times, memory,
ratios, agreement, command) to benchmarks/hubness_bank_pass.jsonl and the run ends with a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from neighborretr.eval.hubness import bank_stats, embedding_blocks

DIM = 512
BASELINE = "numpy float32, chunked (same blocks), running max-shifted LSE, argmax+bincount"
WARMUP_ROWS_MEMORY = 8


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
        Case("gallery_100k_bank1k", 1_000, 100_000, 20.0, 512, "1k bank x 100k gallery"),
        Case("smoke", 2_000, 300, 20.0, 512, "tiny case for tests (not in the default list)"),
    ]
}
DEFAULT_CASES = [name for name in CASES if name != "smoke"]


# --------------------------------------------------------------------------------------------- the two passes


def unit_embeddings(n: int, seed: int) -> torch.Tensor:
    """[n, DIM] float32 unit rows, normalised in place so no full-size temporary is left behind."""
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return x.div_(x.norm(dim=1, keepdim=True))


def torch_bank_pass(bank: torch.Tensor, gallery: torch.Tensor, beta: float, chunk_size: int):
    """Ours: ``bank_stats`` streamed over ``embedding_blocks``; returns (Z [G] float32, counts [G] int64) tensors."""
    stats = bank_stats(embedding_blocks(bank, gallery), bank.shape[0], beta, chunk_size=chunk_size)
    return stats.lse, stats.occurrence


def numpy_bank_pass(bank: np.ndarray, gallery: np.ndarray, beta: float, chunk_size: int):
    """Baseline: (Z [G] float32, top-1 counts [G] int64) of ``S = bank @ gallery.T``, in row blocks of ``chunk_size``.

    Per block: counts from the row argmax, then ``exp(beta (S - m))`` with ``m`` the block's column max (in place,
    so one block is the only large buffer), summed over rows and merged into the running (max, sum) of each column.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    n_cols = gallery.shape[0]
    gallery_t = gallery.T
    counts = np.zeros(n_cols, dtype=np.int64)
    run_max = run_sum = None
    for start in range(0, bank.shape[0], chunk_size):
        sim = bank[start : start + chunk_size] @ gallery_t  # [c, G] float32
        counts += np.bincount(sim.argmax(axis=1), minlength=n_cols)
        block_max = sim.max(axis=0)
        np.subtract(sim, block_max, out=sim)
        np.multiply(sim, np.float32(beta), out=sim)
        np.exp(sim, out=sim)
        block_sum = sim.sum(axis=0)
        del sim
        if run_max is None:
            run_max, run_sum = block_max, block_sum
            continue
        new_max = np.maximum(run_max, block_max)
        run_sum = run_sum * np.exp(np.float32(beta) * (run_max - new_max))
        run_sum += block_sum * np.exp(np.float32(beta) * (block_max - new_max))
        run_max = new_max
    return np.log(run_sum) + np.float32(beta) * run_max, counts


def reference_bank_pass(bank: np.ndarray, gallery: np.ndarray, beta: float):
    """Plain float64 full-matrix reference (for tests): ``logsumexp(beta S, axis=0)`` and top-1 counts."""
    from scipy.special import logsumexp

    sim = bank.astype(np.float64) @ gallery.astype(np.float64).T
    return logsumexp(beta * sim, axis=0), np.bincount(np.argmax(sim, axis=1), minlength=gallery.shape[0])


def torch_matmuls(bank: torch.Tensor, gallery: torch.Tensor, chunk_size: int) -> None:
    blocks = embedding_blocks(bank, gallery)
    for start in range(0, bank.shape[0], chunk_size):
        blocks(start, min(start + chunk_size, bank.shape[0]))


def numpy_matmuls(bank: np.ndarray, gallery: np.ndarray, chunk_size: int) -> None:
    gallery_t = gallery.T
    for start in range(0, bank.shape[0], chunk_size):
        bank[start : start + chunk_size] @ gallery_t


def implementations(case: Case, bank: torch.Tensor, gallery: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The four timed calls of a case, in the order of an interleaved round."""
    b, g = bank.numpy(), gallery.numpy()  # shared memory, no copy
    return {
        "torch": lambda: torch_bank_pass(bank, gallery, case.beta, case.chunk_size),
        "numpy": lambda: numpy_bank_pass(b, g, case.beta, case.chunk_size),
        "torch_matmul_only": lambda: torch_matmuls(bank, gallery, case.chunk_size),
        "numpy_matmul_only": lambda: numpy_matmuls(b, g, case.chunk_size),
    }


# ------------------------------------------------------------------------------------------ threads, memory


def _openblas() -> ctypes.CDLL | None:
    """numpy's bundled OpenBLAS (scipy-openblas), if it can be found; None otherwise."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*"))
    try:
        return ctypes.CDLL(libs[0]) if libs else None
    except OSError:
        return None


def set_threads(n: int) -> dict:
    """Same thread count for both sides; returns what each library reports afterwards."""
    torch.set_num_threads(n)
    lib, blas = _openblas(), "unknown (OPENBLAS_NUM_THREADS set)"
    if lib is not None:
        for suffix in ("64_", "_64_", ""):
            setter = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
            getter = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                setter(ctypes.c_int(n))
                blas = int(getter())
                break
    return {"torch_threads": torch.get_num_threads(), "numpy_blas_threads": blas, "numpy_ufunc_threads": 1}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_growth_mib(fn: Callable[[], object]) -> float:
    """Peak resident-set growth during ``fn()`` in MiB: VmHWM (reset just before) minus VmRSS before."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kb("VmRSS")
    result = fn()
    growth = (_status_kb("VmHWM") - before) / 1024
    del result
    return growth


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict, dict]:
    """One warm-up call per function (its result kept), then ``repeats`` rounds calling each once, in order."""
    warm = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
    return times, warm


# ------------------------------------------------------------------------------------------------ workers


def time_worker(case: Case, repeats: int, thread_info: dict) -> dict:
    bank, gallery = unit_embeddings(case.n_bank, 0), unit_embeddings(case.n_gallery, 1)
    times, warm = interleaved_times(implementations(case, bank, gallery), repeats)
    (torch_lse, torch_counts), (numpy_lse, numpy_counts) = warm["torch"], warm["numpy"]
    torch_lse, torch_counts = torch_lse.numpy(), torch_counts.numpy()
    return {
        "threads": thread_info,
        "times": times,
        "max_abs_lse_diff": float(np.abs(torch_lse.astype(np.float64) - numpy_lse).max()),
        "occurrence_equal": bool(np.array_equal(torch_counts, numpy_counts)),
        "occurrence_moved": int(np.abs(torch_counts - numpy_counts).sum() // 2),
    }


def memory_worker(case: Case, impl: str) -> dict:
    bank, gallery = unit_embeddings(case.n_bank, 0), unit_embeddings(case.n_gallery, 1)
    fn = implementations(case, bank, gallery)[impl]
    implementations(case, bank[:WARMUP_ROWS_MEMORY], gallery)[impl]()  # kernels and thread pools, same for both
    return {"peak_rss_growth_mib": peak_growth_mib(fn)}


def spawn(args: list[str], threads: int) -> dict:
    """Runs a worker in a fresh interpreter with the thread variables set; returns its JSON answer."""
    env = os.environ | {name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, __file__, *args, "--threads", str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ parent


def machine(thread_info: dict) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    config = torch.__config__.show()
    torch_blas = next((p.split("=", 1)[1] for p in config.replace(",", " ").split() if p.startswith("BLAS_INFO=")), "?")
    return {
        "cpu_model": cpu or platform.processor(),
        "logical_cpus": os.cpu_count(),
        **thread_info,
        "torch_blas": torch_blas,
        "numpy_blas": "scipy-openblas" if _openblas() is not None else "?",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def summary(times: list[float]) -> dict:
    return {"min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4)}


def bench_case(case: Case, repeats: int, threads: int, command: str) -> dict:
    timed = spawn(["--worker", "time", "--cases", case.name, "--repeats", str(repeats)], threads)
    memory = {
        impl: spawn(["--worker", "memory", "--impl", impl, "--cases", case.name], threads)["peak_rss_growth_mib"]
        for impl in ("torch", "numpy")
    }
    row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **asdict(case), "dim": DIM, "k": 1}
    row |= {"dtype": "float32", "device": "cpu", "baseline": BASELINE, "machine": machine(timed["threads"])}
    row["timing_method"] = f"fresh process, 1 warm-up call each, {repeats} interleaved rounds, min and median"
    row["memory_method"] = (
        "peak RSS growth of one call after an 8-row warm-up: VmHWM (reset via /proc/self/clear_refs) - VmRSS before, "
        "fresh process per implementation"
    )
    t = timed["times"]
    for impl in ("torch", "numpy"):
        row[impl] = {
            **summary(t[impl]),
            "times_s": [round(x, 4) for x in t[impl]],
            "matmul_only": summary(t[f"{impl}_matmul_only"]),
            "peak_rss_growth_mib": round(memory[impl], 1),
        }
    row["time_ratio_numpy_over_torch_min"] = round(min(t["numpy"]) / min(t["torch"]), 3)
    row["time_ratio_numpy_over_torch_median"] = round(statistics.median(t["numpy"]) / statistics.median(t["torch"]), 3)
    row["memory_ratio_numpy_over_torch"] = round(memory["numpy"] / max(memory["torch"], 1.0), 3)
    row |= {key: timed[key] for key in ("max_abs_lse_diff", "occurrence_equal", "occurrence_moved")}
    row["command"] = command
    row["code"] = code_version()
    return row


def code_version() -> dict:
    """The commit and the hash of the torch bank pass's file, which may hold uncommitted changes."""
    source = Path(__file__).resolve().parents[1] / "neighborretr" / "eval" / "hubness.py"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=source.parent)
    return {"commit": head.stdout.strip() or "?", "hubness_py_sha1": hashlib.sha1(source.read_bytes()).hexdigest()[:12]}


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| case | bank x gallery | block | torch min / median (s) | numpy min / median (s) | numpy / torch (min) "
        "| matmuls only, torch / numpy (min, s) | peak RSS growth torch / numpy (MiB) | max abs dZ | counts equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tt, nn = r["torch"], r["numpy"]
        lines.append(
            f"| {r['name']} | {r['n_bank']:,} x {r['n_gallery']:,} | {r['chunk_size']} "
            f"| {tt['min_s']:.3f} / {tt['median_s']:.3f} | {nn['min_s']:.3f} / {nn['median_s']:.3f} "
            f"| {r['time_ratio_numpy_over_torch_min']:.2f} "
            f"| {tt['matmul_only']['min_s']:.3f} / {nn['matmul_only']['min_s']:.3f} "
            f"| {tt['peak_rss_growth_mib']:.0f} / {nn['peak_rss_growth_mib']:.0f} "
            f"| {r['max_abs_lse_diff']:.1e} | {'yes' if r['occurrence_equal'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=DEFAULT_CASES)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds after the warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both sides")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/hubness_bank_pass.jsonl"))
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["torch", "numpy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    if args.worker:
        thread_info = set_threads(args.threads)
        case = CASES[args.cases[0]]
        if args.worker == "time":
            answer = time_worker(case, args.repeats, thread_info)
        else:
            answer = memory_worker(case, args.impl)
        print(json.dumps(answer))
        return
    command = shlex.join(["python", "scripts/bench_hubness.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases:
        row = bench_case(CASES[name], args.repeats, args.threads, command)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
