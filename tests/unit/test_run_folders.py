"""Run folders are never shared; `trainer.resume=latest` is the highest complete step; the config schema."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from neighborretr.checkpoint import REQUIRED, checkpoint_dirs
from neighborretr_train.common import ConfigError, claim_run_dir
from neighborretr_train.train import find_resume


def _cfg(**values):
    return OmegaConf.create({"output_dir": None, "output_root": "outputs", "run_name": "r"} | values)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "2026-12-01_10-00-00")
    folders = [claim_run_dir(_cfg(), tmp_path) for _ in range(3)]
    assert [f.name for f in folders] == ["2026-12-01_10-00-00", "2026-12-01_10-00-00-1", "2026-12-01_10-00-00-2"]
    assert all((f / "config.yaml").is_file() for f in folders)


def test_concurrent_claims_never_share_a_folder(tmp_path, monkeypatch):
    """Eight claims released at the same instant for the same second: the exclusive file creation (one system
    call) decides, so every claim gets its own folder. Threads, not forked processes: forking a process that runs
    torch's thread pools can deadlock the child."""
    monkeypatch.setattr(time, "strftime", lambda fmt: "2026-12-01_10-00-00")
    barrier = threading.Barrier(8)

    def claim(_) -> Path:
        barrier.wait()
        return claim_run_dir(_cfg(), tmp_path)

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(claim, range(8)))
    assert len(set(folders)) == 8
    assert sorted(os.listdir(tmp_path)) == sorted(f.name for f in folders)


def test_an_output_dir_that_holds_a_run_is_refused(tmp_path):
    claim_run_dir(_cfg(output_dir=str(tmp_path / "mine")), tmp_path)
    with pytest.raises(ConfigError, match="already holds a run.*trainer.resume="):
        claim_run_dir(_cfg(output_dir=str(tmp_path / "mine")), tmp_path)


def _checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    path = run / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    for name in REQUIRED if complete else REQUIRED[:1]:
        (path / name).write_text("x")
    return path


def test_latest_is_the_highest_complete_step_not_the_newest_folder(tmp_path, caplog):
    root = tmp_path / "outputs"
    run = root / "r" / "2026-12-01_10-00-00"
    high = _checkpoint(run, 12)
    low = _checkpoint(run, 4)
    _checkpoint(run, 16, complete=False)  # a save that was killed (an older version's layout)
    (run / "checkpoints" / "step_00000020.tmp").mkdir()  # a save interrupted before its rename
    os.utime(low, (time.time() + 100, time.time() + 100))  # as after `cp -r`: mtimes say nothing
    cfg = _cfg(output_root=str(root))
    assert find_resume("latest", cfg) == high
    assert "step_00000016" in caplog.text and "step_00000020.tmp" in caplog.text
    assert checkpoint_dirs(run) == [low, high]
    sweep_job = root / "multirun" / "r" / "2026-12-01_11-00-00" / "0"
    assert find_resume("latest", cfg) == high
    in_sweep = _checkpoint(sweep_job, 14)
    assert find_resume("latest", cfg) == in_sweep  # multirun jobs are searched too
    assert find_resume(str(run), cfg) == high  # a run folder: its own highest step


def test_a_run_being_trained_cannot_be_locked_by_a_second_trainer(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from neighborretr_train.common import RunLock

    accelerator = Accelerator(cpu=True)
    try:
        with RunLock() as first:
            first.acquire(accelerator, tmp_path)
            with pytest.raises(ConfigError, match="being trained by another live process"):
                RunLock().acquire(accelerator, tmp_path)
        with RunLock() as again:  # released when the first trainer ended
            again.acquire(accelerator, tmp_path)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        ("validate", ["+foo=1"], "foo: unknown key"),
        ("validate", ["workers=x"], "workers='x': expected an integer or null"),
        ("eval", ["ckpt=x", "+data.fo=1"], "data.fo: unknown key"),
        ("eval", ["ckpt=x", "split=train"], "split='train'"),
        ("eval", ["ckpt=x", "data.num_workers=x"], "data.num_workers='x'"),
        ("train", ["data.root=2024"], "data.root=2024: expected a string (to pass a number as a string"),
        ("train", ["+model.widht=3"], "model.widht: unknown key; did you mean model.width?"),
    ],
)
def test_each_recipe_config_is_checked_against_its_schema(recipe, overrides, message):
    from hydra import compose, initialize_config_dir

    from neighborretr_train import config_dir
    from neighborretr_train.schema import SchemaError, check_config

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(recipe, overrides)
    with pytest.raises(SchemaError) as refused:
        check_config(cfg, recipe)
    assert str(refused.value).startswith(message)
