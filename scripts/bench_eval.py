"""Evaluation speed on random inputs: encoding (both towers) and the chunked token-wise similarity at MSR-VTT 1k-A
size (1,000 x 1,000, 24 words x 12 frames) and ActivityNet size (4,917 x 4,917, 64 words x 64 frames), with the
tiny or the ViT-B/32 model (random weights), plus a GPU estimate from the FLOP and byte counts.

    python scripts/bench_eval.py --size msrvtt --model tiny
    python scripts/bench_eval.py --size msrvtt --model vit_b32
    python scripts/bench_eval.py --size activitynet --model vit_b32 --row-blocks 2   # similarity of 2 x 256 rows

Similarity: `RetrievalModel.chunked_similarity` (what evaluation calls) on random token features with random
padding; `--row-blocks K` times the first K x chunk texts against every video and extrapolates to all rows
(`similarity_extrapolated: true`). `--compare-reference` also times one block with the direct pair-mask formula
that the GEMM path replaced and reports the agreement and the speed-up. Encoding: `--encode-items` captions and
clips are encoded and the time is extrapolated to the split (always labelled). The GPU figures are estimates,
never measurements: FLOPs / (peak x efficiency) or bytes / (bandwidth x efficiency), whichever is longer.

Each run appends one JSON line to --out (default benchmarks/eval_speed.jsonl).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from bench_train_step import MODELS, machine, synchronize
from torch.utils.flop_counter import FlopCounterMode

from neighborretr.models.similarity import ScoredTokens, score_tokens

SIZES = {  # (captions, videos, words, frames) of each test split
    "msrvtt": (1000, 1000, 24, 12),
    "activitynet": (4917, 4917, 64, 64),
    "smoke": (40, 30, 8, 4),
}
# Vendor datasheet figures, dense (no sparsity): TFLOP/s for bf16 and fp32 (non-tensor-core), HBM TB/s.
GPU_SPECS = {
    "H200": {"bf16_tflops": 989.4, "fp32_tflops": 66.9, "hbm_tbps": 4.8},
    "H100 PCIe": {"bf16_tflops": 756.5, "fp32_tflops": 51.2, "hbm_tbps": 2.0},
    "H100": {"bf16_tflops": 989.4, "fp32_tflops": 66.9, "hbm_tbps": 3.35},  # SXM5
    "A100": {"bf16_tflops": 312.0, "fp32_tflops": 19.5, "hbm_tbps": 2.039},  # SXM 80 GB
}


def gpu_spec(name: str) -> tuple[str, dict[str, float]]:
    """The GPU_SPECS entry whose key occurs in a device name (the longest match), e.g. "NVIDIA H100 PCIe"."""
    for key in sorted(GPU_SPECS, key=len, reverse=True):
        if key in name:
            return key, GPU_SPECS[key]
    raise KeyError(f"no peak figures for {name!r}; add it to GPU_SPECS")


def random_features(n: int, length: int, dim: int, seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """[n, length, dim] features and a [n, length] mask whose valid prefix has a random length in [length/4, length]."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, length, dim, generator=g)
    valid = torch.randint(max(1, length // 4), length + 1, (n, 1), generator=g)
    mask = (torch.arange(length)[None] < valid).long()
    return features.to(device), mask.to(device)


def pair_mask_similarity(text: ScoredTokens, video: ScoredTokens, text_mask, video_mask) -> torch.Tensor:
    """The direct formula the GEMM path replaced: the [Bt, Bv, L, N] pair tensor times the pair mask."""
    pair = torch.einsum("ald,bnd->abln", text.tokens, video.tokens)
    pair = pair * torch.einsum("al,bn->abln", text_mask.to(pair.dtype), video_mask.to(pair.dtype))
    t2v = torch.einsum("abl,al->ab", pair.max(dim=-1).values, text.weights)
    v2t = torch.einsum("abn,bn->ab", pair.max(dim=-2).values, video.weights)
    return (t2v + v2t) / 2


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of `fn()` counted by FlopCounterMode. `nn.MultiheadAttention`'s inference fast path is one fused op
    the counter does not know (it would drop every attention projection, a third of a ViT's FLOPs), so the fast
    path is off while counting: the same maths, counted op by op."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    return float(counter.get_total_flops())


def timed(fn, device: torch.device) -> tuple[object, float]:
    synchronize(device)
    tic = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - tic


@torch.inference_mode()
def similarity_part(model, size: tuple, chunk: int, row_blocks: int | None, device: torch.device) -> dict:
    captions, videos, words, frames = size
    text, text_mask = random_features(captions, words, model.embed_dim, 0, device)
    video, video_mask = random_features(videos, frames, model.embed_dim, 1, device)
    rows = captions if row_blocks is None else min(captions, row_blocks * chunk)
    model.chunked_similarity(text[:chunk], text_mask[:chunk], video[:chunk], video_mask[:chunk], chunk)  # warm-up
    sims, seconds = timed(
        lambda: model.chunked_similarity(text[:rows], text_mask[:rows], video, video_mask, chunk), device
    )
    assert sims.shape == (rows, videos) and torch.isfinite(sims).all()
    flops = 2 * captions * videos * words * frames * model.embed_dim  # the GEMM; the maxima are O(pairs)
    pair_bytes = 3 * 4 * captions * videos * words * frames  # fp32 pair scores written once, read by two maxima
    return {
        "similarity_s": round(seconds * captions / rows, 3),
        "similarity_extrapolated": rows < captions,
        "similarity_rows_timed": rows,
        "similarity_flops": flops,
        "similarity_pair_bytes": pair_bytes,
        "similarity_cpu_gflops": round(flops * rows / captions / seconds / 1e9, 2) if device.type == "cpu" else None,
    }


@torch.inference_mode()
def reference_part(model, size: tuple, chunk: int, device: torch.device) -> dict:
    """One chunk x chunk block by the GEMM path and by the pair-mask formula: agreement and speed-up."""
    _, _, words, frames = size
    text, text_mask = random_features(chunk, words, model.embed_dim, 2, device)
    video, video_mask = random_features(chunk, frames, model.embed_dim, 3, device)
    head = model.sim_head
    texts, vids = head.prepare_text(text, text_mask), head.prepare_video(video, video_mask)
    fast, fast_s = timed(lambda: score_tokens(texts, vids), device)
    slow, slow_s = timed(lambda: pair_mask_similarity(texts, vids, text_mask, video_mask), device)
    return {
        "block_s_gemm": round(fast_s, 4),
        "block_s_pair_mask": round(slow_s, 4),
        "block_speedup": round(slow_s / fast_s, 2),
        "block_max_abs_diff": float((fast - slow).abs().max()),
    }


@torch.inference_mode()
def encode_part(model, size: tuple, items: int, batch: int, device: torch.device) -> dict:
    """Encoder time for `items` captions and clips, extrapolated to the split, and FLOPs per caption and clip."""
    captions, videos, words, frames = size
    px = model.image_size
    ids = torch.randint(1, 49000, (batch, words), device=device)
    text_mask = torch.ones(batch, words, dtype=torch.long, device=device)
    clips = torch.randn(batch, frames, 3, px, px, device=device)
    video_mask = torch.ones(batch, frames, dtype=torch.long, device=device)
    counts = {}
    encoders = {
        "text": lambda: model.encode_text(ids, text_mask),
        "video": lambda: model.encode_video(clips, video_mask),
    }
    for name, fn in encoders.items():
        counts[name] = count_flops(fn) / batch
        fn()  # warm-up on the fast path
    steps = max(1, items // batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # as evaluation on a GPU
        _, text_s = timed(lambda: [model.encode_text(ids, text_mask) for _ in range(steps)], device)
        _, video_s = timed(lambda: [model.encode_video(clips, video_mask) for _ in range(steps)], device)
    return {
        "encode_text_s": round(text_s / (steps * batch) * captions, 2),
        "encode_video_s": round(video_s / (steps * batch) * videos, 2),
        "encode_extrapolated_from_items": steps * batch,
        "encode_flops": round(counts["text"] * captions + counts["video"] * videos),
        "encode_flops_per_clip": round(counts["video"]),
    }


def gpu_estimate(row: dict, gpu: str, efficiency: float) -> dict:
    """Seconds on `gpu` at `efficiency` of its peak: encoding in bf16 (autocast), the similarity in fp32 (the
    scores are computed outside autocast), each bounded by FLOPs or memory traffic, whichever is slower."""
    spec = GPU_SPECS[gpu]
    encode = row["encode_flops"] / (spec["bf16_tflops"] * 1e12 * efficiency)
    sim_compute = row["similarity_flops"] / (spec["fp32_tflops"] * 1e12 * efficiency)
    sim_memory = row["similarity_pair_bytes"] / (spec["hbm_tbps"] * 1e12 * efficiency)
    return {
        "gpu": gpu,
        "efficiency": efficiency,
        "encode_s": round(encode, 4),
        "similarity_s": round(max(sim_compute, sim_memory), 4),
        "total_s": round(encode + max(sim_compute, sim_memory), 4),
        "note": "estimate from FLOP/byte counts and datasheet peaks, not a measurement; video decoding not included",
    }


def markdown(rows: list[dict]) -> str:
    """One line per run: measured CPU seconds (extrapolations marked ~) and the labelled GPU estimate."""
    lines = [
        "| machine | size | model | similarity (s) | encode text (s) | encode video (s) | total (s) | "
        "GEMM vs pair-mask block | GPU estimate (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sim = f"{'~' if r['similarity_extrapolated'] else ''}{r['similarity_s']}"
        speedup = f"{r['block_speedup']}x" if "block_speedup" in r else "-"
        gpu = r["gpu_estimate"]
        lines.append(
            f"| {r['machine']} | {r['size']} {r['captions']}x{r['videos']}, {r['words']}x{r['frames']} | "
            f"{r['model']} | {sim} | ~{r['encode_text_s']} | ~{r['encode_video_s']} | ~{r['total_s']} | {speedup} | "
            f"{gpu['total_s']} on {gpu['gpu']} at {gpu['efficiency']:.0%} of peak (estimate) |"
        )
    return "\n".join(lines) + "\n\n~: extrapolated from the rows or items actually timed (see the JSON line).\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="msrvtt")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--chunk", type=int, default=256, help="eval.chunk_size (default 256)")
    parser.add_argument("--row-blocks", type=int, default=None, help="time only this many row blocks, extrapolate")
    parser.add_argument("--compare-reference", action="store_true", help="time one block by the pair-mask formula")
    parser.add_argument("--encode-items", type=int, default=64, help="captions and clips actually encoded")
    parser.add_argument("--encode-batch", type=int, default=16)
    parser.add_argument("--gpu", choices=sorted(GPU_SPECS), default="H100", help="device of the GPU estimate")
    parser.add_argument("--efficiency", type=float, default=0.5, help="fraction of peak assumed for the estimate")
    parser.add_argument("--device", default="cpu", help="where to run (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/eval_speed.jsonl"))
    parser.add_argument("--table", type=Path, default=None, help="also write the table of every row of --out here")
    return parser.parse_args(argv)


TABLE_HEADER = """# Evaluation speed (encoding and token-wise similarity)

Written by `scripts/bench_eval.py ... --table docs/results/eval_speed.md` from every row of
`benchmarks/eval_speed.jsonl`. Random inputs and random-weight models; video decoding is not included. Commands:

    python scripts/bench_eval.py --size msrvtt --model tiny --compare-reference \\
        --table docs/results/eval_speed.md
    python scripts/bench_eval.py --size msrvtt --model vit_b32 --compare-reference \\
        --table docs/results/eval_speed.md
    python scripts/bench_eval.py --size activitynet --model tiny --row-blocks 4 \\
        --table docs/results/eval_speed.md
    python scripts/bench_eval.py --size activitynet --model vit_b32 --row-blocks 2 \\
        --compare-reference --encode-items 16 --encode-batch 8 \\
        --table docs/results/eval_speed.md

The GPU column is an estimate from FLOP and byte counts at 50% of the datasheet peaks, never a measurement; the
measured GPU figure for 1k x 1k comes from `scripts/gpu_check.py`. Each row's date and machine are in its JSON line.

"""


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    size = SIZES[args.size]
    # the tiny models default to 32 words and 32 frames; ActivityNet's 64 x 64 needs longer position tables
    sizes = (
        {"context_length": max(32, size[2]), "max_frames": max(32, size[3])} if args.model in ("micro", "tiny") else {}
    )
    model = MODELS[args.model](False, **sizes).to(device).eval()
    row = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size": args.size,
        "captions": size[0],
        "videos": size[1],
        "words": size[2],
        "frames": size[3],
        "model": args.model,
        "embed_dim": model.embed_dim,
        "chunk": args.chunk,
        "machine": machine(device),
        "torch": torch.__version__,
    }
    row |= similarity_part(model, size, args.chunk, args.row_blocks, device)
    if args.compare_reference:
        row |= reference_part(model, size, args.chunk, device)
    row |= encode_part(model, size, args.encode_items, args.encode_batch, device)
    row["total_s"] = round(row["similarity_s"] + row["encode_text_s"] + row["encode_video_s"], 2)
    row["gpu_estimate"] = gpu_estimate(row, args.gpu, args.efficiency)
    print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        every_row = [json.loads(line) for line in args.out.read_text().splitlines() if line]
        args.table.write_text(TABLE_HEADER + markdown(every_row))
    return row


if __name__ == "__main__":
    main()
