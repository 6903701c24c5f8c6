"""lr_range_test on the models and data users hold (tiny GPT-2 / BERT with dict batches, a two-input model, a model
returning a dict of losses, TensorDataset, IterableDataset, a map-style dataset with a random transform): the
recorded losses equal a hand-written sweep over the same batches, and the restore is bit-exact (model, optimizer
state, torch RNG)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import zoo_thirdparty as zoo
from torch import nn

from lrbs.batches import Sampler
from lrbs.errors import ConfigError, LrbsTypeError, ShapeError
from lrbs.range_test import lr_range_test

ce = nn.functional.cross_entropy
N_ITER = 12


def state_of(model, opt):
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        torch.get_rng_state(),
        {k: m.training for k, m in model.named_modules()},
    )


def assert_same_state(a, b):
    (ma, oa, ra, ta), (mb, ob, rb, tb) = a, b
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert torch.equal(ra, rb) and ta == tb
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for n, v in oa["state"][k].items():
            w = ob["state"][k][n]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def hand_sweep(model, batches, loss, lrs, momentum=0.9):
    """SGD at the swept lrs over the given batches in order (each a batch or a list to accumulate)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=momentum)
    out = []
    for lr, b in zip(lrs, batches):
        opt.param_groups[0]["lr"] = float(lr)
        opt.zero_grad(set_to_none=True)
        lo = loss(model, b)
        lo.backward()
        opt.step()
        out.append(float(lo.detach()))
    return out


