"""Sweeps: grid expansion, local and Ray backends (bitwise equal), retries, resume after SIGKILL, bad
inputs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lrbs.errors import ConfigError, DependencyError, LrbsError, LrbsTypeError
from lrbs.store import Store, key_for
from lrbs.sweep import MEASURES, evaluate_grid, grid_configs, landscape_2d_ray, sweep
from lrbs.train import train_config

BASE = {
    "model": "mlp",
    "model_opts": {"depth": 2, "width": 16},
    "dataset": "blobs",
    "dataset_opts": {"n_train": 256, "n_test": 128, "num_features": 8, "num_classes": 3},
    "steps": 40,
}
GRID = {"lr": [0.01, 0.1], "batch_size": [16, 64]}


@pytest.fixture(autouse=True)
def one_thread():
    """Runs use num_cpus_per_task=1 thread; the direct references too (tiny models are faster so)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _finals(result):
    return [(r.params, r.status, r.final) for r in result.runs]


# --------------------------------------------------------------------------------------------- grid
def test_grid_is_cartesian_product_in_order():
    cells = grid_configs(BASE, {"lr": [0.1, 0.2], "batch_size": [8, 16, 32]})
    assert [p for p, _ in cells] == [{"lr": a, "batch_size": b} for a in (0.1, 0.2) for b in (8, 16, 32)]
    assert all(c["model"] == "mlp" and c["steps"] == 40 for _, c in cells)


def test_local_sweep_matches_direct_training_and_store(tmp_path):
    res = sweep(BASE, {"lr": [0.05], "batch_size": [16, 32]}, store=tmp_path / "lab.sqlite", progress=False)
    assert len(res) == 2 and [r.status for r in res.runs] == ["completed", "completed"]
    for run in res.runs:  # independent reference: the training engine called directly
        _, ref = train_config({**BASE, **run.params})
        assert run.final["test_loss"] == ref.final["test_loss"]
        assert run.final["gap"] == ref.final["test_loss"] - ref.final["train_loss"]
        assert run.final["acc_gap"] == ref.final["train_acc"] - ref.final["test_acc"]
    with Store(tmp_path / "lab.sqlite") as st:
        recs = st.runs(kind="sweep")
        assert {r.key for r in recs} == {r.key for r in res.runs}
        assert all(r.status == "completed" for r in recs)
        steps, loss = st.series(res.runs[0].key, "train_loss")
        assert list(steps) == list(range(41)) and np.all(np.isfinite(loss))  # 40 steps + the final evaluation
    # finished runs are skipped the second time
    again = sweep(BASE, {"lr": [0.05], "batch_size": [16, 32]}, store=tmp_path / "lab.sqlite", progress=False)
    assert all(r.cached for r in again.runs)
    assert _finals(again) == _finals(res)
    rows = again.to_dicts()
    json.dumps(rows)
    assert rows[0]["lr"] == 0.05 and rows[0]["batch_size"] == 16


def test_local_process_pool_equals_sequential(tmp_path):
    seq = sweep(BASE, GRID, progress=False)
    pool = sweep(BASE, GRID, max_concurrency=2, store=tmp_path / "lab.sqlite", progress=False)
    assert _finals(pool) == _finals(seq)
    with Store(tmp_path / "lab.sqlite") as st:
        recs = st.runs(status="completed")
        assert len(recs) == 4 and os.getpid() not in {r.result["worker"]["pid"] for r in recs}


def test_local_pool_workers_are_started_once_and_reused(tmp_path):
    """Consecutive sweeps run on the same warm worker processes (lrbs.pool.shared_pool), with the same numbers."""
    from lrbs.pool import shared_pool

    grid = {"lr": [0.05], "batch_size": [16, 32], "seed": [0, 1]}
    first = sweep(BASE, grid, max_concurrency=2, store=tmp_path / "a.sqlite", progress=False)
    started = shared_pool(2).started
    second = sweep(BASE, grid, max_concurrency=2, store=tmp_path / "b.sqlite", progress=False)
    assert _finals(second) == _finals(first) == _finals(sweep(BASE, grid, progress=False))
    pids = []
    for name in ("a", "b"):
        with Store(tmp_path / f"{name}.sqlite") as st:
            pids.append({r.result["worker"]["pid"] for r in st.runs(kind="sweep")})
    assert pids[1] <= set(shared_pool(2).pids)  # the second sweep ran on workers that are still alive
    assert shared_pool(2).started == started  # no new worker process for the second sweep
    assert os.getpid() not in pids[0] | pids[1]


