"""Smith 2017, "Cyclical Learning Rates for Training Neural Networks" (arXiv 1506.01186), with SGDR and one-cycle.

The seed's first recipe and its two hypotheses. Reproduced on MNIST-1D with the MNIST-1D paper's CNN (cnn1d),
SGD with momentum 0.9, batch 100:

- the LR range test (exponential sweep, bias-corrected EMA, stop on divergence) gives a recommended LR and the
  ``[base_lr, max_lr]`` bounds for cyclical schedules;
- six schedules with the same number of steps, all peaking at the recommended LR: constant, step decay (x0.1 at
  50% and 75%), cosine with 5% linear warmup, cyclical triangular2 between a quarter of it and it (Smith 2017), SGDR
  with a peak that halves at every restart (Loshchilov & Hutter 2017, and the seed's "the base LR itself decays"),
  and one-cycle (Smith & Topin 2019); final test accuracy over seeds, and the curves;
- hypothesis 1 (raising the LR escapes sharp minima): the sharpness of each schedule's final solution (top Hessian
  eigenvalue, Keskar's epsilon-sharpness);
- hypothesis 2 (raising the LR escapes saddle points faster): the mass of negative Hessian eigenvalues from the
  spectral density (stochastic Lanczos quadrature) at several points along training, constant vs cyclical LR.
"""

from __future__ import annotations

import numpy as np

from .._util import pm
from ..report import Figure, Finding, Table, plot_bars, plot_curves, plot_fit
from ..schedules import constant, cosine, cyclic, one_cycle, sgdr, step, warmup
from ._common import Context, PaperResult, mean_sd, verdict
from .sections import paper_result

NAME = "smith2017cyclical"
TITLE = "Learning-rate range test and cyclical schedules (Smith 2017; SGDR; one-cycle)"
BATCH = 100


def _base(ctx: Context, lr, seed: int) -> dict:
    steps = ctx.pick(500, 2000)
    return {
        "model": "cnn1d",
        "optimizer": "sgd",
        "momentum": 0.9,
        "lr": lr,
        "batch_size": BATCH,
        "steps": steps,
        "seed": seed,
        "eval_every": steps // ctx.pick(5, 20),
    }


