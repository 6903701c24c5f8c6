"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import ConfigError

#: The ``TrainConfig`` options that :func:`add_train_options` gives flags (model and data come from
#: :func:`add_zoo_data_options`).
TRAIN_FLAGS = (
    "optimizer",
    "lr",
    "batch_size",
    "steps",
    "epochs",
    "momentum",
    "weight_decay",
    "rho",
    "seed",
    "max_micro_batch",
)

#: What the command line adds to an option's ``TrainConfig`` help.
_CLI_NOTES = {"batch_size": " (a DataLoader from --data keeps its own batches)"}


def add_train_options(p: argparse.ArgumentParser, *, steps_default: int | None = None) -> None:
    """The options of ``lrbs train`` (also used by ``sharpness --train``): the model and data options, then one flag
    per :data:`TRAIN_FLAGS` option, with the name, default and help of :class:`lrbs.train.TrainConfig`."""
    from ..train import TrainConfig

    defaults = TrainConfig.defaults()
    add_zoo_data_options(p, model_default=defaults["model"], dataset_default=defaults["dataset"])
    add_config_flags(p, TRAIN_FLAGS, defaults={"steps": steps_default})


def add_config_flags(
    p: argparse.ArgumentParser,
    names: tuple[str, ...],
    *,
    flags: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per :class:`lrbs.train.TrainConfig` option in ``names`` (``flags`` renames some; ``defaults``
    overrides some defaults): its default and help, and a converter by its kind. Numbers-or-specs stay text here
    (``"0.1"``, ``"128"``) and are read by :func:`config_from_args`."""
    from ..train import TrainConfig

    convert = {"int": int, "float": float, "json": json_dict}  # str, number_or_spec, int_or_spec: the text
    options = {o["name"]: o for o in TrainConfig.cli_options()}
    for name in names:
        o = options[name]
        default = (defaults or {}).get(name, o["default"])
        if o["kind"] in ("number_or_spec", "int_or_spec") and default is not None:
            default = str(default)
        p.add_argument(
            (flags or {}).get(name, o["flag"]),
            type=convert.get(o["kind"]),
            default=default,
            help=o["help"] + _CLI_NOTES.get(name, ""),
        )


def add_zoo_data_options(
    p: argparse.ArgumentParser, *, model_default: str | None = None, dataset_default: str = "mnist1d"
) -> None:
    """The model and data options every analysis takes: ``--model``/``--model-opts`` (see :func:`add_model_option`;
    required when ``model_default`` is None), ``--dataset``, ``--dataset-opts`` and ``--data``."""
    add_model_option(p, default=model_default)
    p.add_argument(
        "--dataset", default=dataset_default, help="dataset name (mnist1d, blobs, teacher, cifar10)"
    )
    p.add_argument(
        "--dataset-opts",
        default=None,
        type=json_dict,
        help='JSON dict of dataset options, e.g. \'{"path": "..."}\'',
    )
    add_data_option(p)


def json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def number_or_spec(name: str, text: str, *, integer: bool = False) -> Any:
    """'0.1' -> 0.1, '128' -> 128, anything else is kept as a schedule spec string (parsed later, safely)."""
    try:
        return int(text) if integer else float(text)
    except ValueError:
        if integer:
            try:
                float(text)
            except ValueError:
                return text
            raise ConfigError(
                f"{name}={text!r} is not allowed: must be an integer or a schedule spec"
            ) from None
        return text


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "model_opts": args.model_opts or {},
        "dataset": args.dataset,
        "dataset_opts": args.dataset_opts or {},
        "optimizer": args.optimizer,
        "lr": number_or_spec("--lr", args.lr),
        "batch_size": number_or_spec("--batch-size", args.batch_size, integer=True),
        "steps": args.steps,
        "epochs": args.epochs,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "rho": args.rho,
        "seed": args.seed,
        "max_micro_batch": args.max_micro_batch,
    }


# --------------------------------------------------------------------------------------------- the user's own code
IMPORT_SPEC_HELP = (
    "or an import spec pkg.module:factory (your own code, imported like uvicorn's app spec; the factory is called "
    "with no arguments, or with the --*-opts JSON as keyword arguments)"
)


def add_model_option(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--model NAME`` (the zoo) or ``--model pkg.module:factory`` (the user's own), and ``--model-opts``."""
    p.add_argument(
        "--model",
        default=default,
        required=default is None,
        help=f"model name (see lrbs.list_models()), {IMPORT_SPEC_HELP}",
    )
    p.add_argument(
        "--model-opts",
        default=None,
        type=json_dict,
        help="JSON dict of model options (keyword arguments of a factory), e.g. '{\"depth\": 4}'",
    )


def add_data_option(p: argparse.ArgumentParser) -> None:
    """``--data pkg.module:factory``: the user's own data, instead of a built-in ``--dataset``."""
    p.add_argument(
        "--data",
        default=None,
        metavar="MODULE:FACTORY",
        help="your own data: an import spec pkg.module:factory whose factory returns an lrbs Dataset, a (train, "
        "test) pair, or anything lrbs reads as data (tensors, a torch Dataset, a DataLoader, a list of batches); "
        "replaces --dataset (--dataset-opts become its keyword arguments)",
    )


def is_import_spec(text: Any) -> bool:
    """Whether ``text`` is an import spec ``module:attribute`` rather than a built-in name."""
    if not isinstance(text, str) or text.count(":") != 1:
        return False
    module, attr = text.split(":")
    return (
        bool(module)
        and bool(attr)
        and all(part.isidentifier() for part in (*module.split("."), *attr.split(".")))
    )


def _looks_like_spec(text: Any) -> bool:
    """A colon marks an import spec (built-in names have none); a malformed one is then reported as such."""
    return isinstance(text, str) and ":" in text


def uses_own_code(args: argparse.Namespace) -> bool:
    """Whether ``--model`` or ``--data`` (or ``--dataset``) is an import spec of the user's own code."""
    return (
        getattr(args, "data", None) is not None
        or _looks_like_spec(getattr(args, "model", None))
        or _looks_like_spec(getattr(args, "dataset", None))
    )


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def import_spec(option: str, spec: str) -> Any:
    """The object that ``spec`` (``pkg.module:attr`` or ``pkg.module:obj.attr``) names, importing the module.

    The current directory is searched first, as uvicorn does. Importing runs the module's code: that is the
    point (it is the user's own code). Checkpoints, by contrast, are still loaded without executing anything.

    Raises:
        ConfigError: one line naming the option, the spec and the problem (malformed spec, module not found, an
            import that raised, a missing attribute).
    """
    import importlib
    import os
    import sys

    if not is_import_spec(spec):
        raise ConfigError(
            f"{option} {spec!r} is not an import spec: must be 'pkg.module:factory' (dotted module path, a colon, "
            "then the attribute)"
        )
    module_name, attr = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(
                f"{option} {spec}: module {module_name!r} not found (is its directory the current one or on "
                "PYTHONPATH?)"
            ) from None
        raise ConfigError(f"{option} {spec}: importing {module_name!r} raised {_one_line(e)}") from None
    except Exception as e:  # the user's module failed while importing
        raise ConfigError(f"{option} {spec}: importing {module_name!r} raised {_one_line(e)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{option} {spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def call_factory(
    option: str, spec: str, kwargs: dict[str, Any] | None = None, *, seed: int | None = None
) -> Any:
    """Import ``spec`` and call the factory it names (no arguments, or ``kwargs``), under ``torch.manual_seed(seed)``
    in a forked RNG when a seed is given (so a model's initialisation follows ``--seed``).

    Raises:
        ConfigError: as :func:`import_spec`; the attribute is not callable (or is a model instance, not a factory);
            the factory raised.
    """
    import torch
    from torch import nn

    factory = import_spec(option, spec)
    if isinstance(factory, nn.Module) or not callable(factory):
        what = "a model instance" if isinstance(factory, nn.Module) else type(factory).__name__
        raise ConfigError(
            f"{option} {spec}: is {what}, not callable: it must name a factory (a function or class) that returns "
            "a fresh object when called with no arguments"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return factory(**(kwargs or {}))
    except Exception as e:  # the user's factory failed
        raise ConfigError(f"{option} {spec}: the factory raised {_one_line(e)}") from None


class Data:
    """What ``--dataset`` / ``--data`` gave: the training data, the test data (or None), and the lrbs ``Dataset``
    when there is one (built-in models need it for their shapes).

    Attributes:
        train, test: data for the analyses (anything :func:`lrbs.batches.as_source` takes).
        dataset: the lrbs ``Dataset``, or None for other data.
        name: the built-in name or the import spec.
    """

    def __init__(self, train: Any, test: Any, dataset: Any, name: str):
        self.train, self.test, self.dataset, self.name = train, test, dataset, name

    @property
    def fit_data(self) -> Any:
        """What ``fit`` / ``lr_range_test`` / ``noise_scale`` take: the lrbs Dataset, else the training data."""
        return self.dataset if self.dataset is not None else self.train

    @property
    def with_test(self) -> Any:
        """The lrbs Dataset, else an object with ``train`` and ``test`` attributes when there is test data (what
        the connectivity functions read as both splits), else the training data."""
        if self.dataset is not None or self.test is None:
            return self.fit_data
        from types import SimpleNamespace

        return SimpleNamespace(train=self.train, test=self.test)

    def describe(self) -> Any:
        """A JSON-able record for stores: the Dataset's description, or the import spec."""
        return self.dataset.describe() if self.dataset is not None else {"data": self.name}


def _is_lrbs_dataset(obj: Any) -> bool:
    from ..data import Dataset

    return isinstance(obj, Dataset)


def _data_from_factory(spec: str, value: Any) -> Data:
    import torch

    from ..batches import as_source
    from ..errors import LrbsError

    if _is_lrbs_dataset(value):
        return Data(value.train, value.test, value, spec)
    pair = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and not any(isinstance(v, torch.Tensor) for v in value)
    )
    parts = (("train", value[0]), ("test", value[1])) if pair else (("data", value),)
    for what, part in parts:
        try:
            as_source(part, name="data")
        except LrbsError as e:
            raise ConfigError(
                f"--data {spec}: the factory returned {type(value).__name__}"
                + (f" whose {what} part" if pair else "")
                + f" lrbs cannot read as data: {_one_line(e).split(': ', 1)[1]}"
            ) from None
    return Data(value[0], value[1], None, spec) if pair else Data(value, None, None, spec)


def load_data(args: argparse.Namespace) -> Data:
    """The data of ``--data SPEC`` (the user's factory) or of the built-in ``--dataset NAME``."""
    opts = getattr(args, "dataset_opts", None) or {}
    spec = getattr(args, "data", None)
    if spec is None and _looks_like_spec(getattr(args, "dataset", None)):
        spec = args.dataset  # --dataset pkg.module:factory works as well
    if spec is not None:
        return _data_from_factory(spec, call_factory("--data", spec, opts))
    from ..data import load_dataset

    ds = load_dataset(args.dataset, **opts)
    return Data(ds.train, ds.test, ds, args.dataset)


def load_model(args: argparse.Namespace, data: Data, *, seed: int | None = None) -> Any:
    """The model of ``--model``: the user's factory (``pkg.module:factory``) or a built-in name built for ``data``.

    Raises:
        ConfigError: a factory problem (see :func:`call_factory`), a factory that returned no ``nn.Module``, or a
            built-in model without an lrbs Dataset to take its shapes from.
    """
    from torch import nn

    opts = getattr(args, "model_opts", None) or {}
    if _looks_like_spec(args.model):
        model = call_factory("--model", args.model, opts, seed=seed)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"--model {args.model}: the factory returned {type(model).__name__}: it must return a "
                "torch.nn.Module"
            )
        return model
    if data.dataset is None:
        raise ConfigError(
            f"--model {args.model} is a built-in model, which takes its shapes from a built-in --dataset (or a --data "
            f"factory returning an lrbs Dataset); --data {data.name} gives other data: use --model "
            "pkg.module:factory for your own model"
        )
    from ..models import build_model

    kw = {} if seed is None else {"seed": seed}
    return build_model(args.model, dataset=data.dataset, **kw, **opts)


