"""Large-batch training: accumulation is exact; SAM versus SGD at batch 1024 (Keskar sharpness, top eigenvalue)."""

from __future__ import annotations

import pytest
import torch

from lrbs.errors import ConfigError
from lrbs.recipes import accumulation_plan
from lrbs.train import fit


def test_accumulation_4x256_equals_one_batch_of_1024(mnist1d):
    from lrbs.models import build_model

    data = (mnist1d.train.x.double(), mnist1d.train.y)
    a = build_model("mlp", dataset=mnist1d, depth=2, width=32, seed=0).double()
    b = build_model("mlp", dataset=mnist1d, depth=2, width=32, seed=0).double()
    assert accumulation_plan(1024, 256) == (256,) * 4
    ra = fit(a, data, optimizer="sgd", lr=0.2, momentum=0.9, batch_size=1024, steps=8, max_micro_batch=256)
    rb = fit(b, data, optimizer="sgd", lr=0.2, momentum=0.9, batch_size=1024, steps=8)
    torch.testing.assert_close(ra.history["loss"], rb.history["loss"], rtol=1e-12, atol=1e-14)
    moved = 0.0
    for (name, pa), pb, p0 in zip(
        a.named_parameters(),
        b.parameters(),
        build_model("mlp", dataset=mnist1d, depth=2, width=32, seed=0).double().parameters(),
    ):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12, msg=name)
        moved += float((pa - p0).detach().abs().max())
    assert moved > 1e-3  # the runs did train


def test_accumulation_with_uneven_micro_batches(blobs):
    from lrbs.models import build_model

    data = (blobs.train.x.double(), blobs.train.y)
    a = build_model("mlp", dataset=blobs, depth=2, width=8, seed=0).double()
    b = build_model("mlp", dataset=blobs, depth=2, width=8, seed=0).double()
    fit(a, data, lr=0.1, batch_size=100, steps=5, max_micro_batch=30)  # 30 + 30 + 30 + 10
    fit(b, data, lr=0.1, batch_size=100, steps=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="max_micro_batch=0"):
        fit(a, data, lr=0.1, batch_size=100, steps=1, max_micro_batch=0)


def test_sam_is_flatter_than_sgd_at_batch_1024(mnist1d, untouched):
    """Foret et al.: SAM finds flatter minima. Same budget (steps), same LR, batch 1024, on MNIST-1D.

    Measured on the full training set (float64): Keskar's epsilon-sharpness (eps=1e-3, full space, 10 L-BFGS-B
    iterations) and the top Hessian eigenvalue (Lanczos). At this scale (300 steps, mlp 2x64, rho=0.05) SAM gives
    the lower top eigenvalue (3.36 vs 3.50) but NOT the lower Keskar sharpness (0.552 vs 0.511), at the same
    train loss (0.811 vs 0.809): only the eigenvalue ordering is asserted; the Keskar numbers are checked for
    sanity and reported, not tuned until SAM wins.
    """
    from lrbs.curvature import hessian_eigenvalues
    from lrbs.models import build_model
    from lrbs.objective import Objective
    from lrbs.sharpness import keskar_sharpness

    out = {}
    for opt in ("sgd", "sam"):
        model = build_model("mlp", dataset=mnist1d, depth=2, width=64, seed=0)
        res = fit(
            model,
            mnist1d,
            optimizer=opt,
            lr=0.1,
            momentum=0.9,
            batch_size=1024,
            steps=300,
            rho=0.05 if opt == "sam" else None,
        )
        check = untouched(model)
        obj = Objective(model, data=mnist1d, dtype=torch.float64, batch_size=1000)
        phi = keskar_sharpness(obj, epsilon=1e-3, max_iter=10).value
        lam = float(hessian_eigenvalues(obj, k=1, tol=1e-3).values[0])
        check()
        out[opt] = (phi, lam, res.final["train_loss"], res.final["test_acc"])
    print(f"SGD vs SAM at batch 1024 (phi, lambda_max, train loss, test acc): {out}")
    assert out["sam"][1] < out["sgd"][1]  # top Hessian eigenvalue
    assert all(0 < v[0] < 100 for v in out.values())  # Keskar phi: positive, and far from a divergent box
    assert out["sam"][2] == pytest.approx(out["sgd"][2], rel=0.05)  # same budget, comparable train loss
