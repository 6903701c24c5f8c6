"""The Objective and the analyses on it, on the models and data users bring (issue 13).

Each case is a model, a data source in the form users hold it, and an independent hand-written loss of one batch.
References: a hand-written loop over the same batches (sample-weighted mean) and a dense float64 Hessian of a
hand-written full-data loss (``torch.autograd.functional.hessian`` of ``functional_call`` on a float64 copy of the
model).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import zoo_thirdparty as Z
from torch import nn
from torch.func import functional_call

from lrbs.connectivity import linear_path
from lrbs.curvature import hessian_eigenvalues, hessian_trace
from lrbs.errors import LrbsTypeError
from lrbs.landscape import landscape_2d
from lrbs.objective import Objective, second_order_context
from lrbs.sharpness import keskar_sharpness

pytest.importorskip("transformers")


def _ce(call, batch):
    *xs, y = batch
    return nn.functional.cross_entropy(call(*xs), y)


def _slices(tensors, b):
    n = len(tensors[0])
    return [tuple(t[i : i + b] for t in tensors) for i in range(0, n, b)]


def _flipped_batches(b=16):
    """The map-style dataset's batches as documented: samples in order, transforms under torch.manual_seed(0)."""
    ds = Z.Flipped()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        items = [ds[i] for i in range(len(ds))]
    return [torch.utils.data.default_collate(items[i : i + b]) for i in range(0, len(items), b)]


def case(name):
    """``(model, data, Objective kwargs, the batches the Objective must see, hand loss(call, batch))``."""
    x, meta, y = Z.two_input_data()
    if name == "gpt2":
        return Z.tiny_gpt2(), Z.lm_batches(), {}, Z.lm_batches(), lambda call, b: call(**b).loss
    if name == "gpt2_loader":
        loader = torch.utils.data.DataLoader(Z.DictDataset(Z.lm_batches()), batch_size=4)
        return Z.tiny_gpt2(), loader, {}, Z.lm_batches(), lambda call, b: call(**b).loss
    if name == "gpt2_f64":  # float64 loss on the logits: a dense-Hessian reference to 1e-10
        return (
            Z.tiny_gpt2(),
            Z.lm_batches(),
            {"loss_fn": Z.lm_loss},
            Z.lm_batches(),
            lambda c, b: Z.lm_loss(c(**b), b),
        )
    if name == "bert":
        return Z.tiny_bert(), Z.cls_batches(), {}, Z.cls_batches(), lambda call, b: call(**b).loss
    if name == "bert_f64":
        data = Z.cls_batches()
        return (
            Z.tiny_bert(),
            data,
            {"loss_fn": Z.cls_loss},
            Z.cls_batches(),
            lambda c, b: Z.cls_loss(c(**b), b),
        )
    if name == "two_input":
        return Z.two_input(), (x, meta, y), {"batch_size": 16}, _slices((x, meta, y), 16), _ce
    if name == "dict_loss":
        data = Z.dict_loss_data()
        hand = _slices((data["x"], data["y"]), 16)
        hand = [{"x": a, "y": b} for a, b in hand]
        return Z.dict_loss(), data, {"batch_size": 16}, hand, lambda call, b: sum(call(**b).values())
    if name == "tensor_dataset":
        return Z.mlp(), Z.tensor_dataset(), {"batch_size": 16}, _slices((x, y), 16), _ce
    if name == "iterable":
        return Z.mlp(), Z.Stream(), {"batch_size": 16}, _slices((x, y), 16), _ce
    if name == "transform":
        return Z.mlp(), Z.Flipped(), {"batch_size": 16}, _flipped_batches(16), _ce
    if name == "compute_loss":

        def compute_loss(model, batch):  # a loss the protocol cannot infer: CE plus a logit penalty
            out = model(batch[0])
            return nn.functional.cross_entropy(out, batch[1]) + 0.05 * out.pow(2).mean()

        hand = lambda call, b: compute_loss(call, b)  # noqa: E731
        return (
            Z.mlp(),
            Z.tensor_dataset(),
            {"batch_size": 16, "compute_loss": compute_loss},
            _slices((x, y), 16),
            hand,
        )
    raise KeyError(name)


ALL = [
    "gpt2",
    "gpt2_loader",
    "bert",
    "two_input",
    "dict_loss",
    "tensor_dataset",
    "iterable",
    "transform",
    "compute_loss",
]
EXACT = ["gpt2_f64", "bert_f64", "two_input", "dict_loss", "transform", "compute_loss"]


def _rtol(name):
    """HF's own loss upcasts the logits to float32 whatever the model's dtype: float32 agreement there."""
    return 1e-6 if name in ("gpt2", "gpt2_loader", "bert") else 1e-12


def _module_call(model):
    return lambda *a, **k: model(*a, **k)


