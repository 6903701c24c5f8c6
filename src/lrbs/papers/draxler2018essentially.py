"""Draxler et al. 2018, "Essentially No Barriers in Neural Network Energy Landscape" (ICML 2018, arXiv 1803.00885),
with Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs" (NeurIPS 2018,
arXiv 1802.10026).

Both papers find that two minima trained from different random initializations, which are separated by a clear
loss barrier along the straight line between them, are joined by a simple curve (a quadratic Bezier curve,
Garipov et al.) or a nudged elastic band (AutoNEB, Draxler et al.) along which the training loss stays almost as
low as at the endpoints. Reproduced on MNIST-1D with the MNIST-1D MLP:

- the two minima are the small-batch (B = 64, Adam) solutions of seeds 0 and 1 — the same models as the
  Keskar et al. section, so they are trained once. The pair is fixed up front and does not follow the study's
  seeds: a barrier is a property of a *pair* of minima, and seeds 0 and 1 are the first pair (the full run adds
  a second, independent pair, seeds 2 and 3);
- the linear path, a quadratic Bezier curve (one trainable bend, SGD with Garipov et al.'s LR schedule) and
  AutoNEB (Henkelman-Jonsson tangent, k = infinity spring, automatic pivot insertion), all evaluated densely on
  the full training and test sets;
- the three barrier definitions for each path (maximum loss, maximum minus the mean of the endpoints, maximum
  above the chord).
"""

from __future__ import annotations

import numpy as np

from ..report import Figure, Finding, Table
from . import keskar2017large as keskar
from ._common import Context, PaperResult, verdict
from .sections import paper_result

NAME = "draxler2018essentially"
TITLE = "Mode connectivity: essentially no barriers between minima (Draxler et al. 2018; Garipov et al. 2018)"

#: a curve "removes" the barrier when its barrier (max minus endpoint mean) is at most this fraction of the linear one
MAX_RATIO = 0.25
BARRIERS = ("max_loss", "max_minus_mean", "max_above_chord")
PATHS = ("linear", "bezier", "neb")


def _pairs(ctx: Context) -> list[tuple[int, int]]:
    return ctx.pick([(0, 1)], [(0, 1), (2, 3)])


def _curve_settings(ctx: Context) -> dict:
    return {
        "kind": "bezier",
        "bends": 1,
        "epochs": ctx.pick(6, 15),
        "lr": 0.05,
        "batch_size": 128,
        "seed": 0,
        "bn": "eval",
        "num_eval": 41,
    }


def _neb_settings(ctx: Context) -> dict:
    return {
        "cycles": ctx.pick(2, 3),
        "steps": ctx.pick(60, 120),
        "lr": 0.05,
        "batch_size": 128,
        "initial_pivots": 3,
        "insert_per_cycle": 2,
        "subpoints": 5,
        "seed": 0,
        "bn": "eval",
    }


def _paths_compute(ctx: Context, a, b, cs: dict, ns: dict) -> dict:
    """Linear path, Bezier curve (settings ``cs``) and AutoNEB (settings ``ns``) between ``a`` and ``b``."""
    from ..connectivity import auto_neb, fit_curve, linear_path

    obj = ctx.objective(a.model)
    test = ctx.objective(a.model, split="test")
    paths = {
        "linear": linear_path(a.model, b.model, obj, n=41, test_obj=test),
        "bezier": fit_curve(a.model, b.model, ctx.dataset, **cs).path,
        "neb": auto_neb(a.model, b.model, ctx.dataset, **ns),
    }
    out: dict = {"arrays": {}}
    for k, p in paths.items():
        for name in BARRIERS:
            out[f"{k}_{name}"] = p.barriers[name]
            out[f"{k}_test_{name}"] = p.test_barriers[name] if p.test_barriers else float("nan")
        out[f"{k}_length"] = p.length
        out["arrays"].update(
            {
                f"{k}_t": p.t,
                f"{k}_loss": p.loss,
                f"{k}_test_loss": p.test_loss,
                f"{k}_acc": p.accuracy,
                f"{k}_test_acc": p.test_accuracy,
            }
        )
    out["neb_pivots"] = int(paths["neb"].settings["num_pivots"])
    return out


