"""The `lrbs` command: version, train, bad arguments (one line, exit status 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lrbs import __version__
from lrbs.cli import main


def test_version_and_python_m(capsys):
    with pytest.raises(SystemExit) as e:
        from lrbs.cli import build_parser

        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out
    out = subprocess.run(
        [sys.executable, "-m", "lrbs", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and f"lrbs {__version__}" in out.stdout


def test_train_prints_a_table_and_writes_the_store(tmp_path, capsys):
    store = tmp_path / "lab.sqlite"
    ck = tmp_path / "m.safetensors"
    code = main(
        [
            "train",
            "--model",
            "mlp",
            "--model-opts",
            '{"width": 8}',
            "--dataset",
            "blobs",
            "--lr",
            "0.05",
            "--batch-size",
            "32",
            "--steps",
            "20",
            "--store",
            str(store),
            "--checkpoint",
            str(ck),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "test_acc" in out and "completed" in out
    assert ck.exists()
    from lrbs.store import Store

    with Store(store) as s:
        (run,) = s.runs(kind="fit")
        assert run.status == "completed"


def test_train_accepts_schedule_specs(capsys):
    code = main(
        [
            "train",
            "--model",
            "mlp",
            "--dataset",
            "blobs",
            "--lr",
            "cosine(start=0.1, steps=10)",
            "--batch-size",
            "batch_step(sizes=[16, 32], milestones=[5])",
            "--steps",
            "10",
        ]
    )
    assert code == 0


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--model", "cnn", "--steps", "2"], "Did you mean 'cnn1d'"),
        (["train", "--dataset", "mnist2d", "--steps", "2"], "unknown dataset 'mnist2d'"),
        (
            ["train", "--optimizer", "sgdd", "--steps", "2", "--dataset", "blobs", "--model", "mlp"],
            "Did you mean",
        ),
        (
            ["train", "--batch-size", "0", "--steps", "2", "--dataset", "blobs", "--model", "mlp"],
            "batch_size=0",
        ),
        (["train", "--batch-size", "12.5", "--steps", "2"], "--batch-size='12.5'"),
        (["train", "--lr", "-1", "--steps", "2", "--dataset", "blobs", "--model", "mlp"], "lr=-1.0"),
        (["train", "--lr", "nan", "--steps", "2", "--dataset", "blobs", "--model", "mlp"], "lr=nan"),
        (["train", "--dataset", "blobs", "--model", "mlp"], "give --steps or --epochs"),
        (
            ["train", "--steps", "2", "--epochs", "1", "--dataset", "blobs", "--model", "mlp"],
            "exactly one of",
        ),
        (
            [
                "train",
                "--lr",
                "cosin(start=0.1, steps=3)",
                "--steps",
                "2",
                "--dataset",
                "blobs",
                "--model",
                "mlp",
            ],
            "cosine",
        ),
        (["train", "--model-opts", "{bad json", "--steps", "2"], "not valid JSON"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_arguments_one_line_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err
    assert "Traceback" not in err
    assert len([ln for ln in err.strip().splitlines() if ln.startswith("lrbs")]) >= 1


def test_console_script_exit_status():
    out = subprocess.run(
        [sys.executable, "-m", "lrbs", "train", "--model", "nope", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "unknown model 'nope'" in out.stderr and "Traceback" not in out.stderr


_EARLY_START = """
import sys
import lrbs.pool
from lrbs.errors import LrbsError

def record(preload=()):
    raise LrbsError("fork server asked for; torch imported: %s" % ("torch" in sys.modules))

lrbs.pool.start_fork_server = record
from lrbs.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["sweep", "study"])
def test_workers_start_before_this_process_imports_torch(command, tmp_path):
    """`lrbs sweep --max-concurrency 2` and `lrbs study --jobs 2` ask for the fork server before the driver
    imports torch (its parser and spec checks included), so the workers' imports overlap the driver's."""
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\nmodel = "mlp"\ndataset = "blobs"\nsteps = 2\n[grid]\nseed = [0, 1]\n')
    args = {
        "sweep": ["sweep", str(spec), "--max-concurrency", "2", "--store", str(tmp_path / "s.sqlite")],
        "study": ["study", "--quick", "--jobs", "2", "--out", str(tmp_path / "study")],
    }[command]
    out = subprocess.run(
        [sys.executable, "-c", _EARLY_START, *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr
    assert "fork server asked for; torch imported: False" in out.stderr
