"""The baseline contrastive loss as a pure function of tensors (the objectives that apply it live in objectives.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
