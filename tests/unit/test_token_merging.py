"""Token clustering and merging (spec §1.6): DPC-kNN, merge_tokens, CTM, TCBlock and TokenHierarchy."""

from __future__ import annotations

import pytest
import torch

from neighborretr.models.token_merging import (
    CTM,
    TCBlock,
    TokenHierarchy,
    cluster_dpc_knn,
    merge_tokens,
    num_clusters_for,
)

TEXT_RATIOS = (1 / 6, 1 / 4)
VIDEO_RATIOS = (1 / 4, 1 / 3)

# (ratios, N, tokens after round 1, tokens after round 2)
HIERARCHY_CASES = [
    (TEXT_RATIOS, 24, 4, 1),
    (VIDEO_RATIOS, 12, 3, 1),
    (TEXT_RATIOS, 32, 6, 2),
    (TEXT_RATIOS, 64, 11, 3),
    (VIDEO_RATIOS, 64, 16, 6),
]


def _padding_mask(batch: int, num_tokens: int, lengths: list[int]) -> torch.Tensor:
    """[B, N] mask with the first lengths[b] tokens real."""
    return (torch.arange(num_tokens)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("dim", [64, 96])
@pytest.mark.parametrize(("ratios", "num_tokens", "mid", "final"), HIERARCHY_CASES)
def test_hierarchy_shapes(dim: int, ratios, num_tokens: int, mid: int, final: int) -> None:
    torch.manual_seed(0)
    hierarchy = TokenHierarchy(dim, dim // 32, ratios)
    tokens = torch.randn(2, num_tokens, dim)
    mask = _padding_mask(2, num_tokens, [num_tokens, max(num_tokens // 2, 2)])
    merged, features, score = hierarchy.ctms[0](tokens, mask)
    assert merged.shape == (2, mid, dim) and features.shape == tokens.shape and score.shape == (2, num_tokens)
    assert torch.isinf(score[1, num_tokens // 2 :]).all() and torch.isfinite(score[0]).all()
    out = hierarchy(tokens, mask)
    assert out.shape == (2, final, dim) and torch.isfinite(out).all()
    assert hierarchy.num_output_tokens(num_tokens) == final
    logits_fn = torch.nn.Linear(dim, 1)
    for pool in ("weighted", "mean"):
        hierarchy.pool = pool
        pooled = hierarchy.reduce_to_one(out, logits_fn)
        assert pooled.shape == (2, dim) and torch.isfinite(pooled).all()


def test_num_clusters_for() -> None:
    assert [num_clusters_for(n, r) for n, r in [(24, 1 / 6), (4, 1 / 4), (3, 1 / 3), (1, 0.1)]] == [4, 1, 1, 1]


def test_reduce_to_one_modes() -> None:
    torch.manual_seed(0)
    hierarchy = TokenHierarchy(8, 1, TEXT_RATIOS)
    single = torch.randn(3, 1, 8)
    assert torch.equal(hierarchy.reduce_to_one(single), single[:, 0])
    tokens = torch.randn(3, 4, 8)
    logits = torch.randn(3, 4)
    pooled = hierarchy.reduce_to_one(tokens, lambda t: logits[:, :, None])
    torch.testing.assert_close(pooled, (logits.softmax(-1)[:, :, None] * tokens).sum(1))
    with pytest.raises(ValueError):
        hierarchy.reduce_to_one(tokens)
    hierarchy.pool = "mean"
    torch.testing.assert_close(hierarchy.reduce_to_one(tokens), tokens.mean(1))


def test_dpc_knn_two_groups() -> None:
    offsets = torch.tensor([0.0, 0.1, 0.3, 5.0, 5.15, 5.4, 0.05])
    x = torch.zeros(1, 7, 4)
    x[0, :, 0] = offsets
    x[0, :, 1] = torch.tensor([0.0, 0.02, 0.0, 0.0, 0.03, 0.0, 0.01])
    assignment, centres = cluster_dpc_knn(x, 2, k=3, noise=0.0)
    group_a, group_b = assignment[0, [0, 1, 2, 6]], assignment[0, [3, 4, 5]]
    assert (group_a == group_a[0]).all() and (group_b == group_b[0]).all() and group_a[0] != group_b[0]
    assert set(centres[0].tolist()) & {0, 1, 2, 6} and set(centres[0].tolist()) & {3, 4, 5}
    assert torch.equal(assignment.gather(1, centres), torch.arange(2)[None])


def test_dpc_knn_k_larger_than_tokens() -> None:
    x = torch.randn(2, 2, 8)
    assignment, centres = cluster_dpc_knn(x, 2, k=5, mask=torch.tensor([[1, 1], [1, 0]]), noise=0.0)
    assert assignment.shape == (2, 2) and centres.shape == (2, 2)
    assert torch.equal(assignment.gather(1, centres), torch.arange(2).expand(2, -1))
    with pytest.raises(ValueError):
        cluster_dpc_knn(x, 3)


def test_padding_never_centre_and_ignored_in_merge() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 12, 7, 3, 10, 6, 4]
    x = torch.randn(8, 12, 16, generator=gen)
    mask = _padding_mask(8, 12, lengths)
    weights = torch.rand(8, 12, generator=gen) * mask
    assignment, centres = cluster_dpc_knn(x, 3, mask=mask, noise=0.0)
    assert mask.gather(1, centres).all()
    changed = torch.where(mask[:, :, None] > 0, x, 100 * torch.randn(8, 12, 16, generator=gen))
    assignment2, centres2 = cluster_dpc_knn(changed, 3, mask=mask, noise=0.0)
    assert torch.equal(centres, centres2) and torch.equal(assignment[mask > 0], assignment2[mask > 0])
    torch.testing.assert_close(merge_tokens(x, assignment, 3, weights), merge_tokens(changed, assignment2, 3, weights))


def test_merge_tokens_matches_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    x, weights = torch.randn(3, 10, 5, generator=gen), torch.rand(3, 10, generator=gen)
    assignment = torch.randint(0, 4, (3, 10), generator=gen)
    expected = torch.zeros(3, 4, 5)
    for b in range(3):
        for c in range(4):
            members = assignment[b] == c
            norm = weights[b, members].sum() + 1e-6
            expected[b, c] = (weights[b, members, None] / norm * x[b, members]).sum(0)
    torch.testing.assert_close(merge_tokens(x, assignment, 4, weights), expected)


def test_tcblock_masks_padded_keys() -> None:
    torch.manual_seed(0)
    block = TCBlock(32, 4)
    queries, tokens, score = torch.randn(2, 3, 32), torch.randn(2, 10, 32), torch.randn(2, 10)
    mask = _padding_mask(2, 10, [6, 10])
    score = score.masked_fill(mask == 0, float("-inf"))
    changed = torch.where(mask[:, :, None] > 0, tokens, torch.randn(2, 10, 32) * 50)
    torch.testing.assert_close(block(queries, tokens, score), block(queries, changed, score))
    assert not torch.allclose(block(queries, tokens), block(queries, changed))


def test_gradients_reach_ctm_and_tcblock() -> None:
    torch.manual_seed(0)
    hierarchy = TokenHierarchy(32, 2, VIDEO_RATIOS)
    tokens = torch.randn(2, 12, 32)
    out = hierarchy(tokens, _padding_mask(2, 12, [12, 8]))
    (out * torch.randn_like(out)).sum().backward()
    for name, param in hierarchy.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_ctm_merged_gradients() -> None:
    torch.manual_seed(0)
    ctm = CTM(16, 1 / 4)
    merged, _, _ = ctm(torch.randn(2, 12, 16), _padding_mask(2, 12, [12, 7]))
    (merged * torch.randn_like(merged)).sum().backward()
    for name, param in ctm.named_parameters():
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_batch_elements_independent() -> None:
    torch.manual_seed(0)
    hierarchy = TokenHierarchy(32, 2, TEXT_RATIOS)
    tokens, mask = torch.randn(2, 32, 32), _padding_mask(2, 32, [20, 32])
    torch.manual_seed(1)
    first = hierarchy(tokens, mask)
    changed = tokens.clone()
    changed[1] = torch.randn(32, 32) * 10
    torch.manual_seed(1)
    second = hierarchy(changed, _padding_mask(2, 32, [20, 9]))
    torch.testing.assert_close(first[0], second[0])
    assert not torch.allclose(first[1], second[1])
