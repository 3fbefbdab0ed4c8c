"""Training-step throughput (clips/s) and peak memory of the full model on synthetic tensors (no data loading).

    python scripts/bench_train_step.py --model tiny --batch 64 --frames 8
    python scripts/bench_train_step.py --model tiny --batch 64 --frames 8 --loss neighborretr   # with its memory bank
    python scripts/bench_train_step.py --model vit_b32 --batch 32 --frames 12 --precision bf16   # on a GPU

Each run appends one JSON line (settings, machine, clips/s, peak memory) to benchmarks/train_step.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator

from neighborretr.models.builders import open_clip_model, tiny
from neighborretr.objectives import InfoNCEObjective, NeighborRetrObjective
from neighborretr.optim import create_optimizer
from neighborretr.train_step import TrainStep, backward_step

MODELS = {
    "tiny": lambda high_level: tiny(high_level=high_level),
    "vit_b32": lambda high_level: open_clip_model("ViT-B-32", high_level=high_level),
    "vit_b16": lambda high_level: open_clip_model("ViT-B-16", high_level=high_level),
}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux reports KiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--words", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--loss", choices=["infonce", "neighborretr"], default="infonce")
    parser.add_argument("--memory-size", type=int, default=512, help="NeighborRetr's bank capacity (default: 512)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/train_step.jsonl"))
    args = parser.parse_args()

    accelerator = Accelerator(mixed_precision=args.precision, cpu=args.cpu)
    torch.manual_seed(0)
    model = MODELS[args.model](args.loss == "neighborretr")
    objective = InfoNCEObjective() if args.loss == "infonce" else NeighborRetrObjective(memory_size=args.memory_size)
    optimizer = create_optimizer(model, "adamw", lr=1e-4)
    train_step, optimizer = accelerator.prepare(TrainStep(model, objective), optimizer)
    size, device, dim = model.image_size, accelerator.device, model.embed_dim
    batch = {
        "text_ids": torch.randint(1, 49000, (args.batch, args.words), device=device),
        "text_mask": torch.ones(args.batch, args.words, dtype=torch.long, device=device),
        "video": torch.randn(args.batch, args.frames, 3, size, size, device=device),
        "video_mask": torch.ones(args.batch, args.frames, dtype=torch.long, device=device),
        "caption_index": torch.arange(args.batch, device=device),
    }
    if args.loss == "neighborretr":  # a full bank, as after the refill at the start of an epoch
        bank = {
            "text": torch.randn(args.memory_size, args.words, dim, device=device),
            "text_mask": torch.ones(args.memory_size, args.words, dtype=torch.long, device=device),
            "video": torch.randn(args.memory_size, args.frames, dim, device=device),
            "video_mask": torch.ones(args.memory_size, args.frames, dtype=torch.long, device=device),
        }
        objective.to(device).refill([(bank, torch.arange(args.memory_size, device=device))])

    def step() -> float:
        losses, gathered = backward_step(accelerator, train_step, batch, args.grad_accum)
        objective.update(gathered, gathered["caption_index"])
        accelerator.clip_grad_norm_(train_step.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return losses["loss"].item()  # .item() synchronises, so the timer sees finished work

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - tic) / args.steps
    row = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "batch": args.batch,
        "frames": args.frames,
        "words": args.words,
        "image_size": size,
        "precision": args.precision,
        "loss": args.loss,
        "grad_accum": args.grad_accum,
        "machine": machine(device),
        "torch": torch.__version__,
        "s_per_step": round(seconds, 4),
        "clips_per_s": round(args.batch / seconds, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
