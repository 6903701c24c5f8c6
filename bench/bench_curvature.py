"""Hessian curvature on MNIST-1D (full 4000-sample training set): lrbs against PyHessian, same model and data.

Rows:
- ``grad`` / ``hvp_rev_rev`` / ``hvp_fwd_rev``: one full-data gradient and one HVP by each implementation (the
  HVP ratio is to one gradient; the target is <= 3x).
- ``lambda_max``: time to the top eigenvalue at a stated relative accuracy (1e-2 ... 1e-5, against a tight
  Lanczos reference, tol 1e-10 from another start): each tool runs over a grid of its own tolerance from
  several start vectors, and for each target the cheapest setting whose *worst* error is within it is timed.
  Ours is Lanczos from the gradient start with ``tol_on="value"``; PyHessian's is ``eigenvalues(top_n=1,
  tol=...)`` (power iteration). Both times include building the gradient graph. A last row compares at the
  accuracy of PyHessian's default ``tol=1e-3``.
- ``trace``: PyHessian ``trace(maxIter=100, tol=1e-3)`` over many seeds gives an RMS error and a mean HVP
  count; we report the smallest Hutchinson and Hutch++ budgets whose RMS error (same number of seeds) is at
  most that, and the HVP ratio (target <= 1/3). The reference trace is Hutch++ with a large budget.

PyHessian calls ``model.eval()`` on the model it is given, so it gets a copy. Its ``trace`` draws probes from
the global RNG, which is seeded per repeat.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from torch import nn

from bench.common import row, timeit
from lrbs.curvature import hessian_eigenvalues, hessian_trace
from lrbs.data import load_dataset
from lrbs.models import build_model
from lrbs.objective import Objective
from lrbs.train import fit


def _pyhessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    from pyhessian import hessian

    return hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False)


def _trained(name: str, ds, steps: int) -> nn.Module:
    model = build_model(name, dataset=ds, seed=0)
    fit(model, ds, optimizer="adam", lr=1e-2, batch_size=100, steps=steps, eval_every=10**9, seed=0)
    return model


def _rms(values: list[float], ref: float) -> float:
    return float(np.sqrt(np.mean((np.asarray(values) - ref) ** 2)) / abs(ref))


def _bench_model(name: str, ds, quick: bool) -> list[dict]:
    x, y = ds.train.x, ds.train.y
    rows: list[dict] = []
    model = _trained(name, ds, 200 if quick else 1000)
    obj = Objective(model, data=ds)
    n = obj.num_params
    theta = obj.theta()
    v = torch.randn(n, generator=torch.Generator().manual_seed(0))

    # -- one gradient and one HVP
    t_grad = timeit(lambda: obj.grad(theta), repeat=5, warmup=1)
    rows.append(row("grad", f"{name} (n={n}, N={len(y)})", t_grad, note="full-data gradient"))
    obj.hvp(theta, v, method="rev_rev")  # builds the cached graph
    t_rr = timeit(lambda: obj.hvp(theta, v, method="rev_rev"), repeat=5, warmup=1)
    t_fr = timeit(lambda: obj.hvp(theta, v, method="fwd_rev"), repeat=3, warmup=1)
    from pyhessian.utils import hessian_vector_product

    ph = _pyhessian(model, x, y)
    vs = [t.clone() for t in obj.unflatten(v).values()]
    t_ph = timeit(lambda: hessian_vector_product(ph.gradsH, ph.params, vs), repeat=5, warmup=1)
    rows.append(row("hvp_rev_rev", name, t_rr, "pyhessian hvp", t_ph, note=f"{t_rr / t_grad:.2f}x one grad"))
    rows.append(row("hvp_fwd_rev", name, t_fr, "pyhessian hvp", t_ph, note=f"{t_fr / t_grad:.2f}x one grad"))
    obj.hvp_method = "rev_rev" if t_rr <= t_fr else "fwd_rev"

    # -- top eigenvalue to a stated accuracy. Each tool runs over its own tolerance grid (PyHessian's tol on the
    # change of its estimate; ours tol_on="value", the estimated eigenvalue error) from `nseed` start vectors;
    # for each target accuracy we take, per tool, the cheapest setting whose worst error over the seeds is
    # within the target, and compare mean times. Both include building the gradient graph.
    ref = hessian_eigenvalues(obj, tol=1e-10, max_iter=300, seed=99, init="random").top
    nseed = 2 if quick else 3
    tols = (1e-2, 1e-3, 1e-4) if quick else (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)

    def sweep(run) -> list[tuple[float, float, float, float]]:
        out = []
        for tol in tols:
            errs, times, hvps = [], [], []
            for seed in range(nseed):
                run(tol, seed)  # warm-up (and the allocator) outside the timing
                t0 = time.perf_counter()
                val, count = run(tol, seed)
                times.append(time.perf_counter() - t0)
                errs.append(abs(val - ref) / abs(ref))
                hvps.append(count)
            out.append((tol, max(errs), float(np.mean(times)), float(np.mean(hvps))))
        return out

    def ours(tol, seed):
        obj.clear_cache()
        r = hessian_eigenvalues(obj, tol=tol, tol_on="value", seed=seed)
        return r.top, r.num_hvps

    def theirs(tol, seed):
        torch.manual_seed(seed)
        h = _pyhessian(model, x, y)
        counter = _count_hvps(h)
        return h.eigenvalues(top_n=1, tol=tol, maxIter=1000)[0][0], counter()

    ours_runs, theirs_runs = sweep(ours), sweep(theirs)
    for target in (1e-2, 1e-3, 1e-4, 1e-5):
        a = min((r for r in ours_runs if r[1] <= target), key=lambda r: r[2], default=None)
        b = min((r for r in theirs_runs if r[1] <= target), key=lambda r: r[2], default=None)
        if a is None or b is None:
            continue
        rows.append(
            row(
                "lambda_max",
                f"{name} lambda={ref:.4g}, rel.err <= {target:g}",
                a[2],
                "pyhessian eigenvalues",
                b[2],
                note=f"ours tol={a[0]:g} (worst err {a[1]:.1e}, {a[3]:.1f} HVPs) vs pyhessian tol={b[0]:g} "
                f"(worst err {b[1]:.1e}, {b[3]:.1f} HVPs); speed-up {b[2] / a[2]:.2f}x",
            )
        )
    default = next(r for r in theirs_runs if r[0] == 1e-3)
    a = min((r for r in ours_runs if r[1] <= default[1]), key=lambda r: r[2])
    rows.append(
        row(
            "lambda_max",
            f"{name} at PyHessian's default accuracy (tol 1e-3)",
            a[2],
            "pyhessian eigenvalues",
            default[2],
            note=f"ours tol={a[0]:g} worst err {a[1]:.1e} vs pyhessian {default[1]:.1e}; "
            f"speed-up {default[2] / a[2]:.2f}x",
        )
    )

    # -- trace. PyHessian's trace (maxIter=100, tol=1e-3) over many seeds gives an RMS error and a mean HVP
    # count; ours at fixed budgets over as many seeds; we report the smallest budget of each of our estimators
    # whose RMS error is at most PyHessian's, and the HVP ratio (target <= 1/3). The reference trace is
    # Hutch++ with a large budget (its standard error is printed).
    big = hessian_trace(obj, num_hvps=150 if quick else 900, seed=12345)
    seeds = 10 if quick else 40
    ph_vals, ph_hvps, ph_time = [], [], 0.0
    for s in range(seeds):
        torch.manual_seed(s)
        t0 = time.perf_counter()
        samples = ph.trace(maxIter=100, tol=1e-3)
        ph_time += time.perf_counter() - t0
        ph_vals.append(float(np.mean(samples)))
        ph_hvps.append(len(samples))
    e_ph, m_ph = _rms(ph_vals, big.value), float(np.mean(ph_hvps))
    for method in ("hutchinson", "hutch++"):
        budget, e_b, t_b = 0, math.inf, math.nan
        for budget in (3, 4, 6, 9, 12, 18, 27, 36, 54, 81):
            t0 = time.perf_counter()
            vals = [
                hessian_trace(obj, method=method, num_hvps=budget, seed=1000 + s).value for s in range(seeds)
            ]
            t_b = (time.perf_counter() - t0) / seeds
            e_b = _rms(vals, big.value)
            if e_b <= e_ph:
                break
        rows.append(
            row(
                "trace",
                f"{name} tr={big.value:.4g}+-{big.stderr:.2g}, {method}",
                t_b,
                "pyhessian trace",
                ph_time / seeds,
                note=f"RMS rel.err {e_b:.2e} @ {budget} HVPs vs pyhessian {e_ph:.2e} @ {m_ph:.1f} HVPs "
                f"(HVP ratio {budget / m_ph:.2f}; {seeds} seeds)" + ("" if e_b <= e_ph else "; budget cap"),
            )
        )
    return rows


def _count_hvps(h):
    """Count PyHessian's HVPs by wrapping the function its ``eigenvalues`` calls; returns a reader."""
    import sys

    import pyhessian  # noqa: F401  (loads the module pyhessian.hessian, which the class of that name shadows)

    mod = sys.modules["pyhessian.hessian"]
    calls = [0]
    original = mod.hessian_vector_product

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    mod.hessian_vector_product = counting

    def read() -> int:
        mod.hessian_vector_product = original
        return calls[0]

    return read


def main(quick: bool = False) -> list[dict]:
    """Run the benchmark; return rows."""
    ds = load_dataset("mnist1d")
    return [r for name in ("mlp", "cnn1d") for r in _bench_model(name, ds, quick)]


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(2)
    for r in main(quick=True):
        print({k: (f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else v) for k, v in r.items()})
