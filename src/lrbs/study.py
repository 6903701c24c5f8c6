"""``lrbs study``: reproduce what the seed text says about the learning rate and the batch size, in one command.

Runs the paper modules of :mod:`lrbs.papers` on the embedded MNIST-1D data, records every training run and
measurement in ``DIR/lab.sqlite`` (a second run skips finished work), and writes ``DIR/report.html``: the summary of
findings first (each claim of the seed, the measured evidence with its uncertainty, and a verdict), then one section
per paper, then the exact settings.

Honesty: the seeds are fixed up front and all of them are reported; nothing is selected to force a claim, and a claim
that does not reproduce at this scale is reported as such with its numbers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, LrbsError, check_choice, check_int
from .papers import PAPERS
from .papers._common import Context, Executor, PaperResult, clean
from .pool import check_can_start_workers

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
    jobs: int | None = None,
    log: Any = print,
) -> StudyResult:
    """Run the study and write ``out/report.html`` and ``out/lab.sqlite``.

    With ``jobs > 1`` the papers run side by side (each in a thread of this process that holds the driver's side
    of the study only while it is not waiting) and their independent training runs and measurements run in
    ``jobs`` worker processes started once for the whole study (or as Ray tasks with ``backend="ray"``), with
    ``threads`` torch threads each. Every number is bitwise the same as with ``jobs=1``: the same seeds and
    settings, every result is handed back in the order it was asked for, and only this process writes the store.

    Args:
        out: output directory.
        quick: a reduced budget (about 1-1.5 minutes on 2 CPU cores with jobs=2, instead of 8-15).
        papers: which paper modules to run (default: all, see :data:`lrbs.papers.PAPERS`).
        backend: ``"local"`` or ``"ray"`` (independent training runs and measurements fan out as Ray tasks).
        seeds: number of seeds (default 1 for quick, 3 for full); seeds are 0..N-1, fixed up front.
        progress: show progress bars (training in this process, ``jobs=1``).
        threads: torch CPU threads per run (default 1: the study's models are small, and two OpenMP threads per
            process on a busy 2-core machine were measured up to 100x slower); None leaves torch's setting alone.
        jobs: worker processes (Ray: CPUs); default the CPUs this process may use; 1 runs everything here.

    Raises:
        ConfigError: unknown paper name (suggests the closest), bad seed count, backend or jobs.
        LrbsError: a paper failed (with ``jobs > 1``: after the other papers finished); everything finished is
            in the store, and running the same command again completes the study without recomputing it.
    """
    from .data import load_dataset
    from .store import Store

    names, n_seeds, n_jobs, threads = _study_args(papers, backend, seeds, quick, jobs, threads, log)
    if backend == "local" and n_jobs > 1:
        check_can_start_workers()  # before the store: a script without the main guard, re-run by a worker
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import torch

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    store = Store(out / "lab.sqlite")
    executor = Executor(backend, n_jobs, threads).start()  # the workers start while the data loads
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
            jobs=n_jobs,
            threads=threads,
            executor=executor,
        )
        results, path = _run_and_report(names, ctx, executor, t0, quick)
    finally:
        executor.close(cancel=True)
        store.close()
        torch.set_num_threads(old_threads)
    return StudyResult(
        out,
        Path(path) if path else out / "report.html",
        out / "lab.sqlite",
        results,
        time.perf_counter() - t0,
    )


def _study_args(
    papers: Sequence[str] | None,
    backend: str,
    seeds: int | None,
    quick: bool,
    jobs: int | None,
    threads: int | None,
    log: Any,
) -> tuple[list[str], int, int, int | None]:
    """:func:`run_study`'s arguments checked: paper names, seed count, jobs, threads (notes through ``log``)."""
    from .pool import available_cpus

    names = list(PAPERS) if not papers else list(papers)
    for n in names:
        check_choice("papers", n, PAPERS)
    check_choice("backend", backend, ("local", "ray"))
    n_seeds = check_int("seeds", seeds if seeds is not None else (1 if quick else 3), low=1, high=10)
    cpus = available_cpus()
    n_jobs = check_int("jobs", cpus if jobs is None else jobs, low=1)
    if threads is not None:
        threads = check_int("threads", threads, low=1)
    if n_jobs * (threads or 1) > cpus:
        log(
            f"note: jobs={n_jobs} x threads={threads or 1} is more than the {cpus} CPU(s) this process may use: "
            "runs share cores (slower each, same numbers)"
        )
    if not quick and n_seeds < 2:
        log("note: one seed gives no spread; use --seeds 2 or more for uncertainties")
    return names, n_seeds, n_jobs, threads


