"""lrbs.integrations.transformers on a real transformers.Trainer (tiny GPT-2 from a config, CPU, accumulation 4)."""

from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from ddp_launch import torchrun  # noqa: E402

import lrbs  # noqa: E402
from lrbs.batches import MapSource  # noqa: E402
from lrbs.errors import ConfigError, DependencyError  # noqa: E402
from lrbs.integrations import transformers as lhf  # noqa: E402
from lrbs.integrations.measure import MeasurementWarning  # noqa: E402

transformers.logging.set_verbosity_error()

N, T, VOCAB = 128, 16, 64
ROOT = Path(__file__).resolve().parents[1]


class LMData(torch.utils.data.Dataset):
    """Sequences with a learnable rule (next = 3 tok + 1 mod 64, replaced by noise 30% of the time)."""

    def __init__(self, n: int = N, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        rows = [torch.randint(0, VOCAB, (n, 1), generator=g)]
        for _ in range(T - 1):
            noise = torch.randint(0, VOCAB, (n, 1), generator=g)
            rows.append(torch.where(torch.rand(n, 1, generator=g) < 0.3, noise, (rows[-1] * 3 + 1) % VOCAB))
        self.ids = torch.cat(rows, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return transformers.GPT2LMHeadModel(cfg)


def trainer(tmp, *, steps=40, lr=1e-3, accum=4, callback=None, data="default", **args):
    kw = dict(
        output_dir=str(tmp),
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accum,
        learning_rate=lr,
        report_to=[],
        logging_steps=10,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    kw.update(args)
    tr = transformers.Trainer(
        model=gpt2(),
        args=transformers.TrainingArguments(**kw),
        train_dataset=LMData() if data == "default" else data,
    )
    if callback is not None:
        lhf.attach(tr, callback)
    return tr


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def losses(tr) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["learning_rate"]) for r in tr.state.log_history if "loss" in r]


class Reporter(transformers.TrainerCallback):
    """Stands for a report_to integration (TensorBoard, W&B, ...): it logs the ``logs`` it is given in on_log."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


@pytest.fixture(scope="module")
def with_callback(tmp_path_factory):
    cb = lhf.LrbsCallback(sharpness_every=20, sharpness_samples=64)
    tr = trainer(tmp_path_factory.mktemp("cb"))
    reporter = Reporter()
    tr.add_callback(reporter)  # before ours, as the Trainer places report_to integrations
    lhf.attach(tr, cb)
    tr.train()
    tr.reporter = reporter
    return tr, cb


def test_log_history_has_finite_noise_scale_and_sharpness(with_callback):
    tr, cb = with_callback
    rows = [r for r in tr.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    for r in rows:
        assert math.isfinite(r["lrbs/b_simple"]) and r["lrbs/b_simple"] > 0
        assert r["lrbs/b_simple_low"] <= r["lrbs/b_simple"] <= r["lrbs/b_simple_high"]
        assert r["lrbs/grad_sq"] > 0 and r["lrbs/trace_sigma"] > 0
    sharp = [r for r in rows if "lrbs/lambda_max" in r]
    assert [r["step"] for r in sharp] == [20, 40]
    for r in sharp:
        assert math.isfinite(r["lrbs/lambda_max"]) and r["lrbs/lambda_max"] > 0
        assert "lrbs/eos_threshold" not in r  # AdamW: no threshold on the raw Hessian
    # lr * lambda_max with the LR the step used (the one the Trainer logs: linear decay from 1e-3 over 40 steps)
    for r in sharp:
        assert r["learning_rate"] == pytest.approx(1e-3 * (1 - (r["step"] - 1) / 40))
        assert r["lrbs/lambda_max_x_lr"] == pytest.approx(
            r["learning_rate"] * r["lrbs/lambda_max"], rel=1e-12
        )
    assert cb.summary().num_estimates == 40
    # attach put the callback first: what a report_to integration logs has the lrbs values too
    seen = [r for r in tr.reporter.seen if "loss" in r]
    assert [r["lrbs/b_simple"] for r in seen] == [r["lrbs/b_simple"] for r in rows]


def test_lambda_max_matches_arpack_on_the_same_subset(with_callback):
    """The last lambda_max (after step 40, final weights) against scipy's ARPACK on double-backward HVPs over the
    same seeded subset: 64 of the 128 sequences (torch.randperm with seed 0), mean loss."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    tr, _ = with_callback
    lam = [r["lrbs/lambda_max"] for r in tr.state.log_history if "lrbs/lambda_max" in r][-1]
    model = copy.deepcopy(tr.model).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:64]
    batch = {"input_ids": LMData().ids[idx], "labels": LMData().ids[idx]}
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # twice differentiable
        grads = torch.autograd.grad(model(**batch).loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])

    def hvp(v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            hv = torch.autograd.grad(flat, params, torch.from_numpy(v.ravel()), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    op = LinearOperator((flat.numel(), flat.numel()), matvec=hvp, dtype=np.float64)
    ref = eigsh(op, k=1, which="LA", tol=1e-8, v0=np.ones(flat.numel()))[0][0]
    assert lam == pytest.approx(ref, rel=1e-3)


def test_training_is_unchanged_by_the_callback(with_callback, tmp_path):
    tr, _ = with_callback
    plain = trainer(tmp_path)
    plain.train()
    assert losses(plain) == losses(tr)
    a, b = weights(plain.model), weights(tr.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def exact_noise_scale(model, data) -> tuple[float, float, float]:
    """tr(Sigma)/|G|^2 from all N per-sequence gradients in float64 (Sigma with 1/N, as noise_scale's c(B))."""
    m = copy.deepcopy(model).double().eval()
    params = [p for p in m.parameters() if p.requires_grad]
    rows = []
    for i in range(len(data)):
        b = {k: v[None] for k, v in data[i].items()}
        g = torch.autograd.grad(m(**b).loss, params)
        rows.append(torch.cat([x.reshape(-1) for x in g]))
    per = torch.stack(rows)
    mean = per.mean(0)
    trace = float(((per - mean) ** 2).sum(1).mean())
    grad_sq = float((mean**2).sum())
    return trace / grad_sq, grad_sq, trace


def exact_step_estimates(batches: list[list[torch.Tensor]]) -> np.ndarray:
    """Per step, ``(|G|^2, tr Sigma)`` from the float64 gradients of that step's micro-batches (every rank's):
    the two-batch-size estimator in closed form, without replacement from the N sequences (McCandlish et al.
    2018, App. A): E|g_B|^2 = |G|^2 + c(B) tr Sigma, c(B) = (N - B) / (B (N - 1)), at B = one micro-batch and B =
    all of them (their mean is the all-reduced, accumulated gradient: equal label items in every micro-batch)."""
    m = gpt2().double().train()  # no dropout: train mode is the function the Trainer differentiated
    params = [p for p in m.parameters() if p.requires_grad]

    def c(b: int) -> float:
        return (N - b) / (b * (N - 1))

    out = []
    for micro in batches:
        g = torch.stack(
            [
                torch.cat([x.reshape(-1) for x in torch.autograd.grad(m(input_ids=i, labels=i).loss, params)])
                for i in micro
            ]
        )
        small, big = float((g**2).sum(1).mean()), float((g.mean(0) ** 2).sum())
        bs, bb = len(micro[0]), sum(len(i) for i in micro)
        trace = (small - big) / (c(bs) - c(bb))
        out.append((big - c(bb) * trace, trace))
    return np.array(out)


def test_micro_batch_noise_scale_agrees_with_references(tmp_path):
    """At fixed weights (lr=0), 40 steps x 4 micro-batches of 8 give 40 estimates whose interval must hold the
    exact value (all 128 per-sequence gradients, float64) and lrbs.noise_scale's at B_s=8, B_b=32."""
    cb = lhf.LrbsCallback(window=1000)
    tr = trainer(tmp_path, lr=0.0, callback=cb)
    start = weights(tr.model)
    seen = []
    tr.model.register_forward_pre_hook(
        lambda mod, a, kw: seen.append(kw["input_ids"].clone()) if mod.training else None, with_kwargs=True
    )
    tr.train()
    assert all(torch.equal(v, start[k]) for k, v in weights(tr.model).items())  # weights really fixed
    s = cb.summary()
    assert s.num_estimates == 40 and s.source == "micro-batches"
    exact, _, _ = exact_noise_scale(tr.model, LMData())
    assert s.ci_low <= exact <= s.ci_high, (s, exact)
    ref = lrbs.noise_scale(
        tr.model, MapSource(LMData()), small_batch=8, big_batch=32, num_estimates=40, seed=1
    )
    assert s.ci_low <= ref.b_simple <= s.ci_high, (s, ref)
    # a wrong share (e.g. treating contributions as micro-batch gradients) would be off by far more than this
    assert s.b_simple == pytest.approx(exact, rel=0.15)
    # each step's |G|^2 and tr Sigma, against float64 on the same 4 micro-batches (GPT-2's loss sums 15 of the 16
    # labels of a sequence: shares counted over 16 would leave both 12% low)
    got = np.array([(g, t) for _, g, t in cb.window.rows])
    steps = [seen[4 * j : 4 * j + 4] for j in range(40)]
    np.testing.assert_allclose(got, exact_step_estimates(steps), rtol=1e-4)


class RaggedLM(torch.utils.data.Dataset):
    """LMData's sequences cut to 6..16 tokens, a fifth of their labels masked with -100."""

    def __init__(self, n: int = 64, seed: int = 0):
        self.ids = LMData(n, seed).ids
        g = torch.Generator().manual_seed(seed + 1)
        self.lengths = torch.randint(6, T + 1, (n,), generator=g).tolist()
        self.masked = torch.rand(n, T, generator=g) < 0.2

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = self.lengths[i]
        labels = self.ids[i, :n].clone()
        labels[self.masked[i, :n]] = -100
        return {"input_ids": self.ids[i, :n], "labels": labels}


def padder(fixed: bool):
    """Pads with label -100 (and token 0) to T tokens, or to the longest sequence of the micro-batch."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = T if fixed else max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r["input_ids"])], labels[j, : len(r["labels"])] = r["input_ids"], r["labels"]
        return {"input_ids": ids, "labels": labels}

    return collate


@pytest.mark.parametrize("pad", ["fixed", "longest", "fixed, counted each step"])
def test_label_item_shares_with_masked_and_ragged_labels(tmp_path, monkeypatch, pad):
    """Labels with -100 (masked tokens, padding) in micro-batches of one shape (counted for many steps at once),
    of several shapes (dynamic padding), or counted at once each step (a tiny label budget): every step's
    estimate equals micro_estimate on float64 contributions (n_i / num_items) g_i, with n_i counted here."""
    if pad.endswith("each step"):
        monkeypatch.setattr(lhf, "_HELD_LABELS", 1)
    cb = lhf.LrbsCallback(window=1000)
    kw = dict(output_dir=str(tmp_path), use_cpu=True, max_steps=8, per_device_train_batch_size=8)
    kw.update(gradient_accumulation_steps=4, learning_rate=0.0, report_to=[], logging_steps=4, seed=0)
    args = transformers.TrainingArguments(**kw, save_strategy="no", disable_tqdm=True)
    tr = transformers.Trainer(
        model=gpt2(), args=args, train_dataset=RaggedLM(), data_collator=padder(pad.startswith("fixed"))
    )
    lhf.attach(tr, cb)
    seen = []
    tr.model.register_forward_pre_hook(
        lambda mod, a, kw: (
            seen.append({k: v.clone() for k, v in kw.items() if torch.is_tensor(v)}) if mod.training else None
        ),
        with_kwargs=True,
    )
    tr.train()
    m = gpt2().double().train()
    params = [p for p in m.parameters() if p.requires_grad]
    want, equal = [], []
    for j in range(8):
        micro = seen[4 * j : 4 * j + 4]
        num_items = float(micro[-1]["num_items_in_batch"])
        counts = [sum(x != -100 for row in b["labels"].tolist() for x in row[1:]) for b in micro]
        shares = [c / num_items for c in counts]
        grads = [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(m(input_ids=b["input_ids"], labels=b["labels"]).loss, params)
                ]
            )
            for b in micro
        ]
        contrib = [s * g for s, g in zip(shares, grads)]
        total = float(sum(contrib).square().sum())
        sq = [float(c @ c) for c in contrib]
        want.append(lrbs.integrations.measure.micro_estimate(sq, [8] * 4, shares, total, num_samples=64))
        equal.append(
            lrbs.integrations.measure.micro_estimate(
                [q / s**2 / 16 for q, s in zip(sq, shares)], [8] * 4, [0.25] * 4, total, num_samples=64
            )
        )
    got = np.array([(g, t) for _, g, t in cb.window.rows])
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.abs(np.array(equal) / np.array(want) - 1).max() > 1e-2  # the shares matter here


@pytest.mark.parametrize("held", ["train", "other"])
def test_probe_when_there_is_no_accumulation(tmp_path, held):
    cb = lhf.LrbsCallback(probe_data="train" if held == "train" else LMData(seed=1), probe_draws=2)
    tr = trainer(tmp_path, steps=10, accum=1, callback=cb, logging_steps=5)
    tr.train()
    rows = [r for r in tr.state.log_history if "lrbs/b_simple" in r]
    assert [r["step"] for r in rows] == [5, 10]
    assert all(math.isfinite(r["lrbs/b_simple"]) and r["lrbs/probe_seconds"] > 0 for r in rows)
    assert cb.summary().source == "probe"


def test_find_lr_then_train_equals_train_at_that_lr(tmp_path, untouched):
    a = trainer(tmp_path / "a", steps=12, logging_steps=2)
    rng = torch.get_rng_state()
    check = untouched(a.model)
    res = lhf.find_lr(a, num_iter=20, start_lr=1e-5, end_lr=1.0, apply=True)
    check()
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.optimizer is None  # built for the sweep, not kept
    lr = res.settings["applied"]["lr"]
    assert a.args.learning_rate == lr and 1e-5 < lr < 1.0
    assert res.settings["applied"]["where"] == ["trainer.args.learning_rate"]
    assert res.settings["accumulation_steps"] == 4
    a.train()
    b = trainer(tmp_path / "b", steps=12, logging_steps=2, lr=lr)
    b.train()
    assert losses(a) == losses(b)
    wa, wb = weights(a.model), weights(b.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_failed_measurement_warns_and_training_goes_on(tmp_path):
    def broken(model, batch):
        raise RuntimeError("no loss today")

    cb = lhf.LrbsCallback(sharpness_every=5, compute_loss=broken)
    tr = trainer(tmp_path, steps=10, callback=cb)
    with pytest.warns(MeasurementWarning, match=r"sharpness measurement at step 5 failed .*no loss today"):
        tr.train()
    assert tr.state.global_step == 10
    assert any("lrbs/b_simple" in r for r in tr.state.log_history)  # the rest still measured


# --------------------------------------------------------------------------------------------- data parallel
@pytest.mark.slow
def test_ddp_per_rank_noise_scale_agrees_with_exact(tmp_path):
    """torchrun, 2 gloo ranks, a real Trainer at lr=0 with accumulation 2, then 1: every step's estimate, from
    each rank's local micro-batch gradients (read before DDP's all-reduce) against the all-reduced one, equals
    the float64 two-batch-size estimator on the same micro-batches (B_s = 8, B_b = 8 x accumulation x 2)."""
    script = Path(__file__).parent / "ddp_scripts" / "integrations_transformers_ddp.py"
    torchrun(script, str(tmp_path), "2", "1")
    start = weights(gpt2())
    for accum in (2, 1):
        ranks = [torch.load(tmp_path / f"rank{r}_accum{accum}.pt", weights_only=False) for r in range(2)]
        r0, r1 = ranks
        assert r0["world"] == 2 and r0["source"] == "micro-batches"
        assert all(torch.equal(r0["weights"][k], start[k]) for k in start)  # lr = 0: the weights did not move
        assert r0["rows"] == r1["rows"] and [r[0] for r in r0["rows"]] == list(range(1, 21))
        rows = [r for r in r0["log_history"] if "loss" in r]
        assert [r["step"] for r in rows] == [10, 20]
        assert all(math.isfinite(r["lrbs/b_simple"]) and r["lrbs/b_simple"] > 0 for r in rows)
        per_step = [[rk["batches"][j * accum + i] for rk in ranks for i in range(accum)] for j in range(20)]
        exact = exact_step_estimates(per_step)
        got = np.array([(g, t) for _, g, t in r0["rows"]])
        # float32 training gradients against float64 (measured: within 5e-7): a wrong share, world factor or a
        # local (not all-reduced) total is off by 10% or more (reading the total before the all-reduce: 190%)
        np.testing.assert_allclose(got, exact, rtol=1e-4, err_msg=f"accumulation {accum}")


# --------------------------------------------------------------------------------------------- bad inputs
def test_find_lr_without_train_dataset(tmp_path):
    tr = trainer(tmp_path, data=None)
    with pytest.raises(ConfigError, match=r"train_dataset is None"):
        lhf.find_lr(tr)


def test_accumulation_one_without_probe_data(tmp_path):
    tr = trainer(tmp_path, steps=2, accum=1, callback=lhf.LrbsCallback())
    with pytest.raises(ConfigError, match=r"gradient accumulation 1 on 1 process.*probe_data="):
        tr.train()


def test_frozen_model(tmp_path):
    tr = trainer(tmp_path)
    for p in tr.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"no trainable parameters"):
        lhf.find_lr(tr)
    cb = lhf.LrbsCallback()
    loader = torch.utils.data.DataLoader(LMData(), batch_size=8)
    with pytest.raises(ConfigError, match=r"no trainable parameters"):
        cb.on_train_begin(tr.args, tr.state, tr.control, model=tr.model, train_dataloader=loader)


@pytest.mark.parametrize("kw", [{"sharpness_every": 0}, {"log_every": -1}, {"sharpness_every": 2.5}])
def test_cadence_below_one(kw):
    name = next(iter(kw))
    with pytest.raises(ConfigError, match=rf"{name}=.* is not allowed: must be an integer >= 1"):
        lhf.LrbsCallback(**kw)


def test_old_transformers(monkeypatch):
    # sys.modules, not the name imported above: transformers swaps its lazy module on first attribute import
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.30.2")
    with pytest.raises(DependencyError, match=r"needs transformers >= 4\.40, found transformers 4\.30\.2"):
        lhf.LrbsCallback()
    with pytest.raises(DependencyError, match=r"found transformers 4\.30\.2"):
        lhf.find_lr(object())


# --------------------------------------------------------------------------------------------- README
def readme_section(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, f"README has no section {heading!r}"
    return m.group(1)


def readme_example(framework: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme_section("Train with HuggingFace or Lightning"), re.S)
    return next(b for b in blocks if f"lrbs.integrations.{framework}" in b)


def test_readme_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.random.seed(0)
    exec(compile(readme_example("transformers"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"B_simple = [0-9.]+", out) and "lambda_max" in out
