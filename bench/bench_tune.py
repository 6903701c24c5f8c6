"""lrbs tune on MNIST-1D cnn1d: the recommendation against a 4 LR x 3 batch-size grid, and what tune costs.

For SGD (momentum; one-cycle with the inverse momentum cycle) and Adam (linear warmup of min(2/(1-beta2), T/10)
steps, then cosine), with a budget of 20 epochs, seed 0:

- ``tune(model, ds, optimizer=..., budget_epochs=20)`` and ``fit(model, ds, **rec.fit_kwargs())``;
- the grid: LRs {0.01, 0.03, 0.1, 0.3} (SGD) / {1e-3, 3e-3, 1e-2, 3e-2} (Adam) x batch {32, 128, 512}, each cell
  trained with the same schedule family and budget, from the same initial weights and data order;
- printed: each cell's test accuracy, the best cell, the recommendation's accuracy and the margin (best - ours,
  in points), and the cost ratio: tune's samples through forward + backward / the grid's (12 x 20 epochs x
  4000), and tune's wall time / the grid's wall time.

Run: ``.venv/bin/python -m bench.bench_tune [sgd|adam]`` (about 5 minutes per optimizer on one core).
"""

from __future__ import annotations

import sys
import time

import torch

GRID_LRS = {"sgd": (0.01, 0.03, 0.1, 0.3), "adam": (1e-3, 3e-3, 1e-2, 3e-2)}
GRID_BATCHES = (32, 128, 512)
EPOCHS = 20


def cell(ds, optimizer: str, batch: int, lr: float):
    """One grid cell: the same schedule family as the recommendation, the same budget, seed 0."""
    from lrbs.models import build_model
    from lrbs.schedules import cosine, one_cycle, one_cycle_momentum, warmup
    from lrbs.train import fit

    steps = EPOCHS * len(ds.train.y) // batch
    if optimizer == "sgd":
        kw = {"lr": one_cycle(lr, steps), "momentum": one_cycle_momentum(steps)}
    else:
        w = min(2000, steps // 10)
        kw = {"lr": warmup(cosine(lr, steps - w), w), "momentum": 0.9}
    model = build_model("cnn1d", dataset=ds, seed=0)
    return fit(model, ds, optimizer=optimizer, batch_size=batch, steps=steps, seed=0, eval_every=steps, **kw)


def run(optimizer: str) -> dict:
    from lrbs.data import load_dataset
    from lrbs.models import build_model
    from lrbs.train import fit
    from lrbs.tune import tune

    ds = load_dataset("mnist1d")
    t0 = time.perf_counter()
    rec = tune(
        build_model("cnn1d", dataset=ds, seed=0),
        ds,
        optimizer=optimizer,
        budget_epochs=EPOCHS,
        progress=False,
    )
    tune_s = time.perf_counter() - t0
    ours = fit(build_model("cnn1d", dataset=ds, seed=0), ds, seed=0, **rec.fit_kwargs())
    print(f"[{optimizer}] tune: B={rec.batch_size} lr={rec.lr:.4g} warmup={rec.warmup_steps} "
          f"({rec.evidence['batch']['bound']}; B_crit={rec.evidence['noise_scale'].get('b_crit')}) "
          f"confidence={rec.confidence}; test acc {ours.final['test_acc']:.4f}", flush=True)  # fmt: skip
    grid, grid_s = {}, 0.0
    for b in GRID_BATCHES:
        for lr in GRID_LRS[optimizer]:
            t = time.perf_counter()
            r = cell(ds, optimizer, b, lr)
            grid_s += time.perf_counter() - t
            grid[(b, lr)] = r.final.get("test_acc", float("nan")) if r.status == "completed" else float("nan")
            print(
                f"[{optimizer}] grid B={b:4d} lr={lr:<6g} {r.status:9s} test acc {grid[(b, lr)]:.4f}",
                flush=True,
            )
    best = max(grid, key=lambda k: -1.0 if grid[k] != grid[k] else grid[k])
    grid_samples = len(grid) * EPOCHS * len(ds.train.y)
    out = {
        "optimizer": optimizer,
        "recommendation": {"batch_size": rec.batch_size, "lr": rec.lr, "warmup_steps": rec.warmup_steps},
        "ours_acc": ours.final["test_acc"],
        "best_cell": best,
        "best_acc": grid[best],
        "margin_points": 100 * (grid[best] - ours.final["test_acc"]),
        "cost_samples": rec.evidence["cost"]["samples"],
        "cost_ratio_samples": rec.evidence["cost"]["samples"] / grid_samples,
        "cost_ratio_wall": tune_s / grid_s,
    }
    print(f"[{optimizer}] best cell B={best[0]} lr={best[1]:g}: {grid[best]:.4f}; ours {ours.final['test_acc']:.4f}; "
          f"margin {out['margin_points']:.2f} points; tune cost {out['cost_samples']} samples = "
          f"{out['cost_ratio_samples']:.3f} of the grid ({grid_samples}); wall {tune_s:.1f} s = "
          f"{out['cost_ratio_wall']:.3f} of the grid ({grid_s:.0f} s)", flush=True)  # fmt: skip
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or ["sgd", "adam"]:
        run(name)
