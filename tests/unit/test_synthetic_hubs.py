"""The hub-prone synthetic variant: each knob moves the measured hubness in its documented direction.

Hubness is measured without training: an "attribute oracle" scores a caption against a clip by the attributes the
caption names that some object of the clip has (busy scenes have several objects), plus a small seeded noise
that breaks ties. It sees exactly the structure the knobs create, so it is a fast stand-in for a trained model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from neighborretr.data.synthetic import (
    BACKGROUND_COLORS,
    DIRECTION_PHRASES,
    OBJECT_COLORS,
    SHAPE_WORDS,
    ClipSpec,
    render_clip,
)
from neighborretr.data.synthetic_hubs import HubKnobs, attribute_weights, generate_hub_prone_msrvtt, hub_specs
from neighborretr.eval.hubness_metrics import hubness_report

OFF = HubKnobs(
    generic_fraction=0.0, test_generic_fraction=0.0, attribute_skew=0.0, duplicate_fraction=0.0, vague_caption_prob=0.0
)
# The defaults with the attribute skew and vague captions of the first version: the oracle's anti-hubs need them
# (a rare clip is an anti-hub when its own caption is vague); the trained model has anti-hubs at the defaults too.
ON = HubKnobs(attribute_skew=1.0, vague_caption_prob=0.3)
N_TEST = 240


def _named(caption: str) -> dict[str, set[str]]:
    """The attribute values a caption names (phrases matched as whole words)."""
    words = f" {caption} "
    return {
        "color": {c for c in OBJECT_COLORS if f" {c} " in words},
        "shape": {s for s, ws in SHAPE_WORDS.items() if any(f" {w} " in words for w in ws)},
        "direction": {
            d for d, ps in DIRECTION_PHRASES.items() if any(f" {p} " in words or f" {p}," in words for p in ps)
        },
        "background": {b for b in BACKGROUND_COLORS if f" {b} " in words},
    }


def _has(spec: ClipSpec) -> dict[str, set[str]]:
    objects = [spec, *spec.others]
    return {
        "color": {o.color for o in objects},
        "shape": {o.shape for o in objects},
        "direction": {o.direction for o in objects},
        "background": {spec.background},
    }


def oracle_scores(specs: list[ClipSpec]) -> torch.Tensor:
    """[Q, G] attribute-match scores of each clip's first caption against every clip, ties broken by noise."""
    named = [_named(s.captions[0]) for s in specs]
    has = [_has(s) for s in specs]
    scores = np.array([[sum(len(n[a] & h[a]) for a in n) for h in has] for n in named], dtype=np.float64)
    scores += np.random.default_rng(0).uniform(0, 1e-3, scores.shape)
    return torch.from_numpy(scores)


def _test_specs(knobs: HubKnobs, seed: int = 0) -> list[ClipSpec]:
    return hub_specs(seed, num_train=0, num_test=N_TEST, frame_size=32, captions_per_video=1, knobs=knobs)


def _report(knobs: HubKnobs, direction: str = "t2v") -> dict[str, float]:
    scores = oracle_scores(_test_specs(knobs))
    return hubness_report(scores if direction == "t2v" else scores.t(), k=10)


def test_all_knobs_on_breed_hubs_and_antihubs() -> None:
    off, on = _report(OFF), _report(ON)
    assert on["skewness"] > off["skewness"] + 1.0
    assert on["antihub_occurrence"] > off["antihub_occurrence"]


@pytest.mark.parametrize(
    ("knob", "value", "direction", "metric"),
    [
        ("test_generic_fraction", 0.03, "t2v", "skewness"),  # a few busy scenes are retrieved for many captions
        ("attribute_skew", 1.5, "t2v", "hub_occurrence"),  # clips of common attributes match many captions
        ("vague_caption_prob", 0.4, "v2t", "skewness"),  # vague captions are retrieved for many clips
    ],
)
def test_each_knob_moves_hubness_up(knob: str, value: float, direction: str, metric: str) -> None:
    assert _report(replace(OFF, **{knob: value}), direction)[metric] > _report(OFF, direction)[metric]


def test_duplicates_copy_attributes_of_earlier_test_clips() -> None:
    specs = _test_specs(replace(OFF, duplicate_fraction=0.5))
    combos = [(s.color, s.shape, s.direction, s.background) for s in specs]
    repeats = len(combos) - len(set(combos))
    baseline = _test_specs(OFF)
    baseline_repeats = len(baseline) - len({(s.color, s.shape, s.direction, s.background) for s in baseline})
    assert repeats > baseline_repeats + N_TEST // 5


def test_skew_gives_the_documented_frequencies() -> None:
    weights = attribute_weights(seed=3, skew=1.0)["color"]
    assert sorted(weights, reverse=True) == pytest.approx(np.array([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6]) / 2.45)
    assert attribute_weights(seed=3, skew=0.0)["color"] == pytest.approx(np.full(6, 1 / 6))


