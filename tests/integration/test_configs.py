"""Every config composes, every model config builds, and a mistyped key is refused before any work."""

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
import neighborretr_train.common  # noqa: E402,F401  (registers the rank_zero_dir resolver)

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs/experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (ROOT / "configs/model").glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment):
    cfg = _compose("train", [f"experiment={experiment}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["run_name"] == experiment
    assert resolved["data"]["batch_size"] > 0 and resolved["data"]["video_dir"].startswith(resolved["data"]["root"])
    first_line = (ROOT / f"configs/experiment/{experiment}.yaml").read_text().splitlines()[1]
    assert first_line.startswith("#"), "each experiment starts with its launch command in a comment"


def test_paper_recipe_values():
    cfg = _compose("train", ["experiment=msrvtt_vitb32"])
    assert (cfg.data.batch_size, cfg.data.max_words, cfg.data.max_frames, cfg.trainer.epochs) == (128, 24, 12, 5)
    assert (cfg.loss.mb_batch, cfg.loss.memory_size, cfg.model.high_level) == (15, 512, True)
    c = cfg.loss
    assert (c.centrality_scale, c.num_neighbors, c.temperature, c.beta) == (0.3, 20, 3.0, 0.7)
    an = _compose("train", ["experiment=activitynet_vitb32"])
    assert (an.data.max_words, an.data.max_frames, an.trainer.epochs, an.loss.memory_size) == (64, 64, 10, 1024)
    assert (
        cfg.optim.name,
        cfg.optim.lr,
        cfg.optim.backbone_lr_scale,
        cfg.optim.weight_decay,
        cfg.scheduler.warmup,
    ) == (
        "bertadam",
        1e-4,
        1e-3,
        0.2,
        0.1,
    )


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_builds_with_random_weights(model):
    cfg = _compose("train", [f"model={model}"])
    built = hydra.utils.instantiate(cfg.model)
    assert built.embed_dim > 0 and built.image_size in (64, 224)


def test_eval_config_composes():
    cfg = _compose("eval", ["ckpt=/some/run", "data.root=/data/msrvtt"])
    assert cfg.split == "test" and cfg.data.root == "/data/msrvtt"


@pytest.mark.parametrize("override", ["trainer.lrr=1", "data.batchsize=4", "optim.nope=2"])
def test_unknown_key_is_refused(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[-1]):
        _compose("train", [override])


def test_unknown_group_option_is_refused():
    with pytest.raises(ConfigCompositionException, match="experiment"):
        _compose("train", ["experiment=does_not_exist"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds_its_model_and_loss(experiment):
    """Random weights on CPU; NeighborRetr recipes also run their high level at their own words/frames."""
    cfg = _compose("train", [f"experiment={experiment}"])
    model = hydra.utils.instantiate(cfg.model)
    objective = hydra.utils.instantiate(cfg.loss)
    assert cfg.data.max_words <= model.context_length
    objective.check_batch(cfg.data.batch_size)  # raises when the global batch is too small for the loss
    if not hasattr(objective, "bank"):
        return
    assert model.high_level and objective.bank.capacity == cfg.loss.memory_size
    b, dim = 3, model.embed_dim
    text, video = torch.randn(b, cfg.data.max_words, dim), torch.randn(b, cfg.data.max_frames, dim)
    text_mask, video_mask = torch.ones(b, cfg.data.max_words), torch.ones(b, cfg.data.max_frames)
    with torch.no_grad():
        text_global, video_global = model.global_tokens(text, text_mask, video, video_mask)
        vectors = model.global_vectors(text_global, video_global)
        assert model.global_similarity(text_global, video_global).shape == (b, b)
    assert vectors[0].shape == vectors[1].shape == (b, dim)