def run(model, data, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # optimizer state present before the test, so the restore of buffers is checked too
    before = state_of(model, opt)
    res = lr_range_test(model, opt, data=data, num_iter=N_ITER, start_lr=1e-4, end_lr=1e-1, **kw)
    assert_same_state(before, state_of(model, opt))
    assert len(res.losses) == N_ITER and np.isfinite(res.losses).all()
    return res


def test_gpt2_dict_batches_equal_a_hand_sweep_and_restore_exactly():
    batches = zoo.lm_batches(n=12, batch=4)
    model = zoo.tiny_gpt2()
    res = run(model, batches)
    want = hand_sweep(model, [batches[i % 3] for i in range(N_ITER)], lambda m, b: m(**b).loss, res.lrs)
    assert res.losses.tolist() == want


def test_bert_map_dataset_of_dicts_equals_a_hand_sweep():
    ds = zoo.DictDataset(zoo.cls_batches(n=12, batch=4))
    model = zoo.tiny_bert()
    res = run(model, ds, batch_size=4)
    s = Sampler(12, torch.Generator().manual_seed(0))
    coll = torch.utils.data.default_collate
    batches = [coll([ds[int(i)] for i in s.take(4)]) for _ in range(N_ITER)]
    assert res.losses.tolist() == hand_sweep(model, batches, lambda m, b: m(**b).loss, res.lrs)


def test_two_input_model_with_accumulation():
    """accumulation_steps=2: two batches per optimizer step, each loss halved; the lr changes once per step."""
    x, meta, y = zoo.two_input_data(n=40)
    model = zoo.two_input()
    seen = []

    def loss_fn(out, target):
        seen.append(opt_ref[0].param_groups[0]["lr"])
        return ce(out, target)

    opt_ref = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref.append(opt)
    res = lr_range_test(
        model, opt, loss_fn, (x, meta, y), batch_size=8, accumulation_steps=2, num_iter=N_ITER
    )
    np.testing.assert_array_equal(np.asarray(seen).reshape(N_ITER, 2), np.repeat(res.lrs[:, None], 2, axis=1))
    s = Sampler(40, torch.Generator().manual_seed(0))
    pairs = []
    for _ in range(N_ITER):
        idx = [s.take(8), s.take(8)]
        pairs.append([tuple(t[i] for t in (x, meta, y)) for i in idx])

    def acc(m, bs):
        return sum(ce(m(b[0], b[1]), b[2]) / 2 for b in bs)

    want = hand_sweep(model, pairs, acc, res.lrs)
    np.testing.assert_allclose(res.losses, want, rtol=1e-6)


def test_dict_of_losses_model_and_tensor_dataset():
    data = zoo.dict_loss_data(n=40)
    model = zoo.dict_loss()
    res = run(model, data, batch_size=10)
    s = Sampler(40, torch.Generator().manual_seed(0))
    batches = [{k: v[i] for k, v in data.items()} for i in (s.take(10) for _ in range(N_ITER))]
    assert res.losses.tolist() == hand_sweep(model, batches, lambda m, b: sum(m(**b).values()), res.lrs)
    ds = zoo.tensor_dataset(n=40)
    m2 = zoo.mlp()
    r1 = run(m2, ds, batch_size=10)
    r2 = run(m2, ds.tensors, batch_size=10)
    assert r1.losses.tolist() == r2.losses.tolist()


def test_iterable_dataset_and_map_dataset_with_a_transform():
    model = zoo.mlp()
    res = run(model, zoo.Stream(n=40), batch_size=16)  # batches 16, 16, 8, cycled
    st = zoo.Stream(n=40)
    cuts = [(0, 16), (16, 32), (32, 40)] * 4
    batches = [(st.x[i:j], st.y[i:j]) for i, j in cuts[:N_ITER]]
    assert res.losses.tolist() == hand_sweep(model, batches, lambda m, b: ce(m(b[0]), b[1]), res.lrs)
    flipped = zoo.Flipped(n=40)
    r1 = run(model, flipped, batch_size=8, seed=2)
    r2 = run(model, flipped, batch_size=8, seed=2)
    assert r1.losses.tolist() == r2.losses.tolist()  # the transform's draws are seeded too


def test_compute_loss_and_token_weights_under_accumulation():
    """batch_weight weights accumulated batches by w_b / sum w (here: label tokens, unequal across batches)."""
    batches = zoo.lm_batches(n=12, batch=4)
    batches[1]["labels"][:, 4:] = -100  # fewer label tokens in batch 1
    model = zoo.tiny_gpt2()
    tokens = lambda b: float((b["labels"][:, 1:] != -100).sum())  # noqa: E731
    res = run(
        model, batches, accumulation_steps=2, batch_weight=tokens, compute_loss=lambda m, b: m(**b).loss
    )
    with torch.no_grad():
        m = copy.deepcopy(model).train()
        w0, w1 = tokens(batches[0]), tokens(batches[1])
        want = (m(**batches[0]).loss * w0 + m(**batches[1]).loss * w1) / (w0 + w1)
    assert res.losses[0] == pytest.approx(float(want), rel=1e-6)
    assert res.settings["loss_fn"] == "<lambda>"


def test_custom_batch_objects_with_compute_loss():
    class Obj:
        def __init__(self, x, y):
            self.x, self.y = x, y

    x, y = zoo.two_input_data(n=40)[::2]
    batches = [Obj(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    model = zoo.mlp()
    loss = lambda m, b: ce(m(b.x), b.y)  # noqa: E731
    res = run(model, batches, compute_loss=loss)
    assert res.losses.tolist() == hand_sweep(model, [batches[i % 5] for i in range(N_ITER)], loss, res.lrs)


def test_validation_data_through_the_protocol():
    batches = zoo.lm_batches(n=12, batch=4)
    model = zoo.tiny_gpt2()
    res = run(model, batches[:2], val_data=batches[2:])
    assert res.settings["validation"]


def test_bad_inputs():
    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = zoo.two_input_data(n=40)[::2]
    with pytest.raises(ConfigError, match=r"precision='fp16' is not allowed: must be one of"):
        lr_range_test(model, opt, data=(x, y), precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"precision='16-mixed' is not allowed on device cpu"):
            lr_range_test(model, opt, data=(x, y), precision="16-mixed")
    with pytest.raises(ShapeError, match=r"compute_loss must return a scalar.*shape \(8,\)"):
        lr_range_test(
            model,
            opt,
            data=(x, y),
            batch_size=8,
            compute_loss=lambda m, b: ce(m(b[0]), b[1], reduction="none"),
        )
    with pytest.raises(LrbsTypeError, match=r"has no loss: .*loss_fn=.*compute_loss="):
        two = zoo.two_input()
        lr_range_test(
            two,
            torch.optim.SGD(two.parameters(), lr=0.1),
            data={"x": x, "meta": zoo.two_input_data(n=40)[1]},
            batch_size=8,
        )
    with pytest.raises(ConfigError, match=r"data is empty"):
        lr_range_test(model, opt, data=zoo.Stream(n=0))
