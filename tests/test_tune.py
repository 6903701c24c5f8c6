"""lrbs.tune: bad inputs, the low-confidence paths, untouched state, resume, the report, and the acceptance runs.

The acceptance numbers (the 4 LR x 3 batch grid on MNIST-1D, its best cell, the margin and the cost ratio) are
measured in ``bench/bench_tune.py`` and recorded in bench/RESULTS.md; the slow test here re-trains the
recommendation and the grid's best cell with the same seed and budget, and checks the margin (1.5 points) and
the cost ratio (tune's samples through forward + backward <= 1/4 of the grid's 12 x budget).
"""

from __future__ import annotations

import inspect
import json
import random

import numpy as np
import pytest
import torch

from lrbs.data import load_dataset
from lrbs.errors import ConfigError, LrbsTypeError
from lrbs.models import build_model
from lrbs.report.html import read_report_data
from lrbs.tune import Recommendation, tune


@pytest.fixture
def small():
    return load_dataset("blobs", n_train=512, n_test=128, num_features=8, num_classes=3, seed=0)


def _mlp(ds, seed=0):
    return build_model("mlp", dataset=ds, depth=2, width=16, seed=seed)


# --------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of budget_epochs= and budget_samples="),
        ({"budget_epochs": 1, "budget_samples": 100}, "exactly one of budget_epochs"),
        ({"budget_epochs": 0}, "budget_epochs=0 is not allowed"),
        ({"budget_epochs": -2.0}, "budget_epochs=-2.0 is not allowed"),
        ({"budget_samples": 0}, "budget_samples=0 is not allowed"),
        ({"budget_epochs": 1, "max_batch_size": 0}, r"max_batch_size=0 is not allowed: .*<= 512"),
        ({"budget_epochs": 1, "max_batch_size": 513}, r"max_batch_size=513 is not allowed: .*<= 512"),
        ({"budget_epochs": 1, "optimizer": "adma"}, "unknown optimizer 'adma'. Did you mean 'adam'"),
        ({"budget_epochs": 1, "batch_sizes": [32, 16]}, r"strictly increasing \(16 follows 32\)"),
        ({"budget_epochs": 1, "batch_sizes": [16, 16]}, "strictly increasing"),
        ({"budget_epochs": 1, "batch_sizes": []}, r"batch_sizes=\[\] is not allowed"),
        ({"budget_epochs": 1, "precision": "64"}, "precision='64' is not allowed"),
        ({"budget_epochs": 1, "precision": "16-mixed"}, "needs a CUDA GPU"),
    ],
)
def test_bad_inputs_are_config_errors(small, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tune(_mlp(small), small, progress=False, **kwargs)


def test_bad_types(small):
    model = _mlp(small)
    with pytest.raises(LrbsTypeError, match="model=str is not allowed"):
        tune("net", small, budget_epochs=1, progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(LrbsTypeError, match="tune builds its own optimizers"):
        tune(model, small, optimizer=opt, budget_epochs=1, progress=False)
    with pytest.raises(LrbsTypeError, match=r"batch_sizes\[1\]='x' is not allowed"):
        tune(model, small, budget_epochs=1, batch_sizes=[8, "x"], progress=False)


# --------------------------------------------------------------------------------------------- a normal run
@pytest.fixture(scope="module")
def blobs_rec():
    ds = load_dataset("blobs", n_train=512, n_test=128, num_features=8, num_classes=3, seed=0)
    return ds, tune(_mlp(ds), ds, budget_epochs=60, progress=False)


def test_recommendation_is_consistent(blobs_rec):
    ds, rec = blobs_rec
    assert isinstance(rec, Recommendation)
    ev = rec.evidence
    ladder = [r["batch_size"] for r in ev["throughput"]["ladder"]]
    assert rec.batch_size in ladder and ladder == sorted(ladder) and ladder[0] == 32
    assert rec.total_steps == 60 * 512 // rec.batch_size
    # the schedule peaks at the recommended LR, at the end of the warmup
    values = rec.schedule.values(rec.total_steps)
    assert values.max() == pytest.approx(rec.lr, rel=1e-9)
    assert int(np.argmax(values)) in (rec.warmup_steps - 1, rec.warmup_steps)
    # the LR is the range test's recommendation, read back from the stored curve; scaled by the linear rule (SGD)
    # when the range test ran at a smaller batch than the chosen one (here: its cost would exceed half the budget)
    from lrbs.tune import range_result_from_dict

    rt_batch = ev["range_test"]["batch_size"]
    lr0 = range_result_from_dict(ev["range_test"]["result"]).recommended()[0]
    if rt_batch == rec.batch_size:
        assert rec.lr == lr0 and ev["schedule"]["family"] == "one-cycle"
    else:
        assert 300 * rec.batch_size > 0.5 * 60 * 512 >= 300 * rt_batch
        assert rec.lr == pytest.approx(lr0 * rec.batch_size / rt_batch, rel=1e-12)
        assert ev["schedule"]["scaling_rule"] == "linear" and rec.schedule(0) == pytest.approx(lr0)
    # the critical-batch bound holds when it is the one that bound the batch
    if ev["batch"]["bound"] == "critical batch":
        assert rec.batch_size <= 0.25 * ev["noise_scale"]["b_crit"] or rec.batch_size == ladder[0]
    # cost: each step's samples add up, and the evidence is JSON
    assert ev["cost"]["samples"] == sum(ev["cost"]["per_step"].values()) > 0
    json.dumps(rec.to_dict(), allow_nan=True)
    kw = rec.fit_kwargs()
    assert kw["batch_size"] == rec.batch_size and kw["steps"] == rec.total_steps and kw["lr"] is rec.schedule


def test_table_and_report(blobs_rec, tmp_path):
    from rich.console import Console

    _, rec = blobs_rec
    console = Console(record=True, width=160)
    console.print(rec.table())
    text = console.export_text()
    assert "learning rate" in text and f"{rec.batch_size}" in text
    path = rec.report(tmp_path / "tune.html")
    html = path.read_text()
    assert (
        html.count('<img src="data:image/svg+xml;base64,') == 4
    )  # range test, noise scale, ladder, trade-off
    assert "http://" not in html.replace("http://www.w3.org", "") and "<script src" not in html
    data = read_report_data(html)
    assert data["batch_size"] == rec.batch_size and data["lr"] == pytest.approx(rec.lr)


def test_untouched_model_and_random_state(small, untouched):
    model = _mlp(small)
    check = untouched(model)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    tune(model, small, budget_samples=24000, batch_sizes=[16, 32], progress=False)
    check()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_adam_schedule_and_callable_optimizer(small):
    rec = tune(
        _mlp(small), small, optimizer="adam", budget_samples=24000, batch_sizes=[16, 32], progress=False
    )
    assert rec.evidence["schedule"]["family"] == "warmup + cosine"
    assert rec.warmup_steps == min(2000, rec.total_steps // 10)
    assert rec.schedule(rec.warmup_steps) == pytest.approx(rec.lr)
    rec2 = tune(
        _mlp(small),
        small,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.99)),
        budget_samples=24000,
        batch_sizes=[16, 32],
        progress=False,
    )
    assert rec2.evidence["settings"]["family"] == "adam"
    assert rec2.warmup_steps == min(200, rec2.total_steps // 10)  # 2 / (1 - 0.99)
    assert rec2.momentum is None  # a callable optimizer keeps its own


def test_resumes_from_store(small, tmp_path):
    from lrbs.store import Store

    with Store(tmp_path / "lab.sqlite") as store:
        a = tune(_mlp(small), small, budget_samples=24000, batch_sizes=[16, 32], store=store, progress=False)
        b = tune(_mlp(small), small, budget_samples=24000, batch_sizes=[16, 32], store=store, progress=False)
        assert a.evidence["cost"]["resumed_steps"] == []
        assert set(b.evidence["cost"]["resumed_steps"]) == {
            "throughput",
            "base_range_test",
            "noise_scale",
            "range_test",
        }
        assert (b.lr, b.batch_size, b.warmup_steps) == (a.lr, a.batch_size, a.warmup_steps)
        assert len(store.runs(kind="tune")) == 4
        # another model (other weights) is another tune
        c = tune(
            _mlp(small, seed=1),
            small,
            budget_samples=24000,
            batch_sizes=[16, 32],
            store=store,
            progress=False,
        )
        assert c.evidence["cost"]["resumed_steps"] == []


# --------------------------------------------------------------------------------------------- low confidence
class _Exploding(torch.nn.Module):
    """A model whose loss is not finite at any learning rate."""

    def __init__(self, d: int, c: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, c)

    def forward(self, x):
        return self.lin(x) * float("inf")


def test_diverges_at_every_lr_is_low_confidence(small):
    rec = tune(_Exploding(8, 3), small, budget_samples=4000, batch_sizes=[16, 32], progress=False)
    assert rec.confidence == "low"
    assert any("diverged at every learning rate" in r for r in rec.reasons)
    assert rec.lr == pytest.approx(1e-6)  # the lowest LR tried, said so
    assert rec.table() is not None


def test_dataset_smaller_than_smallest_batch(untouched):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    model = build_model("mlp", input_shape=(8,), num_classes=3, depth=2, width=16, seed=0)
    check = untouched(model)
    rec = tune(model, (x, y), budget_epochs=50, progress=False)
    check()
    assert rec.batch_size == 10 and rec.confidence == "low"
    assert any("fewer than the smallest batch 32" in r for r in rec.reasons)
    assert any("noise scale was not measured" in r for r in rec.reasons)


def test_budget_too_small_for_noise_scale(small):
    from lrbs.train import fit

    rec = tune(_mlp(small), small, budget_samples=300, progress=False)
    assert rec.confidence == "low"
    assert any("budget of 300 samples is too small" in r for r in rec.reasons)
    res = fit(_mlp(small), small, **rec.fit_kwargs())
    assert res.status == "completed" and res.history["samples"][-1] <= 300


# --------------------------------------------------------------------------------------------- study Figure 1
def test_study_range_test_figure_is_clipped_and_marked():
    from lrbs.papers.smith2017cyclical import _range_test_figure

    lrs = np.geomspace(1e-5, 10, 100)
    loss = 2.3 - 0.8 / (1 + np.exp(-4 * (np.log10(lrs) + 1.5)))
    loss[-8:] = np.geomspace(3, 1800, 8)  # the divergence spike
    from lrbs.range_test import smooth_losses

    sm = smooth_losses(loss)
    stop = int(np.argmax(sm > 4 * np.minimum.accumulate(sm)))
    n = stop + 1
    rt = {"diverged_at": float(lrs[stop]), "arrays": {"lrs": lrs[:n], "losses": loss[:n], "smoothed": sm[:n]}}
    fig = _range_test_figure(rt, 0.01, 0.001, 0.1)
    ax = fig.axes[0]
    assert ax.get_ylim()[1] < 3.0  # not up to the spike
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lbl.startswith("recommended") for lbl in labels) and any(
        lbl.startswith("valley") for lbl in labels
    )


# --------------------------------------------------------------------------------------------- acceptance
# The grid's best cells, from bench/bench_tune.py (recorded in bench/RESULTS.md): 20 epochs, seed 0.
BEST_CELL = {"sgd": (32, 0.1), "adam": (32, 0.03)}


def _grid_cell(ds, optimizer, batch, lr, epochs):
    from lrbs.schedules import cosine, one_cycle, one_cycle_momentum, warmup
    from lrbs.train import fit

    steps = epochs * len(ds.train.y) // batch
    if optimizer == "sgd":
        kw = {"lr": one_cycle(lr, steps), "momentum": one_cycle_momentum(steps)}
    else:
        w = min(2000, steps // 10)
        kw = {"lr": warmup(cosine(lr, steps - w), w), "momentum": 0.9}
    model = build_model("cnn1d", dataset=ds, seed=0)
    return fit(model, ds, optimizer=optimizer, batch_size=batch, steps=steps, seed=0, eval_every=steps, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mnist1d_recommendation_matches_best_grid_cell(mnist1d, optimizer):
    from lrbs.train import fit

    epochs = 20
    rec = tune(build_model("cnn1d", dataset=mnist1d, seed=0), mnist1d, optimizer=optimizer, budget_epochs=epochs,
               progress=False)  # fmt: skip
    grid_samples = 12 * epochs * len(mnist1d.train.y)
    assert rec.evidence["cost"]["samples"] <= grid_samples / 4
    ours = fit(build_model("cnn1d", dataset=mnist1d, seed=0), mnist1d, seed=0, **rec.fit_kwargs())
    best = _grid_cell(mnist1d, optimizer, *BEST_CELL[optimizer], epochs)
    margin = best.final["test_acc"] - ours.final["test_acc"]
    print(f"{optimizer}: tune B={rec.batch_size} lr={rec.lr:.3g} acc={ours.final['test_acc']:.4f}; best cell "
          f"{BEST_CELL[optimizer]} acc={best.final['test_acc']:.4f}; margin {100 * margin:.2f} points; cost "
          f"{rec.evidence['cost']['samples'] / grid_samples:.3f} of the grid")  # fmt: skip
    assert margin <= 0.015


# --------------------------------------------------------------------------------------------- tiny GPT-2
def _batch_protocol_ready() -> bool:
    """fit, lr_range_test and noise_scale on the batch protocol of #13 (compute_loss= in their signatures)."""
    from lrbs.noise_scale import noise_scale
    from lrbs.range_test import lr_range_test
    from lrbs.train import fit

    return all("compute_loss" in inspect.signature(f).parameters for f in (fit, lr_range_test, noise_scale))


@pytest.mark.slow
@pytest.mark.skipif(
    not _batch_protocol_ready(), reason="fit / lr_range_test / noise_scale on dict batches (#13)"
)
def test_tiny_gpt2_end_to_end(untouched):
    transformers = pytest.importorskip("transformers")
    from lrbs.train import fit

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 64, (512, 1), generator=g)
    ids = (base + torch.arange(16)) % 64  # learnable: each token is the previous one + 1
    data = {"input_ids": ids, "labels": ids}
    check = untouched(model)
    rec = tune(model, data, optimizer="adamw", budget_samples=200 * 16, batch_sizes=[8, 16], progress=False)
    check()
    assert rec.batch_size in (8, 16) and rec.lr > 0
    kw = rec.fit_kwargs()
    kw["steps"] = 200
    res = fit(transformers.GPT2LMHeadModel(cfg), data, **kw)
    loss = np.asarray(res.history["loss"])
    assert res.status == "completed" and loss[-20:].mean() < 0.8 * loss[:20].mean()


def test_dataloader_keeps_its_batch_size(small, untouched):
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(small.train.x, small.train.y),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    model = _mlp(small)
    check = untouched(model)
    state = loader.generator.get_state()
    rec = tune(model, loader, budget_epochs=3, progress=False)
    check()
    assert torch.equal(loader.generator.get_state(), state)
    assert rec.batch_size == 32 and rec.total_steps == 3 * 512 // 32
    assert [r["batch_size"] for r in rec.evidence["throughput"]["ladder"]] == [32]


@pytest.mark.parametrize("limit", [64, 8])
def test_out_of_memory_ends_the_ladder_or_accumulates(small, monkeypatch, limit):
    """A batch above ``limit`` raises torch.OutOfMemoryError (as CUDA would): the ladder ends there; when not even
    the first rung fits, the batch is accumulated from the largest micro-batch that does."""
    import importlib

    tune_mod = importlib.import_module("lrbs.tune")  # the module (lrbs.tune the attribute is the function)
    real = tune_mod._time_batch

    def fake(ctx, rig, b):
        if b > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(ctx, rig, b)

    monkeypatch.setattr(tune_mod, "_time_batch", fake)
    rec = tune(_mlp(small), small, budget_samples=24000, batch_sizes=[16, 32, 64, 128], progress=False)
    ladder = rec.evidence["throughput"]["ladder"]
    assert ladder[-1]["fits"] is False and "out of memory" in rec.evidence["throughput"]["stop"]
    if limit == 64:
        assert rec.batch_size <= 64 and rec.accumulation_steps == 1
    else:
        assert (rec.batch_size, rec.accumulation_steps, rec.micro_batch_size) == (16, 2, 8)
        assert rec.fit_kwargs()["max_micro_batch"] == 8
        assert rec.evidence["range_test"]["result"]["settings"]["accumulation_steps"] == 2
