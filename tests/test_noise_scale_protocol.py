"""noise_scale on the batch protocol: HF GPT-2 (dict batches), a two-input model, a TensorDataset, a map-style
dataset, a DataLoader and an IterableDataset, each against a naive float64 loop over the same sub-batches."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrbs.errors import ConfigError, LrbsTypeError
from lrbs.noise_scale import NoiseScaleTracker, noise_scale
from lrbs.train import fit


# ----------------------------------------------------------------------------------------- models and data
def _gpt2(**config):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        **config,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


class TwoInput(nn.Module):
    """``forward(x, meta)``: a feature vector and a side input, batches ``(x, meta, y)``."""

    def __init__(self, d: int = 5, m: int = 3, c: int = 3):
        super().__init__()
        self.f = nn.Linear(d, 8)
        self.g = nn.Linear(m, 8)
        self.out = nn.Linear(8, c)

    def forward(self, x, meta):
        return self.out(torch.tanh(self.f(x) + self.g(meta)))


class DictData(torch.utils.data.Dataset):
    """A map-style dataset of ``{"input_ids", "labels"}`` samples (collated by default_collate)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Stream(torch.utils.data.IterableDataset):
    """An unsized stream of ``(x, meta, y)`` samples, in order."""

    def __init__(self, *columns):
        self.columns = columns

    def __iter__(self):
        return iter(zip(*self.columns))


def _two_input_data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    meta = torch.randn(n, 3, generator=g)
    y = (x[:, :3] + meta).argmax(1)  # labels the model can learn: a gradient signal above the noise
    return x, meta, y


