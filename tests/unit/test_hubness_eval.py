import pytest
import torch

from neighborretr.eval.hubness_eval import (
    METHOD_PARAMS,
    _grid,
    intra_similarity,
    normalized_report,
    pooled_tokens,
    select_parameters,
    split_matrices,
)
from neighborretr.models.builders import tiny


def _features(n: int, tokens: int, dim: int, seed: int, kind: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, tokens, dtype=torch.long)
    mask[::2, tokens // 2 :] = 0
    return {kind: torch.randn(n, tokens, dim, generator=g), f"{kind}_mask": mask}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny(image_size=32, width=32, embed_dim=32, heads=2).eval()


def test_pooled_summaries_ignore_padding_and_give_unit_self_similarity(model):
    feats = _features(4, 6, 32, 0, "video")
    pooled = pooled_tokens(feats["video"], feats["video_mask"], model.sim_head.video_weights)
    changed = feats["video"].clone()
    changed[0, 3:] = 100.0  # padded tokens of sample 0
    again = pooled_tokens(changed, feats["video_mask"], model.sim_head.video_weights)
    torch.testing.assert_close(again, pooled)
    sim = intra_similarity(pooled, pooled)
    torch.testing.assert_close(sim, sim.t())
    torch.testing.assert_close(sim.diagonal(), torch.ones(4))
    assert (sim <= 1 + 1e-6).all()


def test_split_matrices_shapes_and_transposes(model):
    test = _features(5, 4, 32, 1, "text") | _features(3, 6, 32, 2, "video")
    bank = _features(7, 4, 32, 3, "text") | _features(4, 6, 32, 4, "video")
    m = split_matrices(model, test, bank, torch.device("cpu"), chunk_size=2)
    assert m["t2v"]["sim"].shape == (5, 3) and m["v2t"]["sim"].shape == (3, 5)
    assert m["t2v"]["query_bank"].shape == (7, 3) and m["t2v"]["gallery_bank"].shape == (4, 3)
    assert m["t2v"]["query_gallery_bank"].shape == (7, 4)
    assert m["v2t"]["query_bank"].shape == (4, 5) and m["v2t"]["gallery_bank"].shape == (7, 5)
    assert m["v2t"]["query_gallery_bank"].shape == (4, 7)
    torch.testing.assert_close(m["v2t"]["sim"], m["t2v"]["sim"].t())
    direct = model.similarity(test["text"], test["text_mask"], test["video"], test["video_mask"])
    torch.testing.assert_close(m["t2v"]["sim"], direct)
    for d in ("t2v", "v2t"):
        for key, value in m[d].items():
            assert value.abs().max() <= 1 + 1e-5, (d, key)  # cosine scale throughout


def test_selection_uses_only_validation_and_report_has_every_method(model):
    val = split_matrices(
        model,
        _features(6, 4, 32, 5, "text") | _features(6, 6, 32, 6, "video"),
        _features(9, 4, 32, 7, "text") | _features(5, 6, 32, 8, "video"),
        torch.device("cpu"),
    )
    c2v = torch.arange(6)
    methods = list(METHOD_PARAMS)
    grid = {"beta_query_bank": (10.0, 50.0), "beta_gallery_bank": (1.0,), "tau": (0.05,)}
    params = select_parameters(val, c2v, methods, grid)
    assert params["dualis"]["t2v"]["beta_query_bank"] in (10.0, 50.0)
    assert params["none"]["t2v"] == {} and params["sn"]["v2t"] == {"tau": 0.05}
    assert params["nnn"]["t2v"]["nnn_k"] in (1, 8)  # the default grid's 16 and 64 exceed the 9-caption bank
    rows, counts = normalized_report(val, c2v, methods, params, k=2)
    assert set(rows) == set(methods)
    for method in methods:
        assert set(rows[method]) == {"t2v", "v2t"}
        assert {"R@1", "skewness", "hub_occurrence", "antihub_occurrence"} <= set(rows[method]["t2v"])
        assert int(counts["t2v"][method].sum()) == 2 * 6  # k · queries
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalized_report(val, c2v, ["nope"], params)


def test_nnn_grid_caps_k_by_the_query_bank():
    grid = {"nnn_alpha": (0.5, 1.0), "nnn_k": (4, 16)}
    assert _grid("nnn", grid, 100) == [{"nnn_alpha": a, "nnn_k": k} for a in (0.5, 1.0) for k in (4, 16)]
    assert _grid("nnn", grid, 10) == [{"nnn_alpha": 0.5, "nnn_k": 4}, {"nnn_alpha": 1.0, "nnn_k": 4}]
    # a bank smaller than every k: the whole bank is averaged
    assert _grid("nnn", grid, 3) == [{"nnn_alpha": 0.5, "nnn_k": 3}, {"nnn_alpha": 1.0, "nnn_k": 3}]


def test_v2t_protocol_reaches_the_report():
    # caption_to_video [0, 0, 1, 1, 2]; by hand (tests/unit/test_metrics.py) the v2t ranks are [1, 2, 2] with
    # best_caption and [2, 2, 3] with all_captions.
    sim = torch.tensor([[0.5, 0.9, 0.3], [0.2, 0.1, 0.25], [0.7, 0.3, 0.1], [0.6, 0.8, 0.2], [0.4, 0.85, 0.2]])
    c2v = torch.tensor([0, 0, 1, 1, 2])
    banks = dict.fromkeys(("query_bank", "gallery_bank", "query_gallery_bank"))
    matrices = {"t2v": {"sim": sim, **banks}, "v2t": {"sim": sim.t(), **banks}}
    mnr = {}
    for protocol in ("best_caption", "all_captions"):
        rows, _ = normalized_report(matrices, c2v, ["none"], {}, k=1, v2t_protocol=protocol)
        mnr[protocol] = rows["none"]["v2t"]["MnR"]
    assert mnr == pytest.approx({"best_caption": 8 / 3, "all_captions": 10 / 3})


def test_the_recipe_evaluator_passes_eval_v2t_protocol(monkeypatch):
    from omegaconf import OmegaConf

    import neighborretr_train.common as common

    seen = {}
    monkeypatch.setattr(common, "evaluate_report", lambda *args, **kwargs: seen.update(kwargs))
    for protocol in ("all_captions", "best_caption"):
        cfg = OmegaConf.create({"normalizations": ["none"], "k": 3, "chunk_size": 8, "v2t_protocol": protocol})
        evaluator = common.Evaluator(accelerator=None, data=None, eval_cfg=cfg, records={})
        evaluator.loaders = {"val": ("captions", "videos")}
        evaluator(model=None, split="val")
        assert seen["v2t_protocol"] == protocol
