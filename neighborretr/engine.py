"""Training and evaluation loops on already-built objects (no config reading here)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from neighborretr.distributed import all_gather_with_grad, gather_features
from neighborretr.memory_bank import MemoryBank

log = logging.getLogger(__name__)

Criterion = Callable[..., dict[str, torch.Tensor]]  # (model, gathered features, bank contents | None) -> losses
Validator = Callable[[], dict[str, dict[str, float]]]


@dataclass
class TrainState:
    """Loop position and model-selection record; saved in every checkpoint through `register_for_checkpointing`."""

    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed (mid-epoch resume skips them)
    global_step: int = 0  # optimiser steps
    best_score: float = -math.inf
    best_epoch: int = -1
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class FitConfig:
    """Plain loop settings (the entry point fills them from the Hydra config)."""

    epochs: int
    run_dir: Path
    max_grad_norm: float = 1.0
    log_every: int = 10
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    keep_checkpoints: int = 2
    select_metric: str = "rsum"
    max_steps: int | None = None  # stop after this many optimiser steps (debugging)
    abort_after_steps: int | None = None  # hard-exit after this many steps, to test resuming (debugging)
    max_logit_scale: float = 100.0
    official_gather: bool = False  # True: the official gather backward (local slice, no sum; spec §4)


def selection_score(metrics: dict[str, dict[str, float]], name: str) -> float:
    """Model-selection score: "rsum" (R@1+R@5+R@10 of both directions) or a "<direction>/<metric>" key."""
    if name == "rsum":
        return sum(m[k] for m in metrics.values() for k in ("R@1", "R@5", "R@10"))
    direction, _, metric = name.partition("/")
    if direction not in metrics or metric not in metrics[direction]:
        raise ValueError(f"trainer.select_metric={name!r} is not 'rsum' or one of t2v/R@1, v2t/R@5, ...")
    return metrics[direction][metric]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((run_dir / "checkpoints").glob("step_*"))


def save_checkpoint(accelerator: Accelerator, state: TrainState, run_dir: Path, keep: int) -> Path:
    """Saves model, optimiser, scheduler, RNG and the TrainState; prunes all but the newest `keep`."""
    path = run_dir / "checkpoints" / f"step_{state.global_step:08d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process and keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Sets the epoch of a prepared loader's sampler (shuffle order) and of its dataset (random frame offsets).

    A sharded Accelerate loader forwards `set_epoch` to its sampler only, not to the dataset, so the dataset
    is told directly (workers are not persistent, so they see the new value).
    """
    loader.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


@dataclass
class BankFeeder:
    """The memory bank and the loader that refills it at the start of every epoch (its `mb_batch` batches)."""

    bank: MemoryBank
    loader: DataLoader


