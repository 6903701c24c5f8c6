"""Gradient noise scale, tracker, critical batch: against closed forms and naive per-example loops."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lrbs.errors import ConfigError, LrbsTypeError
from lrbs.noise_scale import (
    NoiseScaleTracker,
    critical_batch,
    noise_scale,
    steps_to_target,
)
from lrbs.objective import Objective
from lrbs.train import Callback, fit


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


# ----------------------------------------------------------------------------------------- linear regression
@pytest.fixture(scope="module")
def regression():
    """x ~ N(0, I_d), y = w*.x + eps (eps ~ N(0, s^2)), loss 1/2 (w.x - y)^2 at w = w* + delta, |delta| = 1.

    Per-example gradient g = x (x.delta - eps): G = delta, E[g g'] = 2 delta delta' + (|delta|^2 + s^2) I
    (Isserlis), so Sigma = delta delta' + (|delta|^2 + s^2) I, tr Sigma = (d + 1)|delta|^2 + d s^2 and
    B_simple = (d + 1) + d s^2 / |delta|^2.
    """
    d, n, s = 10, 200_000, 1.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w_star + s * torch.randn(n, generator=g, dtype=torch.float64)
    delta = torch.randn(d, generator=g, dtype=torch.float64)
    delta /= delta.norm()
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    truth = {"grad_sq": 1.0, "trace_sigma": (d + 1) + d * s**2, "b_simple": (d + 1) + d * s**2}
    return model, x, y, truth


def test_regression_closed_form_matches_the_data(regression):
    # the derivation above, checked against the exact per-example gradients of the 200k samples
    model, x, y, truth = regression
    r = x @ model.weight.detach()[0] - y
    per_example = x * r[:, None]
    G = per_example.mean(0)
    trace = float(((per_example - G) ** 2).sum(1).mean())
    assert float(G @ G) == pytest.approx(truth["grad_sq"], rel=0.02)
    assert trace == pytest.approx(truth["trace_sigma"], rel=0.02)


def test_regression_b_simple_and_coverage(regression, untouched):
    model, x, y, truth = regression
    check = untouched(model)
    obj = Objective(model, _mse, (x, y))
    reps = [noise_scale(obj, small_batch=8, big_batch=256, num_estimates=30, seed=s) for s in range(50)]
    check()
    b = np.array([r.b_simple for r in reps])
    assert abs(b.mean() / truth["b_simple"] - 1) < 0.03  # spec: within 10 %
    assert abs(np.mean([r.grad_sq for r in reps]) - truth["grad_sq"]) < 0.03
    assert abs(np.mean([r.trace_sigma for r in reps]) / truth["trace_sigma"] - 1) < 0.03
    covered = sum(r.ci_low <= truth["b_simple"] <= r.ci_high for r in reps)
    assert covered >= 45  # >= 90 % of the seeded repetitions
    assert all(r.ci_low < r.b_simple < r.ci_high for r in reps)


# ----------------------------------------------------------------------------------------- finite data, exact
def _per_example_grads(model, loss_fn, x, y) -> torch.Tensor:
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def small_problem():
    from lrbs.data import load_dataset
    from lrbs.models import build_model

    ds = load_dataset("blobs", n_train=96, n_test=8, num_features=5, num_classes=3, seed=1)
    model = build_model("mlp", dataset=ds, depth=2, width=6, seed=0).double()
    x, y = ds.train.x.double(), ds.train.y
    ref = build_model("mlp", dataset=ds, depth=2, width=6, seed=0).double()
    grads = _per_example_grads(ref, torch.nn.functional.cross_entropy, x, y)
    G = grads.mean(0)
    truth = {"grad_sq": float(G @ G), "trace_sigma": float(((grads - G) ** 2).sum(1).mean())}
    return model, (x, y), grads, truth


def test_finite_population_estimates_are_unbiased(small_problem, untouched):
    model, data, _, truth = small_problem
    check = untouched(model)
    res = noise_scale(model, data, small_batch=4, big_batch=32, num_estimates=3000, seed=0)
    check()
    for name in ("grad_sq", "trace_sigma"):
        est = getattr(res, f"{name}_estimates")
        se = est.std(ddof=1) / math.sqrt(len(est))
        assert abs(est.mean() - truth[name]) < 4 * se, name
    assert res.b_simple == pytest.approx(truth["trace_sigma"] / truth["grad_sq"], rel=0.1)


def test_one_draw_matches_the_paper_formula_by_hand(small_problem):
    model, (x, y), grads, _ = small_problem
    bs, bb, seed = 4, 32, 3
    res = noise_scale(
        model, (x, y), small_batch=bs, big_batch=bb, num_estimates=2, seed=seed, finite_population=False
    )
    idx = np.random.default_rng(seed).choice(len(y), size=bb, replace=False)
    g = grads[torch.from_numpy(idx)]
    subs = g.reshape(bb // bs, bs, -1).mean(1)
    small_sq = float((subs**2).sum(1).mean())
    big_sq = float((g.mean(0) ** 2).sum())
    assert res.small_sq_estimates[0] == pytest.approx(small_sq, rel=1e-10)
    assert res.big_sq_estimates[0] == pytest.approx(big_sq, rel=1e-10)
    assert res.grad_sq_estimates[0] == pytest.approx((bb * big_sq - bs * small_sq) / (bb - bs), rel=1e-9)
    assert res.trace_sigma_estimates[0] == pytest.approx((small_sq - big_sq) / (1 / bs - 1 / bb), rel=1e-9)
    b_simple = res.trace_sigma_estimates.mean() / res.grad_sq_estimates.mean()  # ratio of means
    assert res.b_simple == pytest.approx(b_simple, rel=1e-12)


def test_vmap_and_loop_agree(small_problem):
    model, data, _, _ = small_problem
    a = noise_scale(model, data, small_batch=8, big_batch=32, num_estimates=3, method="vmap")
    b = noise_scale(model, data, small_batch=8, big_batch=32, num_estimates=3, method="loop")
    assert (a.method, b.method) == ("vmap", "loop")
    np.testing.assert_allclose(a.small_sq_estimates, b.small_sq_estimates, rtol=1e-10)
    np.testing.assert_allclose(a.big_sq_estimates, b.big_sq_estimates, rtol=1e-10)


def test_batchnorm_model_untouched_and_result_records_settings(blobs, untouched):
    from lrbs.models import build_model

    model = build_model("mlp", dataset=blobs, depth=2, width=8, batchnorm=True, seed=0)
    model.train()
    check = untouched(model)
    res = noise_scale(model, blobs, small_batch=8, big_batch=64, num_estimates=3, num_bootstrap=50)
    check()
    assert res.settings["bn"] == "eval" and res.settings["has_bn"] is True
    d = json.loads(json.dumps(res.to_dict()))
    assert d["small_batch"] == 8 and len(d["grad_sq_estimates"]) == 3
    assert "B_simple" in str(res)
    # same seed, same numbers
    again = noise_scale(model, blobs, small_batch=8, big_batch=64, num_estimates=3, num_bootstrap=50)
    np.testing.assert_array_equal(res.grad_sq_estimates, again.grad_sq_estimates)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"small_batch": 64, "big_batch": 64}, ConfigError, r"small_batch=64 .*must be < big_batch"),
        ({"small_batch": 8, "big_batch": 256}, ConfigError, r"big_batch=256 .*larger than the data \(128"),
        ({"small_batch": 8, "big_batch": 60}, ConfigError, r"big_batch=60 .*multiple"),
        ({"small_batch": 8, "big_batch": 64, "num_estimates": 1}, ConfigError, r"num_estimates=1 .*>= 2"),
        ({"small_batch": 8, "big_batch": 64, "confidence": 1.0}, ConfigError, r"confidence=1.0"),
        ({"small_batch": 8, "big_batch": 64, "method": "vamp"}, ConfigError, r"Did you mean 'vmap'"),
        ({"small_batch": 8.5, "big_batch": 64}, LrbsTypeError, r"small_batch=8.5 .*integer"),
        ({"small_batch": 0, "big_batch": 64}, ConfigError, r"small_batch=0"),
    ],
)
def test_bad_arguments(blobs, kwargs, error, match):
    from lrbs.models import build_model

    model = build_model("mlp", dataset=blobs, depth=2, width=8, seed=0)
    with pytest.raises(error, match=match):
        noise_scale(model, blobs, **kwargs)


def test_bad_sources(blobs):
    from lrbs.models import build_model

    model = build_model("mlp", dataset=blobs, depth=2, width=8, seed=0)
    obj = Objective(model, data=blobs)
    with pytest.raises(ConfigError, match="data is given twice"):
        noise_scale(obj, blobs, small_batch=8, big_batch=64)
    with pytest.raises(ConfigError, match="data=None is not allowed with a model"):
        noise_scale(model, small_batch=8, big_batch=64)
    with pytest.raises(LrbsTypeError, match="obj_or_model=str"):
        noise_scale("mlp", blobs, small_batch=8, big_batch=64)
    bad = obj.theta()
    bad[0] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        noise_scale(obj, small_batch=8, big_batch=64, params=bad)


# ----------------------------------------------------------------------------------------- tracker
def test_noise_scale_grows_during_training_on_mnist1d(mnist1d, untouched):
    """McCandlish et al.: B_simple grows as the loss falls (here ~240 at init, ~360 after 600 SGD steps)."""
    from lrbs.models import build_model

    model = build_model("mlp", dataset=mnist1d, seed=0)
    kw = {"small_batch": 16, "big_batch": 512, "num_estimates": 10}
    check = untouched(model)
    init = noise_scale(model, mnist1d, **kw)
    check()
    tracker = NoiseScaleTracker(every=2, beta=0.9)
    res = fit(
        model,
        mnist1d,
        optimizer="sgd",
        lr=0.1,
        batch_size=128,
        steps=600,
        eval_every=200,
        callbacks=[tracker],
    )
    end = noise_scale(model, mnist1d, **kw)
    assert res.evals[-1]["train_loss"] < 0.6
    assert end.b_simple > init.b_simple and end.ci_low > init.ci_high
    # the tracker: logged at every eval, and the end exceeds its first measurement (step 0)
    assert [("b_simple" in e) for e in res.evals] == [True] * len(res.evals)
    assert res.evals[-1]["b_simple"] > tracker.history[0].b_simple
    assert tracker.history[-1].step == 598 and len(tracker.raw) == 300


def test_tracker_leaves_training_unchanged_and_estimates_at_fixed_weights(small_problem):
    from lrbs.data import load_dataset
    from lrbs.models import build_model

    model, (x, y), grads, truth = small_problem
    # lr=0: the weights stay put, so the mean of the single-step estimates must match the exact values
    # (the batch is drawn without replacement from N=96: E|G_B|^2 = |G|^2 + c(B) tr S, c(B) = (N-B)/(B(N-1));
    # the tracker uses 1/B, so its expectations are known in closed form)
    tracker = NoiseScaleTracker(small_batch=4, every=1, beta=0.0)
    m = copy.deepcopy(model)
    fit(m, (x, y), lr=1e-12, momentum=0.0, batch_size=32, steps=300, callbacks=[tracker])
    raw = np.array(tracker.raw)
    n, bs, bb = 96, 4, 32

    def c(b):
        return (n - b) / (b * (n - 1))

    t, g2 = truth["trace_sigma"], truth["grad_sq"]
    e_small, e_big = g2 + c(bs) * t, g2 + c(bb) * t
    exp_trace = (e_small - e_big) / (1 / bs - 1 / bb)
    exp_grad = e_big - exp_trace / bb
    for col, expected in ((1, exp_grad), (2, exp_trace)):
        se = raw[:, col].std(ddof=1) / math.sqrt(len(raw))
        assert abs(raw[:, col].mean() - expected) < 4 * se
    # a run with the tracker is identical to one without
    ds = load_dataset("blobs", n_train=128, n_test=16, num_features=6, num_classes=3, seed=0)
    a = build_model("mlp", dataset=ds, depth=2, width=8, seed=0)
    b = build_model("mlp", dataset=ds, depth=2, width=8, seed=0)
    ra = fit(a, ds, lr=0.1, batch_size=32, steps=20, callbacks=[NoiseScaleTracker(every=3)])
    rb = fit(b, ds, lr=0.1, batch_size=32, steps=20)
    np.testing.assert_array_equal(ra.history["loss"], rb.history["loss"])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_tracker_default_split_errors_and_to_dict(blobs):
    from lrbs.models import build_model

    model = build_model("mlp", dataset=blobs, depth=2, width=8, seed=0)
    tr = NoiseScaleTracker(every=5)
    assert math.isnan(tr.b_simple)
    fit(model, blobs, lr=0.05, batch_size=32, steps=10, callbacks=[tr])
    assert [p.step for p in tr.history] == [0, 5]
    assert json.loads(json.dumps(tr.to_dict()))["every"] == 5
    with pytest.raises(ConfigError, match=r"small_batch=32 .*batch of 32 .*at least 2 micro-batches"):
        fit(model, blobs, lr=0.05, batch_size=32, steps=2, callbacks=[NoiseScaleTracker(small_batch=32)])
    with pytest.raises(ConfigError, match=r"beta=1"):
        NoiseScaleTracker(beta=1)
    with pytest.raises(ConfigError, match=r"every=0"):
        NoiseScaleTracker(every=0)
    assert isinstance(tr, Callback)


# ----------------------------------------------------------------------------------------- critical batch
def test_critical_batch_recovers_the_exact_hyperbola():
    s_min, e_min = 250.0, 64_000.0  # B_crit = 256
    points = [(b, s_min + e_min / b) for b in (8, 32, 128, 512, 2048)]
    cb = critical_batch(points)
    assert cb.s_min == pytest.approx(s_min, rel=0.01)
    assert cb.e_min == pytest.approx(e_min, rel=0.01)
    assert cb.b_crit == pytest.approx(256.0, rel=0.01)
    # the defining relation (S/S_min - 1)(E/E_min - 1) = 1 at every point
    for b, s in points:
        assert (s / cb.s_min - 1) * (b * s / cb.e_min - 1) == pytest.approx(1.0, rel=1e-4)
    assert cb.rms_log_residual < 1e-6
    assert cb.predict_steps(128) == pytest.approx(s_min + e_min / 128, rel=1e-4)
    assert json.loads(json.dumps(cb.to_dict()))["b_crit"] == pytest.approx(256.0, rel=0.01)


def test_critical_batch_with_noise_dict_input_and_skipped_runs():
    rng = np.random.default_rng(0)
    sweep = {
        b: 100 * (1 + 64 / b) * math.exp(rng.normal(0, 0.03)) for b in (4, 8, 16, 32, 64, 128, 256, 1024)
    }
    sweep[4096] = None  # never reached the target
    cb = critical_batch(sweep)
    assert cb.b_crit == pytest.approx(64, rel=0.15)
    assert cb.skipped == (4096.0,)
    assert 0.005 < cb.rms_log_residual < 0.06


@pytest.mark.parametrize(
    ("results", "error", "match"),
    [
        ([(32, 100)], ConfigError, "at least 2 distinct batch sizes"),
        ([(32, 100), (32, 90)], ConfigError, "at least 2 distinct batch sizes"),
        ([(32, 100), (64, None)], ConfigError, r"skipped: \[64"),
        ([(0, 100), (64, 50)], ConfigError, r"results\[0\] batch_size=0"),
        ([(32, -1), (64, 50)], ConfigError, r"results\[0\] steps=-1"),
        ("32:100", LrbsTypeError, "list of \\(batch_size, steps\\) pairs"),
        ([(32, 100, 1)], LrbsTypeError, r"results\[0\]=\(32, 100, 1\)"),
    ],
)
def test_critical_batch_errors(results, error, match):
    with pytest.raises(error, match=match):
        critical_batch(results)


def test_steps_to_target_reads_evals_and_smoothed_steps():
    evals = [
        {"step": 10, "train_loss": 2.0, "test_acc": 0.3},
        {"step": 20, "train_loss": 1.0, "test_acc": 0.8},
        {"step": 30, "train_loss": 0.5, "test_acc": 0.9},
    ]
    assert steps_to_target(evals, 1.0) == 20
    assert steps_to_target(evals, 0.85, metric="test_acc") == 30
    assert steps_to_target(evals, 0.1) is None
    # per-step losses: l_t = 1 / (1 + t); with beta=0 the first t with l_t <= 0.1 is 9
    hist = {"step": np.arange(100), "loss": 1.0 / (1.0 + np.arange(100))}
    assert steps_to_target(hist, 0.1, beta=0.0) == 9
    # with beta: the naive debiased EMA, computed here by hand
    m, expected = 0.0, None
    for t in range(100):
        m = 0.9 * m + 0.1 * hist["loss"][t]
        if m / (1 - 0.9 ** (t + 1)) <= 0.1:
            expected = t
            break
    assert steps_to_target(hist, 0.1) == expected and expected > 9

    fake = SimpleNamespace(
        history=hist, evals=evals
    )  # a FitResult-like object: evals used when they hold the metric
    assert steps_to_target(fake, 1.0) == 20
    assert steps_to_target(fake, 0.1, source="steps", beta=0.0) == 9


def test_steps_to_target_errors():
    with pytest.raises(ConfigError, match="source='evals' is not allowed"):
        steps_to_target({"step": [0], "loss": [1.0]}, 0.5, source="evals")
    with pytest.raises(ConfigError, match="source='steps' is not allowed"):
        steps_to_target([{"step": 1, "train_loss": 1.0}], 0.5, source="steps")
    with pytest.raises(ConfigError, match="Did you mean 'steps'"):
        steps_to_target([], 0.5, source="step")
    with pytest.raises(LrbsTypeError, match="history=int"):
        steps_to_target(3, 0.5)


def test_sweep_to_critical_batch_end_to_end():
    """A small real sweep: S(B) to a loss target on a teacher problem, fitted; the fit is a decreasing S(B)."""
    from lrbs.data import load_dataset
    from lrbs.models import build_model

    ds = load_dataset("blobs", n_train=512, n_test=16, num_features=6, num_classes=3, seed=0)
    sweep = []
    for b in (4, 16, 64, 256):
        model = build_model("mlp", dataset=ds, depth=2, width=16, seed=0)
        res = fit(model, ds, optimizer="sgd", lr=0.05, momentum=0.9, batch_size=b, steps=400, eval_every=5)
        sweep.append((b, steps_to_target(res, 0.3)))
    cb = critical_batch(sweep)
    assert all(s is not None for _, s in sweep)
    assert [s for _, s in sweep] == sorted((s for _, s in sweep), reverse=True)
    assert 0 < cb.b_crit < 1e4 and cb.rms_log_residual < 0.3


# ----------------------------------------------------------------------------------------- CLI
def _cli(argv):
    import argparse

    from lrbs.cli import noise_scale as cmd

    parser = argparse.ArgumentParser(prog="lrbs")
    cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


BLOBS = [
    "--model",
    "mlp",
    "--model-opts",
    '{"depth": 2, "width": 8}',
    "--dataset",
    "blobs",
    "--dataset-opts",
    '{"n_train": 256, "n_test": 16, "num_features": 4, "num_classes": 3}',
]


def test_cli_prints_b_simple(capsys):
    code = _cli(
        [
            "noise-scale",
            *BLOBS,
            "--small-batch",
            "8",
            "--big-batch",
            "64",
            "--estimates",
            "4",
            "--train-steps",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "B_simple" in out and "|G|^2" in out and "tr(Sigma)" in out and "95% CI" in out


def test_cli_error_exit_status(capsys):
    from lrbs.cli import main

    code = main(["noise-scale", *BLOBS, "--small-batch", "64", "--big-batch", "64"])
    assert code == 2
    assert "small_batch=64" in capsys.readouterr().err