def _tokens(n: int = 48, t: int = 8, seed: int = 0):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- the reference
def _grad64(model: nn.Module, call) -> torch.Tensor:
    """The float64 gradient of ``call(model)`` (a plain backward pass on a float64 copy)."""
    model.zero_grad(set_to_none=True)
    call(model).backward()
    return torch.cat(
        [
            (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
            for p in model.parameters()
            if p.requires_grad
        ]
    ).double()


def _reference(model, sub_calls, small_batch, big_batch, n):
    """McCandlish et al.'s two-batch estimator by hand: per draw, |G_small|^2 = mean_i |g_i|^2 over the k sub-batch
    gradients, |G_big|^2 = |mean_i g_i|^2, then |G|^2 and tr(Sigma) with c(B) = (N-B)/(B(N-1)) (or 1/B, N=None)."""
    ref = copy.deepcopy(model).double()
    small, big = [], []
    for draw in sub_calls:
        gs = [_grad64(ref, call) for call in draw]
        small.append(float(np.mean([float(g @ g) for g in gs])))
        gbar = torch.stack(gs).mean(0)
        big.append(float(gbar @ gbar))
    small, big = np.array(small), np.array(big)

    def c(b):
        return 1.0 / b if n is None else (n - b) / (b * (n - 1))

    trace = (small - big) / (c(small_batch) - c(big_batch))
    grad_sq = big - c(big_batch) * trace
    b = trace.mean() / grad_sq.mean() if grad_sq.mean() > 0 else math.inf
    return {"small": small, "big": big, "grad_sq": grad_sq, "trace": trace, "b": b}


def _draw_indices(n, small_batch, big_batch, num_estimates, seed):
    rng = np.random.default_rng(seed)
    return [rng.choice(n, size=big_batch, replace=False) for _ in range(num_estimates)]


def _split(idx: np.ndarray, small_batch: int) -> list[torch.Tensor]:
    """The consecutive sub-batches of ``small_batch`` indices of one big batch."""
    return [torch.from_numpy(idx[i : i + small_batch]) for i in range(0, len(idx), small_batch)]


def _assert_matches(res, ref, rel=1e-9):
    np.testing.assert_allclose(res.small_sq_estimates, ref["small"], rtol=rel)
    np.testing.assert_allclose(res.big_sq_estimates, ref["big"], rtol=rel)
    np.testing.assert_allclose(res.grad_sq_estimates, ref["grad_sq"], rtol=1e-7)
    np.testing.assert_allclose(res.trace_sigma_estimates, ref["trace"], rtol=1e-7)
    assert res.b_simple == pytest.approx(ref["b"], rel=1e-7)


# ----------------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("kind", ["dict_tensors", "map_dataset"])
def test_gpt2_dict_batches_match_the_float64_loop(kind, untouched):
    model = _gpt2()
    ids = _tokens()
    data = {"input_ids": ids, "labels": ids} if kind == "dict_tensors" else DictData(ids)
    bs, bb, e, seed = 4, 16, 2, 1
    check = untouched(model)
    res = noise_scale(
        model, data, small_batch=bs, big_batch=bb, num_estimates=e, seed=seed, dtype=torch.float64
    )
    check()
    draws = [
        [(lambda m, s=s: m(input_ids=ids[s], labels=ids[s]).loss) for s in _split(idx, bs)]
        for idx in _draw_indices(len(ids), bs, bb, e, seed)
    ]
    _assert_matches(res, _reference(model, draws, bs, bb, len(ids)))
    assert res.finite_population is True and res.settings["num_samples"] == len(ids)


@pytest.mark.parametrize("wrap", ["tensors", "tensor_dataset"])
def test_two_input_model_matches_the_float64_loop(wrap, untouched):
    torch.manual_seed(0)
    model = TwoInput()
    x, meta, y = _two_input_data()
    data = (x, meta, y) if wrap == "tensors" else torch.utils.data.TensorDataset(x, meta, y)
    bs, bb, e, seed = 4, 24, 3, 2
    check = untouched(model)
    res = noise_scale(
        model, data, small_batch=bs, big_batch=bb, num_estimates=e, seed=seed, dtype=torch.float64
    )
    check()
    x64, m64 = x.double(), meta.double()
    ce = nn.functional.cross_entropy
    draws = [
        [(lambda m, s=s: ce(m(x64[s], m64[s]), y[s])) for s in _split(idx, bs)]
        for idx in _draw_indices(len(y), bs, bb, e, seed)
    ]
    _assert_matches(res, _reference(model, draws, bs, bb, len(y)))


def test_iterable_dataset_reads_consecutive_big_batches(untouched):
    torch.manual_seed(0)
    model = TwoInput()
    x, meta, y = _two_input_data(n=60)
    bs, bb, e = 5, 20, 4  # 60 samples = 3 big batches: the 4th draw starts the stream again
    check = untouched(model)
    res = noise_scale(
        model,
        Stream(x, meta, y),
        small_batch=bs,
        big_batch=bb,
        num_estimates=e,
        dtype=torch.float64,
        method="loop",
    )
    check()
    x64, m64 = x.double(), meta.double()
    ce = nn.functional.cross_entropy
    starts = [0, 20, 40, 0]
    draws = [
        [
            (lambda m, a=s0 + i * bs: ce(m(x64[a : a + bs], m64[a : a + bs]), y[a : a + bs]))
            for i in range(bb // bs)
        ]
        for s0 in starts
    ]
    _assert_matches(res, _reference(model, draws, bs, bb, None))
    assert res.finite_population is False  # an unsized stream: N unknown, c(B) = 1/B
    assert res.settings["source"] == "loader" and res.settings["num_samples"] is None


def test_shuffled_dataloader_is_seeded_and_restored(untouched):
    torch.manual_seed(0)
    model = TwoInput()
    x, meta, y = _two_input_data(n=64)
    gen = torch.Generator().manual_seed(123)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, meta, y), batch_size=16, shuffle=True, generator=gen
    )
    before = gen.get_state()
    rng_before = torch.get_rng_state()
    bs, bb, e, seed = 4, 16, 3, 7
    res = noise_scale(
        model, loader, small_batch=bs, big_batch=bb, num_estimates=e, seed=seed, dtype=torch.float64
    )
    assert torch.equal(gen.get_state(), before) and torch.equal(torch.get_rng_state(), rng_before)
    # the order the stream read: the loader's own, with its generator seeded by `seed`
    replay = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x.double(), meta.double(), y),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    batches = [b for _, b in zip(range(e), replay)]
    ce = nn.functional.cross_entropy
    draws = [
        [
            (lambda m, b=b, a=i * bs: ce(m(b[0][a : a + bs], b[1][a : a + bs]), b[2][a : a + bs]))
            for i in range(4)
        ]
        for b in batches
    ]
    _assert_matches(res, _reference(model, draws, bs, bb, 64))
    again = noise_scale(
        model, loader, small_batch=bs, big_batch=bb, num_estimates=e, seed=seed, dtype=torch.float64
    )
    np.testing.assert_array_equal(res.big_sq_estimates, again.big_sq_estimates)


