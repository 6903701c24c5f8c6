"""lrbs.schedules: closed forms, algebra, repr round-trip, pickling, bad inputs, batch sizes, parser, CLI.

Every expected value comes from an independent float64 formula or a naive loop written here, never from the
schedule itself. The PyTorch equivalence table and the torch adapter are in ``test_schedules_torch.py``.
"""

from __future__ import annotations

import math
import pickle
import re

import numpy as np
import pytest

import lrbs.schedules as S
from lrbs.errors import ConfigError, LrbsTypeError

# ------------------------------------------------------------------------------------------------------------
# closed forms: (schedule, expected(t) as a float64 numpy formula, number of steps to check)


def _one_cycle_ref(peak, T, pct=0.3, div=25.0, fdiv=1e4, anneal="cos", three=False):
    """1cycle from its definition (Smith & Topin; PyTorch docs): phase ends pct*T-1, (2pct*T-2), T-1."""
    init, low = peak / div, peak / div / fdiv
    if three:
        ends, pts = [pct * T - 1, 2 * pct * T - 2, T - 1], [(init, peak), (peak, init), (init, low)]
    else:
        ends, pts = [pct * T - 1, T - 1], [(init, peak), (peak, low)]
    starts = [0.0, *ends[:-1]]

    def value(t):
        t = min(t, T - 1)
        i = next((k for k, e in enumerate(ends) if t <= e), len(ends) - 1)
        p = (t - starts[i]) / (ends[i] - starts[i])
        a, b = pts[i]
        return b + (a - b) * (1 + math.cos(math.pi * p)) / 2 if anneal == "cos" else a + (b - a) * p

    return lambda t: np.array([value(int(k)) for k in t])


def _clr_ref(base, peak, up, down, mode="triangular", gamma=1.0):
    """Smith (2017) CLR as a naive loop over steps: walk the triangle explicitly, cycle by cycle."""

    def f(t):
        out = []
        for step in t:
            cycle, x = divmod(int(step), up + down)
            s = x / up if x <= up else 1 - (x - up) / down
            g = {"triangular": 1.0, "triangular2": 0.5**cycle, "exp_range": gamma**step}[mode]
            out.append(base + (peak - base) * s * g)
        return np.array(out)

    return f


def _sgdr_ref(peak, first, mult, minimum=0.0, decay=1.0):
    """SGDR by simulating restarts step by step (integer or float cycle lengths)."""

    def f(t):
        out, i, start, length = [], 0, 0.0, float(first)
        for step in range(int(t.max()) + 1):
            while step >= start + length:
                start, length, i = start + length, length * mult, i + 1
            top = peak * decay**i
            out.append(minimum + (top - minimum) * (1 + math.cos(math.pi * (step - start) / length)) / 2)
        return np.array(out)[t]

    return f


def _wsd_ref(peak, w, s, d, kind, m):
    def f(t):
        t = t.astype(float)
        warm = peak * (t + 1) / (w + 1)
        p = np.clip((t - w - s) / d, 0, 1)
        g = {"linear": 1 - p, "cosine": (1 + np.cos(np.pi * p)) / 2, "1-sqrt": 1 - np.sqrt(p)}[kind]
        return np.where(t < w, warm, peak * (m + (1 - m) * g))

    return f


