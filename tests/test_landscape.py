"""Landscapes: grids against naive loops in float64, Li's direction rule, resume, PCA, non-convexity, plots."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrbs import landscape as L
from lrbs.errors import ConfigError, LrbsTypeError, ShapeError
from lrbs.landscape import (
    Direction,
    Landscape,
    eigen_direction,
    interpolate,
    landscape_1d,
    landscape_2d,
    nonconvexity,
    pca_directions,
    random_direction,
    refine,
)
from lrbs.models import build_model
from lrbs.objective import Objective


def _model(blobs, bn=False, seed=0, width=8):
    return build_model("mlp", dataset=blobs, depth=3, width=width, batchnorm=bn, seed=seed)


def _naive_loss(model, theta, x, y, *, bn="eval"):
    """Reference: copy the point into a deep copy of the model and evaluate it (float64)."""
    m = copy.deepcopy(model).double()
    nn.utils.vector_to_parameters(theta.double(), m.parameters())
    x = x.double()
    with torch.no_grad():
        if bn == "recompute":
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm1d):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            m(x)
        m.eval()
        out = m(x)
        return nn.functional.cross_entropy(out, y).item(), (out.argmax(-1) == y).double().mean().item()


# --------------------------------------------------------------------------- grids equal a naive loop
@pytest.mark.parametrize("bn", [False, True])
def test_grid_equals_naive_loop_nonsquare(blobs, untouched, bn):
    model = _model(blobs, bn=bn)
    if bn:  # give the BN layers non-trivial running statistics
        with torch.no_grad():
            model.train()
            model(blobs.train.x)
            model.eval()
    check = untouched(model)
    obj = Objective(model, data=blobs.train, dtype=torch.float64)
    d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)
    alphas, betas = np.linspace(-1, 1, 5), np.array([-0.6, 0.1, 0.9])
    land = landscape_2d(obj, d1, d2, alphas, betas)
    assert land.loss.shape == (5, 3) and land.values["accuracy"].shape == (5, 3)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            theta = obj.theta() + a * d1.vector + b * d2.vector
            ref, acc = _naive_loss(model, theta, blobs.train.x, blobs.train.y)
            assert abs(land.loss[i, j] - ref) < 1e-9, (i, j)
            assert land.values["accuracy"][i, j] == pytest.approx(acc)
    assert land.done.all()
    assert land.settings["bn"] == "eval" and land.settings["dtype"] == "float64"
    assert land.settings["norm"] == ["filter", "filter"] and land.settings["seed"] == [1, 2]
    assert land.settings["num_samples"] == 128 and len(land.settings["data_fingerprint"]) == 16
    check()


def test_grid_bn_recompute_and_both_methods(blobs, untouched):
    model = _model(blobs, bn=True)
    check = untouched(model)
    obj = Objective(model, data=blobs.train, dtype=torch.float64, bn="recompute")
    d1, d2 = random_direction(obj, seed=3), random_direction(obj, seed=4, ignore="none")
    land = landscape_2d(obj, d1, d2, [-0.5, 0.5], [0.0, 0.3, 0.6])
    for i, a in enumerate([-0.5, 0.5]):
        for j, b in enumerate([0.0, 0.3, 0.6]):
            theta = obj.theta() + a * d1.vector + b * d2.vector
            ref, _ = _naive_loss(model, theta, blobs.train.x, blobs.train.y, bn="recompute")
            assert abs(land.loss[i, j] - ref) < 1e-9
    obj2 = Objective(model, data=blobs.train, dtype=torch.float64)
    seq = landscape_2d(obj2, d1, d2, [-0.5, 0.5], [0.0, 0.3], method="sequential")
    bat = landscape_2d(obj2, d1, d2, [-0.5, 0.5], [0.0, 0.3], method="batched")
    np.testing.assert_allclose(seq.loss, bat.loss, rtol=0, atol=1e-12)
    check()


def test_1d_with_test_set_and_standard_error(blobs, untouched):
    model = _model(blobs)
    check = untouched(model)
    obj = Objective(model, data=blobs.train, dtype=torch.float64)
    test_obj = Objective(model, data=blobs.test, dtype=torch.float64)
    d = random_direction(obj, seed=5)
    alphas = [-1.0, 0.0, 0.5]
    land = landscape_1d(obj, d, alphas, test_obj=test_obj, stderr=True)
    for i, a in enumerate(alphas):
        theta = obj.theta() + a * d.vector
        m = copy.deepcopy(model).double()
        nn.utils.vector_to_parameters(theta, m.parameters())
        with torch.no_grad():
            per = nn.functional.cross_entropy(
                m(blobs.train.x.double()), blobs.train.y, reduction="none"
            ).numpy()
        assert abs(land.loss[i] - per.mean()) < 1e-9
        assert land.values["loss_se"][i] == pytest.approx(per.std(ddof=1) / math.sqrt(len(per)), rel=1e-9)
        ref_test, _ = _naive_loss(model, theta, blobs.test.x, blobs.test.y)
        assert abs(land.values["test_loss"][i] - ref_test) < 1e-9
    assert land.values["test_loss_se"].shape == (3,)
    assert land.settings["test"]["num_samples"] == 64
    check()


def test_subset_is_fixed_and_recorded(blobs):
    model = _model(blobs)
    obj = Objective(model, data=blobs.train, dtype=torch.float64).subset(40, seed=1)
    d = random_direction(obj, seed=0)
    land = landscape_1d(obj, d, [0.0, 0.5], stderr=True)
    x, y = obj.data
    ref, _ = _naive_loss(model, obj.theta() + 0.5 * d.vector, x, y)
    assert abs(land.loss[1] - ref) < 1e-9 and land.settings["num_samples"] == 40
    assert np.isfinite(land.values["loss_se"]).all()


# --------------------------------------------------------------------------- directions
def _li_reference(weights, seed, norm, ignore):
    """Independent re-implementation of net_plotter.py's rule (per-tensor list, same draw order)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for w in weights:
        d = torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.dtype)
        if d.dim() <= 1:
            d = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
        elif norm == "filter":
            for i in range(d.shape[0]):
                d[i] = d[i] * (w[i].norm() / (d[i].norm() + 1e-10))
        elif norm == "layer":
            d = d * (w.norm() / d.norm())
        out.append(d)
    return out


