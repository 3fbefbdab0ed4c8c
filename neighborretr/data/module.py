"""The data settings of a run and the loaders built from them (configs/data/*.yaml is this class's `_target_`)."""

from __future__ import annotations

import functools
import inspect
import math
import signal

import numpy as np
from torch.utils.data import DataLoader, Subset

from neighborretr.data.annotations import PARSERS, Record
from neighborretr.data.dataset import VideoTextDataset
from neighborretr.data.frame_cache import CacheRequest, CacheSpec, FrameCache, cache_key, cache_requests
from neighborretr.data.sampler import EpochShuffleSampler
from neighborretr.data.validation import find_bad_videos
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import BACKENDS, SAMPLING_MODES, check_backend

Loaders = tuple[DataLoader, DataLoader]  # (captions, distinct videos)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGINT: a Ctrl-C reaches the whole foreground process group, and the main process
    finishes its step and saves. SIGTERM keeps its default (multiprocessing ends workers with it at exit); the loop
    takes a worker killed by a stop signal as that stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def first_per_video(records: list[Record]) -> list[Record]:
    """One record per video id (its first one)."""
    return list({r.video_id: r for r in reversed(records)}.values())


def subsample(items: list, size: int | None, seed: int) -> list:
    """`size` items drawn without replacement with `seed`, in their original order; all of them when None."""
    if size is None or size >= len(items):
        return items
    keep = sorted(np.random.default_rng(seed).permutation(len(items))[:size].tolist())
    return [items[i] for i in keep]


