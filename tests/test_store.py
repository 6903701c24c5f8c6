"""Tests of lrbs.store: keys, run life cycle, atomic writes, crash recovery, errors, array artifacts."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lrbs.errors import ConfigError, LrbsTypeError, StoreError
from lrbs.store import SCHEMA_VERSION, ArtifactRecord, RunRecord, Store, key_for

CONFIG = {"model": "mlp", "lr": 0.1, "batch_size": 32, "optim": {"name": "sgd", "momentum": 0.9}}


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "study" / "lab.sqlite") as s:
        yield s


def _raw(path: Path) -> sqlite3.Connection:
    """An independent connection, to look at or tamper with the file behind the store's back."""
    return sqlite3.connect(str(path), isolation_level=None)


def _python(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
        **kw,
    )


# ------------------------------------------------------------------------------------------- keys


def test_key_matches_hand_written_canonical_json():
    config = {"b": 1, "a": [0.1, "x", None, True], "c": {"z": 2.5, "y": -3}}
    canonical = '{"a":[0.1,"x",null,true],"b":1,"c":{"y":-3,"z":2.5}}'
    assert key_for(config) == hashlib.sha256(canonical.encode()).hexdigest()


def test_key_is_independent_of_key_order_and_normalises_values():
    reordered = {"optim": {"momentum": 0.9, "name": "sgd"}, "batch_size": 32, "lr": 0.1, "model": "mlp"}
    assert key_for(CONFIG) == key_for(reordered)
    # numpy scalars, tuples, arrays, -0.0 and paths take their plain JSON form
    plain = {"lr": 0.001, "bs": 64, "betas": [0.9, 0.999], "w": [[1, 2]], "z": 0.0, "p": "data/x.bin"}
    numpyish = {
        "lr": np.float64(0.001),
        "bs": np.int64(64),
        "betas": (np.float64(0.9), 0.999),
        "w": np.array([[1, 2]]),
        "z": -0.0,
        "p": Path("data/x.bin"),
    }
    assert key_for(numpyish) == key_for(plain)


@pytest.mark.parametrize(
    "other",
    [
        {**CONFIG, "lr": 0.1000001},
        {**CONFIG, "lr": 1},  # int and float differ
        {**CONFIG, "batch_size": 32.0},
        {**CONFIG, "optim": {"name": "sgd", "momentum": 0.0}},
        {**CONFIG, "extra": None},
        {k: v for k, v in CONFIG.items() if k != "model"},
    ],
)
def test_different_config_gives_different_key(other):
    assert key_for(other) != key_for(CONFIG)


def test_key_is_stable_across_processes():
    code = """
        import json, sys
        from lrbs.store import key_for
        print(key_for(json.loads(sys.argv[1])))
    """
    # reversed key order, in a process with another hash seed
    reordered = dict(reversed(list(CONFIG.items())))
    out = _python(code, json.dumps(reordered)).stdout.strip()
    assert out == key_for(CONFIG)


def test_key_errors_name_the_offending_entry():
    with pytest.raises(LrbsTypeError, match=r"config=\[1, 2\] \(list\) is not allowed: must be a dict"):
        key_for([1, 2])
    with pytest.raises(LrbsTypeError, match=r"config\['optim'\] has the key 3 \(int\): keys must be str"):
        key_for({"optim": {3: "x"}})
    with pytest.raises(LrbsTypeError, match=r"config\['optim'\]\['fn'\]=<built-in function max> .*JSON"):
        key_for({"optim": {"fn": max}})
    with pytest.raises(LrbsTypeError, match=r"config\['s'\]=\{1\} \(set\)"):
        key_for({"s": {1}})
    with pytest.raises(ConfigError, match=r"config\['lr'\]\[1\]=nan is not allowed: must be a finite"):
        key_for({"lr": [0.1, float("nan")]})


# ------------------------------------------------------------------------------------- life cycle


