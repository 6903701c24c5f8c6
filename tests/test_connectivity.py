"""Mode connectivity: paths against naive loops, curve formulas, NEB pieces, barriers, the MNIST-1D finding, CLI."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrbs import connectivity as C
from lrbs.connectivity import Curve, auto_neb, barriers, curve_lr_factor, fit_curve, linear_path
from lrbs.errors import ConfigError, ShapeError
from lrbs.models import build_model
from lrbs.objective import Objective


def _vec(model):
    return nn.utils.parameters_to_vector(model.parameters()).detach().double()


def _naive(model, theta, x, y, recompute=False):
    m = copy.deepcopy(model).double()
    nn.utils.vector_to_parameters(theta.double(), m.parameters())
    with torch.no_grad():
        if recompute:
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm1d):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            m(x.double())
        m.eval()
        return nn.functional.cross_entropy(m(x.double()), y).item()


@pytest.fixture(scope="module")
def minima():
    """Two MNIST-1D MLP minima from different seeds (Adam, 1500 steps each)."""
    from lrbs.data import load_dataset
    from lrbs.train import fit

    ds = load_dataset("mnist1d")
    models = []
    for seed in (0, 1):
        m = build_model("mlp", dataset=ds, seed=seed)
        fit(m, ds, optimizer="adam", lr=1e-3, batch_size=128, steps=1500, seed=seed, eval_every=1500)
        models.append(m)
    return ds, models


# --------------------------------------------------------------------------- barriers
def test_barrier_definitions_closed_form():
    b = barriers(np.array([1.0, 3.0, 2.0]), np.array([0.0, 0.5, 1.0]))
    assert b == {"max_loss": 3.0, "max_minus_mean": 1.5, "max_above_chord": 1.5}
    b = barriers(np.array([1.0, 1.2, 3.0]), np.array([0.0, 0.5, 1.0]))
    assert b["max_minus_mean"] == pytest.approx(1.0)
    assert b["max_above_chord"] == pytest.approx(0.0)  # the chord at t=0.5 is 2.0 > 1.2
    assert math.isnan(barriers(np.array([1.0, np.nan, 1.0]), np.array([0, 0.5, 1]))["max_loss"])


def test_linear_path_equals_naive_loop(blobs, untouched):
    a = build_model("mlp", dataset=blobs, depth=3, width=8, seed=0)
    b = build_model("mlp", dataset=blobs, depth=3, width=8, seed=1)
    ca, cb = untouched(a), untouched(b)
    obj = Objective(a, data=blobs.train, dtype=torch.float64)
    test_obj = Objective(a, data=blobs.test, dtype=torch.float64)
    path = linear_path(a, b, obj, 7, test_obj=test_obj)
    ta, tb = _vec(a), _vec(b)
    for k, t in enumerate(path.t):
        theta = (1 - t) * ta + t * tb
        assert abs(path.loss[k] - _naive(a, theta, blobs.train.x, blobs.train.y)) < 1e-9
        assert abs(path.test_loss[k] - _naive(a, theta, blobs.test.x, blobs.test.y)) < 1e-9
    assert path.length == pytest.approx(float((tb - ta).norm()), rel=1e-12)
    assert path.barriers == barriers(path.loss, path.t)
    d = path.to_dict()
    assert d["settings"]["bn"] == "eval" and d["settings"]["num_samples"] == 128 and d["kind"] == "linear"
    assert d["test_barriers"] is not None
    ca()
    cb()


# --------------------------------------------------------------------------- curves
def test_curve_coefficients_match_formulas():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(5, 7, generator=g, dtype=torch.float64)
    bez = Curve("bezier", pts, None, np.empty(0), {})
    for t in (0.0, 0.3, 0.77, 1.0):
        ref = sum(math.comb(4, i) * t**i * (1 - t) ** (4 - i) * pts[i] for i in range(5))
        torch.testing.assert_close(bez(t), ref)
    poly = Curve("polychain", pts, None, np.empty(0), {})
    for i in range(5):
        torch.testing.assert_close(poly(i / 4), pts[i])
    torch.testing.assert_close(poly(0.375), 0.5 * (pts[1] + pts[2]))
    assert curve_lr_factor(0.2) == 1.0 and curve_lr_factor(0.5) == 1.0
    assert curve_lr_factor(0.7) == pytest.approx(1 - 0.99 * 0.5)
    assert curve_lr_factor(0.9) == pytest.approx(0.01) and curve_lr_factor(0.95) == 0.01


def test_fit_curve_with_batchnorm(blobs, untouched):
    a = build_model("mlp", dataset=blobs, depth=3, width=8, batchnorm=True, seed=0)
    b = build_model("mlp", dataset=blobs, depth=3, width=8, batchnorm=True, seed=1)
    ca, cb = untouched(a), untouched(b)
    state = torch.get_rng_state()
    # zero epochs: the curve stays on the straight line (inner bends initialised on it)
    line = fit_curve(a, b, blobs, bends=2, epochs=0, num_eval=5)
    ta, tb = _vec(a).float(), _vec(b).float()
    for t in (0.0, 0.4, 1.0):
        torch.testing.assert_close(line(t), (1 - t) * ta + t * tb, rtol=1e-5, atol=1e-6)
    curve = fit_curve(a, b, blobs, kind="polychain", bends=2, epochs=3, lr=0.05, batch_size=32, num_eval=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(curve.points[0], ta) and torch.equal(curve.points[-1], tb)  # endpoints fixed
    assert not torch.allclose(curve.points[1], line.points[1])  # inner bends trained
    assert curve.settings["steps"] == 3 * 4 and np.isfinite(curve.history).all()
    # bn="recompute": the value at t=0 is model_a with BN statistics recomputed from the train data
    assert curve.path.loss[0] == pytest.approx(
        _naive(a, ta, blobs.train.x, blobs.train.y, recompute=True), rel=1e-5
    )
    assert curve.path.settings["bn"] == "recompute" and curve.path.test_loss is not None
    again = fit_curve(a, b, blobs, kind="polychain", bends=2, epochs=3, lr=0.05, batch_size=32, num_eval=5)
    assert torch.equal(again.points, curve.points)  # deterministic for a seed
    ca()
    cb()


# --------------------------------------------------------------------------- NEB pieces
def test_improved_tangent_and_redistribution():
    prev, cur, nxt = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0])
    t = C._improved_tangent(prev, cur, nxt, 0.0, 1.0, 2.0)  # uphill: towards the higher neighbour
    torch.testing.assert_close(t, torch.tensor([0.0, 1.0]))
    t = C._improved_tangent(prev, cur, nxt, 2.0, 1.0, 0.0)
    torch.testing.assert_close(t, torch.tensor([1.0, 0.0]))
    t = C._improved_tangent(prev, cur, nxt, 0.0, 3.0, 1.0)  # maximum, vn > vp: tau+ dmax + tau- dmin
    ref = torch.tensor([0.0, 2.0]) * 3.0 + torch.tensor([1.0, 0.0]) * 2.0
    torch.testing.assert_close(t, ref / ref.norm())
    piv = torch.tensor([[0.0, 0.0], [0.2, 0.0], [1.0, 0.0], [1.0, 1.0]])
    out = C._redistribute(piv)
    # equal arc length (2/3 each) along the old polyline of length 2
    torch.testing.assert_close(out[1:3], torch.tensor([[2.0 / 3, 0.0], [1.0, 1.0 / 3]]))
    assert torch.equal(out[0], piv[0]) and torch.equal(out[-1], piv[-1])
    pts, gap = C._scan(piv, 3)
    assert pts.shape == (4 + 3 * 3, 2) and (gap == -1).sum() == 4


# --------------------------------------------------------------------------- the finding on MNIST-1D
def test_bezier_removes_the_linear_barrier(minima, untouched):
    ds, (a, b) = minima
    ca, cb = untouched(a), untouched(b)
    obj = Objective(a, data=ds.train, batch_size=1000)
    lin = linear_path(a, b, obj, 21)
    curve = fit_curve(a, b, ds, kind="bezier", bends=3, epochs=20, lr=0.1, num_eval=21)
    neb = auto_neb(a, b, ds, cycles=2, steps=40, lr=0.1)
    print(
        "linear", lin.barriers, "bezier", curve.path.barriers, "neb", neb.barriers, neb.settings["num_pivots"]
    )
    assert lin.barriers["max_minus_mean"] > 0.5  # a clear barrier on the straight line
    assert curve.path.barriers["max_minus_mean"] <= 0.25 * lin.barriers["max_minus_mean"]
    assert neb.barriers["max_minus_mean"] <= 0.5 * lin.barriers["max_minus_mean"]
    assert neb.t[0] == 0 and neb.t[-1] == 1 and np.all(np.diff(neb.t) > 0)
    assert neb.points.shape[0] == neb.settings["num_pivots"] >= 5
    assert curve.path.length >= lin.length * (1 - 1e-6)  # the line is the shortest path
    ca()
    cb()


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs(blobs):
    a = build_model("mlp", dataset=blobs, depth=3, width=8, seed=0)
    b = build_model("mlp", dataset=blobs, depth=3, width=8, seed=1)
    c = build_model("mlp", dataset=blobs, depth=3, width=9, seed=1)
    obj = Objective(a, data=blobs.train)
    with pytest.raises(ConfigError, match="bends=0 is not allowed"):
        fit_curve(a, b, blobs, kind="bezier", bends=0)
    with pytest.raises(ConfigError, match="bends=1 is not allowed: must be an integer >= 2"):
        fit_curve(a, b, blobs, kind="polychain", bends=1)
    with pytest.raises(ConfigError, match="kind='bezeir'.*Did you mean 'bezier'"):
        fit_curve(a, b, blobs, kind="bezeir")
    with pytest.raises(
        ShapeError, match=r"'body\.1\.weight' with shape \(8, 6\).*'body\.1\.weight' with shape \(9, 6\)"
    ):
        fit_curve(a, c, blobs)
    with pytest.raises(ShapeError, match=r"body\.1\.weight"):
        linear_path(a, c, obj)
    with pytest.raises(ShapeError, match=r"body\.1\.weight"):
        auto_neb(a, c, blobs)
    with pytest.raises(ConfigError, match="n=1 is not allowed"):
        linear_path(a, b, obj, n=1)
    with pytest.raises(ConfigError, match="data=None"):
        fit_curve(a, b, None)
    with pytest.raises(ConfigError, match="batch_size=1000 is not allowed"):
        fit_curve(a, b, blobs, batch_size=1000)
    with pytest.raises(ConfigError, match="epochs=-1"):
        fit_curve(a, b, blobs, epochs=-1)
    with pytest.raises(ConfigError, match="cycles=0"):
        auto_neb(a, b, blobs, cycles=0)
    with pytest.raises(ConfigError, match="threshold=-0.1"):
        auto_neb(a, b, blobs, threshold=-0.1)
    with pytest.raises(ConfigError, match="bn='batch'"):
        fit_curve(a, b, blobs, bn="batch")
    with pytest.raises(ConfigError, match="metric='acc'"):
        linear_path(a, b, obj, 3).plot("acc")


def test_neb_and_plot_on_blobs(blobs, untouched):
    from matplotlib.figure import Figure

    a = build_model("mlp", dataset=blobs, depth=3, width=8, seed=0)
    b = build_model("mlp", dataset=blobs, depth=3, width=8, seed=1)
    ca = untouched(a)
    p = auto_neb(a, b, blobs, cycles=2, steps=5, batch_size=32, subpoints=3)
    assert (
        p.kind == "neb"
        and p.test_loss is not None
        and set(p.barriers) == {"max_loss", "max_minus_mean", "max_above_chord"}
    )
    torch.testing.assert_close(p.points[0], _vec(a).float())
    assert isinstance(p.plot().figure, Figure) and isinstance(p.plot("accuracy").figure, Figure)
    ca()


# --------------------------------------------------------------------------- CLI
def test_cli_connect(blobs, tmp_path, capsys):
    from lrbs.cli import main
    from lrbs.train import save_checkpoint

    opts = '{"n_train": 128, "n_test": 64, "num_features": 6, "num_classes": 3, "seed": 0}'
    for seed, name in ((0, "a"), (1, "b")):
        save_checkpoint(
            build_model("mlp", dataset=blobs, depth=3, width=8, seed=seed), tmp_path / f"{name}.safetensors"
        )
    args = [
        "connect",
        "--a",
        str(tmp_path / "a.safetensors"),
        "--b",
        str(tmp_path / "b.safetensors"),
        "--model",
        "mlp",
        "--model-opts",
        '{"depth": 3, "width": 8}',
        "--dataset",
        "blobs",
        "--dataset-opts",
        opts,
    ]
    assert main(args + ["--method", "linear", "--points", "5", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "max_minus_mean" in out and "train" in out and "test" in out
    assert (tmp_path / "out" / "path.json").is_file() and (tmp_path / "out" / "path.png").is_file()
    assert main(args + ["--method", "bezier", "--epochs", "1"]) == 0
    assert main(args + ["--method", "line"]) == 2
    assert "--method='line' is not allowed" in capsys.readouterr().err
