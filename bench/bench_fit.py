"""The hardware limit and fit()'s overhead against a hand-written PyTorch loop (same model, data, seed)."""

from __future__ import annotations

import torch
from torch import nn

from bench.common import peak_gflops, row, timeit
from lrbs.data import load_dataset
from lrbs.models import build_model
from lrbs.train import fit


def _hand_loop(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int
):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(y), generator=g), 0
    model.train()
    for _ in range(steps):
        if pos + batch > len(y):
            perm, pos = torch.randperm(len(y), generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()


def main(quick: bool = False) -> list[dict]:
    rows = [
        row(
            "peak_matmul",
            "fp32 1024^3",
            2 * 1024**3 / peak_gflops() / 1e9,
            gflop=2 * 1024**3 / 1e9,
            note=f"{peak_gflops():.1f} GFLOP/s",
        )
    ]
    ds = load_dataset("mnist1d")
    steps = 300 if quick else 1500
    for name in ("mlp", "cnn1d"):

        def ours(name=name):
            m = build_model(name, dataset=ds, seed=0)
            fit(m, ds, optimizer="adam", lr=1e-3, batch_size=100, steps=steps, eval_every=10**9, seed=0)

        def hand(name=name):
            m = build_model(name, dataset=ds, seed=0)
            _hand_loop(m, ds.train.x, ds.train.y, steps, 100, 1e-3, 0)

        # interleaved, best of 5 each: the two loops see the same machine state (order and drift cancel)
        hand()
        ours()
        th, to = [], []
        for _ in range(5):
            th.append(timeit(hand, repeat=1, warmup=0))
            to.append(timeit(ours, repeat=1, warmup=0))
        t_hand, t_ours = min(th), min(to)
        rows.append(
            row(
                "fit_overhead",
                f"{name} adam b100 x{steps} (+1 final eval)",
                t_ours,
                "hand loop",
                t_hand,
                note=f"overhead {100 * (t_ours / t_hand - 1):+.1f}%",
            )
        )
    return rows
