"""Launched by tests/test_distributed.py under ``torchrun --nproc-per-node 2``: DDP training, results to OUT.

Usage: ``python -m torch.distributed.run --nproc-per-node 2 ddp_step.py OUT CONFIG_JSON``

Rank 0 writes, for each case, ``OUT/<case>.json`` (history, final, config) and ``OUT/<case>.safetensors``:
``step1`` and ``step3`` (1 and 3 steps of the config), ``rule`` (1 step with lr halved and
``lr_rule="linear", base_batch_size=batch_size/2``: the LR must be scaled by the GLOBAL batch), and ``store``
(3 steps written to ``OUT/lab.sqlite`` by rank 0 only).
"""

import json
import sys
from pathlib import Path

import torch

from lrbs.distributed import ddp_train, init_process_group


def main() -> None:
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    rank, world, _ = init_process_group()
    cases = {
        "step1": ({**cfg, "steps": 1}, {}),
        "step3": ({**cfg, "steps": 3}, {}),
        "rule": (
            {**cfg, "steps": 1, "lr": cfg["lr"] / 2},
            {"lr_rule": "linear", "base_batch_size": cfg["batch_size"] // 2},
        ),
        "store": ({**cfg, "steps": 3}, {"store": str(out / "lab.sqlite")}),
    }
    for name, (config, kw) in cases.items():
        model, res = ddp_train(config, return_model=True, **kw)
        if rank == 0:
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().contiguous() for k, v in model.state_dict().items()},
                str(out / f"{name}.safetensors"),
            )
            hist = {k: [float(x) for x in v] for k, v in res.history.items()}
            (out / f"{name}.json").write_text(
                json.dumps(
                    {
                        "world": world,
                        "status": res.status,
                        "history": hist,
                        "final": res.final,
                        "evals": res.evals,
                        "config": res.config,
                    }
                )
            )


if __name__ == "__main__":
    main()
