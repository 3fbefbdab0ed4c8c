import math

import pytest
import torch

from neighborretr.losses import symmetric_infonce


def test_infonce_hand_computed_2x2():
    sim = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
    scale = torch.tensor(math.log(10.0))
    # rows: logits [5, 1] and [2, 4]; columns: [5, 2] and [1, 4]
    rows = -(5 - math.log(math.exp(5) + math.exp(1))) - (4 - math.log(math.exp(2) + math.exp(4)))
    cols = -(5 - math.log(math.exp(5) + math.exp(2))) - (4 - math.log(math.exp(1) + math.exp(4)))
    expected = (rows / 2 + cols / 2) / 2
    assert symmetric_infonce(sim, scale).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_uniform_is_log_b_and_symmetric():
    sim = torch.zeros(4, 4)
    assert symmetric_infonce(sim, torch.tensor(0.0)).item() == pytest.approx(math.log(4))
    x = torch.randn(5, 5)
    torch.testing.assert_close(symmetric_infonce(x, torch.tensor(1.0)), symmetric_infonce(x.t(), torch.tensor(1.0)))


def test_infonce_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        symmetric_infonce(torch.zeros(2, 3), torch.tensor(0.0))


def _neighborretr_inputs(b=6):
    from neighborretr.models.builders import tiny

    torch.manual_seed(0)
    model = tiny(image_size=32, width=32, embed_dim=32, heads=2, high_level=True)
    g = torch.Generator().manual_seed(1)
    features = {
        "text": torch.randn(b, 8, 32, generator=g),
        "text_mask": torch.ones(b, 8, dtype=torch.long),
        "video": torch.randn(b, 4, 32, generator=g),
        "video_mask": torch.ones(b, 4, dtype=torch.long),
    }
    bank = {k: v[:3].clone() + 0.1 for k, v in features.items()}
    bank["text_mask"], bank["video_mask"] = features["text_mask"][:3], features["video_mask"][:3]
    return model, features, bank


def _objective(bank: dict, **kwargs):
    """A NeighborRetrObjective whose memory bank holds exactly `bank` (refilled as the loop would)."""
    from neighborretr.objectives import NeighborRetrObjective

    objective = NeighborRetrObjective(num_neighbors=2, memory_size=len(bank["text"]), mb_batch=1, **kwargs)
    objective.refill([(bank, torch.arange(len(bank["text"])))])
    return objective


def test_the_objective_owns_its_bank_and_reads_it_newest_first():
    _, _, bank = _neighborretr_inputs()
    objective = _objective(bank)
    held = objective.bank.get()
    for key in ("text", "text_mask", "video", "video_mask"):
        torch.testing.assert_close(held[key], bank[key].to(held[key].dtype))
    assert set(objective.state_dict()) >= {"bank.text", "bank.video", "bank.ptr", "bank.size"}
    newer = {k: v[:1] + 1 for k, v in bank.items()}
    objective.update(newer, torch.tensor([7]))  # capacity 3: the oldest item drops off
    assert objective.bank.get()["ids"].tolist() == [7, 0, 1]


def test_neighborretr_objective_is_the_weighted_sum_of_its_logged_terms():
    model, features, bank = _neighborretr_inputs()
    out = _objective(bank, uniform_weight=0.5, neighbor_weight=2.0, kl_weight=3.0)(model, features)
    expected = out["centrality"] + 0.5 * out["uniform"] + 2.0 * out["neighbor"] + 3.0 * out["kl"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(torch.isfinite(v) for v in out.values()) and out["neighbor"] > 0
    out["loss"].backward()
    heads = ("sim_head.", "global_head.", "text_hierarchy.", "video_hierarchy.", "clip.logit_scale")
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith(heads)}
    assert len(grads) > 10  # every head parameter after the gather takes part (DDP needs all of them used)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), grads.keys()


def test_an_empty_bank_is_refused_and_kappa_zero_is_infonce():
    from neighborretr.objectives import NeighborRetrObjective

    model, features, bank = _neighborretr_inputs()
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        NeighborRetrObjective(num_neighbors=2)(model, features)
    out = _objective(bank, centrality_scale=0.0)(model, features)
    sim = model.similarity(features["text"], features["text_mask"], features["video"], features["video_mask"])
    assert out["centrality"].item() == pytest.approx(symmetric_infonce(sim, model.logit_scale).item(), rel=1e-5)


def test_the_batch_check_uses_the_batch_the_loss_sees():
    from neighborretr.objectives import NeighborRetrObjective

    objective = NeighborRetrObjective(num_neighbors=20)
    objective.check_batch(22)
    with pytest.raises(ValueError, match="num_neighbors=20 needs at least 22"):
        objective.check_batch(21)


def test_centrality_from_bank_uses_the_bank_tokens():
    from neighborretr import neighbor_losses as nl

    model, features, bank = _neighborretr_inputs()
    official = _objective(bank)(model, features)["centrality"]
    from_bank = _objective(bank, centrality_from_bank=True)(model, features)["centrality"]
    assert not torch.isclose(official, from_bank)
    t, tm, v, vm = (features[k] for k in ("text", "text_mask", "video", "video_mask"))
    text_vec, video_vec = model.global_vectors(*model.global_tokens(t, tm, v, vm))
    wt = nl.centrality_weights(text_vec, bank["text"], bank["text_mask"])
    wv = nl.centrality_weights(video_vec, bank["video"], bank["video_mask"])
    expected = nl.centrality_weighted_infonce(model.similarity(t, tm, v, vm), model.logit_scale, wt, wv)
    assert from_bank.item() == pytest.approx(expected.item(), rel=1e-6)
