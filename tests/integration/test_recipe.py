"""The assembled recipe, run in-process on a tiny model and generated data: the values it produces, not only the
files it writes."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from hydra import compose, initialize_config_dir

from neighborretr.metrics_log import read_metrics
from neighborretr_train import config_dir
from neighborretr_train.train import train
from tests.conftest import NEIGHBORRETR, TINY_OVERRIDES, generate_tiny_synthetic

pytestmark = pytest.mark.integration

TERMS = ("centrality", "uniform", "kl", "neighbor")
REFERENCE = Path(__file__).with_name("reference_losses.json")
# 40 training pairs, global batch 8: 5 steps per epoch; the bank takes mb_batch=2 refill batches (16 items) at
# the start of an epoch, then 8 per step.
RUN = [
    *TINY_OVERRIDES,
    *NEIGHBORRETR,
    "loss.memory_size=64",
    "trainer.checkpoint_every_steps=2",
    "trainer.keep_checkpoints=20",
    "eval.normalizations=[none]",
]


def run_train(overrides: list[str], out: Path) -> dict:
    """`train(cfg)` in this process on the composed config, writing into `out`."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", [*overrides, f"output_dir={out}"])
    try:
        return train(cfg)
    finally:  # Accelerate keeps process-wide state; the next run builds its own
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def train_rows(run_dir: Path) -> dict[int, dict]:
    """The logged training rows by step (the last row of a step wins, as after a resume)."""
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


def bank_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The objective's state saved in a checkpoint."""
    return torch.load(checkpoint / "training_state.pt", weights_only=True)["objective"]


@pytest.fixture(scope="module")
def neighborretr_run(tiny_synthetic, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run_train([*RUN, f"data.root={tiny_synthetic}"], out)
    return out


def test_every_neighborretr_term_is_logged_finite_and_nonzero_at_every_step(neighborretr_run):
    rows = train_rows(neighborretr_run)
    assert sorted(rows) == list(range(1, 11))  # log_every=1, 2 epochs x 5 steps
    for step, row in rows.items():
        for term in TERMS:
            value = row[f"train/{term}"]
            assert math.isfinite(value) and value != 0.0, (step, term, value)
        total = row["train/centrality"] + row["train/uniform"] + row["train/kl"] + row["train/neighbor"]
        assert row["train/loss"] == pytest.approx(total, rel=1e-5)  # unit weights
    logged = read_metrics(neighborretr_run / "metrics.jsonl")
    assert any("val/t2v/R@1" in r for r in logged) and any("test/none/t2v/R@1" in r for r in logged)


def test_the_bank_holds_what_its_capacity_and_refill_imply(neighborretr_run, tiny_synthetic):
    # end of epoch 0 (step 5 is odd: use step 4 = refill 16 + 4 steps x 8, and step 6 = refill 16 + 1 x 8)
    for step, expected in ((2, 32), (4, 48), (6, 24), (10, 56)):
        bank = bank_state(neighborretr_run / "checkpoints" / f"step_{step:08d}")
        assert int(bank["bank.size"]) == expected, step
        assert bank["bank.text"].shape == (64, 16, 128) and bank["bank.video"].shape == (64, 4, 128)
        ids = bank["bank.ids"][:expected]
        assert ids.min() >= 0 and ids.max() < 40  # caption indices of the training split


def test_memory_size_changes_the_neighbour_term_of_a_real_run(tiny_synthetic, tmp_path):
    """memory_size 4 keeps only the newest 4 of the 16 refill items; 64 keeps all: L_Nbi differs from step 1."""
    values = {}
    for size in (4, 64):
        out = tmp_path / str(size)
        run_train([*RUN, f"data.root={tiny_synthetic}", f"loss.memory_size={size}", "trainer.max_steps=1"], out)
        values[size] = train_rows(out)[1]
    assert values[4]["train/neighbor"] != values[64]["train/neighbor"]
    assert values[4]["train/centrality"] == values[64]["train/centrality"]  # the batch term does not read the bank


def test_mid_epoch_resume_restores_the_bank_and_continues_the_same_losses(neighborretr_run, tiny_synthetic, tmp_path):
    """Stopped after step 4 (one batch before the end of epoch 0), then resumed: the bank is restored, not
    refilled, and every later step logs exactly the losses of the uninterrupted run."""
    out = tmp_path / "stopped"
    run_train([*RUN, f"data.root={tiny_synthetic}", "trainer.max_steps=4"], out)
    checkpoint = out / "checkpoints" / "step_00000004"
    stopped, reference = bank_state(checkpoint), bank_state(neighborretr_run / "checkpoints" / "step_00000004")
    assert stopped.keys() == reference.keys()
    for key in stopped:
        assert torch.equal(stopped[key], reference[key]), key
    run_train([*RUN, f"data.root={tiny_synthetic}", f"trainer.resume={checkpoint}"], out)
    resumed, uninterrupted = train_rows(out), train_rows(neighborretr_run)
    for step in range(5, 11):
        for key in ("train/loss", *(f"train/{t}" for t in TERMS)):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-6, abs=1e-7), (step, key)
    for step in (6, 10):
        a = bank_state(out / "checkpoints" / f"step_{step:08d}")
        b = bank_state(neighborretr_run / "checkpoints" / f"step_{step:08d}")
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), step


