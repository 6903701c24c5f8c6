"""Unit tests of the batch protocol (lrbs.batches): how a batch becomes a loss, where batches come from, and every
bad input's message."""

from __future__ import annotations

import random
from collections import namedtuple

import numpy as np
import pytest
import torch
import zoo_thirdparty as Z
from torch import nn

from lrbs.batches import (
    BatchLoss,
    BatchStream,
    LoaderSource,
    MapSource,
    ModelCallError,
    TensorSource,
    as_source,
    batch_size_of,
    batch_tensors,
    cast_floating,
    collect_batches,
    describe_batch,
    index_batch,
    seeded_rng,
    slice_batch,
    to_device,
)
from lrbs.data import Split
from lrbs.errors import ConfigError, LrbsError, LrbsTypeError, ShapeError
from lrbs.objective import Objective

FIXES = r"loss_fn=.*compute_loss="


def _xy(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class Out:
    """A ModelOutput-like object: attributes ``loss`` and ``logits``."""

    def __init__(self, loss=None, logits=None):
        self.loss, self.logits = loss, logits


# ----------------------------------------------------------------------------------------------- structure helpers
def test_structure_helpers():
    x, y = _xy()
    batch = {"a": x, "b": [y, {"c": x[:, 0]}], "note": "text"}
    assert [t.shape for t in batch_tensors(batch)] == [x.shape, y.shape, (10,)]
    assert batch_size_of(batch) == 10 and batch_size_of((torch.tensor(3.0), y)) == 1
    half = slice_batch(batch, 2, 5)
    assert (
        torch.equal(half["a"], x[2:5])
        and torch.equal(half["b"][1]["c"], x[2:5, 0])
        and half["note"] == "text"
    )
    idx = torch.tensor([4, 0])
    assert torch.equal(index_batch((x, y), idx)[1], y[idx])
    cast = cast_floating((x, y), torch.float64)
    assert cast[0].dtype == torch.float64 and cast[1].dtype == torch.int64  # labels and ids keep their dtype
    P = namedtuple("P", "x y")
    moved = to_device(P(x, y), "cpu")
    assert isinstance(moved, P) and moved.x is x  # already there: not copied
    assert describe_batch({"input_ids": x, "labels": y}) == "dict with keys ['input_ids', 'labels']"
    assert describe_batch((x, y)) == "tuple of 2: [(10, 6), (10,)]"
    assert describe_batch("text") == "str"


# ----------------------------------------------------------------------------------------------- batch -> loss
def test_tuple_batches_call_the_model_with_every_input():
    x, meta, y = Z.two_input_data(8)
    model = Z.two_input()
    ev = BatchLoss().evaluate(model, (x, meta, y))
    with torch.no_grad():
        ref = nn.functional.cross_entropy(model(x, meta), y)
    assert torch.allclose(ev.loss, ref, rtol=0, atol=0) and ev.weight == 8.0
    assert torch.equal(ev.output, model(x, meta))
    args, kwargs, target = BatchLoss().split([x, meta, y])  # lists too
    assert len(args) == 2 and kwargs == {} and target is y
    mse = BatchLoss(loss_fn=lambda out, t: (out.sum(1) - t.float()).pow(2).mean())
    with torch.no_grad():
        got = float(mse.loss(model, (x, meta, y)))
        assert got == pytest.approx(float((model(x, meta).sum(1) - y).pow(2).mean()))


def test_mapping_batches_take_the_models_own_loss():
    x, y = _xy()
    batch = {"x": x, "y": y}
    loss = torch.tensor(1.5)
    assert BatchLoss().loss(lambda **kw: Out(loss=loss), batch) is loss  # output.loss (HF ModelOutput)
    assert BatchLoss().loss(lambda **kw: {"loss": loss, "logits": x}, batch) is loss  # output["loss"]
    parts = {"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(0.25)}
    assert float(BatchLoss().loss(lambda **kw: parts, batch)) == 1.25  # a dict of scalar losses: their sum
    seen = {}

    def model(**kw):
        seen.update(kw)
        return Out(logits=x)

    custom = BatchLoss(loss_fn=lambda out, b: out.logits.sum() * 0 + len(b["y"]))
    assert float(custom.loss(model, batch)) == 10.0 and set(seen) == {"x", "y"}  # model(**batch)


def test_compute_loss_takes_any_batch():
    model = Z.mlp()
    x, y = _xy()

    def compute_loss(m, batch):
        return nn.functional.cross_entropy(m(batch["inputs"][0]), batch["target"])

    ev = BatchLoss(compute_loss=compute_loss).evaluate(model, {"inputs": [x], "target": y})
    assert ev.output is None and ev.weight == 10.0
    with torch.no_grad():
        assert float(ev.loss) == pytest.approx(float(nn.functional.cross_entropy(model(x), y)))


def test_weights_and_accuracy():
    x, y = _xy()
    bl = BatchLoss(batch_weight=lambda b: int((b[1] > 0).sum()))
    assert bl.weight((x, y)) == float((y > 0).sum())
    logits = torch.randn(10, 3)
    assert int(BatchLoss().correct(logits, (x, y))) == int((logits.argmax(1) == y).sum())
    assert int(BatchLoss().correct(Out(logits=logits), {"x": x, "labels": y})) == int(
        (logits.argmax(1) == y).sum()
    )
    assert BatchLoss().correct(torch.randn(10), (x, y)) is None  # not (N, C) logits
    assert BatchLoss().correct(logits, (x, y.float())) is None  # float targets: regression
    assert BatchLoss().correct(torch.randn(10, 4, 3), {"labels": torch.zeros(10, 4).long()}) is None  # an LM
    assert BatchLoss().correct(None, (x, y)) is None  # compute_loss has no output


# ----------------------------------------------------------------------------------------------- bad batches and losses
def test_unreadable_batches_name_the_type_and_both_fixes():
    model = Z.mlp()
    with pytest.raises(LrbsTypeError, match=r"batch of type str: .*" + FIXES):
        Objective(model, data=["some text", "more text"])
    with pytest.raises(
        LrbsTypeError, match=r"batch of type dict with keys \['ids', 'meta'\]: it holds no tensor.*" + FIXES
    ):
        Objective(model, data=[{"ids": [1, 2], "meta": {"lang": "en"}}])
    with pytest.raises(LrbsTypeError, match=r"tuple of 1.*at least \(x, y\).*" + FIXES):
        BatchLoss().split((torch.zeros(2, 6),))
    with pytest.raises(
        LrbsTypeError,
        match=r"batch of type Tensor of shape \(2, 6\): it is neither a tuple nor a "
        r"mapping.*" + FIXES,
    ):
        BatchLoss().split(torch.zeros(2, 6))


def test_a_mapping_whose_output_has_no_loss():
    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x, y):
            return {"logits": self.lin(x)}

    x, y = _xy()
    with pytest.raises(
        LrbsTypeError,
        match=r"output \(dict with keys \['logits'\]\) on a batch of type dict with keys \['x', 'y'\] has no loss.*"
        + FIXES,
    ) as err:
        Objective(NoLoss(), data={"x": x, "y": y})
    assert isinstance(err.value, LrbsError)
    # either fix works
    fixed = Objective(
        NoLoss(), lambda out, b: nn.functional.cross_entropy(out["logits"], b["y"]), {"x": x, "y": y}
    )
    assert np.isfinite(fixed.loss())


def test_a_model_that_raises_is_reported_with_the_call():
    x, meta, y = Z.two_input_data(8)
    with pytest.raises(ModelCallError, match=r"the model raised TypeError: .* — call was model\(\(8, 6\)\)"):
        Objective(Z.two_input(), data=(x, y))  # forgot meta: forward(x) misses an argument

    class Ids(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(Z.VOCAB, 3)

        def forward(self, input_ids, labels=None):
            return {"loss": self.emb(input_ids).mean()}

    batches = [{"input_ids": b["input_ids"], "labelz": b["labels"]} for b in Z.lm_batches()]
    with pytest.raises(
        ModelCallError,
        match=r"unexpected keyword argument 'labelz' — call was model\(\*\*batch\) with keys "
        r"\['input_ids', 'labelz'\] \(input_ids: \(4, 8\), labelz: \(4, 8\)\)",
    ):
        Objective(Ids(), data=batches)
    # an HF model takes the misspelt key silently, and then has no loss: the same one error with both fixes
    with pytest.raises(
        LrbsTypeError,
        match=r"output \(CausalLMOutputWithCrossAttentions with keys \['logits', .*\]\) on a batch of type dict "
        r"with keys \['input_ids', 'labelz'\] has no loss.*" + FIXES,
    ):
        Objective(Z.tiny_gpt2(), data=batches)
    with pytest.raises(ModelCallError, match=r"call was model\(\(8, 6\), \(8, 3\)\)"):
        Objective(Z.mlp(), data=(x, meta, y))  # an mlp given two inputs


def test_compute_loss_must_return_a_scalar_tensor():
    x, y = _xy()
    with pytest.raises(ShapeError, match=r"compute_loss must return a scalar .*shape \(10,\)"):
        Objective(Z.mlp(), data=(x, y), compute_loss=lambda m, b: (m(b[0]) ** 2).mean(1))
    with pytest.raises(
        LrbsTypeError, match=r"compute_loss returned float: must return a scalar torch.Tensor"
    ):
        Objective(Z.mlp(), data=(x, y), compute_loss=lambda m, b: 1.0)
    with pytest.raises(ModelCallError, match=r"compute_loss raised TypeError: .*batch of type tuple of 2"):
        Objective(Z.mlp(), data=(x, y), compute_loss=lambda m, b: b["x"])


def test_bad_loss_arguments():
    with pytest.raises(ConfigError, match=r"give loss_fn= or compute_loss=, not both"):
        BatchLoss(loss_fn=lambda o, t: o, compute_loss=lambda m, b: m)
    with pytest.raises(LrbsTypeError, match=r"loss_fn='mse' is not allowed: must be a callable"):
        BatchLoss(loss_fn="mse")
    with pytest.raises(ConfigError, match=r"batch_weight returned -1.0 .*finite number >= 0"):
        BatchLoss(batch_weight=lambda b: -1).weight(_xy())
    with pytest.raises(ConfigError, match=r"weights sum to 0.0"):
        Objective(Z.mlp(), data=_xy(), batch_weight=lambda b: 0)


def test_empty_data():
    x, y = _xy()
    with pytest.raises(ConfigError, match=r"data is empty: TensorDataset has no samples"):
        as_source(torch.utils.data.TensorDataset(x[:0], y[:0]))
    with pytest.raises(ConfigError, match=r"data is empty: DataLoader has no samples"):
        as_source(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]), batch_size=4))
    with pytest.raises(ConfigError, match=r"data is empty: list has no samples"):
        Objective(Z.mlp(), data=[])
    with pytest.raises(ConfigError, match=r"data is empty: the loader yielded no batches"):
        Objective(Z.mlp(), data=Z.Stream(n=0))
    with pytest.raises(ConfigError, match=r"data=None is not allowed"):
        as_source(None)
    with pytest.raises(LrbsTypeError, match=r"data=int is not allowed: give an lrbs Dataset"):
        as_source(3)


