"""Curvature: Lanczos / power eigenvalues, Hutchinson / Hutch++ traces, SLQ density, against dense float64
Hessians."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrbs.curvature import (
    RESIDUAL_TOL,
    VALUE_TOL,
    eigen_tolerance,
    hessian_eigenvalues,
    hessian_operator,
    hessian_trace,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenvalues,
    power_iteration,
    slq_density,
    spectral_density,
)
from lrbs.data import load_dataset
from lrbs.errors import ConfigError, LrbsTypeError, ShapeError
from lrbs.models import build_model
from lrbs.objective import Objective


@pytest.fixture(scope="module")
def data():
    return load_dataset("blobs", n_train=96, n_test=8, num_features=6, num_classes=3, seed=1)


def _model(kind: str, ds):
    if kind == "tanh":
        return build_model("mlp", dataset=ds, depth=3, width=10, activation="tanh", seed=0)
    if kind == "relu":
        return build_model("mlp", dataset=ds, depth=3, width=10, seed=1)
    if kind == "conv":
        return build_model("cnn1d", dataset=ds, channels=3, seed=2)
    # BatchNorm MLP with non-trivial running statistics (a few train-mode passes on the test's own model)
    m = build_model("mlp", dataset=ds, depth=3, width=8, batchnorm=True, seed=3)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(ds.train.x * 1.5 + 0.3)
    m.eval()
    return m


def dense_hessian(obj: Objective) -> torch.Tensor:
    f = obj.loss_tensor
    if obj.bn == "train":
        # torch.func.hessian (and jacrev of jacrev) give a wrong, non-symmetric Hessian through train-mode
        # BatchNorm on torch 2.13 (the vmap rule of the batch-norm double backward); the plain double-backward
        # loop is exact, and so are lrbs' HVPs (both rev_rev and fwd_rev agree with it).
        return torch.autograd.functional.hessian(f, obj.theta())
    return torch.func.hessian(f)(obj.theta())


CASES = [("tanh", "eval"), ("relu", "eval"), ("conv", "eval"), ("bn", "eval"), ("bn", "train")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{b}" for a, b in CASES])
def case(request, data):
    kind, bn = request.param
    model = _model(kind, data)
    obj = Objective(model, data=data, dtype=torch.float64, bn=bn)
    H = dense_hessian(obj)
    ev = torch.linalg.eigvalsh(H).flip(0).numpy()  # descending
    return model, obj, H, ev


def test_top_eigenvalues_match_dense_hessian(case, untouched):
    model, obj, H, ev = case
    check = untouched(model)
    top1 = hessian_eigenvalues(obj, k=1, tol=1e-4, tol_on="residual")
    assert top1.converged
    assert abs(top1.top - ev[0]) <= 1e-4 * abs(ev[0])
    top5 = hessian_eigenvalues(obj, k=5, return_vectors=True, tol=1e-4, tol_on="residual")
    np.testing.assert_allclose(top5.values, ev[:5], rtol=1e-3)
    assert np.all(np.diff(top5.values) <= 0)
    # the reported residuals are the true residuals ||H v - lambda v||
    V = top5.vectors
    true_res = (V @ H - torch.as_tensor(top5.values)[:, None] * V).norm(dim=1).numpy()
    np.testing.assert_allclose(top5.residuals, true_res, atol=1e-8 * abs(ev[0]))
    np.testing.assert_allclose((V @ V.T).numpy(), np.eye(5), atol=1e-8)
    assert top5.settings["bn"] == obj.bn and top5.settings["dtype"] == "float64"
    json.dumps(top5.to_dict())
    check()


def test_power_iteration_baseline_matches_dense(case):
    _, obj, _, ev = case
    res = hessian_eigenvalues(obj, method="power", tol=1e-5, max_iter=3000)
    assert abs(res.top - ev[0]) <= 1e-4 * abs(ev[0])
    assert res.method == "power"


def test_trace_within_three_standard_errors(case, untouched):
    model, obj, H, _ = case
    check = untouched(model)
    exact = float(H.trace())
    for method, kw in (("hutchinson", {"rtol": 0}), ("hutch++", {})):
        res = hessian_trace(obj, method=method, num_hvps=30, seed=3, **kw)
        assert res.num_hvps == 30
        assert abs(res.value - exact) <= 3 * res.stderr + 1e-10, (method, res.value, exact, res.stderr)
    check()


def test_density_of_a_network_integrates_to_one_within_the_spectrum(case, untouched):
    model, obj, _, ev = case
    check = untouched(model)
    d = spectral_density(obj, num_runs=2, lanczos_steps=30, seed=0)
    assert np.trapezoid(d.density, d.grid) == pytest.approx(1.0, abs=1e-3)
    assert d.nodes[np.isfinite(d.nodes)].max() <= ev[0] * (1 + 1e-9) + 1e-12
    assert d.nodes[np.isfinite(d.nodes)].min() >= ev[-1] - 1e-9 * abs(ev[-1]) - 1e-12
    np.testing.assert_allclose(d.weights.sum(1), 1.0, atol=1e-10)
    outside = (d.grid < ev[-1] - 4 * d.sigma) | (d.grid > ev[0] + 4 * d.sigma)
    assert np.trapezoid(np.where(outside, d.density, 0.0), d.grid) < 1e-3
    assert 0.0 <= d.negative_mass <= 1.0
    assert d.settings["bn"] == obj.bn
    check()


# --------------------------------------------------------------------------- explicit operators
def _sym(n: int, eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * eigs) @ Q.T


def test_which_selects_algebraic_or_magnitude_order():
    eigs = torch.cat(
        [torch.tensor([5.0, 4.0]), torch.linspace(-1, 1, 56), torch.tensor([-9.0, -8.0])]
    ).double()
    A = _sym(60, eigs)
    ref = np.sort(eigs.numpy())
    np.testing.assert_allclose(
        lanczos_eigenvalues(A, k=2, which="LA", tol=1e-10).values, ref[::-1][:2], rtol=1e-8
    )
    np.testing.assert_allclose(lanczos_eigenvalues(A, k=2, which="SA", tol=1e-10).values, ref[:2], rtol=1e-8)
    np.testing.assert_allclose(
        lanczos_eigenvalues(A, k=2, which="LM", tol=1e-10).values, [-9.0, -8.0], rtol=1e-8
    )
    # power iteration: LM finds -9; LA shifts and still finds the largest algebraic values
    np.testing.assert_allclose(power_iteration(A, k=1, which="LM", tol=1e-9).values, [-9.0], rtol=1e-6)
    np.testing.assert_allclose(power_iteration(A, k=2, which="LA", tol=1e-9).values, [5.0, 4.0], rtol=1e-6)


def test_lanczos_needs_fewer_matvecs_than_power_iteration():
    eigs = torch.cat(
        [torch.tensor([10.0, 9.0]), torch.rand(198, generator=torch.Generator().manual_seed(0)) * 8]
    )
    A = _sym(200, eigs.double())
    lz = lanczos_eigenvalues(A, k=1, tol=1e-6)
    pw = power_iteration(A, k=1, tol=1e-6)
    assert lz.top == pytest.approx(10.0, rel=1e-8) and pw.top == pytest.approx(10.0, rel=1e-6)
    assert lz.num_hvps < pw.num_hvps / 2


def test_warm_start_saves_matvecs(data):
    obj = Objective(_model("tanh", data), data=data, dtype=torch.float64)
    cold = hessian_eigenvalues(obj, return_vectors=True, tol=1e-4, tol_on="residual")
    warm = hessian_eigenvalues(obj, init=cold.vectors[0], tol=1e-4, tol_on="residual")
    assert warm.top == pytest.approx(cold.top, rel=1e-6)
    assert warm.num_hvps < cold.num_hvps


def test_lanczos_exhausts_a_small_space_exactly():
    eigs = torch.tensor([3.0, 1.0, 1.0, -2.0]).double()  # repeated eigenvalue: breakdown and restart
    res = lanczos_eigenvalues(_sym(4, eigs), k=4, tol=1e-10)
    np.testing.assert_allclose(res.values, [3.0, 1.0, 1.0, -2.0], atol=1e-10)
    assert res.converged and res.num_hvps == 4


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    n = 300
    eigs = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2
    A = _sym(n, eigs)
    exact = float(eigs.sum())
    err_h = [hutchinson_trace(A, num_matvecs=30, seed=s).value - exact for s in range(20)]
    err_pp = [hutchpp_trace(A, num_matvecs=30, seed=s).value - exact for s in range(20)]
    rms_h, rms_pp = np.sqrt(np.mean(np.square(err_h))), np.sqrt(np.mean(np.square(err_pp)))
    assert rms_pp < rms_h / 3
    # Hutchinson's standard error estimates its true spread
    assert np.mean([hutchinson_trace(A, num_matvecs=30, seed=s).stderr for s in range(20)]) == pytest.approx(
        rms_h, rel=0.5
    )


def test_hutchinson_rtol_stops_early():
    A = _sym(50, torch.linspace(1, 2, 50).double())
    res = hutchinson_trace(A, num_matvecs=1000, block=10, rtol=0.05)
    assert res.num_hvps < 1000 and res.stderr <= 0.05 * abs(res.value)


def test_density_matches_smoothed_dense_histogram():
    n = 80
    g = torch.Generator().manual_seed(5)
    eigs = torch.cat([torch.randn(70, generator=g) * 0.5, 4 + torch.rand(10, generator=g)]).double()
    A = _sym(n, eigs, seed=1)
    d = slq_density(A, num_runs=40, lanczos_steps=n, sigma=0.3, seed=0)
    t = d.grid
    ref = np.exp(-0.5 * ((t[:, None] - eigs.numpy()[None]) / 0.3) ** 2).sum(1) / (
        n * 0.3 * math.sqrt(2 * math.pi)
    )
    l1 = np.trapezoid(np.abs(d.density - ref), t)
    assert l1 < 0.15
    assert np.trapezoid(d.density, t) == pytest.approx(1.0, abs=1e-6)
    assert d.negative_mass == pytest.approx(float((eigs < 0).double().mean()), abs=0.08)
    # fewer steps: still a quadrature of the same measure, the mass stays where the eigenvalues are
    d2 = slq_density(A, num_runs=4, lanczos_steps=20, seed=1)
    assert np.nanmax(d2.nodes) <= float(eigs.max()) + 1e-9 and np.nanmin(d2.nodes) >= float(eigs.min()) - 1e-9


def test_density_plot_and_explicit_grid():
    A = _sym(20, torch.linspace(-1, 3, 20).double())
    d = slq_density(A, num_runs=2, lanczos_steps=10, grid=np.linspace(-3, 5, 500))
    assert d.grid.shape == (500,) and d.density.shape == (500,)
    ax = d.plot(log=True)
    assert ax.get_yscale() == "log"
    assert d.plot(log=False).get_yscale() == "linear"
    json.dumps(d.to_dict())


def test_float32_objective_agrees_with_float64(data):
    model = _model("relu", data)
    ref = hessian_eigenvalues(
        Objective(model, data=data, dtype=torch.float64), tol=1e-8, tol_on="residual"
    ).top
    res = hessian_eigenvalues(Objective(model, data=data), tol=1e-4, tol_on="residual")
    assert res.settings["dtype"] == "float32"
    assert res.top == pytest.approx(ref, rel=1e-4)


def test_hessian_operator_matches_dense(case):
    _, obj, H, _ = case
    matmat, theta = hessian_operator(obj)
    V = torch.randn(3, obj.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(matmat(V).numpy(), (V @ H).numpy(), rtol=1e-8, atol=1e-10)
    assert torch.equal(theta, obj.theta())


# --------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def small_obj(data):
    return Objective(_model("relu", data), data=data, dtype=torch.float64)


def test_bad_arguments(small_obj):
    n = small_obj.num_params
    with pytest.raises(
        ConfigError, match=rf"k={n + 1} is not allowed: must be <= the number of parameters \({n}\)"
    ):
        hessian_eigenvalues(small_obj, k=n + 1)
    with pytest.raises(ConfigError, match=r"tol=0 is not allowed: must be a finite number > 0"):
        hessian_eigenvalues(small_obj, tol=0)
    with pytest.raises(ConfigError, match=r"tol=-1.0 is not allowed"):
        hessian_eigenvalues(small_obj, method="power", tol=-1.0)
    with pytest.raises(ConfigError, match=r"method='lanczoz' is not allowed.*Did you mean 'lanczos'"):
        hessian_eigenvalues(small_obj, method="lanczoz")
    with pytest.raises(ConfigError, match=r"which='LR' is not allowed: must be one of \['LA', 'SA', 'LM'\]"):
        hessian_eigenvalues(small_obj, which="LR")
    with pytest.raises(ShapeError, match=rf"init has 3 entries: must be a vector of the {n} parameters"):
        hessian_eigenvalues(small_obj, init=torch.ones(3))
    with pytest.raises(ConfigError, match=r"init must be a finite, non-zero vector"):
        hessian_eigenvalues(small_obj, init=torch.zeros(n))
    with pytest.raises(ConfigError, match=r"method='hutch' is not allowed.*Did you mean 'hutch\+\+'"):
        hessian_trace(small_obj, method="hutch")
    with pytest.raises(ConfigError, match=r"num_matvecs=2 is not allowed: must be an integer >= 3"):
        hessian_trace(small_obj, method="hutch++", num_hvps=2)
    with pytest.raises(ConfigError, match=r"num_hvps=1 is not allowed: must be an integer >= 2"):
        hessian_trace(small_obj, num_hvps=1)
    with pytest.raises(ConfigError, match=r"probe_samples=0 is not allowed: must be an integer >= 1"):
        hessian_trace(small_obj, probe_samples=0)
    with pytest.raises(ConfigError, match=r"rtol=-0.1 is not allowed: must be a finite number > 0"):
        hessian_trace(small_obj, rtol=-0.1)
    with pytest.raises(ConfigError, match=r"rtol=0.1 is not allowed with method='hutch\+\+'"):
        hessian_trace(small_obj, method="hutch++", rtol=0.1)
    with pytest.raises(ConfigError, match=r"sigma=0 is not allowed: must be a finite number > 0"):
        spectral_density(small_obj, sigma=0, num_runs=1, lanczos_steps=3)
    with pytest.raises(ConfigError, match=r"grid must be an int >= 2 or an increasing"):
        spectral_density(small_obj, grid=[1.0, 0.0], num_runs=1, lanczos_steps=3)
    with pytest.raises(ConfigError, match=r"num_runs=0 is not allowed: must be an integer >= 1"):
        spectral_density(small_obj, num_runs=0)


def test_non_finite_parameters_raise(small_obj):
    theta = small_obj.theta()
    theta[0] = float("nan")
    for fn in (hessian_eigenvalues, hessian_trace, spectral_density):
        with pytest.raises(ConfigError, match=r"params has 1 non-finite entries \(NaN or inf\)"):
            fn(small_obj, params=theta)


def test_bad_operators():
    with pytest.raises(ShapeError, match=r"operator has shape \(2, 3\): an explicit matrix must be square"):
        lanczos_eigenvalues(torch.zeros(2, 3))
    with pytest.raises(ConfigError, match=r"n=None is not allowed with a matmat callable"):
        hutchinson_trace(lambda v: v)
    with pytest.raises(LrbsTypeError, match=r"operator=str is not allowed"):
        power_iteration("A", 3)


def test_model_without_trainable_parameters_and_non_scalar_loss(data):
    frozen = _model("relu", data).requires_grad_(False)
    with pytest.raises(ConfigError, match=r"the model has no trainable parameters"):
        Objective(frozen, data=data)
    with pytest.raises(ShapeError, match=r"loss_fn must return a scalar"):
        Objective(
            _model("relu", data),
            lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
            data=data,
        )


def test_lanczos_on_a_dead_network_stays_finite():
    """Regression (the README's own example): one-cycle at the range test's upper bound kills a cnn1d (constant
    output, a numerically low-rank Hessian). Lanczos then exhausts its Krylov space and restarts; breakdown must
    be judged against the operator's scale seen so far, or float32 roundoff is normalized up until the
    tridiagonal overflows (it raised "array must not contain infs or NaNs")."""
    import lrbs
    from lrbs import schedules as S

    ds = lrbs.load_dataset("mnist1d")
    model = lrbs.build_model("cnn1d", dataset=ds)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rt = lrbs.lr_range_test(model, opt, data=ds, batch_size=100, repeats=3)
    _, max_lr = rt.lr_bounds()
    lrbs.fit(model, ds, optimizer="sgd", lr=S.one_cycle(max_lr, 2000), batch_size=100, steps=2000)
    obj = lrbs.Objective(model, data=ds.train)
    res = lrbs.hessian_eigenvalues(obj, k=5, tol=1e-4, tol_on="residual")
    assert np.all(np.isfinite(res.values)) and np.all(np.isfinite(res.residuals))
    # against the same operator's eigenvalues from a long Lanczos run with a different start
    ref = lrbs.hessian_eigenvalues(obj, k=5, tol=1e-10, tol_on="residual", max_iter=200, seed=7).values
    np.testing.assert_allclose(res.values[:2], ref[:2], rtol=1e-3)


# --------------------------------------------------------------------------- start vector and value tolerance
def test_hvp_gradient_is_the_gradient_and_reuses_the_hvp_graph(small_obj, monkeypatch):
    obj = small_obj
    monkeypatch.setattr(obj, "hvp_method", "rev_rev")  # restored afterwards: the fixture is shared
    obj.clear_cache()
    g = obj.hvp_gradient()
    cache = obj._graph_cache
    assert cache is not None  # the HVP graph was built once ...
    hv = obj.hvp(obj.theta(), torch.ones(obj.num_params))
    assert obj._graph_cache is cache  # ... and the HVP reuses it
    assert torch.isfinite(hv).all()
    torch.testing.assert_close(g, obj.grad(), rtol=1e-12, atol=1e-14)
    obj.hvp_method = "fwd_rev"
    torch.testing.assert_close(obj.hvp_gradient(), obj.grad(), rtol=1e-12, atol=1e-14)


def test_gradient_start_saves_steps_and_is_recorded(case):
    _, obj, _, ev = case
    grad = hessian_eigenvalues(obj, tol=1e-8, tol_on="value")
    rand = hessian_eigenvalues(obj, tol=1e-8, tol_on="value", init="random")
    assert grad.settings["start"] == "gradient+random" and rand.settings["start"] == "random"
    for res in (grad, rand):
        assert res.converged and abs(res.top - ev[0]) <= 1e-8 * abs(ev[0])
    assert grad.num_hvps <= rand.num_hvps
    # smallest eigenvalues: "auto" starts at random (the gradient lies in the top eigenspace)
    low = hessian_eigenvalues(obj, which="SA", tol=1e-8, tol_on="value")
    assert low.settings["start"] == "random" and abs(low.top - ev[-1]) <= 1e-6 * max(abs(ev[-1]), 1e-3)


def test_value_tolerance_meets_the_dense_eigenvalue_with_fewer_steps(case):
    _, obj, _, ev = case
    for tol in (1e-3, 1e-6):
        val = hessian_eigenvalues(obj, tol=tol, tol_on="value", init="random", seed=3)
        res = hessian_eigenvalues(obj, tol=tol, tol_on="residual", init="random", seed=3)
        err = abs(val.top - ev[0])
        assert val.converged and val.tol_on == "value"
        assert err <= tol * abs(ev[0])  # the estimate was not optimistic here
        assert err <= 10 * val.error_estimates[0] + 1e-12 * abs(ev[0])  # and is not wildly pessimistic
        assert val.num_hvps < res.num_hvps
    assert json.dumps(val.to_dict())


def test_defaults_stop_on_the_eigenvalue_error_and_meet_it(case):
    """hessian_eigenvalues(obj): Lanczos, gradient start, tol 1e-3 on the estimated eigenvalue error -- and the
    true error against the dense Hessian is within it; vectors and power iteration keep the residual test."""
    _, obj, H, ev = case
    res = hessian_eigenvalues(obj)
    assert (res.method, res.tol_on, res.tol) == ("lanczos", "value", VALUE_TOL) and VALUE_TOL == 1e-3
    assert res.converged and res.settings["start"] == "gradient+random"
    assert res.error_estimates[0] <= 1e-3 * abs(res.top)
    assert abs(res.top - ev[0]) <= 1e-3 * abs(ev[0])
    assert res.num_hvps < hessian_eigenvalues(obj, tol=1e-4, tol_on="residual").num_hvps
    vec = hessian_eigenvalues(obj, return_vectors=True)
    assert (vec.tol_on, vec.tol) == ("residual", RESIDUAL_TOL) and RESIDUAL_TOL == 1e-4
    V = vec.vectors
    assert float((V @ H - vec.top * V).norm()) <= 1e-4 * abs(vec.top) * (1 + 1e-6)
    power = hessian_eigenvalues(obj, method="power")
    assert (power.tol_on, power.tol) == ("residual", RESIDUAL_TOL)


def test_eigen_tolerance_resolves_the_defaults():
    assert eigen_tolerance("lanczos", None, None, False) == ("value", 1e-3)
    assert eigen_tolerance("lanczos", None, 1e-6, False) == ("value", 1e-6)
    assert eigen_tolerance("lanczos", None, None, True) == ("residual", 1e-4)
    assert eigen_tolerance("lanczos", "value", None, True) == ("value", 1e-3)
    assert eigen_tolerance("lanczos", "residual", None, False) == ("residual", 1e-4)
    assert eigen_tolerance("power", None, 1e-5, False) == ("residual", 1e-5)
    with pytest.raises(ConfigError, match=r"tol_on='value' is not allowed with method='power'"):
        eigen_tolerance("power", "value", None, False)


def test_value_errors_on_a_known_matrix():
    # eigenvalues 10, 9 and a bulk in [0, 5]: once the top two are resolved, r^2 / gap bounds the true error
    eigs = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(0, 5, 98)]).double()
    A = _sym(100, eigs)
    for steps in (6, 8, 10):
        r = lanczos_eigenvalues(A, tol=1e-14, max_iter=steps, min_steps=steps, tol_on="value")
        true = 10.0 - r.top
        assert true > 1e-12  # not yet converged to roundoff: the bound is actually tested
        assert true <= r.error_estimates[0]
        assert r.error_estimates[0] <= r.residuals[0] + 1e-15


def test_zero_gradient_falls_back_to_a_random_start(small_obj, monkeypatch):
    monkeypatch.setattr(small_obj, "hvp_gradient", lambda theta=None: torch.zeros(small_obj.num_params))
    res = hessian_eigenvalues(small_obj, k=2)
    ref = hessian_eigenvalues(small_obj, k=2, init="random")
    assert res.settings["start"] == "random (zero gradient)"
    np.testing.assert_array_equal(res.values, ref.values)


def test_bad_start_and_tolerance_kind(small_obj):
    with pytest.raises(
        ConfigError, match=r"init='gradiant' is not allowed: must be one of \['auto', 'gradient'"
    ):
        hessian_eigenvalues(small_obj, init="gradiant")
    with pytest.raises(
        ConfigError, match=r"tol_on='values' is not allowed: must be one of \['residual', 'value'\]"
    ):
        hessian_eigenvalues(small_obj, tol_on="values")
    with pytest.raises(ConfigError, match=r"tol_on='value' is not allowed with method='power'"):
        hessian_eigenvalues(small_obj, method="power", tol_on="value")


@pytest.mark.parametrize("method", ["rev_rev", "fwd_rev"])
def test_block_hvp_batched_and_loop_match_the_dense_hessian(case, method, monkeypatch):
    _, obj, H, _ = case
    V = torch.randn(5, obj.num_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = V @ H
    scale = float(ref.abs().max())
    for block in ("loop", "batched"):
        got = obj.hvp(obj.theta(), V, method=method, block=block)
        assert got.shape == V.shape
        assert float((got - ref).abs().max()) <= 1e-10 * scale, block
    monkeypatch.setattr(obj, "hvp_block_chunk", 2)  # chunks of 2, 2, 1 rows
    got = obj.hvp(obj.theta(), V, method=method, block="batched")
    assert float((got - ref).abs().max()) <= 1e-10 * scale


def test_block_hvp_by_rule_or_timed_on_request_keeps_the_rows(data):
    obj = Objective(_model("tanh", data), data=data, dtype=torch.float64)
    H = dense_hessian(obj)
    V = torch.randn(7, obj.num_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(obj.theta(), V), V @ H, rtol=1e-10, atol=1e-12)
    assert obj.settings()["hvp_block"] == "loop"  # the CPU rule, no timing race
    got = obj.hvp(obj.theta(), V, block="timed")  # opt-in: both ways timed on two rows, then the rest
    assert obj.hvp_block in ("loop", "batched")
    assert set(obj.hvp_block_timings) == {"loop", "batched"}
    assert math.isfinite(obj.hvp_block_timings["batched"])  # it agreed with the loop here
    torch.testing.assert_close(got, V @ H, rtol=1e-10, atol=1e-12)
    chosen = obj.hvp_block
    obj.hvp(obj.theta(), V[:3])
    assert obj.hvp_block == chosen  # not re-timed
    with pytest.raises(ConfigError, match=r"block='vmap' is not allowed: must be one of \['loop', 'batched'"):
        obj.hvp(obj.theta(), V, block="vmap")


def test_a_batched_block_that_disagrees_is_never_chosen(data, monkeypatch):
    obj = Objective(_model("tanh", data), data=data, dtype=torch.float64)
    wrong = obj._hvp_batched
    monkeypatch.setattr(obj, "_hvp_batched", lambda theta, V, method: 2 * wrong(theta, V, method))
    V = torch.randn(3, obj.num_params, dtype=torch.float64)
    got = obj.hvp(obj.theta(), V, block="timed")
    assert obj.hvp_block == "loop" and obj.hvp_block_timings["batched"] == math.inf
    torch.testing.assert_close(got, V @ dense_hessian(obj), rtol=1e-10, atol=1e-12)
