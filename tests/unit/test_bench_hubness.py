"""The hubness bank-pass benchmark's pieces: the chunked numpy baseline against a float64 full-matrix reference,
its agreement with ours, and the timing / memory plumbing on a tiny case."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
bench = pytest.importorskip("bench_hubness")


def embeddings(n_bank: int, n_gallery: int) -> tuple[torch.Tensor, torch.Tensor]:
    return bench.unit_embeddings(n_bank, 0), bench.unit_embeddings(n_gallery, 1)


@pytest.mark.parametrize("beta", [0.0, 1.0, 20.0, 50.0])
@pytest.mark.parametrize("chunk_size", [1, 37, 128, 1000])  # single rows, a ragged last block, one block
def test_numpy_baseline_equals_float64_full_matrix_reference(beta, chunk_size):
    bank, gallery = embeddings(301, 40)
    lse, counts = bench.numpy_bank_pass(bank.numpy(), gallery.numpy(), beta, chunk_size)
    ref_lse, ref_counts = bench.reference_bank_pass(bank.numpy(), gallery.numpy(), beta)
    assert lse.dtype == np.float32 and counts.dtype == np.int64 and lse.shape == counts.shape == (40,)
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(counts, ref_counts)
    assert counts.sum() == 301


def test_numpy_baseline_handles_a_dominant_column_without_overflow():
    # beta * s up to 1000: exp would overflow float32 without the max shift.
    bank, gallery = embeddings(64, 5)
    gallery[0] = bank[3]  # bank row 3 has similarity 1 with column 0
    lse, counts = bench.numpy_bank_pass(bank.numpy(), gallery.numpy(), 1000.0, 16)
    ref_lse, ref_counts = bench.reference_bank_pass(bank.numpy(), gallery.numpy(), 1000.0)
    assert np.isfinite(lse).all()
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(counts, ref_counts)


def test_beta_zero_is_log_bank_size():
    bank, gallery = embeddings(100, 7)
    lse, _ = bench.numpy_bank_pass(bank.numpy(), gallery.numpy(), 0.0, 33)
    np.testing.assert_allclose(lse, np.log(100.0), rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [16, 4096])
def test_torch_pass_agrees_with_the_baseline(chunk_size):
    bank, gallery = embeddings(500, 60)
    torch_lse, torch_counts = bench.torch_bank_pass(bank, gallery, 20.0, chunk_size)
    numpy_lse, numpy_counts = bench.numpy_bank_pass(bank.numpy(), gallery.numpy(), 20.0, chunk_size)
    np.testing.assert_allclose(torch_lse.numpy(), numpy_lse, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(torch_counts.numpy(), numpy_counts)


@pytest.mark.parametrize("chunk_size", [7, 512])
def test_torch_pass_is_blockwise_torch_logsumexp_bit_for_bit(chunk_size):
    # What bank_stats computes, written the obvious way: its optimisations must not change a bit.
    bank, gallery = embeddings(300, 50)
    lse, counts = torch.full((50,), -torch.inf), torch.zeros(50, dtype=torch.long)
    for start in range(0, 300, chunk_size):
        block = bank[start : start + chunk_size] @ gallery.T
        lse = torch.logaddexp(lse, torch.logsumexp(20.0 * block, dim=0))
        counts += torch.bincount(block.argmax(dim=1), minlength=50)
    torch_lse, torch_counts = bench.torch_bank_pass(bank, gallery, 20.0, chunk_size)
    assert torch.equal(torch_lse, lse) and torch.equal(torch_counts, counts)


def test_interleaved_times_warm_up_once_then_alternate():
    calls = []
    fns = {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}
    times, warm = bench.interleaved_times(fns, repeats=3)
    assert calls == ["a", "b"] * 4
    assert warm == {"a": 1, "b": 2}
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_growth_sees_a_temporary_buffer():
    """In a fresh interpreter, as the benchmark measures: a long-lived test process may hand the buffer pages it
    already holds, so its resident set need not grow."""
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import bench_hubness as b\n"
        "def touch():\n"
        "    buffer = np.ones(64 * 2**20, dtype=np.uint8)  # written, so its pages are resident\n"
        "    return int(buffer[::4096].sum())\n"
        "print(b.peak_growth_mib(touch))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "scripts")], capture_output=True, text=True, timeout=300, check=True
    )
    assert float(done.stdout.split()[-1]) >= 60


def test_bench_case_writes_a_complete_row():
    row = bench.bench_case(bench.CASES["smoke"], repeats=1, threads=1, command="test")
    for impl in ("torch", "numpy"):
        assert row[impl]["min_s"] > 0 and len(row[impl]["times_s"]) == 1
        assert row[impl]["matmul_only"]["min_s"] > 0
        assert row[impl]["peak_rss_growth_mib"] >= 0
    assert row["machine"]["torch_threads"] == 1
    assert row["occurrence_equal"] and row["max_abs_lse_diff"] < 1e-4
    json.dumps(row)  # one JSON line
    table = bench.markdown_table([row])
    assert table.count("\n") == 2 and "| smoke |" in table
