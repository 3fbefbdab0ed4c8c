"""The search library on generated clips and a tiny random model: index, incremental update, unreadable files,
refusals, and scores equal to the evaluation path's (raw and hub-normalised) on the same model and banks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from neighborretr.eval.hubness import normalize
from neighborretr.search import (
    Banks,
    Searcher,
    SearchIndexError,
    TextEncoder,
    build_index,
    default_betas,
    encode_captions,
    load_index,
)
from neighborretr.search.encode import summarize
from neighborretr.search.first_stage import ExactFirstStage, HnswFirstStage
from tests.search_helpers import SAMPLING, copy_test_videos, eval_features, eval_matrices, tiny_model

CPU = torch.device("cpu")
BETAS = {"beta_query_bank": 20.0, "beta_gallery_bank": 3.0}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def gallery(tiny_synthetic, tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("gallery")
    return folder, copy_test_videos(tiny_synthetic, folder)


@pytest.fixture(scope="module")
def reference(model, tiny_synthetic, gallery) -> dict:
    """The evaluation path's features and t2v matrices: test captions x test videos, training-split banks."""
    test = eval_features(model, tiny_synthetic, "test", gallery[1])
    bank = eval_features(model, tiny_synthetic, "train")
    return {"test": test, "bank": bank, **eval_matrices(model, test, bank)}


@pytest.fixture(scope="module")
def banks(model, reference) -> Banks:
    bank = reference["bank"]
    query = encode_captions(TextEncoder(model, 16, CPU), bank["captions"], progress=False)
    videos = summarize(bank["video"], bank["video_mask"], model.sim_head.video_weights)
    return Banks(query=query, gallery=videos.pooled, sources={"query": "train", "gallery": "train"})


