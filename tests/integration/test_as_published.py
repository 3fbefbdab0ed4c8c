"""eval.as_published in a real tiny run: off, the test split is scored once; on, it is also scored after every
epoch and results.json gets the per-direction test-selected epochs beside the validation-selected numbers."""

import pytest

from neighborretr.engine import EPOCH_TEST
from neighborretr.metrics_log import read_metrics
from tests.conftest import INFONCE, TINY_OVERRIDES
from tests.integration.test_recipe import run_train

pytestmark = pytest.mark.integration

RUN = [*TINY_OVERRIDES, *INFONCE, "eval.normalizations=[none]"]  # 2 epochs


@pytest.mark.parametrize("as_published", [False, True], ids=["default-off", "on"])
def test_as_published_picks_each_direction_from_the_per_epoch_test_scores(as_published, tiny_synthetic, tmp_path):
    extra = ["eval.as_published=true"] if as_published else []
    results = run_train([*RUN, *extra, f"data.root={tiny_synthetic}"], tmp_path)
    tested = [h for h in results["history"] if f"{EPOCH_TEST}/t2v/R@1" in h]
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if f"{EPOCH_TEST}/v2t/R@1" in r]
    if not as_published:
        assert "as_published_test_selected" not in results and not tested and not logged
        return
    assert len(tested) == len(logged) == 2  # one test evaluation per epoch, in the history and the log
    published = results["as_published_test_selected"]
    assert "test-selected" in published["note"]
    for direction in ("t2v", "v2t"):
        scores = [h[f"{EPOCH_TEST}/{direction}/R@1"] for h in tested]
        latest_best = max(e for e, s in enumerate(scores) if s == max(scores))
        assert published[direction]["epoch"] == latest_best
        assert published[direction]["R@1"] == max(scores)
    # the validation-selected numbers stay where they were, from the epoch chosen on validation
    assert results["best_epoch"] in (0, 1) and set(results["test"]) == {"t2v", "v2t"}