def test_diverged_and_failed_runs_do_not_stop_the_sweep(tmp_path):
    grid = {"lr": [1e6, 0.05], "model_opts": [{"depth": 2, "width": 16}, {"depth": 2, "bogus": 3}]}
    res = sweep(BASE, grid, store=tmp_path / "lab.sqlite", progress=False)
    status = {(r.params["lr"], "bogus" in r.params["model_opts"]): r.status for r in res.runs}
    assert status[(1e6, False)] == "diverged"
    assert status[(0.05, False)] == "completed"
    assert status[(0.05, True)] == "failed" and status[(1e6, True)] == "failed"
    failed = [r for r in res.runs if r.status == "failed"][0]
    assert "bogus" in failed.error
    with Store(tmp_path / "lab.sqlite") as st:
        assert len(st.runs(status="failed")) == 2
        assert "bogus" in st.runs(status="failed")[0].error


def test_heatmap_and_table(tmp_path):
    res = sweep(BASE, {"lr": [0.01, 0.1], "batch_size": [16, 64], "seed": [0, 1]}, progress=False)
    b, lr, v = res.pivot("test_loss")
    assert list(b) == [16, 64] and list(lr) == [0.01, 0.1]
    ref = np.mean(
        [r.final["test_loss"] for r in res.runs if r.params["lr"] == 0.1 and r.params["batch_size"] == 16]
    )
    assert v[1, 0] == pytest.approx(ref, rel=1e-12)
    ax = res.heatmap("gap")
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.lines) >= 3  # lines of constant lr/B
    for line in ax.lines:
        x, y = line.get_data()
        assert y[1] / x[1] == pytest.approx(y[0] / x[0])
    ax.figure.savefig(tmp_path / "h.png")
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(res.table())
    assert "completed" in console.export_text()
    with pytest.raises(ConfigError, match="unknown metric 'tst_acc'.*Did you mean 'test_acc'"):
        res.heatmap("tst_acc")


def test_unreachable_ray_address(tmp_path):
    pytest.importorskip("ray")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is running in this process")
    t0 = time.time()
    with pytest.raises(LrbsError, match=r"cannot reach the Ray cluster at ray_address='127.0.0.1:1'"):
        sweep(
            BASE,
            GRID,
            backend="ray",
            ray_address="127.0.0.1:1",
            store=tmp_path / "lab.sqlite",
            connect_timeout=5,
            progress=False,
        )
    assert time.time() - t0 < 10
    assert not (tmp_path / "lab.sqlite").exists()
    assert not ray.is_initialized()


# --------------------------------------------------------------------------------------------- Ray
def test_ray_sweep_equals_local_bitwise(ray_cluster, tmp_path):
    local = sweep(BASE, GRID, progress=False)
    remote = sweep(BASE, GRID, backend="ray", store=tmp_path / "lab.sqlite", progress=False)
    assert _finals(remote) == _finals(local)
    assert len({r.key for r in remote.runs}) == 4
    with Store(tmp_path / "lab.sqlite") as st:
        recs = st.runs(kind="sweep")
        assert len(recs) == 4 and all(r.status == "completed" for r in recs)
        pids = {r.result["worker"]["pid"] for r in recs}
        assert os.getpid() not in pids  # really ran in Ray workers


def test_ray_retries_a_dead_worker(ray_cluster, tmp_path):
    marker = tmp_path / "died_once"
    grid = {"lr": [0.05], "batch_size": [16, 32]}
    res = sweep(
        BASE,
        grid,
        backend="ray",
        store=tmp_path / "lab.sqlite",
        max_retries=2,
        progress=False,
        _fault={"exit_once": str(marker)},
    )
    assert marker.exists()  # one worker did die with os._exit(1)
    assert [r.status for r in res.runs] == ["completed", "completed"]
    ref = sweep(BASE, grid, progress=False)
    assert _finals(res) == _finals(ref)
    con = sqlite3.connect(tmp_path / "lab.sqlite")
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM runs").fetchone() == (2, 2)
    con.close()


