"""Timing helpers, the device the benchmarks run on, and the hardware limit (measured peak float32 matmul rate).

``python -m bench --device cuda`` selects the GPU for every benchmark (:func:`set_device`); a benchmark reads it
with :func:`device` and puts our code *and* the peer on it. Timings on a GPU synchronize before reading the
clock (:func:`sync`), so that they measure the work and not the kernel launches.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

_DEVICE = [torch.device("cpu")]


class DeviceError(RuntimeError):
    """The requested benchmark device is not available here."""


def check_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device that exists on this machine.

    Raises:
        DeviceError: a CUDA device without a usable GPU (or a bad index), or any other device type.
    """
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not allowed: must be 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"--device {name!r} is not allowed: must be 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {name!r} is not allowed here: torch {torch.__version__} sees no CUDA GPU "
            f"(torch.cuda.is_available() is False); use --device cpu"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceError(f"--device {name!r} is not allowed: this machine has {count} CUDA device(s)")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def set_device(name: str | torch.device) -> torch.device:
    """Select the device every benchmark runs on (validated by :func:`check_device`); returns it."""
    _DEVICE[0] = check_device(str(name))
    peak_gflops.cache_clear()
    return _DEVICE[0]


def device() -> torch.device:
    """The device the benchmarks run on (CPU unless :func:`set_device` chose another)."""
    return _DEVICE[0]


def on_cuda() -> bool:
    return _DEVICE[0].type == "cuda"


def sync() -> None:
    """Wait for the benchmark device's queued work (a no-op on CPU)."""
    if on_cuda():
        torch.cuda.synchronize(_DEVICE[0])


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs (device-synchronized)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=1)
def peak_gflops(n: int | None = None, repeat: int = 5) -> float:
    """Measured float32 matmul rate (GFLOP/s) on the benchmark device: the hardware limit we compare to.

    On CPU at the current torch thread count with ``n = 1024``; on a GPU with ``n = 8192`` (a 1024 matmul does
    not fill one) and TF32 off, so the number is true float32.
    """
    dev = device()
    n = n or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    if dev.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            t = timeit(lambda: a @ b, repeat=repeat, warmup=2)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    else:
        t = timeit(lambda: a @ b, repeat=repeat, warmup=2)
    return 2 * n**3 / t / 1e9


def pct_of_peak(gflop: float | None, seconds: float) -> float | None:
    """Achieved fraction of the peak matmul rate, in percent."""
    if gflop is None or seconds <= 0:
        return None
    return 100.0 * gflop / seconds / peak_gflops()


def row(
    benchmark: str,
    case: str,
    ours_s: float,
    peer: str = "",
    peer_s: float | None = None,
    gflop: float | None = None,
    note: str = "",
) -> dict:
    """One result row in the shared format."""
    return {
        "benchmark": benchmark,
        "case": case,
        "ours_s": ours_s,
        "peer": peer,
        "peer_s": peer_s,
        "ratio": (ours_s / peer_s) if peer_s else None,
        "gflop": gflop,
        "pct_peak": pct_of_peak(gflop, ours_s),
        "note": note,
    }
