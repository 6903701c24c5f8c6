"""The results store: one SQLite file (WAL mode) for runs and metrics, a folder next to it for arrays.

A run is identified by the hash of its full configuration (:func:`key_for`), so a sweep that is started
again skips what is already finished (:meth:`Store.find`) and redoes what was interrupted. The driver of a
sweep is the only writer; every write is one transaction, so a process killed mid-write (even by SIGKILL)
leaves a consistent database: a run is either ``completed`` with all its metrics or it is not.

Layout::

    study/lab.sqlite                 runs, metrics, artifacts, schema_version
    study/lab_artifacts/<key16>/     <name>.npz (arrays) + <name>.json (sidecar: settings, shapes)

Example:
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d, Store(pathlib.Path(d) / "lab.sqlite") as store:
    ...     key = store.start_run({"lr": 0.1, "batch_size": 32}, kind="fit")
    ...     store.finish_run(key, "completed", {"loss": 0.25}, metrics=[(0, "loss", 1.0), (1, "loss", 0.25)])
    ...     store.find({"batch_size": 32, "lr": 0.1}).result
    {'loss': 0.25}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import sqlite3
import time
import urllib.parse
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._util import atomic_write
from .errors import ConfigError, LrbsTypeError, StoreError, check_choice, check_int, check_number

__all__ = ["SCHEMA_VERSION", "ArtifactRecord", "Run", "RunRecord", "Store", "key_for"]

SCHEMA_VERSION = 1
STATUSES = ("running", "completed", "diverged", "failed")
FINISHED = ("completed", "diverged")

# The primary key of ``metrics``, (run, name, step), is also its index on (run, name); INSERT OR REPLACE
# on it means that a retried write replaces rows instead of duplicating them.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS schema_version (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS runs (
        key TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        config TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'diverged', 'failed')),
        started REAL NOT NULL,
        finished REAL,
        error TEXT,
        result TEXT,
        host TEXT,
        pid INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS runs_kind_status ON runs (kind, status)",
    """CREATE TABLE IF NOT EXISTS metrics (
        run TEXT NOT NULL REFERENCES runs (key) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        name TEXT NOT NULL,
        value REAL,
        PRIMARY KEY (run, name, step)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS artifacts (
        run TEXT NOT NULL REFERENCES runs (key) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        meta TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (run, path)
    )""",
)

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")


# --------------------------------------------------------------------------------------------- keys


def _canonical(value: Any, where: str, allow_nonfinite: bool) -> Any:
    """``value`` as plain JSON data: tuples -> lists, numpy scalars/arrays -> Python, -0.0 -> 0.0.

    Not :func:`lrbs._util.jsonable`, on purpose: this is the canonical form a run key is hashed from, so it
    validates (an unknown object, a non-str key or, in a config, a non-finite number raises, naming where it is)
    instead of converting, and results / metadata keep NaN and infinity as the store's documented contract.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _canonical_float(value, where, allow_nonfinite)
    if isinstance(value, np.ndarray):
        return _canonical(value.tolist(), where, allow_nonfinite)
    if isinstance(value, os.PathLike):
        return str(os.fspath(value))
    if isinstance(value, Mapping):
        return _canonical_mapping(value, where, allow_nonfinite)
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]", allow_nonfinite) for i, v in enumerate(value)]
    raise LrbsTypeError(
        f"{where}={value!r} ({type(value).__name__}) is not allowed: must be JSON data (None, bool, int, "
        "float, str, path, list, tuple, dict with str keys, numpy scalar or array); convert it, e.g. a "
        "dtype or a module to its name"
    )


def _canonical_float(value: Any, where: str, allow_nonfinite: bool) -> float:
    x = float(value)
    if not math.isfinite(x) and not allow_nonfinite:
        raise ConfigError(
            f"{where}={value!r} is not allowed: must be a finite number (NaN and infinity have no "
            "canonical JSON form)"
        )
    return x + 0.0  # -0.0 + 0.0 == +0.0, so both zeros hash alike


def _canonical_mapping(value: Mapping, where: str, allow_nonfinite: bool) -> dict:
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise LrbsTypeError(
                f"{where} has the key {k!r} ({type(k).__name__}): keys must be str so that the JSON "
                "form is unambiguous"
            )
        out[k] = _canonical(v, f"{where}[{k!r}]", allow_nonfinite)
    return out


