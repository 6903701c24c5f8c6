"""Run under torchrun (2 gloo processes, CPU): a transformers.Trainer (tiny GPT-2) with DDP and LrbsCallback at lr=0.

Arguments: the output directory and one or more gradient accumulations (one training run each, in one process
group). For each, every rank writes ``rank{r}_accum{k}.pt``: the input ids of each training micro-batch it ran, in
order, and the callback's per-step ``(step, |G|^2, tr Sigma)`` estimates; rank 0 also writes ``log_history`` and
the (fixed) weights. Used by tests/test_integrations_transformers.py.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_integrations_transformers import trainer  # noqa: E402

from lrbs.integrations.transformers import LrbsCallback  # noqa: E402


def run(out: Path, accum: int) -> None:
    cb = LrbsCallback(window=1000)
    tr = trainer(out / f"run{accum}", steps=20, lr=0.0, accum=accum, callback=cb, ddp_backend="gloo")
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            seen.append(kwargs["input_ids"].detach().clone())

    tr.model.register_forward_pre_hook(record, with_kwargs=True)
    tr.train()
    rank = tr.args.process_index
    result = {
        "world": tr.args.world_size,
        "batches": seen,
        "rows": list(cb.window.rows),
        "source": cb.summary().source,
    }
    if rank == 0:
        result["log_history"] = tr.state.log_history
        result["weights"] = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    torch.save(result, out / f"rank{rank}_accum{accum}.pt")


if __name__ == "__main__":
    for k in sys.argv[2:]:
        run(Path(sys.argv[1]), int(k))
