"""Tests for lrbs.optim: SAM / ASAM, LARS, LAMB against hand-written float64 updates; BN, resume, registry."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from lrbs.errors import ConfigError, LrbsError, LrbsTypeError
from lrbs.optim import (
    LAMB,
    LARS,
    SAM,
    disable_running_stats,
    enable_running_stats,
    frozen_running_stats,
    get_optimizer,
    list_optimizers,
    sam_step,
)

DT = torch.float64


# ------------------------------------------------------------------ a tiny float64 problem, by hand


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g, dtype=DT)
    y = torch.randn(5, 2, generator=g, dtype=DT)
    w = torch.randn(2, 3, generator=g, dtype=DT)
    b = torch.randn(2, generator=g, dtype=DT)
    return x, y, w, b


def _model(w, b) -> nn.Linear:
    m = nn.Linear(3, 2).to(DT)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


def _mse(pred, y):
    return ((pred - y) ** 2).mean()


def _grads(w, b, x, y):
    """Closed-form gradient of mean((x w^T + b - y)^2) with respect to (w, b)."""
    r = x @ w.T + b - y
    n = r.numel()
    return [2 * r.T @ x / n, 2 * r.sum(0) / n]


def _params(m: nn.Linear):
    return [m.weight.detach().clone(), m.bias.detach().clone()]


def _plain_step(model, opt, x, y):
    opt.zero_grad()
    _mse(model(x), y).backward()
    opt.step()


# ------------------------------------------------------------------ SAM / ASAM


def _sam_reference(w, b, x, y, *, rho, adaptive, lr, momentum, wd, steps):
    ps, bufs = [w.clone(), b.clone()], [None, None]
    for _ in range(steps):
        g = _grads(*ps, x, y)
        if adaptive:
            norm = math.sqrt(sum(float(((p.abs() * gi) ** 2).sum()) for p, gi in zip(ps, g)))
            e = [rho * p**2 * gi / (norm + 1e-12) for p, gi in zip(ps, g)]
        else:
            norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
            e = [rho * gi / (norm + 1e-12) for gi in g]
        g_adv = _grads(ps[0] + e[0], ps[1] + e[1], x, y)
        for i in range(2):
            d = g_adv[i] + wd * ps[i]
            bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
            ps[i] = ps[i] - lr * bufs[i]
    return ps


@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 2.0)])
@pytest.mark.parametrize("driver", ["sam_step", "closure", "manual"])
def test_sam_matches_hand_written_update(adaptive, rho, driver):
    x, y, w, b = _problem()
    model = _model(w, b)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, momentum=0.9,
              weight_decay=0.01)  # fmt: skip
    for _ in range(2):
        if driver == "sam_step":
            loss = sam_step(model, _mse, x, y, opt)
        elif driver == "closure":

            def closure():
                loss = _mse(model(x), y)
                loss.backward()
                return loss

            loss = opt.step(closure)
        else:
            opt.zero_grad()
            loss = _mse(model(x), y)
            loss.backward()
            opt.first_step(zero_grad=True)
            _mse(model(x), y).backward()
            opt.second_step(zero_grad=True)
        assert loss.dtype == DT
    ref = _sam_reference(w, b, x, y, rho=rho, adaptive=adaptive, lr=0.1, momentum=0.9, wd=0.01, steps=2)
    for p, r in zip(_params(model), ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
    # the perturbation matters: plain SGD from the same point lands elsewhere
    sgd_ref = _sam_reference(w, b, x, y, rho=1e-300, adaptive=False, lr=0.1, momentum=0.9, wd=0.01, steps=2)
    assert not torch.allclose(_params(model)[0], sgd_ref[0], atol=1e-6)


def test_sam_step_returns_loss_at_w():
    x, y, w, b = _problem()
    model = _model(w, b)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss = sam_step(model, _mse, x, y, opt)
    assert float(loss) == pytest.approx(float(_mse(x @ w.T + b, y)), rel=1e-14)


def test_sam_adam_base_matches_torch_adam_on_perturbed_gradient():
    x, y, w, b = _problem()
    model = _model(w, b)
    opt = get_optimizer("sam", model.parameters(), lr=0.01, base="adam", betas=(0.8, 0.99), rho=0.1)
    sam_step(model, _mse, x, y, opt)
    # oracle: torch's Adam fed the gradient at w + rho g/||g||, computed by hand
    g = _grads(w, b, x, y)
    norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
    g_adv = _grads(w + 0.1 * g[0] / (norm + 1e-12), b + 0.1 * g[1] / (norm + 1e-12), x, y)
    ref = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    adam = torch.optim.Adam(ref, lr=0.01, betas=(0.8, 0.99))
    for p, gi in zip(ref, g_adv):
        p.grad = gi
    adam.step()
    for p, r in zip(_params(model), ref):
        torch.testing.assert_close(p, r.detach(), rtol=1e-12, atol=1e-12)


def test_sam_lr_scheduler_drives_base_optimizer_without_warning():
    x, y, w, b = _problem()
    model = _model(w, b)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sam_step(model, _mse, x, y, opt)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    start = _params(model)
    sam_step(model, _mse, x, y, opt)
    ref = _sam_reference(*start, x, y, rho=0.05, adaptive=False, lr=0.1, momentum=0.0, wd=0.0, steps=1)
    for p, r in zip(_params(model), ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ BatchNorm statistics under SAM


def _bn_model(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=momentum), nn.ReLU(), nn.Linear(4, 1))


def _bn_buffers(model):
    bn = model[1]
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("driver", ["sam_step", "closure_with_model"])
def test_sam_bn_running_stats_equal_one_forward(momentum, driver):
    torch.manual_seed(1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    model = _bn_model(momentum)
    once = copy.deepcopy(model)
    once(x)  # the reference: ONE forward pass in train mode
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.5)
    if driver == "sam_step":
        sam_step(model, nn.functional.mse_loss, x, y, opt)
    else:

        def closure():
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure, model=model)
    for got, want in zip(_bn_buffers(model), _bn_buffers(once)):
        assert torch.equal(got, want)
    assert model[1].momentum == momentum
    assert not hasattr(model[1], "_lrbs_backup")


def test_sam_bn_stats_change_twice_without_freezing():
    """Control: the BN test above could fail, because an unfrozen second pass does move the stats."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    model = _bn_model()
    once = copy.deepcopy(model)
    once(x)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.5)

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert int(model[1].num_batches_tracked) == 2
    assert not torch.allclose(model[1].running_mean, once[1].running_mean)


