"""The one training step (lrbs.step.TrainStep) against hand-written PyTorch loops: plain steps bitwise, accumulation
against the full-batch step, the LR schedule once per optimizer step (against torch's LambdaLR), the GradScaler's
skip logic on CPU (a real CPU GradScaler and an injected inf gradient), SAM against optim.sam_step, clipping, mixed
precision, and the bad inputs."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from lrbs import step as step_mod
from lrbs import train as train_mod
from lrbs.batches import BatchLoss
from lrbs.errors import ConfigError, LrbsTypeError
from lrbs.optim import SAM, sam_step
from lrbs.step import TrainStep, check_precision
from lrbs.train import fit, micro_batches

ce = nn.functional.cross_entropy


def net(seed=0, bn=False, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def data(n=40, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_plain_fp32_step_is_bitwise_a_hand_loop(opt_cls):
    x, y = data()
    ours, ref = net(), net()
    kw = {"lr": 0.1, "momentum": 0.9} if opt_cls is torch.optim.SGD else {"lr": 0.01}
    o1, o2 = opt_cls(ours.parameters(), **kw), opt_cls(ref.parameters(), **kw)
    step = TrainStep(ours, o1)
    for i in range(5):
        xb, yb = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        res = step([(xb, yb)])
        o2.zero_grad(set_to_none=True)
        loss = ce(ref(xb), yb)
        loss.backward()
        o2.step()
        assert res.applied and torch.equal(res.loss, loss.detach()) and not res.loss.requires_grad
    assert same_weights(ours, ref)


def test_four_micro_batches_equal_the_full_batch_step():
    x, y = data(n=22, dtype=torch.float64)
    ours, ref = net(dtype=torch.float64), net(dtype=torch.float64)
    o1, o2 = torch.optim.SGD(ours.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    mbs, scales = micro_batches((x, y), 22, 6, BatchLoss())  # 6 + 6 + 6 + 4
    assert len(mbs) == 4 and scales == [6 / 22, 6 / 22, 6 / 22, 4 / 22]
    res = TrainStep(ours, o1)(mbs, scales)
    o2.zero_grad()
    full = ce(ref(x), y)
    full.backward()
    o2.step()
    assert abs(float(res.loss) - float(full.detach())) < 1e-12
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_token_weighted_micro_batches_equal_the_full_batch_token_mean():
    """batch_weight: micro-batch scales w_i / sum w make the accumulated loss the full batch's token mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10, 4), generator=g)
    y[:3, 1:] = -100  # ignored tokens make the samples' weights unequal
    lin = nn.Linear(6, 3).double()

    def tok_loss(out, target):
        return ce(out.reshape(-1, 3), target.reshape(-1), ignore_index=-100)

    bl = BatchLoss(tok_loss, batch_weight=lambda b: int((b[-1] != -100).sum()))
    mbs, scales = micro_batches((x, y), 10, 3, bl)
    lo = TrainStep(lin, torch.optim.SGD(lin.parameters(), lr=0.0), bl).forward_backward(mbs, scales)
    torch.testing.assert_close(sum(lo), tok_loss(lin(x), y).detach(), rtol=1e-12, atol=0)


def test_lr_schedule_advances_once_per_optimizer_step_under_accumulation():
    """fit with 3 micro-batches per step: every micro-batch of a step sees the same lr, and the lrs follow torch's
    LambdaLR stepped once per optimizer step."""
    x, y = data(n=60)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []

    def loss_fn(out, target):
        seen.append(opt.param_groups[0]["lr"])
        return ce(out, target)

    sched = lambda s: 0.1 / (1 + s)  # noqa: E731
    fit(model, (x, y), optimizer=opt, lr=sched, batch_size=30, max_micro_batch=10, steps=4, loss_fn=loss_fn,
        eval_every=10**6)  # fmt: skip
    ref_opt = torch.optim.SGD(net().parameters(), lr=1.0)
    lam = torch.optim.lr_scheduler.LambdaLR(ref_opt, sched)
    want = []
    for _ in range(4):
        want.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        lam.step()
    train_calls = np.asarray(seen[:12]).reshape(4, 3)  # the final evaluation's calls come after
    np.testing.assert_allclose(train_calls, np.repeat(np.asarray(want)[:, None], 3, axis=1), rtol=1e-15)


