"""fit() on the models and data users hold (tiny GPT-2 / BERT with dict batches, a two-input model, a model returning
a dict of losses, TensorDataset, IterableDataset, a map-style dataset with a random transform): every run equals a
hand-written PyTorch loop over the same batches, bit for bit; plus the bad inputs of the batch protocol."""

from __future__ import annotations

import pytest
import torch
import zoo_thirdparty as zoo
from torch import nn

from lrbs.batches import Sampler
from lrbs.errors import ConfigError, LrbsTypeError, ShapeError
from lrbs.train import evaluate, fit

ce = nn.functional.cross_entropy


def hand_loop(model, batches, loss, lr=0.01, seed=0):
    """Adam over the given batches in order, in a forked RNG seeded like fit; returns the losses."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for b in batches:
            opt.zero_grad(set_to_none=True)
            lo = loss(model, b() if callable(b) else b)
            lo.backward()
            opt.step()
            out.append(float(lo.detach()))
    return out


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def sampled(tensors, n, b, steps, seed=0):
    """The batches fit draws from indexable data: consecutive seeded permutations (lrbs.batches.Sampler)."""
    s = Sampler(n, torch.Generator().manual_seed(seed))
    return [tuple(t[i] for t in tensors) for i in (s.take(b) for _ in range(steps))]


def run_fit(model, data, steps, **kw):
    return fit(model, data, optimizer="adam", lr=0.01, steps=steps, eval_every=steps, **kw)


# --------------------------------------------------------------------------- HuggingFace models, dict batches
def test_gpt2_list_of_dict_batches_equals_a_hand_loop():
    batches = zoo.lm_batches(n=12, batch=4)
    a, b = zoo.tiny_gpt2(), zoo.tiny_gpt2()
    r = run_fit(a, batches, 6)  # the list is cycled: 3 batches, twice
    want = hand_loop(b, batches * 2, lambda m, bt: m(**bt).loss)
    assert r.history["loss"].tolist() == want and same(a, b)
    assert r.history["batch_size"].tolist() == [4] * 6
    ev = r.evals[-1]
    assert "train_acc" not in ev  # 3-D LM logits: accuracy is undefined, so absent
    with torch.no_grad():
        b.eval()
        ref = sum(float(b(**bt).loss) * 4 for bt in batches) / 12
    assert ev["train_loss"] == pytest.approx(ref, rel=1e-6)


def test_bert_classifier_map_dataset_of_dicts_equals_a_hand_loop():
    ds = zoo.DictDataset(zoo.cls_batches(n=12, batch=4))
    a, b = zoo.tiny_bert(), zoo.tiny_bert()
    r = run_fit(a, ds, 5, batch_size=4)
    coll = torch.utils.data.default_collate
    s = Sampler(12, torch.Generator().manual_seed(0))
    batches = [coll([ds[int(i)] for i in s.take(4)]) for _ in range(5)]
    want = hand_loop(b, batches, lambda m, bt: m(**bt).loss)
    assert r.history["loss"].tolist() == want and same(a, b)
    assert 0.0 <= r.evals[-1]["train_acc"] <= 1.0  # (N, 3) logits against integer labels: defined


def test_dict_tensors_with_a_loss_fn_and_token_weights():
    """Dict tensor data ({"input_ids", "labels"}) sampled by index, a loss_fn on (output, batch), and micro-batches
    weighted by their label tokens (batch_weight)."""
    ids = torch.cat([b["input_ids"] for b in zoo.lm_batches(n=16, batch=16)])
    data = {"input_ids": ids, "labels": ids.clone()}
    a, b = zoo.tiny_gpt2(), zoo.tiny_gpt2()
    tokens = lambda bt: float(bt["labels"][:, 1:].numel())  # noqa: E731
    r = run_fit(a, data, 4, batch_size=8, loss_fn=zoo.lm_loss, batch_weight=tokens, max_micro_batch=4)
    batches = [dict(zip(("input_ids", "labels"), t)) for t in sampled((ids, ids), 16, 8, 4)]

    opt = torch.optim.Adam(b.parameters(), lr=0.01)
    want = []
    for bt in batches:  # hand-written accumulation: two halves, equal token counts, scales 1/2
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for s in (0, 4):
            h = {k: v[s : s + 4] for k, v in bt.items()}
            lo = zoo.lm_loss(b(input_ids=h["input_ids"]), h) * 0.5
            lo.backward()
            total += float(lo.detach())
        opt.step()
        want.append(total)
    assert r.history["loss"].tolist() == want and same(a, b)
    assert r.config["loss"] == "lm_loss"


# --------------------------------------------------------------------------- plain PyTorch models and datasets
def test_two_input_model_on_tuple_tensors_equals_a_hand_loop():
    x, meta, y = zoo.two_input_data(n=40)
    a, b = zoo.two_input(), zoo.two_input()
    r = run_fit(a, (x, meta, y), 6, batch_size=16)
    want = hand_loop(b, sampled((x, meta, y), 40, 16, 6), lambda m, bt: ce(m(bt[0], bt[1]), bt[2]))
    assert r.history["loss"].tolist() == want and same(a, b)
    assert "train_acc" in r.evals[-1]


def test_dict_of_losses_model_equals_a_hand_loop():
    data = zoo.dict_loss_data(n=40)
    a, b = zoo.dict_loss(), zoo.dict_loss()
    r = run_fit(a, data, 5, batch_size=10)
    batches = [dict(zip(("x", "y"), t)) for t in sampled((data["x"], data["y"]), 40, 10, 5)]
    want = hand_loop(b, batches, lambda m, bt: sum(m(**bt).values()))
    assert r.history["loss"].tolist() == want and same(a, b)


def test_tensor_dataset_equals_tuple_tensors():
    ds = zoo.tensor_dataset(n=40)
    a, b = zoo.mlp(), zoo.mlp()
    r1 = run_fit(a, ds, 5, batch_size=8)
    r2 = run_fit(b, ds.tensors, 5, batch_size=8)
    assert r1.history["loss"].tolist() == r2.history["loss"].tolist() and same(a, b)
    c = zoo.mlp()
    want = hand_loop(c, sampled(ds.tensors, 40, 8, 5), lambda m, bt: ce(m(bt[0]), bt[1]))
    assert r1.history["loss"].tolist() == want


def test_iterable_dataset_is_batched_by_batch_size_and_cycled():
    stream = zoo.Stream(n=40)
    a, b = zoo.mlp(), zoo.mlp()
    r = run_fit(a, stream, 7, batch_size=16)  # 16, 16, 8, then again
    x, y = stream.x, stream.y
    cuts = [(0, 16), (16, 32), (32, 40)] * 3
    want = hand_loop(b, [(x[i:j], y[i:j]) for i, j in cuts[:7]], lambda m, bt: ce(m(bt[0]), bt[1]))
    assert r.history["loss"].tolist() == want and same(a, b)
    assert r.history["batch_size"].tolist() == [16, 16, 8, 16, 16, 8, 16]
    assert r.history["samples"][-1] == 96


def test_map_dataset_with_a_random_transform_equals_a_hand_loop():
    """The transform draws from torch's RNG inside fit's forked, seeded RNG: a hand loop seeded alike sees the
    same flips; the caller's RNG is untouched."""
    ds = zoo.Flipped(n=40)
    a, b = zoo.mlp(), zoo.mlp()
    state = torch.get_rng_state()
    r = run_fit(a, ds, 5, batch_size=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    s = Sampler(40, torch.Generator().manual_seed(3))
    coll = torch.utils.data.default_collate
    idx = [s.take(8) for _ in range(5)]
    want = hand_loop(
        b, [lambda i=i: coll([ds[int(k)] for k in i]) for i in idx], lambda m, bt: ce(m(bt[0]), bt[1]), seed=3
    )
    assert r.history["loss"].tolist() == want and same(a, b)


def test_dataloader_batches_and_compute_loss():
    x, y = zoo.two_input_data(n=40)[::2]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=10,
        shuffle=True,
        generator=torch.Generator().manual_seed(7),
    )
    state = loader.generator.get_state()
    a, b = zoo.mlp(), zoo.mlp()
    r = run_fit(a, loader, 6, compute_loss=lambda m, bt: ce(m(bt[0]), bt[1]))
    assert torch.equal(loader.generator.get_state(), state)  # reseeded for the run, restored afterwards
    assert (
        r.config["dataset"]["source"] == "loader" and "train_acc" not in r.evals[-1]
    )  # compute_loss: no acc
    loader.generator.manual_seed(0)  # fit reseeds the loader's generator with seed=0
    batches = [bt for _ in range(2) for bt in loader][:6]
    loader.generator.set_state(state)
    want = hand_loop(b, batches, lambda m, bt: ce(m(bt[0]), bt[1]))
    assert r.history["loss"].tolist() == want and same(a, b)


