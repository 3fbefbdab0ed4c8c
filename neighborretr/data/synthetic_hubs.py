"""A hub-prone variant of the synthetic benchmark (same MSR-VTT file format, same moving shapes).

The plain benchmark gives every test clip a distinct attribute combination and every caption all four
attributes, so a trained model's test gallery has almost no hubness (N_10 skewness about 1, no anti-hubs).
Real retrieval galleries are different: some clips are generic and partly match many captions, attribute
frequencies are skewed, near-duplicates compete, and captions vary in detail. Each knob of `HubKnobs` adds one
of these structures:

- ``generic_fraction``: share of clips that are busy scenes: the main object plus ``generic_extra_objects``
  more moving shapes. As annotators of a busy real clip each describe a different part of it, every caption of a
  busy scene describes one of its objects, drawn at random (or, with ``generic_caption_prob``, none:
  "several shapes moving around"). Training on such pairs pulls a busy clip towards many different captions at
  once, i.e. towards the middle of the caption space, so it is retrieved for many queries: the hubs of the video
  gallery.
- ``generic_caption_prob``: probability that a caption of a busy scene names no attribute at all. At 1, busy
  scenes form their own "generic" class that the model learns to keep apart from specific captions (few hubs:
  our first version); lower values make busy scenes partial matches of many captions (strong hubs).
- ``test_generic_fraction``: the share of busy scenes among the test clips. Kept small, so that the few generic
  clips of the gallery each draw many queries (a heavy right tail of N_k, as in real galleries).
- ``attribute_skew``: Zipf exponent s of the colour, shape, direction and background frequencies (the r-th most
  frequent value, in a seeded order, has weight (r + 1)^-s; 0 = uniform). Clips of common attributes match
  many captions (more hubs); clips of rare attributes are retrieved by few captions besides their own, and by
  none when their own caption is vague (anti-hubs).
- ``duplicate_fraction``: share of test clips that repeat the attributes of an earlier test clip (a different
  size and trajectory): near-duplicate distractors that no caption can tell apart.
- ``vague_caption_prob``: probability that a caption leaves out each of colour, shape and background
  (independently; the direction is always named). Vague captions match many clips: hubs of the caption gallery
  (video-to-text) and hard queries (text-to-video).

Test clips are drawn from the same skewed distribution as training clips (no distinct-combination rule). All
randomness derives from ``seed``: clip i draws from ``np.random.default_rng([seed, i, 7])``.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from neighborretr.data.synthetic import (
    BACKGROUND_COLORS,
    BACKGROUND_NOUNS,
    DIRECTION_PHRASES,
    DIRECTIONS,
    OBJECT_COLORS,
    OBJECT_SIZE_RANGE,
    SHAPE_WORDS,
    SHAPES,
    TEMPLATES,
    VERBS,
    ClipSpec,
    ObjectSpec,
    _check_args,
    _sample_trajectory,
    write_benchmark,
)


@dataclass(frozen=True)
class HubKnobs:
    """The structures that breed hubs; see the module docstring. All zero = no added structure."""

    generic_fraction: float = 0.15
    test_generic_fraction: float = 0.05  # busy scenes among the test clips: few, so each draws many queries
    generic_extra_objects: tuple[int, int] = (2, 4)  # inclusive range of extra shapes in a busy scene
    generic_caption_prob: float = 0.2  # share of a busy scene's captions that name no attribute
    attribute_skew: float = 0.75
    duplicate_fraction: float = 0.1
    vague_caption_prob: float = 0.2

    def __post_init__(self) -> None:
        for name in (
            "generic_fraction",
            "test_generic_fraction",
            "generic_caption_prob",
            "duplicate_fraction",
            "vague_caption_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.attribute_skew < 0:
            raise ValueError(f"attribute_skew must be >= 0, got {self.attribute_skew}")
        low, high = self.generic_extra_objects
        if not 1 <= low <= high:
            raise ValueError(f"generic_extra_objects must be (low, high) with 1 <= low <= high, got {(low, high)}")


# Attribute-free captions of busy scenes (a share `generic_caption_prob` of them), like "a video of people" in
# real data.
GENERIC_TEMPLATES: tuple[str, ...] = (
    "several shapes {verb_ing} around",
    "a few objects {verb_ing} across the frame",
    "shapes of different colors moving",
    "a busy scene full of moving shapes",
    "many things {verb_ing} at once",
    "some shapes {verb_ing} in different directions",
)
# Specific captions that leave out the background (the dropped-background form of TEMPLATES).
NO_BACKGROUND_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} {verb} {direction}",
    "the {color} {shape} {verb} {direction}",
    "a {color} {shape} that {verb} {direction}",
    "{verb_ing} {direction}, a {color} {shape}",
)
VAGUE_SHAPE_WORDS: tuple[str, ...] = ("shape", "object", "thing")


def zipf_weights(rng: np.random.Generator, n: int, skew: float) -> np.ndarray:
    """Probabilities of ``n`` values: the r-th of a seeded order gets weight (r + 1)^-skew (uniform at 0)."""
    weights = np.empty(n)
    weights[rng.permutation(n)] = (np.arange(n) + 1.0) ** -skew
    return weights / weights.sum()


def attribute_weights(seed: int, skew: float) -> dict[str, np.ndarray]:
    """Frequencies of every attribute's values, fixed by ``seed`` (one seeded order per attribute)."""
    rng = np.random.default_rng([seed, 1_000_003])
    return {
        "color": zipf_weights(rng, len(OBJECT_COLORS), skew),
        "shape": zipf_weights(rng, len(SHAPES), skew),
        "direction": zipf_weights(rng, len(DIRECTIONS), skew),
        "background": zipf_weights(rng, len(BACKGROUND_COLORS), skew),
    }


