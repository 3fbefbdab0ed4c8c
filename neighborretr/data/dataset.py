"""The one dataset class every benchmark uses, plus the pre-flight check of the video files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from neighborretr.data.annotations import Record
from neighborretr.data.transforms import CaptionTokenizer, clip_frames
from neighborretr.data.video_io import VIDEO_EXTENSIONS, probe_video, read_frames

log = logging.getLogger(__name__)


def video_path(video_dir: str | Path, video_id: str, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> Path:
    """The file of `video_id` in `video_dir`: the first existing extension, else the first extension's name."""
    video_dir = Path(video_dir)
    for ext in extensions:
        candidate = video_dir / f"{video_id}{ext}"
        if candidate.is_file():
            return candidate
    return video_dir / f"{video_id}{extensions[0]}"


def find_bad_videos(
    records: list[Record], video_dir: str | Path, backend: str = "decord", progress: bool = True
) -> dict[str, str]:
    """Opens every distinct video once; returns {path: reason} for the missing or undecodable ones."""
    paths = sorted({str(video_path(video_dir, r.video_id)) for r in records})
    bad = {}
    for path in tqdm(paths, desc="checking videos", disable=not progress, leave=False):
        reason = probe_video(path, backend=backend)
        if reason is not None:
            bad[path] = reason
    return bad


class VideoTextDataset(Dataset):
    """Caption-video pairs of any benchmark, as dicts of tensors.

    Items hold `text_ids` [L], `text_mask` [L], `video` [T, 3, S, S] (zero-padded), `video_mask` [T],
    `video_index` (position of the video id in the sorted list of distinct ids) and `caption_index` (position of
    the record). `load_text=False` or `load_video=False` leaves those keys out (evaluation encodes the distinct
    videos once and every caption once).

    Frame sampling is "random" when `train` (a fresh draw per epoch, seeded by seed, epoch and index so that
    results do not depend on worker count or on resuming) and "uniform" (segment centres) otherwise.
    """

    def __init__(
        self,
        records: list[Record],
        video_dir: str | Path,
        max_words: int,
        max_frames: int,
        image_size: int,
        train: bool = False,
        backend: str = "decord",
        seed: int = 0,
        load_text: bool = True,
        load_video: bool = True,
    ):
        if not records:
            raise ValueError(f"no annotation records for the videos in {video_dir}")
        self.records = records
        self.video_dir = Path(video_dir)
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def video_index(self, video_id: str) -> int:
        return self._video_index[video_id]

    def _video(self, record: Record, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        frames, _ = read_frames(
            video_path(self.video_dir, record.video_id),
            self.max_frames,
            mode="random" if self.train else "uniform",
            rng=rng,
            backend=self.backend,
            start=record.start,
            end=record.end,
        )
        clip = clip_frames(frames, self.image_size)
        video = torch.zeros(self.max_frames, *clip.shape[1:])
        video[: len(clip)] = clip
        mask = torch.zeros(self.max_frames, dtype=torch.long)
        mask[: len(clip)] = 1
        return video, mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
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
