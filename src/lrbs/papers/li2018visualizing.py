"""Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018,
arXiv 1712.09913).

Li et al. plot 2-D slices ``L(theta* + alpha delta + beta eta)`` along two random Gaussian directions that are
*filter-normalized* (every filter / row of a direction gets the norm of the matching filter of ``theta*``; biases
and BatchNorm parameters get a zero direction, ``ignore="biasbn"``), which makes the sharpness of different minima
comparable. Reproduced on MNIST-1D:

- the small-batch (B = 64) and large-batch (B = 1024) MLP minima of the Keskar et al. section (the same runs, every
  study seed): 2-D filter-normalized surfaces on [-1, 1]^2, drawn side by side with the same contour levels, and
  a flatness number: the mean rise of the training loss over the grid points within radius 0.5 of the minimum;
- depth and skip connections: ``resnet1d`` (BatchNorm) with and without skip connections, trained briefly with
  Adam, and the surfaces' non-convexity (Li et al.'s map of ``|lambda_min / lambda_max|`` of the surface's 2x2
  Hessians, and the fraction of grid points with a negative curvature direction) over the whole plotted grid.
  The full run compares depth 20 with and without skips and the plain net at depth 8 vs 20; the quick run only
  depth 8 with and without skips.

All surfaces are evaluated on a fixed 1000-sample subset of the training set (seeded, the same subset for every
point), with BatchNorm in eval mode (the centre model's running statistics), as Li et al.'s ``weights`` mode.
"""

from __future__ import annotations

import numpy as np

from .._util import pm
from ..report import Figure, Finding, Table
from . import keskar2017large as keskar
from ._common import Context, PaperResult, mean_sd, paired, verdict
from .sections import paper_result

NAME = "li2018visualizing"
TITLE = "Visualizing the loss landscape: flat vs sharp minima, depth and skip connections (Li et al. 2018)"

SUBSET = 1000  # fixed training subset for every surface
RADIUS = 0.5  # flatness: mean loss rise within this radius of the minimum (filter-normalized units)


def _grid(ctx: Context, kind: str) -> np.ndarray:
    n = {"mlp": ctx.pick(15, 21), "resnet": ctx.pick(11, 15)}[kind]
    return np.linspace(-1.0, 1.0, n)


def _surface_compute(ctx: Context, trained, g: np.ndarray) -> dict:
    """Filter-normalized 2-D surface around a trained model on the grid ``g`` x ``g``: loss, flatness,
    non-convexity."""
    from ..landscape import landscape_2d, nonconvexity, random_direction

    obj = ctx.objective(trained.model, max_samples=SUBSET, seed=0)
    d1 = random_direction(obj, norm="filter", ignore="biasbn", seed=1)
    d2 = random_direction(obj, norm="filter", ignore="biasbn", seed=2)
    land = landscape_2d(obj, d1, d2, g, g, metrics=("loss",))
    z = np.asarray(land.loss, dtype=float)
    aa, bb = np.meshgrid(g, g, indexing="ij")
    centre = z[int(np.argmin(np.abs(g))), int(np.argmin(np.abs(g)))]
    inside = np.hypot(aa, bb) <= RADIUS + 1e-9
    whole = nonconvexity(land, max_rise=None)
    near = nonconvexity(land, max_rise=1.0)
    return {
        "center_loss": float(centre),
        "rise": float(np.mean(z[inside] - centre)),
        "rise_points": int(inside.sum()),
        "max_loss": float(np.nanmax(z)),
        "nc_ratio": whole.mean_ratio,
        "nc_fraction": whole.fraction_negative,
        "nc_points": whole.num_points,
        "nc_near_ratio": near.mean_ratio,
        "nc_near_fraction": near.fraction_negative,
        "nc_near_points": near.num_points,
        "arrays": {"alphas": g, "betas": g, "loss": z, "ratio_map": whole.ratio_map},
    }


def _surface(ctx: Context, trained, kind: str, wait: bool = True):
    """The cached surface of a trained model (a :class:`Pending` with ``wait=False``)."""
    g = _grid(ctx, kind)
    config = {
        "run": trained.key,
        "grid": g.tolist(),
        "subset": SUBSET,
        "dirs": [1, 2],
        "norm": "filter",
        "ignore": "biasbn",
        "bn": "eval",
        "radius": RADIUS,
    }
    return ctx.measure(NAME, "surface", config, _surface_compute, ctx, trained, g, wait=wait)


