"""The good/bad hub report through the recipes: training's final test and neighborretr-eval write it beside
<split>_metrics.json, log its numbers, and eval.hub_report=false turns it off."""

import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState
from hydra import compose, initialize_config_dir

from neighborretr.metrics_log import read_metrics
from neighborretr_train import config_dir
from neighborretr_train.evaluate import evaluate
from neighborretr_train.train import train
from tests.conftest import INFONCE, TINY_OVERRIDES

pytestmark = pytest.mark.integration

HUB_FILES = {"test_hubs_t2v.json", "test_hubs_t2v.png", "test_hubs_v2t.json", "test_hubs_v2t.png"}


def _run(recipe, config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config, overrides)
    try:
        return recipe(cfg)
    finally:  # Accelerate keeps process-wide state; the next run builds its own
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory) -> Path:
    """One epoch of InfoNCE, tested raw and with IS (so the report has a before and an after normalisation)."""
    out = tmp_path_factory.mktemp("hub_run")
    overrides = [*TINY_OVERRIDES, *INFONCE, f"data.root={tiny_synthetic}", "trainer.epochs=1"]
    wandb = ["logger=wandb", "logger.mode=offline"]
    _run(train, "train", [*overrides, *wandb, "eval.normalizations=[none,is]", f"output_dir={out}"])
    return out


def test_training_writes_and_logs_the_hub_report_of_each_method(trained):
    assert HUB_FILES <= {p.name for p in trained.iterdir()}
    t2v = json.loads((trained / "test_hubs_t2v.json").read_text())
    assert set(t2v["methods"]) == {"none", "is"} and t2v["k"] == 3
    for method, report in t2v["methods"].items():
        summary = report["summary"]
        assert (summary["n_queries"], summary["n_gallery"]) == (8, 8)  # 8 test videos, one caption each
        assert sum(report["items"]["n_k"]) == 3 * 8, method  # every query fills k slots
        assert all(r["id"].startswith("video") for r in report["hubs"])  # rows carry the video ids
    v2t = json.loads((trained / "test_hubs_v2t.json").read_text())["methods"]["none"]["summary"]
    assert (v2t["n_queries"], v2t["n_gallery"]) == (8, 8)
    assert (trained / "test_hubs_t2v.png").read_bytes()[:4] == b"\x89PNG"
    # the plots went to wandb as images (offline: copied into the run's media folder)
    (offline,) = (trained / "wandb").glob("offline-run-*")
    images = (offline / "files" / "media" / "images" / "test").glob("hubs_*.png")
    assert sorted(p.name[:8] for p in images) == ["hubs_t2v", "hubs_v2t"]
    logged = {k: v for row in read_metrics(trained / "metrics.jsonl") for k, v in row.items()}
    assert (
        logged["test/hubs/is/v2t/n_hubs"]
        == json.loads((trained / "test_hubs_v2t.json").read_text())["methods"]["is"]["summary"]["n_hubs"]
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_evaluation_writes_the_hub_report_unless_switched_off(trained, tiny_synthetic, tmp_path, enabled):
    out = tmp_path / "eval"
    overrides = [f"ckpt={trained}", f"output_dir={out}", "eval.k=3", "eval.normalizations=[none]"]
    _run(evaluate, "eval", [*overrides, f"eval.hub_report={str(enabled).lower()}"])
    written = {p.name for p in out.iterdir()}
    assert "test_metrics.json" in written
    if not enabled:
        assert not written & HUB_FILES
        return
    assert HUB_FILES <= written
    # the same weights give the same raw hub report as the training run's final test
    again = json.loads((out / "test_hubs_t2v.json").read_text())["methods"]["none"]
    trained_report = json.loads((trained / "test_hubs_t2v.json").read_text())["methods"]["none"]
    assert again["items"] == trained_report["items"]
