"""scripts/bench_search.py at a tiny size: its rows, and the recall invariants it must show."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("faiss", reason="the benchmark's approximate first stage needs faiss (the search extra)")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_search.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_rows_and_full_depth_recall_is_exact(tmp_path):
    jsonl, md = tmp_path / "search.jsonl", tmp_path / "search.md"
    args = ["--sizes", "300", "--queries", "3", "--dim", "32", "--depths", "10", "300", "--ann-threshold", "100"]
    rows = _bench().main([*args, "--exact-too", "--threads", "1", "--jsonl", str(jsonl), "--markdown", str(md)])
    assert [(r["first_stage"], r["depth"]) for r in rows] == [
        ("hnsw", 10),
        ("hnsw", 300),
        ("exact", 10),
        ("exact", 300),
    ]
    exact_full = rows[-1]
    # re-ranking every video is the exhaustive scoring itself
    assert exact_full["recall@10"] == 1.0 and exact_full["candidates"] == 300
    assert all(0 <= r["recall@10"] <= 1 for r in rows)
    assert rows[0]["memory_bytes_per_video"] == pytest.approx(12 * 32 * 2 + 12 + 12 * 4 + 32 * 4)
    assert rows[0]["disk_bytes_per_video"] > rows[0]["memory_bytes_per_video"]  # + the manifest and the graph
    assert len(jsonl.read_text().splitlines()) == 4 and "| 300 | exact | 300 | 1.000 |" in md.read_text()
