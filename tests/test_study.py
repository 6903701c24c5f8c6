"""End to end: `lrbs study --quick` on the embedded data, its report, its store, its resume and a browser.

The quick study runs once per session (module fixture); every test below reads its outputs.
"""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest

from lrbs.cli import main
from lrbs.papers import PAPERS
from lrbs.report import read_report_data


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    t0 = time.perf_counter()
    code = main(["study", "--quick", "--out", str(out)])
    seconds = time.perf_counter() - t0
    assert code == 0
    return out, seconds


def test_report_and_store_exist(study):
    out, seconds = study
    print(f"quick study: {seconds:.0f}s")
    assert (out / "report.html").stat().st_size > 10_000
    assert (out / "lab.sqlite").exists()


def test_report_has_every_section(study):
    out, _ = study
    html = (out / "report.html").read_text()
    data = read_report_data(html)
    ids = {s["id"] for s in data["sections"]}
    assert ids >= set(PAPERS) | {"overview"}
    for name in PAPERS:
        assert f'id="{name}"' in html
    # figures are embedded, nothing is fetched from the network
    assert "data:image/" in html
    assert 'src="http' not in html and 'href="http' not in html
    verdicts = [f["verdict"] for f in data["summary_findings"]]
    assert verdicts and set(verdicts) <= {"reproduced", "not reproduced", "inconclusive"}


def _flat(x, prefix=""):
    if isinstance(x, dict):
        if set(x) == {"value", "uncertainty"}:
            yield prefix, (x["value"], x["uncertainty"])
            return
        for k, v in x.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(x, list):
        if len(x) == 2 and all(isinstance(v, (int, float)) or v is None for v in x):
            yield prefix, tuple(x)
        else:
            for i, v in enumerate(x):
                yield from _flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def _norm(v):
    """A (value, uncertainty) pair in any of its encodings -> tuple."""
    if isinstance(v, dict) and set(v) == {"value", "uncertainty"}:
        return (v["value"], v["uncertainty"])
    if isinstance(v, list):
        return tuple(v)
    return v


def _scalars(v):
    return list(v) if isinstance(v, tuple) else [v]


def _close(a, b) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if a is None or b is None:  # stored as null: NaN in the report
        other = b if a is None else a
        return other is None or (isinstance(other, float) and np.isnan(other))
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    if np.isnan(a) and np.isnan(b):
        return True
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))


def test_numbers_in_report_equal_numbers_in_store(study):
    out, _ = study
    data = read_report_data((out / "report.html").read_text())
    con = sqlite3.connect(out / "lab.sqlite")
    stored = {}
    for cfg, res in con.execute("select config, result from runs where kind = 'paper'"):
        stored[json.loads(cfg)["paper"]] = json.loads(res)
    assert set(stored) == set(PAPERS)
    report_findings = data["summary_findings"]
    store_findings = [f for name in PAPERS for f in stored[name]["findings"]]
    assert len(report_findings) == len(store_findings)
    checked = 0
    for rf, sf in zip(report_findings, store_findings):
        assert rf["claim"] == sf["claim"] and rf["verdict"] == sf["verdict"]
        for key, value in rf["numbers"].items():
            assert _close(_norm(value), _norm(sf["numbers"][key])), (rf["claim"], key)
            checked += 1
        # and every finding number is one of the paper's stored numbers
        nums = stored[rf["section"]]["numbers"]
        flat_vals = [c for _, v in _flat(nums) for c in _scalars(v)]
        for _, value in _flat(sf["numbers"]):
            for c in _scalars(value):
                assert any(_close(c, v) for v in flat_vals), (rf["claim"], c)
    assert checked > 10


def test_second_run_skips_finished_work(study):
    out, first = study
    con = sqlite3.connect(out / "lab.sqlite")
    before = con.execute("select count(*) from runs where kind in ('train', 'measure')").fetchone()[0]
    t0 = time.perf_counter()
    assert main(["study", "--quick", "--out", str(out)]) == 0
    second = time.perf_counter() - t0
    after = con.execute("select count(*) from runs where kind in ('train', 'measure')").fetchone()[0]
    assert after == before  # nothing trained or measured again
    print(f"first run {first:.0f}s, second run {second:.1f}s")
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"


def test_bad_study_arguments(capsys, tmp_path):
    assert main(["study", "--papers", "keskar2017", "--out", str(tmp_path)]) == 2
    assert "Did you mean 'keskar2017large'" in capsys.readouterr().err
    assert main(["study", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "seeds=0" in capsys.readouterr().err


def test_study_report_in_chromium(study, tmp_path):
    """Headless Chromium opens the study's report from disk: a non-blank screenshot, no console errors."""
    from test_report_browser import CHROMIUM, console_lines, run_chromium

    if CHROMIUM is None:
        pytest.skip("chromium not installed")
    import matplotlib.image as mpimg

    out, _ = study
    shot = tmp_path / "study.png"
    proc = run_chromium(
        tmp_path,
        (out / "report.html").as_uri(),
        f"--screenshot={shot}",
        "--window-size=1280,1800",
        "--virtual-time-budget=5000",
    )
    assert shot.exists(), proc.stderr[-2000:]
    assert console_lines(proc.stderr) == []
    img = mpimg.imread(shot)[..., :3]
    assert 0.03 < float(np.mean(np.any(img < 0.94, axis=-1))) < 0.8


def test_ray_backend_gives_the_same_numbers_as_local(tmp_path):
    """`lrbs study --backend ray` fans independent training runs out as Ray tasks: same numbers as local."""
    ray = pytest.importorskip("ray")
    outs = {}
    try:
        for backend in ("local", "ray"):
            out = tmp_path / backend
            argv = ["study", "--quick", "--papers", "smith2018dont", "--backend", backend, "--out", str(out)]
            assert main(argv) == 0
            con = sqlite3.connect(out / "lab.sqlite")
            (res,) = con.execute("select result from runs where kind = 'paper'").fetchone()
            outs[backend] = json.loads(res)["numbers"]
    finally:
        ray.shutdown()  # leave no cluster behind for later tests
    assert outs["ray"] == outs["local"]
