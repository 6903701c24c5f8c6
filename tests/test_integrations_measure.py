"""lrbs.integrations.measure: the micro-batch estimator and the stability thresholds against closed forms and torch."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from lrbs.batches import batch_size_of
from lrbs.errors import ConfigError
from lrbs.integrations.measure import (
    GradCapture,
    MeasurementWarning,
    finite_c,
    host_floats,
    micro_estimate,
    size_or_none,
    squared_norm,
    stability_threshold,
)
from lrbs.integrations.monitor import MAX_PENDING, Monitor


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


def test_capture_lets_the_first_gradient_become_grad_without_a_copy():
    """In a step's first backward (.grad None) AccumulateGrad takes each gradient itself as .grad: the capture
    holds aliases, not the hook's tensors, so it still does (holding those would force a copy of every gradient)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    seen: list[int] = []
    for p in model.parameters():
        p.register_hook(lambda g: seen.append(g.data_ptr()))  # remembers where, holds nothing
    cap = GradCapture(model.parameters()).attach()
    for _ in range(2):
        seen.clear()
        model.zero_grad(set_to_none=True)
        cap.reset()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        assert sorted(p.grad.data_ptr() for p in model.parameters()) == sorted(seen)
        model(torch.randn(5, 4)).pow(2).mean().backward()  # later ones add in place
        assert len(cap.take()[0]) == 2
    cap.detach()


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
    mon = free_monitor(model, accumulation=2, world=2, window=10, micro_batch=4, num_samples=None)
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


def test_squared_norm_and_host_floats_are_exact():
    """The flattened dot is the float64 sum of squares of the float32 entries to float32 rounding; host_floats
    gives each 0-d tensor's own value (any dtype) and passes numbers through."""
    torch.manual_seed(0)
    ts = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 3).t()]  # the last one not contiguous
    ref = sum(float((t.double() ** 2).sum()) for t in ts)
    assert float(squared_norm(ts)) == pytest.approx(ref, rel=1e-6)
    assert float(squared_norm(ts, small=False)) == pytest.approx(ref, rel=1e-6)
    vals = [
        torch.tensor(0.1),
        torch.tensor(0.1, dtype=torch.float64),
        torch.tensor(7),
        math.nan,
        2,
        torch.tensor(1.5).bfloat16(),
    ]
    got = host_floats(vals)
    assert got[0] == np.float32(0.1) and got[1] == 0.1 and got[2] == 7.0 and math.isnan(got[3])
    assert got[4:] == [2.0, 1.5]


@pytest.mark.parametrize(
    "batch",
    [
        {"input_ids": torch.zeros(5, 3), "labels": torch.zeros(5, 3)},
        {"n": 3, "mask": None, "x": torch.zeros(6)},
        {"scalar": torch.tensor(2.0), "x": torch.zeros(4)},
        # a container first: its tensor is the first one
        {"nested": {"a": torch.zeros(2)}, "x": torch.zeros(7)},
        {"nested": [None, (torch.zeros(9, 2),)], "x": torch.zeros(7)},
        (torch.zeros(3), torch.zeros(4)),
    ],
)
def test_size_or_none_reads_the_first_tensor_like_batch_size_of(batch):
    assert size_or_none(batch) == batch_size_of(batch)
    assert size_or_none({"n": 3}) is None  # no tensor: unreadable, not an error


def free_monitor(
    model: torch.nn.Module,
    last: list[bool] | None = None,
    *,
    accumulation: int = 3,
    world: int = 1,
    window: int = 100,
    micro_batch: int | None = None,
    num_samples: int | None = 60,
) -> Monitor:
    """A Monitor in its free mode (default: one process, accumulation 3), hooks attached; ``last[0]``: the
    backward is the step's last (it reads the total)."""
    mon = Monitor(window=window)
    mon.start(
        model,
        accumulation=accumulation,
        world=world,
        free_possible=True,
        micro_batch=micro_batch,
        num_samples=num_samples,
        train_source=None,
        probe_source=None,
        log_every=1,
        total_when=None if last is None else (lambda: last[0]),
    )
    return mon


def test_steps_are_held_on_one_process_and_solved_as_each_step_would_be():
    """On one process a step's readings wait as tensors; publish / summary / stop (or MAX_PENDING steps) solve
    them, each into the estimate that micro_estimate gives on that step's float64 gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    ref_model = copy.deepcopy(model).double()
    last = [False]
    mon = free_monitor(model, last)
    sizes, want = [3, 5, 4], []
    shares = [b / sum(sizes) for b in sizes]
    for step in range(1, MAX_PENDING + 3):
        xs = [torch.randn(b, 4) for b in sizes]
        mon.begin_step()
        contrib = []
        for i, (x, s) in enumerate(zip(xs, shares)):
            last[0] = i == len(xs) - 1
            (model(x).pow(2).mean() * s).backward()
            loss = ref_model(x.double()).pow(2).mean() * s
            contrib.append(
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(ref_model.parameters()))])
            )
        total = sum(contrib)
        want.append(
            micro_estimate(
                [float(c @ c) for c in contrib], sizes, shares, float(total @ total), num_samples=60
            )
        )
        lazy = step % 2 == 0  # shares given as a function, called when the step is solved
        mon.end_step(step, sizes, (lambda: shares) if lazy else shares, micro_scale=1.0)
        model.zero_grad(set_to_none=True)
        if step == MAX_PENDING - 1:
            assert len(mon.window) == 0  # all held
        if step == MAX_PENDING:
            assert len(mon.window) == MAX_PENDING  # the limit solved them
    assert len(mon.window) == MAX_PENDING
    mon.stop()
    got = [(g, t) for _, g, t in mon.window.rows]
    assert [r[0] for r in mon.window.rows] == list(range(1, MAX_PENDING + 3))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_step_whose_shares_fail_is_left_out_with_a_warning():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    mon = free_monitor(model)
    for step in (1, 2):
        mon.begin_step()
        for _ in range(2):
            (model(torch.randn(4, 3)).pow(2).mean() / 2).backward()

        def shares():
            raise RuntimeError("no counts")

        total = GradCapture.grad_sq_of(model.parameters())
        mon.end_step(step, [4, 4], shares if step == 1 else [0.5, 0.5], total_sq=total)
        model.zero_grad(set_to_none=True)
    with pytest.warns(MeasurementWarning, match=r"shares at step 1 failed \(RuntimeError: no counts\)"):
        summary = mon.summary()
    assert summary.num_estimates == 1 and summary.first_step == 2
    mon.stop()
