"""A persistent local process pool: workers started once, reused for every task, one torch thread each.

The study (``lrbs study --jobs N``) and local sweeps (``sweep(..., max_concurrency=N)``) run independent training
runs and measurements in worker processes of a :class:`WorkerPool`:

- workers start once (``forkserver`` on Linux, with torch and lrbs imported once in the server and forked from
  it warm; ``spawn`` elsewhere) and take task after task; a plain ``fork`` of a driver that already runs threads
  (torch's pools, SQLite, a progress bar) deadlocked;
- every task sets the torch thread count it asks for (default 1): the same thread count as a run in the driver
  gives bitwise equal numbers;
- tasks and results travel as plain pickles (tensors by value), results come back in submission order to whoever
  reads them (:meth:`Job.result`), and the workers never touch the store: the driver is the only writer;
- a worker that dies (killed, out of memory) fails only the task it was running, with :class:`WorkerDied`; a fresh
  worker takes its place and every other task goes on. Workers exit when the driver process dies;
- a worker that dies while starting (before it says it is up) never ran its task, which goes back to the queue;
  after :data:`STARTUP_FAILURES` such deaths in a row the pool stops and every task fails with the reason. The
  usual cause is a script without ``if __name__ == "__main__":`` (each worker imports the script again while it
  starts); lrbs refuses to start workers from such a half-started worker (:func:`check_can_start_workers`), where
  it used to replace dying workers forever.

:func:`shared_pool` keeps one pool alive for the whole process (closed at exit), so consecutive sweeps reuse warm
workers instead of paying the start (``import torch``) again.
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import wait as mp_wait
from typing import Any

from .errors import ConfigError, DependencyError, LrbsError, check_int

__all__ = [
    "Job",
    "connect_ray",
    "RayPool",
    "TaskCancelled",
    "WorkerDied",
    "WorkerPool",
    "available_cpus",
    "check_can_start_workers",
    "shared_pool",
    "shutdown_shared_pool",
    "start_fork_server",
]

#: modules imported once in the fork server, so that every worker starts with them loaded; ``torch._dynamo`` is
#: what the first ``torch.optim`` optimizer of a process imports (``add_param_group`` is wrapped by
#: ``torch._disable_dynamo``): 1-1.5 s of every worker's first training run otherwise
PRELOAD = ("torch", "torch._dynamo", "numpy", "lrbs.pool", "lrbs.train", "lrbs.objective")


class WorkerDied(LrbsError, RuntimeError):
    """The worker process running a task died before returning its result (killed, out of memory, crashed)."""


class TaskCancelled(LrbsError, RuntimeError):
    """A queued task was dropped because its pool was closed before a worker took it."""


#: what a worker sends once it is up, before any result (results are pickles: they start with b"\\x80")
_READY = b"ready"
#: workers in a row that die before they are up: the pool stops (every task fails with the reason) instead of
#: starting new ones forever
STARTUP_FAILURES = 3
MAIN_GUARD_HINT = (
    "worker processes import the script that started them again (Python's multiprocessing, forkserver or "
    "spawn), so a script that starts lrbs's workers (lrbs.sweep(..., max_concurrency > 1), a study with "
    'jobs > 1, a WorkerPool) must keep that code under `if __name__ == "__main__":`'
)


def check_can_start_workers() -> None:
    """Refuse to start workers from a process that is itself still starting as a worker (a script without the
    main guard, imported again in the worker): the error that Python raises there comes later and says less.

    Raises:
        LrbsError: this process is a worker still importing the script that started it (:data:`MAIN_GUARD_HINT`).
    """
    if getattr(mp.current_process(), "_inheriting", False):  # what multiprocessing itself checks
        raise LrbsError(f"lrbs workers cannot start from a process that is still starting: {MAIN_GUARD_HINT}")


def available_cpus() -> int:
    """The CPUs this process may run on (``len(os.sched_getaffinity(0))``, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def start_fork_server(preload: Sequence[str] = ()) -> None:
    """Start the fork server now (Linux; nothing elsewhere), importing :data:`PRELOAD` and ``preload`` in it while
    this process goes on with its own imports: the workers of the pools created later fork from it warm.

    Only the first start of the process's fork server sets what it imports.
    """
    check_can_start_workers()
    if sys.platform != "linux":
        return
    from multiprocessing import forkserver

    mp.get_context("forkserver").set_forkserver_preload(list(dict.fromkeys((*PRELOAD, *preload))))
    forkserver.ensure_running()


# --------------------------------------------------------------------------------------------- a job
class Job:
    """The pending result of one task (a small future): :meth:`result` waits for it."""

    def __init__(self, describe: str = ""):
        self.describe = describe
        self._event = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Job], None]] = []
        self._lock = threading.Lock()
        self.pid: int | None = None

    def done(self) -> bool:
        """True once the result (or the error) is in."""
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value; raises the task's exception, :class:`WorkerDied` or :class:`TaskCancelled`."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"task {self.describe!r} not done within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        """The error of a finished task, or None (waits for it)."""
        self._event.wait()
        return self._error

    def add_done_callback(self, fn: Callable[[Job], None]) -> None:
        """Call ``fn(job)`` when the job is done (at once if it already is), in the thread that finishes it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        """Set the result (or the error) and call the callbacks; a second call is ignored (for job makers)."""
        with self._lock:
            if self._event.is_set():
                return
            self._value, self._error = value, error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    @classmethod
    def completed(cls, value: Any, describe: str = "") -> Job:
        """A job that is already done with ``value``."""
        job = cls(describe)
        job.finish(value)
        return job

    @classmethod
    def failed(cls, error: BaseException, describe: str = "") -> Job:
        """A job that is already done with ``error``."""
        job = cls(describe)
        job.finish(error=error)
        return job


# --------------------------------------------------------------------------------------------- the worker
def _watch_driver(alive: Any) -> None:
    """Exit this worker when the driver goes away (its end of the ``alive`` pipe closes)."""
    with contextlib.suppress(EOFError, OSError):
        alive.recv_bytes()
    os._exit(0)


def _run_one(fn: Callable, args: tuple, threads: int | None) -> Any:
    if threads is not None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return fn(*args)


def _worker_main(conn: Any, alive: Any) -> None:
    """A worker's loop: read ``(job_id, threads, pickled (fn, args))``, run it, send back ``(job_id, ok, value)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which closes the pool
    threading.Thread(target=_watch_driver, args=(alive,), daemon=True).start()
    conn.send_bytes(_READY)
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not msg:
            return
        job_id, threads, task = pickle.loads(msg)
        try:
            fn, args = pickle.loads(task)  # an import error here is the task's failure, not the worker's
            payload = (job_id, True, _run_one(fn, args, threads))
            data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the driver
            data = _error_payload(job_id, e)
        conn.send_bytes(data)


