"""The one copy of four small things every module needs: JSON data, atomic writes, number formatting, progress bars.

**JSON (one rule).** :func:`jsonable` turns results into plain JSON data: numpy and torch scalars become Python
numbers, arrays and tensors lists, tuples and sets lists, mappings dicts with ``str`` keys, paths strings, objects
with ``to_dict()`` their dict, anything else its ``repr`` (with ``strict=True``: an error).
**Non-finite floats (NaN, +-inf) become ``None``** (JSON ``null``) everywhere — the store, sidecars, the report's
embedded data — so every file lrbs writes is strict JSON (``json.dumps(..., allow_nan=False)`` accepts it) and a
reader sees "no value" rather than a number.
:func:`dumps` is ``json.dumps`` of that data with ``allow_nan=False``.

**Atomic writes.** :func:`atomic_write` writes through a temporary file in the target's folder, flushes and
``fsync``s it, ``os.replace``s it over the target and fsyncs the folder: after a crash the target is either the old
file or the whole new one, never a torn mix.

**Formatting.** :func:`fmt` is the one number format of the report and the papers' tables (see its docstring);
:func:`pm` formats a ``(mean, spread)`` pair with it.

**Progress bars.** :func:`progress` is the one rich progress bar (rich is imported only when a bar is shown): a
context manager that yields a :class:`ProgressBar` with ``advance(n, **fields)``; a no-op when disabled.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import LrbsTypeError

__all__ = ["ProgressBar", "atomic_write", "dumps", "fmt", "item", "jsonable", "pm", "progress"]


def jsonable(x: Any, *, strict: bool = False) -> Any:
    """``x`` as plain JSON data, non-finite floats as ``None`` (the module docstring states the rule).

    Args:
        x: the data.
        strict: raise instead of writing an unknown object as its ``repr`` (for numbers that must stay numbers,
            such as the papers' results: a stray object is a bug to report, not a string to store).

    Raises:
        LrbsTypeError: with ``strict=True``, an object that is none of the kinds the module docstring lists.
    """
    x = _scalar(x)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): jsonable(v, strict=strict) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v, strict=strict) for v in x]
    if hasattr(x, "tolist"):  # numpy arrays, torch tensors
        return jsonable(x.tolist(), strict=strict)
    if hasattr(x, "to_dict"):
        return jsonable(x.to_dict(), strict=strict)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if strict:
        raise LrbsTypeError(
            f"{x!r} ({type(x).__name__}) is not JSON data: must be None, bool, int, float, str, a path, a list, "
            "tuple, set or mapping of them, a numpy/torch scalar or array, or an object with to_dict()"
        )
    return repr(x)


def _scalar(x: Any) -> Any:
    """numpy / torch 0-d values as Python numbers (``.item()``); everything else unchanged."""
    if callable(getattr(x, "item", None)) and getattr(x, "shape", None) == ():
        return x.item()
    return x


def dumps(data: Any, **kw: Any) -> str:
    """Strict JSON text of ``jsonable(data)`` (keyword arguments go to ``json.dumps``)."""
    return json.dumps(jsonable(data), allow_nan=False, **kw)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a ``write(f)`` callable) to ``path`` atomically and durably."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- number formatting
def fmt(x: Any, unc: Any = None, digits: int = 4) -> str:
    """Format a number for the page: ``digits`` significant digits, ``±`` for an uncertainty, NaN as ``n/a``.

    Rules (the same everywhere in lrbs):

    - floats: ``digits`` significant digits, trailing zeros dropped, exponents written ``1.5e-5``;
    - integers: exact (``50000``), unless larger than 1e15;
    - NaN and None: ``n/a``; infinities: ``inf`` / ``-inf``; bools: ``true`` / ``false``; strings unchanged;
    - a pair ``(value, uncertainty)`` is the same as ``fmt(value, uncertainty)``;
    - with an uncertainty ``u``: ``u`` keeps 2 significant digits and the value is rounded to the same decimal
      place (the usual convention for a measured value), e.g. ``fmt(0.91234, 0.01234) == "0.912 ± 0.012"``;
      very small or large values share one exponent: ``"(1.234 ± 0.012)e-7"``.

    Args:
        x: the value (float, int, numpy or torch scalar, str, None, or a ``(value, uncertainty)`` pair).
        unc: its uncertainty (a standard deviation or standard error; the caller says which in the text).
        digits: significant digits for a value without uncertainty.

    Returns:
        The formatted text.

    Example:
        >>> fmt(0.123456), fmt(2.5e-5), fmt(float("nan")), fmt(50000), fmt(0.91234, 0.01234)
        ('0.1235', '2.5e-5', 'n/a', '50000', '0.912 ± 0.012')
    """
    if unc is None and isinstance(x, (tuple, list)) and len(x) == 2:
        x, unc = x
    if unc is not None:
        return _fmt_unc(x, unc, digits)
    return _fmt1(x, digits)


def pm(pair: Any, digits: int = 4) -> str:
    """A ``(mean, spread)`` pair as ``"mean ± spread"``: ``fmt(mean, spread)`` (the papers' tables and findings).

    Example:
        >>> pm((0.91234, 0.01234))
        '0.912 ± 0.012'
    """
    mean, spread = pair
    return fmt(mean, spread, digits)


def item(x: Any) -> Any:
    """numpy / torch scalars (and 1-element arrays) as Python numbers; other values unchanged (for display)."""
    if hasattr(x, "item") and hasattr(x, "shape") and math.prod(x.shape) == 1:
        return x.item()
    return x


def _fmt1(x: Any, digits: int = 4) -> str:
    x = item(x)
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, str):
        return x
    if isinstance(x, int) and abs(x) < 10**15:
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    return _clean_exp(f"{v:.{digits}g}")


def _clean_exp(s: str) -> str:
    """``1.5e-05`` -> ``1.5e-5``, ``1.2e+07`` -> ``1.2e7``."""
    if "e" not in s:
        return s
    mant, exp = s.split("e")
    return f"{mant}e{int(exp)}"


def _fmt_unc(x: Any, unc: Any, digits: int) -> str:
    x, unc = item(x), item(unc)
    try:
        v, u = float(x), float(unc)
    except (TypeError, ValueError):
        return f"{_fmt1(x, digits)} ± {_fmt1(unc, 2)}"
    if not math.isfinite(v) or not math.isfinite(u) or u <= 0:
        return f"{_fmt1(v, digits)} ± {_fmt1(u, 2)}"
    u = float(f"{u:.2g}")  # 2 significant digits
    last = math.floor(math.log10(u)) - 1  # decimal exponent of the last digit shown
    big = max(abs(v), u)
    if 1e-3 <= big < 1e5:
        dec = max(0, -last)
        return f"{v:.{dec}f} ± {u:.{dec}f}"
    e = math.floor(math.log10(big))
    dec = max(0, e - last)
    return f"({v / 10**e:.{dec}f} ± {u / 10**e:.{dec}f})e{e}"


# --------------------------------------------------------------------------- progress bars
class ProgressBar:
    """What :func:`progress` yields: one rich task (or nothing, when the bar is off: every method is a no-op)."""

    def __init__(self, bar: Any = None, task: Any = None):
        self._bar, self._task = bar, task

    @property
    def enabled(self) -> bool:
        """Whether a bar is shown (callers may skip building field text when it is not)."""
        return self._bar is not None

    def advance(self, n: float = 1, **fields: Any) -> None:
        """Move the bar ``n`` steps on and set the given fields (the text columns named in ``progress``)."""
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **fields)

    def update(self, **fields: Any) -> None:
        """Set fields without moving the bar."""
        if self._bar is not None:
            self._bar.update(self._task, **fields)

    def complete(self, **fields: Any) -> None:
        """Fill the bar (e.g. a step that finished early or came from the store) and set fields."""
        if self._bar is not None:
            total = self._bar.tasks[0].total
            self._bar.update(self._task, completed=total if total is not None else 1, **fields)


@contextmanager
def progress(
    label: str,
    total: int | None,
    *,
    enabled: bool = True,
    fields: Mapping[str, Any] | None = None,
    completed: int = 0,
    transient: bool = True,
) -> Iterator[ProgressBar]:
    """The one progress bar of lrbs: ``label | bar | done/total | fields | elapsed < remaining``.

    rich is imported only when ``enabled``; rich decides how to draw (a live bar on a terminal, nothing live
    elsewhere). The bar stops when the block ends, also on an exception.

    Args:
        label: the text before the bar (rich markup allowed), e.g. ``"fit"``.
        total: the number of steps (None: unknown, an indeterminate bar).
        enabled: False gives a bar whose methods do nothing (and rich is not imported).
        fields: ``{name: initial text}``: one text column per field, set by ``advance(name=...)``.
        completed: steps already done (e.g. runs served from a store).
        transient: remove the bar from the terminal when the block ends (rich's ``transient``); False keeps the
            finished bar as a line.

    Example:
        >>> with progress("fit", 3, enabled=False, fields={"loss": ""}) as bar:
        ...     for step in range(3):
        ...         bar.advance(loss=f"loss {0.5:.4f}")
    """
    if not enabled:
        yield ProgressBar()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    fields = dict(fields or {})
    columns = [TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{{task.fields[{name}]}}") for name in fields]
    columns += [TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn()]
    bar = Progress(*columns, transient=transient)
    task = bar.add_task(label, total=total, completed=completed, **fields)
    bar.start()
    try:
        yield ProgressBar(bar, task)
    finally:
        bar.stop()
