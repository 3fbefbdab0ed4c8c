"""Tests for the synthetic benchmark generator: MSR-VTT file format, decodable clips, determinism, motion."""

from __future__ import annotations

import csv
import itertools
import json
import re
import runpy
from pathlib import Path

import av
import numpy as np
import pytest

from neighborretr.data.synthetic import (
    BACKGROUND_COLORS,
    BACKGROUND_NOUNS,
    DIRECTION_PHRASES,
    DIRECTIONS,
    MAX_CAPTION_TOKENS,
    OBJECT_COLORS,
    SHAPE_WORDS,
    TEMPLATES,
    VERBS,
    attribute_combos,
    distinct_combos,
    generate_synthetic_msrvtt,
)

TINY = {"num_train": 6, "num_test": 3, "captions_per_video": 5, "frame_size": 32, "num_frames": 8, "fps": 4}
REPO_ROOT = Path(__file__).resolve().parents[2]


def _generate(root: Path, **overrides) -> dict:
    kwargs = {**TINY, "seed": 0, "workers": 1, "progress": False, **overrides}
    return generate_synthetic_msrvtt(root, **kwargs)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    _generate(root)
    return root


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _captions_by_video(root: Path) -> dict[str, list[str]]:
    data = json.loads((root / "MSRVTT_data.json").read_text())
    captions: dict[str, list[str]] = {}
    for sentence in data["sentences"]:
        captions.setdefault(sentence["video_id"], []).append(sentence["caption"])
    return captions


