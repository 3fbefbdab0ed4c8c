"""Training-step throughput (clips/s), peak memory and where the time goes, for InfoNCE and the full NeighborRetr
step (token merging, all four terms, the bank scoring against `memory_size` entries, the optimiser), on synthetic
tensors (no data loading).

    python scripts/bench_train_step.py --model tiny --batch 64 --frames 12 --words 24               # CPU, both losses
    python scripts/bench_train_step.py --model vit_b32 --batch 32 --frames 12 --words 24 --precision bf16  # a GPU

`--loss both` (default) runs InfoNCE and NeighborRetr one after the other with the same settings. Each loss is
measured twice: `--steps` plain steps (throughput: nothing but the final `.item()` synchronises), then
`--breakdown-steps` instrumented steps in which every phase is bracketed by synchronisation points, so the
phases add up to the step (their sum is slower than a plain step on a GPU, where phases would overlap):

    forward:  text encoder, video encoder (CLIP + temporal), token merging (high level), global head,
              similarity (the batch's token-wise scores), bank scoring (bank read + [M, B] and [B, M] scores),
              loss terms (the rest of the objective: Sinkhorn, neighbour weights, cross-entropies)
    backward: loss/heads/bank (until the encoder outputs have their gradients), encoders (the rest)
    update:   gradient clipping, optimiser, memory-bank update

The breakdown is taken with --grad-accum 1 only (with accumulation no phase would hold the heads' backward).

Each loss appends one JSON line (settings, machine, clips/s, peak memory, phases in ms and share) to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator

from neighborretr.models.builders import open_clip_model, tiny
from neighborretr.models.similarity import score_tokens
from neighborretr.objectives import InfoNCEObjective, NeighborRetrObjective
from neighborretr.optim import create_optimizer
from neighborretr.train_step import TrainStep, backward_step

MODELS = {
    # micro: the smallest model that builds, for smoke runs and tests of the scripts themselves
    "micro": lambda high_level, **sizes: tiny(
        image_size=32,
        patch_size=16,
        width=32,
        embed_dim=32,
        heads=2,
        layers=1,
        temporal_layers=1,
        high_level=high_level,
        **sizes,
    ),
    # **sizes: context_length / max_frames for inputs longer than the tiny defaults (32 words, 32 frames)
    "tiny": lambda high_level, **sizes: tiny(high_level=high_level, **sizes),
    "vit_b32": lambda high_level: open_clip_model("ViT-B-32", high_level=high_level),
    "vit_b16": lambda high_level: open_clip_model("ViT-B-16", high_level=high_level),
}
PHASES = (
    "text encoder",
    "video encoder",
    "token merging",
    "global head",
    "similarity",
    "bank scoring",
    "loss terms",
    "backward: loss, heads, bank",
    "backward: encoders",
    "grad clip",
    "optimiser",
    "bank update",
)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux reports KiB)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so a host clock read after it covers that work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(batch: int, words: int, frames: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids and frames in the loader's batch format, every token and frame valid."""
    return {
        "text_ids": torch.randint(1, 49000, (batch, words), device=device),
        "text_mask": torch.ones(batch, words, dtype=torch.long, device=device),
        "video": torch.randn(batch, frames, 3, size, size, device=device),
        "video_mask": torch.ones(batch, frames, dtype=torch.long, device=device),
        "caption_index": torch.arange(batch, device=device),
    }