def test_ray_landscape_shards_equal_local_loss_many(ray_cluster, blobs, untouched):
    from lrbs.models import build_model
    from lrbs.objective import Objective

    model = build_model("mlp", dataset=blobs, seed=0, depth=2, width=8)
    check = untouched(model)
    obj = Objective(model, None, blobs.train)
    g = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(obj.num_params, generator=g), torch.randn(obj.num_params, generator=g)
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)  # non-square on purpose
    out = landscape_2d_ray(obj, d1, d2, alphas, betas, shards=3)
    theta = obj.theta()
    naive = np.empty((5, 3))
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            point = theta + torch.tensor(a, dtype=theta.dtype) * d1 + torch.tensor(b, dtype=theta.dtype) * d2
            naive[i, j] = obj.loss_many(point[None], method="sequential")["loss"][0]
    np.testing.assert_array_equal(out["loss"], naive)
    local = evaluate_grid(obj, d1, d2, alphas, betas, shards=1)
    np.testing.assert_array_equal(out["loss"], local["loss"])
    np.testing.assert_array_equal(out["accuracy"], local["accuracy"])
    assert out["settings"]["shards"] == 3 and out["settings"]["data_fingerprint"] == obj.fingerprint
    # float64 reference of one point
    obj64 = Objective(model, None, blobs.train, dtype=torch.float64)
    p = theta.double() + alphas[0] * d1.double() + betas[2] * d2.double()
    assert out["loss"][0, 2] == pytest.approx(obj64.loss(p), rel=1e-5)
    check()
    with pytest.raises(Exception, match="d2 has shape"):
        evaluate_grid(obj, d1, d2[:-1], alphas, betas)


