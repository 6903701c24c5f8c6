"""Run a test script under torchrun: local processes (gloo, CPU) on a free port; the one launcher of the DDP
tests."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 300) -> None:
    """``python -m torch.distributed.run --nproc-per-node nproc script *args``; fails the test (with the tail of
    its output) unless every process exits 0. The free port can be taken by another process between the probe
    and torchrun's bind: a run that failed on an address in use is tried once more on a new port."""
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout[-3000:] + proc.stderr[-3000:]
        if proc.returncode == 0 or attempt or "address already in use" not in out.lower():
            break
    assert proc.returncode == 0, out
