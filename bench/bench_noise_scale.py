"""Gradient noise scale: lrbs ``noise_scale`` vs the hand-written per-sub-batch loop on the same sub-batches.

Cases (CPU, one thread unless ``--threads``):

- ``mlp, MNIST-1D tensors``: ``B_s = 16``, ``B_b = 512``, 10 big batches (320 sub-batch gradients);
- ``GPT-2 tiny, dict tensors``: ``GPT2LMHeadModel(n_embd=32, n_layer=2, n_head=2, vocab_size=64)`` on
  ``{"input_ids", "labels"}`` of length 16, ``B_s = 4``, ``B_b = 32``, 8 big batches (64 gradients);
- ``GPT-2 tiny, shuffled DataLoader``: the same through a ``DataLoader(batch_size=32, shuffle=True)`` (the
  streamed path: the loader's batches cut into sub-batches).

The peer is what a user writes without lrbs: for every sub-batch ``zero_grad``, forward, ``backward`` on the live
model, flatten the gradient, accumulate ``|g_i|²`` and the big-batch mean (the same sub-batches as ours, read the
same way: indexed from the tensors by the same seeded draws, or cut from the loader's batches). Ours computes the sub-batch gradients functionally on a private copy (vmap over
the sub-batches where the model allows it, else a loop) and adds the two-batch estimator, the bootstrap interval
and the restore of every random state. Runs are interleaved (ours, peer, ours, ...) and the median is reported.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from bench.common import row


def _median_interleaved(fns, repeat: int) -> list[float]:
    times = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _hand_loop(model, draws, call):
    """The naive estimator's gradients: one backward per sub-batch on the live model (``draws()`` reads them)."""
    for draw in draws():
        total = None
        for sub in draw:
            model.zero_grad(set_to_none=True)
            call(model, sub).backward()
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
            float(g.double() @ g.double())
            total = g.clone() if total is None else total + g
        float((total / len(draw)).double().pow(2).sum())
    model.zero_grad(set_to_none=True)


def _indexed(data, n, bs, bb, e, seed):
    """The same seeded draws as ours, read from the tensors one sub-batch at a time."""
    take = (
        (lambda s: {k: v[s] for k, v in data.items()})
        if isinstance(data, dict)
        else (lambda s: tuple(t[s] for t in data))
    )

    def draws():
        rng = np.random.default_rng(seed)
        for _ in range(e):
            i = rng.choice(n, size=bb, replace=False)
            yield [take(torch.from_numpy(i[j : j + bs])) for j in range(0, bb, bs)]

    return draws


def _gpt2():
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def main(quick: bool = False) -> list[dict]:
    from lrbs.data import load_dataset
    from lrbs.models import build_model
    from lrbs.noise_scale import noise_scale

    repeat = 3 if quick else 5
    rows = []
    ds = load_dataset("mnist1d")
    mlp = build_model("mlp", dataset=ds, seed=0)
    x, y = ds.train.x, ds.train.y
    kw = {"small_batch": 16, "big_batch": 512, "num_estimates": 10, "num_bootstrap": 200}
    subs = _indexed((x, y), len(y), 16, 512, 10, 0)
    ce = torch.nn.functional.cross_entropy
    ours, peer = _median_interleaved(
        [lambda: noise_scale(mlp, ds, **kw), lambda: _hand_loop(mlp, subs, lambda m, b: ce(m(b[0]), b[1]))],
        repeat,
    )
    method = noise_scale(mlp, ds, **kw).method
    rows.append(
        row("noise_scale", "mlp, MNIST-1D tensors, 320 sub-batches", ours, "hand loop", peer, note=method)
    )

    gpt2 = _gpt2()
    ids = torch.randint(0, 64, (512, 16), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "labels": ids}
    kw = {"small_batch": 4, "big_batch": 32, "num_estimates": 8, "num_bootstrap": 200}
    subs = _indexed(data, len(ids), 4, 32, 8, 0)

    def lm(m, b):
        return m(**b).loss

    ours, peer = _median_interleaved(
        [lambda: noise_scale(gpt2, data, **kw), lambda: _hand_loop(gpt2, subs, lm)], repeat
    )
    method = noise_scale(gpt2, data, **kw).method
    rows.append(
        row("noise_scale", "GPT-2 tiny, dict tensors, 64 sub-batches", ours, "hand loop", peer, note=method)
    )

    samples = [{"input_ids": t, "labels": t} for t in ids]
    loader = torch.utils.data.DataLoader(samples, batch_size=32, shuffle=True)

    def loader_subs():
        for _, b in zip(range(8), loader):
            yield [{k: v[j : j + 4] for k, v in b.items()} for j in range(0, 32, 4)]

    ours, peer = _median_interleaved(
        [lambda: noise_scale(gpt2, loader, **kw), lambda: _hand_loop(gpt2, loader_subs, lm)], repeat
    )
    method = noise_scale(gpt2, loader, **kw).method
    rows.append(
        row("noise_scale", "GPT-2 tiny, shuffled DataLoader (streamed)", ours, "hand loop", peer, note=method)
    )
    return rows


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(1)
    for r in main(quick=True):
        print(r)
