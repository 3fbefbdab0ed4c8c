"""One optimiser step's forward and backward: encode, all-gather with gradients, score with the objective.

`TrainStep` is the module handed to Accelerate (DDP), so everything that touches a parameter (the encoders and
the similarity heads the objective calls) runs inside one wrapped forward per backward, which is what DDP's
reducer expects. `backward_step` runs one global batch, in micro-batches when memory demands it, without losing
a single negative.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from neighborretr.distributed import all_gather_with_grad, gather_features
from neighborretr.objectives import Features, Objective

FEATURE_KEYS = ("text", "text_mask", "video", "video_mask")


class TrainStep(nn.Module):
    """The retrieval model and its objective behind one forward.

    The objective is held but not registered as a submodule: its state (the memory bank) is checkpointed on its
    own, must not be broadcast as a DDP buffer every step, and is not part of the model's weights.

    Args:
        model: the retrieval model (encoders and similarity heads).
        objective: the training objective (see neighborretr.objectives).
        sum_gathered_grads: False reproduces the official all-gather backward (spec §4).
    """

    def __init__(self, model: nn.Module, objective: Objective, sum_gathered_grads: bool = True):
        super().__init__()
        self.model = model
        self.__dict__["objective"] = objective  # bypasses nn.Module registration on purpose (see above)
        self.sum_gathered_grads = sum_gathered_grads

    def encode(self, batch: dict[str, torch.Tensor]) -> Features:
        """The local batch's features, gathered over ranks: {"text" [B, L, D], ..., "caption_index" [B]}."""
        local = self.model(batch["text_ids"], batch["text_mask"], batch["video"], batch["video_mask"])
        gathered = gather_features(local, sum_grads=self.sum_gathered_grads)
        gathered["caption_index"] = all_gather_with_grad(batch["caption_index"])
        return gathered

    def score(self, features: Features) -> dict[str, torch.Tensor]:
        """The objective's terms on gathered features, in fp32 even under mixed precision (as the official loss)."""
        with torch.autocast(features["text"].device.type, enabled=False):
            return self.objective(self.model, {k: features[k] for k in FEATURE_KEYS})

    def forward(
        self,
        batch: dict[str, torch.Tensor] | None = None,
        *,
        features: Features | None = None,
        encode_only: bool = False,
        replay: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None,
    ):
        """One of four uses, each a forward of the wrapped module:

        - `forward(batch)` -> (losses, gathered features): the ordinary step;
        - `forward(batch, encode_only=True)` -> gathered features;
        - `forward(features=F)` -> losses on already gathered features;
        - `forward(batch, replay=(text_grad, video_grad, param_grads))` -> a surrogate scalar whose gradient is
          the cached feature gradients pushed through this batch's encoders plus the cached parameter gradients
          (gradient accumulation, see `backward_step`).
        """
        if features is not None:
            return self.score(features)
        if replay is not None:
            text_grad, video_grad, param_grads = replay
            local = self.model(batch["text_ids"], batch["text_mask"], batch["video"], batch["video_mask"])
            surrogate = (local["text"] * text_grad).sum() + (local["video"] * video_grad).sum()
            params = dict(self.model.named_parameters())
            return surrogate + sum((params[name] * grad).sum() for name, grad in param_grads.items())
        gathered = self.encode(batch)
        if encode_only:
            return gathered
        return self.score(gathered), gathered


def _split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    rows = len(batch["caption_index"])
    if rows % parts:
        raise ValueError(f"a per-process batch of {rows} cannot be split into {parts} equal micro-batches")
    return [{k: v.tensor_split(parts)[i] for k, v in batch.items()} for i in range(parts)]


def backward_step(
    accelerator: Accelerator, step: nn.Module, batch: dict[str, torch.Tensor], micro_batches: int = 1
) -> tuple[dict[str, torch.Tensor], Features]:
    """Computes the objective on the global batch and back-propagates it; returns (losses, gathered features).

    With `micro_batches` = m > 1 the encoders see m smaller batches while the loss still sees the whole global
    batch, and the gradients equal those of one step on it (the GradCache method, Gao et al. 2021):
    1. encode every micro-batch without gradient and gather: the global features F;
    2. compute the loss on F and its gradients with respect to F and to the parameters it uses (heads);
    3. re-encode each micro-batch with gradient and back-propagate the cached gradient of its rows of F; the last
       one also carries the head gradients, so every parameter gets its gradient in one synchronised backward.
    Memory: activations of one micro-batch at a time, plus F and its gradient. Cost: the encoders run twice.
    The encoders must be deterministic given their inputs (no dropout), as they are here.

    Args:
        step: the (prepared) TrainStep.
        batch: this process's share of the global batch.
    """
    if micro_batches == 1:
        losses, gathered = step(batch)
        accelerator.backward(losses["loss"])
        return losses, {k: v.detach() for k, v in gathered.items()}
    unwrapped = accelerator.unwrap_model(step)
    chunks = _split(batch, micro_batches)
    world, rank = accelerator.num_processes, accelerator.process_index
    with accelerator.no_sync(step):
        with torch.no_grad():
            parts = [step(chunk, encode_only=True) for chunk in chunks]
        full = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        leaves = {k: full[k].clone().requires_grad_(True) for k in ("text", "video")}
        losses = step(features=full | leaves)
        named = [(n, p) for n, p in unwrapped.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(
            losses["loss"], [leaves["text"], leaves["video"], *(p for _, p in named)], allow_unused=True
        )
    text_grad, video_grad = grads[0], grads[1]
    param_grads = {n: g for (n, _), g in zip(named, grads[2:]) if g is not None}
    # Every rank holds the same global loss; with summed gathers the full-batch gradient of a rank's rows is
    # W times its local share after DDP's averaging, hence the factor (spec §4; 1 for the official gather).
    scale = world if unwrapped.sum_gathered_grads else 1
    local = len(chunks[0]["caption_index"])
    for j, chunk in enumerate(chunks):
        rows = slice(j * local * world + rank * local, j * local * world + (rank + 1) * local)
        replay = (scale * text_grad[rows], scale * video_grad[rows], param_grads if j == micro_batches - 1 else {})
        if j < micro_batches - 1:
            with accelerator.no_sync(step):
                accelerator.backward(step(chunk, replay=replay))
        else:
            accelerator.backward(step(chunk, replay=replay))
    return {k: v.detach() for k, v in losses.items()}, {k: v.detach() for k, v in full.items()}
