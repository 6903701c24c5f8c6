"""LR range test: sweep, smoothing, stop rule, suggestions (against naive ports of fastai / closed forms),
the exact restore, repeats, the acceptance run on MNIST-1D, the CLI, and every error path."""

from __future__ import annotations

import argparse
import copy
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from lrbs.data import Split, load_dataset
from lrbs.errors import ConfigError, LrbsTypeError
from lrbs.models import build_model
from lrbs.range_test import (
    SUGGESTION_METHODS,
    RangeTestResult,
    RangeTestSweep,
    lr_range_test,
    smooth_losses,
    suggest_lr,
)
from lrbs.train import fit


# --------------------------------------------------------------------------- helpers and references
def small_mlp(ds, seed=0, **kw):
    return build_model("mlp", dataset=ds, depth=2, width=16, seed=seed, **kw)


def ref_smooth(losses, beta):
    """Closed form of the debiased EMA: s_i = (1-b) sum_k b^(i-k) L_k / (1 - b^(i+1)), float64."""
    L = np.asarray(losses, dtype=np.float64)
    out = []
    for i in range(len(L)):
        w = (1 - beta) * beta ** (i - np.arange(i + 1))
        out.append(float((w * L[: i + 1]).sum() / (1 - beta ** (i + 1))))
    return np.array(out)


def ref_valley(losses):
    """Naive O(n^2) loops as in fastai, with the reference's start = end - lds[end] (final lds)."""
    n = len(losses)
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
    end = max(range(n), key=lambda k: (lds[k], -k))
    start = end - lds[end]
    sec = (end - start) / 3
    return min(max(start + int(sec) + int(sec / 2), 0), n - 1)


def ref_slide(lrs, losses, lr_diff=15, thresh=0.005):
    """fastai's slide, negative indices and all."""
    g = np.gradient(np.asarray(losses))
    r_idx = -1
    l_idx = r_idx - lr_diff
    local = lrs[l_idx]
    while (l_idx >= -len(losses)) and (abs(g[r_idx] - g[l_idx]) > thresh):
        local = lrs[l_idx]
        r_idx -= 1
        l_idx -= 1
    return float(local)


def scaled_blobs(scale=100.0):
    ds = load_dataset("blobs", n_train=256, n_test=64, num_features=6, num_classes=3, seed=0)
    return Split(ds.train.x * scale, ds.train.y)


def opt_state_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif isinstance(x, dict):
            if not (isinstance(y, dict) and opt_state_equal(x, y)):
                return False
        elif isinstance(x, (list, tuple)):
            if len(x) != len(y) or not all(opt_state_equal({0: u}, {0: v}) for u, v in zip(x, y)):
                return False
        elif x != y:
            return False
    return True


# --------------------------------------------------------------------------- sweep and smoothing
@pytest.mark.parametrize("mode", ["exp", "linear"])
def test_sweep_follows_the_formula_and_keeps_group_ratios(blobs, mode, untouched):
    model = small_mlp(blobs)
    body = list(model.parameters())
    opt = torch.optim.SGD([{"params": body[:2], "lr": 0.2}, {"params": body[2:], "lr": 0.02}], lr=0.2)
    seen = []

    def loss_fn(out, y):  # called after the lrs are set, before the step
        seen.append([g["lr"] for g in opt.param_groups])
        return nn.functional.cross_entropy(out, y)

    check = untouched(model)
    n, a, b = 20, 1e-5, 1e-2
    res = lr_range_test(
        model, opt, loss_fn, blobs, start_lr=a, end_lr=b, num_iter=n, mode=mode, diverge_factor=None
    )
    check()
    i = np.arange(n)
    want = a * (b / a) ** (i / (n - 1)) if mode == "exp" else a + i / (n - 1) * (b - a)
    np.testing.assert_allclose(res.lrs, want, rtol=1e-13)
    assert res.lrs[0] == pytest.approx(a) and res.lrs[-1] == pytest.approx(b)
    seen = np.array(seen)
    np.testing.assert_allclose(seen[:, 0], want, rtol=1e-13)
    np.testing.assert_allclose(seen[:, 1], want * 0.1, rtol=1e-13)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.02]  # restored


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.98])
def test_smoothing_matches_closed_form(beta):
    losses = np.random.default_rng(0).uniform(0.5, 2.0, 60)
    np.testing.assert_allclose(smooth_losses(losses, beta), ref_smooth(losses, beta), rtol=1e-12)
    assert smooth_losses(losses, beta)[0] == pytest.approx(losses[0])  # no start-up bias