# ----------------------------------------------------------------------------------------------- sources
def test_as_source_kinds():
    x, y = _xy()
    assert isinstance(as_source(Split(x, y)), TensorSource)
    assert isinstance(as_source(torch.utils.data.TensorDataset(x, y)), TensorSource)
    assert as_source({"x": x, "y": y}).keys == ["x", "y"]
    assert isinstance(as_source(Z.Flipped()), MapSource)  # has .x/.y but transforms its items
    assert isinstance(as_source(torch.utils.data.Subset(Split(x, y), [0, 2])), MapSource)
    assert isinstance(as_source(Z.Stream()), LoaderSource)
    assert isinstance(as_source([(x, y)]), LoaderSource)
    with pytest.raises(ConfigError, match=r"different lengths \[9, 10\]"):
        as_source((x, y[:9]))


def test_stream_order_is_the_seeded_permutation():
    x, y = _xy(10)
    stream = BatchStream(as_source((x, y)), 4, torch.device("cpu"), seed=3)
    got = torch.cat([stream.next()[1] for _ in range(5)])  # 20 samples: two epochs, batches spanning them
    g = torch.Generator().manual_seed(3)
    order = torch.cat([torch.randperm(10, generator=g), torch.randperm(10, generator=g)])
    assert torch.equal(got, y[order])


