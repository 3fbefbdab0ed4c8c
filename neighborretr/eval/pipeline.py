"""One evaluation report for a split: raw scores and every configured hubness normalisation, both directions,
with retrieval and hubness metrics, written as a table, JSON, k-occurrence plots and tracker logs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from neighborretr.eval.features import encode_split, score_split
from neighborretr.eval.hubness_eval import effective_k, normalized_report, select_parameters, split_matrices
from neighborretr.eval.hubness_metrics import (
    direction_report_pair,
    format_method_table,
    k_occurrence,
    plot_k_occurrence,
)
from neighborretr.eval.metrics import check_v2t_protocol

Loaders = tuple[DataLoader, DataLoader]  # (captions, distinct videos)


def encode_bank(accelerator: Accelerator, model: nn.Module, loaders: Loaders, cache: Path | None) -> dict:
    """Encodes the training-split banks, or reads them from `cache` (written once, in fp16, by the main process).

    The cache file name must identify the checkpoint and the bank settings; the caller builds it.
    """
    if cache is not None and cache.is_file():
        return {k: v.float() if v.is_floating_point() else v for k, v in torch.load(cache).items()}
    features = encode_split(accelerator, model, *loaders)
    if cache is not None and accelerator.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial")
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in features.items()}, partial)
        partial.replace(cache)  # a crash never leaves a truncated cache behind
    accelerator.wait_for_everyone()
    return features


def _raw_report(model: nn.Module, test: dict, device: torch.device, k: int, chunk_size: int, v2t_protocol: str) -> dict:
    sim = score_split(model, test, device, chunk_size)
    c2v = test["caption_to_video"]
    k = effective_k(k, tuple(sim.shape))
    return {
        "rows": {"none": direction_report_pair(sim, sim.t(), c2v, k, v2t_protocol)},
        "params": {"none": {"t2v": {}, "v2t": {}}},
        "counts": {"t2v": {"none": k_occurrence(sim, k=k)}, "v2t": {"none": k_occurrence(sim.t(), k=k)}},
    }


def evaluate_report(
    accelerator: Accelerator,
    model: nn.Module,
    test_loaders: Loaders,
    methods: list[str],
    val_loaders: Loaders | None = None,
    bank_loaders: Loaders | None = None,
    bank_cache: Path | None = None,
    k: int = 10,
    chunk_size: int = 256,
    grid: dict | None = None,
    v2t_protocol: str = "best_caption",
) -> dict:
    """Scores a split raw and with each method in `methods`.

    Methods other than "none" need the training-split banks (`bank_loaders`) and a validation split
    (`val_loaders`) on which their parameters are chosen; the test split is only scored with the chosen values.
    `v2t_protocol` is the multi-caption video-to-text ranking (`metrics.V2T_PROTOCOLS`), used for selection too.

    Returns:
        {"rows": {method: {"t2v": metrics, "v2t": metrics}}, "params": {method: {direction: {...}}},
         "counts": {direction: {method: k-occurrence [G]}}}.
    """
    check_v2t_protocol(v2t_protocol)  # before any encoding
    unwrapped = accelerator.unwrap_model(model)
    device = accelerator.device
    test = encode_split(accelerator, model, *test_loaders)
    if all(m == "none" for m in methods):
        return _raw_report(unwrapped, test, device, k, chunk_size, v2t_protocol)
    if val_loaders is None or bank_loaders is None:
        raise ValueError("hubness normalisation needs a validation split and training-split banks")
    bank = encode_bank(accelerator, model, bank_loaders, bank_cache)
    val = encode_split(accelerator, model, *val_loaders)
    with torch.no_grad():
        val_matrices = split_matrices(unwrapped, val, bank, device, chunk_size)
        params = select_parameters(val_matrices, val["caption_to_video"], methods, grid, v2t_protocol)
        test_matrices = split_matrices(unwrapped, test, bank, device, chunk_size)
        rows, counts = normalized_report(test_matrices, test["caption_to_video"], methods, params, k, v2t_protocol)
    return {"rows": rows, "params": params, "counts": counts}


def write_report(
    accelerator: Accelerator,
    report: dict,
    out_dir: Path,
    name: str,
    k: int,
    step: int | None = None,
    log_metrics: Callable[[dict, int | None], None] | None = None,
):
    """Prints the table, writes `<name>_metrics.json` and `<name>_k_occurrence_<direction>.png`, and logs the
    rows (and the plots, for trackers that take images) with `log_metrics` (default: `accelerator.log`) and to
    the trackers. Files and printing: main process only."""
    rows = report["rows"]
    flat = {f"{name}/{m}/{d}/{key}": v for m, r in rows.items() for d, mr in r.items() for key, v in mr.items()}
    (log_metrics or accelerator.log)(flat, step=step)
    if not accelerator.is_main_process:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    print(format_method_table(rows, title=name))
    for method, by_direction in report["params"].items():
        if any(by_direction.values()):
            chosen = "; ".join(f"{d} " + ", ".join(f"{k}={v:g}" for k, v in p.items()) for d, p in by_direction.items())
            print(f"  {method}: {chosen} (chosen on the validation split)")
    payload = {"k": k, "rows": rows, "params": report["params"]}
    (out_dir / f"{name}_metrics.json").write_text(json.dumps(payload, indent=2, sort_keys=True))
    for direction, counts in report["counts"].items():
        png = plot_k_occurrence(
            counts,
            out_dir / f"{name}_k_occurrence_{direction}.png",
            k=k,
            title=f"{name} {direction}: k-occurrence (k={k})",
        )
        for tracker in accelerator.trackers:
            if hasattr(tracker, "log_images") and tracker.name == "wandb":
                tracker.log_images({f"{name}/k_occurrence_{direction}": [str(png)]}, step=step)
    print(f"results: {out_dir / f'{name}_metrics.json'}")
