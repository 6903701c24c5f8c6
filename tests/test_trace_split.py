"""The data-split Hutchinson trace (hessian_trace's default): Objective.rebatched / batch_hvp against dense float64
Hessians of each piece, the estimator against closed forms (unbiased, its variance formula, its standard error)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zoo_thirdparty as zoo

from lrbs.curvature import PROBE_SAMPLES, TRACE_RTOL, batch_hutchinson_trace, hessian_trace
from lrbs.data import load_dataset
from lrbs.errors import ConfigError, ShapeError
from lrbs.models import build_model
from lrbs.objective import STACK_LIMIT, Objective, rule_batch_hvp_block


@pytest.fixture(scope="module")
def data():
    return load_dataset("blobs", n_train=90, n_test=8, num_features=5, num_classes=3, seed=2)


@pytest.fixture(scope="module")
def obj(data):
    model = build_model("mlp", dataset=data, depth=2, width=6, activation="tanh", seed=0)
    return Objective(model, data=data, dtype=torch.float64)


def _piece_hessians(obj: Objective) -> list[torch.Tensor]:
    """Dense float64 Hessian of each batch's term (w_c / sum w) L_c, by torch.func.hessian."""
    out = []
    for batch, w in zip(obj.batches, obj.batch_weights):
        c = w / obj.total_weight
        out.append(torch.func.hessian(lambda t, b=batch, c=c: obj.loss_on(t, b) * c)(obj.theta()))
    return out


