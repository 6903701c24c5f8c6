"""The batch-size paper modules (Goyal 2017, Smith 2018, McCandlish 2018) at quick scale, into a tmp store.

One module-scoped run of the three papers (about 10 s of CPU); the tests check the structure of what they return,
that their numbers are consistent with independent recomputations (closed forms, the store's training records),
and that a second run is served from the store without training.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from lrbs.papers import _common, run_paper
from lrbs.report import Section

PAPERS = ("goyal2017accurate", "smith2018dont", "mccandlish2018empirical")
VERDICTS = {"reproduced", "not reproduced", "inconclusive"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("batch_papers")
    times, results = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spins (10x slower on a loaded machine)
    try:
        for name in PAPERS:
            t = time.perf_counter()
            results[name] = run_paper(name, scale="quick", out=str(out))
            times[name] = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    yield out, results, times


def _flat(v):
    if isinstance(v, (list, tuple)):
        return [x for e in v for x in _flat(e)]
    return [v]


@pytest.mark.parametrize("name", PAPERS)
def test_structure(runs, name):
    _, results, _ = runs
    res = results[name]
    assert res.name == name
    assert isinstance(res.section, Section) and res.section.id == name
    assert res.section.figures and res.section.tables
    assert len(res.findings) >= 3
    for f in res.findings:
        assert f.verdict in VERDICTS
        assert f.section == name
        # every number behind a finding is also in the paper's numbers (which the study stores)
        stored = {repr(x) for v in res.numbers.values() for x in _flat(v)}
        for v in f.numbers.values():
            for x in _flat(v):
                assert repr(x) in stored, (f.claim, x)
    # JSON-able after the study's cleaning
    import json

    json.dumps(_common.clean(res.numbers))


def test_goyal_numbers(runs):
    from lrbs.papers import goyal2017accurate as g

    _, results, _ = runs
    num = results["goyal2017accurate"].numbers
    assert num["batch_sizes"] == [32, 64, 128, 256, 2048]
    for b in num["batch_sizes"]:
        assert 0.0 <= num[f"test_acc_B{b}_mean"] <= 1.0
        # the drop is base minus this batch (one seed: a plain difference)
        assert num[f"drop_B{b}_mean"] == pytest.approx(num["test_acc_B32_mean"] - num[f"test_acc_B{b}_mean"])
    assert num["drop_B32_mean"] == 0.0
    # B* is the last batch before the first one that loses more than a point (one seed: sd = 0)
    first_bad = next((b for b in num["batch_sizes"] if num[f"drop_B{b}_mean"] > 0.01 + 1e-9), None)
    assert num["b_break"] == first_bad
    ok = [b for b in num["batch_sizes"] if first_bad is None or b < first_bad]
    assert num["b_star"] == ok[-1]
    assert num["base_lr"] == g.LR0 and num["B0"] == g.B0


def test_goyal_config_is_linear_scaling():
    """The scaled config's LR, rebuilt by train_config's rule, is LR0 * B/B0 after warmup and decays to 0."""
    from lrbs.data import load_dataset
    from lrbs.papers import goyal2017accurate as g
    from lrbs.recipes import linear_scaling
    from lrbs.schedules import parse

    ctx = _common.Context(store=None, scale="full", seeds=(0,), dataset=load_dataset("mnist1d"))
    cfg = g.config(ctx, 256, 0)
    lr = linear_scaling(parse(cfg["lr"]), 256, cfg["base_batch_size"], warmup_steps=cfg["warmup"])
    total = math.ceil(cfg["epochs"] * 4000 / 256)
    w = cfg["warmup"]
    assert w == round(2 * 4000 / 256)
    assert lr(0) == pytest.approx(g.LR0)  # warmup starts at the unscaled LR
    assert lr(w) == pytest.approx(g.LR0 * 256 / 32)  # peak = linear rule
    assert lr(total) == pytest.approx(0.0, abs=1e-12)  # cosine ends at the budget
    ctl = g.config(ctx, 256, 0, scaled=False)
    assert parse(ctl["lr"])(0) == pytest.approx(g.LR0) and "lr_rule" not in ctl


def test_smith_schedules():
    """Batch growth sees the same samples per phase as LR decay; the hybrid follows grow_batch_instead."""
    from lrbs.data import load_dataset
    from lrbs.papers import smith2018dont as sm
    from lrbs.schedules import parse

    ctx = _common.Context(store=None, scale="full", seeds=(0,), dataset=load_dataset("mnist1d"))
    cfgs = sm.configs(ctx, 0)
    n, e = 4000, cfgs["a"]["epochs"]
    lr_a = parse(cfgs["a"]["lr"])
    # (a): LR / 5 after 50% and 75% of the epochs at batch 32
    m1, m2 = e * n // 2 // 32, 3 * e * n // 4 // 32
    assert (
        lr_a(m1 - 1) == pytest.approx(0.05)
        and lr_a(m1) == pytest.approx(0.01)
        and lr_a(m2) == pytest.approx(0.002)
    )
    # (b): samples seen when the batch grows equal the samples at the LR decays of (a)
    bs = parse(cfgs["b"]["batch_size"])
    sizes = bs.values(e * n // 32)
    samples = np.cumsum(sizes)
    first160 = int(np.argmax(sizes == 160))
    first800 = int(np.argmax(sizes == 800))
    assert samples[first160 - 1] == m1 * 32
    assert samples[first800 - 1] == m2 * 32
    assert cfgs["b"]["lr"] == 0.05
    # (c): noise scale lr/B equals (a)'s in every phase
    lr_c, bs_c = parse(cfgs["c"]["lr"]), parse(cfgs["c"]["batch_size"])
    for t in (0, bs_c.milestones[0], bs_c.milestones[1]):
        phase = sum(t >= m for m in bs_c.milestones)
        assert lr_c(t) / bs_c(t) == pytest.approx([0.05, 0.01, 0.002][phase] / 32)


def test_smith_numbers(runs):
    out, results, _ = runs
    num = results["smith2018dont"].numbers
    # same samples for every schedule, fewer updates for batch growth
    assert num["a_samples"] == num["b_samples"] == num["c_samples"] == 8 * 4000
    assert num["a_updates"] == 8 * 4000 // 32
    assert num["b_updates"] == 4 * 125 + 2 * 25 + 2 * 5  # 16 / 160 / 800 per 4000 samples
    assert num["updates_ratio_b_over_a"] == pytest.approx(num["b_updates"] / num["a_updates"])
    assert num["b_minus_a_mean"] == pytest.approx(num["b_test_acc_mean"] - num["a_test_acc_mean"])


def test_mccandlish_numbers(runs):
    from lrbs.noise_scale import critical_batch

    _, results, _ = runs
    num = results["mccandlish2018empirical"].numbers
    assert all(np.isfinite(v) and v > 0 for v in num["b_simple_init"])
    for b, (lo, hi) in zip(num["b_simple_init"], num["b_simple_init_ci"]):
        assert lo <= b <= hi
    # snapshots: step 0 is the initialization, the loss falls along training
    assert num["snapshot_steps"][0] == 0
    loss = num["snapshot_train_loss"]
    assert loss[-1] < loss[0]
    assert loss[0] == pytest.approx(math.log(10), abs=0.05)  # chance-level cross-entropy at init
    # B_crit re-fitted independently from the stored (B, S) pairs
    pairs = num["sweep_pairs"]
    if len({b for b, _ in pairs}) >= 2:
        cb = critical_batch([tuple(p) for p in pairs])
        assert num["b_crit"] == pytest.approx(cb.b_crit, rel=1e-9)
        assert num["b_simple_over_b_crit"] == pytest.approx(num["b_simple_at_target"] / cb.b_crit)
    # S for each pair is the step of the first eval at or below the target: S * B <= budget
    for b, s in pairs:
        assert 0 < s * b <= 8 * 4000 + b


def test_second_run_served_from_store(runs):
    out, results, times = runs
    from lrbs.store import Store

    st = Store(out / "lab.sqlite")
    try:
        n_before = len(st.runs())
    finally:
        st.close()
    t0 = time.perf_counter()
    again = {name: run_paper(name, scale="quick", out=str(out)) for name in PAPERS}
    assert all(isinstance(r.section, Section) for r in again.values())
    dt = time.perf_counter() - t0
    st = Store(out / "lab.sqlite")
    try:
        assert len(st.runs()) == n_before  # nothing trained or measured again
    finally:
        st.close()
    print(f"second run {dt:.1f}s vs first {sum(times.values()):.1f}s")
    for name in PAPERS:
        assert [f.verdict for f in again[name].findings] == [f.verdict for f in results[name].findings]
        assert _common.clean(again[name].numbers) == _common.clean(results[name].numbers)
