"""21x21 filter-normalized 2-D loss grid on the MNIST-1D test set (1000 samples): lrbs against loss-landscapes.

Rows, per model (``mlp``, ``cnn1d``), all in the same process on the same model and data:
- ``floor``: 441 bare forward passes + cross-entropy of the model on the 1000 samples (the least any tool can do);
- ``grid_sequential`` / ``grid_batched``: ``landscape_2d`` with ``Objective.loss_many``'s two paths
  (``metrics=("loss",)``), compared with loss-landscapes 3.0.6 ``random_plane(model, Loss(ce, x, y), distance=1,
  steps=21, normalization="filter", deepcopy_model=True)``; the note gives the ratio to the floor.

Targets (CPU): no slower than loss-landscapes, and the sequential path within 10% of the floor.
GFLOP counts the forward work (2 x multiply-adds of every Linear/Conv layer, measured with a hook).

On a GPU (``python -m bench landscape --device cuda``) model, data and directions live there for all three;
loss-landscapes draws its directions with ``torch.randn`` on the default device, so its call runs under
``with torch.device(cuda)`` (nothing else in it creates tensors). The batched path is also timed at several
chunk sizes ``K`` (points per ``vmap`` launch): ``grid_batched_K``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench import common
from bench.common import row, timeit
from lrbs.data import load_dataset
from lrbs.landscape import landscape_2d, random_direction
from lrbs.models import build_model
from lrbs.objective import Objective


def _forward_gflop(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-add FLOPs (x2) of Linear and Conv1d layers for one forward pass over ``x``."""
    total = [0.0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            total[0] += 2.0 * out.numel() * mod.in_features
        elif isinstance(mod, nn.Conv1d):
            total[0] += 2.0 * out.numel() * mod.in_channels * mod.kernel_size[0] / mod.groups

    hs = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total[0] / 1e9


def _case(name: str, ds, steps: int, repeat: int) -> list[dict]:
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    dev = common.device()
    x, y = ds.test.x.to(dev), ds.test.y.to(dev)
    points = steps * steps
    model = build_model(name, dataset=ds, seed=0).eval().to(dev)
    ce = nn.CrossEntropyLoss()
    gflop = _forward_gflop(model, x) * points
    obj = Objective(model, data=(x, y))
    d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)
    coords = np.linspace(-1, 1, steps)

    def floor():
        with torch.no_grad():
            for _ in range(points):
                float(ce(model(x), y))

    def peer():
        with torch.device(dev):  # its random directions are drawn on the default device
            return loss_landscapes.random_plane(
                model, Loss(ce, x, y), distance=1, steps=steps, normalization="filter", deepcopy_model=True
            )

    def ours(method, chunk=None):
        return lambda: landscape_2d(
            obj, d1, d2, coords, coords, metrics=("loss",), method=method, chunk=chunk
        )

    # round-robin: one run of each per repeat, so that load drift on a shared machine hits all alike
    fns = {"floor": floor, "peer": peer, "sequential": ours("sequential"), "batched": ours("batched")}
    chunks = (16, 64, 147, points) if dev.type == "cuda" else ()
    fns.update({f"batched_{k}": ours("batched", k) for k in chunks})
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            times[k].append(timeit(fn, repeat=1, warmup=0))
    t = {k: float(np.median(v)) for k, v in times.items()}
    rows = [
        row(
            "landscape_2d",
            f"{name} floor ({points} forwards)",
            t["floor"],
            gflop=gflop,
            note="bare forward + CE, the lower bound",
        )
    ]
    for method in ("sequential", "batched", *(f"batched_{k}" for k in chunks)):
        rows.append(
            row(
                "landscape_2d",
                f"{name} {steps}x{steps} {method}",
                t[method],
                "loss-landscapes 3.0.6",
                t["peer"],
                gflop=gflop,
                note=f"{t[method] / t['floor']:.2f}x floor",
            )
        )
    return rows


def main(quick: bool = False, device: torch.device | str | None = None) -> list[dict]:
    """Run the benchmark on ``device`` (default: the one ``python -m bench --device`` chose); return rows."""
    if device is not None:
        common.set_device(device)
    ds = load_dataset("mnist1d")
    steps = 11 if quick else 21
    repeat = 1 if quick else 3
    rows = []
    for name in ("mlp", "cnn1d"):
        rows += _case(name, ds, steps, repeat)
    return rows


if __name__ == "__main__":
    for r in main(quick=True):
        print(r)