def _resnet_config(ctx: Context, depth: int, skip: bool, seed: int) -> dict:
    # full: both nets reach ~99% training accuracy (Li et al. compare minima, not under-trained nets)
    steps = ctx.pick(120, 1200)
    return {
        "model": "resnet1d",
        "model_opts": {"depth": depth, "skip": skip, "width": 16},
        "optimizer": "adam",
        "lr": 1e-3,
        "batch_size": 128,
        "steps": steps,
        "eval_every": steps,  # one evaluation at the end (20 full-data evaluations would double the cost)
        "seed": seed,
    }


def _variants(ctx: Context) -> tuple[int, list[tuple[str, int, bool]]]:
    """The deep depth and the resnet1d variants ``(tag, depth, skip)``."""
    deep = ctx.pick(8, 20)
    variants = [("skip", deep, True), ("plain", deep, False)]
    if not ctx.quick:
        variants.append(("plain_shallow", 8, False))
    return deep, variants


def _start_all(ctx: Context, seeds: list[int]) -> None:
    """Start every training run of this section at once, then each run's surface when it is done.

    :func:`run` asks for the same runs and surfaces again and gets these (the context remembers what it started):
    with ``jobs > 1`` they run in parallel; with ``jobs = 1`` only the order changes.
    """
    _, variants = _variants(ctx)
    resnets = [
        ctx.train_many(NAME, [_resnet_config(ctx, depth, skip, s) for s in seeds], wait=False)
        for _, depth, skip in variants
    ]
    mlps = [
        ctx.train_many(keskar.NAME, [keskar.config(ctx, b, s) for s in seeds], wait=False)
        for b in (keskar.SB, keskar.LB)
    ]
    for p in (p for group in mlps for p in group):
        _surface(ctx, p.result(), "mlp", wait=False)
    for p in (p for group in resnets for p in group):
        _surface(ctx, p.result(), "resnet", wait=False)


def run(ctx: Context) -> PaperResult:
    """The section: SB vs LB surfaces (the Keskar runs), then depth and skip connections (resnet1d)."""
    seeds = list(ctx.seeds)
    ctx.log(f"[{NAME}] SB/LB surfaces and resnet1d skip/depth, seeds {seeds}")
    numbers: dict = {}
    _start_all(ctx, seeds)
    runs, surf = _train_sb_lb(ctx, seeds)
    stats, diffs = _sb_lb_numbers(surf, numbers)
    tables = [_sb_lb_table(ctx, runs, surf)]
    figures = [_sb_lb_figure(seeds, surf)]
    findings = [_sb_lb_finding(stats, diffs, seeds)]
    numbers["rise_diff"] = mean_sd(diffs)
    numbers["SB_rise"], numbers["LB_rise"] = stats[("SB", "rise")], stats[("LB", "rise")]

    deep, variants = _variants(ctx)
    res, rsurf = _train_resnets(ctx, seeds, variants)
    label = {"skip": f"ResNet-{deep} (skip)", "plain": f"plain-{deep} (no skip)", "plain_shallow": "plain-8"}
    _resnet_numbers(variants, res, rsurf, stats, numbers)
    tables.append(_resnet_table(ctx, variants, res, rsurf, label))
    figures.append(
        Figure(
            f"Surfaces with and without skip connections (depth {deep}, seed {seeds[0]})",
            _side_by_side([(label[tag], rsurf[tag][0]["arrays"]) for tag, _, _ in variants]),
            "Same contour levels in every panel.",
        )
    )
    findings.append(_skip_finding(rsurf, stats, deep, numbers))
    findings.append(_depth_finding(res, rsurf, stats, deep, numbers))
    settings = _settings(ctx, seeds, deep)
    return paper_result(NAME, TITLE, __doc__, figures, tables, findings, settings, numbers)


def _train_sb_lb(ctx: Context, seeds: list[int]) -> tuple[dict, dict]:
    """The Keskar section's SB and LB MLP runs and their surfaces."""
    runs = {
        "SB": ctx.train_many(keskar.NAME, [keskar.config(ctx, keskar.SB, s) for s in seeds]),
        "LB": ctx.train_many(keskar.NAME, [keskar.config(ctx, keskar.LB, s) for s in seeds]),
    }
    surf = {k: [_surface(ctx, t, "mlp") for t in v] for k, v in runs.items()}
    return runs, surf


def _sb_lb_numbers(surf: dict, numbers: dict) -> tuple[dict, list[float]]:
    """Mean and sd of rise / centre loss / non-convexity per arm (into ``numbers``) and the paired LB - SB rise."""
    stats = {}
    for k in surf:
        for q in ("rise", "center_loss", "nc_ratio"):
            stats[(k, q)] = mean_sd([m[q] for m in surf[k]])
            numbers[f"{k}_{q}_mean"], numbers[f"{k}_{q}_sd"] = stats[(k, q)]
        numbers[f"{k}_rise_per_seed"] = [m["rise"] for m in surf[k]]
    diffs = [lb["rise"] - sb["rise"] for sb, lb in zip(surf["SB"], surf["LB"])]
    numbers["rise_diff_mean"], numbers["rise_diff_sd"] = mean_sd(diffs)
    return stats, diffs


