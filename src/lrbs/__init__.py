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

# public name -> (module, name in that module)
_LAZY: dict[str, tuple[str, str]] = {
    "Curve": ("connectivity", "Curve"),
    "auto_neb": ("connectivity", "auto_neb"),
    "barriers": ("connectivity", "barriers"),
    "fit_curve": ("connectivity", "fit_curve"),
    "linear_path": ("connectivity", "linear_path"),
    "ConnectivityPath": ("connectivity", "Path"),
    "EigenResult": ("curvature", "EigenResult"),
    "SpectralDensity": ("curvature", "SpectralDensity"),
    "TraceResult": ("curvature", "TraceResult"),
    "hessian_eigenvalues": ("curvature", "hessian_eigenvalues"),
    "hessian_trace": ("curvature", "hessian_trace"),
    "hutchinson_trace": ("curvature", "hutchinson_trace"),
    "hutchpp_trace": ("curvature", "hutchpp_trace"),
    "lanczos_eigenvalues": ("curvature", "lanczos_eigenvalues"),
    "power_iteration": ("curvature", "power_iteration"),
    "spectral_density": ("curvature", "spectral_density"),
    "Dataset": ("data", "Dataset"),
    "Split": ("data", "Split"),
    "list_datasets": ("data", "list_datasets"),
    "load_dataset": ("data", "load_dataset"),
    "CheckpointError": ("errors", "CheckpointError"),
    "ConfigError": ("errors", "ConfigError"),
    "DataError": ("errors", "DataError"),
    "DependencyError": ("errors", "DependencyError"),
    "LrbsError": ("errors", "LrbsError"),
    "LrbsTypeError": ("errors", "LrbsTypeError"),
    "ShapeError": ("errors", "ShapeError"),
    "StoreError": ("errors", "StoreError"),
    "Direction": ("landscape", "Direction"),
    "Landscape": ("landscape", "Landscape"),
    "NonConvexity": ("landscape", "NonConvexity"),
    "PCADirections": ("landscape", "PCADirections"),
    "eigen_direction": ("landscape", "eigen_direction"),
    "interpolate": ("landscape", "interpolate"),
    "landscape_1d": ("landscape", "landscape_1d"),
    "landscape_2d": ("landscape", "landscape_2d"),
    "nonconvexity": ("landscape", "nonconvexity"),
    "pca_directions": ("landscape", "pca_directions"),
    "random_direction": ("landscape", "random_direction"),
    "refine": ("landscape", "refine"),
    "build_model": ("models", "build_model"),
    "count_parameters": ("models", "count_parameters"),
    "list_models": ("models", "list_models"),
    "NoiseScale": ("noise_scale", "NoiseScale"),
    "NoiseScaleTracker": ("noise_scale", "NoiseScaleTracker"),
    "critical_batch": ("noise_scale", "critical_batch"),
    "noise_scale": ("noise_scale", "noise_scale"),
    "steps_to_target": ("noise_scale", "steps_to_target"),
    "Objective": ("objective", "Objective"),
    "LAMB": ("optim", "LAMB"),
    "LARS": ("optim", "LARS"),
    "SAM": ("optim", "SAM"),
    "get_optimizer": ("optim", "get_optimizer"),
    "list_optimizers": ("optim", "list_optimizers"),
    "sam_step": ("optim", "sam_step"),
    "RangeTestResult": ("range_test", "RangeTestResult"),
    "lr_range_test": ("range_test", "lr_range_test"),
    "accumulation_plan": ("recipes", "accumulation_plan"),
    "linear_scaling": ("recipes", "linear_scaling"),
    "small_batch_warmup": ("recipes", "small_batch_warmup"),
    "Schedule": ("schedules", "Schedule"),
    "attach": ("schedules", "attach"),
    "grow_batch_instead": ("schedules", "grow_batch_instead"),
    "scale_lr": ("schedules", "scale_lr"),
    "parse_schedule": ("schedules", "parse"),
    "average_sharpness": ("sharpness", "average_sharpness"),
    "edge_of_stability": ("sharpness", "edge_of_stability"),
    "keskar_sharpness": ("sharpness", "keskar_sharpness"),
    "sharpness_report": ("sharpness", "sharpness_report"),
    "worst_case_sharpness": ("sharpness", "worst_case_sharpness"),
    "RunRecord": ("store", "RunRecord"),
    "Store": ("store", "Store"),
    "key_for": ("store", "key_for"),
    "SweepResult": ("sweep", "SweepResult"),
    "sweep": ("sweep", "sweep"),
    "Callback": ("train", "Callback"),
    "FitResult": ("train", "FitResult"),
    "StopAtTrainAccuracy": ("train", "StopAtTrainAccuracy"),
    "fit": ("train", "fit"),
    "load_checkpoint": ("train", "load_checkpoint"),
    "save_checkpoint": ("train", "save_checkpoint"),
    "train_config": ("train", "train_config"),
    "tune": ("tune", "tune"),
    "Recommendation": ("tune", "Recommendation"),
    "BatchLoss": ("batches", "BatchLoss"),
    "ModelCallError": ("batches", "ModelCallError"),
    "TrainStep": ("step", "TrainStep"),
    "PRECISIONS": ("step", "PRECISIONS"),
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


__all__ = [
    "__version__",
    # data and models
    "Dataset",
    "Split",
    "load_dataset",
    "list_datasets",
    "build_model",
    "list_models",
    "count_parameters",
    # the core and the batch protocol
    "Objective",
    "BatchLoss",
    "ModelCallError",
    # training
    "fit",
    "TrainStep",
    "PRECISIONS",
    "train_config",
    "FitResult",
    "Callback",
    "StopAtTrainAccuracy",
    "save_checkpoint",
    "load_checkpoint",
    # schedules and recipes (the constructors live in lrbs.schedules)
    "Schedule",
    "parse_schedule",
    "attach",
    "scale_lr",
    "grow_batch_instead",
    "linear_scaling",
    "small_batch_warmup",
    "accumulation_plan",
    # optimizers
    "SAM",
    "LARS",
    "LAMB",
    "get_optimizer",
    "list_optimizers",
    "sam_step",
    # LR range test
    "lr_range_test",
    "RangeTestResult",
    # curvature
    "hessian_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "lanczos_eigenvalues",
    "power_iteration",
    "hutchinson_trace",
    "hutchpp_trace",
    "EigenResult",
    "TraceResult",
    "SpectralDensity",
    # sharpness
    "keskar_sharpness",
    "worst_case_sharpness",
    "average_sharpness",
    "edge_of_stability",
    "sharpness_report",
    # landscapes and connectivity
    "random_direction",
    "eigen_direction",
    "pca_directions",
    "landscape_1d",
    "landscape_2d",
    "interpolate",
    "refine",
    "nonconvexity",
    "Direction",
    "Landscape",
    "PCADirections",
    "NonConvexity",
    "linear_path",
    "fit_curve",
    "auto_neb",
    "barriers",
    "Curve",
    "ConnectivityPath",
    # choosing LR, batch size and warmup
    "tune",
    "Recommendation",
    # batch size
    "noise_scale",
    "NoiseScale",
    "NoiseScaleTracker",
    "critical_batch",
    "steps_to_target",
    # sweeps and storage
    "sweep",
    "SweepResult",
    "Store",
    "RunRecord",
    "key_for",
    # errors
    "LrbsError",
    "ConfigError",
    "LrbsTypeError",
    "DataError",
    "ShapeError",
    "StoreError",
    "CheckpointError",
    "DependencyError",
]
