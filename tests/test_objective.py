import copy

import numpy as np
import pytest
import torch
from torch import nn

from lrbs.errors import ConfigError, LrbsTypeError, ShapeError
from lrbs.objective import Objective


def tiny(bn: bool = False, act=nn.Tanh):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 7)]
    if bn:
        layers.append(nn.BatchNorm1d(7))
    layers += [act(), nn.Linear(7, 3)]
    m = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics
        m.train()
        with torch.no_grad():
            for _ in range(3):
                m(torch.randn(16, 6, dtype=torch.float64) * 2 + 1)
    return m


def data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def naive_metrics(model, theta, x, y, bn_mode):
    m = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, [p for p in m.parameters()])
    m.train(bn_mode == "train")
    with torch.no_grad():
        out = m(x)
        return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("method", ["sequential", "batched"])
def test_loss_many_equals_naive_loop(bn, method, untouched):
    model = tiny(bn)
    model.eval()
    check = untouched(model)
    x, y = data()
    obj = Objective(model, data=(x, y), batch_size=16, bn="eval")
    stack = obj.theta()[None] + 0.3 * torch.randn(5, obj.num_params, dtype=torch.float64)
    got = obj.loss_many(stack, method=method)
    for i in range(5):
        lo, acc = naive_metrics(model, stack[i], x, y, "eval")
        assert abs(got["loss"][i] - lo) < 1e-9
        assert abs(got["accuracy"][i] - acc) < 1e-12
    check()


def test_train_mode_bn_uses_fixed_batch_statistics(untouched):
    model = tiny(True)
    check = untouched(model)
    x, y = data(32)
    obj = Objective(model, data=(x, y), bn="train")  # one batch: batch statistics of all 32 samples
    theta = obj.theta() + 0.1
    for method in ("sequential", "batched"):
        lo = obj.loss_many(theta[None], method=method)["loss"][0]
        ref, _ = naive_metrics(model, theta, x, y, "train")
        assert abs(lo - ref) < 1e-9
    check()


def test_recompute_bn_matches_update_bn_reference():
    model = tiny(True)
    x, y = data(48)
    obj = Objective(model, data=(x, y), batch_size=16, bn="recompute")
    theta = obj.theta() * 1.1
    # reference: fresh stats as an exact average over the three batches of 16 (Garipov's update_bn), then eval
    m = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, list(m.parameters()))
    bnm = m[1]
    bnm.reset_running_stats()
    bnm.momentum = None
    m.train()
    with torch.no_grad():
        for i in range(0, 48, 16):
            m(x[i : i + 16])
    m.eval()
    with torch.no_grad():
        ref = float(nn.functional.cross_entropy(m(x), y))
    assert abs(obj.loss(theta) - ref) < 1e-9
    assert abs(obj.loss_many(theta[None])["loss"][0] - ref) < 1e-9


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("method", ["rev_rev", "fwd_rev"])
def test_hvp_equals_dense_hessian(bn, method, untouched):
    model = tiny(bn, act=nn.Tanh)
    model.eval()
    check = untouched(model)
    x, y = data()
    obj = Objective(model, data=(x, y), batch_size=16)
    theta = obj.theta()
    H = torch.func.hessian(lambda t: obj.loss_tensor(t))(theta)
    V = torch.randn(3, obj.num_params, dtype=torch.float64)
    got = obj.hvp(theta, V, method=method)
    torch.testing.assert_close(got, V @ H.T, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(obj.hvp(theta, V[0], method=method), H @ V[0], rtol=1e-9, atol=1e-11)
    # grad against autograd on a naive copy
    m = copy.deepcopy(model)
    loss = nn.functional.cross_entropy(m(x), y)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))])
    torch.testing.assert_close(obj.grad(theta), ref, rtol=1e-10, atol=1e-12)
    check()


def test_hvp_auto_choice_and_cache():
    model = tiny()
    obj = Objective(model, data=data())
    v = torch.randn(obj.num_params, dtype=torch.float64)
    a = obj.hvp(obj.theta(), v)
    assert obj.hvp_method in ("rev_rev", "fwd_rev")
    b = obj.hvp(obj.theta(), v)
    torch.testing.assert_close(a, b)
    # a different point must not reuse the cached graph
    c = obj.hvp(obj.theta() + 0.5, v, method="rev_rev")
    d = obj.hvp(obj.theta() + 0.5, v, method="fwd_rev")
    torch.testing.assert_close(c, d)
    assert not torch.allclose(a, c)


def test_dict_and_flat_forms_agree():
    obj = Objective(tiny(), data=data())
    p = obj.params()
    assert torch.equal(obj.flatten(p), obj.theta())
    g = obj.grad(p)
    assert isinstance(g, dict) and set(g) == set(p)
    assert torch.equal(obj.flatten(g), obj.grad(obj.theta()))
    assert obj.loss(p) == obj.loss()


