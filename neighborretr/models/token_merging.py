"""High-level token clustering and merging (spec §1.6): DPC-kNN clustering, CTM, TCBlock and the hierarchy.

Every width is an argument (spec §9 item 14: the official code hard-codes 512/8), and any number of input tokens
works: when a hierarchy ends in K > 1 tokens, :meth:`TokenHierarchy.reduce_to_one` pools them (spec §9 item 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Added to each cluster's weight sum in `merge_tokens` (the official constant), so empty-weight clusters give 0.
_MERGE_EPS = 1e-6


def num_clusters_for(num_tokens: int, ratio: float) -> int:
    """Number of clusters a CTM round keeps: max(ceil(N·ratio), 1), as `cluster.py:CTM.forward`."""
    return max(math.ceil(num_tokens * ratio), 1)


def _masked_distances(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled pairwise distances with every pair that involves a padded token pushed beyond the largest real one.

    Args:
        x: [B, N, D] token features.
        mask: [B, N] (1 = real token) or None.

    Returns:
        [B, N, N] float32 distances cdist(x, x)/√D. Pairs involving padding get (max real distance of the sample)+1.
        The maximum is taken per sample over real pairs only (the official code uses the batch-wide max over all
        pairs), so a sample's clustering depends neither on the other samples nor on the values of its padding.
    """
    x = x.float()
    # The direct kernel is exact (zero self-distance); N is small here, so the matmul shortcut buys nothing.
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(x.shape[-1])
    if mask is None:
        return dist
    valid = mask > 0
    pair_valid = valid[:, :, None] & valid[:, None, :]
    top = dist.masked_fill(~pair_valid, 0.0).amax(dim=(1, 2), keepdim=True)
    return torch.where(pair_valid, dist, top + 1.0)