def _size(batch):
    """Samples in a batch: the labels' length for HF dicts, else the first tensor's."""
    if isinstance(batch, dict):
        return len(batch["labels"] if "labels" in batch else next(iter(batch.values())))
    return len(batch[0])


def hand_loss(model, batches, loss):
    """Sample-weighted mean of the hand loss over the batches, accumulated in Python floats."""
    with torch.no_grad():
        total = sum(float(loss(_module_call(model), b)) * _size(b) for b in batches)
    return total / sum(_size(b) for b in batches)


def _double(batches):
    return [
        {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
        if isinstance(b, dict)
        else tuple(t.double() if t.is_floating_point() else t for t in b)
        for b in batches
    ]


def dense_hessian(model, batches, loss):
    """Dense float64 Hessian of the hand-written full-data loss at the model's parameters."""
    m = copy.deepcopy(model).double()
    named = [(k, p) for k, p in m.named_parameters() if p.requires_grad]
    names, shapes = [k for k, _ in named], [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    batches = _double(batches)
    n = sum(_size(b) for b in batches)

    def f(t):
        parts = torch.split(t, [s.numel() for s in shapes])
        params = {k: p.view(s) for k, p, s in zip(names, parts, shapes)}
        call = lambda *a, **k: functional_call(m, params, a, k)  # noqa: E731
        return sum(loss(call, b) * _size(b) for b in batches) / n

    # Reverse-over-reverse with batched rows (vectorize=True). Not torch.func.hessian: on these HF models its
    # vmapped jacfwd/jacrev gives an asymmetric matrix (|H - H^T| ~ 3e-3, torch 2.13), while the row-by-row
    # autograd Hessian and this one agree to roundoff.
    with second_order_context():
        H = torch.autograd.functional.hessian(f, theta, vectorize=True)
    assert float((H - H.T).abs().max()) <= 1e-12 * float(H.abs().max())  # a sound reference
    return names, H


_DENSE: dict[str, tuple] = {}


def dense(name):
    if name not in _DENSE:
        model, _, _, batches, loss = case(name)
        _DENSE[name] = dense_hessian(model, batches, loss)
    return _DENSE[name]


# ----------------------------------------------------------------------------------------------- full-data values
@pytest.mark.parametrize("name", ALL)
def test_loss_equals_a_hand_loop_over_the_same_batches(name, untouched):
    model, data, kw, batches, loss = case(name)
    check = untouched(model)
    rng = torch.get_rng_state()
    obj = Objective(model, data=data, dtype=torch.float64, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # collecting a random transform's batches: RNG restored
    ref = hand_loss(copy.deepcopy(model).double(), _double(batches), loss)
    rtol = _rtol(name)
    assert obj.loss() == pytest.approx(ref, rel=rtol)
    assert obj.num_samples == sum(_size(b) for b in batches)
    assert obj.batch_weights == [float(_size(b)) for b in batches]
    many = obj.loss_many(torch.stack([obj.theta(), obj.theta()]))
    assert many["loss"] == pytest.approx([ref, ref], rel=rtol)
    check()


def test_accuracy_where_defined_and_absent_elsewhere():
    bert = Objective(Z.tiny_bert(), data=Z.cls_batches(), dtype=torch.float64)
    m = copy.deepcopy(Z.tiny_bert()).double()
    with torch.no_grad():
        hits = sum(int((m(**b).logits.argmax(-1) == b["labels"]).sum()) for b in Z.cls_batches())
    assert bert.has_accuracy and bert.metrics()["accuracy"] == hits / 12
    gpt2 = Objective(Z.tiny_gpt2(), data=Z.lm_batches())
    assert (
        not gpt2.has_accuracy and gpt2.metrics()["accuracy"] is None
    )  # (N, T, V) logits: not classification
    assert np.isnan(gpt2.loss_many(gpt2.theta()[None])["accuracy"]).all()
    dl = Objective(Z.dict_loss(), data=Z.dict_loss_data())
    assert dl.metrics()["accuracy"] is None  # a dict of losses has no logits


def test_token_weights_give_the_token_mean():
    batches = Z.lm_batches()
    batches[0]["labels"][:, 5:] = -100  # ignored positions: this batch counts fewer tokens

    def tokens(b):
        return int((b["labels"][:, 1:] != -100).sum())

    obj = Objective(Z.tiny_gpt2(), Z.lm_loss, batches, batch_weight=tokens, dtype=torch.float64)
    m = copy.deepcopy(Z.tiny_gpt2()).double()
    with torch.no_grad():
        logits = torch.cat([m(**b).logits[:, :-1] for b in batches]).reshape(-1, Z.VOCAB)
        labels = torch.cat([b["labels"][:, 1:] for b in batches]).reshape(-1)
        ref = float(nn.functional.cross_entropy(logits, labels))  # the mean over all counted tokens
    assert obj.batch_weights == [float(tokens(b)) for b in batches]
    assert obj.loss() == pytest.approx(ref, rel=1e-12)


# ----------------------------------------------------------------------------------------------- curvature
@pytest.mark.parametrize("name", EXACT)
def test_hessian_eigenvalues_equal_the_dense_float64_hessian(name, untouched):
    model, data, kw, _, _ = case(name)
    check = untouched(model)
    names, H = dense(name)
    obj = Objective(model, data=data, dtype=torch.float64, **kw)
    assert obj.param_names == tuple(names)
    ev = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    res = hessian_eigenvalues(obj, k=2, tol=1e-9, tol_on="residual")
    np.testing.assert_allclose(res.values, ev, rtol=1e-7, atol=1e-9 * abs(ev[0]))
    assert res.settings["hvp_method"] == "rev_rev"  # by rule on CPU, and recorded
    check()


@pytest.mark.parametrize("name", ["two_input", "dict_loss", "compute_loss"])
def test_hessian_trace_is_exact_when_the_sketch_spans_everything(name):
    """Hutch++ with ``m // 3 >= n`` sketch probes takes the trace on the whole space: exact up to roundoff."""
    model, data, kw, _, _ = case(name)
    _, H = dense(name)
    obj = Objective(model, data=data, dtype=torch.float64, **kw)
    res = hessian_trace(obj, method="hutch++", num_hvps=3 * obj.num_params)
    assert res.value == pytest.approx(float(H.trace()), rel=1e-9)


@pytest.mark.parametrize("name", ["gpt2_f64", "bert_f64"])
def test_hessian_trace_of_hf_models_within_its_error_bar(name):
    model, data, kw, _, _ = case(name)
    _, H = dense(name)
    res = hessian_trace(Objective(model, data=data, dtype=torch.float64, **kw), num_hvps=60)
    assert math.isfinite(res.stderr) and res.stderr > 0
    assert abs(res.value - float(H.trace())) <= 4 * res.stderr


@pytest.mark.parametrize("name", ["gpt2_f64", "two_input"])
def test_default_data_split_trace_on_third_party_models(name):
    """Dict batches of a HF model (its own batches are the pieces) and a two-input model, against dense."""
    model, data, kw, _, _ = case(name)
    _, H = dense(name)
    obj = Objective(model, data=data, dtype=torch.float64, **kw)
    res = hessian_trace(obj, seed=2)
    assert math.isfinite(res.stderr) and res.stderr > 0
    assert abs(res.value - float(H.trace())) <= 4 * res.stderr


# ----------------------------------------------------------------------------------------------- sharpness, landscape
@pytest.mark.parametrize("name", ["gpt2", "bert", "two_input", "dict_loss", "iterable"])
def test_keskar_sharpness_runs_and_is_nonnegative(name, untouched):
    model, data, kw, _, _ = case(name)
    check = untouched(model)
    res = keskar_sharpness(Objective(model, data=data, **kw), max_iter=3)
    assert math.isfinite(res.value) and res.value >= 0
    check()


@pytest.mark.parametrize("name", ["gpt2", "bert", "two_input", "transform", "compute_loss"])
def test_landscape_centre_is_the_loss(name, untouched):
    model, data, kw, _, _ = case(name)
    check = untouched(model)
    obj = Objective(model, data=data, dtype=torch.float64, **kw)
    g = torch.Generator().manual_seed(0)
    d1, d2 = (torch.randn(obj.num_params, generator=g, dtype=torch.float64) for _ in range(2))
    land = landscape_2d(obj, d1, d2, [-0.1, 0.0, 0.1])
    assert land.values["loss"][1, 1] == pytest.approx(obj.loss(), rel=_rtol(name))
    assert np.isfinite(land.values["loss"]).all()
    assert land.values["loss"][0, 0] != land.values["loss"][1, 1]
    check()


@pytest.mark.parametrize("name", ["gpt2", "bert", "two_input", "dict_loss"])
def test_linear_path_endpoints_are_each_models_loss(name, untouched):
    model_a, data, kw, _, _ = case(name)
    model_b = {"gpt2": Z.tiny_gpt2, "bert": Z.tiny_bert, "two_input": Z.two_input, "dict_loss": Z.dict_loss}[
        name
    ](seed=1)
    check_a, check_b = untouched(model_a), untouched(model_b)
    obj = Objective(model_a, data=data, dtype=torch.float64, **kw)
    path = linear_path(model_a, model_b, obj, n=3)
    ref_b = Objective(model_b, data=data, dtype=torch.float64, **kw).loss()
    assert path.loss[0] == pytest.approx(obj.loss(), rel=_rtol(name))
    assert path.loss[-1] == pytest.approx(ref_b, rel=_rtol(name))
    assert path.loss[0] != path.loss[-1]
    check_a()
    check_b()


# ----------------------------------------------------------------------------------------------- subsets, pickling
def test_subset_at_and_pickle_on_dict_batches():
    import pickle

    obj = Objective(Z.tiny_bert(), data=Z.cls_batches(), dtype=torch.float64)
    sub = obj.subset(5, seed=1, batch_size=2)
    assert sub.num_samples == 5 and [_size(b) for b in sub.batches] == [2, 2, 1]
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:5]
    whole = {k: torch.cat([b[k] for b in obj.batches]) for k in obj.batches[0]}
    m = copy.deepcopy(Z.tiny_bert()).double()
    with torch.no_grad():
        ref = float(m(**{k: v[idx] for k, v in whole.items()}).loss)
    assert sub.loss() == pytest.approx(ref, rel=1e-6)
    moved = obj.at(obj.theta() * 0.5)
    assert moved.loss() == pytest.approx(obj.loss(obj.theta() * 0.5), rel=1e-15)
    other = pickle.loads(pickle.dumps(obj))
    assert other.loss() == obj.loss() and other.fingerprint == obj.fingerprint


def test_fingerprint_hashes_every_batch_tensor():
    a = Objective(Z.tiny_bert(), data=Z.cls_batches())
    changed = Z.cls_batches()
    changed[2]["attention_mask"][0, -1] = 1 - changed[2]["attention_mask"][0, -1]
    assert Objective(Z.tiny_bert(), data=changed).fingerprint != a.fingerprint
    assert Objective(Z.tiny_bert(), data=Z.cls_batches()).fingerprint == a.fingerprint


def test_dtype_casts_floating_tensors_only():
    obj = Objective(Z.two_input(), data=Z.two_input_data(), dtype=torch.float64)
    x, meta, y = obj.batches[0]
    assert x.dtype == meta.dtype == torch.float64 and y.dtype == torch.int64
    lm = Objective(Z.tiny_gpt2(), data=Z.lm_batches(), dtype=torch.float64)
    assert lm.batches[0]["input_ids"].dtype == torch.int64


def test_ragged_batches_padded_per_batch():
    """A collate function that pads each batch to its own longest sequence: batches of different lengths."""
    batches = Z.lm_batches()
    batches[1] = {k: v[:, :5] for k, v in batches[1].items()}
    obj = Objective(Z.tiny_gpt2(), Z.lm_loss, batches, dtype=torch.float64)
    ref = hand_loss(copy.deepcopy(Z.tiny_gpt2()).double(), batches, lambda c, b: Z.lm_loss(c(**b), b))
    assert obj.loss() == pytest.approx(ref, rel=1e-12)
    with pytest.raises(LrbsTypeError, match=r"cannot be concatenated into one .*use obj.batches"):
        _ = obj.data
    sub = obj.subset(6, seed=0)  # each batch keeps its own selected samples
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(0))[:6]
    assert sub.num_samples == 6 and sum(_size(b) for b in sub.batches) == 6
    rows = [row for s in sub.batches for row in s["input_ids"]]
    got = [
        4 * j + r
        for j, b in enumerate(obj.batches)
        for r, row in enumerate(b["input_ids"])
        if any(len(x) == len(row) and torch.equal(x, row) for x in rows)
    ]
    assert got == sorted(int(i) for i in idx)


@pytest.mark.parametrize("name", ["two_input", "gpt2_ragged"])
def test_curves_train_on_any_batches(name, untouched):
    from lrbs.connectivity import auto_neb, fit_curve

    if name == "two_input":
        a, b, data, kw = Z.two_input(0), Z.two_input(1), Z.two_input_data(), {"batch_size": 8}
    else:  # whole ragged batches are drawn in a seeded order
        data = Z.lm_batches()
        data[1] = {k: v[:, :5] for k, v in data[1].items()}
        a, b, kw = Z.tiny_gpt2(0), Z.tiny_gpt2(1), {"loss_fn": Z.lm_loss}
    checks = untouched(a), untouched(b)
    curve = fit_curve(a, b, data, epochs=1, bends=1, bn="eval", num_eval=3, **kw)
    ea = Objective(a, kw.get("loss_fn"), data, batch_size=1000).loss()
    eb = Objective(b, kw.get("loss_fn"), data, batch_size=1000).loss()
    assert curve.path.loss[0] == pytest.approx(ea, rel=1e-6) and curve.path.loss[-1] == pytest.approx(
        eb, rel=1e-6
    )
    assert np.isfinite(curve.history).all()
    neb = auto_neb(a, b, data, cycles=1, steps=2, bn="eval", subpoints=1, **kw)
    assert neb.loss[0] == pytest.approx(ea, rel=1e-6) and np.isfinite(neb.loss).all()
    for check in checks:
        check()