def batch_size_for(data: Any, batch_size: Any) -> Any:
    """``--batch-size`` for ``data``, or None where the data comes in ready batches (a DataLoader, a list of
    batches: they keep their own size; a bare ``IterableDataset`` is batched by ``--batch-size``)."""
    import torch

    from ..batches import LoaderSource, as_source

    if isinstance(data, torch.utils.data.IterableDataset):
        return batch_size
    return None if isinstance(as_source(data, name="data"), LoaderSource) else batch_size


def fit_from_config(
    cfg: dict[str, Any],
    model: Any,
    data: Data,
    *,
    store: Any = None,
    checkpoint: Any = None,
    progress: bool = False,
) -> Any:
    """``fit`` with the options of ``lrbs train`` (``cfg`` from :func:`config_from_args`) on a model and data
    that the CLI resolved (the user's own or built-in), as :func:`lrbs.train.train_config` does for names. Data that
    comes in ready batches (a DataLoader from ``--data``) keeps its own batch size: ``--batch-size`` is ignored."""
    from ..schedules import parse
    from ..train import fit

    def spec(value: Any) -> Any:
        return parse(value) if isinstance(value, str) else value

    lr, batch = spec(cfg["lr"]), spec(cfg["batch_size"])
    if cfg.get("lr_rule") is not None or cfg.get("warmup"):
        from ..recipes import linear_scaling

        if cfg.get("base_batch_size") is None:
            raise ConfigError("--lr-rule/--warmup need --base-batch (the batch size the lr was tuned for)")
        lr = linear_scaling(
            lr,
            batch,
            cfg["base_batch_size"],
            rule=cfg.get("lr_rule") or "linear",
            warmup_steps=cfg.get("warmup") or 0,
        )
    batch = batch_size_for(
        data.fit_data, batch
    )  # a DataLoader (or a list of batches) keeps its own batch size
    extra = {} if data.dataset is not None or data.test is None else {"test_data": data.test}
    return fit(
        model,
        data.fit_data,
        optimizer=cfg["optimizer"],
        lr=lr,
        batch_size=batch,
        steps=cfg["steps"],
        epochs=cfg["epochs"],
        momentum=cfg["momentum"],
        weight_decay=cfg["weight_decay"],
        rho=cfg["rho"],
        seed=cfg["seed"],
        eval_every=cfg.get("eval_every"),
        max_micro_batch=cfg["max_micro_batch"],
        store=store,
        checkpoint=checkpoint,
        progress=progress,
        config={"train_config": {**cfg, "data": data.name}},
        **extra,
    )


