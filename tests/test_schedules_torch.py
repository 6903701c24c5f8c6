"""lrbs.schedules against PyTorch's own schedulers, and the torch adapter (attach / apply / resume).

Each PyTorch scheduler is actually stepped in a full run: record ``opt.param_groups[0]["lr"]`` (and the
momentum or beta1) before each ``opt.step()``, call ``sched.step()`` after it, and compare with our pure
values to 1e-9.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L

import lrbs.schedules as S
from lrbs.errors import ConfigError, LrbsTypeError


def _optimizer(kind="sgd", lr=0.1, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    pgs = [{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)]
    if kind == "sgd":
        return torch.optim.SGD(pgs, lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(pgs, lr=lr, betas=(0.9, 0.999))
    return torch.optim.Adagrad(pgs, lr=lr)


def _run(opt, sched, n, group=0):
    """Step ``n`` times; return the LRs and momenta the optimizer held at each optimizer step."""
    lrs, moms = [], []
    for _ in range(n):
        g = opt.param_groups[group]
        lrs.append(float(g["lr"]))
        moms.append(
            float(g["momentum"]) if "momentum" in g else float(g["betas"][0]) if "betas" in g else np.nan
        )
        opt.zero_grad()
        for pg in opt.param_groups:
            for p in pg["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return np.array(lrs), np.array(moms)


# name: (torch scheduler factory(opt), our LR schedule, our momentum schedule or None, optimizer kind, steps)
EQUIVALENCE = {
    "LinearLR": (lambda o: L.LinearLR(o, 0.25, 1.0, 40), S.linear(0.025, 0.1, 40), None, "sgd", 60),
    "LinearLR-decay": (lambda o: L.LinearLR(o, 1.0, 0.1, 30), S.linear(0.1, 0.01, 30), None, "sgd", 50),
    "StepLR": (lambda o: L.StepLR(o, 7, 0.5), S.step(0.1, 7, 0.5), None, "sgd", 60),
    "MultiStepLR": (
        lambda o: L.MultiStepLR(o, [10, 25, 40], 0.2),
        S.step(0.1, [10, 25, 40], 0.2),
        None,
        "sgd",
        60,
    ),
    "ExponentialLR": (lambda o: L.ExponentialLR(o, 0.97), S.exponential(0.1, 0.97), None, "sgd", 200),
    "CosineAnnealingLR": (lambda o: L.CosineAnnealingLR(o, 100), S.cosine(0.1, 100), None, "sgd", 101),
    "CosineAnnealingLR-eta_min": (
        lambda o: L.CosineAnnealingLR(o, 77, eta_min=0.003),
        S.cosine(0.1, 77, 0.003),
        None,
        "sgd",
        78,
    ),
    "PolynomialLR": (lambda o: L.PolynomialLR(o, 50, 2.0), S.polynomial(0.1, 50, power=2.0), None, "sgd", 70),
    "PolynomialLR-linear": (lambda o: L.PolynomialLR(o, 30), S.polynomial(0.1, 30), None, "sgd", 40),
    "CosineAnnealingWarmRestarts": (
        lambda o: L.CosineAnnealingWarmRestarts(o, 10, eta_min=0.001),
        S.sgdr(0.1, 10, 1, 0.001),
        None,
        "sgd",
        95,
    ),
    "CosineAnnealingWarmRestarts-T_mult2": (
        lambda o: L.CosineAnnealingWarmRestarts(o, 5, T_mult=2),
        S.sgdr(0.1, 5, 2),
        None,
        "sgd",
        160,
    ),
    "CosineAnnealingWarmRestarts-T_mult3": (
        lambda o: L.CosineAnnealingWarmRestarts(o, 3, T_mult=3, eta_min=0.01),
        S.sgdr(0.1, 3, 3, 0.01),
        None,
        "sgd",
        130,
    ),
    "CyclicLR-triangular": (
        lambda o: L.CyclicLR(o, 0.01, 0.1, 10),
        S.cyclic(0.01, 0.1, 10),
        S.cyclic_momentum(0.8, 0.9, 10),
        "sgd",
        65,
    ),
    "CyclicLR-triangular-asym": (
        lambda o: L.CyclicLR(o, 0.01, 0.1, 7, 13),
        S.cyclic(0.01, 0.1, 7, 13),
        S.cyclic_momentum(0.8, 0.9, 7, 13),
        "sgd",
        90,
    ),
    "CyclicLR-triangular2": (
        lambda o: L.CyclicLR(o, 0.001, 0.1, 6, 9, mode="triangular2", base_momentum=0.85, max_momentum=0.95),
        S.cyclic(0.001, 0.1, 6, 9, "triangular2"),
        S.cyclic_momentum(0.85, 0.95, 6, 9, "triangular2"),
        "sgd",
        80,
    ),
    "CyclicLR-exp_range-adam": (
        lambda o: L.CyclicLR(o, 0.001, 0.1, 5, 8, mode="exp_range", gamma=0.98),
        S.cyclic(0.001, 0.1, 5, 8, "exp_range", 0.98),
        S.cyclic_momentum(0.8, 0.9, 5, 8, "exp_range", 0.98),
        "adam",
        70,
    ),
    "OneCycleLR": (
        lambda o: L.OneCycleLR(o, 0.1, total_steps=100),
        S.one_cycle(0.1, 100),
        S.one_cycle_momentum(100),
        "sgd",
        100,
    ),
    "OneCycleLR-odd": (
        lambda o: L.OneCycleLR(
            o, 0.3, total_steps=97, pct_start=0.37, div_factor=10.0, final_div_factor=300.0
        ),
        S.one_cycle(0.3, 97, 0.37, 10.0, 300.0),
        S.one_cycle_momentum(97, 0.37),
        "sgd",
        97,
    ),
    "OneCycleLR-linear-adam": (
        lambda o: L.OneCycleLR(
            o, 0.01, total_steps=80, anneal_strategy="linear", base_momentum=0.8, max_momentum=0.9
        ),
        S.one_cycle(0.01, 80, anneal="linear"),
        S.one_cycle_momentum(80, base=0.8, peak=0.9, anneal="linear"),
        "adam",
        80,
    ),
    "OneCycleLR-three_phase": (
        lambda o: L.OneCycleLR(o, 0.1, total_steps=120, pct_start=0.25, three_phase=True),
        S.one_cycle(0.1, 120, 0.25, three_phase=True),
        S.one_cycle_momentum(120, 0.25, three_phase=True),
        "sgd",
        120,
    ),
    "OneCycleLR-three_phase-linear": (
        lambda o: L.OneCycleLR(o, 0.1, total_steps=64, anneal_strategy="linear", three_phase=True),
        S.one_cycle(0.1, 64, anneal="linear", three_phase=True),
        S.one_cycle_momentum(64, anneal="linear", three_phase=True),
        "sgd",
        64,
    ),
}


@pytest.mark.parametrize("name", list(EQUIVALENCE))
def test_equals_pytorch_scheduler(name):
    make, lr_schedule, momentum_schedule, kind, n = EQUIVALENCE[name]
    opt = _optimizer(kind, lr=0.1)
    torch_lrs, torch_moms = _run(opt, make(opt), n)
    np.testing.assert_allclose(lr_schedule.values(n), torch_lrs, rtol=1e-9, atol=1e-15)
    if momentum_schedule is not None:
        np.testing.assert_allclose(momentum_schedule.values(n), torch_moms, rtol=1e-9, atol=0)
    # and through our adapter, the optimizer holds the same values
    opt2 = _optimizer(kind, lr=0.1)
    ours_lrs, ours_moms = _run(opt2, S.attach(opt2, lr_schedule, momentum_schedule), n)
    np.testing.assert_allclose(ours_lrs, torch_lrs, rtol=1e-9, atol=1e-15)
    if momentum_schedule is not None:
        np.testing.assert_allclose(ours_moms, torch_moms, rtol=1e-9, atol=0)


def test_one_cycle_matches_pytorch_long():
    """A realistic length with the default pct_start (0.3 * T is not exact in floating point)."""
    opt = _optimizer()
    lrs, moms = _run(opt, L.OneCycleLR(opt, 0.1, total_steps=1000), 1000)
    np.testing.assert_allclose(S.one_cycle(0.1, 1000).values(1000), lrs, rtol=1e-9, atol=0)
    np.testing.assert_allclose(S.one_cycle_momentum(1000).values(1000), moms, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------------------------
# the adapter


def test_attach_param_groups_keep_ratio():
    opt = _optimizer(groups=3, lr=0.1)  # group LRs 0.1, 0.2, 0.3
    sched = S.attach(opt, S.cosine(1.0, 20))
    assert isinstance(sched, L.LRScheduler)
    for t in range(25):
        expected = S.cosine(1.0, 20)(t)
        got = [g["lr"] for g in opt.param_groups]
        np.testing.assert_allclose(got, [expected, 2 * expected, 3 * expected], rtol=1e-12)
        opt.step()
        sched.step()


def test_attach_per_group_schedules_and_adam_beta1():
    opt = _optimizer("adam", groups=2)
    lr = [S.linear(0.0, 1.0, 10), S.constant(0.5)]
    sched = S.attach(opt, lr, momentum=S.linear(0.95, 0.85, 10))
    for t in range(12):
        assert [g["lr"] for g in opt.param_groups] == [lr[0](t), 0.5]
        assert [g["betas"] for g in opt.param_groups] == [(S.linear(0.95, 0.85, 10)(t), 0.999)] * 2
        opt.step()
        sched.step()


def test_apply():
    opt = _optimizer(groups=2, lr=0.1)  # 0.1 and 0.2
    s = S.join([S.constant(1.0), S.constant(0.0)], [3])  # drops to 0 at step 3: the ratio must survive it
    for t in (0, 3, 5):
        out = S.apply(opt, t, lr=s, momentum=S.constant(0.5))
        assert out == [g["lr"] for g in opt.param_groups] == [s(t), 2 * s(t)]
        assert [g["momentum"] for g in opt.param_groups] == [0.5, 0.5]
    assert S.apply(opt, 1, lr=s) == [1.0, 2.0]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_resume_is_exact(kind, tmp_path):
    """Stop at step k, save, load into a fresh optimizer + scheduler, continue: same as uninterrupted."""
    lr = S.warmup(S.cosine(0.1, 40), 10)
    mom = S.one_cycle_momentum(50)
    n, k = 50, 23

    def build():
        opt = _optimizer(kind, groups=2)
        return opt, S.attach(opt, lr, mom)

    opt, sched = build()
    full = _run(opt, sched, n)

    opt, sched = build()
    first = _run(opt, sched, k)
    assert sched.state_dict() == {"step": k}
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    opt2, sched2 = build()
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    rest = _run(opt2, sched2, n - k)
    np.testing.assert_array_equal(np.concatenate([first[0], rest[0]]), full[0])
    np.testing.assert_array_equal(np.concatenate([first[1], rest[1]]), full[1])
    # the second group keeps its ratio after the resume too
    assert opt2.param_groups[1]["lr"] == pytest.approx(2 * lr(n), rel=1e-12)


def test_adapter_emits_no_warnings():
    opt = _optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = S.attach(opt, S.cosine(0.1, 5))
        _run(opt, sched, 6)


ADAPTER_ERRORS = {
    "not an optimizer": (
        lambda: S.attach("sgd", S.constant(0.1)),
        LrbsTypeError,
        r"optimizer='sgd' is not allowed: must be a torch.optim.Optimizer",
    ),
    "lr not callable": (
        lambda: S.attach(_optimizer(), 0.1),
        LrbsTypeError,
        r"lr=0.1 is not allowed: must be a Schedule or a list of one per param group",
    ),
    "wrong group count": (
        lambda: S.attach(_optimizer(groups=2), [S.constant(0.1)] * 3),
        ConfigError,
        r"lr= got 3 schedules for 2 param groups",
    ),
    "list element": (
        lambda: S.attach(_optimizer(groups=2), [S.constant(0.1), 0.2]),
        LrbsTypeError,
        r"lr\[1\]=0.2 is not allowed: must be a Schedule",
    ),
    "no momentum": (
        lambda: S.attach(_optimizer("adagrad"), S.constant(0.1), momentum=S.constant(0.9)),
        ConfigError,
        r"momentum= was given but Adagrad has neither 'momentum' nor 'betas'",
    ),
    "group 0 lr 0": (
        lambda: S.attach(_optimizer(groups=2, lr=0.0), S.constant(0.1)),
        ConfigError,
        r"param group 0 has lr=0, so the other groups' LR ratios to it are undefined",
    ),
    "apply step": (
        lambda: S.apply(_optimizer(), -1, lr=S.constant(0.1)),
        ConfigError,
        r"step=-1 is not allowed: must be an integer >= 0",
    ),
    "apply optimizer": (lambda: S.apply(None, 0), LrbsTypeError, r"optimizer=None is not allowed"),
    "bad state": (
        lambda: S.attach(_optimizer(), S.constant(0.1)).load_state_dict({"last_epoch": 3}),
        ConfigError,
        r"state_dict=\{'last_epoch': 3\} is not allowed: must be \{'step': <int >= 0>\}",
    ),
    "negative state": (
        lambda: S.attach(_optimizer(), S.constant(0.1)).load_state_dict({"step": -2}),
        ConfigError,
        r"state_dict\['step'\]=-2 is not allowed: must be an integer >= 0",
    ),
}


@pytest.mark.parametrize("case", list(ADAPTER_ERRORS))
def test_adapter_errors(case):
    fn, error, pattern = ADAPTER_ERRORS[case]
    with pytest.raises(error, match=pattern):
        fn()