def _push(bank: MemoryBank, features: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
    """Adds a gathered batch to the bank; every rank pushes the same global batch, so banks stay identical."""
    bank.enqueue(
        features["text"].detach(), features["text_mask"], features["video"].detach(), features["video_mask"], ids
    )


@torch.no_grad()
def fill_memory_bank(accelerator: Accelerator, model: nn.Module, feeder: BankFeeder) -> None:
    """Empties the bank and fills it from the feeder loader in eval mode without gradients (spec §3); the
    batches are gathered across ranks, so every rank holds the same bank (the official code keeps local banks)."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    feeder.bank.reset()
    with accelerator.autocast():
        for batch in feeder.loader:
            features = unwrapped(batch["text_ids"], batch["text_mask"], batch["video"], batch["video_mask"])
            _push(feeder.bank, gather_features(features), all_gather_with_grad(batch["caption_index"]))
    unwrapped.train(was_training)


def train_one_epoch(
    accelerator: Accelerator,
    model: nn.Module,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loader: DataLoader,
    state: TrainState,
    cfg: FitConfig,
    feeder: BankFeeder | None = None,
) -> bool:
    """Runs the rest of epoch `state.epoch`; returns False when a step limit ended training early."""
    unwrapped = accelerator.unwrap_model(model)
    set_epoch(loader, state.epoch)  # before the refill, which reads the same dataset (frame draws per epoch)
    if feeder is not None and state.batches_in_epoch == 0:  # a mid-epoch resume restores the bank instead
        fill_memory_bank(accelerator, model, feeder)
    model.train()
    batches = accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
    bar = tqdm(
        total=len(loader),
        initial=state.batches_in_epoch,
        desc=f"epoch {state.epoch}",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    wait = busy = 0.0
    clips = 0
    tic = time.perf_counter()
    for batch in batches:
        got = time.perf_counter()
        wait += got - tic
        with accelerator.accumulate(model):
            features = model(batch["text_ids"], batch["text_mask"], batch["video"], batch["video_mask"])
            gathered = gather_features(features, sum_grads=not cfg.official_gather)
            losses = criterion(unwrapped, gathered, feeder.bank.get() if feeder is not None else None)
            accelerator.backward(losses["loss"])
            if feeder is not None:  # after the loss, as the official code: the batch is never its own neighbour
                _push(feeder.bank, gathered, all_gather_with_grad(batch["caption_index"]))
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.batches_in_epoch += 1
        clips += batch["video"].shape[0] * accelerator.num_processes
        tic = time.perf_counter()
        busy += tic - got
        bar.update(1)
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        unwrapped.clamp_logit_scale(cfg.max_logit_scale)
        state.global_step += 1
        if state.global_step % cfg.log_every == 0 or state.global_step == 1:
            logs = {f"train/{k}": v.item() for k, v in losses.items()}
            logs |= {
                "train/lr": _current_lr(optimizer),
                "train/logit_scale": unwrapped.logit_scale.exp().item(),
                "train/clips_per_s": clips / max(wait + busy, 1e-9),
                "train/data_wait": wait / max(wait + busy, 1e-9),
                "epoch": state.epoch,
            }
            accelerator.log(logs, step=state.global_step)
            bar.set_postfix(
                loss=f"{logs['train/loss']:.3f}",
                lr=f"{logs['train/lr']:.1e}",
                clips_s=f"{logs['train/clips_per_s']:.1f}",
                wait=f"{100 * logs['train/data_wait']:.0f}%",
            )
            wait = busy = 0.0
            clips = 0
        if cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0:
            save_checkpoint(accelerator, state, cfg.run_dir, cfg.keep_checkpoints)
        if cfg.abort_after_steps is not None and state.global_step >= cfg.abort_after_steps:
            accelerator.print(f"abort_after_steps={cfg.abort_after_steps}: exiting without cleanup")
            os._exit(3)  # simulates a killed job: nothing is flushed or saved
        if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
            bar.close()
            return False
    bar.close()
    return True


def save_best(accelerator: Accelerator, model: nn.Module, run_dir: Path) -> None:
    """Writes the selected model's weights to run_dir/best/model.pt (every rank takes part, which sharded
    setups such as FSDP need to assemble the full state dict)."""
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        (run_dir / "best").mkdir(parents=True, exist_ok=True)
        accelerator.save(state, run_dir / "best" / "model.pt")
    accelerator.wait_for_everyone()


def fit(
    accelerator: Accelerator,
    model: nn.Module,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_loader: DataLoader,
    validate: Validator,
    state: TrainState,
    cfg: FitConfig,
    feeder: BankFeeder | None = None,
) -> TrainState:
    """Trains from `state` to `cfg.epochs`, validating after every epoch and keeping the best model by
    `cfg.select_metric` (computed on the validation split only) in run_dir/best."""
    while state.epoch < cfg.epochs:
        finished = train_one_epoch(
            accelerator, model, criterion, optimizer, scheduler, train_loader, state, cfg, feeder
        )
        metrics = validate()
        # Every rank scores the full matrix; take the main process's value so all ranks agree on "improved".
        score = broadcast_object_list([selection_score(metrics, cfg.select_metric)])[0]
        flat = {f"val/{d}/{k}": v for d, m in metrics.items() for k, v in m.items()}
        accelerator.log(flat | {"val/score": score, "epoch": state.epoch}, step=state.global_step)
        state.history.append({"epoch": state.epoch, "step": state.global_step, "score": score, **flat})
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_epoch = score, state.epoch
            save_best(accelerator, model, cfg.run_dir)
        accelerator.print(
            f"epoch {state.epoch}: val {cfg.select_metric}={score:.2f} "
            f"(t2v R@1 {metrics['t2v']['R@1']:.1f}, v2t R@1 {metrics['v2t']['R@1']:.1f})"
            + (" *best*" if improved else "")
        )
        if finished:
            state.epoch += 1
            state.batches_in_epoch = 0
        save_checkpoint(accelerator, state, cfg.run_dir, cfg.keep_checkpoints)
        if not finished:
            break
    return state


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