def _sym(n: int, eigs: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(eigs) @ Q.T


def test_rebatched_keeps_the_objective_and_cuts_in_order(obj):
    pieces = obj.rebatched(32)
    assert [len(b[-1]) for b in pieces.batches] == [32, 32, 26]
    assert torch.equal(torch.cat([b[0] for b in pieces.batches]), obj.batches[0][0])
    theta = obj.theta() + 0.01
    assert pieces.loss(theta) == pytest.approx(obj.loss(theta), rel=1e-12)
    v = torch.randn(obj.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pieces.hvp(theta, v), obj.hvp(theta, v), rtol=1e-10, atol=1e-12)
    assert len(obj.batches) == 1  # the original is unchanged


def test_batch_hvp_rows_are_the_pieces_dense_hessians(obj):
    pieces = obj.rebatched(40)
    H = _piece_hessians(pieces)
    assert len(H) == 3
    torch.testing.assert_close(
        sum(H), torch.func.hessian(obj.loss_tensor)(obj.theta()), rtol=1e-9, atol=1e-12
    )
    V = torch.randn(3, obj.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = pieces.batch_hvp(pieces.theta(), V)
    want = torch.stack([Hc @ v for Hc, v in zip(H, V)])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    fwd = pieces.batch_hvp(pieces.theta(), V, method="fwd_rev")
    torch.testing.assert_close(fwd, want, rtol=1e-9, atol=1e-12)


def test_batch_hutchinson_is_unbiased_with_the_stated_variance():
    """Closed form: per-pass variance 2 sum_c (||A_c||_F^2 - sum diag(A_c)^2); the stderr estimates its spread."""
    n = 40
    A = [_sym(n, torch.linspace(-1, 3, n).double() * (c + 1), seed=0) for c in range(3)]  # alike pieces
    exact = float(sum(a.trace() for a in A))
    var_pass = sum(2 * (float((a**2).sum()) - float((a.diagonal() ** 2).sum())) for a in A)

    def mm(Z):
        return torch.stack([a @ z for a, z in zip(A, Z)])

    runs = [batch_hutchinson_trace(mm, (3, n), num_passes=4, rtol=0, seed=s) for s in range(400)]
    vals = np.array([r.value for r in runs])
    sd_mean = math.sqrt(var_pass / 4)
    assert abs(vals.mean() - exact) <= 4 * sd_mean / math.sqrt(len(vals))
    assert vals.std(ddof=1) == pytest.approx(sd_mean, rel=0.12)
    assert np.mean([r.stderr for r in runs]) == pytest.approx(sd_mean, rel=0.12)
    assert all(r.num_hvps == 4 for r in runs)
    # and one shared probe on the sum has the (here larger) variance of the summed matrix
    S = sum(A)
    var_shared = 2 * (float((S**2).sum()) - float((S.diagonal() ** 2).sum()))
    assert var_shared > 1.5 * var_pass


def test_batch_hutchinson_stops_at_rtol():
    A = [_sym(30, torch.linspace(1, 2, 30).double(), seed=c) for c in range(4)]

    def mm(Z):
        return torch.stack([a @ z for a, z in zip(A, Z)])

    res = batch_hutchinson_trace(mm, (4, 30), num_passes=500, rtol=0.01, seed=0)
    assert 2 <= res.num_hvps < 500 and res.stderr <= 0.01 * abs(res.value)
    with pytest.raises(ConfigError, match=r"num_passes=1 is not allowed: must be an integer >= 2"):
        batch_hutchinson_trace(mm, (4, 30), num_passes=1)


def test_default_trace_matches_the_dense_hessian(obj, data, untouched):
    exact = float(torch.func.hessian(obj.loss_tensor)(obj.theta()).trace())
    model = build_model("mlp", dataset=data, depth=2, width=6, activation="tanh", seed=0)
    check, rng = untouched(model), torch.get_rng_state()
    hessian_trace(Objective(model, data=data), seed=0)  # the user's model and global RNG stay as they were
    check()
    assert torch.equal(torch.get_rng_state(), rng)
    res = hessian_trace(obj.rebatched(10), seed=0)  # 9 pieces of 10 samples, each of them probed
    assert abs(res.value - exact) <= 4 * res.stderr
    assert res.stderr <= TRACE_RTOL * abs(res.value) or res.num_hvps == 99
    assert res.settings["probe_samples"] == PROBE_SAMPLES and res.settings["probes"] == 9 * res.num_hvps
    errs = [hessian_trace(obj, probe_samples=15, rtol=0, num_hvps=3, seed=s).value - exact for s in range(30)]
    one = [
        hessian_trace(obj, probe_samples=None, rtol=0, num_hvps=3, seed=s).value - exact for s in range(30)
    ]
    assert abs(np.mean(errs)) <= 4 * np.std(errs) / math.sqrt(30)  # unbiased
    assert np.sqrt(np.mean(np.square(errs))) < np.sqrt(np.mean(np.square(one)))  # and better than one probe


def test_bn_train_probes_the_objectives_own_batches(data):
    model = build_model("mlp", dataset=data, depth=2, width=6, batchnorm=True, seed=3)
    obj = Objective(model, data=data, batch_size=30, bn="train", dtype=torch.float64)
    exact = float(torch.autograd.functional.hessian(obj.loss_tensor, obj.theta()).trace())
    res = hessian_trace(obj, rtol=0.02, seed=1)
    assert res.settings["probes"] == 3 * res.num_hvps
    assert abs(res.value - exact) <= 4 * res.stderr
    with pytest.raises(ConfigError, match=r"bn='train' is not allowed for rebatched\(\)"):
        obj.rebatched(10)


def test_bad_inputs(obj):
    with pytest.raises(ConfigError, match=r"batch_size=0 is not allowed: must be an integer >= 1"):
        obj.rebatched(0)
    with pytest.raises(
        ShapeError, match=rf"V has shape \(2, {obj.num_params}\): must be \(1, {obj.num_params}\)"
    ):
        obj.batch_hvp(obj.theta(), torch.zeros(2, obj.num_params, dtype=torch.float64))
    for bad in (None, 32):  # the pieces are the Hutchinson estimator's: never silently ignored
        with pytest.raises(ConfigError, match=rf"probe_samples={bad} is not allowed with method='hutch\+\+'"):
            hessian_trace(obj, method="hutch++", probe_samples=bad)


def _dense_rows(pieces: Objective, V: torch.Tensor) -> torch.Tensor:
    return torch.stack([Hc @ v for Hc, v in zip(_piece_hessians(pieces), V)])


@pytest.mark.parametrize("size, groups", [(10, 1), (20, 2)])  # 9 pieces of 10; 4 of 20 and one of 10
def test_stacked_rows_are_the_pieces_dense_hessians(obj, size, groups):
    pieces = obj.rebatched(size)
    C = len(pieces.batches)
    assert rule_batch_hvp_block(C, groups, obj.num_params, "rev_rev") == "stacked"
    V = torch.randn(C, obj.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    theta = pieces.theta() + 0.03
    got = pieces.batch_hvp(theta, V)
    assert pieces.batch_hvp_block == "stacked" and pieces.settings()["batch_hvp_block"] == "stacked"
    assert "batch_hvp_block" not in pieces.fallbacks
    want = _dense_rows(pieces.at(theta), V)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pieces.batch_hvp(theta, V, block="loop"), want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        pieces.batch_hvp(theta, 2 * V), 2 * want, rtol=1e-9, atol=1e-12
    )  # cached graph


def test_stacked_rows_on_multi_input_and_dict_batches():
    """Tuple batches (x, meta, y) of a two-input model and dict batches of a model returning a dict of losses."""
    for model, data in [
        (zoo.two_input(), zoo.two_input_data(n=24)),
        (zoo.dict_loss(), zoo.dict_loss_data(n=24)),
    ]:
        o = Objective(model, data=data, dtype=torch.float64).rebatched(6)
        V = torch.randn(4, o.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        got = o.batch_hvp(o.theta(), V)
        assert o.batch_hvp_block == "stacked"
        torch.testing.assert_close(got, _dense_rows(o, V), rtol=1e-9, atol=1e-12)


class _Branchy(torch.nn.Module):
    """A forward with data-dependent control flow, which ``vmap`` cannot run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(5, 3)

    def forward(self, x):
        out = self.lin(x)
        return out * 2 if float(out.detach().sum()) > 1e9 else out


def test_stacked_falls_back_to_the_loop_when_vmap_cannot_run(data):
    o = Objective(_Branchy(), data=data, dtype=torch.float64).rebatched(10)
    V = torch.randn(9, o.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = o.batch_hvp(o.theta(), V)
    assert o.batch_hvp_block == "loop"
    assert o.settings()["fallbacks"]["batch_hvp_block"].startswith("stacked failed (")
    torch.testing.assert_close(got, _dense_rows(o, V), rtol=1e-9, atol=1e-12)
    explicit = Objective(_Branchy(), data=data, dtype=torch.float64).rebatched(10)
    with pytest.raises(RuntimeError):
        explicit.batch_hvp(explicit.theta(), V, block="stacked")  # the user's choice is not overridden
    res = hessian_trace(Objective(_Branchy(), data=data, dtype=torch.float64), probe_samples=10, seed=0)
    assert res.settings["batch_hvp_block"] == "loop" and "batch_hvp_block" in res.settings["fallbacks"]


def test_stacked_rule_and_bad_block(obj):
    assert rule_batch_hvp_block(16, 2, 15210, "rev_rev") == "stacked"
    assert rule_batch_hvp_block(16, 2, 15210, "fwd_rev") == "loop"  # stacked is reverse-over-reverse
    assert rule_batch_hvp_block(1, 1, 15210, "rev_rev") == "loop"
    assert rule_batch_hvp_block(16, 9, 15210, "rev_rev") == "loop"  # mostly singleton groups
    assert rule_batch_hvp_block(16, 1, STACK_LIMIT // 16 + 1, "rev_rev") == "loop"  # too many copies
    pieces = obj.rebatched(10)
    with pytest.raises(ConfigError, match=r"block='batched' is not allowed"):
        pieces.batch_hvp(pieces.theta(), torch.zeros(9, obj.num_params, dtype=torch.float64), block="batched")
    res = hessian_trace(obj, probe_samples=10, seed=0)
    assert res.settings["batch_hvp_block"] == "stacked"


def test_stacked_rows_with_interleaved_groups(data):
    """Batches of 25, 25, 25, 15 cut into pieces of 10: same-shaped pieces are not consecutive (gathered rows)."""
    model = build_model("mlp", dataset=data, depth=2, width=6, activation="tanh", seed=0)
    pieces = Objective(model, data=data, batch_size=25, dtype=torch.float64).rebatched(10)
    sizes = [len(b[-1]) for b in pieces.batches]
    assert sizes == [10, 10, 5, 10, 10, 5, 10, 10, 5, 10, 5]
    V = torch.randn(
        len(sizes), pieces.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    got = pieces.batch_hvp(pieces.theta(), V)
    assert pieces.batch_hvp_block == "stacked"
    torch.testing.assert_close(got, _dense_rows(pieces, V), rtol=1e-9, atol=1e-12)
