"""Sharpness measures against closed forms on quadratics (float64), the report, and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from torch import nn

from lrbs.curvature import hessian_eigenvalues, hessian_trace
from lrbs.data import load_dataset
from lrbs.errors import ConfigError
from lrbs.models import build_model
from lrbs.objective import Objective
from lrbs.sharpness import (
    MEASURES,
    average_sharpness,
    edge_of_stability,
    keskar_sharpness,
    sharpness_report,
    worst_case_sharpness,
)

N, D = 40, 5
S = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5], dtype=torch.float64)
H_DIAG = 2 * S**2  # Hessian of the MSE loss below: 2 X^T X / N = 2 diag(s^2)


@pytest.fixture(scope="module")
def quad():
    """A linear model with MSE loss on inputs with orthogonal columns: f(w + y) = f + g.y + y^T diag(h) y /
    2."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=torch.float64))
    X = U * S * math.sqrt(N)
    y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, D, generator=g, dtype=torch.float64))
    obj = Objective(model, nn.functional.mse_loss, (X, y))
    w = obj.theta()
    grad = (2 * X.T @ (X @ w[:, None] - y) / N)[:, 0]  # closed-form gradient
    f0 = float(((X @ w[:, None] - y) ** 2).mean())
    w_star = torch.linalg.lstsq(X, y).solution[:, 0]
    return {"model": model, "obj": obj, "X": X, "y": y, "w": w, "g": grad, "f": f0, "w_star": w_star}


def trust_region_max(g: np.ndarray, H: np.ndarray, rho: float) -> float:
    """max_{||d|| <= rho} g.d + d^T H d / 2 (convex H, g != 0): d = (mu I - H)^{-1} g with ||d|| = rho, mu >
    lam_max."""
    lam, Q = np.linalg.eigh(H)
    gq = Q.T @ g

    def gap(mu):
        return np.linalg.norm(gq / (mu - lam)) - rho

    lo = lam.max() + 1e-12 * (1 + abs(lam.max()))
    mu = brentq(gap, lo, lam.max() + np.linalg.norm(g) / rho + 1.0, xtol=1e-14, rtol=1e-15)
    d = Q @ (gq / (mu - lam))
    return float(g @ d + 0.5 * d @ H @ d)


# --------------------------------------------------------------------------- Keskar
@pytest.mark.parametrize("eps", [1e-3, 5e-4, 0.1])
def test_keskar_full_space_matches_box_closed_form(quad, untouched, eps):
    check = untouched(quad["model"])
    b = eps * (quad["w"].abs() + 1)
    closed = 100 * float((b * quad["g"].abs() + 0.5 * H_DIAG * b**2).sum()) / (1 + quad["f"])
    res = keskar_sharpness(quad["obj"], epsilon=eps)
    assert res.value == pytest.approx(closed, rel=1e-9)
    assert res.loss == pytest.approx(quad["f"], rel=1e-12)
    assert not res.restarted and res.nit <= 10 and res.nfev >= 2
    assert res.settings["dtype"] == "float64"
    json.dumps(res.to_dict())
    check()


def test_keskar_restarts_at_a_stationary_point(quad):
    obj = quad["obj"].at(quad["w_star"])
    eps = 0.1
    b = eps * (quad["w_star"].abs() + 1)
    f = obj.loss()
    res = keskar_sharpness(obj, epsilon=eps)
    assert res.restarted
    assert res.value == pytest.approx(100 * float((0.5 * H_DIAG * b**2).sum()) / (1 + f), rel=1e-8)


def _vertex_max(quad, p: int, seed: int, eps: float) -> float:
    """Exact box maximum in the subspace: a convex quadratic attains its maximum over a box at a vertex.

    ``A`` is drawn as documented: ``np.random.default_rng(seed).standard_normal((n, p))``.
    """
    A = np.random.default_rng(seed).standard_normal((D, p))
    x = quad["w"].numpy()
    b = eps * (np.abs(np.linalg.pinv(A) @ x) + 1)
    HA = A.T @ np.diag(H_DIAG.numpy()) @ A
    gA = A.T @ quad["g"].numpy()
    best = max(
        gA @ (np.array(s) * b) + 0.5 * (np.array(s) * b) @ HA @ (np.array(s) * b)
        for s in itertools.product([-1, 1], repeat=p)
    )
    return 100 * best / (1 + quad["f"])