def _sb_lb_table(ctx: Context, runs: dict, surf: dict) -> Table:
    """Every seed of the SB and LB minima."""
    rows = [
        [
            k,
            b,
            t.config["seed"],
            t.final.get("test_acc"),
            m["center_loss"],
            m["rise"],
            m["max_loss"],
            m["nc_ratio"],
        ]
        for k, b in (("SB", keskar.SB), ("LB", keskar.LB))
        for t, m in zip(runs[k], surf[k])
    ]
    return Table(
        "Small- vs large-batch minima: every seed",
        [
            "run",
            "batch",
            "seed",
            "test acc",
            "loss at minimum",
            f"mean rise (r <= {RADIUS})",
            "max loss on grid",
            "|lmin/lmax| (grid mean)",
        ],
        rows,
        note=f"Train loss on a fixed {SUBSET}-sample subset; filter-normalized directions (seeds 1 "
        f"and 2, ignore=biasbn); {len(_grid(ctx, 'mlp'))}^2 grid on [-1, 1]^2.",
    )


def _sb_lb_figure(seeds: list[int], surf: dict) -> Figure:
    """The first seed's SB and LB surfaces side by side."""
    sb0, lb0 = surf["SB"][0]["arrays"], surf["LB"][0]["arrays"]
    return Figure(
        f"Filter-normalized surfaces of the SB and LB minima (seed {seeds[0]})",
        _side_by_side([(f"SB, B={keskar.SB}", sb0), (f"LB, B={keskar.LB}", lb0)]),
        "Same directions' construction and the same (log-spaced) contour levels in both panels "
        "(Li et al. Fig. 3).",
    )


def _sb_lb_finding(stats: dict, diffs: list[float], seeds: list[int]) -> Finding:
    """LB sharper than SB: the paired difference of the mean rise."""
    return Finding(
        "Large-batch training finds a sharper minimum than small-batch training: with filter-normalized "
        "directions its 2-D surface rises faster around the minimum.",
        f"Mean training-loss rise within radius {RADIUS}: SB {pm(stats[('SB', 'rise')])} vs LB "
        f"{pm(stats[('LB', 'rise')])}; paired LB - SB {pm(mean_sd(diffs))} over {len(seeds)} seed(s).",
        verdict(paired(diffs)),
        {"SB rise": stats[("SB", "rise")], "LB rise": stats[("LB", "rise")], "LB - SB": mean_sd(diffs)},
        section=NAME,
    )


def _train_resnets(ctx: Context, seeds: list[int], variants: list) -> tuple[dict, dict]:
    """The resnet1d variants' runs (every seed) and their surfaces."""
    res = {}
    for tag, depth, skip in variants:
        res[tag] = ctx.train_many(NAME, [_resnet_config(ctx, depth, skip, s) for s in seeds])
    rsurf = {tag: [_surface(ctx, t, "resnet") for t in res[tag]] for tag in res}
    return res, rsurf


def _resnet_numbers(variants: list, res: dict, rsurf: dict, stats: dict, numbers: dict) -> None:
    """Mean and sd of the non-convexity measures per variant (into ``stats`` and ``numbers``)."""
    for tag, _, _ in variants:
        for q in ("nc_ratio", "nc_fraction", "nc_near_ratio", "rise", "center_loss"):
            stats[(tag, q)] = mean_sd([m[q] for m in rsurf[tag]])
            numbers[f"{tag}_{q}_mean"], numbers[f"{tag}_{q}_sd"] = stats[(tag, q)]
        numbers[f"{tag}_nc_ratio_per_seed"] = [m["nc_ratio"] for m in rsurf[tag]]
        numbers[f"{tag}_test_acc"] = mean_sd([t.final.get("test_acc", np.nan) for t in res[tag]])