def _dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def _canonical_config(config: Any) -> dict:
    if not isinstance(config, Mapping):
        raise LrbsTypeError(f"config={config!r} ({type(config).__name__}) is not allowed: must be a dict")
    return _canonical(config, "config", allow_nonfinite=False)


def key_for(config: Mapping[str, Any]) -> str:
    """The key of a run: the SHA-256 of the canonical JSON form of its configuration.

    The canonical form sorts keys, writes floats with Python's shortest round-trip ``repr`` and
    normalises tuples to lists, numpy scalars and arrays to Python numbers and lists, paths to str and
    ``-0.0`` to ``0.0``. The key is therefore the same in every process and for any key order. Integers
    and floats stay distinct (``1`` and ``1.0`` give different keys), as do ``True`` and ``1``.

    Args:
        config: the full configuration of a run; str keys and JSON-like values only.

    Returns:
        64 lowercase hex digits.

    Raises:
        LrbsTypeError: ``config`` is not a dict, or holds a value with no JSON form (the message names
            where, e.g. ``config['optim']['betas'][0]``).
        ConfigError: ``config`` holds NaN or infinity.

    Example:
        >>> key_for({"lr": 0.1, "bs": 32}) == key_for({"bs": 32, "lr": 0.1})
        True
    """
    return hashlib.sha256(_dumps(_canonical_config(config)).encode("ascii")).hexdigest()


# ------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``: what was run (``kind``, ``config``), how it ended and its summary ``result``."""

    key: str
    kind: str
    config: dict
    status: str
    started: float
    finished: float | None
    error: str | None
    result: dict | None
    host: str | None = None
    pid: int | None = None

    def to_dict(self) -> dict:
        """A JSON-able dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class ArtifactRecord:
    """One row of ``artifacts``: a file of run ``run``, at ``path`` relative to the artifact folder."""

    run: str
    kind: str
    path: str
    meta: dict
    created: float

    def to_dict(self) -> dict:
        """A JSON-able dict of every field."""
        return asdict(self)


# ---------------------------------------------------------------------------------------- filesystem


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_location(path: Path, what: str) -> None:
    """Raise StoreError unless ``path`` (a file, or a folder when what='folder') can be created/written."""
    if path.exists():
        if what == "file" and path.is_dir():
            raise StoreError(f"cannot open the store {str(path)!r}: it is a directory, not a file")
        if what == "folder" and not path.is_dir():
            raise StoreError(f"cannot use {str(path)!r} as the artifact folder: it is a file")
        if not os.access(path, os.W_OK):
            raise StoreError(f"cannot write to {str(path)!r}: permission denied (the location is read-only)")
        if what == "folder":
            return
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        raise StoreError(f"cannot create {str(path)!r}: {str(anchor)!r} is a file, not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise StoreError(
            f"cannot create {str(path)!r}: the directory {str(anchor)!r} is not writable (read-only location)"
        )


def _atomic_write(target: Path, write: Any) -> None:
    """:func:`lrbs._util.atomic_write` (all or nothing, fsynced) of ``write(f)`` to ``target``, its folder made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, write)


def _pid_alive(pid: int | None) -> bool:
    if pid is None or pid <= 0 or os.name == "nt":  # os.kill(pid, 0) would terminate a process on Windows
        return pid is not None and pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------- store