def _density(
    dist: torch.Tensor, k: int, mask: torch.Tensor | None, noise: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Local density ρ = exp(−mean of the k smallest d²) + U(0, 1)·noise, and 0 for padded tokens.

    Args:
        dist: [B, N, N] distances from :func:`_masked_distances`.
        k: neighbours (the token itself included, as officially); clamped to N.
        mask: [B, N] or None.
        noise: scale of the uniform tie-breaking noise (0 makes the clustering deterministic).
        generator: optional RNG for the noise.

    Returns:
        [B, N] float32 densities.
    """
    k = min(k, dist.shape[-1])
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    if noise > 0:
        density = density + noise * torch.rand(density.shape, generator=generator, device=density.device)
    if mask is not None:
        density = density * (mask > 0).to(density.dtype)
    return density


def _peak_distance(dist: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """δ_i = distance to the nearest token of strictly higher density, or the row's maximum distance if none.

    Args:
        dist: [B, N, N] distances; density: [B, N].

    Returns:
        [B, N] float32 δ.
    """
    denser = density[:, None, :] > density[:, :, None]  # [B, i, j]: ρ_j > ρ_i
    row_max = dist.amax(dim=-1, keepdim=True)
    return torch.where(denser, dist, row_max).amin(dim=-1)


@torch.no_grad()
def cluster_dpc_knn(
    x: torch.Tensor,
    num_clusters: int,
    k: int = 3,
    mask: torch.Tensor | None = None,
    noise: float = 1e-6,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (DPC-kNN, spec §1.6 step 3), without gradients.

    Centres are the ``num_clusters`` tokens with the largest ρ·δ; every token joins its nearest centre and every
    centre is forced into its own cluster. Padded tokens have ρ = 0 and are ranked below every real token, so they
    only become centres when ``num_clusters`` exceeds the number of real tokens (their clusters then get zero
    weight in :func:`merge_tokens`). If ``k`` exceeds N it is clamped to N; when k exceeds the number of *real*
    tokens, the mean also includes the constant (max+1) distances to padding, which lowers the densities of a
    sample's tokens alike instead of failing.

    Args:
        x: [B, N, D] token features.
        num_clusters: C, with 1 ≤ C ≤ N.
        k: neighbours for the density (the official 3).
        mask: [B, N], 1 for real tokens and 0 for padding, or None (no padding).
        noise: scale of the U(0, 1) tie-breaking noise added to ρ (official 1e-6; 0 for deterministic tests).
        generator: optional RNG for that noise.

    Returns:
        assignment: [B, N] int64 cluster index of every token, in [0, C).
        centres: [B, C] int64 token index of each cluster's centre (cluster c is centred on ``centres[:, c]``).
    """
    batch, num_tokens, _ = x.shape
    if not 1 <= num_clusters <= num_tokens:
        raise ValueError(f"num_clusters must be in [1, {num_tokens}], got {num_clusters}")
    dist = _masked_distances(x, mask)
    density = _density(dist, k, mask, noise, generator)
    score = density * _peak_distance(dist, density)
    if mask is not None:
        # ρ·δ ≥ 0 for real tokens; −1 keeps padding below them even when a real token has δ = 0 (duplicates).
        score = score.masked_fill(mask <= 0, -1.0)
    centres = score.topk(num_clusters, dim=-1).indices  # [B, C]
    to_centres = dist.gather(1, centres[:, :, None].expand(-1, -1, num_tokens))  # [B, C, N]
    assignment = to_centres.argmin(dim=1)  # [B, N]
    own = torch.arange(num_clusters, device=x.device).expand(batch, -1)
    assignment.scatter_(1, centres, own)
    return assignment, centres


def merge_tokens(x: torch.Tensor, assignment: torch.Tensor, num_clusters: int, weights: torch.Tensor) -> torch.Tensor:
    """Weighted average of each cluster's tokens (spec §1.6 step 4), batched with scatter-add.

    Args:
        x: [B, N, D] token features.
        assignment: [B, N] int64 cluster of each token, in [0, C).
        num_clusters: C.
        weights: [B, N] non-negative token weights (0 for padding).

    Returns:
        [B, C, D] merged tokens y_c = Σ_{i∈c} w_i / (Σ_{i'∈c} w_i' + 1e-6) · x_i, in x's dtype.
    """
    batch, _, dim = x.shape
    weights = weights.float()
    totals = weights.new_zeros(batch, num_clusters).scatter_add_(1, assignment, weights) + _MERGE_EPS
    share = weights / totals.gather(1, assignment)  # [B, N]
    source = (x.float() * share[:, :, None]).to(x.dtype)
    merged = x.new_zeros(batch, num_clusters, dim)
    return merged.scatter_add_(1, assignment[:, :, None].expand(-1, -1, dim), source)


class CTM(nn.Module):
    """Clustering-based token merging: token conv + LayerNorm, a confidence score, DPC-kNN and weighted merging.

    The conv, LayerNorm and score layers keep PyTorch's default initialisation, as in the official model (they are
    built after its `apply(_init_weights)`, spec §1.6).

    Token weights are w = exp(score − max_n score) per sample instead of the official exp(score): the shift
    cancels between numerator and denominator of the within-cluster normalisation (up to the 1e-6 epsilon, whose
    relative size it rescales by e^max), so merging is rank/ratio-equivalent while exp can no longer overflow.
    """

    def __init__(self, dim: int, sample_ratio: float, k: int = 3):
        """Args: dim: token width D; sample_ratio: C = max(ceil(N·ratio), 1); k: DPC-kNN neighbours."""
        super().__init__()
        if k < 1:
            raise ValueError(f"cluster_k={k}: DPC-kNN needs at least one neighbour")
        if not 0 < sample_ratio <= 1:
            raise ValueError(f"token-merging ratio {sample_ratio} must lie in (0, 1]")
        self.sample_ratio = sample_ratio
        self.k = k
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merges N tokens into C cluster tokens.

        Args:
            x: [B, N, D] tokens.
            mask: [B, N], 1 for real tokens and 0 for padding, or None.

        Returns:
            merged: [B, C, D] cluster tokens (weighted averages of ``features``).
            features: [B, N, D] conv+LayerNorm features (the keys/values of the following TCBlock).
            token_score: [B, N] confidence logits, −inf at padded positions (TCBlock's attention bias).
        """
        features = self.norm(x + self.conv(x.transpose(1, 2)).transpose(1, 2))
        token_score = self.score(features).squeeze(-1)
        if mask is not None:
            token_score = token_score.masked_fill(mask <= 0, float("-inf"))
        peak = token_score.detach().amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # all-padded rows stay finite
        weights = (token_score - peak).exp()  # exp(−inf) = 0 on padding
        clusters = num_clusters_for(x.shape[1], self.sample_ratio)
        assignment, _ = cluster_dpc_knn(features, clusters, self.k, mask)
        return merge_tokens(features, assignment, clusters, weights), features, token_score


class TCBlock(nn.Module):
    """Cross-attention from merged tokens to the previous level's tokens, biased by their confidence scores.

    No MLP, no dropout, no drop-path (as the official block). The Linear layers use trunc-normal(0.02) weights and
    zero biases; the LayerNorm keeps its default initialisation.
    """

    def __init__(self, dim: int, heads: int):
        """Args: dim: token width D (divisible by heads); heads: attention heads (the model passes D // 64)."""
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        for layer in (self.q, self.kv, self.proj):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """[B, M, D] -> [B, H, M, D/H]."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(
        self, queries: torch.Tensor, tokens: torch.Tensor, token_score: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Updates the merged tokens with attention over the previous level.

        Args:
            queries: [B, C, D] merged tokens (pre-norm; also the residual branch).
            tokens: [B, N, D] previous-level tokens (keys and values).
            token_score: [B, N] confidence logits added to every query's and head's logits, −inf masking padded
                keys; None adds nothing. Each sample needs at least one finite score.

        Returns:
            [B, C, D] queries + attention output.
        """
        q = self._split(self.q(self.norm1(queries)))
        # W_kv's first D outputs are the keys and the last D the values (the official reshape order).
        k, v = (self._split(t) for t in self.kv(self.norm1(tokens)).chunk(2, dim=-1))
        # softmax(q·kᵀ/√d + score) v through the fused kernel: the score is an additive bias on every query's
        # and head's logits, which is what scaled_dot_product_attention's float mask is.
        bias = None if token_score is None else token_score[:, None, None, :].to(q.dtype)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, C, D/H]
        return queries + self.proj(attended.transpose(1, 2).flatten(2))


class TokenHierarchy(nn.Module):
    """Rounds of CTM → TCBlock that turn a modality's tokens into a few global tokens (spec §1.6).

    The official ratios are (1/6, 1/4) for text and (1/4, 1/3) for video, which end in exactly one token only when
    L ≤ 24 words and T ≤ 12 frames; longer inputs crash the official centrality loss (spec §1.6 hard constraint,
    §9 item 1). Our fix keeps the official ratios (so 24/12 behaves as published) and lets the hierarchy end in K
    tokens; :meth:`reduce_to_one` then pools them into one vector: with ``pool="weighted"`` by a softmax over the
    K tokens of logits from a caller-provided function (the model passes its high-level token-weight MLP, the one
    the global similarity already uses), with ``pool="mean"`` by their plain mean. K = 1 is returned unchanged,
    so the published setting is unaffected.

    Only the first round sees the padding mask: merged tokens have no padding (as in the official code).
    """

    def __init__(self, dim: int, heads: int | None, ratios: Sequence[float], k: int = 3, pool: str = "weighted"):
        """Args:
        dim: token width D.
        heads: TCBlock heads; None means max(D // 64, 1).
        ratios: one sample ratio per round, e.g. (1/6, 1/4) for text, (1/4, 1/3) for video.
        k: DPC-kNN neighbours.
        pool: how :meth:`reduce_to_one` pools K > 1 tokens, "weighted" or "mean".
        """
        super().__init__()
        if pool not in ("weighted", "mean"):
            raise ValueError(f"pool must be 'weighted' or 'mean', got {pool!r}")
        heads = heads if heads is not None else max(dim // 64, 1)
        self.ratios = tuple(ratios)
        self.pool = pool
        self.ctms = nn.ModuleList(CTM(dim, ratio, k) for ratio in self.ratios)
        self.blocks = nn.ModuleList(TCBlock(dim, heads) for _ in self.ratios)

    def num_output_tokens(self, num_tokens: int) -> int:
        """K, the number of global tokens that N input tokens end in."""
        for ratio in self.ratios:
            num_tokens = num_clusters_for(num_tokens, ratio)
        return num_tokens

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Runs every round.

        Args:
            tokens: [B, N, D] text or frame tokens.
            mask: [B, N], 1 for real tokens and 0 for padding (used in round 1 only), or None.

        Returns:
            [B, K, D] global tokens, K = :meth:`num_output_tokens` (N).
        """
        x = tokens
        for ctm, block in zip(self.ctms, self.blocks):
            merged, features, token_score = ctm(x, mask)
            x = block(merged, features, token_score)
            mask = None
        return x

    def reduce_to_one(
        self, global_tokens: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Pools the K global tokens into one vector per sample (our fix for the K > 1 crash).

        Args:
            global_tokens: [B, K, D] output of :meth:`forward`.
            logits_fn: maps [B, K, D] to per-token logits [B, K] or [B, K, 1]; required for ``pool="weighted"``
                when K > 1, ignored otherwise.

        Returns:
            [B, D]: the single token when K = 1, else the softmax(logits)-weighted sum or the mean of the K tokens.
        """
        if global_tokens.shape[1] == 1:
            return global_tokens[:, 0]
        if self.pool == "mean":
            return global_tokens.mean(dim=1)
        if logits_fn is None:
            raise ValueError("pool='weighted' needs logits_fn when the hierarchy ends in more than one token")
        logits = logits_fn(global_tokens)
        if logits.dim() == 3:
            logits = logits.squeeze(-1)
        weights = F.softmax(logits.float(), dim=-1).to(global_tokens.dtype)
        return torch.einsum("bk,bkd->bd", weights, global_tokens)