def _resnet_table(ctx: Context, variants: list, res: dict, rsurf: dict, label: dict) -> Table:
    """Every seed of every resnet1d variant."""
    # the same shape as _sb_lb_table's rows, but other runs (the resnet variants) and other columns
    rows = [
        [
            label[tag],
            depth,
            skip,
            t.config["seed"],
            t.final.get("train_acc"),
            t.final.get("test_acc"),
            m["center_loss"],
            m["nc_ratio"],
            m["nc_fraction"],
            m["nc_near_ratio"],
            m["rise"],
        ]
        for tag, depth, skip in variants
        for t, m in zip(res[tag], rsurf[tag])
    ]
    return Table(
        "Depth and skip connections: non-convexity of the surfaces (every seed)",
        [
            "model",
            "depth",
            "skip",
            "seed",
            "train acc",
            "test acc",
            "loss at centre",
            "|lmin/lmax| (grid)",
            "fraction lmin<0 (grid)",
            "|lmin/lmax| (rise<=1)",
            f"mean rise (r <= {RADIUS})",
        ],
        rows,
        note=f"resnet1d width 16 with BatchNorm, Adam lr=1e-3, batch 128, {_resnet_config(ctx, 8, True, 0)['steps']} "
        f"steps; {len(_grid(ctx, 'resnet'))}^2 grid on [-1, 1]^2; BN in eval mode. |lmin/lmax| is 0 where the "
        "surface is locally convex; the primary measure is its mean over all interior grid points.",
    )


def _skip_finding(rsurf: dict, stats: dict, deep: int, numbers: dict) -> Finding:
    """Skips smooth the surface: paired (plain - skip) non-convexity (``numbers["skip_effect"]``)."""
    d_skip = [p["nc_ratio"] - s["nc_ratio"] for s, p in zip(rsurf["skip"], rsurf["plain"])]
    numbers["skip_effect"] = mean_sd(d_skip)
    return Finding(
        "Skip connections make the loss surface smoother: lower non-convexity than the same net without skips.",
        f"Mean |lambda_min/lambda_max| over the grid, depth {deep}: with skips {pm(stats[('skip', 'nc_ratio')])}, "
        f"without {pm(stats[('plain', 'nc_ratio')])}; paired (plain - skip) {pm(mean_sd(d_skip))}; fraction of "
        f"points with negative curvature {pm(stats[('skip', 'nc_fraction')])} vs "
        f"{pm(stats[('plain', 'nc_fraction')])}.",
        verdict(paired(d_skip)),
        {
            "skip": stats[("skip", "nc_ratio")],
            "no skip": stats[("plain", "nc_ratio")],
            "no skip - skip": mean_sd(d_skip),
        },
        section=NAME,
    )


def _depth_finding(res: dict, rsurf: dict, stats: dict, deep: int, numbers: dict) -> Finding:
    """Deeper plain nets are more non-convex (``numbers["depth_effect"]``); inconclusive in the quick run."""
    claim = "Without skip connections, deeper networks have more chaotic (non-convex) surfaces."
    if "plain_shallow" not in res:
        return Finding(
            claim,
            "Not measured in the quick run (it needs the depth-20 plain net); run the full study.",
            "inconclusive",
            {},
            section=NAME,
        )
    d_depth = [p["nc_ratio"] - s["nc_ratio"] for s, p in zip(rsurf["plain_shallow"], rsurf["plain"])]
    numbers["depth_effect"] = mean_sd(d_depth)
    return Finding(
        claim,
        f"Mean |lambda_min/lambda_max| over the grid without skips: depth 8 "
        f"{pm(stats[('plain_shallow', 'nc_ratio')])} vs depth {deep} {pm(stats[('plain', 'nc_ratio')])}; "
        f"paired (deep - shallow) {pm(mean_sd(d_depth))}.",
        verdict(paired(d_depth)),
        {
            "plain-8": stats[("plain_shallow", "nc_ratio")],
            f"plain-{deep}": stats[("plain", "nc_ratio")],
            "deep - shallow": mean_sd(d_depth),
        },
        section=NAME,
    )


def _settings(ctx: Context, seeds: list[int], deep: int) -> dict:
    """The section's settings block."""
    return {
        "directions": "random Gaussian, filter-normalized, ignore=biasbn, seeds 1 and 2",
        "subset": SUBSET,
        "bn": "eval",
        "mlp_grid": len(_grid(ctx, "mlp")),
        "resnet_grid": len(_grid(ctx, "resnet")),
        "radius": RADIUS,
        "seeds": seeds,
        "resnet": _resnet_config(ctx, deep, True, 0),
        "data_fingerprint": ctx.dataset.fingerprint,
    }


def _side_by_side(panels: list[tuple[str, dict]]):
    """Filled contour plots in one row with the same log-spaced levels."""
    from matplotlib.figure import Figure as MplFigure

    from ..report.figures import log_levels, plot_contour

    z_all = np.concatenate([np.ravel(a["loss"]) for _, a in panels])
    levels = log_levels(z_all, 20)
    fig = MplFigure(figsize=(4.0 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, a) in zip(axes, panels):
        plot_contour(
            np.asarray(a["loss"]).T,
            a["alphas"],
            a["betas"],
            "alpha",
            "beta",
            title,
            levels=levels,
            points={"minimum": (0.0, 0.0)},
            ax=ax,
        )
    return fig
