"""One-GPU measurement in one command (issue 12 item 7), within about 8 minutes on an H100/H200:

    python scripts/gpu_check.py                      # on a machine with one GPU; writes the two results files
    python scripts/gpu_check.py --reduced --cpu      # the same code path on CPU with the micro model (a smoke test)

Parts, in this order (each one's wall time is recorded; a part that would start after --budget-s is skipped and
says so, and a part that fails records its error instead of stopping the others):

1. train: the ViT-B/32 NeighborRetr step (random weights, 12 frames, 24 words, memory bank of 512 filled, BertAdam
   as the paper) at per-GPU batch 32 and 128 in bf16: clips/s, peak memory, and the MFU of the vision tower =
   3 x (its forward FLOPs per frame, counted by FlopCounterMode) x frames x clips/s / the device's dense bf16 peak
   (3 x forward approximates forward + backward; the frozen patch embedding has no weight gradient, so this
   slightly overstates the work). The InfoNCE step and the phase breakdown at batch 32 come with it.
2. eval: MSR-VTT 1k-A size (1,000 x 1,000, 24 words x 12 frames): encoding every caption and clip (bf16) and the
   chunked similarity (fp32), measured in full.
3. loader: clips/s of the training loader with 16 workers from prepared videos and from the frame cache, using
   scripts/bench_dataloader.py's functions (generated MSR-VTT-like clips; see that script). A loader that the
   installed code does not offer is reported as not available.
4. compile: the compiled towers (inductor) against eager on one NeighborRetr step: loss difference and speed.

--reduced keeps every part's code path at toy sizes (micro model, batch 22, 2 frames, no loader videos unless
--loader-videos is given, aot_eager instead of inductor); its figures are not measurements.

Writes --out (JSON, default benchmarks/gpu_check.json) and --table (markdown, default docs/results/gpu_check.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import bench_eval
import bench_train_step
import torch
from accelerate import Accelerator

FULL = {
    "model": "vit_b32",
    "batches": [32, 128],
    "frames": 12,
    "words": 24,
    "memory_size": 512,
    "steps": 10,
    "warmup": 3,
    "precision": "bf16",
    "eval_size": "msrvtt",
    "eval_chunk": 256,
    "encode_batch": 64,
    "loader_videos": 64,
    "loader_workers": 16,
    "loader_batch": 32,
    "compile_backend": "inductor",
    "breakdown_steps": 3,
}
REDUCED = FULL | {
    "model": "micro",
    "batches": [22],  # the smallest batch NeighborRetr's 20 neighbours allow
    "frames": 2,
    "words": 6,
    "memory_size": 8,
    "steps": 1,
    "warmup": 0,
    "precision": "no",
    "eval_size": "smoke",
    "eval_chunk": 16,
    "encode_batch": 8,
    "loader_videos": 0,  # generating and decoding clips takes a minute on a small CPU; --loader-videos 2 runs it
    "loader_workers": 1,
    "loader_batch": 2,
    "compile_backend": "aot_eager",  # inductor's code generation takes minutes on a small CPU
    "breakdown_steps": 1,
}


def vision_flops_per_frame(model: torch.nn.Module, device: torch.device) -> float:
    """Forward FLOPs of the vision tower (CLIP's image encoder) for one frame."""
    frame = torch.randn(1, 3, model.image_size, model.image_size, device=device)
    with torch.no_grad():
        return bench_eval.count_flops(lambda: model.clip.visual(frame))


def peak_bf16_flops(device: torch.device) -> tuple[str | None, float | None]:
    """(device key, dense bf16 FLOP/s) from bench_eval.GPU_SPECS; (None, None) on CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None, None
    try:
        key, spec = bench_eval.gpu_spec(torch.cuda.get_device_name(device))
    except KeyError:
        return None, None
    return key, spec["bf16_tflops"] * 1e12


def train_part(settings: dict, accelerator: Accelerator) -> dict:
    device = accelerator.device
    key, peak = peak_bf16_flops(device)
    rows = []
    for batch in settings["batches"]:
        losses = ("neighborretr", "infonce") if batch == settings["batches"][0] else ("neighborretr",)
        for loss in losses:
            args = bench_train_step.parse_args(
                [
                    *("--model", settings["model"], "--batch", str(batch), "--frames", str(settings["frames"])),
                    *("--words", str(settings["words"]), "--memory-size", str(settings["memory_size"])),
                    *("--precision", settings["precision"]),
                ]
            )
            bench = bench_train_step.Bench(args, loss, accelerator)
            seconds = bench_train_step.measure(bench, settings["steps"], settings["warmup"])
            peak_mb = bench_train_step.peak_memory_mb(device)
            clips = batch / seconds
            flops = 3 * vision_flops_per_frame(bench.model, device) * settings["frames"] * clips
            rows.append(
                {
                    "loss": loss,
                    "batch": batch,
                    "clips_per_s": round(clips, 2),
                    "s_per_step": round(seconds, 4),
                    "peak_memory_mb": round(peak_mb, 1),
                    "vision_tflops_per_s": round(flops / 1e12, 3),
                    "vision_mfu": round(flops / peak, 4) if peak else None,
                    "phases_ms": (
                        bench_train_step.breakdown(bench, settings["breakdown_steps"])
                        if batch == settings["batches"][0]
                        else None
                    ),
                }
            )
            del bench
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"peak_reference": f"{key} dense bf16" if key else "none (CPU or unlisted GPU)", "rows": rows}


def eval_part(settings: dict, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = bench_train_step.MODELS[settings["model"]](False).to(device).eval()
    size = bench_eval.SIZES[settings["eval_size"]]
    row = bench_eval.similarity_part(model, size, settings["eval_chunk"], None, device)
    # Every caption and clip is encoded: nothing is extrapolated.
    row |= bench_eval.encode_part(model, size, max(size[:2]), settings["encode_batch"], device)
    row["total_s"] = round(row["similarity_s"] + row["encode_text_s"] + row["encode_video_s"], 3)
    return {"size": settings["eval_size"], "captions": size[0], "videos": size[1], **row}


def loader_part(settings: dict, folder: Path, cache_loader: str, video_loader: str) -> dict:
    """Clips/s from prepared videos and from the frame cache with bench_dataloader's generator and timer."""
    if settings["loader_videos"] < 1:
        return {"skipped": "loader_videos is 0"}
    import bench_dataloader as loaders

    from neighborretr.data.annotations import Record
    from neighborretr.data.prepare import prepare_folder

    cores = os.cpu_count() or 1
    raw = loaders.generate(folder / "raw", settings["loader_videos"], cores)
    prepared = folder / "prepared"
    summary = prepare_folder(folder / "raw", prepared, fps=3, short_side=224, workers=cores)
    if summary.failed:
        raise RuntimeError(f"preparing the loader videos failed: {summary.failed}")
    records = [Record(p.stem, f"caption {k} of clip {p.stem}") for p in raw for k in range(2)]
    out = {"videos": len(raw), "records": len(records), "workers": settings["loader_workers"]}
    for label, name in (("prepared", video_loader), ("cache", cache_loader)):
        try:
            dataset = loaders.loader_dataset(name, records, prepared)
            rate, _ = loaders.clips_per_second(dataset, settings["loader_workers"], settings["loader_batch"])
            out[label] = {"loader": name, "clips_per_s": round(rate, 2)}
        except Exception as err:  # a loader this checkout lacks (e.g. no frame cache yet) must not stop the check
            out[label] = {"loader": name, "not_available": f"{type(err).__name__}: {err}"}
    return out


def compile_part(settings: dict, accelerator: Accelerator) -> dict:
    """One NeighborRetr step's loss, eager and with the towers compiled, on the same weights and batch."""
    batch = settings["batches"][0]
    argv = ["--model", settings["model"], "--batch", str(batch), "--frames", str(settings["frames"])]
    argv += ["--words", str(settings["words"]), "--memory-size", str(settings["memory_size"])]
    result = {}
    for compiled in (False, True):
        args = bench_train_step.parse_args(argv + ["--compile-backend", settings["compile_backend"]])
        args.compile = compiled
        bench = bench_train_step.Bench(args, "neighborretr", accelerator)
        with torch.no_grad():
            losses, _ = bench.step_module(bench.batch)
        tic = time.perf_counter()
        bench.step()  # the first compiled step compiles
        first = time.perf_counter() - tic
        seconds = bench_train_step.measure(bench, settings["steps"], 1)
        result["compiled" if compiled else "eager"] = {
            "loss": float(losses["loss"]),
            "first_step_s": round(first, 2),
            "s_per_step": round(seconds, 4),
        }
    result["loss_abs_diff"] = abs(result["compiled"]["loss"] - result["eager"]["loss"])
    return result


def timed_part(results: dict, name: str, fn: Callable[[], dict], start: float, budget: float) -> None:
    if time.perf_counter() - start > budget:
        results[name] = {"skipped": f"the time budget of {budget:.0f} s was spent before this part"}
        return
    tic = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # one broken part must not cost the others' figures
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=5)}
    results[name]["wall_s"] = round(time.perf_counter() - tic, 1)


