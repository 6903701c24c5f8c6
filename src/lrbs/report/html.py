"""A self-contained HTML report: findings first, one section per paper, then the settings to reproduce it.

The page is one file that opens from disk with no server and no network: inline CSS, no JavaScript, figures
embedded as ``data:`` URIs, and a Content-Security-Policy that forbids loading anything else. Every string
goes through Jinja2 with autoescaping on. Every number shown is also in a machine-readable block
``<script type="application/json" id="lrbs-data">`` (read it back with :func:`read_report_data`), so a test
can compare the numbers on the page with the numbers in the store. The block follows lrbs's one JSON rule
(:func:`lrbs._util.jsonable`): a non-finite number is ``null`` there and ``n/a`` (or ``inf``) on the page.
Numbers on the page are written by :func:`lrbs._util.fmt` (re-exported here as :func:`fmt`).

Example:
    >>> report = Report(
    ...     "Demo",
    ...     summary_findings=[Finding("Large batches generalize worse", "gap = 1.8 +- 0.3 %",
    ...                               "reproduced", {"gap_pct": (1.8, 0.3)})],
    ...     sections=[Section("keskar2017", "Keskar et al. (2017)", intro="Sharp minima.")],
    ...     settings={"seed": 0},
    ... )
    >>> html = render_html(report)
    >>> read_report_data(html)["summary_findings"][0]["numbers"]["gap_pct"]
    {'value': 1.8, 'uncertainty': 0.3}
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
import os
import platform
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._util import atomic_write, fmt, item, jsonable
from ..errors import ConfigError, LrbsTypeError, ShapeError, check_choice

__all__ = [
    "VERDICTS",
    "Finding",
    "Table",
    "Figure",
    "Section",
    "Report",
    "fmt",
    "environment",
    "render_html",
    "write_html",
    "read_report_data",
    "render_tune_html",
    "write_tune_html",
]

VERDICTS = ("reproduced", "not reproduced", "inconclusive")
DATA_FORMAT = 1  # version of the JSON block's layout
_RESERVED_IDS = ("top", "contents", "summary", "warnings", "settings")
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- number formatting
def _exact(x: Any) -> str:
    """Settings are shown exactly (shortest round-trip repr for floats), never rounded."""
    x = item(x)
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else repr(x)
    if isinstance(x, (dict, list, tuple)):
        return json.dumps(jsonable(x), sort_keys=False, ensure_ascii=False)
    return fmt(x)


# --------------------------------------------------------------------------- the data model
def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise LrbsTypeError(f"{name}={value!r} is not allowed: must be a str")
    return value


def _check_mapping(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LrbsTypeError(f"{name}={value!r} is not allowed: must be a dict")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise LrbsTypeError(f"{name} has the key {bad[0]!r}: keys must be str")
    return dict(value)


def _check_items(name: str, value: Any, cls: type) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise LrbsTypeError(f"{name}={value!r} is not allowed: must be a list of {cls.__name__}")
    items = list(value)
    for i, entry in enumerate(items):
        if not isinstance(entry, cls):
            raise LrbsTypeError(f"{name}[{i}]={entry!r} is not allowed: must be a {cls.__name__}")
    return items


@dataclass(frozen=True)
class Finding:
    """One claim of a paper and what this run found.

    Attributes:
        claim: the paper's claim, in words.
        evidence: what was measured, in words.
        verdict: ``"reproduced"``, ``"not reproduced"`` or ``"inconclusive"``.
        numbers: the numbers behind the verdict; a value is a number, a str, or a ``(value, uncertainty)``
            pair.
        section: optional id of the :class:`Section` with the details (the summary links to it).
    """

    claim: str
    evidence: str
    verdict: str
    numbers: dict[str, Any] = field(default_factory=dict)
    section: str = ""

    def __post_init__(self) -> None:
        _check_str("claim", self.claim)
        _check_str("evidence", self.evidence)
        check_choice("verdict", self.verdict, VERDICTS)
        object.__setattr__(self, "numbers", _check_mapping("numbers", self.numbers))
        _check_str("section", self.section)

    def to_dict(self) -> dict[str, Any]:
        return {
            "claim": self.claim,
            "evidence": self.evidence,
            "verdict": self.verdict,
            "numbers": {k: _jsonable_value(v) for k, v in self.numbers.items()},
            "section": self.section,
        }


@dataclass(frozen=True)
class Table:
    """A table of results. A cell is a number, a str, None (``n/a``) or a ``(value, uncertainty)`` pair.

    Raises:
        ShapeError: If a row does not have one cell per column.
    """

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""

    def __post_init__(self) -> None:
        _check_str("title", self.title)
        _check_str("note", self.note)
        if isinstance(self.columns, str) or not isinstance(self.columns, Iterable):
            raise LrbsTypeError(f"columns={self.columns!r} is not allowed: must be a list of str")
        columns = [str(c) for c in self.columns]
        if isinstance(self.rows, (str, bytes)) or not isinstance(self.rows, Iterable):
            raise LrbsTypeError(f"rows={self.rows!r} is not allowed: must be a list of rows")
        rows = []
        for i, row in enumerate(self.rows):
            if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
                raise LrbsTypeError(f"rows[{i}]={row!r} is not allowed: must be a list of cells")
            row = list(row)
            if len(row) != len(columns):
                raise ShapeError(
                    f"rows[{i}] has {len(row)} cells but the table {self.title!r} has {len(columns)} "
                    f"columns {columns}: every row needs one cell per column"
                )
            rows.append(row)
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "rows", rows)

    @classmethod
    def from_records(
        cls,
        title: str,
        records: Sequence[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
        note: str = "",
    ) -> Table:
        """A table from a list of dicts (e.g. store results); ``columns``: the keys in first-seen order.

        A key missing from a record gives an ``n/a`` cell.
        """
        if columns is None:
            columns = list(dict.fromkeys(k for r in records for k in r))
        return cls(title, list(columns), [[r.get(c) for c in columns] for r in records], note)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": list(self.columns),
            "rows": [[_jsonable_value(c) for c in row] for row in self.rows],
            "note": self.note,
        }


@dataclass(frozen=True)
class Figure:
    """A figure, embedded in the page as a ``data:`` URI (the page needs no network to show it).

    ``image`` may be a matplotlib ``Figure`` (or ``Axes``), SVG text, or PNG bytes. A matplotlib figure is
    converted on construction (to SVG by default, to PNG with ``format="png"``, e.g. for dense rasters) and
    then closed; afterwards ``image`` holds the SVG text or the PNG bytes (written without a date).

    Raises:
        LrbsTypeError: If ``image`` is none of the above.
    """

    title: str
    image: Any
    caption: str = ""
    format: str = "svg"

    def __post_init__(self) -> None:
        _check_str("title", self.title)
        _check_str("caption", self.caption)
        check_choice("format", self.format, ("svg", "png"))
        image = self.image
        if hasattr(image, "savefig") or hasattr(getattr(image, "figure", None), "savefig"):
            image = _render_matplotlib(image if hasattr(image, "savefig") else image.figure, self.format)
        elif isinstance(image, (bytes, bytearray)):
            image = bytes(image)
            if image.lstrip().startswith((b"<?xml", b"<svg")):
                image = image.decode("utf-8")
            elif not image.startswith(_PNG_MAGIC):
                raise LrbsTypeError(
                    f"image=<{len(image)} bytes starting {image[:8]!r}> is not allowed: bytes must be a PNG "
                    "file (or SVG text)"
                )
        elif isinstance(image, str):
            if not image.lstrip().startswith(("<?xml", "<svg")):
                raise LrbsTypeError(
                    f"image={image[:40]!r}... is not allowed: a str must be SVG text starting with '<svg' or "
                    "'<?xml'"
                )
        else:
            raise LrbsTypeError(
                f"image={image!r} is not allowed: must be a matplotlib Figure or Axes, SVG text, or PNG bytes"
            )
        object.__setattr__(self, "image", image)
        object.__setattr__(self, "format", "svg" if isinstance(image, str) else "png")

    @property
    def data_uri(self) -> str:
        """The image as a ``data:`` URI."""
        raw = self.image.encode("utf-8") if isinstance(self.image, str) else self.image
        mime = "image/svg+xml" if isinstance(self.image, str) else "image/png"
        return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"

    @property
    def width_px(self) -> int | None:
        """The width (CSS pixels) the figure was drawn for, if known; the page never shows it wider."""
        if isinstance(self.image, str):
            m = re.search(r"<svg[^>]*?\swidth=\"([0-9.]+)(pt|px)?\"", self.image[:4000])
            if not m:
                return None
            w = float(m.group(1))
            return round(w * 96 / 72) if m.group(2) == "pt" else round(w)
        if len(self.image) >= 24:
            (w,) = struct.unpack(">I", self.image[16:20])
            dpi = _png_dpi(self.image)
            return round(w * 96 / dpi) if dpi else w
        return None  # pragma: no cover - truncated PNG

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "caption": self.caption, "format": self.format}


def _png_dpi(png: bytes) -> float | None:
    """The resolution from a PNG's pHYs chunk (pixels per metre), as dots per inch."""
    i = png.find(b"pHYs")
    if i < 0 or len(png) < i + 13:
        return None
    ppm_x, _, unit = struct.unpack(">IIB", png[i + 4 : i + 13])
    return ppm_x * 0.0254 if unit == 1 and ppm_x > 0 else None