def _draw(rng: np.random.Generator, values, p: np.ndarray) -> str:
    return str(list(values)[rng.choice(len(p), p=p)])


def _caption(rng: np.random.Generator, template: str, slots: dict[str, str]) -> str:
    """Fill ``template``; a dropped colour leaves no word behind (spaces collapsed)."""
    verb, verb_ing = VERBS[rng.integers(len(VERBS))]
    text = template.format(verb=verb, verb_ing=verb_ing, bg_noun=rng.choice(BACKGROUND_NOUNS), **slots)
    return re.sub(r" {2,}", " ", text).strip()


def specific_caption(rng: np.random.Generator, attrs: dict[str, str], vague_prob: float) -> str:
    """A caption of one moving object; each of colour, shape and background is left out with ``vague_prob``."""
    drop_color, drop_shape, drop_bg = rng.random(3) < vague_prob
    slots = {
        "color": "" if drop_color else attrs["color"],
        "shape": str(rng.choice(VAGUE_SHAPE_WORDS if drop_shape else SHAPE_WORDS[attrs["shape"]])),
        "direction": str(rng.choice(DIRECTION_PHRASES[attrs["direction"]])),
        "bg": attrs["background"],
    }
    templates = NO_BACKGROUND_TEMPLATES if drop_bg else TEMPLATES
    return _caption(rng, templates[rng.integers(len(templates))], slots)


def generic_caption(rng: np.random.Generator) -> str:
    """A caption of a busy scene: no colour, shape, direction or background."""
    return _caption(rng, GENERIC_TEMPLATES[rng.integers(len(GENERIC_TEMPLATES))], {})


def _object(rng: np.random.Generator, weights: dict[str, np.ndarray], frame_size: int) -> ObjectSpec:
    color = _draw(rng, OBJECT_COLORS, weights["color"])
    shape = _draw(rng, SHAPES, weights["shape"])
    direction = _draw(rng, DIRECTIONS, weights["direction"])
    size = max(3, round(frame_size * rng.uniform(*OBJECT_SIZE_RANGE)))
    start, end = _sample_trajectory(rng, direction, size, frame_size)
    return ObjectSpec(color, shape, size, start, end, direction)


def busy_caption(rng: np.random.Generator, scene: list[dict[str, str]], knobs: HubKnobs) -> str:
    """A caption of a busy scene: attribute-free with ``generic_caption_prob``, else one random object's caption."""
    if rng.random() < knobs.generic_caption_prob:
        return generic_caption(rng)
    return specific_caption(rng, scene[rng.integers(len(scene))], knobs.vague_caption_prob)


