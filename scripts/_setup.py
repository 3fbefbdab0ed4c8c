"""Config -> objects, shared by the entry points. The only place (with the scripts) that reads Hydra configs."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list, set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from neighborretr.data.annotations import PARSERS, AnnotationError, Record
from neighborretr.data.dataset import VideoTextDataset
from neighborretr.data.sampler import EpochShuffleSampler
from neighborretr.data.validation import find_bad_videos
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import VideoDecodeError
from neighborretr.engine import BankFeeder
from neighborretr.memory_bank import MemoryBank

log = logging.getLogger("neighborretr")
# Accelerate logs every file it writes at INFO; keep the console for progress and results.
logging.getLogger("accelerate").setLevel(logging.WARNING)


def _rank_zero_dir(path: str) -> str:
    """Hydra's run dir on the main process; a throw-away dir on the others, which all write to the main
    process's dir (broadcast in `shared_run_dir`), so a multi-process run has exactly one run folder."""
    if os.environ.get("RANK", "0") == "0":
        return path
    return tempfile.mkdtemp(prefix="neighborretr_rank")


OmegaConf.register_new_resolver("rank_zero_dir", _rank_zero_dir, replace=True, use_cache=True)


def user_errors(main: Callable) -> Callable:
    """Turns errors a user can fix (bad paths, malformed files, inconsistent settings) into a one-paragraph
    message and exit status 1 instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (AnnotationError, FileNotFoundError, VideoDecodeError, ConfigError) as err:
            raise SystemExit(f"error: {err}") from err

    return wrapper


class ConfigError(ValueError):
    """Settings that cannot work together."""


def make_accelerator(cfg: DictConfig, with_tracker: bool) -> Accelerator:
    logger = cfg.logger.name if with_tracker and cfg.logger.name != "none" else None
    return Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        gradient_accumulation_steps=cfg.trainer.get("grad_accum", 1),
        cpu=cfg.trainer.get("cpu", False),
        log_with=logger,
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimiser step itself
        dataloader_config=DataLoaderConfiguration(even_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def shared_run_dir(accelerator: Accelerator) -> Path:
    """The main process's Hydra output dir, known to every process."""
    path = [HydraConfig.get().runtime.output_dir if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(path)
    return Path(path[0])


PARSER_OPTIONS = ("train_list", "val_videos", "val_seed")  # data.* keys passed to the parsers that take them


def records(cfg: DictConfig, split: str) -> list[Record]:
    parser = PARSERS.get(cfg.data.benchmark)
    if parser is None:
        raise ConfigError(f"data.benchmark={cfg.data.benchmark!r} has no parser; available: {sorted(PARSERS)}")
    options = {k: cfg.data[k] for k in PARSER_OPTIONS if k in cfg.data}
    accepted = inspect.signature(parser).parameters
    extra = sorted(set(options) - set(accepted))
    if extra:
        raise ConfigError(f"data.benchmark={cfg.data.benchmark} does not use data.{', data.'.join(extra)}; remove it")
    return parser(cfg.data.root, split, **options)


@functools.cache
def video_index(video_dir: str) -> VideoIndex:
    """One scan of the video folder per process, shared by every dataset."""
    return VideoIndex(video_dir)


def check_videos(cfg: DictConfig, split_records: dict[str, list[Record]], accelerator: Accelerator):
    """Stops before training with the list of missing/undecodable videos, or drops them when
    data.skip_bad_videos=true. The main process decodes the frames evaluation reads of every video, with
    data.num_workers processes, and tells the others."""
    if not cfg.data.check_videos:
        return split_records
    every = [r for rs in split_records.values() for r in rs]
    bad = [None]
    if accelerator.is_main_process:
        d = cfg.data
        videos = video_index(d.video_dir)
        framerate = d.get("video_framerate")
        bad = [find_bad_videos(every, videos, d.backend, True, d.num_workers, d.max_frames, framerate)]
    if accelerator.num_processes > 1:
        broadcast_object_list(bad)
    bad = bad[0]
    if not bad:
        return split_records
    listing = "\n".join(f"  {video_id}: {reason}" for video_id, reason in sorted(bad.items())[:50])
    more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
    if not cfg.data.skip_bad_videos:
        raise SystemExit(
            f"{len(bad)} video(s) are missing or cannot be decoded:\n{listing}{more}\n"
            f"Fix: check data.video_dir={cfg.data.video_dir} (see data/README.md), re-encode the broken files "
            "(scripts/prepare_videos.py), or pass data.skip_bad_videos=true to train without them. "
            "scripts/validate_data.py writes a full report."
        )
    kept = {s: [r for r in rs if r.video_id not in bad] for s, rs in split_records.items()}
    log.warning("data.skip_bad_videos=true: skipping %d bad video(s):\n%s%s", len(bad), listing, more)
    return kept


@functools.cache
def _augment(config: str | None):
    if not config:
        return None
    from neighborretr.data.augment import ClipRandAugment

    return ClipRandAugment(config)


def _dataset(cfg: DictConfig, recs: list[Record], train: bool, **kwargs) -> VideoTextDataset:
    d = cfg.data
    if kwargs.get("load_video", True):
        # .get: runs saved before these keys existed keep the behaviour they were trained with
        kwargs.update(
            videos=video_index(d.video_dir),
            sampling=d.get("train_sampling", "random") if train else d.get("eval_sampling", "uniform"),
            framerate=d.get("video_framerate"),
            augment=_augment(d.get("rand_augment")) if train else None,
        )
    return VideoTextDataset(
        recs,
        d.video_dir,
        d.max_words,
        d.max_frames,
        d.image_size,
        train=train,
        backend=d.backend,
        seed=cfg.seed,
        **kwargs,
    )


def per_device_batch(cfg: DictConfig, accelerator: Accelerator) -> int:
    share = accelerator.num_processes * accelerator.gradient_accumulation_steps
    if cfg.data.batch_size % share:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (global) is not divisible by processes x grad_accum = {share}"
        )
    return cfg.data.batch_size // share