def _render_matplotlib(fig: Any, fmt_: str) -> str | bytes:
    buf = io.BytesIO()
    if fmt_ == "svg":
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        out: str | bytes = buf.getvalue().decode("utf-8")
    else:
        fig.savefig(buf, format="png", bbox_inches="tight", dpi=150, metadata={"Software": None})
        out = buf.getvalue()
    if "matplotlib.pyplot" in sys.modules:  # a pyplot figure is registered globally: release it
        sys.modules["matplotlib.pyplot"].close(fig)
    return out


@dataclass(frozen=True)
class Section:
    """One part of the report (typically one paper): intro text, figures, tables, findings and its settings.

    Attributes:
        id: the HTML anchor, letters, digits, ``-`` and ``_``, starting with a letter (e.g. ``"keskar2017"``).
        title: the heading.
        intro: plain text; blank lines separate paragraphs.
        figures, tables, findings: shown in the order findings, figures, tables.
        settings: the settings of this section's experiments (shown exactly, not rounded).
    """

    id: str
    title: str
    intro: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str("id", self.id)
        if not _ID_RE.match(self.id):
            raise ConfigError(
                f"id={self.id!r} is not allowed: must start with a letter and contain only letters, digits, "
                "'-' and '_'"
            )
        if self.id in _RESERVED_IDS:
            raise ConfigError(
                f"id={self.id!r} is not allowed: {list(_RESERVED_IDS)} are used by the page itself"
            )
        _check_str("title", self.title)
        _check_str("intro", self.intro)
        object.__setattr__(self, "figures", _check_items("figures", self.figures, Figure))
        object.__setattr__(self, "tables", _check_items("tables", self.tables, Table))
        object.__setattr__(self, "findings", _check_items("findings", self.findings, Finding))
        object.__setattr__(self, "settings", _check_mapping("settings", self.settings))

    @property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in re.split(r"\n\s*\n", self.intro) if p.strip()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "intro": self.intro,
            "findings": [f.to_dict() for f in self.findings],
            "tables": [t.to_dict() for t in self.tables],
            "figures": [f.to_dict() for f in self.figures],
            "settings": jsonable(self.settings),
        }


