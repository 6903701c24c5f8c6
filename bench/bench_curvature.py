"""Hessian curvature on MNIST-1D (full 4000-sample training set): lrbs against PyHessian, same model and data.

Rows, per model (``mlp``, ``cnn1d``, trained with Adam for 1000 steps), on the benchmark device (``--device``;
PyHessian with ``cuda=True`` on a GPU):

- ``defaults``: what a user types, each measurement in a **fresh process** (a subprocess per run, started after
  the imports and the data; timed from the Objective's construction / PyHessian's ``hessian(...)`` to the
  number, so every first-call cost is in: the private model copy, the gradient graph, the method choice, the
  allocator). Ours ``hessian_eigenvalues(obj)`` against PyHessian ``hessian(model, criterion, data=(x, y))
  .eigenvalues()``; ours ``hessian_trace(obj)`` against PyHessian's ``.trace()`` (the mean of its samples).
  Runs alternate ours / theirs, 11 fresh processes each (PyHessian's run time depends on its seed: its stopping
  rules end after 6-30 HVPs, so a median over few seeds moves by +-30%); PyHessian's global RNG is seeded per run
  (its start vector and probes). The
  errors are against tight references: Lanczos at ``tol=1e-10`` on a float64 Objective from a random start
  (eigenvalue), Hutch++ with 900 HVPs (trace); the trace errors are RMS over seeds, measured in this process
  (PyHessian over 20 seeds; ours over 20 ``seed`` values of the same default call). Target: ours >= 2x
  faster at an error no larger than PyHessian's.
- ``grad`` / ``hvp_rev_rev`` / ``hvp_fwd_rev``: one full-data gradient and one HVP by each implementation (the
  HVP ratio is to one gradient; the target is <= 3x).
- ``lambda_max``: time to the top eigenvalue at a stated relative accuracy (1e-2 ... 1e-5, against the tight
  reference): each tool runs over a grid of its own tolerance from several start vectors, and for each target
  the cheapest setting whose *worst* error is within it is timed. Ours is Lanczos from the gradient start with
  ``tol_on="value"``; PyHessian's is ``eigenvalues(top_n=1, tol=...)`` (power iteration). Both times include
  building the gradient graph.
- ``trace``: PyHessian ``trace(maxIter=100, tol=1e-3)`` over many seeds gives an RMS error and a mean HVP
  count; we report the smallest Hutchinson and Hutch++ budgets whose RMS error (same number of seeds) is at
  most that, and the HVP ratio.

PyHessian calls ``model.eval()`` on the model it is given (and writes ``.grad``), so in-process it gets a copy.
``python -m bench.bench_curvature worker SPEC`` is the fresh-process worker (SPEC is JSON); it prints one JSON
line.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import common
from bench.common import row, timeit
from lrbs.curvature import hessian_eigenvalues, hessian_trace
from lrbs.data import load_dataset
from lrbs.models import build_model
from lrbs.objective import Objective
from lrbs.train import fit


def _pyhessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dev: torch.device):
    from pyhessian import hessian

    return hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=dev.type == "cuda")


def _trained(name: str, ds, steps: int) -> nn.Module:
    """Trained on the CPU (the same model whatever the benchmark device)."""
    model = build_model(name, dataset=ds, seed=0)
    fit(model, ds, optimizer="adam", lr=1e-2, batch_size=100, steps=steps, eval_every=10**9, seed=0)
    return model


def _rms(values: list[float], ref: float) -> float:
    return float(np.sqrt(np.mean((np.asarray(values) - ref) ** 2)) / abs(ref))


# --------------------------------------------------------------------------- fresh-process defaults
def _count_pyhessian_hvps() -> list[int]:
    """Count PyHessian's HVPs (wraps the function its methods call, once per process); returns the counter."""
    import pyhessian  # noqa: F401  (loads the module pyhessian.hessian, which the class of that name shadows)

    mod = sys.modules["pyhessian.hessian"]
    if hasattr(mod, "lrbs_bench_calls"):
        return mod.lrbs_bench_calls
    calls = [0]
    original = mod.hessian_vector_product

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    mod.hessian_vector_product = counting
    mod.lrbs_bench_calls = calls
    return calls


