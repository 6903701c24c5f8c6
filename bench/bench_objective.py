"""The Objective on a HuggingFace model: full-data loss, gradient and HVP against a hand-written loop.

Case: ``GPT2LMHeadModel(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)`` (built from its config, no
download) on 4 dict batches ``{"input_ids", "labels"}`` of 8 sequences of 32 tokens, float32, on the benchmark
device.

- ``loss``: ``Objective.loss()`` vs the hand loop ``sum_b n_b model(**b).loss / N`` under ``no_grad``;
- ``grad``: ``Objective.grad()`` (functional, on the private copy) vs ``zero_grad``, forward, ``backward`` of
  ``n_b L_b / N`` per batch on the live model;
- ``hvp/grad``: ``Objective.hvp(theta, v)`` with the method the rule picks (reverse-over-reverse on the cached
  gradient graph on CPU: the steady state of Lanczos, one graph for many products) against the *hand* gradient:
  issue 13 asks for at most 3x; also the first HVP at a new point (building the graph included) and
  forward-over-reverse (``torch.func.jvp`` of ``grad``, the CUDA rule).

Runs are interleaved (ours, peer, ours, ...) and the median of each is reported.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import device as bench_device
from bench.common import row, sync


def _median_interleaved(fns, repeat: int) -> list[float]:
    times = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _setup(dev: torch.device):
    import transformers

    from lrbs.objective import Objective

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(dev)
    ids = torch.randint(0, 64, (32, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    batches = [{"input_ids": ids[i : i + 8], "labels": ids[i : i + 8]} for i in range(0, 32, 8)]
    return model, batches, Objective(model, data=batches)


def main(quick: bool = False, device: torch.device | None = None) -> list[dict]:
    dev = device or bench_device()
    model, batches, obj = _setup(dev)
    n = sum(len(b["labels"]) for b in batches)
    params = [p for p in model.parameters() if p.requires_grad]
    repeat = 5 if quick else 15

    def hand_loss():
        with torch.no_grad():
            return sum(float(model(**b).loss) * len(b["labels"]) for b in batches) / n

    def hand_grad():
        model.zero_grad(set_to_none=True)
        for b in batches:
            (model(**b).loss * (len(b["labels"]) / n)).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    theta = obj.theta()
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(1)).to(dev)
    method = obj.settings()["hvp_method"]
    cached, fresh = obj.at(theta), obj.at(theta)  # each keeps its own gradient graph
    shift = [0]

    def hvp_fresh():  # a new point each call: the gradient graph is rebuilt
        shift[0] += 1
        return fresh.hvp(theta + 1e-6 * shift[0], v)

    t_loss, h_loss, t_grad, h_grad, t_hvp, t_fresh, t_fr = _median_interleaved(
        [
            obj.loss,
            hand_loss,
            obj.grad,
            hand_grad,
            lambda: cached.hvp(theta, v),
            hvp_fresh,
            lambda: obj.hvp(theta, v, method="fwd_rev"),
        ],
        repeat,
    )
    model.zero_grad(set_to_none=True)
    case = "GPT-2 tiny, 4 dict batches x 8 x 32 tokens"
    return [
        row("objective", f"{case}: loss", t_loss, "hand loop", h_loss),
        row("objective", f"{case}: grad", t_grad, "hand loop", h_grad),
        row("objective", f"{case}: hvp ({method}, cached graph) / hand grad", t_hvp, "hand grad", h_grad),
        row("objective", f"{case}: hvp ({method}, new point) / hand grad", t_fresh, "hand grad", h_grad),
        row("objective", f"{case}: hvp (fwd_rev) / hand grad", t_fr, "hand grad", h_grad),
    ]


if __name__ == "__main__":
    for r in main():
        print(r)
