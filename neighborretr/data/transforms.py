"""Frame transforms and caption tokenisation shared by every benchmark."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from open_clip.tokenizer import SimpleTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# (x / 255 - mean) / std as one multiply and one subtract, in place on the float copy (a third of the time)
_SCALE = (1 / (255 * torch.tensor(CLIP_STD))).view(3, 1, 1)
_SHIFT = (torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)


def resize_crop(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 RGB frames [n, H, W, 3] -> uint8 [n, 3, S, S]: short side resized to S (bicubic, antialiased, rounded
    back to uint8 as torchvision does for uint8 input), then centre crop. Frames already S x S pass unchanged, so
    the frame cache can store this result and `clip_frames` of it equals `clip_frames` of the decoded frames."""
    # strided arrays are taken as they are (the frame cache hands out channels-last views of channels-first
    # frames, which the permute below makes contiguous again); only negative strides need a copy for torch
    if any(step < 0 for step in frames.strides):
        frames = frames.copy()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    if min(x.shape[-2:]) != image_size:
        x = TF.resize(x, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    if x.shape[-2:] != (image_size, image_size):
        x = TF.center_crop(x, [image_size, image_size])
    return x


def clip_frames(frames: np.ndarray, image_size: int, length: int | None = None) -> torch.Tensor:
    """uint8 RGB frames [n, H, W, 3] -> CLIP input [n, 3, S, S] (or [length, 3, S, S] with zero frames after the
    n given): `resize_crop`, then scaled to [0, 1] and normalised with CLIP's mean and std.

    The output is allocated once and converted, scaled and shifted in place: on a cached clip this is most of an
    item's cost, and each extra float copy of a clip (7 MB at 12 x 224 px) shows in the loader's throughput."""
    x = resize_crop(frames, image_size)
    n = len(x)
    out = torch.empty(max(n, length or 0), *x.shape[1:])
    out[n:] = 0
    out[:n].copy_(x).mul_(_SCALE).sub_(_SHIFT)  # uint8 -> float in the copy, then (x / 255 - mean) / std
    return out


@lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    return SimpleTokenizer()  # reads the BPE vocabulary shipped inside open_clip; nothing is downloaded


@lru_cache(maxsize=65536)  # captions repeat every epoch and BPE is the slow part
def _token_ids(caption: str, max_words: int) -> tuple[int, ...]:
    bpe = _bpe()
    pieces = bpe.encode(caption)[: max_words - 2]
    return (bpe.sot_token_id, *pieces, bpe.eot_token_id)


class CaptionTokenizer:
    """CLIP BPE with `max_words` truncation that keeps SOS and EOS: ids [L] and mask [L], zero-padded."""

    def __init__(self, max_words: int):
        if max_words < 2:
            raise ValueError("max_words must leave room for the start and end tokens (>= 2)")
        self.max_words = max_words

    def __call__(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = _token_ids(caption, self.max_words)
        out = torch.zeros(self.max_words, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids)
        mask = torch.zeros(self.max_words, dtype=torch.long)
        mask[: len(ids)] = 1
        return out, mask