class Store:
    """Runs, metrics and array artifacts of a study, in one SQLite file (WAL mode) plus a folder.

    Args:
        path: the database file, e.g. ``study/lab.sqlite``; missing parent folders are created.
        readonly: open an existing store for reading only (e.g. for a report while a sweep writes).
        artifact_dir: where arrays and files go; default ``<path stem>_artifacts/`` next to ``path``.
        stale_after: seconds after which a ``running`` row is presumed dead even if its process cannot
            be checked (another host) or its pid was reused.
        busy_timeout: seconds to wait for a lock held by another connection before failing.

    One Store may be used from several threads of its process, one call at a time (callers serialize, as the
    study does); its connection is not tied to the thread that opened it.

    Raises:
        StoreError: the location is read-only or not a directory; the file is not a SQLite database,
            is corrupt, is not an lrbs store, or was written by a newer lrbs (newer schema version); a
            read-only store does not exist.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        readonly: bool = False,
        artifact_dir: str | os.PathLike | None = None,
        stale_after: float = 24 * 3600.0,
        busy_timeout: float = 30.0,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise LrbsTypeError(f"path={path!r} is not allowed: must be a str or a path")
        self.path = Path(path).expanduser().absolute()
        self.readonly = bool(readonly)
        if artifact_dir is None:
            self.artifact_dir = self.path.with_name(self.path.stem + "_artifacts")
        else:
            self.artifact_dir = Path(artifact_dir).expanduser().absolute()
        self.stale_after = check_number("stale_after", stale_after, low=0.0)
        busy = check_number("busy_timeout", busy_timeout, low=0.0, low_inclusive=True)
        self._conn: sqlite3.Connection | None = None

        if self.readonly:
            if not self.path.is_file():
                raise StoreError(f"cannot open the store {str(self.path)!r} read-only: no such file")
            uri = "file:" + urllib.parse.quote(str(self.path)) + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=busy, isolation_level=None, check_same_thread=False)
        else:
            # Detect a read-only or impossible location before anything is created.
            _check_writable_location(self.path, "file")
            _check_writable_location(self.artifact_dir, "folder")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(self.path), timeout=busy, isolation_level=None, check_same_thread=False
            )
        try:
            self._setup(conn, busy)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _setup(self, conn: sqlite3.Connection, busy: float) -> None:
        where = str(self.path)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            if not self.readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")  # in WAL: consistent after any crash
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreError(f"the store {where!r} is corrupt: {'; '.join(map(str, problems[:5]))}")
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open the store {where!r}: not a readable SQLite database ({e})") from e
        if "schema_version" not in tables:
            if tables:
                raise StoreError(
                    f"{where!r} is a SQLite database but not an lrbs store (tables: {sorted(tables)}); "
                    "use another path"
                )
            if self.readonly:
                raise StoreError(f"{where!r} is empty: a read-only store must already exist")
            with self._tx(conn):  # IF NOT EXISTS / OR IGNORE: two processes may race to create it
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO schema_version (id, version) VALUES (1, ?)", (SCHEMA_VERSION,)
                )
        row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        version = row[0] if row else None
        if not isinstance(version, int):
            raise StoreError(f"the store {where!r} has no valid schema version (got {version!r})")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {where!r} has schema version {version}, newer than this lrbs supports "
                f"({SCHEMA_VERSION}); upgrade lrbs to read it"
            )

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        """The open SQLite connection (autocommit), for read queries the methods do not cover."""
        if self._conn is None:
            raise StoreError(f"the store {str(self.path)!r} is closed")
        return self._conn

    @contextmanager
    def _tx(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); any exception rolls everything back."""
        conn = conn or self.conn
        if self.readonly:
            raise StoreError(f"the store {str(self.path)!r} was opened read-only: cannot write")
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"cannot write to the store {str(self.path)!r}: {e}") from e
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else ("read-only" if self.readonly else "open")
        return f"Store({str(self.path)!r}, {state})"

    # -- runs -------------------------------------------------------------------------------------
    def run(self, config: Mapping[str, Any], kind: str = "fit", *, rerun: bool = False) -> Run:
        """The lifecycle of one run: ``with store.run(config, kind) as run: ...; run.finish(status, ...)``.

        Entering the block calls :meth:`start_run`; inside it, ``run.finish(status, result=..., metrics=...)``
        (or ``run.fail(error)``) ends the run. An exception out of the block marks the run ``failed`` with the
        error text (``"TypeName: message"``) and is re-raised. A block that ends with neither ``finish`` nor
        ``fail`` marks the run ``failed`` ("ended without finish()"): a run is ``completed`` only when it says
        so with a result, and no ``running`` row is left behind. A run that was already finished when the
        block began (``start_run`` returns its key without resetting it) is left as it is.

        For a run whose result arrives elsewhere (a worker's task), ``run = store.run(config, kind).start()``
        and later ``run.finish(...)`` / ``run.fail(...)``.
        """
        return Run(self, config, kind, rerun)

    def start_run(self, config: Mapping[str, Any], kind: str = "fit", *, rerun: bool = False) -> str:
        """Record that the run of ``config`` starts (status ``running``) and return its key.

        A ``running`` row left by a crashed process (its pid is gone on this host, or it is older than
        ``stale_after``) and a ``failed`` row are reset (their metrics and artifact rows dropped) and the
        run starts again. A finished row (``completed``/``diverged``) is left alone and its key returned
        (check :meth:`find` first), unless ``rerun=True``, which resets it too.

        Raises:
            StoreError: the run is running in a live process; the same config is stored as another kind.
        """
        kind = _check_kind(kind)
        cfg = _canonical_config(config)
        key = hashlib.sha256(_dumps(cfg).encode("ascii")).hexdigest()
        now, host, pid = time.time(), socket.gethostname(), os.getpid()
        with self._tx() as conn:
            row = conn.execute("SELECT kind, status, started, host, pid FROM runs WHERE key = ?", (key,))
            row = row.fetchone()
            if row is not None:
                old_kind, status, started, old_host, old_pid = row
                if old_kind != kind:
                    raise StoreError(
                        f"run {key[:16]} is stored as kind={old_kind!r}, not kind={kind!r}: the config is "
                        "the identity of a run, so add a field that tells the two apart"
                    )
                if status in FINISHED and not rerun:
                    return key
                if status == "running" and not self._is_stale(started, old_host, old_pid, now):
                    raise StoreError(
                        f"run {key[:16]} is already running (pid {old_pid} on {old_host}, started "
                        f"{now - started:.0f} s ago); wait for it, or it is presumed dead after "
                        f"stale_after={self.stale_after:g} s"
                    )
                conn.execute("DELETE FROM metrics WHERE run = ?", (key,))
                conn.execute("DELETE FROM artifacts WHERE run = ?", (key,))
                conn.execute(
                    "UPDATE runs SET status = 'running', started = ?, finished = NULL, error = NULL, "
                    "result = NULL, host = ?, pid = ? WHERE key = ?",
                    (now, host, pid, key),
                )
            else:
                conn.execute(
                    "INSERT INTO runs (key, kind, config, status, started, host, pid) "
                    "VALUES (?, ?, ?, 'running', ?, ?, ?)",
                    (key, kind, _dumps(cfg), now, host, pid),
                )
        return key

    def _is_stale(self, started: float, host: str | None, pid: int | None, now: float) -> bool:
        if now - started > self.stale_after:
            return True
        if host == socket.gethostname():
            return pid == os.getpid() or not _pid_alive(pid)
        return False

    def finish_run(
        self,
        key: str,
        status: str,
        result: Mapping[str, Any] | None = None,
        metrics: Iterable[tuple[int, str, float]] | None = None,
        error: str | None = None,
    ) -> None:
        """End a running run: write its metrics, ``result`` and ``status`` in ONE transaction.

        Either all of it is written or none of it (on any error, including a kill of the process).

        Args:
            key: the key from :meth:`start_run`.
            status: ``"completed"``, ``"diverged"`` (a non-finite loss; a finished outcome) or ``"failed"``.
            result: final metrics / summary, JSON data (NaN and infinity allowed).
            metrics: rows ``(step, name, value)``; rows already logged with the same step and name are
                replaced.
            error: an error text (for ``failed`` or ``diverged``).

        Raises:
            StoreError: unknown key, or the run is not ``running``.
            ConfigError, LrbsTypeError: a bad status, result or metric row (nothing is written).
        """
        check_choice("status", status, ("completed", "diverged", "failed"))
        res = None if result is None else _canonical(_check_dict("result", result), "result", True)
        rows = _metric_rows(metrics) if metrics is not None else []
        if error is not None and not isinstance(error, str):
            raise LrbsTypeError(f"error={error!r} is not allowed: must be a str or None")
        with self._tx() as conn:
            self._require_running(conn, key)
            conn.executemany(
                "INSERT OR REPLACE INTO metrics (run, step, name, value) VALUES (?, ?, ?, ?)",
                [(key, *r) for r in rows],
            )
            conn.execute(
                "UPDATE runs SET status = ?, finished = ?, result = ?, error = ? WHERE key = ?",
                (status, time.time(), None if res is None else _dumps(res), error, key),
            )

    def fail_run(self, key: str, error: str) -> None:
        """Mark a running run ``failed`` with an error text (its logged metrics are kept for debugging).

        Raises:
            StoreError: unknown key, or the run is not ``running``.
        """
        self.finish_run(key, "failed", None, None, error=str(error))

    def log_metrics(self, key: str, rows: Iterable[tuple[int, str, float]]) -> int:
        """Append metric rows ``(step, name, value)`` of a running run in one batched transaction.

        Returns:
            the number of rows written. A retried write replaces rows with the same (step, name).

        Raises:
            StoreError: unknown key, or the run is not ``running``.
            ConfigError, LrbsTypeError: a malformed row (nothing is written).
        """
        data = _metric_rows(rows)
        with self._tx() as conn:
            self._require_running(conn, key)
            conn.executemany(
                "INSERT OR REPLACE INTO metrics (run, step, name, value) VALUES (?, ?, ?, ?)",
                [(key, *r) for r in data],
            )
        return len(data)

    def _require_running(self, conn: sqlite3.Connection, key: str) -> None:
        row = conn.execute("SELECT status FROM runs WHERE key = ?", (_check_key(key),)).fetchone()
        if row is None:
            raise StoreError(f"no run with key={key!r} in {str(self.path)!r}: call start_run first")
        if row[0] != "running":
            raise StoreError(
                f"run {key[:16]} is {row[0]!r}, not 'running': call start_run again to restart it "
                "(rerun=True for a finished run)"
            )

    def get(self, key: str) -> RunRecord | None:
        """The run with this key, whatever its status, or None."""
        row = self.conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE key = ?", (_check_key(key),))
        row = row.fetchone()
        return None if row is None else _run_record(row)

    def find(self, config: Mapping[str, Any], kind: str | None = None) -> RunRecord | None:
        """The finished (``completed`` or ``diverged``) run of ``config``, or None: lets a sweep skip work."""
        record = self.get(key_for(config))
        if record is None or record.status not in FINISHED:
            return None
        if kind is not None and record.kind != _check_kind(kind):
            return None
        return record

    def runs(self, kind: str | None = None, status: str | None = None) -> list[RunRecord]:
        """All runs, oldest first, optionally only of one ``kind`` and/or ``status``."""
        sql, args = f"SELECT {_RUN_COLUMNS} FROM runs WHERE 1", []
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, _check_kind(kind)]
        if status is not None:
            sql, args = sql + " AND status = ?", [*args, check_choice("status", status, STATUSES)]
        return [_run_record(r) for r in self.conn.execute(sql + " ORDER BY started, key", args)]

    def metrics(self, key: str, name: str | None = None) -> list[tuple[int, str, float]]:
        """Metric rows ``(step, name, value)`` of a run, sorted by name then step (NaN stays NaN)."""
        sql, args = "SELECT step, name, value FROM metrics WHERE run = ?", [_check_key(key)]
        if name is not None:
            sql, args = sql + " AND name = ?", [*args, name]
        rows = self.conn.execute(sql + " ORDER BY name, step", args)
        return [(s, n, math.nan if v is None else v) for s, n, v in rows]

    def series(self, key: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One metric of a run as arrays ``(steps int64, values float64)``, sorted by step."""
        rows = self.metrics(key, name)
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        return steps, np.array([r[2] for r in rows], dtype=np.float64)

    # -- artifacts --------------------------------------------------------------------------------

    def add_artifact(
        self,
        key: str,
        kind: str,
        data: bytes | str | os.PathLike,
        *,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Attach a file to a run and return its path relative to the artifact folder.

        ``data`` is either bytes (written atomically to ``<key16>/<name>``), or the path of an existing
        file: a file inside the artifact folder is referenced in place, one outside is copied in (to
        ``<key16>/<name or its file name>``).

        Raises:
            StoreError: unknown run or missing file. ConfigError: a bad ``name``.
        """
        kind = _check_kind(kind)
        info = _canonical(_check_dict("meta", meta or {}), "meta", True)
        self._require_exists(key)
        if isinstance(data, (bytes, bytearray, memoryview)):
            if name is None:
                raise ConfigError("name=None is not allowed with bytes: give the file name, e.g. 'log.txt'")
            target = self.artifact_dir / key[:16] / _check_name(name)
            _atomic_write(target, lambda f: f.write(bytes(data)))
        elif isinstance(data, (str, os.PathLike)):
            source = Path(data).expanduser().absolute()
            if not source.is_file():
                raise StoreError(f"cannot add the artifact {str(data)!r}: no such file")
            if source.resolve().is_relative_to(self.artifact_dir.resolve()):
                target = source
            else:
                target = self.artifact_dir / key[:16] / _check_name(name or source.name)
                _atomic_write(target, lambda f: _copy_into(source, f))
        else:
            raise LrbsTypeError(f"data={type(data).__name__} is not allowed: must be bytes or a file path")
        return self._record_artifact(key, kind, target, info)

    def save_arrays(
        self,
        key: str,
        kind: str,
        name: str,
        arrays: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Save named arrays as ``<key16>/<name>.npz`` plus a ``<name>.json`` sidecar; return the npz path.

        Both files are written atomically (temporary file + ``os.replace``) and never pickled: object
        arrays are refused, so :meth:`load_arrays` can use ``allow_pickle=False``.

        Raises:
            StoreError: unknown run. ConfigError, LrbsTypeError: a bad name, array or meta.
        """
        kind = _check_kind(kind)
        name = _check_name(name)
        if not isinstance(arrays, Mapping) or not arrays:
            raise LrbsTypeError(
                f"arrays={arrays!r} is not allowed: must be a non-empty dict of name -> array"
            )
        clean = {}
        for k, v in arrays.items():
            if not isinstance(k, str) or not k or "/" in k or "\\" in k:
                raise ConfigError(f"arrays key {k!r} is not allowed: must be a non-empty str without '/'")
            a = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
            if a.dtype.hasobject:
                raise LrbsTypeError(
                    f"arrays[{k!r}] has dtype object, which would need pickle: must be a numeric, bool or "
                    "string array"
                )
            clean[k] = a
        info = _canonical(_check_dict("meta", meta or {}), "meta", True)
        self._require_exists(key)
        sidecar = {
            "lrbs_artifact": SCHEMA_VERSION,
            "run": key,
            "kind": kind,
            "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype.str} for k, a in clean.items()},
            "meta": info,
        }
        folder = self.artifact_dir / key[:16]

        def write_npz(f: Any) -> None:
            # The zip is written by hand: np.savez(file, **arrays) breaks on an array named "file".
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
                for k, a in clean.items():
                    with z.open(k + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, a, allow_pickle=False)

        _atomic_write(folder / f"{name}.npz", write_npz)
        _atomic_write(folder / f"{name}.json", lambda f: f.write(_pretty(sidecar).encode("utf-8")))
        return self._record_artifact(key, kind, folder / f"{name}.npz", info)

    def load_arrays(self, relpath: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
        """Load ``(arrays, meta)`` saved by :meth:`save_arrays`, with ``allow_pickle=False``.

        Raises:
            StoreError: the path leaves the artifact folder, or the file or its sidecar is missing or
                unreadable.
        """
        path = self._resolve(relpath)
        sidecar = path.with_suffix(".json")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(sidecar.read_text("utf-8"))["meta"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise StoreError(f"cannot load the arrays {str(path)!r}: {e}") from e
        return arrays, meta

    def artifacts(self, key: str, kind: str | None = None) -> list[ArtifactRecord]:
        """The artifacts of a run, oldest first, optionally of one ``kind``."""
        sql, args = "SELECT run, kind, path, meta, created FROM artifacts WHERE run = ?", [_check_key(key)]
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, _check_kind(kind)]
        rows = self.conn.execute(sql + " ORDER BY created, path", args)
        return [ArtifactRecord(r, k, p, json.loads(m), c) for r, k, p, m, c in rows]

    def artifact_path(self, relpath: str | os.PathLike) -> Path:
        """The absolute path of an artifact given its stored relative path."""
        return self._resolve(relpath)

    def _resolve(self, relpath: str | os.PathLike) -> Path:
        if not isinstance(relpath, (str, os.PathLike)):
            raise LrbsTypeError(f"relpath={relpath!r} is not allowed: must be a str or a path")
        root = self.artifact_dir.resolve()
        path = (root / relpath).resolve()
        if not path.is_relative_to(root):
            raise StoreError(
                f"relpath={str(relpath)!r} is not allowed: it leaves the artifact folder {str(root)!r}"
            )
        return path

    def _require_exists(self, key: str) -> None:
        if self.conn.execute("SELECT 1 FROM runs WHERE key = ?", (_check_key(key),)).fetchone() is None:
            raise StoreError(f"no run with key={key!r} in {str(self.path)!r}: call start_run first")

    def _record_artifact(self, key: str, kind: str, target: Path, meta: Any) -> str:
        rel = target.resolve().relative_to(self.artifact_dir.resolve()).as_posix()
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO artifacts (run, kind, path, meta, created) VALUES (?, ?, ?, ?, ?)",
                (key, kind, rel, _dumps(meta), time.time()),
            )
        return rel


# --------------------------------------------------------------------------------------------- helpers

_RUN_COLUMNS = "key, kind, config, status, started, finished, error, result, host, pid"


class Run:
    """One run being recorded (:meth:`Store.run`): a context manager; ``key`` once started."""

    def __init__(self, store: Store, config: Mapping[str, Any], kind: str, rerun: bool):
        self.store, self.config, self.kind, self.rerun = store, config, kind, rerun
        self.key: str | None = None

    def start(self) -> Run:
        """:meth:`Store.start_run`; returns this run."""
        self.key = self.store.start_run(self.config, self.kind, rerun=self.rerun)
        return self

    @property
    def running(self) -> bool:
        """Whether the store holds this run as ``running``."""
        rec = None if self.key is None else self.store.get(self.key)
        return rec is not None and rec.status == "running"

    def finish(
        self,
        status: str,
        result: Mapping[str, Any] | None = None,
        metrics: Iterable[tuple[int, str, float]] | None = None,
        error: str | None = None,
    ) -> None:
        """:meth:`Store.finish_run` of this run (one transaction)."""
        self.store.finish_run(self._started_key(), status, result, metrics, error=error)

    def fail(self, error: str) -> None:
        """:meth:`Store.fail_run` of this run."""
        self.store.fail_run(self._started_key(), error)

    def log(self, rows: Iterable[tuple[int, str, float]]) -> int:
        """:meth:`Store.log_metrics` of this run."""
        return self.store.log_metrics(self._started_key(), rows)

    def _started_key(self) -> str:
        if self.key is None:
            raise StoreError("the run is not started: use `with store.run(...) as run:` or run.start()")
        return self.key

    def __enter__(self) -> Run:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if not self.running:  # finished or failed inside the block (or finished before it began)
            return
        if error is not None:
            self.fail(f"{type(error).__name__}: {error}")
        else:
            self.fail("the run's block ended without finish() or fail()")


def _run_record(row: tuple) -> RunRecord:
    key, kind, config, status, started, finished, error, result, host, pid = row
    res = None if result is None else json.loads(result)
    return RunRecord(key, kind, json.loads(config), status, started, finished, error, res, host, pid)


def _copy_into(source: Path, f: Any) -> None:
    with source.open("rb") as src:
        shutil.copyfileobj(src, f)


def _pretty(data: Any) -> str:
    return json.dumps(data, sort_keys=True, indent=1, allow_nan=True) + "\n"


def _check_dict(name: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise LrbsTypeError(f"{name}={value!r} ({type(value).__name__}) is not allowed: must be a dict")
    return value


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not kind:
        raise LrbsTypeError(f"kind={kind!r} is not allowed: must be a non-empty str such as 'fit'")
    return kind


def _check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise LrbsTypeError(f"key={key!r} is not allowed: must be a str from key_for() or start_run()")
    return key


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"name={name!r} is not allowed: must be a file name of letters, digits and _ . = + - "
            "(no folders, not starting with '.')"
        )
    return name


def _metric_rows(rows: Any) -> list[tuple[int, str, float | None]]:
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise LrbsTypeError(f"metrics={rows!r} is not allowed: must be an iterable of (step, name, value)")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) != 3:
            raise LrbsTypeError(f"metrics[{i}]={row!r} is not allowed: must be a (step, name, value) triple")
        step, name, value = row
        step = check_int(f"metrics[{i}].step", step, low=0)
        if not isinstance(name, str) or not name:
            raise LrbsTypeError(f"metrics[{i}].name={name!r} is not allowed: must be a non-empty str")
        try:
            if isinstance(value, (bool, str, bytes)):
                raise TypeError(type(value).__name__)
            x = float(value)
        except (TypeError, ValueError) as e:
            raise LrbsTypeError(f"metrics[{i}].value={value!r} is not allowed: must be a real number") from e
        out.append((step, name, None if math.isnan(x) else x))  # SQLite stores NaN as NULL anyway
    return out
