import json
import subprocess
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


SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "normalize_sims.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_printed_table_shows_the_numbers(tmp_path):
    # 8 queries x 10 gallery items; queries 0-4 score their own item highest, queries 5-7 score item 9 highest.
    rng = np.random.default_rng(1)
    sim = rng.uniform(-0.5, 0.5, size=(8, 10)).astype(np.float32)
    sim[np.arange(8), np.arange(8)] = 0.8
    sim[5:, 9] = 0.9
    gt = np.arange(8)
    np.save(tmp_path / "test.npy", sim)
    np.save(tmp_path / "gt.npy", gt)
    expected_r1 = 100.0 * np.mean(sim.argmax(axis=1) == gt)  # 62.5, computed without the library
    assert expected_r1 == 62.5
    gt_file, out = tmp_path / "gt.npy", tmp_path / "out"
    done = _run("--test", tmp_path / "test.npy", "--gt", gt_file, "--methods", "none", "--k", "2", "--out", out)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line.split() for line in lines if line.split()[:1] == ["method"])
    row = next(line.split() for line in lines if line.split()[:1] == ["none"])
    assert len(row) == len(header) and "-" not in row
    assert row[header.index("R@1")] == f"{expected_r1:.1f}"
    assert json.loads((out / "metrics.json").read_text())["rows"]["none"]["q2g"]["R@1"] == expected_r1


@pytest.fixture
def bad_inputs(sims):
    root, files = sims
    np.save(root / "empty.npy", np.zeros((0, 12), np.float32))
    np.save(root / "gt_half.npy", np.arange(12) + 0.5)
    np.save(root / "gt_out.npy", np.arange(1, 13))
    np.save(root / "gt_short.npy", np.arange(11))
    np.save(root / "qgb_narrow.npy", files["query-gallery-bank"][:, :7].numpy())
    np.save(root / "owner_orphan.npy", np.array([0, 0, 1, 1] * 3))  # queries 2..11 own no item
    return root


BAD = {
    "missing gt": (["--gt", "{root}/nope.npy"], "--gt: no such file"),
    "empty test": (["--test", "{root}/empty.npy"], "--test: {root}/empty.npy has shape (0, 12)"),
    "empty query bank": (["--query-bank", "{root}/empty.npy"], "--query-bank: {root}/empty.npy has shape (0, 12)"),
    "empty gallery bank": (["--gallery-bank", "{root}/empty.npy"], "--gallery-bank: {root}/empty.npy has shape"),
    "k above gallery": (["--k", "13"], "--k 13 is larger than the gallery (12 columns of --test)"),
    "negative beta q": (["--beta-query-bank", "-1"], "--beta-query-bank must be a finite number >= 0"),
    "negative beta g": (["--beta-gallery-bank", "-0.5"], "--beta-gallery-bank must be a finite number >= 0"),
    "negative tau": (["--tau", "-0.01"], "--tau must be a finite number > 0"),
    "zero iters": (["--sinkhorn-iters", "0"], "--sinkhorn-iters must be >= 1"),
    "dis-k above gallery": (
        ["--query-bank", "{root}/query-bank.npy", "--methods", "is", "--dis-k", "13"],
        "--dis-k 13 is larger than the gallery",
    ),
    "float gt": (["--gt", "{root}/gt_half.npy"], "holds 0.5 at position 0; gallery indices must be whole numbers"),
    "gt out of range": (["--gt", "{root}/gt_out.npy"], "holds 12 at position 11, outside the gallery"),
    "gt too short": (["--gt", "{root}/gt_short.npy"], "has shape (11,), but --test has 12 queries"),
    "bank columns": (["--query-bank", "{root}/query-gallery-bank.npy"], "has 20 columns but --test has 12"),
    "dbsn rows": (
        ["--query-bank", "{root}/gallery-bank.npy", "--query-gallery-bank", "{root}/query-gallery-bank.npy"],
        "--query-gallery-bank has 30 rows but --query-bank has 20",
    ),
    "dbsn columns": (
        ["--gallery-bank", "{root}/gallery-bank.npy", "--query-gallery-bank", "{root}/qgb_narrow.npy"],
        "--query-gallery-bank has 7 columns but --gallery-bank has 20 rows",
    ),
    "logit without factor": (["--scale", "logit"], "need --logit-scale"),
    "nnn-k above bank": (
        ["--query-bank", "{root}/query-bank.npy", "--methods", "nnn", "--nnn-k", "31"],
        "--nnn-k 31 is larger than the query bank (30 rows of --query-bank)",
    ),
    "negative nnn alpha": (["--nnn-alpha", "-1"], "--nnn-alpha must be a finite number >= 0"),
    "gt and owner": (["--gt", "{root}/gt_short.npy", "--gallery-owner", "{root}/gt_short.npy"], "pass one"),
    "owner orphans": (["--gallery-owner", "{root}/owner_orphan.npy"], "10 query row(s) own no gallery item (first: 2)"),
    "owner length": (["--gallery-owner", "{root}/gt_short.npy"], "has 11 values, but --test has 12 gallery items"),
    "cosine bank declared logit": (
        ["--gallery-bank", "{root}/gallery-bank.npy", "--scale", "logit", "--logit-scale", "100"]
        + ["--test-scale", "cosine"],
        "--gallery-bank is declared on the logit scale but max|s|",
    ),
}