def test_full_data_value_is_sample_weighted():
    model = tiny()
    x, y = data(37)
    a = Objective(model, data=(x, y), batch_size=10).loss()  # batches 10,10,10,7
    b = Objective(model, data=(x, y)).loss()
    assert abs(a - b) < 1e-12


def test_user_model_untouched_after_everything(untouched):
    model = tiny(True)
    model.train()
    model[0].weight.requires_grad_(True)
    model[3].bias.requires_grad_(False)
    check = untouched(model)
    obj = Objective(model, data=data(), bn="recompute")
    th = obj.theta()
    obj.loss_many(th[None] + torch.randn(3, obj.num_params, dtype=torch.float64))
    obj.hvp(th, torch.ones_like(th))
    obj.grad(th)
    obj.metrics()
    check()
    assert obj.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ConfigError, match="bn='evl'.*Did you mean 'eval'"):
        Objective(model, data=data(), bn="evl")
    with pytest.raises(LrbsTypeError, match="model=int"):
        Objective(3, data=data())
    with pytest.raises(ConfigError, match="data=None"):
        Objective(model)
    with pytest.raises(ConfigError, match="batch_size=0"):
        Objective(model, data=data(), batch_size=0)
    frozen = tiny()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        Objective(frozen, data=data())
    with pytest.raises(ShapeError, match="must return a scalar"):
        Objective(model, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), data=data())
    x, y = data()
    with pytest.raises(ConfigError, match="data is on device meta"):
        Objective(model, data=(x.to("meta"), y.to("meta")))
    obj = Objective(model, data=data())
    with pytest.raises(ShapeError, match="parameter vector has shape"):
        obj.loss(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"v has shape \(2,\)"):
        obj.hvp(obj.theta(), torch.zeros(2))
    bad = obj.theta()
    bad[0] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        obj.check_finite(bad)
    with pytest.raises(ConfigError, match="empty"):
        Objective(model, data=(x[:0], y[:0]))


def test_pickled_objective_evaluates_the_same_points():
    """Ray ships Objectives to workers: after a pickle round trip the sequential path still moves the model."""
    import pickle

    obj = Objective(tiny(bn=True), data=data(), batch_size=16)
    obj.clear_cache()
    stack = obj.theta()[None] + 0.2 * torch.randn(4, obj.num_params, dtype=torch.float64)
    other = pickle.loads(pickle.dumps(obj))
    a = obj.loss_many(stack, method="sequential")["loss"]
    b = other.loss_many(stack, method="sequential")["loss"]
    assert len(set(a.tolist())) == 4  # four different points give four different losses
    assert a.tolist() == b.tolist()


# --------------------------------------------------------------------------- which implementation runs (issue 16)
def test_methods_are_chosen_by_rule_and_recorded():
    from lrbs.objective import rule_hvp_block, rule_hvp_method, rule_loss_many_method

    obj = Objective(tiny(), data=data(), batch_size=16)
    s = obj.settings()
    assert (s["hvp_method"], s["hvp_block"], s["loss_many_method"]) == ("rev_rev", "loop", "sequential")
    assert (rule_hvp_method("cuda"), rule_hvp_block("cuda"), rule_loss_many_method("cuda")) == (
        "fwd_rev",
        "batched",
        "batched",
    )
    assert rule_loss_many_method("cuda", bn="recompute") == "sequential"
    th = obj.theta()
    obj.hvp(th, torch.randn(3, obj.num_params, dtype=torch.float64))
    obj.loss_many(th[None] + 0.1)
    assert (obj.hvp_method, obj.hvp_block, obj.loss_many_method) == ("rev_rev", "loop", "sequential")
    assert not any(hasattr(obj, a) for a in ("hvp_timings", "hvp_block_timings", "loss_many_timings"))
    assert "fallbacks" not in obj.settings()


def test_the_cuda_rule_path_agrees_with_the_dense_hessian(monkeypatch):
    """The choices the rule makes on CUDA (fwd_rev, batched block, batched loss_many), run here on the CPU."""
    import lrbs.objective as O

    monkeypatch.setattr(O, "rule_hvp_method", lambda device: "fwd_rev")
    monkeypatch.setattr(O, "rule_hvp_block", lambda device: "batched")
    monkeypatch.setattr(O, "rule_loss_many_method", lambda device, bn="eval": "batched")
    model = tiny()
    x, y = data()
    obj = Objective(model, data=(x, y), batch_size=16)
    H = torch.func.hessian(lambda t: obj.loss_tensor(t))(obj.theta())
    V = torch.randn(4, obj.num_params, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(obj.theta(), V), V @ H, rtol=1e-9, atol=1e-11)
    stack = obj.theta()[None] + 0.3 * torch.randn(3, obj.num_params, dtype=torch.float64)
    got = obj.loss_many(stack)
    for i in range(3):
        assert abs(got["loss"][i] - naive_metrics(model, stack[i], x, y, "eval")[0]) < 1e-9
    s = obj.settings()
    assert (s["hvp_method"], s["hvp_block"], s["loss_many_method"]) == ("fwd_rev", "batched", "batched")