def _worker(spec: dict) -> dict:
    """One fresh-process measurement: ``spec`` names tool, analysis, model, state file, device, seed, threads."""
    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    # Every import before the clock starts, for both tools -- including the one torch makes lazily at the first
    # torch.autograd.grad with a grad_outputs tensor (torch.fx.experimental.symbolic_shapes, which imports sympy:
    # 0.7-3.4 s here). PyHessian's HVP pays it, and so does lrbs' reverse-over-reverse HVP today; an HVP taken as
    # the gradient of the scalar g.v (bitwise the same) would not.
    importlib.import_module("torch.fx.experimental.symbolic_shapes")
    from pyhessian import hessian

    ds = load_dataset("mnist1d")
    model = build_model(spec["model"], dataset=ds, seed=0)
    model.load_state_dict(torch.load(spec["state"], weights_only=True))
    model.to(dev)
    x, y = ds.train.x.to(dev), ds.train.y.to(dev)
    calls = _count_pyhessian_hvps()
    torch.manual_seed(spec["seed"])
    common.set_device(dev)
    common.sync()
    t0 = time.perf_counter()
    if spec["tool"] == "ours":
        obj = Objective(model, data=(x, y))
        res = hessian_eigenvalues(obj) if spec["what"] == "eig" else hessian_trace(obj)
        value = res.top if spec["what"] == "eig" else res.value
        hvps, method = res.num_hvps, res.settings.get("hvp_method")
        if "batch_hvp_block" in res.settings:
            method = f"{method}, {res.settings['batch_hvp_block']} pieces of {res.settings['probe_samples']}"
    else:
        h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=dev.type == "cuda")
        value = h.eigenvalues()[0][0] if spec["what"] == "eig" else float(np.mean(h.trace()))
        hvps, method = calls[0], "rev_rev (PyHessian)"
    common.sync()
    return {"time": time.perf_counter() - t0, "value": float(value), "hvps": int(hvps), "method": method}


def _fresh(spec: dict) -> dict:
    """Run :func:`_worker` in a new Python process; returns its JSON result."""
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_curvature", "worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"fresh-process worker failed ({spec}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pyhessian_trace_rms(ph, ref: float, seeds: int) -> tuple[float, float]:
    vals, counts = [], []
    for s in range(seeds):
        torch.manual_seed(s)
        samples = ph.trace()
        vals.append(float(np.mean(samples)))
        counts.append(len(samples))
    return _rms(vals, ref), float(np.mean(counts))


def _defaults(
    name: str,
    model: nn.Module,
    x,
    y,
    obj: Objective,
    ref_eig: float,
    ref_tr,
    quick: bool,
    whats: tuple[str, ...] = ("eig", "trace"),
) -> list[dict]:
    """The fresh-process comparison at both tools' default arguments."""
    dev = common.device()
    reps = 2 if quick else 11  # PyHessian stops at a random HVP count (6-30): 11 fresh processes each
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = str(Path(tmp) / f"{name}.pt")
        torch.save(model.state_dict(), state)
        base = {"model": name, "state": state, "device": str(dev), "threads": torch.get_num_threads()}
        for what, ref in (("eig", ref_eig), ("trace", ref_tr.value)):
            if what not in whats:
                continue
            runs: dict[str, list[dict]] = {"ours": [], "pyhessian": []}
            for r in range(reps):
                order = ("ours", "pyhessian") if r % 2 == 0 else ("pyhessian", "ours")
                for tool in order:
                    runs[tool].append(_fresh({**base, "tool": tool, "what": what, "seed": r}))
            t_ours = statistics.median(x["time"] for x in runs["ours"])
            t_ph = statistics.median(x["time"] for x in runs["pyhessian"])
            if what == "eig":
                e_ours = abs(runs["ours"][0]["value"] - ref) / abs(ref)
                e_ph = [abs(x["value"] - ref) / abs(ref) for x in runs["pyhessian"]]
                spread = [
                    abs(hessian_eigenvalues(obj, seed=s).top - ref) / abs(ref)
                    for s in range(1 if quick else 5)
                ]
                err = (
                    f"rel. error ours {e_ours:.1e} (over start seeds {min(spread):.1e}-{max(spread):.1e}) vs "
                    f"pyhessian median {statistics.median(e_ph):.1e} ({min(e_ph):.1e}-{max(e_ph):.1e})"
                )
                case = f"{name} hessian_eigenvalues(obj) vs eigenvalues(), lambda={ref:.4g}"
            else:
                seeds = 8 if quick else 20
                e_ph, m_ph = _pyhessian_trace_rms(_pyhessian(model, x, y, dev), ref, seeds)
                ours_seeds = 8 if quick else 20
                e_ours = _rms([hessian_trace(obj, seed=s).value for s in range(ours_seeds)], ref)
                err = (
                    f"RMS rel. error ours {e_ours:.2e} ({ours_seeds} seeds) vs pyhessian {e_ph:.2e} ({seeds} "
                    f"seeds, {m_ph:.1f} HVPs on average); reference {ref:.4g}+-{ref_tr.stderr:.2g}"
                )
                case = f"{name} hessian_trace(obj) vs trace()"
            hv_o = statistics.mean(x["hvps"] for x in runs["ours"])
            hv_p = statistics.mean(x["hvps"] for x in runs["pyhessian"])
            rows.append(
                row(
                    "defaults",
                    case,
                    t_ours,
                    "pyhessian (fresh process)",
                    t_ph,
                    note=f"speed-up {t_ph / t_ours:.2f}x; HVPs ours {hv_o:.1f} ({runs['ours'][0]['method']}) vs "
                    f"{hv_p:.1f}; {err}; median of {reps} fresh processes each",
                )
            )
    return rows


