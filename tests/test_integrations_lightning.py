"""lrbs.integrations.lightning on a real lightning.Trainer (a small LightningModule, CPU, accumulation 4)."""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.pytorch.loggers import Logger  # noqa: E402

import lrbs  # noqa: E402
from lrbs.errors import ConfigError, DependencyError  # noqa: E402
from lrbs.integrations import lightning as lpl  # noqa: E402
from lrbs.integrations.measure import MeasurementWarning  # noqa: E402

N, D, C, BATCH = 512, 10, 3, 16
ROOT = Path(__file__).resolve().parents[1]


class Net(L.LightningModule):
    def __init__(self, lr: float = 0.05, momentum: float = 0.9):
        super().__init__()
        self.lr, self.momentum = lr, momentum
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(), torch.nn.Linear(32, C))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class Memory(Logger):
    """An in-memory logger: every ``log_metrics`` call, in order."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name = "memory"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = (x @ torch.randn(D, C, generator=g) + 0.8 * torch.randn(N, C, generator=g)).argmax(1)
    return torch.utils.data.TensorDataset(x, y)


def loader(seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset(), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def trainer(*, steps=40, accum=4, callbacks=(), logger=None) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=accum,
        callbacks=list(callbacks),
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(model, *, callbacks=(), logger=None, steps=40, accum=4, data=None):
    L.seed_everything(0, verbose=False)
    tr = trainer(steps=steps, accum=accum, callbacks=callbacks, logger=logger)
    tr.fit(model, data if data is not None else loader())
    return tr


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def with_callback():
    cb = lpl.LrbsCallback(sharpness_every=10, sharpness_samples=128, log_every=10)
    mem = Memory()
    model = Net()
    tr = fit(model, callbacks=[cb], logger=mem)
    model.callback_metrics = dict(tr.callback_metrics)
    return model, cb, mem


def test_logger_gets_finite_noise_scale_and_sharpness(with_callback):
    model, cb, mem = with_callback
    rows = [(s, m) for s, m in mem.rows if "lrbs/b_simple" in m]
    assert [s for s, _ in rows] == [10, 20, 30, 40]
    for _, m in rows:
        assert math.isfinite(m["lrbs/b_simple"]) and m["lrbs/b_simple"] > 0
        assert m["lrbs/b_simple_low"] <= m["lrbs/b_simple"] <= m["lrbs/b_simple_high"]
        assert math.isfinite(m["lrbs/lambda_max"]) and m["lrbs/lambda_max"] > 0
        assert m["lrbs/lambda_max_x_lr"] == pytest.approx(0.05 * m["lrbs/lambda_max"])
        assert m["lrbs/eos_threshold"] == pytest.approx(2 * 1.9)  # heavy ball, beta = 0.9
    assert cb.summary().num_estimates == 40
    last = rows[-1][1]
    assert float(model.callback_metrics["lrbs/b_simple"]) == pytest.approx(last["lrbs/b_simple"], rel=1e-6)


def test_lambda_max_matches_dense_hessian(with_callback):
    """The last lambda_max (after step 40) against eigvalsh of the dense float64 Hessian on the same subset."""
    model, _, mem = with_callback
    lam = [m["lrbs/lambda_max"] for _, m in mem.rows if "lrbs/lambda_max" in m][-1]
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:128]
    x, y = (t[idx] for t in dataset().tensors)
    net = model.net.double()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(th):
        parts = torch.split(th, [int(np.prod(s)) for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        out = torch.func.functional_call(net, params, (x.double(),))
        return torch.nn.functional.cross_entropy(out, y)

    dense = torch.func.hessian(loss)(theta)
    net.float()
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-4)


def test_training_is_unchanged_by_the_callback(with_callback):
    model, _, _ = with_callback
    plain = Net()
    fit(plain)
    a, b = weights(plain), weights(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def exact_noise_scale(model) -> float:
    """tr(Sigma)/|G|^2 from all N per-example gradients in float64 (Sigma with 1/N, as noise_scale's c(B))."""
    net = model.net.double()
    x, y = (t for t in dataset().tensors)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def one(p, xi, yi):
        out = torch.func.functional_call(net, p, (xi[None].double(),))
        return torch.nn.functional.cross_entropy(out, yi[None])

    g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    per = torch.cat([v.reshape(N, -1) for v in g.values()], 1)
    net.float()
    mean = per.mean(0)
    return float(((per - mean) ** 2).sum(1).mean() / (mean**2).sum())


def test_micro_batch_noise_scale_agrees_with_references():
    """At fixed weights (lr=0), 60 steps x 4 micro-batches of 16: the interval holds the exact value and
    lrbs.noise_scale's estimate at B_s=16, B_b=64."""
    cb = lpl.LrbsCallback(window=1000, log_every=60)
    model = Net(lr=0.0, momentum=0.0)
    start = weights(model)
    fit(model, callbacks=[cb], steps=60)
    assert all(torch.equal(v, start[k]) for k, v in weights(model).items())
    s = cb.summary()
    assert s.num_estimates == 60
    exact = exact_noise_scale(model)
    assert s.ci_low <= exact <= s.ci_high, (s, exact)
    ref = lrbs.noise_scale(model.net, dataset(), small_batch=16, big_batch=64, num_estimates=60, seed=1)
    assert s.ci_low <= ref.b_simple <= s.ci_high, (s, ref)
    assert s.b_simple == pytest.approx(exact, rel=0.2)


@pytest.mark.parametrize("held", ["train", "loader"])
def test_probe_when_there_is_no_accumulation(held):
    data = "train" if held == "train" else torch.utils.data.DataLoader(dataset(), batch_size=64, shuffle=True)
    cb = lpl.LrbsCallback(probe_data=data, probe_draws=2, log_every=5)
    fit(Net(), callbacks=[cb], steps=10, accum=1)
    assert [h["step"] for h in cb.history] == [5, 10]
    assert all(math.isfinite(h["lrbs/b_simple"]) and h["lrbs/probe_seconds"] > 0 for h in cb.history)
    assert cb.summary().source == "probe"


def test_find_lr_then_fit_equals_fit_at_that_lr(untouched):
    model, data = Net(), loader()
    check = untouched(model)
    rng, gen = torch.get_rng_state(), data.generator.get_state()
    res = lpl.find_lr(trainer(steps=8), model, data, num_iter=20, start_lr=1e-4, end_lr=10.0, apply=True)
    model.lr = 0.05
    check()  # parameters, buffers, grads, flags
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(data.generator.get_state(), gen)
    applied = res.settings["applied"]
    lr = applied["lr"]
    assert applied["where"] == ["model.lr"] and applied["optimizer_lr"] == pytest.approx(lr)
    assert res.settings["accumulation_steps"] == 4
    model.lr = lr
    mem_a, mem_b = Memory(), Memory()
    fit(model, logger=mem_a, steps=8, data=data)
    other = Net(lr=lr)
    fit(other, logger=mem_b, steps=8, data=loader())
    assert mem_a.rows == mem_b.rows
    wa, wb = weights(model), weights(other)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_find_lr_warns_when_it_cannot_apply():
    class NoLr(Net):
        def __init__(self):
            super().__init__()
            del self.lr

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    with pytest.warns(MeasurementWarning, match=r"was not written: NoLr has no lr or learning_rate"):
        res = lpl.find_lr(trainer(), NoLr(), loader(), num_iter=20, start_lr=1e-4, end_lr=1.0, apply=True)
    assert res.settings["applied"] is None and len(res.lrs) > 0  # the result is kept


def test_find_lr_keeps_the_result_when_it_cannot_recommend():
    with pytest.warns(
        MeasurementWarning, match=r"no learning rate was written \(the range test recorded only"
    ):
        res = lpl.find_lr(trainer(), Net(), loader(), num_iter=10, start_lr=1.0, end_lr=1e4, apply=True)
    assert res.settings["applied"] is None and res.stopped_early


def test_a_failed_measurement_warns_and_training_goes_on():
    def broken(module, batch):
        raise RuntimeError("no loss today")

    cb = lpl.LrbsCallback(sharpness_every=5, log_every=5, compute_loss=broken)
    with pytest.warns(MeasurementWarning, match=r"sharpness measurement at step 5 failed .*no loss today"):
        tr = fit(Net(), callbacks=[cb], steps=10)
    assert tr.global_step == 10
    assert all("lrbs/b_simple" in h for h in cb.history)


# --------------------------------------------------------------------------------------------- bad inputs
def test_find_lr_without_training_data():
    with pytest.raises(ConfigError, match=r"find_lr has no training data"):
        lpl.find_lr(trainer(), Net())


def test_accumulation_one_without_probe_data():
    with pytest.raises(ConfigError, match=r"gradient accumulation 1 on 1 process.*probe_data="):
        fit(Net(), callbacks=[lpl.LrbsCallback()], steps=2, accum=1)


def test_frozen_model():
    model = Net()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"no trainable parameters"):
        lpl.find_lr(trainer(), model, loader())
    stub = types.SimpleNamespace(
        train_dataloader=loader(), accumulate_grad_batches=4, world_size=1, log_every_n_steps=10
    )
    with pytest.raises(ConfigError, match=r"no trainable parameters"):
        lpl.LrbsCallback().on_train_start(stub, model)


