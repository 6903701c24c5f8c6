"""McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training".

arXiv 1812.06162. The claims: the simple gradient noise scale ``B_simple = tr(Σ) / |G|²`` predicts the critical batch
size ``B_crit = E_min / S_min`` of the steps / examples trade-off ``(S / S_min - 1)(E / E_min - 1) = 1`` (within an
order of magnitude), and the noise scale grows during training as the loss falls. Reproduced on MNIST-1D with the
MNIST-1D CNN (cnn1d), SGD with momentum 0.9:

- ``B_simple`` with the unbiased two-batch estimator (App. A; B_s = 16, B_b = 512, sampled without replacement with
  the finite-data correction) and a 95% percentile-bootstrap interval, at initialization and at the end of training,
  for every seed of the base-batch runs (B0 = 32) of the Goyal et al. sweep;
- ``B_simple`` along one run (batch 128, linearly scaled LR with warmup and cosine decay, first seed) from parameter
  snapshots, next to the in-training :class:`~lrbs.noise_scale.NoiseScaleTracker` (debiased EMAs, beta 0.99, every
  10 steps, micro-batches of 32);
- ``B_crit`` fitted to the batch-size sweep of the Goyal et al. reproduction (the SAME runs, served from the store):
  ``S`` = the first evaluation (twice per epoch) at which the full training loss reaches the target, taking at each
  batch and seed the fewer steps of the two LRs run there (linear scaling with warmup, and, at the large batches,
  the unscaled control), since McCandlish et al. tune the LR per batch. Runs that never reach the target are left
  out of the fit and listed;
- the comparison uses ``B_simple`` at the step where that same-batch-128 run reaches the target loss
  (geometric interpolation between the two nearest snapshots).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._util import pm
from ..errors import ConfigError
from ..report import Figure, Finding, Table
from . import goyal2017accurate as goyal
from ._common import Context, PaperResult, build_model_for, mean_sd, verdict, with_finding_numbers
from .sections import paper_result
from .stats import spearman

NAME = "mccandlish2018empirical"
TITLE = "Gradient noise scale and the critical batch size (McCandlish et al. 2018)"

SMALL, BIG = 16, 512
TRACK_BATCH = 128


def target_loss(ctx: Context) -> float:
    """The training loss every batch size is asked to reach (fixed before the runs)."""
    return ctx.pick(0.8, 0.5)


def _ns_compute(ctx: Context, model, k: int, params: np.ndarray | None) -> dict:
    """The two-batch-size noise scale of ``model`` (at flat ``params`` if given) and its training loss there."""
    from ..noise_scale import noise_scale

    obj = ctx.objective(model)
    p = None if params is None else torch.as_tensor(params)
    res = noise_scale(obj, small_batch=SMALL, big_batch=BIG, num_estimates=k, seed=0, params=p)
    return {
        "b_simple": res.b_simple,
        "ci_low": res.ci_low,
        "ci_high": res.ci_high,
        "grad_sq": res.grad_sq,
        "trace_sigma": res.trace_sigma,
        "loss": float(obj.loss(p)),
    }


def _ns_start(ctx: Context, model, label: str, key: dict, params: np.ndarray | None = None):
    """Start (or find) the noise-scale measurement; :func:`_ns_value` reads its :class:`Pending` result."""
    k = ctx.pick(10, 20)
    config = {**key, "what": label, "small": SMALL, "big": BIG, "k": k}
    return ctx.measure(NAME, "noise_scale", config, _ns_compute, ctx, model, k, params, wait=False)


def _ns_value(pending) -> dict:
    """The measurement, with an infinite ``B_simple`` (stored as null) restored to ``inf``."""
    return {
        kk: (math.inf if v is None and kk in ("b_simple", "ci_low", "ci_high") else v)
        for kk, v in pending.result().items()
    }


def _track(ctx: Context, seeds: list[int]) -> tuple[dict, list[int]]:
    """The config of the tracked batch-128 run and its snapshot steps."""
    track_cfg = goyal.config(ctx, TRACK_BATCH, seeds[0])
    n = len(ctx.dataset.train)
    total = math.ceil(track_cfg["epochs"] * n / TRACK_BATCH)
    snap_steps = sorted({0, *(int(round(v)) for v in np.geomspace(1, total, ctx.pick(8, 12))), total})
    return track_cfg, snap_steps


def run(ctx: Context) -> PaperResult:
    """The section: B_simple at init / end, the critical-batch fit of the sweep, B_simple along one run."""
    seeds = list(ctx.seeds)
    target = target_loss(ctx)
    ctx.log(f"[{NAME}] noise scale and critical batch, seeds {seeds}, target train loss {target}")
    numbers: dict = {"target_train_loss": target, "small_batch": SMALL, "big_batch": BIG}

    track_cfg, snap_steps = _track(ctx, seeds)
    tracking = ctx.train(NAME, track_cfg, snapshot_steps=snap_steps, noise_tracker=True, wait=False)
    scaled, control = goyal.sweep(ctx)
    init_end = _init_end(ctx, scaled[goyal.B0], numbers)
    sweep = _sweep_steps(ctx, seeds, scaled, control, target)
    fit = _fit_critical(ctx, seeds, sweep, numbers)
    tr = tracking.result()
    along = _along(ctx, tr, target, numbers)
    ok_grow = _grows(init_end, along["rho"])
    logs = tr.logs
    if len(logs.get("ns_step", [])):
        numbers["tracker_first"] = float(logs["ns_b_simple"][0])
        numbers["tracker_last"] = float(logs["ns_b_simple"][-1])
    cb = fit["cb"]
    ratio = along["b_at"] / numbers["b_crit"] if cb and np.isfinite(along["b_at"]) else float("nan")
    numbers["b_simple_over_b_crit"] = ratio

    tables = _tables(ctx, seeds, target, init_end, sweep, along)
    figures = _figures(along, logs, cb, target)
    findings = [
        _growth_finding(seeds, init_end, along, ok_grow),
        _fit_finding(target, sweep, fit, numbers),
        _agree_finding(target, along, ratio, init_end, numbers),
    ]
    with_finding_numbers(numbers, findings)
    settings = _settings(ctx, seeds, target, track_cfg, snap_steps)
    return paper_result(NAME, TITLE, __doc__, figures, tables, findings, settings, numbers)


def _init_end(ctx: Context, base_runs: list, numbers: dict) -> list[tuple]:
    """``(seed, init, end)`` noise-scale measurements of every base-batch run (their summaries into ``numbers``)."""
    started = [
        (
            t.config["seed"],
            _ns_start(ctx, build_model_for(t.config, ctx.dataset), "init", {"config": t.config}),
            _ns_start(ctx, t.model, "end", {"run": t.key}),
        )
        for t in base_runs
    ]
    init_end = [(seed, _ns_value(a), _ns_value(b)) for seed, a, b in started]
    bi = [a["b_simple"] for _, a, _ in init_end]
    be = [b["b_simple"] for _, _, b in init_end]
    numbers["b_simple_init_mean"], numbers["b_simple_init_sd"] = mean_sd(bi)
    numbers["b_simple_end_mean"], numbers["b_simple_end_sd"] = mean_sd(be)
    numbers["b_simple_init"], numbers["b_simple_end"] = bi, be
    numbers["b_simple_end_infinite"] = sum(not np.isfinite(v) for v in be)
    numbers["b_simple_init_ci"] = [[a["ci_low"], a["ci_high"]] for _, a, _ in init_end]
    numbers["b_simple_end_ci"] = [[b["ci_low"], b["ci_high"]] for _, _, b in init_end]
    return init_end


def _sweep_steps(ctx: Context, seeds: list[int], scaled: dict, control: dict, target: float) -> dict:
    """Steps to the target training loss of every sweep run (the faster of the two LR rules where both ran)."""
    from ..noise_scale import steps_to_target

    pairs, seed_of, skipped, s_rows = [], [], [], []
    for bsz in goyal.batch_sizes(ctx):
        for i, seed in enumerate(seeds):
            cands = [("linear + warmup", scaled[bsz][i])]
            if bsz in control:
                cands.append(("no scaling", control[bsz][i]))
            found = [
                (steps_to_target(t.evals, target, metric="train_loss", source="evals"), lbl)
                for lbl, t in cands
                if t.evals
            ]
            found = [(s, lbl) for s, lbl in found if s is not None]
            if found:
                s, lbl = min(found)
                pairs.append((bsz, s))
                seed_of.append(seed)
                s_rows.append([bsz, seed, s, bsz * s, lbl])
            else:
                skipped.append((bsz, seed))
                s_rows.append([bsz, seed, None, None, "not reached"])
    return {"pairs": pairs, "seed_of": seed_of, "skipped": skipped, "rows": s_rows}


def _fit_critical(ctx: Context, seeds: list[int], sweep: dict, numbers: dict) -> dict:
    """``S = S_min + E_min / B`` fitted to all (B, S) pairs and per seed (into ``numbers``)."""
    from ..noise_scale import critical_batch

    pairs, seed_of = sweep["pairs"], sweep["seed_of"]
    numbers["sweep_pairs"] = [list(p) for p in pairs]
    numbers["sweep_not_reached"] = [list(p) for p in sweep["skipped"]]
    cb = None
    try:
        cb = critical_batch(pairs)
    except ConfigError as e:
        ctx.warnings.append(f"{NAME}: no critical-batch fit ({e})")
    per_seed_fit = []
    for seed in seeds:
        sp = [p for p, sd in zip(pairs, seed_of) if sd == seed]
        try:
            per_seed_fit.append(critical_batch(sp).b_crit)
        except ConfigError:
            per_seed_fit.append(float("nan"))
    n_b = len({b for b, _ in pairs})
    numbers["b_crit"] = cb.b_crit if cb else float("nan")
    numbers["s_min"] = cb.s_min if cb else float("nan")
    numbers["e_min"] = cb.e_min if cb else float("nan")
    numbers["fit_rms_log_residual"] = cb.rms_log_residual if cb else float("nan")
    numbers["b_crit_per_seed"] = per_seed_fit
    numbers["b_crit_seed_mean"], numbers["b_crit_seed_sd"] = mean_sd(per_seed_fit)
    numbers["fit_batch_sizes"] = n_b
    return {"cb": cb, "per_seed_fit": per_seed_fit, "n_b": n_b}


def _along(ctx: Context, tr, target: float, numbers: dict) -> dict:
    """B_simple at every snapshot of the tracked run, where it reaches the target, and its trend with the step."""
    from ..noise_scale import steps_to_target

    pending = [
        _ns_start(ctx, tr.model, "snapshot", {"run": tr.key, "step": int(st)}, params=theta)
        for st, theta in zip(tr.snapshot_steps, tr.snapshots)
    ]
    along = [_ns_value(a) for a in pending]
    sn_steps = np.asarray(tr.snapshot_steps, float)
    sn_b = np.asarray([a["b_simple"] for a in along], float)
    sn_lo = np.asarray([a["ci_low"] for a in along], float)
    sn_hi = np.asarray([a["ci_high"] for a in along], float)
    sn_loss = np.asarray([a["loss"] for a in along], float)
    s_track = steps_to_target(tr.evals, target, metric="train_loss", source="evals")
    b_at = _interp_geo(sn_steps, sn_b, s_track) if s_track is not None else float("nan")
    # an infinite B_simple (signal below the noise floor) is left out of the trend, as in the means
    rho = spearman(sn_steps, sn_b, nonfinite="omit")
    i_min = int(np.nanargmin(np.where(np.isfinite(sn_b), sn_b, np.nan))) if np.isfinite(sn_b).any() else 0
    numbers["snapshot_min_b_simple"], numbers["snapshot_min_step"] = float(sn_b[i_min]), int(sn_steps[i_min])
    numbers.update(
        {
            "snapshot_steps": sn_steps.tolist(),
            "snapshot_b_simple": sn_b.tolist(),
            "snapshot_ci_low": sn_lo.tolist(),
            "snapshot_ci_high": sn_hi.tolist(),
            "snapshot_train_loss": sn_loss.tolist(),
            "steps_to_target_B128": s_track,
            "b_simple_at_target": b_at,
            "spearman_b_simple_vs_step": rho,
        }
    )
    return {
        "steps": sn_steps,
        "b": sn_b,
        "lo": sn_lo,
        "hi": sn_hi,
        "loss": sn_loss,
        "s_track": s_track,
        "b_at": b_at,
        "rho": rho,
        "i_min": i_min,
    }


def _grows(init_end: list[tuple], rho: float) -> bool | None:
    """Growth: the end interval above the initial one for every seed, and a positive rank correlation with the
    step along the tracked run; if the two tests disagree the verdict is inconclusive (criterion fixed in advance).
    """
    grows_all = all(b["ci_low"] > a["ci_high"] for _, a, b in init_end)
    falls_all = all(b["ci_high"] < a["ci_low"] for _, a, b in init_end)
    if grows_all and rho > 0:
        return True
    if falls_all and rho < 0:
        return False
    return None


def _tables(ctx: Context, seeds: list[int], target: float, init_end: list, sweep: dict, along: dict) -> list:
    """Init / end per seed, steps to target in the sweep, B_simple along the tracked run."""
    t_init = Table(
        "B_simple at initialization and at the end of training, every seed (B0 = 32 runs)",
        ["seed", "B_simple init", "95% CI init", "B_simple end", "95% CI end", "train loss end"],
        [
            [
                s,
                a["b_simple"],
                f"{a['ci_low']:.3g} .. {a['ci_high']:.3g}",
                b["b_simple"],
                f"{b['ci_low']:.3g} .. {b['ci_high']:.3g}",
                b["loss"],
            ]
            for s, a, b in init_end
        ],
        note=f"Two-batch estimator, B_s={SMALL}, B_b={BIG}, {ctx.pick(10, 20)} big batches, 1000 bootstrap resamples.",
    )
    t_sweep = Table(
        f"Steps to reach training loss {target} in the sweep",
        ["batch", "seed", "steps S", "examples E = B S", "LR used"],
        sweep["rows"],
    )
    t_snap = Table(
        f"B_simple along training (batch {TRACK_BATCH}, seed {seeds[0]})",
        ["step", "train loss", "B_simple", "95% CI"],
        [
            [int(s), lo_, b, f"{lo:.3g} .. {hi:.3g}"]
            for s, lo_, b, lo, hi in zip(along["steps"], along["loss"], along["b"], along["lo"], along["hi"])
        ],
    )
    return [t_init, t_sweep, t_snap]


def _figures(along: dict, logs: dict, cb, target: float) -> list:
    """B_simple along training and (where fitted) the steps / examples trade-off."""
    figures = [
        Figure(
            "B_simple along training",
            _plot_along(along["steps"], along["b"], along["lo"], along["hi"], logs, along["s_track"]),
            f"Snapshots of the batch-{TRACK_BATCH} run (95% bootstrap intervals), the in-training tracker "
            "(ratio of debiased EMAs), and the step where the training loss reaches the target.",
        )
    ]
    if cb is not None:
        ax = cb.plot()
        ax.set_title(f"Steps vs examples to train loss {target}", fontsize=10)
        figures.append(
            Figure(
                "Steps / examples trade-off and the fitted critical batch",
                ax.figure,
                "Each point is one batch size and seed; the line is S = S_min + E_min / B.",
            )
        )
    return figures


def _growth_finding(seeds: list[int], init_end: list, along: dict, ok_grow: bool | None) -> Finding:
    """B_simple grows during training."""
    bi = [a["b_simple"] for _, a, _ in init_end]
    be = [b["b_simple"] for _, _, b in init_end]
    n_inf = sum(not np.isfinite(v) for v in be)
    sn_b, sn_steps, i_min, rho = along["b"], along["steps"], along["i_min"], along["rho"]
    return Finding(
        "The gradient noise scale B_simple grows during training (as the loss falls).",
        f"B_simple at initialization {pm(mean_sd(bi))} and at the end {pm(mean_sd(be))} (B0 = 32 runs, "
        f"{n_inf} seed(s) with an infinite end value, i.e. estimated |G|² <= 0: the signal is below the "
        "noise floor, left out of the mean; "
        f"{len(seeds)} seed(s)); the end interval lies above the initial one for "
        f"{sum(b['ci_low'] > a['ci_high'] for _, a, b in init_end)} of {len(seeds)} seed(s). Along the "
        f"batch-{TRACK_BATCH} run, Spearman correlation of B_simple with the step: {rho:.2f}; B_simple is "
        f"{sn_b[0]:.3g} at step 0 (loss plateau, tiny |G|²), lowest ({sn_b[i_min]:.3g}) at step "
        f"{int(sn_steps[i_min])} and {sn_b[-1]:.3g} at the end.",
        verdict(ok_grow),
        {
            "B_simple init": mean_sd(bi),
            "B_simple end": mean_sd(be),
            "spearman": rho,
            "lowest B_simple along the run": float(sn_b[i_min]),
        },
        section=NAME,
    )


def _fit_finding(target: float, sweep: dict, fit: dict, numbers: dict) -> Finding:
    """The steps / examples trade-off follows the fitted hyperbola."""
    cb, n_b = fit["cb"], fit["n_b"]
    fit_ok = None if cb is None or n_b < 3 else bool(cb.rms_log_residual <= 0.25)
    return Finding(
        "The steps / examples trade-off follows S = S_min (1 + B_crit / B).",
        (
            f"Fit over {len(sweep['pairs'])} runs at {n_b} batch sizes: S_min = {numbers['s_min']:.4g}, "
            f"E_min = {numbers['e_min']:.4g}, B_crit = {numbers['b_crit']:.4g} (per-seed fits "
            f"{pm(mean_sd(fit['per_seed_fit']))}); rms log residual {numbers['fit_rms_log_residual']:.3f}; "
            f"{len(sweep['skipped'])} run(s) never reached the target."
            if cb is not None
            else f"Fewer than 2 batch sizes reached training loss {target}: no fit."
        ),
        verdict(fit_ok),
        {
            "B_crit": numbers["b_crit"],
            "rms log residual": numbers["fit_rms_log_residual"],
            "batch sizes fitted": n_b,
        },
        section=NAME,
    )


def _agree_finding(target: float, along: dict, ratio: float, init_end: list, numbers: dict) -> Finding:
    """B_crit agrees with B_simple at the target loss within an order of magnitude."""
    be = [b["b_simple"] for _, _, b in init_end]
    agree = None if not np.isfinite(ratio) else bool(0.1 <= ratio <= 10)
    b_at = along["b_at"]
    return Finding(
        "The critical batch is predicted by the noise scale: B_crit ≈ B_simple (within an order of magnitude).",
        f"B_simple where the batch-{TRACK_BATCH} run reaches training loss {target} (step {along['s_track']}): "
        f"{b_at:.4g}; B_crit from the sweep {numbers['b_crit']:.4g}; ratio {ratio:.3g} "
        f"(B_simple at the end of training: {pm(mean_sd(be))}).",
        verdict(agree),
        {"B_simple at target": b_at, "B_crit": numbers["b_crit"], "ratio": ratio},
        section=NAME,
    )


def _settings(ctx: Context, seeds: list[int], target: float, track_cfg: dict, snap_steps) -> dict:
    """The section's settings block."""
    return {
        "model": "cnn1d",
        "optimizer": "sgd momentum 0.9",
        "noise_scale": {
            "small_batch": SMALL,
            "big_batch": BIG,
            "num_estimates": ctx.pick(10, 20),
            "bootstrap": 1000,
        },
        "target_train_loss": target,
        "sweep": f"{goyal.NAME} (same runs)",
        "track_config": track_cfg,
        "snapshot_steps": snap_steps,
        "seeds": seeds,
        "data_fingerprint": ctx.dataset.fingerprint,
    }


