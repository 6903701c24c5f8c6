"""Shared fixtures: small models and data, and the reusable "model untouched" check."""

from __future__ import annotations

import pytest
import torch

# One thread: the models here are small, and on a loaded 2-core machine two OpenMP threads per process
# oversubscribe the cores and run up to 100x slower (measured).
torch.set_num_threads(1)


def snapshot_model(model: torch.nn.Module) -> dict:
    """Everything an analysis must leave bit-identical: parameters, buffers, requires_grad flags, training flags."""
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grads": {
            k: None if p.grad is None else p.grad.detach().clone() for k, p in model.named_parameters()
        },
        "buffers": {k: b.detach().clone() for k, b in model.named_buffers()},
        "training": {k: m.training for k, m in model.named_modules()},
    }


def assert_untouched(model: torch.nn.Module, snap: dict) -> None:
    now = snapshot_model(model)
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["training"] == snap["training"]
    assert now["params"].keys() == snap["params"].keys()
    for k in snap["params"]:
        assert torch.equal(now["params"][k], snap["params"][k]), f"parameter {k} changed"
        a, b = now["grads"][k], snap["grads"][k]
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"grad of {k} changed"
    assert now["buffers"].keys() == snap["buffers"].keys()
    for k in snap["buffers"]:
        assert torch.equal(now["buffers"][k], snap["buffers"][k]), f"buffer {k} changed"


@pytest.fixture
def untouched():
    """Usage: ``check = untouched(model)`` before the analysis, ``check()`` after it."""

    def start(model):
        snap = snapshot_model(model)
        return lambda: assert_untouched(model, snap)

    return start


@pytest.fixture(scope="session")
def mnist1d():
    from lrbs.data import load_dataset

    return load_dataset("mnist1d")


@pytest.fixture
def blobs():
    from lrbs.data import load_dataset

    return load_dataset("blobs", n_train=128, n_test=64, num_features=6, num_classes=3, seed=0)
