"""The one registry of scalar measures of a trained point: one name per measure, used everywhere.

:data:`MEASURES` maps a canonical name to a :class:`Measure`; calling it, ``MEASURES[name](obj, seed=0)``,
returns the measure's value (a float) on an :class:`~lrbs.objective.Objective`, ``.compute(obj, seed=...)`` its
full result object. ``sharpness.sharpness_report``, the sweeps, the papers and the CLI all look names up here.

The canonical names and what they compute (each with the default options in ``Measure.options``; any keyword
given to the call overrides them):

- ``lambda_max``: the largest Hessian eigenvalue ``lambda_max(nabla^2 L)`` by Lanczos, stopped on the relative
  Ritz residual ``||H v - lambda v|| / |lambda| <= 1e-4`` (:func:`~lrbs.curvature.hessian_eigenvalues`).
- ``trace``: ``tr(nabla^2 L)`` by Hutch++ with 99 HVPs (:func:`~lrbs.curvature.hessian_trace`).
- ``negative_mass``: the mass of the SLQ spectral density below 0 (:func:`~lrbs.curvature.spectral_density`).
- ``keskar`` / ``keskar_subspace``: Keskar et al.'s epsilon-sharpness ``phi = 100 (max_{y in C_eps} f(x + A y) -
  f(x)) / (1 + f(x))`` in the full space / a random ``p = min(100, n)``-dimensional subspace
  (:func:`~lrbs.sharpness.keskar_sharpness`).
- ``worst_case`` / ``worst_case_adaptive``: SAM's / ASAM's ``max_{||delta / c||_2 <= rho} L(w + delta) - L(w)``
  (:func:`~lrbs.sharpness.worst_case_sharpness`).
- ``average`` / ``average_adaptive``: ``E_delta[L(w + delta)] - L(w)`` (:func:`~lrbs.sharpness.average_sharpness`).
- ``edge_of_stability``: ``lr * lambda_max`` against ``2 (1 + momentum)``; needs ``lr=``
  (:func:`~lrbs.sharpness.edge_of_stability`).

Old names are kept as aliases (:data:`ALIASES`; :func:`canonical` resolves them): ``top_eigenvalue`` (the sweeps'
name before) and ``top_eig`` (the papers' result key) both mean ``lambda_max``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, unknown_name

__all__ = ["ALIASES", "MEASURES", "Measure", "canonical", "get"]


@dataclass(frozen=True, eq=False)
class Measure:
    """One scalar measure: ``Measure(obj, *, seed=0, **options) -> float``.

    Attributes:
        name: the canonical name (a key of :data:`MEASURES`).
        description: one line, for help texts and reports.
        module: the module that computes it (``"lrbs.curvature"`` or ``"lrbs.sharpness"``), for dependency
            checks before any work runs.
        function: the name of the function in ``module``; it is called as ``function(obj, seed=seed,
            **options)`` and returns a result object.
        attribute: the attribute of that result that is the value.
        options: the default keyword options (overridden by the call's keywords).
    """

    name: str
    description: str
    module: str
    function: str
    attribute: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def compute(self, obj: Any, *, seed: int = 0, **options: Any) -> Any:
        """The full result object of the measure on ``obj`` (defaults overridden by ``options``)."""
        fn: Callable[..., Any] = getattr(importlib.import_module(self.module), self.function)
        return fn(obj, seed=seed, **{**self.options, **options})

    def value(self, result: Any) -> float:
        """The measure's value from its result object."""
        return getattr(result, self.attribute)

    def __call__(self, obj: Any, *, seed: int = 0, **options: Any) -> float:
        """The measure's value on ``obj``: ``value(compute(obj, seed=seed, **options))``."""
        return self.value(self.compute(obj, seed=seed, **options))


def _entry(
    name: str, description: str, module: str, function: str, attribute: str, **options: Any
) -> Measure:
    return Measure(name, description, f"lrbs.{module}", function, attribute, options)


#: canonical name -> :class:`Measure` (the module docstring describes each one).
MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        # the residual test the report has always used (hessian_eigenvalues' own default is a value tolerance)
        _entry(
            "lambda_max",
            "largest Hessian eigenvalue (Lanczos, relative residual <= 1e-4)",
            "curvature",
            "hessian_eigenvalues",
            "top",
            k=1,
            tol=1e-4,
            tol_on="residual",
        ),
        _entry(
            "trace",
            "Hessian trace (Hutch++, 99 HVPs)",
            "curvature",
            "hessian_trace",
            "value",
            method="hutch++",
            num_hvps=99,
        ),
        _entry(
            "negative_mass",
            "SLQ spectral density mass below 0",
            "curvature",
            "spectral_density",
            "negative_mass",
            num_runs=5,
            lanczos_steps=40,
        ),
        _entry(
            "keskar",
            "Keskar et al. 2017 sharpness, epsilon=1e-3, full space",
            "sharpness",
            "keskar_sharpness",
            "value",
            epsilon=1e-3,
            max_iter=10,
        ),
        _entry(
            "keskar_subspace",
            "Keskar et al. 2017 sharpness, epsilon=1e-3, random 100-dim subspace",
            "sharpness",
            "keskar_subspace_sharpness",
            "value",
            epsilon=1e-3,
            max_iter=10,
            subspace_dim=100,
        ),
        _entry(
            "worst_case",
            "worst-case (SAM) sharpness, rho=0.05, l2",
            "sharpness",
            "worst_case_sharpness",
            "value",
            rho=0.05,
            norm="l2",
            steps=20,
        ),
        _entry(
            "worst_case_adaptive",
            "adaptive worst-case (ASAM) sharpness, rho=0.5, l2",
            "sharpness",
            "worst_case_sharpness",
            "value",
            rho=0.5,
            norm="l2",
            steps=20,
            adaptive=True,
        ),
        _entry(
            "average",
            "average-case sharpness, rho=0.01, Gaussian",
            "sharpness",
            "average_sharpness",
            "value",
            rho=0.01,
            norm="l2",
            samples=100,
        ),
        _entry(
            "average_adaptive",
            "adaptive average-case sharpness, rho=0.1, Gaussian",
            "sharpness",
            "average_sharpness",
            "value",
            rho=0.1,
            norm="l2",
            samples=100,
            adaptive=True,
        ),
        _entry(
            "edge_of_stability",
            "lr * lambda_max against 2 (1 + momentum); needs lr=",
            "sharpness",
            "edge_of_stability_at",
            "value",
        ),
    )
}

#: old name -> canonical name: ``top_eigenvalue`` (the sweeps' former name), ``top_eig`` (the papers' key).
ALIASES: dict[str, str] = {"top_eigenvalue": "lambda_max", "top_eig": "lambda_max"}


def canonical(name: str) -> str:
    """The canonical name of ``name`` (itself or the target of an alias).

    Raises:
        ConfigError: an unknown name (the closest canonical name is suggested).
    """
    name = ALIASES.get(name, name)
    if name not in MEASURES:
        raise unknown_name("measure", name, MEASURES)
    return name


def get(name: str) -> Measure:
    """The :class:`Measure` called ``name`` (canonical or an alias); ConfigError for an unknown name."""
    return MEASURES[canonical(name)]


def check_options(measures: list[str], options: Mapping[str, Any]) -> None:
    """Raise ConfigError for per-measure options naming a measure that is not requested."""
    for name in options:
        if name not in measures:
            raise ConfigError(f"options has key {name!r}, which is not among measures={measures}")