def _paths(ctx: Context, a, b, wait: bool = True):
    """Linear path, Bezier curve and AutoNEB between the trained models ``a`` and ``b`` (cached)."""
    cs, ns = _curve_settings(ctx), _neb_settings(ctx)
    config = {"a": a.key, "b": b.key, "curve": cs, "neb": ns, "linear_n": 41}
    return ctx.measure(NAME, "paths", config, _paths_compute, ctx, a, b, cs, ns, wait=wait)


def run(ctx: Context) -> PaperResult:
    """The study's stages: the minima (keskar's SB runs), the paths, measure, tables and figures, findings."""
    pairs = _pairs(ctx)
    ctx.log(f"[{NAME}] pairs {pairs} (fixed; independent of the study seeds)")
    seeds = sorted({s for p in pairs for s in p})
    trained = dict(zip(seeds, ctx.train_many(keskar.NAME, [keskar.config(ctx, keskar.SB, s) for s in seeds])))
    started = {p: _paths(ctx, trained[p[0]], trained[p[1]], wait=False) for p in pairs}
    meas = {p: m.result() for p, m in started.items()}
    numbers, rows, ratio_rows, ok_all, findings_numbers = _measure(meas, trained)
    tables = _tables(seeds, trained, rows, ratio_rows)
    figures = [
        Figure(
            f"Loss along the paths between the minima of seeds {p[0]} and {p[1]}",
            _profile_figure(m["arrays"], p),
            "Train (solid) and test (dashed) cross-entropy against the path parameter t "
            "(AutoNEB: normalized arc length).",
        )
        for p, m in meas.items()
    ]
    findings = _findings(pairs, meas, numbers, ok_all, findings_numbers)
    settings = {
        "model": "mlp (depth 3, width 100)",
        "minima": f"keskar2017large SB runs (B={keskar.SB}, adam)",
        "pairs": [list(p) for p in pairs],
        "bezier": _curve_settings(ctx),
        "autoneb": _neb_settings(ctx),
        "claim_threshold": MAX_RATIO,
        "data_fingerprint": ctx.dataset.fingerprint,
    }
    return paper_result(NAME, TITLE, __doc__, figures, tables, findings, settings, numbers)


def _measure(meas: dict, trained: dict) -> tuple:
    """The numbers of every pair (endpoints, barriers, lengths, curve / linear ratios) and the table rows."""
    numbers: dict = {}
    rows, ratio_rows = [], []
    ok_all = []
    findings_numbers: dict = {}
    for p, m in meas.items():
        tag = f"pair{p[0]}{p[1]}"
        for s in p:
            numbers[f"{tag}_seed{s}_train_loss"] = trained[s].final.get("train_loss")
            numbers[f"{tag}_seed{s}_test_acc"] = trained[s].final.get("test_acc")
        for k in PATHS:
            for name in BARRIERS:
                numbers[f"{tag}_{k}_{name}"] = m[f"{k}_{name}"]
                numbers[f"{tag}_{k}_test_{name}"] = m[f"{k}_test_{name}"]
            numbers[f"{tag}_{k}_length"] = m[f"{k}_length"]
            rows.append(
                [f"{p[0]}-{p[1]}", k]
                + [m[f"{k}_{name}"] for name in BARRIERS]
                + [m[f"{k}_test_max_minus_mean"], m[f"{k}_length"]]
            )
        lin = m["linear_max_minus_mean"]
        for k in ("bezier", "neb"):
            r = m[f"{k}_max_minus_mean"] / lin if lin > 0 else float("nan")
            numbers[f"{tag}_{k}_ratio"] = r
            findings_numbers[f"pair {p[0]}-{p[1]} {k}/linear"] = r
            ok_all.append(bool(np.isfinite(r) and r <= MAX_RATIO))
        numbers[f"{tag}_neb_pivots"] = m["neb_pivots"]
        ratio_rows.append(
            [
                f"{p[0]}-{p[1]}",
                lin,
                m["bezier_max_minus_mean"],
                numbers[f"{tag}_bezier_ratio"],
                m["neb_max_minus_mean"],
                numbers[f"{tag}_neb_ratio"],
            ]
        )
        findings_numbers[f"pair {p[0]}-{p[1]} linear barrier"] = lin
    return numbers, rows, ratio_rows, ok_all, findings_numbers


