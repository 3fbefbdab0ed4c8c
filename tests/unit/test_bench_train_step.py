"""The training-step benchmark: its instrumented bank scoring returns the library's values, the breakdown covers
the phases of each loss and leaves the objects as it found them, and one JSON line per loss is written."""

import json
import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
bench = pytest.importorskip("bench_train_step")


def test_the_timed_bank_scoring_returns_the_library_values():
    model = bench.MODELS["micro"](True)
    g = torch.Generator().manual_seed(0)
    t, v = torch.randn(4, 6, 32, generator=g), torch.randn(4, 3, 32, generator=g)
    tm, vm = torch.ones(4, 6, dtype=torch.long), torch.ones(4, 3, dtype=torch.long)
    tm[1, 4:] = 0
    memory = bench.full_bank(5, 6, 3, 32, torch.device("cpu"))
    timer = bench.PhaseTimer(torch.device("cpu"))
    timed = bench.timed_similarity_with_bank(model, timer)(t, tm, v, vm, memory)
    for got, expected in zip(timed, model.similarity_with_bank(t, tm, v, vm, memory)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert set(timer.ms) == {"similarity", "bank scoring"} and timer.nested == pytest.approx(sum(timer.ms.values()))


def test_one_row_per_loss_with_its_phases(tmp_path):
    out = tmp_path / "train_step.jsonl"
    argv = ["--model", "micro", "--batch", "22", "--frames", "2", "--words", "6", "--memory-size", "8"]
    rows = bench.main([*argv, "--steps", "1", "--warmup", "0", "--breakdown-steps", "1", "--cpu", "--out", str(out)])
    assert [json.loads(line)["loss"] for line in out.read_text().splitlines()] == ["infonce", "neighborretr"]
    infonce, neighborretr = rows
    common = {"text encoder", "video encoder", "similarity", "loss terms", "backward: encoders", "optimiser"}
    assert common <= infonce["phases_ms"].keys() and "bank scoring" not in infonce["phases_ms"]
    assert common | {"token merging", "bank scoring", "bank update"} <= neighborretr["phases_ms"].keys()
    for row in rows:
        assert all(value >= 0 for value in row["phases_ms"].values()), row["phases_ms"]
        assert sum(row["phase_share"].values()) == pytest.approx(1.0, abs=1e-3)
        assert row["clips_per_s"] > 0 and row["optimizer"] == "bertadam"
    assert neighborretr["memory_size"] == 8 and infonce["memory_size"] is None


def test_the_breakdown_restores_the_objects_it_instruments():
    args = bench.parse_args(["--model", "micro", "--batch", "22", "--frames", "2", "--words", "6", "--cpu"])
    args.memory_size = 4
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    run = bench.Bench(args, "neighborretr", accelerator)
    before = run.step()
    bench.breakdown(run, 1)
    for owner in (run.model, run.objective, run.objective.bank, accelerator):
        assert not {"encode_text", "similarity_with_bank", "forward", "get", "backward"} & owner.__dict__.keys()
    assert torch.isfinite(torch.tensor([before, run.step()])).all()