def test_disable_enable_running_stats_and_context_restore_on_error():
    torch.manual_seed(2)
    model = _bn_model()
    before = _bn_buffers(model)
    disable_running_stats(model)
    disable_running_stats(model)  # idempotent: keeps the first backup
    assert model[1].momentum == 0.0
    model(torch.randn(8, 3))
    enable_running_stats(model)
    assert model[1].momentum == 0.1
    for got, want in zip(_bn_buffers(model), before):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="boom"), frozen_running_stats(model):
        model(torch.randn(8, 3) + 5.0)
        raise RuntimeError("boom")
    assert model[1].momentum == 0.1
    for got, want in zip(_bn_buffers(model), before):
        assert torch.equal(got, want)


# ------------------------------------------------------------------ LARS


def _lars_reference(w, b, x, y, *, lr, momentum, wd, trust, eps, exclude_1d, steps):
    ps, bufs = [w.clone(), b.clone()], [None, None]
    for _ in range(steps):
        g = _grads(*ps, x, y)
        for i in range(2):
            gi = g[i]
            if not (exclude_1d and ps[i].ndim == 1):
                w_norm = math.sqrt(float((ps[i] ** 2).sum()))
                g_norm = math.sqrt(float((gi**2).sum()))
                lam = trust * w_norm / (g_norm + wd * w_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
                gi = lam * (gi + wd * ps[i])
            bufs[i] = gi.clone() if bufs[i] is None else momentum * bufs[i] + gi
            ps[i] = ps[i] - lr * bufs[i]
    return ps


@pytest.mark.parametrize("exclude_1d", [True, False])
def test_lars_two_steps_match_hand_written_update(exclude_1d):
    x, y, w, b = _problem()
    kw = dict(lr=0.5, momentum=0.9, wd=0.05, trust=0.02, eps=1e-8)
    model = _model(w, b)
    opt = LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05, trust_coefficient=0.02,
               exclude_1d=exclude_1d)  # fmt: skip
    for _ in range(2):
        _plain_step(model, opt, x, y)
    ref = _lars_reference(w, b, x, y, exclude_1d=exclude_1d, steps=2, **kw)
    for p, r in zip(_params(model), ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
    other = _lars_reference(w, b, x, y, exclude_1d=not exclude_1d, steps=2, **kw)
    assert not torch.allclose(_params(model)[1], other[1], atol=1e-6)


def test_lars_zero_weight_uses_ratio_one_and_keeps_grad():
    x, y, w, b = _problem()
    w = torch.zeros_like(w)
    model = _model(w, b)
    opt = LARS(model.parameters(), lr=0.3, momentum=0.9, weight_decay=0.1)
    opt.zero_grad()
    _mse(model(x), y).backward()
    grad_before = model.weight.grad.clone()
    opt.step()
    g = _grads(w, b, x, y)
    torch.testing.assert_close(model.weight.detach(), -0.3 * g[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(model.weight.grad, grad_before)  # p.grad is not modified


def test_lars_zero_grad_uses_ratio_one():
    _, _, w, _ = _problem()
    p = w.clone().requires_grad_()
    p.grad = torch.zeros_like(w)
    LARS([p], lr=0.3, momentum=0.9, weight_decay=0.1).step()
    # ratio 1, so the step is plain weight decay: w - lr * wd * w
    torch.testing.assert_close(p.detach(), w - 0.3 * 0.1 * w, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ LAMB


def _lamb_reference(w, b, x, y, *, lr, betas, eps, wd, bias_correction, clamp, steps):
    ps = [w.clone(), b.clone()]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    b1, b2 = betas
    for t in range(1, steps + 1):
        g = _grads(*ps, x, y)
        for i in range(2):
            ms[i] = b1 * ms[i] + (1 - b1) * g[i]
            vs[i] = b2 * vs[i] + (1 - b2) * g[i] ** 2
            m_hat = ms[i] / (1 - b1**t) if bias_correction else ms[i]
            v_hat = vs[i] / (1 - b2**t) if bias_correction else vs[i]
            u = m_hat / (torch.sqrt(v_hat) + eps) + wd * ps[i]
            w_norm = min(math.sqrt(float((ps[i] ** 2).sum())), clamp)
            u_norm = math.sqrt(float((u**2).sum()))
            r = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            ps[i] = ps[i] - lr * r * u
    return ps


@pytest.mark.parametrize("bias_correction,clamp", [(True, 10.0), (False, 10.0), (True, 0.5)])
def test_lamb_two_steps_match_hand_written_update(bias_correction, clamp):
    x, y, w, b = _problem()
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, wd=0.01, clamp=clamp)
    model = _model(w, b)
    opt = LAMB(model.parameters(), lr=0.01, weight_decay=0.01, bias_correction=bias_correction,
               clamp_value=clamp)  # fmt: skip
    for _ in range(2):
        _plain_step(model, opt, x, y)
    ref = _lamb_reference(w, b, x, y, bias_correction=bias_correction, steps=2, **kw)
    for p, r in zip(_params(model), ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
    other = _lamb_reference(w, b, x, y, bias_correction=not bias_correction, steps=2, **kw)
    assert not torch.allclose(_params(model)[0], other[0], atol=1e-9)


def test_lamb_zero_weight_uses_ratio_one():
    x, y, w, b = _problem()
    w = torch.zeros_like(w)
    model = _model(w, b)
    opt = LAMB(model.parameters(), lr=0.01)
    _plain_step(model, opt, x, y)
    g = _grads(w, b, x, y)[0]
    u = (0.1 * g / 0.1) / (torch.sqrt(0.001 * g**2 / 0.001) + 1e-6)  # bias-corrected first step
    torch.testing.assert_close(model.weight.detach(), -0.01 * u, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ state_dict round trip


def _train(name, model, opt, batches):
    for x, y in batches:
        if isinstance(opt, SAM):
            sam_step(model, _mse, x, y, opt)
        else:
            _plain_step(model, opt, x, y)


@pytest.mark.parametrize("name", list_optimizers())
def test_state_dict_resume_is_exact(name):
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 3, generator=gen, dtype=DT), torch.randn(6, 2, generator=gen, dtype=DT))
               for _ in range(6)]  # fmt: skip

    def fresh():
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
        return model, get_optimizer(name, model, lr=0.05, weight_decay=0.01)

    model_a, opt_a = fresh()
    _train(name, model_a, opt_a, batches)  # uninterrupted

    model_b, opt_b = fresh()
    _train(name, model_b, opt_b, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_c, opt_c = fresh()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    _train(name, model_c, opt_c, batches[3:])

    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
    if isinstance(opt_c, SAM):
        assert opt_c.base_optimizer.param_groups is opt_c.param_groups


# ------------------------------------------------------------------ registry


def test_list_optimizers():
    assert list_optimizers() == ["adam", "adamw", "asam", "lamb", "lars", "sam", "sgd"]


@pytest.mark.parametrize(
    "name,kw,cls,group",
    [
        ("sgd", {}, torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}),
        ("SGD", {"momentum": 0.5}, torch.optim.SGD, {"momentum": 0.5}),
        ("adam", {"momentum": 0.8}, torch.optim.Adam, {"betas": (0.8, 0.999), "weight_decay": 0.01}),
        ("adamw", {"betas": (0.7, 0.9)}, torch.optim.AdamW, {"betas": (0.7, 0.9), "weight_decay": 0.01}),
        ("sam", {}, SAM, {"rho": 0.05, "adaptive": False, "momentum": 0.9, "weight_decay": 0.01}),
        ("asam", {"rho": 1.0}, SAM, {"rho": 1.0, "adaptive": True, "momentum": 0.9}),
        ("asam", {}, SAM, {"rho": 2.0, "adaptive": True}),
        ("sam", {"base": "adam", "betas": (0.5, 0.9)}, SAM, {"betas": (0.5, 0.9), "rho": 0.05}),
        (
            "lars",
            {"momentum": 0.8},
            LARS,
            {"momentum": 0.8, "weight_decay": 0.01, "trust_coefficient": 0.001},
        ),
        ("lamb", {}, LAMB, {"betas": (0.9, 0.999), "weight_decay": 0.01, "bias_correction": True}),
    ],
)
def test_get_optimizer_maps_hyperparameters(name, kw, cls, group):
    model = nn.Linear(2, 2)
    opt = get_optimizer(name, model.parameters(), lr=0.03, weight_decay=0.01, **kw)
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.03
    for k, v in group.items():
        assert opt.param_groups[0][k] == v, k
    if kw.get("base") == "adam":
        assert type(opt.base_optimizer) is torch.optim.Adam
    elif cls is SAM:
        assert type(opt.base_optimizer) is torch.optim.SGD


# ------------------------------------------------------------------ errors


def _ps():
    return nn.Linear(2, 2).parameters()


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: SAM(_ps(), torch.optim.SGD, rho=0.0, lr=0.1), ConfigError, r"rho=0\.0 is not allowed.*> 0"),
        (lambda: SAM(_ps(), torch.optim.SGD, rho=-1, lr=0.1), ConfigError, r"rho=-1 is not allowed"),
        (lambda: SAM(_ps(), torch.optim.SGD, rho=float("nan"), lr=0.1), ConfigError, r"rho=nan"),
        (lambda: SAM(_ps(), "sgd", lr=0.1), LrbsTypeError, r"base_optimizer='sgd'.*optimizer class"),
        (
            lambda: SAM(_ps(), torch.optim.SGD(_ps(), lr=0.1)),
            LrbsTypeError,
            r"base_optimizer=.*optimizer class",
        ),
        (lambda: SAM(_ps(), nn.Linear, lr=0.1), LrbsTypeError, r"base_optimizer=.*Linear.*optimizer class"),
        (lambda: SAM(_ps(), SAM, lr=0.1), LrbsTypeError, r"SAM cannot wrap SAM"),
        (lambda: SAM(_ps(), torch.optim.SGD, adaptive="yes", lr=0.1), LrbsTypeError, r"adaptive='yes'"),
        (lambda: SAM(_ps(), torch.optim.SGD, lr=0.0), ConfigError, r"lr=0\.0 is not allowed"),
        (lambda: SAM(_ps(), torch.optim.SGD, lr=0.1, weight_decay=-1), ConfigError, r"weight_decay=-1"),
        (lambda: LARS(_ps(), lr=0.0), ConfigError, r"lr=0\.0 is not allowed.*> 0"),
        (lambda: LARS(_ps(), lr=float("nan")), ConfigError, r"lr=nan is not allowed: must be a finite"),
        (lambda: LARS(_ps(), lr="big"), LrbsTypeError, r"lr='big' is not allowed: must be a real number"),
        (lambda: LARS(_ps(), lr=0.1, weight_decay=-0.1), ConfigError, r"weight_decay=-0\.1.*>= 0"),
        (lambda: LARS(_ps(), lr=0.1, trust_coefficient=0.0), ConfigError, r"trust_coefficient=0\.0"),
        (lambda: LARS(_ps(), lr=0.1, momentum=1.0), ConfigError, r"momentum=1\.0.*< 1"),
        (lambda: LARS(_ps(), lr=0.1, eps=-1e-8), ConfigError, r"eps=-1e-08"),
        (lambda: LAMB(_ps(), lr=-1.0), ConfigError, r"lr=-1\.0 is not allowed"),
        (lambda: LAMB(_ps(), lr=0.1, weight_decay=-1.0), ConfigError, r"weight_decay=-1\.0"),
        (lambda: LAMB(_ps(), lr=0.1, betas=(0.9, 1.0)), ConfigError, r"betas\[1\]=1\.0.*< 1"),
        (lambda: LAMB(_ps(), lr=0.1, betas=0.9), ConfigError, r"betas=0\.9 is not allowed: must be a pair"),
        (lambda: LAMB(_ps(), lr=0.1, eps=0.0), ConfigError, r"eps=0\.0 is not allowed"),
        (lambda: LAMB(_ps(), lr=0.1, clamp_value=0.0), ConfigError, r"clamp_value=0\.0"),
        (lambda: get_optimizer("lamp", _ps(), lr=0.1), ConfigError, r"unknown optimizer 'lamp'.*'lamb'"),
        (lambda: get_optimizer(3, _ps(), lr=0.1), LrbsTypeError, r"name=3 is not allowed: must be a string"),
        (lambda: get_optimizer("sgd", _ps(), lr=0.0), ConfigError, r"lr=0\.0 is not allowed"),
        (lambda: get_optimizer("adam", _ps(), lr=0.1, weight_decay=-1), ConfigError, r"weight_decay=-1"),
        (lambda: get_optimizer("sgd", _ps(), lr=0.1, rho=0.1), ConfigError, r"rho=0\.1.*only applies to sam"),
        (lambda: get_optimizer("lars", _ps(), lr=0.1, base="sgd"), ConfigError, r"base='sgd'.*sam/asam"),
        (lambda: get_optimizer("sam", _ps(), lr=0.1, base="adm"), ConfigError, r"base='adm'.*'adam'"),
        (lambda: get_optimizer("sam", _ps(), lr=0.1, rho=0.0), ConfigError, r"rho=0\.0 is not allowed"),
        (
            lambda: get_optimizer("lars", _ps(), lr=0.1, betas=(0.9, 0.99)),
            ConfigError,
            r"betas=.*use momentum",
        ),
        (lambda: get_optimizer("sam", _ps(), lr=0.1, betas=(0.9, 0.99)), ConfigError, r"with base='sgd'"),
        (lambda: get_optimizer("adam", _ps(), lr=0.1, betas=(1.5, 0.9)), ConfigError, r"betas\[0\]=1\.5"),
    ],
)
def test_bad_inputs_raise(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_sam_usage_errors():
    x, y, w, b = _problem()
    model = _model(w, b)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ConfigError, match=r"closure=None is not allowed"):
        opt.step()
    _mse(model(x), y).backward()
    with pytest.raises(LrbsError, match=r"second_step\(\) was called without a first_step\(\)"):
        opt.second_step()
    opt.first_step()
    with pytest.raises(LrbsError, match=r"first_step\(\) was called twice without second_step\(\)"):
        opt.first_step()
    opt.second_step()  # still restores w and updates
    assert not torch.equal(model.weight.detach(), w)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(LrbsTypeError, match=r"opt=SGD is not allowed: sam_step needs"):
        sam_step(model, _mse, x, y, sgd)
