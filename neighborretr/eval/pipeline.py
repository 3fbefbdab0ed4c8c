"""One evaluation report for a split: raw scores and every configured hubness normalisation, both directions,
with retrieval and hubness metrics, written as a table, JSON, k-occurrence plots, good/bad hub reports and
tracker logs."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from neighborretr.data.annotations import Record
from neighborretr.eval.features import encode_split, score_split
from neighborretr.eval.hub_report import (
    HubCounts,
    format_hub_summary,
    hub_counts,
    hub_report,
    hub_summary,
    plot_hubs,
)
from neighborretr.eval.hubness_eval import (
    apply_method,
    effective_k,
    normalized_report,
    select_parameters,
    split_matrices,
)
from neighborretr.eval.hubness_metrics import (
    direction_report_pair,
    format_method_table,
    k_occurrence,
    plot_k_occurrence,
)
from neighborretr.eval.metrics import check_v2t_protocol

Loaders = tuple[DataLoader, DataLoader]  # (captions, distinct videos)
HUB_ROWS = 20  # hubs listed per method and direction in <name>_hubs_<direction>.json


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
        "hubs": {"t2v": {"none": hub_counts(sim, c2v, "t2v", k)}, "v2t": {"none": hub_counts(sim.t(), c2v, "v2t", k)}},
    }


def _normalized_hubs(matrices: dict, caption_to_video: torch.Tensor, params: dict, k: int) -> dict:
    """{direction: {method: HubCounts}} of each method's normalised test scores.

    normalized_report keeps only the k-occurrence, so each method is applied again here (one matrix in memory
    at a time); the same parameters give the same scores, hence the same N_k as the report's rows.
    """
    k = effective_k(k, tuple(matrices["t2v"]["sim"].shape))
    c2v = caption_to_video.to(matrices["t2v"]["sim"].device)
    hubs: dict[str, dict[str, HubCounts]] = {"t2v": {}, "v2t": {}}
    for method, by_direction in params.items():
        for direction in hubs:
            scores = apply_method(matrices[direction], method, by_direction.get(direction, {}))
            hubs[direction][method] = hub_counts(scores, c2v, direction, k)
    return hubs


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
         "counts": {direction: {method: k-occurrence [G]}}, "hubs": {direction: {method: HubCounts}}}.
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
        hubs = _normalized_hubs(test_matrices, test["caption_to_video"], params, k)
    return {"rows": rows, "params": params, "counts": counts, "hubs": hubs}


def write_report(
    accelerator: Accelerator,
    report: dict,
    out_dir: Path,
    name: str,
    k: int,
    step: int | None = None,
    log_metrics: Callable[[dict, int | None], None] | None = None,
    hubs: bool = True,
    gallery_ids: dict[str, Sequence[str]] | None = None,
):
    """Prints the table, writes `<name>_metrics.json` and `<name>_k_occurrence_<direction>.png`, and logs the
    rows (and the plots, for trackers that take images) with `log_metrics` (default: `accelerator.log`) and to
    the trackers. With `hubs` (and a report that has them) it also writes the good/bad hub report of each
    direction (see `write_hub_report`); `gallery_ids` ({direction: names}) labels its rows. Files and printing:
    main process only."""
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
    if hubs and "hubs" in report:  # trackers log on the main process only, so the hub numbers lose nothing here
        write_hub_report(accelerator, report["hubs"], out_dir, name, step, log_metrics, gallery_ids)
    print(f"results: {out_dir / f'{name}_metrics.json'}")


def write_hub_report(
    accelerator: Accelerator,
    hubs: dict[str, dict[str, HubCounts]],
    out_dir: Path,
    name: str,
    step: int | None = None,
    log_metrics: Callable[[dict, int | None], None] | None = None,
    gallery_ids: dict[str, Sequence[str]] | None = None,
) -> None:
    """Good and bad hubs of every method, per direction: `<name>_hubs_<direction>.json` (summary, the top
    hubs and every retrieved item's counts, per method) and `<name>_hubs_<direction>.png` (`plot_hubs`), a short
    printed summary, and the summary numbers (`<name>/hubs/<method>/<direction>/<key>`) and plots logged like
    the rows. Files and printing: main process only."""
    flat = {
        f"{name}/hubs/{m}/{d}/{key}": v
        for d, by_method in hubs.items()
        for m, counts in by_method.items()
        for key, v in hub_summary(counts).items()
    }
    (log_metrics or accelerator.log)(flat, step=step)
    if not accelerator.is_main_process:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for direction, by_method in hubs.items():
        ids = (gallery_ids or {}).get(direction)
        reports = {m: hub_report(c, HUB_ROWS, ids) for m, c in by_method.items()}
        first = next(iter(by_method.values()))
        payload = {
            "name": name,
            "direction": direction,
            "k": first.k,
            "hub_factor": first.hub_factor,
            "good_hub": "a hub (n_k >= hub_factor * k) whose correct share is >= the share of correct top-k slots",
            "methods": reports,
        }
        (out_dir / f"{name}_hubs_{direction}.json").write_text(json.dumps(payload, indent=1))
        print(format_hub_summary({m: r["summary"] for m, r in reports.items()}, title=f"{name} {direction} hubs:"))
        png = plot_hubs(
            by_method, out_dir / f"{name}_hubs_{direction}.png", title=f"{name} {direction}: good and bad hubs"
        )
        for tracker in accelerator.trackers:
            if hasattr(tracker, "log_images") and tracker.name == "wandb":
                tracker.log_images({f"{name}/hubs_{direction}": [str(png)]}, step=step)


def gallery_ids(records: Sequence[Record]) -> dict[str, list[str]]:
    """Names of the gallery items of a split's records, in the evaluation's index order: t2v the videos (sorted
    ids, as the datasets index them), v2t the captions (record order), as "<video id>: <caption>"."""
    return {"t2v": sorted({r.video_id for r in records}), "v2t": [f"{r.video_id}: {r.caption}" for r in records]}
