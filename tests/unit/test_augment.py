"""ClipRandAugment: one timm RandAugment draw per clip, replayed exactly on every frame; global RNGs untouched."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from neighborretr.data.augment import ClipRandAugment

CONFIG = "rand-m7-n4-mstd0.5-inc1"
SEEDS = range(20)


@pytest.fixture(scope="module")
def aug() -> ClipRandAugment:
    return ClipRandAugment(CONFIG)


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    """A fixed textured RGB image [48, 64, 3]: smooth gradients plus noise, so every op visibly changes it."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    smooth = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1)
    return np.clip(smooth + rng.integers(-40, 40, size=(48, 64, 3)), 0, 255).astype(np.uint8)


def _reference(frames: np.ndarray, seed: int) -> np.ndarray:
    """Independent reference: a separately built timm transform applied frame by frame, with `random` and
    `np.random` put in the same seeded state before each frame (the hparams are what the class promises)."""
    ref = rand_augment_transform(
        CONFIG,
        {"img_mean": (123, 117, 104), "translate_const": 100, "interpolation": Image.Resampling.BICUBIC},
    )
    out = []
    for frame in frames:
        random.seed(seed)
        np.random.seed(seed)
        out.append(np.asarray(ref(Image.fromarray(frame))))
    return np.stack(out)


def test_identical_frames_stay_identical_and_usually_change(aug, base):
    clip = np.repeat(base[None], 5, axis=0)
    outputs = []
    for seed in SEEDS:
        out = aug(clip, seed)
        assert out.dtype == np.uint8 and out.shape == clip.shape
        for k in range(1, len(out)):
            np.testing.assert_array_equal(out[k], out[0])
        outputs.append(out[0])
    changed = sum(not np.array_equal(o, base) for o in outputs)
    assert changed >= 15, f"only {changed}/20 seeds changed the image"
    distinct = {o.tobytes() for o in outputs}
    assert len(distinct) >= 10, f"only {len(distinct)} distinct outputs over 20 seeds"


def test_distinct_frames_get_the_same_ops_as_a_per_frame_reference(aug, base):
    clip = np.stack([np.roll(base, k, axis=1) for k in range(4)])  # frame k = base shifted right by k pixels
    for seed in SEEDS:
        out = aug(clip, seed)
        np.testing.assert_array_equal(out, _reference(clip, seed), err_msg=f"seed {seed}")


def test_reference_would_catch_independent_per_frame_draws(aug, base):
    """Sanity check of the test above: drawing different ops per frame does not match the reference."""
    clip = np.stack([base, base])
    mismatched = 0
    for seed in SEEDS:
        independent = np.stack([aug(clip[:1], seed)[0], aug(clip[1:], seed + 1000)[0]])
        mismatched += not np.array_equal(independent, _reference(clip, seed))
    assert mismatched >= 15


def test_same_seed_same_output_different_seeds_differ(aug, base):
    clip = np.stack([np.roll(base, 3 * k, axis=0) for k in range(3)])
    first = aug(clip, 7)
    random.seed(999)  # the output must depend on `seed` only, not on whatever the global generators hold
    np.random.seed(999)
    np.testing.assert_array_equal(aug(clip, 7), first)
    np.testing.assert_array_equal(ClipRandAugment(CONFIG)(clip, 7), first)
    assert any(not np.array_equal(aug(clip, s), first) for s in range(8, 14))


def test_global_rng_state_is_untouched(aug, base):
    random.seed(123)
    np.random.seed(456)
    py_state, np_state = random.getstate(), np.random.get_state()
    aug(np.stack([base, base]), 5)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and after[2:] == np_state[2:]
    np.testing.assert_array_equal(after[1], np_state[1])
    # and the next draws are the ones the seeds promise
    assert random.random() == random.Random(123).random()
    assert np.random.rand() == np.random.RandomState(456).rand()


def test_shape_dtype_and_bad_inputs(aug, base):
    clip = np.stack([base] * 3)
    out = aug(clip, 2**40)  # seeds beyond NumPy's 32-bit range are accepted
    assert out.dtype == np.uint8 and out.shape == clip.shape
    with pytest.raises(ValueError, match="randaug-m7-n4"):
        ClipRandAugment("randaug-m7-n4")
    with pytest.raises(ValueError, match="rand-m7-x3"):
        ClipRandAugment("rand-m7-x3")  # unknown section: timm would only `assert False`
    with pytest.raises(ValueError, match="uint8"):
        aug(clip.astype(np.float32), 0)
