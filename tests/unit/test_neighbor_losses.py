"""NeighborRetr losses against values written out by hand with Python floats."""

import math

import pytest
import torch

from neighborretr.losses import symmetric_infonce
from neighborretr.neighbor_losses import (
    bank_centrality,
    centrality_weighted_infonce,
    centrality_weights,
    kl_consistency_loss,
    minmax_normalize,
    neighbor_adjusting_loss,
    neighbor_mask,
    sinkhorn_plan,
    uniform_regularization_loss,
)

D64 = torch.float64


def lse(values):
    return math.log(sum(math.exp(v) for v in values))


def softmax(values):
    z = sum(math.exp(v) for v in values)
    return [math.exp(v) / z for v in values]


# ---------------------------------------------------------------------------------------------------- L_Wti


def test_centrality_weights_2x2_with_padding_both_modes():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D64)
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [-1.0, 0.0]]], dtype=D64)
    mask = torch.tensor([[1, 1], [1, 0]])  # tokens[1, 1] = (-1, 0) is padding
    r = 1 / math.sqrt(2)
    # cos(g0, .) = 1, r, 0, -1 and cos(g1, .) = 0, r, 1, 0 over the four token positions
    official = [math.exp(0.3 * (1 + r + 0 - 1) / 4), math.exp(0.3 * (0 + r + 1 + 0) / 4)]
    clean = [math.exp(0.3 * (1 + r + 0) / 3), math.exp(0.3 * (0 + r + 1) / 3)]
    got = centrality_weights(g, tokens, mask, scale=0.3, mask_padding=False)
    torch.testing.assert_close(got, torch.tensor(official, dtype=D64))
    torch.testing.assert_close(centrality_weights(g, tokens, None), got)  # the official mode ignores the mask
    got = centrality_weights(g, tokens, mask, scale=0.3, mask_padding=True)
    torch.testing.assert_close(got, torch.tensor(clean, dtype=D64))


def test_centrality_weights_validation():
    with pytest.raises(ValueError, match="token_mask"):
        centrality_weights(torch.randn(2, 4), torch.randn(2, 3, 4), None, mask_padding=True)
    with pytest.raises(ValueError, match="global_feats"):
        centrality_weights(torch.randn(2, 5), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="token_mask"):
        centrality_weights(torch.randn(2, 4), torch.randn(2, 3, 4), torch.ones(2, 2), mask_padding=True)


def test_centrality_gradient_flows_unless_detached():
    g = torch.randn(3, 4, requires_grad=True)
    tokens = torch.randn(3, 5, 4, requires_grad=True)
    sim = torch.randn(3, 3)
    w = centrality_weights(g, tokens)
    centrality_weighted_infonce(sim, torch.tensor(1.0), w, w).backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    w = centrality_weights(g, tokens, detach=True)
    assert not w.requires_grad and w.grad_fn is None


def test_weighted_infonce_with_unit_weights_is_symmetric_infonce():
    sim, scale = torch.randn(6, 6), torch.tensor(2.3)
    ones = torch.ones(6)
    torch.testing.assert_close(centrality_weighted_infonce(sim, scale, ones, ones), symmetric_infonce(sim, scale))