class Obj:
    """A batch that is neither a tuple nor a mapping (e.g. a graph library's batch object)."""

    def __init__(self, x, y):
        self.x, self.y = x, y


def obj_loss(m, b):
    return ce(m(b.x), b.y)


def test_custom_batch_objects_with_compute_loss_and_batch_weight():
    x, y = zoo.two_input_data(n=40)[::2]
    batches = [Obj(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    a, b = zoo.mlp(), zoo.mlp()
    r = run_fit(a, batches, 7, compute_loss=obj_loss, batch_weight=lambda bt: len(bt.y))
    want = hand_loop(b, [batches[i % 5] for i in range(7)], obj_loss)
    assert r.history["loss"].tolist() == want and same(a, b)
    assert r.history["samples"][-1] == 56
    with torch.no_grad():
        ref = sum(float(obj_loss(b, bt)) * 8 for bt in batches) / 40
    assert r.evals[-1]["train_loss"] == pytest.approx(ref, rel=1e-6)
    with pytest.raises(
        LrbsTypeError,
        match=r"the batches of dataset hold no tensor, so their samples cannot be counted: pass batch_weight=",
    ):
        fit(zoo.mlp(), batches, lr=0.1, steps=1, compute_loss=obj_loss)


def test_evaluate_on_the_protocol():
    batches = zoo.lm_batches(n=12, batch=4)
    m = zoo.tiny_gpt2()
    out = evaluate(m, batches)
    assert out["accuracy"] is None
    with torch.no_grad():
        ref = sum(float(m(**bt).loss) for bt in batches) / 3
    assert out["loss"] == pytest.approx(ref, rel=1e-6)
    x, meta, y = zoo.two_input_data(n=40)
    net = zoo.two_input()
    out = evaluate(net, (x, meta, y), batch_size=7)
    with torch.no_grad():
        logits = net(x, meta)
    assert out["loss"] == pytest.approx(float(ce(logits, y)), rel=1e-6)
    assert out["accuracy"] == int((logits.argmax(-1) == y).sum()) / 40


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    m = zoo.mlp()
    x, y = zoo.two_input_data(n=40)[::2]
    with pytest.raises(ConfigError, match=r"dataset is empty"):
        fit(m, (x[:0], y[:0]), lr=0.1, batch_size=4, steps=1)
    with pytest.raises(ConfigError, match=r"dataset is empty"):
        fit(
            m,
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]), batch_size=4),
            lr=0.1,
            steps=1,
        )
    with pytest.raises(ShapeError, match=r"compute_loss must return a scalar.*shape \(20,\)"):
        fit(
            m,
            (x, y),
            lr=0.1,
            batch_size=20,
            steps=1,
            compute_loss=lambda mm, b: ce(mm(b[0]), b[1], reduction="none"),
        )
    with pytest.raises(
        LrbsTypeError, match=r"compute_loss returned float: must return a scalar torch.Tensor"
    ):
        fit(m, (x, y), lr=0.1, batch_size=20, steps=1, compute_loss=lambda mm, b: 1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    with pytest.raises(
        ConfigError, match=r"batch_size=8 is not allowed with a DataLoader of batch_size=5: leave it None"
    ):
        fit(m, loader, lr=0.1, batch_size=8, steps=1)
    with pytest.raises(
        ConfigError, match=r"is not allowed with a loader: a batch-size schedule needs indexable"
    ):
        fit(m, zoo.Stream(), lr=0.1, batch_size=lambda s: 4, steps=1)
    with pytest.raises(ConfigError, match=r"epochs=1.0 is not allowed with data of unknown size"):
        fit(m, zoo.Stream(), lr=0.1, batch_size=4, epochs=1)
    with pytest.raises(ConfigError, match=r"precision='half' is not allowed: must be one of"):
        fit(m, (x, y), lr=0.1, batch_size=4, steps=1, precision="half")
    with pytest.raises(LrbsTypeError, match=r"cannot read a batch of type str"):
        fit(m, ["abc", "def"], lr=0.1, steps=1)
    with pytest.raises(ConfigError, match=r"give loss_fn= or compute_loss=, not both"):
        fit(m, (x, y), lr=0.1, batch_size=4, steps=1, loss_fn=ce, compute_loss=lambda mm, b: 0)