def test_compute_loss_and_batch_weight():
    """compute_loss(model, batch) gives the same numbers as the model's own loss; batch_weight weighs G_big."""
    model = _gpt2()
    ids = _tokens()
    data = {"input_ids": ids, "labels": ids}
    kw = {"small_batch": 4, "big_batch": 16, "num_estimates": 2, "seed": 0, "dtype": torch.float64}
    own = noise_scale(model, data, **kw)
    via = noise_scale(model, data, compute_loss=lambda m, b: m(**b).loss, **kw)
    np.testing.assert_allclose(via.big_sq_estimates, own.big_sq_estimates, rtol=1e-12)
    # labels with ignored tokens: weights = label tokens; G_big = sum_i w_i g_i / sum_i w_i, checked by hand
    labels = ids.clone()
    labels[::3, 4:] = -100
    data = {"input_ids": ids, "labels": labels}
    weight = lambda b: float((b["labels"][:, 1:] != -100).sum())  # noqa: E731 - tokens that enter the loss
    res = noise_scale(model, data, batch_weight=weight, method="loop", **kw)
    ref = copy.deepcopy(model).double()
    for e, idx in enumerate(_draw_indices(len(ids), 4, 16, 2, 0)):
        subs = [torch.from_numpy(idx[i * 4 : (i + 1) * 4]) for i in range(4)]
        gs = [_grad64(ref, lambda m, s=s: m(input_ids=ids[s], labels=labels[s]).loss) for s in subs]
        w = torch.tensor([weight({"labels": labels[s]}) for s in subs], dtype=torch.float64)
        gbar = (torch.stack(gs) * w[:, None]).sum(0) / w.sum()
        assert res.big_sq_estimates[e] == pytest.approx(float(gbar @ gbar), rel=1e-9)
        assert res.small_sq_estimates[e] == pytest.approx(
            float(np.mean([float(g @ g) for g in gs])), rel=1e-9
        )


def test_bf16_mixed_runs_on_cpu():
    torch.manual_seed(0)
    model = TwoInput()
    data = _two_input_data()
    kw = {"small_batch": 4, "big_batch": 32, "num_estimates": 4, "seed": 0, "num_bootstrap": 50}
    fp32 = noise_scale(model, data, **kw)
    bf16 = noise_scale(model, data, precision="bf16-mixed", **kw)
    assert bf16.settings["precision"] == "bf16-mixed" and fp32.settings["precision"] == "32"
    assert not np.array_equal(bf16.small_sq_estimates, fp32.small_sq_estimates)  # autocast really ran
    np.testing.assert_allclose(bf16.small_sq_estimates, fp32.small_sq_estimates, rtol=0.05)
    np.testing.assert_allclose(bf16.big_sq_estimates, fp32.big_sq_estimates, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA GPU")
def test_16_mixed_on_gpu_matches_fp32():
    torch.manual_seed(0)
    model = TwoInput().cuda()
    data = tuple(t.cuda() for t in _two_input_data())
    kw = {"small_batch": 4, "big_batch": 32, "num_estimates": 4, "seed": 0, "num_bootstrap": 50}
    fp32 = noise_scale(model, data, **kw)
    fp16 = noise_scale(model, data, precision="16-mixed", **kw)
    np.testing.assert_allclose(fp16.small_sq_estimates, fp32.small_sq_estimates, rtol=0.02)
    np.testing.assert_allclose(fp16.big_sq_estimates, fp32.big_sq_estimates, rtol=0.02)


def test_tracker_reads_tuple_batches_of_a_two_input_model():
    """fit's step batch (x, meta, y): the tracker's single-step estimates equal the float64 reference."""
    torch.manual_seed(0)
    model = TwoInput().double()
    x, meta, y = _two_input_data(n=64)
    x, meta = x.double(), meta.double()
    tracker = NoiseScaleTracker(small_batch=4, every=1, beta=0.0)
    state = type("S", (), {})()
    state.step, state.model, state.loss_fn, state.batch = 0, model, None, (x[:16], meta[:16], y[:16])
    tracker.on_start(state)
    tracker.on_step(state)
    ce = nn.functional.cross_entropy
    draw = [(lambda m, a=a: ce(m(x[a : a + 4], meta[a : a + 4]), y[a : a + 4])) for a in range(0, 16, 4)]
    ref = _reference(model, [draw], 4, 16, None)
    _, grad_sq, trace = tracker.raw[0]
    assert grad_sq == pytest.approx(ref["grad_sq"][0], rel=1e-9)
    assert trace == pytest.approx(ref["trace"][0], rel=1e-9)


def test_tracker_in_fit_with_tensor_data_still_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, _, y = _two_input_data(n=64)
    tracker = NoiseScaleTracker(small_batch=4, every=2)
    fit(model, (x, y), lr=0.05, batch_size=16, steps=4, callbacks=[tracker])
    assert [p.step for p in tracker.history] == [0, 2]
    assert all(math.isfinite(p.b_simple) for p in tracker.history)


# ----------------------------------------------------------------------------------------- bad inputs
def test_bad_precision_and_empty_data():
    torch.manual_seed(0)
    model = TwoInput()
    data = _two_input_data()
    kw = {"small_batch": 4, "big_batch": 16, "num_estimates": 2}
    with pytest.raises(ConfigError, match=r"precision='64'.*'32', 'bf16-mixed', '16-mixed'"):
        noise_scale(model, data, precision="64", **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"precision='16-mixed' is not allowed on device cpu.*CUDA"):
            noise_scale(model, data, precision="16-mixed", **kw)
    empty = torch.utils.data.TensorDataset(
        torch.zeros(0, 5), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    )
    with pytest.raises(ConfigError, match="empty"):
        noise_scale(model, empty, **kw)
    with pytest.raises(ConfigError, match="empty"):
        noise_scale(model, Stream(*(t[:0] for t in data)), **kw)
    with pytest.raises(ConfigError, match="empty"):
        noise_scale(model, torch.utils.data.DataLoader(empty, batch_size=4), **kw)


def test_bad_batches_and_loaders():
    torch.manual_seed(0)
    model = TwoInput()
    x, meta, y = _two_input_data(n=32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, meta, y), batch_size=4)
    with pytest.raises(
        ConfigError, match=r"small_batch=8 is not allowed with this loader.*at most 4 samples"
    ):
        noise_scale(model, loader, small_batch=8, big_batch=16, num_estimates=2)
    with pytest.raises(LrbsTypeError, match="cannot read a batch of type str"):
        noise_scale(model, ["abc", "def"], small_batch=1, big_batch=2, num_estimates=2)
    with pytest.raises(ConfigError, match="loss_fn is given twice"):
        from lrbs.objective import Objective

        noise_scale(
            Objective(model, data=(x, meta, y)),
            loss_fn=nn.functional.cross_entropy,
            small_batch=4,
            big_batch=8,
        )


