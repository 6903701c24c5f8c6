"""lrbs: the learning rate and the batch size, measured.

Every analysis is a pure function of an :class:`Objective` (a model, a loss and fixed data, evaluated
functionally) and never mutates the user's model, optimizer or random state.

The public names below are imported lazily (PEP 562): ``import lrbs`` costs no torch import until a name is
used, so ``lrbs --version`` starts fast.
"""

from __future__ import annotations

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("lrbs")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# public name -> (module, name in that module), by topic; ``__all__`` is ``__version__`` and these names,
# in this order (one list, not a second copy of it)
_LAZY: dict[str, tuple[str, str]] = {
    # data and models
    "Dataset": ("data", "Dataset"),
    "Split": ("data", "Split"),
    "load_dataset": ("data", "load_dataset"),
    "list_datasets": ("data", "list_datasets"),
    "build_model": ("models", "build_model"),
    "list_models": ("models", "list_models"),
    "count_parameters": ("models", "count_parameters"),
    # the core and the batch protocol
    "Objective": ("objective", "Objective"),
    "BatchLoss": ("batches", "BatchLoss"),
    "ModelCallError": ("batches", "ModelCallError"),
    # training
    "fit": ("train", "fit"),
    "TrainStep": ("step", "TrainStep"),
    "PRECISIONS": ("step", "PRECISIONS"),
    "train_config": ("train", "train_config"),
    "FitResult": ("train", "FitResult"),
    "Callback": ("train", "Callback"),
    "StopAtTrainAccuracy": ("train", "StopAtTrainAccuracy"),
    "save_checkpoint": ("train", "save_checkpoint"),
    "load_checkpoint": ("train", "load_checkpoint"),
    # schedules and recipes (the constructors live in lrbs.schedules)
    "Schedule": ("schedules", "Schedule"),
    "parse_schedule": ("schedules", "parse"),
    "attach": ("schedules", "attach"),
    "scale_lr": ("schedules", "scale_lr"),
    "grow_batch_instead": ("schedules", "grow_batch_instead"),
    "linear_scaling": ("recipes", "linear_scaling"),
    "small_batch_warmup": ("recipes", "small_batch_warmup"),
    "accumulation_plan": ("recipes", "accumulation_plan"),
    # optimizers
    "SAM": ("optim", "SAM"),
    "LARS": ("optim", "LARS"),
    "LAMB": ("optim", "LAMB"),
    "get_optimizer": ("optim", "get_optimizer"),
    "list_optimizers": ("optim", "list_optimizers"),
    "sam_step": ("optim", "sam_step"),
    # LR range test
    "lr_range_test": ("range_test", "lr_range_test"),
    "RangeTestResult": ("range_test", "RangeTestResult"),
    # curvature
    "hessian_eigenvalues": ("curvature", "hessian_eigenvalues"),
    "hessian_trace": ("curvature", "hessian_trace"),
    "spectral_density": ("curvature", "spectral_density"),
    "lanczos_eigenvalues": ("curvature", "lanczos_eigenvalues"),
    "power_iteration": ("curvature", "power_iteration"),
    "hutchinson_trace": ("curvature", "hutchinson_trace"),
    "hutchpp_trace": ("curvature", "hutchpp_trace"),
    "EigenResult": ("curvature", "EigenResult"),
    "TraceResult": ("curvature", "TraceResult"),
    "SpectralDensity": ("curvature", "SpectralDensity"),
    # sharpness
    "keskar_sharpness": ("sharpness", "keskar_sharpness"),
    "worst_case_sharpness": ("sharpness", "worst_case_sharpness"),
    "average_sharpness": ("sharpness", "average_sharpness"),
    "edge_of_stability": ("sharpness", "edge_of_stability"),
    "sharpness_report": ("sharpness", "sharpness_report"),
    # landscapes and connectivity
    "random_direction": ("landscape", "random_direction"),
    "eigen_direction": ("landscape", "eigen_direction"),
    "pca_directions": ("landscape", "pca_directions"),
    "landscape_1d": ("landscape", "landscape_1d"),
    "landscape_2d": ("landscape", "landscape_2d"),
    "interpolate": ("landscape", "interpolate"),
    "refine": ("landscape", "refine"),
    "nonconvexity": ("landscape", "nonconvexity"),
    "Direction": ("landscape", "Direction"),
    "Landscape": ("landscape", "Landscape"),
    "PCADirections": ("landscape", "PCADirections"),
    "NonConvexity": ("landscape", "NonConvexity"),
    "linear_path": ("connectivity", "linear_path"),
    "fit_curve": ("connectivity", "fit_curve"),
    "auto_neb": ("connectivity", "auto_neb"),
    "barriers": ("connectivity", "barriers"),
    "Curve": ("connectivity", "Curve"),
    "ConnectivityPath": ("connectivity", "Path"),
    # choosing LR, batch size and warmup
    "tune": ("tune", "tune"),
    "Recommendation": ("tune", "Recommendation"),
    # batch size
    "noise_scale": ("noise_scale", "noise_scale"),
    "NoiseScale": ("noise_scale", "NoiseScale"),
    "NoiseScaleTracker": ("noise_scale", "NoiseScaleTracker"),
    "critical_batch": ("noise_scale", "critical_batch"),
    "steps_to_target": ("noise_scale", "steps_to_target"),
    # sweeps and storage
    "sweep": ("sweep", "sweep"),
    "SweepResult": ("sweep", "SweepResult"),
    "Store": ("store", "Store"),
    "RunRecord": ("store", "RunRecord"),
    "key_for": ("store", "key_for"),
    # errors
    "LrbsError": ("errors", "LrbsError"),
    "ConfigError": ("errors", "ConfigError"),
    "LrbsTypeError": ("errors", "LrbsTypeError"),
    "DataError": ("errors", "DataError"),
    "ShapeError": ("errors", "ShapeError"),
    "StoreError": ("errors", "StoreError"),
    "CheckpointError": ("errors", "CheckpointError"),
    "DependencyError": ("errors", "DependencyError"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'lrbs' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # cache: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``lrbs.sweep`` / ``lrbs.noise_scale`` / ``lrbs.tune`` stay the functions after their modules are imported.

    Importing a submodule sets it as an attribute of the package; where a public function has the module's name,
    that attribute is left to the function (as the eager imports of earlier versions did).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and _LAZY[name][1] == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = ["__version__", *_LAZY]