@dataclass(frozen=True)
class Report:
    """The whole report.

    Attributes:
        title: the page title.
        summary_findings: the findings shown first, in a table.
        sections: one per paper or experiment; ids must be unique.
        settings: what is needed to reproduce the report: seeds, data fingerprint, versions, machine, date
            (:func:`environment` gives the versions, the machine and the date).
        warnings: anything the reader must know (skipped runs, divergences, reduced budgets).

    Raises:
        ConfigError: If two sections share an id, or a finding links to a section that does not exist.
    """

    title: str
    summary_findings: list[Finding] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_str("title", self.title)
        object.__setattr__(
            self, "summary_findings", _check_items("summary_findings", self.summary_findings, Finding)
        )
        object.__setattr__(self, "sections", _check_items("sections", self.sections, Section))
        object.__setattr__(self, "settings", _check_mapping("settings", self.settings))
        object.__setattr__(self, "warnings", _check_items("warnings", self.warnings, str))
        seen: set[str] = set()
        for s in self.sections:
            if s.id in seen:
                raise ConfigError(f"sections: the id {s.id!r} is used twice; section ids must be unique")
            seen.add(s.id)
        for f in [*self.summary_findings, *(f for s in self.sections for f in s.findings)]:
            if f.section and f.section not in seen:
                raise ConfigError(
                    f"Finding(section={f.section!r}) is not allowed: no section has that id; "
                    f"known: {sorted(seen)}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "summary_findings": [f.to_dict() for f in self.summary_findings],
            "sections": [s.to_dict() for s in self.sections],
            "settings": jsonable(self.settings),
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- JSON
def _jsonable_value(v: Any) -> Any:
    """A number or a ``(value, uncertainty)`` pair, as JSON (:func:`lrbs._util.jsonable`: non-finite as null)."""
    if isinstance(v, tuple) and len(v) == 2 and all(_is_number(item(p)) for p in v):
        return {"value": jsonable(v[0]), "uncertainty": jsonable(v[1])}
    return jsonable(v)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _script_json(data: Any) -> str:
    """JSON that is safe inside ``<script>``: ``<``, ``>``, ``&`` and U+2028/9 are written as ``\\uXXXX``,
    so neither ``</script>`` nor ``<!--`` can appear in it (the same escaping as Jinja2's ``tojson``)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def read_report_data(html: str, *, decode: bool = True) -> dict[str, Any]:
    """The machine-readable block of a rendered report, as a dict (the layout of :meth:`Report.to_dict`).

    Non-finite numbers are ``null`` in the block (the one JSON rule, :func:`lrbs._util.jsonable`), so they read
    back as None.

    Args:
        html: the page text (from :func:`render_html` or a file).
        decode: turn the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` back into floats (pages written by
            lrbs before the one JSON rule stored non-finite numbers as those strings).

    Returns:
        The data, with ``lrbs_version``, ``created`` and ``format`` added.

    Raises:
        ConfigError: If the page has no ``lrbs-data`` block.
    """
    m = re.search(r'<script type="application/json" id="lrbs-data">(.*?)</script>', html, re.S)
    if not m:
        raise ConfigError(
            'html has no <script type="application/json" id="lrbs-data"> block: not an lrbs report'
        )
    hook = (
        (lambda d: {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in d.items()})
        if decode
        else None
    )
    data = json.loads(m.group(1), object_hook=hook)
    if decode:
        data = _decode_lists(data)
    return data


def _decode_lists(x: Any) -> Any:
    if isinstance(x, list):
        return [_NONFINITE.get(v, v) if isinstance(v, str) else _decode_lists(v) for v in x]
    if isinstance(x, dict):
        return {k: _decode_lists(v) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    """Versions (python, torch, numpy, lrbs), the machine and the date (UTC), for ``Report.settings``."""
    import numpy
    import torch

    from .. import __version__

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "lrbs": __version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# --------------------------------------------------------------------------- rendering
def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings as ``(dotted.key, exact value)`` rows."""
    rows: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            rows.extend(_flatten(v, key + "."))
        else:
            rows.append((key, _exact(v)))
    return rows


def _is_numeric_cell(c: Any) -> bool:
    c = item(c)
    if isinstance(c, (tuple, list)) and len(c) == 2:
        return all(_is_number(item(p)) for p in c)
    return _is_number(c)


def _numeric_columns(table: Table) -> list[bool]:
    """Right-align a column when every cell that is not None is a number or a (value, uncertainty) pair."""
    cols = []
    for j in range(len(table.columns)):
        cells = [row[j] for row in table.rows if row[j] is not None]
        cols.append(bool(cells) and all(_is_numeric_cell(c) for c in cells))
    return cols


def _environment_jinja():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lrbs.report", "templates"),
        autoescape=True,  # every string, whatever the template's name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["exact"] = _exact
    env.filters["flatten"] = _flatten
    env.filters["numeric_columns"] = _numeric_columns
    return env


def render_html(report: Report) -> str:
    """Render ``report`` as one self-contained HTML page.

    The page has: a header (title, date, lrbs version, verdict counts), a table of contents, the warnings,
    the summary of findings, one section per :class:`Section`, and the settings. Strings are autoescaped;
    numbers are formatted with :func:`fmt`; settings are shown exactly.

    Args:
        report: the report.

    Returns:
        The HTML text.

    Raises:
        LrbsTypeError: If ``report`` is not a :class:`Report`.
    """
    if not isinstance(report, Report):
        raise LrbsTypeError(f"report={report!r} is not allowed: must be a lrbs.report.Report")
    from .. import __version__

    created = str(report.settings.get("date") or _dt.date.today().isoformat())
    data = {"format": DATA_FORMAT, "lrbs_version": __version__, "created": created, **report.to_dict()}
    findings = [*report.summary_findings, *(f for s in report.sections for f in s.findings)]
    counts = {v: sum(f.verdict == v for f in report.summary_findings) for v in VERDICTS}
    template = _environment_jinja().get_template("report.html")
    return template.render(
        report=report,
        version=__version__,
        created=created,
        counts=counts,
        n_findings=len(findings),
        data_json=_script_json(data),
    )


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """Render ``report`` and write it to ``path`` atomically (:func:`lrbs._util.atomic_write`, fsynced).

    Missing parent folders are created. A reader never sees a half-written page.

    Returns:
        The path written.

    Raises:
        ConfigError: If ``path`` is an existing folder.
    """
    return _write_page(path, "report.html", lambda: render_html(report))


def _write_page(path: str | os.PathLike, example: str, render: Callable[[], str]) -> Path:
    """Check ``path`` (a file, not a folder), render the page and write it atomically, creating its folder."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"path={str(path)!r} is not allowed: it is a folder; give a file name such as {example}"
        )
    html = render()
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, html)


# --------------------------------------------------------------------------- the tune page
def render_tune_html(
    *,
    title: str,
    headline: Table,
    confidence: str,
    reasons: Sequence[str],
    figures: Sequence[Figure],
    tables: Sequence[Table],
    settings: Mapping[str, Any],
    data: Mapping[str, Any],
) -> str:
    """The one-page report of :func:`lrbs.tune.tune`: the recommendation, its reasons, four figures, the tables.

    The same engine as :func:`render_html`: a self-contained page (inline CSS, figures as ``data:`` URIs, a
    Content-Security-Policy that loads nothing), autoescaped strings, numbers through :func:`fmt`, and every
    number in the ``lrbs-data`` JSON block (:func:`read_report_data` reads it back).

    Args:
        title: the page title.
        headline: the table of choices (choice, value, why).
        confidence: ``"high"`` or ``"low"``.
        reasons: why the confidence is low.
        figures, tables: the evidence.
        settings: shown exactly.
        data: the JSON block (the recommendation's ``to_dict()``).

    Returns:
        The HTML text.

    Raises:
        LrbsTypeError: a figure or table of the wrong type.
    """
    from .. import __version__

    _check_str("title", title)
    check_choice("confidence", confidence, ("high", "low"))
    figures = _check_items("figures", figures, Figure)
    tables = _check_items("tables", [headline, *tables], Table)
    reasons = _check_items("reasons", reasons, str)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    payload = {
        "format": DATA_FORMAT,
        "lrbs_version": __version__,
        "created": created,
        **jsonable(dict(data)),
    }
    template = _environment_jinja().get_template("tune.html")
    return template.render(
        title=title,
        headline=tables[0],
        tables=tables[1:],
        confidence=confidence,
        reasons=reasons,
        figures=figures,
        settings=_check_mapping("settings", settings),
        version=__version__,
        created=created,
        data_json=_script_json(payload),
    )


def write_tune_html(path: str | os.PathLike, **page: Any) -> Path:
    """Render :func:`render_tune_html` (same keyword arguments) and write it atomically to ``path``.

    Raises:
        ConfigError: If ``path`` is an existing folder.
    """
    return _write_page(path, "tune.html", lambda: render_tune_html(**page))
