"""Run under torchrun (2 gloo processes): a lightning.Trainer with DDP, accumulation 2 and LrbsCallback at lr=0.

Rank 0 writes ``summary.json`` (the callback's noise-scale summary) and ``weights.pt`` (the fixed weights) to the
directory given as the first argument. Used by tests/test_integrations_lightning.py.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_integrations_lightning import Net, dataset  # noqa: E402

from lrbs.integrations.lightning import LrbsCallback  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0, verbose=False)
    model = Net(lr=0.0, momentum=0.0)
    cb = LrbsCallback(window=1000, log_every=1000)
    trainer = L.Trainer(
        max_steps=60,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        accumulate_grad_batches=2,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(dataset(), batch_size=16, shuffle=True)
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        (out / "summary.json").write_text(json.dumps(cb.summary().to_dict()))
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out / "weights.pt")
