"""The persistent worker pool: results in submission order, workers reused, a killed worker fails only its own
task, errors come back with their type, bad inputs."""

from __future__ import annotations

import math
import operator
import os
import signal
import time

import pytest

from lrbs.errors import ConfigError, LrbsError
from lrbs.pool import TaskCancelled, WorkerDied, WorkerPool, available_cpus, shared_pool, shutdown_shared_pool


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2).start() as p:
        yield p


def _wait_dispatched(job, timeout=30.0):
    t0 = time.time()
    while job.pid is None and time.time() - t0 < timeout:
        time.sleep(0.01)
    assert job.pid is not None


def test_results_in_submission_order_from_reused_workers(pool):
    jobs = [pool.submit(math.sqrt, float(x)) for x in range(20)]
    assert [j.result() for j in jobs] == [math.sqrt(float(x)) for x in range(20)]  # the same call here
    pids = {pool.submit(os.getpid).result() for _ in range(10)}
    assert os.getpid() not in pids
    assert pids <= set(pool.pids) and len(pool.pids) == 2
    assert pool.map(operator.neg, [3, 1, 2]) == [-3, -1, -2]


def test_a_task_error_comes_back_with_its_type(pool):
    job = pool.submit(int, "x")
    with pytest.raises(ValueError, match="invalid literal") as info:
        job.result()
    assert any("in worker process" in n for n in getattr(info.value, "__notes__", []))
    assert pool.submit(abs, -4).result() == 4  # the worker survived


def test_a_killed_worker_fails_only_its_task(pool):
    slow = pool.submit(time.sleep, 60.0, describe="the slow one")
    other = pool.submit(time.sleep, 0.5)
    _wait_dispatched(slow)
    _wait_dispatched(other)
    os.kill(slow.pid, signal.SIGKILL)
    with pytest.raises(WorkerDied, match=r"died \(killed by SIGKILL\) while running the slow one"):
        slow.result(timeout=30)
    assert other.result(timeout=30) is None
    after = [pool.submit(os.getpid).result(timeout=60) for _ in range(4)]  # a fresh worker took its place
    assert slow.pid not in after
    assert pool.started >= 3


def test_submit_rejects_what_cannot_be_sent(pool):
    with pytest.raises(Exception, match="pickle|local object"):
        pool.submit(lambda: 1)


def test_close_cancels_queued_tasks():
    p = WorkerPool(1)
    running = p.submit(time.sleep, 30.0)
    queued = p.submit(abs, -1)
    _wait_dispatched(running)
    p.close(cancel=True)
    with pytest.raises(WorkerDied):
        running.result(timeout=30)
    with pytest.raises(TaskCancelled, match="was not run: its pool was closed"):
        queued.result(timeout=30)
    with pytest.raises(LrbsError, match="closed"):
        p.submit(abs, -1)


def test_shared_pool_is_reused():
    shutdown_shared_pool()  # start from none (an earlier test may have left a bigger one)
    a = shared_pool(1)
    pid = a.submit(os.getpid).result()
    b = shared_pool(1)
    assert b is a and b.submit(os.getpid).result() == pid  # the same warm worker
    assert shared_pool(2) is not a  # a bigger one replaces it


def test_bad_arguments():
    with pytest.raises(ConfigError, match="workers=0 is not allowed"):
        WorkerPool(0)
    with pytest.raises(ConfigError, match="method='fork' is not allowed"):
        WorkerPool(1, method="fork")
    assert available_cpus() >= 1


def test_queued_tasks_start_lowest_priority_first():
    with WorkerPool(1) as p:
        blocker = p.submit(time.sleep, 1.0)
        jobs = {prio: p.submit(time.monotonic, priority=prio) for prio in (2, 0, 1)}
        blocker.result(timeout=60)
        started = {prio: j.result(timeout=60) for prio, j in jobs.items()}
    assert started[0] < started[1] < started[2]