def sample_hub_spec(
    seed: int,
    index: int,
    frame_size: int,
    num_captions: int,
    knobs: HubKnobs,
    weights: dict[str, np.ndarray],
    copy_of: ClipSpec | None = None,
    generic_fraction: float | None = None,
) -> ClipSpec:
    """Clip ``index``: a busy scene with probability ``generic_fraction``, else one object; ``copy_of`` fixes the
    attributes (a near-duplicate: new size, trajectory and captions); ``generic_fraction`` overrides the knob's."""
    rng = np.random.default_rng([seed, index, 7])
    if generic_fraction is None:
        generic_fraction = knobs.generic_fraction
    generic = copy_of is None and rng.random() < generic_fraction
    if copy_of is None:
        attrs = {key: _draw(rng, values, weights[key]) for key, values in _ATTRIBUTES.items()}
    else:
        attrs = {key: getattr(copy_of, key) for key in _ATTRIBUTES}
    size = max(3, round(frame_size * rng.uniform(*OBJECT_SIZE_RANGE)))
    start, end = _sample_trajectory(rng, attrs["direction"], size, frame_size)
    others = ()
    if generic:
        low, high = knobs.generic_extra_objects
        others = tuple(_object(rng, weights, frame_size) for _ in range(rng.integers(low, high + 1)))
    scene = [attrs, *({**attrs, "color": o.color, "shape": o.shape, "direction": o.direction} for o in others)]
    captions = tuple(
        busy_caption(rng, scene, knobs) if generic else specific_caption(rng, attrs, knobs.vague_caption_prob)
        for _ in range(num_captions)
    )
    return ClipSpec(index, **attrs, size=size, start=start, end=end, captions=captions, others=others)


_ATTRIBUTES = {"color": OBJECT_COLORS, "shape": SHAPES, "direction": DIRECTIONS, "background": BACKGROUND_COLORS}


def hub_specs(
    seed: int, num_train: int, num_test: int, frame_size: int, captions_per_video: int, knobs: HubKnobs
) -> list[ClipSpec]:
    """Train clips (``captions_per_video`` captions), then test clips (one caption), a ``duplicate_fraction``
    share of the test clips copying an earlier non-busy test clip's attributes."""
    weights = attribute_weights(seed, knobs.attribute_skew)
    specs = [sample_hub_spec(seed, i, frame_size, captions_per_video, knobs, weights) for i in range(num_train)]
    pick = np.random.default_rng([seed, 2_000_003])
    for k in range(num_test):
        index = num_train + k
        originals = [s for s in specs[num_train:] if not s.others]
        copy_of = None
        if originals and pick.random() < knobs.duplicate_fraction:
            copy_of = originals[pick.integers(len(originals))]
        specs.append(sample_hub_spec(seed, index, frame_size, 1, knobs, weights, copy_of, knobs.test_generic_fraction))
    return specs


def generate_hub_prone_msrvtt(
    root: str | Path,
    knobs: HubKnobs | None = None,
    num_train: int = 1000,
    num_test: int = 1000,
    captions_per_video: int = 5,
    frame_size: int = 64,
    num_frames: int = 16,
    fps: int = 8,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate (or reuse) the hub-prone benchmark under ``root``; arguments as ``generate_synthetic_msrvtt``, but
    the test gallery defaults to 1,000 clips (MSR-VTT 1k-A size): with 200, a model that learns shows little hubness.

    Returns its summary plus ``num_busy_test`` (busy scenes among the test clips) and ``num_vague_test``
    (test captions that leave out an attribute or describe a busy scene).
    """
    started = time.perf_counter()
    knobs = knobs or HubKnobs()
    _check_args(num_train, num_test, captions_per_video, frame_size, num_frames, fps)
    params = {
        "num_train": num_train,
        "num_test": num_test,
        "captions_per_video": captions_per_video,
        "frame_size": frame_size,
        "num_frames": num_frames,
        "fps": fps,
        "seed": seed,
        "hubs": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(knobs).items()},
    }
    specs = hub_specs(seed, num_train, num_test, frame_size, captions_per_video, knobs)
    summary = write_benchmark(Path(root), specs, params, workers, progress, started)
    test = specs[num_train:]
    summary["num_busy_test"] = sum(bool(s.others) for s in test)
    summary["num_vague_test"] = sum(bool(s.others) or not _names_all(s) for s in test)
    return summary


def _names_all(spec: ClipSpec) -> bool:
    """True when the first caption names the colour and the background (a specific, complete caption)."""
    caption = spec.captions[0]
    return spec.color in caption and spec.background in caption
