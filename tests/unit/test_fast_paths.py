"""Speed-ups that must not change the maths: each fast path against the plain computation it replaced, for values
and gradients (issue 12 item 5)."""

import copy

import pytest
import torch

from neighborretr.models.builders import tiny
from neighborretr.models.similarity import TokenSimilarity, weighted_token_similarity
from neighborretr.objectives import NeighborRetrObjective


def reference_similarity(text, text_mask, text_weights, video, video_mask, video_weights):
    """The direct formula: the full [Bt, Bv, L, N] pair tensor times the pair mask, then both maxima."""
    pair = torch.einsum("ald,bnd->abln", text, video)
    valid = torch.einsum("al,bn->abln", text_mask.to(pair.dtype), video_mask.to(pair.dtype))
    pair = pair * valid
    t2v = torch.einsum("abl,al->ab", pair.max(dim=-1).values, text_weights)
    v2t = torch.einsum("abn,bn->ab", pair.max(dim=-2).values, video_weights)
    return (t2v + v2t) / 2


def random_sides(bt=5, bv=7, length=6, frames=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(bt, length, dim, generator=g), dim=-1)
    video = torch.nn.functional.normalize(torch.randn(bv, frames, dim, generator=g), dim=-1)
    text_mask = (torch.rand(bt, length, generator=g) > 0.4).long()
    video_mask = (torch.rand(bv, frames, generator=g) > 0.4).long()
    text_mask[:, 0] = video_mask[:, 0] = 1
    text_mask[0] = 0  # an all-padding caption: every pair is a masked 0
    wt = torch.rand(bt, length, generator=g).softmax(-1)
    wv = torch.rand(bv, frames, generator=g).softmax(-1)
    return text, text_mask, wt, video, video_mask, wv


def test_masked_gemm_similarity_equals_the_pair_mask_formula_with_gradients():
    inputs = random_sides()
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    fast_leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    ref = reference_similarity(*leaves)
    fast = weighted_token_similarity(*fast_leaves)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    (ref * upstream).sum().backward()
    (fast * upstream).sum().backward()
    for a, b in zip(leaves, fast_leaves):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6)
    assert leaves[0].grad[0].abs().sum() == 0  # padding gets no gradient in either path
    assert fast_leaves[0].grad[0].abs().sum() == 0


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_head_equals_the_reference_on_every_block(chunk):
    torch.manual_seed(0)
    head = TokenSimilarity(16)
    text, text_mask, _, video, video_mask, _ = random_sides(bt=9, bv=11)
    with torch.no_grad():
        # The weights see the raw tokens, the scores their unit vectors.
        wt, wv = head.text_weights(text * 3.0, text_mask), head.video_weights(video * 0.5, video_mask)
        expected = reference_similarity(text, text_mask, wt, video, video_mask, wv)
    got = head.chunked(text * 3.0, text_mask, video * 0.5, video_mask, chunk_size=chunk)
    assert got.dtype == torch.float32 and got.shape == (9, 11)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _tiny_with_bank(seed=0):
    torch.manual_seed(seed)
    model = tiny(image_size=32, width=32, embed_dim=32, heads=2, high_level=True)
    g = torch.Generator().manual_seed(1)
    b, m = 6, 9
    features = {
        "text": torch.randn(b, 8, 32, generator=g),
        "text_mask": (torch.rand(b, 8, generator=g) > 0.3).long(),
        "video": torch.randn(b, 4, 32, generator=g),
        "video_mask": torch.ones(b, 4, dtype=torch.long),
    }
    features["text_mask"][:, :2] = 1
    features["video_mask"][1, 3] = 0
    bank = {
        "text": torch.randn(m, 8, 32, generator=g),
        "text_mask": torch.ones(m, 8, dtype=torch.long),
        "video": torch.randn(m, 4, 32, generator=g),
        "video_mask": torch.ones(m, 4, dtype=torch.long),
    }
    bank["text_mask"][:, 5:] = 0
    return model, features, bank


def test_similarity_with_bank_equals_three_similarity_calls():
    model, f, bank = _tiny_with_bank()
    args = (f["text"], f["text_mask"], f["video"], f["video_mask"])
    fast = model.similarity_with_bank(*args, bank)
    plain = (
        model.similarity(*args),
        model.similarity(bank["text"], bank["text_mask"], f["video"], f["video_mask"]),
        model.similarity(f["text"], f["text_mask"], bank["video"], bank["video_mask"]),
    )
    assert [tuple(x.shape) for x in fast] == [(6, 6), (9, 6), (6, 9)]
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _loss_and_grads(model, objective, features):
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in features.items()}
    out = objective(model, leaves)
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads |= {f"features.{k}": v.grad for k, v in leaves.items() if v.grad is not None}
    return out, grads


