"""LR range test: lrbs vs torch-lr-finder on the same workload, and vs a bare training loop.

Cases (MNIST-1D, cnn1d, SGD with momentum 0.9, batch 64, 100 exponential iterations):

- ``vs torch-lr-finder``: the same DataLoader, model and optimizer; both do their own snapshot and restore
  (``LRFinder(...)`` + ``range_test`` + ``reset``). The divergence stop is switched off in both
  (``diverge_th=inf``; ``diverge_factor=None``) and the range ends at ``end_lr=1`` so that both run all 100
  iterations (at ``end_lr=10`` SGD reaches a non-finite loss, where lrbs stops and torch-lr-finder goes on).
- ``vs bare loop``: ``lr_range_test`` on a list of pre-made batches against a hand-written loop of
  zero_grad/forward/backward/step on the same batches; the ratio is the per-iteration overhead of the range
  test (lr setting, loss recording, smoothing, divergence check, snapshot and restore).
- ``vs bare loop, Split data``: lrbs draws its own seeded batches from the split (an index gather per step).
- ``tiny GPT-2``: ``lr_range_test`` on a list of dict batches ``{"input_ids", "labels"}`` (``model(**batch).loss``
  through the batch protocol and the shared ``TrainStep``) against a hand loop over the same batches; best of N.

Runs are interleaved (ours, theirs, ours, ...) and the median is reported, which matters on a shared machine.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

import torch
from torch import nn

try:
    from bench.common import row
except ImportError:  # pragma: no cover - bench/common.py is the lead's; keep this file runnable alone

    def row(benchmark, case, ours_s, peer="", peer_s=None, gflop=None, note=""):
        return {
            "benchmark": benchmark,
            "case": case,
            "ours_s": ours_s,
            "peer": peer,
            "peer_s": peer_s,
            "ratio": ours_s / peer_s if peer_s else None,
            "gflop": gflop,
            "pct_peak": None,
            "note": note,
        }


def _interleaved(fns: list, repeat: int) -> tuple[list[float], list[float]]:
    """Median wall and CPU (process) time of each function, run in turn ``repeat`` times after a warm-up round.

    The CPU time is reported too because on a shared machine the wall time also measures the neighbours.
    """
    for f in fns:
        f()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, f in enumerate(fns):
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]


def main(quick: bool = False) -> list[dict]:
    """Run the benchmark; return rows."""
    from torch_lr_finder import LRFinder

    from lrbs.data import load_dataset
    from lrbs.models import build_model
    from lrbs.range_test import lr_range_test

    repeat = 3 if quick else 7
    n_iter, bs = 100, 64
    ds = load_dataset("mnist1d")
    model = build_model("cnn1d", dataset=ds, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-7, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    rows = []

    # ---- vs torch-lr-finder, same DataLoader
    loader = torch.utils.data.DataLoader(ds.train, batch_size=bs, shuffle=True)
    iters = {}

    def ours_loader():
        res = lr_range_test(
            model, opt, loss_fn, loader, start_lr=1e-7, end_lr=1.0, num_iter=n_iter, diverge_factor=None
        )
        iters["ours"] = len(res.lrs)

    def tlf():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            finder = LRFinder(model, opt, loss_fn, device="cpu")
            finder.range_test(loader, end_lr=1.0, num_iter=n_iter, step_mode="exp", diverge_th=float("inf"))
            finder.reset()
        iters["tlf"] = len(finder.history["lr"])

    (t_ours, t_tlf), (c_ours, c_tlf) = _interleaved([ours_loader, tlf], repeat)
    rows.append(
        row(
            "range_test",
            f"cnn1d mnist1d DataLoader b={bs} x{n_iter} it",
            t_ours,
            "torch-lr-finder",
            t_tlf,
            note=f"iterations ours {iters['ours']} / tlf {iters['tlf']}; both restore the model; "
            f"CPU-time ratio {c_ours / c_tlf:.3f}",
        )
    )

    # ---- vs a bare training loop on the same batches
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.randperm(len(ds.train), generator=g) for _ in range(2)])  # 2 epochs >= 100 batches
    batches = [
        (ds.train.x[idx[i * bs : (i + 1) * bs]], ds.train.y[idx[i * bs : (i + 1) * bs]])
        for i in range(n_iter)
    ]
    bare_model = build_model("cnn1d", dataset=ds, seed=0)
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=1e-3, momentum=0.9)

    def bare():
        for x, y in batches:
            bare_opt.zero_grad(set_to_none=True)
            loss_fn(bare_model(x), y).backward()
            bare_opt.step()

    def ours_list():
        lr_range_test(model, opt, loss_fn, batches, start_lr=1e-7, end_lr=1e-3, num_iter=n_iter)

    def ours_split():
        lr_range_test(model, opt, loss_fn, ds, start_lr=1e-7, end_lr=1e-3, num_iter=n_iter, batch_size=bs)

    (t_list, t_bare, t_split), (c_list, c_bare, c_split) = _interleaved([ours_list, bare, ours_split], repeat)
    per = 1e3 / n_iter
    rows.append(
        row(
            "range_test",
            f"cnn1d b={bs}, list of batches, x{n_iter} it",
            t_list,
            "bare loop",
            t_bare,
            note=f"per iteration {t_list * per:.3f} ms vs {t_bare * per:.3f} ms; "
            f"CPU-time ratio {c_list / c_bare:.3f}",
        )
    )
    rows.append(
        row(
            "range_test",
            f"cnn1d b={bs}, Split (own sampler), x{n_iter} it",
            t_split,
            "bare loop",
            t_bare,
            note=f"per iteration {t_split * per:.3f} ms vs {t_bare * per:.3f} ms; "
            f"CPU-time ratio {c_split / c_bare:.3f}",
        )
    )
    rows.append(_gpt2_row(max(repeat, 7), n_iter))
    return rows


def _gpt2_row(repeat: int, n_iter: int) -> dict:
    """Tiny GPT-2 on dict batches: ``lr_range_test`` (batch protocol, the shared TrainStep, snapshot and restore)
    against a hand loop that sets the lr and steps over the same batches; best of ``repeat``, interleaved."""
    from bench import bench_fit
    from bench.bench_fit import interleaved_best, lm_batches, tiny_gpt2
    from lrbs.range_test import lr_range_test

    batches = lm_batches()
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    bare_model = tiny_gpt2()
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=1e-3, momentum=0.9)
    lrs = torch.logspace(-6, -3, n_iter).tolist()

    def ours():
        lr_range_test(
            model, opt, data=batches, start_lr=1e-6, end_lr=1e-3, num_iter=n_iter, diverge_factor=None
        )

    def bare():
        bare_model.train()
        for i, lr in enumerate(lrs):
            bare_opt.param_groups[0]["lr"] = lr
            bare_opt.zero_grad(set_to_none=True)
            loss = bare_model(**batches[i % len(batches)]).loss
            loss.backward()
            bare_opt.step()
            float(loss.detach())  # the range test reads every loss on CPU

    (t_bare, t_ours), (c_bare, c_ours) = interleaved_best([bare, ours], repeat)
    per = 1e3 / n_iter
    return row(
        "range_test",
        f"tiny GPT-2 dict batches b8x32, list of batches, x{n_iter} it",
        t_ours,
        "hand loop",
        t_bare,
        note=f"best of {repeat}; per iteration {t_ours * per:.3f} ms vs {t_bare * per:.3f} ms; "
        f"CPU-time ratio {c_ours / c_bare:.3f}; median of paired rounds {bench_fit.LAST_PAIRED[0]:.3f}; "
        "restore included",
    )


if __name__ == "__main__":  # pragma: no cover
    for r in main(quick=True):
        print(r)