# --------------------------------------------------------------------------------------------- recording a run
class RunRecord:
    """The run of :func:`recorded_run`: its store key (None without ``--store``) and :meth:`finish`; a thin
    wrapper of :class:`lrbs.store.Run` that does nothing without a store."""

    def __init__(self, run: Any = None):
        self.run = run

    @property
    def key(self) -> str | None:
        """The run's store key; None without ``--store``."""
        return None if self.run is None else self.run.key

    def finish(self, result: Mapping[str, Any], metrics: list[tuple[int, str, float]]) -> None:
        """Record the run as completed with its result and metric rows (nothing without a store)."""
        if self.run is not None:
            self.run.finish("completed", result=result, metrics=metrics)


@contextlib.contextmanager
def recorded_run(path: str | None, config: Mapping[str, Any], kind: str) -> Iterator[RunRecord]:
    """A CLI measurement's run in the ``--store`` at ``path`` (nothing when ``path`` is None):
    ``with store.run(config, kind, rerun=True)`` around the body (an exception marks the run failed with its one
    line and is re-raised), the store closed on exit. The body calls :meth:`RunRecord.finish` with what it
    measured."""
    if path is None:
        yield RunRecord()
        return
    from ..store import Store

    with Store(path) as store, store.run(config, kind, rerun=True) as run:
        yield RunRecord(run)