@pytest.mark.parametrize("norm", ["filter", "layer", "none"])
@pytest.mark.parametrize("ignore", ["biasbn", "none"])
def test_random_direction_follows_li(mnist1d, untouched, norm, ignore):
    model = build_model("cnn1d", dataset=mnist1d)
    check = untouched(model)
    obj = Objective(model, data=mnist1d.train.subset(50))
    state = torch.get_rng_state()
    d = random_direction(obj, norm=norm, ignore=ignore, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    parts = obj.unflatten(d.vector)
    ref = _li_reference(list(obj.params().values()), 7, norm, ignore)
    for (name, w), r in zip(obj.params().items(), ref):
        torch.testing.assert_close(parts[name], r, rtol=1e-5, atol=1e-7)
        if w.dim() > 1 and norm == "filter":  # per filter norms equal the weight's
            torch.testing.assert_close(
                parts[name].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6
            )
        if w.dim() <= 1:
            expected = torch.zeros_like(w) if ignore == "biasbn" else w
            assert torch.equal(parts[name], expected)
    assert torch.equal(d.vector, random_direction(obj, norm=norm, ignore=ignore, seed=7).vector)
    assert not torch.equal(d.vector, random_direction(obj, norm=norm, ignore=ignore, seed=8).vector)
    assert d.settings()["norm"] == norm and d.settings()["seed"] == 7
    check()


def test_eigen_direction_matches_dense_hessian(blobs):
    model = build_model("mlp", dataset=blobs, depth=2, width=4)
    obj = Objective(model, data=blobs.train, dtype=torch.float64)
    h = torch.func.hessian(lambda t: obj.loss_tensor(t))(obj.theta())
    w, v = torch.linalg.eigh(h)
    (top, second) = eigen_direction(obj, 2)
    assert top.settings()["eigenvalue"] == pytest.approx(w[-1].item(), rel=1e-6)
    assert abs(float(top.vector @ v[:, -1])) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(second.vector @ v[:, -2])) == pytest.approx(1.0, abs=1e-6)