def test_run_round_trip(store: Store):
    key = store.start_run(CONFIG, kind="fit")
    assert key == key_for(CONFIG)
    assert store.log_metrics(key, [(0, "loss", 2.0), (1, "loss", 1.5), (0, "lr", np.float32(0.5))]) == 3
    store.finish_run(
        key, "completed", {"final_loss": np.float64(0.75), "shape": (2, 3)}, metrics=[(2, "loss", 0.75)]
    )

    rec = store.get(key)
    assert isinstance(rec, RunRecord)
    assert (rec.key, rec.kind, rec.status, rec.error) == (key, "fit", "completed", None)
    assert rec.config == json.loads(json.dumps(CONFIG))
    assert rec.result == {"final_loss": 0.75, "shape": [2, 3]}
    assert rec.started <= rec.finished <= time.time()
    assert (rec.host, rec.pid) == (socket.gethostname(), os.getpid())
    assert json.loads(json.dumps(rec.to_dict())) == rec.to_dict()

    assert store.metrics(key) == [(0, "loss", 2.0), (1, "loss", 1.5), (2, "loss", 0.75), (0, "lr", 0.5)]
    assert store.metrics(key, "lr") == [(0, "lr", 0.5)]
    steps, values = store.series(key, "loss")
    assert steps.dtype == np.int64 and values.dtype == np.float64
    np.testing.assert_array_equal(steps, [0, 1, 2])
    np.testing.assert_array_equal(values, [2.0, 1.5, 0.75])

    assert store.find({**CONFIG}) == rec
    assert store.find(CONFIG, kind="fit") == rec
    assert store.find(CONFIG, kind="sharpness") is None
    assert store.get("0" * 64) is None


def test_runs_filters_and_find_skips_unfinished(store: Store):
    keys = {}
    for i, end in enumerate(["completed", "diverged", "failed", None]):
        cfg = {"i": i}
        keys[end] = store.start_run(cfg, kind="range_test" if i % 2 else "fit")
        if end == "failed":
            store.fail_run(keys[end], "ValueError: boom")
        elif end is not None:
            store.finish_run(
                keys[end], end, {"i": i}, error="loss=nan at step 3" if end == "diverged" else None
            )
    assert store.find({"i": 0}).status == "completed"
    assert store.find({"i": 1}).status == "diverged"  # a finished outcome: do not rerun it
    assert store.find({"i": 2}) is None  # failed
    assert store.find({"i": 3}) is None  # running
    assert store.find({"i": 4}) is None  # never started
    assert store.get(keys["failed"]).error == "ValueError: boom"
    assert store.get(keys["diverged"]).error == "loss=nan at step 3"

    assert [r.key for r in store.runs()] == [keys["completed"], keys["diverged"], keys["failed"], keys[None]]
    assert [r.key for r in store.runs(kind="range_test")] == [keys["diverged"], keys[None]]
    assert [r.key for r in store.runs(status="running")] == [keys[None]]
    assert store.runs(kind="fit", status="failed") == [store.get(keys["failed"])]
    with pytest.raises(ConfigError, match=r"status='complete' is not allowed.*Did you mean 'completed'"):
        store.runs(status="complete")


def test_retried_metric_writes_do_not_duplicate_rows(store: Store):
    key = store.start_run(CONFIG)
    rows = [(s, "loss", 1.0 / (s + 1)) for s in range(5)]
    store.log_metrics(key, rows)
    store.log_metrics(key, rows)  # a retry after a lost acknowledgement
    store.finish_run(key, "completed", {}, metrics=[(4, "loss", 0.1), (0, "acc", float("nan"))])
    count = store.conn.execute("SELECT COUNT(*) FROM metrics WHERE run = ?", (key,)).fetchone()[0]
    assert count == 6
    assert store.metrics(key, "loss")[-1] == (4, "loss", 0.1)  # replaced, not duplicated
    (_, _, acc), *_ = store.metrics(key, "acc")
    assert math.isnan(acc)


