"""What every paper reproduction shares: a run context with cached training and cached measurements.

A :class:`Context` wraps the study's :class:`~lrbs.store.Store`. Training runs and measurements are keyed by their
full config, so a second ``lrbs study`` skips everything already finished (trained weights are stored as
safetensors artifacts and reloaded; measurement results as JSON + ``.npz``).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset, load_dataset
from ..errors import check_choice
from ..models import build_model
from ..objective import Objective
from ..train import Callback, load_checkpoint, normalize_config, save_checkpoint, train_config

SCALES = ("quick", "full")


@dataclass
class Trained:
    """A trained model with its run's summary and history (from the store or freshly trained)."""

    model: nn.Module
    config: dict[str, Any]
    status: str
    final: dict[str, float]
    history: dict[str, np.ndarray]
    evals: list[dict]
    key: str
    snapshots: np.ndarray | None = None  # (k, n) flat parameter snapshots along training, if asked for
    snapshot_steps: np.ndarray | None = None
    logs: dict[str, np.ndarray] = field(default_factory=dict)


class _Snapshots(Callback):
    """Flat parameter snapshots at given steps (for the PCA trajectory and curvature along training)."""

    def __init__(self, steps: Sequence[int]):
        self.at = set(int(s) for s in steps)
        self.steps: list[int] = []
        self.thetas: list[np.ndarray] = []

    def _take(self, step: int, model: nn.Module) -> None:
        self.steps.append(step)
        self.thetas.append(
            torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
            .double()
            .numpy()
        )

    def on_start(self, state) -> None:
        if 0 in self.at:
            self._take(0, state.model)

    def on_step(self, state) -> None:
        if state.step + 1 in self.at:
            self._take(state.step + 1, state.model)