def test_tracker_in_fit_reads_dict_batches_of_gpt2():
    """fit's state.batch ({"input_ids", "labels"}) and its BatchLoss: at lr ~ 0 the first single-step estimates
    equal the float64 reference on the batch fit drew (the seeded sampler's first torch.randperm slice)."""
    model = _gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).double()  # fit trains in train mode
    ids = _tokens(n=32)
    data = {"input_ids": ids, "labels": ids}
    tracker = NoiseScaleTracker(small_batch=4, every=1, beta=0.0)
    fit(
        copy.deepcopy(model),
        data,
        lr=1e-30,
        momentum=0.0,
        batch_size=16,
        steps=1,
        seed=5,
        callbacks=[tracker],
    )
    first = torch.randperm(32, generator=torch.Generator().manual_seed(5))[:16]
    draw = [(lambda m, s=s: m(input_ids=ids[s], labels=ids[s]).loss) for s in first.split(4)]
    ref = _reference(model, [draw], 4, 16, None)
    _, grad_sq, trace = tracker.raw[0]
    assert grad_sq == pytest.approx(ref["grad_sq"][0], rel=1e-6)
    assert trace == pytest.approx(ref["trace"][0], rel=1e-6)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_16_mixed_loss_scale_backs_off_on_overflow(method):
    """The 16-mixed gradients are taken of 2^16 * loss and divided back; where that overflows (here float32's max,
    as float16's would under autocast) the scale drops by 2^8 until the gradients are finite."""
    from lrbs.noise_scale import _micro_sq_norms

    theta = torch.ones(3)

    def loss_at(p, batch):
        return 1e35 * (p["theta"] * batch).sum()  # gradient 1e35 * batch: 2^16 x that overflows float32

    subs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])]
    small, big, used = _micro_sq_norms(
        loss_at, {"theta": theta}, lambda e: subs, 1, 2, method, precision="16-mixed"
    )
    assert used == method
    g = [1e35 * s.double() for s in subs]
    np.testing.assert_allclose(small[0], [float(v @ v) for v in g], rtol=1e-6)
    np.testing.assert_allclose(big[0], float(((g[0] + g[1]) / 2) @ ((g[0] + g[1]) / 2)), rtol=1e-6)
    fp32, _, _ = _micro_sq_norms(loss_at, {"theta": theta}, lambda e: subs, 1, 2, method, precision="32")
    np.testing.assert_allclose(fp32, small, rtol=1e-6)


def test_ragged_list_of_batches_falls_back_to_the_loop():
    """Dict batches padded to different lengths (a list of batches, read in order): sub-batches of different shapes
    cannot be stacked for vmap, so the loop runs; the numbers still equal the float64 reference."""
    model = _gpt2()
    g = torch.Generator().manual_seed(0)
    batches = []
    for t in (6, 8, 6, 8):
        ids = torch.randint(0, 64, (4, t), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    res = noise_scale(model, batches, small_batch=2, big_batch=4, num_estimates=4, dtype=torch.float64)
    assert res.method == "loop" and res.finite_population is True and res.settings["num_samples"] == 16
    draws = [
        [
            (lambda m, b=b, a=a: m(input_ids=b["input_ids"][a : a + 2], labels=b["labels"][a : a + 2]).loss)
            for a in (0, 2)
        ]
        for b in batches
    ]
    _assert_matches(res, _reference(model, draws, 2, 4, 16))
    with pytest.raises(ConfigError, match="method='vmap' is not allowed with these batches"):
        noise_scale(model, batches, small_batch=2, big_batch=8, num_estimates=2, method="vmap")