# --------------------------------------------------------------------------- in-process sections
def _hvp_rows(name: str, obj: Objective, model: nn.Module, x, y) -> list[dict]:
    n, theta = obj.num_params, obj.theta()
    v = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(theta.device)
    t_grad = timeit(lambda: obj.grad(theta), repeat=5, warmup=1)
    rows = [row("grad", f"{name} (n={n}, N={len(y)})", t_grad, note="full-data gradient")]
    obj.hvp(theta, v, method="rev_rev")  # builds the cached graph
    t_rr = timeit(lambda: obj.hvp(theta, v, method="rev_rev"), repeat=5, warmup=1)
    t_fr = timeit(lambda: obj.hvp(theta, v, method="fwd_rev"), repeat=3, warmup=1)
    from pyhessian.utils import hessian_vector_product

    ph = _pyhessian(model, x, y, common.device())
    vs = [t.clone() for t in obj.unflatten(v).values()]
    t_ph = timeit(lambda: hessian_vector_product(ph.gradsH, ph.params, vs), repeat=5, warmup=1)
    rows.append(row("hvp_rev_rev", name, t_rr, "pyhessian hvp", t_ph, note=f"{t_rr / t_grad:.2f}x one grad"))
    rows.append(row("hvp_fwd_rev", name, t_fr, "pyhessian hvp", t_ph, note=f"{t_fr / t_grad:.2f}x one grad"))
    return rows


def _sweep(run, tols, nseed: int, ref: float) -> list[tuple[float, float, float, float]]:
    """(tol, worst error, mean time, mean HVPs) per tolerance, over ``nseed`` starts (each warmed up once)."""
    out = []
    for tol in tols:
        errs, times, hvps = [], [], []
        for seed in range(nseed):
            run(tol, seed)  # warm-up (and the allocator) outside the timing
            common.sync()
            t0 = time.perf_counter()
            val, count = run(tol, seed)
            common.sync()
            times.append(time.perf_counter() - t0)
            errs.append(abs(val - ref) / abs(ref))
            hvps.append(count)
        out.append((tol, max(errs), float(np.mean(times)), float(np.mean(hvps))))
    return out


