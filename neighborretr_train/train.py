"""The training recipe: `train(cfg) -> results`, read top to bottom.

neighborretr-train experiment=synthetic_tiny
accelerate launch -m neighborretr_train.train experiment=msrvtt_vitb32 data.root=/data/msrvtt
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from neighborretr.checkpoint import checkpoint_dirs, is_complete, load_checkpoint, step_of
from neighborretr.data.module import VideoTextData
from neighborretr.engine import FitConfig, TrainState, as_published_best, fit, write_json
from neighborretr.eval.metrics import format_table
from neighborretr.eval.pipeline import gallery_ids, write_report
from neighborretr.metrics_log import MetricsLog
from neighborretr.train_step import TrainStep
from neighborretr_train.common import (
    ConfigError,
    Evaluator,
    RunLock,
    build,
    check_model_data,
    create_run_dir,
    hydra_entry,
    log,
    log_to_file,
    save_config,
    setup_accelerator,
    setup_records,
    setup_tracker,
)
from neighborretr_train.schema import check_config

# Settings that may differ when a run is resumed (documented in the README); any other difference is refused.
RESUME_MAY_CHANGE = (
    "run_name",
    "output_root",
    "output_dir",
    "logger.",
    "eval.",
    "trainer.epochs",
    "trainer.resume",
    "trainer.log_every",
    "trainer.checkpoint_every_steps",
    "trainer.checkpoint_every_minutes",
    "trainer.keep_checkpoints",
    "trainer.max_steps",
    "trainer.abort_after_steps",
    "trainer.nonfinite",
    "trainer.max_nonfinite_skips",
    "trainer.cpu",
    "trainer.compile",  # also compile_backend and compile_mode: they change speed, not the maths
    "trainer.max_grad_norm",
    "trainer.grad_accum",  # accumulation gives the gradients of the whole batch (GradCache), only memory changes
    "model.pretrained",  # the checkpoint's weights replace the backbone's
    "data.root",
    "data.video_dir",
    "data.num_workers",
    "data.eval_batch_size",
    "data.check_videos",
    "data.skip_bad_videos",
)


def find_resume(resume: str | None, cfg: DictConfig) -> Path | None:
    """The checkpoint folder `trainer.resume` names: null (none), "latest" (the highest complete step among the runs
    of `run_name`, multirun jobs included; ties go to the later run folder), a run folder (its highest step) or a
    checkpoints/step_* folder. Incomplete folders are skipped with a warning."""
    if resume is None:
        return None
    if resume == "latest":
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise ConfigError(
                "trainer.resume=latest in a multirun would make every job continue the same run: resume each job "
                "with trainer.resume=<its folder>"
            )
        root = Path(cfg.output_root)
        runs = [*(root / cfg.run_name).glob("*"), *(root / "multirun" / cfg.run_name).glob("*/*")]
        found = [c for run in sorted(runs) for c in checkpoint_dirs(run, warn=True)]
        if not found:
            log.warning(
                "trainer.resume=latest: no checkpoint of run_name=%s under %s, starting afresh", cfg.run_name, root
            )
            return None
        return max(found, key=lambda c: (step_of(c), _natural(c.parent.parent.name)))
    path = Path(resume)
    if path.name.startswith("step_"):
        if not is_complete(path):
            raise FileNotFoundError(f"trainer.resume={resume}: not a complete checkpoint folder")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"trainer.resume={resume}: no such run or checkpoint folder")
    found = checkpoint_dirs(path, warn=True)
    if not found:
        raise FileNotFoundError(f"trainer.resume={resume}: no complete checkpoints/step_* folder in this run folder")
    return found[-1]


def _natural(name: str) -> list:
    """Sort key that orders `..._00-00-9` before `..._00-00-10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def check_resume_config(cfg: DictConfig, run_dir: Path) -> None:
    """Refuses to resume with settings that change shapes, the objective, the data or the batch: one line listing
    what differs from the run's config.yaml (RESUME_MAY_CHANGE lists what may)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a run folder of neighborretr-train")
    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    differ = [
        f"{k} {saved.get(k, '(absent)')} -> {now.get(k, '(absent)')}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k) and not k.startswith(RESUME_MAY_CHANGE)
    ]
    if differ:
        raise ConfigError(
            f"cannot resume {run_dir} with other settings: {'; '.join(differ)}. Resume with the run's settings "
            f"(its config.yaml) or start a new run; only {', '.join(RESUME_MAY_CHANGE)} may change"
        )
    if saved.get("trainer.epochs") != now.get("trainer.epochs"):
        log.warning(
            "trainer.epochs %s -> %s: the learning-rate schedule is recomputed over the new length from the resumed "
            "step on",
            saved.get("trainer.epochs"),
            now.get("trainer.epochs"),
        )


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
    if loop.compile:
        model.compile_encoders(loop.compile_backend, loop.compile_mode)
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


def load_resumed(accelerator: Accelerator, path: Path | None, step, optimizer, scheduler) -> TrainState:
    """The loop position restored, with every other part, from checkpoint `path` (a fresh state without one).

    Checkpoints of later steps in the same run belong to the continuation this resume abandons: they are moved
    to `checkpoints_abandoned/`, so that pruning and `latest` only ever see this trajectory."""
    state = TrainState()
    if path is None:
        return state
    load_checkpoint(accelerator, path, step, optimizer, scheduler, state)
    later = [c for c in checkpoint_dirs(path.parent.parent) if step_of(c) > step_of(path)]
    if later and accelerator.is_main_process:
        shelf = path.parent.parent / "checkpoints_abandoned"
        shelf.mkdir(exist_ok=True)
        for c in later:
            c.rename(shelf / f"{c.name}_{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("resuming from %s: moved the later %s to %s", path.name, ", ".join(c.name for c in later), shelf)
    accelerator.wait_for_everyone()
    accelerator.print(f"resumed from {path}: epoch {state.epoch}, step {state.global_step}")
    return state


def setup_run_dir(cfg: DictConfig, accelerator: Accelerator, resume_from: Path | None) -> Path:
    """The run folder, written to only now that every check passed and the checkpoint loaded: the resumed run's
    own (config.resumed.yaml beside its config.yaml) or a new one; the console log is copied to train.log there."""
    if resume_from is not None:
        run_dir = resume_from.parent.parent
        save_config(cfg, run_dir, "config.resumed", accelerator)
    else:
        run_dir = create_run_dir(cfg, accelerator, Path(cfg.output_root) / cfg.run_name)
        save_config(cfg, run_dir, "config", accelerator)
    log_to_file(accelerator, run_dir / "train.log")
    return run_dir


def score_selected_model(
    accelerator: Accelerator,
    evaluator: Evaluator,
    model,
    state: TrainState,
    loop: FitConfig,
    log_metrics: MetricsLog,
    ids: dict[str, list[str]] | None = None,
) -> dict:
    """The test split scored by the model selected on the validation split, for both directions, raw and with
    each hubness normalisation (whose β/τ are chosen on the validation split too); writes results.json and,
    with eval.hub_report, the good/bad hub reports (rows named by `ids`, see `gallery_ids`).

    With eval.as_published, results.json also gets "as_published_test_selected": the per-direction best epochs
    chosen on the test split, as the official code reports them, labelled as such."""
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
    write_report(
        accelerator,
        report,
        loop.run_dir,
        "test",
        evaluator.cfg.k,
        state.global_step,
        log_metrics,
        hubs=evaluator.cfg.hub_report,
        gallery_ids=ids,
    )
    published = as_published_best(state.history) if evaluator.cfg.as_published else None
    if published is not None:
        results["as_published_test_selected"] = published
        rows = {f"{d} (epoch {published[d]['epoch']})": published[d] for d in ("t2v", "v2t")}
        accelerator.print(format_table(rows, title=f"as published, TEST-SELECTED: {published['note']}"))
    if accelerator.is_main_process:
        write_json(loop.run_dir / "results.json", results)
    return results


def train(cfg: DictConfig) -> dict:
    """Trains, selects the epoch on the validation split, tests the selected model; returns the results."""
    with RunLock() as lock:
        return _train(cfg, lock)


def _train(cfg: DictConfig, lock: RunLock) -> dict:
    check_config(cfg, "train")
    accelerator = setup_accelerator(cfg.trainer, cfg.logger.name)
    set_seed(cfg.seed)
    loop = build(cfg, "trainer", run_dir=Path(cfg.output_dir or "."))  # the run folder is made last
    resume_from = find_resume(loop.resume, cfg)
    if resume_from is not None:
        check_resume_config(cfg, resume_from.parent.parent)
        lock.acquire(accelerator, resume_from.parent.parent)
    data = build(cfg, "data")
    step = setup_step(cfg, loop, data, accelerator)
    model, objective = step.model, step.objective
    optimizer = build(cfg, "optim")(model)
    schedule = build(cfg, "scheduler")
    schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=1)  # checks its settings
    records = setup_records(data, ["train", "val", "test"], accelerator)  # the first step that opens files
    loader = setup_train_loader(data, records["train"], accelerator)
    step, optimizer, loader = accelerator.prepare(step, optimizer, loader)
    total_steps = loop.epochs * len(loader)
    scheduler = accelerator.prepare(schedule(optimizer, total_steps=total_steps))
    refill = None
    if objective.refill_batches:  # the memory bank's refill batches, drawn from the training set
        refill = data.refill_loader(
            loader.dataset, objective.refill_batches, accelerator.num_processes, keep=objective.refill_keep
        )
        refill = accelerator.prepare(refill)
    objective.to(accelerator.device)
    state = load_resumed(accelerator, resume_from, step, optimizer, scheduler)
    evaluator = Evaluator(accelerator, data, cfg.eval, records)
    loop.run_dir = setup_run_dir(cfg, accelerator, resume_from)
    if resume_from is None:
        lock.acquire(accelerator, loop.run_dir)
    setup_tracker(accelerator, cfg, loop.run_dir, job_type="train")
    log_metrics = MetricsLog(accelerator, loop.run_dir / "metrics.jsonl")
    accelerator.print(
        f"run dir {loop.run_dir}\n{data.benchmark}: "
        + ", ".join(f"{s} {len(r)} captions / {len({x.video_id for x in r})} videos" for s, r in records.items())
        + f"; {accelerator.num_processes} process(es), {total_steps} optimiser steps"
    )

    try:
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
            test_each_epoch=(lambda: evaluator(model, "test")["rows"]["none"]) if cfg.eval.as_published else None,
        )
        ids = gallery_ids(records["test"])
        results = score_selected_model(accelerator, evaluator, model, state, loop, log_metrics, ids)
    finally:
        accelerator.end_training()  # also when stopped or failed: the tracker's history is flushed and closed
    if accelerator.is_main_process:
        accelerator.print(
            f"test: {len(records['test'])} captions, model of epoch {state.best_epoch}; "
            f"results: {loop.run_dir / 'results.json'}"
        )
    return results


main = hydra_entry("train", train)


if __name__ == "__main__":
    main()
