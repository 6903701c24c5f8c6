"""One module per reproduced paper. Each has ``run(ctx) -> PaperResult`` (see :mod:`lrbs.papers._common`) and a
module-level ``run_paper(scale=..., seeds=..., store=..., backend=...)`` convenience wrapper via :func:`run_paper`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

_NAMES = (
    "smith2017cyclical",
    "keskar2017large",
    "li2018visualizing",
    "draxler2018essentially",
    "goyal2017accurate",
    "smith2018dont",
    "mccandlish2018empirical",
)

#: what the study's worker processes import once, in the fork server, before they fork (the papers and their tools)
WORKER_PRELOAD = (
    "lrbs.papers._common",
    *(f"lrbs.papers.{name}" for name in _NAMES),
    "lrbs.curvature",
    "lrbs.sharpness",
    "lrbs.landscape",
    "lrbs.connectivity",
    "lrbs.noise_scale",
    "lrbs.range_test",
)


class _Lazy(dict):
    def __missing__(self, name: str) -> ModuleType:
        if name not in _NAMES:
            raise KeyError(name)
        mod = importlib.import_module(f".{name}", __name__)
        self[name] = mod
        return mod

    def __iter__(self):
        return iter(_NAMES)

    def __contains__(self, name: object) -> bool:
        return name in _NAMES

    def __len__(self) -> int:
        return len(_NAMES)

    def keys(self):
        return list(_NAMES)


#: name -> module (imported on first use)
PAPERS: dict[str, ModuleType] = _Lazy()


def run_paper(
    name: str,
    scale: str = "quick",
    seeds: Any = None,
    store: Any = None,
    backend: str = "local",
    out: str = "study",
    jobs: int = 1,
) -> Any:
    """Run one paper module outside the study: ``run_paper("keskar2017large", scale="quick")``.

    Args:
        name: a key of :data:`PAPERS`.
        scale: ``"quick"`` or ``"full"``.
        seeds: an int (number of seeds) or a sequence of seeds; default 1 (quick) or 3 (full).
        store: a :class:`~lrbs.store.Store` or a path (default ``out/lab.sqlite``).
        backend: ``"local"`` or ``"ray"``.
        jobs: worker processes for its independent training runs and measurements (1: all in this process).
    """
    from pathlib import Path

    from ..errors import check_choice
    from ..store import Store
    from ._common import Context

    check_choice("name", name, _NAMES)
    if seeds is None:
        seeds = 1 if scale == "quick" else 3
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    own = store is None or isinstance(store, (str, Path))
    st = Store(Path(out) / "lab.sqlite" if store is None else store) if own else store
    ctx = None
    try:
        ctx = Context(store=st, scale=scale, seeds=seeds, backend=backend, out=Path(out), jobs=jobs)
        with ctx.executor.baton():
            result = PAPERS[name].run(ctx)
        ctx.executor.close()
        return result
    finally:
        if ctx is not None:
            ctx.executor.close(cancel=True)
        if own:
            st.close()
