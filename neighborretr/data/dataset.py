"""The one dataset class every benchmark uses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from neighborretr.data.annotations import Record
from neighborretr.data.frame_cache import FrameCache, cache_key
from neighborretr.data.transforms import CaptionTokenizer, clip_frames
from neighborretr.data.video_files import VideoIndex
from neighborretr.data.video_io import SAMPLING_MODES, VideoDecodeError, read_frames

log = logging.getLogger(__name__)

MAX_SUBSTITUTE_DECODES = 16  # videos tried in turn for a substitute before a run gives up


class VideoTextDataset(Dataset):
    """Caption-video pairs of any benchmark, as dicts of tensors.

    Items hold `text_ids` [L], `text_mask` [L], `video` [T, 3, S, S] (zero-padded), `video_mask` [T],
    `video_index` (position of the video id in the sorted list of distinct ids) and `caption_index` (position of
    the record). `load_text=False` or `load_video=False` leaves those keys out (evaluation encodes the distinct
    videos once and every caption once).

    Frame sampling (`sampling`, see `read_frames`) defaults to "random" when `train` and "uniform" otherwise.
    Random draws and `augment` are seeded by seed, epoch and index, so results depend neither on the worker
    count nor on resuming. `augment(frames [n, H, W, 3] uint8, seed) -> frames` runs only when `train`.
    `videos` maps records to files (built from `video_dir` when not given). With a `frame_cache` (opened for these
    settings), a clip whose frames it holds is read from it instead of decoded (the same frames, see
    `neighborretr.data.frame_cache`); the others are decoded by `backend` on `decode_device`.

    A video that fails to decode raises `VideoDecodeError` naming the file, unless `skip_bad` (training only: a
    substitute would corrupt evaluation metrics). Then the item is logged and replaced by the next item (wrapping)
    whose video decodes, exactly as that item is loaded on its own (its own caption_index and video_index: a real
    pair), and every item holds `skipped`: 1 for a substitute, 0 otherwise. At most `MAX_SUBSTITUTE_DECODES`
    other videos are tried before the error is raised.
    """

    def __init__(
        self,
        records: list[Record],
        video_dir: str | Path,
        max_words: int,
        max_frames: int,
        image_size: int,
        train: bool = False,
        backend: str = "pyav",
        seed: int = 0,
        load_text: bool = True,
        load_video: bool = True,
        sampling: str | None = None,
        framerate: float | None = None,
        augment: Callable[[np.ndarray, int], np.ndarray] | None = None,
        videos: VideoIndex | None = None,
        skip_bad: bool = False,
        frame_cache: FrameCache | None = None,
        decode_device: str = "cpu",
    ):
        if skip_bad and not train:
            raise ValueError("skip_bad substitutes other items for bad videos: only for a training dataset")
        if not records:
            raise ValueError(f"no annotation records for the videos in {video_dir}")
        sampling = sampling or ("random" if train else "uniform")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"unknown frame sampling {sampling!r}; expected one of {SAMPLING_MODES}")
        self.records = records
        self.video_dir = Path(video_dir)
        self.videos = videos if videos is not None else (VideoIndex(video_dir) if load_video else None)
        self.sampling = sampling
        self.framerate = framerate
        self.augment = augment
        self.video_ids = sorted({r.video_id for r in records})
        self._video_index = {v: i for i, v in enumerate(self.video_ids)}
        self.tokenizer = CaptionTokenizer(max_words)
        self.max_frames = max_frames
        self.image_size = image_size
        self.train = train
        self.backend = backend
        self.seed = seed
        self.epoch = 0
        self.load_text = load_text
        self.load_video = load_video
        self.skip_bad = skip_bad and load_video
        self.frame_cache = frame_cache
        self.decode_device = decode_device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def video_index(self, video_id: str) -> int:
        return self._video_index[video_id]

    def _frames(self, record: Record, rng: np.random.Generator) -> np.ndarray:
        """The sampled frames [n, H, W, 3] uint8: from the frame cache when it holds them (it leaves `rng` untouched
        otherwise, so decoding then draws the same frames), else decoded."""
        if self.frame_cache is not None:
            key = cache_key(record.video_id, record.start, record.end)
            frames = self.frame_cache.frames(key, self.max_frames, self.sampling, rng)
            if frames is not None:
                return frames
        path = self.videos.find(record)
        if path is None:
            raise VideoDecodeError(self.videos.describe_missing(record))  # no path: the message names the folder
        frames, _ = read_frames(
            path,
            self.max_frames,
            mode=self.sampling,
            rng=rng,
            backend=self.backend,
            start=record.start,
            end=record.end,
            framerate=self.framerate,
            device=self.decode_device,
        )
        return frames

    def _video(self, record: Record, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        frames = self._frames(record, rng)
        if self.train and self.augment is not None:
            frames = self.augment(frames, int(rng.integers(2**31)))
        video = clip_frames(frames, self.image_size, length=self.max_frames)  # zero frames after the clip's
        mask = torch.zeros(self.max_frames, dtype=torch.long)
        mask[: len(frames)] = 1
        return video, mask

    def _item(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        item = {
            "video_index": torch.tensor(self._video_index[record.video_id]),
            "caption_index": torch.tensor(index),
        }
        if self.load_text:
            item["text_ids"], item["text_mask"] = self.tokenizer(record.caption)
        if self.load_video:
            item["video"], item["video_mask"] = self._video(record, index)
        return item

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not self.skip_bad:
            return self._item(index)
        try:
            return self._item(index) | {"skipped": torch.tensor(0)}
        except VideoDecodeError as err:
            first = err
        bad = {self.records[index].video_id}
        tried = 0
        for offset in range(1, len(self)):
            other = (index + offset) % len(self)
            if self.records[other].video_id in bad:
                continue
            if tried == MAX_SUBSTITUTE_DECODES:
                break
            tried += 1
            try:
                item = self._item(other)
            except VideoDecodeError as err:
                log.warning("skipping a bad video (data.skip_bad_videos=true): %s", err)
                bad.add(self.records[other].video_id)
                continue
            log.warning(
                "skipping a bad video (data.skip_bad_videos=true): %s; item %d replaced by item %d",
                first,
                index,
                other,
            )
            return item | {"skipped": torch.tensor(1)}
        raise VideoDecodeError(
            f"too many bad videos: no substitute for item {index} among the {tried} next other video(s) "
            f"({len(bad)} bad, the first {first})"
        )
