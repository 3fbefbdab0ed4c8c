"""Two gloo processes on the CPU must give the loss and gradients of one process on the full batch."""

import pytest
import torch

from neighborretr.losses import InfoNCECriterion, NeighborRetrCriterion
from neighborretr.models.builders import tiny
from tests.conftest import run_two_processes


def make_model(high_level: bool = False):
    torch.manual_seed(0)
    return tiny(image_size=32, width=64, embed_dim=64, heads=2, temporal_layers=1, high_level=high_level)


def criterion_and_bank(name: str):
    """The criterion under test and, for NeighborRetr, fixed bank contents (the same on every rank)."""
    if name == "infonce":
        return InfoNCECriterion(), None
    g = torch.Generator().manual_seed(2)
    bank = {
        "text": torch.randn(6, 8, 64, generator=g),
        "text_mask": torch.ones(6, 8, dtype=torch.long),
        "video": torch.randn(6, 3, 64, generator=g),
        "video_mask": torch.ones(6, 3, dtype=torch.long),
    }
    # num_neighbors=4 fits the global batch of 8 (k <= B - 2); the rest are the official defaults
    return NeighborRetrCriterion(num_neighbors=4), bank


def global_batch(size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(size, 8, dtype=torch.long)
    mask[::3, 5:] = 0
    vmask = torch.ones(size, 3, dtype=torch.long)
    vmask[1::2, 2:] = 0
    return {
        "text_ids": torch.randint(1, 1000, (size, 8), generator=g),
        "text_mask": mask,
        "video": torch.randn(size, 3, 3, 32, 32, generator=g),
        "video_mask": vmask,
    }


def _two_process_grads(tmp_path, loss_name: str, gather: str) -> dict:
    out = tmp_path / "ddp.pt"
    run_two_processes("ddp_check.py", str(out), loss_name, gather)
    ddp = torch.load(out)
    assert ddp["world"] == 2
    return ddp


def _one_process_grads(loss_name: str) -> tuple[torch.Tensor, dict]:
    model = make_model(high_level=loss_name == "neighborretr")
    criterion, bank = criterion_and_bank(loss_name)
    batch = global_batch()
    features = model(batch["text_ids"], batch["text_mask"], batch["video"], batch["video_mask"])
    loss = criterion(model, features, bank)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.integration
@pytest.mark.parametrize("loss_name", ["infonce", "neighborretr"])
def test_two_processes_match_one_process_on_the_full_batch(tmp_path, loss_name):
    ddp = _two_process_grads(tmp_path, loss_name, "sum")

    loss, grads = _one_process_grads(loss_name)
    torch.testing.assert_close(ddp["loss"], loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ddp["grads"].keys()
    for name, grad in grads.items():  # encoder (before the gather) and head (after it) alike
        torch.testing.assert_close(ddp["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.integration
def test_official_gather_shrinks_encoder_gradients_by_the_world_size(tmp_path):
    """trainer.official_gather=true reproduces spec §4: after DDP averaging, parameters before the gather get
    1/W of the full-batch gradient while the heads after it get the full gradient."""
    ddp = _two_process_grads(tmp_path, "infonce", "official")
    _, grads = _one_process_grads("infonce")
    after_gather = ("sim_head.", "clip.logit_scale")
    for name, grad in grads.items():
        scale = 1.0 if name.startswith(after_gather) else 0.5
        torch.testing.assert_close(ddp["grads"][name], scale * grad, atol=1e-5, rtol=1e-4, msg=name)
