"""NeighborRetr's hub-aware losses (spec §2) as pure functions of tensors.

Every loss here handles ONE retrieval direction on a square [B, B] matrix whose rows are queries and whose columns
are candidates, with the matching pair on the diagonal; the caller applies it to S and Sᵀ and averages, as the
official code does. Defaults reproduce the official code ("parity"); the documented keyword arguments switch to
the cleaner variants listed in spec §9.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "bank_centrality",
    "centrality_weighted_infonce",
    "centrality_weights",
    "kl_consistency_loss",
    "minmax_normalize",
    "neighbor_adjusting_loss",
    "neighbor_mask",
    "sinkhorn_plan",
    "uniform_regularization_loss",
]


def _check_square(name: str, x: torch.Tensor) -> int:
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be a square [B, B] matrix, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    return x.shape[0]


def _check_vector(name: str, v: torch.Tensor, size: int) -> None:
    if v.shape != (size,):
        raise ValueError(f"{name} must have shape [{size}] (one value per batch item), got {tuple(v.shape)}")


# --------------------------------------------------------------------------------------------------------------
# L_Wti: centrality-weighted InfoNCE (spec §2.1)
# --------------------------------------------------------------------------------------------------------------


def centrality_weights(
    global_feats: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    scale: float = 0.3,
    mask_padding: bool = False,
    detach: bool = False,
) -> torch.Tensor:
    """Per-sample centrality weights w = exp(scale · c) of one modality, from the in-batch tokens.

    c[i] is the mean cosine between sample i's global feature and every token of every sample in the batch:
    c[i] = mean_{b, n} cos(g_i, tokens[b, n]). More central samples (hubs) get a larger weight.

    Args:
        global_feats: [B, D], one global (merged) feature per sample, g_i. Need not be normalised.
        tokens: [B, N, D], the token features of the whole (gathered) batch in the same modality.
        token_mask: [B, N], nonzero for valid tokens. Only read when `mask_padding` is True.
        scale: κ; the weight is exp(κ · c), so with κ = 0.3 the weights lie in [e^-0.3, e^0.3].
        mask_padding: False (official): average over every token position, padding included. True (clean):
            average over the valid tokens only.
        detach: return weights without gradient. The official code does not detach, so gradients flow into
            the tokens and the global features (pushing centralities down).

    Returns:
        [B] weights w_i > 0.
    """
    if global_feats.ndim != 2 or tokens.ndim != 3 or tokens.shape[-1] != global_feats.shape[-1]:
        raise ValueError(
            f"expected global_feats [B, D] and tokens [B, N, D], got {tuple(global_feats.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if mask_padding:
        if token_mask is None:
            raise ValueError("mask_padding=True needs token_mask")
        if token_mask.shape != tokens.shape[:2]:
            raise ValueError(f"token_mask must have shape {tuple(tokens.shape[:2])}, got {tuple(token_mask.shape)}")
        weight = (token_mask != 0).to(tokens.dtype)
    else:
        weight = torch.ones(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
    # The mean of cosines equals the cosine-dot with the mean unit token: O(B·N·D) instead of O(B²·N·D).
    unit_tokens = F.normalize(tokens, dim=-1)
    mean_token = (unit_tokens * weight.unsqueeze(-1)).sum(dim=(0, 1)) / weight.sum().clamp_min(1.0)
    centrality = F.normalize(global_feats, dim=-1) @ mean_token
    weights = torch.exp(scale * centrality)
    return weights.detach() if detach else weights


def centrality_weighted_infonce(
    similarity: torch.Tensor,
    logit_scale: torch.Tensor | float,
    text_weights: torch.Tensor,
    video_weights: torch.Tensor,
) -> torch.Tensor:
    """L_Wti: symmetric InfoNCE whose per-query cross-entropies are multiplied by the centrality weights.

    L = ½ [ mean_i w_t[i] · CE_row(i) + mean_j w_v[j] · CE_col(j) ], logits = exp(logit_scale) · similarity,
    positives on the diagonal only. Divided by B, not by Σw (as the official code). With all weights 1 this is
    `neighborretr.losses.symmetric_infonce`.

    Args:
        similarity: [B, B], rows are texts and columns are videos.
        logit_scale: 0-d log of the inverse temperature (CLIP's learnable scale; exp(·) ≤ 100 in practice).
        text_weights: [B], weight of text query i (row i).
        video_weights: [B], weight of video query j (column j).

    Returns:
        0-d loss.
    """
    size = _check_square("similarity", similarity)
    _check_vector("text_weights", text_weights, size)
    _check_vector("video_weights", video_weights, size)
    logit_scale = torch.as_tensor(logit_scale, dtype=similarity.dtype, device=similarity.device)
    if logit_scale.ndim != 0:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    logits = logit_scale.exp() * similarity
    target = torch.arange(size, device=similarity.device)
    row_ce = F.cross_entropy(logits, target, reduction="none")
    col_ce = F.cross_entropy(logits.t(), target, reduction="none")
    return ((text_weights * row_ce).mean() + (video_weights * col_ce).mean()) / 2


# --------------------------------------------------------------------------------------------------------------
# L_Nbi: neighbour adjusting loss (spec §2.2)
# --------------------------------------------------------------------------------------------------------------


def _neighbor_indices(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """[B, B] -> [B, k] long: the k most similar columns of each row, never the row's own (diagonal) column."""
    size = _check_square("similarity", similarity)
    if k < 1:
        raise ValueError(f"num_neighbors k must be >= 1, got {k}")
    if k > size - 2:
        raise ValueError(
            f"num_neighbors k={k} is too large for a batch of B={size}: min-max normalisation needs at least one "
            f"non-neighbour besides the query itself, so k must be <= B - 2 = {size - 2}"
        )
    eye = torch.eye(size, dtype=torch.bool, device=similarity.device)
    # -inf (the official code uses -9e15) keeps the query out of its own neighbour set.
    return similarity.detach().masked_fill(eye, float("-inf")).topk(k, dim=1).indices


def neighbor_mask(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """N_i: the top-k columns of each row, excluding the diagonal (Eq. 7).

    Args:
        similarity: [B, B] query-candidate scores.
        k: neighbours per row, 1 <= k <= B - 2.

    Returns:
        [B, B] bool, True at (i, j) when candidate j is one of query i's k nearest neighbours; the diagonal is False.
        Ties are broken by `torch.topk`.

    Raises:
        ValueError: if k is outside [1, B - 2].
    """
    index = _neighbor_indices(similarity, k)
    return torch.zeros(similarity.shape, dtype=torch.bool, device=similarity.device).scatter_(1, index, True)


def minmax_normalize(
    x: torch.Tensor, neighbors: torch.Tensor, over: str = "non_neighbors", eps: float = 1e-8
) -> torch.Tensor:
    """Row-wise min-max normalisation with statistics from a subset of columns, applied to every entry.

    Args:
        x: [B, B] values (a similarity matrix, or the candidate centralities broadcast to rows).
        neighbors: [B, B] bool, N_i from `neighbor_mask` (diagonal False).
        over: which columns give the row's min and max. "non_neighbors" (official): j ∉ E_i = N_i ∪ {i}, so
            entries in N_i map to >= 1. "neighbors" (clean alternative): j ∈ N_i, so N_i maps to [0, 1].
        eps: lower bound of the range max - min, so a constant reference set gives 0 instead of NaN.

    Returns:
        [B, B] (x - min_i) / max(max_i - min_i, eps).
    """
    size = _check_square("x", x)
    if neighbors.shape != x.shape or neighbors.dtype != torch.bool:
        raise ValueError(f"neighbors must be a bool tensor of shape {tuple(x.shape)}")
    eye = torch.eye(size, dtype=torch.bool, device=x.device)
    if (neighbors & eye).any():
        raise ValueError("neighbors must not contain the diagonal (a query is not its own neighbour)")
    if over == "non_neighbors":
        reference = ~(neighbors | eye)
    elif over == "neighbors":
        reference = neighbors
    else:
        raise ValueError(f"over must be 'non_neighbors' or 'neighbors', got {over!r}")
    if not reference.any(dim=1).all():
        raise ValueError(f"every row needs at least one column in its {over!r} reference set")
    low = x.masked_fill(~reference, float("inf")).amin(dim=1, keepdim=True)
    high = x.masked_fill(~reference, float("-inf")).amax(dim=1, keepdim=True)
    return (x - low) / (high - low).clamp_min(eps)


def neighbor_adjusting_loss(
    similarity: torch.Tensor,
    candidate_centrality: torch.Tensor,
    k: int = 20,
    tau: float = 3.0,
    minmax_over: str = "non_neighbors",
    detach_weights: bool = False,
) -> torch.Tensor:
    """L_Nbi for one direction (Eqs. 5-8; spec §2.2 steps 1-5).

    1. N_i = top-k columns of row i (not i); E_i = N_i ∪ {i}.
    2. X̃, C̃ = min-max normalised X and C (C[i, j] = μ_j), statistics over `minmax_over` columns.
    3. D_ij = X̃_ij - C̃_ij on N_i: similarity minus the candidate's hubness.
    4. P_ij = softmax_{j ∈ N_i}(τ · D_ij), P_ii = 1, 0 elsewhere (each row sums to 2).
    5. L = mean_i [ -Σ_{j ∈ E_i} P_ij · log softmax_{j' ∈ E_i}(X_ij') ] / Σ_j P_ij.

    Args:
        similarity: [B, B] X, used without a logit scale (cosine-like values, so the softmax over E_i is flat).
        candidate_centrality: [B] μ_j, candidate j's mean similarity to the memory bank of the other modality.
        k: neighbours per query, 1 <= k <= B - 2.
        tau: multiplies D inside the softmax, i.e. an inverse temperature (larger = sharper P).
        minmax_over: "non_neighbors" (official) or "neighbors"; see `minmax_normalize`.
        detach_weights: stop gradients through P. The official code does not.

    Returns:
        0-d loss.
    """
    size = _check_square("similarity", similarity)
    _check_vector("candidate_centrality", candidate_centrality, size)
    index = _neighbor_indices(similarity, k)  # [B, k]
    mask = torch.zeros(similarity.shape, dtype=torch.bool, device=similarity.device).scatter_(1, index, True)
    x_tilde = minmax_normalize(similarity, mask, minmax_over)
    c_tilde = minmax_normalize(candidate_centrality.unsqueeze(0).expand(size, size), mask, minmax_over)
    # Gathering the k + 1 columns of E_i avoids -inf masking and the NaN gradients of 0 · log 0.
    decentred = (x_tilde - c_tilde).gather(1, index)  # [B, k]
    weights = torch.cat([torch.ones_like(decentred[:, :1]), torch.softmax(tau * decentred, dim=1)], dim=1)
    if detach_weights:
        weights = weights.detach()
    self_index = torch.arange(size, device=similarity.device).unsqueeze(1)
    log_prob = torch.log_softmax(similarity.gather(1, torch.cat([self_index, index], dim=1)), dim=1)  # [B, k + 1]
    return (-(weights * log_prob).sum(dim=1) / weights.sum(dim=1)).mean()


# --------------------------------------------------------------------------------------------------------------
# L_Opt: uniform regularisation with a Sinkhorn target (spec §2.3)
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_plan(scores: torch.Tensor, iters: int = 50, epsilon: float = 1.0) -> torch.Tensor:
    """Doubly stochastic scaling of exp(scores / ε) by log-domain Sinkhorn, without gradient.

    Marginals log μ_i = log ν_j = -log(2B) (the official m + n); u = v = 0 at the start, then `iters` times
    u_i <- log μ_i - LSE_j(Z_ij/ε + v_j) and v_j <- log ν_j - LSE_i(Z_ij/ε + u_i).

    Args:
        scores: [B, B] raw scores Z (the unnormalised global similarity; the official code uses no temperature).
        iters: Sinkhorn iterations (official 50).
        epsilon: entropic regularisation; Z is divided by it (official 1, i.e. none).

    Returns:
        [B, B] Q = exp(Z/ε + u + v + log 2B): each column sums to exactly 1 (the last update is over columns) and
        each row to about 1. Same dtype as `scores`; computed in at least float32.
    """
    size = _check_square("scores", scores)
    if iters < 1 or epsilon <= 0:
        raise ValueError(f"need iters >= 1 and epsilon > 0, got iters={iters}, epsilon={epsilon}")
    z = scores.detach().to(torch.promote_types(scores.dtype, torch.float32)) / epsilon
    log_marginal = -math.log(2 * size)
    u = torch.zeros(size, 1, dtype=z.dtype, device=z.device)
    v = torch.zeros(1, size, dtype=z.dtype, device=z.device)
    for _ in range(iters):
        u = log_marginal - torch.logsumexp(z + v, dim=1, keepdim=True)
        v = log_marginal - torch.logsumexp(z + u, dim=0, keepdim=True)
    return torch.exp(z + u + v - log_marginal).to(scores.dtype)


def uniform_regularization_loss(
    global_similarity: torch.Tensor,
    logit_scale: float = 3.0,
    beta: float = 0.7,
    iters: int = 50,
    epsilon: float = 1.0,
) -> torch.Tensor:
    """L_Opt for one direction: soft cross-entropy towards a mix of the Sinkhorn plan and the identity (Eqs. 10-12).

    Y = β · Q + (1 - β) · I with Q = `sinkhorn_plan(Z)` (constant); L = mean_i -Σ_j Y_ij log softmax_j(λ · Z_ij).

    Args:
        global_similarity: [B, B] Z, the high-level (merged-token) similarity, rows are queries.
        logit_scale: λ, a plain multiplier of Z (an inverse temperature, not a log). The official code passes its
            `temperature` argument (3.0, the τ of L_Nbi) into this slot by argument order, and `--ot_temperature`
            is never read (spec §9 item 3); the default 3.0 keeps that behaviour.
        beta: weight of the Sinkhorn plan in the target.
        iters: Sinkhorn iterations.
        epsilon: Sinkhorn entropic regularisation.

    Returns:
        0-d loss.
    """
    size = _check_square("global_similarity", global_similarity)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    plan = sinkhorn_plan(global_similarity, iters=iters, epsilon=epsilon)
    eye = torch.eye(size, dtype=plan.dtype, device=plan.device)
    target = beta * plan + (1.0 - beta) * eye
    log_prob = torch.log_softmax(logit_scale * global_similarity, dim=1)
    return -(target * log_prob).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------------------------
# L_KL: consistency between the two levels (spec §2.4) and the bank centrality
# --------------------------------------------------------------------------------------------------------------


def kl_consistency_loss(low: torch.Tensor, high: torch.Tensor, reduction: str = "official") -> torch.Tensor:
    """KL(softmax(low) ‖ softmax(high)), row-wise, for one direction; neither side is detached.

    Same value as `F.kl_div(log_softmax(high), softmax(low))`; the target is passed in log space
    (`log_target=True`) so that an underflowing softmax(low) cannot make the gradient NaN.

    Args:
        low: [B, B] low-level (token-wise) similarity S, unscaled, so its softmax is nearly uniform.
        high: [B, B] high-level (global) similarity S^g, same orientation.
        reduction: "official" divides the summed KL by B² (PyTorch's 'mean', so the effective weight is 1/B);
            "batchmean" divides by B, the true mean KL per row.

    Returns:
        0-d loss.
    """
    _check_square("low", low)
    if high.shape != low.shape:
        raise ValueError(f"low and high must have the same shape, got {tuple(low.shape)} and {tuple(high.shape)}")
    if reduction not in ("official", "batchmean"):
        raise ValueError(f"reduction must be 'official' or 'batchmean', got {reduction!r}")
    total = F.kl_div(F.log_softmax(high, dim=1), F.log_softmax(low, dim=1), reduction="sum", log_target=True)
    # Divide explicitly: PyTorch warns that its 'mean' (÷ numel) will become 'batchmean' in a future release.
    return total / (low.numel() if reduction == "official" else low.shape[0])


def bank_centrality(bank_scores: torch.Tensor) -> torch.Tensor:
    """μ: each item's mean similarity to the memory bank.

    Args:
        bank_scores: [B, M], similarity of the B batch items to the M bank items of the other modality.

    Returns:
        [B] mean over the bank.
    """
    if bank_scores.ndim != 2 or bank_scores.shape[1] == 0:
        raise ValueError(f"bank_scores must be [B, M] with M >= 1, got shape {tuple(bank_scores.shape)}")
    return bank_scores.mean(dim=1)