def test_recorded_losses_are_the_batch_losses_and_smoothed_is_their_ema(blobs):
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(blobs.train.x[i : i + 32], blobs.train.y[i : i + 32]) for i in range(0, 128, 32)]
    res = lr_range_test(model, opt, data=batches, start_lr=1e-3, end_lr=1.0, num_iter=12, diverge_factor=None)
    # independent replay in float64: plain SGD steps at the swept lrs, cycling the same batches
    ref = copy.deepcopy(model).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    want = []
    for i, lr in enumerate(res.lrs):
        x, y = batches[i % len(batches)]
        ref_opt.param_groups[0]["lr"] = float(lr)
        ref_opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(x.double()), y)
        loss.backward()
        ref_opt.step()
        want.append(loss.item())
    np.testing.assert_allclose(res.losses, want, rtol=2e-4)
    np.testing.assert_allclose(res.smoothed, ref_smooth(res.losses, 0.98), rtol=1e-12)


def test_accumulation_averages_the_micro_batches(blobs):
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(blobs.train.x[i : i + 16], blobs.train.y[i : i + 16]) for i in range(0, 64, 16)]
    res = lr_range_test(
        model, opt, data=batches, num_iter=10, accumulation_steps=2, start_lr=1e-6, end_lr=1e-5
    )
    with torch.no_grad():
        l0 = nn.functional.cross_entropy(model.double()(batches[0][0].double()), batches[0][1]).item()
        l1 = nn.functional.cross_entropy(model(batches[1][0].double()), batches[1][1]).item()
    model.float()
    assert res.losses[0] == pytest.approx((l0 + l1) / 2, rel=1e-5)


def test_validation_mode_records_the_full_validation_loss_after_the_step(blobs):
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(blobs.train.x[:32], blobs.train.y[:32])]
    res = lr_range_test(model, opt, data=batches, val_data=blobs.test, num_iter=10, start_lr=0.01, end_lr=0.1)
    ref = copy.deepcopy(model).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01)
    nn.functional.cross_entropy(ref(batches[0][0].double()), batches[0][1]).backward()
    ref_opt.step()
    with torch.no_grad():
        want = nn.functional.cross_entropy(ref(blobs.test.x.double()), blobs.test.y).item()
    assert res.losses[0] == pytest.approx(want, rel=1e-5)
    assert res.settings["validation"] is True


# --------------------------------------------------------------------------- stopping
def test_diverging_model_stops_early_with_finite_suggestions_below_the_stop(untouched):
    data = scaled_blobs(100.0)  # unnormalised inputs: a linear model diverges well below end_lr
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    check = untouched(model)
    res = lr_range_test(model, opt, data=data, start_lr=1e-7, end_lr=10.0, num_iter=100)
    check()
    assert res.stopped_early and res.diverged_at is not None and res.diverged_at < 99
    lr_stop = res.lrs[res.diverged_at]
    # the stop is the first point where the smoothed loss passes 4x its running minimum (or is not finite)
    s = ref_smooth(res.losses, 0.98)
    first = next(i for i in range(len(s)) if not np.isfinite(s[i]) or s[i] > 4 * np.min(s[: i + 1]))
    assert first == res.diverged_at
    for m in SUGGESTION_METHODS:
        lr, idx = res.suggest(m)
        assert math.isfinite(lr) and 0 < lr < lr_stop, m
        assert 0 <= idx < len(res.lrs)
    rec, why = res.recommended()
    assert rec < lr_stop and why


def test_nan_at_the_first_iteration_returns_a_result_and_suggest_explains(blobs, untouched):
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    check = untouched(model)
    res = lr_range_test(model, opt, lambda out, y: out.sum() * float("nan"), blobs, num_iter=20)
    check()
    assert len(res.lrs) == 1 and res.diverged_at == 0 and res.stop_reason == "non-finite"
    with pytest.raises(ConfigError, match=r"diverged too early.*Lower start_lr or end_lr, or raise num_iter"):
        res.suggest()
    with pytest.raises(ConfigError, match="diverged too early"):
        res.recommended()
    d = res.to_dict()
    assert d["suggestions"] is None and "diverged too early" in d["error"]
    json.dumps(d, allow_nan=False)


