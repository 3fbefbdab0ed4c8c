"""Training objectives: nn.Modules that turn a model's gathered batch features into every loss term, and own the
state they need (NeighborRetr's memory bank), so the loop cannot run them without it.

The loop calls, for each objective:
    check_batch(B)            once, before training, with the global batch the loss sees;
    refill(batches)           at the start of every epoch (not after a mid-epoch resume, which restores the state)
                              with `refill_batches` encoded (features, ids) pairs;
    forward(model, features)  every step: {"loss", <term>: detached value, ...}, every entry logged;
    update(features, ids)     after every step's backward, with the same gathered batch.
`state_dict()` holds the whole state (the bank's buffers), so checkpoints carry it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from neighborretr import neighbor_losses as nl
from neighborretr.losses import symmetric_infonce
from neighborretr.memory_bank import MemoryBank

Features = dict[str, torch.Tensor]  # {"text" [B, L, D], "text_mask" [B, L], "video" [B, T, D], "video_mask" [B, T]}


class Objective(nn.Module):
    """Base class: a stateless objective whose hooks do nothing."""

    refill_batches: int = 0  # encoded training batches `refill` wants at the start of every epoch
    refill_keep: int | None = None  # of those, how many of the last items the state keeps (None: all)

    def check_batch(self, batch_size: int) -> None:
        """Raises ValueError when the loss cannot work on a global batch of `batch_size` pairs."""

    def refill(self, batches: Iterable[tuple[Features, torch.Tensor]]) -> None:
        """Rebuilds the objective's state from `refill_batches` (gathered features, caption ids) pairs."""

    def update(self, features: Features, ids: torch.Tensor) -> None:
        """Takes in the gathered batch of the step that has just been back-propagated."""


class InfoNCEObjective(Objective):
    """The baseline: symmetric InfoNCE on the model's token-wise similarity of the global batch."""

    def forward(self, model: nn.Module, features: Features) -> dict[str, torch.Tensor]:
        """features: gathered {"text" [B, L, D], "text_mask" [B, L], "video" [B, T, D], "video_mask" [B, T]}.

        Returns {"loss", "infonce"}.
        """
        sim = model.similarity(features["text"], features["text_mask"], features["video"], features["video_mask"])
        loss = symmetric_infonce(sim, model.logit_scale)
        return {"loss": loss, "infonce": loss.detach()}