def markdown(results: dict) -> str:
    lines = [f"# GPU check ({results['machine']}, {results['date']})", ""]
    lines += [f"Mode: {results['mode']}; torch {results['torch']}. Produced by `{results['command']}`.", ""]
    train = results.get("train", {})
    if "rows" in train:
        lines += [
            f"## Training step ({results['settings']['model']}, {results['settings']['frames']} frames, "
            f"{results['settings']['precision']}; MFU against {train['peak_reference']})",
            "",
            "| loss | per-GPU batch | clips/s | s/step | peak memory (MiB) | vision TFLOP/s | vision MFU |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in train["rows"]:
            lines.append(
                f"| {r['loss']} | {r['batch']} | {r['clips_per_s']} | {r['s_per_step']} | {r['peak_memory_mb']} | "
                f"{r['vision_tflops_per_s']} | {r['vision_mfu'] if r['vision_mfu'] is not None else 'n/a'} |"
            )
        lines.append("")
    for name in ("train", "eval", "loader", "compile"):
        part = {k: v for k, v in results.get(name, {}).items() if k not in ("rows", "traceback")}
        lines.append(f"- {name}: `{json.dumps(part)}`")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="micro model and tiny sizes (a smoke test on CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU exists")
    parser.add_argument("--parts", nargs="+", default=["train", "eval", "loader", "compile"])
    parser.add_argument("--budget-s", type=float, default=420.0, help="no part starts after this many seconds")
    parser.add_argument("--loader-videos", type=int, default=None, help="generated clips (0 skips the loader part)")
    parser.add_argument("--loader-folder", type=Path, default=Path("data/bench_videos/gpu_check"))
    parser.add_argument("--video-loader", default="ours-decord", help="bench_dataloader loader for prepared videos")
    parser.add_argument("--cache-loader", default="ours-cache", help="bench_dataloader loader for the frame cache")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/gpu_check.json"))
    parser.add_argument("--table", type=Path, default=Path("docs/results/gpu_check.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = dict(REDUCED if args.reduced else FULL)
    if args.loader_videos is not None:
        settings["loader_videos"] = args.loader_videos
    accelerator = Accelerator(mixed_precision=settings["precision"], cpu=args.cpu)
    device = accelerator.device
    start = time.perf_counter()
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": bench_train_step.machine(device),
        "torch": torch.__version__,
        "mode": "reduced (smoke test, not a measurement)" if args.reduced else "full",
        "command": "python scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings,
    }
    parts = {
        "train": lambda: train_part(settings, accelerator),
        "eval": lambda: eval_part(settings, device),
        "loader": lambda: loader_part(settings, args.loader_folder, args.cache_loader, args.video_loader),
        "compile": lambda: compile_part(settings, accelerator),
    }
    for name in args.parts:
        timed_part(results, name, parts[name], start, args.budget_s)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "traceback"}), flush=True)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    for path, text in ((args.out, json.dumps(results, indent=1)), (args.table, markdown(results))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("\n" if not text.endswith("\n") else ""))
    return results


if __name__ == "__main__":
    main()