@pytest.fixture(scope="module")
def index_dir(model, gallery, banks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    methods = {m: BETAS for m in ("is", "dis", "dualis", "dualdis")}
    update = build_index(
        out, model, gallery[0], SAMPLING, "model-a", CPU, banks=banks, betas=methods, token_dtype="float32",
        num_workers=0, progress=False,
    )  # fmt: skip
    assert (update.added, update.skipped, update.failed, update.total) == (8, 0, {}, 8)
    return out


def _scores_by_path(result) -> dict[str, float]:
    return {h.path: h.score for h in result.hits}


def test_raw_scores_and_ranking_equal_the_evaluation_similarity(model, index_dir, reference):
    searcher = Searcher(load_index(index_dir, "model-a"), TextEncoder(model, 16, CPU))
    paths = [f"{v}.mp4" for v in reference["test"]["video_ids"]]
    for row, caption in enumerate(reference["test"]["captions"]):
        result = searcher.search(caption, top_k=8)
        expected = reference["sim"][row]
        got = _scores_by_path(result)
        assert torch.allclose(torch.tensor([got[p] for p in paths]), expected, atol=1e-5)
        assert [h.path for h in result.hits] == [paths[i] for i in expected.argsort(descending=True, stable=True)]
        assert [h.rank for h in result.hits] == list(range(1, 9))


@pytest.mark.parametrize("method", ["is", "dis", "dualis", "dualdis"])
def test_per_query_normalised_scores_equal_the_evaluation_library(model, index_dir, reference, method):
    """Every query of the test split, one at a time, against `hubness.normalize` on the whole matrix."""
    expected = normalize(
        reference["sim"], method, query_bank=reference["query_bank"], gallery_bank=reference["gallery_bank"], **BETAS
    )
    searcher = Searcher(load_index(index_dir, "model-a"), TextEncoder(model, 16, CPU))
    paths = [f"{v}.mp4" for v in reference["test"]["video_ids"]]
    for row, caption in enumerate(reference["test"]["captions"]):
        got = _scores_by_path(searcher.search(caption, top_k=8, normalization=method))
        assert torch.allclose(torch.tensor([got[p] for p in paths]), expected[row], atol=2e-4, rtol=1e-5), method
    # a normalisation moves scores away from the raw ones (the banks are really used)
    assert not torch.allclose(expected, reference["sim"], atol=1e-2)


def test_shallow_first_stage_keeps_each_candidates_normalised_score(model, index_dir, reference):
    """IS scores are per item: re-ranking 3 candidates gives them the same scores as the full row."""
    expected = normalize(reference["sim"], "is", query_bank=reference["query_bank"], **BETAS)
    searcher = Searcher(load_index(index_dir, "model-a"), TextEncoder(model, 16, CPU), depth=3)
    paths = [f"{v}.mp4" for v in reference["test"]["video_ids"]]
    result = searcher.search(reference["test"]["captions"][0], top_k=3, normalization="is")
    assert result.candidates == 3 and len(result.hits) == 3
    for hit in result.hits:
        assert hit.score == pytest.approx(float(expected[0, paths.index(hit.path)]), abs=2e-4)
    assert set(result.timings_ms) == {"encode_text", "first_stage", "rerank", "normalize", "total"}


def test_float16_index_keeps_the_ranking_within_rounding(model, gallery, reference, tmp_path):
    build_index(tmp_path / "h", model, gallery[0], SAMPLING, "model-a", CPU, num_workers=0, progress=False)
    index = load_index(tmp_path / "h")
    assert index.items.tokens.dtype == torch.float16
    result = Searcher(index, TextEncoder(model, 16, CPU)).search(reference["test"]["captions"][1], top_k=8)
    paths = [f"{v}.mp4" for v in reference["test"]["video_ids"]]
    got = torch.tensor([_scores_by_path(result)[p] for p in paths])
    assert torch.allclose(got, reference["sim"][1], atol=3e-3)


def test_reindexing_adds_new_files_only_and_keeps_statistics_exact(model, gallery, banks, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    files = sorted(gallery[0].glob("*.mp4"))
    for f in files[:5]:
        shutil.copy(f, folder / f.name)
    out = tmp_path / "idx"
    kw = dict(banks=banks, token_dtype="float32", num_workers=0, progress=False)
    first = build_index(out, model, folder, SAMPLING, "model-a", CPU, **kw)
    before = load_index(out)
    (folder / "more").mkdir()
    for f in files[5:]:
        shutil.copy(f, folder / "more" / f.name)
    second = build_index(out, model, folder, SAMPLING, "model-a", CPU, num_workers=0, progress=False)
    assert (first.added, second.added, second.skipped, second.total) == (5, 3, 5, 8)
    after = load_index(out)
    assert [i["path"] for i in after.manifest.items[5:]] == [f"more/{f.name}" for f in files[5:]]
    assert torch.equal(after.items.tokens[:5], before.items.tokens)  # old rows untouched, not re-encoded
    # the appended statistics equal those of an index built in one go
    for f in files[5:]:
        shutil.move(folder / "more" / f.name, folder / f.name)
    shutil.rmtree(folder / "more")
    build_index(tmp_path / "once", model, folder, SAMPLING, "model-a", CPU, **kw)
    once = load_index(tmp_path / "once")
    order = [
        [i["path"] for i in once.manifest.items].index(i["path"].removeprefix("more/")) for i in after.manifest.items
    ]
    for method in ("is", "dualdis"):
        for bank in after.stats[method]:
            a, b = after.stats[method][bank], once.stats[method][bank]
            assert torch.allclose(a.lse, b.lse[order], atol=1e-5)
            assert torch.equal(a.occurrence, b.occurrence[order])


def test_unreadable_files_are_listed_and_counted_never_fatal(model, gallery, tmp_path):
    folder = tmp_path / "videos"
    shutil.copytree(gallery[0], folder)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "garbage.mkv").write_bytes(torch.randint(0, 255, (4096,), dtype=torch.uint8).numpy().tobytes())
    (folder / "notes.txt").write_text("not a video")  # not a video extension: not listed at all
    update = build_index(tmp_path / "idx", model, folder, SAMPLING, "model-a", CPU, num_workers=0, progress=False)
    assert update.added == 8 and update.total == 8
    assert set(update.failed) == {"empty.mp4", "garbage.mkv"}
    assert "empty" in update.failed["empty.mp4"]
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert set(manifest["failed"]) == {"empty.mp4", "garbage.mkv"}
    # a later run tries them again (they may have been fixed) and still counts them
    again = build_index(tmp_path / "idx", model, folder, SAMPLING, "model-a", CPU, num_workers=0, progress=False)
    assert (again.added, again.skipped, len(again.failed)) == (0, 8, 2)


def test_foreign_or_newer_index_is_refused(model, index_dir, gallery, tmp_path):
    with pytest.raises(SearchIndexError, match="built by another model"):
        load_index(index_dir, "model-b")
    with pytest.raises(SearchIndexError, match="built by another model"):
        build_index(index_dir, model, gallery[0], SAMPLING, "model-b", CPU, num_workers=0, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"version": 99}))
    with pytest.raises(SearchIndexError, match="version 99"):
        load_index(copy, "model-a")
    with pytest.raises(FileNotFoundError, match="not a search index"):
        load_index(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "bad.mp4").write_bytes(b"")
    update = build_index(tmp_path / "e", model, tmp_path / "empty", SAMPLING, "m", CPU, num_workers=0, progress=False)
    assert (update.added, len(update.failed)) == (0, 1)
    with pytest.raises(SearchIndexError, match="holds no videos"):
        load_index(tmp_path / "e")