def test_finish_run_is_one_transaction(store: Store):
    key = store.start_run(CONFIG)
    store.log_metrics(key, [(0, "loss", 1.0)])
    # Make the final UPDATE of the status fail inside the database, after the metrics were inserted.
    store.conn.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE OF status ON runs BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    with pytest.raises(StoreError, match=r"cannot write to the store .*lab.sqlite.*disk on fire"):
        store.finish_run(key, "completed", {"loss": 0.5}, metrics=[(s, "acc", 0.5) for s in range(1, 100)])
    assert store.metrics(key) == [(0, "loss", 1.0)]  # none of the 99 rows
    assert store.get(key).status == "running" and store.get(key).result is None
    # A bad row anywhere is caught before anything is written.
    store.conn.execute("DROP TRIGGER refuse")
    with pytest.raises(LrbsTypeError, match=r"metrics\[2\].value='x' is not allowed: must be a real number"):
        store.finish_run(key, "completed", {}, metrics=[(1, "acc", 0.5), (2, "acc", 0.5), (3, "acc", "x")])
    assert store.metrics(key) == [(0, "loss", 1.0)]
    assert store.get(key).status == "running"


def test_start_run_on_existing_rows(store: Store):
    key = store.start_run(CONFIG)
    store.finish_run(key, "completed", {"loss": 1.0}, metrics=[(0, "loss", 1.0)])
    finished = store.get(key)
    # a finished run is left alone ...
    assert store.start_run(CONFIG) == key
    assert store.get(key) == finished
    with pytest.raises(StoreError, match=r"is 'completed', not 'running'.*rerun=True"):
        store.finish_run(key, "completed", {"loss": 2.0})
    with pytest.raises(StoreError, match=r"is 'completed', not 'running'"):
        store.fail_run(key, "late")
    # ... unless rerun=True, which wipes its metrics and result
    assert store.start_run(CONFIG, rerun=True) == key
    assert store.get(key).status == "running" and store.get(key).result is None
    assert store.metrics(key) == []
    # a failed run restarts
    store.fail_run(key, "oops")
    store.start_run(CONFIG)
    assert store.get(key).status == "running" and store.get(key).error is None
    # our own stale running row (e.g. an exception without fail_run) restarts too
    store.log_metrics(key, [(0, "loss", 3.0)])
    store.start_run(CONFIG)
    assert store.metrics(key) == []
    with pytest.raises(StoreError, match=r"stored as kind='fit', not kind='sharpness'"):
        store.start_run(CONFIG, kind="sharpness")


def test_crashed_running_row_is_detected_and_rerun(tmp_path: Path):
    path = tmp_path / "lab.sqlite"
    code = """
        import os, sys
        from lrbs.store import Store
        store = Store(sys.argv[1])
        key = store.start_run({"lr": 0.1}, kind="fit")
        store.log_metrics(key, [(0, "loss", 9.0)])
        print(os.getpid(), flush=True)
        os._exit(0)  # dies without finish_run or close
    """
    dead_pid = int(_python(code, str(path)).stdout)
    with Store(path) as store:
        key = key_for({"lr": 0.1})
        assert store.get(key).status == "running" and store.get(key).pid == dead_pid
        assert store.find({"lr": 0.1}) is None
        assert store.start_run({"lr": 0.1}) == key
        rec = store.get(key)
        assert (rec.status, rec.pid) == ("running", os.getpid())
        assert store.metrics(key) == []  # the dead process's partial metrics are gone
        store.finish_run(key, "completed", {"loss": 0.5})
        assert store.find({"lr": 0.1}).result == {"loss": 0.5}


def test_live_or_remote_running_row_is_respected(tmp_path: Path):
    with Store(tmp_path / "lab.sqlite", stale_after=3600) as store:
        key = store.start_run(CONFIG)
        # a live process on this host (our parent) holds it
        store.conn.execute("UPDATE runs SET pid = ? WHERE key = ?", (os.getppid(), key))
        with pytest.raises(StoreError, match=rf"run {key[:16]} is already running \(pid {os.getppid()} on"):
            store.start_run(CONFIG)
        # another host, recently: cannot check its pid, so respect it
        store.conn.execute("UPDATE runs SET host = 'elsewhere', pid = 1 WHERE key = ?", (key,))
        with pytest.raises(StoreError, match=r"already running \(pid 1 on elsewhere.*stale_after=3600 s"):
            store.start_run(CONFIG)
        # another host, older than stale_after: presumed dead
        store.conn.execute("UPDATE runs SET started = ? WHERE key = ?", (time.time() - 7200, key))
        store.start_run(CONFIG)
        assert store.get(key).host == socket.gethostname()