def _decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _has_phrase(caption: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", caption) is not None


def _stated_direction(caption: str) -> str:
    """The one direction whose phrases occur in ``caption`` (fails if zero or several do)."""
    found = [d for d, phrases in DIRECTION_PHRASES.items() if any(_has_phrase(caption, p) for p in phrases)]
    assert len(found) == 1, f"caption names directions {found}: {caption!r}"
    return found[0]


def _object_centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) centroid of the pixels far from the background colour (the per-channel median)."""
    background = np.median(frame.reshape(-1, 3), axis=0)
    far = np.abs(frame.astype(np.float32) - background).sum(axis=-1) > 80
    assert far.sum() > 10, "object not found"
    ys, xs = np.nonzero(far)
    return np.array([xs.mean(), ys.mean()])


def test_file_layout_and_annotation_structure(tiny_root: Path) -> None:
    num_videos = TINY["num_train"] + TINY["num_test"]
    expected = {"MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv"}
    assert expected | {"synthetic_meta.json", "videos"} == {p.name for p in tiny_root.iterdir()}
    assert sorted(p.name for p in (tiny_root / "videos").iterdir()) == sorted(
        f"video{i}.mp4" for i in range(num_videos)
    )

    data = json.loads((tiny_root / "MSRVTT_data.json").read_text())
    assert set(data) == {"info", "videos", "sentences"}
    video_keys = {"id", "video_id", "category", "url", "start time", "end time", "split"}
    assert all(set(v) == video_keys for v in data["videos"])
    splits = {v["video_id"]: v["split"] for v in data["videos"]}
    assert splits == {f"video{i}": "train" if i < TINY["num_train"] else "test" for i in range(num_videos)}
    assert all(v["end time"] == TINY["num_frames"] / TINY["fps"] for v in data["videos"])
    assert all(set(s) == {"sen_id", "video_id", "caption"} for s in data["sentences"])
    assert len({s["sen_id"] for s in data["sentences"]}) == len(data["sentences"])
    assert {s["video_id"] for s in data["sentences"]} <= set(splits)
    counts = {vid: len(caps) for vid, caps in _captions_by_video(tiny_root).items()}
    assert counts == {vid: TINY["captions_per_video"] if split == "train" else 1 for vid, split in splits.items()}

    header_9k, rows_9k = _read_csv(tiny_root / "MSRVTT_train.9k.csv")
    header_7k, rows_7k = _read_csv(tiny_root / "MSRVTT_train.7k.csv")
    assert header_9k == header_7k == ["video_id"]
    train_ids = [vid for vid, split in splits.items() if split == "train"]
    assert [r[0] for r in rows_9k] == train_ids
    assert 0 < len(rows_7k) < len(rows_9k) and set(map(tuple, rows_7k)) <= set(map(tuple, rows_9k))

    header, rows = _read_csv(tiny_root / "MSRVTT_JSFUSION_test.csv")
    assert header == ["key", "vid_key", "video_id", "sentence"]
    test_ids = [vid for vid, split in splits.items() if split == "test"]
    assert [r[2] for r in rows] == test_ids
    captions = _captions_by_video(tiny_root)
    for row_index, (key, vid_key, vid, sentence) in enumerate(rows):
        assert key == f"ret{row_index}" and vid_key == f"msr{vid[len('video') :]}"
        assert captions[vid] == [sentence]


def test_every_clip_decodes_with_decord_and_pyav(tiny_root: Path) -> None:
    decord = pytest.importorskip("decord", reason="decord is an optional extra (neighborretr[decord])")
    size, num_frames = TINY["frame_size"], TINY["num_frames"]
    for path in sorted((tiny_root / "videos").glob("*.mp4")):
        reader = decord.VideoReader(str(path))
        assert len(reader) == num_frames
        assert reader[0].shape == (size, size, 3)
        assert reader.get_avg_fps() == pytest.approx(TINY["fps"])
        with av.open(str(path)) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == num_frames
        assert all((f.width, f.height) == (size, size) for f in frames)


def test_captions_name_every_attribute(tiny_root: Path) -> None:
    for vid, captions in _captions_by_video(tiny_root).items():
        assert len(set(captions)) == len(captions), f"{vid} repeats a caption"
        for caption in captions:
            assert sum(_has_phrase(caption, c) for c in OBJECT_COLORS) == 1, caption
            assert sum(_has_phrase(caption, b) for b in BACKGROUND_COLORS) == 1, caption
            assert any(_has_phrase(caption, w) for words in SHAPE_WORDS.values() for w in words), caption
        assert len({_stated_direction(c) for c in captions}) == 1, f"{vid} captions disagree: {captions}"


def test_object_moves_in_the_captioned_direction(tiny_root: Path) -> None:
    size = TINY["frame_size"]
    for vid, captions in _captions_by_video(tiny_root).items():
        frames = _decode_all(tiny_root / "videos" / f"{vid}.mp4")
        shift = _object_centroid(frames[-1]) - _object_centroid(frames[0])
        expected = np.array(DIRECTIONS[_stated_direction(captions[0])], dtype=float)
        along, across = shift @ expected, abs(shift @ expected[::-1])
        assert along > 0.3 * size, f"{vid}: moved {shift} but caption says {captions[0]!r}"
        assert across < 0.1 * size, f"{vid}: drifted sideways {shift}"


def test_same_seed_gives_same_data_for_any_worker_count(tiny_root: Path, tmp_path: Path) -> None:
    _generate(tmp_path, workers=2)
    assert _captions_by_video(tmp_path) == _captions_by_video(tiny_root)
    for path in sorted((tiny_root / "videos").glob("*.mp4")):
        a, b = _decode_all(path), _decode_all(tmp_path / "videos" / path.name)
        assert np.array_equal(a, b), f"{path.name} decodes differently"  # x264 runs with asm=0: bit-exact


def test_different_seed_gives_different_captions(tiny_root: Path, tmp_path: Path) -> None:
    _generate(tmp_path, seed=1)
    assert _captions_by_video(tmp_path) != _captions_by_video(tiny_root)


def test_second_call_with_same_params_skips_generation(tmp_path: Path) -> None:
    assert _generate(tmp_path)["regenerated"]
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    summary = _generate(tmp_path, workers=2)  # workers do not change the output, so no regeneration
    assert not summary["regenerated"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes


def test_changed_params_or_missing_video_regenerate(tmp_path: Path) -> None:
    _generate(tmp_path)
    (tmp_path / "videos" / "video0.mp4").unlink()
    assert _generate(tmp_path)["regenerated"]
    assert (tmp_path / "videos" / "video0.mp4").is_file()

    _generate(tmp_path, num_test=1)  # fewer clips: the stale ones must disappear
    videos = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert videos == sorted(f"video{i}.mp4" for i in range(TINY["num_train"] + 1))
    meta = json.loads((tmp_path / "synthetic_meta.json").read_text())
    assert meta["complete"] and meta["params"]["num_test"] == 1


def test_refuses_to_overwrite_a_real_msrvtt_folder(tmp_path: Path) -> None:
    (tmp_path / "MSRVTT_data.json").write_text("{}")
    with pytest.raises(FileExistsError):
        _generate(tmp_path)
    assert (tmp_path / "MSRVTT_data.json").read_text() == "{}"


@pytest.mark.parametrize("bad", [{"frame_size": 33}, {"num_frames": 1}, {"num_test": 0}, {"captions_per_video": 0}])
def test_invalid_settings_raise(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        _generate(tmp_path, **bad)


def test_palette_and_phrases_are_unambiguous() -> None:
    # Every object colour must stand out from every background, and no phrase may hide inside another
    # attribute's phrase, otherwise captions (and the tests above) could be ambiguous.
    for obj, bg in itertools.product(OBJECT_COLORS.values(), BACKGROUND_COLORS.values()):
        assert np.abs(np.subtract(obj, bg)).sum() >= 150
    for a, b in itertools.permutations(DIRECTION_PHRASES, 2):
        assert not any(_has_phrase(pa, pb) for pa in DIRECTION_PHRASES[a] for pb in DIRECTION_PHRASES[b])
    assert len(TEMPLATES) >= 6


def test_longest_caption_fits_the_token_budget() -> None:
    # Truncation to max_words would silently drop the background or the direction from a caption. CLIP's BPE
    # encodes each word separately, so filling every slot with its longest option gives the longest caption.
    tokenizer = pytest.importorskip("open_clip.tokenizer").SimpleTokenizer()

    def longest(options) -> str:
        return max(options, key=lambda option: len(tokenizer.encode(option)))

    slots = {
        "color": longest(OBJECT_COLORS),
        "shape": longest(itertools.chain(*SHAPE_WORDS.values())),
        "verb": longest(v for v, _ in VERBS),
        "verb_ing": longest(v for _, v in VERBS),
        "direction": longest(itertools.chain(*DIRECTION_PHRASES.values())),
        "bg": longest(BACKGROUND_COLORS),
        "bg_noun": longest(BACKGROUND_NOUNS),
    }
    for template in TEMPLATES:
        caption = template.format(**slots)
        assert len(tokenizer.encode(caption)) <= MAX_CAPTION_TOKENS, caption


def test_cli_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = runpy.run_path(str(REPO_ROOT / "scripts" / "make_synthetic.py"))["main"]
    argv = ["--root", str(tmp_path), "--num-train", "2", "--num-test", "1", "--frame-size", "16"]
    summary = main([*argv, "--num-frames", "4", "--workers", "1", "--no-progress"])
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["num_sentences"] == 2 * 5 + 1
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 3


def test_test_clips_have_distinct_attribute_combinations() -> None:
    combos = distinct_combos(seed=0, num_test=200)
    assert len(set(combos)) == 200  # each test caption describes exactly one test clip
    assert len(set(distinct_combos(seed=0, num_test=300))) == len(attribute_combos()) == 288
    assert distinct_combos(seed=1, num_test=5) != distinct_combos(seed=0, num_test=5)