def test_pca_directions_against_covariance_eigenvectors():
    g = torch.Generator().manual_seed(0)
    n, steps = 30, 12
    u, v = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    final = torch.randn(n, generator=g, dtype=torch.float64)
    traj = [final + math.cos(k / 3) * 3 * u + math.sin(k / 2) * v for k in range(steps)] + [final]
    pca = pca_directions(traj)
    x = torch.stack(traj).numpy() - final.numpy()
    cov = np.cov(x.T, bias=True)
    w, vec = np.linalg.eigh(cov)
    assert pca.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-10)  # the trajectory is planar
    np.testing.assert_allclose(pca.explained_variance_ratio, w[::-1][:2] / w.sum(), rtol=1e-8)
    assert abs(float(pca.d1.vector.double().numpy() @ vec[:, -1])) == pytest.approx(1.0, abs=1e-8)
    np.testing.assert_allclose(pca.coords[:, 0], x @ pca.d1.vector.double().numpy(), atol=1e-5)
    # planar: the two coordinates reconstruct every displacement
    rec = pca.coords @ np.stack([pca.d1.vector.double().numpy(), pca.d2.vector.double().numpy()])
    np.testing.assert_allclose(rec, x, atol=1e-5)
    assert pca.coords.shape == (steps + 1, 2) and np.allclose(pca.coords[-1], 0)


def test_pca_state_dicts_ignore_biasbn(blobs):
    model = _model(blobs)
    obj = Objective(model, data=blobs.train)
    g = torch.Generator().manual_seed(1)
    traj = []
    for _ in range(4):
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
        traj.append(sd)
    pca = pca_directions(traj, obj)
    mask = torch.as_tensor(L._one_dim_mask(obj))
    assert torch.all(pca.d1.vector[mask] == 0) and pca.d1.vector[~mask].abs().sum() > 0
    assert pca.d1.ignore == "biasbn"


# --------------------------------------------------------------------------- interpolation
def test_interpolate_keskar_parametric(blobs, untouched):
    a, b = _model(blobs, seed=0), _model(blobs, seed=1)
    ca, cb = untouched(a), untouched(b)
    obj = Objective(a, data=blobs.train, dtype=torch.float64)
    test_obj = Objective(a, data=blobs.test, dtype=torch.float64)
    land = interpolate(a, b, obj, test_obj=test_obj)
    assert len(land.alphas) == 25 and land.alphas[0] == -1 and land.alphas[-1] == 2
    ta = nn.utils.parameters_to_vector(a.parameters()).double()
    tb = nn.utils.parameters_to_vector(b.parameters()).double()
    for i in (0, 8, 16, 24):
        al = land.alphas[i]
        theta = (1 - al) * ta + al * tb
        assert abs(land.loss[i] - _naive_loss(a, theta, blobs.train.x, blobs.train.y)[0]) < 1e-9
        assert abs(land.values["test_loss"][i] - _naive_loss(a, theta, blobs.test.x, blobs.test.y)[0]) < 1e-9
    assert land.settings["kind"] == "interpolation" and land.settings["bn"] == "eval"
    ca()
    cb()


def test_interpolate_bn_recompute_and_warning(blobs):
    a, b = _model(blobs, bn=True, seed=0), _model(blobs, bn=True, seed=1)
    with torch.no_grad():
        b.train()
        b(blobs.train.x)
        b.eval()
    obj = Objective(a, data=blobs.train, dtype=torch.float64, bn="recompute")
    land = interpolate(a, b, obj, [0.0, 0.5, 1.0])
    ta = nn.utils.parameters_to_vector(a.parameters()).double()
    tb = nn.utils.parameters_to_vector(b.parameters()).double()
    for i, al in enumerate([0.0, 0.5, 1.0]):
        ref, _ = _naive_loss(a, (1 - al) * ta + al * tb, blobs.train.x, blobs.train.y, bn="recompute")
        assert abs(land.loss[i] - ref) < 1e-9
    assert land.settings["bn"] == "recompute"
    with pytest.warns(UserWarning, match="different BatchNorm statistics"):
        interpolate(a, b, Objective(a, data=blobs.train), [0.0, 1.0])


def test_interpolate_different_architectures(blobs):
    a, b = _model(blobs, width=8), _model(blobs, width=9)
    obj = Objective(a, data=blobs.train)
    with pytest.raises(ShapeError, match=r"body\.1\.weight.*\(8, 6\).*\(9, 6\)"):
        interpolate(a, b, obj)


