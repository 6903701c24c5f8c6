"""A script that starts lrbs's workers without the ``if __name__ == "__main__":`` guard: every worker imports it
again while starting. The pool used to replace the dying workers forever (the study hung); now it stops after
a few failed starts and the error names the guard, or (the CLI, which reports its errors) the workers recover
and the run completes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lrbs.pool import STARTUP_FAILURES

GUARD = 'if __name__ == "__main__":'
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forkserver workers (Linux)")


def _run_script(
    tmp_path: Path, body: str, *args: str, timeout: float = 120
) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    return out, time.perf_counter() - t0


def test_a_pool_started_at_import_fails_fast_naming_the_guard(tmp_path):
    out, seconds = _run_script(
        tmp_path,
        """
        from lrbs.pool import WorkerPool
        pool = WorkerPool(2)
        print("RESULT", pool.submit(abs, -1).result())
        """,
    )
    assert out.returncode != 0 and "RESULT" not in out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lrbs.pool.TaskCancelled: task 'abs' was not run: the pool stopped")
    assert f"{STARTUP_FAILURES} worker processes in a row exited while starting" in last
    assert GUARD in last
    # each failed worker said why, in its own words, before it exited
    assert (
        out.stderr.count("lrbs workers cannot start from a process that is still starting")
        >= STARTUP_FAILURES
    )
    assert seconds < 60


def test_a_sweep_without_the_guard_returns_failed_runs_naming_it(tmp_path):
    """Also the runs submitted after the pool stopped: the sweep used to raise there (more runs than workers)."""
    out, _ = _run_script(
        tmp_path,
        """
        import sys
        from lrbs import sweep
        res = sweep({"model": "mlp", "steps": 2}, {"lr": [0.01, 0.1, 0.2, 0.3]}, max_concurrency=2,
                    progress=False, store=sys.argv[1])
        for r in res.runs:
            print("RUN", r.status, r.error)
        """,
        str(tmp_path / "lab.sqlite"),
    )
    runs = [line for line in out.stdout.splitlines() if line.startswith("RUN ")]
    assert out.returncode == 0 and len(runs) == 4, out.stderr[-2000:]  # more runs than workers: none raises
    for line in runs:
        assert line.startswith("RUN failed") and GUARD in line and "exited while starting" in line


def test_the_study_cli_without_the_guard_completes(tmp_path):
    """``lrbs.cli.main`` reports an error and returns, so each worker's own re-run of the script ends there and
    the worker goes on to work: the study completes, with that error printed by the workers (it used to hang)."""
    out, seconds = _run_script(
        tmp_path,
        """
        import sys
        from lrbs.cli import main
        code = main(["study", "--quick", "--papers", "smith2018dont", "--jobs", "2", "--out", sys.argv[1]])
        print("CODE", code)
        """,
        str(tmp_path / "study"),
        timeout=300,
    )
    assert out.returncode == 0 and "CODE 0" in out.stdout, out.stderr[-2000:]
    assert (tmp_path / "study" / "report.html").exists()
    assert "lrbs: error: lrbs workers cannot start from a process that is still starting" in out.stderr
    assert GUARD in out.stderr
