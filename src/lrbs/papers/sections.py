"""The report section and result every paper module returns, built in one place.

Each paper's ``run(ctx)`` ends the same way: a :class:`~lrbs.report.Section` whose introduction is the module's
docstring without its title line, holding the paper's figures, tables, findings and settings, wrapped with the
findings and the numbers into a :class:`~lrbs.papers._common.PaperResult`.
"""

from __future__ import annotations

from typing import Any

from ..report import Figure, Finding, Section, Table
from ._common import PaperResult, intro

__all__ = ["paper_result"]


# a typed parameter list like report.html.render_tune_html's (same shape, nothing shared to factor out)
def paper_result(
    name: str,
    title: str,
    doc: str | None,
    figures: list[Figure],
    tables: list[Table],
    findings: list[Finding],
    settings: dict[str, Any],
    numbers: dict[str, Any],
) -> PaperResult:
    """What a paper's ``run(ctx)`` returns: its report section, its findings and its numbers.

    Args:
        name: the paper module's ``NAME`` (the section's anchor and the result's name).
        title: the section's heading.
        doc: the module docstring; the section's introduction is it without its title line
            (:func:`~lrbs.papers._common.intro`).
        figures, tables, findings: the section's lists (the lists themselves, not copies; ``findings`` is also
            the result's).
        settings: the settings of the paper's experiments (shown exactly).
        numbers: the paper's numbers (stored).

    Returns:
        ``PaperResult(name, Section(name, title, intro=intro(doc), ...), findings, numbers)``.
    """
    section = Section(name, title, intro(doc), figures, tables, findings, settings)
    return PaperResult(name, section, findings, numbers)
