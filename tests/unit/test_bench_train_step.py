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


def test_a_row_per_loss_and_the_tables_of_the_results_file(tmp_path):
    out, table = tmp_path / "train_step.jsonl", tmp_path / "train_step.md"
    out.write_text(json.dumps({"model": "tiny", "s_per_step": 1.0}) + "\n")  # an older row without a breakdown
    argv = ["--model", "micro", "--batch", "22", "--frames", "2", "--words", "6", "--loss", "infonce"]
    argv += [
        "--steps",
        "1",
        "--warmup",
        "0",
        "--breakdown-steps",
        "1",
        "--cpu",
        "--out",
        str(out),
        "--table",
        str(table),
    ]
    (row,) = bench.main(argv)
    assert json.loads(out.read_text().splitlines()[-1]) == row
    assert {"text encoder", "video encoder", "similarity", "loss terms", "backward: encoders", "optimiser"} <= set(
        row["phases_ms"]
    )
    assert "bank scoring" not in row["phases_ms"] and row["memory_size"] is None
    assert all(value >= 0 for value in row["phases_ms"].values()), row["phases_ms"]
    assert sum(row["phase_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert row["clips_per_s"] > 0 and row["optimizer"] == "bertadam"
    text = table.read_text()
    assert "| micro | 22 | 2 x 6 | no | infonce | - | bertadam |" in text
    assert "| bank scoring | - |" in text and "| text encoder | " in text


def test_the_neighborretr_breakdown_covers_the_bank_and_restores_the_objects():
    from accelerate import Accelerator

    args = bench.parse_args(["--model", "micro", "--batch", "22", "--frames", "2", "--words", "6"])
    args.memory_size = 4
    accelerator = Accelerator(cpu=True)
    run = bench.Bench(args, "neighborretr", accelerator)
    phases = bench.breakdown(run, 1)
    assert {"token merging", "global head", "similarity", "bank scoring", "loss terms", "bank update"} <= set(phases)
    assert all(value >= 0 for value in phases.values())
    for owner in (run.model, run.objective, run.objective.bank, accelerator):
        assert not {"encode_text", "similarity_with_bank", "forward", "get", "backward"} & owner.__dict__.keys()
    assert torch.isfinite(torch.tensor(run.step()))  # the plain step still works
