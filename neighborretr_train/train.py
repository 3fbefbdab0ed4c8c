"""The training recipe: `train(cfg) -> results`, read top to bottom.

neighborretr-train experiment=synthetic_tiny
accelerate launch -m neighborretr_train.train experiment=msrvtt_vitb32 data.root=/data/msrvtt
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig

from neighborretr.data.module import VideoTextData
from neighborretr.engine import FitConfig, TrainState, checkpoint_dirs, fit, write_json
from neighborretr.eval.pipeline import write_report
from neighborretr.metrics_log import MetricsLog
from neighborretr.train_step import TrainStep
from neighborretr_train.common import (
    ConfigError,
    Evaluator,
    build,
    check_methods,
    check_model_data,
    hydra_entry,
    log,
    save_config,
    setup_accelerator,
    setup_output_dir,
    setup_records,
    setup_tracker,
)


def find_resume(loop: FitConfig, runs: Path, run_dir: Path) -> Path | None:
    """trainer.resume: null, "latest" (newest checkpoint of any run under `runs`), a run folder (its newest
    checkpoint) or a checkpoints/step_* folder."""
    resume = loop.resume
    if resume is None:
        return None
    if resume == "latest":
        found = [c for d in runs.glob("*") if d != run_dir for c in checkpoint_dirs(d)]
        if not found:
            log.warning("trainer.resume=latest: no checkpoint under %s, starting from scratch", runs)
            return None
        return max(found, key=lambda c: c.stat().st_mtime)
    path = Path(resume)
    if path.is_dir() and path.parent.name != "checkpoints":
        found = checkpoint_dirs(path)
        if not found:
            raise FileNotFoundError(f"trainer.resume={resume}: no checkpoints/step_* folder in this run folder")
        return found[-1]
    if not path.is_dir():
        raise FileNotFoundError(f"trainer.resume={resume}: no such checkpoint folder")
    return path


def setup_run(cfg: DictConfig, accelerator: Accelerator) -> tuple[FitConfig, Path | None]:
    """The loop settings with their run folder, and the checkpoint to resume from (its run folder is reused)."""
    run_dir = setup_output_dir(cfg, accelerator)
    loop = build(cfg, "trainer", run_dir=run_dir)
    resume_from = find_resume(loop, Path(cfg.output_root) / cfg.run_name, run_dir)
    if resume_from is not None:
        loop.run_dir = resume_from.parent.parent  # continue in the original run folder
        accelerator.print(f"resuming from {resume_from}")
    save_config(cfg, loop.run_dir, "config" if resume_from is None else "config.resumed", accelerator)
    return loop, resume_from


def setup_step(cfg: DictConfig, loop: FitConfig, data: VideoTextData, accelerator: Accelerator) -> TrainStep:
    """The model and its objective (with its state), after the checks that they fit the data and the batch (before
    any video is opened)."""
    per_process = data.per_process_batch(accelerator.num_processes)
    if per_process % loop.grad_accum:
        raise ConfigError(
            f"data.batch_size={data.batch_size} over {accelerator.num_processes} process(es) gives {per_process} per "
            f"process, not divisible by trainer.grad_accum={loop.grad_accum}"
        )
    model = build(cfg, "model")
    check_model_data(model, data)
    objective = build(cfg, "loss")
    if getattr(objective, "bank", None) is not None and not model.high_level:
        raise ConfigError("this loss needs the model's high level: set model.high_level=true")
    try:
        objective.check_batch(data.batch_size)  # the global batch: the loss sees all of it, accumulation or not
    except ValueError as err:
        raise ConfigError(f"data.batch_size={data.batch_size}: {err}") from err
    return TrainStep(model, objective, sum_gathered_grads=not loop.official_gather)


def setup_train_loader(data: VideoTextData, records: list, accelerator: Accelerator):
    loader = data.train_loader(records, accelerator.num_processes, accelerator.device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(f"the training split has {len(records)} pairs, fewer than data.batch_size={data.batch_size}")
    return loader


def setup_state(accelerator: Accelerator, objective, resume_from: Path | None) -> TrainState:
    """The loop position; it and the objective (its memory bank) are saved in, and restored from, checkpoints."""
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(objective)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
    return state


def score_selected_model(
    accelerator: Accelerator, evaluator: Evaluator, model, state: TrainState, loop: FitConfig, log_metrics: MetricsLog
) -> dict:
    """The test split scored by the model selected on the validation split, for both directions, raw and with
    each hubness normalisation (whose β/τ are chosen on the validation split too); writes results.json."""
    weights = loop.run_dir / "best" / "model.pt"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    report = evaluator(model, "test", evaluator.methods, weights=weights)
    results = {
        "test": report["rows"]["none"],
        "normalized": report["rows"],
        "normalization_params": report["params"],
        "best_epoch": state.best_epoch,
        "best_val_score": state.best_score,
        "select_metric": loop.select_metric,
        "history": state.history,
    }
    write_report(accelerator, report, loop.run_dir, "test", evaluator.cfg.k, state.global_step, log_metrics)
    if accelerator.is_main_process:
        write_json(loop.run_dir / "results.json", results)
    return results


def train(cfg: DictConfig) -> dict:
    """Trains, selects the epoch on the validation split, tests the selected model; returns the results."""
    accelerator = setup_accelerator(cfg.trainer, cfg.logger.name)
    set_seed(cfg.seed)
    loop, resume_from = setup_run(cfg, accelerator)
    data = build(cfg, "data")
    step = setup_step(cfg, loop, data, accelerator)
    model, objective = step.model, step.objective
    optimizer = build(cfg, "optim")(model)
    check_methods(cfg.eval)
    records = setup_records(data, ["train", "val", "test"], accelerator)  # the first step that opens files
    loader = setup_train_loader(data, records["train"], accelerator)
    step, optimizer, loader = accelerator.prepare(step, optimizer, loader)
    total_steps = loop.epochs * len(loader)
    scheduler = accelerator.prepare(build(cfg, "scheduler")(optimizer, total_steps=total_steps))
    refill = None
    if objective.refill_batches:  # the memory bank's refill batches, drawn from the training set
        refill = data.refill_loader(
            loader.dataset, objective.refill_batches, accelerator.num_processes, keep=objective.refill_keep
        )
        refill = accelerator.prepare(refill)
    objective.to(accelerator.device)
    state = setup_state(accelerator, objective, resume_from)
    evaluator = Evaluator(accelerator, data, cfg.eval, records)
    setup_tracker(accelerator, cfg, loop.run_dir, job_type="train")
    log_metrics = MetricsLog(accelerator, loop.run_dir / "metrics.jsonl")
    accelerator.print(
        f"run dir {loop.run_dir}\n{data.benchmark}: "
        + ", ".join(f"{s} {len(r)} captions / {len({x.video_id for x in r})} videos" for s, r in records.items())
        + f"; {accelerator.num_processes} process(es), {total_steps} optimiser steps"
    )

    state = fit(
        accelerator,
        step,
        optimizer,
        scheduler,
        loader,
        lambda: evaluator(model, "val")["rows"]["none"],
        state,
        loop,
        log_metrics,
        refill,
    )

    results = score_selected_model(accelerator, evaluator, model, state, loop, log_metrics)
    if accelerator.is_main_process:
        accelerator.print(
            f"test: {len(records['test'])} captions, model of epoch {state.best_epoch}; "
            f"results: {loop.run_dir / 'results.json'}"
        )
    accelerator.end_training()
    return results


main = hydra_entry("train", train)


if __name__ == "__main__":
    main()
