"""`lrbs study --jobs N`: the same numbers as `--jobs 1`, bad values of --jobs, and a worker killed mid-study.

A reduced study (quick scale, the two batch-size papers that share their training runs: goyal2017accurate and
mccandlish2018empirical) runs once with --jobs 1 (module fixture, the reference) and once with --jobs 2; every
stored result, checkpoint and array must be bitwise the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lrbs.cli import main
from lrbs.errors import ConfigError
from lrbs.report import read_report_data
from lrbs.study import run_study

PAPERS = "goyal2017accurate,mccandlish2018empirical"
TIMING = ("wall_time", "seconds")  # the only stored values allowed to differ


def _study(out: Path, jobs: int, *extra: str) -> int:
    return main(["study", "--quick", "--papers", PAPERS, "--jobs", str(jobs), "--out", str(out), *extra])


def _contents(out: Path) -> dict:
    """Every run of the store: kind, status, result without timings, and the bytes of its artifacts."""
    con = sqlite3.connect(out / "lab.sqlite")
    runs = {}
    for key, kind, status, result in con.execute("select key, kind, status, result from runs"):
        res = {k: v for k, v in json.loads(result or "{}").items() if k not in TIMING}
        arts = {}
        for akind, path in con.execute("select kind, path from artifacts where run = ?", (key,)):
            f = out / "lab_artifacts" / path
            if f.suffix == ".npz":
                with np.load(f) as z:
                    arts[akind] = {n: z[n].tobytes() for n in z.files}
            else:
                arts[akind] = hashlib.sha256(f.read_bytes()).hexdigest()
        runs[key] = (kind, status, res, arts)
    con.close()
    return runs


def _started(out: Path) -> dict[str, float]:
    con = sqlite3.connect(out / "lab.sqlite")
    rows = dict(con.execute("select key, started from runs where kind in ('train', 'measure')").fetchall())
    con.close()
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs1")
    assert _study(out, 1) == 0
    return out


def test_jobs_2_gives_bitwise_the_numbers_of_jobs_1(reference, tmp_path):
    assert _study(tmp_path, 2) == 0
    ref, par = _contents(reference), _contents(tmp_path)
    assert set(par) == set(ref)
    kinds = [v[0] for v in ref.values()]
    assert kinds.count("train") >= 8 and kinds.count("measure") >= 10 and kinds.count("paper") == 2
    for key in ref:
        assert par[key] == ref[key], ref[key][:3]
    a = read_report_data((reference / "report.html").read_text())
    b = read_report_data((tmp_path / "report.html").read_text())
    assert a["summary_findings"] == b["summary_findings"]
    assert a["warnings"] == b["warnings"]


def test_bad_jobs(capsys, reference, tmp_path):
    for bad in ("0", "-3"):
        assert main(["study", "--quick", "--jobs", bad, "--out", str(tmp_path)]) == 2
        assert f"jobs={bad} is not allowed: must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "lab.sqlite").exists()  # nothing written
    with pytest.raises(ConfigError, match="jobs=0 is not allowed"):
        run_study(tmp_path, quick=True, jobs=0)
    # more jobs than CPUs is allowed, with a note; a finished study is served from the store
    before = _started(reference)
    jobs = os.cpu_count() + 1
    assert _study(reference, jobs) == 0
    assert f"note: jobs={jobs} x threads=1 is more than the" in capsys.readouterr().out
    assert _started(reference) == before


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _cpu(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime


def _busy_worker(driver: int, timeout: float = 300.0) -> int:
    """A worker process of the study (a grandchild, forked by the fork server) that is computing (an idle one
    waits on a pipe and uses no CPU)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        workers = [w for c in _children(driver) for w in _children(c)]
        before = {w: _cpu(w) for w in workers}
        time.sleep(0.5)
        for w in workers:
            if _cpu(w) - before[w] >= 3:  # >= 30 ms of CPU in 0.5 s
                return w
    raise AssertionError("no busy worker found")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_killed_worker_loses_only_its_run_and_a_rerun_completes(reference, tmp_path):
    log = tmp_path / "log.txt"  # goyal2017accurate alone: 7 training runs, all of them in the reference store
    argv = [sys.executable, "-m", "lrbs", "study", "--quick", "--papers", "goyal2017accurate", "--jobs", "2"]
    with log.open("w") as fh:
        proc = subprocess.Popen([*argv, "--out", str(tmp_path)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        victim = _busy_worker(proc.pid)
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=300) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert f"worker process {victim} died (killed by SIGKILL)" in text, text[-3000:]
    assert "run the same command again to complete the study" in text
    done = _started(tmp_path)
    assert len(done) >= 1  # the other runs finished and were stored
    assert subprocess.run([*argv, "--out", str(tmp_path)], capture_output=True).returncode == 0
    after = _started(tmp_path)
    assert all(after[k] == v for k, v in done.items())  # nothing finished was computed again
    ref, res = _contents(reference), _contents(tmp_path)
    assert len(res) == 8 and all(res[k] == ref[k] for k in res)  # 7 runs and the paper, as with --jobs 1
