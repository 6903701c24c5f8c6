"""Hessian curvature on MNIST-1D (full 4000-sample training set): lrbs against PyHessian, same model and data.

Rows:
- ``grad`` / ``hvp_rev_rev`` / ``hvp_fwd_rev``: one full-data gradient and one HVP by each implementation (the
  HVP ratio is to one gradient; the target is <= 3x).
- ``lambda_max``: top eigenvalue, lrbs Lanczos (tol 1e-3 on the relative Ritz residual) against PyHessian
  ``eigenvalues(top_n=1, tol=1e-3)`` (power iteration); both errors are measured against a tight Lanczos
  reference (tol 1e-10). PyHessian's time includes building its gradient graph; ours starts from an empty
  graph cache.
- ``trace``: PyHessian ``trace(maxIter=100, tol=1e-3)`` over several seeds gives an RMS error and a mean HVP
  count; we report the smallest Hutch++ budget whose RMS error (same seeds) is at most that, and the HVP ratio
  (target <= 1/3). The reference trace is Hutch++ with a large budget.

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
    repeat = 1 if quick else 3
    seeds = 4 if quick else 6
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

    # -- top eigenvalue
    ref = hessian_eigenvalues(obj, tol=1e-10, max_iter=300, seed=1).top  # another start vector
    ours_res: list = []
    theirs_res: list = []

    def ours_eig():
        obj.clear_cache()
        ours_res.append(hessian_eigenvalues(obj, tol=1e-3))

    def theirs_eig():
        torch.manual_seed(0)
        h = _pyhessian(model, x, y)
        theirs_res.append(h.eigenvalues(top_n=1, tol=1e-3, maxIter=100)[0][0])

    t_ours = timeit(ours_eig, repeat=repeat, warmup=1)
    t_theirs = timeit(theirs_eig, repeat=repeat, warmup=1)
    e_ours = abs(ours_res[-1].top - ref) / abs(ref)
    e_theirs = abs(theirs_res[-1] - ref) / abs(ref)
    rows.append(
        row(
            "lambda_max",
            f"{name} lambda={ref:.4g}",
            t_ours,
            "pyhessian eigenvalues",
            t_theirs,
            note=f"rel.err ours {e_ours:.1e} ({ours_res[-1].num_hvps} HVPs) vs pyhessian {e_theirs:.1e}; "
            f"speed-up {t_theirs / t_ours:.1f}x",
        )
    )

    # -- top eigenvalue at equal accuracy, both ways: ours stopped early (few Lanczos steps) against PyHessian's
    # default, and PyHessian run to a tight tolerance against our default accuracy.
    few: list = []

    def ours_few():
        obj.clear_cache()
        few.append(hessian_eigenvalues(obj, tol=3e-2, min_steps=4))

    t_few = timeit(ours_few, repeat=repeat, warmup=1)
    e_few = abs(few[-1].top - ref) / abs(ref)
    rows.append(
        row(
            "lambda_max",
            f"{name} ours early stop vs pyhessian default",
            t_few,
            "pyhessian eigenvalues",
            t_theirs,
            note=f"rel.err ours {e_few:.1e} ({few[-1].num_hvps} HVPs) vs pyhessian {e_theirs:.1e}; "
            f"speed-up {t_theirs / t_few:.1f}x",
        )
    )
    tight: list = []

    def theirs_tight():
        torch.manual_seed(0)
        h = _pyhessian(model, x, y)
        tight.append(h.eigenvalues(top_n=1, tol=1e-7, maxIter=1000)[0][0])

    t_tight = timeit(theirs_tight, repeat=1, warmup=0)
    e_tight = abs(tight[-1] - ref) / abs(ref)
    rows.append(
        row(
            "lambda_max",
            f"{name} ours default vs pyhessian tol=1e-7",
            t_ours,
            "pyhessian eigenvalues",
            t_tight,
            note=f"rel.err ours {e_ours:.1e} vs pyhessian {e_tight:.1e}; speed-up {t_tight / t_ours:.1f}x",
        )
    )

    # -- trace
    t0 = time.perf_counter()
    big = hessian_trace(obj, num_hvps=150 if quick else 600, seed=12345)
    t_ref = time.perf_counter() - t0
    ph_vals, ph_hvps, ph_time = [], [], 0.0
    for s in range(seeds):
        torch.manual_seed(s)
        t0 = time.perf_counter()
        samples = ph.trace(maxIter=100, tol=1e-3)
        ph_time += time.perf_counter() - t0
        ph_vals.append(float(np.mean(samples)))
        ph_hvps.append(len(samples))
    e_ph, m_ph = _rms(ph_vals, big.value), float(np.mean(ph_hvps))
    budget, e_b, t_b = 0, math.inf, math.nan
    for budget in (6, 15, 33, 66):
        t0 = time.perf_counter()
        vals = [hessian_trace(obj, num_hvps=budget, seed=s).value for s in range(seeds)]
        t_b = (time.perf_counter() - t0) / seeds
        e_b = _rms(vals, big.value)
        if e_b <= e_ph:
            break
    rows.append(
        row(
            "trace",
            f"{name} tr={big.value:.4g}+-{big.stderr:.2g}",
            t_b,
            "pyhessian trace",
            ph_time / seeds,
            note=f"RMS rel.err hutch++ {e_b:.2e} @ {budget} HVPs vs pyhessian {e_ph:.2e} @ {m_ph:.1f} HVPs "
            f"(HVP ratio {budget / m_ph:.2f}); reference {t_ref:.1f}s"
            + ("" if e_b <= e_ph else "; budget cap"),
        )
    )
    return rows


def main(quick: bool = False) -> list[dict]:
    """Run the benchmark; return rows."""
    ds = load_dataset("mnist1d")
    return [r for name in ("mlp", "cnn1d") for r in _bench_model(name, ds, quick)]


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(2)
    for r in main(quick=True):
        print({k: (f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else v) for k, v in r.items()})
