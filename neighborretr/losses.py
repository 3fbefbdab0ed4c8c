"""Losses: pure functions of tensors, and a thin criterion that applies them to a model's gathered features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def symmetric_infonce(similarity: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a square similarity matrix whose diagonal holds the positive pairs.

    Args:
        similarity: [B, B], rows are texts and columns are videos; entry (i, i) is the matching pair.
        logit_scale: 0-d log of the inverse temperature; the logits are exp(logit_scale) · similarity.

    Returns:
        0-d loss: ½ (CE over each row + CE over each column), each averaged over B. Other captions of the same
        video in the batch count as negatives, as in the official code.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square [B, B], got {tuple(similarity.shape)}")
    logits = logit_scale.exp() * similarity
    target = torch.arange(similarity.shape[0], device=similarity.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class InfoNCECriterion:
    """The baseline objective: symmetric InfoNCE on the model's token-wise similarity of the global batch."""

    def __call__(self, model: nn.Module, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """features: gathered {"text" [B, L, D], "text_mask" [B, L], "video" [B, T, D], "video_mask" [B, T]}.

        Returns {"loss", "infonce"}; every value is logged.
        """
        sim = model.similarity(features["text"], features["text_mask"], features["video"], features["video_mask"])
        loss = symmetric_infonce(sim, model.logit_scale)
        return {"loss": loss, "infonce": loss.detach()}