def _error_payload(job_id: int, e: BaseException) -> bytes:
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-8))
    try:
        return pickle.dumps((job_id, False, (e, text)), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that cannot be pickled comes back as its text
        return pickle.dumps((job_id, False, (None, text)), protocol=pickle.HIGHEST_PROTOCOL)


class _Worker:
    def __init__(self, context: Any):
        here, there = context.Pipe(duplex=True)
        alive_r, self.alive = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_worker_main, args=(there, alive_r), daemon=True, name="lrbs-worker"
        )
        self.process.start()
        there.close()
        alive_r.close()
        self.conn = here
        self.job: Job | None = None
        self.item: tuple | None = None  # the queue entry of ``job`` (put back if the worker dies starting)
        self.ready = False  # it sent _READY: it started (a death before that is a failed start)

    def close(self) -> None:
        for c in (self.conn, self.alive):
            with contextlib.suppress(OSError):
                c.close()


def _death_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


# --------------------------------------------------------------------------------------------- the pool
class WorkerPool:
    """``workers`` persistent processes that run submitted tasks in submission order (first free worker first).

    Args:
        workers: number of worker processes (>= 1).
        method: ``"forkserver"`` (default on Linux) or ``"spawn"`` (default elsewhere).
        preload: extra modules the fork server imports once (with :data:`PRELOAD`).

    Example::

        with WorkerPool(2) as pool:
            jobs = [pool.submit(math.sqrt, x) for x in (1.0, 4.0)]
            print([j.result() for j in jobs])

    Raises:
        ConfigError: ``workers`` < 1 or an unknown ``method``.
    """

    def __init__(self, workers: int, *, method: str | None = None, preload: Sequence[str] = ()):
        from .errors import check_choice

        check_can_start_workers()
        self.workers = check_int("workers", workers, low=1)
        method = method or ("forkserver" if sys.platform == "linux" else "spawn")
        self.method = check_choice("method", method, ("forkserver", "spawn"))
        self._context = mp.get_context(self.method)
        if self.method == "forkserver":
            self._context.set_forkserver_preload(list(dict.fromkeys((*PRELOAD, *preload))))
        self._queue: list[tuple[float, int, Job, bytes]] = []  # a heap: (priority, submission number, ...)
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._closing = False
        self._next_id = 0
        self._pool: list[_Worker] = []
        self.started = 0  # worker processes started so far (replacements included)
        self._failed_starts = 0  # workers in a row that died before they were up
        self._stopped_by: BaseException | None = None  # why the pool stopped on its own
        self._warm = False  # keep all workers started (after start())
        self._thread: threading.Thread | None = None

    # -- public --------------------------------------------------------------------------------
    def submit(
        self, fn: Callable, *args: Any, threads: int | None = 1, describe: str = "", priority: float = 0
    ) -> Job:
        """Queue ``fn(*args)`` (both picklable) to run in a worker with ``threads`` torch threads.

        Queued tasks start lowest ``priority`` first, then in submission order.

        Raises:
            LrbsError: the pool is closed; pickling errors of ``fn`` or ``args`` surface here.
        """
        job = Job(describe or getattr(fn, "__name__", repr(fn)))
        with self._lock:
            if self._closing:
                raise self._closed_error()
            job_id = self._next_id
            self._next_id += 1
        task = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        data = pickle.dumps((job_id, threads, task), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            heapq.heappush(self._queue, (priority, job_id, job, data))
            self._ensure_thread()
        os.write(self._wake_w, b"x")
        return job

    def start(self) -> WorkerPool:
        """Start every worker now, in the background (otherwise they start with the first tasks)."""
        with self._lock:
            if self._closing:
                raise self._closed_error()
            self._warm = True
            self._ensure_thread()
        os.write(self._wake_w, b"x")
        return self

    def _closed_error(self) -> LrbsError:
        if self._stopped_by is not None:
            return LrbsError(f"this WorkerPool stopped ({self._stopped_by}): create a new one")
        return LrbsError("this WorkerPool is closed: create a new one")

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lrbs-pool", daemon=True)
            self._thread.start()

    def map(self, fn: Callable, items: Iterable[Any], *, threads: int | None = 1) -> list[Any]:
        """``[fn(x) for x in items]`` in the workers; results in the order of ``items``."""
        jobs = [self.submit(fn, x, threads=threads) for x in items]
        return [j.result() for j in jobs]

    @property
    def pids(self) -> list[int]:
        """The process ids of the live workers."""
        return [w.process.pid for w in self._pool if w.process.is_alive()]

    def close(self, cancel: bool = False) -> None:
        """Stop the workers: after the queued tasks (default), or at once (``cancel=True``: queued tasks fail
        with :class:`TaskCancelled`, running ones with :class:`WorkerDied`). Idempotent."""
        with self._lock:
            already = self._closing
            self._closing = True
            self._cancel = cancel or getattr(self, "_cancel", False)
        if not already or cancel:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if not already:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)

    def __repr__(self) -> str:
        return f"WorkerPool(workers={self.workers}, method={self.method!r}, live={len(self.pids)})"

    # -- the dispatcher thread -------------------------------------------------------------------
    def _loop(self) -> None:
        error = None
        try:
            while self._step():
                pass
        except BaseException as e:  # noqa: BLE001 - e.g. a worker cannot start: every waiting task gets it
            error = e
        finally:
            self._shutdown(error)

    def _step(self) -> bool:
        """Hand queued tasks to idle workers, then wait for one result, death or wake-up. False: stop."""
        with self._lock:
            closing, cancel = self._closing, getattr(self, "_cancel", False)
        if cancel:
            return False
        self._dispatch()
        while self._warm and not closing and len(self._pool) < self.workers:
            self._spawn()
        busy = [w for w in self._pool if w.job is not None]
        if closing and not busy and not self._queue:
            return False
        talking = [w for w in self._pool if w.job is not None or not w.ready]  # a result or _READY may come
        ready = mp_wait([self._wake_r] + [w.conn for w in talking] + [w.process.sentinel for w in self._pool])
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        for w in list(self._pool):
            if w in talking and w.conn in ready:
                self._receive(w)
            elif w.process.sentinel in ready or not w.process.is_alive():
                self._bury(w)
        return True

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                idle = [w for w in self._pool if w.job is None and w.process.is_alive()]
                if not idle and len(self._pool) >= self.workers:
                    return
                item = heapq.heappop(self._queue)
                job, data = item[2], item[3]
            w = idle[0] if idle else self._spawn()
            try:
                w.conn.send_bytes(data)
            except OSError:  # it died between the check and the send: the task goes back to the front
                with self._lock:
                    heapq.heappush(self._queue, item)
                self._bury(w)
                continue
            w.job, w.item, job.pid = job, item, w.process.pid

    def _spawn(self) -> _Worker:
        w = _Worker(self._context)
        self._pool.append(w)
        self.started += 1
        return w

    def _receive(self, w: _Worker) -> None:
        job = w.job
        try:
            msg = w.conn.recv_bytes()
            if msg == _READY and not w.ready:
                w.ready, self._failed_starts = True, 0
                return
            job_id, ok, value = pickle.loads(msg)
        except (EOFError, OSError):
            self._bury(w)
            return
        except Exception as e:  # a result that cannot be unpickled here
            w.job = None
            self._done(job, error=LrbsError(f"task {job.describe!r}: cannot read its result: {e}"))
            return
        w.job = None
        if ok:
            self._done(job, value)
        else:
            exc, text = value
            if exc is None:
                exc = LrbsError(f"task {job.describe!r} failed in worker {w.process.pid}:\n{text}")
            else:
                exc.__notes__ = [
                    *getattr(exc, "__notes__", []),
                    f"in worker process {w.process.pid}:\n{text}",
                ]
            self._done(job, error=exc)

    def _bury(self, w: _Worker) -> None:
        """A dead worker: fail its task (only that one) and drop it; the dispatcher starts a fresh one.

        A worker that died before it was up never ran its task: the task goes back to the queue, and after
        :data:`STARTUP_FAILURES` such deaths in a row the pool stops (:class:`LrbsError`, with the usual cause).
        """
        w.process.join(timeout=5)
        code = w.process.exitcode
        if not w.ready:  # up, but its first word was not read yet (killed at once, say)
            with contextlib.suppress(EOFError, OSError):
                w.ready = w.conn.poll() and w.conn.recv_bytes() == _READY
        w.close()
        if w in self._pool:
            self._pool.remove(w)
        if not w.ready:
            self._failed_start(w, code)
        elif w.job is not None:
            job, w.job = w.job, None
            self._done(
                job,
                error=WorkerDied(
                    f"worker process {w.process.pid} died ({_death_text(code)}) while running {job.describe}; "
                    "the other tasks go on"
                ),
            )

    def _failed_start(self, w: _Worker, code: int | None) -> None:
        if w.job is not None:
            with self._lock:
                heapq.heappush(self._queue, w.item)
            w.job.pid = None  # queued again: no worker has it
            w.job = w.item = None
        self._failed_starts += 1
        if self._failed_starts >= STARTUP_FAILURES:
            raise LrbsError(
                f"{self._failed_starts} worker processes in a row exited while starting ({_death_text(code)}), "
                f"before taking any task; the usual cause: {MAIN_GUARD_HINT}"
            )

    def _done(self, job: Job, value: Any = None, error: BaseException | None = None) -> None:
        job.finish(value, error)

    def _shutdown(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._closing = True
            self._stopped_by = error
            queued = [(job, data) for _, _, job, data in sorted(self._queue)]
            self._queue.clear()
        why = (
            "its pool was closed" if error is None else f"the pool stopped ({type(error).__name__}: {error})"
        )
        for job, _ in queued:
            self._done(job, error=TaskCancelled(f"task {job.describe!r} was not run: {why}"))
        for w in self._pool:
            try:
                if w.job is None:
                    w.conn.send_bytes(b"")
            except OSError:
                pass
            w.close()  # closing the alive pipe ends a busy worker too
        for w in self._pool:
            w.process.join(timeout=10)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            if w.job is not None:
                job, w.job = w.job, None
                self._done(job, error=WorkerDied(f"task {job.describe!r} was stopped: {why}"))
        self._pool.clear()


# --------------------------------------------------------------------------------------------- Ray
RAY_HINT = "pip install lrbs[ray]"


def connect_ray(
    address: str | None = None, num_cpus: int | None = None, timeout: float = 30.0
) -> tuple[Any, bool]:
    """Import Ray and connect to a cluster, or start a local one: the one way lrbs starts Ray.

    Uses the running Ray instance when there is one; else ``ray.init(num_cpus=num_cpus)`` (``address=None``) or
    ``ray.init(address=address)`` (``"host:port"``, ``"ray://host:port"`` or ``"auto"``), the address checked
    to be reachable first (``ray.init`` retries an unreachable one for minutes) and the connect given
    ``timeout`` seconds. No dashboard, no worker logs on the driver, Ray's logging left alone.

    Returns:
        ``(ray, started)``: the ``ray`` module and whether this call started Ray (then the caller shuts it down).

    Raises:
        DependencyError: Ray is not installed; ConfigError: a malformed address; LrbsError: the cluster cannot
        be reached within ``timeout``.
    """
    try:
        import ray
    except ImportError:
        raise DependencyError(f"backend='ray' needs Ray, which is not installed: {RAY_HINT}") from None
    if ray.is_initialized():
        return ray, False
    kw = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address is None:
        ray.init(num_cpus=num_cpus, **kw)
        return ray, True
    if address != "auto":  # fail fast: ray.init() retries an unreachable address for minutes
        _check_reachable(address, timeout)
    box: dict[str, Any] = {}

    def connect() -> None:
        try:
            ray.init(address=address, **kw)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LrbsError(f"cannot connect to the Ray cluster at ray_address={address!r} within {timeout:g} s")
    if "error" in box:
        raise LrbsError(f"cannot connect to the Ray cluster at ray_address={address!r}: {box['error']}")
    return ray, True


def _check_reachable(address: str, timeout: float) -> None:
    """Raise unless ``address`` is ``[ray://]host:port`` and a TCP connection to it opens within 5 s."""
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"ray_address={address!r} is not allowed: must be 'host:port', 'ray://host:port' or 'auto'"
        )
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout, 5.0)).close()
    except OSError as e:
        raise LrbsError(f"cannot reach the Ray cluster at ray_address={address!r}: {e}") from None


