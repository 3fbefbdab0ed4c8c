"""The "as published" report: per-direction best epochs chosen on the test split, as the official code reports."""

import pytest
from hydra import compose, initialize_config_dir

from neighborretr.engine import EPOCH_TEST, TEST_SELECTED_NOTE, as_published_best
from neighborretr_train import config_dir


def _entry(epoch: int, t2v_r1: float, v2t_r1: float, tested: bool = True) -> dict:
    entry = {"epoch": epoch, "step": 10 * (epoch + 1), "score": 0.0, "val/t2v/R@1": 99.0}
    if tested:
        entry |= {f"{EPOCH_TEST}/t2v/R@1": t2v_r1, f"{EPOCH_TEST}/t2v/MnR": 10.0 + epoch}
        entry |= {f"{EPOCH_TEST}/v2t/R@1": v2t_r1, f"{EPOCH_TEST}/v2t/MnR": 20.0 + epoch}
    return entry


def test_each_direction_takes_its_own_best_test_epoch():
    history = [_entry(0, 10.0, 30.0), _entry(1, 25.0, 12.0), _entry(2, 20.0, 28.0), _entry(3, 5.0, 5.0, False)]
    report = as_published_best(history)
    assert report["note"] == TEST_SELECTED_NOTE and "test-selected" in report["note"]
    # t2v peaks at epoch 1, v2t at epoch 0: two different checkpoints, as the official "FINAL BEST RESULTS"
    assert report["t2v"] == {"epoch": 1, "step": 20, "R@1": 25.0, "MnR": 11.0}
    assert report["v2t"] == {"epoch": 0, "step": 10, "R@1": 30.0, "MnR": 20.0}


def test_ties_go_to_the_later_epoch_and_untested_runs_give_none():
    history = [_entry(0, 20.0, 7.0), _entry(1, 20.0, 9.0), _entry(2, 19.0, 9.0)]
    report = as_published_best(history)
    assert report["t2v"]["epoch"] == 1 and report["v2t"]["epoch"] == 2  # the official `best <= new`
    assert as_published_best([_entry(0, 1.0, 1.0, tested=False)]) is None
    assert as_published_best([]) is None


@pytest.mark.parametrize("recipe", ["train", "eval"])
def test_off_by_default(recipe):
    overrides = ["ckpt=x"] if recipe == "eval" else []
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(recipe, overrides)
    assert cfg.eval.as_published is False
    assert cfg.eval.v2t_protocol == "best_caption"
