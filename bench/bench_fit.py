"""fit()'s overhead against a hand-written PyTorch loop (same model, data, seed), and the hardware limit.

Cases:

- ``mlp`` / ``cnn1d`` on MNIST-1D, Adam, batch 100: ``fit`` (its seeded sampler, schedules, history, callbacks loop,
  one final evaluation on the train and test sets) against a bare loop that draws its own permutation batches.
- the same with ``eval_max_samples=1``: the final evaluation shrinks to one sample, so the ratio is the per-step
  overhead alone.
- a tiny GPT-2 language model (``GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)``) on a
  list of dict batches ``{"input_ids", "labels"}``: ``fit`` (batch protocol, ``model(**batch).loss``, the shared
  ``TrainStep``) against a hand loop over the same batches in the same order.

Runs are interleaved (hand, ours, hand, ours, ...) and the best of N is reported, for wall time and for CPU
(process) time: on a shared machine the wall time also measures the neighbours.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from bench import common
from bench.common import peak_gflops, row
from lrbs.data import load_dataset
from lrbs.models import build_model
from lrbs.train import fit


def interleaved_best(fns: list, repeat: int) -> tuple[list[float], list[float]]:
    """Best-of-``repeat`` wall and CPU time of each function, run in turn (ABBA order) after one warm-up round.

    ``LAST_PAIRED[0]`` is set to the median over rounds of ``wall[last] / wall[first]`` (each round's runs are
    adjacent in time, so the ratio of a pair cancels slow drift of a shared machine).
    """
    for f in fns:
        f()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for r in range(repeat):
        order = (
            list(enumerate(fns)) if r % 2 == 0 else list(enumerate(fns))[::-1]
        )  # ABBA: no side always second
        for i, f in order:
            common.sync()
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            common.sync()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    LAST_PAIRED[0] = statistics.median(b / a for a, b in zip(wall[0], wall[-1]))
    return [min(t) for t in wall], [min(t) for t in cpu]


LAST_PAIRED = [float("nan")]


def _hand_loop(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int
):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(y), generator=g).to(x.device), 0
    model.train()
    for _ in range(steps):
        if pos + batch > len(y):
            perm, pos = torch.randperm(len(y), generator=g).to(x.device), 0
        idx = perm[pos : pos + batch]
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """The benchmark's tiny GPT-2 (no dropout), built from a config: no download."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def lm_batches(n_batches: int = 16, batch: int = 8, seq: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n_batches * batch, seq), generator=g)
    return [
        {"input_ids": ids[i : i + batch], "labels": ids[i : i + batch]} for i in range(0, len(ids), batch)
    ]


def gpt2_hand_loop(model: nn.Module, batches: list[dict], steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()


def _overhead_row(case: str, t: tuple[list[float], list[float]], steps: int) -> dict:
    (t_hand, t_ours), (c_hand, c_ours) = t
    return row(
        "fit_overhead",
        case,
        t_ours,
        "hand loop",
        t_hand,
        note=f"overhead {100 * (t_ours / t_hand - 1):+.1f}% wall, {100 * (c_ours / c_hand - 1):+.1f}% CPU (best of "
        f"each), {100 * (LAST_PAIRED[0] - 1):+.1f}% median of paired rounds; "
        f"per step {1e3 * t_ours / steps:.3f} ms vs {1e3 * t_hand / steps:.3f} ms",
    )


def _tiny_linear_row(dev: torch.device, repeat: int, steps: int) -> dict:
    """fit's own time per step, in microseconds: a 4 -> 2 linear model on batches of 10, where torch's part of a
    step is a few hundred microseconds and the difference is lrbs's Python (sampler, the shared step, history,
    callbacks loop), not the noise of a millisecond-long step."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 4, generator=g).to(dev), torch.randint(0, 2, (1000,), generator=g).to(dev)

    def linear() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(4, 2).to(dev)

    def ours():
        fit(
            linear(),
            (x, y),
            optimizer="adam",
            lr=1e-3,
            batch_size=10,
            steps=steps,
            seed=0,
            eval_max_samples=1,
        )

    def hand():
        _hand_loop(linear(), x, y, steps, 10, 1e-3, 0)

    (t_hand, t_ours), (c_hand, c_ours) = interleaved_best([hand, ours], repeat)
    return row(
        "fit_overhead",
        f"linear 4->2 adam b10 x{steps} (lrbs's own time per step)",
        t_ours,
        "hand loop",
        t_hand,
        note=f"{1e6 * (t_ours - t_hand) / steps:+.1f} us wall, {1e6 * (c_ours - c_hand) / steps:+.1f} us CPU per "
        f"step (best of each; the hand loop's step: {1e6 * t_hand / steps:.0f} us); "
        f"{100 * (LAST_PAIRED[0] - 1):+.1f}% median of paired rounds",
    )


def main(quick: bool = False, device: torch.device | str | None = None) -> list[dict]:
    """Run the benchmark on ``device`` (default: the one ``python -m bench --device`` chose); return rows."""
    if device is not None:
        common.set_device(device)
    dev = common.device()
    rows = [
        row(
            "peak_matmul",
            f"fp32 on {dev}",
            2 * 1024**3 / peak_gflops() / 1e9,
            gflop=2 * 1024**3 / 1e9,
            note=f"{peak_gflops():.1f} GFLOP/s",
        )
    ]
    ds = load_dataset("mnist1d")
    x, y = ds.train.x.to(dev), ds.train.y.to(dev)
    test = (ds.test.x.to(dev), ds.test.y.to(dev))
    steps = 300 if quick else 1500
    repeat = 7 if quick else 9
    for name in ("mlp", "cnn1d"):
        for small_eval in (False, True):
            extra = {"eval_max_samples": 1} if small_eval else {}

            def ours(name=name, extra=extra):
                m = build_model(name, dataset=ds, seed=0).to(dev)
                fit(m, (x, y), test_data=test, optimizer="adam", lr=1e-3, batch_size=100, steps=steps, eval_every=10**9, seed=0,
                    **extra)  # fmt: skip

            def hand(name=name):
                m = build_model(name, dataset=ds, seed=0).to(dev)
                _hand_loop(m, x, y, steps, 100, 1e-3, 0)

            what = "eval_max_samples=1 (per-step overhead)" if small_eval else "+1 final eval"
            t = interleaved_best([hand, ours], repeat)
            rows.append(_overhead_row(f"{name} adam b100 x{steps} ({what})", t, steps))

    rows.append(_tiny_linear_row(dev, repeat, 600 if quick else 3000))

    # ---- tiny GPT-2 on dict batches: fit (batch protocol + TrainStep) vs a hand loop over the same batches
    batches = [{k: v.to(dev) for k, v in b.items()} for b in lm_batches()]
    gsteps = 40 if quick else 150

    proto = tiny_gpt2().to(dev)  # each run trains a fresh copy (built outside the timing)

    def gpt_ours():
        m = copy.deepcopy(proto)
        fit(m, batches, optimizer="adam", lr=1e-3, steps=gsteps, eval_every=10**9, eval_max_samples=1)

    def gpt_hand():
        gpt2_hand_loop(copy.deepcopy(proto), batches, gsteps, 1e-3)

    t = interleaved_best([gpt_hand, gpt_ours], repeat)
    rows.append(_overhead_row(f"tiny GPT-2 dict batches b8x32 adam x{gsteps}", t, gsteps))
    return rows


if __name__ == "__main__":  # pragma: no cover
    for r in main(quick=True):
        print(r)