def test_weighted_infonce_hand_computed_3x3():
    s = [[0.5, 0.1, 0.2], [0.0, 0.4, 0.3], [0.2, 0.1, 0.6]]
    wt, wv = [0.8, 1.0, 1.3], [1.2, 0.9, 1.1]
    # logits = 10 · s; row i: CE = -10 s_ii + LSE_j 10 s_ij; column j: CE = -10 s_jj + LSE_i 10 s_ij
    row_ce = [-5 + lse([5, 1, 2]), -4 + lse([0, 4, 3]), -6 + lse([2, 1, 6])]
    col_ce = [-5 + lse([5, 0, 2]), -4 + lse([1, 4, 1]), -6 + lse([2, 3, 6])]
    expected = 0.5 * (sum(w * c for w, c in zip(wt, row_ce)) / 3 + sum(w * c for w, c in zip(wv, col_ce)) / 3)
    got = centrality_weighted_infonce(
        torch.tensor(s, dtype=D64), math.log(10.0), torch.tensor(wt, dtype=D64), torch.tensor(wv, dtype=D64)
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_weighted_infonce_validation():
    with pytest.raises(ValueError, match="square"):
        centrality_weighted_infonce(torch.zeros(2, 3), 0.0, torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="text_weights"):
        centrality_weighted_infonce(torch.zeros(3, 3), 0.0, torch.ones(2), torch.ones(3))


# ---------------------------------------------------------------------------------------------------- L_Nbi

X5 = [
    [0.9, 0.8, 0.1, 0.5, 0.3],  # neighbours (excluding col 0): 1, 3; others: 2, 4 -> min 0.1, max 0.3
    [0.2, 0.7, 0.6, 0.0, 0.4],  # neighbours 2, 4; others 0, 3 -> 0.0, 0.2
    [0.3, 0.1, 0.5, 0.9, 0.2],  # neighbours 3, 0; others 1, 4 -> 0.1, 0.2
    [0.6, 0.2, 0.0, 0.8, 0.7],  # neighbours 4, 0; others 1, 2 -> 0.0, 0.2
    [0.1, 0.5, 0.4, 0.3, 0.6],  # neighbours 1, 2; others 0, 3 -> 0.1, 0.3
]
NEIGHBOURS5 = [{1, 3}, {2, 4}, {0, 3}, {0, 4}, {1, 2}]
NON_NEIGHBOUR_RANGE5 = [(0.1, 0.3), (0.0, 0.2), (0.1, 0.2), (0.0, 0.2), (0.1, 0.3)]
NEIGHBOUR_RANGE5 = [(0.5, 0.8), (0.4, 0.6), (0.3, 0.9), (0.6, 0.7), (0.4, 0.5)]


def test_neighbor_mask_5x5_k2():
    mask = neighbor_mask(torch.tensor(X5), 2)
    assert mask.dtype == torch.bool
    assert [set(torch.nonzero(row).flatten().tolist()) for row in mask] == NEIGHBOURS5


@pytest.mark.parametrize(("over", "ranges"), [("non_neighbors", NON_NEIGHBOUR_RANGE5), ("neighbors", NEIGHBOUR_RANGE5)])
def test_minmax_normalize_5x5_both_modes(over, ranges):
    x = torch.tensor(X5, dtype=D64)
    got = minmax_normalize(x, neighbor_mask(x, 2), over=over)
    expected = [[(v - lo) / (hi - lo) for v in row] for row, (lo, hi) in zip(X5, ranges)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=D64))
    if over == "non_neighbors":  # row 0 written out: (x - 0.1) / 0.2
        torch.testing.assert_close(got[0], torch.tensor([4.0, 3.5, 0.0, 2.0, 1.0], dtype=D64))


def test_minmax_normalize_zero_range_and_validation():
    x = torch.ones(4, 4)
    got = minmax_normalize(x, neighbor_mask(x, 1))
    assert torch.equal(got, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="diagonal"):
        minmax_normalize(x, torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="over"):
        minmax_normalize(x, neighbor_mask(x, 1), over="all")


@pytest.mark.parametrize("k", [4, 5, 6])
def test_k_too_large_raises(k):
    with pytest.raises(ValueError, match="B - 2"):
        neighbor_mask(torch.randn(5, 5), k)
    with pytest.raises(ValueError, match="B - 2"):
        neighbor_adjusting_loss(torch.randn(5, 5), torch.randn(5), k=k)


def test_k_zero_raises():
    with pytest.raises(ValueError, match=">= 1"):
        neighbor_mask(torch.randn(5, 5), 0)