# --------------------------------------------------------------------------------------------- resume
_KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, json
    from lrbs.sweep import sweep
    base, grid = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    sweep(base, grid, store=sys.argv[3], progress=False)
    """
)


def test_sigkilled_sweep_resumes_without_recomputing(tmp_path):
    db = tmp_path / "lab.sqlite"
    base = {**BASE, "steps": 150}
    grid = {"lr": [0.02, 0.04, 0.06, 0.08, 0.1, 0.12]}
    script = tmp_path / "run.py"
    script.write_text(_KILLED_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(base), json.dumps(grid), str(db)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    done_before: dict[str, float] = {}
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    con = sqlite3.connect(db, timeout=5)
                    rows = con.execute("SELECT key, started FROM runs WHERE status = 'completed'").fetchall()
                    con.close()
                except sqlite3.OperationalError:
                    rows = []
                if len(rows) >= 2:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    con = sqlite3.connect(db)
    done_before = dict(con.execute("SELECT key, started FROM runs WHERE status = 'completed'").fetchall())
    con.close()
    assert 2 <= len(done_before) < 6

    res = sweep(base, grid, store=db, progress=False)
    assert all(r.status == "completed" for r in res.runs)
    assert sum(r.cached for r in res.runs) == len(done_before)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM runs").fetchone() == (6, 6)
    after = dict(con.execute("SELECT key, started FROM runs").fetchall())
    con.close()
    for key, started in done_before.items():
        assert after[key] == started  # not recomputed


# --------------------------------------------------------------------------------------------- bad inputs
def test_bad_grid_key_lists_valid_options():
    with pytest.raises(
        ConfigError, match=r"grid key 'learning_rate' is not a training option.*Valid options: .*lr"
    ):
        sweep(BASE, {"learning_rate": [0.1]}, progress=False)
    with pytest.raises(ConfigError, match=r"grid key 'bach_size'.*Did you mean 'batch_size'"):
        sweep(BASE, {"bach_size": [1]}, progress=False)


def test_bad_grid_values_and_options(tmp_path):
    with pytest.raises(ConfigError, match=r"grid\['lr'\]=\[\] is not allowed: must be a non-empty list"):
        sweep(BASE, {"lr": []}, progress=False)
    with pytest.raises(LrbsTypeError, match=r"grid\['lr'\]=0.1 is not allowed: must be a list"):
        sweep(BASE, {"lr": 0.1}, progress=False)
    with pytest.raises(ConfigError, match="backend='dask' is not allowed"):
        sweep(BASE, GRID, backend="dask", progress=False)
    with pytest.raises(ConfigError, match="unknown measure 'sharp'"):
        sweep(BASE, GRID, measure=["sharp"], progress=False)
    with pytest.raises(ConfigError, match="max_concurrency=0 is not allowed"):
        sweep(BASE, GRID, max_concurrency=0, progress=False)
    with pytest.raises(ConfigError, match="give exactly one of steps= and epochs="):
        sweep({"model": "mlp"}, GRID, progress=False)
    with pytest.raises(LrbsTypeError, match="store=3 is not allowed"):
        sweep(BASE, GRID, store=3, progress=False)
    with pytest.raises(ConfigError, match="ray_address='x:1' is not allowed"):
        sweep(BASE, GRID, ray_address="x:1", progress=False)
    assert not list(tmp_path.iterdir())


def test_ray_not_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DependencyError, match=r"pip install lrbs\[ray\]"):
        sweep(BASE, GRID, backend="ray", store=tmp_path / "lab.sqlite", progress=False)
    assert not (tmp_path / "lab.sqlite").exists()


def test_missing_measure_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "lrbs.curvature", None)
    with pytest.raises(DependencyError, match="measure='top_eigenvalue' needs lrbs.curvature"):
        sweep(BASE, GRID, measure=["top_eigenvalue"], progress=False)


def test_measure_top_eigenvalue_matches_dense_hessian():
    pytest.importorskip("lrbs.curvature")
    from lrbs.data import load_dataset
    from lrbs.objective import Objective

    assert "top_eigenvalue" in MEASURES
    res = sweep(BASE, {"lr": [0.05]}, measure=["top_eigenvalue"], measure_samples=100, progress=False)
    lam = res.runs[0].measures["lambda_max"]  # the alias asked for, the canonical name recorded
    model, _ = train_config({**BASE, "lr": 0.05})
    ds = load_dataset("blobs", **BASE["dataset_opts"])
    obj = Objective(model, None, ds.train, max_samples=100, seed=0, dtype=torch.float64)
    hess = torch.func.hessian(obj.loss_tensor)(obj.theta())
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(hess)[-1]), rel=1e-3)


# --------------------------------------------------------------------------------------------- CLI
def _cli(argv):
    from lrbs.cli import sweep as cli_sweep

    parser = argparse.ArgumentParser(prog="lrbs")
    cli_sweep.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_sweep_runs_spec_and_prints_table(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        textwrap.dedent(
            """
        [base]
        model = "mlp"
        dataset = "blobs"
        steps = 30
        [base.model_opts]
        depth = 2
        width = 8
        [base.dataset_opts]
        n_train = 128
        n_test = 64

        [grid]
        lr = [0.05, 0.1]
        batch_size = [16]

        [sweep]
        store = "lab.sqlite"
        """
        )
    )
    assert _cli(["sweep", str(spec), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "0.05" in out
    with Store(tmp_path / "lab.sqlite") as st:  # relative store paths are relative to the spec file
        assert len(st.runs(status="completed")) == 2
    assert _cli(["sweep", str(spec), "--no-progress", "--store", str(tmp_path / "other.sqlite")]) == 0
    assert (tmp_path / "other.sqlite").exists()


def test_cli_malformed_toml_names_line_and_column(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('[base]\nmodel = "mlp"\nlr = = 0.1\n')
    with pytest.raises(ConfigError, match=r"bad.toml.*line 3, column"):
        _cli(["sweep", str(spec)])
    spec.write_text('[base]\nsteps = 3\n[grid]\nlr = [0.1]\n[sweep]\nbackend = "spark"\n')
    with pytest.raises(ConfigError, match="backend='spark' is not allowed"):
        _cli(["sweep", str(spec)])
    spec.write_text("[base]\nsteps = 3\n[grids]\nlr = [0.1]\n")
    with pytest.raises(ConfigError, match=r"unknown table \[grids\].*Did you mean 'grid'"):
        _cli(["sweep", str(spec)])
    with pytest.raises(ConfigError, match="does not exist"):
        _cli(["sweep", str(tmp_path / "missing.toml")])


def test_example_spec_parses():
    from lrbs.cli.sweep import load_spec

    spec = load_spec(Path(__file__).parents[1] / "examples" / "sweep.toml")
    cells = grid_configs(spec["base"], spec["grid"])
    assert len(cells) >= 4
    assert key_for(cells[0][1]) != key_for(cells[1][1])