# --------------------------------------------------------------------------- persistence and resume
def test_save_load_and_resume_after_interruption(blobs, tmp_path, monkeypatch):
    model = _model(blobs)
    obj = Objective(model, data=blobs.train, dtype=torch.float64)
    d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)
    a, b = np.linspace(-1, 1, 4), np.linspace(-1, 1, 3)
    full = landscape_2d(obj, d1, d2, a, b)
    path = tmp_path / "grid"
    calls = {"n": 0}
    real = Objective.loss_many

    def flaky(self, stack, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(self, stack, **kw)

    monkeypatch.setattr(Objective, "loss_many", flaky)
    with pytest.raises(KeyboardInterrupt):
        landscape_2d(obj, d1, d2, a, b, path=path, chunk=3)
    partial = Landscape.load(path)
    assert partial.done.sum() == 6 and not partial.complete
    monkeypatch.setattr(Objective, "loss_many", real)
    seen = []
    monkeypatch.setattr(
        Objective, "loss_many", lambda self, s, **kw: (seen.append(len(s)), real(self, s, **kw))[1]
    )
    resumed = landscape_2d(obj, d1, d2, a, b, path=path, chunk=3)
    assert sum(seen) == 6  # only the missing points were evaluated
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=0, atol=1e-12)
    back = Landscape.load(str(path) + ".npz")
    np.testing.assert_array_equal(back.loss, resumed.loss)
    assert back.settings["norm"] == ["filter", "filter"] and back.complete
    assert (tmp_path / "grid.json").is_file()
    with pytest.raises(ConfigError, match="different alphas grid"):
        landscape_2d(obj, d1, d2, np.linspace(-1, 1, 5), b, path=path)
    with pytest.raises(ConfigError, match="different direction d2"):
        landscape_2d(obj, d1, random_direction(obj, seed=9), a, b, path=path)
    with pytest.raises(ConfigError, match="must both exist"):
        Landscape.load(tmp_path / "missing")


def test_nonfinite_points_are_stored_and_done(blobs, tmp_path):
    model = _model(blobs)
    obj = Objective(model, data=blobs.train)
    d = random_direction(obj, seed=0, norm="none")
    land = landscape_2d(obj, d, d, [0.0, 1e38], [0.0, 1e38], path=tmp_path / "g")
    assert not np.isfinite(land.loss[1, 1]) and np.isfinite(land.loss[0, 0])
    back = Landscape.load(tmp_path / "g")
    assert back.done.all() and not np.isfinite(back.loss[1, 1])
    fig = back.plot("heatmap").figure  # NaN cells are gaps, not a crash
    assert fig.axes
    d = back.to_dict()
    assert d["values"]["loss"][3] is None


def test_huge_chunk_request_is_bounded(blobs, monkeypatch):
    model = _model(blobs)
    obj = Objective(model, data=blobs.train, dtype=torch.float64)
    d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)
    ref = landscape_2d(obj, d1, d2, np.linspace(-1, 1, 3), np.linspace(-1, 1, 3))
    # pretend memory holds only 2 stacked points
    monkeypatch.setattr(L, "_STACK_BUDGET_BYTES", 2 * obj.num_params * 8)
    sizes = []
    real = Objective.loss_many
    monkeypatch.setattr(
        Objective, "loss_many", lambda self, s, **kw: (sizes.append(len(s)), real(self, s, **kw))[1]
    )
    land = landscape_2d(obj, d1, d2, np.linspace(-1, 1, 3), np.linspace(-1, 1, 3), chunk=10**12)
    assert max(sizes) == 2 and land.settings["chunk"] == 2
    np.testing.assert_allclose(land.loss, ref.loss, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- refinement and non-convexity
def test_refine_adds_points_where_values_change_most(blobs):
    model = _model(blobs)
    obj = Objective(model, data=blobs.train, dtype=torch.float64)
    d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)
    land = landscape_2d(obj, d1, d2, np.linspace(-2, 2, 5), np.linspace(-2, 2, 4))
    fine = refine(land, obj, k=2)
    assert len(fine.alphas) == 7 and len(fine.betas) == 6 and fine.complete
    i_new = [i for i, a in enumerate(fine.alphas) if a not in land.alphas][0]
    for j, b in enumerate(fine.betas):
        theta = obj.theta() + fine.alphas[i_new] * d1.vector + b * d2.vector
        assert abs(fine.loss[i_new, j] - _naive_loss(model, theta, blobs.train.x, blobs.train.y)[0]) < 1e-9
    diffs = np.abs(np.diff(land.loss, axis=0)).max(axis=1)
    worst = int(np.argmax(diffs))
    assert 0.5 * (land.alphas[worst] + land.alphas[worst + 1]) in fine.alphas
    one = landscape_1d(obj, d1, np.linspace(-1, 1, 3))
    assert len(refine(one, obj, k=1).alphas) == 4
    with pytest.raises(ConfigError, match="metric='acc'"):
        refine(land, obj, metric="acc")