def _interp_geo(steps: np.ndarray, values: np.ndarray, at: float) -> float:
    """Geometric (log-linear) interpolation of positive ``values`` at step ``at``."""
    v = np.asarray(values, float)
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() == 0:
        return float("nan")
    return float(np.exp(np.interp(at, np.asarray(steps, float)[ok], np.log(v[ok]))))


def _plot_along(steps, b, lo, hi, logs, s_target) -> object:
    from matplotlib.figure import Figure as MplFigure

    from ..report.figures import PALETTE

    fig = MplFigure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.maximum(np.asarray(steps, float), 0.5)
    fin = np.isfinite(b) & (b > 0)
    lo_ = np.where(np.isfinite(lo) & (lo > 0), lo, np.nan)
    hi_ = np.where(np.isfinite(hi), hi, np.nan)
    ax.errorbar(
        x[fin],
        b[fin],
        yerr=[np.clip(b - lo_, 0, None)[fin], np.clip(hi_ - b, 0, None)[fin]],
        fmt="o-",
        color=PALETTE[0],
        capsize=2,
        label="B_simple (snapshots, 95% CI)",
    )
    if len(logs.get("ns_step", [])):
        ax.plot(
            np.maximum(logs["ns_step"], 0.5), logs["ns_b_simple"], color=PALETTE[1], label="tracker (EMA)"
        )
    if s_target is not None:
        ax.axvline(max(s_target, 0.5), color="k", linestyle=":", linewidth=1, label="target loss reached")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("B_simple", fontsize=9)
    ax.grid(True, color="#d0d7de", linewidth=0.6)
    ax.legend(fontsize=8, frameon=False)
    return fig