class NeighborRetrObjective(Objective):
    """The NeighborRetr objective (spec §2): L_Wti + w_u·L_Opt + w_n·L_Nbi + w_k·L_KL, every term averaged over
    both directions and returned for logging, with the memory bank L_Nbi scores its candidates against.

    The bank (`self.bank`, capacity `memory_size` items) is emptied and refilled from `mb_batch` global batches
    at the start of every epoch (the official `--mb_batch`), then each step's gathered batch is pushed after the
    backward, so a batch is never its own neighbour (spec §3).

    Defaults reproduce the official code, quirks included; each switch below restores the clean behaviour of a
    quirk in spec §9 (see docs/PARITY.md): `centrality_mask_padding` and `detach_centrality` (item 6),
    `centrality_from_bank` (item 6: centrality against the memory bank's tokens instead of the batch's),
    `minmax_over="neighbors"` and `detach_positive_weights` (item 7), `kl_reduction="batchmean"` (item 5), and
    `uniform_logit_scale` (item 3: the official code passes its temperature, 3.0, in this slot).
    """

    def __init__(
        self,
        uniform_weight: float = 1.0,
        neighbor_weight: float = 1.0,
        kl_weight: float = 1.0,
        centrality_scale: float = 0.3,
        num_neighbors: int = 20,
        temperature: float = 3.0,
        beta: float = 0.7,
        sinkhorn_iters: int = 50,
        sinkhorn_epsilon: float = 1.0,
        uniform_logit_scale: float = 3.0,
        centrality_mask_padding: bool = False,
        detach_centrality: bool = False,
        centrality_from_bank: bool = False,
        minmax_over: str = "non_neighbors",
        detach_positive_weights: bool = False,
        kl_reduction: str = "official",
        memory_size: int = 512,
        mb_batch: int = 15,
    ):
        super().__init__()
        if mb_batch < 1:
            raise ValueError(f"mb_batch={mb_batch}: the memory bank needs at least one refill batch per epoch")
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors={num_neighbors} must be >= 1")
        if minmax_over not in ("non_neighbors", "neighbors"):
            raise ValueError(f"minmax_over={minmax_over!r}: choose non_neighbors (official) or neighbors")
        if kl_reduction not in ("official", "batchmean"):
            raise ValueError(f"kl_reduction={kl_reduction!r}: choose official or batchmean")
        if memory_size < 1:
            raise ValueError(f"memory_size={memory_size} must be >= 1")
        self.weights = {"uniform": uniform_weight, "neighbor": neighbor_weight, "kl": kl_weight}
        self.centrality = {
            "scale": centrality_scale,
            "mask_padding": centrality_mask_padding,
            "detach": detach_centrality,
        }
        self.neighbor = {
            "k": num_neighbors,
            "tau": temperature,
            "minmax_over": minmax_over,
            "detach_weights": detach_positive_weights,
        }
        self.uniform = {
            "logit_scale": uniform_logit_scale,
            "beta": beta,
            "iters": sinkhorn_iters,
            "epsilon": sinkhorn_epsilon,
        }
        self.kl_reduction = kl_reduction
        self.centrality_from_bank = centrality_from_bank
        self.refill_batches = mb_batch
        self.refill_keep = memory_size  # the bank keeps the newest memory_size items of the refill
        self.bank = MemoryBank(memory_size)  # item shapes come from the first batch (or a checkpoint)

    def check_batch(self, batch_size: int) -> None:
        k = self.neighbor["k"]
        if batch_size < k + 2:
            raise ValueError(
                f"the loss sees a global batch of {batch_size} pairs, but num_neighbors={k} needs at least {k + 2} "
                f"(k <= B - 2): raise the batch size or lower the number of neighbours"
            )

    def refill(self, batches: Iterable[tuple[Features, torch.Tensor]]) -> None:
        self.bank.reset()
        for features, ids in batches:
            self.update(features, ids)

    def update(self, features: Features, ids: torch.Tensor) -> None:
        self.bank.enqueue(
            features["text"].detach(), features["text_mask"], features["video"].detach(), features["video_mask"], ids
        )

    def forward(self, model: nn.Module, features: Features) -> dict[str, torch.Tensor]:
        """features: the gathered batch {"text" [B, L, D], "text_mask", "video" [B, T, D], "video_mask"}.

        Returns {"loss", "centrality", "uniform", "kl", "neighbor"} (the terms detached, for logging).
        """
        if len(self.bank) == 0:
            raise RuntimeError(
                "the memory bank is empty: the loop must call refill() at the start of every epoch "
                "(engine.fit does, given the refill loader)"
            )
        bank = self.bank.get()
        t, tm, v, vm = features["text"], features["text_mask"], features["video"], features["video_mask"]
        # The batch's tokens are prepared once for its own and its two bank similarities.
        sim, bank_text_to_video, text_to_bank_video = model.similarity_with_bank(t, tm, v, vm, bank)
        text_global, video_global = model.global_tokens(t, tm, v, vm)
        global_sim = model.global_similarity(text_global, video_global)
        text_vec, video_vec = model.global_vectors(text_global, video_global)
        reference = bank if self.centrality_from_bank else features
        wt = nl.centrality_weights(text_vec, reference["text"], reference["text_mask"], **self.centrality)
        wv = nl.centrality_weights(video_vec, reference["video"], reference["video_mask"], **self.centrality)
        terms = {
            "centrality": nl.centrality_weighted_infonce(sim, model.logit_scale, wt, wv),
            "uniform": (self._uniform(global_sim) + self._uniform(global_sim.t())) / 2,
            "kl": (
                nl.kl_consistency_loss(sim, global_sim, self.kl_reduction)
                + nl.kl_consistency_loss(sim.t(), global_sim.t(), self.kl_reduction)
            )
            / 2,
            "neighbor": self._neighbor(sim, bank_text_to_video, text_to_bank_video),
        }
        loss = terms["centrality"] + sum(self.weights[name] * terms[name] for name in self.weights)
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}

    def _uniform(self, global_sim: torch.Tensor) -> torch.Tensor:
        return nl.uniform_regularization_loss(global_sim, **self.uniform)

    def _neighbor(
        self, sim: torch.Tensor, bank_text_to_video: torch.Tensor, text_to_bank_video: torch.Tensor
    ) -> torch.Tensor:
        """L_Nbi with candidate centralities from the memory bank: μ of a video = its mean similarity to the bank's
        texts (t2v rows), μ of a text = its mean similarity to the bank's videos (v2t rows).

        Args:
            sim: [B, B] the batch's similarity; bank_text_to_video: [M, B]; text_to_bank_video: [B, M].
        """
        video_mu = nl.bank_centrality(bank_text_to_video.t())
        text_mu = nl.bank_centrality(text_to_bank_video)
        return (
            nl.neighbor_adjusting_loss(sim, video_mu, **self.neighbor)
            + nl.neighbor_adjusting_loss(sim.t(), text_mu, **self.neighbor)
        ) / 2
