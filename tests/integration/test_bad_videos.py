"""A training video that fails while training (the pre-flight check off): the in-process recipe skips, counts and
logs it with data.skip_bad_videos=true, and stops naming the file otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from neighborretr.data.sampler import EpochShuffleSampler
from neighborretr.data.video_io import VideoDecodeError
from neighborretr_train import config_dir
from tests.conftest import NEIGHBORRETR, TINY_OVERRIDES, generate_tiny_synthetic
from tests.integration.test_recipe import run_train, train_rows

pytestmark = pytest.mark.integration

# 40 training pairs (20 videos x 2 captions; 4 of the 24 held out for validation), global batch 8: 5 steps per
# epoch, and the bank's refill batches read the same training dataset (so they carry the "skipped" key too).
STEPS = 5
BATCH = 8


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(data root, the corrupted training video, the run's overrides): the video of the first training pair is
    overwritten with garbage; the validation and test videos are intact."""
    root = generate_tiny_synthetic(tmp_path_factory.mktemp("bad_videos") / "data")
    overrides = [
        *TINY_OVERRIDES,
        *NEIGHBORRETR,
        f"data.root={root}",
        "data.check_videos=false",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every=1",
        "eval.normalizations=[none]",
    ]
    data = instantiate(composed(overrides).data)
    train, held_out = data.records("train"), data.records("val") + data.records("test")
    bad = train[0].video_id
    assert bad not in {r.video_id for r in held_out}
    path = root / "videos" / f"{bad}.mp4"
    path.write_bytes(b"\x00this is not a video\xff" * 64)
    return root, path, overrides


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides)


def expected_skipped(overrides: list[str], bad: str) -> dict[int, int]:
    """{step: training items of `bad` loaded up to and including that step} in the first epoch's order."""
    cfg = composed(overrides)
    records = instantiate(cfg.data).records("train")
    assert len(records) == STEPS * BATCH
    order = list(EpochShuffleSampler(len(records), seed=cfg.data.seed))
    return {s: sum(records[i].video_id == bad for i in order[: s * BATCH]) for s in range(1, STEPS + 1)}


def test_skip_on_finishes_and_logs_the_substituted_items(corrupt, tmp_path):
    root, path, overrides = corrupt
    expected = expected_skipped(overrides, path.stem)
    assert expected[STEPS] == 2  # both captions of the bad video, once each in the epoch
    results = run_train([*overrides, "data.skip_bad_videos=true"], tmp_path)
    assert set(results["test"]) == {"t2v", "v2t"}
    rows = train_rows(tmp_path)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert {s: r["train/skipped_videos"] for s, r in rows.items()} == expected


def test_skip_on_counts_zero_without_a_bad_video(corrupt, tiny_synthetic, tmp_path):
    _, _, overrides = corrupt
    clean = [*overrides, f"data.root={tiny_synthetic}", "data.skip_bad_videos=true", "trainer.max_steps=2"]
    run_train(clean, tmp_path)
    assert [r["train/skipped_videos"] for r in train_rows(tmp_path).values()] == [0, 0]


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_off_stops_naming_the_file(corrupt, tmp_path, workers):
    root, path, overrides = corrupt
    with pytest.raises(VideoDecodeError) as err:
        run_train([*overrides, "data.skip_bad_videos=false", f"data.num_workers={workers}"], tmp_path)
    last = str(err.value).rstrip().splitlines()[-1]
    assert str(path) in last and "cannot decode" in last
    if workers:  # rebuilt by torch in the main process from the worker's formatted traceback
        assert str(err.value).startswith("Caught VideoDecodeError in DataLoader worker process 0.")
        assert last.startswith(f"neighborretr.data.video_io.VideoDecodeError: {path}: ")
    assert not (tmp_path / "metrics.jsonl").exists() or STEPS not in train_rows(tmp_path)
