"""The one copy of three small things every module needs: JSON data, atomic writes, number formatting.

**JSON (one rule).** :func:`jsonable` turns results into plain JSON data: numpy and torch scalars become Python
numbers, arrays and tensors lists, tuples and sets lists, mappings dicts with ``str`` keys, paths strings, objects
with ``to_dict()`` their dict, anything else its ``repr``. **Non-finite floats (NaN, +-inf) become ``None``**
(JSON ``null``) everywhere — the store, sidecars, the report's embedded data — so every file lrbs writes is strict
JSON (``json.dumps(..., allow_nan=False)`` accepts it) and a reader sees "no value" rather than a number.
:func:`dumps` is ``json.dumps`` of that data with ``allow_nan=False``.

**Atomic writes.** :func:`atomic_write` writes through a temporary file in the target's folder, flushes and
``fsync``s it, ``os.replace``s it over the target and fsyncs the folder: after a crash the target is either the old
file or the whole new one, never a torn mix.

**Formatting.** :func:`fmt` is the one number format of the report and the papers' tables (see its docstring);
:func:`pm` formats a ``(mean, spread)`` pair with it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "dumps", "jsonable"]


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON data, non-finite floats as ``None`` (the module docstring states the rule)."""
    x = _scalar(x)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy arrays, torch tensors
        return jsonable(x.tolist())
    if hasattr(x, "to_dict"):
        return jsonable(x.to_dict())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
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
