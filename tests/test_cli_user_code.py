"""`--model pkg.module:factory` / `--data pkg.module:factory`: the CLI on the user's own code (a two-input model and
TensorDatasets written to a temporary module), run in-process, against the same calls made through the API."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from lrbs.cli import main

MODULE = "lrbs_user_code_fixture"

SOURCE = """
import torch
from torch import nn


class TwoInput(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.f = nn.Linear(5, hidden)
        self.g = nn.Linear(3, hidden)
        self.out = nn.Linear(hidden, 3)

    def forward(self, x, meta):
        return self.out(torch.tanh(self.f(x) + self.g(meta)))


def _tensors(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    meta = torch.randn(n, 3, generator=g)
    y = (x[:, :3] + meta).argmax(1)
    return torch.utils.data.TensorDataset(x, meta, y)


def make_model(hidden=8):
    return TwoInput(hidden)


def make_data():
    return _tensors(128, 0), _tensors(32, 1)


def make_train_only():
    return _tensors(128, 0)


def make_loaders():
    train = torch.utils.data.DataLoader(_tensors(128, 0), batch_size=32, shuffle=True)
    return train, torch.utils.data.DataLoader(_tensors(32, 1), batch_size=32)


def returns_a_string():
    return "not a model"


def raising():
    raise RuntimeError("boom\\non two lines")


not_callable = 3
model_instance = TwoInput()
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_code")
    (root / f"{MODULE}.py").write_text(SOURCE)
    (root / "lrbs_user_broken.py").write_text("import lrbs_no_such_dependency_xyz\n")
    (root / "lrbs_user_syntax.py").write_text("def f(:\n")
    sys.path.insert(0, str(root))
    try:
        yield __import__(MODULE)
    finally:
        sys.path.remove(str(root))
        for name in (MODULE, "lrbs_user_broken", "lrbs_user_syntax"):
            sys.modules.pop(name, None)


OWN = ["--model", f"{MODULE}:make_model", "--data", f"{MODULE}:make_data"]


def _own_model(user_module, seed=0):
    """The model the CLI builds: the factory called with no arguments under torch.manual_seed(--seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return user_module.make_model()


def _checkpoint(user_module, tmp_path, name, seed):
    from lrbs.train import save_checkpoint

    return save_checkpoint(_own_model(user_module, seed), tmp_path / f"{name}.safetensors")


# ----------------------------------------------------------------------------------------- each command
def test_noise_scale_on_own_model_and_data_equals_the_api(user_module, capsys):
    from lrbs.noise_scale import noise_scale

    argv = ["noise-scale", *OWN, "--small-batch", "4", "--big-batch", "32", "--estimates", "4", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    train, _ = user_module.make_data()
    ref = noise_scale(_own_model(user_module, 3), train, small_batch=4, big_batch=32, num_estimates=4, seed=3)
    assert f"{ref.b_simple:.4g}" in out and f"{ref.grad_sq:.4g}" in out
    assert f"on {MODULE}:make_data" in " ".join(out.split())


def test_sharpness_from_a_checkpoint_of_own_model(user_module, tmp_path, capsys):
    import re

    from lrbs.objective import Objective

    ck = _checkpoint(user_module, tmp_path, "m", seed=5)
    argv = ["sharpness", *OWN, "--checkpoint", str(ck), "--measures", "lambda_max", "--max-samples", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    printed = float(re.search(r"lambda_max\W+([-0-9.e+]+)", out).group(1))
    # reference: the top eigenvalue of the dense float64 Hessian on the same seeded 64-sample subset
    train, _ = user_module.make_data()
    obj = Objective(_own_model(user_module, 5), data=train, max_samples=64, seed=0, dtype=torch.float64)
    dense = torch.func.hessian(obj.loss_tensor)(obj.theta())
    assert printed == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-3)


def test_sharpness_trains_own_model_first(user_module, capsys):
    argv = ["sharpness", *OWN, "--train", "--steps", "3", "--batch-size", "16", "--measures", "lambda_max"]
    assert main([*argv, "--max-samples", "32"]) == 0, capsys.readouterr().err
    out = " ".join(capsys.readouterr().out.split())
    assert "lambda_max" in out and "32 samples" in out


def test_landscape_of_own_model_with_its_test_split(user_module, tmp_path, capsys):
    from lrbs.landscape import Landscape
    from lrbs.objective import Objective

    ck = _checkpoint(user_module, tmp_path, "m", seed=1)
    out_dir = tmp_path / "land"
    argv = ["landscape", *OWN, "--checkpoint", str(ck), "--grid", "3", "--test", "--out", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    train, _ = user_module.make_data()
    centre = Objective(_own_model(user_module, 1), data=train).loss()
    assert f"{centre:.4g}" in out
    land = Landscape.load(out_dir / "landscape")
    assert land.shape == (3, 3) and land.complete and "test_loss" in land.values
    assert float(land.loss[1, 1]) == pytest.approx(centre, rel=1e-6)


def test_connect_linear_between_two_checkpoints(user_module, tmp_path, capsys):
    from lrbs.connectivity import linear_path
    from lrbs.objective import Objective

    a, b = (_checkpoint(user_module, tmp_path, n, seed=s) for n, s in (("a", 0), ("b", 1)))
    argv = ["connect", *OWN, "--a", str(a), "--b", str(b), "--method", "linear", "--points", "5"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "o" / "path.png").is_file() and (tmp_path / "o" / "path.json").is_file()
    ma, mb = _own_model(user_module, 0), _own_model(user_module, 1)
    train, test = user_module.make_data()
    obj = Objective(ma, data=train, bn="recompute", batch_size=1000)
    test_obj = Objective(ma, data=test, bn="recompute", batch_size=1000)
    ref = linear_path(ma, mb, obj, 5, test_obj=test_obj)
    assert f"{ref.barriers['max_loss']:.4g}" in out and f"{ref.test_barriers['max_loss']:.4g}" in out


def test_connect_bezier_reports_train_and_test_barriers(user_module, tmp_path, capsys):
    from types import SimpleNamespace

    from lrbs.connectivity import fit_curve

    a, b = (_checkpoint(user_module, tmp_path, n, seed=s) for n, s in (("a", 0), ("b", 1)))
    argv = ["connect", *OWN, "--a", str(a), "--b", str(b), "--method", "bezier", "--epochs", "1"]
    assert main([*argv, "--batch-size", "32", "--bn", "eval"]) == 0
    out = capsys.readouterr().out
    train, test = user_module.make_data()
    splits = SimpleNamespace(train=train, test=test)
    ma, mb = _own_model(user_module, 0), _own_model(user_module, 1)
    ref = fit_curve(
        ma, mb, splits, kind="bezier", bends=3, epochs=1, lr=0.05, batch_size=32, seed=0, bn="eval"
    ).path
    assert f"{ref.barriers['max_loss']:.4g}" in out and f"{ref.test_barriers['max_loss']:.4g}" in out


def test_train_own_model_and_data(user_module, tmp_path, capsys):
    ck = tmp_path / "trained.safetensors"
    argv = ["train", *OWN, "--lr", "0.1", "--batch-size", "16", "--steps", "5", "--checkpoint", str(ck)]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "completed" in out and ck.exists()


def test_train_on_dataloaders_keeps_their_batch_size(user_module, tmp_path, capsys):
    from lrbs.store import Store

    store = tmp_path / "lab.sqlite"
    argv = ["train", "--model", f"{MODULE}:make_model", "--data", f"{MODULE}:make_loaders", "--steps", "4"]
    assert main([*argv, "--lr", "0.05", "--store", str(store)]) == 0, capsys.readouterr().err
    assert "completed" in capsys.readouterr().out
    with Store(store) as s:
        (run,) = s.runs(kind="fit")
        assert run.status == "completed"
        rows = s.metrics(run.key, "batch_size")
    assert [v for _, _, v in rows] == [32.0] * 4  # the loader's batches, not --batch-size's default 128


def test_noise_scale_and_find_lr_on_dataloaders(user_module, capsys):
    argv = [
        "noise-scale",
        "--model",
        f"{MODULE}:make_model",
        "--data",
        f"{MODULE}:make_loaders",
        "--train-steps",
        "3",
    ]
    assert main([*argv, "--small-batch", "4", "--big-batch", "32", "--estimates", "2"]) == 0, (
        capsys.readouterr().err
    )
    assert "B_simple" in capsys.readouterr().out
    loaders = ["--model", f"{MODULE}:make_model", "--data", f"{MODULE}:make_loaders"]
    code = main(["find-lr", *loaders, "--num-iter", "10"])  # the loader's batches of 32, not --batch-size 64
    assert code in (0, 1), capsys.readouterr().err


def test_find_lr_own_model_and_data_equals_the_api(user_module, capsys):
    from lrbs.optim import get_optimizer
    from lrbs.range_test import lr_range_test

    argv = ["find-lr", *OWN, "--num-iter", "40", "--batch-size", "16", "--end-lr", "10"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"on {MODULE}:make_data" in " ".join(out.split())
    model = _own_model(user_module, 0)
    opt = get_optimizer("sgd", model.parameters(), lr=1e-7, momentum=0.9, weight_decay=0.0)
    train, _ = user_module.make_data()
    ref = lr_range_test(
        model, opt, data=train, start_lr=1e-7, end_lr=10.0, num_iter=40, batch_size=16, seed=0
    )
    assert f"recommended lr: {ref.suggestions().recommended:.3g}" in out


def test_factory_options_and_dataset_spec(user_module, capsys):
    """--model-opts become the factory's keyword arguments; --dataset accepts an import spec too."""
    argv = [
        "noise-scale",
        "--model",
        f"{MODULE}:make_model",
        "--model-opts",
        '{"hidden": 4}',
        "--dataset",
        f"{MODULE}:make_train_only",
        "--small-batch",
        "4",
        "--big-batch",
        "16",
        "--estimates",
        "2",
    ]
    assert main(argv) == 0
    assert "B_simple" in capsys.readouterr().out


def test_modules_in_the_current_directory_are_found(tmp_path, monkeypatch, capsys):
    (tmp_path / "lrbs_user_cwd_fixture.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "lrbs_user_cwd_fixture", raising=False)
    argv = [
        "noise-scale",
        "--model",
        "lrbs_user_cwd_fixture:make_model",
        "--data",
        "lrbs_user_cwd_fixture:make_data",
    ]
    assert main([*argv, "--small-batch", "4", "--big-batch", "16", "--estimates", "2"]) == 0
    sys.modules.pop("lrbs_user_cwd_fixture", None)


# ----------------------------------------------------------------------------------------- errors: one line, exit 2
@pytest.mark.parametrize(
    ("option", "spec", "message"),
    [
        (
            "--model",
            "lrbs_no_such_module_xyz:make",
            "--model lrbs_no_such_module_xyz:make: module 'lrbs_no_such_module_xyz' not found",
        ),
        ("--model", f"{MODULE}:nope", f"--model {MODULE}:nope: module '{MODULE}' has no attribute 'nope'"),
        ("--model", f"{MODULE}:not_callable", f"--model {MODULE}:not_callable: is int, not callable"),
        ("--model", f"{MODULE}:model_instance", "is a model instance, not callable"),
        (
            "--model",
            f"{MODULE}:raising",
            f"--model {MODULE}:raising: the factory raised RuntimeError: boom on two lines",
        ),
        (
            "--model",
            f"{MODULE}:returns_a_string",
            f"--model {MODULE}:returns_a_string: the factory returned str: it must return a torch.nn.Module",
        ),
        (
            "--data",
            f"{MODULE}:returns_a_string",
            f"--data {MODULE}:returns_a_string: the factory returned str",
        ),
        ("--data", f"{MODULE}:raising", f"--data {MODULE}:raising: the factory raised RuntimeError: boom"),
        (
            "--model",
            "lrbs_user_broken:make",
            "--model lrbs_user_broken:make: importing 'lrbs_user_broken' raised ModuleNotFoundError",
        ),
        ("--model", "lrbs_user_syntax:make", "importing 'lrbs_user_syntax' raised SyntaxError"),
        ("--data", "not-a-spec", "--data 'not-a-spec' is not an import spec: must be 'pkg.module:factory'"),
        ("--model", "mylab/models.py:make", "--model 'mylab/models.py:make' is not an import spec"),
    ],
)
@pytest.mark.parametrize("command", ["noise-scale", "train", "find-lr", "sharpness", "landscape", "connect"])
def test_spec_errors_are_one_line_with_exit_2(user_module, capsys, tmp_path, command, option, spec, message):
    extra = {
        "train": ["--steps", "1"],
        "sharpness": ["--checkpoint", str(tmp_path / "none.safetensors")],
        "landscape": ["--checkpoint", str(tmp_path / "none.safetensors")],
        "connect": ["--a", "a.safetensors", "--b", "b.safetensors"],
    }.get(command, [])
    defaults = {"--model": f"{MODULE}:make_model", "--data": f"{MODULE}:make_data"}
    defaults[option] = spec
    argv = [command, "--model", defaults["--model"], "--data", defaults["--data"], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_builtin_model_needs_an_lrbs_dataset(user_module, capsys):
    assert main(["noise-scale", "--model", "mlp", "--data", f"{MODULE}:make_data"]) == 2
    err = capsys.readouterr().err
    assert "--model mlp is a built-in model" in err and "use --model pkg.module:factory" in err


def test_ddp_and_test_split_errors(user_module, capsys, tmp_path):
    assert main(["train", *OWN, "--steps", "1", "--ddp"]) == 2
    assert "--ddp is not allowed with --model/--data import specs" in capsys.readouterr().err
    ck = _checkpoint(user_module, tmp_path, "m", seed=0)
    argv = ["landscape", "--model", f"{MODULE}:make_model", "--data", f"{MODULE}:make_train_only"]
    assert main([*argv, "--checkpoint", str(ck), "--test"]) == 2
    assert "--test is not allowed with --data" in capsys.readouterr().err


def test_noise_scale_precision_option(user_module, capsys):
    from lrbs.noise_scale import noise_scale

    argv = ["noise-scale", *OWN, "--small-batch", "4", "--big-batch", "32", "--estimates", "4"]
    assert main([*argv, "--precision", "bf16-mixed"]) == 0
    out = capsys.readouterr().out
    train, _ = user_module.make_data()
    ref = noise_scale(
        _own_model(user_module), train, small_batch=4, big_batch=32, num_estimates=4, precision="bf16-mixed"
    )
    assert f"{ref.b_simple:.4g}" in out
    assert main([*argv, "--precision", "64"]) == 2
    err = capsys.readouterr().err
    assert "precision='64' is not allowed" in err and err.count("\n") == 1
