"""lrbs.integrations.measure: the micro-batch estimator and the stability thresholds against closed forms and torch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lrbs.errors import ConfigError
from lrbs.integrations.measure import (
    GradCapture,
    MeasurementWarning,
    finite_c,
    micro_estimate,
    stability_threshold,
)
from lrbs.integrations.monitor import Monitor


def population(n: int = 40, d: int = 3, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """Fixed per-example gradients, their mean's |G|^2 and tr(Sigma) with 1/N (the finite population)."""
    g = np.random.default_rng(seed).normal(size=(n, d)) + np.array([0.5, -0.2, 0.1])
    mean = g.mean(0)
    return g, float(mean @ mean), float(((g - mean) ** 2).sum(1).mean())


@pytest.mark.parametrize("shares_by", ["size", "equal", "partial"])
def test_micro_estimate_is_unbiased_for_unequal_micro_batches(shares_by):
    """Disjoint micro-batches of sizes 3, 5, 4 drawn without replacement from 40 examples, the step's gradient
    sum_i s_i g_i with s_i = B_i / sum B (item-normalised), 1/k, or 1/4 with k = 3: the mean of 8000 estimates is
    the truth."""
    g, grad_sq, trace = population()
    sizes = [3, 5, 4]
    # "partial": Lightning's last step of an epoch, 3 micro-batches each divided by accumulate_grad_batches=4
    shares = {"size": [b / sum(sizes) for b in sizes], "equal": [1 / 3] * 3, "partial": [1 / 4] * 3}[
        shares_by
    ]
    rng = np.random.default_rng(1)
    est = []
    for _ in range(8000):
        idx = rng.permutation(len(g))
        parts = np.split(idx[: sum(sizes)], np.cumsum(sizes)[:-1])
        means = [g[p].mean(0) for p in parts]
        contrib = [s * m for s, m in zip(shares, means)]
        total = sum(contrib)
        est.append(micro_estimate([c @ c for c in contrib], sizes, shares, total @ total, num_samples=len(g)))
    est = np.array(est)
    mean, se = est.mean(0), est.std(0) / np.sqrt(len(est))
    assert abs(mean[0] - grad_sq) < 4 * se[0], (mean, se, grad_sq)
    assert abs(mean[1] - trace) < 4 * se[1], (mean, se, trace)


def test_micro_estimate_with_equal_micro_batches_is_the_two_batch_estimator():
    m, sizes, shares, total = [0.9, 1.3, 1.1, 0.7], [8] * 4, [0.25] * 4, 0.31
    micro = [x * 0.25**2 for x in m]  # contributions s_i g_i
    n = 128
    cs, cb = finite_c(8, n), finite_c(32, n)
    trace = (np.mean(m) - total) / (cs - cb)
    grad_sq, tr = micro_estimate(micro, sizes, shares, total, num_samples=n)
    assert tr == pytest.approx(trace, rel=1e-12)
    assert grad_sq == pytest.approx(total - cb * trace, rel=1e-12)


def test_micro_estimate_bad_inputs():
    with pytest.raises(ConfigError, match=r"at least 2"):
        micro_estimate([1.0], [8], [1.0], 1.0)
    with pytest.raises(ConfigError, match=r"must match"):
        micro_estimate([1.0, 2.0], [8], [0.5, 0.5], 1.0)
    with pytest.raises(ConfigError, match=r"must all be > 0"):
        micro_estimate([1.0, 2.0], [8, 0], [0.5, 0.5], 1.0)


def test_capture_reads_each_backward_and_the_total_without_changing_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    xs = [torch.randn(5, 4) for _ in range(3)]
    ref = []
    for x in xs:  # reference: each micro-batch's gradient on its own
        model.zero_grad()
        model(x).pow(2).mean().backward()
        ref.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    model.zero_grad(set_to_none=True)
    flags = iter([False, False, True])
    cap = GradCapture(model.parameters(), total_when=lambda: next(flags)).attach()
    for x in xs:
        (model(x).pow(2).mean() / 3).backward()
    cap.detach()
    micro, total = cap.take()
    want = [float((r / 3) @ (r / 3)) for r in ref]
    assert micro == pytest.approx(want, rel=1e-6)
    acc = sum(ref) / 3
    assert total == pytest.approx(float(acc @ acc), rel=1e-6)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(got, acc, atol=1e-7)  # the hooks changed nothing


def diverges(make_opt, lr: float, lam: float = 1.0, steps: int = 800) -> bool:
    """Whether torch's optimizer diverges on f(x) = lam x^2 / 2 from x = 1."""
    x = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = make_opt([x], lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * x.pow(2)).sum().backward()
        opt.step()
    return not bool(x.abs() < 1.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda p, lr: torch.optim.SGD(p, lr=lr),
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.5, dampening=0.5),
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    ],
)
def test_stability_threshold_is_where_torch_sgd_starts_to_diverge(make):
    """On a quadratic with curvature 1, lr 3% below the threshold converges and 3% above diverges."""
    x = torch.nn.Parameter(torch.zeros(1))
    bound = stability_threshold(make([x], 0.1))
    assert not diverges(make, bound * 0.97)
    assert diverges(make, bound * 1.03)


def test_no_threshold_for_adaptive_optimizers():
    x = torch.nn.Parameter(torch.zeros(1))
    assert stability_threshold(torch.optim.AdamW([x])) is None
    assert stability_threshold(torch.optim.RMSprop([x])) is None


def step_monitor() -> tuple[Monitor, torch.nn.Module]:
    """A Monitor in its free mode (2 'ranks', accumulation 2) on a small model, hooks attached."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    mon = Monitor(window=10)
    mon.start(
        model,
        accumulation=2,
        world=2,
        free_possible=True,
        micro_batch=4,
        num_samples=None,
        train_source=None,
        probe_source=None,
        log_every=1,
        total_when=None,
    )
    mon.begin_step()
    for _ in range(2):
        (model(torch.randn(4, 3)).pow(2).mean() / 2).backward()
    return mon, model


def test_every_rank_joins_the_step_collective_even_when_it_cannot_read_its_step():
    """Under DDP a rank whose step cannot be read (here: 2 backward passes for 1 micro-batch) still takes part in
    the one all_reduce of the step, with NaN sums, so no rank waits forever; the other rank then skips the step."""
    sent = []

    def reduce(sums):
        sent.append(sums.copy())
        return sums + other, 2

    bad, _ = step_monitor()
    other = np.zeros(6)
    with pytest.warns(MeasurementWarning, match=r"2 backward pass\(es\) .* for 1 micro-batch"):
        bad.end_step(1, [4], [0.5], total_sq=1.0, all_reduce=reduce)
    assert len(sent) == 1 and np.isnan(sent[0]).all() and len(bad.window) == 0
    good, good_model = step_monitor()
    other = sent[0]  # what the bad rank sent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the good rank drops the step silently: the bad one has said why
        good.end_step(
            1, [4, 4], [0.5, 0.5], total_sq=GradCapture.grad_sq_of(good_model.parameters()), all_reduce=reduce
        )
    assert len(sent) == 2 and np.isfinite(sent[1]).all() and len(good.window) == 0
    bad.stop()
    good.stop()
