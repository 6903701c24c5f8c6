"""The landscape and connectivity paper modules (Li et al. 2018; Draxler et al. 2018) at quick scale.

Training is shortened further through the modules' config helpers so the whole file stays fast; the structure,
the numbers' consistency with naive recomputations, and the store cache are what is checked.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch

from lrbs.papers import draxler2018essentially as drax
from lrbs.papers import keskar2017large as keskar
from lrbs.papers import li2018visualizing as li
from lrbs.papers._common import Context, paired
from lrbs.report import Figure, Section, Table
from lrbs.store import Store

VERDICTS = {"reproduced", "not reproduced", "inconclusive"}


@pytest.fixture(scope="module")
def shortened():
    """Shorter than the quick study: keskar 4 epochs, resnet1d 40 steps, 9x9 grids, short curve and NEB."""
    mp = pytest.MonkeyPatch()
    orig_k, orig_r = keskar.config, li._resnet_config
    mp.setattr(keskar, "config", lambda ctx, b, s, **kw: {**orig_k(ctx, b, s, **kw), "epochs": 4})
    mp.setattr(
        li,
        "_resnet_config",
        lambda ctx, d, skip, s: {**orig_r(ctx, d, skip, s), "steps": 40, "eval_every": 40},
    )
    mp.setattr(li, "_grid", lambda ctx, kind: np.linspace(-1, 1, 9))
    orig_c, orig_n = drax._curve_settings, drax._neb_settings
    mp.setattr(drax, "_curve_settings", lambda ctx: {**orig_c(ctx), "epochs": 2})
    mp.setattr(drax, "_neb_settings", lambda ctx: {**orig_n(ctx), "steps": 20})
    yield
    mp.undo()


@pytest.fixture(scope="module")
def results(tmp_path_factory, shortened):
    out = tmp_path_factory.mktemp("study")
    store = Store(out / "lab.sqlite")
    ctx = Context(store=store, scale="quick", seeds=(0,), out=out, log=lambda s: None)
    t0 = time.perf_counter()
    first = {"draxler": drax.run(ctx), "li": li.run(ctx)}
    t1 = time.perf_counter()
    n_runs = len(store.runs())
    second = {"draxler": drax.run(ctx), "li": li.run(ctx)}
    t2 = time.perf_counter()
    yield {
        "ctx": ctx,
        "store": store,
        "first": first,
        "second": second,
        "t_first": t1 - t0,
        "t_second": t2 - t1,
        "runs_before": n_runs,
        "runs_after": len(store.runs()),
    }
    store.close()


def _all_values(numbers: dict) -> list:
    vals = []
    for v in numbers.values():
        if isinstance(v, (list, tuple)):
            vals.extend(v)
        else:
            vals.append(v)
    return vals


@pytest.mark.parametrize("which", ["draxler", "li"])
def test_structure(results, which):
    res = results["first"][which]
    assert res.name == {"draxler": drax.NAME, "li": li.NAME}[which]
    assert isinstance(res.section, Section)
    assert res.section.figures and all(isinstance(f, Figure) for f in res.section.figures)
    assert res.section.tables and all(isinstance(t, Table) for t in res.section.tables)
    assert len(res.findings) >= 2
    stored = _all_values(res.numbers)
    for f in res.findings:
        assert f.verdict in VERDICTS
        assert f.section == res.name
        # every number behind a finding is also in the stored numbers
        for v in _all_values(f.numbers):
            assert any(
                v == s or (isinstance(v, float) and isinstance(s, float) and math.isclose(v, s))
                for s in stored
            ), (f.claim, v)


def test_served_from_store(results):
    assert results["runs_after"] == results["runs_before"]  # nothing trained or measured again
    for which in ("draxler", "li"):
        a, b = results["first"][which].numbers, results["second"][which].numbers
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(
                np.asarray(a[k], float), np.asarray(b[k], float), rtol=1e-12, err_msg=k
            )


def test_draxler_numbers_against_naive(results):
    ctx, num = results["ctx"], results["first"]["draxler"].numbers
    for k in ("linear", "bezier", "neb"):
        for b in drax.BARRIERS:
            assert math.isfinite(num[f"pair01_{k}_{b}"])
    assert num["pair01_linear_max_minus_mean"] > 0
    # ratios are the barrier quotients
    for k in ("bezier", "neb"):
        assert num[f"pair01_{k}_ratio"] == pytest.approx(
            num[f"pair01_{k}_max_minus_mean"] / num["pair01_linear_max_minus_mean"], rel=1e-12
        )
    # the linear path's endpoints: plain float64 cross-entropy of each model on the full training set
    (a, b) = ctx.train_many(keskar.NAME, [keskar.config(ctx, keskar.SB, s) for s in (0, 1)])
    x, y = ctx.dataset.train.x.double(), ctx.dataset.train.y.long()
    with torch.no_grad():
        la = torch.nn.functional.cross_entropy(copy.deepcopy(a.model).double().eval()(x), y).item()
        lb = torch.nn.functional.cross_entropy(copy.deepcopy(b.model).double().eval()(x), y).item()
    arrays = drax._paths(ctx, a, b)["arrays"]
    prof = np.asarray(arrays["linear_loss"], float)
    assert prof[0] == pytest.approx(la, rel=1e-4)
    assert prof[-1] == pytest.approx(lb, rel=1e-4)
    # barrier definitions recomputed by a naive loop over the stored profile
    t = np.asarray(arrays["linear_t"], float)
    chord = max(prof[i] - ((1 - t[i]) * prof[0] + t[i] * prof[-1]) for i in range(len(t)))
    assert num["pair01_linear_max_above_chord"] == pytest.approx(chord, rel=1e-9)
    assert num["pair01_linear_max_minus_mean"] == pytest.approx(
        max(prof) - 0.5 * (prof[0] + prof[-1]), rel=1e-9
    )


def test_li_numbers_against_naive(results):
    ctx, num = results["ctx"], results["first"]["li"].numbers
    (sb,) = ctx.train_many(keskar.NAME, [keskar.config(ctx, keskar.SB, 0)])
    m = li._surface(ctx, sb, "mlp")
    z, g = np.asarray(m["arrays"]["loss"], float), np.asarray(m["arrays"]["alphas"], float)
    c = len(g) // 2
    assert g[c] == 0.0
    # the centre of the surface is the model's own loss on the fixed subset (float64 re-evaluation)
    obj = ctx.objective(sb.model, max_samples=li.SUBSET, seed=0)
    xs, ys = obj.data
    with torch.no_grad():
        centre = torch.nn.functional.cross_entropy(
            copy.deepcopy(sb.model).double().eval()(xs.double()), ys.long()
        )
    centre = centre.item()
    assert z[c, c] == pytest.approx(centre, rel=1e-4)
    # the flatness number by a naive double loop
    rises = [
        z[i, j] - z[c, c] for i in range(len(g)) for j in range(len(g)) if math.hypot(g[i], g[j]) <= li.RADIUS
    ]
    assert num["SB_rise_mean"] == pytest.approx(sum(rises) / len(rises), rel=1e-9)
    for tag in ("skip", "plain"):
        assert 0.0 <= num[f"{tag}_nc_ratio_mean"] <= 1.0
        assert 0.0 <= num[f"{tag}_nc_fraction_mean"] <= 1.0
    # the quick run has no depth comparison and says so
    assert results["first"]["li"].findings[-1].verdict == "inconclusive"


def test_paired_verdict():
    assert paired([0.5]) is True
    assert paired([-0.1]) is False
    assert paired([0.0, 0.0]) is False
    assert paired([1.0, 1.1, 0.9]) is True
    assert paired([1.0, -0.9]) is None  # positive mean within noise
    assert paired([float("nan")]) is None


def test_side_by_side_shares_levels():
    g = np.linspace(-1, 1, 5)
    aa, bb = np.meshgrid(g, g, indexing="ij")
    panels = [
        ("a", {"alphas": g, "betas": g, "loss": 0.1 + aa**2 + bb**2}),
        ("b", {"alphas": g, "betas": g, "loss": 0.1 + 10 * (aa**2 + bb**2)}),
    ]
    fig = li._side_by_side(panels)
    levels = [
        ax.collections[0].levels for ax in fig.axes if ax.collections and hasattr(ax.collections[0], "levels")
    ]
    assert len(levels) >= 2
    np.testing.assert_allclose(levels[0], levels[1])