def test_keskar_subspace_against_vertex_enumeration_and_reproducible(quad):
    obj = quad["obj"]
    res = keskar_sharpness(obj, epsilon=0.1, subspace_dim=2, seed=1)
    assert res.value == pytest.approx(_vertex_max(quad, 2, 1, 0.1), rel=1e-9)
    assert res.subspace_dim == 2
    # an inexact maximizer (as in the paper) never exceeds the true box maximum
    r3 = keskar_sharpness(obj, epsilon=0.1, subspace_dim=3, seed=1)
    assert 0 < r3.value <= _vertex_max(quad, 3, 1, 0.1) * (1 + 1e-12)
    assert keskar_sharpness(obj, epsilon=0.1, subspace_dim=3, seed=1).value == r3.value
    assert keskar_sharpness(obj, epsilon=0.1, subspace_dim=3, seed=2).value != r3.value


# --------------------------------------------------------------------------- worst case
@pytest.mark.parametrize("rho", [0.05, 0.5, 2.0])
def test_worst_case_l2_matches_trust_region_solution(quad, untouched, rho):
    check = untouched(quad["model"])
    g, H = quad["g"].numpy(), np.diag(H_DIAG.numpy())
    res = worst_case_sharpness(quad["obj"], rho)
    assert res.value == pytest.approx(trust_region_max(g, H, rho), rel=1e-6)
    d = rho * g / np.linalg.norm(g)  # SAM's one-step point
    assert res.first_order == pytest.approx(g @ d + 0.5 * d @ H @ d, rel=1e-10)
    assert res.num_batches == 1 and math.isnan(res.stderr) and res.restarted == 0
    json.dumps(res.to_dict())
    check()


@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_case_linf_matches_box_closed_form(quad, adaptive):
    rho = 0.3
    c = quad["w"].abs() if adaptive else torch.ones(D, dtype=torch.float64)
    closed = float((rho * c * quad["g"].abs() + 0.5 * H_DIAG * (rho * c) ** 2).sum())
    res = worst_case_sharpness(quad["obj"], rho, norm="linf", adaptive=adaptive)
    assert res.value == pytest.approx(closed, rel=1e-10)
    assert res.adaptive is adaptive and res.norm == "linf"


def test_worst_case_adaptive_l2_is_a_scaled_trust_region(quad):
    rho = 0.4
    c = quad["w"].abs().numpy()
    # delta = c * u with ||u|| <= rho: a trust region in u with gradient c*g and Hessian C H C
    ref = trust_region_max(c * quad["g"].numpy(), np.diag(c * H_DIAG.numpy() * c), rho)
    res = worst_case_sharpness(quad["obj"], rho, adaptive=True, steps=50)
    assert res.value == pytest.approx(ref, rel=1e-6)


def test_worst_case_at_a_minimum_restarts_and_finds_lambda_max(quad):
    obj = quad["obj"].at(quad["w_star"])
    res = worst_case_sharpness(obj, 0.5, steps=30)
    assert res.restarted == 1
    assert res.value == pytest.approx(0.5 * 0.5**2 * float(H_DIAG.max()), rel=1e-6)


def test_m_sharpness_averages_per_batch_maxima(quad):
    rho, m = 0.5, 20
    w, X, y = quad["w"], quad["X"], quad["y"]
    ref = []
    for i in range(0, N, m):
        Xb, yb = X[i : i + m], y[i : i + m]
        Hb = (2 * Xb.T @ Xb / m).numpy()
        gb = (2 * Xb.T @ (Xb @ w[:, None] - yb) / m).numpy()[:, 0]
        ref.append(trust_region_max(gb, Hb, rho))
    res = worst_case_sharpness(quad["obj"], rho, m=m, steps=50)
    assert res.num_batches == 2 and res.m == m
    assert res.value == pytest.approx(np.mean(ref), rel=1e-6)
    assert res.stderr == pytest.approx(np.std(ref, ddof=1) / math.sqrt(2), rel=1e-5)


# --------------------------------------------------------------------------- average case
@pytest.mark.parametrize(("norm", "adaptive"), [("l2", False), ("l2", True), ("linf", False), ("linf", True)])
def test_average_sharpness_matches_closed_form(quad, untouched, norm, adaptive):
    check = untouched(quad["model"])
    obj = quad["obj"].at(quad["w_star"])  # g = 0: only the curvature term, small Monte Carlo noise
    rho = 0.1
    c = quad["w_star"].abs() if adaptive else torch.ones(D, dtype=torch.float64)
    closed = 0.5 * rho**2 * float((c**2 * H_DIAG).sum()) / (3.0 if norm == "linf" else 1.0)
    res = average_sharpness(obj, rho, norm=norm, adaptive=adaptive, samples=200, seed=1)
    assert abs(res.value - closed) <= 4 * res.stderr
    assert res.stderr < 0.2 * closed
    assert res.samples == 200 and res.loss == pytest.approx(obj.loss(), rel=1e-12)
    check()