def _synthetic(f, n=21):
    a = np.linspace(-1, 1, n)
    aa, bb = np.meshgrid(a, a, indexing="ij")
    z = f(aa, bb)
    return Landscape(a, a.copy(), {"loss": z}, np.ones(z.shape, bool), {"kind": "2d"})


@pytest.mark.parametrize(
    "f, frac, ratio",
    [
        (lambda a, b: 1 + a**2 + 2 * b**2, 0.0, 0.0),
        (lambda a, b: 1 + a**2 - b**2, 1.0, 1.0),
        (lambda a, b: 1 + 2 * a**2 - b**2, 1.0, 0.5),
        (lambda a, b: 1 + (a + b) ** 2 - 0.25 * (a - b) ** 2, 1.0, 0.25),
    ],
)
def test_nonconvexity_closed_forms(f, frac, ratio):
    nc = nonconvexity(_synthetic(f), max_rise=None)
    assert nc.fraction_negative == pytest.approx(frac)
    assert nc.mean_ratio == pytest.approx(ratio, abs=1e-9)
    assert nc.num_points == 19 * 19


def test_nonconvexity_region_is_low_loss_component():
    nc = nonconvexity(_synthetic(lambda a, b: a**2 + b**2), max_rise=0.105)
    # interior points with a^2 + b^2 <= 0.1 on the 0.1-spaced grid
    a = np.linspace(-1, 1, 21)[1:-1]
    aa, bb = np.meshgrid(a, a, indexing="ij")
    assert nc.num_points == int((aa**2 + bb**2 <= 0.105).sum())
    assert np.isnan(nc.ratio_map[0, 0]) and nc.ratio_map[10, 10] == 0


def test_resnet_skip_connections_reduce_nonconvexity(mnist1d):
    """Li et al.'s finding as a number (reduced: depth 20, width 8, short training, 11x11 grid on 256 samples)."""
    from lrbs.train import fit

    out = {}
    for skip in (True, False):
        model = build_model("resnet1d", dataset=mnist1d, depth=20, width=8, skip=skip, seed=0)
        fit(model, mnist1d, optimizer="adam", lr=3e-3, batch_size=128, steps=60, seed=0, eval_every=60)
        obj = Objective(model, data=mnist1d.train, max_samples=256)
        d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)
        land = landscape_2d(
            obj, d1, d2, np.linspace(-0.5, 0.5, 11), np.linspace(-0.5, 0.5, 11), metrics=("loss",)
        )
        out[skip] = nonconvexity(land, max_rise=None)
    print({k: v.to_dict() for k, v in out.items()})
    assert out[False].mean_ratio > out[True].mean_ratio
    assert out[False].fraction_negative > out[True].fraction_negative


