"""scripts/gpu_check.py in its reduced form on CPU: the parts run and land in one JSON and one markdown file;
the loader part drives bench_dataloader's functions and reports a loader it lacks instead of failing."""

import json
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
gpu_check = pytest.importorskip("gpu_check")


def test_the_reduced_check_runs_every_part_on_cpu(tmp_path):
    out, table = tmp_path / "gpu_check.json", tmp_path / "gpu_check.md"
    # The compile part is left out for time (two more models and a trace); test_compile_option.py covers the
    # compiled step's equality and `--reduced --cpu` runs it by default.
    argv = ["--reduced", "--cpu", "--parts", "train", "eval", "loader", "--out", str(out)]
    results = gpu_check.main([*argv, "--table", str(table)])
    assert json.loads(out.read_text())["mode"].startswith("reduced")
    rows = results["train"]["rows"]
    assert [(r["loss"], r["batch"]) for r in rows] == [("neighborretr", 22), ("infonce", 22)]
    assert all(r["clips_per_s"] > 0 and r["vision_mfu"] is None for r in rows)  # no bf16 peak on a CPU
    assert "bank scoring" in rows[0]["phases_ms"]
    assert results["eval"]["captions"] == 40 and not results["eval"]["similarity_extrapolated"]
    assert "compile" not in results
    assert results["loader"]["skipped"] == "loader_videos is 0"
    text = table.read_text()
    assert "| neighborretr | 22 |" in text and "reduced (smoke test, not a measurement)" in text


def test_a_failing_part_is_recorded_and_a_late_one_skipped():
    results = {}
    gpu_check.timed_part(results, "boom", lambda: 1 / 0, start=0.0, budget=1e12)
    assert results["boom"]["error"].startswith("ZeroDivisionError")
    gpu_check.timed_part(results, "late", lambda: {}, start=-1e9, budget=1.0)
    assert "time budget" in results["late"]["skipped"]


def test_the_loader_part_uses_bench_dataloader_and_reports_missing_loaders(monkeypatch, tmp_path):
    calls = []
    fake = types.SimpleNamespace(
        generate=lambda folder, count, workers: [Path(folder) / f"video{i}.mp4" for i in range(count)],
        clips_per_second=lambda dataset, workers, batch: (calls.append((dataset, workers, batch)) or 12.5, 1.0),
    )

    def loader_dataset(name, records, folder):
        if name == "ours-cache":
            raise ValueError("unknown backend 'cache'")
        return f"{name}:{len(records)}"

    fake.loader_dataset = loader_dataset
    monkeypatch.setitem(sys.modules, "bench_dataloader", fake)
    prepare = types.SimpleNamespace(prepare_folder=lambda *a, **k: types.SimpleNamespace(failed=[]))
    monkeypatch.setitem(sys.modules, "neighborretr.data.prepare", prepare)
    settings = gpu_check.FULL | {"loader_videos": 3}
    out = gpu_check.loader_part(settings, tmp_path, "ours-cache", "ours-decord")
    assert out["prepared"] == {"loader": "ours-decord", "clips_per_s": 12.5}
    assert out["cache"]["not_available"] == "ValueError: unknown backend 'cache'"
    assert calls == [("ours-decord:6", 16, 32)] and out["records"] == 6