class VideoTextData:
    """One benchmark's annotations and videos, and every loader a run needs.

    Args:
        benchmark: the annotation parser (`neighborretr.data.annotations.PARSERS`).
        root: the folder of the annotation files; video_dir: the videos (searched recursively, any container).
        max_words, max_frames, image_size: caption tokens, frames per clip, frame side in pixels.
        backend: video decoder, "pyav" (default: needs nothing but the package), "torchcodec" (needs the system's
            FFmpeg libraries) or "decord" (the optional extra neighborretr[decord]); refused at once, with what to
            install, when it cannot load here.
        decode_device: where torchcodec decodes: "cpu", or "cuda" / "cuda:N" (NVDEC; loader workers are then
            spawned, since CUDA cannot start in forked ones).
        frame_cache: a folder built by neighborretr-cache-frames from these settings, or None: clips it holds are
            read from it (the same frames as decoding), the rest decoded; refused when built for other settings.
        batch_size: the global batch over all processes; eval_batch_size: per process.
        num_workers: loader processes per process.
        check_videos: decode every video's evaluation frames before training.
        skip_bad_videos: go on without bad videos instead of stopping: the recipe's pre-flight check drops them,
            and a training video that fails at run time (check_videos=false, or a file that rots mid-run) is
            logged and its item replaced by the next good one, counted as `skipped` (logged as
            train/skipped_videos). Evaluation never substitutes: a bad evaluation video always stops the run.
        video_framerate: sample from the first frame of every 1/N s; None = every frame.
        train_sampling, eval_sampling: "uniform" | "random" | "head" (see `read_frames`).
        rand_augment: a timm RandAugment string applied identically to every frame of a training clip, or None.
        train_list, val_videos, val_seed: the parser options of the benchmarks that take them (None: not given).
        seed: data order, frame draws and augmentation (with the epoch and the item).
    """

    def __init__(
        self,
        benchmark: str,
        root: str,
        video_dir: str,
        max_words: int = 32,
        max_frames: int = 12,
        image_size: int = 224,
        backend: str = "pyav",
        batch_size: int = 128,
        eval_batch_size: int = 32,
        num_workers: int = 4,
        check_videos: bool = True,
        skip_bad_videos: bool = False,
        video_framerate: float | None = None,
        train_sampling: str = "random",
        eval_sampling: str = "uniform",
        rand_augment: str | None = None,
        train_list: str | None = None,
        val_videos: int | None = None,
        val_seed: int | None = None,
        seed: int = 0,
        frame_cache: str | None = None,
        decode_device: str = "cpu",
    ):
        if benchmark not in PARSERS:
            raise ValueError(f"data.benchmark={benchmark!r} has no parser; available: {sorted(PARSERS)}")
        self.parser = PARSERS[benchmark]
        given = {"train_list": train_list, "val_videos": val_videos, "val_seed": val_seed}
        self.parser_options = {k: v for k, v in given.items() if v is not None}
        accepted = inspect.signature(self.parser).parameters
        extra = sorted(set(self.parser_options) - set(accepted))
        if extra:
            raise ValueError(f"data.benchmark={benchmark} does not use data.{', data.'.join(extra)}; remove it")
        for name, mode in (("train_sampling", train_sampling), ("eval_sampling", eval_sampling)):
            if mode not in SAMPLING_MODES:
                raise ValueError(f"data.{name}={mode!r}: choose one of {', '.join(SAMPLING_MODES)}")
        if backend not in BACKENDS:
            raise ValueError(f"data.backend={backend!r}: choose one of {', '.join(BACKENDS)}")
        check_backend(backend)  # a backend that cannot load here is refused now, saying what to install
        if decode_device != "cpu" and backend != "torchcodec":
            raise ValueError(f"data.decode_device={decode_device}: only data.backend=torchcodec decodes off the CPU")
        if min(batch_size, eval_batch_size, max_words, max_frames) < 1:
            raise ValueError("data.batch_size, eval_batch_size, max_words and max_frames must be >= 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0 (0 loads in the main process)")
        self.benchmark, self.root, self.video_dir = benchmark, str(root), str(video_dir)
        self.max_words, self.max_frames, self.image_size = max_words, max_frames, image_size
        self.backend, self.batch_size, self.eval_batch_size = backend, batch_size, eval_batch_size
        self.num_workers, self.check_videos, self.skip_bad_videos = num_workers, check_videos, skip_bad_videos
        self.video_framerate, self.train_sampling, self.eval_sampling = video_framerate, train_sampling, eval_sampling
        self.rand_augment, self.seed = rand_augment, seed
        self.frame_cache, self.decode_device = frame_cache, decode_device
        _ = self._frame_cache  # a missing cache or one built for other settings is refused now
        try:
            _ = self._augment  # a bad RandAugment string is refused now, not when the first worker starts
        except (ValueError, KeyError, AssertionError) as err:
            raise ValueError(f"data.rand_augment={rand_augment!r}: {err}") from err

    def records(self, split: str) -> list[Record]:
        """The annotation records of a split ("train", "val" or "test")."""
        return self.parser(self.root, split, **self.parser_options)

    @functools.cached_property
    def videos(self) -> VideoIndex:
        """One scan of the video folder, shared by every dataset of this object."""
        return VideoIndex(self.video_dir)

    def bad_videos(self, records: list[Record], progress: bool = True) -> dict[str, str]:
        """{video_id: reason} of every missing or undecodable video among `records` (the evaluation frames). Clips in
        the frame cache are not decoded again: they decoded when it was built, and are read from it."""
        if self._frame_cache is not None:
            records = [r for r in records if cache_key(r.video_id, r.start, r.end) not in self._frame_cache]
        return find_bad_videos(
            records, self.videos, self.backend, progress, self.num_workers, self.max_frames, self.video_framerate
        )

    @functools.cached_property
    def _augment(self):
        if not self.rand_augment:
            return None
        from neighborretr.data.augment import ClipRandAugment

        return ClipRandAugment(self.rand_augment)

    def cache_spec(self) -> CacheSpec:
        """The frame cache these settings read: augmented clips need the frames as decoded ("source" form, see
        `neighborretr.data.frame_cache`), the others are kept at the model's input size."""
        return CacheSpec(
            backend=self.backend,
            framerate=self.video_framerate,
            max_frames=self.max_frames,
            image_size=self.image_size,
            modes=(self.train_sampling, self.eval_sampling),
            form="source" if self.rand_augment else "clip",
        )

    @functools.cached_property
    def _frame_cache(self) -> FrameCache | None:
        if not self.frame_cache:
            return None
        try:
            return FrameCache.open(self.frame_cache, self.cache_spec())
        except FileNotFoundError as err:  # a setting to fix, reported like the other refused settings
            raise ValueError(str(err)) from err

    def cache_requests(self, records: list[Record]) -> list[CacheRequest]:
        """One frame-cache entry per distinct (video, segment) of `records`, with its file (or why there is none)."""
        return cache_requests(records, self.videos)

    def _loader_context(self) -> str | None:
        return "spawn" if self.decode_device != "cpu" and self.num_workers else None

    def dataset(self, records: list[Record], train: bool, **kwargs) -> VideoTextDataset:
        """The dataset of `records` with this object's settings (kwargs: load_text / load_video / skip_bad)."""
        if kwargs.get("load_video", True):
            kwargs.update(
                videos=self.videos,
                sampling=self.train_sampling if train else self.eval_sampling,
                framerate=self.video_framerate,
                augment=self._augment if train else None,
                frame_cache=self._frame_cache,
                decode_device=self.decode_device,
            )
        return VideoTextDataset(
            records,
            self.video_dir,
            self.max_words,
            self.max_frames,
            self.image_size,
            train=train,
            backend=self.backend,
            seed=self.seed,
            **kwargs,
        )

    def per_process_batch(self, num_processes: int) -> int:
        if self.batch_size % num_processes:
            raise ValueError(
                f"data.batch_size={self.batch_size} (global) is not divisible by {num_processes} processes"
            )
        return self.batch_size // num_processes

    def train_loader(self, records: list[Record], num_processes: int, pin_memory: bool = False) -> DataLoader:
        """Shuffled (a new order every epoch, from seed and epoch) full batches of `batch_size / num_processes`."""
        dataset = self.dataset(records, train=True, skip_bad=self.skip_bad_videos)
        return DataLoader(
            dataset,
            batch_size=self.per_process_batch(num_processes),
            sampler=EpochShuffleSampler(len(dataset), seed=self.seed),
            drop_last=True,  # the gathered global batch must have the same size on every rank
            num_workers=self.num_workers,
            persistent_workers=False,  # workers must see the dataset's epoch, set before each epoch
            pin_memory=pin_memory,
            prefetch_factor=4 if self.num_workers else None,
            worker_init_fn=ignore_stop_signals,
            multiprocessing_context=self._loader_context(),
        )

    def refill_loader(
        self, dataset: VideoTextDataset, batches: int, num_processes: int, keep: int | None = None
    ) -> DataLoader:
        """The memory bank's refill batches: the first `batches` global batches of a fixed seeded subset of the
        training `dataset` (frames re-drawn every epoch, since it shares the training dataset).

        With `keep` (the bank's capacity) only the last ceil(keep / batch_size) of those batches are loaded: the
        earlier ones would be pushed out of the bank by the later ones, so the bank ends the same without them.
        With data.skip_bad_videos its batches carry the training dataset's `skipped` key too: the encoder reads only
        the text, video and caption_index keys, so substitutes fill the bank as real pairs and are not counted.
        """
        count = min(len(dataset), batches * self.batch_size) // self.batch_size * self.batch_size
        indices = np.random.default_rng(self.seed).permutation(len(dataset))[:count].tolist()
        if keep is not None:
            indices = indices[-math.ceil(keep / self.batch_size) * self.batch_size :]
        return DataLoader(
            Subset(dataset, indices),
            batch_size=self.per_process_batch(num_processes),
            shuffle=False,
            drop_last=True,
            num_workers=self.num_workers,
            worker_init_fn=ignore_stop_signals,
            multiprocessing_context=self._loader_context(),
        )

    def _pair(self, text_records: list[Record], video_records: list[Record]) -> Loaders:
        texts = self.dataset(text_records, train=False, load_video=False)
        videos = self.dataset(video_records, train=False, load_text=False)
        kw = dict(
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            worker_init_fn=ignore_stop_signals,
            multiprocessing_context=self._loader_context(),
        )
        return DataLoader(texts, **kw), DataLoader(videos, **kw)

    def eval_loaders(self, records: list[Record]) -> Loaders:
        """(captions loader, distinct-videos loader); every caption and every video is encoded once."""
        if not records:
            raise ValueError("the evaluation split is empty (for a held-out validation split, set data.val_videos > 0)")
        return self._pair(records, first_per_video(records))

    def bank_loaders(
        self, train: list[Record], query_bank_size: int | None, gallery_bank_size: int | None, seed: int
    ) -> Loaders:
        """Training-split banks for hubness normalisation: (query-bank captions, gallery-bank videos)."""
        captions = subsample(train, query_bank_size, seed)
        videos = subsample(first_per_video(sorted(train, key=lambda r: r.video_id)), gallery_bank_size, seed)
        return self._pair(captions, videos)

    def describe(self) -> dict:
        """The settings the bank-feature cache depends on."""
        return {
            "root": self.root,
            "words": self.max_words,
            "frames": self.max_frames,
            "size": self.image_size,
            "sampling": self.eval_sampling,
            "framerate": self.video_framerate,
        }