# --------------------------------------------------------------------------- plots
def test_plots_return_figures(blobs):
    from matplotlib.figure import Figure

    model = _model(blobs)
    obj = Objective(model, data=blobs.train)
    d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)
    land = landscape_2d(obj, d1, d2, np.linspace(-1, 1, 5), np.linspace(-1, 1, 4))
    fig = land.plot("contour", trajectory=np.array([[0.5, 0.5], [0.0, 0.0]])).figure
    assert isinstance(fig, Figure)
    cs = [c for c in fig.axes[0].get_children() if hasattr(c, "levels")][0]
    ratios = cs.levels[1:] / cs.levels[:-1]
    assert np.allclose(ratios, ratios[0])  # log-spaced levels
    for kind in ("heatmap", "surface"):
        assert isinstance(land.plot(kind).figure, Figure)
    one = landscape_1d(obj, d1, [-1, 0, 1], test_obj=Objective(model, data=blobs.test))
    fig = one.plot().figure
    assert len(fig.axes[0].get_lines()) == 2
    with pytest.raises(ConfigError, match="kind='cont'"):
        land.plot("cont")


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs(blobs):
    model = _model(blobs)
    obj = Objective(model, data=blobs.train)
    d = random_direction(obj)
    with pytest.raises(ShapeError, match=rf"d2 has shape \(5,\).*\({obj.num_params},\)"):
        landscape_2d(obj, d, torch.zeros(5), [0.0], [0.0])
    with pytest.raises(ShapeError, match="direction has shape"):
        landscape_1d(obj, torch.zeros(obj.num_params + 1), [0.0])
    with pytest.raises(ConfigError, match="alphas is empty"):
        landscape_1d(obj, d, [])
    with pytest.raises(ConfigError, match="betas has non-finite values"):
        landscape_2d(obj, d, d, [0.0], [0.0, float("nan")])
    with pytest.raises(ConfigError, match="d1 has non-finite entries"):
        landscape_2d(obj, torch.full((obj.num_params,), float("inf")), d, [0.0], [0.0])
    with pytest.raises(LrbsTypeError, match="direction=str"):
        landscape_1d(obj, "up", [0.0])
    with pytest.raises(ConfigError, match="norm='filters'.*Did you mean 'filter'"):
        random_direction(obj, norm="filters")
    with pytest.raises(ConfigError, match="ignore='bias'"):
        random_direction(obj, ignore="bias")
    with pytest.raises(ConfigError, match="metrics=.*must include 'loss'"):
        landscape_1d(obj, d, [0.0], metrics=("accuracy",))
    with pytest.raises(ConfigError, match="chunk=0"):
        landscape_1d(obj, d, [0.0], chunk=0)
    with pytest.raises(ConfigError, match="k=0"):
        eigen_direction(obj, 0)
    with pytest.raises(ConfigError, match="at least 3"):
        pca_directions([torch.zeros(3)] * 2)
    with pytest.raises(ConfigError, match="needs obj="):
        pca_directions([{"a": torch.zeros(3)}] * 3)
    with pytest.raises(ShapeError, match=r"trajectory\[1\] has 4 entries"):
        pca_directions([torch.zeros(3), torch.zeros(4), torch.zeros(3)])
    with pytest.raises(ConfigError, match="needs a 2-D landscape"):
        nonconvexity(landscape_1d(obj, d, [0.0, 1.0]))
    with pytest.raises(ConfigError, match="at least 3x3"):
        nonconvexity(landscape_2d(obj, d, d, [0.0, 1.0], [0.0, 1.0]))
    with pytest.raises(ConfigError, match="max_rise=-1"):
        nonconvexity(_synthetic(lambda a, b: a**2), max_rise=-1)
    with pytest.raises(ShapeError, match="test_obj has a different parameter layout"):
        landscape_1d(obj, d, [0.0], test_obj=Objective(_model(blobs, width=5), data=blobs.test))
    assert isinstance(d, Direction)


# --------------------------------------------------------------------------- CLI
def test_cli_landscape(blobs, tmp_path, capsys):
    from lrbs.cli import main
    from lrbs.train import save_checkpoint

    model = build_model("mlp", dataset=blobs, depth=3, width=8)
    save_checkpoint(model, tmp_path / "m.safetensors")
    opts = '{"n_train": 128, "n_test": 64, "num_features": 6, "num_classes": 3, "seed": 0}'
    args = [
        "landscape",
        "--checkpoint",
        str(tmp_path / "m.safetensors"),
        "--model",
        "mlp",
        "--model-opts",
        '{"depth": 3, "width": 8}',
        "--dataset",
        "blobs",
        "--dataset-opts",
        opts,
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args + ["--grid", "5", "--range", "0.5", "--test"]) == 0
    out = capsys.readouterr().out
    assert "centre loss" in out and "non-convex fraction" in out
    land = Landscape.load(tmp_path / "o" / "landscape")
    assert land.shape == (5, 5) and land.complete and "test_loss" in land.values
    assert (tmp_path / "o" / "landscape.png").is_file()
    obj = Objective(model, data=blobs.train)
    centre = obj.loss()
    assert land.loss[2, 2] == pytest.approx(centre, rel=1e-6)
    assert main(args + ["--grid", "1"]) == 2
    assert "--grid=1 is not allowed" in capsys.readouterr().err
