"""Smith, Kindermans, Ying & Le 2018, "Don't Decay the Learning Rate, Increase the Batch Size".

arXiv 1711.00489. The claim: the SGD noise scale is about ``lr N / (B (1 - m))``, so multiplying the batch size by
a factor has the effect of dividing the LR by it; growing the batch instead of decaying the LR reaches the same test
accuracy over the same number of epochs, with far fewer parameter updates. Reproduced on MNIST-1D with the MNIST-1D
CNN (cnn1d), SGD with momentum 0.9, over the SAME epoch budget and data for every schedule:

- (a) step decay: batch B0 = 32, LR 0.05 divided by 5 at 50% and 75% of the epochs (the LR tuned at B0 for the
  Goyal et al. reproduction);
- (b) batch growth: LR 0.05 constant, the batch multiplied by 5 at the same epochs (32, 160, 800); the epoch
  milestones are converted to step milestones given the batch of each phase;
- (c) the hybrid of :func:`lrbs.schedules.grow_batch_instead` with a maximum batch of 160: the batch grows while it
  can, then the LR decays (32 -> 160 with LR 0.05, then LR 0.01 at batch 160).

"Matches" means the paired per-seed difference of the final test accuracy is within max(1 point, 1 sd of the
difference); the criterion was fixed before the runs.
"""

from __future__ import annotations

import math

import numpy as np

from .._util import pm
from ..report import Figure, Finding, Table
from ..schedules import batch_step, constant, grow_batch_instead, join, step
from ._common import Context, PaperResult, mean_sd, verdict, with_finding_numbers
from .sections import paper_result

NAME = "smith2018dont"
TITLE = "Don't decay the learning rate, increase the batch size (Smith et al. 2018)"

B0 = 32
LR0 = 0.05
FACTOR = 5
HYBRID_MAX = 160
TOL = 0.01
EVAL_EVERY = 25  # steps: 0.2 epoch at B0, 1 epoch at 160, 5 epochs at 800

LABELS = {"a": "(a) LR decay", "b": "(b) batch growth", "c": "(c) hybrid"}


def _phase_epochs(total: int) -> list[float]:
    return [total / 2, total / 4, total / 4]


def _milestones(n: int, total_epochs: int, sizes: list[int]) -> list[int]:
    """Step milestones at 50% and 75% of the epochs, given the batch size of each phase."""
    out, s = [], 0
    for e, b in zip(_phase_epochs(total_epochs)[:-1], sizes[:-1]):
        s += math.ceil(e * n / b)
        out.append(s)
    return out


def configs(ctx: Context, seed: int) -> dict[str, dict]:
    """The three training configs (a), (b), (c) for one seed."""
    n = len(ctx.dataset.train)
    e = ctx.pick(8, 20)
    base = {
        "model": "cnn1d",
        "optimizer": "sgd",
        "momentum": 0.9,
        "epochs": e,
        "seed": seed,
        "eval_every": EVAL_EVERY,
    }
    m_a = _milestones(n, e, [B0, B0, B0])
    lr_a = step(LR0, m_a, 1.0 / FACTOR)
    sizes_b = [B0, B0 * FACTOR, B0 * FACTOR**2]
    hybrid = grow_batch_instead(lr_a, B0, HYBRID_MAX)
    sizes_c = list(hybrid.batch_size.sizes)
    lrs_c = [round(float(c.value), 12) for c in hybrid.lr.schedules]
    m_c = _milestones(n, e, sizes_c)
    return {
        "a": {**base, "lr": repr(lr_a), "batch_size": B0},
        "b": {**base, "lr": LR0, "batch_size": repr(batch_step(sizes_b, _milestones(n, e, sizes_b)))},
        "c": {
            **base,
            "lr": repr(join([constant(v) for v in lrs_c], m_c)),
            "batch_size": repr(batch_step(sizes_c, m_c)),
        },
    }


def run(ctx: Context) -> PaperResult:
    """The study's stages: train (a), (b), (c) for every seed, measure, tables and figure, findings, section."""
    seeds = list(ctx.seeds)
    n = len(ctx.dataset.train)
    ctx.log(f"[{NAME}] LR decay vs batch growth, seeds {seeds}")
    cfgs = {s: configs(ctx, s) for s in seeds}
    started = {k: ctx.train_many(NAME, [cfgs[s][k] for s in seeds], wait=False) for k in LABELS}
    runs = {k: [p.result() for p in started[k]] for k in LABELS}
    m = _measure(ctx, runs)
    tables = _tables(ctx, cfgs, runs, m)
    curves = {k: _mean_curve(runs[k], n) for k in LABELS}
    fig = _plot_curves(curves)
    findings = _findings(len(seeds), m)
    with_finding_numbers(m["numbers"], findings)
    figures = [
        Figure(
            "Test accuracy against epochs and against parameter updates",
            fig,
            "Mean over seeds (band: ± sd). Left: the same data for every schedule; right: batch "
            "growth gets there in fewer updates.",
        )
    ]
    return paper_result(NAME, TITLE, __doc__, figures, tables, findings, _settings(ctx, cfgs), m["numbers"])


