import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import normalize_sims  # noqa: E402

from neighborretr.eval.hubness import normalize  # noqa: E402
from neighborretr.eval.metrics import positive_ranks, rank_metrics  # noqa: E402


def _unit(n, d, g):
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


@pytest.fixture
def sims(tmp_path):
    g = torch.Generator().manual_seed(0)
    gallery, queries = _unit(12, 8, g), None
    queries = torch.nn.functional.normalize(gallery + 0.8 * torch.randn(12, 8, generator=g), dim=1)
    qbank, gbank = _unit(30, 8, g), _unit(20, 8, g)
    files = {
        "test": queries @ gallery.t(),
        "query-bank": qbank @ gallery.t(),
        "gallery-bank": gbank @ gallery.t(),
        "query-gallery-bank": qbank @ gbank.t(),
    }
    for name, value in files.items():
        np.save(tmp_path / f"{name}.npy", value.numpy())
    torch.save(files["test"], tmp_path / "test.pt")
    return tmp_path, files


def _args(root, *extra):
    base = [f"--{n}" for n in ("test", "query-bank", "gallery-bank", "query-gallery-bank")]
    return [x for n in base for x in (n, str(root / f"{n[2:]}.npy"))] + ["--out", str(root / "out"), *extra]


def test_cli_table_json_and_plot_match_the_library(sims, capsys):
    root, files = sims
    rows = normalize_sims.main(_args(root, "--methods", "none", "is", "dualdis", "dbsn", "--k", "3"))
    printed = capsys.readouterr().out
    assert all(m in printed for m in ("none", "is", "dualdis", "dbsn"))
    saved = json.loads((root / "out" / "metrics.json").read_text())
    assert saved["rows"]["is"]["q2g"]["R@1"] == rows["is"]["q2g"]["R@1"]
    assert (root / "out" / "k_occurrence.png").read_bytes()[:4] == b"\x89PNG"
    scores = normalize(files["test"], "is", query_bank=files["query-bank"])
    expected = rank_metrics(positive_ranks(scores, torch.eye(12, dtype=torch.bool)))
    assert rows["is"]["q2g"]["R@1"] == expected["R@1"] and rows["is"]["q2g"]["MnR"] == expected["MnR"]


def test_cli_reads_pt_files(sims):
    root, _ = sims
    rows = normalize_sims.main(["--test", str(root / "test.pt"), "--out", str(root / "o"), "--methods", "none"])
    assert "none" in rows


def test_cli_errors_are_clear(sims, tmp_path):
    root, files = sims
    np.save(root / "bad_shape.npy", files["query-bank"][:, :5].numpy())
    with pytest.raises(SystemExit, match="columns but --test has 12"):
        normalize_sims.main(["--test", str(root / "test.npy"), "--query-bank", str(root / "bad_shape.npy")])
    nan = files["test"].clone()
    nan[0, 0] = float("nan")
    np.save(root / "nan.npy", nan.numpy())
    with pytest.raises(SystemExit, match="NaN"):
        normalize_sims.main(["--test", str(root / "nan.npy")])
    np.save(root / "logits.npy", (100 * files["test"]).numpy())
    with pytest.raises(SystemExit, match="logit"):
        normalize_sims.main(["--test", str(root / "logits.npy")])
    ok = normalize_sims.main(
        ["--test", str(root / "logits.npy"), "--scale", "logit", "--logit-scale", "100", "--out", str(root / "l")]
    )
    assert ok["none"]["q2g"]["R@1"] >= 0
    with pytest.raises(SystemExit, match="needs --query-bank"):
        normalize_sims.main(["--test", str(root / "test.npy"), "--methods", "is"])
