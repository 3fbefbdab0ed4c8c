"""`neighborretr-search` on a run folder: index with the run's training banks, query (text and JSON), refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from neighborretr.data.annotations import parse_msrvtt
from neighborretr.eval.hubness import normalize
from neighborretr_train.common import build
from neighborretr_train.evaluate import load_run_model
from neighborretr_train.search import main
from tests.search_helpers import copy_test_videos, eval_features, eval_matrices, fake_run

pytest.importorskip("faiss", reason="neighborretr-search needs the search extra: pip install -e '.[search]'")


@pytest.fixture(scope="module")
def indexed(tiny_synthetic, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    run = fake_run(tiny_synthetic, root / "run")
    videos = root / "videos"
    ids = copy_test_videos(tiny_synthetic, videos)
    (videos / "broken.mp4").write_bytes(b"\x00" * 100)
    index = root / "index"
    args = ["index", "--ckpt", str(run), "--videos", str(videos), "--out", str(index), "--workers", "0"]
    args += ["--query-bank", "train", "--gallery-bank", "train", "--betas", "default", "--token-dtype", "float32"]
    assert main([*args, "--device", "cpu"]) == 0
    return {"run": run, "videos": videos, "index": index, "ids": ids, "root": root}


def test_index_reports_counts_and_reruns_skip_what_is_indexed(indexed, capsys):
    manifest = json.loads((indexed["index"] / "manifest.json").read_text())
    assert len(manifest["items"]) == 8 and list(manifest["failed"]) == ["broken.mp4"]
    # the run's training split: 24 videos less the 4 held out for validation, 2 captions each
    assert manifest["banks"]["query_size"] == 40 and manifest["banks"]["gallery_size"] == 20
    assert manifest["model"]["weights"].endswith("best/model.pt")
    capsys.readouterr()
    args = ["index", "--ckpt", str(indexed["run"]), "--videos", str(indexed["videos"]), "--out", str(indexed["index"])]
    assert main([*args, "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "0 added, 8 already indexed, 1 unreadable, 8 in the index" in out and "unreadable: broken.mp4" in out


@pytest.mark.parametrize("method", ["none", "dualdis"])
def test_query_json_equals_the_evaluation_scores_of_the_same_checkpoint(indexed, tiny_synthetic, capsys, method):
    model, run_cfg, _ = load_run_model(indexed["run"])
    test = eval_features(model, tiny_synthetic, "test", indexed["ids"])
    bank = eval_features(model, tiny_synthetic, "train", records=build(run_cfg, "data").records("train"))
    m = eval_matrices(model, test, bank)
    betas = {"beta_query_bank": 20.0, "beta_gallery_bank": 1.0}  # --betas default
    expected = normalize(m["sim"], method, query_bank=m["query_bank"], gallery_bank=m["gallery_bank"], **betas)
    caption = parse_msrvtt(tiny_synthetic, "test")[3].caption
    row = test["captions"].index(caption)
    capsys.readouterr()
    args = ["query", "--index", str(indexed["index"]), caption, "--top-k", "8", "--normalization", method, "--json"]
    assert main([*args, "--device", "cpu"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["query"] == caption and body["first_stage"] == "exact" and body["candidates"] == 8
    assert set(body["timings_ms"]) == {"encode_text", "first_stage", "rerank", "normalize", "total"}
    order = expected[row].argsort(descending=True, stable=True).tolist()
    assert [h["path"] for h in body["hits"]] == [f"{test['video_ids'][i]}.mp4" for i in order]
    got = torch.tensor([h["score"] for h in body["hits"]])
    assert torch.allclose(got, expected[row][order], atol=2e-4)


def test_plain_query_prints_a_table(indexed, capsys):
    assert main(["query", "--index", str(indexed["index"]), "a red circle", "--top-k", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "raw", "sec", "path"]
    assert lines[1].split()[0] == "1" and lines[2].split()[0] == "2" and "candidates" in lines[3]


def test_another_model_or_a_damaged_index_is_refused_in_one_line(indexed, tiny_synthetic, capsys):
    other = fake_run(tiny_synthetic, indexed["root"] / "other_run", seed=1)
    capsys.readouterr()
    code = main(["query", "--index", str(indexed["index"]), "--ckpt", str(other), "a dog", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "built by another model" in err and len(err.strip().splitlines()) == 1
    copy = indexed["root"] / "old_index"
    shutil.copytree(indexed["index"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"version": 0}))
    assert main(["query", "--index", str(copy), "a dog", "--device", "cpu"]) == 1
    assert "index format version 0" in capsys.readouterr().err
    assert main(["query", "--index", str(indexed["root"]), "a dog"]) == 1
    assert "not a search index" in capsys.readouterr().err
