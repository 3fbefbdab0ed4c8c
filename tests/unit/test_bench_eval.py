"""The evaluation-speed benchmark: one row per run with its extrapolation labelled, the GEMM path equal to the
pair-mask formula it replaced, and the GPU estimate against hand-computed figures."""

import json
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
bench = pytest.importorskip("bench_eval")

SMOKE = ["--size", "smoke", "--model", "micro", "--encode-items", "4", "--encode-batch", "2"]


def test_a_smoke_row_with_the_reference_block_and_an_extrapolated_similarity(tmp_path):
    out = tmp_path / "eval.jsonl"
    full = bench.main([*SMOKE, "--chunk", "16", "--compare-reference", "--out", str(out)])
    table = tmp_path / "eval.md"
    part = bench.main([*SMOKE, "--chunk", "16", "--row-blocks", "1", "--out", str(out), "--table", str(table)])
    assert [json.loads(line)["size"] for line in out.read_text().splitlines()] == ["smoke", "smoke"]
    assert not full["similarity_extrapolated"] and full["similarity_rows_timed"] == 40
    assert part["similarity_extrapolated"] and part["similarity_rows_timed"] == 16
    assert full["block_max_abs_diff"] < 1e-6  # the GEMM path against the pair-mask formula on one block
    assert full["similarity_flops"] == 2 * 40 * 30 * 8 * 4 * 32
    assert full["encode_extrapolated_from_items"] == 4 and full["encode_flops_per_clip"] > 0
    assert full["total_s"] == pytest.approx(
        full["similarity_s"] + full["encode_text_s"] + full["encode_video_s"], abs=0.011
    )
    assert "not a measurement" in full["gpu_estimate"]["note"]
    text = table.read_text()
    assert text.startswith(bench.TABLE_HEADER)  # the commands travel with the table
    lines = text.removeprefix(bench.TABLE_HEADER).splitlines()
    assert len([line for line in lines if "| smoke 40x30, 8x4 | micro |" in line]) == 2
    assert f"| ~{part['similarity_s']} |" in lines[3] and "x |" in lines[2]  # extrapolated one marked; speed-up


def test_the_gpu_estimate_by_hand():
    spec = bench.GPU_SPECS["H100"]
    row = {
        "encode_flops": 2 * spec["bf16_tflops"] * 1e12 * 0.5,  # 2 s at half of the bf16 peak
        "similarity_flops": spec["fp32_tflops"] * 1e12 * 0.5,  # 1 s of fp32 compute
        "similarity_pair_bytes": 3 * spec["hbm_tbps"] * 1e12 * 0.5,  # 3 s of memory traffic: the bound
    }
    estimate = bench.gpu_estimate(row, "H100", 0.5)
    assert (estimate["encode_s"], estimate["similarity_s"], estimate["total_s"]) == (2.0, 3.0, 5.0)


@pytest.mark.parametrize(
    ("name", "key"),
    [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200")],
)
def test_device_names_find_their_peak_figures(name, key):
    assert bench.gpu_spec(name)[0] == key
    with pytest.raises(KeyError, match="no peak figures"):
        bench.gpu_spec("NVIDIA GeForce GTX 1080")


def test_flops_are_counted_alike_on_the_attention_fast_path():
    import torch

    model = bench.MODELS["micro"](False)
    frames = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()
        training = bench.count_flops(lambda: model.clip.visual(frames))
        model.eval()  # eval + no_grad would take nn.MultiheadAttention's fused fast path
        inference = bench.count_flops(lambda: model.clip.visual(frames))
    assert inference == training > 0
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on (a plain count in eval mode gives 561,152
    # FLOPs here instead of 643,072: the fused attention op is not counted)


def test_inputs_longer_than_the_tiny_defaults_get_longer_position_tables(tmp_path, monkeypatch):
    # ActivityNet's 64 words x 64 frames exceed the micro/tiny model's 32-token context and 32 frame positions
    monkeypatch.setitem(bench.SIZES, "long", (6, 5, 40, 36))
    row = bench.main(["--size", "long", *SMOKE[2:], "--out", str(tmp_path / "eval.jsonl")])
    assert (row["words"], row["frames"]) == (40, 36) and row["encode_video_s"] > 0