def full_bank(memory_size: int, words: int, frames: int, dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random bank contents of `memory_size` items, as after the refill at the start of an epoch."""
    return {
        "text": torch.randn(memory_size, words, dim, device=device),
        "text_mask": torch.ones(memory_size, words, dtype=torch.long, device=device),
        "video": torch.randn(memory_size, frames, dim, device=device),
        "video_mask": torch.ones(memory_size, frames, dtype=torch.long, device=device),
    }


class Bench:
    """The recipe's objects for one loss (model, objective with its bank, optimiser, prepared TrainStep) and one
    optimiser step on a fixed synthetic batch."""

    def __init__(self, args: argparse.Namespace, loss: str, accelerator: Accelerator):
        self.accelerator, self.args, self.device = accelerator, args, accelerator.device
        torch.manual_seed(0)
        self.model = MODELS[args.model](loss == "neighborretr")
        if args.compile:
            self.model.compile_encoders(args.compile_backend)
        if loss == "infonce":
            self.objective = InfoNCEObjective()
        else:
            self.objective = NeighborRetrObjective(memory_size=args.memory_size)
        optimizer = create_optimizer(
            self.model, args.optimizer, lr=1e-4, foreach=not args.no_foreach, fused=args.fused or None
        )
        self.step_module, self.optimizer = accelerator.prepare(TrainStep(self.model, self.objective), optimizer)
        self.batch = synthetic_batch(args.batch, args.words, args.frames, self.model.image_size, self.device)
        if loss == "neighborretr":
            bank = full_bank(args.memory_size, args.words, args.frames, self.model.embed_dim, self.device)
            self.objective.to(self.device).refill([(bank, torch.arange(args.memory_size, device=self.device))])

    def step(self, phase: Callable[[str], object] | None = None) -> float:
        """One optimiser step; `phase(name)` (a context manager factory) brackets the update's parts."""
        phase = phase or (lambda name: _nothing())
        losses, gathered = backward_step(self.accelerator, self.step_module, self.batch, self.args.grad_accum)
        with phase("grad clip"):
            self.accelerator.clip_grad_norm_(self.step_module.parameters(), 1.0)
        with phase("optimiser"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with phase("bank update"):
            self.objective.update(gathered, gathered["caption_index"])
        return losses["loss"].item()  # .item() synchronises, so the timer sees finished work


@contextmanager
def _nothing():
    yield


class PhaseTimer:
    """Accumulates wall time per phase, with a device synchronisation at both ends of every phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = defaultdict(float)
        self.nested = 0.0  # time of phases that ran inside the objective's forward (subtracted from it)

    @contextmanager
    def __call__(self, name: str, inside_objective: bool = False):
        synchronize(self.device)
        tic = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            elapsed = (time.perf_counter() - tic) * 1000
            self.ms[name] += elapsed
            if inside_objective:
                self.nested += elapsed

    def wrap(self, name: str, fn: Callable, inside_objective: bool = False) -> Callable:
        def timed(*args, **kwargs):
            with self(name, inside_objective):
                return fn(*args, **kwargs)

        return timed


def instrument(bench: Bench, timer: PhaseTimer) -> Callable[[], None]:
    """Times the phases of `bench`'s step by wrapping the model's and the objective's methods on the instances;
    returns a function that removes the wrappers. The backward is split by gradient hooks on the encoder outputs.
    """
    model, objective, device = bench.model, bench.objective, bench.device
    patched: dict[object, dict[str, object]] = defaultdict(dict)  # owner -> {name: what its __dict__ held}

    def patch(owner, name, replacement):
        patched[owner][name] = owner.__dict__.get(name)
        setattr(owner, name, replacement)

    backward = {}

    def hooked_encoder(name: str, fn: Callable) -> Callable:
        def encode(*args, **kwargs):
            out = timer.wrap(name, fn)(*args, **kwargs)
            if out.requires_grad:
                out.register_hook(lambda grad: _stamp(backward, device))
            return out

        return encode

    patch(model, "encode_text", hooked_encoder("text encoder", model.encode_text))
    patch(model, "encode_video", hooked_encoder("video encoder", model.encode_video))
    patch(model, "similarity", timer.wrap("similarity", model.similarity, True))
    if model.high_level:
        patch(model, "global_tokens", timer.wrap("token merging", model.global_tokens, True))
        patch(model, "global_similarity", timer.wrap("global head", model.global_similarity, True))
        patch(model, "global_vectors", timer.wrap("global head", model.global_vectors, True))
        patch(model, "similarity_with_bank", timed_similarity_with_bank(model, timer))
    if getattr(objective, "bank", None) is not None:
        patch(objective.bank, "get", timer.wrap("bank scoring", objective.bank.get, True))
    patch(objective, "forward", timer.wrap("objective", objective.forward))

    original_backward = bench.accelerator.backward

    def timed_backward(loss, **kwargs):
        synchronize(device)
        tic = time.perf_counter()
        backward.clear()
        original_backward(loss, **kwargs)
        synchronize(device)
        end = time.perf_counter()
        split = backward.get("first", end)  # the first encoder output to receive its gradient
        timer.ms["backward: loss, heads, bank"] += (split - tic) * 1000
        timer.ms["backward: encoders"] += (end - split) * 1000

    patch(bench.accelerator, "backward", timed_backward)

    def restore():
        for owner, names in patched.items():
            for name, value in names.items():
                if value is None:
                    owner.__dict__.pop(name, None)  # the class's method shows through again
                else:
                    setattr(owner, name, value)

    return restore


def _stamp(backward: dict, device: torch.device) -> None:
    synchronize(device)
    backward.setdefault("first", time.perf_counter())


def timed_similarity_with_bank(model, timer: PhaseTimer) -> Callable:
    """`RetrievalModel.similarity_with_bank` step by step, timing the batch's scores apart from the bank's
    (tests/unit/test_bench_train_step.py checks that it returns the library method's values)."""

    def similarity_with_bank(text, text_mask, video, video_mask, bank):
        head = model.sim_head
        with timer("similarity", True):
            texts, videos = head.prepare_text(text, text_mask), head.prepare_video(video, video_mask)
            sim = score_tokens(texts, videos)
        with timer("bank scoring", True):
            bank_texts = head.prepare_text(bank["text"], bank["text_mask"])
            bank_videos = head.prepare_video(bank["video"], bank["video_mask"])
            return sim, score_tokens(bank_texts, videos), score_tokens(texts, bank_videos)

    return similarity_with_bank


def breakdown(bench: Bench, steps: int) -> dict[str, float]:
    """Mean milliseconds per phase over `steps` instrumented steps (PHASES order; "loss terms" is the objective's
    forward minus the head and bank phases inside it)."""
    timer = PhaseTimer(bench.device)
    restore = instrument(bench, timer)
    try:
        for _ in range(steps):
            bench.step(timer)
    finally:
        restore()
    ms = dict(timer.ms)
    ms["loss terms"] = ms.pop("objective", 0.0) - timer.nested
    return {name: round(ms[name] / steps, 3) for name in PHASES if name in ms}


def measure(bench: Bench, steps: int, warmup: int) -> float:
    """Seconds per plain step (no synchronisation but the loss's `.item()`)."""
    for _ in range(warmup):
        bench.step()
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    tic = time.perf_counter()
    for _ in range(steps):
        bench.step()
    return (time.perf_counter() - tic) / steps


def run(args: argparse.Namespace, loss: str, accelerator: Accelerator) -> dict:
    bench = Bench(args, loss, accelerator)
    seconds = measure(bench, args.steps, args.warmup)
    peak = peak_memory_mb(bench.device)
    # With accumulation the heads' backward runs in backward_step's own autograd.grad, outside every phase.
    phases = breakdown(bench, args.breakdown_steps) if args.breakdown_steps and args.grad_accum == 1 else {}
    total = sum(phases.values()) or 1.0
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "batch": args.batch,
        "frames": args.frames,
        "words": args.words,
        "image_size": bench.model.image_size,
        "precision": args.precision,
        "loss": loss,
        "memory_size": args.memory_size if loss == "neighborretr" else None,
        "optimizer": args.optimizer + (" fused" if args.fused else "") + (" loop" if args.no_foreach else ""),
        "compile": args.compile_backend if args.compile else False,
        "grad_accum": args.grad_accum,
        "machine": machine(bench.device),
        "torch": torch.__version__,
        "s_per_step": round(seconds, 4),
        "clips_per_s": round(args.batch / seconds, 2),
        "peak_memory_mb": round(peak, 1),
        "memory_kind": "cuda max_memory_allocated" if bench.device.type == "cuda" else "process peak RSS",
        "phases_ms": phases,
        "phase_share": {name: round(value / total, 4) for name, value in phases.items()},
    }


def markdown(rows: list[dict]) -> str:
    """Throughput table and per-phase breakdown of every row that has one (rows of this script's format)."""
    rows = [r for r in rows if "phases_ms" in r]
    lines = [
        "| machine | model | batch | frames x words | precision | loss | bank | optimiser | clips/s | s/step | "
        "peak memory (MiB) |",
        "|---|---|---:|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['machine']} | {r['model']} | {r['batch']} | {r['frames']} x {r['words']} | {r['precision']} | "
            f"{r['loss']} | {r['memory_size'] or '-'} | {r['optimizer']}{' compiled' if r['compile'] else ''} | "
            f"{r['clips_per_s']} | {r['s_per_step']} | {r['peak_memory_mb']} |"
        )
    lines += ["", "Where the time goes (synchronised phases, ms per step and share of their sum):", ""]
    lines += ["| phase | " + " | ".join(f"{r['model']} b{r['batch']} {r['loss']}" for r in rows) + " |"]
    lines += ["|---|" + "---:|" * len(rows)]
    for phase in PHASES:
        cells = [
            f"{r['phases_ms'][phase]:.1f} ({100 * r['phase_share'][phase]:.0f}%)" if phase in r["phases_ms"] else "-"
            for r in rows
        ]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--words", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10, help="timed plain steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--breakdown-steps", type=int, default=3, help="instrumented steps for the breakdown (0: none)")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--loss", choices=["infonce", "neighborretr", "both"], default="both")
    parser.add_argument("--memory-size", type=int, default=512, help="NeighborRetr's bank capacity (default: 512)")
    parser.add_argument("--optimizer", choices=["bertadam", "adamw"], default="bertadam", help="(paper: bertadam)")
    parser.add_argument("--no-foreach", action="store_true", help="BertAdam's per-tensor loop instead of foreach")
    parser.add_argument("--fused", action="store_true", help="AdamW's fused kernel")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder towers")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/train_step.jsonl"))
    parser.add_argument("--table", type=Path, default=None, help="also write the tables of every row of --out here")
    return parser.parse_args(argv)