def train_loader(cfg: DictConfig, recs: list[Record], accelerator: Accelerator) -> DataLoader:
    dataset = _dataset(cfg, recs, train=True)
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_size=per_device_batch(cfg, accelerator),
        sampler=EpochShuffleSampler(len(dataset), seed=cfg.seed),
        drop_last=True,  # the gathered global batch must have the same size on every rank
        num_workers=workers,
        persistent_workers=False,  # workers must see the dataset's epoch, set before each epoch
        pin_memory=accelerator.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def _first_per_video(recs: list[Record]) -> list[Record]:
    return list({r.video_id: r for r in reversed(recs)}.values())


def _eval_pair(cfg: DictConfig, text_recs: list[Record], video_recs: list[Record]) -> tuple[DataLoader, DataLoader]:
    texts = _dataset(cfg, text_recs, train=False, load_video=False)
    videos = _dataset(cfg, video_recs, train=False, load_text=False)
    kw = dict(batch_size=cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    return DataLoader(texts, **kw), DataLoader(videos, **kw)


def eval_loaders(cfg: DictConfig, recs: list[Record]) -> tuple[DataLoader, DataLoader]:
    """(captions loader, distinct-videos loader); every caption and every video is encoded once."""
    if not recs:
        raise ConfigError("the evaluation split is empty (for a held-out validation split, set data.val_videos > 0)")
    return _eval_pair(cfg, recs, _first_per_video(recs))


def _subsample(items: list, size: int | None, seed: int) -> list:
    if size is None or size >= len(items):
        return items
    keep = sorted(np.random.default_rng(seed).permutation(len(items))[:size].tolist())
    return [items[i] for i in keep]


def bank_records(cfg: DictConfig, train: list[Record]) -> tuple[list[Record], list[Record]]:
    """Training-split banks: (query-bank captions, gallery-bank videos), each subsampled with eval.bank_seed."""
    captions = _subsample(train, cfg.eval.query_bank_size, cfg.eval.bank_seed)
    videos = _subsample(
        _first_per_video(sorted(train, key=lambda r: r.video_id)), cfg.eval.gallery_bank_size, cfg.eval.bank_seed
    )
    return captions, videos


def bank_loaders(cfg: DictConfig, banks: tuple[list[Record], list[Record]]) -> tuple[DataLoader, DataLoader]:
    return _eval_pair(cfg, *banks)


def bank_cache_path(cfg: DictConfig, weights: Path) -> Path:
    """A cache file beside the weights, named by the weights' identity and every setting the banks depend on."""
    stat = weights.stat()
    key = {
        "weights": [str(weights.resolve()), stat.st_size, stat.st_mtime_ns],
        "data": [str(cfg.data.root), cfg.data.max_words, cfg.data.max_frames, cfg.data.image_size]
        + [cfg.data.get("eval_sampling", "uniform"), cfg.data.get("video_framerate")],
        "bank": [cfg.eval.query_bank_size, cfg.eval.gallery_bank_size, cfg.eval.bank_seed],
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return weights.parent / f"bank_features_{digest}.pt"


def needs_banks(cfg: DictConfig) -> bool:
    return any(m != "none" for m in cfg.eval.normalizations)


def check_model_data(model, cfg: DictConfig) -> None:
    positions = model.temporal.frame_position_embeddings.num_embeddings
    if cfg.data.max_frames > positions:
        raise ConfigError(f"data.max_frames={cfg.data.max_frames} exceeds the model's {positions} frame positions")
    if model.image_size != cfg.data.image_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} but the model expects {model.image_size} px frames")
    if cfg.data.max_words > model.context_length:
        raise ConfigError(f"data.max_words={cfg.data.max_words} exceeds the text context {model.context_length}")


def memory_bank_feeder(cfg: DictConfig, criterion, model, train: DataLoader, accelerator: Accelerator):
    """The memory bank (on the device) and its refill loader: the first `loss.mb_batch` global batches of a fixed
    seeded subset of the training set, re-drawn (frames) every epoch; None for losses without a bank."""
    if not getattr(criterion, "uses_memory_bank", False):
        return None
    unwrapped = accelerator.unwrap_model(model)
    if not getattr(unwrapped, "high_level", False):
        raise ConfigError("this loss needs the model's high level: set model.high_level=true")
    k = cfg.loss.criterion.get("num_neighbors", 0)
    if cfg.data.batch_size < k + 2:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be >= loss.criterion.num_neighbors + 2 = {k + 2}"
        )
    dataset = train.dataset
    count = min(len(dataset), cfg.loss.mb_batch * cfg.data.batch_size)
    indices = np.random.default_rng(cfg.seed).permutation(len(dataset))[:count].tolist()
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=per_device_batch(cfg, accelerator),
        shuffle=False,
        drop_last=True,
        num_workers=cfg.data.num_workers,
    )
    dim = unwrapped.embed_dim
    bank = MemoryBank(cfg.loss.memory_size, (cfg.data.max_words, dim), (cfg.data.max_frames, dim))
    return BankFeeder(bank.to(accelerator.device), accelerator.prepare(loader))


def build_model(cfg: DictConfig):
    return hydra.utils.instantiate(cfg.model)


def init_tracker(accelerator: Accelerator, cfg: DictConfig, run_dir: Path, job_type: str) -> None:
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


def seed_everything(cfg: DictConfig) -> None:
    set_seed(cfg.seed)
