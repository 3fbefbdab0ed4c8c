"""Token-weighted token-wise similarity (the low level of spec §1.5), full and chunked."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Logit for masked tokens before the softmax over tokens (the official code's -9e15, kept finite in fp16).
_NEG = -1e4


class TokenWeights(nn.Module):
    """Linear(D, 2D) -> ReLU -> Linear(2D, 1): one logit per token, softmaxed over a sample's valid tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, 1))
        for layer in (self.net[0], self.net[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D], mask [B, N] -> weights [B, N] summing to 1 over the valid tokens."""
        logits = self.net(tokens).squeeze(-1).float()
        return logits.masked_fill(mask == 0, _NEG).softmax(dim=-1)


def weighted_token_similarity(
    text: torch.Tensor,
    text_mask: torch.Tensor,
    text_weights: torch.Tensor,
    video: torch.Tensor,
    video_mask: torch.Tensor,
    video_weights: torch.Tensor,
) -> torch.Tensor:
    """Symmetric weighted max-token similarity of every text with every video.

    Args:
        text: [Bt, L, D] L2-normalised text tokens; text_mask [Bt, L]; text_weights [Bt, L] (rows sum to 1).
        video: [Bv, N, D] L2-normalised frame tokens; video_mask [Bv, N]; video_weights [Bv, N].

    Returns:
        [Bt, Bv]: ½(Σ_l a_t·max_n A + Σ_n a_v·max_l A), with A[i,j,l,n] = <t_il, v_jn> and masked pairs set
        to 0 (not -inf, as in the official code).
    """
    pair = torch.einsum("ald,bnd->abln", text, video)  # [Bt, Bv, L, N]
    valid = torch.einsum("al,bn->abln", text_mask.to(pair.dtype), video_mask.to(pair.dtype))
    pair = pair * valid
    t2v = torch.einsum("abl,al->ab", pair.max(dim=-1).values, text_weights.to(pair.dtype))
    v2t = torch.einsum("abn,bn->ab", pair.max(dim=-2).values, video_weights.to(pair.dtype))
    return (t2v + v2t) / 2


class TokenSimilarity(nn.Module):
    """Holds the two token-weight MLPs and scores texts against videos."""

    def __init__(self, dim: int):
        super().__init__()
        self.text_weights = TokenWeights(dim)
        self.video_weights = TokenWeights(dim)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor, video_mask: torch.Tensor
    ) -> torch.Tensor:
        """text [Bt, L, D], text_mask [Bt, L], video [Bv, N, D], video_mask [Bv, N] -> [Bt, Bv]."""
        wt = self.text_weights(text, text_mask)
        wv = self.video_weights(video, video_mask)
        return weighted_token_similarity(
            F.normalize(text, dim=-1), text_mask, wt, F.normalize(video, dim=-1), video_mask, wv
        )

    @torch.no_grad()
    def chunked(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        chunk_size: int = 256,
    ) -> torch.Tensor:
        """Same as forward, but in [chunk, chunk] blocks so memory is O(chunk² · L · N), for evaluation."""
        wt = self.text_weights(text, text_mask)
        wv = self.video_weights(video, video_mask)
        text, video = F.normalize(text, dim=-1), F.normalize(video, dim=-1)
        rows = []
        for ts in range(0, text.shape[0], chunk_size):
            t = slice(ts, ts + chunk_size)
            row = [
                weighted_token_similarity(text[t], text_mask[t], wt[t], video[v], video_mask[v], wv[v]).float()
                for v in (slice(vs, vs + chunk_size) for vs in range(0, video.shape[0], chunk_size))
            ]
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0)