TABLE_HEADER = """# Training step: NeighborRetr beside InfoNCE, with the time breakdown

Written by `scripts/bench_train_step.py ... --table docs/results/train_step.md` from every row of
`benchmarks/train_step.jsonl` (rows from before the breakdown existed are left out). Each run times both losses
with the recipe's objects (BertAdam as the paper, NeighborRetr's bank filled with `--memory-size` items). Commands:

    python scripts/bench_train_step.py --model tiny --batch 64 --frames 12 --words 24 --cpu \\
        --table docs/results/train_step.md
    python scripts/bench_train_step.py --model vit_b32 --batch 24 --frames 12 --words 24 \\
        --steps 2 --warmup 1 --breakdown-steps 1 --cpu \\
        --table docs/results/train_step.md
    # on one GPU: the ViT-B/32 step at batch 32 and 128 in bf16 (docs/results/gpu_check.md)
    python scripts/gpu_check.py

Each row's date and full machine string are in its JSON line.

"""


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.precision, cpu=args.cpu)
    rows = []
    for loss in ("infonce", "neighborretr") if args.loss == "both" else (args.loss,):
        row = run(args, loss, accelerator)
        print(json.dumps(row))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        every_row = [json.loads(line) for line in args.out.read_text().splitlines() if line]
        args.table.write_text(TABLE_HEADER + markdown(every_row))
    return rows


if __name__ == "__main__":
    main()
