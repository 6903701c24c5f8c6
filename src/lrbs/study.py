"""``lrbs study``: reproduce what the seed text says about the learning rate and the batch size, in one command.

Runs the paper modules of :mod:`lrbs.papers` on the embedded MNIST-1D data, records every training run and
measurement in ``DIR/lab.sqlite`` (a second run skips finished work), and writes ``DIR/report.html``: the summary of
findings first (each claim of the seed, the measured evidence with its uncertainty, and a verdict), then one section
per paper, then the exact settings.

Honesty: the seeds are fixed up front and all of them are reported; nothing is selected to force a claim, and a claim
that does not reproduce at this scale is reported as such with its numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, check_choice, check_int
from .papers import PAPERS
from .papers._common import Context, PaperResult, _clean

__all__ = ["run_study", "StudyResult", "PAPERS"]


@dataclass(frozen=True)
class StudyResult:
    """Where the study wrote its outputs and what it found."""

    out: Path
    report: Path
    store: Path
    papers: dict[str, PaperResult]
    seconds: float


def run_study(
    out: str | Path = "study",
    *,
    quick: bool = False,
    papers: Sequence[str] | None = None,
    backend: str = "local",
    seeds: int | None = None,
    progress: bool = False,
    threads: int | None = 1,
    log: Any = print,
) -> StudyResult:
    """Run the study and write ``out/report.html`` and ``out/lab.sqlite``.

    Args:
        out: output directory.
        quick: a reduced budget (about 3 minutes on 2 CPU cores instead of about 15).
        papers: which paper modules to run (default: all, see :data:`lrbs.papers.PAPERS`).
        backend: ``"local"`` or ``"ray"`` (independent training runs fan out as Ray tasks).
        seeds: number of seeds (default 1 for quick, 3 for full); seeds are 0..N-1, fixed up front.
        progress: show progress bars.
        threads: torch CPU threads (default 1: the study's models are small, and two OpenMP threads per process
            on a busy 2-core machine were measured up to 100x slower); None leaves torch's setting alone.

    Raises:
        ConfigError: unknown paper name (suggests the closest), bad seed count or backend.
    """
    from .data import load_dataset
    from .report import Report, environment, write_html
    from .store import Store

    names = list(PAPERS) if not papers else list(papers)
    for n in names:
        check_choice("papers", n, PAPERS)
    check_choice("backend", backend, ("local", "ray"))
    n_seeds = check_int("seeds", seeds if seeds is not None else (1 if quick else 3), low=1, high=10)
    if not quick and n_seeds < 2:
        log("note: one seed gives no spread; use --seeds 2 or more for uncertainties")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import torch

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(check_int("threads", threads, low=1))
    store = Store(out / "lab.sqlite")
    results: dict[str, PaperResult] = {}
    try:
        ctx = Context(
            store=store,
            scale="quick" if quick else "full",
            seeds=tuple(range(n_seeds)),
            backend=backend,
            out=out,
            progress=progress,
            dataset=load_dataset("mnist1d"),
            log=log,
        )
        for name in names:
            t = time.perf_counter()
            log(f"== {name}")
            res = PAPERS[name].run(ctx)
            res.seconds = time.perf_counter() - t
            results[name] = res
            # the numbers shown in the report are stored, so the report can be checked against the store
            cfg = {
                "paper": name,
                "scale": ctx.scale,
                "seeds": list(ctx.seeds),
                "data": ctx.dataset.fingerprint,
            }
            key = store.start_run(cfg, kind="paper", rerun=True)
            store.finish_run(
                key,
                "completed",
                result={"numbers": _clean(res.numbers), "findings": [f.to_dict() for f in res.findings]},
            )
            log(f"   {name}: {res.seconds:.0f}s")
        settings = {
            "seeds": list(ctx.seeds),
            "scale": ctx.scale,
            "backend": backend,
            "dataset": ctx.dataset.describe(),
            "papers": names,
            "seconds": round(time.perf_counter() - t0, 1),
            **environment(),
        }
        report = Report(
            title="lrbs study: learning rate and batch size on MNIST-1D",
            summary_findings=[f for r in results.values() for f in r.findings],
            sections=[_overview(results, ctx)] + [r.section for r in results.values()],
            settings=settings,
            warnings=list(ctx.warnings)
            + (
                [
                    "Quick scale: reduced budgets, one seed unless --seeds is given; verdicts are indicative only."
                ]
                if quick
                else []
            ),
        )
        path = write_html(report, out / "report.html")
    finally:
        store.close()
        torch.set_num_threads(old_threads)
    return StudyResult(
        out,
        Path(path) if path else out / "report.html",
        out / "lab.sqlite",
        results,
        time.perf_counter() - t0,
    )


def _overview(results: dict[str, PaperResult], ctx: Context):
    from .report import Section, Table

    rows = []
    for name, r in results.items():
        verdicts = [f.verdict for f in r.findings]
        rows.append(
            [
                name,
                r.section.title,
                len(verdicts),
                verdicts.count("reproduced"),
                verdicts.count("not reproduced"),
                verdicts.count("inconclusive"),
                round(r.seconds, 1),
            ]
        )
    table = Table(
        "Papers run",
        ["module", "paper", "claims", "reproduced", "not reproduced", "inconclusive", "seconds"],
        rows,
    )
    intro = (
        "What the seed text (an essay on learning rate and batch size) claims, measured on MNIST-1D "
        "(Greydanus 2020; 4000 training and 1000 test samples of 40 features, generated locally).\n\n"
        "Every training run and measurement is stored in lab.sqlite next to this file; running the study again "
        "skips finished work. Seeds are fixed up front and every seed is reported."
    )
    return Section(
        "overview",
        "Overview",
        intro=intro,
        tables=[table],
        settings={"scale": ctx.scale, "seeds": list(ctx.seeds)},
    )


def parse_papers(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (validated)."""
    if not text:
        return None
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ConfigError(f"papers={text!r} is not allowed: give comma-separated names from {sorted(PAPERS)}")
    for n in names:
        check_choice("papers", n, PAPERS)
    return names