class RayPool:
    """The same ``submit`` / ``close`` as :class:`WorkerPool`, with every task a Ray task (``num_cpus=1``).

    Connects to the running Ray instance or starts a local one with ``num_cpus=workers`` (and shuts it down on
    :meth:`close`). A task whose worker dies is retried ``max_retries`` times by Ray, then fails.

    Raises:
        DependencyError: Ray is not installed.
    """

    def __init__(self, workers: int, *, max_retries: int = 3):
        self.workers = check_int("workers", workers, low=1)
        self._ray, self._started = connect_ray(None, self.workers)
        ray = self._ray
        self._remote = ray.remote(_run_one).options(num_cpus=1, max_retries=max_retries)
        self._lock = threading.Lock()
        self._pending: dict[Any, Job] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="lrbs-ray", daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable, *args: Any, threads: int | None = 1, describe: str = "", priority: float = 0
    ) -> Job:
        """Run ``fn(*args)`` as a Ray task with ``threads`` torch threads; returns its :class:`Job` (Ray schedules
        the tasks itself: ``priority`` is accepted for the same signature as :meth:`WorkerPool.submit`)."""
        job = Job(describe or getattr(fn, "__name__", repr(fn)))
        ref = self._remote.remote(fn, args, threads)
        with self._lock:
            self._pending[ref] = job
        return job

    def _loop(self) -> None:
        ray = self._ray
        while True:
            with self._lock:
                refs, closing = list(self._pending), self._closing
            if not refs:
                if closing:
                    return
                threading.Event().wait(0.05)
                continue
            done, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            for ref in done:
                with self._lock:
                    job = self._pending.pop(ref)
                try:
                    value = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the task's error, or its worker died too often
                    job.finish(error=getattr(e, "cause", None) or e)
                else:
                    job.finish(value)

    def close(self, cancel: bool = False) -> None:
        """Wait for the submitted tasks (or cancel them), then shut Ray down if this pool started it."""
        if cancel:
            with self._lock:
                refs = list(self._pending)
            for ref in refs:
                self._ray.cancel(ref, force=True)
        with self._lock:
            self._closing = True
        self._thread.join()
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


# --------------------------------------------------------------------------------------------- shared pool
_SHARED: WorkerPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool(workers: int) -> WorkerPool:
    """The process-wide pool, with at least ``workers`` workers (a smaller one is replaced); closed at exit.

    Callers that want fewer tasks in flight than the pool has workers limit their own submissions.
    """
    global _SHARED
    workers = check_int("workers", workers, low=1)
    with _SHARED_LOCK:
        if _SHARED is not None and (_SHARED.workers < workers or _SHARED._closing):
            _SHARED.close()
            _SHARED = None
        if _SHARED is None:
            _SHARED = WorkerPool(workers)
        return _SHARED


def shutdown_shared_pool() -> None:
    """Close the process-wide pool (its workers exit); the next :func:`shared_pool` call starts a new one."""
    global _SHARED
    with _SHARED_LOCK:
        pool, _SHARED = _SHARED, None
    if pool is not None:
        pool.close(cancel=True)


atexit.register(shutdown_shared_pool)
