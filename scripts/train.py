"""Train a retrieval model: python scripts/train.py experiment=synthetic_tiny (or under `accelerate launch`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import torch
from _setup import (
    bank_cache_path,
    bank_loaders,
    bank_records,
    build_model,
    check_model_data,
    check_videos,
    eval_loaders,
    init_tracker,
    make_accelerator,
    memory_bank_feeder,
    needs_banks,
    records,
    seed_everything,
    shared_run_dir,
    train_loader,
    user_errors,
)
from omegaconf import DictConfig, OmegaConf

from neighborretr.engine import FitConfig, TrainState, checkpoint_dirs, fit, write_json
from neighborretr.eval.features import evaluate_split
from neighborretr.eval.pipeline import evaluate_report, write_report
from neighborretr.optim import build_optimizer, build_scheduler, param_groups

log = logging.getLogger("neighborretr")


def find_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """trainer.resume: null, "latest" (newest checkpoint of any run named run_name), a run folder (its newest
    checkpoint) or a checkpoints/step_* folder."""
    resume = cfg.trainer.resume
    if resume is None:
        return None
    if resume == "latest":
        runs = Path(cfg.output_root) / cfg.run_name
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


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@user_errors
def main(cfg: DictConfig) -> dict:
    accelerator = make_accelerator(cfg, with_tracker=True)
    seed_everything(cfg)
    run_dir = shared_run_dir(accelerator)
    resume_from = find_resume(cfg, run_dir)
    if resume_from is not None:
        run_dir = resume_from.parent.parent  # continue in the original run folder
        accelerator.print(f"resuming from {resume_from}")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        name = "config.yaml" if resume_from is None else "config.resumed.yaml"
        OmegaConf.save(cfg, run_dir / name, resolve=True)

    splits = check_videos(cfg, {s: records(cfg, s) for s in ("train", "val", "test")}, accelerator)
    model = build_model(cfg)
    check_model_data(model, cfg)
    criterion = hydra.utils.instantiate(cfg.loss.criterion)
    o = cfg.optim
    groups = param_groups(model, o.lr, o.weight_decay, o.backbone_lr_scale, no_decay=tuple(o.no_decay))
    optimizer = build_optimizer(o.name, groups, o.lr, tuple(o.betas), o.eps, o.get("max_grad_norm", 1.0))
    loader = train_loader(cfg, splits["train"], accelerator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # Accelerate forces an optimiser step at the end of each epoch, hence the ceiling.
    total_steps = cfg.trainer.epochs * math.ceil(len(loader) / accelerator.gradient_accumulation_steps)
    scheduler = accelerator.prepare(build_scheduler(optimizer, total_steps, o.warmup))
    val_loaders = accelerator.prepare(*eval_loaders(cfg, splits["val"]))
    test_loaders = accelerator.prepare(*eval_loaders(cfg, splits["test"]))

    feeder = memory_bank_feeder(cfg, criterion, model, loader, accelerator)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if feeder is not None:
        accelerator.register_for_checkpointing(feeder.bank)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
    init_tracker(accelerator, cfg, run_dir, job_type="train")
    accelerator.print(
        f"run dir {run_dir}\n{cfg.data.benchmark}: "
        + ", ".join(f"{s} {len(r)} captions / {len({x.video_id for x in r})} videos" for s, r in splits.items())
        + f"; {accelerator.num_processes} process(es), {total_steps} optimiser steps"
    )

    t = cfg.trainer
    fit_cfg = FitConfig(
        epochs=t.epochs,
        run_dir=run_dir,
        max_grad_norm=t.max_grad_norm,
        log_every=t.log_every,
        checkpoint_every_steps=t.checkpoint_every_steps,
        keep_checkpoints=t.keep_checkpoints,
        select_metric=t.select_metric,
        max_steps=t.max_steps,
        abort_after_steps=t.abort_after_steps,
        max_logit_scale=t.max_logit_scale,
        official_gather=t.official_gather,
    )
    chunk = cfg.eval.chunk_size
    state = fit(
        accelerator,
        model,
        criterion,
        optimizer,
        scheduler,
        loader,
        lambda: evaluate_split(accelerator, model, *val_loaders, chunk_size=chunk),
        state,
        fit_cfg,
    )

    # The final test uses the model selected on the validation split, for both directions, raw and with each
    # hubness normalisation (whose β/τ are chosen on the validation split too).
    weights = run_dir / "best" / "model.pt"
    accelerator.unwrap_model(model).load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    banks = bank_loaders(cfg, bank_records(cfg, splits["train"])) if needs_banks(cfg) else None
    report = evaluate_report(
        accelerator,
        model,
        test_loaders,
        list(cfg.eval.normalizations),
        val_loaders=val_loaders,
        bank_loaders=accelerator.prepare(*banks) if banks else None,
        bank_cache=bank_cache_path(cfg, weights) if banks else None,
        k=cfg.eval.k,
        chunk_size=chunk,
    )
    results = {
        "test": report["rows"]["none"],
        "normalized": report["rows"],
        "normalization_params": report["params"],
        "best_epoch": state.best_epoch,
        "best_val_score": state.best_score,
        "select_metric": t.select_metric,
        "history": state.history,
    }
    write_report(accelerator, report, run_dir, "test", cfg.eval.k, step=state.global_step)
    if accelerator.is_main_process:
        write_json(run_dir / "results.json", results)
        accelerator.print(
            f"test: {len(splits['test'])} captions, model of epoch {state.best_epoch}; "
            f"results: {run_dir / 'results.json'}"
        )
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
