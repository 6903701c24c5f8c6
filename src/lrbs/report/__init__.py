"""The HTML report (:mod:`lrbs.report.html`) and the figures used across lrbs (:mod:`lrbs.report.figures`).

Matplotlib is imported only when a figure is drawn.
"""

from .figures import (
    PALETTE,
    plot_bars,
    plot_contour,
    plot_curves,
    plot_fit,
    plot_heatmap,
    plot_schedule,
)
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
    # figures
    "PALETTE",
    "plot_fit",
    "plot_curves",
    "plot_bars",
    "plot_heatmap",
    "plot_contour",
    "plot_schedule",
]
