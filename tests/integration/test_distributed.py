"""Two gloo processes on the CPU, and gradient accumulation, must give the loss and gradients of one process on the
full batch; all of them run the recipe's TrainStep, as training does."""

import pytest
import torch
from accelerate import Accelerator

from neighborretr.models.builders import tiny
from neighborretr.objectives import InfoNCEObjective, NeighborRetrObjective
from neighborretr.train_step import TrainStep, backward_step
from tests.conftest import run_two_processes


def make_model(high_level: bool = False):
    torch.manual_seed(0)
    return tiny(image_size=32, width=64, embed_dim=64, heads=2, temporal_layers=1, high_level=high_level)


def make_objective(name: str):
    """The objective under test; NeighborRetr's bank holds fixed contents (the same on every rank)."""
    if name == "infonce":
        return InfoNCEObjective()
    g = torch.Generator().manual_seed(2)
    bank = {
        "text": torch.randn(6, 8, 64, generator=g),
        "text_mask": torch.ones(6, 8, dtype=torch.long),
        "video": torch.randn(6, 3, 64, generator=g),
        "video_mask": torch.ones(6, 3, dtype=torch.long),
    }
    # num_neighbors=4 fits the global batch of 8 (k <= B - 2); the rest are the official defaults
    objective = NeighborRetrObjective(num_neighbors=4, memory_size=6, mb_batch=1)
    objective.refill([(bank, torch.arange(6))])
    return objective


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
        "caption_index": torch.arange(size),
    }


def _two_process_grads(tmp_path, loss_name: str, gather: str, micro: int = 1) -> dict:
    out = tmp_path / "ddp.pt"
    run_two_processes("ddp_check.py", str(out), loss_name, gather, str(micro))
    ddp = torch.load(out)
    assert ddp["world"] == 2
    return ddp


def _one_process_grads(loss_name: str, micro: int = 1) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of one process on the full batch (`micro` micro-batches through the recipe's step)."""
    accelerator = Accelerator(cpu=True)
    step = TrainStep(make_model(high_level=loss_name == "neighborretr"), make_objective(loss_name))
    losses, _ = backward_step(accelerator, step, global_batch(), micro)
    return losses["loss"], {n: p.grad for n, p in step.model.named_parameters() if p.grad is not None}


def _plain_grads(loss_name: str) -> tuple[torch.Tensor, dict]:
    """The reference: the model's forward and the objective called directly, one backward, no TrainStep."""
    model, objective, batch = (
        make_model(high_level=loss_name == "neighborretr"),
        make_objective(loss_name),
        global_batch(),
    )
    loss = objective(model, model(batch["text_ids"], batch["text_mask"], batch["video"], batch["video_mask"]))["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():  # encoder (before the gather) and head (after it) alike
        # An entry is a float32 sum whose terms are as large as the tensor's largest entries, so its rounding
        # error scales with those (one token-embedding entry differs by 5e-7 x max|g| between the paths).
        atol = 1e-5 + 1e-6 * grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("loss_name", ["infonce", "neighborretr"])
@pytest.mark.parametrize("micro", [2, 4])
def test_grad_accumulation_equals_one_step_on_the_full_batch(loss_name, micro):
    """trainer.grad_accum=k: the encoders see k micro-batches, the loss the whole batch; loss and every
    gradient equal one step on the full batch."""
    _assert_same(*_one_process_grads(loss_name, micro), *_plain_grads(loss_name))
    _assert_same(*_one_process_grads(loss_name, 1), *_plain_grads(loss_name))


@pytest.mark.integration
@pytest.mark.parametrize("loss_name", ["infonce", "neighborretr"])
def test_two_processes_match_one_process_on_the_full_batch(tmp_path, loss_name):
    ddp = _two_process_grads(tmp_path, loss_name, "sum")
    _assert_same(ddp["loss"], ddp["grads"], *_plain_grads(loss_name))


@pytest.mark.integration
def test_two_processes_with_grad_accumulation_match_one_process(tmp_path):
    """2 processes x 2 micro-batches of 2 pairs: the NeighborRetr loss still sees all 8 pairs."""
    ddp = _two_process_grads(tmp_path, "neighborretr", "sum", micro=2)
    _assert_same(ddp["loss"], ddp["grads"], *_plain_grads("neighborretr"))


@pytest.mark.integration
def test_official_gather_shrinks_encoder_gradients_by_the_world_size(tmp_path):
    """trainer.official_gather=true reproduces spec §4: after DDP averaging, parameters before the gather get
    1/W of the full-batch gradient while the heads after it get the full gradient."""
    ddp = _two_process_grads(tmp_path, "infonce", "official")
    _, grads = _plain_grads("infonce")
    after_gather = ("sim_head.", "clip.logit_scale")
    for name, grad in grads.items():
        scale = 1.0 if name.startswith(after_gather) else 0.5
        torch.testing.assert_close(ddp["grads"][name], scale * grad, atol=1e-5, rtol=1e-4, msg=name)
