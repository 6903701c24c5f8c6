"""THE training step: forward under a precision, loss through the batch protocol, backward, optimizer step.

``fit``, ``ddp_train``, the range test, ``tune`` and the integrations' probes share it. This module starts with
the precision helpers (Lightning's names: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .errors import ConfigError, check_choice

__all__ = ["PRECISIONS", "autocast", "check_precision", "make_grad_scaler"]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def check_precision(precision: Any, device: torch.device | str) -> str:
    """Validate ``precision`` for ``device``: one of :data:`PRECISIONS`; ``16-mixed`` needs a CUDA device."""
    if precision in (32, "32-true", "fp32"):
        precision = "32"
    check_choice("precision", precision, PRECISIONS)
    if precision == "16-mixed" and torch.device(device).type != "cuda":
        raise ConfigError(
            f"precision='16-mixed' is not allowed on device {torch.device(device)}: float16 autocast with a "
            "GradScaler needs a CUDA GPU; use precision='bf16-mixed' (CPU or GPU) or '32'"
        )
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a null context for ``"32"``)."""
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device | str) -> Any:
    """A ``torch.amp.GradScaler`` for ``16-mixed``, else None."""
    if precision != "16-mixed":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
