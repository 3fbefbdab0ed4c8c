"""Training and evaluation loops on already-built objects (no config reading here)."""

from __future__ import annotations

import json
import logging
import math
import os
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

from neighborretr.checkpoint import checkpoint_dirs, save_checkpoint
from neighborretr.metrics_log import MetricsLog
from neighborretr.preemption import Preempted, StopRequest
from neighborretr.train_step import TrainStep, backward_step

log = logging.getLogger(__name__)

Validator = Callable[[], dict[str, dict[str, float]]]
# Selection needs "higher is better": the recalls and their sum (ranks would pick the worst epoch).
SELECT_METRICS = ("rsum", *(f"{d}/R@{k}" for d in ("t2v", "v2t") for k in (1, 5, 10)))
# History prefix of the test split scored after every epoch (eval.as_published); never used for selection.
EPOCH_TEST = "epoch_test"
TEST_SELECTED_NOTE = (
    "test-selected: best epoch per direction chosen by R@1 on the test split itself, as the official code reports "
    "(spec §7); optimistic, not a model selection; compare with papers only"
)


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite; raised before the update it would have made."""


@dataclass
class TrainState:
    """Loop position and model-selection record; saved as JSON in every checkpoint (loop.json)."""

    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed (mid-epoch resume skips them)
    global_step: int = 0  # optimiser steps
    best_score: float = -math.inf
    best_epoch: int = -1
    skipped_videos: int = 0  # training items whose video failed to decode and was replaced (all ranks)
    nonfinite_skipped: int = 0  # steps dropped by trainer.nonfinite=skip
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class FitConfig:
    """The loop's settings (configs/trainer/*.yaml is this class's `_target_`).

    `resume`, `mixed_precision` and `cpu` are read by the recipe (checkpoint lookup, the Accelerator); the rest
    by `fit` and `train_one_epoch`.
    """

    run_dir: Path
    epochs: int = 5
    grad_accum: int = 1  # micro-batches per optimiser step; the loss still sees the whole global batch
    max_grad_norm: float = 1.0
    log_every: int = 10
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    checkpoint_every_minutes: float = 0.0  # 0: off; else also save when this much time passed since the last save
    keep_checkpoints: int = 2
    select_metric: str = "rsum"
    nonfinite: str = "stop"  # a non-finite loss or gradient norm: "stop" the run, or "skip" the update
    max_nonfinite_skips: int = 10  # with nonfinite="skip": stop when more steps than this were skipped
    max_steps: int | None = None  # stop after this many optimiser steps (debugging)
    abort_after_steps: int | None = None  # hard-exit after this many steps, to test resuming (debugging)
    max_logit_scale: float = 100.0
    official_gather: bool = False  # True: the official gather backward (local slice, no sum; spec §4)
    resume: str | None = None  # null | "latest" | a run folder | a checkpoints/step_* folder
    mixed_precision: str | None = None  # null: the launcher's setting
    cpu: bool = False
    compile: bool = False  # torch.compile the encoder towers (RetrievalModel.compile_encoders); read by the recipe
    compile_backend: str = "inductor"
    compile_mode: str | None = None

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        at_least = {"epochs": 1, "grad_accum": 1, "log_every": 1, "checkpoint_every_steps": 0, "keep_checkpoints": 0}
        at_least |= {"max_grad_norm": 0, "checkpoint_every_minutes": 0, "max_nonfinite_skips": 0, "max_logit_scale": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be >= {low}")
        for name in ("max_steps", "abort_after_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be >= 1 or null")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"trainer.nonfinite={self.nonfinite!r}: choose stop or skip")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"trainer.select_metric={self.select_metric!r}: choose one of {', '.join(SELECT_METRICS)}")


def selection_score(metrics: dict[str, dict[str, float]], name: str) -> float:
    """Model-selection score (higher is better): "rsum" (R@1+R@5+R@10 of both directions) or "<direction>/R@K"."""
    if name == "rsum":
        return sum(m[k] for m in metrics.values() for k in ("R@1", "R@5", "R@10"))
    direction, _, metric = name.partition("/")
    return metrics[direction][metric]


def as_published_best(history: list[dict], metric: str = "R@1") -> dict | None:
    """What the official code would report: for each direction its best epoch on the test split, chosen
    independently (its "FINAL BEST RESULTS", spec §7, over end-of-epoch evaluations).

    Args:
        history: ``TrainState.history``; the entries holding ``epoch_test/<direction>/<metric>`` (written when
            ``fit`` gets ``test_each_epoch``) are searched. A tie goes to the later epoch, as the official ``<=``.
        metric: the key compared (the official code: R@1).

    Returns:
        ``{"note": ..., "t2v": {"epoch", "step", R@1, ...}, "v2t": {...}}``, or None when no epoch was tested.
    """
    tested = [h for h in history if f"{EPOCH_TEST}/t2v/{metric}" in h]
    if not tested:
        return None
    report: dict = {"note": TEST_SELECTED_NOTE, "metric": metric}
    for direction in ("t2v", "v2t"):
        key = f"{EPOCH_TEST}/{direction}/{metric}"
        best = max(reversed(tested), key=lambda h: h[key])  # max keeps the first maximum: reversed -> the latest
        prefix = f"{EPOCH_TEST}/{direction}/"
        report[direction] = {"epoch": best["epoch"], "step": best["step"]} | {
            k.removeprefix(prefix): v for k, v in best.items() if k.startswith(prefix)
        }
    return report


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


@torch.no_grad()
def _encoded(accelerator: Accelerator, step: nn.Module, loader: DataLoader):
    """(gathered features, caption ids) of every batch of `loader`, encoded in eval mode without gradients."""
    model = accelerator.unwrap_model(step).model
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            features = step(batch, encode_only=True)
            yield features, features["caption_index"]
    finally:
        model.train(was_training)


def train_one_epoch(
    accelerator: Accelerator,
    step: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loader: DataLoader,
    state: TrainState,
    cfg: FitConfig,
    log_metrics: MetricsLog,
    refill_loader: DataLoader | None = None,
    stop: StopRequest | None = None,
) -> bool:
    """Runs the rest of epoch `state.epoch`; returns False when a step limit ended training early.

    Args:
        step: the prepared TrainStep (model + objective).
        refill_loader: the batches the objective's `refill` takes at the start of the epoch (its memory bank).
        stop: polled after every step; a signal saves a checkpoint and raises `Preempted`, a due time saves one.
    """
    unwrapped: TrainStep = accelerator.unwrap_model(step)
    objective = unwrapped.objective
    set_epoch(loader, state.epoch)  # before the refill, which reads the same dataset (frame draws per epoch)
    if objective.refill_batches and state.batches_in_epoch == 0:  # a mid-epoch resume restores the state instead
        objective.refill(_encoded(accelerator, step, refill_loader))
    step.train()
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
        state.skipped_videos += _skipped_videos(accelerator, batch)
        losses, gathered = backward_step(accelerator, step, batch, cfg.grad_accum)
        lr = _current_lr(optimizer)  # the rate this update uses, read before the schedule moves on
        if _check_finite(accelerator, step, losses, state, cfg):
            # After the backward, as the official code: the batch is never its own neighbour.
            objective.update(gathered, gathered["caption_index"])
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        unwrapped.model.clamp_logit_scale(cfg.max_logit_scale)
        state.batches_in_epoch += 1
        state.global_step += 1
        clips += len(gathered["caption_index"])
        tic = time.perf_counter()
        busy += tic - got
        bar.update(1)
        if state.global_step % cfg.log_every == 0 or state.global_step == 1:
            logs = {f"train/{k}": v.item() for k, v in losses.items()}
            logs |= {
                "train/lr": lr,
                "train/logit_scale": unwrapped.model.logit_scale.exp().item(),
                "train/clips_per_s": clips / max(wait + busy, 1e-9),
                "train/data_wait": wait / max(wait + busy, 1e-9),
                "train/skipped_videos": state.skipped_videos,
                "train/nonfinite_skipped": state.nonfinite_skipped,
                "epoch": state.epoch,
            }
            log_metrics(logs, step=state.global_step)
            bar.set_postfix(
                loss=f"{logs['train/loss']:.3f}",
                lr=f"{logs['train/lr']:.1e}",
                clips_s=f"{logs['train/clips_per_s']:.1f}",
                wait=f"{100 * logs['train/data_wait']:.0f}%",
            )
            wait = busy = 0.0
            clips = 0
        stopping, due = stop.poll() if stop is not None else (False, False)
        if due or stopping or (cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0):
            saved = save_checkpoint(accelerator, step, optimizer, scheduler, state, cfg.run_dir, cfg.keep_checkpoints)
            if stop is not None:
                stop.saved()
            if stopping:
                bar.close()
                raise Preempted(stop.signame, saved)
        if cfg.abort_after_steps is not None and state.global_step >= cfg.abort_after_steps:
            accelerator.print(f"abort_after_steps={cfg.abort_after_steps}: exiting without cleanup")
            os._exit(3)  # simulates a killed job: nothing is flushed or saved
        if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
            bar.close()
            return False
    bar.close()
    return True


def _skipped_videos(accelerator: Accelerator, batch: dict) -> int:
    """Items of `batch` (on all processes) the dataset substituted for videos that failed to decode
    (data.skip_bad_videos=true); removes the marker from the batch."""
    if "skipped" not in batch:
        return 0
    return int(accelerator.reduce(batch.pop("skipped").sum(), "sum").item())


def _check_finite(accelerator: Accelerator, step: nn.Module, losses: dict, state: TrainState, cfg: FitConfig) -> bool:
    """Clips the gradients and says whether the update may go ahead. A NaN/inf loss term or gradient norm stops
    the run (`cfg.nonfinite="stop"`) or drops this update (`"skip"`, up to `cfg.max_nonfinite_skips` times),
    before anything is updated. Under fp16 an infinite gradient norm is the gradient scaler's business: it
    skips the step and lowers its scale. Every process sees the same loss and all-reduced gradients, so all
    decide alike."""
    norm = accelerator.clip_grad_norm_(step.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    values = {k: v.item() for k, v in losses.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    norm = float(norm) if norm is not None else 0.0
    if not math.isfinite(norm) and accelerator.scaler is None:
        bad["gradient norm"] = norm
    if accelerator.num_processes > 1:  # one collective more, so that no rank can decide otherwise
        flag = accelerator.reduce(torch.tensor(float(bool(bad)), device=accelerator.device), "max")
        if flag.item() and not bad:
            bad["on another process: loss"] = math.nan
    if not bad:
        return True
    found = ", ".join(f"{k}={v}" for k, v in bad.items())
    if cfg.nonfinite == "skip" and state.nonfinite_skipped < cfg.max_nonfinite_skips:
        state.nonfinite_skipped += 1
        log.warning(
            "step %d: non-finite %s; update skipped (%d so far)", state.global_step + 1, found, state.nonfinite_skipped
        )
        if accelerator.scaler is not None:  # the unscale in clip_grad_norm_ must be closed by an update
            accelerator.scaler.update()
        return False
    saved = checkpoint_dirs(cfg.run_dir)
    last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
    limit = (
        f" after {state.nonfinite_skipped} skipped step(s) (trainer.max_nonfinite_skips)"
        if cfg.nonfinite == "skip"
        else ""
    )
    raise NonFiniteError(
        f"step {state.global_step + 1}: non-finite {found}{limit}; stopped before the update, {last}. Resume it with "
        "a lower trainer.max_grad_norm or trainer.nonfinite=skip, or start a new run with a lower optim.lr"
    )


def save_best(accelerator: Accelerator, step: nn.Module, run_dir: Path) -> None:
    """Writes the selected model's weights (the retrieval model alone, not the objective) to run_dir/best/model.pt;
    every rank takes part, which sharded setups need to assemble the full state dict."""
    state = accelerator.get_state_dict(step)
    if accelerator.is_main_process:
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        path = run_dir / "best" / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(weights, path.with_suffix(".pt.tmp"))
        os.replace(path.with_suffix(".pt.tmp"), path)  # a kill mid-write leaves the previous best intact
    accelerator.wait_for_everyone()


def fit(
    accelerator: Accelerator,
    step: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_loader: DataLoader,
    validate: Validator,
    state: TrainState,
    cfg: FitConfig,
    log_metrics: MetricsLog,
    refill_loader: DataLoader | None = None,
    test_each_epoch: Validator | None = None,
) -> TrainState:
    """Trains from `state` to `cfg.epochs`, validating after every epoch and keeping the best model by
    `cfg.select_metric` (computed on the validation split only) in run_dir/best.

    Args:
        step: the prepared TrainStep (the model and its objective).
        refill_loader: needed when the objective keeps state refilled every epoch (`refill_batches` > 0).
        test_each_epoch: also scores the test split after every validation (eval.as_published); its numbers are
            logged and kept in the history under `epoch_test/` for :func:`as_published_best`, never selected on.
    """
    objective = accelerator.unwrap_model(step).objective
    if objective.refill_batches and refill_loader is None:
        raise ValueError(
            f"{type(objective).__name__} refills its memory bank from {objective.refill_batches} training batches "
            "every epoch: pass refill_loader"
        )

    def save() -> Path:
        return save_checkpoint(accelerator, step, optimizer, scheduler, state, cfg.run_dir, cfg.keep_checkpoints)

    with StopRequest(accelerator, cfg.checkpoint_every_minutes) as stop:
        while state.epoch < cfg.epochs:
            finished = _stop_on_lost_workers(
                stop,
                save,
                lambda: train_one_epoch(
                    accelerator, step, optimizer, scheduler, train_loader, state, cfg, log_metrics, refill_loader, stop
                ),
            )
            if stop.poll()[0]:  # a signal during the last step: save the trained epoch, validate after the resume
                raise Preempted(stop.signame, save())
            metrics = _stop_on_lost_workers(stop, save, validate)
            # Every rank scores the full matrix; take the main process's value so all ranks agree on "improved".
            score = broadcast_object_list([selection_score(metrics, cfg.select_metric)])[0]
            flat = {f"val/{d}/{k}": v for d, m in metrics.items() for k, v in m.items()}
            if test_each_epoch is not None:
                tested = _stop_on_lost_workers(stop, save, test_each_epoch)
                flat |= {f"{EPOCH_TEST}/{d}/{k}": v for d, m in tested.items() for k, v in m.items()}
            log_metrics(flat | {"val/score": score, "epoch": state.epoch}, step=state.global_step)
            state.history.append({"epoch": state.epoch, "step": state.global_step, "score": score, **flat})
            improved = score > state.best_score
            if improved:
                state.best_score, state.best_epoch = score, state.epoch
                save_best(accelerator, step, cfg.run_dir)
            accelerator.print(
                f"epoch {state.epoch}: val {cfg.select_metric}={score:.2f} "
                f"(t2v R@1 {metrics['t2v']['R@1']:.1f}, v2t R@1 {metrics['v2t']['R@1']:.1f})"
                + (" *best*" if improved else "")
            )
            if finished:
                state.epoch += 1
                state.batches_in_epoch = 0
            saved = save()
            stop.saved()
            if stop.poll()[0]:  # a signal during validation
                raise Preempted(stop.signame, saved)
            if not finished:
                break
    return state


def _stop_on_lost_workers(stop: StopRequest, save: Callable[[], Path], work: Callable):
    """`work()`, except that loader workers killed by the stop signal (sent to the whole process group, as a
    scheduler does) end the run as a stop: the loop state counts only the batches already used, so the checkpoint
    saved here resumes exactly."""
    try:
        return work()
    except RuntimeError as err:
        if stop.signame is None or "DataLoader worker" not in str(err):
            raise
        raise Preempted(stop.signame, save()) from err


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