def test_argument_errors(store: Store):
    key = store.start_run(CONFIG)
    with pytest.raises(ConfigError, match=r"status='done' is not allowed: must be one of"):
        store.finish_run(key, "done", {})
    with pytest.raises(ConfigError, match=r"status='running' is not allowed"):
        store.finish_run(key, "running", {})
    with pytest.raises(LrbsTypeError, match=r"result=\[1\] \(list\) is not allowed: must be a dict"):
        store.finish_run(key, "completed", [1])
    with pytest.raises(LrbsTypeError, match=r"error=3 is not allowed: must be a str"):
        store.finish_run(key, "failed", {}, error=3)
    with pytest.raises(ConfigError, match=r"metrics\[0\].step=-1 is not allowed: must be an integer >= 0"):
        store.log_metrics(key, [(-1, "loss", 1.0)])
    with pytest.raises(LrbsTypeError, match=r"metrics\[0\].step=1.5 is not allowed: must be an integer"):
        store.log_metrics(key, [(1.5, "loss", 1.0)])
    with pytest.raises(LrbsTypeError, match=r"metrics\[1\].name='' is not allowed"):
        store.log_metrics(key, [(0, "loss", 1.0), (1, "", 1.0)])
    with pytest.raises(LrbsTypeError, match=r"metrics\[0\]=\(0, 'loss'\) is not allowed: must be a"):
        store.log_metrics(key, [(0, "loss")])
    with pytest.raises(LrbsTypeError, match=r"metrics\[0\].value=True is not allowed"):
        store.log_metrics(key, [(0, "loss", True)])
    with pytest.raises(LrbsTypeError, match=r"metrics='loss' is not allowed: must be an iterable"):
        store.log_metrics(key, "loss")
    assert store.metrics(key) == []
    with pytest.raises(StoreError, match=r"no run with key='nope' in .*lab.sqlite.*start_run first"):
        store.log_metrics("nope", [(0, "loss", 1.0)])
    with pytest.raises(LrbsTypeError, match=r"key=3 is not allowed: must be a str"):
        store.get(3)
    with pytest.raises(LrbsTypeError, match=r"kind='' is not allowed: must be a non-empty str"):
        store.start_run(CONFIG, kind="")
    with pytest.raises(LrbsTypeError, match=r"path=3 is not allowed: must be a str or a path"):
        Store(3)
    with pytest.raises(ConfigError, match=r"stale_after=-1 is not allowed: must be a finite number > 0"):
        Store(store.path, stale_after=-1)


def test_closed_store_and_context_manager(tmp_path: Path):
    with Store(tmp_path / "lab.sqlite") as store:
        assert "open" in repr(store)
    assert "closed" in repr(store)
    store.close()  # idempotent
    with pytest.raises(StoreError, match=r"the store .*lab.sqlite' is closed"):
        store.runs()


# ------------------------------------------------------------------------------ opening / errors


def test_layout_and_pragmas(tmp_path: Path):
    path = tmp_path / "study" / "lab.sqlite"
    with Store(path) as store:
        assert store.artifact_dir == tmp_path / "study" / "lab_artifacts"
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
        store.start_run(CONFIG)
    raw = _raw(path)
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "metrics", "artifacts", "schema_version"} <= tables
    assert raw.execute("SELECT id, version FROM schema_version").fetchall() == [(1, SCHEMA_VERSION)]
    raw.close()
    assert not (tmp_path / "study" / "lab_artifacts").exists()  # created on the first artifact only