def _tables(seeds: list, trained: dict, rows: list, ratio_rows: list) -> list[Table]:
    """Ratios to the linear barrier, every path's barriers, and the minima."""
    barrier_table = Table(
        "Barriers along each path (train loss; every pair)",
        [
            "pair (seeds)",
            "path",
            "max loss",
            "max - endpoint mean",
            "max above chord",
            "test: max - mean",
            "length ||.||",
        ],
        rows,
        note="Full training set (4000 samples) and test set (1000), no BatchNorm; paths evaluated at 41 points "
        "(Bezier, linear) or at the pivots plus 5 points per gap (AutoNEB).",
    )
    ratio_table = Table(
        "Curve barrier relative to the linear barrier (max minus endpoint mean)",
        ["pair (seeds)", "linear", "Bezier", "Bezier / linear", "AutoNEB", "AutoNEB / linear"],
        ratio_rows,
    )
    endpoint_table = Table(
        "The minima (small-batch Adam runs of the Keskar et al. section)",
        ["seed", "train loss", "train acc", "test acc"],
        [
            [
                s,
                trained[s].final.get("train_loss"),
                trained[s].final.get("train_acc"),
                trained[s].final.get("test_acc"),
            ]
            for s in seeds
        ],
    )
    return [ratio_table, barrier_table, endpoint_table]


def _findings(pairs: list, meas: dict, numbers: dict, ok_all: list, findings_numbers: dict) -> list[Finding]:
    """A clear linear barrier; the Bezier curve and AutoNEB path below MAX_RATIO of it."""
    verdict_ok = all(ok_all)
    pair_text = "; ".join(
        f"seeds {p[0]}-{p[1]}: linear {meas[p]['linear_max_minus_mean']:.3g}, Bezier "
        f"{meas[p]['bezier_max_minus_mean']:.3g} ({100 * numbers[f'pair{p[0]}{p[1]}_bezier_ratio']:.0f}%), AutoNEB "
        f"{meas[p]['neb_max_minus_mean']:.3g} ({100 * numbers[f'pair{p[0]}{p[1]}_neb_ratio']:.0f}%)"
        for p in pairs
    )
    lin_clear = all(meas[p]["linear_max_minus_mean"] > 0.1 for p in pairs)
    return [
        Finding(
            "Two minima from different initializations are separated by a clear barrier on the straight line.",
            "Linear-path barrier (max minus endpoint mean, train loss) "
            + ", ".join(
                f"seeds {p[0]}-{p[1]}: {meas[p]['linear_max_minus_mean']:.3g} (max loss "
                f"{meas[p]['linear_max_loss']:.3g})"
                for p in pairs
            )
            + "; 'clear' means > 0.1 nats.",
            verdict(lin_clear),
            {f"pair {p[0]}-{p[1]} linear barrier": meas[p]["linear_max_minus_mean"] for p in pairs},
            section=NAME,
        ),
        Finding(
            f"A Bezier curve (Garipov et al.) and an AutoNEB path (Draxler et al.) join the same minima with "
            f"essentially no barrier: at most {int(MAX_RATIO * 100)}% of the linear one.",
            pair_text
            + f". Pairs are fixed (seeds 0-1{', 2-3' if len(pairs) > 1 else ''}); every pair is shown.",
            verdict(verdict_ok if lin_clear else None),
            findings_numbers,
            section=NAME,
        ),
    ]


def _profile_figure(arrays: dict, pair: tuple[int, int]):
    from ..report.figures import PALETTE, new_axes, style_axes

    fig, (ax,) = new_axes(None, figsize=(6.4, 3.6))
    for i, (k, label) in enumerate((("linear", "linear"), ("bezier", "Bezier curve"), ("neb", "AutoNEB"))):
        ax.plot(arrays[f"{k}_t"], arrays[f"{k}_loss"], "-", color=PALETTE[i], label=f"{label} (train)")
        ax.plot(arrays[f"{k}_t"], arrays[f"{k}_test_loss"], "--", color=PALETTE[i], label=f"{label} (test)")
    ax.set_yscale("log")
    style_axes(ax, f"Seeds {pair[0]} -> {pair[1]}", "t", "cross-entropy")
    ax.legend(fontsize=7, frameon=False, ncol=2)
    return fig
