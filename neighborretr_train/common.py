"""Setup steps shared by the recipes: each builds one thing from the config."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, broadcast_object_list
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from neighborretr.checkpoint import CheckpointError
from neighborretr.data.annotations import AnnotationError, Record
from neighborretr.data.module import VideoTextData
from neighborretr.data.video_io import VideoDecodeError
from neighborretr.engine import NonFiniteError
from neighborretr.eval.hubness import METHODS
from neighborretr.eval.pipeline import evaluate_report
from neighborretr.preemption import PREEMPTED_EXIT, Preempted
from neighborretr_train import config_dir
from neighborretr_train.schema import ConfigError, SchemaError

log = logging.getLogger("neighborretr")
# Accelerate logs every file it writes at INFO; keep the console for progress and results.
logging.getLogger("accelerate").setLevel(logging.WARNING)

# Engines the loop is written and tested for; sharded ones (FSDP, DeepSpeed) would need the loss inside a
# sharded forward and full state dicts for evaluation, which are not implemented.
SUPPORTED_ENGINES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


CLAIM = "config.yaml"  # the file whose exclusive creation makes a folder a run's own


# Errors a user can fix from the message alone.
USER_ERRORS = (AnnotationError, FileNotFoundError, ConfigError, SchemaError, CheckpointError, NonFiniteError)


def _one_line(err: Exception) -> str:
    """The message of `err`; for an error re-raised from a DataLoader worker (whose message carries the worker's
    traceback), its last line, which is the original message."""
    text = str(err)
    if "Original Traceback" in text:
        kind, _, message = text.strip().splitlines()[-1].partition(": ")  # "package.module.Error: message"
        return message if kind.endswith(type(err).__name__) else f"{kind}: {message}"
    return text


def user_errors(main: Callable) -> Callable:
    """Turns errors a user can fix (bad paths, malformed files, inconsistent settings) into a one-paragraph
    message and exit status 1 instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Preempted as stop:
            print(
                f"{stop}; continue it with trainer.resume={stop.checkpoint.parent.parent} (or trainer.resume=latest)",
                file=sys.stderr,
            )
            raise SystemExit(PREEMPTED_EXIT) from stop
        except (*USER_ERRORS, VideoDecodeError) as err:
            raise SystemExit(f"error: {_one_line(err)}") from err

    return wrapper


def build(cfg: DictConfig, key: str, **kwargs):
    """`instantiate(cfg[key], **kwargs)`, with a constructor's refusal (a ValueError naming the bad setting) turned
    into a one-line ConfigError instead of Hydra's wrapped traceback; for a `_partial_` node, also when the
    partial is called (the optimiser and the schedule check their values then)."""
    try:
        built = instantiate(cfg[key], **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ValueError | TypeError):
            raise ConfigError(f"{key}: {cause}") from err
        raise
    if not isinstance(built, functools.partial):
        return built

    @functools.wraps(built)
    def call(*args, **more):
        try:
            return built(*args, **more)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from err

    return call


def hydra_entry(config_name: str, recipe: Callable[[DictConfig], object]) -> Callable[[], object]:
    """The command-line entry point of a recipe: Hydra composes `config_name` from the shipped configs (plus the
    command line) and user errors end as one line and exit status 1."""

    def main(cfg: DictConfig):
        return recipe(cfg)

    main.__module__ = recipe.__module__  # Hydra names the job (and its log file) after the recipe's module
    return hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(user_errors(main))