def test_neighbor_adjusting_loss_4x4_k1_hand_computed():
    x = [
        [0.5, 0.4, 0.1, 0.0],  # E_0 = {0, 1}
        [0.3, 0.6, 0.2, 0.8],  # E_1 = {1, 3}
        [0.0, 0.7, 0.2, 0.1],  # E_2 = {2, 1}
        [0.9, 0.3, 0.4, 0.5],  # E_3 = {3, 0}
    ]
    # With one neighbour, P over N_i is a softmax of a single entry: P = [P_ii, P_ij] = [1, 1], Σ_j P_ij = 2,
    # whatever μ and τ are. Row loss = -(log softmax(x_ii, x_ij)[0] + log softmax(x_ii, x_ij)[1]) / 2.
    pairs = [(0.5, 0.4), (0.6, 0.8), (0.2, 0.7), (0.5, 0.9)]
    rows = [-((a - lse([a, b])) + (b - lse([a, b]))) / 2 for a, b in pairs]
    expected = sum(rows) / 4
    for mu in ([0.1, 0.9, 0.3, 0.5], [5.0, -2.0, 0.0, 1.0]):
        for over in ("non_neighbors", "neighbors"):
            got = neighbor_adjusting_loss(
                torch.tensor(x, dtype=D64), torch.tensor(mu, dtype=D64), k=1, tau=3.0, minmax_over=over
            )
            assert got.item() == pytest.approx(expected, rel=1e-12)


def test_neighbor_adjusting_loss_5x5_k2_hand_computed():
    mu = [0.5, 0.2, 0.4, 0.1, 0.3]
    # Non-neighbour columns per row (official min-max): their μ gives the range of C̃.
    # row 0: N = {1, 3}, others {2, 4}: X̃ = (x - 0.1)/0.2, μ range over {0.4, 0.3} -> C̃ = (μ - 0.3)/0.1
    #   D_01 = 3.5 - (-1) = 4.5, D_03 = 2.0 - (-2) = 4.0
    # row 1: N = {2, 4}, others {0, 3}: X̃ = x/0.2, μ over {0.5, 0.1} -> C̃ = (μ - 0.1)/0.4
    #   D_12 = 3.0 - 0.75 = 2.25, D_14 = 2.0 - 0.5 = 1.5
    # row 2: N = {0, 3}, others {1, 4}: X̃ = (x - 0.1)/0.1, μ over {0.2, 0.3} -> C̃ = (μ - 0.2)/0.1
    #   D_20 = 2.0 - 3.0 = -1.0, D_23 = 8.0 - (-1.0) = 9.0
    # row 3: N = {0, 4}, others {1, 2}: X̃ = x/0.2, μ over {0.2, 0.4} -> C̃ = (μ - 0.2)/0.2
    #   D_30 = 3.0 - 1.5 = 1.5, D_34 = 3.5 - 0.5 = 3.0
    # row 4: N = {1, 2}, others {0, 3}: X̃ = (x - 0.1)/0.2, μ over {0.5, 0.1} -> C̃ = (μ - 0.1)/0.4
    #   D_41 = 2.0 - 0.25 = 1.75, D_42 = 1.5 - 0.75 = 0.75
    rows = [  # (x_ii, [x_ij for j in N_i], [D_ij for j in N_i]) in the same column order
        (0.9, [0.8, 0.5], [4.5, 4.0]),
        (0.7, [0.6, 0.4], [2.25, 1.5]),
        (0.5, [0.3, 0.9], [-1.0, 9.0]),
        (0.8, [0.6, 0.7], [1.5, 3.0]),
        (0.6, [0.5, 0.4], [1.75, 0.75]),
    ]
    total = 0.0
    for x_ii, x_n, d_n in rows:
        p = [1.0] + softmax([3.0 * d for d in d_n])
        logits = [x_ii] + x_n
        total += -sum(pj * (xj - lse(logits)) for pj, xj in zip(p, logits)) / sum(p)
    got = neighbor_adjusting_loss(torch.tensor(X5, dtype=D64), torch.tensor(mu, dtype=D64), k=2, tau=3.0)
    assert got.item() == pytest.approx(total / 5, rel=1e-12)

    # Clean min-max over N_i: with two neighbours X̃ and C̃ are 0 at the smaller and 1 at the larger value.
    # row 0: x (0.8, 0.5) -> (1, 0), μ (0.2, 0.1) -> (1, 0): D = (0, 0)
    # row 1: x (0.6, 0.4) -> (1, 0), μ (0.4, 0.3) -> (1, 0): D = (0, 0)
    # row 2: x (0.3, 0.9) -> (0, 1), μ (0.5, 0.1) -> (1, 0): D = (-1, 1)
    # row 3: x (0.6, 0.7) -> (0, 1), μ (0.5, 0.3) -> (1, 0): D = (-1, 1)
    # row 4: x (0.5, 0.4) -> (1, 0), μ (0.2, 0.4) -> (0, 1): D = (1, -1)
    clean_d = [[0.0, 0.0], [0.0, 0.0], [-1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]]
    total = 0.0
    for (x_ii, x_n, _), d_n in zip(rows, clean_d):
        p = [1.0] + softmax([3.0 * d for d in d_n])
        logits = [x_ii] + x_n
        total += -sum(pj * (xj - lse(logits)) for pj, xj in zip(p, logits)) / sum(p)
    x, mu_t = torch.tensor(X5, dtype=D64), torch.tensor(mu, dtype=D64)
    clean = neighbor_adjusting_loss(x, mu_t, k=2, tau=3.0, minmax_over="neighbors")
    assert clean.item() == pytest.approx(total / 5, rel=1e-12)