def test_readonly_store(tmp_path: Path):
    path = tmp_path / "lab.sqlite"
    with Store(path) as store:
        key = store.start_run(CONFIG)
        store.finish_run(key, "completed", {"a": 1}, metrics=[(0, "loss", 1.0)])
        with Store(path, readonly=True) as reader:  # while the writer is open
            assert reader.find(CONFIG).result == {"a": 1}
    with Store(path, readonly=True) as reader:
        assert reader.metrics(key) == [(0, "loss", 1.0)]
        assert "read-only" in repr(reader)
        with pytest.raises(StoreError, match=r"lab.sqlite' was opened read-only: cannot write"):
            reader.start_run({"other": 1})
    with pytest.raises(StoreError, match=r"cannot open the store .*missing.sqlite' read-only: no such file"):
        Store(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


def test_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "lab.sqlite"
    Store(path).close()
    raw = _raw(path)
    raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.close()
    match = rf"lab.sqlite' has schema version {SCHEMA_VERSION + 1}, newer than this lrbs supports"
    with pytest.raises(StoreError, match=match):
        Store(path)
    with pytest.raises(StoreError, match=match):
        Store(path, readonly=True)


def test_garbage_and_foreign_files_are_refused(tmp_path: Path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(StoreError, match=r"cannot open the store .*garbage.sqlite'.*not a readable SQLite"):
        Store(garbage)
    with pytest.raises(StoreError, match=r"garbage.sqlite'.*not a readable SQLite"):
        Store(garbage, readonly=True)
    assert garbage.read_bytes().startswith(b"this is not a database")  # untouched

    foreign = tmp_path / "other.sqlite"
    raw = _raw(foreign)
    raw.execute("CREATE TABLE users (name TEXT)")
    raw.close()
    with pytest.raises(StoreError, match=r"other.sqlite' is a SQLite database but not an lrbs store"):
        Store(foreign)


def test_corrupt_pages_are_detected(tmp_path: Path):
    path = tmp_path / "lab.sqlite"
    with Store(path) as store:
        for i in range(40):
            key = store.start_run({"i": i, "pad": "x" * 500})
            store.finish_run(key, "completed", {}, metrics=[(s, "loss", float(s)) for s in range(50)])
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    data[3 * page : 5 * page] = os.urandom(2 * page)  # scribble over two pages of b-tree
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"the store .*lab.sqlite' is corrupt|lab.sqlite'.*not a readable"):
        Store(path)


def test_unwritable_locations_are_detected_before_creating_anything(tmp_path: Path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hi")
    with pytest.raises(StoreError, match=r"cannot create .*notes.txt/lab.sqlite'.*notes.txt' is a file"):
        Store(a_file / "lab.sqlite")
    with pytest.raises(StoreError, match=r"notes.txt' is a file, not a directory"):
        Store(a_file / "deeper" / "lab.sqlite")
    with pytest.raises(StoreError, match=r"cannot open the store .*: it is a directory, not a file"):
        Store(tmp_path)
    with pytest.raises(StoreError, match=r"cannot use .*notes.txt' as the artifact folder: it is a file"):
        Store(tmp_path / "lab.sqlite", artifact_dir=a_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing was created


def test_readonly_directory_is_detected(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not make a directory read-only")
        with pytest.raises(StoreError, match=r"locked' is not writable \(read-only location\)"):
            Store(locked / "lab.sqlite")
        with pytest.raises(StoreError, match=r"locked' is not writable"):
            Store(locked / "sub" / "lab.sqlite")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_readonly_file_is_detected(tmp_path: Path):
    path = tmp_path / "lab.sqlite"
    Store(path).close()
    path.chmod(0o444)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("running as root: chmod does not make a file read-only")
        with pytest.raises(StoreError, match=r"cannot write to .*lab.sqlite': permission denied"):
            Store(path)
        with Store(path, readonly=True) as reader:
            assert reader.runs() == []
    finally:
        path.chmod(0o644)


# ------------------------------------------------------------------------------------ SIGKILL


_WRITER = """
    import sys
    from lrbs.store import Store
    store = Store(sys.argv[1])
    i = int(sys.argv[2])
    print("ready", flush=True)
    while True:
        key = store.start_run({"i": i, "pad": "x" * 200})
        store.log_metrics(key, [(s, "loss", 1.0 / (s + 1)) for s in range(60)])
        store.finish_run(key, "completed", {"n": 120}, metrics=[(s, "acc", s / 60) for s in range(60)])
        i += 1
"""


def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path: Path):
    path = tmp_path / "lab.sqlite"
    Store(path).close()
    completed_before = 0
    for round_, delay in enumerate((0.0, 0.013, 0.029)):
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_WRITER), str(path), str(1000 * round_)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
            deadline = time.time() + 60
            raw = _raw(path)
            while raw.execute("SELECT COUNT(*) FROM runs WHERE status = 'completed'").fetchone()[0] < (
                completed_before + 5
            ):
                assert time.time() < deadline, "the writer made no progress"
                time.sleep(0.01)
            raw.close()
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        with Store(path) as store:
            completed = store.runs(status="completed")
            assert len(completed) >= completed_before + 5
            completed_before = len(completed)

    raw = _raw(path)
    assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    raw.close()
    with Store(path) as store:
        for rec in store.runs(status="completed"):
            rows = store.metrics(rec.key)
            assert len(rows) == rec.result["n"] == 120
            assert [s for s, n, _ in rows if n == "acc"] == list(range(60))
        # the run each writer was in the middle of is running with a dead pid: it restarts cleanly
        for rec in store.runs(status="running"):
            store.start_run(rec.config)
            assert store.metrics(rec.key) == []


# ------------------------------------------------------------------------------------- artifacts


def test_arrays_round_trip_with_meta(store: Store):
    key = store.start_run(CONFIG, kind="landscape")
    rng = np.random.default_rng(0)
    arrays = {
        "loss": rng.standard_normal((5, 7)),
        "alphas": np.linspace(-1, 1, 5, dtype=np.float32),
        "steps": np.arange(3, dtype=np.int64),
        "mask": np.array([True, False]),
        "file": np.array(3.5),  # np.savez(file, **arrays) would break on this name
        "labels": np.array(["a", "bc"]),
    }
    meta = {"directions": "filter-normalised", "seed": np.int64(0), "range": (-1.0, 1.0), "nan": float("nan")}
    rel = store.save_arrays(key, "landscape_2d", "grid", arrays, meta)
    assert rel == f"{key[:16]}/grid.npz"
    assert store.artifact_path(rel) == (store.artifact_dir / rel).resolve()

    loaded, got_meta = store.load_arrays(rel)
    assert sorted(loaded) == sorted(arrays)
    for name, a in arrays.items():
        assert loaded[name].dtype == a.dtype and loaded[name].shape == a.shape
        np.testing.assert_array_equal(loaded[name], a)
    assert got_meta["range"] == [-1.0, 1.0] and got_meta["seed"] == 0 and math.isnan(got_meta["nan"])
    # the npz is a plain numpy archive; the sidecar describes it
    with np.load(store.artifact_dir / rel, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["loss"], arrays["loss"])
    sidecar = json.loads((store.artifact_dir / key[:16] / "grid.json").read_text())
    assert sidecar["run"] == key and sidecar["kind"] == "landscape_2d"
    assert sidecar["arrays"]["loss"] == {"shape": [5, 7], "dtype": "<f8"}
    assert not [p for p in (store.artifact_dir / key[:16]).iterdir() if p.name.endswith(".tmp")]

    (rec,) = store.artifacts(key)
    assert isinstance(rec, ArtifactRecord)
    assert (rec.run, rec.kind, rec.path, rec.meta["directions"]) == (
        key,
        "landscape_2d",
        rel,
        "filter-normalised",
    )
    assert json.loads(json.dumps(rec.to_dict(), allow_nan=True))["path"] == rel
    # saving again under the same name replaces the file and the row
    store.save_arrays(key, "landscape_2d", "grid", {"loss": np.zeros(2)}, {"v": 2})
    (rec,) = store.artifacts(key, kind="landscape_2d")
    assert rec.meta == {"v": 2}
    np.testing.assert_array_equal(store.load_arrays(rel)[0]["loss"], np.zeros(2))


def test_arrays_never_use_pickle(store: Store, tmp_path: Path):
    key = store.start_run(CONFIG)
    with pytest.raises(LrbsTypeError, match=r"arrays\['obj'\] has dtype object, which would need pickle"):
        store.save_arrays(key, "x", "bad", {"obj": np.array([{"a": 1}], dtype=object)})
    assert not store.artifact_dir.exists()
    # A hand-made npz holding a pickled object array is refused on load.
    folder = store.artifact_dir / "evil"
    folder.mkdir(parents=True)
    np.savez(folder / "evil.npz", obj=np.array([{"a": 1}, None], dtype=object))
    (folder / "evil.json").write_text('{"meta": {}}')
    with pytest.raises(StoreError, match=r"cannot load the arrays .*evil.npz'.*pickle"):
        store.load_arrays("evil/evil.npz")


def test_artifact_errors(store: Store, tmp_path: Path):
    key = store.start_run(CONFIG)
    for bad in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ConfigError, match=r"name=.* is not allowed: must be a file name"):
            store.save_arrays(key, "x", bad, {"a": np.zeros(1)})
    with pytest.raises(LrbsTypeError, match=r"arrays=\{\} is not allowed: must be a non-empty dict"):
        store.save_arrays(key, "x", "ok", {})
    with pytest.raises(ConfigError, match=r"arrays key 'a/b' is not allowed"):
        store.save_arrays(key, "x", "ok", {"a/b": np.zeros(1)})
    with pytest.raises(LrbsTypeError, match=r"meta=3 \(int\) is not allowed: must be a dict"):
        store.save_arrays(key, "x", "ok", {"a": np.zeros(1)}, 3)
    with pytest.raises(StoreError, match=r"no run with key='0+' in"):
        store.save_arrays("0" * 64, "x", "ok", {"a": np.zeros(1)})
    with pytest.raises(
        StoreError, match=r"relpath='../../etc/passwd' is not allowed: it leaves the artifact"
    ):
        store.load_arrays("../../etc/passwd")
    with pytest.raises(StoreError, match=r"cannot load the arrays .*missing.npz'"):
        store.load_arrays("missing.npz")
    with pytest.raises(ConfigError, match=r"name=None is not allowed with bytes"):
        store.add_artifact(key, "log", b"hello")
    with pytest.raises(StoreError, match=r"cannot add the artifact .*nothere.txt': no such file"):
        store.add_artifact(key, "log", tmp_path / "nothere.txt")
    with pytest.raises(LrbsTypeError, match=r"data=int is not allowed: must be bytes or a file path"):
        store.add_artifact(key, "log", 3)
    assert store.artifacts(key) == []


def test_add_artifact_bytes_and_files(store: Store, tmp_path: Path):
    key = store.start_run(CONFIG)
    rel = store.add_artifact(key, "log", b"step 0 loss 1.0\n", name="train.log", meta={"lines": 1})
    assert rel == f"{key[:16]}/train.log"
    assert (store.artifact_dir / rel).read_bytes() == b"step 0 loss 1.0\n"

    outside = tmp_path / "fig.svg"
    outside.write_text("<svg/>")
    rel_copy = store.add_artifact(key, "figure", outside)
    assert rel_copy == f"{key[:16]}/fig.svg"
    assert (store.artifact_dir / rel_copy).read_text() == "<svg/>"

    inside = store.artifact_dir / "shared" / "ckpt.safetensors"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"\x00\x01")
    assert store.add_artifact(key, "checkpoint", inside) == "shared/ckpt.safetensors"  # in place
    assert store.artifact_path("shared/ckpt.safetensors") == inside.resolve()

    assert [a.path for a in store.artifacts(key)] == [rel, rel_copy, "shared/ckpt.safetensors"]
    assert [a.meta for a in store.artifacts(key, kind="log")] == [{"lines": 1}]
    # a restart of the run drops its artifact rows (files stay on disk, to be overwritten)
    store.fail_run(key, "x")
    store.start_run(CONFIG)
    assert store.artifacts(key) == []
    assert (store.artifact_dir / rel).exists()
