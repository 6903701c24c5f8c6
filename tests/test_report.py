"""lrbs.report: the HTML report (escaping, embedded figures, JSON block, anchors) and the shared figures.

References are independent of the code under test: hand-written expected strings for ``fmt``, an HTML parser
for the page structure, ``json`` for the data block, closed forms (EMA weights, cosine, geometric levels) and
the input arrays themselves for the figures.
"""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")  # before any pyplot import in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lrbs.errors import ConfigError, LrbsTypeError, ShapeError  # noqa: E402
from lrbs.report import (  # noqa: E402
    Figure,
    Finding,
    Report,
    Section,
    Table,
    environment,
    fmt,
    plot_bars,
    plot_contour,
    plot_curves,
    plot_fit,
    plot_heatmap,
    plot_schedule,
    read_report_data,
    render_html,
    write_html,
)
from lrbs.train import FitResult  # noqa: E402

XSS = "<script>alert(1)</script>\"&'"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&amp;&#39;"


# --------------------------------------------------------------------------- helpers
class _Page(HTMLParser):
    """Collects element ids, src/href values, script elements and visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attr, value)
        self.scripts: list[dict] = []
        self.imgs: list[str] = []
        self.text: list[str] = []
        self.order: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
            self.order.append(a["id"])
        for attr in ("src", "href", "srcset", "action", "poster", "data"):
            if attr in a:
                self.links.append((tag, attr, a[attr]))
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True
        if tag == "img":
            self.imgs.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if not self._in_script:
            self.text.append(data)


def parse(html: str) -> _Page:
    p = _Page()
    p.feed(html)
    return p


def fake_fit(
    lr: float, batch: int, steps: int = 60, diverge_at: int | None = None, seed: int = 0
) -> FitResult:
    rng = np.random.default_rng(seed)
    loss = 2.0 * np.exp(-np.arange(steps) / 20.0) + 0.1 * rng.random(steps)
    if diverge_at is not None:
        loss[diverge_at:] = np.nan
    hist = {
        "step": np.arange(steps),
        "samples": np.arange(steps) * batch,
        "lr": np.full(steps, lr),
        "batch_size": np.full(steps, batch),
        "loss": loss,
    }
    evals = [
        {
            "step": s,
            "samples": s * batch,
            "train_loss": 1.0,
            "train_acc": 0.5,
            "test_loss": 1.0,
            "test_acc": 0.3 + s / 200,
        }
        for s in range(0, steps, 20)
    ]
    return FitResult("completed", hist, evals, evals[-1], 0.1, {"lr": lr, "batch_size": batch})


def small_png() -> bytes:
    from matplotlib.figure import Figure as MplFigure

    f = MplFigure(figsize=(2, 1.5))
    f.add_subplot().plot([0, 1], [1, 0])
    return Figure("png", f, format="png").image


FINDINGS = [
    Finding(
        "Large batches generalize worse " + XSS,
        "Test accuracy gap, B=4096 vs B=32, 3 seeds " + XSS,
        "reproduced",
        {"gap_pct": (1.8312, 0.3077), "seeds": 3, "lr": 0.123456, "missing": float("nan"), "inf": math.inf},
        section="keskar2017",
    ),
    Finding(
        "Sharper minima at large batch", "Top Hessian eigenvalue ratio", "not reproduced", {"ratio": 1.05}
    ),
    Finding("Linear scaling to B=8192", "Only two seeds", "inconclusive", {"max_batch": 8192, "note": XSS}),
]


@pytest.fixture(scope="module")
def report() -> Report:
    xs = np.geomspace(1e-3, 1.0, 4)
    sec1 = Section(
        "keskar2017",
        "Keskar et al. (2017) " + XSS,
        intro="First paragraph.\n\nSecond paragraph " + XSS,
        figures=[
            Figure(
                "Curves " + XSS, plot_curves(xs, {"a": xs, "b": xs**2}, "lr", "loss", logx=True), "cap " + XSS
            ),
            Figure("A PNG", small_png(), "png caption"),
        ],
        tables=[
            Table(
                "Final accuracy " + XSS,
                ["batch size", "test acc", "comment " + XSS],
                [[32, (0.9123, 0.0041), XSS], [4096, (0.894, 0.006), None], [8192, float("nan"), "diverged"]],
                note="mean ± sd over 3 seeds " + XSS,
            )
        ],
        findings=[FINDINGS[0]],
        settings={"steps": 2000, "lr": 0.123456789, "bad": XSS},
    )
    sec2 = Section("li2018", "Li et al. (2018)", figures=[Figure("Bars", plot_bars(["a", "b"], [1.0, 2.0]))])
    return Report(
        "Study " + XSS,
        summary_findings=FINDINGS,
        sections=[sec1, sec2],
        settings={
            "date": "2026-01-02",
            "seeds": [0, 1, 2],
            "data_fingerprint": "sha256:00ff",
            "x": {"y": XSS},
        },
        warnings=["3 runs diverged", XSS],
    )


@pytest.fixture(scope="module")
def html(report) -> str:
    return render_html(report)


# --------------------------------------------------------------------------- fmt
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0.123456,), "0.1235"),
        ((123456.0,), "1.235e5"),
        ((2.5e-5,), "2.5e-5"),
        ((1.0,), "1"),
        ((-0.5,), "-0.5"),
        ((50000,), "50000"),
        ((np.float32(0.25),), "0.25"),
        ((np.int64(7),), "7"),
        ((float("nan"),), "n/a"),
        ((None,), "n/a"),
        ((math.inf,), "inf"),
        ((-math.inf,), "-inf"),
        ((True,), "true"),
        (("text",), "text"),
        ((0.0,), "0"),
        ((0.91234, 0.01234), "0.912 ± 0.012"),
        (((0.91234, 0.01234),), "0.912 ± 0.012"),
        ((123.456, 4.5), "123.5 ± 4.5"),
        ((1234.5, 560.0), "1234 ± 560"),
        ((1.0e-7, 1.23e-9), "(1.000 ± 0.012)e-7"),
        ((2.5e7, 3.1e5), "(2.500 ± 0.031)e7"),
        ((0.5, float("nan")), "0.5 ± n/a"),
        ((float("nan"), 0.1), "n/a ± 0.1"),
        ((0.5, 0.0), "0.5 ± 0"),
    ],
)
def test_fmt_cases(args, expected):
    assert fmt(*args) == expected


def test_fmt_digits():
    assert fmt(0.123456, digits=2) == "0.12"
    assert fmt(3.14159265, digits=6) == "3.14159"


def test_one_format_and_pm():
    from lrbs import _util
    from lrbs.report import html as report_html

    assert report_html.fmt is _util.fmt  # one format, re-exported
    # pm((mean, sd)) is fmt(mean, sd): the sd keeps 2 significant digits, the mean its decimal place
    assert _util.pm((0.91234, 0.01234)) == "0.912 ± 0.012" == fmt(0.91234, 0.01234)
    assert (
        _util.pm((97.5312, 0.4499)) == "97.53 ± 0.45"
    )  # the old f"{m:.4g} ± {s:.2g}" gave "97.53 ± 0.45" too
    assert _util.pm((0.123456, 0.0021)) == "0.1235 ± 0.0021"
    assert _util.pm((float("nan"), 0.1)) == "n/a ± 0.1"


# --------------------------------------------------------------------------- progress bars
def test_progress_disabled_is_a_no_op():
    from lrbs._util import ProgressBar, progress

    with progress("fit", 3, enabled=False, fields={"loss": ""}) as bar:
        assert isinstance(bar, ProgressBar) and not bar.enabled
        bar.advance(loss="loss 1.0")
        bar.update(loss="x")
        bar.complete()


def test_progress_draws_label_count_and_fields(monkeypatch):
    import rich.progress
    from rich.console import Console

    from lrbs._util import progress

    console = Console(record=True, width=120, force_terminal=True)
    stopped = []

    class Recorded(rich.progress.Progress):
        def __init__(self, *columns, **kw):
            super().__init__(*columns, console=console, **kw)

        def stop(self):
            stopped.append(self)
            super().stop()

    monkeypatch.setattr(rich.progress, "Progress", Recorded)
    with progress("tune throughput", 4, fields={"note": ""}, transient=False) as bar:
        assert bar.enabled
        bar.advance(note="B=32: 100 samples/s")
        bar.advance(2, note="B=64: 180 samples/s")
    text = console.export_text()
    assert "tune throughput" in text and "3/4" in text and "B=64: 180 samples/s" in text
    with progress("fit", 2, fields={"loss": ""}, transient=False) as bar:
        bar.complete(loss="done")
    text = console.export_text()
    assert "2/2 done" in text
    assert len(stopped) == 2
    with pytest.raises(RuntimeError), progress("x", 2) as bar:
        raise RuntimeError("the bar stops on an exception")
    assert len(stopped) == 3 and not stopped[-1].live.is_started


# --------------------------------------------------------------------------- the page
def test_escaping_everywhere(html):
    page = parse(html)
    # exactly one script element: the JSON data block; the payload never becomes an element
    assert page.scripts == [{"type": "application/json", "id": "lrbs-data"}]
    assert "<script>alert(1)" not in html
    # each place a string enters the page: title, claim, evidence, number, caption, table cell, note, settings
    assert html.count(XSS_ESCAPED) >= 12
    text = "".join(page.text)
    assert text.count(XSS) >= 12  # and it reads back as the original text


def test_json_block_round_trips_numbers(report, html):
    raw = re.search(r'<script type="application/json" id="lrbs-data">(.*?)</script>', html, re.S).group(1)
    assert "</" not in raw and "<" not in raw  # script-safe
    strict = json.loads(raw)  # valid strict JSON (no bare NaN)
    # the one JSON rule (lrbs._util.jsonable): non-finite numbers are null in the block
    assert strict["summary_findings"][0]["numbers"]["missing"] is None
    data = read_report_data(html)
    assert data["format"] == 1 and data["title"] == report.title
    nums = data["summary_findings"][0]["numbers"]
    assert nums["gap_pct"] == {"value": 1.8312, "uncertainty": 0.3077}
    assert nums["lr"] == 0.123456 and nums["seeds"] == 3 and nums["inf"] is None
    assert nums["missing"] is None
    assert data["summary_findings"][2]["numbers"]["note"] == XSS
    rows = data["sections"][0]["tables"][0]["rows"]
    assert rows[0][:2] == [32, {"value": 0.9123, "uncertainty": 0.0041}]
    assert rows[2][1] is None and rows[1][2] is None
    assert data["sections"][0]["settings"]["lr"] == 0.123456789
    assert data["settings"]["x"]["y"] == XSS
    assert read_report_data(html, decode=False)["summary_findings"][0]["numbers"]["missing"] is None
    # a page written before the one rule (non-finite numbers as strings) still reads back as floats
    old = html.replace(
        raw, raw.replace('"missing":null', '"missing":"NaN"').replace('"inf":null', '"inf":"Infinity"')
    )
    old_nums = read_report_data(old)["summary_findings"][0]["numbers"]
    assert math.isnan(old_nums["missing"]) and old_nums["inf"] == math.inf
    assert read_report_data(old, decode=False)["summary_findings"][0]["numbers"]["missing"] == "NaN"


def test_every_number_in_the_data_block_is_shown_formatted(html):
    data = read_report_data(html)
    text = " ".join(parse(html).text)
    for f in data["summary_findings"]:
        for k, v in f["numbers"].items():
            shown = fmt(v["value"], v["uncertainty"]) if isinstance(v, dict) else fmt(v)
            assert f"{k}" in text and shown in text, (k, shown)
    for row in data["sections"][0]["tables"][0]["rows"]:
        for v in row:
            shown = fmt(v["value"], v["uncertainty"]) if isinstance(v, dict) else fmt(v)
            assert shown in text
    assert "0.912 ± 0.0041" not in text and "0.9123 ± 0.0041" in text
    assert "0.123456789" in text  # settings are exact, not rounded to 4 digits


def test_structure_anchors_and_order(report, html):
    page = parse(html)
    for sid in ["top", "contents", "summary", "warnings", "settings", "keskar2017", "li2018"]:
        assert page.ids.count(sid) == 1, sid
    assert len(set(page.ids)) == len(page.ids)  # ids unique
    order = [i for i in page.order if i in ("summary", "keskar2017", "li2018", "settings")]
    assert order == ["summary", "keskar2017", "li2018", "settings"]  # findings first, settings last
    anchors = [v for _, attr, v in page.links if attr == "href"]
    assert {"#summary", "#keskar2017", "#li2018", "#settings", "#warnings"} <= set(anchors)
    for a in anchors:
        assert a.startswith("#") and a[1:] in page.ids, a  # every link resolves inside the page
    # verdict badges, one per finding row
    for v in ("v-reproduced", "v-not-reproduced", "v-inconclusive"):
        assert f'class="badge {v}"' in html
    assert html.count('class="badge v-reproduced"') == 1 + 1 + 1  # header count, summary, section findings
    assert "2026-01-02" in html and "lrbs 0.1.0" in html


def test_figures_embedded_and_no_external_resources(report, html):
    page = parse(html)
    n_figs = sum(len(s.figures) for s in report.sections)
    assert len(page.imgs) == n_figs == 3
    for src in page.imgs:
        m = re.fullmatch(r"data:image/(svg\+xml|png);base64,([A-Za-z0-9+/=]+)", src)
        assert m, src[:60]
        raw = base64.b64decode(m.group(2))
        assert raw.startswith(b"\x89PNG") if m.group(1) == "png" else b"<svg" in raw[:2000]
    for tag, attr, value in page.links:
        assert value.startswith(("#", "data:")), (tag, attr, value[:80])
    assert not re.search(
        r"https?://(?!www\.w3\.org/)", html.split('id="lrbs-data"')[0].replace(page.imgs[0], "")
    )
    assert "@import" not in html and "url(" not in html
    assert "default-src 'none'" in html  # the CSP forbids loading anything else


def test_render_is_deterministic_and_write_is_atomic(report, html, tmp_path):
    assert render_html(report) == html
    out = write_html(report, tmp_path / "deep" / "dir" / "report.html")
    assert out.read_text(encoding="utf-8") == html
    write_html(report, out)  # overwrite
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temp file left behind


def test_empty_report_renders():
    html = render_html(Report("Nothing yet"))
    assert "No findings." in html and "No settings recorded." in html
    assert read_report_data(html)["sections"] == []


def test_environment_has_versions():
    import torch

    env = environment()
    assert env["torch"] == torch.__version__ and env["lrbs"] == "0.1.0"
    assert {"python", "numpy", "date", "platform"} <= set(env)


def test_table_from_records():
    t = Table.from_records("t", [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}])
    assert t.columns == ["a", "b", "c"] and t.rows == [[1, 2.5, None], [3, None, "x"]]


def test_figure_inputs(tmp_path):
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(4, 3))
    fig.add_subplot().plot([1, 2, 3])
    num = fig.number
    f = Figure("pyplot", fig, format="png")
    assert not plt.fignum_exists(num)  # closed after conversion
    assert f.format == "png" and f.image.startswith(b"\x89PNG")
    (tmp_path / "a.png").write_bytes(f.image)
    width_pixels = mpimg.imread(tmp_path / "a.png").shape[1]
    assert f.width_px == round(width_pixels * 96 / 150)  # 150 dpi drawn, shown at CSS 96 px per inch
    g = Figure("from axes", plot_bars(["a"], [1.0]).axes[0])
    assert g.format == "svg" and g.image.lstrip().startswith(("<?xml", "<svg"))
    assert Figure("svg bytes", g.image.encode()).image == g.image
    assert Figure("svg text", '<svg width="100pt" height="50pt"></svg>').width_px == round(100 * 96 / 72)


# --------------------------------------------------------------------------- error paths
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: Finding("c", "e", "reproducd"),
            ConfigError,
            "verdict='reproducd'.*Did you mean 'reproduced'",
        ),
        (lambda: Finding(1, "e", "reproduced"), LrbsTypeError, "claim=1 .*must be a str"),
        (
            lambda: Finding("c", "e", "reproduced", numbers=[1]),
            LrbsTypeError,
            r"numbers=\[1\] .*must be a dict",
        ),
        (lambda: Finding("c", "e", "reproduced", numbers={1: 2}), LrbsTypeError, "key 1: keys must be str"),
        (lambda: Table("t", ["a", "b"], [[1]]), ShapeError, r"rows\[0\] has 1 cells .* 2 columns"),
        (lambda: Table("t", "ab", []), LrbsTypeError, "columns='ab'"),
        (lambda: Table("t", ["a"], "x"), LrbsTypeError, "rows='x'"),
        (lambda: Table("t", ["a"], [1]), LrbsTypeError, r"rows\[0\]=1"),
        (lambda: Figure("f", 42), LrbsTypeError, "image=42 .*matplotlib Figure"),
        (lambda: Figure("f", b"GIF89a.."), LrbsTypeError, "bytes must be a PNG"),
        (lambda: Figure("f", "hello"), LrbsTypeError, "a str must be SVG"),
        (lambda: Figure("f", "<svg/>", format="jpg"), ConfigError, "format='jpg'"),
        (lambda: Section("1abc", "t"), ConfigError, "id='1abc' .*start with a letter"),
        (lambda: Section("a b", "t"), ConfigError, "id='a b'"),
        (lambda: Section("summary", "t"), ConfigError, "id='summary' .*used by the page"),
        (lambda: Section("s", "t", figures=["x"]), LrbsTypeError, r"figures\[0\]='x' .*must be a Figure"),
        (
            lambda: Section("s", "t", tables=Table("t", [], [])),
            LrbsTypeError,
            "tables=.*must be a list of Table",
        ),
        (lambda: Section("s", "t", intro=None), LrbsTypeError, "intro=None"),
        (
            lambda: Report("r", sections=[Section("s", "a"), Section("s", "b")]),
            ConfigError,
            "'s' is used twice",
        ),
        (
            lambda: Report("r", [Finding("c", "e", "reproduced", section="nope")]),
            ConfigError,
            "section='nope'.*no section has that id",
        ),
        (lambda: Report("r", warnings=[1]), LrbsTypeError, r"warnings\[0\]=1"),
        (lambda: Report("r", settings=[("a", 1)]), LrbsTypeError, "settings=.*must be a dict"),
        (lambda: render_html({"title": "x"}), LrbsTypeError, "report=.*must be a lrbs.report.Report"),
        (lambda: read_report_data("<html></html>"), ConfigError, "no <script .*lrbs-data"),
    ],
)
def test_model_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_write_html_to_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        write_html(Report("r"), tmp_path)


# --------------------------------------------------------------------------- figures vs references
def _lines(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]


def test_plot_fit_matches_ema_closed_form():
    runs = [fake_fit(0.1, 32, seed=1), fake_fit(0.4, 256, diverge_at=45, seed=2)]
    beta = 0.8
    fig = plot_fit(runs, labels=["small", "large"], x="samples", smooth=beta)
    ax_loss, ax_acc = fig.axes[:2]
    lines = _lines(ax_loss)
    assert len(lines) == 4  # raw + smoothed per run
    for run, (raw, smooth) in zip(runs, zip(lines[::2], lines[1::2])):
        loss = run.history["loss"]
        n = int(np.argmax(~np.isfinite(loss))) if not np.all(np.isfinite(loss)) else len(loss)
        x = loss[:n]
        # closed form: m_t = sum_k (1 - b) b^(t-k) x_k, debiased by 1 - b^(t+1)
        t = np.arange(n)
        w = np.tril((1 - beta) * beta ** (t[:, None] - t[None, :]).astype(float))
        expected = (w @ x) / (1 - beta ** (t + 1))
        np.testing.assert_allclose(smooth.get_ydata(), expected, rtol=1e-12)
        np.testing.assert_array_equal(raw.get_xdata(), run.history["samples"][:n])
    assert len(lines[3].get_ydata()) == 45  # the diverged run stops at its last finite loss
    acc = _lines(ax_acc)
    np.testing.assert_allclose(acc[0].get_ydata(), [e["test_acc"] for e in runs[0].evals])
    np.testing.assert_allclose(acc[1].get_xdata(), [e["samples"] for e in runs[1].evals])
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["small", "large"]


def test_plot_fit_single_axes_and_fitresult_plot():
    from matplotlib.figure import Figure as MplFigure

    ax = MplFigure().add_subplot()
    fig = plot_fit(fake_fit(0.1, 32), ax=ax, smooth=0.0)
    assert fig is ax.figure and len(fig.axes) == 2  # accuracy on a twin axis
    np.testing.assert_array_equal(_lines(ax)[0].get_ydata(), fake_fit(0.1, 32).history["loss"])
    assert fake_fit(0.1, 32).plot().get_legend().get_texts()[0].get_text() == "lr=0.1, B=32"


def test_plot_curves_bars_heatmap():
    x = np.array([1.0, 2.0, 4.0])
    fig = plot_curves(
        x, {"a": [1, 2, 3], "b": [3, 2, 1]}, "x", "y", logx=True, logy=True, sds={"a": [0.1] * 3}
    )
    ax = fig.axes[0]
    np.testing.assert_array_equal(_lines(ax)[1].get_ydata(), [3, 2, 1])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and len(ax.collections) == 1

    fig = plot_bars(["a", "b", "c"], [0.5, float("nan"), 2.0], [0.1, 0.2, 0.3], "acc")
    ax = fig.axes[0]
    np.testing.assert_array_equal([p.get_height() for p in ax.patches], [0.5, 0.0, 2.0])
    assert [t.get_text() for t in ax.texts] == ["n/a"]

    Z = np.array([[1.0, 2.0, np.nan], [4.0, 5.0, 6.0]])
    fig = plot_heatmap(Z, [0.01, 0.1, 1.0], [32, 64], "lr", "B")
    ax = fig.axes[0]
    im = ax.get_images()[0].get_array()
    np.testing.assert_array_equal(im.mask, np.isnan(Z))
    np.testing.assert_array_equal(im.filled(-1), np.nan_to_num(Z, nan=-1))
    assert [t.get_text() for t in ax.texts] == ["1", "2", "n/a", "4", "5", "6"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.01", "0.1", "1"]


def test_plot_contour_log_levels_and_gaps():
    from matplotlib.contour import ContourSet

    a = np.linspace(-1, 1, 21)
    X, Y = np.meshgrid(a, a)
    Z = 0.05 + X**2 + 2 * Y**2
    Z[0, 0] = np.nan
    fig = plot_contour(Z, a, a, "d1", "d2", levels=7, points={"w": (0.0, 0.0)})
    sets = [c for c in fig.axes[0].collections if isinstance(c, ContourSet)]
    finite = Z[np.isfinite(Z)]
    expected = finite.min() * (finite.max() / finite.min()) ** (np.arange(7) / 6)  # geometric, closed form
    np.testing.assert_allclose(sets[0].levels, expected, rtol=1e-12)
    # NaN leaves a gap: no filled polygon covers the corner cell next to Z[0, 0], the interior is covered
    paths = sets[0].get_paths()
    assert not any(p.contains_point((-0.97, -0.97)) for p in paths)
    assert any(p.contains_point((0.5, 0.5)) for p in paths)
    lin = plot_contour(Z, a, a, log=False, levels=[0.1, 0.5, 1.0], filled=False)
    assert list([c for c in lin.axes[0].collections if isinstance(c, ContourSet)][0].levels) == [
        0.1,
        0.5,
        1.0,
    ]
    empty = plot_contour(np.full((3, 3), np.nan), [0, 1, 2], [0, 1, 2], log=False)
    assert empty.axes[0].texts[0].get_text() == "no finite values"


def test_plot_schedule_matches_closed_form():
    from lrbs.schedules import cosine

    T, n = 50, 60
    fig = plot_schedule({"cos": cosine(0.1, T), "half": lambda t: 0.05, "array": np.linspace(0, 1, 80)}, n)
    lines = _lines(fig.axes[0])
    t = np.arange(n)
    expected = np.where(t <= T, 0.05 * (1 + np.cos(np.pi * np.minimum(t, T) / T)), 0.0)
    np.testing.assert_allclose(lines[0].get_ydata(), expected, atol=1e-15)
    np.testing.assert_array_equal(lines[1].get_ydata(), np.full(n, 0.05))
    np.testing.assert_array_equal(lines[2].get_ydata(), np.linspace(0, 1, 80)[:n])


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: plot_fit([]), ConfigError, r"results=\[\]"),
        (lambda: plot_fit(42), LrbsTypeError, r"results\[0\]=int .*FitResult"),
        (lambda: plot_fit(fake_fit(0.1, 8), labels=["a", "b"]), ConfigError, "labels=.*1 str"),
        (lambda: plot_fit(fake_fit(0.1, 8), x="epoch"), ConfigError, "x='epoch'"),
        (lambda: plot_fit(fake_fit(0.1, 8), smooth=1.0), ConfigError, "smooth=1.0"),
        (lambda: plot_fit(fake_fit(0.1, 8), ax="ax"), LrbsTypeError, "ax='ax' .*matplotlib Axes"),
        (lambda: plot_curves([1, 2], {"a": [1, 2, 3]}), ShapeError, r"ys\['a'\] has 3 values but x has 2"),
        (lambda: plot_curves([[1, 2]], {"a": [1, 2]}), ShapeError, "x has shape"),
        (lambda: plot_curves([1, 2], {"a": [1, 2]}, sds={"b": [0, 0]}), ConfigError, "sds has the key 'b'"),
        (lambda: plot_curves([1, 2], {"a": [1, 2]}, sds={"a": [0]}), ShapeError, r"sds\['a'\] has 1 values"),
        (lambda: plot_curves([-1, 0], {"a": [1, 2]}, logx=True), ConfigError, "logx=True .*no positive"),
        (lambda: plot_curves(["a", "b"], {"a": [1, 2]}), LrbsTypeError, "x is not allowed"),
        (lambda: plot_bars(["a"], [1, 2]), ShapeError, "means has 2 values but labels has 1"),
        (lambda: plot_bars(["a"], [1], [1, 2]), ShapeError, "sds has 2 values"),
        (lambda: plot_heatmap(np.ones((2, 3)), [1, 2], [1, 2]), ShapeError, r"Z has shape \(2, 3\)"),
        (lambda: plot_contour(-np.ones((2, 2)), [1, 2], [1, 2]), ConfigError, "no positive finite value"),
        (
            lambda: plot_contour(np.ones((2, 2)), [1, 2], [1, 2], levels=[2, 1]),
            ConfigError,
            "levels=.*increasing",
        ),
        (lambda: plot_contour(np.ones((2, 2)), [1, 2], [1, 2], levels=1), ConfigError, "levels=1"),
        (lambda: plot_schedule([0.1], 5), LrbsTypeError, r"schedules=\[0.1\] .*dict"),
        (lambda: plot_schedule({"a": "x"}, 5), LrbsTypeError, r"schedules\['a'\]='x'"),
        (lambda: plot_schedule({"a": [1.0, 2.0]}, 5), ShapeError, r"schedules\['a'\] has 2 values but n=5"),
        (lambda: plot_schedule({"a": [1.0]}, 0), ConfigError, "n=0"),
    ],
)
def test_figure_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()
