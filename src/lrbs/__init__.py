"""lrbs: the learning rate and the batch size, measured.

Every analysis is a pure function of an :class:`Objective` (a model, a loss and fixed data, evaluated
functionally) and never mutates the user's model, optimizer or random state.
"""

__version__ = "0.1.0"

from .connectivity import Curve, auto_neb, barriers, fit_curve, linear_path
from .connectivity import Path as ConnectivityPath
from .curvature import (
    EigenResult,
    SpectralDensity,
    TraceResult,
    hessian_eigenvalues,
    hessian_trace,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenvalues,
    power_iteration,
    spectral_density,
)
from .data import Dataset, Split, list_datasets, load_dataset
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DependencyError,
    LrbsError,
    LrbsTypeError,
    ShapeError,
    StoreError,
)
from .landscape import (
    Direction,
    Landscape,
    NonConvexity,
    PCADirections,
    eigen_direction,
    interpolate,
    landscape_1d,
    landscape_2d,
    nonconvexity,
    pca_directions,
    random_direction,
    refine,
)
from .models import build_model, count_parameters, list_models
from .noise_scale import NoiseScale, NoiseScaleTracker, critical_batch, noise_scale, steps_to_target
from .objective import Objective
from .optim import LAMB, LARS, SAM, get_optimizer, list_optimizers, sam_step
from .range_test import RangeTestResult, lr_range_test
from .recipes import accumulation_plan, linear_scaling, small_batch_warmup
from .schedules import Schedule, attach, grow_batch_instead, scale_lr
from .schedules import parse as parse_schedule
from .sharpness import (
    average_sharpness,
    edge_of_stability,
    keskar_sharpness,
    sharpness_report,
    worst_case_sharpness,
)
from .store import RunRecord, Store, key_for
from .sweep import SweepResult, sweep
from .train import (
    Callback,
    FitResult,
    StopAtTrainAccuracy,
    fit,
    load_checkpoint,
    save_checkpoint,
    train_config,
)

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
    # the core
    "Objective",
    # training
    "fit",
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