def test_neighborretr_objective_with_shared_sides_equals_the_plain_path():
    model, features, bank = _tiny_with_bank()
    objective = NeighborRetrObjective(num_neighbors=2, memory_size=9, mb_batch=1)
    objective.refill([(bank, torch.arange(9))])
    fast_out, fast_grads = _loss_and_grads(model, objective, features)

    plain = copy.deepcopy(model)
    # The unoptimised path: three independent similarity calls, each preparing both sides itself.
    plain.similarity_with_bank = lambda t, tm, v, vm, bk: (
        plain.similarity(t, tm, v, vm),
        plain.similarity(bk["text"], bk["text_mask"], v, vm),
        plain.similarity(t, tm, bk["video"], bk["video_mask"]),
    )
    plain_out, plain_grads = _loss_and_grads(plain, objective, features)
    for key in fast_out:
        torch.testing.assert_close(fast_out[key], plain_out[key], rtol=1e-6, atol=1e-7)
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 20
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def _optimizer_run(make, steps=4, seed=0):
    """Parameters after `steps` updates with fixed gradients, some large enough to be clipped."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(7, 5), (5,), (3, 4, 2), ()]]
    groups = [
        {"params": params[:2], "lr": 0.1, "weight_decay": 0.2, "max_grad_norm": 1.0},
        {"params": params[2:], "lr": 0.01, "weight_decay": 0.0, "max_grad_norm": 0.0},
    ]
    optimizer = make(groups)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g) * (10.0 if i % 2 == step % 2 else 0.1)
        params[1].grad = None if step == 1 else params[1].grad  # a parameter without a gradient is skipped
        optimizer.step()
    return params, optimizer


def test_foreach_bertadam_equals_the_per_tensor_loop():
    from neighborretr.optim import BertAdam

    looped, loop_opt = _optimizer_run(lambda groups: BertAdam(groups, lr=0.1, foreach=False))
    fast, fast_opt = _optimizer_run(lambda groups: BertAdam(groups, lr=0.1, foreach=True))
    for a, b in zip(looped, fast):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for a, b in zip(looped, fast):
        sa, sb = loop_opt.state[a], fast_opt.state[b]
        assert sa["step"] == sb["step"]
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-6, atol=1e-8)
    assert loop_opt.state[looped[1]]["step"] == 3  # skipped once


def test_fused_adamw_equals_the_default_adamw():
    from neighborretr.optim import build_optimizer

    plain, _ = _optimizer_run(lambda groups: build_optimizer("adamw", groups, lr=0.1))
    fused, opt = _optimizer_run(lambda groups: build_optimizer("adamw", groups, lr=0.1, fused=True))
    assert opt.defaults["fused"] is True
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="AdamW option"):
        build_optimizer("bertadam", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.1, fused=True)


def test_tcblock_attention_kernel_equals_the_explicit_softmax():
    import math

    from neighborretr.models.token_merging import TCBlock

    torch.manual_seed(0)
    block = TCBlock(32, heads=4)
    queries = torch.randn(3, 2, 32, requires_grad=True)
    tokens = torch.randn(3, 7, 32, requires_grad=True)
    score = torch.randn(3, 7).masked_fill(torch.tensor([[False] * 5 + [True] * 2] * 3), float("-inf"))
    score.requires_grad_(True)

    def explicit(queries, tokens, score):  # the formula the block computed before the kernel
        q = block._split(block.q(block.norm1(queries)))
        k, v = (block._split(t) for t in block.kv(block.norm1(tokens)).chunk(2, dim=-1))
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + score[:, None, None, :]
        return queries + block.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).flatten(2))

    upstream = torch.randn(3, 2, 32)
    fast = block(queries, tokens, score)
    fast_grads = torch.autograd.grad((fast * upstream).sum(), (queries, tokens, score, block.kv.weight))
    ref = explicit(queries, tokens, score)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (queries, tokens, score, block.kv.weight))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(fast_grads[2]).all() and (fast_grads[2][:, 5:] == 0).all()  # masked keys: no gradient


def test_inference_maxima_equal_the_autograd_path_exactly():
    inputs = random_sides(bt=4, bv=6, seed=5)
    with torch.no_grad():
        fast = weighted_token_similarity(*inputs)  # amax
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    tracked = weighted_token_similarity(*leaves)  # max(dim).values
    assert tracked.requires_grad
    torch.testing.assert_close(fast, tracked.detach(), rtol=0, atol=0)
