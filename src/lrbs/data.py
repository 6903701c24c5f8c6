"""Embedded datasets: MNIST-1D generated locally, small synthetic sets, CIFAR-10 from a user-given directory.

Nothing here downloads anything. MNIST-1D is produced by the ``mnist1d`` package's ``make_dataset`` with its default
arguments (4000 train / 1000 test, 40 features, 10 classes; Greydanus 2020, arXiv 2011.14439) and cached as an
``.npz`` file in the user cache directory (``$LRBS_CACHE`` or ``~/.cache/lrbs``), written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._util import atomic_write
from .errors import ConfigError, DataError, check_int, unknown_name

__all__ = ["Dataset", "Split", "load_dataset", "list_datasets", "cache_dir"]


class Split(torch.utils.data.Dataset):
    """One split of a dataset: tensors ``x`` (float32) and ``y`` (int64), usable as a torch Dataset."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise DataError(f"x has {len(x)} rows but y has {len(y)}: they must match")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def subset(self, n: int, seed: int = 0) -> Split:
        """A seeded random subset of ``n`` samples (all of them if ``n >= len(self)``)."""
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n]
        return Split(self.x[idx], self.y[idx])

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, x={tuple(self.x.shape)})"


@dataclass(frozen=True)
class Dataset:
    """A classification dataset with fixed train and test splits.

    Attributes:
        name: registry name (``"mnist1d"``, ``"blobs"``, ``"teacher"``, ``"cifar10"``).
        num_classes: number of classes.
        input_shape: shape of one input sample.
        train, test: the splits.
        meta: the arguments that produced it.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train: Split
    test: Split
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """A stable hash (sha256, 16 hex digits) of the contents of both splits."""
        cached = self.meta.get("_fingerprint")
        if cached:
            return cached
        h = hashlib.sha256()
        for split in (self.train, self.test):
            h.update(np.ascontiguousarray(split.x.numpy()).tobytes())
            h.update(np.ascontiguousarray(split.y.numpy()).tobytes())
        fp = h.hexdigest()[:16]
        self.meta["_fingerprint"] = fp
        return fp

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary recorded with every result."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "n_train": len(self.train),
            "n_test": len(self.test),
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``path`` if given, else ``$LRBS_CACHE``, else ``~/.cache/lrbs``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("LRBS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lrbs"


def _mnist1d(cache: str | os.PathLike | None = None, limit: int | None = None) -> Dataset:
    path = cache_dir(cache) / "mnist1d_default.npz"
    arrays = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # a corrupt cache is regenerated, never trusted
            arrays = None
    if arrays is None:
        from mnist1d.data import get_dataset_args, make_dataset

        # make_dataset seeds numpy's global RNG; keep the caller's random state untouched.
        state = np.random.get_state()
        try:
            d = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(state)
        arrays = {
            "x": d["x"].astype(np.float32),
            "y": d["y"].astype(np.int64),
            "x_test": d["x_test"].astype(np.float32),
            "y_test": d["y_test"].astype(np.int64),
        }
        with contextlib.suppress(OSError):  # an unwritable cache only costs regeneration next time
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: np.savez(f, **arrays))
    train = Split(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]))
    test = Split(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))
    if limit is not None:
        train = train.subset(check_int("limit", limit, low=1))
    return Dataset("mnist1d", 10, (40,), train, test, {"limit": limit})


def _blobs(
    n_train: int = 512,
    n_test: int = 256,
    num_features: int = 8,
    num_classes: int = 3,
    spread: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """Gaussian clusters around random centres (a fast, easy classification set for tests)."""
    n_train = check_int("n_train", n_train, low=1)
    n_test = check_int("n_test", n_test, low=1)
    num_features = check_int("num_features", num_features, low=1)
    num_classes = check_int("num_classes", num_classes, low=2)
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, num_features, generator=g) * 2.0

    def draw(n: int) -> Split:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = centres[y] + spread * torch.randn(n, num_features, generator=g)
        return Split(x.float(), y)

    options = {"n_train": n_train, "n_test": n_test, "num_features": num_features, "num_classes": num_classes}
    return _synthetic("blobs", draw, {**options, "spread": spread, "seed": seed})


# Same parameter list shape as _blobs on purpose (duplicates tool): both are load_dataset(name, **options) entries
# taking the same size / feature / class options.
def _teacher(
    n_train: int = 1024,
    n_test: int = 512,
    num_features: int = 16,
    num_classes: int = 4,
    hidden: int = 32,
    seed: int = 0,
) -> Dataset:
    """Labels from a random two-layer tanh teacher network (realizable, non-linear)."""
    n_train = check_int("n_train", n_train, low=1)
    n_test = check_int("n_test", n_test, low=1)
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(num_features, hidden, generator=g) / num_features**0.5
    w2 = torch.randn(hidden, num_classes, generator=g) / hidden**0.5

    def draw(n: int) -> Split:
        x = torch.randn(n, num_features, generator=g)
        y = (torch.tanh(x @ w1) @ w2).argmax(1)
        return Split(x.float(), y)

    options = {"n_train": n_train, "n_test": n_test, "num_features": num_features, "num_classes": num_classes}
    return _synthetic("teacher", draw, {**options, "hidden": hidden, "seed": seed})


def _synthetic(name: str, draw: Callable[[int], Split], options: dict[str, Any]) -> Dataset:
    """A synthetic ``Dataset`` of ``num_features`` features: the train split drawn first, then the test split
    (from the same generator, so the order matters), ``options`` recorded as given."""
    train = draw(options["n_train"])
    test = draw(options["n_test"])
    return Dataset(name, options["num_classes"], (options["num_features"],), train, test, options)


_CIFAR_RECORD = 1 + 3072


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DataError(f"CIFAR-10 file {str(path)!r} is missing")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        full = raw.size // _CIFAR_RECORD
        raise DataError(
            f"CIFAR-10 file {str(path)!r} is truncated or malformed: {raw.size} bytes is not a multiple of "
            f"{_CIFAR_RECORD} (1 label byte + 3072 pixel bytes); the record starting at byte "
            f"{full * _CIFAR_RECORD} is incomplete"
        )
    rec = raw.reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0].astype(np.int64)
    bad = np.nonzero(labels > 9)[0]
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"CIFAR-10 file {str(path)!r} is malformed: label {labels[i]} at byte {i * _CIFAR_RECORD} "
            "is not in 0..9"
        )
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def _cifar10(path: str | os.PathLike | None = None, limit: int | None = None, seed: int = 0) -> Dataset:
    if path is None:
        raise ConfigError(
            "path=None is not allowed for 'cifar10': give the directory holding data_batch_*.bin"
        )
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"path={str(root)!r} is not a directory holding CIFAR-10 binary files")
    train_files = sorted(root.glob("data_batch_*.bin"))
    if not train_files:
        raise DataError(f"no data_batch_*.bin files in {str(root)!r} (the CIFAR-10 binary version is needed)")
    parts = [_read_cifar_file(f) for f in train_files]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_cifar_file(root / "test_batch.bin")
    mean = xtr.reshape(len(xtr), 3, -1).mean(axis=(0, 2)).reshape(1, 3, 1, 1) / 255.0
    std = xtr.reshape(len(xtr), 3, -1).std(axis=(0, 2)).reshape(1, 3, 1, 1) / 255.0 + 1e-8

    def split(x, y):
        xf = (x.astype(np.float32) / 255.0 - mean.astype(np.float32)) / std.astype(np.float32)
        return Split(torch.from_numpy(np.ascontiguousarray(xf)), torch.from_numpy(y))

    train, test = split(xtr, ytr), split(xte, yte)
    if limit is not None:
        limit = check_int("limit", limit, low=1)
        train = train.subset(limit, seed)
        test = test.subset(max(1, limit // 5), seed)
    return Dataset("cifar10", 10, (3, 32, 32), train, test, {"path": str(root), "limit": limit})


_REGISTRY = {"mnist1d": _mnist1d, "blobs": _blobs, "teacher": _teacher, "cifar10": _cifar10}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_REGISTRY)


def load_dataset(name: str = "mnist1d", **kw: Any) -> Dataset:
    """Load a dataset by name.

    Args:
        name: ``"mnist1d"`` (default; generated locally, cached), ``"blobs"``, ``"teacher"`` (seeded synthetic sets),
            or ``"cifar10"`` (``path=`` a directory in the official binary format; optional ``limit=``).
        **kw: the loader's options (``cache=``, ``limit=``, ``seed=``, ``n_train=``, ...).

    Raises:
        ConfigError: unknown name (the message lists the known ones) or bad options.
        DataError: missing, truncated or malformed files (which file, which byte).

    Example:
        >>> ds = load_dataset("blobs", n_train=10, n_test=5)
        >>> len(ds.train), ds.input_shape
        (10, (8,))
    """
    if name not in _REGISTRY:
        raise unknown_name("dataset", name, _REGISTRY)
    try:
        return _REGISTRY[name](**kw)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ConfigError(f"load_dataset({name!r}) got an unknown option: {e}") from None
        raise
