"""DDP training under torchrun (2 gloo processes) against single-process references; the DDP noise-scale
hook."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_launch import torchrun

from lrbs.batches import Sampler
from lrbs.data import load_dataset
from lrbs.distributed import ddp_train, two_batch_noise_scale
from lrbs.errors import ConfigError
from lrbs.models import build_model
from lrbs.store import Store
from lrbs.train import train_config

CFG = {
    "model": "mlp",
    "model_opts": {"depth": 2, "width": 16},
    "dataset": "blobs",
    "dataset_opts": {"n_train": 256, "n_test": 64, "num_features": 8, "num_classes": 3},
    "lr": 0.1,
    "batch_size": 32,  # global: 16 per rank on 2 ranks
}
SCRIPT = Path(__file__).parent / "ddp_scripts" / "ddp_step.py"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(SCRIPT, str(out), json.dumps(CFG))
    return out


def _load(out: Path, name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return json.loads((out / f"{name}.json").read_text()), load_file(str(out / f"{name}.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_one_ddp_step_equals_single_process_step_at_global_batch(ddp_out):
    res, params = _load(ddp_out, "step1")
    assert res["world"] == 2 and res["status"] == "completed"
    assert res["config"]["ddp"]["per_rank_batch"] == 16 and res["config"]["ddp"]["global_batch"] == 32
    model, ref = train_config({**CFG, "steps": 1})  # one process, batch 32 = 2 x 16
    assert _max_diff(params, model.state_dict()) < 1e-6
    assert res["history"]["loss"][0] == pytest.approx(float(ref.history["loss"][0]), rel=1e-6)
    init = build_model("mlp", dataset=load_dataset("blobs", **CFG["dataset_opts"]), seed=0, depth=2, width=16)
    assert _max_diff(params, init.state_dict()) > 1e-4  # the step did move the weights


def test_three_ddp_steps_follow_single_process_training(ddp_out):
    res, params = _load(ddp_out, "step3")
    model, ref = train_config({**CFG, "steps": 3})
    assert _max_diff(params, model.state_dict()) < 1e-5
    assert res["final"]["test_acc"] == pytest.approx(ref.final["test_acc"])


def test_lr_rule_uses_the_global_batch(ddp_out):
    res, params = _load(ddp_out, "rule")
    assert res["history"]["lr"] == [0.1]  # 0.05 * 32 / 16, not 0.05 * 16 / 16 (per-rank batch)
    assert res["config"]["ddp"]["lr_factor"] == 2.0
    _, plain = _load(ddp_out, "step1")
    assert _max_diff(params, plain) < 1e-7


def test_ddp_noise_scale_matches_two_batch_estimator(ddp_out):
    res, _ = _load(ddp_out, "step3")
    h = res["history"]
    ds = load_dataset("blobs", **CFG["dataset_opts"])
    model = build_model("mlp", dataset=ds, seed=0, depth=2, width=16).double()
    idx = Sampler(len(ds.train), torch.Generator().manual_seed(0)).take(32)  # the first global batch

    def grad_sq(i: torch.Tensor) -> float:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(ds.train.x[i].double()), ds.train.y[i]).backward()
        return float(sum((p.grad**2).sum() for p in model.parameters()))

    g_small = (grad_sq(idx[:16]) + grad_sq(idx[16:])) / 2  # mean over the two ranks' batches
    g_big = grad_sq(idx)  # the union, in one process
    assert h["gns_g_small_sq"][0] == pytest.approx(g_small, rel=1e-5)
    assert h["gns_g_big_sq"][0] == pytest.approx(g_big, rel=1e-5)
    g2, tr = two_batch_noise_scale(g_small, g_big, 16, 32)
    assert g2 == pytest.approx((32 * g_big - 16 * g_small) / 16)
    assert tr == pytest.approx((g_small - g_big) / (1 / 16 - 1 / 32))
    assert h["gns_g2"][0] == pytest.approx(g2, rel=1e-4)
    assert h["gns_trace"][0] == pytest.approx(tr, rel=1e-4)
    assert h["gns_b_simple"][0] == pytest.approx(
        tr / g2, rel=1e-4
    )  # one estimate: the EMAs' debiasing cancels
    # later steps: ratio of separately smoothed EMAs, not an EMA of ratios
    beta = 0.99
    num = sum(beta ** (2 - i) * (1 - beta) * h["gns_trace"][i] for i in range(3))
    den = sum(beta ** (2 - i) * (1 - beta) * h["gns_g2"][i] for i in range(3))
    assert h["gns_b_simple"][2] == pytest.approx(max(num, 1e-8) / max(den, 1e-8), rel=1e-9)


def test_only_rank0_writes_the_store(ddp_out):
    with Store(ddp_out / "lab.sqlite", readonly=True) as st:
        runs = st.runs()
        assert len(runs) == 1 and runs[0].status == "completed"
        assert runs[0].config["ddp"]["world_size"] == 2
        steps, loss = st.series(runs[0].key, "batch_loss")
        eval_steps, train_loss = st.series(runs[0].key, "train_loss")
        _, batch_size = st.series(runs[0].key, "batch_size")
    store_res, _ = _load(ddp_out, "store")
    # every step's mini-batch loss survives (evaluation rows at the same steps no longer overwrite it)
    assert [int(s) for s in steps] == [int(s) for s in store_res["history"]["step"]] == [0, 1, 2]
    np.testing.assert_allclose(loss, store_res["history"]["loss"], rtol=1e-12)
    np.testing.assert_array_equal(batch_size, store_res["history"]["batch_size"])
    assert [int(s) for s in eval_steps] == [int(e["step"]) for e in store_res["evals"]]
    assert train_loss[-1] == pytest.approx(store_res["final"]["train_loss"])


# --------------------------------------------------------------------------------------------- one process
def test_single_process_ddp_equals_fit(tmp_path):
    cfg = {**CFG, "steps": 5, "momentum": 0.9}
    model, res = ddp_train(cfg, return_model=True)
    ref_model, ref = train_config(cfg)
    assert res.config["ddp"]["world_size"] == 1
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    assert res.final["test_loss"] == ref.final["test_loss"]
    assert all(math.isnan(v) for v in res.history["gns_b_simple"])  # one rank: no second batch size
    assert not torch.distributed.is_initialized()


def test_single_process_lr_rule_and_warmup():
    res = ddp_train(
        {
            **CFG,
            "steps": 4,
            "lr": 0.05,
            "batch_size": 64,
            "lr_rule": "sqrt",
            "base_batch_size": 16,
            "warmup": 2,
        }
    )
    lrs = list(res.history["lr"])
    assert lrs[2:] == pytest.approx([0.1, 0.1])  # 0.05 * sqrt(64 / 16)
    assert lrs[0] < lrs[1] < lrs[2]


def test_single_process_bf16_mixed_runs_the_shared_step():
    cfg = {**CFG, "steps": 5, "momentum": 0.9}
    model, res = ddp_train(cfg, return_model=True, precision="bf16-mixed", noise_scale=False)
    ref_model, ref = ddp_train(cfg, return_model=True, noise_scale=False)
    assert res.status == "completed" and res.config["ddp"]["precision"] == "bf16-mixed"
    assert "precision" not in ref.config["ddp"] and "applied" not in res.history
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(model.state_dict().values(), ref_model.state_dict().values())
    )
    assert 0 < diff < 0.05  # bfloat16 autocast changes the numbers, not the training
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"precision='16-mixed' is not allowed on device cpu"):
            ddp_train(cfg, precision="16-mixed")
    assert not torch.distributed.is_initialized()


def test_diverging_ddp_run_is_reported():
    res = ddp_train({**CFG, "steps": 20, "lr": 1e8})
    assert res.status == "diverged" and res.diverged_at is not None


def test_bad_inputs():
    with pytest.raises(ConfigError, match="lr_rule='linear' needs base_batch_size="):
        ddp_train({**CFG, "steps": 1}, lr_rule="linear")
    with pytest.raises(ConfigError, match="lr_rule='cubic' is not allowed"):
        ddp_train({**CFG, "steps": 1}, lr_rule="cubic", base_batch_size=8)
    with pytest.raises(ConfigError, match="sync_bn=True is not allowed on CPU"):
        ddp_train({**CFG, "steps": 1}, sync_bn=True)
    with pytest.raises(ConfigError, match="unknown training option 'lrr'"):
        ddp_train({**CFG, "steps": 1, "lrr": 0.1})
    with pytest.raises(ConfigError, match="b_small=32 is not allowed: must be < b_big=16"):
        two_batch_noise_scale(1.0, 1.0, 32, 16)
    from lrbs.distributed import _check_global_batch

    with pytest.raises(
        ConfigError, match="batch_size=33 .* not allowed on 2 ranks: the global batch must be divisible"
    ):
        _check_global_batch(33, 2, 256, 0)
    assert not torch.distributed.is_initialized()
