"""Clip-consistent RandAugment: timm's RandAugment with one draw of ops and magnitudes shared by every frame.

The official NeighborRetr code augments MSR-VTT training frames with ``rand-m7-n4-mstd0.5-inc1``: 4 ops from timm's
"increasing" list, magnitude ~ N(7, 0.5) clipped to [0, 10], each op applied with probability 0.5. Drawing those
afresh for each frame would make the frames of one clip flicker (rotate one way, then the other), which destroys the
motion the video encoder is meant to see, so the draw has to be made once per clip and replayed on every frame.

timm's transform takes its randomness from two global generators: ``np.random`` picks the ops (``np.random.choice``)
and Python's ``random`` draws everything else (apply-or-skip, magnitude noise, sign flips, and the interpolation of
geometric ops when none is pinned). No draw depends on the pixels, so putting both generators into the same state
before each frame makes every frame get the same ops with the same arguments. The states are saved and restored
around the call so that augmenting a clip neither disturbs nor is disturbed by anything else seeded from them
(e.g. frame sampling or a DataLoader worker's seeding); this is not thread-safe, which is fine for DataLoader workers
(separate processes) but not for augmenting clips from several threads at once.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from neighborretr.data.transforms import CLIP_MEAN

CLIP_MEAN_FILL: tuple[int, int, int] = tuple(round(255 * m) for m in CLIP_MEAN)  # (123, 117, 104)


class ClipRandAugment:
    """timm RandAugment applied identically (same ops, magnitudes, signs and skips) to every frame of a clip.

    Args:
        config: a timm RandAugment config string, e.g. ``"rand-m7-n4-mstd0.5-inc1"`` (see
            ``timm.data.auto_augment.rand_augment_transform``).
        fill: RGB colour for pixels uncovered by rotate / shear / translate; CLIP's mean so that they normalise to 0.
    """

    def __init__(self, config: str = "rand-m7-n4-mstd0.5-inc1", fill: tuple[int, int, int] = CLIP_MEAN_FILL) -> None:
        # timm only asserts on the config (stripped under `python -O`), so check it here with a readable error.
        if not isinstance(config, str) or not config.startswith("rand-"):
            raise ValueError(f"RandAugment config must be a timm 'rand-...' string, got {config!r}")
        hparams = {
            "img_mean": tuple(int(c) for c in fill),
            # Only timm's absolute TranslateX/TranslateY read this; its "rand" op lists use TranslateXRel/YRel,
            # which shift by up to `translate_pct` (default 0.45) of the image size instead. Set as timm's own
            # transforms factory (and the official code) do for 224 px input, for configs that pick absolute ops.
            "translate_const": int(224 * 0.45),
            # Pin bicubic as the official code does; timm otherwise picks bilinear/bicubic at random per geometric op.
            "interpolation": Image.Resampling.BICUBIC,
        }
        try:
            self.transform = rand_augment_transform(config, hparams)
        except (AssertionError, ValueError) as err:  # unknown section (timm asserts), non-numeric value
            raise ValueError(f"invalid RandAugment config {config!r}: {err!r}") from err
        self.config = config

    def __call__(self, frames: np.ndarray, seed: int) -> np.ndarray:
        """Augment a clip.

        Args:
            frames: uint8 RGB frames [n, H, W, 3] of one clip.
            seed: per-clip seed (any int; reduced mod 2**32 for NumPy). Same seed and frames -> same output.

        Returns:
            uint8 frames [n, H, W, 3]; frame i is the same RandAugment draw applied to frames[i].
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [n, H, W, 3], got {frames.dtype} {frames.shape}")
        seed = int(seed) % 2**32  # np.random.seed only takes [0, 2**32)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            out = np.empty_like(frames)
            for i, frame in enumerate(frames):
                # Same generator states for every frame -> same op choice and same arguments for every frame.
                random.seed(seed)
                np.random.seed(seed)
                out[i] = np.asarray(self.transform(Image.fromarray(frame)))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