class _NoTransforms(torch.autograd.Function):
    """tanh as an old-style autograd.Function: plain autograd (and double backward) works; torch.func
    transforms (forward-mode AD, vmap) refuse it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class _Tanh(nn.Module):
    def forward(self, x):
        return _NoTransforms.apply(x)


def test_a_rule_choice_the_model_cannot_run_falls_back_and_is_recorded(monkeypatch):
    import lrbs.objective as O

    monkeypatch.setattr(O, "rule_hvp_method", lambda device: "fwd_rev")
    monkeypatch.setattr(O, "rule_loss_many_method", lambda device, bn="eval": "batched")
    model = tiny(act=_Tanh)
    x, y = data()
    obj = Objective(model, data=(x, y), batch_size=16)
    ref = Objective(tiny(), data=(x, y), batch_size=16)  # the same network with nn.Tanh
    v = torch.randn(obj.num_params, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(obj.theta(), v), ref.hvp(ref.theta(), v), rtol=1e-12, atol=1e-14)
    stack = obj.theta()[None] + 0.2 * torch.randn(2, obj.num_params, dtype=torch.float64)
    np.testing.assert_allclose(obj.loss_many(stack)["loss"], ref.loss_many(stack)["loss"], rtol=1e-13)
    fb = obj.settings()["fallbacks"]
    assert fb["hvp_method"].startswith("fwd_rev failed") and fb["hvp_method"].endswith("rev_rev ran")
    assert fb["loss_many_method"].startswith("batched failed")
    assert obj.settings()["hvp_method"] == "rev_rev" and obj.settings()["loss_many_method"] == "sequential"
    # asked for explicitly, the same failure is the caller's to see
    with pytest.raises(RuntimeError):
        obj.hvp(obj.theta(), v, method="fwd_rev")


def test_timing_is_an_opt_in():
    obj = Objective(tiny(), data=data(), batch_size=16)
    H = torch.func.hessian(lambda t: obj.loss_tensor(t))(obj.theta())
    v = torch.randn(obj.num_params, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(obj.theta(), v, method="timed"), H @ v, rtol=1e-9, atol=1e-11)
    assert set(obj.hvp_timings) == {"rev_rev", "fwd_rev"} and obj.hvp_method in ("rev_rev", "fwd_rev")
    V = torch.randn(5, obj.num_params, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(obj.theta(), V, block="timed"), V @ H, rtol=1e-9, atol=1e-11)
    assert set(obj.hvp_block_timings) == {"loop", "batched"} and obj.hvp_block in ("loop", "batched")
    obj.loss_many(obj.theta()[None], method="timed")
    assert set(obj.loss_many_timings) == {"sequential", "batched"}
    s = obj.settings()
    assert (s["hvp_method"], s["hvp_block"], s["loss_many_method"]) == (
        obj.hvp_method,
        obj.hvp_block,
        obj.loss_many_method,
    )
    with pytest.raises(
        ConfigError, match=r"method='fastest' is not allowed: must be one of \['rev_rev', 'fwd_rev'\]"
    ):
        obj.hvp(obj.theta(), v, method="fastest")
    with pytest.raises(
        ConfigError, match=r"method='vmap' is not allowed: must be one of \['sequential', 'batched'\]"
    ):
        obj.loss_many(obj.theta()[None], method="vmap")


def test_user_choice_is_kept():
    obj = Objective(tiny(), data=data(), batch_size=16)
    obj.hvp_method, obj.loss_many_method = "fwd_rev", "batched"
    obj.hvp(obj.theta(), torch.ones(obj.num_params, dtype=torch.float64))
    obj.loss_many(obj.theta()[None])
    s = obj.settings()
    assert (s["hvp_method"], s["loss_many_method"]) == ("fwd_rev", "batched")


def test_bn_statistics_from_another_objective():
    """A test-set objective with recomputed BN statistics taken from the train data (Garipov et al.'s update_bn)."""
    model = tiny(True)
    (xa, ya), (xb, yb) = data(48, seed=1), data(20, seed=2)
    train = Objective(model, data=(xa, ya), batch_size=16, bn="recompute")
    test = Objective(model, data=(xb, yb), bn="recompute").with_bn_statistics_from(train)
    theta = train.theta() * 1.1
    m = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, list(m.parameters()))
    m[1].reset_running_stats()
    m[1].momentum = None
    m.train()
    with torch.no_grad():
        for i in range(0, 48, 16):
            m(xa[i : i + 16])
    m.eval()
    with torch.no_grad():
        ref = float(nn.functional.cross_entropy(m(xb), yb))
    assert abs(test.loss(theta) - ref) < 1e-12
    assert abs(test.loss_many(theta[None])["loss"][0] - ref) < 1e-12
    with pytest.raises(LrbsTypeError, match="other=int"):
        test.with_bn_statistics_from(3)