def test_busy_captions_describe_one_object_each_or_none() -> None:
    knobs = replace(OFF, generic_fraction=1.0, generic_caption_prob=0.0)
    specs = hub_specs(0, num_train=30, num_test=0, frame_size=32, captions_per_video=8, knobs=knobs)
    described = set()
    for spec in specs:
        objects = {(o.color, o.shape, o.direction) for o in [spec, *spec.others]}
        for caption in spec.captions:
            named = _named(caption)
            colour, shape, direction = (next(iter(named[a])) for a in ("color", "shape", "direction"))
            assert (colour, shape, direction) in objects, caption  # one object, all three of its attributes
            assert named["background"] == {spec.background}
            described.add((spec.index, colour, shape, direction))
    assert len(described) > 2 * len(specs)  # the captions of a scene spread over its objects
    generic = hub_specs(0, 30, 0, 32, 8, replace(knobs, generic_caption_prob=1.0))
    assert all(not any(_named(c).values()) for s in generic for c in s.captions)


def test_busy_scene_renders_every_object() -> None:
    specs = _test_specs(replace(OFF, test_generic_fraction=1.0))
    spec = next(s for s in specs if len({o.color for o in s.others} - {s.color}) >= 2)
    frames = render_clip(spec, frame_size=32, num_frames=4, seed=0).astype(int)
    for color in {o.color for o in spec.others} | {spec.color}:
        distance = np.abs(frames - np.array(OBJECT_COLORS[color])).sum(-1)
        assert (distance < 30).any(), f"{color} object not drawn"


def test_bad_knobs_are_refused() -> None:
    with pytest.raises(ValueError, match="generic_fraction"):
        HubKnobs(generic_fraction=1.5)
    with pytest.raises(ValueError, match="attribute_skew"):
        HubKnobs(attribute_skew=-1)


def test_written_folder_records_the_knobs_and_regenerates_when_they_change(tmp_path: Path) -> None:
    kwargs = {"num_train": 4, "num_test": 3, "captions_per_video": 2, "frame_size": 32, "num_frames": 4}
    first = generate_hub_prone_msrvtt(tmp_path, ON, workers=1, progress=False, **kwargs)
    meta = json.loads((tmp_path / "synthetic_meta.json").read_text())
    assert first["regenerated"] and meta["params"]["hubs"]["generic_fraction"] == ON.generic_fraction
    assert not generate_hub_prone_msrvtt(tmp_path, ON, workers=1, progress=False, **kwargs)["regenerated"]
    changed = replace(ON, vague_caption_prob=0.0)
    assert generate_hub_prone_msrvtt(tmp_path, changed, workers=1, progress=False, **kwargs)["regenerated"]


def test_every_number_knob_has_a_flag_that_reaches_the_written_set(tmp_path: Path) -> None:
    from dataclasses import fields

    from neighborretr_train.make_synthetic import main

    numbers = [f.name for f in fields(HubKnobs) if isinstance(getattr(ON, f.name), float)]
    flags = [arg for i, knob in enumerate(numbers) for arg in (f"--{knob.replace('_', '-')}", str(0.05 + 0.1 * i))]
    sizes = ["--num-train", "4", "--num-test", "3", "--frame-size", "32", "--num-frames", "4", "--workers", "1"]
    main(["--hubs", "--root", str(tmp_path), *sizes, *flags, "--no-progress"])
    written = json.loads((tmp_path / "synthetic_meta.json").read_text())["params"]["hubs"]
    assert {knob: written[knob] for knob in numbers} == pytest.approx(
        {knob: 0.05 + 0.1 * i for i, knob in enumerate(numbers)}
    )
    assert len(numbers) == 6


def test_the_cli_defaults_give_the_hub_prone_set_its_folder_and_a_1k_test_gallery(monkeypatch) -> None:
    import inspect

    import neighborretr_train.make_synthetic as cli
    from neighborretr.data.synthetic import generate_synthetic_msrvtt

    calls = []
    monkeypatch.setattr(cli, "generate_hub_prone_msrvtt", lambda **kw: calls.append(("hubs", kw)) or {})
    monkeypatch.setattr(cli, "generate_synthetic_msrvtt", lambda **kw: calls.append(("plain", kw)) or {})
    cli.main(["--hubs"])
    cli.main([])
    cli.main(["--hubs", "--num-test", "7", "--root", "x"])
    (hubs, default_hubs), (plain, default_plain), (_, explicit) = calls
    assert (hubs, plain) == ("hubs", "plain")
    assert default_hubs["root"] == "data/synthetic_hubs" and default_plain["root"] == "data/synthetic"
    # sizes left unset reach each generator as its own default: 1,000 test clips for the hub-prone set, 200 plain
    assert "num_test" not in default_hubs and "num_test" not in default_plain
    assert inspect.signature(generate_hub_prone_msrvtt).parameters["num_test"].default == 1000
    assert inspect.signature(generate_synthetic_msrvtt).parameters["num_test"].default == 200
    assert explicit["num_test"] == 7 and explicit["root"] == "x"  # explicit values still win
