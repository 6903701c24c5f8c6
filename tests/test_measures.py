"""The one registry of measures (lrbs.measures): names, aliases, values against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lrbs import sharpness
from lrbs.errors import ConfigError
from lrbs.measures import ALIASES, MEASURES, Measure, canonical, get
from lrbs.objective import Objective

N, D = 64, 5


@pytest.fixture(scope="module")
def quad():
    """Linear least squares with orthogonal input columns: the Hessian is ``2 diag(s^2)`` in closed form."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=torch.float64))
    s = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5], dtype=torch.float64)
    X = U * s * math.sqrt(N)
    y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(D, 1, bias=False).double()
    obj = Objective(model, nn.functional.mse_loss, (X, y))
    return obj, 2.0 * s**2, model  # eigenvalues of H = 2 X^T X / N


def test_one_registry_with_documented_entries():
    assert sharpness.MEASURES is MEASURES  # the report, sweeps and CLI look names up in the same dict
    assert set(sharpness.DEFAULT_MEASURES) == set(MEASURES) - {"negative_mass"}
    for name, m in MEASURES.items():
        assert isinstance(m, Measure) and m.name == name and m.description
    assert canonical("top_eigenvalue") == "lambda_max" == canonical("top_eig") == canonical("lambda_max")
    assert set(ALIASES.values()) <= set(MEASURES)
    assert get("top_eigenvalue") is MEASURES["lambda_max"]
    with pytest.raises(ConfigError, match=r"unknown measure 'lamda_max'. Did you mean 'lambda_max'\?"):
        get("lamda_max")


def test_values_match_closed_forms(quad, untouched):
    obj, eig, model = quad
    check = untouched(model)
    lam = MEASURES["lambda_max"](obj, seed=0)
    assert lam == pytest.approx(float(eig.max()), rel=1e-6)
    # the old sweep call (hessian_eigenvalues' own defaults) through the registry's overrides
    assert MEASURES["lambda_max"](obj, seed=0, tol=None, tol_on=None) == pytest.approx(
        float(eig.max()), rel=1e-3
    )
    # Hutch++ with n >= dimension probes is exact up to rounding for a 5 x 5 Hessian
    assert MEASURES["trace"](obj, seed=0, num_hvps=15) == pytest.approx(float(eig.sum()), rel=1e-8)
    eos = MEASURES["edge_of_stability"].compute(obj, seed=0, lr=0.1, momentum=0.5)
    assert eos.value == pytest.approx(0.1 * float(eig.max()), rel=1e-6) and eos.threshold == 3.0
    with pytest.raises(ConfigError, match="lr=None is not allowed"):
        MEASURES["edge_of_stability"](obj, seed=0)
    # keskar_subspace clips p to the number of parameters
    assert MEASURES["keskar_subspace"].compute(obj, seed=0).subspace_dim == D
    check()
