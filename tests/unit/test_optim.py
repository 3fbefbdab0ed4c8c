"""BertAdam, warmup_cosine, the LambdaLR schedule and the parameter groups (spec §5)."""

import math

import pytest
import torch
from torch import nn

from neighborretr.optim import BertAdam, build_optimizer, build_scheduler, param_groups, warmup_cosine


def reference_bertadam(params, grads_per_step, groups_cfg, b1=0.9, b2=0.98, eps=1e-6):
    """Plain loop version of spec §5; ``groups_cfg`` gives (indices, lr, wd, max_grad_norm) per group."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for indices, lr, wd, max_norm in groups_cfg:
            for i in indices:
                g = grads[i].clone()
                if max_norm > 0:
                    norm = math.sqrt(float((g * g).sum()))
                    g = g * min(1.0, max_norm / (norm + 1e-6))
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                u = m[i] / (torch.sqrt(v[i]) + eps) + wd * params[i]
                params[i] = params[i] - lr * u
    return params


def run_bertadam(init, grads_per_step, groups_cfg, **kwargs):
    params = [nn.Parameter(p.clone()) for p in init]
    groups = [
        {"params": [params[i] for i in idx], "lr": lr, "weight_decay": wd, "max_grad_norm": mn}
        for idx, lr, wd, mn in groups_cfg
    ]
    opt = BertAdam(groups, lr=1.0, **kwargs)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("grad_scale", [0.01, 10.0], ids=["clip-inactive", "clip-active"])
def test_bertadam_matches_reference_over_several_steps(grad_scale):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    init.append(torch.randn(2, 2, generator=gen, dtype=torch.float64))
    steps = [[grad_scale * torch.randn_like(p) for p in init] for _ in range(5)]
    cfg = [([0], 1e-2, 0.2, 1.0), ([1], 3e-3, 0.0, 1.0), ([2], 5e-2, 0.1, 0.0)]
    got, _ = run_bertadam(init, steps, cfg)
    want = reference_bertadam(init, steps, cfg)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_clipping_active_changes_the_update_and_leaves_grad_untouched():
    p = nn.Parameter(torch.zeros(2))
    grad = torch.tensor([30.0, 40.0])  # norm 50
    p.grad = grad.clone()
    opt = BertAdam([p], lr=1.0, max_grad_norm=1.0)
    opt.step()
    torch.testing.assert_close(p.grad, grad)  # the official code clips p.grad in place; we do not
    g = grad / (50 + 1e-6)
    m, v = 0.1 * g, 0.02 * g * g
    torch.testing.assert_close(p.detach(), -m / (v.sqrt() + 1e-6))


def test_single_step_by_hand():
    # p = [1, -2], g = [0.3, -0.4] (norm 0.5 < 1, so no clipping), lr 0.1, wd 0.5
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    p.grad = torch.tensor([0.3, -0.4], dtype=torch.float64)
    BertAdam([p], lr=0.1, weight_decay=0.5).step()
    # m = 0.1 g = [0.03, -0.04]; v = 0.02 g^2 = [0.0018, 0.0032]; sqrt(v) = [0.042426.., 0.056568..]
    # u = m / (sqrt(v) + 1e-6) + 0.5 p = [0.707090.. + 0.5, -0.707094.. - 1.0]
    u0 = 0.03 / (math.sqrt(0.0018) + 1e-6) + 0.5
    u1 = -0.04 / (math.sqrt(0.0032) + 1e-6) - 1.0
    expected = torch.tensor([1.0 - 0.1 * u0, -2.0 - 0.1 * u1], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
    assert abs(expected[0].item() - 0.8792910) < 1e-6 and abs(expected[1].item() - (-1.8292906)) < 1e-6


def test_params_without_grad_are_skipped_and_state_has_param_dtype():
    a = nn.Parameter(torch.ones(3, dtype=torch.float16))
    b = nn.Parameter(torch.ones(3))
    a.grad = torch.full((3,), 0.5, dtype=torch.float16)
    opt = BertAdam([a, b], lr=0.1)
    opt.step()
    assert opt.state[a]["exp_avg"].dtype == torch.float16
    assert opt.state[a]["step"] == 1
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(3))


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(4, 3, generator=gen), torch.randn(6, generator=gen)]
    steps = [[torch.randn_like(p) for p in init] for _ in range(6)]
    cfg = [([0], 1e-2, 0.2, 1.0), ([1], 1e-3, 0.0, 1.0)]
    uninterrupted, _ = run_bertadam(init, steps, cfg)

    first_half, opt = run_bertadam(init, steps[:3], cfg)
    saved = opt.state_dict()
    params = [nn.Parameter(p.clone()) for p in first_half]
    groups = [{"params": [params[i] for i in idx], "lr": 0.0} for idx, *_ in cfg]
    resumed = BertAdam(groups, lr=1.0)
    resumed.load_state_dict(saved)  # also restores each group's lr / weight_decay / max_grad_norm
    for grads in steps[3:]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        resumed.step()
    for got, want in zip(params, uninterrupted):
        assert torch.equal(got.detach(), want)


def test_sparse_grad_is_rejected():
    p = nn.Parameter(torch.zeros(4, 2))
    p.grad = torch.zeros(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        BertAdam([p], lr=0.1).step()


def test_invalid_hyperparameters_are_rejected():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="b2"):
        BertAdam([p], lr=0.1, b2=1.0)
    with pytest.raises(ValueError, match="lr"):
        BertAdam([p], lr=-1.0)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (50, 0.5),  # x = 0.05, half-way through warm-up
        (99, 0.99),
        (100, 0.5 * (1 + math.cos(0.1 * math.pi))),  # boundary x = 0.1: ~0.9755, not 1
        (500, 0.5),
        (1000, 0.0),
    ],
)
def test_warmup_cosine_values(step, expected):
    assert warmup_cosine(step, total_steps=1000, warmup=0.1) == pytest.approx(expected, abs=1e-12)


def test_warmup_cosine_boundary_drop():
    assert warmup_cosine(100, 1000, 0.1) == pytest.approx(0.97553, abs=1e-5)
    assert warmup_cosine(0, 1000, 0.0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(step=0, total_steps=0, warmup=0.1), "total_steps"),
        (dict(step=0, total_steps=10, warmup=1.0), "warmup"),
        (dict(step=0, total_steps=10, warmup=-0.1), "warmup"),
        (dict(step=-1, total_steps=10, warmup=0.1), "step"),
    ],
)
def test_warmup_cosine_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        warmup_cosine(**kwargs)


def test_lambdalr_first_update_has_lr_zero():
    p = nn.Parameter(torch.ones(2))
    opt = BertAdam([{"params": [p], "lr": 0.5}], lr=0.5)
    sched = build_scheduler(opt, total_steps=10, warmup=0.2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
        if len(lrs) == 1:
            assert torch.equal(p.detach(), torch.ones(2))  # lr 0: the first update changes nothing
    assert lrs == pytest.approx(
        [0.0, 0.25, 0.5 * 0.5 * (1 + math.cos(0.2 * math.pi)), 0.5 * 0.5 * (1 + math.cos(0.3 * math.pi))]
    )


def test_build_scheduler_validates_arguments():
    opt = BertAdam([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup"):
        build_scheduler(opt, total_steps=10, warmup=1.5)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.clip = nn.Module()
        self.clip.proj = nn.Linear(2, 2)  # clip.proj.weight / clip.proj.bias
        self.clip.frozen = nn.Linear(2, 2)
        self.clip.frozen.requires_grad_(False)
        self.clip.ln_final = nn.LayerNorm(2)  # decayed: "ln_final.weight" contains no "bias"
        self.head = nn.Linear(2, 2)
        self.transformerClip = nn.Linear(2, 2)  # capital C: not the backbone, as in the official rule
        self.frozen_head = nn.Parameter(torch.ones(1), requires_grad=False)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_param_groups_assignment_lr_and_wd():
    model = _Toy()
    groups = param_groups(model, lr=1e-4, weight_decay=0.2, backbone_lr_scale=1e-3)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["backbone_decay", "backbone_no_decay", "rest_decay", "rest_no_decay"]
    assert _names(model, by_name["backbone_decay"]) == ["clip.ln_final.weight", "clip.proj.weight"]
    assert _names(model, by_name["backbone_no_decay"]) == ["clip.ln_final.bias", "clip.proj.bias"]
    assert _names(model, by_name["rest_decay"]) == ["head.weight", "transformerClip.weight"]
    assert _names(model, by_name["rest_no_decay"]) == ["head.bias", "transformerClip.bias"]
    assert by_name["backbone_decay"]["lr"] == pytest.approx(1e-7) and by_name["backbone_decay"]["weight_decay"] == 0.2
    assert by_name["backbone_no_decay"]["lr"] == pytest.approx(1e-7)
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    assert by_name["rest_decay"]["lr"] == 1e-4 and by_name["rest_decay"]["weight_decay"] == 0.2
    assert by_name["rest_no_decay"]["lr"] == 1e-4 and by_name["rest_no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == 8  # the 3 frozen tensors are skipped


def test_param_groups_wrapped_model_and_empty_groups_dropped():
    wrapper = nn.Module()
    wrapper.module = nn.Module()
    wrapper.module.clip = nn.Linear(2, 2, bias=False)
    groups = param_groups(wrapper, lr=1.0, weight_decay=0.1, backbone_lr_scale=0.5)
    assert [g["name"] for g in groups] == ["backbone_decay"]
    assert groups[0]["lr"] == 0.5


def test_param_groups_custom_no_decay():
    model = _Toy()
    groups = param_groups(model, lr=1.0, weight_decay=0.1, backbone_lr_scale=1.0, no_decay=("bias", "ln_"))
    by_name = {g["name"]: g for g in groups}
    assert "clip.ln_final.weight" in _names(model, by_name["backbone_no_decay"])


def test_build_optimizer_kinds_and_unknown_name():
    model = _Toy()
    groups = param_groups(model, lr=1e-4, weight_decay=0.2, backbone_lr_scale=1e-3)
    bert = build_optimizer("BertAdam", groups, lr=1e-4)
    assert isinstance(bert, BertAdam) and bert.param_groups[0]["b2"] == 0.98
    assert bert.param_groups[0]["max_grad_norm"] == 1.0
    groups = param_groups(model, lr=1e-4, weight_decay=0.2, backbone_lr_scale=1e-3)
    adamw = build_optimizer("adamw", groups, lr=1e-4)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.2, 0.0, 0.2, 0.0]
    assert adamw.param_groups[0]["lr"] == pytest.approx(1e-7) and adamw.param_groups[0]["name"] == "backbone_decay"
    with pytest.raises(ValueError, match="bertadam, adamw"):
        build_optimizer("sgd", groups, lr=1e-4)