def test_loader_stream_cycles_and_restores_the_loaders_generator():
    x, y = _xy(10)
    g = torch.Generator().manual_seed(5)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=5, shuffle=True, generator=g
    )
    before = g.get_state()
    stream = BatchStream(as_source(loader), None, torch.device("cpu"), seed=1)
    first = [stream.next()[1] for _ in range(3)]  # two batches, then the loader again
    stream.close()
    assert torch.equal(g.get_state(), before)
    assert sorted(torch.cat(first[:2]).tolist()) == sorted(y.tolist())


def test_collect_batches_subset_rule_and_limits():
    x, y = _xy(10)
    got = collect_batches(as_source((x, y)), batch_size=3, max_samples=7, seed=2)
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(2))[:7]
    assert [len(b[1]) for b in got] == [3, 3, 1]
    assert torch.equal(torch.cat([b[1] for b in got]), y[idx])
    loader = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]
    trimmed = collect_batches(as_source(loader), batch_size=None, max_samples=6)
    assert [len(b[1]) for b in trimmed] == [4, 2]
    unsized = collect_batches(
        as_source(Z.Stream(n=40), batch_size=8), batch_size=None, max_samples=None, max_unsized=20
    )
    assert sum(len(b[1]) for b in unsized) == 20


def test_random_transforms_are_seeded_and_the_rng_restored():
    src = as_source(Z.Flipped())
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    a = collect_batches(src, batch_size=8, max_samples=None, seed=0)
    b = collect_batches(src, batch_size=8, max_samples=None, seed=0)
    c = collect_batches(src, batch_size=8, max_samples=None, seed=1)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    with seeded_rng(4):
        r1 = torch.rand(3)
    with seeded_rng(4):
        assert torch.equal(torch.rand(3), r1)
