"""``lrbs tune``: bad inputs give one line and exit status 2; a run prints the table and writes the files."""

from __future__ import annotations

import json

import pytest

from lrbs.cli import main

BLOBS = ["--dataset", "blobs", "--dataset-opts", '{"n_train": 512, "n_test": 128, "num_features": 8}',
         "--model", "mlp", "--model-opts", '{"depth": 2, "width": 16}', "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(
    "args, match",
    [
        ([], "give exactly one of budget_epochs= and budget_samples="),
        (["--budget-epochs", "1", "--budget-samples", "100"], "give exactly one of budget_epochs"),
        (["--budget-epochs", "0"], "budget_epochs=0.0 is not allowed"),
        (["--budget-samples", "-5"], "budget_samples=-5 is not allowed"),
        (["--budget-epochs", "1", "--max-batch-size", "0"], "max_batch_size=0 is not allowed"),
        (
            ["--budget-epochs", "1", "--max-batch-size", "100000"],
            r"max_batch_size=100000 is not allowed: .*<= 512",
        ),
        (["--budget-epochs", "1", "--optimizer", "sgdd"], "unknown optimizer 'sgdd'. Did you mean 'sgd'"),
        (["--budget-epochs", "1", "--batch-sizes", "64,32"], r"strictly increasing \(32 follows 64\)"),
        (
            ["--budget-epochs", "1", "--batch-sizes", "16,a"],
            "--batch-sizes: must be comma-separated integers",
        ),
        (["--budget-epochs", "1", "--precision", "16-mixed"], "needs a CUDA GPU"),
    ],
)
def test_bad_inputs_one_line_exit_2(capsys, args, match):
    import re

    assert main(["tune", *BLOBS, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert "Traceback" not in err


def test_tune_run_prints_the_table_and_writes_json(capsys, tmp_path):
    evidence = tmp_path / "tune.json"
    args = ["tune", *BLOBS, "--budget-samples", "24000", "--batch-sizes", "16,32", "--json", str(evidence)]
    assert main(args) == 0  # the HTML report itself is checked in tests/test_tune.py
    out = capsys.readouterr().out
    data = json.loads(evidence.read_text())
    assert "lrbs tune: recommendation" in out and "learning rate" in out
    assert data["batch_size"] in (16, 32) and data["lr"] > 0 and data["confidence"] in ("high", "low")
    assert data["evidence"]["cost"]["samples"] > 0


def test_tune_on_own_model_and_data_then_train(capsys, tmp_path, monkeypatch):
    (tmp_path / "tune_own.py").write_text(
        "import torch\n"
        "def model():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(256, 6, generator=g)\n"
        "    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["tune", "--model", "tune_own:model", "--data", "tune_own:data", "--budget-samples", "512",
            "--batch-sizes", "16,32", "--train", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lrbs tune: recommendation" in out and "trained: completed" in out
    bad = ["tune", "--model", "tune_own:nope", "--data", "tune_own:data", "--budget-samples", "512"]
    assert main(bad) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err
