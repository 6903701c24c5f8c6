"""TrainConfig: the one typed, frozen training config behind normalize_config, CONFIG_DEFAULTS and the CLI."""

import dataclasses

import pytest

from lrbs.errors import ConfigError
from lrbs.train import CONFIG_DEFAULTS, TrainConfig, normalize_config

# the keys and defaults the training config had before TrainConfig (run keys depend on them)
OLD_DEFAULTS = {
    "model": "cnn1d", "model_opts": {}, "dataset": "mnist1d", "dataset_opts": {}, "optimizer": "sgd",
    "lr": 0.1, "batch_size": 128, "steps": None, "epochs": None, "momentum": 0.9, "weight_decay": 0.0,
    "rho": None, "optimizer_opts": {}, "seed": 0, "model_seed": None, "eval_every": None,
    "max_micro_batch": None, "lr_rule": None, "base_batch_size": None, "warmup": None, "stop_train_acc": None,
}  # fmt: skip


def test_defaults_and_key_order_are_the_old_mapping():
    assert list(CONFIG_DEFAULTS.items()) == list(OLD_DEFAULTS.items())
    cfg = normalize_config({"steps": 5, "lr": "cosine(start=0.1, steps=5)"})
    assert list(cfg) == list(OLD_DEFAULTS)
    assert cfg == {**OLD_DEFAULTS, "steps": 5, "lr": "cosine(start=0.1, steps=5)"}


def test_values_are_kept_as_given_and_the_config_is_frozen():
    c = TrainConfig.from_dict({"epochs": 2, "lr": 1, "batch_size": "128"})
    assert type(c.lr) is int and c.batch_size == "128" and c.to_dict()["epochs"] == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 0.5  # type: ignore[misc]


def test_bad_configs_are_rejected_with_the_old_messages():
    with pytest.raises(
        ConfigError, match=r"unknown training option 'lrr'\. Did you mean 'lr'\? Valid options: "
    ):
        normalize_config({"lrr": 0.1, "steps": 1})
    with pytest.raises(ConfigError, match="give exactly one of steps= and epochs= \\(got neither\\)"):
        TrainConfig.from_dict({"lr": 0.1})


def test_cli_options_name_flags_kinds_and_defaults():
    opts = {o["name"]: o for o in TrainConfig.cli_options()}
    assert opts["batch_size"]["flag"] == "--batch-size" and opts["batch_size"]["kind"] == "int_or_spec"
    assert opts["lr"]["default"] == 0.1 and opts["dataset_opts"]["kind"] == "json"
    assert set(opts) == set(OLD_DEFAULTS)
    assert all(o["help"] for o in opts.values())