def test_average_sharpness_is_seeded(quad):
    a = average_sharpness(quad["obj"], 0.1, samples=10, seed=3)
    b = average_sharpness(quad["obj"], 0.1, samples=10, seed=3)
    c = average_sharpness(quad["obj"], 0.1, samples=10, seed=4)
    assert a.value == b.value and a.value != c.value


# --------------------------------------------------------------------------- edge of stability
def test_edge_of_stability():
    e = edge_of_stability(0.1, 15.0)
    assert e.value == pytest.approx(1.5) and e.threshold == 2.0 and e.stable
    e = edge_of_stability(0.1, 25.0, momentum=0.9)
    assert e.threshold == pytest.approx(3.8) and e.stable
    assert not edge_of_stability(0.1, 40.0, momentum=0.9).stable


def test_edge_of_stability_from_eigen_result(quad):
    res = hessian_eigenvalues(quad["obj"], tol=1e-4, tol_on="residual")  # the former defaults
    assert res.top == pytest.approx(float(H_DIAG.max()), rel=1e-10)
    assert edge_of_stability(0.2, res).value == pytest.approx(0.2 * float(H_DIAG.max()), rel=1e-10)


# --------------------------------------------------------------------------- report
@pytest.fixture(scope="module")
def net():
    ds = load_dataset("blobs", n_train=200, n_test=8, num_features=6, num_classes=3, seed=2)
    model = build_model("mlp", dataset=ds, depth=3, width=8, batchnorm=True, seed=0)
    return model, ds


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_report_runs_every_measure_on_one_subset(net, untouched, bn):
    model, ds = net
    check = untouched(model)
    obj = Objective(model, data=ds, bn=bn)
    measures = (
        "lambda_max",
        "trace",
        "negative_mass",
        "keskar",
        "keskar_subspace",
        "worst_case",
        "worst_case_adaptive",
        "average",
        "average_adaptive",
        "edge_of_stability",
    )
    rep = sharpness_report(
        obj,
        measures=measures,
        max_samples=64,
        seed=0,
        lr=0.1,
        momentum=0.9,
        options={
            "keskar_subspace": {"subspace_dim": 10},
            "average": {"samples": 20},
            "average_adaptive": {"samples": 20},
            "trace": {"num_hvps": 12},
            "worst_case": {"steps": 5},
            "worst_case_adaptive": {"steps": 5},
        },
    )
    assert list(rep.measures) == list(measures)
    assert rep.settings["num_samples"] == 64 and rep.settings["bn"] == bn
    sub = obj.subset(64, seed=0)
    # the report's numbers are those of the individual measures on the same subset
    lam = hessian_eigenvalues(sub, **MEASURES["lambda_max"].options).top
    assert rep.measures["lambda_max"] == pytest.approx(lam, rel=1e-6)
    assert rep.measures["trace"] == pytest.approx(
        hessian_trace(sub, **{**MEASURES["trace"].options, "num_hvps": 12}).value, rel=1e-6
    )
    assert rep.measures["edge_of_stability"] == pytest.approx(0.1 * rep.measures["lambda_max"])
    assert rep.results["keskar_subspace"].subspace_dim == 10
    rows = rep.rows()
    assert [r["measure"] for r in rows] == list(measures)
    assert rows[measures.index("worst_case")]["options"]["rho"] == 0.05
    assert all(math.isfinite(r["value"]) for r in rows)
    json.dumps(rep.to_dict())
    check()


def test_report_errors(net):
    model, ds = net
    obj = Objective(model, data=ds)
    with pytest.raises(ConfigError, match=r"unknown measure 'lamda_max'. Did you mean 'lambda_max'\?"):
        sharpness_report(obj, measures=["lamda_max"])
    with pytest.raises(ConfigError, match=r"measures include 'edge_of_stability' but lr=None"):
        sharpness_report(obj, measures=["edge_of_stability"])
    with pytest.raises(ConfigError, match=r"options has key 'keskar', which is not among measures"):
        sharpness_report(obj, measures=["lambda_max"], options={"keskar": {"epsilon": 1e-3}})
    with pytest.raises(ConfigError, match=r"max_samples=0 is not allowed"):
        sharpness_report(obj, measures=["lambda_max"], max_samples=0)