@pytest.mark.parametrize("kw", [{"sharpness_every": 0}, {"log_every": 0}, {"sharpness_every": "10"}])
def test_cadence_below_one(kw):
    name = next(iter(kw))
    with pytest.raises(ConfigError, match=rf"{name}=.* is not allowed: must be an integer >= 1"):
        lpl.LrbsCallback(**kw)


def test_old_lightning(monkeypatch):
    monkeypatch.setattr(sys.modules["lightning"], "__version__", "2.1.4")
    with pytest.raises(DependencyError, match=r"needs lightning >= 2\.2, found lightning 2\.1\.4"):
        lpl.LrbsCallback()
    with pytest.raises(DependencyError, match=r"found lightning 2\.1\.4"):
        lpl.find_lr(None, Net())


# --------------------------------------------------------------------------------------------- README
def readme_example(framework: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Train with HuggingFace or Lightning\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "README has no section 'Train with HuggingFace or Lightning'"
    blocks = re.findall(r"```python\n(.*?)```", m.group(1), re.S)
    return next(b for b in blocks if f"lrbs.integrations.{framework}" in b)


def test_readme_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example("lightning"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"B_simple = [0-9.]+", out) and "lambda_max" in out


# --------------------------------------------------------------------------------------------- data parallel
@pytest.mark.slow
def test_ddp_per_rank_noise_scale_agrees_with_exact(tmp_path):
    """2 gloo ranks x accumulation 2 x 16 samples at lr=0: every rank's micro-batches against the all-reduced
    gradient (B_s = 16, B_b = 64); the interval over 60 steps holds the exact value at those weights."""
    import json

    from ddp_launch import torchrun

    torchrun(Path(__file__).parent / "ddp_scripts" / "integrations_lightning_ddp.py", str(tmp_path))
    s = json.loads((tmp_path / "summary.json").read_text())
    model = Net(lr=0.0, momentum=0.0)
    start = weights(model)
    fixed = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert all(torch.equal(fixed[k], start[k]) for k in start)  # lr = 0: the weights did not move
    exact = exact_noise_scale(model)
    assert s["num_estimates"] == 60 and s["source"] == "micro-batches"
    assert s["ci_low"] <= exact <= s["ci_high"], (s, exact)


class SparseNet(L.LightningModule):
    """An embedding with sparse gradients: norms the capture cannot take in one piece."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 4, sparse=True)
        self.out = torch.nn.Linear(4, C)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return torch.nn.functional.cross_entropy(self.out(self.emb(ids)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_backward_the_hooks_cannot_read_warns_and_training_goes_on():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 20, (64,), generator=g), torch.randint(0, C, (64,), generator=g)
    )
    model = SparseNet()
    reference = SparseNet()
    reference.load_state_dict(model.state_dict())
    with pytest.warns(MeasurementWarning, match=r"reading the gradient norms failed"):
        fit(
            model,
            callbacks=[lpl.LrbsCallback(log_every=2)],
            steps=4,
            data=torch.utils.data.DataLoader(data, 8),
        )
    fit(reference, steps=4, data=torch.utils.data.DataLoader(data, 8))
    a, b = weights(model), weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)  # trained exactly as without the callback
