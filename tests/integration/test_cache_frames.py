"""neighborretr-cache-frames on the tiny synthetic set: it builds from the training config, the data object reads the
cache with the same tensors as decoding, a resumed build does nothing twice, and other settings are refused."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import neighborretr.data.dataset as dataset_module
from neighborretr_train import config_dir
from neighborretr_train.cache_frames import cache_frames
from neighborretr_train.common import ConfigError, build
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.integration


def composed(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides)


def test_cache_command_builds_what_the_loaders_read(tiny_synthetic, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cache"
    overrides = [*TINY_OVERRIDES, f"data.root={tiny_synthetic}", f"data.frame_cache={folder}", "cache.workers=1"]
    summary = cache_frames(composed("cache_frames", overrides + ["cache.progress=false"]))
    out = capsys.readouterr().out
    assert "32 videos of train, val, test (msrvtt), frames in clip form" in out and "estimated" in out
    assert len(summary.cached) == 32 and not summary.failed and not summary.skipped
    # the estimate (16 sampled videos of 8 frames, every candidate kept for random draws) is the exact size here
    assert f"estimated {32 * 8 * 32 * 32 * 3 / 1e6:.1f} MB" in out and summary.bytes == 32 * 8 * 32 * 32 * 3
    again = cache_frames(composed("cache_frames", overrides + ["cache.progress=false"]))
    assert len(again.skipped) == 32 and not again.cached

    cfg = composed("train", overrides[:-1])
    cached, plain = build(cfg, "data"), instantiate(cfg.data, frame_cache=None)
    calls = []
    real = dataset_module.read_frames
    monkeypatch.setattr(dataset_module, "read_frames", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    records = cached.records("train")[:6]
    for train in (True, False):
        a, b = cached.dataset(records, train=train), plain.dataset(records, train=train)
        for i in range(len(records)):
            assert torch.equal(a[i]["video"], b[i]["video"])
    assert len(calls) == 2 * len(records)  # only the plain data object decoded
    # the pre-flight check decodes only what the cache lacks
    (tiny_synthetic / "videos" / f"{records[0].video_id}.mp4").rename(tmp_path / "moved.mp4")
    try:
        assert cached.bad_videos(records, progress=False) == {}
        assert list(plain.bad_videos(records, progress=False)) == [records[0].video_id]
    finally:
        (tmp_path / "moved.mp4").rename(tiny_synthetic / "videos" / f"{records[0].video_id}.mp4")


def test_a_run_with_other_settings_refuses_the_cache(tiny_synthetic, tmp_path):
    folder = tmp_path / "cache"
    overrides = [*TINY_OVERRIDES, f"data.root={tiny_synthetic}", f"data.frame_cache={folder}"]
    cache_frames(
        composed("cache_frames", overrides + ["cache.workers=1", "cache.progress=false", "cache.splits=[test]"])
    )
    with pytest.raises(
        ConfigError, match=r"data: data.frame_cache=.* was built for other settings \(image_size: 32 != 48"
    ):
        build(composed("train", overrides + ["data.image_size=48"]), "data")
    with pytest.raises(ConfigError, match="data.frame_cache is not set"):
        cache_frames(composed("cache_frames", TINY_OVERRIDES))
    with pytest.raises(ConfigError, match="no frame cache there"):
        build(composed("train", [*TINY_OVERRIDES, f"data.frame_cache={tmp_path / 'none'}"]), "data")