def test_logged_losses_equal_the_recorded_reference(neighborretr_run, request):
    """A seeded run's first steps against values recorded from this recipe (torchtune's recipe tests). When the
    maths changes on purpose, regenerate: NEIGHBORRETR_REGENERATE_REFERENCE=1 pytest -k recorded_reference."""
    import os

    rows = train_rows(neighborretr_run)
    got = {str(s): {k: rows[s][f"train/{k}"] for k in ("loss", *TERMS)} for s in (1, 2, 3, 6)}
    if os.environ.get("NEIGHBORRETR_REGENERATE_REFERENCE"):
        REFERENCE.write_text(json.dumps(got, indent=2) + "\n")
    expected = json.loads(REFERENCE.read_text())
    assert expected.keys() == got.keys()
    for step, terms in expected.items():
        for key, value in terms.items():
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-9), (step, key)


EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def benchmark_roots(tmp_path_factory) -> dict[str, Path]:
    """The synthetic clips in every benchmark's file format, with more than one debug batch (24) of training
    pairs in each."""
    from tests.integration.test_benchmark_training import _as_activitynet, _as_didemo, _as_msvd

    msrvtt = generate_tiny_synthetic(tmp_path_factory.mktemp("formats") / "msrvtt", num_train=32)
    base = msrvtt.parent
    roots = {"msrvtt": msrvtt, "synthetic": msrvtt}
    for name, convert in (("activitynet", _as_activitynet), ("msvd", _as_msvd), ("didemo", _as_didemo)):
        convert(msrvtt, base / name)
        roots[name] = base / name
    return roots


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_debug_fast_runs_with_every_experiment(experiment, benchmark_roots, tmp_path):
    """Each recipe (its data format, loss, optimiser and settings) with debug=fast. On the CPU the experiments'
    ViT-B towers are swapped for open_clip's ViT-S-32 (same builder, 224 px) and the video frame rate follows
    the 8 fps clips; everything else is the experiment's own."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", [f"experiment={experiment}", "debug=fast"])
    overrides = [f"experiment={experiment}", "debug=fast", f"data.root={benchmark_roots[cfg.data.benchmark]}"]
    if "val_videos" in cfg.data:
        overrides.append("data.val_videos=4")
    if "name" in cfg.model:
        overrides.append("model.name=ViT-S-32")
    if cfg.data.video_framerate is not None:
        overrides.append("data.video_framerate=4")
    results = run_train(overrides, tmp_path)
    rows = train_rows(tmp_path)
    assert rows and all(math.isfinite(r["train/loss"]) for r in rows.values())
    if "num_neighbors" in cfg.loss:  # NeighborRetr: the official k=20 fits the debug batch, every term is live
        assert all(rows[s][f"train/{t}"] != 0 for s in rows for t in TERMS)
    assert set(results["test"]) == {"t2v", "v2t"}


def test_evaluating_a_moved_dataset_follows_the_saved_unresolved_config(tiny_synthetic, tmp_path):
    """The run keeps its config unresolved beside the resolved one; evaluation reads it, so data.root=<new place>
    also moves data.video_dir (an interpolation of it) and the scores are those of the training run's test."""
    import shutil

    from neighborretr_train.evaluate import evaluate

    first = tmp_path / "data"
    shutil.copytree(tiny_synthetic, first)
    run = tmp_path / "run"
    results = run_train([*TINY_OVERRIDES, "loss=infonce", f"data.root={first}", "trainer.epochs=1"], run)
    assert "video_dir: ${data.root}/videos" in (run / "config.unresolved.yaml").read_text()
    moved = first.rename(tmp_path / "moved")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("eval", [f"ckpt={run}", f"data.root={moved}", f"output_dir={tmp_path / 'eval'}", "eval.k=3"])
    try:
        rows = evaluate(cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    for direction in ("t2v", "v2t"):
        assert rows["none"][direction] == pytest.approx(results["normalized"]["none"][direction])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.num_neighbors=10", "num_neighbors=10 needs at least 12"),
        ("trainer.grad_accum=3", "not divisible by trainer.grad_accum=3"),
        ("optim.name=sgd", "optim: unknown optimizer 'sgd'"),
        ("optim.lr=-1", "optim: lr"),
        ("model.cluster_k=0", "cluster_k=0"),
        ("loss.kl_reduction=foo", "kl_reduction='foo'"),
        ("data.train_sampling=foo", "data.train_sampling='foo'"),
        ("eval.normalizations=[none,foo]", "eval.normalizations: unknown ['foo']"),
        ("trainer.mixed_precision=fp8", "trainer.mixed_precision=fp8"),
        ("trainer.epochs=abc", "trainer.epochs='abc': expected an integer"),
        ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
        ("+trainer.epoch=3", "trainer.epoch: unknown key; did you mean trainer.epochs?"),
        ("+foo=1", "foo: unknown key"),
        ("trainer.select_metric=t2v/R@2", "trainer.select_metric='t2v/R@2': choose one of rsum, t2v/R@1"),
        ("trainer.nonfinite=maybe", "trainer.nonfinite='maybe': choose stop or skip"),
        ("data.batch_size=1.5", "data.batch_size=1.5: expected an integer"),
        ("eval.k=0", "eval.k=0 must be >= 1"),
        ("+logger.mode=onlne", "logger.mode='onlne': choose online, offline or disabled"),
        ("trainer.resume=/no/such/run", "trainer.resume=/no/such/run: no such run or checkpoint folder"),
        ("scheduler.warmup=2", "scheduler: warmup"),
        ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
        ("data.rand_augment=foo", "data.rand_augment='foo'"),
        ("model.temporal_layers=0", "model.temporal_layers=0"),
        ("model.temporal_ln_eps=0", "model.temporal_ln_eps=0 must be > 0"),
        ("eval.v2t_protocol=best", "eval.v2t_protocol='best': choose best_caption or all_captions"),
        ("run_name=123", "run_name=123: expected a string (to pass a number as a string, quote it"),
    ],
)
def test_bad_settings_are_refused_before_any_file_is_read(override, message, tmp_path):
    """The data root does not exist: each refusal must come first, as a ConfigError naming the setting."""
    from neighborretr_train.common import ConfigError

    with pytest.raises((ConfigError, FileNotFoundError), match=re.escape(message)) as refused:
        run_train([*RUN, f"data.root={tmp_path / 'nowhere'}", override], tmp_path / "out")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()  # no run folder for a run that never started
