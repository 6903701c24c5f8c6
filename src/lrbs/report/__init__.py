"""The HTML report (:mod:`lrbs.report.html`) and the figures used across lrbs (:mod:`lrbs.report.figures`).

Matplotlib is imported only when a figure is drawn.
"""

from . import figures as _figures
from .figures import *  # noqa: F403 - every figure function (figures.__all__)
from .html import (
    VERDICTS,
    Figure,
    Finding,
    Report,
    Section,
    Table,
    environment,
    fmt,
    read_report_data,
    render_html,
    write_html,
)

__all__ = [
    # data model
    "Finding",
    "Table",
    "Figure",
    "Section",
    "Report",
    "VERDICTS",
    # rendering
    "render_html",
    "write_html",
    "read_report_data",
    "fmt",
    "environment",
    # figures: all of lrbs.report.figures
    *_figures.__all__,
]
