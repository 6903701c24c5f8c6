"""Large-batch recipes: closed-form LR values, batch schedules, accumulation plans, and their errors."""

from __future__ import annotations

import math

import pytest

from lrbs.errors import ConfigError, LrbsTypeError
from lrbs.recipes import (
    BatchCoupledLR,
    accumulation_plan,
    grow_batch_instead,
    linear_scaling,
    scaling_factor,
    small_batch_warmup,
)
from lrbs.schedules import batch_ramp, cosine, step


@pytest.mark.parametrize(("rule", "factor"), [("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)])
def test_scaling_rules(rule, factor):
    assert scaling_factor(1024, 256, rule) == pytest.approx(factor)
    s = linear_scaling(0.1, 1024, 256, rule=rule)
    assert [s(t) for t in (0, 10, 1000)] == pytest.approx([0.1 * factor] * 3)


def test_goyal_gradual_warmup_closed_form():
    # eta_t = eta + (k eta - eta) t / W for t < W, then k eta (Goyal et al. 2017, Sec. 2.2)
    eta, k, w = 0.1, 8, 50
    s = linear_scaling(eta, 256 * k, 256, warmup_steps=w)
    for t in range(0, 120, 7):
        expected = eta + (k * eta - eta) * t / w if t < w else k * eta
        assert s(t) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_warmup_then_decay_closed_form(decay):
    eta, k, w, total = 0.05, 4, 10, 110
    s = linear_scaling(eta, 512, 128, warmup_steps=w, total_steps=total, decay=decay)
    for t in range(0, total + 5):
        if t < w:
            expected = eta + (k * eta - eta) * t / w
        else:
            u = min(t - w, total - w) / (total - w)
            expected = k * eta * (0.5 * (1 + math.cos(math.pi * u)) if decay == "cosine" else 1 - u)
        assert s(t) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert s(total) == pytest.approx(0.0, abs=1e-15)


def test_schedule_lr_is_scaled_after_warmup():
    base = step(0.1, [100, 200], 0.1)
    s = linear_scaling(base, 1024, 256, rule="sqrt", warmup_steps=5)
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.2)  # sqrt(4) * 0.1, the schedule starts after the warmup
    assert s(5 + 150) == pytest.approx(0.02)
    assert linear_scaling(cosine(0.1, 100), 512, 256)(50) == pytest.approx(2 * 0.05)


def test_lr_follows_a_batch_ramp():
    ramp = batch_ramp(128, 512, 30, increment=128)
    s = linear_scaling(0.1, ramp, 128)
    assert isinstance(s, BatchCoupledLR)
    for t in range(40):
        assert s(t) == pytest.approx(0.1 * ramp(t) / 128)
    sq = linear_scaling(0.1, ramp, 128, rule="sqrt")
    assert sq(35) == pytest.approx(0.1 * 2.0)
    assert s.total_steps == 30


def test_small_batch_warmup_and_matching_lr():
    b = small_batch_warmup(64, 1024, 100)
    assert [b(t) for t in (0, 99, 100, 500)] == [64, 64, 1024, 1024]
    pair = small_batch_warmup(64, 1024, 100, lr=0.05, rule="linear")
    assert [pair.lr(t) for t in (0, 99, 100)] == pytest.approx([0.05, 0.05, 0.05 * 16])
    assert pair.batch_size(100) == 1024
    pair = small_batch_warmup(64, 1024, 100, lr=0.05, rule="sqrt", base_batch_size=256)
    assert [pair.lr(0), pair.lr(100)] == pytest.approx([0.025, 0.1])


def test_grow_batch_instead_is_the_schedules_one():
    # Smith et al. 2018: where the LR would drop by 5x, the batch grows 5x instead; lr/B is kept
    out = grow_batch_instead(step(0.1, [100, 200], 0.2), 128, 10_000)
    assert [out.batch_size(t) for t in (0, 100, 200)] == [128, 640, 3200]
    assert [out.lr(t) for t in (0, 100, 200)] == pytest.approx([0.1] * 3)


@pytest.mark.parametrize(
    ("batch", "micro", "plan"),
    [(1024, 256, (256,) * 4), (1000, 256, (256, 256, 256, 232)), (7, 10, (7,)), (5, 1, (1,) * 5)],
)
def test_accumulation_plan_matches_fit_split(batch, micro, plan):
    assert accumulation_plan(batch, micro) == plan
    # fit cuts the batch with range(0, b, micro): the same chunks
    assert tuple(min(micro, batch - s) for s in range(0, batch, micro)) == plan


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: linear_scaling(0.1, 1024, 256, rule="linaer"), ConfigError, "Did you mean 'linear'"),
        (lambda: linear_scaling(0.1, 1024, 256, rule="squareroot"), ConfigError, "rule='squareroot'"),
        (lambda: linear_scaling(0.1, 0, 256), ConfigError, "batch_size=0"),
        (lambda: linear_scaling(0.1, 1024, 0), ConfigError, "base_batch_size=0"),
        (lambda: linear_scaling(0.1, 1024, 256, decay="cosine"), ConfigError, "needs total_steps"),
        (
            lambda: linear_scaling(0.1, 1024, 256, decay="cosin", total_steps=5),
            ConfigError,
            "Did you mean 'cosine'",
        ),
        (
            lambda: linear_scaling(0.1, 1024, 256, warmup_steps=10, total_steps=10, decay="linear"),
            ConfigError,
            "warmup_steps=10 .*< total_steps=10",
        ),
        (
            lambda: linear_scaling(cosine(0.1, 10), 1024, 256, total_steps=10, decay="cosine"),
            ConfigError,
            "with a Schedule lr",
        ),
        (
            lambda: linear_scaling(0.1, batch_ramp(128, 256, 10), 128, warmup_steps=5),
            ConfigError,
            "warmup_steps=5 .*batch-size schedule",
        ),
        (lambda: linear_scaling("0.1", 1024, 256), LrbsTypeError, "lr='0.1'"),
        (lambda: linear_scaling(0.1, 1024, 256, warmup_steps=-1), ConfigError, "warmup_steps=-1"),
        (lambda: small_batch_warmup(1024, 64, 10), ConfigError, "large=64 .*must be > small"),
        (lambda: small_batch_warmup(64, 1024, 0), ConfigError, "switch_step=0"),
        (lambda: small_batch_warmup(64, 1024, 10, lr=0.1), ConfigError, "give both lr= and rule="),
        (lambda: small_batch_warmup(64, 1024, 10, lr=0.1, rule="lin"), ConfigError, "rule='lin'"),
        (lambda: accumulation_plan(1024, 0), ConfigError, "max_micro_batch=0"),
        (lambda: accumulation_plan(0, 256), ConfigError, "batch_size=0"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