def _lambda_rows(name: str, obj: Objective, model: nn.Module, x, y, ref: float, quick: bool) -> list[dict]:
    nseed = 2 if quick else 3
    tols = (1e-2, 1e-3, 1e-4) if quick else (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
    calls = _count_pyhessian_hvps()

    def ours(tol, seed):
        obj.clear_cache()
        r = hessian_eigenvalues(obj, tol=tol, tol_on="value", seed=seed)
        return r.top, r.num_hvps

    def theirs(tol, seed):
        torch.manual_seed(seed)
        calls[0] = 0
        h = _pyhessian(model, x, y, common.device())
        return h.eigenvalues(top_n=1, tol=tol, maxIter=1000)[0][0], calls[0]

    ours_runs, theirs_runs = _sweep(ours, tols, nseed, ref), _sweep(theirs, tols, nseed, ref)
    rows = []
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
    return rows


def _trace_rows(name: str, obj: Objective, ph, big, quick: bool) -> list[dict]:
    seeds = 10 if quick else 40
    ph_vals, ph_hvps, ph_time = [], [], 0.0
    for s in range(seeds):
        torch.manual_seed(s)
        t0 = time.perf_counter()
        samples = ph.trace(maxIter=100, tol=1e-3)
        common.sync()
        ph_time += time.perf_counter() - t0
        ph_vals.append(float(np.mean(samples)))
        ph_hvps.append(len(samples))
    e_ph, m_ph = _rms(ph_vals, big.value), float(np.mean(ph_hvps))
    rows = []
    variants = {  # fixed budgets (rtol=0): one probe for all the data, one per 256 samples, Hutch++
        "hutchinson, one probe": {"method": "hutchinson", "probe_samples": None, "rtol": 0},
        "hutchinson, split 256": {"method": "hutchinson", "rtol": 0},
        "hutch++": {"method": "hutch++"},
    }
    for method, kw in variants.items():
        budget, e_b, t_b = 0, math.inf, math.nan
        for budget in (2, 3, 4, 6, 9, 12, 18, 27, 36, 54, 81):
            if budget < 3 and method == "hutch++":
                continue
            t0 = time.perf_counter()
            vals = [hessian_trace(obj, num_hvps=budget, seed=1000 + s, **kw).value for s in range(seeds)]
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


def _references(model: nn.Module, obj: Objective, x, y, quick: bool) -> tuple[float, Any]:
    """The tight references (cached on disk by the model's exact weights: they cost minutes on a loaded CPU)."""
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().numpy().tobytes())
    path = Path(tempfile.gettempdir()) / f"lrbs_bench_curvature_{digest.hexdigest()[:16]}_{int(quick)}.json"
    if path.exists():
        d = json.loads(path.read_text())
        return d["eig"], SimpleNamespace(value=d["trace"], stderr=d["stderr"])
    ref64 = Objective(model, data=(x.double(), y), dtype=torch.float64)
    ref = hessian_eigenvalues(ref64, tol=1e-10, tol_on="residual", max_iter=300, seed=99, init="random").top
    big = hessian_trace(obj, method="hutch++", num_hvps=150 if quick else 900, seed=12345)
    path.write_text(json.dumps({"eig": ref, "trace": big.value, "stderr": big.stderr}))
    return ref, big


def _bench_model(name: str, ds, quick: bool, sections: tuple[str, ...]) -> list[dict]:
    dev = common.device()
    model = _trained(name, ds, 200 if quick else 1000).to(dev)
    x, y = ds.train.x.to(dev), ds.train.y.to(dev)
    obj = Objective(model, data=(x, y))
    ref, big = _references(model, obj, x, y, quick)
    rows: list[dict] = []
    whats = tuple(w for w in ("eig", "trace") if "defaults" in sections or f"defaults-{w}" in sections)
    if whats:
        rows += _defaults(name, model, x, y, obj, ref, big, quick, whats)
    if "hvp" in sections:
        rows += _hvp_rows(name, obj, model, x, y)
    if "lambda" in sections:
        rows += _lambda_rows(name, obj, model, x, y, ref, quick)
    if "trace" in sections:
        rows += _trace_rows(name, obj, _pyhessian(model, x, y, dev), big, quick)
    return rows


SECTIONS = ("defaults", "hvp", "lambda", "trace")


def main(quick: bool = False, device: torch.device | str | None = None) -> list[dict]:
    """Run the benchmark on ``device`` (default: the one ``python -m bench --device`` chose); return rows.

    ``LRBS_BENCH_CURVATURE=defaults,hvp`` limits the sections (default all of them: defaults, hvp, lambda,
    trace; ``defaults-eig`` / ``defaults-trace`` run half of the first).
    """
    if device is not None:
        common.set_device(device)
    sections = tuple(os.environ.get("LRBS_BENCH_CURVATURE", ",".join(SECTIONS)).split(","))
    ds = load_dataset("mnist1d")
    peak = common.peak_gflops()
    rows = [row("peak_matmul", f"fp32 on {common.device()}", 0.0, note=f"{peak:.1f} GFLOP/s (this run)")]
    for name in ("mlp", "cnn1d"):
        rows += _bench_model(name, ds, quick, sections)
    rows.append(row("peak_matmul", "fp32, again at the end", 0.0, note=f"{_peak_again():.1f} GFLOP/s"))
    return rows


def _peak_again() -> float:
    common.peak_gflops.cache_clear()
    return common.peak_gflops()


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
        sys.exit(0)
    torch.set_num_threads(1)
    for r in main(quick=True):
        print({k: (f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else v) for k, v in r.items()})