class InfAt:
    """A gradient hook that turns the gradient into inf at the given calls (counted from 0)."""

    def __init__(self, *calls):
        self.calls, self.n = set(calls), 0

    def __call__(self, g):
        hit = self.n in self.calls
        self.n += 1
        return g * float("inf") if hit else g


def test_grad_scaler_skips_a_non_finite_step_and_reports_it():
    x, y = data()
    model, ref = net(), net()
    hook = InfAt(1)
    model[0].weight.register_hook(hook)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    step = TrainStep(model, opt, scaler=scaler)
    applied = []
    for i in range(3):
        xb, yb = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        before = [p.detach().clone() for p in model.parameters()]
        res = step([(xb, yb)])
        applied.append(res.applied)
        if not res.applied:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing moved
            continue
        ref_opt.zero_grad()
        ce(ref(xb), yb).backward()
        ref_opt.step()
    assert applied == [True, False, True] and step.skipped == 1
    assert scaler.get_scale() == 2.0**9  # halved once, at the skip
    # scaling by a power of two and unscaling is exact: the applied steps equal plain steps bitwise
    assert same_weights(model, ref)


def test_grad_scaler_with_clipping_unscales_first():
    x, y = data()
    a, b = net(), net()
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    TrainStep(a, oa, clip_grad_norm=0.05, scaler=torch.amp.GradScaler("cpu"))([(x, y)])
    ob.zero_grad()
    ce(b(x), y).backward()
    total = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.05)
    assert float(total) > 0.05  # the clip was active
    ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fit_does_not_count_skipped_steps_as_lr_steps(monkeypatch):
    """fit under '16-mixed' with a CPU GradScaler standing in for the CUDA one: the schedules index applied
    updates, and the history's ``applied`` column marks the skip."""
    monkeypatch.setattr(train_mod, "check_precision", lambda p, d: p)
    monkeypatch.setattr(step_mod, "check_precision", lambda p, d: p)
    monkeypatch.setattr(step_mod, "autocast", lambda p, d: contextlib.nullcontext())
    monkeypatch.setattr(step_mod, "make_grad_scaler", lambda p, d: torch.amp.GradScaler("cpu"))
    x, y = data()
    model = net()
    model[0].weight.register_hook(InfAt(2))
    r = fit(
        model, (x, y), lr=lambda s: 0.1 * (s + 1), batch_size=8, steps=5, precision="16-mixed", eval_every=5
    )
    assert r.history["applied"].tolist() == [True, True, False, True, True]
    np.testing.assert_allclose(r.history["lr"], [0.1, 0.2, 0.3, 0.3, 0.4])
    assert r.config["precision"] == "16-mixed"


def test_sam_step_equals_optim_sam_step_by_hand():
    x, y = data()
    a, b = net(bn=True), net(bn=True)
    oa = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    ob = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    step = TrainStep(a, oa)
    for i in range(3):
        xb, yb = x[10 * i : 10 * i + 10], y[10 * i : 10 * i + 10]
        res = step([(xb, yb)])
        ref_loss = sam_step(b, ce, xb, yb, ob)
        assert torch.equal(res.loss, ref_loss)
    assert same_weights(a, b)  # parameters and BN statistics (updated by the first pass only)


@pytest.mark.parametrize("inf_call", [0, 1])
def test_sam_under_the_scaler_skips_both_passes_when_either_is_not_finite(inf_call):
    x, y = data()
    model = net()
    model[0].weight.register_hook(InfAt(inf_call))  # call 0: first pass, call 1: second pass
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, opt, scaler=torch.amp.GradScaler("cpu"))
    res = step([(x, y)])
    assert not res.applied and step.skipped == 1
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # back at w, no update
    assert not any("old_p" in s for s in opt.state.values())
    res = step([(x, y)])  # the hook fires no more: a normal SAM step
    assert res.applied