def setup_accelerator(trainer: DictConfig, logger: str | None = None) -> Accelerator:
    """The Accelerator of a run: precision and device from `trainer`, the tracker named `logger` (or none)."""
    try:
        accelerator = Accelerator(
            mixed_precision=trainer.mixed_precision,
            cpu=trainer.cpu,
            log_with=None if logger in (None, "none") else logger,
            step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimiser step itself
            dataloader_config=DataLoaderConfiguration(even_batches=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
    except ValueError as err:  # e.g. an unknown mixed-precision mode
        raise ConfigError(f"trainer.mixed_precision={trainer.mixed_precision}: {err}") from err
    if accelerator.distributed_type not in SUPPORTED_ENGINES:
        raise ConfigError(
            f"accelerate's {accelerator.distributed_type} engine is not supported; use plain data parallel "
            "(accelerate launch --multi_gpu, or torchrun) on one or several nodes, and trainer.grad_accum to save "
            "memory"
        )
    return accelerator


def _claim(candidate: Path, suffix: bool) -> Path:
    """Creates `candidate` and claims it by creating its config.yaml exclusively; when another run holds it,
    tries `<name>-1`, `<name>-2`, ... (`suffix`) or refuses."""
    for n in itertools.count():
        path = candidate if n == 0 else candidate.with_name(f"{candidate.name}-{n}")
        path.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(path / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return path
        except FileExistsError:
            if not suffix:
                raise ConfigError(
                    f"output_dir={candidate} already holds a run ({CLAIM}): continue it with "
                    f"trainer.resume={candidate} or choose another folder"
                ) from None
    raise AssertionError("unreachable")


def claim_run_dir(cfg: DictConfig, parent: Path) -> Path:
    """A folder no other run writes to: `cfg.output_dir` when set (refused when it holds a run), Hydra's job folder
    in a multirun, else `<parent>/<date_time>`; a folder taken by another run started in the same second gets a
    `-1`, `-2`, ... suffix."""
    if cfg.output_dir:
        return _claim(Path(cfg.output_dir), suffix=False)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return _claim(Path(HydraConfig.get().runtime.output_dir), suffix=True)
    return _claim(parent / time.strftime("%Y-%m-%d_%H-%M-%S"), suffix=True)


def create_run_dir(cfg: DictConfig, accelerator: Accelerator, parent: Path) -> Path:
    """`claim_run_dir` on the main process only, the folder (or its refusal) told to every process."""
    found: list = [None, None]
    if accelerator.is_main_process:
        try:
            found[0] = claim_run_dir(cfg, parent)
        except (ConfigError, OSError) as err:
            found[1] = f"{err}"
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    if found[1]:
        raise ConfigError(found[1])
    return Path(found[0])


class RunLock:
    """An exclusive lock on `<run folder>/.lock`, held by the main process while it trains the run, so that a
    second live process (a straggler beside a requeued job) cannot continue the same run. A context manager:
    the lock goes when the recipe returns or fails; the operating system drops it when the process dies."""

    def __init__(self):
        self.handle = None

    def acquire(self, accelerator: Accelerator, run_dir: Path) -> None:
        error = [None]
        if accelerator.is_main_process:
            handle = open(run_dir / ".lock", "a")  # noqa: SIM115  (held open for the run's lifetime)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.handle = handle
            except OSError:
                handle.close()
                error[0] = f"{run_dir} is being trained by another live process (it holds {run_dir / '.lock'})"
        if accelerator.num_processes > 1:
            broadcast_object_list(error)
        if error[0]:
            raise ConfigError(error[0])

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def log_to_file(accelerator: Accelerator, path: Path) -> None:
    """Copies the console log of the main process to `path` (the run folder's log), replacing the file of an
    earlier run of this process (the jobs of a multirun, in-process calls)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "neighborretr_run_log", False)]:
        root.removeHandler(handler)
        handler.close()
    if accelerator.is_main_process:
        handler = logging.FileHandler(path)
        handler.neighborretr_run_log = True
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)


def save_config(cfg: DictConfig, run_dir: Path, name: str, accelerator: Accelerator) -> None:
    """`<name>.yaml` (resolved, what ran) and `<name>.unresolved.yaml` (interpolations kept, for re-use)."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / f"{name}.yaml", resolve=True)
        OmegaConf.save(cfg, run_dir / f"{name}.unresolved.yaml", resolve=False)


def setup_tracker(accelerator: Accelerator, cfg: DictConfig, run_dir: Path, job_type: str) -> None:
    if cfg.logger.name == "none":
        return
    wandb_kwargs = {
        "name": f"{cfg.run_name}-{run_dir.name}",
        "group": cfg.logger.group,
        "tags": list(cfg.logger.tags),
        "mode": cfg.logger.mode,
        "dir": str(run_dir),
        "job_type": job_type,
    }
    if cfg.logger.entity:
        wandb_kwargs["entity"] = cfg.logger.entity
    accelerator.init_trackers(
        cfg.logger.project, config=OmegaConf.to_container(cfg, resolve=True), init_kwargs={"wandb": wandb_kwargs}
    )


def setup_records(data: VideoTextData, splits: list[str], accelerator: Accelerator) -> dict[str, list[Record]]:
    """Every split's records after the pre-flight check: stops before training with the list of missing or
    undecodable videos, or drops them with `data.skip_bad_videos=true`. The main process decodes and tells the
    others."""
    try:
        records = {split: data.records(split) for split in splits}
    except ValueError as err:  # an unknown split or a parser option the benchmark does not take
        raise ConfigError(str(err)) from err
    if not data.check_videos:
        return records
    bad = [None]
    if accelerator.is_main_process:
        bad = [data.bad_videos([r for rs in records.values() for r in rs])]
    if accelerator.num_processes > 1:
        broadcast_object_list(bad)
    bad = bad[0]
    if not bad:
        return records
    listing = "\n".join(f"  {video_id}: {reason}" for video_id, reason in sorted(bad.items())[:50])
    more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
    if not data.skip_bad_videos:
        raise SystemExit(
            f"{len(bad)} video(s) are missing or cannot be decoded:\n{listing}{more}\n"
            f"Fix: check data.video_dir={data.video_dir} (see data/README.md), re-encode the broken files "
            "(neighborretr-prepare-videos), or pass data.skip_bad_videos=true to train without them. "
            "neighborretr-validate-data writes a full report."
        )
    log.warning("data.skip_bad_videos=true: skipping %d bad video(s):\n%s%s", len(bad), listing, more)
    return {s: [r for r in rs if r.video_id not in bad] for s, rs in records.items()}


def check_model_data(model, data: VideoTextData) -> None:
    positions = model.temporal.frame_position_embeddings.num_embeddings
    if data.max_frames > positions:
        raise ConfigError(f"data.max_frames={data.max_frames} exceeds the model's {positions} frame positions")
    if model.image_size != data.image_size:
        raise ConfigError(f"data.image_size={data.image_size} but the model expects {model.image_size} px frames")
    if data.max_words > model.context_length:
        raise ConfigError(f"data.max_words={data.max_words} exceeds the text context {model.context_length}")


def bank_cache_path(data: VideoTextData, eval_cfg: DictConfig, weights: Path) -> Path:
    """A cache file beside the weights, named by the weights' identity and every setting the banks depend on."""
    stat = weights.stat()
    key = {
        "weights": [str(weights.resolve()), stat.st_size, stat.st_mtime_ns],
        "data": data.describe(),
        "bank": [eval_cfg.query_bank_size, eval_cfg.gallery_bank_size, eval_cfg.bank_seed],
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return weights.parent / f"bank_features_{digest}.pt"


def check_methods(eval_cfg: DictConfig) -> None:
    unknown = sorted(set(eval_cfg.normalizations) - set(METHODS))
    if unknown:
        raise ConfigError(f"eval.normalizations: unknown {unknown}; choose from {', '.join(METHODS)}")


class Evaluator:
    """The one evaluation path: per-epoch validation (raw scores) and the final test (raw and every configured
    normalisation, whose β/τ are chosen on the validation split with training-split banks)."""

    def __init__(self, accelerator: Accelerator, data: VideoTextData, eval_cfg: DictConfig, records: dict):
        check_methods(eval_cfg)
        self.accelerator, self.data, self.cfg = accelerator, data, eval_cfg
        self.loaders = {s: accelerator.prepare(*data.eval_loaders(r)) for s, r in records.items() if s != "train"}
        self.train_records = records.get("train")

    @property
    def methods(self) -> list[str]:
        return list(self.cfg.normalizations)

    def __call__(self, model, split: str, methods: list[str] | None = None, weights: Path | None = None) -> dict:
        """The report of `split` (see `evaluate_report`); `weights` names the bank-feature cache."""
        methods = methods or ["none"]
        banks = val = None
        if any(m != "none" for m in methods):
            if self.train_records is None:
                raise ConfigError("hubness normalisation needs the training split (for its banks)")
            c = self.cfg
            loaders = self.data.bank_loaders(self.train_records, c.query_bank_size, c.gallery_bank_size, c.bank_seed)
            banks, val = self.accelerator.prepare(*loaders), self.loaders["val"]
        return evaluate_report(
            self.accelerator,
            model,
            self.loaders[split],
            methods,
            val_loaders=val,
            bank_loaders=banks,
            bank_cache=bank_cache_path(self.data, self.cfg, weights) if banks and weights else None,
            k=self.cfg.k,
            chunk_size=self.cfg.chunk_size,
            v2t_protocol=self.cfg.v2t_protocol,
        )