@dataclass
class Context:
    """Shared state of one study run.

    Attributes:
        store: the study's store (``DIR/lab.sqlite``).
        scale: ``"quick"`` or ``"full"``.
        seeds: the seeds, fixed up front; every one of them is reported.
        backend: ``"local"`` or ``"ray"`` (independent training runs fan out as Ray tasks).
        out: the output directory.
        progress: show progress bars.
    """

    store: Any
    scale: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    backend: str = "local"
    out: Path = Path("study")
    progress: bool = False
    dataset: Dataset | None = None
    log: Callable[[str], None] = print
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("scale", self.scale, SCALES)
        check_choice("backend", self.backend, ("local", "ray"))
        if self.dataset is None:
            self.dataset = load_dataset("mnist1d")

    @property
    def quick(self) -> bool:
        return self.scale == "quick"

    def pick(self, quick: Any, full: Any) -> Any:
        """The quick or the full setting."""
        return quick if self.quick else full

    # ------------------------------------------------------------------ training
    def _key_config(
        self, paper: str, config: dict, snapshot_steps: Sequence[int] | None, tracker: bool
    ) -> dict:
        return {
            "paper": paper,
            "train": normalize_config(config),
            "data": self.dataset.fingerprint,
            "snapshots": sorted(int(s) for s in snapshot_steps) if snapshot_steps else None,
            "noise_tracker": tracker,
        }

    def train(
        self,
        paper: str,
        config: dict[str, Any],
        *,
        snapshot_steps: Sequence[int] | None = None,
        noise_tracker: bool = False,
    ) -> Trained:
        """Train ``config`` (options of :func:`lrbs.train.train_config`), or reload it from the store."""
        return self.train_many(paper, [config], snapshot_steps=snapshot_steps, noise_tracker=noise_tracker)[0]

    def train_many(
        self,
        paper: str,
        configs: Sequence[dict[str, Any]],
        *,
        snapshot_steps: Sequence[int] | None = None,
        noise_tracker: bool = False,
    ) -> list[Trained]:
        """Train several independent configs (as Ray tasks with ``backend="ray"``), reusing finished ones."""
        out: list[Trained | None] = [None] * len(configs)
        todo = []
        for i, cfg in enumerate(configs):
            kc = self._key_config(paper, cfg, snapshot_steps, noise_tracker)
            rec = self.store.find(kc, kind="train")
            if rec is not None:
                out[i] = self._reload(rec, cfg)
            else:
                todo.append((i, cfg, kc))
        if todo:
            if self.backend == "ray" and len(todo) > 1:
                results = _train_ray([c for _, c, _ in todo], snapshot_steps, noise_tracker, self.dataset)
            else:
                results = []
                for _, cfg, _ in todo:
                    self.log(f"  train {paper}: {_short(cfg)}")
                    results.append(
                        _train_one(cfg, snapshot_steps, noise_tracker, self.dataset, self.progress)
                    )
            for (i, cfg, kc), res in zip(todo, results):
                out[i] = self._record(kc, cfg, res)
        return out  # type: ignore[return-value]

    def _record(self, kc: dict, cfg: dict, res: dict) -> Trained:
        store = self.store
        key = store.start_run(kc, kind="train")
        model = build_model_for(cfg, self.dataset)
        model.load_state_dict(res["state"])
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(model, Path(tmp) / "model.safetensors")
            store.add_artifact(key, "checkpoint", path, name="model.safetensors")
        arrays = {f"h_{k}": np.asarray(v) for k, v in res["history"].items()}
        if res.get("snapshots") is not None:
            arrays["snapshots"] = res["snapshots"]
            arrays["snapshot_steps"] = res["snapshot_steps"]
        for k, v in res.get("logs", {}).items():
            arrays[f"log_{k}"] = np.asarray(v, dtype=float)
        store.save_arrays(key, "history", "history", arrays, meta={"columns": sorted(arrays)})
        result = {
            "status": res["status"],
            "final": _clean(res["final"]),
            "evals": _clean(res["evals"]),
            "wall_time": res["wall_time"],
        }
        rows = [
            (int(e["step"]), k, float(v))
            for e in res["evals"]
            for k, v in e.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        store.finish_run(key, res["status"], result=result, metrics=rows)
        return Trained(
            model,
            cfg,
            res["status"],
            res["final"],
            res["history"],
            res["evals"],
            key,
            res.get("snapshots"),
            res.get("snapshot_steps"),
            res.get("logs", {}),
        )

    def _reload(self, rec: Any, cfg: dict) -> Trained:
        store = self.store
        model = build_model_for(cfg, self.dataset)
        ck = store.artifacts(rec.key, kind="checkpoint")
        load_checkpoint(store.artifact_path(ck[0].path), model)
        hist = store.artifacts(rec.key, kind="history")
        arrays, _ = store.load_arrays(hist[0].path)
        history = {k[2:]: v for k, v in arrays.items() if k.startswith("h_")}
        logs = {k[4:]: v for k, v in arrays.items() if k.startswith("log_")}
        res = rec.result or {}
        return Trained(
            model,
            cfg,
            rec.status,
            res.get("final", {}),
            history,
            res.get("evals", []),
            rec.key,
            arrays.get("snapshots"),
            arrays.get("snapshot_steps"),
            logs,
        )

    # ------------------------------------------------------------------ measurements
    def measure(
        self, paper: str, name: str, config: dict[str, Any], fn: Callable[[], dict[str, Any]]
    ) -> dict:
        """Run ``fn()`` (returning JSON-able numbers, arrays under ``"arrays"``) once per config; cache it."""
        kc = {"paper": paper, "measure": name, "data": self.dataset.fingerprint, **config}
        rec = self.store.find(kc, kind="measure")
        if rec is not None:
            out = dict(rec.result or {})
            arts = self.store.artifacts(rec.key, kind="arrays")
            if arts:
                out["arrays"], _ = self.store.load_arrays(arts[0].path)
            return out
        t0 = time.perf_counter()
        out = fn()
        arrays = out.pop("arrays", None)
        out["seconds"] = time.perf_counter() - t0
        key = self.store.start_run(kc, kind="measure")
        if arrays:
            self.store.save_arrays(key, "arrays", name, {k: np.asarray(v) for k, v in arrays.items()})
        self.store.finish_run(key, "completed", result=_clean(out))
        if arrays:
            out["arrays"] = {k: np.asarray(v) for k, v in arrays.items()}
        return out

    def objective(
        self,
        model: nn.Module,
        *,
        split: str = "train",
        max_samples: int | None = None,
        bn: str = "eval",
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> Objective:
        """An Objective on the embedded data (train or test split, optionally a seeded subset)."""
        data = self.dataset.train if split == "train" else self.dataset.test
        return Objective(model, data=data, bn=bn, dtype=dtype, max_samples=max_samples, seed=seed)


# ---------------------------------------------------------------------------- workers
def build_model_for(cfg: dict[str, Any], dataset: Dataset) -> nn.Module:
    c = normalize_config(cfg)
    seed = c["seed"] if c["model_seed"] is None else c["model_seed"]
    return build_model(c["model"], dataset=dataset, seed=seed, **(c["model_opts"] or {}))


def _train_one(
    cfg: dict, snapshot_steps, noise_tracker: bool, dataset: Dataset, progress: bool = False
) -> dict:
    callbacks: list[Callback] = []
    snaps = _Snapshots(snapshot_steps) if snapshot_steps else None
    if snaps:
        callbacks.append(snaps)
    tracker = None
    if noise_tracker:
        from ..noise_scale import NoiseScaleTracker

        tracker = NoiseScaleTracker()
        callbacks.append(tracker)
    model, res = train_config(cfg, dataset=dataset, callbacks=callbacks, progress=progress)
    out = {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "status": res.status,
        "final": res.final,
        "evals": res.evals,
        "history": res.history,
        "wall_time": res.wall_time,
        "logs": {},
    }
    if snaps:
        out["snapshots"] = np.stack(snaps.thetas)
        out["snapshot_steps"] = np.asarray(snaps.steps)
    if tracker is not None and tracker.history:
        h = np.asarray([tuple(p) for p in tracker.history], dtype=float)
        out["logs"] = {
            "ns_step": h[:, 0],
            "ns_b_simple": h[:, 1],
            "ns_grad_sq": h[:, 2],
            "ns_trace_sigma": h[:, 3],
        }
    return out


def _train_ray(configs, snapshot_steps, noise_tracker, dataset) -> list[dict]:
    from ..errors import DependencyError

    try:
        import ray
    except ImportError:
        raise DependencyError("backend='ray' needs Ray: pip install 'lrbs[ray]'") from None
    if not ray.is_initialized():
        ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1, max_retries=3)
    def task(cfg):
        torch.set_num_threads(1)
        res = _train_one(cfg, snapshot_steps, noise_tracker, dataset)
        res["state"] = {k: v.numpy() for k, v in res["state"].items()}
        return res

    results = ray.get([task.remote(c) for c in configs])
    for r in results:
        r["state"] = {k: torch.from_numpy(np.array(v)) for k, v in r["state"].items()}
    return results


def _short(cfg: dict) -> str:
    keys = ("model", "optimizer", "lr", "batch_size", "steps", "epochs", "seed")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs are dropped."""
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def paired(diffs: Sequence[float]) -> bool | None:
    """Is a per-seed difference positive? True: mean > 0 and (with > 1 seed) beyond 2 standard errors; False:
    mean <= 0; None (inconclusive): a positive mean within 2 standard errors, or no finite value."""
    m, s = mean_sd(diffs)
    if not np.isfinite(m):
        return None
    if m <= 0:
        return False
    if len(diffs) > 1 and m <= 2 * s / np.sqrt(len(diffs)):
        return None
    return True


def verdict(ok: bool | None) -> str:
    """A claim's verdict from a test outcome (None: inconclusive)."""
    if ok is None:
        return "inconclusive"
    return "reproduced" if ok else "not reproduced"


def intro(doc: str | None) -> str:
    """A paper module's docstring without its title line: the section's introduction."""
    parts = (doc or "").split("\n\n", 1)
    return parts[1].strip() if len(parts) > 1 else ""


def with_finding_numbers(numbers: dict[str, Any], findings: Sequence[Any]) -> dict[str, Any]:
    """``numbers`` plus every finding's number under ``finding_<key>`` where not already there."""
    for f in findings:
        for key, v in f.numbers.items():
            numbers.setdefault(f"finding_{key}", list(v) if isinstance(v, tuple) else v)
    return numbers


@dataclass
class PaperResult:
    """What a paper module returns: its report section, its findings, and its numbers (also stored)."""

    name: str
    section: Any
    findings: list[Any]
    numbers: dict[str, Any]
    seconds: float = 0.0