def test_sam_under_the_scaler_equals_sam_step_when_finite():
    x, y = data()
    a, b = net(), net()
    oa = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    ob = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    res = TrainStep(a, oa, scaler=torch.amp.GradScaler("cpu"))([(x, y)])
    sam_step(b, ce, x, y, ob)
    assert res.applied
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_clipping_matches_clip_grad_norm_by_hand():
    x, y = data()
    a, b = net(), net()
    oa, ob = torch.optim.Adam(a.parameters(), lr=0.01), torch.optim.Adam(b.parameters(), lr=0.01)
    TrainStep(a, oa, clip_grad_norm=0.1)([(x, y)])
    ob.zero_grad()
    ce(b(x), y).backward()
    torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.1)
    ob.step()
    assert same_weights(a, b)


def test_bf16_mixed_runs_under_autocast_in_fit_and_the_range_test():
    from lrbs.range_test import lr_range_test

    x, y = data(n=64)
    dtypes = []

    def loss_fn(out, target):
        dtypes.append(out.dtype)
        return ce(out.float(), target)

    model = net()
    r = fit(
        model,
        (x, y),
        optimizer="adam",
        lr=0.02,
        batch_size=16,
        steps=30,
        loss_fn=loss_fn,
        precision="bf16-mixed",
    )
    assert r.status == "completed" and r.config["precision"] == "bf16-mixed"
    assert set(dtypes) == {torch.bfloat16}
    assert r.history["loss"][-5:].mean() < r.history["loss"][:5].mean()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = [p.detach().clone() for p in model.parameters()]
    res = lr_range_test(model, opt, loss_fn, (x, y), batch_size=16, num_iter=12, precision="bf16-mixed")
    assert np.isfinite(res.losses).all() and res.settings["precision"] == "bf16-mixed"
    assert all(torch.equal(a, b) for a, b in zip(state, model.parameters()))
    _, r = train_mod.train_config(
        {"model": "mlp", "model_opts": {"width": 8}, "dataset": "blobs", "batch_size": 32, "steps": 3},
        precision="bf16-mixed",
    )
    assert r.config["precision"] == "bf16-mixed" and "precision" not in r.config["train_config"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA GPU")
def test_16_mixed_on_cuda():
    x, y = data(n=64)
    model = net().cuda()
    r = fit(
        model, (x.cuda(), y.cuda()), optimizer="adam", lr=0.02, batch_size=16, steps=30, precision="16-mixed"
    )
    assert r.status == "completed" and r.history["applied"].sum() >= 25
    assert r.history["loss"][-5:].mean() < r.history["loss"][:5].mean()


def test_bad_inputs():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ConfigError, match=r"precision='fp8' is not allowed: must be one of \['32', 'bf16-mixed'"
    ):
        TrainStep(model, opt, precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(
            ConfigError, match=r"precision='16-mixed' is not allowed on device cpu: .*CUDA GPU"
        ):
            TrainStep(model, opt, precision="16-mixed")
        with pytest.raises(ConfigError, match=r"precision='16-mixed' is not allowed on device cpu"):
            fit(model, data(), lr=0.1, batch_size=8, steps=1, precision="16-mixed")
    with pytest.raises(ConfigError, match=r"clip_grad_norm=0 is not allowed: must be a finite number > 0"):
        TrainStep(model, opt, clip_grad_norm=0)
    with pytest.raises(LrbsTypeError, match=r"optimizer=str is not allowed"):
        TrainStep(model, "sgd")

    class ForeignSAM(torch.optim.SGD):
        def first_step(self, zero_grad=False): ...

        def second_step(self, zero_grad=False): ...

    with pytest.raises(ConfigError, match=r"optimizer=ForeignSAM is not allowed with a GradScaler"):
        TrainStep(model, ForeignSAM(model.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu"))
    assert check_precision(32, "cpu") == "32"