# --------------------------------------------------------------------------- bad inputs
def test_bad_arguments(quad):
    obj = quad["obj"]
    with pytest.raises(ConfigError, match=r"epsilon=0 is not allowed: must be a finite number > 0"):
        keskar_sharpness(obj, epsilon=0)
    with pytest.raises(
        ConfigError, match=r"subspace_dim=6 is not allowed: must be <= the number of parameters \(5\)"
    ):
        keskar_sharpness(obj, subspace_dim=6)
    with pytest.raises(ConfigError, match=r"max_iter=0 is not allowed"):
        keskar_sharpness(obj, max_iter=0)
    with pytest.raises(ConfigError, match=r"rho=-0.1 is not allowed: must be a finite number > 0"):
        worst_case_sharpness(obj, -0.1)
    with pytest.raises(ConfigError, match=r"rho=0 is not allowed"):
        average_sharpness(obj, 0)
    with pytest.raises(ConfigError, match=r"norm='l1' is not allowed: must be one of \['l2', 'linf'\]"):
        worst_case_sharpness(obj, 0.1, norm="l1")
    with pytest.raises(ConfigError, match=r"norm='L2' is not allowed.*Did you mean 'l2'"):
        average_sharpness(obj, 0.1, norm="L2")
    with pytest.raises(ConfigError, match=r"steps=0 is not allowed"):
        worst_case_sharpness(obj, 0.1, steps=0)
    with pytest.raises(ConfigError, match=r"samples=1 is not allowed: must be an integer >= 2"):
        average_sharpness(obj, 0.1, samples=1)
    with pytest.raises(ConfigError, match=r"lr=0 is not allowed"):
        edge_of_stability(0, 1.0)
    with pytest.raises(
        ConfigError, match=r"momentum=1.0 is not allowed: must be a finite number >= 0 and < 1"
    ):
        edge_of_stability(0.1, 1.0, momentum=1.0)
    with pytest.raises(ConfigError, match=r"lambda_max=nan is not allowed"):
        edge_of_stability(0.1, float("nan"))


def test_non_finite_parameters_raise(quad):
    theta = quad["obj"].theta()
    theta[1] = float("inf")
    for fn in (
        lambda o: keskar_sharpness(o, params=theta),
        lambda o: worst_case_sharpness(o, 0.1, params=theta),
        lambda o: average_sharpness(o, 0.1, params=theta),
    ):
        with pytest.raises(ConfigError, match=r"params has 1 non-finite entries"):
            fn(quad["obj"])


def test_m_sharpness_refuses_recompute_bn(net):
    model, ds = net
    obj = Objective(model, data=ds, bn="recompute", max_samples=32)
    with pytest.raises(ConfigError, match=r"m-sharpness \(m=...\) is not allowed with bn='recompute'"):
        worst_case_sharpness(obj, 0.1, m=8, steps=1)


# --------------------------------------------------------------------------- CLI
def _cli(argv):
    from lrbs.cli import main

    return main(["sharpness", *argv])


BLOBS = [
    "--dataset",
    "blobs",
    "--dataset-opts",
    '{"n_train": 64, "n_test": 8, "num_features": 4}',
    "--model",
    "mlp",
    "--model-opts",
    '{"depth": 2, "width": 6}',
]
FAST = [
    "--max-samples",
    "32",
    "--options",
    '{"worst_case": {"steps": 3}, "average": {"samples": 8}, "trace": {"num_hvps": 6}}',
]


def test_cli_train_then_measure_into_store(tmp_path, capsys):
    from lrbs.store import Store

    db = tmp_path / "lab.sqlite"
    code = _cli(
        [
            *BLOBS,
            "--train",
            "--steps",
            "5",
            "--lr",
            "0.05",
            "--batch-size",
            "16",
            "--measures",
            "lambda_max,trace,worst_case,average,edge_of_stability",
            *FAST,
            "--store",
            str(db),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for name in ("lambda_max", "trace", "worst_case", "average", "edge_of_stability"):
        assert name in out
    with Store(db) as store:
        runs = store.runs(kind="sharpness")
        assert len(runs) == 1 and runs[0].status == "completed"
        names = {name for _, name, _ in store.metrics(runs[0].key)}
    assert names == {"lambda_max", "trace", "worst_case", "average", "edge_of_stability"}


def test_cli_checkpoint(tmp_path, capsys):
    from lrbs.train import save_checkpoint

    ds = load_dataset("blobs", n_train=64, n_test=8, num_features=4)
    model = build_model("mlp", dataset=ds, depth=2, width=6, seed=0)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    obj = Objective(model, data=ds, max_samples=32, seed=0)
    ref = hessian_eigenvalues(obj).top
    assert _cli([*BLOBS, "--checkpoint", str(path), "--measures", "lambda_max", "--max-samples", "32"]) == 0
    out = capsys.readouterr().out
    assert f"{ref:.4g}" in out


def test_cli_errors(tmp_path, capsys):
    assert _cli([*BLOBS, "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "lrbs: error: checkpoint=" in capsys.readouterr().err
    assert _cli([*BLOBS, "--train", "--steps", "2", "--measures", "sharpest"]) == 2
    assert "unknown measure 'sharpest'" in capsys.readouterr().err
    assert _cli(BLOBS) == 2  # neither --checkpoint nor --train
    assert "one of the arguments --checkpoint --train is required" in capsys.readouterr().err
