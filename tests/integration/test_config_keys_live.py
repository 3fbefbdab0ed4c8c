"""Every key of the objective's and the model's configs does something: changed alone, it changes the loss (or its
gradients) on a fixed batch, or the model's structure. A key that changes nothing fails here."""

import inspect

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from neighborretr_train import config_dir

pytestmark = pytest.mark.integration

# Small enough for the CPU, large enough that both token hierarchies end in K > 1 global tokens (32 words, 16
# frames), so that the keys that only act there (global_pool) act.
BASE = [
    "experiment=synthetic_tiny",
    "model.image_size=32",
    "model.width=32",
    "model.embed_dim=32",
    "model.heads=2",
    "model.layers=1",
    "model.temporal_layers=1",
    "loss.num_neighbors=4",
]
WORDS, FRAMES, BATCH, POOL = 32, 16, 8, 4  # POOL: items per refill batch
# A value that must make a difference, where the generic rule (flip a bool, scale a number) does not fit.
ALTERNATIVES = {
    "memory_size": 6,  # below what the refill brings (mb_batch x POOL), so the oldest items drop off
    "num_neighbors": 3,
    "sinkhorn_iters": 1,  # 49 and 50 iterations give the same float32 plan: it has converged
    "context_length": 40,
    "minmax_over": "neighbors",
    "kl_reduction": "batchmean",
    "global_pool": "mean",
    "text_ratios": [0.5, 0.25],
    "video_ratios": [0.5, 0.5],
    "temporal_ln_eps": 1e-12,  # the official code's value (parity switch)
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides)


def _other(key: str, value):
    if key in ALTERNATIVES:
        return ALTERNATIVES[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if key != "cluster_k" else value - 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    raise AssertionError(f"no alternative value for {key}={value!r}: add one to ALTERNATIVES")


def _batch(seed: int, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(size, WORDS, dtype=torch.long)
    text_mask[::2, WORDS // 2 :] = 0
    video_mask = torch.ones(size, FRAMES, dtype=torch.long)
    video_mask[1::3, FRAMES - 5 :] = 0
    return {
        "text_ids": torch.randint(1, 1000, (size, WORDS), generator=g) * text_mask,
        "text_mask": text_mask,
        "video": torch.randn(size, FRAMES, 3, 32, 32, generator=g),
        "video_mask": video_mask,
    }


def _structure(model) -> list:
    return [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]


def _fingerprint(cfg, structure: list | None = None) -> tuple[list, torch.Tensor | None]:
    """(model structure, loss terms and every gradient) of a model and objective built from `cfg` on fixed data;
    (structure, None) when the structure differs from `structure`. The memory bank is refilled from `mb_batch`
    fixed batches encoded by the same model, as the loop does."""
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    objective = instantiate(cfg.loss)
    if structure is not None and _structure(model) != structure:
        return _structure(model), None
    with torch.no_grad():
        refill = []
        for i in range(objective.refill_batches):
            b = _batch(100 + i, POOL)
            refill.append(
                (model(b["text_ids"], b["text_mask"], b["video"], b["video_mask"]), torch.arange(POOL) + POOL * i)
            )
        objective.refill(refill)
    b = _batch(1, BATCH)
    losses = objective(model, model(b["text_ids"], b["text_mask"], b["video"], b["video_mask"]))
    losses["loss"].backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return _structure(model), torch.cat([torch.stack([v.detach() for v in losses.values()]), *grads])


BASE_CFG = _compose(BASE)
KEYS = [("model", k) for k in BASE_CFG.model if k != "_target_"] + [
    ("loss", k) for k in BASE_CFG.loss if k != "_target_"
]


@pytest.fixture(scope="module")
def baseline():
    return _fingerprint(BASE_CFG)


@pytest.mark.parametrize(("group", "key"), KEYS, ids=[f"{g}.{k}" for g, k in KEYS])
def test_every_model_and_objective_key_changes_something(baseline, group, key):
    value = OmegaConf.to_container(BASE_CFG[group])[key]
    changed = _compose([*BASE, f"{group}.{key}={_other(key, value)}".replace("'", "")])
    structure, values = _fingerprint(changed, baseline[0])
    if structure != baseline[0]:
        return
    assert not torch.equal(values, baseline[1]), (
        f"{group}.{key}: {value} -> {_other(key, value)} changes neither the loss, its gradients nor the model"
    )


@pytest.mark.parametrize("group", ["model", "loss"])
def test_every_constructor_argument_is_a_config_key(group):
    """The configs list every argument of their builder, so each can be set from the command line."""
    for path in sorted((config_dir() / group).glob("*.yaml")):
        node = OmegaConf.load(path)
        node = node.get(group, node) if "_target_" not in node else node  # loss files are @package _global_
        signature = inspect.signature(get_method(node._target_))
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = {n for n, p in signature.parameters.items() if p.kind in named}
        assert set(node) - {"_target_"} == params, path.name