CLOSED_FORMS = {
    "constant": (S.constant(0.3), lambda t: np.full(t.shape, 0.3), 5),
    "linear": (S.linear(0.1, 0.5, 8), lambda t: 0.1 + 0.4 * np.minimum(t, 8) / 8, 12),
    "exponential": (S.exponential(0.2, 0.9), lambda t: 0.2 * 0.9**t, 20),
    "exponential-end": (
        S.exponential(1.0, end=0.01, steps=10),
        lambda t: 10.0 ** (-2 * np.minimum(t, 10) / 10),
        14,
    ),
    "step-list": (S.step(1.0, [3, 7], 0.5), lambda t: 0.5 ** ((t >= 3).astype(int) + (t >= 7)), 10),
    "step-period": (S.step(1.0, 4, 0.1), lambda t: 0.1 ** (t // 4), 13),
    "cosine": (
        S.cosine(0.1, 10, 0.01),
        lambda t: 0.01 + 0.09 * (1 + np.cos(np.pi * np.minimum(t, 10) / 10)) / 2,
        14,
    ),
    "polynomial": (
        S.polynomial(1.0, 10, 0.1, 2.0),
        lambda t: 0.9 * (1 - np.minimum(t, 10) / 10) ** 2 + 0.1,
        13,
    ),
    "inverse_sqrt": (S.inverse_sqrt(1.0, timescale=4), lambda t: 1 / np.sqrt((t + 4) / 4), 10),
    # HF get_inverse_sqrt_schedule after warmup W: 1/sqrt((t + tau - W)/tau), tau = W by default
    "inverse_sqrt-warmup": (
        S.inverse_sqrt(2.0, warmup=5),
        lambda t: np.where(t < 5, 2.0 * (t + 1) / 6, 2.0 / np.sqrt((np.maximum(t, 5) + 5 - 5) / 5)),
        15,
    ),
    "warmup-linear": (
        S.warmup(S.constant(0.6), 5, start=0.1),
        lambda t: np.where(t < 5, 0.1 + 0.5 * t / 5, 0.6),
        8,
    ),
    "warmup-exponential": (
        S.warmup(S.constant(1.0), 4, start=0.01, kind="exponential"),
        lambda t: np.where(t < 4, 0.01 * 100.0 ** (t / 4), 1.0),
        7,
    ),
    "warmup-default-start": (S.warmup(S.constant(1.0), 9), lambda t: np.minimum((t + 1) / 10, 1.0), 12),
    "cyclic": (S.cyclic(0.1, 1.0, 4), _clr_ref(0.1, 1.0, 4, 4), 20),
    "cyclic-asym": (
        S.cyclic(0.1, 1.0, 3, 5, mode="triangular2"),
        _clr_ref(0.1, 1.0, 3, 5, "triangular2"),
        30,
    ),
    "cyclic-exp": (
        S.cyclic(0.0, 1.0, 2, 3, "exp_range", 0.9),
        _clr_ref(0.0, 1.0, 2, 3, "exp_range", 0.9),
        20,
    ),
    "cyclic_momentum": (
        S.cyclic_momentum(0.8, 0.9, 4),
        lambda t: 0.9 + 0.8 - _clr_ref(0.8, 0.9, 4, 4)(t),
        20,
    ),
    "sgdr": (S.sgdr(1.0, 5), _sgdr_ref(1.0, 5, 1), 23),
    "sgdr-mult2": (S.sgdr(1.0, 3, 2, 0.1), _sgdr_ref(1.0, 3, 2, 0.1), 50),
    "sgdr-float-decay": (S.sgdr(1.0, 4, 1.5, 0.0, 0.5), _sgdr_ref(1.0, 4, 1.5, 0.0, 0.5), 60),
    "one_cycle": (S.one_cycle(1.0, 20), _one_cycle_ref(1.0, 20), 25),
    "one_cycle-linear-3": (
        S.one_cycle(0.5, 30, 0.25, 10.0, 100.0, "linear", True),
        _one_cycle_ref(0.5, 30, 0.25, 10.0, 100.0, "linear", True),
        33,
    ),
    "wsd-1-sqrt": (S.wsd(1.0, 4, 5, 10), _wsd_ref(1.0, 4, 5, 10, "1-sqrt", 0.0), 24),
    "wsd-cosine": (S.wsd(1.0, 3, 2, 6, "cosine", 0.1), _wsd_ref(1.0, 3, 2, 6, "cosine", 0.1), 14),
    "wsd-linear-total": (
        S.wsd(2.0, 0, None, 5, "linear", total_steps=9),
        _wsd_ref(2.0, 0, 4, 5, "linear", 0),
        12,
    ),
    "join": (
        S.join([S.constant(0.5), S.linear(0.5, 0.0, 4)], [3]),
        lambda t: np.where(t < 3, 0.5, 0.5 - 0.5 * np.minimum(t - 3, 4) / 4),
        10,
    ),
    "scaled": (0.5 * S.cosine(2.0, 10), lambda t: (1 + np.cos(np.pi * np.minimum(t, 10) / 10)) / 2, 12),
    "batch_ramp": (S.batch_ramp(32, 128, 12, 32), lambda t: 32 + 32 * np.minimum(3, t // 4), 15),
    "batch_step": (
        S.batch_step([16, 64, 256], [2, 5]),
        lambda t: np.select([t < 2, t < 5], [16, 64], 256),
        8,
    ),
}


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_closed_form(name):
    schedule, expected, n = CLOSED_FORMS[name]
    t = np.arange(n)
    ref = expected(t)
    np.testing.assert_allclose(schedule.values(n), ref, rtol=1e-12, atol=1e-15)
    # the callable and values() agree, with ints or numpy ints
    assert [schedule(int(k)) for k in t] == list(schedule.values(n))
    assert schedule(np.int64(n - 1)) == schedule.values(n)[-1]


def test_batch_schedules_return_ints():
    for s in (S.batch_ramp(8, 32, 10, 8), S.batch_step([4, 8], [3])):
        assert s.integer and s.values(5).dtype == np.int64 and isinstance(s(2), int)
    assert S.cosine(1.0, 4).values(3).dtype == np.float64


def test_one_cycle_phase_values():
    """Phase ends hit initial = peak/25, peak, and the final peak/2.5e5 exactly as in PyTorch's docs."""
    s = S.one_cycle(0.1, 1001, pct_start=0.5)  # first phase ends at pct*T - 1 = 499.5
    assert s(0) == pytest.approx(0.1 / 25, rel=1e-15)
    assert s(1000) == pytest.approx(0.1 / 25 / 1e4, rel=1e-12)
    assert max(s.values(1001)) <= 0.1 and max(s.values(1001)) == pytest.approx(0.1, rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# past the end: the last value holds


@pytest.mark.parametrize(
    "schedule",
    [
        S.linear(0.1, 0.2, 5),
        S.cosine(0.1, 5, 0.01),
        S.one_cycle(0.1, 10),
        S.wsd(1.0, 2, 2, 3),
        S.batch_ramp(2, 8, 3),
    ],
    ids=repr,
)
def test_holds_after_end(schedule):
    total = schedule.total_steps
    assert [schedule(total + k) for k in (1, 10, 10_000)] == [schedule(total)] * 3
    if repr(schedule).startswith("one_cycle"):  # its last step is T - 1, as in PyTorch
        assert schedule(total) == schedule(total - 1)


# ------------------------------------------------------------------------------------------------------------
# algebra


def test_join_of_one_schedule_is_the_schedule():
    for s in (S.cosine(0.1, 10), S.cyclic(0.1, 1.0, 3), S.batch_ramp(2, 8, 5)):
        j = S.join([s], [])
        np.testing.assert_array_equal(j.values(30), s.values(30))
        assert j.total_steps == s.total_steps and j.integer == s.integer


def test_join_pieces_see_local_steps():
    a, b, c = S.linear(0.0, 1.0, 10), S.cosine(1.0, 6), S.constant(0.05)
    j = S.join([a, b, c], [4, 9])
    for t in range(20):
        ref = a(t) if t < 4 else b(t - 4) if t < 9 else c(t - 9)
        assert j(t) == ref
    assert S.join([a, b], [4]).total_steps == 4 + 6 and j.total_steps is None


def test_warmup_then_constant_is_continuous():
    s = S.warmup(S.constant(0.4), 10)
    v = s.values(20)
    steps = np.diff(v[:11])
    np.testing.assert_allclose(
        steps, np.full(10, 0.4 / 11), rtol=1e-12
    )  # even increments, no jump at the join
    assert v[0] > 0 and v[10] == 0.4 and np.all(v[10:] == 0.4)
    # warmup into a cosine: continuous at the join, total length is the sum
    w = S.warmup(S.cosine(0.1, 90), 10)
    assert w.total_steps == 100 and w(10) == 0.1 and abs(w(10) - w(9)) < 0.1 / 10


def test_sgdr_periodic_without_decay():
    s = S.sgdr(0.7, 6, 1, 0.05, 1.0)
    v = s.values(60)
    np.testing.assert_array_equal(v[:6], v[6:12])
    np.testing.assert_array_equal(v[:-6], v[6:])


@pytest.mark.parametrize("mult", [1, 2, 1.5])
def test_sgdr_peak_of_cycle_i(mult):
    s = S.sgdr(1.0, 4, mult, 0.0, 0.6)
    start, length = 0.0, 4.0
    for i in range(5):
        first = math.ceil(start)
        assert s.cycle(first)[0] == i
        if first == start:  # integer cycle start: the value there is the cycle's peak
            assert s(first) == pytest.approx(0.6**i, rel=1e-12)
        start, length = start + length, length * mult


def test_scalar_multiplication():
    c = S.cosine(0.2, 10)
    for scaled in (0.5 * c, c * 0.5):
        np.testing.assert_allclose(scaled.values(12), 0.5 * c.values(12), rtol=1e-15)
    folded = 2 * (0.5 * c)
    assert folded == 1.0 * c and repr(folded) == "1.0 * cosine(start=0.2, steps=10, end=0.0)"
    with pytest.raises(ConfigError, match=r"factor=-1 is not allowed: must be a finite number >= 0"):
        -1 * c
    with pytest.raises(TypeError):
        c * "2"


# ------------------------------------------------------------------------------------------------------------
# repr round-trip and pickling, for every constructor

EVERY_CONSTRUCTOR = [
    S.constant(0.1),
    S.linear(0.0, 0.1, 100),
    S.exponential(0.1, 0.99),
    S.exponential(0.1, end=1e-4, steps=100),
    S.step(0.1, [30, 60], 0.2),
    S.step(0.1, 30),
    S.cosine(0.1, 1000, 1e-5),
    S.polynomial(0.1, 100, 0.001, 0.5),
    S.inverse_sqrt(0.001, 4000),
    S.inverse_sqrt(0.001, warmup=100),
    S.warmup(S.cosine(0.1, 900), 100),
    S.warmup(S.constant(0.1), 10, start=1e-4, kind="exponential"),
    S.cyclic(0.001, 0.1, 200, 300, "triangular2"),
    S.cyclic(0.001, 0.1, 200, mode="exp_range", gamma=0.999),
    S.cyclic_momentum(0.8, 0.9, 200),
    S.sgdr(0.1, 10, 2, 1e-4, 0.7),
    S.sgdr(0.1, 10, 1.5),
    S.one_cycle(0.1, 1000),
    S.one_cycle(0.1, 1000, 0.25, 10.0, 1e3, "linear", True),
    S.one_cycle_momentum(1000),
    S.one_cycle(0.1, 500).momentum(),
    S.cyclic(0.01, 0.1, 5).momentum(0.85, 0.95),
    S.wsd(0.1, 100, 800, 100, "cosine", 0.1),
    S.wsd(0.1, 100, decay=200, total_steps=1000),
    S.join([S.linear(0.0, 0.1, 10), S.cosine(0.1, 90)], [10]),
    0.5 * S.cosine(0.1, 10),
    S.join([0.5 * S.constant(1.0), S.sgdr(1.0, 3)], [2]),
    S.batch_ramp(32, 1024, 1000, 32),
    S.batch_step([64, 512], [100]),
]


@pytest.mark.parametrize("schedule", EVERY_CONSTRUCTOR, ids=repr)
def test_repr_round_trip(schedule):
    text = repr(schedule)
    again = S.parse(text)
    assert again == schedule and hash(again) == hash(schedule) and repr(again) == text
    name = text.split("(")[0].split(" * ")[-1]
    assert name in S.SCHEDULES  # the repr looks like a constructor call
    np.testing.assert_array_equal(again.values(50), schedule.values(50))
    d = schedule.to_dict()
    assert S.parse(d["spec"]) == schedule and d["total_steps"] == schedule.total_steps


@pytest.mark.parametrize("schedule", EVERY_CONSTRUCTOR, ids=repr)
def test_pickle(schedule):
    again = pickle.loads(pickle.dumps(schedule))
    assert again == schedule
    np.testing.assert_array_equal(again.values(40), schedule.values(40))


def test_frozen():
    s = S.cosine(0.1, 10)
    with pytest.raises(AttributeError):
        s.start = 0.2


# ------------------------------------------------------------------------------------------------------------
# bad inputs: (callable, error type, message pattern)

BAD_INPUTS = {
    "total_steps 0": (
        lambda: S.one_cycle(0.1, 0),
        ConfigError,
        r"total_steps=0 is not allowed: must be an integer >= 2",
    ),
    "steps 0": (lambda: S.cosine(0.1, 0), ConfigError, r"steps=0 is not allowed: must be an integer >= 1"),
    "steps float": (
        lambda: S.linear(0.1, 0.0, 10.5),
        LrbsTypeError,
        r"steps=10.5 is not allowed: must be an integer",
    ),
    "negative lr": (
        lambda: S.cosine(-0.1, 10),
        ConfigError,
        r"start=-0.1 is not allowed: must be a finite number >= 0",
    ),
    "nan": (
        lambda: S.constant(float("nan")),
        ConfigError,
        r"value=nan is not allowed: must be a finite number",
    ),
    "inf": (
        lambda: S.linear(0.1, float("inf"), 5),
        ConfigError,
        r"end=inf is not allowed: must be a finite number",
    ),
    "lr string": (
        lambda: S.constant("0.1"),
        LrbsTypeError,
        r"value='0.1' is not allowed: must be a real number",
    ),
    "one_cycle pct": (
        lambda: S.one_cycle(0.1, 10, pct_start=0.05),
        ConfigError,
        r"pct_start=0.05 with total_steps=10 is not allowed: .*every phase needs at least one step",
    ),
    "one_cycle pct 3-phase": (
        lambda: S.one_cycle(0.1, 10, pct_start=0.6, three_phase=True),
        ConfigError,
        r"pct_start=0.6 with total_steps=10 is not allowed",
    ),
    "pct_start 1": (lambda: S.one_cycle(0.1, 10, 1.0), ConfigError, r"pct_start=1.0 is not allowed: .*< 1"),
    "three_phase str": (
        lambda: S.one_cycle(0.1, 10, three_phase="yes"),
        LrbsTypeError,
        r"three_phase='yes' is not allowed: must be True or False",
    ),
    "anneal": (
        lambda: S.one_cycle(0.1, 10, anneal="cosine"),
        ConfigError,
        r"anneal='cosine'.*Did you mean 'cos'",
    ),
    "wsd warmup >= total": (
        lambda: S.wsd(0.1, 90, decay=20, total_steps=100),
        ConfigError,
        r"warmup=90 \+ decay=20 is not allowed with total_steps=100: must be <= total_steps",
    ),
    "wsd stable and total": (
        lambda: S.wsd(0.1, 10, 10, 10, total_steps=30),
        ConfigError,
        r"give exactly one",
    ),
    "wsd decay kind": (
        lambda: S.wsd(0.1, 1, 1, 1, "sqrt"),
        ConfigError,
        r"decay_kind='sqrt' is not allowed: must be one of .*Did you mean '1-sqrt'",
    ),
    "wsd min_ratio": (lambda: S.wsd(0.1, 1, 1, 1, min_ratio=2), ConfigError, r"min_ratio=2 is not allowed"),
    "cyclic mode": (
        lambda: S.cyclic(0.1, 1.0, 10, mode="triangle"),
        ConfigError,
        r"mode='triangle' is not allowed: must be one of \['triangular', 'triangular2', 'exp_range'\]\. "
        r"Did you mean 'triangular'\?",
    ),
    "cyclic step_size 0": (
        lambda: S.cyclic(0.1, 1.0, 0),
        ConfigError,
        r"step_size_up=0 is not allowed: must be an integer >= 1",
    ),
    "cyclic step_size_down 0": (
        lambda: S.cyclic(0.1, 1.0, 3, 0),
        ConfigError,
        r"step_size_down=0 is not allowed: must be an integer >= 1",
    ),
    "cyclic peak < base": (
        lambda: S.cyclic(1.0, 0.1, 3),
        ConfigError,
        r"peak=0.1 is not allowed: must be >= base=1.0",
    ),
    "cyclic gamma": (lambda: S.cyclic(0.1, 1.0, 3, gamma=1.5), ConfigError, r"gamma=1.5 is not allowed"),
    "momentum peak < base": (
        lambda: S.one_cycle_momentum(10, base=0.95, peak=0.85),
        ConfigError,
        r"peak=0.85 is not allowed: must be >= base=0.95",
    ),
    "sgdr cycle_mult": (lambda: S.sgdr(0.1, 10, 0.5), ConfigError, r"cycle_mult=0.5 is not allowed: .*>= 1"),
    "sgdr peak_decay": (lambda: S.sgdr(0.1, 10, peak_decay=0), ConfigError, r"peak_decay=0 is not allowed"),
    "sgdr first_cycle": (lambda: S.sgdr(0.1, 0), ConfigError, r"first_cycle=0 is not allowed"),
    "exponential both": (lambda: S.exponential(0.1, 0.9, end=0.01), ConfigError, r"give exactly one of them"),
    "exponential end no steps": (lambda: S.exponential(0.1, end=0.01), ConfigError, r"end needs steps >= 1"),
    "exponential gamma 0": (lambda: S.exponential(0.1, 0.0), ConfigError, r"gamma=0.0 is not allowed"),
    "step milestones": (
        lambda: S.step(0.1, [30, 20]),
        ConfigError,
        r"milestones=\[30, 20\] is not allowed: must be strictly increasing integers >= 1",
    ),
    "step milestone 0": (lambda: S.step(0.1, [0, 5]), ConfigError, r"milestones\[0\]=0 is not allowed"),
    "step milestones str": (lambda: S.step(0.1, "10"), LrbsTypeError, r"milestones='10' is not allowed"),
    "polynomial power": (lambda: S.polynomial(0.1, 10, power=0), ConfigError, r"power=0 is not allowed"),
    "warmup kind": (
        lambda: S.warmup(S.constant(0.1), 5, kind="lin"),
        ConfigError,
        r"kind='lin' is not allowed: must be one of \['linear', 'exponential'\]",
    ),
    "warmup exp from 0": (
        lambda: S.warmup(S.constant(0.1), 5, start=0.0, kind="exponential"),
        ConfigError,
        r"warmup\(kind='exponential'\) with start=0.0 .* both must be > 0",
    ),
    "warmup not schedule": (
        lambda: S.warmup(0.1, 5),
        LrbsTypeError,
        r"schedule=0.1 is not allowed: must be a Schedule",
    ),
    "join not increasing": (
        lambda: S.join([S.constant(1.0)] * 3, [10, 10]),
        ConfigError,
        r"boundaries=\[10, 10\] is not allowed: must be strictly increasing",
    ),
    "join count": (
        lambda: S.join([S.constant(1.0)] * 3, [10]),
        ConfigError,
        r"join got 3 schedules and boundaries=\[10\]: len\(boundaries\) must be len\(schedules\) - 1 = 2",
    ),
    "join empty": (
        lambda: S.join([], []),
        LrbsTypeError,
        r"schedules=\(\) is not allowed: must be a non-empty list",
    ),
    "join element": (lambda: S.join([S.constant(1.0), 0.1], [3]), LrbsTypeError, r"schedules\[1\]=0.1"),
    "batch_ramp end < start": (
        lambda: S.batch_ramp(64, 32, 10),
        ConfigError,
        r"end=32 is not allowed: must be >= start=64",
    ),
    "batch_ramp increment": (
        lambda: S.batch_ramp(32, 100, 10, 32),
        ConfigError,
        r"increment=32 is not allowed: end - start = 68 must be a multiple of it",
    ),
    "batch_ramp zero": (
        lambda: S.batch_ramp(0, 32, 10),
        ConfigError,
        r"start=0 is not allowed: must be an integer >= 1",
    ),
    "batch_step count": (
        lambda: S.batch_step([32, 64], [10, 20]),
        ConfigError,
        r"len\(milestones\) must be len\(sizes\) - 1 = 1",
    ),
    "batch_step zero": (lambda: S.batch_step([0, 64], [10]), ConfigError, r"sizes\[0\]=0 is not allowed"),
    "step -1": (
        lambda: S.cosine(0.1, 10)(-1),
        ConfigError,
        r"step=-1 is not allowed: must be an integer >= 0",
    ),
    "step 1.5": (
        lambda: S.cosine(0.1, 10)(1.5),
        LrbsTypeError,
        r"step=1.5 is not allowed: must be an integer",
    ),
    "step True": (
        lambda: S.constant(0.1)(True),
        LrbsTypeError,
        r"step=True is not allowed: must be an integer",
    ),
    "values -1": (
        lambda: S.constant(0.1).values(-1),
        ConfigError,
        r"n=-1 is not allowed: must be an integer >= 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case):
    fn, error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=pattern):
        fn()


# ------------------------------------------------------------------------------------------------------------
# batch size: check, scaling rules, grow instead of decay


def test_check_batch_schedule():
    ok = S.check_batch_schedule(S.batch_ramp(16, 64, 6, 16), 8, 64)
    np.testing.assert_array_equal(ok, [16, 16, 32, 32, 48, 48, 64, 64])
    with pytest.raises(
        ConfigError, match=r"batch size 128 at step 3 .* must be an integer >= 1 and <= dataset_size=100"
    ):
        S.check_batch_schedule(S.batch_step([32, 128], [3]), 10, 100)
    with pytest.raises(ConfigError, match=r"batch size 0 at step 0 .* must be an integer >= 1"):
        S.check_batch_schedule(S.join([0 * S.batch_step([8], []), S.batch_step([8], [])], [2]), 4, 100)
    with pytest.raises(LrbsTypeError, match=r"batch size 0.5 at step 0 .* must be an integer"):
        S.check_batch_schedule(S.constant(0.5), 3, 100)
    with pytest.raises(LrbsTypeError, match=r"schedule=32 is not allowed: must be a Schedule"):
        S.check_batch_schedule(32, 3, 100)


@pytest.mark.parametrize(
    ("rule", "expected"), [("linear", 0.1 * 1024 / 256), ("sqrt", 0.1 * 2.0)], ids=["linear", "sqrt"]
)
def test_scale_lr(rule, expected):
    assert S.scale_lr(0.1, 1024, 256, rule) == pytest.approx(expected, rel=1e-15)
    scaled = S.scale_lr(S.cosine(0.1, 10), 1024, 256, rule)
    np.testing.assert_allclose(scaled.values(11), S.cosine(expected, 10).values(11), rtol=1e-14)


def test_scale_lr_errors():
    with pytest.raises(ConfigError, match=r"rule='squareroot' is not allowed: .*Did you mean 'sqrt'"):
        S.scale_lr(0.1, 512, 256, "squareroot")
    with pytest.raises(ConfigError, match=r"base_batch_size=0 is not allowed: must be a finite number > 0"):
        S.scale_lr(0.1, 512, 0)
    with pytest.raises(LrbsTypeError, match=r"lr='0.1' is not allowed: must be a real number"):
        S.scale_lr("0.1", 512, 256)


@pytest.mark.parametrize(
    ("lr_schedule", "base", "cap"),
    [
        (S.step(0.1, [30, 60, 80], 0.2), 128, 128 * 25),  # Smith et al. 2018: factor 5 per decay
        (S.step(0.1, [10, 20], 0.1), 64, 64 * 10),  # cap reached after the first decay
        (S.join([S.constant(0.3), S.constant(0.1), S.constant(0.025)], [5, 12]), 32, 10_000),
        (S.step(0.5, [4, 8, 12], 0.3), 100, 5000),  # non-integer ratios: batch rounded, LR absorbs it
    ],
    ids=["factor5", "capped", "join", "rounded"],
)
def test_grow_batch_instead(lr_schedule, base, cap):
    lr, batch = S.grow_batch_instead(lr_schedule, base, cap)
    n = 100
    orig, new_lr, b = lr_schedule.values(n), lr.values(n), batch.values(n)
    assert batch.integer and b.min() == base and b.max() <= cap
    np.testing.assert_allclose(new_lr / b, orig / base, rtol=1e-12)  # lr / B is the same at every step
    grows = b < cap
    exact = np.isclose(orig[0] / orig, np.round(orig[0] / orig), rtol=1e-9)
    np.testing.assert_allclose(
        new_lr[grows & exact], orig[0], rtol=1e-12
    )  # constant LR while the batch grows
    assert np.all(np.diff(b) >= 0)


def test_grow_batch_instead_factor5_values():
    lr, batch = S.grow_batch_instead(S.step(0.1, [30, 60], 0.2), 128, 10_000)
    assert batch.values(61)[[0, 29, 30, 59, 60]].tolist() == [128, 128, 640, 640, 3200]
    np.testing.assert_allclose(lr.values(61), 0.1, rtol=1e-12)
    lr, batch = S.grow_batch_instead(S.step(0.1, [30, 60], 0.2), 128, 1000)  # capped at 1000 after step 30
    assert batch.values(61)[[29, 30, 60]].tolist() == [128, 640, 1000]
    assert lr(60) == pytest.approx(0.1 * 0.04 * 1000 / 128, rel=1e-12)


def test_grow_batch_instead_errors():
    with pytest.raises(
        ConfigError, match=r"lr_schedule=cosine\(.*\) is not allowed: must be piecewise constant"
    ):
        S.grow_batch_instead(S.cosine(0.1, 10), 128, 1024)
    with pytest.raises(ConfigError, match=r"must be piecewise constant"):
        S.grow_batch_instead(S.step(0.1, 30), 128, 1024)
    with pytest.raises(ConfigError, match=r"its values must be > 0 and non-increasing"):
        S.grow_batch_instead(S.join([S.constant(0.1), S.constant(0.2)], [5]), 128, 1024)
    with pytest.raises(ConfigError, match=r"max_batch_size=64 is not allowed: must be an integer >= 128"):
        S.grow_batch_instead(S.step(0.1, [5]), 128, 64)


# ------------------------------------------------------------------------------------------------------------
# the spec parser


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("one_cycle(peak=0.1, total_steps=1000)", S.one_cycle(0.1, 1000)),
        ("warmup(cosine(start=0.1, steps=900), steps=100)", S.warmup(S.cosine(0.1, 900), 100)),
        ("0.5 * cosine(start=0.1, steps=100)", 0.5 * S.cosine(0.1, 100)),
        ("cosine(0.1, 100) * 2", S.cosine(0.1, 100) * 2),
        ("join([constant(0.1), constant(0.01)], (50,))", S.join([S.constant(0.1), S.constant(0.01)], [50])),
        ("  step(0.1, [30, 60], gamma=0.1)\n", S.step(0.1, [30, 60])),
        (
            "one_cycle(0.1, 100, three_phase=True, anneal='linear')",
            S.one_cycle(0.1, 100, anneal="linear", three_phase=True),
        ),
        ("cyclic(+0.001, 0.1, 10, None)", S.cyclic(0.001, 0.1, 10)),
    ],
)
def test_parse(spec, expected):
    assert S.parse(spec) == expected


def test_numpy_milestones():
    assert S.step(0.1, np.array([3, 7])) == S.step(0.1, [3, 7])
    assert S.join([S.constant(1.0), S.constant(0.5)], np.array([4])).boundaries == (4,)


PARSE_ERRORS = {
    "typo": ("cosin(start=0.1, steps=10)", r"unknown schedule 'cosin'\. Did you mean 'cosine'\?"),
    "typo nested": (
        "warmup(cosine_decay(0.1, 10), 5)",
        r"unknown schedule 'cosine_decay'\. Did you mean 'cosine'\?",
    ),
    "bare name": ("cosine", r"'cosine' must be called"),
    "variable": ("cosine(start=lr, steps=10)", r"unknown schedule 'lr'"),
    "attribute": (
        "os.system('ls')",
        r"a call to something other than a plain schedule name .* is not allowed",
    ),
    "import": ("__import__('os')", r"unknown schedule '__import__'"),
    "lambda": ("lambda: 0", r"the expression Lambda at column 1 is not allowed"),
    "power": ("cosine(0.1, 10 ** 9)", r"the operator Pow .* is not allowed"),
    "add": ("cosine(0.1, 10) + constant(0.1)", r"the operator Add"),
    "schedule * schedule": ("cosine(0.1, 10) * constant(0.1)", r"'\*' between two non-numbers"),
    "string * number": ("'ab' * 3", r"'\*' with a str"),
    "starargs": ("cosine(*[0.1, 10])", r"'\*args'"),
    "kwargs": ("cosine(**{'start': 0.1})", r"'\*\*kwargs'"),
    "unknown keyword": (
        "cosine(start=0.1, step=10)",
        r"cosine\(\.\.\.\) in spec=.*unexpected keyword argument 'step'",
    ),
    "syntax": ("cosine(start=0.1", r"is not a valid schedule expression"),
    "number only": ("0.1", r"must describe a schedule .* got float 0.1"),
    "minus on schedule": ("-cosine(0.1, 10)", r"a unary sign on Cosine"),
    "bad value inside": (
        "cosine(start=-0.1, steps=10)",
        r"start=-0.1 is not allowed: must be a finite number >= 0",
    ),
    "bytes": ("constant(b'1')", r"the literal b'1'"),
    "too long": (
        "constant(" + "1" * 20_000 + ")",
        r"spec of 20010 characters is not allowed: must be at most 10000",
    ),
    "too deep": ("join([" * 40 + "constant(1.0)" + "], [])" * 40, r"nesting deeper than 32 is not allowed"),
    "dict": ("constant({1: 2})", r"the expression Dict"),
}


@pytest.mark.parametrize("case", list(PARSE_ERRORS))
def test_parse_errors(case):
    spec, pattern = PARSE_ERRORS[case]
    with pytest.raises(ConfigError, match=pattern):
        S.parse(spec)


def test_parse_not_a_string():
    with pytest.raises(LrbsTypeError, match=r"spec=3 is not allowed: must be a string"):
        S.parse(3)


# ------------------------------------------------------------------------------------------------------------
# key steps, plot, CLI


def test_key_steps():
    assert S.one_cycle(0.1, 100).key_steps() == [0, 28, 29, 98, 99, 100]
    assert S.join([S.constant(0.1), S.cosine(0.1, 10)], [5]).key_steps() == [0, 4, 5, 14, 15]
    assert S.cyclic(0.1, 1.0, 2, 3).key_steps(11) == [0, 1, 2, 4, 5, 6, 7, 9, 10]
    assert S.constant(1.0).key_steps() == [0, 99]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    ax = S.one_cycle(0.1, 50).plot()
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), S.one_cycle(0.1, 50).values(51))
    ax2 = S.batch_step([8, 16], [5]).plot(10)
    assert ax2.get_ylabel() == "batch size" and len(ax2.get_lines()[0].get_xdata()) == 10
    ax.figure.savefig(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def _cli(argv):
    from lrbs.cli import main

    return main(argv)


def test_cli_prints_table(capsys, tmp_path):
    out_png = tmp_path / "one_cycle.png"
    rc = _cli(["schedule", "one_cycle(peak=0.1, total_steps=1000)", "--plot", str(out_png)])
    out = capsys.readouterr().out
    assert rc == 0
    s = S.one_cycle(0.1, 1000)
    rows = {int(m[0]): m[1] for m in re.findall(r"│\s*(\d+)\s*│\s*(\S+)\s*│", out)}
    assert sorted(rows) == [0, 298, 299, 998, 999, 1000]  # start, peak (end of phase 1), end, held value
    for t, text in rows.items():
        assert float(text) == pytest.approx(s(t), rel=1e-5)
    assert "end (holds after)" in out and "total_steps: 1000" in out
    assert out_png.stat().st_size > 1000


def test_cli_prints_spec_verbatim(capsys):
    assert _cli(["schedule", "join([constant(0.1), cosine(0.1, 10)], [5])"]) == 0
    out = capsys.readouterr().out
    assert (
        "join(schedules=[constant(value=0.1), cosine(start=0.1, steps=10, end=0.0)], boundaries=[5])" in out
    )


def test_cli_batch_and_steps(capsys):
    rc = _cli(["schedule", "batch_step([32, 256], [10])", "--steps", "20"])
    out = capsys.readouterr().out
    assert rc == 0 and "batch size" in out and "256" in out and "steps shown: 20" in out


def test_cli_errors(capsys):
    assert _cli(["schedule", "cosin(start=0.1, steps=10)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrbs: error: unknown schedule 'cosin'. Did you mean 'cosine'?")
    assert _cli(["schedule", "cosine(0.1, 10)", "--steps", "0"]) == 2
    assert "--steps=0 is not allowed: must be an integer >= 1" in capsys.readouterr().err
    assert _cli(["schedule", "cosine(0.1, 10)", "--plot", "/nonexistent-dir/x.png"]) == 2
    assert "--plot='/nonexistent-dir/x.png' cannot be written" in capsys.readouterr().err