def test_neighbor_adjusting_loss_weights_carry_gradient_unless_detached():
    x = torch.randn(6, 6, dtype=D64)
    mu = torch.randn(6, dtype=D64, requires_grad=True)
    neighbor_adjusting_loss(x, mu, k=2).backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    mu = mu.detach().requires_grad_()
    loss = neighbor_adjusting_loss(x, mu, k=2, detach_weights=True)
    assert not loss.requires_grad  # μ only enters through P


# ---------------------------------------------------------------------------------------------------- L_Opt


def test_sinkhorn_marginals_random_6x6():
    z = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 2
    q = sinkhorn_plan(z, iters=50)
    torch.testing.assert_close(q.sum(dim=0), torch.ones(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(6), atol=1e-3, rtol=0)
    assert (q > 0).all()


def test_sinkhorn_has_no_gradient():
    z = torch.randn(4, 4, requires_grad=True)
    assert not sinkhorn_plan(z).requires_grad


@pytest.mark.parametrize("epsilon", [1.0, 0.5])
def test_uniform_regularization_2x2_hand_computed(epsilon):
    z = [[1.0, 0.2], [-0.3, 0.5]]
    # A 2x2 doubly stochastic scaling of K = exp(z/ε) is [[p, 1-p], [1-p, p]] and keeps K's cross ratio:
    # p² / (1-p)² = exp((z00 + z11 - z01 - z10)/ε)  =>  p = sigmoid((z00 + z11 - z01 - z10) / (2ε)).
    p = 1 / (1 + math.exp(-(1.0 + 0.5 - 0.2 + 0.3) / (2 * epsilon)))
    q = [[p, 1 - p], [1 - p, p]]
    torch.testing.assert_close(sinkhorn_plan(torch.tensor(z, dtype=D64), epsilon=epsilon), torch.tensor(q, dtype=D64))
    beta, lam = 0.7, 3.0
    y = [[beta * q[0][0] + 0.3, beta * q[0][1]], [beta * q[1][0], beta * q[1][1] + 0.3]]
    rows = [-sum(y[i][j] * (lam * z[i][j] - lse([lam * v for v in z[i]])) for j in range(2)) for i in range(2)]
    got = uniform_regularization_loss(torch.tensor(z, dtype=D64), logit_scale=lam, beta=beta, epsilon=epsilon)
    assert got.item() == pytest.approx(sum(rows) / 2, rel=1e-9)


def test_uniform_regularization_validation():
    with pytest.raises(ValueError, match="beta"):
        uniform_regularization_loss(torch.zeros(3, 3), beta=1.5)
    with pytest.raises(ValueError, match="square"):
        uniform_regularization_loss(torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------------- L_KL


def test_kl_hand_computed_2x2_and_reduction_ratio():
    low, high = [[0.3, -0.1], [0.2, 0.6]], [[2.0, 0.5], [-1.0, 1.0]]
    total = 0.0
    for lo_row, hi_row in zip(low, high):
        p, q = softmax(lo_row), softmax(hi_row)
        total += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q))
    low_t, high_t = torch.tensor(low, dtype=D64), torch.tensor(high, dtype=D64)
    official = kl_consistency_loss(low_t, high_t)
    assert official.item() == pytest.approx(total / 4, rel=1e-12)
    batchmean = kl_consistency_loss(low_t, high_t, reduction="batchmean")
    assert batchmean.item() == pytest.approx(total / 2, rel=1e-12)
    a, b = torch.randn(5, 5, dtype=D64), torch.randn(5, 5, dtype=D64)
    ratio = kl_consistency_loss(a, b, "batchmean") / kl_consistency_loss(a, b, "official")
    assert ratio.item() == pytest.approx(5.0, rel=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        kl_consistency_loss(a, b, "sum")


def test_kl_gradient_reaches_both_sides():
    low, high = torch.randn(3, 3, requires_grad=True), torch.randn(3, 3, requires_grad=True)
    kl_consistency_loss(low, high).backward()
    assert low.grad.abs().sum() > 0 and high.grad.abs().sum() > 0


def test_bank_centrality():
    scores = torch.tensor([[0.1, 0.3, 0.5], [1.0, -1.0, 0.0]])
    torch.testing.assert_close(bank_centrality(scores), torch.tensor([0.3, 0.0]))
    with pytest.raises(ValueError, match="bank_scores"):
        bank_centrality(torch.zeros(2, 0))


# ---------------------------------------------------------------------------------------------------- extremes


def _finite_loss_and_grads(loss, *inputs):
    assert torch.isfinite(loss).all(), loss
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    for grad in grads:
        assert grad is None or torch.isfinite(grad).all()


@pytest.mark.parametrize("value", [0.0, 0.7, 1e3])
def test_all_equal_similarities_are_finite(value):
    x = torch.full((6, 6), value, requires_grad=True)
    mu = torch.full((6,), value, requires_grad=True)
    ones = torch.ones(6)
    for over in ("non_neighbors", "neighbors"):
        _finite_loss_and_grads(neighbor_adjusting_loss(x, mu, k=2, minmax_over=over), x, mu)
    _finite_loss_and_grads(centrality_weighted_infonce(x, torch.tensor(4.6), ones, ones), x)
    _finite_loss_and_grads(uniform_regularization_loss(x), x)
    _finite_loss_and_grads(kl_consistency_loss(x, x), x)


def test_large_global_similarities_are_finite():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(6, 6, generator=g) * 1e3).requires_grad_()
    low = torch.randn(6, 6, generator=g).requires_grad_()
    _finite_loss_and_grads(uniform_regularization_loss(z), z)
    _finite_loss_and_grads(kl_consistency_loss(low, z), low, z)
    _finite_loss_and_grads(kl_consistency_loss(z, low), low, z)  # softmax(low side) underflows to exact zeros
    q = sinkhorn_plan(z)
    assert torch.isfinite(q).all()
    # float32 exponents of size 1e3 carry ~1e3 · 6e-8 absolute error, hence the looser tolerance
    torch.testing.assert_close(q.sum(dim=0), torch.ones(6), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_padding_only_masks_are_finite(mask_padding):
    g = torch.randn(3, 4, requires_grad=True)
    tokens = torch.randn(3, 5, 4)
    tokens[:, 1:] = 0.0  # padding positions hold zeros, so their cosine must not become NaN
    tokens.requires_grad_()
    mask = torch.zeros(3, 5)
    mask[0, 0] = 1  # one valid token in the whole batch
    w = centrality_weights(g, tokens, mask, mask_padding=mask_padding)
    sim = torch.randn(3, 3)
    _finite_loss_and_grads(centrality_weighted_infonce(sim, torch.tensor(1.0), w, w), g, tokens)
    if mask_padding:  # only the one valid token counts: c_i = cos(g_i, tokens[0, 0])
        expected = torch.exp(0.3 * torch.nn.functional.cosine_similarity(g, tokens[0, 0].expand(3, 4), dim=-1))
        torch.testing.assert_close(w, expected)