def _range_test_compute(ctx: Context, repeats: int) -> dict:
    """The LR range test of the cnn1d at batch 100 (runs in a worker with ``jobs > 1``)."""
    import torch

    from ..models import build_model
    from ..range_test import lr_range_test

    model = build_model("cnn1d", dataset=ctx.dataset, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    res = lr_range_test(
        model,
        opt,
        data=ctx.dataset,
        start_lr=1e-5,
        end_lr=10.0,
        num_iter=100,
        batch_size=BATCH,
        repeats=repeats,
        seed=0,
    )
    rec, why = res.recommended()
    base, peak = res.lr_bounds()
    sugg = {m: float(res.suggest(m)[0]) for m in ("valley", "steepest", "minimum", "slide")}
    return {
        "recommended": float(rec),
        "why": why,
        "base_lr": float(base),
        "max_lr": float(peak),
        "suggestions": sugg,
        "diverged_at": None if res.diverged_at is None else float(res.lrs[res.diverged_at]),
        "arrays": {
            "lrs": np.asarray(res.lrs),
            "losses": np.asarray(res.losses),
            "smoothed": np.asarray(res.smoothed),
        },
    }


def _range_test(ctx: Context) -> dict:
    repeats = ctx.pick(1, 3)
    config = {"model": "cnn1d", "batch": BATCH, "repeats": repeats}
    return ctx.measure(NAME, "range_test", config, _range_test_compute, ctx, repeats)


def _schedules(ctx: Context, lr: float) -> dict[str, str]:
    """Every schedule peaks at the range test's recommended LR; cyclical ones go down to a quarter of it.

    One peak for all keeps the comparison like-for-like. Smith (2017) sets ``base_lr`` to 1/3-1/4 of ``max_lr``;
    the range test's own ``lr_bounds()`` upper end sits close to divergence for momentum SGD (one-cycle at it
    killed the network in a trial run), so it is reported but not used as the peak.
    """
    T = ctx.pick(500, 2000)
    W = T // 20
    return {
        "constant": repr(constant(lr)),
        "step decay": repr(step(lr, [T // 2, 3 * T // 4], 0.1)),
        "cosine + warmup": repr(warmup(cosine(lr, T - W), W)),
        "cyclical (triangular2)": repr(cyclic(lr / 4, lr, T // 8, mode="triangular2")),
        "SGDR, decaying peak": repr(sgdr(lr, max(1, T // 7), cycle_mult=2.0, peak_decay=0.5)),
        "one-cycle": repr(one_cycle(lr, T)),
    }


def _sharp_compute(ctx: Context, trained) -> dict:
    """Top Hessian eigenvalue, Keskar sharpness and lr x lambda_max of a trained run."""
    from ..curvature import hessian_eigenvalues
    from ..sharpness import edge_of_stability, keskar_sharpness

    obj = ctx.objective(trained.model)
    eig = hessian_eigenvalues(obj, k=1, tol=1e-3, tol_on="residual", seed=0)
    lam = float(eig.values[0])
    final_lr = float(trained.history["lr"][-1])
    return {
        "lambda_max": lam,
        "keskar": keskar_sharpness(obj, epsilon=1e-3, max_iter=10, seed=0).value,
        "final_lr": final_lr,
        "lr_x_lambda": edge_of_stability(final_lr, lam, momentum=0.9).value,
    }


def _sharp(ctx: Context, trained, wait: bool = True):
    config = {"run": trained.key, "schema": 2}  # schema 2: result key lambda_max (was top_eig)
    return ctx.measure(NAME, "sharpness", config, _sharp_compute, ctx, trained, wait=wait)


def _saddle_compute(ctx: Context, trained) -> dict:
    """Negative spectral mass (SLQ) at every parameter snapshot of a run, on a 1000-sample subset."""
    import torch

    from ..curvature import spectral_density

    masses = []
    obj = ctx.objective(trained.model, max_samples=1000)
    for theta in trained.snapshots:
        d = spectral_density(
            obj,
            num_runs=2,
            lanczos_steps=ctx.pick(20, 40),
            seed=0,
            params=torch.as_tensor(theta, dtype=obj.dtype),
        )
        masses.append(float(d.negative_mass))
    return {"negative_mass": masses, "steps": [int(s) for s in trained.snapshot_steps]}


def _saddle(ctx: Context, trained, label: str, wait: bool = True):
    config = {"run": trained.key, "label": label}
    return ctx.measure(NAME, "saddle", config, _saddle_compute, ctx, trained, wait=wait)


def _range_test_figure(rt: dict, lr: float, base: float, peak: float):
    """Figure 1: the stored sweep drawn by ``RangeTestResult.plot()`` (y clipped, suggestions marked).

    The measure stores the first sweep's arrays; the result is rebuilt from them (``num_iter=100`` sets the
    trimming, the last point is the stop point when the sweep diverged), so its suggestions are those of that
    sweep; the title keeps the recorded recommendation (the median over all sweeps).
    """
    from ..range_test import RangeTestResult, RangeTestSweep
    from ..report.figures import plot_range_test

    arr = rt["arrays"]
    smoothed = np.asarray(arr["smoothed"], dtype=np.float64)
    n = len(smoothed)
    lrs, losses = (
        np.asarray(arr["lrs"], dtype=np.float64)[:n],
        np.asarray(arr["losses"], dtype=np.float64)[:n],
    )
    stop = None if rt.get("diverged_at") is None else n - 1
    reason = None if stop is None else ("diverged" if np.isfinite(smoothed[-1]) else "non-finite")
    sweep = RangeTestSweep(lrs, losses, smoothed, stop is not None, stop, reason, 0)
    res = RangeTestResult(lrs, losses, smoothed, stop is not None, stop, reason, {"num_iter": 100}, (sweep,))
    return plot_range_test(res, title=f"LR range test: recommended {lr:.3g}, bounds [{base:.3g}, {peak:.3g}]")


def run(ctx: Context) -> PaperResult:
    """The study's stages: range test, train and measure every schedule, numbers, figures, tables, findings."""
    seeds = list(ctx.seeds)
    rt = _range_test(ctx)
    lr, base, peak = rt["recommended"], rt["base_lr"], rt["max_lr"]
    ctx.log(f"[{NAME}] range test: recommended {lr:.3g} ({rt['why']}); bounds [{base:.3g}, {peak:.3g}]")
    scheds = _schedules(ctx, lr)
    T = ctx.pick(500, 2000)
    runs, sharp, saddle = _train_and_measure(ctx, scheds, T)
    acc = {name: mean_sd([t.final.get("test_acc", np.nan) for t in runs[name]]) for name in runs}
    eig = {name: mean_sd([m["lambda_max"] for m in sharp[name]]) for name in runs}
    kes = {name: mean_sd([m["keskar"] for m in sharp[name]]) for name in runs}
    numbers = _numbers(rt, runs, acc, eig, kes, saddle)
    figures = _figures(rt, scheds, T, runs, acc, saddle, seeds)
    tables = _tables(rt, runs, sharp)
    findings = _findings(ctx, rt, acc, eig, saddle)
    neg_c = saddle["constant"]["negative_mass"]
    neg_y = saddle["cyclical (triangular2)"]["negative_mass"]
    numbers["negative_mass_constant_mean"] = float(np.mean(neg_c))
    numbers["negative_mass_cyclical_mean"] = float(np.mean(neg_y))
    settings = {
        "model": "cnn1d",
        "optimizer": "sgd momentum 0.9",
        "batch_size": BATCH,
        "steps": T,
        "seeds": seeds,
        "schedules": scheds,
    }
    return paper_result(NAME, TITLE, __doc__, figures, tables, findings, settings, numbers)


def _train_and_measure(ctx: Context, scheds: dict, T: int) -> tuple[dict, dict, dict]:
    """Train every schedule and seed, then sharpness of each run and saddle-ness along constant and cyclical."""
    seeds = list(ctx.seeds)
    snap_steps = [T // 8, T // 4, T // 2, 3 * T // 4, T]
    # every run starts at once (in parallel with jobs > 1); each one's measurements start when it is done
    started: dict[str, list] = {}
    for name, spec in scheds.items():
        snaps = snap_steps if name in ("constant", "cyclical (triangular2)") else None
        started[name] = [
            ctx.train(NAME, _base(ctx, spec, s), snapshot_steps=snaps if s == seeds[0] else None, wait=False)
            for s in seeds
        ]
    runs: dict[str, list] = {}
    measuring: dict[str, list] = {}
    saddling = {}
    for name in scheds:
        runs[name] = [p.result() for p in started[name]]
        measuring[name] = [_sharp(ctx, t, wait=False) for t in runs[name]]
        if name in ("constant", "cyclical (triangular2)"):
            saddling[name] = _saddle(ctx, runs[name][0], name, wait=False)
    sharp = {name: [p.result() for p in measuring[name]] for name in runs}
    saddle = {label: saddling[label].result() for label in ("constant", "cyclical (triangular2)")}
    return runs, sharp, saddle


def _numbers(rt: dict, runs: dict, acc: dict, eig: dict, kes: dict, saddle: dict) -> dict:
    """Range-test suggestions, accuracy / top eigenvalue / Keskar per schedule, negative mass along training."""
    lr, base, peak = rt["recommended"], rt["base_lr"], rt["max_lr"]
    numbers: dict = {
        "recommended_lr": lr,
        "base_lr": base,
        "max_lr": peak,
        **{f"suggest_{k}": v for k, v in rt["suggestions"].items()},
    }
    for name in runs:
        tag = name.split(" ")[0].replace("-", "_").lower()
        numbers[f"{tag}_test_acc_mean"], numbers[f"{tag}_test_acc_sd"] = acc[name]
        numbers[f"{tag}_lambda_max_mean"], numbers[f"{tag}_lambda_max_sd"] = eig[name]
        numbers[f"{tag}_keskar_mean"], numbers[f"{tag}_keskar_sd"] = kes[name]
    neg_c = saddle["constant"]["negative_mass"]
    neg_y = saddle["cyclical (triangular2)"]["negative_mass"]
    numbers["negative_mass_constant"] = neg_c
    numbers["negative_mass_cyclical"] = neg_y
    return numbers


def _figures(
    rt: dict, scheds: dict, T: int, runs: dict, acc: dict, saddle: dict, seeds: list
) -> list[Figure]:
    """Range test, the schedules, training curves, final accuracy and saddle-ness along training."""
    from ..schedules import parse

    lr, base, peak = rt["recommended"], rt["base_lr"], rt["max_lr"]
    neg_c = saddle["constant"]["negative_mass"]
    neg_y = saddle["cyclical (triangular2)"]["negative_mass"]
    fig_rt = _range_test_figure(rt, lr, base, peak)
    fig_s = plot_curves(
        np.arange(T),
        {k: parse(v).values(T) for k, v in scheds.items()},
        xlabel="step",
        ylabel="learning rate",
        title="The six schedules (same number of steps)",
    )
    fig_fit = plot_fit([runs[k][0] for k in runs], labels=list(runs), title=f"Training (seed {seeds[0]})")
    fig_acc = plot_bars(
        list(runs),
        [acc[k][0] for k in runs],
        [acc[k][1] for k in runs],
        ylabel="test accuracy",
        title="Final test accuracy (mean ± sd over seeds)",
    )
    fig_saddle = plot_curves(
        np.asarray(saddle["constant"]["steps"], float),
        {"constant LR": np.asarray(neg_c), "cyclical LR": np.asarray(neg_y)},
        xlabel="step",
        ylabel="negative spectral mass",
        title="Saddle-ness along training (mass of negative Hessian eigenvalues)",
    )
    return [
        Figure("LR range test", fig_rt),
        Figure("Schedules", fig_s),
        Figure("Training curves", fig_fit),
        Figure("Final test accuracy", fig_acc),
        Figure(
            "Saddle-ness along training",
            fig_saddle,
            "Fraction of the Hessian's spectral mass below zero (stochastic Lanczos quadrature).",
        ),
    ]


def _tables(rt: dict, runs: dict, sharp: dict) -> list[Table]:
    """The range-test suggestions and every run (all seeds) with its sharpness."""
    lr, base, peak = rt["recommended"], rt["base_lr"], rt["max_lr"]
    # one row per run, like the other papers' per-seed tables (keskar2017large._sb_lb_tables): the same shape,
    # but each paper's own columns and measures, so no shared row builder
    rows = [
        [
            k,
            t.config["seed"],
            t.final.get("test_acc"),
            t.final.get("train_acc"),
            m["lambda_max"],
            m["keskar"],
            m["lr_x_lambda"],
        ]
        for k in runs
        for t, m in zip(runs[k], sharp[k])
    ]
    table = Table(
        "Every run (all seeds)",
        [
            "schedule",
            "seed",
            "test acc",
            "train acc",
            "top eigenvalue",
            "Keskar phi",
            "final lr x lambda_max",
        ],
        rows,
        note="lr x lambda_max is compared with the stability threshold 2(1+beta) = 3.8 for momentum SGD.",
    )
    sugg_table = Table(
        "Range-test suggestions",
        ["method", "learning rate"],
        [[k, v] for k, v in rt["suggestions"].items()]
        + [["recommended", lr], ["base_lr", base], ["max_lr", peak]],
        note=rt["why"],
    )
    return [sugg_table, table]


def _findings(ctx: Context, rt: dict, acc: dict, eig: dict, saddle: dict) -> list[Finding]:
    """The range test's LR works; cyclical beats constant; hypotheses 1 (sharpness) and 2 (saddles)."""
    seeds = list(ctx.seeds)
    lr = rt["recommended"]
    neg_c = saddle["constant"]["negative_mass"]
    neg_y = saddle["cyclical (triangular2)"]["negative_mass"]
    cyc = ["cyclical (triangular2)", "SGDR, decaying peak", "one-cycle"]
    best_cyc = max(cyc, key=lambda k: acc[k][0])
    const_acc = acc["constant"]
    return [
        Finding(
            "An LR range test finds a usable learning rate: training at it works, and it lies below divergence.",
            f"Recommended {lr:.3g} (divergence at {_div_text(rt['diverged_at'])}); constant "
            f"LR at it reaches {pm(const_acc)} test accuracy.",
            verdict(
                const_acc[0] > ctx.pick(0.6, 0.85) and (rt["diverged_at"] is None or lr < rt["diverged_at"])
            ),
            {"recommended lr": lr, "constant test acc": const_acc},
            section=NAME,
        ),
        Finding(
            "Schedules that raise the LR again (cyclical, SGDR, one-cycle) end at a better solution than a constant LR.",
            f"Best of them ({best_cyc}) {pm(acc[best_cyc])} vs constant {pm(const_acc)}.",
            verdict(acc[best_cyc][0] > const_acc[0]),
            {"best cyclical test acc": acc[best_cyc], "constant test acc": const_acc},
            section=NAME,
        ),
        Finding(
            "Hypothesis 1: raising the LR steers away from sharp minima (lower top Hessian eigenvalue than constant).",
            "Top eigenvalue: " + "; ".join(f"{k} {pm(eig[k])}" for k in ["constant", *cyc]) + ".",
            verdict(min(eig[k][0] for k in cyc) < eig["constant"][0]),
            {"constant top eig": eig["constant"], **{f"{k} top eig": eig[k] for k in cyc}},
            section=NAME,
        ),
        Finding(
            "Hypothesis 2: raising the LR escapes saddle points faster (less negative-curvature mass along training).",
            f"Mean negative spectral mass over {len(neg_c)} points: constant {np.mean(neg_c):.3g}, cyclical "
            f"{np.mean(neg_y):.3g} (seed {seeds[0]}, 1000-sample subset).",
            verdict(float(np.mean(neg_y)) < float(np.mean(neg_c))),
            {
                "negative mass constant": float(np.mean(neg_c)),
                "negative mass cyclical": float(np.mean(neg_y)),
            },
            section=NAME,
        ),
    ]


def _div_text(lr) -> str:
    return "none" if lr is None else f"{lr:.3g}"
