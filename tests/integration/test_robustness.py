"""Nothing lost, nothing silently wrong: a run killed at several points (inside a save too) and resumed each time
ends equal to an uninterrupted one; preemption; resume refusals; the non-finite guard; crafted checkpoints."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neighborretr.checkpoint
import neighborretr.engine
from neighborretr.checkpoint import CheckpointError, checkpoint_dirs
from neighborretr.engine import NonFiniteError
from neighborretr.metrics_log import read_metrics
from neighborretr.preemption import PREEMPTED_EXIT, Preempted
from neighborretr_train.common import ConfigError, Evaluator
from tests.conftest import ROOT, generate_tiny_synthetic
from tests.integration.test_recipe import RUN, run_train, train_rows

pytestmark = pytest.mark.integration


class Killed(BaseException):
    """Stands for a SIGKILL at the point it is raised: none of the recipe's error handling catches it."""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return generate_tiny_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=32)


@pytest.fixture(scope="module")
def baseline(data_root, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run: 2 epochs x 7 steps, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("baseline")
    return out, run_train([*RUN, f"data.root={data_root}"], out)


def _kill_after_calls(monkeypatch, module, name: str, calls: int, action=None):
    """Patches `module.name` so that its `calls`-th call (from now on) runs `action` (default: raise Killed)."""
    original = getattr(module, name)
    count = {"n": 0}

    def patched(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            if action is None:
                raise Killed(name)
            action()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


def test_a_run_killed_at_several_points_resumes_each_time_to_the_uninterrupted_result(
    baseline, data_root, tmp_path, monkeypatch, caplog
):
    base_dir, base_results = baseline
    run = tmp_path / "run"
    overrides = [*RUN, f"data.root={data_root}"]
    resume = [*overrides, f"trainer.resume={run}"]

    # 1. Killed inside the save of step 4 (after the weights, before the training state): only a .tmp folder.
    with monkeypatch.context() as m:
        _kill_after_calls(m, neighborretr.checkpoint.torch, "save", calls=2)
        with pytest.raises(Killed):
            run_train(overrides, run)
    assert (run / "checkpoints" / "step_00000004.tmp" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004.tmp"]

    # 2. Resumed from step 2 (the incomplete folder is named in a warning), killed in the middle of step 6.
    caplog.set_level(logging.WARNING)
    with monkeypatch.context() as m:
        _kill_after_calls(m, neighborretr.engine, "backward_step", calls=4)  # steps 3, 4, 5, then 6
        with pytest.raises(Killed):
            run_train(resume, tmp_path / "unused")
    assert "step_00000004.tmp" in caplog.text and "incomplete" in caplog.text
    assert not (run / "checkpoints" / "step_00000004.tmp").exists()  # the re-done save of step 4 replaced it

    # 3. Resumed from step 4, preempted by SIGTERM during step 9: the step finishes, is saved, the run stops.
    with monkeypatch.context() as m:
        _kill_after_calls(m, neighborretr.engine, "backward_step", 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(Preempted) as stopped:
            run_train(resume, tmp_path / "unused")
    assert stopped.value.checkpoint == run / "checkpoints" / "step_00000009"
    saved = json.loads((stopped.value.checkpoint / "loop.json").read_text())["state"]
    assert (saved["epoch"], saved["batches_in_epoch"], saved["global_step"]) == (1, 2, 9)

    # 4. Resumed mid-epoch from step 9, killed while validating epoch 1 (the last checkpoint is step 14).
    with monkeypatch.context() as m:
        _kill_after_calls(m, Evaluator, "__call__", calls=1)
        with pytest.raises(Killed):
            run_train(resume, tmp_path / "unused")

    # 5. Resumed from step 14 (epoch 1 done, not validated): validates, tests, ends as the uninterrupted run.
    results = run_train(resume, tmp_path / "unused")
    assert not (tmp_path / "unused").exists()  # a resume writes into the run it continues, nowhere else
    assert results["test"] == base_results["test"] and results["best_epoch"] == base_results["best_epoch"]
    final, expected = (load_file(d / "checkpoints" / "step_00000014" / "model.safetensors") for d in (run, base_dir))
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
    rows, base_rows = train_rows(run), train_rows(base_dir)
    assert sorted(rows) == list(range(1, 15))
    for step in rows:
        assert rows[step]["train/loss"] == pytest.approx(base_rows[step]["train/loss"], rel=1e-5), step


def test_resuming_with_settings_that_change_the_run_is_refused_and_writes_nothing(baseline, data_root, tmp_path):
    base_dir, _ = baseline
    run = tmp_path / "run"
    shutil.copytree(base_dir, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    bad = ["data.batch_size=16", "model.width=64", "loss.memory_size=32"]
    with pytest.raises(ConfigError) as refused:
        run_train([*RUN, f"data.root={data_root}", f"trainer.resume={run}", *bad], tmp_path / "unused")
    message = str(refused.value)
    assert "\n" not in message
    for expected in ("data.batch_size 8 -> 16", "model.width 128 -> 64", "loss.memory_size 64 -> 32"):
        assert expected in message
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert not (tmp_path / "unused").exists()


def test_more_epochs_may_be_given_on_resume_and_train_on(baseline, data_root, tmp_path):
    base_dir, _ = baseline
    run = tmp_path / "run"
    shutil.copytree(base_dir, run)
    results = run_train(
        [*RUN, f"data.root={data_root}", f"trainer.resume={run}", "trainer.epochs=3", "trainer.log_every=7"], run
    )
    assert [h["epoch"] for h in results["history"]] == [0, 1, 2]
    assert (run / "config.resumed.yaml").is_file() and (run / "checkpoints" / "step_00000021").is_dir()


def test_a_non_finite_loss_stops_before_the_update_naming_step_terms_and_checkpoint(data_root, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as stopped:
        run_train([*RUN, f"data.root={data_root}", "optim.lr=1e6", "trainer.checkpoint_every_steps=1"], out)
    message = str(stopped.value)
    assert message.startswith("step 3: non-finite loss=nan")
    assert "centrality=nan" in message and f"{out / 'checkpoints' / 'step_00000002'}" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoints/step_00000002/model.safetensors").values())


def test_the_skip_policy_counts_skipped_steps_and_stops_at_its_limit(data_root, tmp_path):
    out = tmp_path / "run"
    overrides = ["optim.lr=1e6", "trainer.nonfinite=skip", "trainer.max_nonfinite_skips=2"]
    with pytest.raises(NonFiniteError, match=r"^step 5: .* after 2 skipped step\(s\)"):
        run_train([*RUN, f"data.root={data_root}", *overrides], out)
    assert [r["train/nonfinite_skipped"] for r in train_rows(out).values()] == [0, 0, 1, 2]


def _crafted_pickle(path: Path, marker: Path) -> None:
    """A torch file whose unpickling would create `marker` (what a malicious download could do)."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Payload()}, path)


def test_a_crafted_checkpoint_is_refused_and_never_runs_code(baseline, data_root, tmp_path):
    base_dir, _ = baseline
    run = tmp_path / "run"
    shutil.copytree(base_dir, run)
    marker = tmp_path / "pwned"
    checkpoint = run / "checkpoints" / "step_00000014"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):  # what older (Accelerate) checkpoints held
        _crafted_pickle(checkpoint / name, marker)
    _crafted_pickle(checkpoint / "training_state.pt", marker)
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        run_train([*RUN, f"data.root={data_root}", f"trainer.resume={run}"], tmp_path / "unused")
    assert not marker.exists()


def test_evaluate_refuses_crafted_foreign_and_non_weight_files(baseline, tmp_path):
    from hydra import compose, initialize_config_dir

    from neighborretr_train import config_dir
    from neighborretr_train.evaluate import evaluate

    base_dir, _ = baseline
    run = tmp_path / "run"
    shutil.copytree(base_dir, run)
    marker = tmp_path / "pwned"
    weights = run / "best" / "model.pt"
    cases = {
        "crafted": "holds objects other than tensors",
        "text": "is not a weights file",
        "foreign": "was written by another model",
    }
    for case, message in cases.items():
        if case == "crafted":
            _crafted_pickle(weights, marker)
        elif case == "text":
            weights.write_text("not a checkpoint\n")
        else:
            torch.save({"visual.proj": torch.zeros(3, 3)}, weights)
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("eval", [f"ckpt={weights}", f"output_dir={tmp_path / case}", "eval.normalizations=[none]"])
        with pytest.raises(CheckpointError, match=message):
            evaluate(cfg)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "extra"),
    [("process", ["logger=wandb", "logger.mode=offline"]), ("group", ["data.num_workers=1"])],
    ids=["to-the-process-with-wandb", "to-the-group-with-loader-workers"],
)
def test_sigterm_saves_a_checkpoint_closes_the_tracker_and_exits_with_the_preempted_status(
    data_root, tmp_path, target, extra
):
    """As a scheduler preempting the job: SIGTERM to the training process, or to its whole process group (as
    `scancel` does), loader workers included."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *RUN, f"data.root={data_root}", f"output_dir={run}"]
    cmd += ["trainer.checkpoint_every_steps=0", *extra]
    env = os.environ | {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not any("train/loss" in r for r in _rows(run / "metrics.jsonl")):  # training has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, stderr[-3000:]
    assert "stopped on SIGTERM after saving" in stderr and f"trainer.resume={run}" in stderr
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]  # saved although checkpoint_every_steps=0
    assert stopped_at(stderr) == checkpoint
    step = json.loads((checkpoint / "loop.json").read_text())["state"]["global_step"]
    assert step >= 1 and checkpoint.name == f"step_{step:08d}"
    if "logger=wandb" in extra:  # the offline history was flushed and closed
        (history,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
        assert history.stat().st_size > 0


def stopped_at(stderr: str) -> Path:
    return Path(stderr.split("stopped on SIGTERM after saving ")[1].split(";")[0])


def _rows(path: Path) -> list[dict]:
    return read_metrics(path) if path.is_file() else []


def test_timed_checkpoints_are_saved_when_their_interval_has_passed(data_root, tmp_path):
    out = tmp_path / "run"
    timed = ["trainer.checkpoint_every_steps=0", "trainer.checkpoint_every_minutes=1e-6", "trainer.max_steps=3"]
    run_train([*RUN, f"data.root={data_root}", *timed], out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in (1, 2, 3)]


def test_stop_request_records_signals_restores_handlers_and_a_second_ctrl_c_interrupts():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from neighborretr.preemption import StopRequest

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with StopRequest(Accelerator(cpu=True), checkpoint_every_minutes=60) as stop:
            assert stop.poll() == (False, False)
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.poll() == (True, False) and stop.signame == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside_and_still_ends_as_the_uninterrupted_run(
    baseline, data_root, tmp_path
):
    base_dir, base_results = baseline
    run = tmp_path / "run"
    shutil.copytree(base_dir, run)
    older = run / "checkpoints" / "step_00000006"
    results = run_train([*RUN, f"data.root={data_root}", f"trainer.resume={older}"], tmp_path / "unused")
    shelved = sorted(p.name.split("_2")[0] for p in (run / "checkpoints_abandoned").iterdir())
    assert shelved == ["step_00000007", "step_00000008", "step_00000010", "step_00000012", "step_00000014"]
    assert [p.name for p in checkpoint_dirs(run)][-1] == "step_00000014"  # re-made by this resume
    assert results["test"] == base_results["test"]
