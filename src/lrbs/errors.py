"""One base error, its subclasses, and the argument checks used at every public boundary.

Every message names the argument, the value it got and what is allowed, e.g.
``lr=-0.1 is not allowed: must be a finite number > 0``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any


class LrbsError(Exception):
    """Base class of every error lrbs raises on purpose."""


class ConfigError(LrbsError, ValueError):
    """An argument has a value outside what is allowed."""


class LrbsTypeError(LrbsError, TypeError):
    """An argument has the wrong type."""


class DataError(LrbsError, ValueError):
    """A dataset is missing, malformed or truncated."""


class ShapeError(LrbsError, ValueError):
    """A tensor's shape does not match what the model or the parameters need."""


class StoreError(LrbsError, RuntimeError):
    """The results store cannot be opened or written."""


class CheckpointError(LrbsError, ValueError):
    """A checkpoint file is missing, corrupt or does not fit the model."""


class DependencyError(LrbsError, ImportError):
    """An optional dependency (an extra) is not installed."""


def closest(value: str, options: Iterable[str]) -> str | None:
    """The closest known name to ``value`` (for "did you mean ...?"), or None."""
    matches = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(value: Any, options: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` with the closest of ``options`` to ``value``, or ``""`` when none is close: the one
    hint every "unknown name" error of lrbs appends."""
    hint = closest(str(value), options)
    return f" Did you mean {hint!r}?" if hint else ""


def unknown_name(kind: str, value: Any, options: Iterable[str]) -> ConfigError:
    """Build the error for an unknown registry name, listing the known ones and the closest."""
    options = sorted(options)
    return ConfigError(f"unknown {kind} {value!r}.{did_you_mean(value, options)} Known: {', '.join(options)}")


def check_choice(name: str, value: Any, options: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``options``, else raise naming the closest one."""
    options = list(options)
    if value not in options:
        raise ConfigError(
            f"{name}={value!r} is not allowed: must be one of {options}.{did_you_mean(value, options)}"
        )
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = True,
) -> float:
    """Check that ``value`` is a finite real number within the given bounds and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise LrbsTypeError(f"{name}={value!r} is not allowed: must be a real number")
    x = float(value)
    rng = _range_text(low, high, low_inclusive, high_inclusive)
    if not math.isfinite(x):
        raise ConfigError(f"{name}={value!r} is not allowed: must be a finite number{rng}")
    if low is not None and (x < low or (x == low and not low_inclusive)):
        raise ConfigError(f"{name}={value!r} is not allowed: must be a finite number{rng}")
    if high is not None and (x > high or (x == high and not high_inclusive)):
        raise ConfigError(f"{name}={value!r} is not allowed: must be a finite number{rng}")
    return x


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    return check_number(name, value, low=0.0)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Check that ``value`` is an integer (not bool) with ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            ok = isinstance(value, np.integer)
        except ImportError:  # pragma: no cover
            ok = False
        if not ok:
            raise LrbsTypeError(f"{name}={value!r} is not allowed: must be an integer")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        lo = f">= {low}" if low is not None else ""
        hi = f"<= {high}" if high is not None else ""
        both = " and ".join(s for s in (lo, hi) if s)
        raise ConfigError(f"{name}={value!r} is not allowed: must be an integer {both}")
    return v


def _range_text(low, high, low_inclusive, high_inclusive) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if high_inclusive else '<'} {high:g}")
    return (" " + " and ".join(parts)) if parts else ""
