"""Token-weighted token-wise similarity (the low level of spec §1.5), full and chunked."""

from __future__ import annotations

from typing import NamedTuple

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


class ScoredTokens(NamedTuple):
    """One side of the token-wise similarity, ready to score: tokens [B, N, D] already multiplied by their mask
    (padding is a zero vector) and the token weights [B, N]."""

    tokens: torch.Tensor
    weights: torch.Tensor


def masked_tokens(tokens: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> ScoredTokens:
    """tokens [B, N, D], mask [B, N], weights [B, N] -> ScoredTokens with padded tokens zeroed.

    A zeroed token has a dot product of exactly 0 with anything, which is the value the masked pairs get, so the
    [Bt, Bv, L, N] mask tensor of the direct formula is never built (nor its product, nor their backward).
    """
    return ScoredTokens(tokens * mask.unsqueeze(-1).to(tokens.dtype), weights)


def score_tokens(text: ScoredTokens, video: ScoredTokens) -> torch.Tensor:
    """The symmetric weighted max-token similarity of prepared sides (see `weighted_token_similarity`).

    Args:
        text: ScoredTokens with tokens [Bt, L, D] and weights [Bt, L].
        video: ScoredTokens with tokens [Bv, N, D] and weights [Bv, N].

    Returns:
        [Bt, Bv] scores.
    """
    (bt, length, dim), (bv, frames, _) = text.tokens.shape, video.tokens.shape
    # One GEMM in [Bt, L, Bv, N] order: both maxima then reduce a view, with no permuted copy.
    pair = (text.tokens.reshape(bt * length, dim) @ video.tokens.reshape(bv * frames, dim).t()).view(
        bt, length, bv, frames
    )
    t2v = torch.einsum("alb,al->ab", _max(pair, 3), text.weights.to(pair.dtype))
    v2t = torch.einsum("abn,bn->ab", _max(pair, 1), video.weights.to(pair.dtype))
    return (t2v + v2t) / 2


def _max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Maximum over `dim`. Without autograd, `amax` (values only; 1.5-3x faster on CPU than `max`, which also
    finds indices); with it, `max`, whose gradient goes to one entry of a tie as the formula's always has
    (`amax` would split it)."""
    return x.max(dim=dim).values if x.requires_grad else x.amax(dim=dim)


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
    return score_tokens(masked_tokens(text, text_mask, text_weights), masked_tokens(video, video_mask, video_weights))


class TokenSimilarity(nn.Module):
    """Holds the two token-weight MLPs and scores texts against videos."""

    def __init__(self, dim: int):
        super().__init__()
        self.text_weights = TokenWeights(dim)
        self.video_weights = TokenWeights(dim)

    def prepare_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> ScoredTokens:
        """text [Bt, L, D], text_mask [Bt, L] -> the unit, masked tokens and their weights, to score many times."""
        return masked_tokens(F.normalize(text, dim=-1), text_mask, self.text_weights(text, text_mask))

    def prepare_video(self, video: torch.Tensor, video_mask: torch.Tensor) -> ScoredTokens:
        """video [Bv, N, D], video_mask [Bv, N] -> the unit, masked tokens and their weights."""
        return masked_tokens(F.normalize(video, dim=-1), video_mask, self.video_weights(video, video_mask))

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor, video_mask: torch.Tensor
    ) -> torch.Tensor:
        """text [Bt, L, D], text_mask [Bt, L], video [Bv, N, D], video_mask [Bv, N] -> [Bt, Bv]."""
        return score_tokens(self.prepare_text(text, text_mask), self.prepare_video(video, video_mask))

    @torch.no_grad()
    def chunked(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        chunk_size: int = 256,
    ) -> torch.Tensor:
        """Same as forward, but in [chunk, chunk] blocks so memory is O(chunk² · L · N), for evaluation.

        Each side is normalised, masked and weighted once; every block is then one GEMM and two max reductions.
        Returns [Bt, Bv] in float32.
        """
        texts, videos = self.prepare_text(text, text_mask), self.prepare_video(video, video_mask)
        out = torch.empty(text.shape[0], video.shape[0], dtype=torch.float32, device=text.device)
        for ts in range(0, text.shape[0], chunk_size):
            t = ScoredTokens(*(x[ts : ts + chunk_size] for x in texts))
            for vs in range(0, video.shape[0], chunk_size):
                v = ScoredTokens(*(x[vs : vs + chunk_size] for x in videos))
                out[ts : ts + chunk_size, vs : vs + chunk_size] = score_tokens(t, v)
        return out