def test_missing_statistics_and_unknown_methods_are_refused(model, gallery, tmp_path):
    build_index(tmp_path / "i", model, gallery[0], SAMPLING, "m", CPU, num_workers=0, progress=False)
    searcher = Searcher(load_index(tmp_path / "i"), TextEncoder(model, 16, CPU))
    assert searcher.methods == ["none"]
    with pytest.raises(ValueError, match="no bank statistics for 'dis'"):
        searcher.search("a red circle", normalization="dis")
    with pytest.raises(ValueError, match="unknown normalisation 'sn'"):
        searcher.search("a red circle", normalization="sn")


def test_default_betas_follow_the_available_banks_and_overrides():
    assert set(default_betas({"query": True, "gallery": False})) == {"is", "dis"}
    betas = default_betas({"query": True, "gallery": True}, {"dualis": {"beta_query_bank": 50, "beta_gallery_bank": 3}})
    assert betas["dualis"] == {"beta_query_bank": 50.0, "beta_gallery_bank": 3.0}
    assert betas["is"] == {"beta_query_bank": 20.0}


def test_hnsw_first_stage_finds_what_the_exact_search_finds(tmp_path):
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(40, 32), dim=-1)
    pooled = torch.nn.functional.normalize(centres.repeat(50, 1) + 0.3 * torch.randn(2000, 32), dim=-1)
    exact = ExactFirstStage(pooled)
    hnsw = HnswFirstStage(pooled, cache=tmp_path / "ann.faiss")
    queries = torch.nn.functional.normalize(centres[:10] + 0.3 * torch.randn(10, 32), dim=-1)
    kept = [len(set(exact.search(q, 20).tolist()) & set(hnsw.search(q, 20).tolist())) / 20 for q in queries]
    assert sum(kept) / len(kept) >= 0.95
    assert (tmp_path / "ann.faiss").is_file()
    reloaded = HnswFirstStage(pooled, cache=tmp_path / "ann.faiss")
    assert torch.equal(reloaded.search(queries[0], 20), hnsw.search(queries[0], 20))
    top = exact.search(queries[0], 5)
    assert torch.equal(top, (pooled @ queries[0]).argsort(descending=True)[:5])