def _run_and_report(names: list[str], ctx: Context, executor: Executor, t0: float, quick: bool) -> tuple:
    """Every paper, then (the workers closed) the report; what was started still finishes and is stored on an
    error (Ctrl-C cancels it: the caller's ``finally``)."""
    try:
        results = _run_papers(names, ctx)
    except Exception:
        executor.close()
        raise
    executor.close()
    return results, _write_report(results, ctx, names, time.perf_counter() - t0, quick)


def _run_paper(name: str, ctx: Context) -> PaperResult:
    """One paper: run it, time it, store its numbers and findings (so the report can be checked against them)."""
    t = time.perf_counter()
    ctx.log(f"== {name}")
    res = PAPERS[name].run(ctx)
    res.seconds = time.perf_counter() - t
    cfg = {"paper": name, "scale": ctx.scale, "seeds": list(ctx.seeds), "data": ctx.dataset.fingerprint}
    with ctx.store.run(cfg, "paper", rerun=True) as run:
        run.finish(
            "completed",
            result={"numbers": clean(res.numbers), "findings": [f.to_dict() for f in res.findings]},
        )
    ctx.log(f"   {name}: {res.seconds:.0f}s")
    return res


def _run_papers(names: list[str], ctx: Context) -> dict[str, PaperResult]:
    """Every paper, one after the other (``jobs=1``) or side by side in threads; results in the order of
    ``names``, each paper's warnings in ``ctx.warnings`` in that order too."""
    views = {name: ctx.for_paper(priority=i) for i, name in enumerate(names)}
    results: dict[str, PaperResult] = {}
    if not ctx.executor.parallel:
        for name in names:
            results[name] = _run_paper(name, views[name])
            ctx.warnings.extend(views[name].warnings)
        return results
    errors: dict[str, BaseException] = {}

    def work(name: str) -> None:
        try:
            with ctx.executor.baton():
                results[name] = _run_paper(name, views[name])
        except BaseException as e:  # noqa: BLE001 - reported below, after the other papers
            errors[name] = e

    threads = [threading.Thread(target=work, args=(n,), name=f"paper-{n}", daemon=True) for n in names]
    for th in threads:
        th.start()
    for th in threads:
        while th.is_alive():  # a timeout keeps Ctrl-C responsive
            th.join(0.2)
    for name in names:
        ctx.warnings.extend(views[name].warnings)
    if errors:
        raise _papers_failed(errors, names)
    return {name: results[name] for name in names}


def _papers_failed(errors: dict[str, BaseException], names: list[str]) -> BaseException:
    """One error for the papers that failed (a KeyboardInterrupt or SystemExit passes through as it is)."""
    failed = [(n, errors[n]) for n in names if n in errors]
    for _, e in failed:
        if not isinstance(e, Exception):
            return e
    lines = [f"{n}: {type(e).__name__}: {e}" for n, e in failed]
    err = LrbsError(
        f"{len(failed)} of {len(names)} paper(s) did not finish:\n  "
        + "\n  ".join(lines)
        + "\nEverything that finished is in the store: run the same command again to complete the study."
    )
    err.__cause__ = failed[0][1]
    return err


def _write_report(
    results: dict[str, PaperResult], ctx: Context, names: list[str], seconds: float, quick: bool
):
    from .report import Report, environment, write_html

    settings = {
        "seeds": list(ctx.seeds),
        "scale": ctx.scale,
        "backend": ctx.backend,
        "jobs": ctx.jobs,
        "threads": ctx.threads,
        "dataset": ctx.dataset.describe(),
        "papers": names,
        "seconds": round(seconds, 1),
        **environment(),
    }
    report = Report(
        title="lrbs study: learning rate and batch size on MNIST-1D",
        summary_findings=[f for r in results.values() for f in r.findings],
        sections=[_overview(results, ctx)] + [r.section for r in results.values()],
        settings=settings,
        warnings=list(ctx.warnings)
        + (
            ["Quick scale: reduced budgets, one seed unless --seeds is given; verdicts are indicative only."]
            if quick
            else []
        ),
    )
    return write_html(report, ctx.out / "report.html")


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