def _measure(ctx: Context, runs: dict) -> dict:
    """Test accuracies (a diverged run at chance), updates, samples, the paired differences and the numbers."""
    chance = 1.0 / ctx.dataset.num_classes

    def acc(t) -> float:
        v = t.final.get("test_acc", np.nan)
        return chance if t.status == "diverged" or not np.isfinite(v) else float(v)

    accs = {k: np.asarray([acc(t) for t in runs[k]]) for k in LABELS}
    updates = {k: [len(t.history.get("step", [])) for t in runs[k]] for k in LABELS}
    samples = {
        k: [int(t.history["samples"][-1]) if len(t.history.get("samples", [])) else 0 for t in runs[k]]
        for k in LABELS
    }
    numbers: dict = {
        "epochs": ctx.pick(8, 20),
        "B0": B0,
        "lr0": LR0,
        "factor": FACTOR,
        "hybrid_max": HYBRID_MAX,
    }
    for k in LABELS:
        numbers[f"{k}_test_acc_mean"], numbers[f"{k}_test_acc_sd"] = mean_sd(accs[k])
        numbers[f"{k}_train_acc_mean"], numbers[f"{k}_train_acc_sd"] = mean_sd(
            [t.final.get("train_acc", np.nan) for t in runs[k]]
        )
        numbers[f"{k}_updates"] = int(updates[k][0])
        numbers[f"{k}_samples"] = int(samples[k][0])
    diff_b = mean_sd(accs["b"] - accs["a"])
    diff_c = mean_sd(accs["c"] - accs["a"])
    numbers["b_minus_a_mean"], numbers["b_minus_a_sd"] = diff_b
    numbers["c_minus_a_mean"], numbers["c_minus_a_sd"] = diff_c
    ratio_b = updates["b"][0] / updates["a"][0]
    ratio_c = updates["c"][0] / updates["a"][0]
    numbers["updates_ratio_b_over_a"], numbers["updates_ratio_c_over_a"] = ratio_b, ratio_c
    match_b = abs(diff_b[0]) <= max(TOL, diff_b[1]) + 1e-9  # 1e-9: float rounding of accuracies
    match_c = abs(diff_c[0]) <= max(TOL, diff_c[1]) + 1e-9
    numbers["b_matches_a"], numbers["c_matches_a"] = bool(match_b), bool(match_c)
    return {
        "accs": accs,
        "updates": updates,
        "samples": samples,
        "numbers": numbers,
        "diff_b": diff_b,
        "diff_c": diff_c,
        "ratio_b": ratio_b,
        "ratio_c": ratio_c,
        "match_b": match_b,
        "match_c": match_c,
    }


def _tables(ctx: Context, cfgs: dict, runs: dict, m: dict) -> list[Table]:
    """The summary (accuracy and updates per schedule) and every run and seed."""
    n = len(ctx.dataset.train)
    accs, updates, samples = m["accs"], m["updates"], m["samples"]
    seed0 = next(iter(cfgs))
    rows = []
    for k in LABELS:
        for t, a, u, sm in zip(runs[k], accs[k], updates[k], samples[k]):
            rows.append([LABELS[k], t.config["seed"], t.status, t.final.get("train_acc"), a, u, sm / n])
    per_seed = Table(
        "Every run and seed (none selected or dropped)",
        ["schedule", "seed", "status", "train acc", "test acc", "updates", "epochs"],
        rows,
    )
    summary = Table(
        "Final accuracy and parameter updates (mean ± sd over seeds)",
        ["schedule", "LR", "batch size", "test acc", "test acc - (a)", "updates", "updates / (a)"],
        [
            [
                LABELS[k],
                cfgs[seed0][k]["lr"],
                cfgs[seed0][k]["batch_size"],
                mean_sd(accs[k]),
                mean_sd(accs[k] - accs["a"]),
                updates[k][0],
                updates[k][0] / updates["a"][0],
            ]
            for k in LABELS
        ],
    )
    return [summary, per_seed]