# --------------------------------------------------------------------------- suggestions vs references
def curve(n=100, seed=0):
    """A typical range-test curve on an exp grid: plateau, descent, minimum, blow-up, with noise."""
    lrs = np.geomspace(1e-6, 10, n)
    x = np.log10(lrs)
    s = 2.3 - 1.5 / (1 + np.exp(-(x + 2.5) * 2.0)) + 0.6 * np.exp(2.0 * (x - 0.3))
    return lrs, s + np.random.default_rng(seed).normal(0, 0.01, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_suggestions_match_naive_references(seed):
    lrs, s = curve(seed=seed)
    lw, sw = lrs[10:-5], s[10:-5]
    assert suggest_lr(lrs, s, "valley")[0] == lw[ref_valley(list(sw))]
    steep = np.argmin(np.gradient(sw, np.log(lw)))
    assert suggest_lr(lrs, s, "steepest")[0] == lw[steep]
    assert suggest_lr(lrs, s, "minimum")[0] == pytest.approx(lw[np.argmin(sw)] / 10, rel=1e-15)
    assert suggest_lr(lrs, s, "slide")[0] == ref_slide(lw, sw)
    lr, idx = suggest_lr(lrs, s, "minimum")
    assert abs(math.log(lrs[idx]) - math.log(lr)) <= 0.5 * math.log(lrs[1] / lrs[0]) + 1e-12


def test_steepest_is_taken_in_log_lr_also_on_a_linear_sweep():
    lrs = np.linspace(0.01, 1.0, 60)
    s = np.exp(-3 * (lrs - 0.3) ** 2) * 0 + 1.0 / (1.0 + (lrs / 0.2) ** 3)  # falls fastest near lr = 0.2
    lw, sw = lrs[6:-5], s[6:-5]
    want = lw[np.argmin(np.gradient(sw, np.log(lw)))]
    by_index = lw[np.argmin(np.gradient(sw))]
    assert want != by_index  # the test can tell the two definitions apart
    assert suggest_lr(lrs, s, "steepest", skip_start=6)[0] == want


def test_valley_on_a_clean_curve_is_mid_descent():
    lrs = np.geomspace(1e-4, 1, 40)
    s = np.concatenate([np.linspace(2, 1, 30), np.linspace(1.1, 3, 10)])  # strictly falls for 30 points
    lr, idx = suggest_lr(lrs, s, "valley", skip_start=0, skip_end=0)
    # lds[end=29] = 30, start = -1, sec = 10: idx = -1 + 10 + 5 = 14
    assert idx == 14 and lr == lrs[14]


def make_result(curves, num_iter=100, diverged=None):
    sweeps = []
    for r, (lrs, s) in enumerate(curves):
        d = diverged[r] if diverged else None
        sweeps.append(RangeTestSweep(lrs, s, s, d is not None, d, "diverged" if d is not None else None, r))
    f = sweeps[0]
    return RangeTestResult(
        f.lrs,
        f.losses,
        f.smoothed,
        f.stopped_early,
        f.diverged_at,
        f.stop_reason,
        {"num_iter": num_iter},
        tuple(sweeps),
    )


def test_recommendation_is_valley_when_suggestions_agree_else_their_median():
    lrs = np.geomspace(1e-6, 10, 100)
    x = np.log10(lrs)
    agree = make_result([(lrs, 2.3 - 1.5 / (1 + np.exp(-(x + 3))) + 3 * np.exp(x + 1.5))])
    s = agree.suggestions()
    assert s.agree and s.ratio <= 3 and s.recommended == s.lrs["valley"] and s.reason.startswith("valley")
    lrs2, s2 = curve(seed=0)
    dis = make_result([(lrs2, s2)]).suggestions()
    vals = sorted(dis.lrs.values())
    assert not dis.agree and dis.ratio == pytest.approx(vals[-1] / vals[0])
    assert dis.recommended == pytest.approx(math.sqrt(vals[1] * vals[2]))
    assert "median" in dis.reason and "disagree" in dis.reason


def test_recommendation_is_capped_below_the_lowest_divergence_over_repeats():
    lrs = np.geomspace(1e-6, 10, 100)
    a, b = curve(seed=0)[1], curve(seed=1)[1]
    res = make_result([(lrs, a), (lrs, b)], diverged=[None, 40])  # the 2nd sweep "diverged" at lrs[40]
    rec, why = res.recommended()
    assert rec < lrs[40] and "capped" in why


def test_repeats_give_a_median_and_a_spread(blobs, untouched):
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    check = untouched(model)
    res = lr_range_test(
        model, opt, data=blobs, num_iter=40, start_lr=1e-4, end_lr=30, repeats=3, batch_size=16
    )
    check()
    assert len(res.sweeps) == 3 and res.settings["repeats"] == 3
    assert not np.array_equal(res.sweeps[0].losses[:5], res.sweeps[1].losses[:5])  # other data orders
    # every sweep starts from the same point: the first loss of sweep r is the loss of its first batch at init
    sug = res.suggestions()
    for m in SUGGESTION_METHODS:
        per = [suggest_lr(sw.lrs, sw.smoothed, m, skip_start=4)[0] for sw in res.sweeps]
        sp = sug.spread[m]
        assert sp["values"] == per and sp["median"] == sorted(per)[1] == sug.lrs[m]
        assert sp["min"] == min(per) and sp["max"] == max(per)
        assert sp["geo_sd"] == pytest.approx(math.exp(np.std(np.log(per), ddof=1)))
    # the same seed reproduces the sweeps exactly
    res2 = lr_range_test(
        model, opt, data=blobs, num_iter=40, start_lr=1e-4, end_lr=30, repeats=3, batch_size=16
    )
    for s1, s2 in zip(res.sweeps, res2.sweeps):
        np.testing.assert_array_equal(s1.losses, s2.losses)


def test_lr_bounds_follow_the_documented_rule():
    lrs = np.geomspace(1e-5, 1, 80)
    x = np.log10(lrs)
    s = 2 - 1 / (1 + np.exp(-3 * (x + 2.5)))  # sigmoid descent centred at 10^-2.5, no noise
    res = make_result([(lrs, s)], num_iter=80)
    base, top = res.lr_bounds()
    lw, sw = lrs[8:-5], s[8:-5]
    d = sw[0] - sw.min()
    assert base == lw[np.argmax(sw <= sw[0] - 0.1 * d)]
    assert top == lw[np.argmax(sw <= sw.min() + 0.1 * d)]
    assert base < 10**-2.5 < top
    flat = make_result([(lrs, 1 + 0 * x)], num_iter=80)
    with pytest.raises(ConfigError, match="never fell below"):
        flat.lr_bounds()


# --------------------------------------------------------------------------- restore
def test_restore_is_bit_exact_for_model_optimizer_and_random_states(blobs, untouched):
    model = build_model("mlp", dataset=blobs, depth=3, width=16, batchnorm=True, seed=1)
    model.add_module("drop", nn.Dropout(0.2))  # randomness inside the model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(3):  # non-trivial optimizer state and gradients
        opt.zero_grad()
        nn.functional.cross_entropy(model(blobs.train.x[:32]), blobs.train.y[:32]).backward()
        opt.step()
    model.eval()
    model.body[0].train()  # mixed training flags
    before = copy.deepcopy(opt.state_dict())
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    check = untouched(model)
    res = lr_range_test(model, opt, data=blobs, num_iter=30, start_lr=1e-4, end_lr=1.0, repeats=2)
    check()
    assert len(res.lrs) > 0
    assert opt_state_equal(opt.state_dict(), before)
    assert torch.equal(torch.get_rng_state(), rng[0])
    np_now = np.random.get_state()
    assert np_now[0] == rng[1][0] and np.array_equal(np_now[1], rng[1][1]) and np_now[2:] == rng[1][2:]
    assert random.getstate() == rng[2]


def test_restore_also_happens_when_the_sweep_raises(blobs, untouched):
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    check = untouched(model)
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        lr_range_test(model, opt, loss_fn, blobs, num_iter=20, start_lr=0.1, end_lr=10)
    check()
    assert opt.state_dict()["state"] == {}


def test_restore_false_leaves_the_model_trained(blobs):
    model = small_mlp(blobs)
    w0 = model.body[1].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lr_range_test(model, opt, data=blobs, num_iter=10, start_lr=1e-3, end_lr=1e-2, restore=False)
    assert not torch.equal(model.body[1].weight, w0)


def test_fit_after_range_test_is_identical_to_fit_alone(blobs):
    def run(with_range_test):
        model = small_mlp(blobs, seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if with_range_test:
            lr_range_test(model, opt, data=blobs, num_iter=25, start_lr=1e-4, end_lr=10)
        return fit(model, blobs, optimizer=opt, lr=0.05, batch_size=32, steps=30, eval_every=30)

    a, b = run(False), run(True)
    for k in a.history:
        np.testing.assert_array_equal(a.history[k], b.history[k])
    assert a.final == b.final


def test_dataloader_is_cycled_and_its_generator_restored(blobs, untouched):
    g = torch.Generator().manual_seed(5)
    loader = torch.utils.data.DataLoader(blobs.train, batch_size=64, shuffle=True, generator=g)  # 2 batches
    state = g.get_state()
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    check = untouched(model)
    res = lr_range_test(model, opt, data=loader, num_iter=15, start_lr=1e-5, end_lr=1e-3)
    check()
    assert len(res.lrs) == 15 and res.settings["batch_size"] == 64
    assert torch.equal(g.get_state(), state)


def test_sam_optimizer_runs_and_is_restored(blobs, untouched):
    from lrbs.optim import get_optimizer

    model = build_model("mlp", dataset=blobs, depth=2, width=8, batchnorm=True)
    opt = get_optimizer("sam", model.parameters(), lr=0.1)
    check = untouched(model)
    res = lr_range_test(model, opt, data=blobs, num_iter=12, start_lr=1e-4, end_lr=1e-1)
    check()
    assert np.isfinite(res.losses).all()


# --------------------------------------------------------------------------- acceptance on MNIST-1D
def test_recommended_lr_trains_cnn1d_on_mnist1d(mnist1d, untouched):
    model = build_model("cnn1d", dataset=mnist1d, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    check = untouched(model)
    res = lr_range_test(model, opt, data=mnist1d, batch_size=100, num_iter=100)
    check()
    lr, why = res.recommended()
    if res.diverged_at is not None:
        assert lr < res.lrs[res.diverged_at]
    assert 1e-3 < lr < 10 and why
    out = fit(model, mnist1d, optimizer=opt, lr=lr, batch_size=100, steps=2000, eval_every=2000)
    assert out.status == "completed"
    assert out.final["test_acc"] >= 0.85


# --------------------------------------------------------------------------- results: dict and plot
def test_to_dict_is_json_and_plot_draws(blobs, tmp_path):
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = lr_range_test(model, opt, data=blobs, num_iter=40, start_lr=1e-4, end_lr=100)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert len(d["lrs"]) == len(res.lrs) and d["settings"]["num_iter"] == 40
    assert d["suggestions"]["recommended"] == pytest.approx(res.recommended()[0])
    ax = res.plot()
    assert ax.get_xscale() == "log" and len(ax.lines) >= 2
    assert any(t.get_text().startswith("valley") for t in ax.get_legend().get_texts())
    ax.figure.savefig(tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 0


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        (
            {"start_lr": 1.0, "end_lr": 0.1},
            ConfigError,
            r"start_lr=1.0 and end_lr=0.1 .*start_lr must be < end_lr",
        ),
        ({"start_lr": 0.0}, ConfigError, r"start_lr=0.0 is not allowed: must be a finite number > 0"),
        ({"end_lr": float("inf")}, ConfigError, r"end_lr=inf is not allowed: must be a finite number"),
        ({"start_lr": float("nan")}, ConfigError, r"start_lr=nan is not allowed"),
        ({"num_iter": 5}, ConfigError, r"num_iter=5 is not allowed: must be an integer >= 10"),
        ({"mode": "cos"}, ConfigError, r"mode='cos' is not allowed: must be one of \['exp', 'linear'\]"),
        (
            {"smoothing": 1.0},
            ConfigError,
            r"smoothing=1.0 is not allowed: must be a finite number >= 0 and < 1",
        ),
        ({"smoothing": -0.1}, ConfigError, r"smoothing=-0.1 is not allowed"),
        (
            {"diverge_factor": 1.0},
            ConfigError,
            r"diverge_factor=1.0 is not allowed: must be a finite number > 1",
        ),
        (
            {"accumulation_steps": 0},
            ConfigError,
            r"accumulation_steps=0 is not allowed: must be an integer >= 1",
        ),
        ({"repeats": 0}, ConfigError, r"repeats=0 is not allowed: must be an integer >= 1"),
        ({"batch_size": 10_000}, ConfigError, r"batch_size=10000 is not allowed: must be <= 128"),
        ({"restore": "yes"}, LrbsTypeError, r"restore='yes' is not allowed: must be True or False"),
    ],
)
def test_bad_arguments(blobs, kw, err, match, untouched):
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    check = untouched(model)
    with pytest.raises(err, match=match):
        lr_range_test(model, opt, data=blobs, **kw)
    check()


def test_bad_model_optimizer_and_data(blobs):
    model = small_mlp(blobs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        LrbsTypeError, match=r"optimizer='sgd' is not allowed: must be a torch.optim.Optimizer"
    ):
        lr_range_test(model, "sgd", data=blobs)
    with pytest.raises(LrbsTypeError, match=r"model=str is not allowed: must be a torch.nn.Module"):
        lr_range_test("mlp", opt, data=blobs)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(
        ConfigError, match=r"optimizer param group 0 holds parameters that are not the model's"
    ):
        lr_range_test(model, other, data=blobs)
    with pytest.raises(ConfigError, match=r"data=None is not allowed"):
        lr_range_test(model, opt)
    with pytest.raises(LrbsTypeError, match=r"data=int is not allowed: give a DataLoader"):
        lr_range_test(model, opt, data=3)
    empty = torch.utils.data.DataLoader(Split(blobs.train.x[:0], blobs.train.y[:0]), batch_size=4)
    with pytest.raises(ConfigError, match=r"data is empty: the DataLoader has no batches"):
        lr_range_test(model, opt, data=empty)
    with pytest.raises(ConfigError, match=r"data is empty: the list of batches has no batches"):
        lr_range_test(model, opt, data=[])
    with pytest.raises(ConfigError, match=r"data is empty: it has 0 samples"):
        lr_range_test(model, opt, data=(blobs.train.x[:0], blobs.train.y[:0]))
    loader = torch.utils.data.DataLoader(blobs.train, batch_size=32)
    with pytest.raises(ConfigError, match=r"batch_size=16 is not allowed with a DataLoader of batch_size=32"):
        lr_range_test(model, opt, data=loader, batch_size=16)


def test_bad_suggestion_requests():
    lrs, s = curve()
    with pytest.raises(ConfigError, match=r"method='valey' is not allowed: .*Did you mean 'valley'\?"):
        suggest_lr(lrs, s, "valey")
    with pytest.raises(ConfigError, match=r"method='steep' is not allowed: .*Did you mean 'steepest'\?"):
        make_result([(lrs, s)]).suggest("steep")
    with pytest.raises(ConfigError, match=r"must be 1-D of the same length"):
        suggest_lr(lrs, s[:-1])
    with pytest.raises(ConfigError, match=r"recorded only 5 finite points .*need >= 10"):
        suggest_lr(lrs[:20], s[:20])
    s_nan = s.copy()
    s_nan[18:] = np.nan
    with pytest.raises(ConfigError, match=r"recorded only 8 finite points"):
        make_result([(lrs, s_nan)]).lr_bounds()


# --------------------------------------------------------------------------- CLI
def cli_args(*argv):
    from lrbs.cli import find_lr

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    find_lr.add_parser(sub)
    return parser.parse_args(["find-lr", *argv])


def test_cli_find_lr_prints_the_table_and_recommendation(tmp_path, capsys):
    from lrbs.cli import find_lr
    from lrbs.store import Store

    args = cli_args(
        "--model", "mlp", "--model-opts", '{"depth": 2, "width": 16}', "--dataset", "blobs",
        "--num-iter", "40", "--start-lr", "1e-4", "--end-lr", "100", "--batch-size", "32", "--repeats", "2",
        "--plot", str(tmp_path / "lr.png"), "--store", str(tmp_path / "lab.sqlite"),
    )  # fmt: skip
    assert find_lr.run(args) == 0
    out = capsys.readouterr().out
    for word in ("valley", "steepest", "minimum", "slide", "recommended lr", "because", "geo sd"):
        assert word in out
    assert (tmp_path / "lr.png").stat().st_size > 0
    with Store(tmp_path / "lab.sqlite") as st:
        runs = st.runs(kind="range_test", status="completed")
        assert len(runs) == 1


def test_cli_find_lr_errors(capsys):
    from lrbs.cli import find_lr, main

    with pytest.raises(ConfigError, match=r"num_iter=3 is not allowed"):
        find_lr.run(cli_args("--model", "mlp", "--dataset", "blobs", "--num-iter", "3"))
    assert (
        main(["find-lr", "--model", "mlp", "--dataset", "blobs", "--start-lr", "1", "--end-lr", "0.1"]) == 2
    )
    assert "lrbs: error: start_lr=1.0 and end_lr=0.1" in capsys.readouterr().err
