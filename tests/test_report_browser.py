"""End to end: a real headless Chromium opens a rendered report from disk.

Two independent checks, each with a control that shows the check can fail:

1. Screenshot + console log. Chromium runs with ``--enable-logging=stderr --v=0``; every message a page writes
   to the console (uncaught errors, blocked resources, CSP violations) appears on stderr as a line containing
   ``:CONSOLE`` (``INFO:CONSOLE`` in Chromium 150, ``ERROR:CONSOLE`` in older builds). The report has no
   JavaScript, so it must log nothing. The screenshot must not be blank.
2. A DOM probe. A copy of the page gets a small inline script (and a CSP that allows it) which, after load,
   records into the DOM: errors caught by ``window.onerror``, how many images decoded (``naturalWidth > 0``),
   and the summary read back with the browser's own ``JSON.parse`` of the ``lrbs-data`` block. ``--dump-dom``
   prints the DOM; the test parses the record. The escaping payload tries to set ``data-pwned`` on ``<body>``:
   because the probe copy allows inline script, an unescaped payload would run and be seen.

Skipped only where Chromium is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lrbs.report import Figure, Finding, Report, Section, Table, plot_bars, plot_curves, write_html  # noqa: E402


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")

PAYLOAD = (
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
    "<script>document.title='pwned'</script>"
)
CONSOLE = re.compile(r":CONSOLE|Uncaught", re.I)


def run_chromium(tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp)


def console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if CONSOLE.search(ln)]


def make_report() -> Report:
    xs = np.geomspace(1e-3, 1.0, 8)
    return Report(
        "Browser check " + PAYLOAD,
        summary_findings=[
            Finding(
                "Claim one " + PAYLOAD, "evidence", "reproduced", {"gap": (1.83, 0.31)}, section="paper-a"
            ),
            Finding("Claim two", "evidence " + PAYLOAD, "not reproduced", {"ratio": 1.05}),
            Finding("Claim three", "evidence", "inconclusive", {"n": 3, "x": float("nan")}),
        ],
        sections=[
            Section(
                "paper-a",
                "Paper A " + PAYLOAD,
                intro="An intro " + PAYLOAD,
                figures=[
                    Figure(
                        "Curves", plot_curves(xs, {"a": xs, "b": xs**0.5}, "lr", "loss", logx=True), "svg"
                    ),
                    Figure("Bars", plot_bars(["a", "b"], [1.0, 2.0], [0.1, 0.2]), "png", format="png"),
                ],
                tables=[Table("T", ["a", "b " + PAYLOAD], [[1, (0.5, 0.01)], [PAYLOAD, None]])],
                settings={"k": PAYLOAD},
            )
        ],
        settings={"date": "2026-01-02", "seed": 0, "payload": PAYLOAD},
        warnings=[PAYLOAD],
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    return write_html(make_report(), tmp_path_factory.mktemp("report") / "report.html")


def test_screenshot_not_blank_and_console_clean(page, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    proc = run_chromium(
        tmp_path,
        page.as_uri(),
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        "--virtual-time-budget=5000",
    )
    assert shot.exists(), proc.stderr[-2000:]
    assert console_lines(proc.stderr) == []
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1280)
    rgb = (img * 255).round().astype(np.int64).reshape(-1, 3)
    colours = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
    assert len(colours) > 50  # text, badges, figures: many distinct colours
    non_white = np.mean(np.any(img < 0.94, axis=-1))
    assert 0.03 < non_white < 0.8, non_white  # a page with content, not blank and not a solid block
    # the header text is dark on white: the top band has near-black pixels
    assert np.any(np.all(img[:200] < 0.3, axis=-1))
    # the three verdict badge colours (green, red, grey text) appear in the summary
    for rgb in ((0x1A, 0x7F, 0x37), (0xCF, 0x22, 0x2E)):
        close = np.all(np.abs(img * 255 - np.array(rgb)) < 40, axis=-1)
        assert close.sum() > 20, rgb


def test_console_check_detects_errors(tmp_path):
    """The control: a broken page is caught by the same log check (so a clean log means something)."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><p>x</p><script>throw new Error('probe-boom')</script></body></html>"
    )
    proc = run_chromium(tmp_path, bad.as_uri(), "--dump-dom", "--virtual-time-budget=2000")
    assert any("probe-boom" in ln for ln in console_lines(proc.stderr)), proc.stderr[-2000:]


PROBE = """<script>
window.__errors = [];
window.onerror = function (msg) { window.__errors.push(String(msg)); };
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('main img'));
  var data = JSON.parse(document.getElementById('lrbs-data').textContent);
  var out = document.createElement('pre');
  out.id = 'probe-result';
  out.textContent = JSON.stringify({
    errors: window.__errors,
    images: imgs.length,
    decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    claims: data.summary_findings.map(function (f) { return f.claim; }),
    gap: data.summary_findings[0].numbers.gap,
    xIsNull: data.summary_findings[2].numbers.x === null,
    pwned: document.body.hasAttribute('data-pwned'),
    title: document.title,
    scripts: document.querySelectorAll('script').length
  });
  document.body.appendChild(out);
});
</script>"""


def test_dom_probe(page, tmp_path):
    html = page.read_text(encoding="utf-8")
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    assert csp and "default-src 'none'" in csp.group(1)
    # the probe copy: the same page plus the probe, with inline script allowed (images still data: only)
    probed = html.replace(csp.group(1), csp.group(1) + "; script-src 'unsafe-inline'").replace(
        "</head>", PROBE + "\n</head>", 1
    )
    copy = tmp_path / "probed.html"
    copy.write_text(probed, encoding="utf-8")
    proc = run_chromium(tmp_path, copy.as_uri(), "--dump-dom", "--virtual-time-budget=5000")
    m = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    import html as html_lib

    result = json.loads(html_lib.unescape(m.group(1)))
    assert result["errors"] == []
    assert result["images"] == 2 and result["decoded"] == 2  # both figures (svg and png) decode
    assert result["claims"][0] == "Claim one " + PAYLOAD  # the browser reads the escaped JSON back exactly
    assert result["gap"] == {"value": 1.83, "uncertainty": 0.31}
    assert result["xIsNull"] is True  # NaN -> null (the one JSON rule); the page itself shows n/a
    assert result["pwned"] is False and result["title"] == "Browser check " + PAYLOAD
    assert result["scripts"] == 2  # the probe and the JSON block: the payload made no script element
    assert console_lines(proc.stderr) == []