def _bad_args(root, case):
    extra, message = BAD[case]
    args = ["--test", root / "test.npy", "--out", root / "out", *(a.format(root=root) for a in extra)]
    return [str(a) for a in args], message.format(root=root)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_one_line_error(bad_inputs, case):
    # In-process: SystemExit with a str is what Python prints on stderr, with exit status 1; any other exception
    # (a traceback) fails the test.
    args, message = _bad_args(bad_inputs, case)
    with pytest.raises(SystemExit) as exit_info:
        normalize_sims.main(args)
    text = exit_info.value.code
    assert isinstance(text, str) and text.startswith("error: ") and "\n" not in text
    assert message in text
    assert not (bad_inputs / "out" / "metrics.json").exists()


@pytest.mark.parametrize("case", ["missing gt", "empty test", "k above gallery", "negative beta q", "float gt"])
def test_bad_input_exits_1_with_one_stderr_line(bad_inputs, case):
    args, message = _bad_args(bad_inputs, case)
    done = _run(*args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert message in done.stderr and done.stdout == ""


def test_whole_float_gt_is_accepted(sims):
    root, files = sims
    order = np.arange(12)[::-1].copy()
    np.save(root / "gt.npy", order.astype(np.float64))
    rows = normalize_sims.main(["--test", str(root / "test.npy"), "--gt", str(root / "gt.npy"), "--out", str(root)])
    expected = rank_metrics(
        positive_ranks(files["test"], torch.nn.functional.one_hot(torch.as_tensor(order), 12).bool())
    )
    assert {key: rows["none"]["q2g"][key] for key in expected} == expected
    assert expected != rank_metrics(positive_ranks(files["test"], torch.eye(12, dtype=torch.bool)))


def test_each_input_declares_its_scale(sims):
    # CLIP-style export: cross-modal matrices as logits (x64, exact in float32), the intra-modal gallery bank as
    # cosines. Reading each on its own scale must give exactly the all-cosine result.
    root, files = sims
    for name in ("test", "query-bank"):
        np.save(root / f"{name}-logit.npy", (64 * files[name]).numpy())
    common = ["--methods", "dualis", "--beta-gallery-bank", "20", "--k", "3"]
    cosine = normalize_sims.main(_args(root, *common, "--out", str(root / "cos")))
    mixed = normalize_sims.main(
        ["--test", str(root / "test-logit.npy"), "--query-bank", str(root / "query-bank-logit.npy")]
        + ["--gallery-bank", str(root / "gallery-bank.npy"), "--out", str(root / "mixed"), *common]
        + ["--scale", "logit", "--logit-scale", "64", "--gallery-bank-scale", "cosine"]
    )
    assert mixed == cosine
    settings = json.loads((root / "mixed" / "metrics.json").read_text())["settings"]
    assert (settings["test_scale"], settings["query_bank_scale"], settings["gallery_bank_scale"]) == (
        "logit",
        "logit",
        "cosine",
    )
    # The gallery-bank term matters here: rescaling the bank as if it were logits (the old --scale logit) changes
    # the result, so the equality above is not a coincidence.
    dropped = normalize(files["test"], "dualis", files["query-bank"], files["gallery-bank"] / 64, beta_gallery_bank=20)
    kept = normalize(files["test"], "dualis", files["query-bank"], files["gallery-bank"], beta_gallery_bank=20)
    assert rank_metrics(positive_ranks(dropped, torch.eye(12, dtype=torch.bool))) != rank_metrics(
        positive_ranks(kept, torch.eye(12, dtype=torch.bool))
    )


def test_nnn_in_the_cli_matches_the_library(sims):
    root, files = sims
    rows = normalize_sims.main(_args(root, "--methods", "nnn", "--nnn-alpha", "0.5", "--nnn-k", "4", "--k", "3"))
    scores = normalize(files["test"], "nnn", query_bank=files["query-bank"], nnn_alpha=0.5, nnn_k=4)
    expected = rank_metrics(positive_ranks(scores, torch.eye(12, dtype=torch.bool)))
    assert {key: rows["nnn"]["q2g"][key] for key in expected} == expected
    default = normalize_sims.main(_args(root, "--methods", "nnn", "--k", "3"))  # alpha 0.75, k 16
    assert default["nnn"]["q2g"] != rows["nnn"]["q2g"]


def test_gallery_owner_ranks_multi_caption_queries_by_the_chosen_protocol(tmp_path):
    # 3 videos (queries) x 5 captions, caption i belongs to video [0, 0, 1, 1, 2][i]; by hand
    # (tests/unit/test_metrics.py) the ranks are [1, 2, 2] with best_caption and [2, 2, 3] with all_captions.
    captions_by_video = np.array(
        [[0.5, 0.9, 0.3], [0.2, 0.1, 0.25], [0.7, 0.3, 0.1], [0.6, 0.8, 0.2], [0.4, 0.85, 0.2]], np.float32
    )
    np.save(tmp_path / "v2t.npy", captions_by_video.T.copy())
    np.save(tmp_path / "owner.npy", np.array([0, 0, 1, 1, 2]))
    base = ["--test", str(tmp_path / "v2t.npy"), "--gallery-owner", str(tmp_path / "owner.npy"), "--k", "1"]
    mnr = {}
    for protocol in ("best_caption", "all_captions"):
        rows = normalize_sims.main([*base, "--v2t-protocol", protocol, "--out", str(tmp_path / protocol)])
        mnr[protocol] = rows["none"]["q2g"]["MnR"]
    assert mnr == pytest.approx({"best_caption": 8 / 3, "all_captions": 10 / 3})
    default = normalize_sims.main([*base, "--out", str(tmp_path / "default")])
    assert default["none"]["q2g"]["MnR"] == pytest.approx(8 / 3)