def _findings(n_seeds: int, m: dict) -> list[Finding]:
    """(b) matches (a); (b) needs fewer updates; the hybrid (c) matches (a)."""
    accs, updates, samples = m["accs"], m["updates"], m["samples"]
    diff_b, diff_c, ratio_b, ratio_c = m["diff_b"], m["diff_c"], m["ratio_b"], m["ratio_c"]
    return [
        Finding(
            "Growing the batch (x5 at 50% and 75% of the epochs, constant LR) reaches the same test accuracy as "
            "decaying the LR (/5 at the same epochs) over the same number of epochs.",
            f"Final test accuracy (a) LR decay {pm(mean_sd(accs['a']))}, (b) batch growth "
            f"{pm(mean_sd(accs['b']))}; paired difference (b) - (a) {pm(diff_b)} over {n_seeds} seed(s) "
            f"(tolerance max({TOL:.2f}, sd)).",
            verdict(bool(m["match_b"])),
            {"(a) test acc": mean_sd(accs["a"]), "(b) test acc": mean_sd(accs["b"]), "(b) - (a)": diff_b},
            section=NAME,
        ),
        Finding(
            "Growing the batch instead reaches that accuracy with fewer parameter updates.",
            f"Updates: (a) {updates['a'][0]}, (b) {updates['b'][0]} ({ratio_b:.0%} of (a)), "
            f"(c) {updates['c'][0]} ({ratio_c:.0%}); every run saw the same {samples['a'][0]} samples.",
            verdict(bool(ratio_b < 1 and m["match_b"])),
            {"(a) updates": updates["a"][0], "(b) updates": updates["b"][0], "ratio": ratio_b},
            section=NAME,
        ),
        Finding(
            f"The hybrid (grow the batch up to {HYBRID_MAX}, then decay the LR) also matches the LR decay.",
            f"(c) hybrid {pm(mean_sd(accs['c']))}; paired difference (c) - (a) {pm(diff_c)}, with "
            f"{updates['c'][0]} updates.",
            verdict(bool(m["match_c"])),
            {"(c) test acc": mean_sd(accs["c"]), "(c) - (a)": diff_c, "(c) updates": updates["c"][0]},
            section=NAME,
        ),
    ]


def _settings(ctx: Context, cfgs: dict) -> dict:
    """The section's settings: model, optimizer, LR and batch rules, epochs, the first seed's configs, seeds."""
    seeds = list(ctx.seeds)
    return {
        "model": "cnn1d",
        "optimizer": "sgd momentum 0.9",
        "lr0": LR0,
        "B0": B0,
        "factor": FACTOR,
        "epochs": ctx.pick(8, 20),
        "milestones": "50% and 75% of the epochs",
        "hybrid_max": HYBRID_MAX,
        "configs_seed0": cfgs[seeds[0]],
        "seeds": seeds,
        "tolerance": TOL,
        "data_fingerprint": ctx.dataset.fingerprint,
    }


def _mean_curve(runs: list, n: int) -> dict[str, np.ndarray]:
    """Mean and sd of the test accuracy over seeds at each evaluation (same eval steps for every seed)."""
    length = min(len(t.evals) for t in runs)
    steps = np.asarray([runs[0].evals[i]["step"] for i in range(length)], float)
    epochs = np.asarray([runs[0].evals[i]["samples"] for i in range(length)], float) / n
    acc = np.asarray([[t.evals[i].get("test_acc", np.nan) for i in range(length)] for t in runs], float)
    sd = acc.std(0, ddof=1) if len(runs) > 1 else np.zeros(length)
    return {"steps": steps, "epochs": epochs, "mean": acc.mean(0), "sd": sd}


def _plot_curves(curves: dict[str, dict]) -> object:
    from matplotlib.figure import Figure as MplFigure

    from ..report.figures import PALETTE

    fig = MplFigure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, (k, c) in enumerate(curves.items()):
        for ax, x in zip(axes, (c["epochs"], c["steps"])):
            ax.plot(x, c["mean"], color=PALETTE[i], label=LABELS[k], linewidth=1.5)
            ax.fill_between(
                x, c["mean"] - c["sd"], c["mean"] + c["sd"], color=PALETTE[i], alpha=0.2, linewidth=0
            )
    axes[0].set_xlabel("epochs (samples / N)", fontsize=9)
    axes[1].set_xlabel("parameter updates", fontsize=9)
    for ax in axes:
        ax.set_ylabel("test accuracy", fontsize=9)
        ax.grid(True, color="#d0d7de", linewidth=0.6)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0].legend(fontsize=8, frameon=False)
    return fig
