"""The study's tables: mean +- std over seeds and the paired comparison against InfoNCE, on hand-made results."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from neighborretr_train import config_dir
from neighborretr_train.study import CPU_COMMON, VARIANTS, aggregate, format_tables, paired


def _rows(r1: float, skew: float) -> dict:
    metrics = {"R@1": r1, "R@5": 50.0, "MnR": 5.0, "skewness": skew, "hub_occurrence": 0.1, "antihub_occurrence": 0.0}
    return {"t2v": dict(metrics), "v2t": dict(metrics)}


def _results() -> dict:
    # InfoNCE R@1 10/12/14; NeighborRetr +2 on every seed (a beyond-noise gain), "no_kl" +3/-3/0 (noise)
    out = {}
    for seed, base in enumerate([10.0, 12.0, 14.0]):
        out["syn", "infonce", seed] = {"normalized": {"none": _rows(base, 2.0)}}
        out["syn", "neighborretr", seed] = {"normalized": {"none": _rows(base + 2 + 0.1 * seed, 1.0)}}
        out["syn", "no_kl", seed] = {"normalized": {"none": _rows(base + [3, -3, 0][seed], 2.0)}}
    return out


def test_aggregate_collects_per_seed_values() -> None:
    table = aggregate(_results(), ["none", "is"])
    assert table["syn"]["infonce"]["none"]["t2v"]["R@1"] == [10.0, 12.0, 14.0]
    assert "is" not in table["syn"]["infonce"]  # a method the runs did not report is left out


def test_paired_statistics_by_hand() -> None:
    cell = paired([2.0, 2.1, 2.2])
    assert cell["mean"] == pytest.approx(2.1)
    assert cell["std"] == pytest.approx(0.1)
    # t = mean / (std / sqrt(3)) = 36.37 with 2 degrees of freedom: p = 0.000755
    assert cell["p"] == pytest.approx(0.000755, rel=1e-2)
    assert (cell["up"], cell["down"]) == (3, 0)
    assert math.isnan(paired([1.0])["p"])


def test_tables_mark_only_consistent_differences() -> None:
    text = format_tables(aggregate(_results(), ["none"]))
    assert "| infonce | none | 3 | 12.00 ± 2.00 |" in text
    paired_rows = text.split("paired differences")[1].splitlines()
    neighborretr = next(line for line in paired_rows if line.startswith("| neighborretr | none |"))
    no_kl = next(line for line in paired_rows if line.startswith("| no_kl | none |"))
    assert neighborretr.split(" | ")[2].startswith("**+2.10")  # t2v R@1: 3/3 seeds up, p < 0.05
    assert "**" not in no_kl.split(" | ")[2]  # +0.00 with one seed up, one down


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_composes_and_sets_what_it_names(variant: str) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", [*CPU_COMMON, "data=synthetic_hubs", *VARIANTS[variant]])
    assert cfg.data.root == "data/synthetic_hubs"
    expected_loss = "InfoNCEObjective" if variant == "infonce" else "NeighborRetrObjective"
    assert cfg.loss._target_.endswith(expected_loss)
    for override in VARIANTS[variant][1:]:
        key, value = override.split("=")
        assert str(OmegaConf.select(cfg, key)).lower() == value.lower()


@pytest.mark.parametrize(
    ("data", "common", "epochs"),
    [
        ("synthetic", CPU_COMMON, 2),
        ("synthetic_hubs", CPU_COMMON, 5),  # its 1,000-clip gallery needs 5 epochs to learn past its hubs
        ("synthetic_hubs", [*CPU_COMMON, "trainer.epochs=1"], 1),  # an explicit --common value wins
        ("msrvtt", ["experiment=msrvtt_vitb32"], 5),  # a real benchmark keeps its experiment's epochs
    ],
)
def test_each_run_trains_its_sets_epochs_unless_common_says_otherwise(data, common, epochs, tmp_path) -> None:
    from neighborretr_train.study import CPU_EPOCHS, run_overrides

    overrides = run_overrides(tmp_path, data, "infonce", 0, common)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides)
    assert cfg.trainer.epochs == epochs
    # only the built-in sets get an epochs override (msrvtt's experiment also says 5, so check the list itself)
    assert any(o.startswith("trainer.epochs=") for o in overrides) == (data in CPU_EPOCHS)
    assert cfg.run_name == f"study_{data}_infonce_s0" and cfg.seed == 0 and cfg.output_root == str(tmp_path)


def test_tables_only_reads_finished_runs_and_trains_nothing(tmp_path) -> None:
    import json

    from neighborretr_train.study import main

    for seed in (0, 1):
        run = tmp_path / "runs" / f"study_syn_infonce_s{seed}" / "2026-01-01_00-00-00"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"normalized": {"none": _rows(10.0 + seed, 1.0)}}))
    args = ["--data", "syn", "--variants", "infonce", "neighborretr", "--seeds", "0", "1", "2", "--methods", "none"]
    table = main([*args, "--output-root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--tables-only"])
    assert table["syn"]["infonce"]["none"]["t2v"]["R@1"] == [10.0, 11.0]  # seed 2 and neighborretr never ran
    assert "neighborretr" not in table["syn"]
    assert "| infonce | none | 2 | 10.50 ± 0.71 |" in (tmp_path / "out" / "study.md").read_text()
    # the tabulating command's settings are not the runs' own: study.json claims none
    assert json.loads((tmp_path / "out" / "study.json").read_text()).keys() == {"variants", "table"}


@pytest.mark.parametrize("already_made", [False, True])
def test_a_generated_set_is_made_when_missing_and_never_remade(tmp_path, monkeypatch, already_made) -> None:
    import json

    from neighborretr_train import study

    root = tmp_path / "data"
    if already_made:  # e.g. made by `neighborretr-make-synthetic --hubs --num-test 200`: other sizes than the default
        root.mkdir()
        (root / "synthetic_meta.json").write_text("{}")
    made = []
    monkeypatch.setitem(study.GENERATORS, "synthetic_hubs", lambda path, progress: made.append(str(path)))

    def fake_train(cfg) -> None:
        run = tmp_path / "runs" / cfg.run_name / "2026-01-01_00-00-00"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"seed": cfg.seed}))

    monkeypatch.setattr(study, "train", fake_train)
    result = study.run_one(tmp_path / "runs", "synthetic_hubs", "infonce", 3, [*CPU_COMMON, f"data.root={root}"])
    assert result == {"seed": 3}
    assert made == ([] if already_made else [str(root)])
