"""Tests for blero: `python -m unittest -v` from the repository root.

Crash safety is tested with real child processes killed with SIGKILL, and
multi-process safety with real processes sharing one file.  Nothing waits
with a bare sleep: every wait is for a condition, with a deadline.
"""

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import datetime
import functools
import gc
import hashlib
import http.client
import http.server
import inspect
import json
import logging
import math
import os
import pickle
import queue
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import unittest
import urllib.parse
import weakref
from typing import NamedTuple

import blero

HERE = os.path.dirname(os.path.abspath(__file__))
POSIX = os.name == "posix"


def wait_until(condition, timeout=10.0, interval=0.005, message="condition"):
    """Poll `condition` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def wait_for_threads_to_end(name, message):
    """Wait until no thread named `name` (or `name`-something) runs."""
    wait_until(lambda: not any(t.name == name or t.name.startswith(name + "-")
                               for t in threading.enumerate()), message=message)


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_child(code, *args, timeout=60, **kwargs):
    """Run `code` in a fresh Python that can import blero; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env=child_env(), **kwargs)


def start_child(code, *args, **kwargs):
    """Start `code` in a fresh Python that can import blero; return the Popen."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            cwd=HERE, env=child_env(), **kwargs)


# The children's bytecode, kept for this run in a directory of its own (never
# beside the sources): the suite starts hundreds of children, and each would
# compile blero.py afresh where PYTHONDONTWRITEBYTECODE is set.
_PYCACHE = tempfile.TemporaryDirectory(prefix="blero-test-pycache-")


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = _PYCACHE.name
    return env


def read_lines(path):
    """The whole lines of a log file that children append to."""
    try:
        with open(path) as f:
            return [line.split() for line in f.read().splitlines() if line.endswith(".")]
    except FileNotFoundError:
        return []


# The PostgreSQL twins of the engine-independent tests run where a server
# and psycopg are there: BLERO_TEST_POSTGRES names a scratch database.
POSTGRES = os.environ.get("BLERO_TEST_POSTGRES")
try:
    import psycopg
except ImportError:
    psycopg = None
POSTGRES_MISSING = (None if POSTGRES and psycopg is not None else
                    "PostgreSQL tests: set BLERO_TEST_POSTGRES=postgresql://postgres@127.0.0.1/"
                    'blero_test (a scratch database) and pip install "psycopg[binary]"')


def both_engines(cls):
    """Marks a test class whose tests are the engines' common contract: they
    reach their queues through `target()`/`queue()` only, never a file.
    Defines its twin `<Name>OnPostgres`, the same tests on PostgreSQL (each
    in a fresh schema), skipped where no server is given."""
    twin = type(cls.__name__ + "OnPostgres", (OnPostgres, cls),
                {"__module__": cls.__module__, "__qualname__": cls.__name__ + "OnPostgres"})
    if POSTGRES_MISSING:
        twin = unittest.skip(POSTGRES_MISSING)(twin)
    globals()[twin.__name__] = twin
    return cls


def file_only(test):
    """A test of a decorated class that is about the file: not in its twin."""
    test.file_only = True
    return test


class TempDirTest(unittest.TestCase):
    """A fresh directory per test, and queues that are always stopped."""

    engine = "sqlite"

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="blero-test-")
        self.dir = self._tmp.name
        self.addCleanup(self._tmp.cleanup)

    def target(self, name="q.db"):
        """What `blero.new` is given for the queue called `name` of this test."""
        return os.path.join(self.dir, name)

    def settings(self, name="q.db"):
        """The settings that the queue called `name` needs besides the target."""
        return {}

    def claimed_in_a_callback(self, processor):
        """A queue whose one worker (running `processor`) recorded job a and,
        in the same commit, claimed job b, and is now in a's on_complete until
        `release` is set: b is inprogress, its try not begun.
        Returns (queue, processor id, a, b, release)."""
        in_callback, release = threading.Event(), threading.Event()

        def on_complete(job, result):
            if job.name == "a":
                in_callback.set()
                release.wait(10)

        bl = self.queue(on_complete=on_complete)
        self.addCleanup(release.set)
        a, b = bl.enqueue("a"), bl.enqueue("b")
        pid = bl.register_processor(processor)
        self.assertTrue(in_callback.wait(10))
        self.assertEqual(bl.get_job(b).state, "inprogress")
        return bl, pid, a, b, release

    def rounds(self, n):
        """How many rounds a test that hunts a race of the dispatcher runs:
        `n` on the file; a quarter on a server, where each round costs more
        (a schema's DDL, connections) and the dispatcher is the same."""
        return n if self.engine == "sqlite" else max(1, n // 4)

    def cli_queue(self, name="q.db"):
        """The command line's options naming the queue called `name`."""
        options = ["--db", self.target(name)]
        if "schema" in self.settings(name):
            options += ["--schema", self.settings(name)["schema"]]
        return options

    def stored_rows(self, table, name="q.db"):
        """How many rows blero's table `table` holds in the queue `name`."""
        with contextlib.closing(sqlite3.connect(self.target(name))) as db:
            return db.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]

    def queue(self, name="q.db", start=True, **settings):
        bl = blero.new(self.target(name), **{**self.settings(name), **settings})
        if start:
            bl.start()
        self.addCleanup(bl.stop, 5)
        return bl


# A child's way to open the test's queue (a file, or the test's schema on
# PostgreSQL: OnPostgres exports it).
NEW_QUEUE = """
import os as _os, blero as _blero
def new_queue(target, **settings):
    \"\"\"blero.new, in the schema of the test's queue when on PostgreSQL.\"\"\"
    if target.startswith("postgres") and _os.environ.get("BLERO_TEST_SCHEMA"):
        settings.setdefault("schema", _os.environ["BLERO_TEST_SCHEMA"])
    return _blero.new(target, **settings)
"""


def pg_connect(**kwargs):
    """A connection to the test database (BLERO_TEST_POSTGRES)."""
    return psycopg.connect(POSTGRES, **{"autocommit": True, **kwargs})


def pg_run(sql):
    """Run one statement on the test database."""
    with pg_connect() as conn:
        conn.execute(sql)


class OnPostgres:
    """Mixed into a test class: its queues are schemas of the PostgreSQL test
    database, made fresh for each test and dropped after it.  Children
    started meanwhile find the schema of "q.db" in BLERO_TEST_SCHEMA."""

    engine = "postgres"

    def setUp(self):
        if getattr(getattr(self, self._testMethodName), "file_only", False):
            self.skipTest("about the file: SQLite only")
        super().setUp()
        self.schema = "test_" + os.urandom(5).hex()
        os.environ["BLERO_TEST_SCHEMA"] = self.schema
        self.addCleanup(self._drop_schemas)
        self.addCleanup(os.environ.pop, "BLERO_TEST_SCHEMA", None)

    def target(self, name="q.db"):
        return POSTGRES

    def settings(self, name="q.db"):
        slug = re.sub(r"[^a-z0-9]", "_", name.lower())
        return {"schema": self.schema if name == "q.db" else f"{self.schema}_{slug}"[:63]}

    def stored_rows(self, table, name="q.db"):
        with pg_connect() as conn:
            return conn.execute(f"SELECT count(*) FROM {self.settings(name)['schema']}.{table}"
                                ).fetchall()[0][0]

    def _drop_schemas(self):
        with pg_connect() as conn:
            for (name,) in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
                                        (self.schema + "%",)).fetchall():
                conn.execute(f'DROP SCHEMA "{name}" CASCADE')


class Recorder:
    """A processor that records each try, and can be told to fail or block."""

    def __init__(self, fail_times=0, block=None, result=None):
        self.lock = threading.Lock()
        self.tries = []            # (job id, attempt, monotonic start)
        self.fail_times = fail_times
        self.block = block         # an Event to wait on before returning
        self.result = result

    def __call__(self, job):
        with self.lock:
            self.tries.append((job.id, job.attempt, time.monotonic()))
            fail = job.attempt <= self.fail_times
        if self.block is not None:
            self.block.wait(30)
        if fail:
            raise RuntimeError(f"try {job.attempt} of job {job.id} fails")
        return self.result if self.result is not None else job.data

    def ids(self):
        with self.lock:
            return [t[0] for t in self.tries]


class OpeningTest(TempDirTest):
    """new() touches nothing; start() opens, creates, or refuses with the file unchanged."""

    def test_new_touches_nothing_and_start_creates_dirs(self):
        path = os.path.join(self.dir, "a", "b") + os.sep
        bl = blero.new(path)
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(bl.path, os.path.join(self.dir, "a", "b", "blero.db"))
        bl.start()
        self.addCleanup(bl.stop)
        self.assertTrue(os.path.isfile(bl.path))

    def test_existing_directory_holds_blero_db(self):
        bl = blero.new(self.dir)
        self.assertEqual(bl.path, os.path.join(self.dir, "blero.db"))
        bl = blero.Blero(os.path.join(self.dir, "jobs.sqlite"))
        self.assertEqual(bl.path, os.path.join(self.dir, "jobs.sqlite"))

    def test_unknown_or_bad_setting(self):
        with self.assertRaises(TypeError):
            blero.new(self.dir, retry=3)
        with self.assertRaises(ValueError):
            blero.new(self.dir, sync="sometimes")
        with self.assertRaises(TypeError):
            blero.new(self.dir, serializer=object())

    @unittest.skipUnless(os.path.exists("/dev/null"), "a device file")
    def test_device_file_is_refused_and_nothing_made(self):
        before = set(os.listdir("/dev"))
        with self.assertRaises(blero.BleroError) as cm:
            blero.new("/dev/null").start()
        self.assertIn("not a regular file", str(cm.exception))
        self.assertEqual(set(os.listdir("/dev")) - before, set())

    def test_a_nul_in_the_path_is_a_bleroerror(self):
        bl = blero.new(os.path.join(self.dir, "a\0b.db"))
        with self.assertRaises(blero.BleroError) as cm:
            bl.start()
        self.assertIn("a\\x00b.db", str(cm.exception))
        self.assertEqual(os.listdir(self.dir), [])

    def test_empty_file_and_empty_database_are_new(self):
        for name in ("empty", "emptydb", "emptied", "emptied-wal"):
            path = os.path.join(self.dir, name)
            open(path, "wb").close()
            db = sqlite3.connect(path, isolation_level=None)
            if name == "emptied-wal":
                db.execute("PRAGMA journal_mode = WAL")
            if name.startswith("emptied"):  # no tables left, free pages kept
                db.execute("CREATE TABLE t (x)")
                db.execute("INSERT INTO t VALUES (zeroblob(20000))")
                db.execute("DROP TABLE t")
            if name == "emptydb":
                db.execute("VACUUM")
            db.close()
            if name.startswith("emptied"):
                self.assertGreater(os.path.getsize(path), 4096 * 3)
            bl = blero.new(path).start()
            self.assertEqual(bl.enqueue("x"), 1)
            bl.stop()

    def test_lifecycle_errors_and_restart(self):
        bl = self.queue(start=False)
        with self.assertRaises(blero.BleroError):
            bl.enqueue("x")
        bl.start()
        with self.assertRaises(blero.BleroError):
            bl.start()
        self.assertEqual(bl.enqueue("x"), 1)
        bl.stop()
        bl.stop()       # a second stop does nothing
        with self.assertRaises(blero.BleroError):
            bl.enqueue("x")
        bl.start()
        self.assertEqual(bl.enqueue("x"), 2)
        with blero.new(bl.path + "2") as other:
            self.assertEqual(other.enqueue("y"), 1)
        with self.assertRaises(blero.BleroError):
            other.enqueue("y")


@both_engines
class EnqueueTest(TempDirTest):
    """What enqueue stores, refuses, and returns."""

    def test_ids_start_at_one_and_increase(self):
        bl = self.queue()
        self.assertEqual([bl.enqueue("x") for _ in range(3)], [1, 2, 3])
        self.assertEqual(bl.enqueue_many([("x", 1), ("x", 2)]), [4, 5])
        info = bl.get_job(5)
        self.assertEqual((info.name, info.data, info.state, info.attempt), ("x", 2, "pending", 0))
        self.assertEqual(info.max_attempts, 4)
        self.assertIsNone(bl.get_job(99))

    def test_bad_arguments(self):
        bl = self.queue()
        with self.assertRaises(TypeError):
            bl.enqueue(42)
        with self.assertRaises(ValueError):
            bl.enqueue("")
        with self.assertRaises(ValueError):
            bl.enqueue("x", delay=1, run_at=time.time())
        with self.assertRaises(TypeError):
            bl.enqueue("x", priority="high")
        with self.assertRaises(ValueError):
            bl.enqueue("x", retries=-1)
        self.assertEqual(bl.stats()["pending"], 0)

    def test_unpicklable_data_raises_type_error_and_stores_nothing(self):
        bl = self.queue()
        bl.enqueue("x", 1)
        for bad in (threading.Lock(), lambda: 1, (i for i in range(3))):
            with self.assertRaises(TypeError):
                bl.enqueue("x", bad)
        self.assertEqual(sum(bl.stats().values()), 1)
        self.assertEqual(bl.enqueue("x", 2), 2)

    def test_enqueue_many_is_all_or_nothing(self):
        bl = self.queue()
        with self.assertRaises(TypeError):
            bl.enqueue_many([("a", 1), ("b", threading.Lock()), ("c", 3)])
        with self.assertRaises(ValueError):
            bl.enqueue_many([("a", 1), {"name": "b", "delay": 1, "run_at": 5}])
        self.assertEqual(sum(bl.stats().values()), 0)
        ids = bl.enqueue_many([("a", 1), {"name": "b", "data": 2, "priority": 3, "key": "k"},
                               {"name": "c", "key": "k"}])
        self.assertEqual(ids, [1, 2, 2])
        self.assertEqual(bl.get_job(2).priority, 3)

    def test_idempotency_key(self):
        bl = self.queue()
        first = bl.enqueue("post", {"url": "u1"}, key="u1")
        self.assertEqual(bl.enqueue("post", {"url": "other"}, key="u1"), first)
        self.assertEqual(bl.get_job(first).data, {"url": "u1"})
        self.assertEqual(bl.stats()["pending"], 1)
        second = bl.enqueue("post", key="u2")
        self.assertGreater(second, first)
        # Once the keyed job is swept, the key is free again.
        bl.register_processor(lambda job: None)
        self.assertTrue(bl.join(10))
        self.assertEqual(bl.sweep(), 2)
        self.assertGreater(bl.enqueue("post", key="u1"), second)

    def test_ids_are_never_reused_after_a_sweep(self):
        bl = self.queue()
        bl.register_processor(lambda job: None)
        ids = [bl.enqueue("x") for _ in range(5)]
        self.assertTrue(bl.join(10))
        self.assertEqual(bl.sweep(), 5)
        self.assertEqual(bl.stats(), dict.fromkeys(blero.STATES, 0))
        self.assertIsNone(bl.get_job(ids[-1]))
        self.assertEqual(bl.jobs(), [])
        bl.stop()
        bl.start()
        self.assertEqual(bl.enqueue("x"), 6)
        self.assertTrue(bl.join(10))
        self.assertEqual(bl.sweep(), 1)
        self.assertEqual(bl.enqueue("x"), 7)

    @file_only
    def test_concurrent_enqueues_share_commits(self):
        bl = self.queue()
        storage = bl._storage
        transactions = []
        real = storage._transaction

        def counting(ops, *args, **kwargs):
            real(ops, *args, **kwargs)
            transactions.append(len(ops))   # after: absorbed writes are in ops

        storage._transaction = counting
        results, barrier = [], threading.Barrier(8)

        def produce():
            barrier.wait()
            results.extend(bl.enqueue("x", i) for i in range(200))

        threads = [threading.Thread(target=produce) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), list(range(1, 1601)))
        self.assertEqual(sum(transactions), 1600)
        self.assertLess(len(transactions), 1600, "no enqueues shared a commit")
        # Every enqueue that returned is on disk, seen by a new connection.
        db = sqlite3.connect(bl.path)
        self.assertEqual(db.execute("SELECT count(*) FROM blero_jobs").fetchone()[0], 1600)
        db.close()

    @file_only
    def test_next_job_is_one_index_seek(self):
        bl = self.queue()
        bl.enqueue_many([("a", i) for i in range(50)] + [("b", i) for i in range(50)])
        storage = bl._storage
        for n in (0, 1, 2):
            names = tuple(["a", "b"][:n]) + ((blero._TASK_RUNNER,) if n else ())
            select, claim = storage._claim_statements(n)
            for sql, params in ((select, names), (claim, (1, 2.0) + names + (1,))):
                plan = " ".join(str(r) for r in storage._db.execute(
                    "EXPLAIN QUERY PLAN " + sql, params))
                self.assertIn("blero_jobs_ready", plan)
                self.assertNotIn("TEMP B-TREE", plan, "the claim sorts instead of seeking")


@both_engines
class ProcessingTest(TempDirTest):
    """Jobs run in order, on time, with retries, timeouts and routing."""

    def test_priority_then_id(self):
        bl = self.queue()
        order = []
        for i, priority in enumerate([0, 5, 0, 9, 5, -1, 0]):
            bl.enqueue("x", i, priority=priority)
        bl.register_processor(lambda job: order.append((job.priority, job.id)))
        self.assertTrue(bl.join(10))
        self.assertEqual(order, sorted(order, key=lambda t: (-t[0], t[1])))
        self.assertEqual(len(order), 7)

    def test_delay_and_run_at_are_not_run_early(self):
        bl = self.queue()
        started = {}
        bl.register_processor(lambda job: started.setdefault(job.id, time.time()))
        t0 = time.time()
        a = bl.enqueue("x", delay=0.3)
        b = bl.enqueue("x", run_at=t0 + 0.2)
        c = bl.enqueue("x", run_at=datetime.datetime.fromtimestamp(t0 + 0.25))  # naive: local
        d = bl.enqueue("x")
        self.assertEqual(bl.get_job(a).state, "pending")
        self.assertTrue(bl.join(10))
        self.assertGreaterEqual(started[a], t0 + 0.3)
        self.assertGreaterEqual(started[b], t0 + 0.2)
        self.assertGreaterEqual(started[c], t0 + 0.25)
        self.assertLess(started[d], started[b])
        self.assertAlmostEqual(bl.get_job(a).run_at, t0 + 0.3, delta=0.05)

    def test_retries_count_attempts_then_fail_with_the_error(self):
        failed = []
        bl = self.queue(backoff_base=0.05, backoff_max=0.1,
                        on_failed=lambda job, exc: failed.append((job.id, exc)))
        rec = Recorder(fail_times=10)
        bl.register_processor(rec)
        job_id = bl.enqueue("flaky", 7, retries=2)
        with self.assertRaises(blero.JobFailed) as cm:
            bl.wait(job_id, timeout=10)
        self.assertIn("try 3 of job", cm.exception.error)
        info = bl.get_job(job_id)
        self.assertEqual((info.state, info.attempt, info.max_attempts), ("failed", 3, 3))
        self.assertIn("RuntimeError: try 3", info.error)
        self.assertIn("Traceback", info.error)
        self.assertEqual([a for _, a, _ in rec.tries], [1, 2, 3])
        # backoff: about base*2**(n-1), times a factor in [0.5, 1], capped at backoff_max
        gaps = [b[2] - a[2] for a, b in zip(rec.tries, rec.tries[1:])]
        self.assertGreaterEqual(gaps[0], 0.025 - 0.005)
        self.assertGreaterEqual(gaps[1], 0.05 - 0.005)
        wait_until(lambda: failed, message="on_failed")
        self.assertEqual(len(failed), 1)
        self.assertIsInstance(failed[0][1], RuntimeError)

    def test_retry_succeeds_and_result_is_kept(self):
        bl = self.queue(backoff_base=0)
        bl.register_processor(Recorder(fail_times=1, result="ok"))
        job_id = bl.enqueue("x", retries=1)
        self.assertEqual(bl.wait(job_id, timeout=10), "ok")
        info = bl.get_job(job_id)
        self.assertEqual((info.state, info.attempt, info.result, info.error),
                         ("complete", 2, "ok", None))
        self.assertIsNotNone(info.started_at)
        self.assertGreaterEqual(info.finished_at, info.started_at)

    def test_timeout_fails_the_try_and_keeps_capacity(self):
        release = threading.Event()
        self.addCleanup(release.set)
        seen_cancel = []

        def slow(job):
            if job.name == "slow" and job.attempt == 1:
                seen_cancel.append(job.cancelled.wait(10))
                release.wait(10)        # ignores cancellation: still running later
                return "late"
            return job.name

        bl = self.queue(backoff_base=0)
        bl.register_processor(slow)
        slow_id = bl.enqueue("slow", timeout=0.2, retries=1)
        self.assertEqual(bl.wait(slow_id, timeout=10), "slow")  # the retry, while try 1 hangs
        # The timed-out try's thread may not have run since its cancel was set.
        wait_until(lambda: seen_cancel, message="the timed-out try to see job.cancelled")
        self.assertEqual(seen_cancel, [True])
        info = bl.get_job(slow_id)
        self.assertEqual(info.attempt, 2)
        self.assertIsNone(info.error)
        # One processor, one worker blocked: a replacement keeps capacity.
        self.assertEqual(bl.wait(bl.enqueue("fast"), timeout=10), "fast")
        release.set()
        wait_until(lambda: sum(t.name == "blero-processor-1" and t.is_alive()
                               for t in threading.enumerate()) == 1,
                   message="the timed-out worker ends, its replacement stays")
        self.assertEqual(bl.get_job(slow_id).result, "slow", "a late result overwrote")

    def test_timeout_out_of_tries_fails(self):
        bl = self.queue()
        block = threading.Event()
        self.addCleanup(block.set)
        bl.register_processor(lambda job: block.wait(10))
        job_id = bl.enqueue("x", timeout=0.1, retries=0)
        with self.assertRaises(blero.JobFailed) as cm:
            bl.wait(job_id, timeout=10)
        self.assertIn("timed out", str(cm.exception))

    def test_names_route_jobs_and_unaccepted_jobs_never_block(self):
        bl = self.queue()
        emails, images = [], []
        bl.register_processor(lambda job: emails.append(job.id), names="email")
        bl.register_processor(lambda job: images.append(job.id), names=["image", "thumb"])
        orphan = bl.enqueue("video", priority=100)   # nobody takes it: it waits
        e = [bl.enqueue("email") for _ in range(3)]
        i = [bl.enqueue("image"), bl.enqueue("thumb")]
        for job_id in e + i:
            bl.wait(job_id, timeout=10)
        self.assertEqual(emails, e)
        self.assertEqual(images, i)
        self.assertEqual(bl.get_job(orphan).state, "pending")
        self.assertFalse(bl.join(0.1))
        anyone = []
        bl.register_processor(lambda job: anyone.append(job.name))
        bl.wait(orphan, timeout=10)
        self.assertEqual(anyone, ["video"])

    def test_processor_object_with_run_and_unregister_while_running(self):
        class Counter:
            def __init__(self):
                self.jobs = []

            def run(self, job):
                self.jobs.append(job.id)

        bl = self.queue()
        counter = Counter()
        pid = bl.register_processor(counter)
        bl.wait(bl.enqueue("x"), timeout=10)
        self.assertEqual(counter.jobs, [1])
        block, started = threading.Event(), threading.Event()
        self.addCleanup(block.set)

        def blocking(job):
            started.set()
            block.wait(10)
            return "finished"

        bl.unregister_processor(pid)
        with self.assertRaises(KeyError):
            bl.unregister_processor(pid)
        second = bl.register_processor(blocking)
        job_id = bl.enqueue("x")
        self.assertTrue(started.wait(10))
        bl.unregister_processor(second)        # returns at once ...
        self.assertEqual(bl.get_job(job_id).state, "inprogress", "it waited for the job")
        after = bl.enqueue("x")
        block.set()
        self.assertEqual(bl.wait(job_id, timeout=10), "finished")   # ... the job finishes
        self.assertEqual(bl.get_job(after).state, "pending")        # ... and nothing more runs
        self.assertEqual(counter.jobs, [1])

    def test_no_try_starts_after_unregister_returns(self):
        # Unregistered between a's record and b's try, the worker has no
        # current job: b goes back to pending, untried, for the others.
        ran = []
        bl, pid, a, b, release = self.claimed_in_a_callback(lambda job: ran.append(job.id))
        bl.unregister_processor(pid)
        release.set()
        wait_for_threads_to_end(f"blero-processor-{pid}", "the unregistered worker to end")
        self.assertEqual(ran, [a])
        info = bl.get_job(b)
        self.assertEqual((info.state, info.attempt, info.started_at), ("pending", 0, None))
        bl.register_processor(lambda job: "later")
        self.assertEqual(bl.wait(b, timeout=10), "later")

    def test_any_exception_is_a_failed_try_and_workers_go_on(self):
        class Odd(BaseException):
            pass

        def bad(job):
            if job.data == "base":
                raise Odd("not an Exception")
            if job.data == "exit-like":
                raise GeneratorExit()
            return "ok"

        bl = self.queue(retries=0, on_complete=lambda job, r: 1 / 0)
        bl.register_processor(bad)
        a, b, c = (bl.enqueue("x", d) for d in ("base", "exit-like", "fine"))
        with self.assertRaises(blero.JobFailed):
            bl.wait(a, timeout=10)
        with self.assertRaises(blero.JobFailed):
            bl.wait(b, timeout=10)
        with self.assertLogs("blero", "ERROR"):    # the raising callback is logged ...
            self.assertEqual(bl.wait(bl.enqueue("x", "again"), timeout=10), "ok")
        self.assertEqual(bl.wait(c, timeout=10), "ok")   # ... and ignored
        self.assertIn("Odd: not an Exception", bl.get_job(a).error)

    def test_data_that_no_longer_unpickles_fails_that_job_only(self):
        bl = self.queue()
        gone = GoneLater(3)
        bad = bl.enqueue("x", gone)
        good = bl.enqueue("x", 5)
        bl.stop()
        globals()["_rebuild_gone"] = _refuse_rebuild   # unpickling now raises
        self.addCleanup(globals().__setitem__, "_rebuild_gone", _rebuild_gone)
        bl.start()
        bl.register_processor(lambda job: job.data)
        self.assertEqual(bl.wait(good, timeout=10), 5)
        with self.assertRaises(blero.JobFailed) as cm:
            bl.wait(bad, timeout=10)
        self.assertIn("deserialize", str(cm.exception))
        info = bl.get_job(bad)
        self.assertEqual((info.state, info.data, info.attempt), ("failed", None, 1))

    def test_json_serializer(self):
        bl = self.queue(serializer=json)
        bl.register_processor(lambda job: {"sum": sum(job.data["n"])})
        job_id = bl.enqueue("x", {"n": [1, 2, 3]})
        self.assertEqual(bl.wait(job_id, timeout=10), {"sum": 6})
        with self.assertRaises(TypeError):
            bl.enqueue("x", {1, 2})
        self.assertEqual(bl.get_job(job_id).data, {"n": [1, 2, 3]})

    @file_only
    def test_returning_fallback_for_older_sqlite(self):
        bl = self.queue()
        bl._storage._returning = False
        order = []
        bl.register_processor(lambda job: order.append(job.id) or job.attempt)
        ids = [bl.enqueue("x", priority=p) for p in (0, 1, 0)]
        self.assertTrue(bl.join(10))
        self.assertEqual(order, [ids[1], ids[0], ids[2]])
        self.assertEqual(bl.get_job(ids[0]).result, 1)


class GoneLater:
    """Pickles fine today; unpickling fails once `_rebuild_gone` is replaced."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        return (_rebuild_gone, (self.n,))


def _rebuild_gone(n):
    return GoneLater(n)


def _refuse_rebuild(n):
    raise ImportError("the class GoneLater was removed")


@both_engines
class OperatingTest(TempDirTest):
    """cancel, retry_failed, sweep, wait, join, stats, jobs, and stop's hand-back."""

    def test_cancel_reaches_a_job_claimed_while_a_callback_runs(self):
        # Cancelled between a's record and b's try, b's try must see it.
        seen = []
        bl, _, a, b, release = self.claimed_in_a_callback(
            lambda job: seen.append(job.cancelled.wait(10)) if job.name == "b" else None)
        self.assertTrue(bl.cancel(b))
        release.set()
        wait_until(lambda: seen, message="b's try")
        self.assertEqual(seen, [True], "b's try never saw job.cancelled")
        self.assertEqual(bl.get_job(b).state, "cancelled")

    def test_cancel_pending_running_and_ended(self):
        bl = self.queue()
        started, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        saw_cancel = []

        def proc(job):
            if job.name == "long":
                started.set()
                saw_cancel.append(job.cancelled.wait(10))
                release.wait(10)
            return "done"

        bl.register_processor(proc)
        running = bl.enqueue("long")
        self.assertTrue(started.wait(10))
        pending = bl.enqueue("short")
        self.assertTrue(bl.cancel(pending))
        self.assertTrue(bl.cancel(running))
        wait_until(lambda: saw_cancel, message="job.cancelled set")
        self.assertEqual(saw_cancel, [True])
        release.set()
        self.assertFalse(bl.cancel(running))       # already ended
        self.assertFalse(bl.cancel(12345))         # never existed
        for job_id in (pending, running):
            with self.assertRaises(blero.JobCancelled):
                bl.wait(job_id, timeout=5)
        self.assertTrue(bl.join(10))
        info = bl.get_job(running)
        self.assertEqual((info.state, info.result), ("cancelled", None))
        self.assertEqual(bl.stats()["cancelled"], 2)

    def test_retry_failed_gives_fresh_tries(self):
        bl = self.queue(retries=1, backoff_base=0)
        rec = Recorder(fail_times=2)
        bl.register_processor(rec)
        a, b = bl.enqueue("x"), bl.enqueue("x")
        for job_id in (a, b):
            with self.assertRaises(blero.JobFailed):
                bl.wait(job_id, timeout=10)
        self.assertEqual(bl.retry_failed([a]), 1)
        self.assertEqual(bl.wait(a, timeout=10), None)
        info = bl.get_job(a)
        self.assertEqual((info.state, info.attempt, info.max_attempts), ("complete", 3, 4))
        self.assertEqual(bl.get_job(b).state, "failed")
        self.assertEqual(bl.retry_failed(), 1)
        bl.wait(b, timeout=10)
        self.assertEqual(bl.retry_failed(), 0)

    def test_wait_errors(self):
        bl = self.queue()
        with self.assertRaises(KeyError):
            bl.wait(99, timeout=1)
        job_id = bl.enqueue("nobody-runs-this")
        t0 = time.monotonic()
        with self.assertRaises(TimeoutError):
            bl.wait(job_id, timeout=0.2)
        self.assertGreaterEqual(time.monotonic() - t0, 0.2)
        self.assertFalse(bl.join(timeout=0.1))

    def test_stats_and_jobs(self):
        bl = self.queue(retries=0)
        bl.register_processor(lambda job: 1 / job.data, names="div")
        ok, bad = bl.enqueue("div", 1), bl.enqueue("div", 0)
        waiting = bl.enqueue("other", delay=60)
        bl.wait(ok, timeout=10)
        with self.assertRaises(blero.JobFailed):
            bl.wait(bad, timeout=10)
        self.assertEqual(bl.stats(), {"pending": 1, "inprogress": 0, "complete": 1,
                                      "failed": 1, "cancelled": 0})
        self.assertEqual([j.id for j in bl.jobs()], [ok, bad, waiting])
        self.assertEqual([j.id for j in bl.jobs("failed")], [bad])
        self.assertEqual([j.id for j in bl.jobs(name="div", limit=1)], [ok])
        self.assertEqual([j.id for j in bl.jobs(state="pending", name="other")], [waiting])
        self.assertEqual(len(bl.jobs(limit=None)), 3)
        with self.assertRaises(ValueError):
            bl.jobs("done")
        self.assertIn("ZeroDivisionError", bl.jobs("failed")[0].error)

    def test_join_returns_after_the_last_callback(self):
        for _ in range(self.rounds(20)):
            results = []

            def slow_callback(job, result):
                time.sleep(0.001)    # a callback's own work, not synchronisation
                results.append(result)

            bl = self.queue(name=f"q{len(os.listdir(self.dir))}.db", on_complete=slow_callback)
            bl.register_processor(lambda job: job.data)
            bl.register_processor(lambda job: job.data)
            bl.enqueue_many([("x", i) for i in range(20)])
            self.assertTrue(bl.join(10))
            self.assertEqual(sorted(results), list(range(20)))
            bl.stop()

    def test_join_waits_for_what_on_complete_enqueues(self):
        # Regression: join() looked at the workers, then the file; a job could
        # be claimed, run and recorded between the two looks, its on_complete
        # still about to enqueue a follow-up.
        follow_ups = {}

        def on_complete(job, result):
            if job.name == "first":
                time.sleep(0.01)    # the callback's own work, not synchronisation
                follow_ups[job.id] = bl.enqueue("second")

        bl = self.queue(on_complete=on_complete)
        bl.register_processor(lambda job: None)
        stop_reading = threading.Event()
        self.addCleanup(stop_reading.set)

        def reader():       # a dashboard, say: slows the looks at the file
            while not stop_reading.is_set():
                bl.jobs(limit=2000)

        bl.enqueue_many([("old", None)] * 2000)
        self.assertTrue(bl.join(timeout=30))
        threading.Thread(target=reader, daemon=True).start()
        for _ in range(self.rounds(60)):
            first = bl.enqueue("first")
            self.assertTrue(bl.join(timeout=10))
            self.assertIn(first, follow_ups, "join() returned before on_complete enqueued")
            self.assertEqual(bl.get_job(follow_ups[first]).state, "complete")

    def test_wait_and_join_in_another_thread_survive_stop(self):
        bl = self.queue()
        job_id = bl.enqueue("later", delay=60)
        outcomes, waiting = [], threading.Barrier(3)

        def waiter(call):
            waiting.wait()
            try:
                outcomes.append(call())
            except BaseException as exc:
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=waiter, args=(lambda: bl.wait(job_id, timeout=0.5),)),
                   threading.Thread(target=waiter, args=(lambda: bl.join(timeout=0.5),))]
        for t in threads:
            t.start()
        waiting.wait()
        bl.stop()
        for t in threads:
            t.join(10)
        self.assertEqual(sorted(map(str, outcomes)), ["False", "TimeoutError"])

    def test_inspecting_a_stopped_queue(self):
        bl = self.queue()
        job_id = bl.enqueue("x", 1)
        bl.stop()
        self.assertEqual(bl.stats()["pending"], 1)
        self.assertEqual(bl.get_job(job_id).data, 1)
        self.assertTrue(bl.cancel(job_id))
        with self.assertRaises(blero.BleroError):
            blero.new(os.path.join(self.dir, "missing.db")).stats()
        self.assertFalse(os.path.exists(os.path.join(self.dir, "missing.db")))

    def test_sweep(self):
        bl = self.queue(retries=0)
        bl.register_processor(lambda job: 1 / job.data)
        ids = [bl.enqueue("x", d) for d in (1, 0, 1)]
        self.assertTrue(bl.join(10))
        self.assertEqual(bl.sweep(older_than=3600), 0)
        self.assertEqual(bl.sweep(), 2)
        self.assertEqual(bl.stats()["failed"], 1)
        self.assertEqual(bl.sweep(states=["failed", "cancelled"]), 1)
        self.assertEqual([bl.get_job(i) for i in ids], [None] * 3)
        with self.assertRaises(ValueError):
            bl.sweep(states=["pending"])

    def test_keep_complete_sweeps_by_itself(self):
        bl = self.queue(keep_complete=0)
        bl.register_processor(lambda job: None)
        for _ in range(3):
            bl.enqueue("x")
        wait_until(lambda: bl.stats()["complete"] == 0 and bl.stats()["pending"] == 0,
                   timeout=10, message="keep_complete sweep")
        self.assertEqual(bl.enqueue("x"), 4)

    def test_stop_timeout_hands_back_running_jobs(self):
        interrupted = []
        bl = self.queue(on_failed=lambda job, exc: interrupted.append((job.id, str(exc))))
        started, returned = threading.Event(), threading.Event()

        def stubborn(job):
            started.set()
            job.cancelled.wait(10)
            returned.set()
            return "late"

        bl.register_processor(stubborn)
        job_id = bl.enqueue("x", retries=1)
        last = bl.enqueue("y", retries=0)
        self.assertTrue(started.wait(10))
        t0 = time.monotonic()
        bl.stop(timeout=0.1)
        self.assertLess(time.monotonic() - t0, 5)
        self.assertTrue(returned.wait(10), "job.cancelled was not set")
        info = bl.get_job(job_id)
        self.assertEqual((info.state, info.attempt, info.max_attempts, info.result),
                         ("pending", 1, 3, None))
        # Started again, it runs the handed-back job first; a try cut short by
        # a stop is given back each time, so the job never ends failed for it.
        started.clear()
        bl.start()
        self.assertTrue(started.wait(10))
        self.assertEqual(bl.get_job(job_id).attempt, 2)
        bl.stop(timeout=0)
        info = bl.get_job(job_id)
        self.assertEqual((info.state, info.attempt, info.max_attempts), ("pending", 2, 4))
        self.assertEqual(interrupted, [])
        self.assertEqual(bl.get_job(last).state, "pending")

    @unittest.skipUnless(POSIX, "SIGINT")
    @file_only      # (its child's queues are files: on the twin it ran the same again)
    def test_ctrl_c_during_an_enqueue_never_hangs_the_queue(self):
        # A real SIGINT lands wherever it lands: often while the enqueue waits
        # for its turn to commit.  The queue must still write and stop.
        child = run_child("""
            import os, random, signal, sys, threading, blero
            random.seed(int(sys.argv[2]))
            # Started in the background by a shell, a process ignores SIGINT.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for n in range(40):
                bl = blero.new(os.path.join(sys.argv[1], f"q{n}.db"), retries=0).start()
                for _ in range(3):
                    bl.register_processor(lambda job: None)
                threading.Timer(random.uniform(0.005, 0.05), os.kill,
                                (os.getpid(), signal.SIGINT)).start()
                try:
                    while True:
                        bl.enqueue("x")
                except KeyboardInterrupt:
                    pass
                t = threading.Thread(target=lambda: (bl.enqueue("after"), bl.stop(timeout=0)),
                                     daemon=True)
                t.start()
                t.join(10)
                if t.is_alive():
                    print("hung in trial", n, flush=True)
                    os._exit(1)
            print("ok")
        """, self.dir, random.randrange(1 << 30), timeout=90)
        self.assertEqual((child.returncode, child.stdout.strip(), child.stderr), (0, "ok", ""))

    def test_stop_counts_a_retry_claimed_with_its_failure_only_if_it_began(self):
        # A worker records a failed try (ready again at once) and claims the
        # same job again in one commit: that claim is a new try, not yet begun.
        for n in range(self.rounds(10)):
            starts = []

            def fail(job):
                starts.append(job.attempt)
                raise ValueError("again")

            bl = self.queue(f"q{n}.db", start=False, retries=100000, backoff_base=0)
            bl.register_processor(fail)
            bl.start()
            job_id = bl.enqueue("x")
            wait_until(lambda: len(starts) >= 20, message="twenty tries")
            bl.stop(timeout=0)
            wait_for_threads_to_end("blero-processor", "the stopped worker to end")
            info = bl.get_job(job_id)
            self.assertEqual((info.state, info.attempt), ("pending", len(starts)))

    def test_stop_while_processors_come_and_go(self):
        # Regression: stop() joined a worker whose thread was not started yet,
        # raised, and left jobs inprogress and the clock running.
        for n in range(self.rounds(30)):
            bl = self.queue(f"q{n}.db")
            bl.register_processor(lambda job: None)
            bl.enqueue_many([("x", None)] * 50)
            churning, done = threading.Event(), threading.Event()

            def churn():
                while not done.is_set():
                    with contextlib.suppress(blero.BleroError):
                        bl.unregister_processor(bl.register_processor(lambda job: None))
                    churning.set()

            t = threading.Thread(target=churn)
            t.start()
            churning.wait(10)
            try:
                bl.stop(timeout=0)
            finally:
                done.set()
                t.join()
            self.assertEqual(bl.stats()["inprogress"], 0)
        wait_for_threads_to_end("blero-clock", "every clock thread to end")
        wait_for_threads_to_end("blero-timeouts", "every timeouts thread to end")

    def test_stop_counts_only_tries_that_began(self):
        # stop(0) while workers race through jobs: some have claimed a job
        # and not yet called the processor.  Those are not tries.
        for n in range(self.rounds(8)):
            called = set()
            bl = self.queue(f"q{n}.db", start=False, retries=0)
            for _ in range(4):
                bl.register_processor(lambda job: called.add(job.id))
            bl.start()
            bl.enqueue_many([("x", i) for i in range(3000)])
            wait_until(lambda: len(called) >= 300, message="300 jobs run")
            bl.stop(timeout=0)
            # A worker stopped inside a try ends it in its own time.
            wait_for_threads_to_end("blero-processor", "the stopped workers to end")
            infos = bl.jobs(limit=None)
            self.assertEqual(sorted({j.id for j in infos if j.attempt} - called), [],
                             f"round {n}: counted as tried, never run")
            self.assertEqual([j.id for j in infos if j.attempt == 0 and j.started_at], [])
            self.assertEqual([j.id for j in infos if j.state == "failed"
                              and j.id not in called], [])

    def test_stop_waits_for_running_jobs(self):
        bl = self.queue()
        started = threading.Event()

        def slowish(job):
            started.set()
            time.sleep(0.2)     # the job's own work, not test synchronisation
            return "whole"

        bl.register_processor(slowish)
        job_id = bl.enqueue("x")
        self.assertTrue(started.wait(10))
        bl.stop()
        self.assertEqual(bl.get_job(job_id).result, "whole")


CRASH_CHILD = NEW_QUEUE + """
import os, sys, time, blero
path, log, n, procs, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
def note(*words):
    os.write(fd, (" ".join(map(str, words)) + " .\\n").encode())
def process(job):
    note("start", job.id, job.attempt)
    time.sleep(sleep)
    note("end", job.id, job.attempt)
    return job.data
bl = new_queue(path).start()
for _ in range(procs):
    bl.register_processor(process)
for i in range(n):
    job_id = bl.enqueue("url", i, key=f"url-{i}")
    note("enqueued", job_id)
bl.join()
note("alldone")
bl.stop()
"""


@unittest.skipUnless(POSIX, "SIGKILL")
@both_engines
class CrashTest(TempDirTest):
    """kill -9 at any moment, run again: nothing lost, finished jobs never rerun."""

    def run_until_killed(self, path, log, n, procs, sleep, kill_when):
        child = start_child(CRASH_CHILD, path, log, n, procs, sleep)
        self.addCleanup(child.kill)
        try:
            wait_until(lambda: kill_when(read_lines(log)) or child.poll() is not None,
                       timeout=30, message="the kill point")
        finally:
            child.kill()
            child.wait()
        return read_lines(log)

    def test_kill_9_mid_run_then_carry_on(self):
        path, log = self.target(), os.path.join(self.dir, "log")
        lines = self.run_until_killed(
            path, log, 200, 5, 0.002,
            lambda ls: sum(1 for l in ls if l[0] == "end") >= 30)
        enqueued = [int(l[1]) for l in lines if l[0] == "enqueued"]
        ended = {int(l[1]) for l in lines if l[0] == "end"}
        started = {int(l[1]) for l in lines if l[0] == "start"}
        self.assertGreaterEqual(len(ended), 30)
        bl = self.queue(start=False)
        # Every enqueue that returned survived the kill.
        self.assertEqual({j.id for j in bl.jobs(limit=None)} >= set(enqueued), True)
        complete = {j.id for j in bl.jobs("complete", limit=None)}
        self.assertLessEqual(complete, ended, "a job is complete that never ended")
        interrupted = started - ended
        self.assertLessEqual(len(interrupted), 5, "more than one job per processor was running")
        # Run again: it carries on; complete jobs never run again; the
        # interrupted ones run again as attempt 2; keys store nothing new.
        os.remove(log)
        child = run_child(CRASH_CHILD, path, log, 200, 5, 0.0, timeout=60)
        self.assertEqual(child.returncode, 0, child.stderr)
        again = read_lines(log)
        rerun = {int(l[1]) for l in again if l[0] == "start"}
        self.assertFalse(rerun & complete, "a complete job ran again")
        for l in again:
            if l[0] == "start" and int(l[1]) in interrupted:
                self.assertEqual(int(l[2]), 2)
        self.assertEqual(bl.stats(), {"pending": 0, "inprogress": 0, "complete": 200,
                                      "failed": 0, "cancelled": 0})
        ids = [int(l[1]) for l in again if l[0] == "enqueued"]
        self.assertEqual(ids[:len(enqueued)], enqueued, "keys answer with the stored ids")
        self.assertEqual(ids, sorted(set(ids)), "ids increase, never reused")
        if self.engine == "sqlite":     # (a server's sequence skips the id of an insert cut short)
            self.assertEqual(ids, list(range(1, 201)))

LEASE_CHILD = """
import os, sys, time, blero
blero.fcntl = None    # as on Windows: no advisory locks; heartbeats and the lease only
path, log, lease, role = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
def note(*words):
    os.write(fd, (" ".join(map(str, words)) + " .\\n").encode())
def process(job):
    note("start", job.id, role, time.monotonic())
    job.cancelled.wait(job.data)
    note("end", job.id, role)
bl = blero.new(path, lease=lease).start()
bl.register_processor(process)
note("ready", role)
sys.stdin.read()      # until the test is done with it
"""


@unittest.skipUnless(POSIX, "SIGKILL")
class LeaseFallbackTest(TempDirTest):
    """Where the OS cannot tell a dead owner (no fcntl), heartbeats and the lease do."""

    def child(self, role, lease):
        proc = start_child(LEASE_CHILD, self.path, self.log, lease, role, stdin=subprocess.PIPE)
        self.addCleanup(proc.stdin.close)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        wait_until(lambda: ["ready", role, "."] in read_lines(self.log), message=f"{role} ready")
        return proc

    def started(self, job_id, role):
        return [float(l[3]) for l in read_lines(self.log) if l[:3] == ["start", str(job_id), role]]

    def test_a_live_owner_keeps_its_job_and_a_dead_ones_is_taken_after_the_lease(self):
        lease = 0.5
        self.path, self.log = os.path.join(self.dir, "q.db"), os.path.join(self.dir, "log")
        # This process must not tell liveness by locks either: a lockless
        # owner holds no lock byte, so it would look dead to one that asks.
        self.addCleanup(setattr, blero, "fcntl", blero.fcntl)
        blero.fcntl = None
        bl = blero.new(self.path).start()
        self.addCleanup(bl.stop)
        # Alive: a job that runs for three leases stays with its owner.
        holder = self.child("holder", lease)
        working = bl.enqueue("work", 3 * lease)
        wait_until(lambda: self.started(working, "holder"), message="the holder starts")
        taker = self.child("taker", lease)
        bl.wait(working, timeout=10)
        self.assertEqual(self.started(working, "taker"), [], "a live owner lost its job")
        for proc in (holder, taker):
            proc.kill()
            proc.wait()
        # Dead: a job that never ends is taken over, once the lease has run out.
        holder = self.child("holder2", lease)
        stuck = bl.enqueue("work", 60)
        wait_until(lambda: self.started(stuck, "holder2"), message="the second holder starts")
        self.child("taker2", lease)
        killed = time.monotonic()
        holder.kill()
        taken = wait_until(lambda: self.started(stuck, "taker2"), timeout=10,
                           message="the taker takes the dead holder's job")[0]
        self.assertGreaterEqual(taken - killed, lease / 2, "taken before the lease ran out")
        self.assertLess(taken - killed, lease + 3)
        self.assertEqual(bl.get_job(stuck).attempt, 2)


class DemoTest(TempDirTest):
    """python -m blero demo: the Goblero demo, its Ctrl-C and its second run."""

    def demo(self, *args, **kwargs):
        return [sys.executable, "-m", "blero", "demo", "--db", self.dir + os.sep, *args]

    def test_demo_runs_all_jobs_and_exits_0(self):
        out = subprocess.run(self.demo("-n", "3", "--sleep", "0.01"), cwd=HERE, env=child_env(),
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        lines = out.stdout.splitlines()
        self.assertEqual(lines[:5], ["Starting Blero ...", "Registering Processor 1 ...",
                                     "Registering Processor 2 ...", "Registering Processor 3 ...",
                                     "Enqueuing jobs ..."])
        done = [l for l in lines if "Done Processing job" in l]
        self.assertEqual(len(done), 50)
        for line in lines[5:]:    # each line printed whole, never interleaved
            self.assertRegex(line, r"^(\[Processor [123]\] (Processing job: Job #\d+ - data: "
                                   r"Job Data #\d+|Done Processing job: Job #\d+)|All jobs done\."
                                   r"|Stopping Blero \.\.\.)$")
        self.assertNotIn("\x1b", out.stdout, "progress bar on a non-terminal")
        self.assertEqual(out.stderr, "")

    @unittest.skipUnless(POSIX, "a pseudo-terminal")
    def test_progress_line_on_a_terminal(self):
        import pty
        leader, follower = pty.openpty()
        child = subprocess.Popen(self.demo("-n", "5", "--sleep", "0"), cwd=HERE, env=child_env(),
                                 stdout=follower, stderr=follower)
        os.close(follower)
        self.addCleanup(child.kill)
        output = b""
        while True:     # until the child closes the terminal
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        os.close(leader)
        self.assertEqual(child.wait(30), 0)
        text = output.decode()
        self.assertIn("50/50 jobs", text)
        self.assertRegex(text, r"\[#+\.*\] \d+/50 jobs +[\d.]+ jobs/s +ETA")
        self.assertEqual(text.count("Done Processing job"), 50)

    @unittest.skipUnless(POSIX, "SIGINT")
    def test_ctrl_c_stops_cleanly_and_the_second_run_carries_on(self):
        log = os.path.join(self.dir, "out.txt")
        with open(log, "w") as f:
            child = subprocess.Popen(self.demo("-n", "2", "--sleep", "5"), cwd=HERE,
                                     env=child_env(), stdout=f, stderr=subprocess.STDOUT)
        self.addCleanup(child.kill)

        def text():
            with open(log) as f:
                return f.read()

        wait_until(lambda: text().count("Processing job") >= 2, timeout=20,
                   message="two jobs running")
        child.send_signal(signal.SIGINT)
        self.assertEqual(child.wait(20), 0)
        self.assertIn("Caught signal interrupt. Exiting ...\nStopping Blero ...\n", text())
        self.assertNotIn("Done Processing", text())
        started = re.compile(r"\] Processing job: Job #(\d+) ")
        self.assertEqual(sorted(started.findall(text())), ["1", "2"])
        # The second run enqueues nothing and starts with the interrupted jobs
        # (one processor, so that the order of its lines is the order of claims).
        out = subprocess.run(self.demo("-n", "1", "--sleep", "0"), cwd=HERE, env=child_env(),
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotIn("Enqueuing jobs", out.stdout)
        self.assertEqual(sorted(started.findall(out.stdout)[:2]), ["1", "2"], out.stdout)
        bl = blero.new(self.dir)
        self.assertEqual(bl.stats()["complete"], 50)
        self.assertEqual({bl.get_job(1).attempt, bl.get_job(2).attempt}, {2})


# ---------------------------------------------------------------------------
# Helpers of the operations tests
# ---------------------------------------------------------------------------

def wait_equal(test, get, expected, timeout=10.0, message="value"):
    """Wait until `get()` equals `expected`; on timeout fail showing the difference."""
    try:
        wait_until(lambda: get() == expected, timeout=timeout, message=message)
    except AssertionError:
        pass
    test.assertEqual(get(), expected, f"{message} never became {expected!r}")


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def http_request(port, method, path, body=None, headers=None):
    """One request to 127.0.0.1:port: (status, content type, body bytes).

    Sends `Host: 127.0.0.1:port` unless `headers` says otherwise; a header
    given as None is left out altogether.  `body` is JSON-encoded unless bytes."""
    headers = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            if value is not None:
                conn.putheader(name, value)
        if method == "POST" or data:
            if data and "Content-Type" not in headers:
                conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data or None)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE_LINE = re.compile(rf"({_METRIC_NAME})(?:\{{(.*)\}})? (\S+)(?: -?\d+)?")
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"(,|$)')


def parse_prometheus(test, text):
    """Check the Prometheus text format line by line; return (samples, types).

    samples: {(metric name, frozenset of label pairs): float}; types: {family: type}.
    Every line must be `# HELP name text`, `# TYPE name type` or a sample of a
    family whose TYPE came before it."""
    test.assertTrue(text.endswith("\n"), "the exposition must end with a newline")
    samples, types = {}, {}
    for line in text[:-1].split("\n"):
        comment = re.fullmatch(rf"# (HELP|TYPE) ({_METRIC_NAME}) (.+)", line)
        if comment:
            kind, name, rest = comment.groups()
            if kind == "TYPE":
                test.assertIn(rest, ("counter", "gauge", "summary", "histogram", "untyped"), line)
                test.assertNotIn(name, types, f"a second TYPE line: {line!r}")
                types[name] = rest
            continue
        sample = _SAMPLE_LINE.fullmatch(line)
        test.assertIsNotNone(sample, f"neither a comment nor a sample: {line!r}")
        name, label_text, value = sample.groups()
        labels, pos = {}, 0
        while label_text and pos < len(label_text):
            pair = _LABEL_PAIR.match(label_text, pos)
            test.assertIsNotNone(pair, f"bad labels in {line!r}")
            labels[pair.group(1)] = pair.group(2)
            pos = pair.end()
        family = name
        stem, _, suffix = name.rpartition("_")
        if name not in types and suffix in ("sum", "count", "bucket") \
                and types.get(stem) in ("summary", "histogram"):
            family = stem
        test.assertIn(family, types, f"a sample before its TYPE line: {line!r}")
        key = (name, frozenset(labels.items()))
        test.assertNotIn(key, samples, f"a repeated sample: {line!r}")
        samples[key] = float(value)     # float() takes +Inf, -Inf and NaN too
    return samples, types


def metric_by_label(samples, name, label):
    """{label value: sample value} of one metric family."""
    return {dict(labels)[label]: value for (n, labels), value in samples.items() if n == name}


class LineReader:
    """Collects a child's stdout lines on a thread, so tests can wait for one with a deadline."""

    def __init__(self, stream):
        self.lines = []
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def expect(self, pattern, count=1, timeout=30.0):
        """Wait for `count` lines (in all) that search-match `pattern`; return their matches."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in map(re.compile(pattern).search, self.lines) if m]
            if len(found) >= count:
                return found
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out after {timeout} s waiting for {pattern!r};"
                                     f" got {self.lines!r}") from None
            if line is None:
                raise AssertionError(f"output ended before {pattern!r}; got {self.lines!r}")
            self.lines.append(line)

    def rest(self, timeout=30.0):
        """Every line, once the stream has ended."""
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return self.lines
            if line is not None:
                self.lines.append(line)


def stop_child(proc):
    """Cleanup for a child process this test started: kill it if it still runs."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):   # (stdin: its last write may be lost)
                stream.close()


def run_cli(*args, timeout=60):
    """`python -m blero ARGS`: the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "blero", *map(str, args)], cwd=HERE,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


def run_clis(*commands, timeout=60):
    """Several `python -m blero` runs at once (they are independent): their
    (returncode, stdout, stderr), in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "blero", *map(str, args)], cwd=HERE,
                              env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            stop_child(proc)
        results.append((proc.returncode, out, err))
    return results


# A child that runs one job per processor, each for ever, until it is killed:
# argv is the queue file and the `retries` of each job, comma-separated.
_RUN_UNTIL_KILLED = NEW_QUEUE + textwrap.dedent("""
    import os, sys, threading, blero
    bl = new_queue(sys.argv[1])
    retries = [int(r) for r in sys.argv[2].split(",")]
    def run(job):
        os.write(1, f"running {job.id}\\n".encode())     # one write: lines never mix
        threading.Event().wait()
    for _ in retries:
        bl.register_processor(run)
    bl.start()
    for r in retries:
        bl.enqueue("doomed", f"data {r}", retries=r)
    threading.Event().wait()
""")


def kill_with_running_jobs(test, path, retries):
    """Kill -9 a process while it runs one job per entry of `retries`
    (ids 1, 2, ...; job i has retries[i-1]); return their ids."""
    proc = start_child(_RUN_UNTIL_KILLED, path, ",".join(map(str, retries)),
                       stdout=subprocess.PIPE, text=True)
    test.addCleanup(stop_child, proc)
    LineReader(proc.stdout).expect(r"^running \d+$", count=len(retries))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return list(range(1, len(retries) + 1))


# ---------------------------------------------------------------------------
# Recurring jobs: every / unschedule
# ---------------------------------------------------------------------------

class Run(NamedTuple):
    id: int
    name: str
    data: object
    priority: int
    attempt: int
    others_pending: list    # ids of other pending jobs of the same name, seen during this run


@both_engines
class EveryTest(TempDirTest):
    """every() and unschedule(): stored in the file, restart-safe, one run at a
    time, missed runs collapse into one and the cadence restarts from it."""

    def recorder(self, bl, hold=None):
        """A processor recording each run; with `hold`, the first run blocks on it."""
        runs = []

        def run(job):
            others = [j.id for j in bl.jobs(state="pending", name=job.name, limit=None)]
            runs.append(Run(job.id, job.name, job.data, job.priority, job.attempt, others))
            if hold is not None and len(runs) == 1:
                hold.wait(30)
            return job.data

        return runs, run

    def assert_one_run_at_a_time(self, runs):
        self.assertEqual([r.others_pending for r in runs if r.others_pending], [],
                         "another run of a schedule was pending while one ran")

    def test_runs_at_once_then_every_interval(self):
        bl = self.queue()
        runs, run = self.recorder(bl)
        bl.register_processor(run)
        t0 = time.time()
        self.assertEqual(bl.every(0.1, "tick", {"n": 1}), "tick")    # key defaults to name
        # a run is recorded when it starts: wait for the first four to end
        wait_until(lambda: len(runs) >= 4 and all(
            bl.get_job(r.id).state == "complete" for r in runs[:4]), timeout=20,
            message="four runs, ended")
        infos = [bl.get_job(r.id) for r in runs[:4]]
        self.assertLess(infos[0].created_at - t0, 5.0, "the first run is due at once")
        for k, info in enumerate(infos):
            # Run k is due k intervals after the first: never earlier, never a burst.
            self.assertGreaterEqual(info.created_at, t0 + k * 0.1 - 1e-6, f"run {k}")
            self.assertEqual((info.name, info.data, info.state), ("tick", {"n": 1}, "complete"))
        self.assertEqual(len({r.id for r in runs}), len(runs), "each run is its own job")
        self.assert_one_run_at_a_time(runs)

    def test_a_schedule_made_right_after_start_runs(self):
        # Regression: a schedule committed while the clock was looking at the
        # schedules was forgotten until a restart (1 start in 25 to 100 here).
        for i in range(self.rounds(200)):
            bl = self.queue(f"q{i}.db", start=False)
            ran = threading.Event()
            bl.register_processor(lambda job: ran.set())
            bl.start()
            bl.every(3600, "hourly")
            self.assertTrue(ran.wait(10), f"queue {i}: the first run is due at once")
            bl.stop()

    def test_one_run_outstanding_and_missed_runs_collapse(self):
        bl = self.queue()
        hold = threading.Event()
        self.addCleanup(hold.set)
        slow, slow_run = self.recorder(bl, hold=hold)
        beats, beat_run = self.recorder(bl)
        bl.register_processor(slow_run, names="slow")
        bl.register_processor(beat_run, names="beat")
        bl.every(0.2, "slow")
        wait_until(lambda: slow, message="the first slow run")
        bl.every(0.1, "beat")
        # Six beats are half a second at least: two or more slow runs came due
        # while the first one was still running.
        wait_until(lambda: len(beats) >= 6, timeout=20, message="six beats")
        self.assertEqual([j.state for j in bl.jobs(name="slow")], ["inprogress"],
                         "at most one run of a schedule is pending or running")
        released = time.time()
        hold.set()
        wait_until(lambda: len(slow) >= 3, timeout=20, message="three slow runs")
        second, third = [bl.get_job(r.id) for r in slow[1:3]]
        self.assertGreaterEqual(second.created_at, released)
        self.assertLess(second.created_at - released, 5.0, "the missed runs run at once")
        self.assertGreaterEqual(third.created_at - second.created_at, 0.2 - 1e-6,
                                "missed runs collapse into one, and the cadence restarts from it")
        self.assert_one_run_at_a_time(slow + beats)

    def test_schedules_are_stored_and_run_after_a_restart(self):
        child = run_child(NEW_QUEUE + textwrap.dedent("""
            import sys, blero
            bl = new_queue(sys.argv[1])
            bl.start()
            print(bl.every(0.1, "tick", {"from": "child"}, key="ticker", priority=3))
            bl.stop()
        """), self.target())
        self.assertEqual((child.returncode, child.stderr), (0, ""))
        self.assertEqual(child.stdout.strip(), "ticker")
        bl = self.queue()           # a new process's view: every() is never called here
        runs, run = self.recorder(bl)
        bl.register_processor(run)
        wait_until(lambda: len(runs) >= 3, timeout=20, message="three runs after a restart")
        for r in runs[:3]:
            self.assertEqual((r.name, r.data, r.priority), ("tick", {"from": "child"}, 3))
        self.assert_one_run_at_a_time(runs)

    def test_missed_runs_during_downtime_collapse_into_one(self):
        bl = self.queue()
        runs, run = self.recorder(bl)
        bl.register_processor(run)
        bl.every(0.1, "tick")
        wait_until(lambda: len(runs) >= 2, timeout=20, message="two runs")
        bl.stop()
        stopped = time.time()
        # The downtime is a span of time (six intervals) that must pass on the clock.
        wait_until(lambda: time.time() >= stopped + 0.6, message="six intervals of downtime")
        restarted = time.time()
        bl = self.queue()
        runs, run = self.recorder(bl)
        bl.register_processor(run)

        def new_runs():
            return [j for j in bl.jobs(name="tick", limit=None) if j.created_at >= restarted]

        wait_until(lambda: len(new_runs()) >= 3, timeout=20, message="three runs after the restart")
        first, second, third = new_runs()[:3]
        self.assertLess(first.created_at - restarted, 5.0, "the missed runs run at once")
        self.assertGreaterEqual(second.created_at - first.created_at, 0.1 - 1e-6,
                                "six missed runs are one run, not a burst")
        self.assertGreaterEqual(third.created_at - first.created_at, 0.2 - 1e-6,
                                "the cadence restarts from the collapsed run")
        self.assert_one_run_at_a_time(runs)

    def test_a_run_left_pending_over_downtime_is_the_run_at_once(self):
        bl = self.queue()           # no processor: the first run stays pending
        bl.every(0.3, "tick")
        wait_until(lambda: bl.jobs(name="tick"), message="the first run enqueued")
        bl.stop()
        stopped = time.time()
        wait_until(lambda: time.time() >= stopped + 0.9, message="three intervals of downtime")
        bl = self.queue(start=False)
        runs, run = self.recorder(bl)
        bl.register_processor(run)
        bl.start()
        wait_until(lambda: len(runs) >= 2, timeout=20, message="two runs after the restart")
        first, second = [bl.get_job(r.id) for r in runs[:2]]
        self.assertLess(first.created_at, stopped, "the run left pending runs first")
        self.assertGreaterEqual(second.created_at - first.started_at, 0.3 - 1e-6,
                                "it was the run at once: the next waits an interval")
        self.assert_one_run_at_a_time(runs)

    def test_a_run_started_late_by_busy_workers_keeps_the_cadence(self):
        # Only a run left over downtime restarts the cadence from its start; a
        # run late because the workers were busy is followed by the missed one.
        release = threading.Event()
        bl = self.queue(start=False)
        self.addCleanup(release.set)
        busy = threading.Event()

        def process(job):
            if job.name == "busy":
                busy.set()
                release.wait(30)

        bl.register_processor(process)
        bl.start()
        bl.enqueue("busy")
        self.assertTrue(busy.wait(10))
        t0 = time.time()
        bl.every(0.6, "tick")
        wait_until(lambda: time.time() >= t0 + 1.3, message="two intervals, the worker busy")
        release.set()
        wait_until(lambda: len(bl.jobs(name="tick")) >= 2, timeout=20, message="two runs")
        first, second = bl.jobs(name="tick")[:2]
        self.assertLess(second.created_at - first.started_at, 0.5,
                        "the missed run comes at once, not an interval after the late one")

    def test_every_again_with_the_same_key_updates_it(self):
        bl = self.queue()
        runs, run = self.recorder(bl)
        bl.register_processor(run)
        self.assertEqual(bl.every(3600, "tick", 1, key="k"), "k")
        wait_until(lambda: runs, message="the first run")
        self.assertEqual(bl.every(0.1, "tock", 2, key="k", priority=7), "k")
        # Without the update the next run would be an hour away.
        wait_until(lambda: len(runs) >= 3, timeout=20, message="runs at the new interval")
        self.assertEqual((runs[0].name, runs[0].data), ("tick", 1))
        for r in runs[1:3]:
            self.assertEqual((r.name, r.data, r.priority), ("tock", 2, 7))
        self.assertEqual(len(bl.jobs(name="tick", limit=None)), 1, "one schedule, updated")
        self.assert_one_run_at_a_time(runs)

    def test_unschedule_stops_the_runs(self):
        bl = self.queue()
        runs, run = self.recorder(bl)
        bl.register_processor(run)
        bl.every(0.1, "tick", key="t")
        bl.every(0.1, "beat")
        wait_until(lambda: len([r for r in runs if r.name == "tick"]) >= 2, timeout=20,
                   message="two ticks")
        self.assertTrue(bl.unschedule("t"))
        unscheduled = time.time()
        self.assertFalse(bl.unschedule("t"))
        self.assertFalse(bl.unschedule("never-scheduled"))
        beats = len([r for r in runs if r.name == "beat"])
        wait_until(lambda: len([r for r in runs if r.name == "beat"]) >= beats + 5, timeout=20,
                   message="five more beats (half a second)")
        ticks = bl.jobs(name="tick", limit=None)
        self.assertEqual([j.id for j in ticks if j.created_at > unscheduled], [],
                         "no run after unschedule")
        # A run enqueued before unschedule stays an ordinary job, and ends.
        wait_until(lambda: all(j.state == "complete" for j in bl.jobs(name="tick", limit=None)),
                   message="every tick run complete")

    def test_every_and_unschedule_on_a_stopped_queue(self):
        bl = self.queue()
        bl.stop()
        self.assertEqual(bl.every(0.1, "tick", key="a"), "a")
        self.assertEqual(bl.every(0.1, "tock", key="b"), "b")
        self.assertTrue(bl.unschedule("b"))
        runs, run = self.recorder(bl)
        bl.register_processor(run)
        bl.start()
        wait_until(lambda: len(runs) >= 2, timeout=20, message="runs of the stored schedule")
        self.assertEqual({r.name for r in runs}, {"tick"})

    def test_join_ignores_schedules_and_runs_are_ordinary_jobs(self):
        bl = self.queue(backoff_base=0)
        runs, run = self.recorder(bl)
        bl.register_processor(run, names="other")
        bl.every(0.1, "orphan")          # no processor takes these: the run waits
        bl.enqueue("other", 1)
        self.assertTrue(bl.join(timeout=10), "join does not wait for recurring runs")
        wait_until(lambda: bl.jobs(name="orphan"), message="the first orphan run")
        orphan = bl.jobs(name="orphan")
        self.assertEqual([j.state for j in orphan], ["pending"])
        self.assertTrue(bl.cancel(orphan[0].id), "a run is an ordinary job")

    def test_run_options_and_a_failed_run_does_not_end_the_schedule(self):
        bl = self.queue(retries=5, backoff_base=0)
        tries = []

        def fail(job):
            tries.append(job.id)
            raise ValueError("scheduled run fails")

        bl.register_processor(fail)
        bl.every(0.1, "tick", retries=0, priority=4)
        wait_until(lambda: len(bl.jobs(name="tick", state="failed")) >= 2, timeout=20,
                   message="two failed runs")
        for info in bl.jobs(name="tick", state="failed"):
            self.assertEqual((info.attempt, info.max_attempts, info.priority), (1, 1, 4))
        self.assertEqual(len(tries), len(set(tries)), "retries=0: one try per run")

    def test_bad_arguments(self):
        bl = self.queue()
        for interval in (0, -1, float("inf")):
            with self.assertRaises(ValueError):
                bl.every(interval, "tick")
        with self.assertRaises(TypeError):
            bl.every(1, "tick", bogus=1)
        with self.assertRaises(TypeError):
            bl.every(1, 5)
        with self.assertRaises(ValueError):
            bl.every(1, "")
        self.assertEqual(bl.stats()["pending"], 0, "a refused every() stores nothing")


# ---------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------

@both_engines
class CallbacksTest(TempDirTest):
    """on_complete(job, result) and on_failed(job, exc): once per job, at its end."""

    def test_on_complete_gets_the_job_and_its_result(self):
        calls = []
        bl = self.queue(on_complete=lambda job, result: calls.append(
            (job.id, job.name, job.data, job.attempt, result)))
        bl.register_processor(lambda job: {"echo": job.data})
        ids = [bl.enqueue("j", i) for i in range(3)]
        for i, job_id in enumerate(ids):
            self.assertEqual(bl.wait(job_id, timeout=10), {"echo": i})
        wait_until(lambda: len(calls) == 3, message="three on_complete calls")
        self.assertEqual(sorted(calls), [(ids[i], "j", i, 1, {"echo": i}) for i in range(3)])

    def test_on_failed_once_when_the_job_ends_failed(self):
        class Boom(Exception):
            pass

        failed, completed = [], []
        bl = self.queue(retries=2, backoff_base=0,
                        on_failed=lambda job, exc: failed.append((job.id, job.attempt, exc)),
                        on_complete=lambda job, result: completed.append((job.id, result)))

        def process(job):
            if job.data == "always" or job.attempt == 1:
                raise Boom(f"boom {job.id}.{job.attempt}")
            return "ok"

        always = bl.enqueue("j", "always")
        once = bl.enqueue("j", "once")
        bl.register_processor(process)
        with self.assertRaises(blero.JobFailed):
            bl.wait(always, timeout=10)
        self.assertEqual(bl.wait(once, timeout=10), "ok")
        wait_until(lambda: failed and completed, message="the callbacks")
        self.assertEqual(completed, [(once, "ok")])
        self.assertEqual(len(failed), 1, f"on_failed is not called per retried try: {failed}")
        job_id, attempt, exc = failed[0]
        self.assertEqual((job_id, attempt), (always, 3))
        self.assertIsInstance(exc, Boom)
        self.assertEqual(str(exc), f"boom {always}.3")

    def test_on_failed_after_a_timeout(self):
        failed = []
        bl = self.queue(retries=0, on_failed=lambda job, exc: failed.append((job.id, exc)))
        bl.register_processor(lambda job: job.cancelled.wait(30))
        job_id = bl.enqueue("slow", timeout=0.2)
        with self.assertRaises(blero.JobFailed):
            bl.wait(job_id, timeout=10)
        wait_until(lambda: failed, message="on_failed")
        self.assertEqual(failed[0][0], job_id)
        self.assertIsInstance(failed[0][1], TimeoutError)

    def test_a_slow_on_failed_after_a_timeout_holds_up_nothing_else(self):
        # Regression: it ran on the clock thread, so delayed jobs waited for it.
        release, in_callback = threading.Event(), threading.Event()

        def on_failed(job, exc):
            in_callback.set()
            release.wait(30)

        bl = self.queue(retries=0, on_failed=on_failed)
        self.addCleanup(release.set)    # before the queue's stop: cleanups run last first
        bl.register_processor(lambda job: job.cancelled.wait(30), names="slow")
        bl.register_processor(lambda job: "ran", names="later")
        bl.enqueue("slow", timeout=0.1)
        self.assertTrue(in_callback.wait(10))
        self.assertEqual(bl.wait(bl.enqueue("later", delay=0.1), timeout=10), "ran")

    def test_no_on_failed_when_stop_runs_out_of_time(self):
        # The try is given back (SPEC v2): the job goes back to pending.
        failed = []
        bl = self.queue(retries=0, on_failed=lambda job, exc: failed.append((job.id, job.data, exc)))
        started, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def process(job):
            started.set()
            release.wait(30)

        bl.register_processor(process)
        job_id = bl.enqueue("long", "payload")
        self.assertTrue(started.wait(10))
        bl.stop(timeout=0.1)
        self.assertEqual(failed, [])
        info = bl.get_job(job_id)
        self.assertEqual((info.state, info.attempt, info.max_attempts), ("pending", 1, 2))

    @unittest.skipUnless(POSIX, "kill -9 needs POSIX")
    def test_on_failed_when_crash_recovery_fails_a_job(self):
        path = self.target()
        out_of_tries, retried = kill_with_running_jobs(self, path, [0, 1])
        failed, completed = [], []
        bl = self.queue(on_failed=lambda job, exc: failed.append((job.id, job.data, exc)),
                        on_complete=lambda job, result: completed.append((job.id, job.attempt)))
        bl.register_processor(lambda job: "again")
        self.assertEqual(bl.wait(retried, timeout=10), "again")
        wait_until(lambda: failed and completed, message="the callbacks")
        self.assertEqual(len(failed), 1, failed)
        self.assertEqual(failed[0][:2], (out_of_tries, "data 0"))
        self.assertIsInstance(failed[0][2], blero.BleroError)
        self.assertEqual(str(failed[0][2]), "interrupted")
        self.assertEqual(completed, [(retried, 2)])
        info = bl.get_job(out_of_tries)
        self.assertEqual((info.state, info.error), ("failed", "interrupted"))

    def test_raising_callbacks_are_logged_and_ignored(self):
        def callback(job, value):
            raise RuntimeError(f"callback boom {job.id}")

        bl = self.queue(retries=0, on_complete=callback, on_failed=callback)
        bl.register_processor(lambda job: 1 / 0 if job.data == "bad" else job.data)   # one worker
        with self.assertLogs("blero", logging.ERROR) as logs:
            ids = [bl.enqueue("j", d) for d in ("a", "bad", "b", "bad", "c")]
            for job_id, data in zip(ids, ("a", "bad", "b", "bad", "c")):
                if data == "bad":
                    with self.assertRaises(blero.JobFailed):
                        bl.wait(job_id, timeout=10)
                else:
                    self.assertEqual(bl.wait(job_id, timeout=10), data)

            def logged():
                return sorted(re.search(r"RuntimeError: (callback boom \d+)", r.getMessage())[1]
                              for r in logs.records if "RuntimeError" in r.getMessage())

            wait_until(lambda: len(logged()) == 5, message="five logged callback errors")
        self.assertEqual(logged(), sorted(f"callback boom {i}" for i in ids))
        self.assertEqual(bl.wait(bl.enqueue("j", "after"), timeout=10), "after",
                         "the worker goes on")
        self.assertEqual(bl.stats(), {"pending": 0, "inprogress": 0, "complete": 4,
                                      "failed": 2, "cancelled": 0})

    def test_callback_raising_a_base_exception_does_not_kill_the_worker(self):
        class Escape(BaseException):
            pass

        calls, escaped = [], []
        self.addCleanup(setattr, threading, "excepthook", threading.excepthook)
        threading.excepthook = escaped.append

        def callback(job, result):
            calls.append(job.id)
            if len(calls) == 1:
                raise Escape("out of the callback")

        bl = self.queue(on_complete=callback)
        bl.register_processor(lambda job: job.data)       # one worker
        ids = bl.enqueue_many([("j", i) for i in range(3)])
        for i, job_id in enumerate(ids):
            self.assertEqual(bl.wait(job_id, timeout=5), i)
        self.assertEqual([a.exc_type for a in escaped], [], "a worker thread died")


# ---------------------------------------------------------------------------
# Logging, and printing nothing
# ---------------------------------------------------------------------------

class LoggingTest(TempDirTest):
    """The "blero" logger: INFO for start, stop and recovery; WARNING per failed
    try; tracebacks at DEBUG; and nothing ever printed."""

    def test_logger_has_a_null_handler(self):
        handlers = logging.getLogger("blero").handlers
        self.assertTrue(any(isinstance(h, logging.NullHandler) for h in handlers), handlers)

    def test_start_and_stop_log_at_info(self):
        bl = self.queue(start=False)
        with self.assertLogs("blero", logging.INFO) as started:
            bl.start()
        with self.assertLogs("blero", logging.INFO) as stopped:
            bl.stop()
        for logs in (started, stopped):
            self.assertIn(logging.INFO, [r.levelno for r in logs.records])
            self.assertEqual([r for r in logs.records if r.levelno > logging.INFO], [])

    @unittest.skipUnless(POSIX, "kill -9 needs POSIX")
    def test_recovery_counts_at_info(self):
        path = self.target()
        kill_with_running_jobs(self, path, [0, 1, 1])
        bl = self.queue(start=False)
        with self.assertLogs("blero", logging.INFO) as logs:
            bl.start()
        messages = [r.getMessage().replace(path, "PATH") for r in logs.records
                    if r.levelno == logging.INFO]
        self.assertTrue(any(re.search(r"\b3\b", m) for m in messages),
                        f"no INFO record counts the 3 recovered jobs: {messages}")

    def test_failed_tries_warn_with_id_and_error_and_tracebacks_are_debug(self):
        bl = self.queue(retries=1, backoff_base=0)

        def process(job):
            if job.name == "bad":
                raise ValueError(f"kaboom-{job.data}")

        bl.register_processor(process)
        bl.enqueue_many([("ok", i) for i in range(10)])    # ids 1-10: 11 and 12 stand out
        self.assertTrue(bl.join(10))
        with self.assertLogs("blero", logging.DEBUG) as logs:
            a, b = bl.enqueue("bad", "A"), bl.enqueue("bad", "B")
            for job_id in (a, b):
                with self.assertRaises(blero.JobFailed):
                    bl.wait(job_id, timeout=10)
            wait_until(lambda: len([r for r in logs.records if r.levelno == logging.WARNING]) >= 4,
                       message="four warnings")
        self.assertEqual((a, b), (11, 12))
        warnings = [r for r in logs.records if r.levelno == logging.WARNING]
        for job_id, tag in ((a, "A"), (b, "B")):
            mine = [r.getMessage() for r in warnings if f"kaboom-{tag}" in r.getMessage()]
            self.assertEqual(len(mine), 2, f"one WARNING per failed try of job {job_id}: {mine}")
            for message in mine:
                self.assertRegex(message, rf"\b{job_id}\b")
                self.assertNotIn("Traceback", message, "tracebacks belong at DEBUG")
        self.assertEqual([r.exc_info for r in warnings if r.exc_info], [])
        self.assertEqual([r.getMessage() for r in logs.records if r.levelno > logging.WARNING], [])
        debug = [r.getMessage() for r in logs.records if r.levelno == logging.DEBUG]
        for tag in "AB":
            self.assertTrue(any("Traceback (most recent call last)" in m and f"kaboom-{tag}" in m
                                for m in debug), f"no DEBUG traceback for kaboom-{tag}")

    def test_a_whole_run_prints_nothing(self):
        child = run_child("""
            import http.client, sys, threading, time
            import blero

            def wait_for(condition):
                deadline = time.monotonic() + 20
                while not condition():
                    assert time.monotonic() < deadline, "timed out"
                    time.sleep(0.01)

            def callback(job, value):
                raise RuntimeError("a callback raises")

            bl = blero.new(sys.argv[1], retries=1, backoff_base=0,
                           on_complete=callback, on_failed=callback)
            hold = threading.Event()

            def process(job):
                if job.name == "hold":
                    hold.wait(30)
                elif job.data == "bad":
                    raise ValueError("bad data")
                return job.data

            bl.register_processor(process)
            bl.register_processor(process)
            bl.start()
            ids = [bl.enqueue("work", d) for d in ("a", "bad", "b")]
            assert bl.join(20)
            bl.every(0.05, "tick")
            wait_for(lambda: len(bl.jobs(name="tick", state="complete")) >= 2)
            bl.unschedule("tick")
            server = bl.serve_metrics()
            own = f"127.0.0.1:{server.port}"

            def request(method, path, headers):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                conn.request(method, path, body=b"{}" if method == "POST" else None,
                             headers=headers)
                status = conn.getresponse().status
                conn.close()
                return status

            for path in ("/", "/metrics", "/api/stats", "/api/jobs", "/api/nothing"):
                request("GET", path, {})
            assert request("GET", "/api/stats", {"Host": "evil.example"}) >= 400
            assert request("POST", "/api/retry", {}) >= 400
            assert request("POST", "/api/retry", {"Origin": "http://" + own}) == 200
            assert bl.cancel(bl.enqueue("later", delay=60))
            bl.enqueue("hold")
            wait_for(lambda: bl.stats()["inprogress"] == 1)
            bl.stop(timeout=0.1)
            hold.set()
            bl.sweep()
            blero.new(sys.argv[1]).stats()
        """, os.path.join(self.dir, "q.db"))
        self.assertEqual(child.returncode, 0, child.stderr)
        self.assertEqual((child.stdout, child.stderr), ("", ""))

    def test_the_server_prints_nothing_when_clients_go_away(self):
        child = run_child("""
            import http.client, socket, struct, sys
            import blero

            bl = blero.new(sys.argv[1])
            bl.start()
            server = bl.serve_metrics()
            for i in range(5):      # send a request, then reset the connection
                s = socket.create_connection(("127.0.0.1", server.port))
                s.sendall(b"GET /api/jobs HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\n\\r\\n" % server.port)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/metrics")
            assert conn.getresponse().status == 200
            bl.stop()
        """, os.path.join(self.dir, "q.db"))
        self.assertEqual(child.returncode, 0, child.stderr)
        self.assertEqual((child.stdout, child.stderr[:2000]), ("", ""))


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

@both_engines
class MetricsTest(TempDirTest):
    """metrics_text() in the Prometheus text format, and serve_metrics()."""

    def test_a_fresh_queue_reports_every_state(self):
        bl = self.queue()
        samples, types = parse_prometheus(self, bl.metrics_text())
        self.assertEqual(types["blero_jobs"], "gauge")
        self.assertEqual(types["blero_jobs_finished_total"], "counter")
        self.assertEqual(metric_by_label(samples, "blero_jobs", "state"),
                         dict.fromkeys(blero.STATES, 0.0))
        self.assertEqual(metric_by_label(samples, "blero_jobs_finished_total", "outcome"),
                         dict.fromkeys(("complete", "failed", "retried", "cancelled"), 0.0))

    def test_counts_after_a_known_workload(self):
        bl = self.queue(retries=1, backoff_base=0)
        held = threading.Event()

        def hold(job):
            held.set()
            job.cancelled.wait(30)

        def work(job):
            if job.data == "always" or (job.data == "once" and job.attempt == 1):
                raise ValueError(job.data)
            return job.data

        bl.register_processor(hold, names="hold")
        bl.register_processor(work, names="work")
        ok = [bl.enqueue("work", i) for i in range(3)]
        always, once = bl.enqueue("work", "always"), bl.enqueue("work", "once")
        later = bl.enqueue("work", "later", delay=3600)
        bl.enqueue("work", "kept", delay=3600)
        running = bl.enqueue("hold")
        self.assertTrue(held.wait(10))
        self.assertTrue(bl.cancel(later), "a cancelled pending job")
        self.assertTrue(bl.cancel(running), "a cancelled running job")
        for job_id in ok + [once]:
            bl.wait(job_id, timeout=10)
        with self.assertRaises(blero.JobFailed):
            bl.wait(always, timeout=10)

        def metrics():
            samples, _ = parse_prometheus(self, bl.metrics_text())
            return (metric_by_label(samples, "blero_jobs", "state"),
                    metric_by_label(samples, "blero_jobs_finished_total", "outcome"))

        wait_equal(self, metrics, (
            {"pending": 1, "inprogress": 0, "complete": 4, "failed": 1, "cancelled": 2},
            {"complete": 4, "failed": 1, "retried": 2, "cancelled": 2}), message="the metrics")
        # Counters are this Blero's; gauges are the file's.
        other = blero.new(bl.path, **self.settings())
        samples, _ = parse_prometheus(self, other.metrics_text())
        self.assertEqual(metric_by_label(samples, "blero_jobs", "state")["complete"], 4)
        self.assertEqual(set(metric_by_label(samples, "blero_jobs_finished_total",
                                             "outcome").values()), {0})

    def test_serve_metrics_then_close(self):
        bl = self.queue()
        bl.register_processor(lambda job: None)
        bl.wait(bl.enqueue("j"), timeout=10)
        server = bl.serve_metrics(port=0)
        self.addCleanup(server.close)
        self.assertIsInstance(server.port, int)
        self.assertGreater(server.port, 0)
        status, ctype, body = http_request(server.port, "GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(ctype.startswith("text/plain"), ctype)
        samples, _ = parse_prometheus(self, body.decode())
        self.assertEqual(metric_by_label(samples, "blero_jobs", "state"),
                         {s: float(n) for s, n in bl.stats().items()})
        self.assertEqual(metric_by_label(samples, "blero_jobs_finished_total", "outcome")
                         ["complete"], 1)
        server.close()
        with self.assertRaises(OSError):
            http_request(server.port, "GET", "/metrics")
        server.close()      # a second close does nothing

    def test_stop_closes_the_server(self):
        bl = self.queue()
        server = bl.serve_metrics()
        self.assertEqual(http_request(server.port, "GET", "/metrics")[0], 200)
        bl.stop()
        with self.assertRaises(OSError):
            http_request(server.port, "GET", "/metrics")
        # One made while the queue was stopped too, by the next stop.
        for start_first in (False, True):
            server = bl.serve_metrics()
            self.addCleanup(server.close)
            self.assertEqual(http_request(server.port, "GET", "/metrics")[0], 200)
            if start_first:
                bl.start()
            bl.stop()
            with self.assertRaises(OSError):
                http_request(server.port, "GET", "/metrics")

    def test_metrics_can_be_scraped_by_a_host_name_when_serving_all_addresses(self):
        # A Prometheus on another machine names this one in its Host header.
        bl = self.queue()
        server = bl.serve_metrics(host="0.0.0.0")
        self.addCleanup(server.close)
        status, _, body = http_request(server.port, "GET", "/metrics",
                                       headers={"Host": f"queue-host.example:{server.port}"})
        self.assertEqual(status, 200, body)


# ---------------------------------------------------------------------------
# The dashboard, over plain HTTP
# ---------------------------------------------------------------------------

class DashboardTest(TempDirTest):
    """GET / and /api/ on the metrics server; POST actions only from the same origin."""

    MARK = "secret-data-3141"

    def dashboard(self):
        """A queue with one complete, one failed and two pending jobs, served:
        (queue, port, failed id, pending ids, Event that makes the failed job succeed)."""
        fixed = threading.Event()

        def process(job):
            if job.data == "bad" and not fixed.is_set():
                raise ValueError(f"dashboard boom {self.MARK}")
            return job.data

        bl = self.queue(retries=0)
        bl.register_processor(process)
        bl.wait(bl.enqueue("ok", {"mark": self.MARK}), timeout=10)
        failed = bl.enqueue("ok", "bad")
        with self.assertRaises(blero.JobFailed):
            bl.wait(failed, timeout=10)
        pending = [bl.enqueue("later", i, delay=3600) for i in range(2)]
        server = bl.serve_metrics()
        self.addCleanup(server.close)
        return bl, server.port, failed, pending, fixed

    def get_json(self, port, path):
        status, ctype, body = http_request(port, "GET", path)
        self.assertEqual(status, 200, body)
        self.assertTrue(ctype.startswith("application/json"), ctype)
        return json.loads(body)

    def test_names_and_addresses_of_this_machine_are_accepted(self):
        bl, port, failed, *_ = self.dashboard()
        for host in (f"10.1.2.3:{port}", f"[::1]:{port}", f"{socket.gethostname()}:{port}"):
            status, _, body = http_request(port, "GET", "/api/stats", headers={"Host": host})
            self.assertEqual(status, 200, (host, body))
        host = f"192.0.2.7:{port}"      # the page as loaded by IP: its own origin acts
        status, _, body = http_request(port, "POST", "/api/retry", {"ids": [failed]},
                                       headers={"Host": host, "Origin": f"http://{host}"})
        self.assertEqual((status, json.loads(body)), (200, {"retried": 1}))
        for host in (f"evil.example:{port}", f"10.1.2.3:{port + 1}", "10.1.2.3"):
            status, _, _ = http_request(port, "GET", "/api/stats", headers={"Host": host})
            self.assertEqual(status, 421, host)

    def test_the_page_is_one_self_contained_html_page(self):
        bl, port, *_ = self.dashboard()
        status, ctype, body = http_request(port, "GET", "/")
        self.assertEqual(status, 200)
        self.assertTrue(ctype.startswith("text/html"), ctype)
        page = body.decode()
        self.assertRegex(page, r"(?is)^\s*<!doctype html>.*<script>.*/api/.*</script>")
        self.assertEqual(re.findall(r"(?i)<(?:link|iframe|object|embed)\b", page), [])
        self.assertEqual(re.findall(r"(?i)<script\b[^>]*\bsrc\s*=", page), [])
        self.assertEqual(re.findall(r"(?i)(?:src|href|action)\s*=\s*[\"']?\s*(?:https?:)?//", page), [])
        self.assertEqual(re.findall(r"(?i)(?:url\(|@import)\s*[\"']?\s*(?:https?:)?//", page), [])
        self.assertEqual(re.findall(r"(?i)fetch\(\s*[\"'](?:https?:)?//", page), [])

    def test_json_api(self):
        bl, port, failed, pending, _ = self.dashboard()
        stats = self.get_json(port, "/api/stats")
        self.assertEqual(stats["counts"], bl.stats())
        jobs = self.get_json(port, "/api/jobs")
        self.assertEqual([j["id"] for j in jobs], [j.id for j in bl.jobs()])
        for job in jobs:
            self.assertLessEqual(set(blero.JobInfo._fields), set(job))
        self.assertEqual(jobs[0]["data"], repr({"mark": self.MARK}))
        only_failed = self.get_json(port, "/api/jobs?state=failed")
        self.assertEqual([(j["id"], j["state"]) for j in only_failed], [(failed, "failed")])
        self.assertIn("dashboard boom", only_failed[0]["error"])
        self.assertEqual(len(self.get_json(port, "/api/jobs?limit=1")), 1)
        self.assertEqual(http_request(port, "GET", "/api/jobs?state=bogus")[0], 400)
        self.assertEqual(http_request(port, "GET", "/api/nothing-here")[0], 404)

    def test_actions_from_this_dashboard_work(self):
        bl, port, failed, pending, fixed = self.dashboard()
        own = {"Origin": f"http://127.0.0.1:{port}"}
        fixed.set()
        status, _, body = http_request(port, "POST", "/api/retry", {"ids": [failed]}, own)
        self.assertEqual(status, 200, body)
        self.assertEqual(bl.wait(failed, timeout=10), "bad")
        status, _, body = http_request(port, "POST", "/api/cancel", {"id": pending[0]}, own)
        self.assertEqual(status, 200, body)
        self.assertEqual(bl.get_job(pending[0]).state, "cancelled")
        by_name = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
        status, _, body = http_request(port, "POST", "/api/cancel", {"id": pending[1]}, by_name)
        self.assertEqual(status, 200, body)
        self.assertEqual(bl.get_job(pending[1]).state, "cancelled")
        self.assertEqual(http_request(port, "POST", "/api/cancel", {"id": "x"}, own)[0], 400)

    def test_actions_from_elsewhere_are_refused(self):
        bl, port, failed, pending, fixed = self.dashboard()
        fixed.set()
        own = f"http://127.0.0.1:{port}"
        other_port = port + 1 if port < 65535 else port - 1
        cases = {
            "no Origin": {},
            "another site": {"Origin": "http://evil.example"},
            "an opaque origin": {"Origin": "null"},
            "another local port": {"Origin": f"http://127.0.0.1:{other_port}"},
            "another host, same port": {"Origin": f"http://evil.example:{port}"},
            "a look-alike host": {"Origin": f"{own}.evil.example"},
            "user info": {"Origin": f"http://127.0.0.1:{port}@evil.example"},
            "DNS rebinding": {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
            "a foreign Host": {"Host": f"evil.example:{port}", "Origin": own},
            "no Host": {"Host": None, "Origin": own},
        }

        def queue_state():
            return bl.stats(), bl.get_job(failed), bl.get_job(pending[0]), bl.metrics_text()

        for case, headers in cases.items():
            for path, body in (("/api/retry", {}), ("/api/retry", {"ids": [failed]}),
                               ("/api/cancel", {"id": pending[0]})):
                with self.subTest(case=case, path=path, body=body):
                    before = queue_state()
                    status, _, reply = http_request(port, "POST", path, body, headers)
                    self.assertTrue(400 <= status < 500, (status, reply))
                    self.assertEqual(queue_state(), before, "the queue changed")

    def test_reads_naming_another_host_are_refused(self):
        bl, port, *_ = self.dashboard()
        for path in ("/", "/api/stats", "/api/jobs"):
            for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port}.evil.example",
                         None):
                with self.subTest(path=path, host=host):
                    status, _, body = http_request(port, "GET", path, headers={"Host": host})
                    self.assertTrue(400 <= status < 500, status)
                    self.assertNotIn(self.MARK.encode(), body)


# ---------------------------------------------------------------------------
# The dashboard, in a real headless browser
# ---------------------------------------------------------------------------

def find_chromium():
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@unittest.skipUnless(POSIX and find_chromium(), "Chromium is not installed")
class DashboardBrowserTest(TempDirTest):
    """The page as Chromium renders it, and what a browser lets other pages do."""

    def dump_dom(self, url, *flags):
        """The DOM of `url` after its scripts ran (5 s of virtual time)."""
        profile = os.path.join(self.dir, f"chromium-{len(os.listdir(self.dir))}")
        proc = subprocess.Popen(
            [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
             *flags, "--dump-dom", url],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        self.assertEqual(proc.returncode, 0)
        return out

    def served(self):
        """A queue with two complete, one failed and one pending job, served."""
        bl = self.queue(retries=0)
        bl.register_processor(lambda job: 1 / 0 if job.data == "bad" else job.data)
        for data in ("one", "two"):
            bl.wait(bl.enqueue("ok", data), timeout=10)
        failed = bl.enqueue("boom", "bad")
        with self.assertRaises(blero.JobFailed):
            bl.wait(failed, timeout=10)
        bl.enqueue("later", "pending-data-2718", delay=3600)
        server = bl.serve_metrics()
        self.addCleanup(server.close)
        return bl, server.port, failed

    def test_the_page_shows_the_counts_and_failures(self):
        bl, port, failed = self.served()
        status, _, raw = http_request(port, "GET", "/")
        self.assertNotIn(b'id="count-complete"', raw, "the counts are filled in by the script")
        stats = json.loads(http_request(port, "GET", "/api/stats")[2])
        dom = self.dump_dom(f"http://127.0.0.1:{port}/")
        shown = {state: int(n) for state, n in re.findall(r'id="count-(\w+)"><b>(\d+)</b>', dom)}
        self.assertEqual(shown, stats["counts"])
        self.assertEqual(shown, {"pending": 1, "inprogress": 0, "complete": 2, "failed": 1,
                                 "cancelled": 0})
        failures = re.search(r'(?s)<table id="failures">(.*?)</table>', dom)
        self.assertIsNotNone(failures, dom[:2000])
        self.assertIn(f'data-id="{failed}"', failures.group(1))
        self.assertIn("ZeroDivisionError", failures.group(1))
        self.assertIn("pending-data-2718", dom)

    def test_other_sites_cannot_act_on_the_queue(self):
        bl, port, failed = self.served()
        pending = bl.jobs(state="pending")[0].id
        target = f"http://127.0.0.1:{port}"
        page = f"""<!doctype html><html><body><script>
            const send = (path, body) => fetch("{target}" + path, {{method: "POST",
                mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body: body}});
            Promise.all([send("/api/retry", "{{}}"), send("/api/cancel", '{{"id": {pending}}}')])
              .then(() => document.body.setAttribute("data-sent", "yes"),
                    e => document.body.setAttribute("data-sent", "error " + e));
            </script></body></html>""".encode()

        class Evil(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass

        evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
        threading.Thread(target=evil.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        self.addCleanup(evil.server_close)
        self.addCleanup(evil.shutdown)
        before = (bl.stats(), bl.get_job(failed), bl.get_job(pending))
        with self.assertLogs("blero", logging.DEBUG) as logs:
            dom = self.dump_dom(f"http://127.0.0.1:{evil.server_address[1]}/")
        self.assertIn('data-sent="yes"', dom, "the attacking page ran")
        posts = [r.getMessage() for r in logs.records if "POST /api/" in r.getMessage()]
        self.assertEqual(len(posts), 2, f"both requests reached the dashboard: {posts}")
        self.assertEqual((bl.stats(), bl.get_job(failed), bl.get_job(pending)), before)

    def test_dns_rebinding_gets_nothing(self):
        bl, port, failed = self.served()
        dom = self.dump_dom(f"http://evil.example:{port}/",
                            "--host-resolver-rules=MAP evil.example 127.0.0.1")
        self.assertNotIn('id="counts"', dom)
        self.assertNotIn("pending-data-2718", dom)
        self.assertIn("refused", dom, "the server answered, and refused")


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

class CommandLineTest(TempDirTest):
    """python -m blero stats|jobs|retry|cancel|sweep|serve: exit 0, 1 on error, 2 on bad usage."""

    COMMANDS = ("demo", "stats", "jobs", "retry", "cancel", "sweep", "serve", "vacuum")

    def make_queue(self):
        """A stopped queue file: 2 complete, 2 failed, 1 pending, 1 cancelled.
        Returns (path, ids by label)."""
        path = os.path.join(self.dir, "q.db")
        bl = self.queue(retries=0)

        def process(job):
            if job.name == "bad":
                raise ValueError(f"cli boom {job.data}")
            return 42 if job.data == {"url": "a"} else None

        bl.register_processor(process)
        ids = {"a": bl.enqueue("fetch", {"url": "a"}), "b": bl.enqueue("fetch", "b"),
               "bad1": bl.enqueue("bad", 1), "bad2": bl.enqueue("bad", 2),
               "later": bl.enqueue("later", delay=3600), "gone": bl.enqueue("gone", delay=3600)}
        self.assertTrue(bl.cancel(ids["gone"]))
        for label in ("a", "b", "bad1", "bad2"):
            with contextlib.suppress(blero.JobFailed):
                bl.wait(ids[label], timeout=10)
        bl.stop()
        return path, ids

    def stats(self, path):
        return blero.new(path).stats()

    def test_help_lists_the_commands(self):
        result = run_cli("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for command in self.COMMANDS:
            self.assertRegex(result.stdout, rf"\b{command}\b")

    def test_stats_and_jobs(self):
        path, ids = self.make_queue()
        expected = {"pending": 1, "inprogress": 0, "complete": 2, "failed": 2, "cancelled": 1}
        results = run_clis(("stats", "--db", path), ("stats", "--db", path, "--json"),
                           ("jobs", "--db", path), ("jobs", "--db", path, "--json"),
                           ("jobs", "--db", path, "--json", "--state", "failed"),
                           ("jobs", "--db", path, "--json", "--limit", "2"))
        for code, out, err in results:
            self.assertEqual((code, err), (0, ""))
        (_, stats, _), (_, stats_json, _), (_, jobs, _), (_, all_json, _), \
            (_, failed_json, _), (_, two_json, _) = results
        lines = [line.split() for line in stats.splitlines()]
        self.assertEqual({s: int(n) for s, n in lines}, expected)
        self.assertEqual(len(lines), 5)
        self.assertEqual(json.loads(stats_json), expected)
        listed = [line for line in jobs.splitlines() if line.strip()]
        self.assertEqual([int(re.match(r"\d+", line).group()) for line in listed],
                         sorted(ids.values()))
        everything = json.loads(all_json)
        self.assertIsInstance(everything, list)
        self.assertEqual([j["id"] for j in everything], sorted(ids.values()))
        for job in everything:
            self.assertEqual(set(job), set(blero.JobInfo._fields))
        first = everything[0]
        self.assertEqual((first["name"], first["state"], first["data"], first["result"]),
                         ("fetch", "complete", {"url": "a"}, 42))
        self.assertEqual((everything[1]["data"], everything[1]["result"]), ("b", None))
        failed = json.loads(failed_json)
        self.assertEqual([j["id"] for j in failed], [ids["bad1"], ids["bad2"]])
        self.assertIn("cli boom 1", failed[0]["error"])
        self.assertEqual(len(json.loads(two_json)), 2)

    def test_jobs_json_shows_whole_reprs(self):
        path = os.path.join(self.dir, "q.db")
        bl = self.queue()
        data = {"blob": "x" * 1000, "tags": {"a set, which JSON has not"}}
        bl.enqueue("big", data, delay=3600)
        bl.stop()
        result = run_cli("jobs", "--db", path, "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)[0]["data"], repr(data))

    def test_retry_cancel_and_sweep(self):
        path, ids = self.make_queue()
        result = run_cli("cancel", "--db", path, ids["later"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(blero.new(path).get_job(ids["later"]).state, "cancelled")
        result = run_cli("cancel", "--db", path, ids["a"])       # already ended
        self.assertEqual(result.returncode, 1)
        self.assertTrue(result.stderr.strip())
        result = run_cli("retry", "--db", path, ids["bad1"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.stats(path)["failed"], 1)
        self.assertEqual(blero.new(path).get_job(ids["bad1"]).state, "pending")
        result = run_cli("retry", "--db", path)                   # all failed
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.stats(path), {"pending": 2, "inprogress": 0, "complete": 2,
                                            "failed": 0, "cancelled": 2})
        result = run_cli("sweep", "--db", path, "--older-than", 3600)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.stats(path)["complete"], 2)
        result = run_cli("sweep", "--db", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.stats(path), {"pending": 2, "inprogress": 0, "complete": 0,
                                            "failed": 0, "cancelled": 2})

    def test_commands_on_a_live_queue(self):
        bl = self.queue(retries=0)
        fixed = threading.Event()
        bl.register_processor(lambda job: job.data if fixed.is_set() else 1 / 0)
        job_id = bl.enqueue("j", "data")
        with self.assertRaises(blero.JobFailed):
            bl.wait(job_id, timeout=10)
        fixed.set()
        result = run_cli("retry", "--db", bl.path, job_id)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(bl.wait(job_id, timeout=10), "data", "the running queue takes it up")
        result = run_cli("stats", "--db", bl.path, "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), bl.stats())

    def test_errors_exit_1_and_create_nothing(self):
        missing = os.path.join(self.dir, "nowhere", "q.db")
        empty_dir = os.path.join(self.dir, "empty") + os.sep
        os.mkdir(empty_dir)
        text = os.path.join(self.dir, "notes.txt")
        with open(text, "w") as f:
            f.write("not a queue\n" * 20)
        foreign = os.path.join(self.dir, "other.db")
        with contextlib.closing(sqlite3.connect(foreign)) as db:
            db.execute("CREATE TABLE t (x)")
            db.execute("INSERT INTO t VALUES (1)")
            db.commit()
        before = {name: read_bytes(os.path.join(self.dir, name))
                  for name in ("notes.txt", "other.db")}
        commands = [("stats", "--db", missing), ("cancel", "--db", missing, "1"),
                    ("sweep", "--db", missing), ("serve", "--db", missing),
                    ("stats", "--db", empty_dir), ("jobs", "--db", text, "--json"),
                    ("retry", "--db", foreign), ("serve", "--db", foreign)]
        for args, (code, out, err) in zip(commands, run_clis(*commands)):
            with self.subTest(args=args):
                self.assertEqual(code, 1, (out, err))
                self.assertTrue(err.strip(), "a message on stderr")
                self.assertNotIn("Traceback", err)
        self.assertEqual(sorted(os.listdir(self.dir)), ["empty", "notes.txt", "other.db"])
        self.assertEqual(os.listdir(empty_dir), [])
        for name, content in before.items():
            self.assertEqual(read_bytes(os.path.join(self.dir, name)), content, f"{name} changed")

    def test_bad_usage_exits_2(self):
        path = os.path.join(self.dir, "q.db")
        commands = [(), ("bogus",), ("stats",), ("cancel", "--db", path),
                    ("cancel", "--db", path, "one"), ("jobs", "--db", path, "--state", "bogus"),
                    ("jobs", "--db", path, "--limit", "-1"), ("demo", "-n", "0", "--db", path)]
        for args, (code, out, err) in zip(commands, run_clis(*commands)):
            with self.subTest(args=args):
                self.assertEqual(code, 2, (out, err))
                self.assertTrue(err.strip(), "usage on stderr")
        self.assertEqual(os.listdir(self.dir), [], "bad usage creates nothing")

    def test_serve_shows_the_dashboard_of_a_file(self):
        path, ids = self.make_queue()
        expected = self.stats(path)
        proc = subprocess.Popen([sys.executable, "-m", "blero", "serve", "--db", path,
                                 "--port", "0"], cwd=HERE, env=child_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(stop_child, proc)
        url = LineReader(proc.stdout).expect(r"http://[^\s/]+:(\d+)/?")[0]
        port = int(url.group(1))
        self.assertGreater(port, 0)
        status, ctype, body = http_request(port, "GET", "/api/stats")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["counts"], expected)
        self.assertEqual(http_request(port, "GET", "/")[0], 200)
        proc.terminate()
        proc.wait(20)
        self.assertNotIn("Traceback", proc.stderr.read())
        self.assertEqual(self.stats(path), expected, "serving changed nothing")


# ---------------------------------------------------------------------------
# Several processes on one file, kill -9 torture, and a hardened opening.
#
# Children log one line per event with a single os.write on an O_APPEND file,
# each line ending in " ." so that read_lines skips a torn one; times are
# time.monotonic_ns(), one clock for every process on the machine.
# ---------------------------------------------------------------------------

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# What every child starts with: a log of whole lines, a processor that logs
# each run, and a bounded wait for a condition.
MP_PRELUDE = r'''
import os, sys, time, json, signal, threading
import blero

PID = os.getpid()
''' + NEW_QUEUE + r'''
def open_log(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    def log(*fields):
        os.write(fd, (" ".join(map(str, fields)) + " .\n").encode())
    return log

def logged(log, tag=PID, hold=lambda job: False):
    """A processor logging "S id tag attempt t" and "E id tag attempt t";
    a job that `hold` picks blocks until its try is cancelled."""
    def run(job):
        log("S", job.id, tag, job.attempt, time.monotonic_ns())
        if hold(job):
            job.cancelled.wait()
        log("E", job.id, tag, job.attempt, time.monotonic_ns())
        return job.data
    return run

def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sys.exit("child %d: timed out waiting" % PID)
        time.sleep(0.01)
'''


def mp_child(body):
    """The source of a child: the prelude, then `body`."""
    return MP_PRELUDE + textwrap.dedent(body)


def runs_in(log_path):
    """{job id: [run, ...]} from the S/E lines of a log, each run a dict with
    tag, attempt, start and end (None when the run never ended)."""
    runs = {}
    open_runs = {}
    for fields in read_lines(log_path):
        if fields[0] not in ("S", "E"):
            continue
        job_id, tag, attempt, t = int(fields[1]), fields[2], int(fields[3]), int(fields[4])
        if fields[0] == "S":
            run = {"tag": tag, "attempt": attempt, "start": t, "end": None}
            runs.setdefault(job_id, []).append(run)
            open_runs[job_id, tag, attempt] = run
        else:
            open_runs.pop((job_id, tag, attempt))["end"] = t
    return runs


class ProcessTest(TempDirTest):
    """A TempDirTest whose child processes are always reaped."""

    def setUp(self):
        super().setUp()
        self.path = self.target()
        self.log = os.path.join(self.dir, "log")
        self._children = 0

    def spawn(self, body, *args):
        """Start a child running `mp_child(body)`; its output goes to files."""
        self._children += 1
        out = os.path.join(self.dir, f"child{self._children}.out")
        with open(out, "w") as f:
            p = start_child(mp_child(body), *args, stdout=f, stderr=subprocess.STDOUT)
        p.out_path = out

        def reap():
            if p.poll() is None:
                p.kill()
            p.wait()
        self.addCleanup(reap)
        return p

    def output(self, p):
        with open(p.out_path) as f:
            return f.read()

    def finish(self, p, timeout=60):
        """Wait for a child to exit 0; return its output."""
        try:
            p.wait(timeout)
        except Exception:
            p.kill()
            p.wait()
            self.fail(f"child {p.pid} did not exit in {timeout} s:\n{self.output(p)}")
        out = self.output(p)
        self.assertEqual(p.returncode, 0, f"child {p.pid} failed:\n{out}")
        return out

    def kill(self, p):
        """SIGKILL a child; return the time (monotonic ns) just before (it
        may still run for a few microseconds after)."""
        t = time.monotonic_ns()
        p.send_signal(signal.SIGKILL)
        p.wait()
        return t

    def lines(self, *first):
        """The log lines that start with `first`."""
        n = len(first)
        return [f for f in read_lines(self.log) if tuple(f[:n]) == first]

    def wait_lines(self, *first, count=1, timeout=10.0, children=()):
        def enough():
            for p in children:
                if p.poll() is not None:
                    self.fail(f"child {p.pid} exited early ({p.returncode}):\n{self.output(p)}")
            return len(self.lines(*first)) >= count
        wait_until(enough, timeout, message=f"{count} log line(s) {' '.join(first)}")
        return self.lines(*first)

    def create(self, **settings):
        """Make the queue, so that children only open it."""
        self.queue(**settings).stop()

    def stop_after_failure(self, bl, threads_before):
        """Stop a queue whose storage failed: at once, raising BleroError or
        nothing.  Returns the names of its threads still running after it."""
        t = time.monotonic()
        try:
            bl.stop(5)
        except blero.BleroError:
            pass
        self.assertLess(time.monotonic() - t, 5, "stop hung")
        bl.stop()    # a second stop does nothing

        def leftover():
            return sorted(t.name for t in set(threading.enumerate()) - threads_before
                          if t.name.startswith("blero"))
        try:
            wait_until(lambda: not leftover(), timeout=2)
        except AssertionError:
            pass
        return leftover()

    def assert_runs_never_overlap(self, runs, kills=None, note=""):
        """No two runs of one job overlap in time; a run that never ended must
        be in a child that was killed (`kills`: tag -> time of the kill), and
        ends at the kill."""
        kills = kills or {}
        for job_id, job_runs in runs.items():
            spans = []
            for run in job_runs:
                end = run["end"]
                if end is None:
                    self.assertIn(run["tag"], kills,
                                  f"job {job_id}: run {run} never ended, no kill cut it {note}")
                    # SIGKILL lands a few microseconds after it is sent.
                    end = max(run["start"], kills[run["tag"]])
                self.assertLessEqual(run["start"], end, f"job {job_id}: {run} {note}")
                spans.append((run["start"], end))
            spans.sort()
            for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
                self.assertGreater(s2, e1, f"job {job_id}: two runs overlap: {job_runs} {note}")


# ---------------------------------------------------------------------------
# Several processes sharing one file
# ---------------------------------------------------------------------------

# argv: db, log, jobs to enqueue here, jobs in all; 2 processors.
MP_SHARE_CHILD = """
db, log_path, share, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
log = open_log(log_path)
bl = new_queue(db)
run = logged(log)
bl.register_processor(run)
bl.register_processor(run)
bl.start()
log("ready", PID)
for first in range(0, share, 50):
    ids = bl.enqueue_many([("job", [PID, k]) for k in range(first, min(share, first + 50))])
    log("Q", PID, *ids)
wait_for(lambda: bl.stats()["complete"] >= total)
bl.stop()
log("exit", PID)
"""

# argv: db, log, lease, jobs to see complete before exiting.  2 processors;
# a job with data "hold" blocks on its first try until cancelled.
MP_HOLD_CHILD = """
db, log_path, lease, total = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
log = open_log(log_path)
bl = new_queue(db, lease=lease)
run = logged(log, hold=lambda job: job.data == "hold" and job.attempt == 1)
bl.register_processor(run)
bl.register_processor(run)
bl.start()
log("ready", PID)
wait_for(lambda: bl.stats()["complete"] + bl.stats()["failed"] >= total)
bl.stop()
log("exit", PID)
"""


# argv: db, log, lease, jobs to see complete before exiting.  2 processors;
# a job's data is how long it works, in seconds.
MP_WORK_CHILD = """
db, log_path, lease, total = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
log = open_log(log_path)
def run(job):
    log("S", job.id, PID, job.attempt, time.monotonic_ns())
    time.sleep(job.data)      # the job's work
    log("E", job.id, PID, job.attempt, time.monotonic_ns())
bl = new_queue(db, lease=lease)
bl.register_processor(run)
bl.register_processor(run)
bl.start()
log("ready", PID)
wait_for(lambda: bl.stats()["complete"] >= total)
bl.stop()
"""


@both_engines
class MultiProcessTest(ProcessTest):

    def test_three_processes_run_3000_jobs_each_exactly_once(self):
        self.create()
        children = [self.spawn(MP_SHARE_CHILD, self.path, self.log, 1000, 3000)
                    for _ in range(3)]
        for p in children:
            self.finish(p)
        pids = {str(p.pid) for p in children}
        enqueued = [int(i) for line in self.lines("Q") for i in line[2:-1]]
        self.assertEqual(len(enqueued), 3000)
        self.assertEqual(sorted(enqueued), list(range(1, 3001)), "ids are 1..3000, once each")
        runs = runs_in(self.log)
        self.assertEqual(sorted(runs), list(range(1, 3001)))
        twice = {i: r for i, r in runs.items() if len(r) != 1}
        self.assertEqual(twice, {}, "jobs that ran more than once")
        for job_id, (run,) in runs.items():
            self.assertIsNotNone(run["end"], f"job {job_id} never ended")
            self.assertIn(run["tag"], pids)
            self.assertEqual(run["attempt"], 1)
        self.assert_runs_never_overlap(runs)
        by_pid = {pid: sum(1 for (r,) in runs.values() if r["tag"] == pid) for pid in pids}
        self.assertTrue(all(by_pid.values()), f"every process ran jobs: {by_pid}")
        bl = self.queue()
        self.assertEqual(bl.stats(), {"pending": 0, "inprogress": 0, "complete": 3000,
                                      "failed": 0, "cancelled": 0})
        for info in bl.jobs(limit=None):
            self.assertEqual(info.result, info.data)
            self.assertEqual(info.attempt, 1)
            self.assertEqual(info.error, None)

    def test_sigkill_hands_running_jobs_to_the_others_within_lease(self):
        lease = 1.5
        bl = self.queue()
        hold = [bl.enqueue("hold", "hold") for _ in range(2)]
        bl.stop()
        victim = self.spawn(MP_HOLD_CHILD, self.path, self.log, lease, 10 ** 9)
        started = self.wait_lines("S", count=2, children=[victim])
        self.assertEqual(sorted(int(f[1]) for f in started), hold)
        self.assertEqual({f[2] for f in started}, {str(victim.pid)})
        total = 2 + 200
        others = [self.spawn(MP_HOLD_CHILD, self.path, self.log, lease, total) for _ in range(2)]
        self.wait_lines("ready", count=3, children=others)
        bl.start()
        plain = bl.enqueue_many([("plain", i) for i in range(200)])
        bl.stop()
        self.wait_lines("E", count=50, children=others)   # the others are busy too
        killed_at = self.kill(victim)
        for p in others:
            self.finish(p)
        runs = runs_in(self.log)
        survivors = {str(p.pid) for p in others}
        for job_id in hold:
            first, second = runs[job_id]
            self.assertEqual((first["tag"], first["attempt"], first["end"]),
                             (str(victim.pid), 1, None))
            self.assertIn(second["tag"], survivors)
            self.assertEqual(second["attempt"], 2)
            self.assertGreater(second["start"], killed_at)
            taken = (second["start"] - killed_at) / 1e9
            self.assertLess(taken, lease, f"job {job_id} ran again {taken:.3f} s after the kill")
        for job_id in plain:
            self.assertEqual(len(runs[job_id]), 1, f"job {job_id}: {runs[job_id]}")
            self.assertIn(runs[job_id][0]["tag"], survivors)
        self.assert_runs_never_overlap(runs, {str(victim.pid): killed_at})
        bl.start()
        self.assertEqual(bl.stats()["complete"], total)
        for job_id in hold:
            info = bl.get_job(job_id)
            self.assertEqual((info.state, info.attempt), ("complete", 2))

    def test_sigkill_one_of_three_mid_run(self):
        # Three processes share 900 jobs; one is killed at a random point of
        # the run.  Only the jobs it was running run again, in the others,
        # within the lease, and never while it still ran them.
        seed = int(os.environ.get("BLERO_TEST_SEED") or random.randrange(2 ** 32))
        note = f"(seed {seed}: rerun with BLERO_TEST_SEED={seed})"
        rng = random.Random(seed)
        lease, total = 1.5, 900
        victim_at = rng.randrange(3)
        self.create()
        children = [self.spawn(MP_WORK_CHILD, self.path, self.log, lease,
                               10 ** 9 if n == victim_at else total) for n in range(3)]
        victim = children[victim_at]
        others = [p for p in children if p is not victim]
        self.wait_lines("ready", count=3, children=children)
        bl = self.queue()
        bl.enqueue_many([("work", rng.choice((0, 0.001, 0.002))) for _ in range(total)])
        bl.stop()
        target = rng.randrange(5, 120)
        wait_until(lambda: len(self.lines("S")) >= total - 100 or len(
            [f for f in self.lines("S") if f[2] == str(victim.pid)]) >= target,
            message=f"{target} runs in the victim {note}")
        killed_at = self.kill(victim)
        for p in others:
            self.finish(p)
        runs = runs_in(self.log)
        self.assertEqual(sorted(runs), list(range(1, total + 1)), note)
        survivors = {str(p.pid) for p in others}
        again = {}
        for job_id, job_runs in runs.items():
            *cut, last = job_runs
            self.assertIn(last["tag"], survivors | {str(victim.pid)}, note)
            self.assertIsNotNone(last["end"], f"job {job_id}: {job_runs} {note}")
            if cut:
                self.assertEqual([r["tag"] for r in cut], [str(victim.pid)],
                                 f"job {job_id} ran again: {job_runs} {note}")
                self.assertIn(last["tag"], survivors)
                again[job_id] = (last["start"] - killed_at) / 1e9
        self.assertLessEqual(len(again), 2, f"more re-runs than processors: {again} {note}")
        for job_id, taken in again.items():
            self.assertTrue(0 < taken < lease, f"job {job_id} ran again {taken:.3f} s"
                            f" after the kill {note}")
        self.assert_runs_never_overlap(runs, {str(victim.pid): killed_at}, note)
        bl.start()
        self.assertEqual(bl.stats()["complete"], total)

    def test_live_process_keeps_its_job_past_the_lease(self):
        # A job that runs for 4 leases in a live process is not taken back by
        # the others, however often they look.
        lease = 0.25
        body = MP_HOLD_CHILD.replace(
            "hold=lambda job: job.data == \"hold\" and job.attempt == 1",
            "hold=lambda job: time.sleep(job.data) or False")   # the job's work
        self.create()
        children = [self.spawn(body, self.path, self.log, lease, 3) for _ in range(3)]
        self.wait_lines("ready", count=3, children=children)
        bl = self.queue(lease=lease)
        ids = [bl.enqueue("long", 4 * lease) for _ in range(3)]
        for p in children:
            self.finish(p)
        runs = runs_in(self.log)
        for job_id in ids:
            self.assertEqual(len(runs[job_id]), 1, f"job {job_id} ran again: {runs[job_id]}")
            self.assertEqual(bl.get_job(job_id).attempt, 1)
        self.assert_runs_never_overlap(runs)

    def test_restart_takes_back_its_own_jobs_at_once(self):
        # One process, a long lease: after kill -9 the next start runs the
        # interrupted job at once, and fails the one out of tries.
        lease = 60.0
        bl = self.queue()
        again = bl.enqueue("hold", "hold")
        last = bl.enqueue("hold", "hold", retries=0)
        bl.stop()
        first = self.spawn(MP_HOLD_CHILD, self.path, self.log, lease, 10 ** 9)
        self.wait_lines("S", count=2, children=[first])
        killed_at = self.kill(first)
        second = self.spawn(MP_HOLD_CHILD, self.path, self.log, lease, 2)
        self.finish(second, timeout=lease / 2)
        runs = runs_in(self.log)
        self.assertEqual([r["attempt"] for r in runs[again]], [1, 2])
        taken = (runs[again][1]["start"] - killed_at) / 1e9
        self.assertLess(taken, 5.0, f"the restarted process waited {taken:.2f} s")
        self.assertEqual(len(runs[last]), 1)
        self.assert_runs_never_overlap(runs, {str(first.pid): killed_at})
        bl.start()
        self.assertEqual(bl.get_job(again).state, "complete")
        info = bl.get_job(last)
        self.assertEqual((info.state, info.attempt), ("failed", 1))
        self.assertIn("interrupted", info.error)

    def test_enqueue_wakes_another_process_promptly(self):
        # Parent enqueues, an idle child runs; a child enqueues, the idle
        # parent runs.  Each run starts well under a second after its enqueue.
        rounds = 8
        body = """
        db, log_path, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
        log = open_log(log_path)
        bl = new_queue(db)
        bl.register_processor(logged(log), names="to-child")
        bl.start()
        log("ready", PID)

        def parent_ran(n):
            with open(log_path) as f:
                lines = f.read().splitlines()
            return "go ." in lines and len([1 for line in lines if line.startswith("P ")]) >= n
        for i in range(rounds):
            wait_for(lambda: parent_ran(i))
            t = time.monotonic_ns()
            job_id = bl.enqueue("to-parent", i)
            log("Q", job_id, t)
        wait_for(lambda: bl.stats()["complete"] >= 2 * rounds)
        bl.stop()
        """
        started = {}
        log_fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.addCleanup(os.close, log_fd)

        def run(job):
            started[job.id] = time.monotonic_ns()
            os.write(log_fd, f"P {job.id} .\n".encode())

        bl = self.queue()
        child = self.spawn(body, self.path, self.log, rounds)
        self.wait_lines("ready", children=[child])
        latencies = []
        for i in range(rounds):
            before = len(self.lines("E"))
            t = time.monotonic_ns()
            job_id = bl.enqueue("to-child", i)
            self.wait_lines("E", count=before + 1, children=[child])
            (s,) = [f for f in self.lines("S") if int(f[1]) == job_id]
            latencies.append((int(s[4]) - t) / 1e9)
        bl.register_processor(run, names="to-parent")
        os.write(log_fd, b"go .\n")
        self.finish(child)
        for f in self.lines("Q"):
            latencies.append((started[int(f[1])] - int(f[2])) / 1e9)
        self.assertEqual(len(latencies), 2 * rounds)
        note = "latencies: " + ", ".join(f"{x:.3f}" for x in latencies)
        self.assertLess(max(latencies), 0.6, note)
        self.assertLess(statistics.median(latencies), 0.2, note)

    @file_only
    def test_contention_never_shows_database_is_locked(self):
        # Three processes enqueue, inspect and process as hard as they can (one
        # with sync="full"), and a fourth starts in the middle of it: no call
        # of theirs, and no log record of blero's, mentions a locked database.
        body = """
        import logging, random
        db, log_path, sync, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        log = open_log(log_path)
        problems = []

        class Catch(logging.Handler):
            def emit(self, record):
                problems.append("log: " + record.getMessage())
        logging.getLogger("blero").addHandler(Catch(logging.WARNING))

        def call(fn, *args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                problems.append("%s: %s" % (type(exc).__name__, exc))

        bl = new_queue(db, sync=sync)
        def run(job):
            log("S", job.id, PID, job.attempt, time.monotonic_ns())
            call(bl.get_job, job.id)
            call(bl.stats)
            log("E", job.id, PID, job.attempt, time.monotonic_ns())
        bl.register_processor(run)
        bl.register_processor(run)
        call(bl.start)
        log("ready", PID)
        rng = random.Random(PID)
        mine = []
        for i in range(rounds):
            if i % 4 == 3:
                mine += call(bl.enqueue_many, [("c", i)] * 10) or []
            else:
                mine.append(call(bl.enqueue, "c", i))
            call(bl.get_job, rng.choice(mine))
            if i % 10 == 0:
                call(bl.stats)
                call(bl.jobs, state="pending", limit=10)
        log("done", PID, len(mine))
        call(bl.join, 60)
        call(bl.stop)
        for problem in problems:
            print(problem)
        """
        bl = self.queue()
        bl.stop()                    # the file exists: this test is not about creating it
        children = [self.spawn(body, self.path, self.log, sync, 150)
                    for sync in ("normal", "normal", "full")]
        self.wait_lines("E", count=100, children=children)
        late = self.spawn(body, self.path, self.log, "normal", 40)
        for p in children + [late]:
            out = self.finish(p)
            if out:
                self.fail(f"problems in child {p.pid}:\n{out}")
        runs = runs_in(self.log)
        total = sum(int(f[2]) for f in self.lines("done"))
        self.assertEqual(total, 3 * (150 + 150 // 4 * 9) + 40 + 40 // 4 * 9)
        self.assertEqual(sorted(runs), list(range(1, total + 1)))
        self.assertEqual({i: r for i, r in runs.items() if len(r) != 1}, {})
        bl.start()
        self.assertEqual(bl.stats()["complete"], total)

    @file_only
    def test_start_waits_for_another_process_holding_the_write_lock(self):
        # A write transaction of another process that lasts a while (as a
        # big enqueue_many does) makes start() wait, as enqueue() waits; it
        # never raises "database is locked".
        self.create()
        holder = self.spawn("""
        import sqlite3
        db, log_path, release = sys.argv[1], sys.argv[2], sys.argv[3]
        log = open_log(log_path)
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        log("locked", PID)
        wait_for(lambda: os.path.exists(release))
        con.execute("COMMIT")
        """, self.path, self.log, os.path.join(self.dir, "release"))
        self.wait_lines("locked", children=[holder])
        starter = self.spawn("""
        db, log_path, go = sys.argv[1], sys.argv[2], sys.argv[3]
        log = open_log(log_path)
        bl = new_queue(db)
        bl.register_processor(logged(log))
        log("waiting", PID)
        wait_for(lambda: os.path.exists(go))
        log("starting", PID)
        bl.start()
        bl.wait(bl.enqueue("x", 1), 10)
        bl.stop()
        """, self.path, self.log, os.path.join(self.dir, "go"))
        self.wait_lines("waiting", children=[starter])
        with open(os.path.join(self.dir, "go"), "w"):
            pass
        self.wait_lines("starting", children=[starter])
        # Past SQLite's busy timeout (1 s) the starter must still be waiting
        # (and, released after that, end well: finish() checks its exit).
        try:
            wait_until(lambda: starter.poll() is not None, timeout=1.5)
        except AssertionError:
            pass    # still waiting, as it should
        else:
            self.fail(f"start() gave up while another process wrote:\n{self.output(starter)}")
        with open(os.path.join(self.dir, "release"), "w"):
            pass
        self.finish(holder)
        self.finish(starter)
        self.assertEqual(len(self.lines("E")), 1)

    @file_only
    def test_processes_starting_together_on_a_new_file(self):
        # Three processes open a file that does not exist yet at the same
        # moment: all of them start, and share the queue.
        body = """
        db, log_path, go = sys.argv[1], sys.argv[2], sys.argv[3]
        log = open_log(log_path)
        bl = new_queue(db)
        bl.register_processor(logged(log))
        log("waiting", PID)
        while not os.path.exists(go):
            pass
        bl.start()
        log("started", PID)
        bl.enqueue("x", PID)
        wait_for(lambda: bl.stats()["complete"] >= 3, timeout=20)
        bl.stop()
        """
        for n in range(4):
            with self.subTest(round=n):
                path = os.path.join(self.dir, f"new{n}", "q.db")
                go = os.path.join(self.dir, f"go{n}")
                log = os.path.join(self.dir, f"log{n}")
                children = [self.spawn(body, path, log, go) for _ in range(3)]
                wait_until(lambda: len(read_lines(log)) >= 3, message="children waiting")
                with open(go, "w"):
                    pass

                def started_or_exited():
                    started = {f[1] for f in read_lines(log) if f[0] == "started"}
                    return all(p.poll() is not None or str(p.pid) in started for p in children)
                wait_until(started_or_exited, 20, message="children started")
                failed = [f"child {p.pid} exited {p.returncode}:\n{self.output(p)}"
                          for p in children if p.poll() is not None and p.returncode != 0]
                if failed:
                    for p in children:
                        p.kill()
                self.assertEqual(failed, [], "\n".join(failed))
                for p in children:
                    self.finish(p, timeout=30)
                self.assertEqual(sorted(int(f[1]) for f in read_lines(log) if f[0] == "E"),
                                 [1, 2, 3])

    @file_only
    def test_two_queues_on_one_file_in_one_process_keep_their_jobs(self):
        # The same file under two spellings in one process: stopping one
        # queue must not make the other look dead to other processes (POSIX
        # locks all go when any descriptor of the file is closed).
        body = """
        db, log_path, release = sys.argv[1], sys.argv[2], sys.argv[3]
        log = open_log(log_path)
        other = blero.new(os.path.join(os.path.dirname(db), ".", os.path.basename(db)))
        other.start()
        bl = new_queue(db)
        bl.register_processor(logged(log, hold=lambda job: wait_for(
            lambda: os.path.exists(release))))
        bl.start()
        bl.enqueue("x")
        wait_for(lambda: bl.stats()["inprogress"] == 1)
        other.stop()
        log("stopped", PID)
        bl.join(30)
        bl.stop()
        """
        release = os.path.join(self.dir, "release")
        holder = self.spawn(body, self.path, self.log, release)
        self.wait_lines("stopped", children=[holder])
        bl = self.queue()            # start() takes back the jobs of dead owners
        self.assertEqual(bl.get_job(1).state, "inprogress",
                         "the job of a live process was taken back")
        with open(release, "w"):
            pass
        self.finish(holder)
        self.assertEqual(len(runs_in(self.log)[1]), 1)


# ---------------------------------------------------------------------------
# kill -9 at random points
# ---------------------------------------------------------------------------

# argv: db, log, life (index), seed, jobs to enqueue, final (0/1).  Lines:
# "begin life", "ready life", "Q life id...", "S id life attempt t", "E ...",
# "idle life".
MP_TORTURE_CHILD = """
import random
db, log_path, life, seed, quota, final = sys.argv[1:7]
life, quota, final = int(life), int(quota), final == "1"
rng = random.Random(int(seed))
log = open_log(log_path)

def run(job):
    log("S", job.id, life, job.attempt, time.monotonic_ns())
    end = time.perf_counter() + job.data
    while time.perf_counter() < end:
        pass
    log("E", job.id, life, job.attempt, time.monotonic_ns())

bl = new_queue(db, retries=1000, lease=60.0)
bl.register_processor(run)
bl.register_processor(run)
log("begin", life)
bl.start()
log("ready", life)
made = 0
while made < quota:
    k = rng.choice((1, 1, 1, 4))
    if k == 1:
        ids = [bl.enqueue("t", rng.random() * 0.003)]
    else:
        ids = bl.enqueue_many([("t", rng.random() * 0.003) for _ in range(k)])
    made += k
    log("Q", life, *ids)
if not bl.join(60):
    sys.exit("join timed out")
log("idle", life)
if final:
    bl.stop()
else:
    threading.Event().wait()
"""


class KillTortureTest(ProcessTest):
    """Kill -9 at random points, again and again.  BLERO_TEST_KILLS=200 asks
    for a nightly-sized run; BLERO_TEST_SEED=n repeats a run."""

    KILLS = int(os.environ.get("BLERO_TEST_KILLS") or 30)

    def test_kill_9_at_random_points_loses_nothing(self):
        seed = int(os.environ.get("BLERO_TEST_SEED") or random.randrange(2 ** 32))
        note = (f"(seed {seed}, {self.KILLS} kills: rerun with BLERO_TEST_SEED={seed}"
                f" BLERO_TEST_KILLS={self.KILLS})")
        print(f"\nkill -9 torture {note}", file=sys.stderr)
        rng = random.Random(seed)
        kills = {}
        for life in range(self.KILLS):
            p = self.spawn(MP_TORTURE_CHILD, self.path, self.log, life,
                           rng.randrange(2 ** 32), 30, 0)
            target = rng.choice((0, 0, 1, 2)) if rng.random() < 0.15 else rng.randrange(3, 110)

            def reached():
                if p.poll() is not None:
                    self.fail(f"life {life} exited ({p.returncode}) {note}:\n{self.output(p)}")
                mine = [f for f in read_lines(self.log)
                        if (f[2] if f[0] in "SE" else f[1]) == str(life)]
                if not mine:
                    return False
                return len(mine) > target or mine[-1][0] == "idle"
            wait_until(reached, 30, message=f"life {life} to reach line {target} {note}")
            kills[str(life)] = self.kill(p)
        final = self.spawn(MP_TORTURE_CHILD, self.path, self.log, self.KILLS, 0, 0, 1)
        self.finish(final, timeout=30)

        enqueued = [int(i) for f in self.lines("Q") for i in f[2:-1]]
        self.assertEqual(enqueued, sorted(set(enqueued)), f"ids increase, never reused {note}")
        self.assertGreater(len(enqueued), self.KILLS, note)
        bl = self.queue()
        stored = {info.id: info for info in bl.jobs(limit=None)}
        self.assertEqual({i for i in enqueued if i not in stored}, set(),
                         f"enqueued jobs lost {note}")
        self.assertEqual({i: info.state for i, info in stored.items()
                          if info.state != "complete"}, {}, f"jobs not complete {note}")

        runs = runs_in(self.log)
        cut = {str(life): 0 for life in range(self.KILLS)}    # re-runs each kill caused
        for job_id, info in stored.items():
            job_runs = runs.get(job_id, [])
            self.assertTrue(job_runs, f"job {job_id} complete but never ran {note}")
            attempts = [r["attempt"] for r in job_runs]
            self.assertEqual(attempts, sorted(set(attempts)), f"job {job_id}: {job_runs} {note}")
            self.assertIsNotNone(job_runs[-1]["end"], f"job {job_id}: {job_runs} {note}")
            self.assertEqual(info.attempt, job_runs[-1]["attempt"], f"job {job_id} {note}")
            lives = [r["tag"] for r in job_runs]
            self.assertEqual(len(lives), len(set(lives)),
                             f"job {job_id} ran twice in one life {note}")
            for run in job_runs[:-1]:
                self.assertIn(run["tag"], kills,
                              f"job {job_id} ran again though no kill cut it: {job_runs} {note}")
                cut[run["tag"]] += 1
        self.assertLessEqual(max(cut.values()), 2,
                             f"a kill re-ran more jobs than processors: {cut} {note}")
        self.assert_runs_never_overlap(runs, kills, note)


# ---------------------------------------------------------------------------
# Hardening: files that cannot be used, and storage that fails
# ---------------------------------------------------------------------------

def dir_state(directory):
    """{name: digest} of every file in `directory`."""
    return {name: file_digest(os.path.join(directory, name)) for name in os.listdir(directory)
            if os.path.isfile(os.path.join(directory, name))}


class HardeningTest(ProcessTest):

    def assert_refused(self, path, *words):
        """`start()` on `path` raises BleroError naming the path and each of
        `words` (any one of a tuple), and leaves its directory as it was."""
        directory = os.path.dirname(path)
        before = dir_state(directory) if os.path.isdir(directory) else None
        bl = blero.new(path)
        with self.assertRaises(blero.BleroError) as cm:
            bl.start()
        message = str(cm.exception)
        self.assertIn(path, message)
        for word in words:
            choices = word if isinstance(word, tuple) else (word,)
            self.assertTrue(any(w.lower() in message.lower() for w in choices),
                            f"{choices} not in {message!r}")
        if before is not None:
            self.assertEqual(dir_state(directory), before, "files changed or left behind")
        with self.assertRaises(blero.BleroError):
            bl.enqueue("x")
        bl.stop()
        return message

    def test_a_wal_a_reader_cannot_read_without_the_shm_is_read_by_one_that_may(self):
        # After a kill -9 mid-write, a reader that may not write the -shm
        # meets "locking protocol" until one rebuilds it (the kill -9
        # torture met it): the judging of the file falls back to such a reader.
        running = self.queue()
        running.enqueue("x")
        self.assertTrue(os.path.exists(self.path + "-shm"))
        judge, tried = blero._SQLiteStorage._judge, []

        def recovering(storage, params, check):
            tried.append(params)
            if "readonly_shm" in params:
                raise sqlite3.OperationalError("locking protocol")
            return judge(storage, params, check)
        self.addCleanup(setattr, blero._SQLiteStorage, "_judge", judge)
        blero._SQLiteStorage._judge = recovering
        self.assertEqual(blero.new(self.path).stats()["pending"], 1)
        self.assertEqual(tried[-1], "", "the last reader may rebuild the -shm")

    def make_queue(self, path, jobs=0, size=0):
        bl = blero.new(path)
        bl.start()
        bl.enqueue_many([("j", os.urandom(size) if size else i) for i in range(jobs)])
        bl.stop()
        self.assertEqual([s for s in ("-wal", "-shm") if os.path.exists(path + s)], [])
        return path

    def test_disk_full_during_enqueue(self):
        body = """
        import resource
        db, limit = sys.argv[1], int(sys.argv[2])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        bl = new_queue(db)
        bl.start()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        ids, error, after = [], None, []
        for i in range(200):
            try:
                ids.append(bl.enqueue("big", (i, bytes([i]) * 50000)))
            except blero.BleroError as exc:
                error = str(exc)
                break
        for i in range(3):     # the queue does not hang; every call fails cleanly
            try:
                after.append(bl.enqueue("small", i))
            except blero.BleroError as exc:
                after.append(str(exc))
        try:                   # may raise BleroError, but must stop everything
            bl.stop(5)
            stopped = "ok"
        except blero.BleroError as exc:
            stopped = str(exc)
        deadline = time.monotonic() + 2
        while True:
            threads = [t.name for t in threading.enumerate() if t.name.startswith("blero")]
            if not threads or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        print(json.dumps({"ids": ids, "error": error, "after": after, "stopped": stopped,
                          "threads": threads}))
        """
        out = run_child(mp_child(body), self.path, 1 << 20, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        report = json.loads(out.stdout)
        ids, error = report["ids"], report["error"]
        self.assertTrue(ids, report)
        self.assertIsNotNone(error, report)
        self.assertIn(self.path, error)
        self.assertTrue("full" in error or "disk I/O" in error, error)
        bl = self.queue()
        db = sqlite3.connect(self.path)
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        db.close()
        small = [x for x in report["after"] if isinstance(x, int)]
        self.assertEqual([info.id for info in bl.jobs(limit=None)], ids + small)
        for n, job_id in enumerate(ids):
            self.assertEqual(bl.get_job(job_id).data, (n, bytes([n]) * 50000))
        done = []
        bl.register_processor(lambda job: done.append(job.id))
        job_id = bl.enqueue("after", 1)
        self.assertEqual(bl.wait(job_id, 10), None)
        self.assertEqual(sorted(done), ids + small + [job_id])
        self.assertEqual(report["threads"], [], "blero threads still running after stop")

    def test_file_removed_under_a_running_queue(self):
        threads = set(threading.enumerate())
        bl = self.queue()
        bl.register_processor(lambda job: None)
        bl.wait(bl.enqueue("a"), 10)
        os.remove(self.path)
        with self.assertRaises(blero.BleroError) as cm:
            bl.enqueue("b")
        self.assertIn(self.path, str(cm.exception))
        self.assertIn("removed", str(cm.exception))
        leftover = self.stop_after_failure(bl, threads)
        self.assertFalse(os.path.exists(self.path), "stop made the file again")
        # A queue made there afterwards is new and empty, not the old one's WAL.
        fresh = self.queue()
        self.assertEqual(sum(fresh.stats().values()), 0)
        self.assertEqual(leftover, [], "threads still running after stop")

    def test_file_replaced_under_a_running_queue(self):
        other = self.make_queue(os.path.join(self.dir, "other", "q.db"), jobs=3)
        replacement = os.path.join(self.dir, "replacement.db")
        with open(other, "rb") as src, open(replacement, "wb") as dst:
            dst.write(src.read())
        digest = file_digest(replacement)
        threads = set(threading.enumerate())
        bl = self.queue()
        bl.register_processor(lambda job: None)
        bl.wait(bl.enqueue_many([("a", i) for i in range(50)])[-1], 10)
        os.replace(replacement, self.path)
        with self.assertRaises(blero.BleroError) as cm:
            bl.enqueue("b")
        self.assertIn(self.path, str(cm.exception))
        self.assertIn("replaced", str(cm.exception))
        leftover = self.stop_after_failure(bl, threads)
        self.assertEqual(file_digest(self.path), digest, "the new file was written to")
        wal = self.path + "-wal"
        self.assertFalse(os.path.exists(wal) and os.path.getsize(wal),
                         "the old queue's WAL lingers beside the new file")
        # Opening the new file shows its own jobs, not the old queue's.
        self.assertEqual([info.data for info in self.queue().jobs()], [0, 1, 2])
        self.assertEqual(leftover, [], "threads still running after stop")

    @unittest.skipIf(ROOT, "root ignores file permissions")
    def test_read_only_file(self):
        self.make_queue(self.path, jobs=2)
        os.chmod(self.path, 0o400)
        self.addCleanup(os.chmod, self.path, 0o600)
        self.assert_refused(self.path, ("read", "permission"))

    @unittest.skipIf(ROOT, "root ignores file permissions")
    def test_read_only_directory(self):
        self.make_queue(self.path, jobs=2)
        os.chmod(self.dir, 0o500)
        self.addCleanup(os.chmod, self.dir, 0o700)
        self.assert_refused(self.path)
        self.assert_refused(os.path.join(self.dir, "new.db"), ("permission", "denied"))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "new.db")))

    def test_parent_is_a_regular_file(self):
        parent = os.path.join(self.dir, "plain")
        with open(parent, "w") as f:
            f.write("not a directory\n")
        for path in (os.path.join(parent, "q.db"), os.path.join(parent, "sub", "q.db")):
            with self.subTest(path=path):
                bl = blero.new(path)
                with self.assertRaises(blero.BleroError) as cm:
                    bl.start()
                self.assertIn(path, str(cm.exception))
                self.assertIn("not a directory", str(cm.exception).lower())
                self.assertEqual(os.listdir(self.dir), ["plain"])
                with open(parent) as f:
                    self.assertEqual(f.read(), "not a directory\n")

    def test_wal_left_by_a_crash_is_recovered(self):
        body = """
        db, log_path = sys.argv[1], sys.argv[2]
        log = open_log(log_path)
        bl = new_queue(db)
        bl.start()
        for i in range(60):
            log("Q", bl.enqueue("w", {"i": i}))
        log("Q", *bl.enqueue_many([("w", {"i": i}) for i in range(60, 100)]))
        log("done")
        threading.Event().wait()
        """
        p = self.spawn(body, self.path, self.log)
        self.wait_lines("done", children=[p])
        self.kill(p)
        ids = [int(i) for f in self.lines("Q") for i in f[1:-1]]
        self.assertEqual(ids, list(range(1, 101)))
        self.assertGreater(os.path.getsize(self.path + "-wal"), 0, "no WAL left")
        # The jobs are in the WAL only: the main file alone does not hold them.
        alone = os.path.join(self.dir, "alone", "q.db")
        os.mkdir(os.path.dirname(alone))
        with open(self.path, "rb") as src, open(alone, "wb") as dst:
            dst.write(src.read())
        db = sqlite3.connect(alone)
        try:
            in_main_file = db.execute("SELECT count(*) FROM blero_jobs").fetchall()[0][0]
        except sqlite3.OperationalError:     # not even the schema is there
            in_main_file = 0
        db.close()
        self.assertLess(in_main_file, 100)
        bl = self.queue()
        self.assertEqual(bl.stats()["pending"], 100)
        self.assertEqual([info.data for info in bl.jobs(limit=None)],
                         [{"i": i} for i in range(100)])
        bl.register_processor(lambda job: job.data["i"])
        self.assertTrue(bl.join(10))
        self.assertEqual([bl.get_job(i).result for i in ids], list(range(100)))

    def test_newer_schema_is_refused(self):
        self.make_queue(self.path, jobs=2)
        db = sqlite3.connect(self.path)
        db.execute(f"PRAGMA user_version = {blero._SCHEMA_VERSION + 1}")
        db.close()
        self.assert_refused(self.path, "newer")

    def test_foreign_sqlite_database_is_refused(self):
        cases = {
            "rollback": ("PRAGMA journal_mode = DELETE",
                         "CREATE TABLE t (x)", "INSERT INTO t VALUES (1)"),
            "wal": ("PRAGMA journal_mode = WAL", "CREATE TABLE t (x)",
                    "INSERT INTO t VALUES (1)"),
            "other-app-empty": ("PRAGMA application_id = 1234",),
            "other-app-jobs": ("PRAGMA application_id = 1234",
                               "CREATE TABLE blero_jobs (id INTEGER PRIMARY KEY)"),
            "no-app-id-jobs": ("CREATE TABLE blero_jobs (id INTEGER PRIMARY KEY)",
                               "CREATE TABLE blero_owners (id)", "CREATE TABLE blero_schedules (key)"),
        }
        for name, statements in cases.items():
            with self.subTest(name):
                path = os.path.join(self.dir, name, "foreign.db")
                os.mkdir(os.path.dirname(path))
                db = sqlite3.connect(path)
                for sql in statements:
                    db.execute(sql)
                db.commit()
                db.close()
                self.assert_refused(path, "not a blero")

    def test_non_sqlite_files_are_refused(self):
        rng = random.Random(7)
        cases = {
            "text": b"hello, this is not a database\n" * 100,
            "binary": bytes(rng.randrange(256) for _ in range(10000)),
            "magic-only": b"SQLite format 3\x00",
            "one-byte": b"\x00",
            "zeros": b"\x00" * 8192,
        }
        self.assert_files_refused(cases, ("not an sqlite", "damaged", "not a database"))

    def assert_files_refused(self, cases, words):
        """Each of `cases` ({name: file content}) is refused with one of `words`."""
        for name, content in cases.items():
            with self.subTest(name):
                path = os.path.join(self.dir, name, "q.db")
                os.mkdir(os.path.dirname(path))
                with open(path, "wb") as f:
                    f.write(content)
                self.assert_refused(path, words)

    def test_damaged_queue_is_refused(self):
        source = self.make_queue(os.path.join(self.dir, "src", "q.db"), jobs=300, size=1000)
        with open(source, "rb") as f:
            good = f.read()
        page = int.from_bytes(good[16:18], "big")
        pages = len(good) // page
        self.assertGreater(pages, 20)
        rng = random.Random(11)

        def garbage(n):
            return bytes(rng.randrange(256) for _ in range(n))

        cases = {
            "header": garbage(100) + good[100:],
            "header-after-magic": good[:16] + garbage(84) + good[100:],
            "page-2": good[:page] + garbage(page) + good[2 * page:],
            "pages-2-on": good[:page] + garbage(len(good) - page),
            "middle-page": good[:page * (pages // 2)] + garbage(page)
            + good[page * (pages // 2 + 1):],
            "last-page": good[:-page] + garbage(page),
            "truncated-half": good[:page * (pages // 2)],
            "truncated-one-page": good[:page],
            "truncated-mid-page": good[:page + page // 2],
            "truncated-header": good[:50],
        }
        self.assert_files_refused(cases, ("damaged", "malformed", "not an sqlite",
                                          "not a database", "not a blero"))

    def test_new_files_have_mode_0600(self):
        body = """
        os.umask(0)
        db = sys.argv[1]
        bl = new_queue(db)
        bl.start()
        bl.enqueue("x", 1)
        modes = {suffix: os.stat(db + suffix).st_mode & 0o777
                 for suffix in ("", "-wal", "-shm", "-lock") if os.path.exists(db + suffix)}
        bl.stop()
        print(json.dumps(modes))
        """
        out = run_child(mp_child(body), self.path)
        self.assertEqual(out.returncode, 0, out.stderr)
        modes = json.loads(out.stdout)
        self.assertEqual({k: oct(v) for k, v in modes.items()},
                         {k: "0o600" for k in ("", "-wal", "-shm", "-lock")})


# ---------------------------------------------------------------------------
# Serializers across processes
# ---------------------------------------------------------------------------

class MakesMarker:
    """Pickles to a call of open(marker, "w"): unpickling it makes the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SerializerAcrossProcessesTest(ProcessTest):

    def test_json_end_to_end_across_processes(self):
        body = """
        db, log_path, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
        log = open_log(log_path)
        bl = new_queue(db, serializer=json)
        def run(job):
            log("S", job.id, PID, job.attempt, time.monotonic_ns())
            log("E", job.id, PID, job.attempt, time.monotonic_ns())
            return {"echo": job.data, "by": "child"}
        bl.register_processor(run)
        bl.start()
        ids = [bl.enqueue("from-child", {"pid": PID, "n": n, "s": "h\u00e9llo \u2603"})
               for n in range(5)]
        log("Q", *ids)
        wait_for(lambda: bl.stats()["complete"] >= total)
        info = bl.get_job(1)
        print(json.dumps({"data": info.data, "result": info.result}))
        bl.stop()
        """
        bl = self.queue(serializer=json)
        data = [{"n": n, "list": [1, 2.5, None, True], "text": "\u00fcnicode \u2603"}
                for n in range(20)]
        ids = bl.enqueue_many([("from-parent", d) for d in data])
        with self.assertRaises(TypeError):
            bl.enqueue("bad", {1, 2})
        with self.assertRaises(TypeError):
            bl.enqueue("bad", b"bytes")
        self.assertEqual(sum(bl.stats().values()), 20, "refused data stored nothing")
        total = 20 + 2 * 5
        children = [self.spawn(body, self.path, self.log, total) for _ in range(2)]
        outs = [self.finish(p) for p in children]
        for out in outs:
            self.assertEqual(json.loads(out), {"data": data[0],
                                               "result": {"echo": data[0], "by": "child"}})
        for job_id, d in zip(ids, data):
            info = bl.get_job(job_id)
            self.assertEqual((info.state, info.data, info.result),
                             ("complete", d, {"echo": d, "by": "child"}))
        child_jobs = bl.jobs(name="from-child", limit=None)
        self.assertEqual(len(child_jobs), 10)
        for info in child_jobs:
            self.assertEqual(info.data["s"], "h\u00e9llo \u2603")
            self.assertEqual(info.result, {"echo": info.data, "by": "child"})
        runs = runs_in(self.log)
        self.assertEqual({i: len(r) for i, r in runs.items() if len(r) != 1}, {})

    def test_json_never_unpickles_a_pickle_written_queue(self):
        proof = os.path.join(self.dir, "proof")
        pickle.loads(pickle.dumps(MakesMarker(proof))).close()
        self.assertTrue(os.path.exists(proof), "the payload works when unpickled")

        marker = os.path.join(self.dir, "marker")
        bl = self.queue()
        evil_data = bl.enqueue("evil", MakesMarker(marker))
        plain = bl.enqueue("plain", "just a string")
        nothing = bl.enqueue("nothing")
        done = bl.enqueue("done")
        bl.register_processor(lambda job: MakesMarker(marker), names="done")
        wait_until(lambda: bl.stats()["complete"] == 1)   # never get_job: it would unpickle
        bl.stop()
        self.assertFalse(os.path.exists(marker))

        body = """
        db, log_path = sys.argv[1], sys.argv[2]
        log = open_log(log_path)
        bl = new_queue(db, serializer=json)
        bl.register_processor(logged(log))
        bl.start()
        bl.join(30)
        report = {info.id: [info.state, info.data, info.result, info.error]
                  for info in bl.jobs(limit=None)}
        bl.stop()
        print(json.dumps(report))
        """
        p = self.spawn(body, self.path, self.log)
        report = {int(k): v for k, v in json.loads(self.finish(p)).items()}
        self.assertFalse(os.path.exists(marker), "serializer=json unpickled a payload")
        for job_id in (evil_data, plain):
            state, data, result, error = report[job_id]
            self.assertEqual((state, data, result), ("failed", None, None))
            self.assertIn("deserialize", error)
        self.assertEqual(report[nothing][:3], ["complete", None, None])
        self.assertEqual(report[done][:3], ["complete", None, None])
        ran = {int(f[1]) for f in self.lines("S")}
        self.assertEqual(ran, {nothing}, "the processor saw undecodable data")


# ---------------------------------------------------------------------------
# Bad values, and the smaller findings of issue 8 (#11, #13)
# ---------------------------------------------------------------------------

def call_within(test, fn, timeout=10.0):
    """Call `fn` on a thread; return what it raised (None if nothing).  A
    call that hangs fails the test after `timeout` seconds, not the suite."""
    box = []

    def run():
        try:
            fn()
            box.append(None)
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        test.fail(f"still running after {timeout} s: it hangs")
    return box[0]


BIG = 2 ** 63            # one past SQLite's largest INTEGER
NAN, INF = float("nan"), float("inf")
LONG_AGO = datetime.datetime(1, 1, 1)                    # naive: no epoch time for it
BEFORE_1970 = datetime.datetime(1900, 1, 1, tzinfo=datetime.timezone.utc)


def bad_seconds(positive=False):
    """Durations no call may take: (value, exception)."""
    values = [(NAN, ValueError), (INF, ValueError), (-INF, ValueError), (-1, ValueError),
              (10 ** 400, ValueError), ("1", TypeError), (True, TypeError)]
    return values + ([(0, ValueError)] if positive else [])


def bad_ids():
    return [(BIG, ValueError), (0, ValueError), (-1, ValueError), (True, TypeError),
            (1.0, TypeError), ("1", TypeError)]


class BadValuesTest(TempDirTest):
    """A user who passes a bad number anywhere gets a ValueError or TypeError
    naming the argument, at the call: no hang, no spin, no raw OverflowError,
    and nothing stored."""

    def cases(self, bl):
        """(what is called, the call, the exception, the name its message gives)."""
        cases = []

        def add(label, name, values, call):
            for value, exc in values:
                shown = f"{value!r}" if len(repr(value)) < 30 else f"{repr(value)[:20]}..."
                cases.append((f"{label}={shown}", lambda v=value: call(v), exc, name))

        settings = {"retries": [(-1, ValueError), (BIG - 1, ValueError), (1.5, TypeError),
                                (True, TypeError)],
                    "backoff_base": bad_seconds(), "backoff_max": bad_seconds(),
                    "lease": bad_seconds(positive=True) + [(1e-300, ValueError),
                                                           (0.09, ValueError)],
                    "keep_complete": bad_seconds()}
        for setting, values in settings.items():
            add(f"new({setting})", setting, values,
                lambda v, s=setting: blero.new(os.path.join(self.dir, "x.db"), **{s: v}))
        job_options = {
            "delay": bad_seconds(),
            "run_at": bad_seconds() + [(LONG_AGO, ValueError), (BEFORE_1970, ValueError),
                                       (datetime.date(2030, 1, 1), TypeError)],
            "priority": [(BIG, ValueError), (-BIG - 1, ValueError), (1.5, TypeError),
                         (True, TypeError), ("high", TypeError)],
            "retries": [(-1, ValueError), (BIG - 1, ValueError), (1.0, TypeError)],
            "timeout": bad_seconds(positive=True)}
        for option, values in job_options.items():
            add(f"enqueue({option})", option, values,
                lambda v, o=option: bl.enqueue("x", **{o: v}))
            add(f"enqueue_many({option})", option, values,
                lambda v, o=option: bl.enqueue_many([("ok", 1), {"name": "x", o: v}]))
            add(f"every({option})", option, values,
                lambda v, o=option: bl.every(60, "x", key="refused", **{o: v}))
        add("every(interval)", "interval", bad_seconds(positive=True),
            lambda v: bl.every(v, "x", key="refused"))
        for option in ("priority", "retries", "timeout"):
            add(f"cron({option})", option, job_options[option],
                lambda v, o=option: bl.cron("* * * * *", "x", key="refused", **{o: v}))
        add("cron(expr)", "minute", [("61 * * * *", ValueError)],
            lambda v: bl.cron(v, "x", key="refused"))
        add("cron(tz)", "tz", [(5, TypeError), (1.5, TypeError), ("Mars/Olympus", ValueError)],
            lambda v: bl.cron("* * * * *", "x", key="refused", tz=v))
        for option, values in job_options.items():
            add(f"aenqueue({option})", option, values,
                lambda v, o=option: asyncio.run(bl.aenqueue("x", **{o: v})))
            add(f"aenqueue_many({option})", option, values,
                lambda v, o=option: asyncio.run(bl.aenqueue_many([{"name": "x", o: v}])))
        for option in ("priority", "retries", "timeout"):
            add(f"task({option})", option, job_options[option],
                lambda v, o=option: bl.task(name="refused", **{o: v})(len))
        add("task(concurrency)", "concurrency", [(0, ValueError), (1.5, TypeError),
                                                 (True, TypeError)],
            lambda v: bl.task(name="refused", concurrency=v)(len))
        add("executor(max_workers)", "max_workers", [(0, ValueError), (-1, ValueError),
                                                     (1.5, TypeError), (True, TypeError)],
            bl.executor)
        add("future", "job_id", bad_ids(), bl.future)
        add("get_job", "job_id", bad_ids(), bl.get_job)
        add("wait", "job_id", bad_ids(), lambda v: bl.wait(v, timeout=0))
        add("cancel", "job_id", bad_ids(), bl.cancel)
        add("retry_failed", "ids", [([v], e) for v, e in bad_ids()] + [
            (5, TypeError), ("12", TypeError)], bl.retry_failed)
        for label, call in (("wait", lambda v: bl.wait(self.pending, timeout=v)),
                            ("join", lambda v: bl.join(timeout=v)),
                            ("stop", lambda v: bl.stop(timeout=v))):
            add(f"{label}(timeout)", "timeout", bad_seconds(), call)
        add("jobs(limit)", "limit", [(BIG, ValueError), (-1, ValueError), (1.5, TypeError),
                                     (True, TypeError)], lambda v: bl.jobs(limit=v))
        add("jobs(name)", "name", [(BIG, TypeError)], lambda v: bl.jobs(name=v))
        add("sweep(older_than)", "older_than", bad_seconds(), bl.sweep)
        add("unschedule", "key", [(BIG, TypeError)], bl.unschedule)
        after = [(v, e) for v, e in bad_ids()] + [(1.5, TypeError), ([2.0], TypeError)]
        add("enqueue(after)", "after", after, lambda v: bl.enqueue("x", after=v))
        add("enqueue_many(after)", "after", after,
            lambda v: bl.enqueue_many([("ok", 1), {"name": "x", "after": v}]))
        for label, call in (("pause", bl.pause), ("resume", bl.resume),
                            ("limit", lambda v: bl.limit(v, concurrency=1))):
            add(label, "name", [(BIG, TypeError)], call)
        add("limit(concurrency)", "concurrency", [(0, ValueError), (BIG, ValueError),
                                                  (1.5, TypeError), (True, TypeError)],
            lambda v: bl.limit("x", concurrency=v))
        add("limit(rate)", "rate", [((0, 1), ValueError), ((BIG, 1), ValueError),
                                    ((1, math.nan), ValueError), ((1, -1), ValueError),
                                    ((1, math.inf), ValueError), ((True, 1), TypeError),
                                    (5, TypeError)],
            lambda v: bl.limit("x", rate=v))
        add("unregister_processor", "processor_id",
            [(True, TypeError), (1.0, TypeError), (0, ValueError)], bl.unregister_processor)
        add("serve_metrics(port)", "port", [(-1, ValueError), (65536, ValueError),
                                            (True, TypeError), ("80", TypeError)],
            lambda v: bl.serve_metrics(port=v))
        add("serve_metrics(host)", "host", [(5, TypeError)],
            lambda v: bl.serve_metrics(host=v))
        add("stop_on_signals", "signal", [(100000, ValueError), (BIG, ValueError),
                                          (-1, ValueError), (1.5, TypeError),
                                          (True, TypeError), ("SIGTERM", TypeError)],
            bl.stop_on_signals)
        return cases

    def test_every_call_refuses_bad_numbers_naming_them(self):
        bl = self.queue()
        self.pending = bl.enqueue("waits", delay=3600)
        cases = self.cases(bl)
        for label, call, expected, name in cases:
            with self.subTest(label):
                stored = bl.stats()
                exc = call_within(self, call)
                self.assertIsInstance(exc, expected, f"{label}: {exc!r}")
                self.assertIn(name, str(exc), f"{label}: the message names {name}")
                self.assertEqual(bl.stats(), stored, f"{label} stored something")
                self.assertFalse(bl.unschedule("refused"), f"{label} stored a schedule")
        # Every public method, setting and job option is in the table.
        called = {label.split("(")[0].split("=")[0] for label, _, _, _ in cases}
        public = {name for name in dir(blero.Blero) if not name.startswith("_")}
        takes_no_number = {"start", "stats", "metrics_text", "register_processor", "paused", "schedules",
                           "limits"}
        self.assertEqual(public - takes_no_number - called, set(), "methods left out")
        checked = {label.split("(")[1].split(")")[0] for label, _, _, _ in cases
                   if label.startswith(("new(", "enqueue("))}
        for fn, not_numbers in ((blero.Blero.__init__, {"self", "path", "sync", "on_complete",
                                                        "on_failed", "serializer", "schema"}),
                                (blero.Blero.enqueue, {"self", "name", "data", "key",
                                                       "connection"})):
            params = set(inspect.signature(fn).parameters)
            self.assertEqual(params - not_numbers - checked, set(), f"{fn.__name__} left out")
        # Refused, the queue was left as it was: still running, as before.
        bl.register_processor(lambda job: job.data * 2)
        self.assertEqual(bl.wait(bl.enqueue("x", 21), timeout=10), 42)

    def test_the_lowest_lease_is_a_tenth_of_a_second(self):
        with self.queue(lease=0.1, start=False) as bl:
            bl.register_processor(lambda job: "done")
            self.assertEqual(bl.wait(bl.enqueue("x"), timeout=10), "done")

    def test_the_largest_values_sqlite_holds_are_taken(self):
        bl = self.queue()
        top = bl.enqueue("top", priority=BIG - 1, retries=BIG - 2)
        bottom = bl.enqueue("bottom", priority=-BIG)
        info = bl.get_job(top)
        self.assertEqual((info.priority, info.max_attempts), (BIG - 1, BIG - 1))
        self.assertEqual(bl.get_job(bottom).priority, -BIG)
        self.assertIsNone(bl.get_job(BIG - 1))
        self.assertFalse(bl.cancel(BIG - 1))
        self.assertEqual(len(bl.jobs(limit=BIG - 1)), 2)
        when = datetime.datetime(9999, 12, 31)
        self.assertEqual(bl.get_job(bl.enqueue("far", run_at=when)).run_at, when.timestamp())

    def test_a_job_tried_over_a_thousand_times_still_ends(self):
        # Past try 1024 the backoff's 2**n no longer converted to a float:
        # the worker died and the job stayed inprogress for ever.
        bl = self.queue(retries=1100, backoff_base=0)
        bl.register_processor(lambda job: 1 / 0 if job.name == "doomed" else "ok")
        doomed = bl.enqueue("doomed")
        with self.assertRaises(blero.JobFailed):
            bl.wait(doomed, timeout=60)
        self.assertEqual(bl.get_job(doomed).attempt, 1101)
        self.assertEqual(bl.wait(bl.enqueue("next"), timeout=10), "ok", "the worker goes on")

    def test_stop_with_a_timeout_longer_than_the_os_can_wait(self):
        # threading's joins refuse more than threading.TIMEOUT_MAX seconds.
        bl = self.queue()
        bl.register_processor(lambda job: None)
        bl.wait(bl.enqueue("x"), timeout=10)
        self.assertIsNone(call_within(self, lambda: bl.stop(timeout=1e10)))
        wait_for_threads_to_end("blero-clock", "the clock thread to end")
        wait_for_threads_to_end("blero-timeouts", "the timeouts thread to end")
        self.assertEqual(bl.stats()["complete"], 1)

    def test_command_line_numbers_are_checked_and_limit_0_means_none(self):
        path = os.path.join(self.dir, "q.db")
        bl = self.queue()
        for i in range(3):
            bl.enqueue("x", i, delay=3600)
        bl.stop()
        bad = [(("cancel", "--db", path, "-5"), "ID"),
               (("cancel", "--db", path, BIG), "ID"),
               (("retry", "--db", path, "0"), "ID"),
               (("jobs", "--db", path, "--limit", BIG), "--limit"),
               (("jobs", "--db", path, "--limit", "-1"), "--limit"),
               (("jobs", "--db", path, "--limit", "1.5"), "--limit"),
               (("sweep", "--db", path, "--older-than", "nan"), "--older-than"),
               (("sweep", "--db", path, "--older-than", "inf"), "--older-than"),
               (("serve", "--db", path, "--port", "70000"), "--port"),
               (("demo", "--db", path, "-n", "0"), "-n"),
               (("demo", "--db", path, "--sleep", "nan"), "--sleep")]
        good = [("jobs", "--db", path, "--limit", "0", "--json"),
                ("jobs", "--db", path, "--limit", "all", "--json"),
                ("jobs", "--db", path, "--limit", "2", "--json")]
        results = run_clis(*[args for args, _ in bad], *good)
        for (args, name), (code, out, err) in zip(bad, results):
            with self.subTest(args=args):
                self.assertEqual(code, 2, (out, err))
                self.assertIn(f"argument {name}", err)
                self.assertNotIn("Traceback", err)
        for args, (code, out, err), count in zip(good, results[len(bad):], (0, 3, 2)):
            with self.subTest(args=args):
                self.assertEqual((code, err), (0, ""))
                self.assertEqual(len(json.loads(out)), count)
        self.assertEqual(self.stats_of(path)["pending"], 3, "nothing changed")

    def stats_of(self, path):
        return blero.new(path).stats()

    def test_the_dashboard_refuses_bad_ids_and_limits(self):
        bl = self.queue()
        job_id = bl.enqueue("x", delay=3600)
        server = bl.serve_metrics()
        own = {"Origin": f"http://127.0.0.1:{server.port}"}
        for bad in (True, 1.9, BIG, -1):
            with self.subTest(id=bad):
                status, _, body = http_request(server.port, "POST", "/api/cancel",
                                               {"id": bad}, own)
                self.assertEqual(status, 400, body)
                self.assertIn(b"job_id", body)
        self.assertEqual(bl.get_job(job_id).state, "pending")
        status, _, body = http_request(server.port, "GET", f"/api/jobs?limit={BIG}")
        self.assertEqual(status, 400, body)
        self.assertIn(b"limit", body)


@both_engines
class EnqueuedMetricTest(TempDirTest):
    """A user graphing blero_jobs_enqueued_total sees the jobs stored, not
    the enqueue calls a key answered with an existing job."""

    def enqueued(self, bl):
        samples, _ = parse_prometheus(self, bl.metrics_text())
        return samples[("blero_jobs_enqueued_total", frozenset())]

    def test_key_hits_are_not_counted_and_schedule_runs_are(self):
        bl = self.queue()
        first = bl.enqueue("post", "a", key="k1")
        self.assertEqual(bl.enqueue("post", "again", key="k1"), first)
        ids = bl.enqueue_many([("plain", 1), {"name": "post", "key": "k1"},
                               {"name": "post", "key": "k2", "delay": 3600},
                               {"name": "post", "key": "k2"}])
        self.assertEqual(ids[1], first)
        self.assertEqual(ids[2], ids[3])
        self.assertEqual(sum(bl.stats().values()), 3)
        self.assertEqual(self.enqueued(bl), 3)
        bl.every(3600, "tick")      # its first run is stored at once, by the clock
        wait_until(lambda: sum(bl.stats().values()) == 4, message="the schedule's first run")
        self.assertEqual(self.enqueued(bl), 4)


@both_engines
class UnstorableResultTest(TempDirTest):
    """A processor that did its work but returned what cannot be stored: its
    job ends failed at once, naming the cause, instead of running again."""

    def test_a_result_the_serializer_refuses_fails_the_job_at_once(self):
        ended = []
        bl = self.queue(retries=3, backoff_base=0, on_failed=lambda job, exc: ended.append(exc))
        runs = []
        bl.register_processor(lambda job: runs.append(job.id) or threading.Lock())
        job_id = bl.enqueue("x")
        with self.assertRaises(blero.JobFailed) as cm:
            bl.wait(job_id, timeout=10)
        self.assertIn("cannot serialize the job's result", cm.exception.error)
        self.assertIn("lock", cm.exception.error)
        info = bl.get_job(job_id)
        self.assertEqual((info.state, info.attempt, runs), ("failed", 1, [job_id]))
        wait_until(lambda: ended, message="on_failed")
        self.assertIsInstance(ended[0], TypeError)

    @file_only
    def test_a_serializer_giving_what_sqlite_cannot_store(self):
        # Its dumps() returns a dict: enqueue refuses such data, and a result
        # ends its job instead of failing every commit of the worker for ever.
        class Identity:
            dumps = staticmethod(lambda value: value)
            loads = staticmethod(lambda blob: blob)

        bl = self.queue(serializer=Identity(), retries=3)
        with self.assertRaises(TypeError) as cm:
            bl.enqueue("x", {"a": 1})
        self.assertIn("dumps() gave dict", str(cm.exception))
        self.assertEqual(sum(bl.stats().values()), 0)
        bl.register_processor(lambda job: {"a": 1} if job.name == "dict" else "fine")
        job_id = bl.enqueue("dict", "in")
        with self.assertRaises(blero.JobFailed) as cm:
            bl.wait(job_id, timeout=10)
        self.assertIn("dumps() gave dict", cm.exception.error)
        self.assertEqual(bl.get_job(job_id).attempt, 1)
        self.assertEqual(bl.wait(bl.enqueue("next", "in"), timeout=10), "fine")


async def async_processor(job):
    return job.data


async def async_callback(job, value):
    pass


@both_engines
class AsyncProcessorTest(TempDirTest):
    """(v2) An async processor, however it is written, runs on the queue's
    event loop; what cannot run there is told at once, not failed job by job."""

    def test_async_processors_run_on_the_event_loop(self):
        class AsyncRun:
            async def run(self, job):
                return job.data

        class AsyncCall:
            async def __call__(self, job):
                return job.data

        bl = self.queue()
        for k, processor in enumerate((async_processor, AsyncRun(), AsyncCall(),
                                       functools.partial(async_processor))):
            with self.subTest(processor=processor):
                bl.register_processor(processor, names=f"p{k}")
                self.assertEqual(bl.wait(bl.enqueue(f"p{k}", k), timeout=10), k)

    def test_async_generators_and_async_callbacks_are_refused(self):
        async def stream(job):
            yield job.data

        bl = self.queue()
        with self.assertRaises(TypeError) as cm:
            bl.register_processor(stream)
        self.assertIn("async generator", str(cm.exception))
        self.assertIn("0 processor(s)", repr(bl))
        for setting in ("on_complete", "on_failed"):
            with self.assertRaises(TypeError) as cm:
                blero.new(self.dir, **{setting: async_callback})
            self.assertIn(setting, str(cm.exception))

    def test_a_plain_function_returning_a_coroutine_fails_at_once(self):
        bl = self.queue(retries=3)
        bl.register_processor(lambda job: async_processor(job))
        job_id = bl.enqueue("x", 1)
        with self.assertRaises(blero.JobFailed) as cm:
            bl.wait(job_id, timeout=10)
        self.assertIn("an async processor is an `async def` function", cm.exception.error)
        self.assertEqual(bl.get_job(job_id).attempt, 1)


class CommandLineReasonsTest(TempDirTest):
    """An operator who retries or cancels the wrong id is told why nothing
    happened: no such job, or the state it is in."""

    def test_retry_and_cancel_name_the_cause(self):
        path = os.path.join(self.dir, "q.db")
        bl = self.queue(retries=0)
        bl.register_processor(lambda job: 1 / 0 if job.name == "bad" else "ok")
        done, failed = bl.enqueue("good"), bl.enqueue("bad")
        bl.wait(done, timeout=10)
        with self.assertRaises(blero.JobFailed):
            bl.wait(failed, timeout=10)
        bl.stop()
        results = run_clis(("retry", "--db", path, 424242), ("retry", "--db", path, done),
                           ("cancel", "--db", path, 424242), ("cancel", "--db", path, done),
                           ("cancel", "--db", path, failed, 424242))
        expected = [["blero: no such job: 424242"],
                    [f"blero: job {done} is not failed: complete"],
                    ["blero: no such job: 424242"],
                    [f"blero: job {done} already ended: complete"],
                    [f"blero: job {failed} already ended: failed",
                     "blero: no such job: 424242"]]
        for (code, out, err), lines in zip(results, expected):
            with self.subTest(lines=lines):
                self.assertEqual((code, err.splitlines()), (1, lines), out)


@both_engines
class ProcessorExitTest(TempDirTest):
    """A processor that raises SystemExit (or KeyboardInterrupt) is handed back
    as interrupted, and its stored error says what it raised, and where."""

    def test_the_stored_error_says_what_the_processor_raised(self):
        failed = []
        bl = self.queue(retries=1, backoff_base=0, on_failed=lambda job, exc: failed.append(exc))

        def exits(job):
            if job.name == "twice" or job.attempt == 1:
                raise SystemExit(3) if job.data == "exit" else KeyboardInterrupt()
            return "second try"

        bl.register_processor(exits)
        once, twice = bl.enqueue("once", "exit"), bl.enqueue("twice", "exit")
        interrupt = bl.enqueue("twice", "interrupt")
        self.assertEqual(bl.wait(once, timeout=10), "second try")
        for job_id, raised in ((twice, "SystemExit(3)"), (interrupt, "KeyboardInterrupt()")):
            with self.assertRaises(blero.JobFailed) as cm:
                bl.wait(job_id, timeout=10)
            error = cm.exception.error
            self.assertTrue(error.startswith(f"interrupted: the processor raised {raised}\n"),
                            error)
            self.assertIn("Traceback", error)
            self.assertIn("in exits", error)
            self.assertEqual(bl.get_job(job_id).attempt, 2)
        wait_until(lambda: len(failed) == 2, message="on_failed for both")
        self.assertEqual(sorted(type(e).__name__ for e in failed),
                         ["KeyboardInterrupt", "SystemExit"])


# ---------------------------------------------------------------------------
# Lifecycle under real operating conditions (issue 8): a deploy flipping a
# link, deliberate stops, a processor stopping its queue, Ctrl-C inside
# stop(), inspecting while another thread starts and stops.
# ---------------------------------------------------------------------------

def blocked_in_stop(frame):
    """Whether a thread whose innermost frame is `frame` waits inside
    Blero.stop (its innermost call is one of threading's waits, or blero's
    own, which a Ctrl-C cannot leave holding a lock)."""
    stack = traceback.extract_stack(frame) if frame is not None else []
    return (any(f.name == "stop" and f.filename == blero.__file__ for f in stack)
            and (stack[-1].filename == threading.__file__
                 or (stack[-1].filename, stack[-1].name) == (blero.__file__, "sleep")))


# A child that runs one job (no retries) until its try is cut short, with the
# stop it is given as argv[2]; argv[1] is the queue file.
_STOPPED_CHILD = NEW_QUEUE + textwrap.dedent("""
    import os, sys, signal, threading, blero
    signal.signal(signal.SIGINT, signal.default_int_handler)
    def run(job):
        os.write(1, b"running\\n")
        job.cancelled.wait(60)
    if sys.argv[2] == "ctrl-c":             # a `with` block left by KeyboardInterrupt
        try:
            with new_queue(sys.argv[1], retries=0) as bl:
                bl.register_processor(run)
                bl.enqueue("x")
                bl.join()
        except KeyboardInterrupt:
            pass
    else:                                   # SIGTERM: no `with`, no `finally`
        bl = new_queue(sys.argv[1], retries=0).start()
        bl.stop_on_signals()
        bl.register_processor(run)
        bl.enqueue("x")
        bl.join()
""")


# A program hit by Ctrl-C after Ctrl-C (SIGINT, 5 per round) while it waits
# in every way there is: each KeyboardInterrupt is caught, the next round's
# `with` block stops the queue, and a stop that something left waiting (a
# storage borrow, a lock of a wait cut short) hangs the round.
_CTRL_C_CHILD = NEW_QUEUE + textwrap.dedent("""
    import faulthandler, os, signal, sys
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    def double(x):
        return 2 * x
    def waits(bl, ex, task):
        bl.join()
        bl.wait(bl.enqueue("x", 1))
        bl.future(bl.enqueue("x", 2)).result()
        ex.submit(double, 3).result()
        list(ex.map(double, [4, 5]))
        task.map([6, 7])
    def five_times(bl, ex, task):
        # (A function of its own: CPython 3.13.0 raises a KeyboardInterrupt
        # at the back edge of this loop outside its frame's handlers, and
        # the caller's catch it.)
        caught = 0
        while caught < 5:
            try:
                waits(bl, ex, task)
            except KeyboardInterrupt:
                caught += 1
                if caught < 5:
                    os.write(1, b"ki\\n")
    for _ in range(int(sys.argv[2])):
        try:
            with new_queue(sys.argv[1]) as bl:
                bl.register_processor(lambda job: job.data)
                task = bl.task(name="double")(double)
                ex = bl.executor(2)
                os.write(1, b"in\\n")
                five_times(bl, ex, task)
        except KeyboardInterrupt:   # one that came outside five_times's handler
            pass
        os.write(1, b"out\\n")
    os.write(1, b"done\\n")
""")


@both_engines
class LifecycleTest(ProcessTest):
    """Stops and starts as programs really do them."""

    @unittest.skipUnless(POSIX, "SIGINT")
    @unittest.skipIf(sys.version_info[:2] == (3, 13),
                     "CPython 3.13 raises a KeyboardInterrupt at a loop's back edge outside "
                     "the handlers around it (python/cpython#130279): a `with lock:` left so "
                     "keeps its lock, whatever the code in it does")
    def test_ctrl_c_at_any_moment_of_a_wait_never_hangs_the_stop(self):
        rounds = 40
        proc = start_child(_CTRL_C_CHILD, self.path, rounds, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, proc)
        lines = LineReader(proc.stdout)
        seen = 0
        while True:
            try:
                lines.expect("", count=seen + 1, timeout=20)
            except AssertionError:
                proc.send_signal(signal.SIGUSR1)    # its threads' stacks, on stderr
                time.sleep(1)
                proc.kill()
                self.fail(f"hung after {lines.lines[-3:]}: {proc.communicate()[1][-3000:]}")
            line = lines.lines[seen].strip()
            seen += 1
            if line == "done":
                break
            if line in ("in", "ki"):    # it is waiting: Ctrl-C, at a random moment
                time.sleep(random.uniform(0, 0.005))
                proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(20), 0, proc.stderr.read())
        self.assertEqual(lines.lines.count("out\n"), rounds)
        self.assertGreaterEqual(lines.lines.count("ki\n"), rounds)

    @unittest.skipUnless(POSIX, "symlinks")
    @file_only
    def test_a_deploy_flipping_the_current_link_never_wedges_the_queue(self):
        releases = [os.path.join(self.dir, name) for name in ("release-1", "release-2")]
        for folder in releases:
            os.mkdir(folder)
        current = os.path.join(self.dir, "current")
        os.symlink(releases[0], current)
        bl = blero.new(os.path.join(current, "q.db"))
        bl.register_processor(lambda job: job.data * 2)
        bl.start()
        self.addCleanup(bl.stop, 5)
        self.assertEqual(bl.wait(bl.enqueue("x", 1), 10), 2)
        # The deploy: a new link renamed over `current`, while the queue runs.
        os.symlink(releases[1], current + ".new")
        os.replace(current + ".new", current)
        # The run goes on with the file it opened, and stops cleanly.
        self.assertEqual(bl.wait(bl.enqueue("x", 2), 10), 4)
        self.assertEqual(bl.stats()["complete"], 2)
        bl.stop()
        self.assertEqual(sorted(os.listdir(releases[0])), ["q.db", "q.db-lock"])
        self.assertEqual(os.listdir(releases[1]), [])
        self.assertEqual(blero.new(os.path.join(releases[0], "q.db")).stats()["complete"], 2)
        # Started again, it opens the file the link names now.
        bl.start()
        self.assertEqual(bl.wait(bl.enqueue("x", 3), 10), 6)
        self.assertEqual(bl.stats()["complete"], 1)
        bl.stop()
        self.assertEqual(blero.new(os.path.join(releases[0], "q.db")).stats()["complete"], 2)

    @unittest.skipUnless(POSIX, "symlinks")
    @file_only
    def test_a_wait_across_a_stop_after_a_deploy_looks_at_its_own_file(self):
        releases = [os.path.join(self.dir, name) for name in ("release-1", "release-2")]
        for folder in releases:
            os.mkdir(folder)
        with blero.new(os.path.join(releases[1], "q.db")) as new_release:
            new_release.register_processor(lambda job: "the new release's")
            self.assertEqual(new_release.wait(new_release.enqueue("x"), 10), "the new release's")
        current = os.path.join(self.dir, "current")
        os.symlink(releases[0], current)
        bl = blero.new(os.path.join(current, "q.db")).start()
        job = bl.enqueue("x")       # no processor: it stays pending
        os.symlink(releases[1], current + ".new")
        os.replace(current + ".new", current)
        answers = []

        def waiter():
            try:
                answers.append(bl.wait(job, timeout=1))    # some 20 looks, most after the stop
            except TimeoutError:
                answers.append("still pending")
        thread = threading.Thread(target=waiter)
        thread.start()
        wait_until(lambda: bl._changed.watchers, message="the wait to begin")
        bl.stop()       # the old release is stopped while the wait goes on
        thread.join(10)
        self.assertEqual(answers, ["still pending"],
                         "the wait read another release's job of the same id")

    def assert_given_back_then_run_at_once(self):
        """Job 1 (no retries) is pending with its cut-short try given back;
        the next start runs it at once, to the end."""
        info = self.queue(start=False).get_job(1)
        self.assertEqual((info.state, info.attempt, info.max_attempts), ("pending", 1, 2))
        done = []
        bl = self.queue(start=False, on_failed=lambda job, exc: done.append(("failed", exc)))
        bl.register_processor(lambda job: done.append(job.attempt) or "ran")
        bl.start()
        self.assertEqual(bl.wait(1, 10), "ran")
        self.assertEqual(done, [2])
        bl.stop()

    def test_stop_running_out_of_time_fails_no_job(self):
        failed = []
        bl = self.queue(retries=0, on_failed=lambda job, exc: failed.append(job.id))
        started = threading.Event()

        def stubborn(job):
            started.set()
            job.cancelled.wait(30)

        bl.register_processor(stubborn)
        bl.enqueue("x")
        self.assertTrue(started.wait(10))
        bl.stop(timeout=0.1)
        self.assertEqual(failed, [])
        self.assertEqual(bl.jobs(state="failed"), [])
        self.assert_given_back_then_run_at_once()

    @unittest.skipUnless(POSIX, "SIGINT")
    def test_ctrl_c_fails_no_job(self):
        proc = start_child(_STOPPED_CHILD, self.path, "ctrl-c", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, proc)
        LineReader(proc.stdout).expect("running")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(20), 0, proc.stderr.read())
        self.assert_given_back_then_run_at_once()

    @unittest.skipUnless(POSIX, "SIGTERM")
    def test_sigterm_with_stop_on_signals_stops_as_cleanly_as_ctrl_c(self):
        # A service under systemd or in a container: SIGTERM, and the program
        # ends by the KeyboardInterrupt, with no stop() of its own.
        proc = start_child(_STOPPED_CHILD, self.path, "sigterm", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, proc)
        LineReader(proc.stdout).expect("running")
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        self.assertIn("KeyboardInterrupt", proc.stderr.read())
        if self.engine == "sqlite":
            self.assertFalse(os.path.exists(self.path + "-wal"), "the queue was not stopped")
        self.assert_given_back_then_run_at_once()

    @unittest.skipUnless(POSIX, "SIGTERM")
    @file_only
    def test_sigterm_stops_the_demo_cleanly_and_gives_its_tries_back(self):
        log = os.path.join(self.dir, "out.txt")
        with open(log, "w") as f:
            child = subprocess.Popen([sys.executable, "-m", "blero", "demo", "--db", self.path,
                                      "-n", "2", "--sleep", "5"], cwd=HERE, env=child_env(),
                                     stdout=f, stderr=subprocess.STDOUT)
        self.addCleanup(child.kill)

        def text():
            with open(log) as f:
                return f.read()

        wait_until(lambda: text().count("Processing job") >= 2, timeout=20,
                   message="two jobs running")
        child.send_signal(signal.SIGTERM)
        self.assertEqual(child.wait(20), 0, text())
        self.assertIn("Caught signal terminated. Exiting ...\nStopping Blero ...\n", text())
        self.assertNotIn("Done Processing", text())
        bl = blero.new(self.path)
        self.assertEqual([(j.id, j.attempt, j.max_attempts) for j in bl.jobs() if j.attempt],
                         [(1, 1, 5), (2, 1, 5)])
        self.assertEqual(bl.stats()["inprogress"], 0)

    def test_stop_on_signals_checks_its_caller_and_puts_the_handlers_back(self):
        before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig, handler in before.items():
            self.addCleanup(signal.signal, sig, handler)
        bl = self.queue(start=False)
        with self.assertRaisesRegex(blero.BleroError, "not started"):
            bl.stop_on_signals()
        bl.start()
        off_main = []
        t = threading.Thread(target=lambda: off_main.append(
            self.assertRaisesRegex(ValueError, "main thread", bl.stop_on_signals)))
        t.start()
        t.join(10)
        self.assertEqual(len(off_main), 1)
        with self.assertRaisesRegex(TypeError, "signal number"):
            bl.stop_on_signals("SIGTERM")
        with self.assertRaisesRegex(ValueError, "not a signal"):
            bl.stop_on_signals(100000)
        if hasattr(signal, "SIGKILL"):
            with self.assertRaisesRegex(ValueError, "SIGKILL"):
                bl.stop_on_signals(signal.SIGKILL)
        self.assertEqual({sig: signal.getsignal(sig) for sig in before}, before)
        bl.stop_on_signals()
        self.assertTrue(all(signal.getsignal(sig) != h for sig, h in before.items()))
        bl.stop()
        self.assertEqual({sig: signal.getsignal(sig) for sig in before}, before)
        wait_for_threads_to_end("blero-signals", "the signal watcher to end")

    def test_a_processor_that_stops_the_queue_has_its_result_recorded(self):
        # "That was the last job": a processor stops the program's queue from
        # inside its own try, and returns its result.
        bl = self.queue()
        asked, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        runs = []

        def last(job):
            runs.append(job.id)
            bl.stop()
            bl.stop()       # a second call from the same try does not deadlock
            asked.set()
            release.wait(10)
            return "done"

        bl.register_processor(last)
        job_id = bl.enqueue("x")
        self.assertTrue(asked.wait(10), "stop() inside the try never returned")
        # Meanwhile the main program stops it too (the end of its `with`):
        # that stop returns only once the queue is really stopped.
        seen = []

        def main_program():
            bl.stop()
            seen.append(bl.get_job(job_id))

        stopper = threading.Thread(target=main_program)
        stopper.start()
        wait_until(lambda: blocked_in_stop(sys._current_frames().get(stopper.ident)),
                   message="the second stop() to wait")
        self.assertEqual(seen, [])
        release.set()
        stopper.join(10)
        self.assertFalse(stopper.is_alive(), "the second stop() never returned")
        self.assertEqual((seen[0].state, seen[0].result, seen[0].attempt),
                         ("complete", "done", 1))
        with self.assertRaises(blero.BleroError):
            bl.enqueue("y")     # stopped, for real
        bl.start()
        self.assertTrue(bl.join(10))
        self.assertEqual(runs, [job_id], "the job ran again")

    def test_stop_from_on_complete_starts_no_job_after_it(self):
        # "Enough results": on_complete stops the queue.  The worker claimed
        # the next job in the commit that recorded this one; it must not start.
        runs, asked = [], threading.Event()

        def on_complete(job, result):
            if job.id == 1:
                bl.stop()
                asked.set()

        bl = self.queue(on_complete=on_complete)
        bl.enqueue_many([("x", None), ("x", None)])
        bl.register_processor(lambda job: runs.append(job.id))
        self.assertTrue(asked.wait(10))
        bl.stop()
        self.assertEqual(runs, [1])
        self.assertEqual([(j.state, j.attempt) for j in bl.jobs()],
                         [("complete", 1), ("pending", 0)])

    @unittest.skipUnless(POSIX, "SIGINT")
    def test_ctrl_c_during_stop_leaves_nothing_of_the_queue_running(self):
        child = start_child(NEW_QUEUE + textwrap.dedent("""
            import json, logging, os, signal, sys, threading, time, traceback, blero
            signal.signal(signal.SIGINT, signal.default_int_handler)
            records = []
            handler = logging.Handler()
            handler.emit = lambda record: records.append(record.getMessage())
            logging.getLogger("blero").addHandler(handler)
            logging.getLogger("blero").setLevel(logging.DEBUG)
            bl = new_queue(sys.argv[1], retries=0).start()
            started = threading.Event()
            def run(job):
                started.set()
                job.cancelled.wait(60)
            bl.register_processor(run)
            job_id = bl.enqueue("x")
            started.wait(10)
            main = threading.main_thread()
            def tell_when_main_waits_in_stop():
                while True:
                    stack = traceback.extract_stack(sys._current_frames()[main.ident])
                    if (any(f.name == "stop" and f.filename == blero.__file__ for f in stack)
                            and (stack[-1].filename == threading.__file__
                                 or (stack[-1].filename, stack[-1].name)
                                 == (blero.__file__, "sleep"))):
                        os.write(1, b"in stop\\n")
                        return
                    time.sleep(0.01)
            threading.Thread(target=tell_when_main_waits_in_stop, daemon=True).start()
            try:
                bl.stop()       # waits for the running job, for ever...
                print("stop returned")
            except KeyboardInterrupt:
                pass            # ...until Ctrl-C
            after = len(records)
            deadline = time.monotonic() + 10
            def left():
                return sorted(t.name for t in threading.enumerate() if t.name.startswith("blero"))
            while left() and time.monotonic() < deadline:
                time.sleep(0.01)
            threads = left()
            threading.Event().wait(1.0)     # a surviving clock would log twice in this time
            logged = records[after:]
            info = bl.get_job(job_id)
            bl.start()          # not wedged
            bl.stop(0)
            print(json.dumps({"threads": threads, "logged": logged, "state": info.state,
                              "tries": [info.attempt, info.max_attempts]}), flush=True)
        """), self.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, child)
        out = LineReader(child.stdout)
        out.expect("in stop")
        child.send_signal(signal.SIGINT)
        self.assertEqual(child.wait(30), 0, child.stderr.read())
        report = json.loads(out.rest()[-1])
        self.assertEqual(report["threads"], [], "threads of the queue outlived stop()")
        self.assertEqual(report["logged"], [], "logging went on after stop()")
        self.assertEqual((report["state"], report["tries"]), ("pending", [1, 2]))

    def test_inspecting_and_operating_while_another_thread_starts_and_stops(self):
        bl = self.queue()
        bl.register_processor(lambda job: None)
        first = bl.enqueue("x")
        bl.wait(first, 10)
        bl.stop()
        errors, calls, done = [], [0], threading.Event()
        operations = (lambda: bl.get_job(first), bl.stats, bl.jobs, lambda: bl.wait(first, 5),
                      lambda: bl.join(5), lambda: bl.cancel(10 ** 6), bl.retry_failed,
                      lambda: bl.sweep(3600), lambda: bl.every(3600, "tick"),
                      lambda: bl.unschedule("none"))

        def start_and_stop():
            while not done.is_set():
                bl.start()
                bl.stop()

        def inspect():
            while not done.is_set():
                for operation in operations:
                    try:
                        operation()
                    except Exception as exc:
                        errors.append(repr(exc))
                    calls[0] += 1

        threads = [threading.Thread(target=start_and_stop)]
        threads += [threading.Thread(target=inspect) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            # (On a server, each call on the stopped queue connects anew.)
            enough = 1500 if self.engine == "sqlite" else 300
            wait_until(lambda: calls[0] >= enough or errors, timeout=60, message=f"{enough} calls")
        finally:
            done.set()
            for t in threads:
                t.join(30)
        self.assertEqual(errors[:3], [])


# ---------------------------------------------------------------------------
# Under real operating conditions: a full disk, a poison job, many finished jobs
# ---------------------------------------------------------------------------

class Captured(logging.Handler):
    """The records the "blero" logger emits while it is attached."""

    def __init__(self, test, level=logging.DEBUG):
        super().__init__(level)
        self.records = []
        logger = logging.getLogger("blero")
        logger.addHandler(self)
        test.addCleanup(logger.removeHandler, self)

    def emit(self, record):
        self.records.append(record)


class FullDiskTest(TempDirTest):
    """A queue on a small file system that fills up (a 2 MB tmpfs)."""

    def setUp(self):
        super().setUp()
        self.mount = os.path.join(self.dir, "small")
        os.mkdir(self.mount)
        if not ROOT:
            self.skipTest("mounting a 2 MB tmpfs (a disk that fills up) needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", self.mount],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.skipTest(f"cannot mount a 2 MB tmpfs here: {done.stderr.strip()}")
        # Cleanups run last first: every queue made later is stopped before this.
        self.addCleanup(subprocess.run, ["umount", self.mount], capture_output=True)

    def fill(self):
        """Fill the file system up; return the filler file's path."""
        filler = os.path.join(self.mount, "filler")
        with open(filler, "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        return filler

    def test_workers_wait_quietly_on_a_full_disk_and_carry_on_once_space_is_freed(self):
        captured = Captured(self, logging.ERROR)
        bl = blero.new(os.path.join(self.mount, "q.db"))
        gate = threading.Event()
        self.addCleanup(gate.set)

        def big_result(job):    # needs new pages in the file
            gate.wait(10)
            return bytes([job.data]) * 50_000

        for _ in range(2):
            bl.register_processor(big_result)
        bl.start()
        self.addCleanup(bl.stop, 5)
        wait_until(lambda: len(bl._dispatcher._idle) == 2, message="the workers idle")
        ids = bl.enqueue_many([("big", i) for i in range(20)])   # wakes them
        wait_until(lambda: bl.stats()["inprogress"] == 2, message="two jobs running")
        filler = self.fill()
        gate.set()
        wait_until(lambda: captured.records, message="the first storage failure logged")

        # Two seconds of a full disk: ~2 retries a second per worker, at
        # most a line a second for all of them, and next to no CPU.
        del captured.records[:]
        before, t0 = os.times(), time.monotonic()
        wait_until(lambda: time.monotonic() - t0 >= 2.0, timeout=10, interval=0.1,
                   message="two seconds")
        after, seconds = os.times(), time.monotonic() - t0
        cpu = (after.user + after.system) - (before.user + before.system)
        lines = [r.getMessage() for r in captured.records]
        self.assertTrue(lines and all("full" in line for line in lines), lines)
        self.assertLessEqual(len(lines), seconds + 2, f"flooded the log: {lines[:5]}")
        retries = len(lines) + sum(int(n) for n in re.findall(r"and (\d+) more", " ".join(lines)))
        self.assertLess(retries / seconds, 2 * 2 * 2.5, f"retried too often: {lines}")
        self.assertLess(cpu / seconds, 0.25, f"{cpu:.2f} s of CPU in {seconds:.1f} s")
        self.assertEqual(bl.stats()["complete"], 0)

        os.remove(filler)
        wait_until(lambda: bl.stats()["complete"] == len(ids), timeout=10,
                   message="the queued work to complete once space was freed")
        self.assertEqual([bl.get_job(i).result for i in ids],
                         [bytes([i]) * 50_000 for i in range(20)])



class Payload:
    """Job data that can be watched with a weak reference."""

    def __init__(self, n):
        self.n = n


UNPICKLED = collections.Counter()


class CountsLoads:
    """Job data that counts how often it is unpickled."""

    def __init__(self, tag):
        self.tag = tag

    def __reduce__(self):
        return (_count_load, (self.tag,))


def _count_load(tag):
    UNPICKLED[tag] += 1
    return CountsLoads(tag)


class MemoryAndLatencyTest(TempDirTest):
    """A long-lived queue keeps no finished job in memory, and never makes
    a due job wait on housekeeping."""

    def test_a_long_timeout_keeps_no_finished_job_in_memory(self):
        bl = self.queue()
        refs = []
        bl.register_processor(lambda job: refs.append(weakref.ref(job.data)))
        bl.enqueue_many([{"name": "short", "data": Payload(i), "timeout": 3600}
                         for i in range(200)])
        self.assertTrue(bl.join(10))
        self.assertEqual(len(refs), 200)

        def kept():
            gc.collect()
            return [r().n for r in refs if r() is not None]
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not kept(), timeout=2)
        self.assertEqual(kept(), [], "finished jobs' data still held")

    def test_waiting_on_a_job_never_reads_its_data(self):
        bl = self.queue()
        running, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def run(job):
            running.set()
            release.wait(10)
            return "done"
        bl.register_processor(run)
        tag = f"wait-{id(self)}"
        job_id = bl.enqueue("big", CountsLoads(tag))
        self.assertTrue(running.wait(10))
        self.assertEqual(UNPICKLED[tag], 1)     # the processor's copy
        with self.assertRaises(TimeoutError):
            bl.wait(job_id, timeout=0.5)        # some ten looks at the job
        release.set()
        self.assertEqual(bl.wait(job_id, 10), "done")
        self.assertEqual(UNPICKLED[tag], 1, "wait() unpickled the job's data")

    def test_a_big_sweep_never_makes_a_due_job_late(self):
        # 250,000 jobs that completed a minute ago, written straight into
        # the file (running them would take a while).
        path = os.path.join(self.dir, "q.db")
        blero.new(path).start().stop()
        db = sqlite3.connect(path)
        db.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 250000)"
                   " INSERT INTO blero_jobs (state, priority, run_at, name, max_attempts,"
                   " created_at, attempt, started_at, finished_at)"
                   " SELECT 3, 0, :t, 'old', 4, :t, 1, :t, :t FROM n", {"t": time.time() - 60})
        db.commit()
        db.close()

        ran = {}
        bl = self.queue(keep_complete=30)       # sweeps them all, at once
        bl.register_processor(lambda job: ran.setdefault(job.id, time.time()))
        due = bl.enqueue("due", delay=0.1)
        # (measured against a plain timer due then: on a loaded machine every
        # thread wakes late)
        timer = []
        threading.Thread(target=lambda: (
            threading.Event().wait(bl.get_job(due).run_at - time.time()),
            timer.append(time.time()))).start()
        bl.wait(due, 30)
        wait_until(lambda: timer, message="the plain timer")
        late = ran[due] - timer[0]
        self.assertLess(late, 0.25, f"the delayed job ran {late:.3f} s after a plain timer")
        wait_until(lambda: bl.stats()["complete"] < 250_000, timeout=30, interval=0.1,
                   message="the sweep to get going")



    def test_many_jobs_due_at_once_never_make_a_timeout_late(self):
        # 300,000 delayed jobs all due in 2 s (time to start, on a loaded
        # machine: it takes 0.4 s idle), written straight into the file; a
        # try with a timeout expires while they come due.
        path = os.path.join(self.dir, "q.db")
        blero.new(path).start().stop()
        db = sqlite3.connect(path)
        db.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 300000)"
                   " INSERT INTO blero_jobs (state, priority, run_at, name, max_attempts, created_at)"
                   " SELECT 1, 0, :due, 'later', 4, :now FROM n",
                   {"due": time.time() + 2.0, "now": time.time()})
        db.commit()
        db.close()

        times, timer = [], []

        def slow(job):
            # Beside it a plain timer of the same length: on a loaded machine
            # every thread wakes late, so the queue's timeout is measured
            # against it (the chunked promotion this guards makes no
            # difference; promoting them all in one go is over a second).
            t = threading.Thread(target=lambda: (threading.Event().wait(timeout),
                                                 timer.append(time.monotonic())))
            times.append(time.monotonic())
            t.start()
            job.cancelled.wait(10)
            times.append(time.monotonic())
            t.join()
        bl = self.queue()
        bl.register_processor(slow, names="slow")
        due = bl.get_job(1).run_at
        timeout = due + 0.2 - time.time()       # 0.2 s after they all came due
        self.assertGreater(timeout, 0.1, "the test took too long to set up")
        bl.enqueue("slow", timeout=timeout, retries=0)
        wait_until(lambda: len(times) == 2 and timer, timeout=10, message="the timeout")
        late = times[1] - timer[0]
        self.assertLess(late, 0.2, f"the timeout fired {late:.3f} s after a plain timer")


# argv: db, log, life (a tag), the poison job's id, processors, seconds an
# ordinary job takes.  The poison job kills its process (as a segfault or
# the OOM killer would) once a neighbour has run beside it here, or after
# 0.2 s alone.
POISON_CHILD = """
db, log_path, life = sys.argv[1:4]
poison, processors, work = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
log = open_log(log_path)
neighbour_runs = threading.Event()

def run(job):
    log("S", job.id, life, job.attempt, time.monotonic_ns())
    if job.id == poison:
        neighbour_runs.wait(0.2)
        os._exit(3)
    neighbour_runs.set()
    time.sleep(work)
    log("E", job.id, life, job.attempt, time.monotonic_ns())

bl = new_queue(db, retries=2)
for _ in range(processors):
    bl.register_processor(run)
bl.start()
if not bl.join(60):
    sys.exit("join timed out")
bl.stop()
"""


@both_engines
class PoisonJobTest(ProcessTest):
    """A job that kills its process uses up its own tries, and no one else's."""

    def restart_until_done(self, poison, processors, work, names=("",), lives=10):
        """Run POISON_CHILD in a process per name, each started again each
        time it dies, until all have exited 0; return their exit codes."""
        codes = {name: [] for name in names}
        running = {}
        while True:
            for name, done in codes.items():
                if name not in running and (not done or done[-1] != 0):
                    self.assertLess(len(done), lives, f"{name} still crashing: {codes}")
                    running[name] = self.spawn(POISON_CHILD, self.path, self.log,
                                               f"{name}{len(done)}", poison, processors, work)
            if not running:
                return codes
            ended = wait_until(lambda: [n for n, p in running.items() if p.poll() is not None],
                               timeout=60, message=f"a child to end ({codes})")
            for name in ended:
                p = running.pop(name)
                self.assertIn(p.returncode, (0, 3), self.output(p))
                codes[name].append(p.returncode)

    def assert_poison_failed_alone(self, ids, poison):
        """The poison job used exactly its own tries; its neighbours all
        completed, each losing at most the one try of the first crash."""
        bl = self.queue()
        info = bl.get_job(poison)
        self.assertEqual((info.state, info.error, info.attempt), ("failed", "interrupted", 3))
        others = [bl.get_job(i) for i in ids if i != poison]
        self.assertEqual([(o.id, o.state) for o in others if o.state != "complete"], [],
                         "a neighbour of the poison job did not complete")
        self.assertLessEqual(max(o.attempt for o in others), 2,
                             "a neighbour lost more than the one try of the first crash")

    def test_a_job_that_kills_its_process_fails_alone(self):
        bl = self.queue(retries=2)
        ids = bl.enqueue_many([("j", None)] * 8)
        bl.stop()
        poison = ids[1]
        codes = self.restart_until_done(poison, processors=3, work=0.1)
        self.assertEqual(codes, {"": [3, 3, 3, 0]}, "one crash per try of the poison job")
        self.assert_poison_failed_alone(ids, poison)
        # After each crash, the jobs it cut short ran one at a time, alone,
        # before the rest.
        runs = [(r["tag"], job_id, r["attempt"], r["start"], r["end"] or math.inf)
                for job_id, job_runs in runs_in(self.log).items() for r in job_runs]
        for life, job_id, attempt, start, end in runs:
            if attempt > 1:
                beside = [(j, a) for t, j, a, s, e in runs
                          if t == life and j != job_id and s < end and e > start]
                self.assertEqual(beside, [], f"life {life}: job {job_id} try {attempt} "
                                             f"re-ran beside others")
                before = [j for t, j, a, s, e in runs if t == life and a == 1 and s < start]
                self.assertEqual(before, [], f"life {life}: jobs ran before re-run {job_id}")

    def test_processes_sharing_the_file_each_run_suspects_alone(self):
        # Two processes, each restarted when it dies: whichever takes the
        # poison job back runs it alone, so its own jobs are safe too.
        bl = self.queue(retries=2)
        ids = bl.enqueue_many([("j", None)] * 30)
        bl.stop()
        poison = ids[3]
        codes = self.restart_until_done(poison, processors=2, work=0.1, names=("x", "y"))
        self.assertEqual(sum(c.count(3) for c in codes.values()), 3, codes)
        self.assert_poison_failed_alone(ids, poison)

    def test_suspects_wait_as_pending_and_never_stall_other_work(self):
        ids = kill_with_running_jobs(self, self.path, [3, 3])
        bl = self.queue()
        bl.register_processor(lambda job: "ok", names="other")
        self.assertEqual([bl.get_job(i).state for i in ids], ["pending", "pending"])
        self.assertEqual(bl.stats()["pending"], 2)
        self.assertEqual([j.id for j in bl.jobs("pending")], ids)
        # No worker here takes them: the rest goes on.
        self.assertEqual(bl.wait(bl.enqueue("other"), 10), "ok")
        self.assertFalse(bl.join(0.1), "join() did not wait for the suspects")

        runs = []

        def doomed(job):
            runs.append(("S", job.id))
            time.sleep(0.05)            # (work, so that an overlap would show)
            runs.append(("E", job.id))
        for _ in range(2):
            bl.register_processor(doomed, names="doomed")
        self.assertTrue(bl.join(10))
        self.assertEqual(runs, [("S", ids[0]), ("E", ids[0]), ("S", ids[1]), ("E", ids[1])],
                         "the suspects did not run one at a time")
        self.assertEqual([bl.get_job(i).attempt for i in ids], [2, 2])


    def test_a_suspect_cut_short_by_a_stop_is_still_a_suspect(self):
        ids = kill_with_running_jobs(self, self.path, [3, 3])
        bl = self.queue(start=False)
        running = threading.Event()

        def hang(job):
            running.set()
            job.cancelled.wait(10)
        bl.register_processor(hang)
        bl.register_processor(hang)
        bl.start()
        self.assertTrue(running.wait(10))
        other = bl.enqueue("other")
        bl.stop(timeout=0.1)                # cuts the first suspect's try short
        self.assertEqual(bl.get_job(ids[0]).state, "pending")

        runs = []

        def record(job):
            runs.append(("S", job.id))
            time.sleep(0.05)            # (work, so that an overlap would show)
            runs.append(("E", job.id))
        bl = self.queue()
        bl.register_processor(record)
        bl.register_processor(record)
        self.assertTrue(bl.join(10))
        self.assertEqual(runs[:4], [("S", ids[0]), ("E", ids[0]), ("S", ids[1]), ("E", ids[1])],
                         "the suspects did not run first, one at a time")
        self.assertEqual(runs[4:], [("S", other), ("E", other)])


# ---------------------------------------------------------------------------
# Opening: second handles, refused files, reads of a file that went, space
# ---------------------------------------------------------------------------

# argv: db, log, go file.  A running queue, then a second handle (a stopped
# one for inspection, and a second started one) in the same process; once
# `go` exists, more enqueues; then it waits to be killed.
SECOND_HANDLE_CHILD = """
db, log_path, go = sys.argv[1], sys.argv[2], sys.argv[3]
log = open_log(log_path)
bl = new_queue(db)
bl.start()
log("Q", *bl.enqueue_many([("before", i) for i in range(3)]))
blero.new(db).stats()              # a status page, say
other = blero.new(db).start()      # a second queue on the same file
other.stop()
log("ready")
wait_for(lambda: os.path.exists(go))
for i in range(3):
    log("Q", bl.enqueue("after", i))
log("done")
threading.Event().wait()
"""


class SecondHandleTest(ProcessTest):

    def test_a_second_handle_in_the_process_loses_no_committed_write(self):
        # A program runs a queue and, beside it, inspects the same file
        # (and starts a second queue on it); another process starts and
        # stops meanwhile.  Every enqueue that returned survives a kill -9.
        self.create()
        go = os.path.join(self.dir, "go")
        p = self.spawn(SECOND_HANDLE_CHILD, self.path, self.log, go)
        self.wait_lines("ready", children=[p])
        out = run_child("""
            import sys, blero
            blero.new(sys.argv[1]).start().stop()
            """, self.path)
        self.assertEqual(out.returncode, 0, out.stderr)
        with open(go, "w"):
            pass
        self.wait_lines("done", children=[p])
        self.kill(p)
        ids = [int(i) for f in self.lines("Q") for i in f[1:-1]]
        self.assertEqual(len(ids), 6)
        bl = self.queue()
        self.assertEqual([info.id for info in bl.jobs(limit=None)], ids,
                         "enqueues that returned were lost")

    def test_a_path_with_uri_characters_is_the_file_it_names(self):
        # blero opens the file by an SQLite URI: ? # % and spaces are the
        # file's own name, not parts of the URI.
        path = os.path.join(self.dir, "a b?mode=ro#x%41.db")
        with blero.new(path) as bl:
            bl.enqueue("x", 1)
        self.assertEqual(sorted(os.listdir(self.dir)), ["a b?mode=ro#x%41.db",
                                                        "a b?mode=ro#x%41.db-lock"])
        self.assertEqual(blero.new(path).stats()["pending"], 1)

    def test_processes_inspecting_one_stopped_file_at_once_all_get_answers(self):
        # Status pages of several programs look at one stopped queue at
        # once: each look opens and closes the file, and the last to close
        # removes -wal and -shm as another one opens it.  None may fail.
        self.create()
        body = """
        db = sys.argv[1]
        for _ in range(100):
            blero.new(db).stats()
        """
        children = [self.spawn(body, self.path) for _ in range(4)]
        for p in children:
            self.finish(p)


# argv: db, then SQL statements.  Runs them on a WAL database and dies
# without closing, so what they wrote is only in the -wal.
WAL_ONLY_CHILD = """
import sqlite3
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode = WAL")
for sql in sys.argv[2:]:
    db.execute(sql)
if os.environ.get("HOLD"):
    print("ready", flush=True)
    sys.stdin.read()
os._exit(0)
"""


class RefusedFileTest(ProcessTest):

    def assert_refused(self, path, *words):
        HardeningTest.assert_refused(self, path, *words)

    def wal_only(self, path, *statements):
        out = run_child(mp_child(WAL_ONLY_CHILD), path, *statements)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertGreater(os.path.getsize(path + "-wal"), 0)

    def test_another_applications_wal_database_is_left_as_it_was(self):
        path = os.path.join(self.dir, "app", "app.db")
        os.mkdir(os.path.dirname(path))
        self.wal_only(path, "CREATE TABLE orders (id INTEGER PRIMARY KEY)",
                      "INSERT INTO orders VALUES (1)")
        self.assert_refused(path, "not a blero")
        db = sqlite3.connect(path)
        self.assertEqual(db.execute("SELECT id FROM orders").fetchall(), [(1,)])
        db.close()

    def test_a_running_applications_database_is_left_as_it_was(self):
        path = os.path.join(self.dir, "app", "app.db")
        os.mkdir(os.path.dirname(path))
        env = dict(child_env(), HOLD="1")
        app = subprocess.Popen([sys.executable, "-c", mp_child(WAL_ONLY_CHILD), path,
                                "CREATE TABLE orders (id INTEGER PRIMARY KEY)"],
                               cwd=HERE, env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        self.addCleanup(app.wait)
        self.addCleanup(app.kill)
        self.assertEqual(app.stdout.readline(), "ready\n")
        self.assert_refused(path, "not a blero")

    def test_a_newer_blero_file_whose_version_is_only_in_its_wal(self):
        HardeningTest.make_queue(self, self.path, jobs=3)
        self.wal_only(self.path, f"PRAGMA user_version = {blero._SCHEMA_VERSION + 1}")
        self.assert_refused(self.path, "newer")


class GoneFileTest(ProcessTest):

    def test_reads_of_a_queue_whose_file_was_removed_or_replaced_say_so(self):
        # A status page keeps asking a running queue; an operator removes
        # (or replaces) its file: the page must not go on showing the
        # jobs of a file that is no longer there.
        replacement = os.path.join(self.dir, "other.db")
        HardeningTest.make_queue(self, replacement, jobs=2)
        for how in ("removed", "replaced"):
            with self.subTest(how):
                bl = blero.new(self.path)
                bl.start()
                bl.register_processor(lambda job: None)
                last = bl.enqueue_many([("a", i) for i in range(50)])[-1]
                bl.wait(last, 10)
                self.assertEqual(bl.stats()["complete"], 50)
                if how == "removed":
                    os.remove(self.path)
                else:
                    os.replace(replacement, self.path)
                for read in (bl.stats, lambda: bl.get_job(last), bl.jobs,
                             lambda: bl.wait(last, 1), bl.metrics_text):
                    with self.assertRaises(blero.BleroError) as cm:
                        read()
                    self.assertIn(self.path, str(cm.exception))
                    self.assertIn("removed or replaced", str(cm.exception))
                with contextlib.suppress(blero.BleroError):
                    bl.stop(5)


class InspectionCostTest(ProcessTest):

    def test_an_inspection_reads_only_what_it_needs_and_start_checks_it_all(self):
        # A status page calls get_job on a stopped queue: it must cost the
        # pages it reads, not a check of the whole file (0.6 s on 578 MB).
        # A page far from job 1 is damaged: get_job(1) still answers, and
        # start(), which checks every page before writing any, refuses it.
        HardeningTest.make_queue(self, self.path, jobs=300, size=1000)
        with open(self.path, "rb") as f:
            good = f.read()
        page = int.from_bytes(good[16:18], "big")
        middle = page * (len(good) // page // 2)
        with open(self.path, "r+b") as f:
            f.seek(middle)
            f.write(bytes(random.Random(5).randrange(256) for _ in range(page)))
        self.assertEqual(blero.new(self.path).get_job(1).name, "j")
        with self.assertRaises(blero.BleroError) as cm:
            blero.new(self.path).start()
        self.assertIn("damaged", str(cm.exception))


class SpaceTest(ProcessTest):

    def assert_small(self, path):
        """After stop(): at most 1 MB (SPEC Guarantees, Space), no -wal left."""
        self.assertLessEqual(os.path.getsize(path), 1 << 20, "space not given back")
        self.assertFalse(os.path.exists(path + "-wal"))

    def test_a_queue_whose_jobs_were_all_swept_is_small_after_stop(self):
        # A queue ran 2,400 jobs (over 25 MB with their data) and swept
        # them: the file gives that space back, whatever it held before.
        bl = self.queue()
        bl.register_processor(lambda job: None)
        for _ in range(4):
            bl.enqueue_many([("j", os.urandom(2700)) for _ in range(500)]
                            + [("big", os.urandom(50000)) for _ in range(100)])
        self.assertTrue(bl.join(60))
        bl.stop()
        self.assertGreater(os.path.getsize(self.path), 25 << 20)
        bl.start()
        self.assertEqual(bl.sweep(), 2400)
        self.assertEqual(bl.enqueue("next"), 2401)    # ids still never reused
        self.assertTrue(bl.join(10))
        self.assertEqual(bl.sweep(), 1)
        bl.stop()
        self.assert_small(self.path)

    def test_keep_complete_gives_the_space_back_by_itself(self):
        bl = self.queue(keep_complete=0)
        bl.register_processor(lambda job: None)
        bl.enqueue_many([("big", os.urandom(50000)) for _ in range(300)])
        self.assertTrue(bl.join(60))
        wait_until(lambda: bl.stats()["complete"] == 0, timeout=30, message="the sweep")
        # ... and then, slice by slice on its clock, the pages they took.
        wait_until(lambda: self.free_pages(self.path) == 0, timeout=30,
                   message="the space to go back while the queue runs")
        bl.stop()
        self.assert_small(self.path)

    @staticmethod
    def free_pages(path):
        db = sqlite3.connect(path)
        try:
            return db.execute("PRAGMA freelist_count").fetchall()[0][0]
        finally:
            db.close()


# The last blero.py whose files are of the first layout (schema 1, no
# auto_vacuum): the tests of upgrades run it to make such files.
V1_COMMIT = "f38829e"

def older_blero(directory, commit):
    """Make `directory`, holding the blero.py of `commit` (which writes files
    of an older schema); return it.  Skips the test where git or the commit
    is missing."""
    try:
        source = subprocess.run(["git", "-C", HERE, "show", f"{commit}:blero.py"],
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise unittest.SkipTest(f"needs git and commit {commit}, whose blero.py writes "
                                f"files of an older schema")
    os.mkdir(directory)
    with open(os.path.join(directory, "blero.py"), "wb") as f:
        f.write(source)
    return directory


# argv: db.  With the v1 blero.py: 3,000 jobs done and swept (the file
# keeps their space), then 2 done and kept, and 3 left pending.
V1_CHILD = """
import os, sys, json, blero
bl = blero.new(sys.argv[1])
bl.register_processor(lambda job: job.data * 2, names=["done"])
bl.start()
bl.every(3600, "hourly", delay=3600)
ids = bl.enqueue_many([("done", os.urandom(1000)) for i in range(3000)])
bl.wait(ids[-1], 60)
bl.sweep()
kept = bl.enqueue_many([("done", b"kept %d" % i) for i in range(2)])
bl.wait(kept[-1], 60)
waiting = bl.enqueue_many([("waiting", b"waits %d" % i) for i in range(3)])
bl.stop()
print(json.dumps({"kept": kept, "waiting": waiting}))
"""


# argv: db.  With the v1 blero.py: 3000 pending jobs, 200 bytes of data each.
V1_PENDING_CHILD = """
import sys, blero
bl = blero.new(sys.argv[1]).start()
bl.enqueue_many([("j", b"x" * 200) for _ in range(3000)])
bl.stop()
"""


# argv: db.  With the v1 blero.py: a running queue that enqueues a job per
# line on stdin (and prints its id), and stops at the end of stdin.
V1_RUNNING_CHILD = """
import sys, blero
bl = blero.new(sys.argv[1]).start()
print("ready", flush=True)
for line in sys.stdin:
    print(bl.enqueue("more", line.strip()), flush=True)
bl.stop()
"""


class UpgradeTest(ProcessTest):

    @classmethod
    def setUpClass(cls):
        """One file made with the v1 blero.py (V1_CHILD), copied by each test."""
        cls._made = tempfile.TemporaryDirectory(prefix="blero-v1-")
        cls.addClassCleanup(cls._made.cleanup)
        old = older_blero(os.path.join(cls._made.name, "v1"), V1_COMMIT)
        cls.v1_dir = old
        cls.v1_path = os.path.join(old, "q.db")
        out = subprocess.run([sys.executable, "-c", V1_CHILD, cls.v1_path], cwd=old,
                             env=dict(os.environ, PYTHONPATH=old), capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0:
            raise AssertionError(out.stderr)
        cls.v1_made = json.loads(out.stdout)

    def v1_file(self, path):
        """Copy the v1 file to `path`; return what its maker said."""
        shutil.copyfile(self.v1_path, path)
        self.assertEqual(self.layout(path), (1, 0), "not a file of the first layout")
        self.assertGreater(os.path.getsize(path), 3 << 20)
        return self.v1_made

    def test_an_upgrade_short_of_disk_space_loses_no_job(self):
        """The first start of an old file on a disk with little room left:
        it may not manage to compact the file, but every job stays there."""
        if not ROOT:
            self.skipTest("mounting a small tmpfs (a disk that fills up) needs root")
        mount = os.path.join(self.dir, "small")
        os.mkdir(mount)
        size = os.path.getsize(self.v1_path) + (4 << 20)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.skipTest(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", mount], capture_output=True)
        path = os.path.join(mount, "q.db")
        # Live jobs, not free pages: compacting must copy them all.
        out = subprocess.run([sys.executable, "-c", V1_PENDING_CHILD, path], cwd=self.v1_dir,
                             env=dict(os.environ, PYTHONPATH=self.v1_dir),
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(self.layout(path), (1, 0), "not a file of the first layout")
        filler = os.path.join(mount, "filler")
        with open(filler, "wb") as f:   # the disk full, but for 600 KB
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        os.truncate(filler, os.path.getsize(filler) - 600_000)
        with contextlib.suppress(blero.BleroError):
            blero.new(path).start().stop()
        os.remove(filler)
        with blero.new(path) as bl:
            self.assertEqual(bl.stats()["pending"], 3000)
            self.assertEqual(bl.get_job(3000).data, b"x" * 200)
        self.assertEqual(self.layout(path), (blero._SCHEMA_VERSION, 2))

    def layout(self, path):
        """(user_version, auto_vacuum) of a file."""
        db = sqlite3.connect(path)
        try:
            return tuple(db.execute(f"PRAGMA {p}").fetchall()[0][0]
                         for p in ("user_version", "auto_vacuum"))
        finally:
            db.close()

    def assert_upgraded(self, path, theirs=()):
        """The latest schema, incremental auto_vacuum, blero's names blero_*;
        of the old names, only the application's tables `theirs`."""
        self.assertEqual(self.layout(path), (blero._SCHEMA_VERSION, 2))
        db = sqlite3.connect(path)
        try:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master"
                                              " WHERE name NOT LIKE 'sqlite!_%' ESCAPE '!'")}
            schedules = db.execute("SELECT key FROM blero_schedules").fetchall()
        finally:
            db.close()
        self.assertEqual({n for n in names if n.startswith("blero_")},
                         {"blero_jobs", "blero_owners", "blero_schedules", "blero_jobs_ready",
                          "blero_jobs_delayed", "blero_jobs_running", "blero_jobs_finished",
                          "blero_jobs_key", "blero_jobs_suspect", "blero_deps",
                          "blero_deps_dep", "blero_jobs_waiting",
                          "blero_controls", "blero_starts", "blero_starts_name"})
        self.assertEqual({"jobs", "owners", "schedules"} & names, set(theirs))
        self.assertEqual(schedules, [("hourly",)])

    def test_a_file_of_the_first_layout_carries_on_and_gives_its_space_back(self):
        made = self.v1_file(self.path)
        kept, waiting = made["kept"], made["waiting"]
        bl = blero.new(self.path)
        bl.register_processor(lambda job: job.data.upper(), names=["waiting"])
        bl.start()
        self.assertEqual([bl.get_job(i).result for i in kept], [b"kept 0" * 2, b"kept 1" * 2])
        self.assertEqual([bl.wait(i, 10) for i in waiting], [b"WAITS 0", b"WAITS 1", b"WAITS 2"])
        self.assertEqual(bl.stats(), {"pending": 0, "inprogress": 0, "complete": 5,
                                      "failed": 0, "cancelled": 0})
        self.assertEqual(bl.enqueue("waiting", b"new"), waiting[-1] + 1)
        self.assertTrue(bl.join(10))
        self.assertEqual(bl.sweep(), 6)
        bl.stop()
        self.assert_upgraded(self.path)
        SpaceTest.assert_small(self, self.path)
        self.assertEqual(blero.new(self.path).stats()["complete"], 0)

    def test_vacuum_command_compacts_a_file_of_the_first_layout(self):
        made = self.v1_file(self.path)
        before = os.path.getsize(self.path)
        out = run_cli("vacuum", "--db", self.path)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(f"{before:,} -> {os.path.getsize(self.path):,} bytes", out.stdout)
        self.assert_upgraded(self.path)
        SpaceTest.assert_small(self, self.path)
        bl = blero.new(self.path)
        self.assertEqual([bl.get_job(i).state for i in made["kept"] + made["waiting"]],
                         ["complete"] * 2 + ["pending"] * 3)
        bl.start()       # and on a running queue: nothing to give back, no harm done
        out = run_cli("vacuum", "--db", self.path)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(bl.enqueue("after"), made["waiting"][-1] + 1)
        bl.stop()
        missing = os.path.join(self.dir, "missing.db")
        out = run_cli("vacuum", "--db", missing)
        self.assertEqual(out.returncode, 1)
        self.assertIn("no queue file", out.stderr)
        self.assertFalse(os.path.exists(missing))

    def test_processes_starting_together_on_a_file_of_the_first_layout(self):
        made = self.v1_file(self.path)
        body = """
        db, log_path = sys.argv[1], sys.argv[2]
        log = open_log(log_path)
        bl = new_queue(db)
        bl.start()
        log("Q", *bl.enqueue_many([("new", PID)] * 20))
        bl.stop()
        """
        children = [self.spawn(body, self.path, self.log) for _ in range(3)]
        for p in children:
            self.finish(p)
        new_ids = sorted(int(i) for f in self.lines("Q") for i in f[1:-1])
        first = made["waiting"][-1] + 1
        self.assertEqual(new_ids, list(range(first, first + 60)))
        bl = blero.new(self.path)
        self.assertEqual(bl.stats()["pending"], 63)
        self.assertEqual(bl.get_job(made["kept"][0]).result, b"kept 0" * 2)
        self.assert_upgraded(self.path)

    def test_an_older_blero_running_on_the_file_keeps_its_tables(self):
        # A deploy starts the new blero.py while a process of the old one
        # still runs on the file: renaming its tables under it would break
        # it, so the new one refuses, naming it, and upgrades once it stopped.
        made = self.v1_file(self.path)
        old = subprocess.Popen([sys.executable, "-c", V1_RUNNING_CHILD, self.path],
                               cwd=self.v1_dir, env=dict(os.environ, PYTHONPATH=self.v1_dir),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(old.stdout.close)
        self.addCleanup(old.wait)
        self.addCleanup(old.kill)
        self.assertEqual(old.stdout.readline(), "ready\n")
        link = os.path.join(self.dir, "current.db")     # a deploy's link to it, too
        os.symlink(self.path, link)
        for attempt in (lambda: blero.new(self.path).start(), blero.new(self.path).stats,
                        lambda: blero.new(link).start()):
            with self.assertRaises(blero.BleroError) as cm:
                attempt()
            self.assertIn("older blero.py", str(cm.exception))
            self.assertIn(str(old.pid), str(cm.exception))
        self.assertEqual(self.layout(self.path), (1, 0), "changed under the old process")
        old.stdin.write("still here\n")
        old.stdin.flush()
        more = int(old.stdout.readline())
        self.assertEqual(more, made["waiting"][-1] + 1)
        old.stdin.close()
        self.assertEqual(old.wait(30), 0)
        with blero.new(self.path) as bl:
            self.assertEqual(bl.get_job(more).data, "still here")
        self.assert_upgraded(self.path)

    def test_jobs_a_crash_cut_short_in_an_upgraded_file_come_back_as_suspects(self):
        # A file of the first layout (which has no suspects), upgraded at
        # its first start: a kill -9 there cuts two jobs short, and they
        # come back as suspects, found by their own index, and run first,
        # one at a time, as in a file made new.
        made = self.v1_file(self.path)
        proc = start_child(_RUN_UNTIL_KILLED, self.path, "3,3", stdout=subprocess.PIPE,
                           text=True)
        self.addCleanup(stop_child, proc)
        found = LineReader(proc.stdout).expect(r"^running (\d+)$", count=2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        cut = sorted(int(m.group(1)) for m in found)
        self.assertEqual(cut, made["waiting"][:2])      # the oldest pending jobs
        bl = self.queue()
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("SELECT id FROM blero_jobs WHERE state = -1"
                                    " ORDER BY id").fetchall(), [(i,) for i in cut])
        select, _ = bl._storage._claim_statements(0, suspect=True)
        plan = " ".join(str(r) for r in db.execute("EXPLAIN QUERY PLAN " + select))
        self.assertIn("blero_jobs_suspect", plan)
        runs = []

        def record(job):
            runs.append(("S", job.id))
            time.sleep(0.05)            # (work, so that an overlap would show)
            runs.append(("E", job.id))
        bl.register_processor(record)
        bl.register_processor(record)
        self.assertTrue(bl.join(30))
        self.assertEqual(runs[:4], [("S", cut[0]), ("E", cut[0]), ("S", cut[1]), ("E", cut[1])],
                         "the suspects did not run first, one at a time")
        self.assertEqual(bl.stats()["pending"], 0)
        self.assertEqual([bl.get_job(i).attempt for i in cut], [2, 2])
        bl.stop()
        self.assert_upgraded(self.path)

    def test_the_applications_own_tables_share_the_queue_file(self):
        # An application keeps its own tables in the queue file (one even
        # named jobs): the upgrade, the queue and vacuum leave them alone.
        made = self.v1_file(self.path)
        app = sqlite3.connect(self.path)
        app.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
        app.execute("INSERT INTO orders (item) VALUES ('tea')")
        app.commit()
        app.close()
        bl = blero.new(self.path).start()
        app = sqlite3.connect(self.path)
        self.addCleanup(app.close)
        app.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, title TEXT)")
        app.execute("INSERT INTO jobs (title) VALUES ('plumber')")
        app.commit()
        after = bl.enqueue("waiting", b"after")
        self.assertEqual(after, made["waiting"][-1] + 1)
        bl.stop()
        with blero.new(self.path) as bl:
            self.assertEqual(bl.stats()["pending"], 4)
        self.assertEqual(run_cli("vacuum", "--db", self.path).returncode, 0)
        self.assertEqual(app.execute("SELECT item FROM orders").fetchall(), [("tea",)])
        self.assertEqual(app.execute("SELECT title FROM jobs").fetchall(), [("plumber",)])
        self.assert_upgraded(self.path, theirs=["jobs"])


# ---------------------------------------------------------------------------
# The command line on a file one does not trust, and scripted; the demo on a
# terminal (issue 12)
# ---------------------------------------------------------------------------

class CommandLineUntrustedAndScriptedTest(TempDirTest):
    """An operator looks at a queue file they do not trust with --serializer
    json, and scripts the commands with --json, jq and exit codes."""

    def test_json_serializer_never_unpickles_a_crafted_file(self):
        path = os.path.join(self.dir, "q.db")
        marks = {k: os.path.join(self.dir, f"unpickled-{k}") for k in ("data", "result")}
        bl = self.queue()       # written with pickle, by someone else
        bl.register_processor(lambda job: MakesMarker(marks["result"]))
        trap = bl.enqueue("evil-data", MakesMarker(marks["data"]), delay=3600)
        done = bl.enqueue("evil-result", "x")
        # Not bl.wait(): it would unpickle the crafted result here.
        wait_until(lambda: bl.stats()["complete"] == 1, message="the job to complete")
        bl.stop()
        json_db = ("--db", path, "--serializer", "json")
        results = run_clis(("jobs", *json_db, "--json"), ("jobs", *json_db),
                           ("stats", *json_db), ("cancel", *json_db, done),
                           ("retry", *json_db, done), ("sweep", *json_db, "--older-than", 3600))
        serve = subprocess.Popen([sys.executable, "-m", "blero", "serve", *json_db],
                                 cwd=HERE, env=child_env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(stop_child, serve)
        port = int(LineReader(serve.stdout).expect(r"http://[^\s/]+:(\d+)/?")[0].group(1))
        pages = [http_request(port, "GET", page) for page in ("/api/stats", "/api/jobs")]
        serve.terminate()
        serve.wait(20)
        self.assertEqual([name for name in marks.values() if os.path.exists(name)], [],
                         "something was unpickled")
        codes = [code for code, out, err in results]
        self.assertEqual(codes, [0, 0, 0, 1, 1, 0], results)
        listed = json.loads(results[0][1])
        self.assertEqual([(j["id"], j["state"], j["data"], j["result"]) for j in listed],
                         [(trap, "pending", None, None), (done, "complete", None, None)])
        self.assertIn("data=None", results[1][1])
        self.assertEqual([err.strip() for _, _, err in results[3:5]],
                         [f"blero: job {done} already ended: complete",
                          f"blero: job {done} is not failed: complete"])
        for status, ctype, body in pages:
            self.assertEqual(status, 200, body)
        self.assertEqual([j["data"] for j in json.loads(pages[0][2])["pending"]], ["None"])
        self.assertEqual([j["data"] for j in json.loads(pages[1][2])], ["None", "None"])
        self.assertNotIn("Traceback", serve.stderr.read())
        # The file is a real trap: read with pickle, it springs.
        self.assertEqual(run_cli("jobs", "--db", path).returncode, 0)
        self.assertTrue(all(os.path.exists(name) for name in marks.values()))

    def test_jobs_json_gives_json_values_and_errors_name_their_cause(self):
        path = os.path.join(self.dir, "q.db")
        bl = self.queue(serializer=json, retries=0)

        def process(job):
            if job.name == "bad":
                raise ValueError("no route")
            return {"ok": True, "url": job.data["url"]}

        bl.register_processor(process)
        a = bl.enqueue("fetch", {"url": "https://example.org/a", "tries": [1, 2]})
        b = bl.enqueue("fetch", {"url": "https://example.org/b"})
        bad = bl.enqueue("bad", {"url": "https://example.org/c"})
        later = bl.enqueue("fetch", {"url": "https://example.org/d"}, delay=3600)
        bl.wait(a, 10)
        bl.wait(b, 10)
        with self.assertRaises(blero.JobFailed):
            bl.wait(bad, 10)
        bl.stop()
        other = os.path.join(self.dir, "p.db")
        with blero.new(other) as pq:       # pickle: values JSON cannot carry as they are
            pq.enqueue("odd", {"tags": {"x"}}, delay=3600)
            pq.enqueue("odd", (1, 2.5, "three"), delay=3600)
            pq.enqueue("odd", float("nan"), delay=3600)
        missing = os.path.join(self.dir, "nowhere.db")
        db = ("--db", path, "--serializer", "json")
        commands = [("jobs", *db, "--json"), ("jobs", *db, "--json", "--name", "fetch"),
                    ("jobs", *db, "--name", "bad"), ("jobs", *db, "--name", "typo", "--json"),
                    ("stats", *db, "--json"), ("jobs", "--db", other, "--json"),
                    ("cancel", *db, 424242), ("retry", *db, 424242),
                    ("jobs", "--db", missing, "--serializer", "json"),
                    ("stats", *db[:3], "yaml"), ("jobs", *db[:3]),
                    ("demo", "--db", path, "--serializer", "yaml")]
        results = run_clis(*commands)
        self.assertEqual([code for code, out, err in results],
                         [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2], results)
        everything = json.loads(results[0][1])
        self.assertEqual([j["data"]["url"] for j in everything],
                         [f"https://example.org/{c}" for c in "abcd"])
        self.assertEqual(everything[0]["data"]["tries"], [1, 2])
        self.assertEqual([j["result"] for j in everything],
                         [{"ok": True, "url": "https://example.org/a"},
                          {"ok": True, "url": "https://example.org/b"}, None, None])
        self.assertIn("ValueError: no route", everything[2]["error"])
        self.assertEqual([j["id"] for j in json.loads(results[1][1])], [a, b, later])
        self.assertEqual([line.split("\t")[:3] for line in results[2][1].splitlines()],
                         [[str(bad), "failed", "bad"]])
        self.assertEqual(json.loads(results[3][1]), [])
        self.assertEqual(json.loads(results[4][1]), {"pending": 1, "inprogress": 0,
                                                     "complete": 2, "failed": 1, "cancelled": 0})
        self.assertEqual([j["data"] for j in json.loads(results[5][1])],
                         [repr({"tags": {"x"}}), [1, 2.5, "three"], "nan"])
        self.assertEqual([err for _, _, err in results[6:9]],
                         ["blero: no such job: 424242\n", "blero: no such job: 424242\n",
                          f"blero: {missing}: no queue file there (start() makes one)\n"])
        self.assertFalse(os.path.exists(missing), "a missing --db file is never created")
        for code, out, err in results[9:]:
            self.assertIn("--serializer", err)
        if shutil.which("jq"):      # the way an operator scripts it
            out = subprocess.run(["jq", "-r", ".[].data.url"], input=results[0][1],
                                 capture_output=True, text=True, timeout=30)
            self.assertEqual(out.stdout.split(), [f"https://example.org/{c}" for c in "abcd"])


def terminal_screen(output):
    """The lines a terminal shows once it has displayed `output`: text, CR,
    LF, ESC[K (erase to the end of the line) and ESC[A (up one line)."""
    rows, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[AK]|\r|\n|[^\x1b\r\n]+", output):
        if token == "\r":
            col = 0
        elif token == "\n":
            row += 1
            if row == len(rows):
                rows.append("")
        elif token == "\x1b[A":
            row = max(0, row - 1)
        elif token == "\x1b[K":
            rows[row] = rows[row][:col]
        else:
            line = rows[row].ljust(col)
            rows[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    while rows and not rows[-1]:
        rows.pop()
    return rows


# Runs `python ARGS` with the pseudo-terminal on fd 0 as its controlling
# terminal, as a shell runs a program: a ^C typed there is then echoed, and
# sends SIGINT to it.
_ON_A_TERMINAL = ("import fcntl, os, sys, termios; os.setsid(); "
                  "fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                  "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


class Terminal:
    """A program on a pseudo-terminal of its own: what it shows, keys typed to it."""

    def __init__(self, test, *args):
        import pty
        self.leader, follower = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", _ON_A_TERMINAL, *map(str, args)],
                                     cwd=HERE, env=child_env(), stdin=follower,
                                     stdout=follower, stderr=follower)
        os.close(follower)
        self._output = b""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        test.addCleanup(self._close)

    def _close(self):
        stop_child(self.proc)
        self._reader.join(10)       # the program gone, reading ends
        os.close(self.leader)

    def _read(self):
        while True:
            try:
                chunk = os.read(self.leader, 65536)
            except OSError:     # EIO: the program has closed the terminal
                return
            if not chunk:
                return
            with self._lock:
                self._output += chunk

    def text(self):
        with self._lock:
            return self._output.decode(errors="replace")

    def wait_for(self, pattern, count=1, timeout=30.0):
        wait_until(lambda: len(re.findall(pattern, self.text(), re.M)) >= count,
                   timeout=timeout, message=f"{count} x {pattern!r} on the terminal")

    def type(self, keys: bytes):
        os.write(self.leader, keys)

    def finish(self, timeout=30.0):
        """(exit status, the screen's lines) once the program has ended."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code, terminal_screen(self.text())


_BAR = r"\[[#.]{30}\] \d+/\d+ jobs  [\d.]+ jobs/s  ETA \S+"


@unittest.skipUnless(POSIX, "a pseudo-terminal")
class DemoOnATerminalTest(TempDirTest):
    """python -m blero demo as one runs it in a terminal: Ctrl-C, SIGTERM,
    a second run that says what it carries on with, a finished queue."""

    def setUp(self):
        super().setUp()
        self.db = os.path.join(self.dir, "db") + os.sep

    def demo_on_a_terminal(self, *args):
        """The demo, stopped once two of its jobs are running (the progress line drawn)."""
        term = Terminal(self, "-m", "blero", "demo", "--db", self.db, *args)
        term.wait_for(r"\] Processing job: ", count=2)
        term.wait_for(_BAR + r"(\r\n)?\Z")     # drawn again after the last line
        return term

    def test_ctrl_c_leaves_its_echo_on_a_line_of_its_own(self):
        term = self.demo_on_a_terminal("-n", "2", "--sleep", 60)
        term.type(b"\x03")      # Ctrl-C, typed: the terminal echoes ^C and sends SIGINT
        code, screen = term.finish()
        self.assertEqual(code, 0, screen)
        self.assertRegex(screen[-4], rf"^{_BAR}$", screen)
        self.assertEqual(screen[-3:], ["^C", "Caught signal interrupt. Exiting ...",
                                       "Stopping Blero ..."])
        self.assertEqual(screen[:4], ["Starting Blero ...", "Registering Processor 1 ...",
                                      "Registering Processor 2 ...", "Enqueuing jobs ..."])

    def test_sigterm_then_each_next_run_says_what_it_carries_on_with(self):
        term = self.demo_on_a_terminal("-n", "2", "--sleep", 60)
        term.proc.send_signal(signal.SIGTERM)
        code, screen = term.finish()
        self.assertEqual(code, 0, screen)
        self.assertRegex(screen[-3], rf"^{_BAR}$", screen)
        self.assertEqual(screen[-2:], ["Caught signal terminated. Exiting ...",
                                       "Stopping Blero ..."])
        # A second run, killed -9 while its 3 processors run jobs 1, 2 and 3.
        proc = subprocess.Popen([sys.executable, "-m", "blero", "demo", "--db", self.db,
                                 "-n", "3", "--sleep", "60"], cwd=HERE, env=child_env(),
                                stdout=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, proc)
        out = LineReader(proc.stdout)
        out.expect(r"\] Processing job: ", count=3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        self.assertEqual(out.lines[:5], ["Starting Blero ...\n",
                                         "carrying on: 2 interrupted jobs first, 48 left\n",
                                         "Registering Processor 1 ...\n",
                                         "Registering Processor 2 ...\n",
                                         "Registering Processor 3 ...\n"])
        # A third, to the end, with every registration line before any job's
        # (that the interrupted jobs go first, DemoTest shows on one processor).
        result = subprocess.run([sys.executable, "-m", "blero", "demo", "--db", self.db,
                                 "-n", "8", "--sleep", "0"], cwd=HERE, env=child_env(),
                                capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        lines = result.stdout.splitlines()
        self.assertEqual(lines[:10], ["Starting Blero ...",
                                      "carrying on: 3 interrupted jobs first, 47 left"]
                         + [f"Registering Processor {k} ..." for k in range(1, 9)])
        started = re.findall(r"\] Processing job: Job #(\d+) ", result.stdout)
        self.assertEqual(sorted(map(int, started)), list(range(1, 51)))
        self.assertEqual(lines[-2:], ["All jobs done.", "Stopping Blero ..."])
        # A fourth has nothing to do, and says how to start over.
        result = subprocess.run([sys.executable, "-m", "blero", "demo", "--db", self.db],
                                cwd=HERE, env=child_env(), capture_output=True, text=True,
                                timeout=60)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout.splitlines(), [
            "Starting Blero ...",
            f"nothing to do: all 50 jobs are complete (rm -r {self.db[:-1]} to start over)",
            "Stopping Blero ..."])

    def test_a_finished_queue_says_how_it_ended_and_how_to_start_over(self):
        own = os.path.join(self.dir, "own")         # a folder holding only the queue
        shared = os.path.join(self.dir, "shared")   # one holding other files too
        os.mkdir(shared)
        with open(os.path.join(shared, "notes.txt"), "w") as f:
            f.write("keep me\n")
        for folder, names in ((own, ["a"] * 7), (shared, ["a", "bad", "gone"])):
            with blero.new(folder + os.sep, retries=0) as bl:
                bl.register_processor(lambda job: 1 / 0 if job.name == "bad" else None)
                for name in names:
                    job_id = bl.enqueue(name, delay=3600 if name == "gone" else None)
                    if name == "gone":
                        bl.cancel(job_id)
                self.assertTrue(bl.join(10))
        queue_file = os.path.join(shared, "blero.db")
        results = run_clis(("demo", "--db", own), ("demo", "--db", shared + os.sep),
                           ("demo", "--db", queue_file))
        ended = "all 3 jobs have ended, 1 complete, 1 failed, 1 cancelled"
        by_files = f"rm {queue_file} {queue_file}-lock to start over"
        for (code, out, err), message in zip(results, [
                f"nothing to do: all 7 jobs are complete (rm -r {own} to start over)",
                f"nothing to do: {ended} ({by_files})",
                f"nothing to do: {ended} ({by_files})"]):
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(out.splitlines(), ["Starting Blero ...", message,
                                                "Stopping Blero ..."])
        self.assertEqual(blero.new(queue_file).stats(), {"pending": 0, "inprogress": 0,
                                                         "complete": 1, "failed": 1,
                                                         "cancelled": 1})



# argv: db.  Enqueues 200 jobs and dies by SIGKILL: its commits are still in
# the -wal (and its -shm), as in a snapshot of a queue that was running.
KILLED_WITH_A_WAL_CHILD = """
import os, signal, sys, blero
bl = blero.new(sys.argv[1]).start()
bl.enqueue_many([("j", i) for i in range(200)])
os.kill(os.getpid(), signal.SIGKILL)
"""


def with_old_blero(test, commit, code, *args):
    """Run `code` (with `args`) in a Python that imports the blero.py of
    `commit`, to make a file of its layout; return what it printed.  The
    test is skipped without git or that commit."""
    old = os.path.join(test.dir, f"blero-{commit}")
    if not os.path.isdir(old):
        older_blero(old, commit)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                         cwd=old, env=dict(os.environ, PYTHONPATH=old), capture_output=True,
                         text=True, timeout=120)
    test.assertEqual(out.returncode, 0, out.stderr)
    return out.stdout


class ReadOnlyStorageTest(ProcessTest):
    """A queue file on read-only storage (a snapshot, a backup, a read-only
    mount): inspecting it works and writes nothing at all, not even a -lock,
    -wal or -shm; operating on it raises BleroError saying why it cannot."""

    def read_only_copy(self, *sources):
        """Copies of `sources` (a queue file, and what lies beside it) on a
        tmpfs mounted read-only; returns the copy of the first."""
        if not ROOT:
            self.skipTest("mounting a read-only file system needs root")
        mount = os.path.join(self.dir, "ro")
        os.mkdir(mount)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.skipTest(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", mount], capture_output=True)
        for source in sources:
            shutil.copy2(source, mount)
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True, capture_output=True)
        copy = os.path.join(mount, os.path.basename(sources[0]))
        with self.assertRaises(OSError, msg="the mount is not read-only"):
            open(copy, "ab").close()
        return copy

    def test_a_stopped_queue_on_a_read_only_mount_is_inspected_but_not_changed(self):
        bl = blero.new(self.path).start()
        bl.register_processor(lambda job: job.data * 2, names="double")
        done = bl.enqueue("double", 21)
        self.assertEqual(bl.wait(done, 10), 42)
        waiting = bl.enqueue("later", "x")
        bl.every(3600, "hourly", delay=3600)
        bl.stop()
        path = self.read_only_copy(self.path)
        before = dir_state(os.path.dirname(path))
        q = blero.new(path)
        self.assertEqual(q.stats(), {"pending": 1, "inprogress": 0, "complete": 1,
                                     "failed": 0, "cancelled": 0})
        self.assertEqual([(j.id, j.state) for j in q.jobs()],
                         [(done, "complete"), (waiting, "pending")])
        self.assertEqual((q.get_job(done).result, q.get_job(waiting).data), (42, "x"))
        self.assertEqual(q.wait(done), 42)
        with self.assertRaises(TimeoutError):
            q.wait(waiting, 0.2)
        self.assertFalse(q.join(0.2))
        for name, call in (("cancel", lambda: q.cancel(waiting)),
                           ("retry_failed", q.retry_failed),
                           ("sweep, with nothing to sweep", lambda: q.sweep(3600)),
                           ("every", lambda: q.every(60, "x")),
                           ("unschedule", lambda: q.unschedule("hourly")),
                           ("start", q.start)):
            with self.subTest(call=name):
                with self.assertRaises(blero.BleroError) as cm:
                    call()
                self.assertIn(path, str(cm.exception))
                self.assertIn("read-only", str(cm.exception))
        (code, out, err), *refused = run_clis(
            ("jobs", "--db", path, "--json"), ("cancel", "--db", path, waiting),
            ("vacuum", "--db", path))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([job["id"] for job in json.loads(out)], [done, waiting])
        for code, _, err in refused:
            self.assertEqual(code, 1, err)
            self.assertIn("read-only", err)
        self.assertEqual(dir_state(os.path.dirname(path)), before, "the read-only mount changed")
        self.assertEqual(q.get_job(waiting).state, "pending")

    def test_a_snapshot_of_a_running_queue_shows_the_commits_in_its_wal(self):
        out = run_child(KILLED_WITH_A_WAL_CHILD, self.path)
        self.assertEqual(out.returncode, -signal.SIGKILL, out.stderr)
        self.assertGreater(os.path.getsize(self.path + "-wal"), 0, "nothing left in the -wal")
        path = self.read_only_copy(self.path, self.path + "-wal", self.path + "-shm")
        before = dir_state(os.path.dirname(path))
        q = blero.new(path)
        self.assertEqual(q.stats()["pending"], 200)
        self.assertEqual([job.data for job in q.jobs(limit=None)], list(range(200)))
        self.assertEqual(q.get_job(200).data, 199)
        self.assertEqual(dir_state(os.path.dirname(path)), before, "the read-only mount changed")

    def test_a_wal_without_its_shm_is_refused_rather_than_read_without_its_commits(self):
        """SQLite cannot read a -wal on read-only storage without its -shm,
        and reading the file alone would show the queue without them."""
        out = run_child(KILLED_WITH_A_WAL_CHILD, self.path)
        self.assertEqual(out.returncode, -signal.SIGKILL, out.stderr)
        path = self.read_only_copy(self.path, self.path + "-wal")
        before = dir_state(os.path.dirname(path))
        for name, call in (("stats", blero.new(path).stats),
                           ("get_job", lambda: blero.new(path).get_job(1))):
            with self.subTest(call=name):
                with self.assertRaises(blero.BleroError) as cm:
                    call()
                message = str(cm.exception)
                for word in (path, "read-only", "q.db-shm", "copy"):
                    self.assertIn(word, message)
        self.assertEqual(dir_state(os.path.dirname(path)), before, "the read-only mount changed")

    def test_a_file_of_the_old_layout_is_inspected_where_it_cannot_be_upgraded(self):
        """A backup of a queue an older blero.py wrote (schema 1): it shows
        its jobs as it is, since an upgrade would be a write."""
        with_old_blero(self, V1_COMMIT, """
            import sys, blero
            bl = blero.new(sys.argv[1])
            bl.register_processor(lambda job: job.data * 2, names="double")
            bl.start()
            bl.wait(bl.enqueue("double", 21), 30)
            bl.enqueue("later", "x")
            bl.stop()
            """, self.path)
        path = self.read_only_copy(self.path)
        before = dir_state(os.path.dirname(path))
        q = blero.new(path)
        self.assertEqual(q.stats(), {"pending": 1, "inprogress": 0, "complete": 1,
                                     "failed": 0, "cancelled": 0})
        self.assertEqual([(j.name, j.state) for j in q.jobs()],
                         [("double", "complete"), ("later", "pending")])
        self.assertEqual(q.wait(1), 42)
        self.assertEqual((q.get_job(1).progress, q.schedules()), (None, []))
        self.assertFalse(q.join(0.1))
        with self.assertRaises(blero.BleroError) as cm:
            q.cancel(2)
        self.assertIn("read-only", str(cm.exception))
        self.assertEqual(dir_state(os.path.dirname(path)), before, "the read-only mount changed")



# argv: db.  A queue whose one processor, registered once it runs, takes
# jobs named "b" and holds the first for ever.
TAKES_B_CHILD = NEW_QUEUE + """
import sys, time, blero
def hold(job):
    print("took", job.id, flush=True)
    time.sleep(600)
bl = new_queue(sys.argv[1]).start()
bl.register_processor(hold, names="b")
print("registered", flush=True)
time.sleep(600)
"""


@both_engines
class JoinWarningTest(ProcessTest):
    """join() on jobs that nothing takes (a typo in a name, say) says so,
    instead of waiting for ever in silence; jobs that another live process
    takes are no cause for it."""

    def untaken_warnings(self, captured):
        return [r.getMessage() for r in captured.records if r.levelno == logging.WARNING
                and r.getMessage().startswith("no processor takes")]

    def test_join_warns_once_of_each_name_no_live_queue_takes(self):
        captured = Captured(self, logging.WARNING)
        bl = self.queue()
        mine = bl.register_processor(lambda job: None, names="a")
        child = self.spawn(TAKES_B_CHILD, self.path)
        held = bl.enqueue("b")
        wait_until(lambda: f"took {held}" in self.output(child), timeout=30,
                   message="the other process to take a job")
        bl.enqueue("b")             # waits for the other process, busy for now
        bl.enqueue("a", delay=3600)  # waits for a processor of this one
        bl.enqueue("typo")
        # (a join looks for untaken names at once, then at most once a second)
        self.assertFalse(bl.join(0.1))
        self.assertFalse(bl.join(0.1))
        self.assertEqual(self.untaken_warnings(captured),
                         ["no processor takes jobs named 'typo' (1 pending): join() waits "
                          "until a queue that takes them runs"])
        # Once the other process is gone, and this one's processor too, nothing takes them.
        self.kill(child)
        wait_until(lambda: bl.get_job(held).state == "pending", message="its job taken back")
        bl.unregister_processor(mine)
        self.assertFalse(bl.join(0.1))
        warned = self.untaken_warnings(captured)
        self.assertEqual(len(warned), 3, warned)
        self.assertEqual([w.split(":")[0] for w in warned[1:]],
                         ["no processor takes jobs named 'a' (1 pending)",
                          "no processor takes jobs named 'b' (2 pending)"])


# ---------------------------------------------------------------------------
# The dashboard of the whole queue (issue 12): JSON under /api/, and the page
# as Chromium renders it, driven over its remote debugging pipe
# ---------------------------------------------------------------------------

@both_engines
class DashboardOfTheQueueTest(TempDirTest):
    """An operator looking at a queue another handle (or process) runs."""

    def run_elsewhere(self):
        """A queue run by one handle, with 3 complete, 2 failed, 1 running
        and 2 pending jobs, served by a second handle that runs nothing:
        (worker handle, port, failed ids, running id, Event that fixes the failing)."""
        release, fixed = threading.Event(), threading.Event()

        def process(job):
            if job.name == "slow":
                release.wait(30)
            elif job.name == "bad" and not fixed.is_set():
                raise KeyError(f"no such row: {job.data}")
            return {"done": job.data}

        worker = self.queue(retries=0)
        self.addCleanup(release.set)        # before the queue's stop waits for it
        worker.register_processor(process, names=["ok", "bad"])
        worker.register_processor(process, names="slow")
        for i in range(3):
            worker.wait(worker.enqueue("ok", i), timeout=10)
        failed = [worker.enqueue("bad", i) for i in range(2)]
        for job_id in failed:
            with self.assertRaises(blero.JobFailed):
                worker.wait(job_id, timeout=10)
        running = worker.enqueue("slow")
        wait_until(lambda: worker.get_job(running).state == "inprogress", message="slow to run")
        worker.enqueue("later", delay=3600)
        worker.enqueue("later", delay=600)
        viewer = blero.new(worker.path, **self.settings())   # never started: a viewer, like `serve`
        server = viewer.serve_metrics()
        self.addCleanup(server.close)
        return worker, server.port, failed, running, fixed

    def get_json(self, port, path, status=200):
        code, ctype, body = http_request(port, "GET", path)
        self.assertEqual(code, status, body)
        self.assertTrue(ctype.startswith("application/json"), ctype)
        return json.loads(body)

    def test_the_overview_shows_the_stored_queue_not_the_serving_process(self):
        worker, port, failed, running, _ = self.run_elsewhere()
        stats = self.get_json(port, "/api/stats")
        self.assertEqual(stats["counts"], {"pending": 2, "inprogress": 1, "complete": 3,
                                           "failed": 2, "cancelled": 0})
        self.assertEqual(stats["queue"], {"path": worker.path, "read_only": False})
        self.assertEqual(stats["served_by"], {"pid": os.getpid(), "running": False,
                                              "processors": 0})
        self.assertNotIn("finished", stats, "this process's own counters are not the queue's")
        throughput = stats["throughput"]
        self.assertEqual((sum(throughput["complete"]), sum(throughput["failed"])), (3, 2))
        self.assertEqual(len(throughput["complete"]), len(throughput["failed"]))
        self.assertEqual(throughput["step"] * (len(throughput["complete"]) - 1), 300)
        self.assertEqual([j["id"] for j in stats["inprogress"]], [running])
        self.assertEqual([j["id"] for j in stats["failures"]], failed[::-1])
        self.assertIn("KeyError: 'no such row: 1'", stats["failures"][0]["error"])
        self.assertEqual([j["result"] for j in stats["completions"]],
                         [repr({"done": i}) for i in (2, 1, 0)])

    def test_pending_jobs_are_listed_by_when_they_may_run(self):
        bl = self.queue()       # started, with no processor: every job stays pending
        at = time.time() + 600
        in_an_hour = bl.enqueue("report", delay=3600)
        soon_low = bl.enqueue("report", run_at=at, priority=0)
        soon_high = bl.enqueue("report", run_at=at, priority=5)
        ready_low = bl.enqueue("now", priority=-1)
        ready_high = bl.enqueue("now", priority=3)
        ready_next = bl.enqueue("now", priority=3)
        server = bl.serve_metrics()
        self.addCleanup(server.close)
        pending = self.get_json(server.port, "/api/stats")["pending"]
        self.assertEqual([j["id"] for j in pending],
                         [ready_high, ready_next, ready_low, soon_high, soon_low, in_an_hour])

    def test_jobs_are_filtered_by_name_and_state_and_paged(self):
        bl = self.queue(retries=0)
        bl.register_processor(lambda job: 1 / 0 if job.data % 3 == 0 else job.data)
        ids = {name: [] for name in ("a", "b")}
        for i in range(1, 25):
            ids["a" if i % 2 else "b"].append(bl.enqueue("a" if i % 2 else "b", i))
        self.assertTrue(bl.join(20))
        server = bl.serve_metrics()
        self.addCleanup(server.close)
        port = server.port
        pages, after = [], None
        for _ in range(10):     # 3 pages and an empty one, unless paging is broken
            query = "/api/jobs?name=a&order=desc&limit=5" + (f"&after={after}" if after else "")
            page = self.get_json(port, query)
            if not page:
                break
            self.assertLessEqual(len(page), 5)
            pages.append([j["id"] for j in page])
            after = page[-1]["id"]
        self.assertEqual([len(p) for p in pages], [5, 5, 2])
        self.assertEqual(sum(pages, []), ids["a"][::-1])
        failed_b = self.get_json(port, "/api/jobs?name=b&state=failed")
        self.assertEqual([j["id"] for j in failed_b],
                         [j.id for j in bl.jobs("failed", "b")])
        self.assertEqual({j["data"] for j in failed_b}, {"6", "12", "18", "24"})
        forward = self.get_json(port, f"/api/jobs?after={ids['b'][5]}&limit=3")
        self.assertEqual([j["id"] for j in forward], list(range(ids["b"][5] + 1, ids["b"][5] + 4)))
        for query, cause in (("order=sideways", "order"), ("after=x", "after"),
                             ("limit=5000", "limit"), ("limit=-1", "limit"),
                             ("state=lost", "state")):
            with self.subTest(query=query):
                self.assertIn(cause, self.get_json(port, "/api/jobs?" + query, 400)["error"])

    def test_each_job_has_a_page_with_all_its_fields(self):
        worker, port, failed, running, _ = self.run_elsewhere()
        job = self.get_json(port, f"/api/job?id={failed[0]}")
        self.assertLessEqual(set(blero.JobInfo._fields), set(job))
        info = worker.get_job(failed[0])
        self.assertEqual({k: job[k] for k in blero.JobInfo._fields},
                         json.loads(json.dumps(info._asdict())))
        self.assertIn("Traceback (most recent call last)", job["error"])
        done = worker.jobs("complete")[0]
        self.assertEqual(self.get_json(port, f"/api/job?id={done.id}")["result"],
                         {"done": 0}, "a JSON value, not its repr")
        self.assertEqual(self.get_json(port, "/api/job?id=424242", 404),
                         {"error": "no such job: 424242"})
        for query in ("", "?id=x", "?id=0"):
            with self.subTest(query=query):
                self.assertIn("id", self.get_json(port, "/api/job" + query, 400)["error"])


    def test_serve_shows_a_queue_another_process_runs_and_runs_nothing_itself(self):
        worker, _, failed, running, _ = self.run_elsewhere()
        proc = subprocess.Popen([sys.executable, "-m", "blero", "serve", *self.cli_queue()],
                                cwd=HERE, env=child_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(stop_child, proc)
        banner = LineReader(proc.stdout).expect(r"Serving the dashboard of (.*) at "
                                                r"http://[^\s/]+:(\d+)/?")[0]
        port = int(banner.group(2))
        if self.engine == "postgres":   # which of the server's queues it is
            self.assertTrue(banner.group(1).endswith(f" (schema {self.schema})"),
                            banner.group(0))
        stats = self.get_json(port, "/api/stats")
        self.assertEqual(stats["served_by"], {"pid": proc.pid, "running": False,
                                              "processors": 0})
        self.assertEqual(stats["counts"], worker.stats())
        self.assertEqual([j["id"] for j in stats["inprogress"]], [running])
        proc.terminate()
        self.assertEqual(proc.wait(20), 0)
        self.assertNotIn("Traceback", proc.stderr.read())
        proc.stdout.close()
        proc.stderr.close()


class DevTools:
    """Headless Chromium driven over its remote debugging pipe (fds 3 and 4):
    JSON messages, each ended by a NUL, and nothing beyond the standard library."""

    def __init__(self, test, url, width=1280, height=900):
        to_chromium, self._to = os.pipe()
        self._from, from_chromium = os.pipe()
        profile = os.path.join(test.dir, f"chromium-{len(os.listdir(test.dir))}")
        command = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                   "--disable-quic", "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                   f"--window-size={width},{height}", "--remote-debugging-pipe", url]
        # Chromium reads fd 3 and writes fd 4: a small Python puts the pipes
        # there (by way of fds above both, so that neither overwrites the other).
        launch = ("import fcntl, os, sys\n"
                  "high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]]\n"
                  "for fd, target in zip(high, (3, 4)):\n"
                  "    os.dup2(fd, target)\n"
                  "os.execv(sys.argv[3], sys.argv[3:])\n")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", launch, str(to_chromium), str(from_chromium), *command],
            pass_fds=(to_chromium, from_chromium), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_chromium)
        os.close(from_chromium)
        test.addCleanup(self.close)
        self._buffer, self._next = b"", 0
        page = wait_until(lambda: [t for t in self.call("Target.getTargets")["targetInfos"]
                                   if t["type"] == "page"], timeout=60, message="a page")[0]
        self._session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                  flatten=True)["sessionId"]
        # A window is at least 500 px wide: a phone's width is emulated.
        self.width = width
        self.call("Emulation.setDeviceMetricsOverride", self._session, width=width,
                  height=height, deviceScaleFactor=1, mobile=width < 600)

    def screenshot(self, path):
        """The whole page, as PNG, into `path`."""
        height = self.evaluate("document.documentElement.scrollHeight")
        shot = self.call("Page.captureScreenshot", self._session, format="png",
                         captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1})
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))

    def call(self, method, session=None, **params):
        """Send one command; return its result (events on the way are dropped)."""
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._from], [], [], left)[0]:
                    raise AssertionError(f"Chromium did not answer {method}")
                chunk = os.read(self._from, 1 << 16)
                if not chunk:
                    raise AssertionError(f"Chromium went away during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", self._session, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, message):
        """Wait until `expression` is true (while the page loads, it may throw)."""
        guarded = f"(() => {{ try {{ return {expression}; }} catch (e) {{ return false; }} }})()"
        return wait_until(lambda: self.evaluate(guarded), timeout=30, interval=0.1,
                          message=message)

    def close(self):
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)


@unittest.skipUnless(POSIX and find_chromium(), "Chromium is not installed")
class DashboardInChromiumTest(TempDirTest):
    """What an operator sees and does on the page, as Chromium renders it."""

    run_elsewhere = DashboardOfTheQueueTest.run_elsewhere

    def test_the_rendered_page_shows_the_queue_and_retry_really_retries(self):
        worker, port, failed, running, fixed = self.run_elsewhere()
        browser = DevTools(self, f"http://127.0.0.1:{port}/")
        text = "document.getElementById('{}').innerText"
        browser.wait_for(text.format("counts") + ".includes('failed')", "the counts")
        cards = browser.evaluate("[...document.querySelectorAll('#counts .card')]"
                                 ".map(c => c.innerText.split(String.fromCharCode(10)))")
        self.assertEqual({label: int(n) for n, label in cards},
                         {"pending": 2, "in progress": 1, "complete": 3, "failed": 2,
                          "cancelled": 0})
        self.assertIn("which runs no jobs", browser.evaluate(text.format("served-by")))
        self.assertIn(worker.path, browser.evaluate(text.format("target")))
        failures = browser.evaluate(text.format("failures"))
        self.assertIn("Traceback (most recent call last)", failures)
        self.assertIn("KeyError: 'no such row: 0'", failures)
        chart = browser.evaluate("[...document.querySelectorAll('#chart text')]"
                                 ".map(t => t.textContent)")
        self.assertIn("jobs/s", chart)
        self.assertTrue(any(re.fullmatch(r"\d\d:\d\d", label) for label in chart), chart)
        self.assertEqual(browser.evaluate(text.format("rate-failed")), f"{2 / 60:.2f}/s")
        pending = browser.evaluate("[...document.querySelectorAll('#pending tr[data-id]')]"
                                   ".map(r => +r.dataset.id)")
        self.assertEqual(pending, [j.id for j in sorted(worker.jobs("pending"),
                                                        key=lambda j: j.run_at)])
        # The failed job's own page: its fields, its traceback, and Retry.
        browser.evaluate(f"location.hash = '#job/{failed[0]}'")
        browser.wait_for(f"document.getElementById('job').innerText.includes('Job #{failed[0]}')",
                         "the job's page")
        self.assertIn("no such row: 0", browser.evaluate(text.format("job-error")))
        self.assertIn("1 of at most 1", browser.evaluate(text.format("job")))
        fixed.set()
        browser.evaluate("document.querySelector('#job button.retry').click()")
        wait_until(lambda: worker.get_job(failed[0]).state == "complete", timeout=20,
                   message="the job to be retried, and complete")
        browser.wait_for(text.format("job") + ".includes('complete')", "the page to follow")
        self.assertEqual(worker.get_job(failed[1]).state, "failed", "only that job was retried")
        # And Retry all failed, on the overview.
        browser.evaluate("location.hash = ''")
        browser.wait_for("!document.getElementById('retry-all').disabled", "the overview")
        browser.evaluate("document.getElementById('retry-all').click()")
        wait_until(lambda: worker.get_job(failed[1]).state == "complete", timeout=20,
                   message="every failed job to be retried, and complete")

    def test_the_job_list_filters_and_pages_in_the_browser(self):
        bl = self.queue()
        ids = [bl.enqueue("a" if i % 3 else "b", i, delay=3600) for i in range(60)]
        server = bl.serve_metrics()
        self.addCleanup(server.close)
        browser = DevTools(self, f"http://127.0.0.1:{server.port}/")
        rows = "[...document.querySelectorAll('#jobs tr[data-id]')].map(r => +r.dataset.id)"
        browser.wait_for(rows + ".length", "the job list")
        self.assertEqual(browser.evaluate(rows), ids[::-1][:25])
        browser.evaluate("document.getElementById('f-name').value = 'b';"
                         "document.getElementById('f-name').dispatchEvent(new Event('input'))")
        b = [i for n, i in enumerate(ids) if n % 3 == 0][::-1]
        browser.wait_for(f"JSON.stringify({rows}) === '{json.dumps(b[:20])}'.replace(/ /g, '')",
                         "the list filtered by name")
        browser.evaluate("document.getElementById('f-name').value = '';"
                         "document.getElementById('f-name').dispatchEvent(new Event('input'))")
        browser.wait_for(f"{rows}[0] === {ids[-1]}", "the whole list again")
        browser.evaluate("document.getElementById('older').click()")
        browser.wait_for(f"{rows}[0] === {ids[::-1][25]}", "the second page")
        self.assertEqual(browser.evaluate(rows), ids[::-1][25:50])


# -- Tasks, futures and the executor -----------------------------------------------

def square(x):
    return x * x


def add(a, b=0):
    return a + b


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad {x}")
    return x


class UnpicklableError(Exception):
    def __init__(self, text):
        super().__init__(text)
        self.lock = threading.Lock()    # pickle refuses it


class GoneError(Exception):
    """Removed from the module in a test: it no longer imports."""


def raise_gone():
    raise GoneError("class gone")


def raise_unpicklable():
    raise UnpicklableError("not picklable")


class Counted:
    """A picklable object with a method an executor may run."""

    def __init__(self, base):
        self.base = base

    def plus(self, x):
        return self.base + x

    @classmethod
    def made(cls, base):
        return cls(base).plus(base)


@both_engines
class TaskTest(TempDirTest):
    """@bl.task, Task, JobFuture and bl.future: calls are jobs."""

    def test_a_task_is_named_by_its_function_and_runs_directly_when_called(self):
        bl = self.queue()
        task = bl.task(square)
        self.assertIsInstance(task, blero.Task)
        self.assertEqual(task.name, "test_blero.square")
        self.assertEqual(task(7), 49)
        self.assertEqual(bl.stats()["pending"], 0, "a direct call is no job")
        future = task.enqueue(6)
        self.assertIsInstance(future, blero.JobFuture)
        self.assertIsInstance(future, concurrent.futures.Future)
        self.assertEqual(future.result(10), 36)
        info = bl.get_job(future.id)
        self.assertEqual((info.name, info.state, info.result), ("test_blero.square", "complete", 36))
        self.assertEqual(bl.wait(future.id, 10), 36)

    def test_task_options_and_using(self):
        bl = self.queue()

        @bl.task(name="adder", concurrency=2, retries=7, priority=3, timeout=30)
        def adder(a, b=0):
            return a + b

        self.assertEqual(adder.name, "adder")
        f = adder.enqueue(1, b=2)
        self.assertEqual(f.result(10), 3)
        info = bl.get_job(f.id)
        self.assertEqual((info.max_attempts, info.priority), (8, 3))
        keyed = adder.using(key="k", retries=0)
        a, b = keyed.enqueue(1), keyed.enqueue(5)
        self.assertEqual(a.id, b.id, "a key answers with the stored job")
        self.assertEqual(b.result(10), 1)
        self.assertEqual(bl.get_job(a.id).max_attempts, 1)
        self.assertEqual(adder.using(delay=3600).enqueue(2).done(), False)
        with self.assertRaises(TypeError):
            adder.using(colour="red")
        with self.assertRaises(ValueError):
            adder.using(key="one").map([1, 2])
        # options are checked by using() itself, as enqueue() checks them
        for options, error, cause in (({"retries": -1}, ValueError, "retries"),
                                      ({"timeout": math.nan}, ValueError, "timeout"),
                                      ({"delay": "soon"}, TypeError, "delay"),
                                      ({"priority": 1.5}, TypeError, "priority"),
                                      ({"key": 7}, TypeError, "key"),
                                      ({"after": "job 1"}, TypeError, "after")):
            with self.subTest(options=options):
                with self.assertRaisesRegex(error, cause):
                    adder.using(**options)
        with self.assertRaisesRegex(ValueError, "delay or run_at"):
            adder.using(delay=5).using(run_at=time.time() + 5)
        self.assertEqual(adder.using(priority=9).map([1, 2]), [1, 2])

    @file_only
    def test_using_a_connection_enqueues_in_the_callers_transaction(self):
        bl = self.queue()
        task = bl.task(square)
        conn = sqlite3.connect(self.target(), isolation_level=None)
        self.addCleanup(conn.close)
        conn.execute("BEGIN IMMEDIATE")
        future = task.using(connection=conn).enqueue(8)
        self.assertIsNone(bl.get_job(future.id), "not committed yet")
        conn.execute("COMMIT")
        self.assertEqual(future.result(10), 64)
        with self.assertRaises(ValueError):
            task.using(connection=conn).map([1])

    def test_a_function_that_cannot_be_named_needs_a_name(self):
        bl = self.queue()
        with self.assertRaisesRegex(TypeError, "lambda"):
            bl.task(lambda x: x)

        def nested(x):
            return x
        with self.assertRaisesRegex(TypeError, "nested"):
            bl.task(nested)
        with self.assertRaisesRegex(TypeError, "qualified name"):
            bl.task(functools.partial(add, 1))
        for bad in ("", 3):
            with self.assertRaises((TypeError, ValueError)):
                bl.task(name=bad)(add)
        with self.assertRaises(ValueError):
            bl.task(concurrency=0)(add)
        self.assertEqual(bl.task(name="nested")(nested).enqueue(4).result(10), 4)
        self.assertEqual(bl.stats()["complete"], 1)

    def test_unpicklable_arguments_raise_type_error_and_store_nothing(self):
        bl = self.queue()
        task = bl.task(add)
        with self.assertRaises(TypeError):
            task.enqueue(threading.Lock())
        with self.assertRaises(TypeError):
            task.map([1, threading.Lock()])
        self.assertEqual(sum(bl.stats().values()), 0)

    def test_map_results_in_order_empty_and_generators(self):
        bl = self.queue()
        task = bl.task(concurrency=4)(add)
        self.assertEqual(task.map(range(50), range(50)), [2 * i for i in range(50)])
        self.assertEqual(task.map([]), [])
        self.assertEqual(task.map(i for i in range(5)), [0, 1, 2, 3, 4])
        self.assertEqual(bl.stats()["complete"], 55)

    def test_map_raises_the_first_failure_after_every_call_ended(self):
        bl = self.queue(retries=0)
        task = bl.task(concurrency=3)(fail_on)
        with self.assertRaisesRegex(ValueError, "bad 3"):
            task.map(range(20), [3] * 20)
        self.assertEqual(bl.stats()["complete"], 19)
        self.assertEqual(bl.stats()["failed"], 1)
        self.assertEqual(bl.stats()["pending"] + bl.stats()["inprogress"], 0)

    def test_the_same_call_twice_runs_twice_and_a_finished_map_runs_again(self):
        bl = self.queue()
        task = bl.task(square)
        self.assertEqual(task.map([2, 2, 2]), [4, 4, 4])
        self.assertEqual(len(bl.jobs("complete")), 3)
        self.assertEqual(task.map([2, 2]), [4, 4])
        self.assertEqual(len(bl.jobs("complete")), 5, "a map that returned is released")
        self.assertTrue(all(j.key is None for j in bl.jobs()))

    def test_processors_of_any_name_take_no_task_jobs(self):
        bl = self.queue()
        taken = []
        bl.register_processor(lambda job: taken.append(job.name))
        task = bl.task(square)
        plain = bl.enqueue("plain")
        self.assertEqual(task.map(range(20)), [i * i for i in range(20)])
        bl.wait(plain, 10)
        self.assertTrue(bl.join(10))
        self.assertEqual(taken, ["plain"])

    def test_jobs_of_a_task_not_registered_wait_and_run_once_it_is(self):
        bl = self.queue()
        job_id = bl.enqueue("test_blero.square", ((5,), {}))
        with self.assertLogs("blero", logging.WARNING) as logs:   # (by join or the future)
            future = bl.future(job_id)
            self.assertFalse(bl.join(timeout=0.2))
        self.assertIn("test_blero.square", "\n".join(logs.output))
        self.assertEqual(bl.get_job(job_id).state, "pending")
        self.assertFalse(future.done())
        bl.task(square)
        self.assertEqual(future.result(10), 25)

    @unittest.skipUnless(hasattr(BaseException, "add_note"), "exception notes: 3.11+")
    def test_an_exception_read_back_tells_its_job_and_where_it_was_raised(self):
        bl = self.queue()
        failing = bl.task(name="failing", retries=0)(fail_on)
        job_id = failing.enqueue(3, 3).id
        with self.assertRaises(ValueError):
            bl.future(job_id).result(10)
        with self.assertRaises(ValueError) as raised:   # from storage: no traceback of its own
            bl.future(job_id).result(10)
        note = "\n".join(raised.exception.__notes__)
        self.assertIn(f"job {job_id} raised it", note)
        self.assertIn("in fail_on", note)

    def test_a_decorated_function_is_checked_as_its_wrapper_takes_calls(self):
        # functools.wraps points at the inner function, but the wrapper runs:
        # one that passes an argument itself takes calls without it.
        bl = self.queue()
        store = bl.task(name="store")(with_db(lambda db, x: f"{db}:{x}"))
        self.assertEqual(store(5), "DB:5")
        self.assertEqual(store.enqueue(5).result(10), "DB:5")
        self.assertEqual(store.map([6]), ["DB:6"])

    def test_a_result_is_what_the_serializer_gives_back_in_every_process(self):
        # With json a tuple comes back a list: from this process's future as
        # from another's, so that a resumed map is all of one kind.
        bl = self.queue(serializer=json)
        pair = bl.task(name="pair")(lambda a, b: (a, b))
        future = pair.enqueue(1, 2)
        self.assertEqual(future.result(10), [1, 2])
        self.assertEqual(bl.future(future.id).result(10), [1, 2])
        self.assertEqual(pair.map([3], [4]), [[3, 4]])

    def test_registering_a_task_again_replaces_it(self):
        bl = self.queue()
        bl.task(name="t")(square)
        again = bl.task(name="t")(add)
        self.assertEqual(again.enqueue(2, 3).result(10), 5)
        self.assertEqual(len(bl._tasks), 1)

    def test_a_failed_call_raises_its_own_exception(self):
        bl = self.queue(retries=1, backoff_base=0)
        task = bl.task(fail_on)
        future = task.enqueue(1, 1)
        with self.assertRaisesRegex(ValueError, "bad 1"):
            future.result(10)
        self.assertIsInstance(future.exception(), ValueError)
        with self.assertRaises(blero.JobFailed) as caught:
            bl.wait(future.id, 10)
        self.assertIsInstance(caught.exception.exception, ValueError)
        self.assertIn("bad 1", caught.exception.error)
        self.assertIsNone(bl.get_job(future.id).result)
        # the same from the stored outcome (another run would see)
        with self.assertRaisesRegex(ValueError, "bad 1"):
            bl.future(future.id).result(10)

    def test_an_exception_that_cannot_be_pickled_is_job_failed_with_its_text(self):
        bl = self.queue(retries=0)
        future = bl.task(raise_unpicklable).enqueue()
        with self.assertRaises(blero.JobFailed) as caught:
            future.result(10)
        self.assertIn("not picklable", caught.exception.error)
        self.assertIsNone(caught.exception.exception)
        with self.assertRaises(blero.JobFailed):
            bl.future(future.id).result(10)
        self.assertEqual(bl.task(square).enqueue(3).result(10), 9, "the queue goes on")

    def test_an_exception_whose_class_is_gone_is_job_failed(self):
        bl = self.queue(retries=0)
        future = bl.task(raise_gone).enqueue()
        with self.assertRaises(GoneError):
            future.result(10)
        module = sys.modules[__name__]
        gone = module.GoneError
        del module.GoneError
        try:
            with self.assertRaises(blero.JobFailed) as caught:
                bl.future(future.id).result(10)
            self.assertIn("class gone", caught.exception.error)
            with self.assertRaises(blero.JobFailed) as caught:
                bl.wait(future.id)
            self.assertIsNone(caught.exception.exception)
        finally:
            module.GoneError = gone

    def test_futures_work_with_wait_and_as_completed(self):
        bl = self.queue()
        task = bl.task(concurrency=3)(square)
        futures = [task.enqueue(i) for i in range(10)]
        done, pending = concurrent.futures.wait(futures, timeout=10)
        self.assertEqual((len(done), len(pending)), (10, 0))
        more = [task.enqueue(i) for i in range(10)]
        got = sorted(f.result() for f in concurrent.futures.as_completed(more, timeout=10))
        self.assertEqual(got, sorted(i * i for i in range(10)))
        calls = []
        more[0].add_done_callback(calls.append)
        self.assertEqual(calls, [more[0]])

    def test_cancel_follows_concurrent_futures(self):
        bl = self.queue()
        task = bl.task(square)
        waiting = task.using(delay=3600).enqueue(3)
        self.assertTrue(waiting.cancel())
        self.assertTrue(waiting.cancelled())
        self.assertEqual(bl.get_job(waiting.id).state, "cancelled")
        with self.assertRaises(concurrent.futures.CancelledError):
            waiting.result(1)
        done, _ = concurrent.futures.wait([waiting], timeout=10)
        self.assertEqual(done, {waiting})
        finished = task.enqueue(2)
        self.assertEqual(finished.result(10), 4)
        self.assertFalse(finished.cancel())
        other = task.using(delay=3600).enqueue(4)
        self.assertTrue(bl.cancel(other.id))
        with self.assertRaises(blero.JobCancelled) as raised:
            other.result(10)
        # one `except CancelledError` serves for both ways of cancelling
        self.assertIsInstance(raised.exception, concurrent.futures.CancelledError)
        self.assertEqual(raised.exception.job_id, other.id)

    def test_a_running_job_is_not_cancelled_by_its_future(self):
        bl = self.queue()
        started, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        @bl.task(name="slow")
        def slow():
            started.set()
            release.wait(10)
            return "done"

        future = slow.enqueue()
        self.assertTrue(started.wait(10))
        self.assertFalse(future.cancel())
        release.set()
        self.assertEqual(future.result(10), "done")

    def test_future_of_a_job_of_an_earlier_run_and_an_unknown_id(self):
        bl = self.queue()
        done_id = bl.task(square).enqueue(9).id
        bl.wait(done_id, 10)
        later = bl.task(name="later")(square).using(delay=0.2).enqueue(2).id
        bl.stop()
        bl2 = self.queue(start=False)
        self.assertEqual(bl2.future(done_id).result(10), 81, "on a stopped queue too")
        future = bl2.future(later)
        self.assertFalse(future.done())
        with self.assertRaises(KeyError):
            bl2.future(10 ** 6)
        bl2.start()
        bl2.task(name="later")(square)
        self.assertEqual(future.result(10), 4)

    def test_a_job_swept_after_it_ended_still_gives_its_result(self):
        swept = []
        bl = self.queue(on_complete=lambda job, result: swept.append(bl.sweep()))
        task = bl.task(concurrency=2)(square)
        futures = [task.enqueue(i) for i in range(30)]
        self.assertEqual([f.result(10) for f in futures], [i * i for i in range(30)])
        wait_until(lambda: len(swept) == 30 and bl.stats()["complete"] == 0,
                   message="every job swept")
        self.assertEqual(sum(swept), 30)

    def test_a_future_is_awaitable(self):
        bl = self.queue()
        task = bl.task(square)

        async def main():
            future = await task.aenqueue(5)
            job_id = await bl.aenqueue("test_blero.square", ((6,), {}))
            ids = await bl.aenqueue_many([("test_blero.square", ((7,), {}))])
            return await future, await bl.future(job_id), await bl.future(ids[0])

        self.assertEqual(asyncio.run(main()), (25, 36, 49))

    def test_a_job_another_process_completes_resolves_the_future(self):
        bl = self.queue()
        child = start_child(NEW_QUEUE + textwrap.dedent("""
            import sys, time
            bl = new_queue(sys.argv[1]).start()
            # (its work: it ends after the future's first look)
            bl.register_processor(lambda job: time.sleep(0.1) or job.data * 2, names="elsewhere")
            print("ready", flush=True)
            sys.stdin.read()
            bl.stop()
        """), self.target(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, child)
        self.assertEqual(child.stdout.readline().strip(), "ready")
        job_id = bl.enqueue("elsewhere", 21)
        future = bl.future(job_id)
        self.assertEqual(future.result(10), 42)
        resolved = time.time()
        # As soon as a wait() would see it (a server tells no one of a job
        # another process completed: the future looks as often), not at its
        # next look a second after the first.
        late = resolved - bl.get_job(job_id).finished_at
        self.assertLess(late, 0.5, f"resolved {late:.3f} s after the job completed")
        child.stdin.close()
        self.assertEqual(child.wait(30), 0)

    def test_an_end_blero_made_raises_job_failed_from_the_future(self):
        # Only the processor's own exception is restored: a timeout, or a
        # result the serializer refuses, is blero's, so result() raises
        # JobFailed for it as wait() does (never a bare TimeoutError that
        # reads as "the wait ran out").
        bl = self.queue()
        release = threading.Event()
        self.addCleanup(release.set)

        @bl.task(name="slow", timeout=0.3, retries=0)
        def slow():
            release.wait(30)

        @bl.task(name="unstorable")
        def unstorable():
            return threading.Lock()

        @bl.task(name="raiser", retries=0)
        def raiser():
            raise TimeoutError("the processor's own")

        for future, text in ((slow.enqueue(), "timed out"),
                             (unstorable.enqueue(), "cannot serialize the job's result")):
            with self.assertRaises(blero.JobFailed) as cm:
                future.result()
            self.assertIn(text, cm.exception.error)
            self.assertIsNone(cm.exception.exception)
            with self.assertRaises(blero.JobFailed) as cm:
                bl.wait(future.id, 10)
            self.assertIsNone(cm.exception.exception)
            with self.assertRaises(blero.JobFailed):
                bl.future(future.id).result(10)     # from the stored outcome too
        future = raiser.enqueue()
        with self.assertRaisesRegex(TimeoutError, "the processor's own"):
            future.result(10)
        with self.assertRaises(blero.JobFailed) as cm:
            bl.wait(future.id, 10)
        self.assertIsInstance(cm.exception.exception, TimeoutError)


def mul(x, y):
    return x * y


def with_db(fn):
    """A decorator that gives `fn` its first argument itself."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn("DB", *args, **kwargs)
    return wrapper


def count_calls(name):
    """How many times it has been called with `name` (in this process)."""
    EVENTS[name].count = getattr(EVENTS[name], "count", 0) + 1
    return EVENTS[name].count


def fail_first_tries(name, failures):
    """Raise ValueError the first `failures` times it is called with `name`."""
    EVENTS[name].calls = getattr(EVENTS[name], "calls", 0) + 1
    if EVENTS[name].calls <= failures:
        raise ValueError(f"try {EVENTS[name].calls} of {name}")
    return EVENTS[name].calls


def capture(*args, **kwargs):
    return args, kwargs


EVENTS = collections.defaultdict(threading.Event)   # by name: importable calls wait on them


def wait_event(name, timeout=30):
    return EVENTS[name].wait(timeout)


def wait_and_raise(name):
    EVENTS[name].wait(30)
    raise Exception("this is an exception")


def begun_then_wait(begun, name, timeout=30):
    EVENTS[begun].set()
    return EVENTS[name].wait(timeout)


RUNNING = collections.Counter()     # note_run's calls running now, by tag
MOST_RUNNING = collections.Counter()    # and the most at once
RUNNING_LOCK = threading.Lock()


def note_run(tag, hold=None):
    """A call tagged `tag` (waiting on EVENTS[hold] if given): the name of
    the thread that ran it."""
    with RUNNING_LOCK:
        RUNNING[tag] += 1
        MOST_RUNNING[tag] = max(MOST_RUNNING[tag], RUNNING[tag])
    try:
        if hold is not None:
            EVENTS[hold].wait(30)
        return threading.current_thread().name
    finally:
        with RUNNING_LOCK:
            RUNNING[tag] -= 1


class DummyObject:
    def my_method(self):
        pass


def make_dummy_object(_):
    return DummyObject()


def done_future(state, result=None, exception=None):
    """A plain concurrent.futures.Future in that state (as CPython's tests make)."""
    f = concurrent.futures.Future()
    f._state, f._result, f._exception = state, result, exception
    return f


@both_engines
class ExecutorTest(TempDirTest):
    """bl.executor(): a concurrent.futures.Executor whose calls are jobs."""

    # (made at first use: a PostgreSQL twin's schema is set up after setUp;
    # a failing call uses up its default 3 retries, soon one after another)
    @functools.cached_property
    def bl(self):
        return self.queue(backoff_base=0.01)

    @functools.cached_property
    def executor(self):
        executor = self.bl.executor(5)
        self.addCleanup(executor.shutdown, cancel_futures=True)
        return executor

    def test_submit_and_map_run_jobs(self):
        self.assertIsInstance(self.executor, concurrent.futures.Executor)
        future = self.executor.submit(add, 2, b=3)
        self.assertEqual(future.result(10), 5)
        self.assertEqual(self.bl.get_job(future.id).name, "test_blero.add")
        self.assertEqual(list(self.executor.map(square, range(20))), [i * i for i in range(20)])
        self.assertEqual(list(self.executor.map(square, [])), [])
        self.assertEqual(list(self.executor.map(add, (i for i in range(3)), [10] * 3)),
                         [10, 11, 12])
        self.assertEqual(self.executor.submit(Counted(5).plus, 1).result(10), 6,
                         "a bound method of a picklable object")

    def test_a_task_submitted_runs_as_the_task(self):
        task = self.bl.task(name="sq", concurrency=2)(square)
        future = self.executor.submit(task, 4)
        self.assertEqual(future.result(10), 16)
        self.assertEqual(self.bl.get_job(future.id).name, "sq")
        self.assertEqual(list(self.executor.map(task, [1, 2])), [1, 4])

    def test_partials_and_class_methods_run_as_thread_pool_executor_runs_them(self):
        plus_one = functools.partial(add, 1)
        self.assertEqual(self.executor.submit(plus_one, 2).result(10), 3)
        self.assertEqual(self.executor.submit(functools.partial(add, b=5), 1).result(10), 6)
        self.assertEqual(list(self.executor.map(functools.partial(plus_one), [1, 2])), [2, 3])
        self.assertEqual(list(self.executor.map(functools.partial(add, b=10), [1, 2])),
                         [11, 12])
        self.assertEqual(self.executor.submit(Counted.made, 4).result(10), 8)
        self.assertEqual(self.bl.get_job(self.executor.submit(plus_one, 0).id).name,
                         "test_blero.add")
        with self.assertRaisesRegex(TypeError, "multiple values"):
            self.executor.submit(plus_one, 2, a=3)

    def test_what_cannot_be_imported_by_name_is_refused_and_nothing_stored(self):
        def nested(x):
            return x
        lock = threading.Lock()
        for fn, why in ((lambda x: x, "lambda"), (nested, "nested"),
                        (functools.partial(lambda x, y: x, 1), "lambda")):
            with self.assertRaisesRegex(TypeError, why):
                self.executor.submit(fn, 1)
            with self.assertRaisesRegex(TypeError, why):
                self.executor.map(fn, [1])
        with self.assertRaises(TypeError):
            self.executor.submit(UnpicklableError("x").with_traceback, None)
        unpicklable = Counted(1)
        unpicklable.lock = lock
        with self.assertRaisesRegex(TypeError, "serialize"):
            self.executor.submit(unpicklable.plus, 1)
        with self.assertRaises(TypeError):
            self.executor.submit(add, lock)
        self.assertEqual(sum(self.bl.stats().values()), 0)

    def test_map_raises_a_failure_at_its_place(self):
        results = self.executor.map(fail_on, range(10), [4] * 10)
        self.assertEqual([next(results) for _ in range(4)], [0, 1, 2, 3])
        with self.assertRaisesRegex(ValueError, "bad 4"):
            next(results)

    def test_a_call_that_raises_ends_with_its_exception_at_once(self):
        # As with ThreadPoolExecutor: the call ran, side effects and all, and
        # its exception is its outcome; no retry runs it again.  (A task
        # submitted runs as the task, with the task's retries.)
        bl = self.queue("slow-retries.db", backoff_base=60)
        executor = bl.executor(2)
        self.addCleanup(executor.shutdown, cancel_futures=True)
        future = executor.submit(fail_on, 4, 4)
        with self.assertRaisesRegex(ValueError, "bad 4"):
            future.result(10)
        info = bl.get_job(future.id)
        self.assertEqual((info.state, info.attempt), ("failed", 1))
        flaky = bl.task(name="flaky", retries=2)(fail_first_tries)
        calls = executor.submit(flaky, self.id(), 1)
        wait_until(lambda: bl.get_job(calls.id).attempt == 1 and
                   bl.get_job(calls.id).state == "pending", message="the task's try failed")
        self.assertFalse(calls.done(), "a task's failed try is retried (in 60 s)")

    def test_waiting_on_calls_no_process_takes_is_logged_once_per_name(self):
        # A task renamed since a run that did not finish: its old calls wait
        # for a task of their name, and the waits say so instead of silence.
        self.bl.enqueue("old.name", ((1,), {}))
        left = self.bl.enqueue("old.name", ((2,), {}))
        renamed = self.bl.task(name="new.name")(square)
        with self.assertLogs("blero", "WARNING") as logged:
            self.assertEqual(renamed.map([3]), [9])
            future = self.bl.future(left)
            wait_until(lambda: any("old.name" in r.getMessage() for r in logged.records),
                       message="the future's wait to tell of old.name")
            self.assertFalse(future.done())
        warned = [r.getMessage() for r in logged.records if "no processor takes" in r.getMessage()]
        self.assertEqual(len(warned), 1, warned)
        self.assertTrue(warned[0].startswith("no processor takes jobs named 'old.name' (2 pending)"),
                        warned)

    def test_a_call_its_function_cannot_take_is_refused_and_nothing_stored(self):
        task = self.bl.task(name="adds")(add)
        for submit, why in ((lambda: self.executor.submit(add, 1, 2, 3), "positional"),
                            (lambda: self.executor.submit(add, 1, c=2), "unexpected keyword"),
                            (lambda: list(self.executor.map(mul, [1, 2])), "missing"),
                            (lambda: task.enqueue(), "missing"),
                            (lambda: task.map([1, 2], [3], [4]), "positional"),
                            (lambda: self.executor.submit(task, 1, 2, 3), "positional")):
            with self.subTest(why=why):
                with self.assertRaisesRegex(TypeError, why):
                    submit()
        self.assertEqual(self.bl.jobs(), [])
        self.assertEqual(self.executor.submit(len, "abc").result(10), 3, "a builtin")

    def test_a_run_that_ended_gives_the_next_fresh_results_without_a_shutdown(self):
        # A script that never shuts its executor down: its run ends with the
        # queue's stop, and the next run computes every call afresh, except
        # those the stop left unfinished, which stay resumable.
        first = self.queue("runs.db")
        self.assertEqual(first.executor(2).submit(count_calls, self.id()).result(10), 1)
        first.stop()
        second = self.queue("runs.db")
        ex = second.executor(2)
        self.assertEqual(ex.submit(count_calls, self.id()).result(10), 2, "run afresh")
        held = ex.submit(begun_then_wait, self.id() + "-begun", self.id() + "-go")
        self.assertTrue(EVENTS[self.id() + "-begun"].wait(10))
        second.stop(timeout=0)        # the held call is handed back, not ended
        third = self.queue("runs.db")
        again = third.executor(2)
        self.assertEqual(again.submit(count_calls, self.id()).result(10), 2,
                         "the stored result of a run that did not finish")
        resumed = again.submit(begun_then_wait, self.id() + "-begun", self.id() + "-go")
        self.assertEqual(resumed.id, held.id, "a call left unfinished goes on")
        EVENTS[self.id() + "-go"].set()
        self.assertTrue(resumed.result(10))

    def test_ctrl_c_in_its_with_block_leaves_without_waiting_for_running_calls(self):
        name = self.id()
        self.addCleanup(EVENTS[name + "-go"].set)
        begun = time.monotonic()
        with self.assertRaises(KeyboardInterrupt):
            with self.bl.executor(2) as ex:
                running = ex.submit(begun_then_wait, name + "-begun", name + "-go")
                self.assertTrue(EVENTS[name + "-begun"].wait(10))
                raise KeyboardInterrupt
        self.assertLess(time.monotonic() - begun, 20, "it waited for the running call")
        self.assertFalse(running.done())
        EVENTS[name + "-go"].set()
        self.assertTrue(running.result(10), "the call still runs to its end")

    def test_the_same_call_twice_in_one_run_runs_twice(self):
        a, b = self.executor.submit(square, 3), self.executor.submit(square, 3)
        self.assertNotEqual(a.id, b.id)
        self.assertEqual((a.result(10), b.result(10)), (9, 9))

    def test_two_executors_never_share_jobs(self):
        other = self.bl.executor(2)
        self.addCleanup(other.shutdown)
        ids = set()
        lock = threading.Lock()

        def submit(ex):
            for _ in range(20):
                f = ex.submit(square, 7)
                with lock:
                    ids.add(f.id)
        threads = [threading.Thread(target=submit, args=(ex,)) for ex in (self.executor, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(ids), 40)

    def test_two_executors_of_one_function_run_their_calls_on_their_own_workers(self):
        EVENTS["one"].clear()
        self.addCleanup(EVENTS["one"].set)
        MOST_RUNNING.clear()
        one, three = self.bl.executor(1), self.bl.executor(3)
        for ex in (one, three):
            self.addCleanup(ex.shutdown, cancel_futures=True)
        # The first of one's calls holds its one worker: the others wait,
        # ready, before every call of three's (lower ids run first).
        first = one.submit(note_run, "one", "one")
        wait_until(lambda: self.bl.get_job(first.id).state == "inprogress")
        ones = [first] + [one.submit(note_run, "one") for _ in range(11)]
        threes = [three.submit(note_run, "three") for _ in range(12)]
        threads_of_three = {f.result(20) for f in threes}
        self.assertEqual([self.bl.get_job(f.id).state for f in ones[1:]], ["pending"] * 11,
                         "the other executor's workers ran this one's calls")
        EVENTS["one"].set()
        threads_of_one = {f.result(20) for f in ones}
        self.assertEqual(len(threads_of_one), 1)
        self.assertLessEqual(len(threads_of_three), 3)
        self.assertFalse(threads_of_one & threads_of_three)
        self.assertEqual(MOST_RUNNING["one"], 1)
        self.assertLessEqual(MOST_RUNNING["three"], 3)
        self.assertEqual({self.bl.get_job(f.id).state for f in ones + threes}, {"complete"})

    def test_a_later_runs_executor_resumes_the_calls_an_earlier_one_left(self):
        # Made by the second executor of a program that stopped (its calls
        # pending, the executor never shut down): the program run again
        # makes them with its first executor, which is matched and runs them.
        earlier = self.bl
        earlier.pause("builtins.pow")
        earlier.executor(1)
        left = [earlier.executor(2).submit(pow, 2, i) for i in range(3)]
        earlier.stop()
        bl = self.queue()
        bl.resume("builtins.pow")
        again = bl.executor(1)
        self.addCleanup(again.shutdown)
        self.assertEqual(list(again.map(pow, [2] * 3, range(3), timeout=20)), [1, 2, 4])
        self.assertEqual([j.id for j in bl.jobs()], [f.id for f in left], "matched, not new")

    def test_shutdown_releases_the_calls(self):
        with self.bl.executor(3) as ex:
            self.assertEqual(list(ex.map(square, [1, 2, 3])), [1, 4, 9])
        self.assertTrue(all(j.key is None for j in self.bl.jobs()))
        with self.assertRaises(RuntimeError):
            ex.submit(square, 1)
        again = self.bl.executor(3)
        self.assertEqual(list(again.map(square, [1, 2, 3])), [1, 4, 9])
        again.shutdown()
        self.assertEqual(self.bl.stats()["complete"], 6, "a finished run is run again")

    def test_cancel_futures_cancels_only_this_executors_pending_jobs(self):
        EVENTS["block"].clear()
        self.addCleanup(EVENTS["block"].set)
        other = self.bl.executor(1)     # (of other functions: see the README)
        self.addCleanup(other.shutdown, cancel_futures=True)
        busy = other.submit(wait_and_raise, "block")
        theirs = other.submit(add, 1, 1)
        ex = self.bl.executor(1)
        running = ex.submit(wait_event, "block")
        wait_until(lambda: {self.bl.get_job(f.id).state for f in (busy, running)}
                   == {"inprogress"})
        queued = [ex.submit(square, i) for i in range(5)]
        plain = self.bl.enqueue("plain", delay=3600)
        ex.shutdown(wait=False, cancel_futures=True)
        self.assertTrue(all(f.cancelled() for f in queued))
        self.assertEqual(self.bl.get_job(plain).state, "pending")
        self.assertFalse(running.done() or theirs.done())
        EVENTS["block"].set()
        self.assertTrue(running.result(10))
        self.assertEqual(theirs.result(10), 2)

    def test_shutdown_without_waiting_and_a_stop_hands_running_jobs_back(self):
        EVENTS["hold"].clear()
        EVENTS["begun"].clear()
        self.addCleanup(EVENTS["hold"].set)
        ex = self.bl.executor(1)
        running = ex.submit(begun_then_wait, "begun", "hold", 3)
        # (its try begun, not merely claimed: a claim not begun is undone)
        self.assertTrue(EVENTS["begun"].wait(10))
        ex.shutdown(wait=False)     # returns at once
        self.bl.stop(timeout=0)
        info = self.bl.get_job(running.id)
        self.assertEqual(info.state, "pending")
        self.assertEqual(info.max_attempts, 1 + 3 + 1, "the hand-back used up no try")
        self.assertFalse(running.done())


# argv: the queue.  A processor of any name, in a process that registers no
# task: it tells each job it runs, until its stdin ends.
_CATCH_ALL_CHILD = NEW_QUEUE + textwrap.dedent("""
    import os, sys
    with new_queue(sys.argv[1]) as bl:
        def anything(job):
            os.write(1, f"ran {job.name}\\n".encode())
            return "caught"
        bl.register_processor(anything)
        os.write(1, b"ready\\n")
        sys.stdin.read()
""")


@both_engines
class CatchAllAcrossProcessesTest(ProcessTest):
    """A processor of any name, in another process, never runs a task's or
    an executor's calls (it would run the wrong function on them)."""

    def test_a_catch_all_elsewhere_takes_no_task_or_executor_call(self):
        EVENTS["held"].clear()
        bl = self.queue()
        task = bl.task(name="held.task")(wait_event)
        ex = bl.executor(1)
        self.addCleanup(ex.shutdown, cancel_futures=True)
        self.addCleanup(EVENTS["held"].set)     # (first)
        # Their workers are busy: the other calls wait, ready.
        busy = [task.enqueue("held"), ex.submit(wait_event, "held")]
        wait_until(lambda: {bl.get_job(f.id).state for f in busy} == {"inprogress"})
        waiting = ([task.enqueue("held") for _ in range(3)]
                   + [ex.submit(wait_event, "held") for _ in range(3)]
                   + [task.using(priority=5).enqueue("held")])
        scheduled = task.using(key="beat").every(3600, "held")
        run = wait_until(lambda: bl.schedules()[0].job_id, message="the schedule's first run")
        waiting.append(bl.future(run))
        child = start_child(_CATCH_ALL_CHILD, self.path, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, child)
        out = LineReader(child.stdout)
        out.expect("ready")
        # After every call in the order of claims: the catch-all, once it
        # ran this one, had them all to take before it.
        plain = bl.enqueue("plain", priority=-1)
        self.assertEqual(bl.wait(plain, 20), "caught")
        self.assertEqual(out.expect("^ran ")[0].string, "ran plain\n", "the first it ran")
        self.assertEqual({bl.get_job(f.id).state for f in waiting}, {"pending"})
        self.assertTrue(bl.unschedule(scheduled))
        EVENTS["held"].set()
        self.assertEqual([f.result(20) for f in busy + waiting], [True] * 10)
        child.stdin.close()
        self.assertEqual(child.wait(20), 0, child.stderr.read())

    @unittest.skipUnless(POSIX, "SIGKILL")
    def test_a_task_call_left_by_a_killed_process_holds_up_no_catch_all(self):
        # The call a killed process was running is a suspect: run alone,
        # before ordinary jobs, by a worker that takes it.  A catch-all
        # takes none, so it waits for its task, and holds nothing up.
        child = start_child(NEW_QUEUE + textwrap.dedent("""
            import os, sys, time
            bl = new_queue(sys.argv[1]).start()
            @bl.task(name="killed.task")
            def hang():
                os.write(1, b"running\\n")
                time.sleep(60)
            hang.enqueue()
            time.sleep(60)
            """), self.path, stdout=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, child)
        LineReader(child.stdout).expect("running")
        child.kill()
        child.wait(10)
        bl = self.queue()
        ran = []
        bl.register_processor(lambda job: ran.append(job.name))
        (left,) = bl.jobs(name="killed.task")
        self.assertIsNone(bl.wait(bl.enqueue("plain"), 20))
        self.assertEqual(ran, ["plain"])
        self.assertEqual(bl.get_job(left.id).state, "pending")
        # ... and join() says so: the catch-all is no taker of a task's call
        with self.assertLogs("blero", "WARNING") as logs:
            self.assertFalse(bl.join(0.2))
        self.assertIn("no processor takes jobs named 'killed.task' (1 pending)",
                      "\n".join(logs.output))


class CPythonExecutorTest(TempDirTest):
    """The generic tests of CPython's Lib/test/test_concurrent_futures
    (executor.py, test_wait.py, test_as_completed.py, test_shutdown.py)
    that use importable functions only, run against blero.Executor.  Those
    waiting on `event.wait` (a bound method of a threading.Event, which no
    job can carry) wait on an event by name instead.  They are about the
    executor's semantics, a layer above the storage: on the file only
    (ExecutorTest runs on both engines)."""

    worker_count = 5

    # CPython's tests expect ThreadPoolExecutor's semantics, where a call that
    # raises has failed: an executor keeps its queue's retry settings (by
    # default 3 retries, backing off from 1 s), so this class's queue has none.
    @functools.cached_property
    def bl(self):
        return self.queue(retries=0)

    @functools.cached_property
    def executor(self):
        executor = self.bl.executor(self.worker_count)
        self.addCleanup(executor.shutdown, cancel_futures=True)
        return executor

    def setUp(self):
        super().setUp()
        self.addCleanup(lambda: [e.set() for e in EVENTS.values()])
        EVENTS.clear()
        self.CANCELLED_FUTURE = done_future("CANCELLED")
        self.CANCELLED_AND_NOTIFIED_FUTURE = done_future("CANCELLED_AND_NOTIFIED")
        self.EXCEPTION_FUTURE = done_future("FINISHED", exception=OSError())
        self.SUCCESSFUL_FUTURE = done_future("FINISHED", result=42)

    # executor.py
    def test_submit(self):
        self.assertEqual(256, self.executor.submit(pow, 2, 8).result())

    def test_submit_keyword(self):
        self.assertEqual(16, self.executor.submit(mul, 2, y=8).result())
        future = self.executor.submit(capture, 1, self=2, fn=3)
        self.assertEqual(future.result(), ((1,), {"self": 2, "fn": 3}))
        with self.assertRaises(TypeError):
            self.executor.submit(fn=capture, arg=1)
        with self.assertRaises(TypeError):
            self.executor.submit(arg=1)

    def test_map(self):
        self.assertEqual(list(self.executor.map(pow, range(10), range(10))),
                         list(map(pow, range(10), range(10))))
        self.assertEqual(list(self.executor.map(pow, range(10), range(10), chunksize=3)),
                         list(map(pow, range(10), range(10))))

    def test_map_exception(self):
        i = self.executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        self.assertEqual(i.__next__(), (0, 1))
        self.assertEqual(i.__next__(), (0, 1))
        with self.assertRaises(ZeroDivisionError):
            i.__next__()

    def test_builtins_and_builtin_methods_run_as_thread_pool_executor_runs_them(self):
        for fn, args, expected, name in (
                (len, ("abc",), 3, "builtins.len"),
                (math.sqrt, (16,), 4.0, "math.sqrt"),
                (str.upper, ("a",), "A", "builtins.str.upper"),
                (dict.fromkeys, ("ab",), {"a": None, "b": None}, "builtins.dict.fromkeys"),
                (datetime.date.fromordinal, (1,), datetime.date(1, 1, 1),
                 "datetime.date.fromordinal"),
                ("ab".upper, (), "AB", "builtins.str.upper")):
            future = self.executor.submit(fn, *args)
            self.assertEqual(future.result(10), expected, name)
            self.assertEqual(self.bl.get_job(future.id).name, name)
        self.assertEqual(list(self.executor.map(str.upper, ["a", "b"])), ["A", "B"])
        self.assertEqual(list(self.executor.map("-".join, [["a", "b"], "cd"])), ["a-b", "c-d"])

    def test_map_tells_a_job_timeout_from_its_own_wait_running_out(self):
        self.executor   # (stopped after the worker below is released)
        release = threading.Event()
        self.addCleanup(release.set)

        @self.bl.task(name="slow", timeout=0.3, retries=0)
        def slow(_):
            release.wait(30)

        results = self.executor.map(slow, [1], timeout=30)
        with self.assertRaises(blero.JobFailed) as cm:     # the job's, not the wait's
            next(results)
        self.assertIn("timed out", cm.exception.error)

    def test_map_timeout(self):
        results = []
        try:
            # (CPython's 0, 0, 6 s calls and 5 s timeout, a fifth as long)
            for i in self.executor.map(time.sleep, [0, 0, 1.2], timeout=1):
                results.append(i)
        except concurrent.futures.TimeoutError:
            pass
        else:
            self.fail("expected TimeoutError")
        self.assertEqual([None, None], results)

    def test_shutdown_race_issue12456(self):
        self.executor.map(str, [2] * (self.worker_count + 1))
        self.executor.shutdown()

    def test_no_stale_references(self):
        my_object = DummyObject()
        collected = threading.Event()
        ref = weakref.ref(my_object, lambda obj: collected.set())   # noqa: F841
        self.executor.submit(my_object.my_method)
        del my_object
        self.assertTrue(collected.wait(10), "stale reference not collected")

    def test_max_workers_negative(self):
        for number in (0, -1):
            with self.assertRaisesRegex(ValueError, "max_workers must be greater than 0"):
                self.bl.executor(max_workers=number)

    def test_free_reference(self):
        for obj in self.executor.map(make_dummy_object, range(10)):
            wr = weakref.ref(obj)
            del obj
            gc.collect()
            self.assertIsNone(wr())

    # test_wait.py
    def test_20369(self):
        future = self.executor.submit(mul, 1, 2)
        done, not_done = concurrent.futures.wait([future, future],
                                                 return_when=concurrent.futures.ALL_COMPLETED)
        self.assertEqual({future}, done)
        self.assertEqual(set(), not_done)

    def test_first_completed(self):
        future1 = self.executor.submit(mul, 21, 2)
        future2 = self.executor.submit(wait_event, "e")
        try:
            done, not_done = concurrent.futures.wait(
                [self.CANCELLED_FUTURE, future1, future2],
                return_when=concurrent.futures.FIRST_COMPLETED)
            self.assertEqual({future1}, done)
            self.assertEqual({self.CANCELLED_FUTURE, future2}, not_done)
        finally:
            EVENTS["e"].set()
        future2.result()

    def test_first_completed_some_already_completed(self):
        future1 = self.executor.submit(wait_event, "e")
        try:
            finished, pending = concurrent.futures.wait(
                [self.CANCELLED_AND_NOTIFIED_FUTURE, self.SUCCESSFUL_FUTURE, future1],
                return_when=concurrent.futures.FIRST_COMPLETED)
            self.assertEqual({self.CANCELLED_AND_NOTIFIED_FUTURE, self.SUCCESSFUL_FUTURE},
                             finished)
            self.assertEqual({future1}, pending)
        finally:
            EVENTS["e"].set()
        future1.result()

    def test_first_exception(self):
        try:
            future1 = self.executor.submit(mul, 2, 21)
            future2 = self.executor.submit(wait_and_raise, "e1")
            future3 = self.executor.submit(wait_event, "e2")

            def wait_for_future1():
                future1.result()
                EVENTS["e1"].set()
            t = threading.Thread(target=wait_for_future1)
            t.start()
            finished, pending = concurrent.futures.wait(
                [future1, future2, future3], return_when=concurrent.futures.FIRST_EXCEPTION)
            self.assertEqual({future1, future2}, finished)
            self.assertEqual({future3}, pending)
            t.join()
        finally:
            EVENTS["e1"].set()
            EVENTS["e2"].set()
        future3.result()

    def test_first_exception_some_already_complete(self):
        future1 = self.executor.submit(divmod, 21, 0)
        future2 = self.executor.submit(wait_event, "e")
        try:
            finished, pending = concurrent.futures.wait(
                [self.SUCCESSFUL_FUTURE, self.CANCELLED_FUTURE,
                 self.CANCELLED_AND_NOTIFIED_FUTURE, future1, future2],
                return_when=concurrent.futures.FIRST_EXCEPTION)
            self.assertEqual({self.SUCCESSFUL_FUTURE, self.CANCELLED_AND_NOTIFIED_FUTURE,
                              future1}, finished)
            self.assertEqual({self.CANCELLED_FUTURE, future2}, pending)
        finally:
            EVENTS["e"].set()
        future2.result()

    def test_first_exception_one_already_failed(self):
        future1 = self.executor.submit(wait_event, "e")
        try:
            finished, pending = concurrent.futures.wait(
                [self.EXCEPTION_FUTURE, future1], return_when=concurrent.futures.FIRST_EXCEPTION)
            self.assertEqual({self.EXCEPTION_FUTURE}, finished)
            self.assertEqual({future1}, pending)
        finally:
            EVENTS["e"].set()
        future1.result()

    def test_all_completed(self):
        future1 = self.executor.submit(divmod, 2, 0)
        future2 = self.executor.submit(mul, 2, 21)
        finished, pending = concurrent.futures.wait(
            [self.SUCCESSFUL_FUTURE, self.CANCELLED_AND_NOTIFIED_FUTURE, self.EXCEPTION_FUTURE,
             future1, future2], return_when=concurrent.futures.ALL_COMPLETED)
        self.assertEqual({self.SUCCESSFUL_FUTURE, self.CANCELLED_AND_NOTIFIED_FUTURE,
                          self.EXCEPTION_FUTURE, future1, future2}, finished)
        self.assertEqual(set(), pending)

    def test_timeout(self):
        future = self.executor.submit(wait_event, "e")
        try:
            finished, pending = concurrent.futures.wait(
                [self.CANCELLED_AND_NOTIFIED_FUTURE, self.EXCEPTION_FUTURE,
                 self.SUCCESSFUL_FUTURE, future],
                timeout=0.050, return_when=concurrent.futures.ALL_COMPLETED)
            self.assertEqual({self.CANCELLED_AND_NOTIFIED_FUTURE, self.EXCEPTION_FUTURE,
                              self.SUCCESSFUL_FUTURE}, finished)
            self.assertEqual({future}, pending)
        finally:
            EVENTS["e"].set()
        future.result()

    # test_as_completed.py
    def test_no_timeout(self):
        future1 = self.executor.submit(mul, 2, 21)
        future2 = self.executor.submit(mul, 7, 6)
        completed = set(concurrent.futures.as_completed(
            [self.CANCELLED_AND_NOTIFIED_FUTURE, self.EXCEPTION_FUTURE,
             self.SUCCESSFUL_FUTURE, future1, future2]))
        self.assertEqual({self.CANCELLED_AND_NOTIFIED_FUTURE, self.EXCEPTION_FUTURE,
                          self.SUCCESSFUL_FUTURE, future1, future2}, completed)

    def test_future_times_out(self):
        already_completed = {self.CANCELLED_AND_NOTIFIED_FUTURE, self.EXCEPTION_FUTURE,
                             self.SUCCESSFUL_FUTURE}
        for timeout in (0, 0.100):
            with self.subTest(timeout):
                completed_futures = set()
                future = self.executor.submit(wait_event, f"e{timeout}")
                try:
                    for f in concurrent.futures.as_completed(already_completed | {future},
                                                             timeout):
                        completed_futures.add(f)
                except concurrent.futures.TimeoutError:
                    pass
                finally:
                    EVENTS[f"e{timeout}"].set()
                self.assertEqual(completed_futures, already_completed)

    def test_duplicate_futures(self):
        future1 = self.executor.submit(time.sleep, 0.2)     # (CPython's: 2 s)
        completed = list(concurrent.futures.as_completed([future1] * 3))
        self.assertEqual(len(completed), 1)

    # test_shutdown.py
    def test_run_after_shutdown(self):
        self.executor.shutdown()
        self.assertRaises(RuntimeError, self.executor.submit, pow, 2, 5)

    def test_hang_issue12364(self):
        # (CPython's calls sleep 0.1 s: 0.02 s still leaves most pending at shutdown)
        fs = [self.executor.submit(time.sleep, 0.02) for _ in range(50)]
        self.executor.shutdown()
        for f in fs:
            f.result()

    def test_cancel_futures(self):
        # (CPython's calls sleep 0.1 s and count on 50 submits being quicker
        # than ten rounds of its workers, which one commit per submit on a
        # loaded machine is not: here the calls wait until shutdown has
        # cancelled what had not started, so the counts are exact.)
        fs = [self.executor.submit(wait_event, "go") for _ in range(50)]
        wait_until(lambda: self.bl.stats()["inprogress"] == self.worker_count,
                   message="every worker holds a call")

        def go_once_the_rest_are_cancelled():
            wait_until(lambda: sum(f.cancelled() for f in fs) == 50 - self.worker_count,
                       timeout=30, message="the calls not started cancelled")
            EVENTS["go"].set()
        threading.Thread(target=go_once_the_rest_are_cancelled, daemon=True).start()
        self.executor.shutdown(cancel_futures=True)
        cancelled = [fut for fut in fs if fut.cancelled()]
        self.assertEqual(len(cancelled), 50 - self.worker_count)
        others = [fut for fut in fs if not fut.cancelled()]
        for fut in others:
            self.assertTrue(fut.done())
            self.assertIsNone(fut.exception())
        self.assertEqual(len(others), self.worker_count)

    def test_hang_gh94440(self):
        executor = self.bl.executor(max_workers=1)
        executor.submit(int).result()
        executor.submit(int).cancel()
        done = threading.Event()
        threading.Thread(target=lambda: (executor.shutdown(wait=True), done.set()),
                         daemon=True).start()
        self.assertTrue(done.wait(5), "timed out waiting for shutdown")

    def test_context_manager_shutdown(self):
        with self.bl.executor(max_workers=5) as e:
            self.assertEqual(list(e.map(abs, range(-5, 5))), [5, 4, 3, 2, 1, 0, 1, 2, 3, 4])

    def test_shutdown_no_wait(self):
        executor = self.bl.executor(max_workers=5)
        res = executor.map(abs, range(-5, 5))
        executor.shutdown(wait=False)
        self.assertTrue(all(r == abs(v) for r, v in zip(res, range(-5, 5))))


async def async_double(x):
    await asyncio.sleep(0)
    return 2 * x


@both_engines
class AsyncioTest(TempDirTest):
    """async def tasks and processors on the queue's event loop thread."""

    def test_a_thousand_sleeps_run_at_once_on_one_loop_thread(self):
        bl = self.queue()
        threads = set()

        @bl.task(name="nap", concurrency=1000)
        async def nap(i):
            threads.add(threading.current_thread().name)
            await asyncio.sleep(1)
            return i

        began = time.monotonic()
        self.assertEqual(nap.map(range(1000)), list(range(1000)))
        # One after another they would take 1000 s.
        self.assertLess(time.monotonic() - began, 120)
        self.assertEqual(threads, {"blero-loop"})
        self.assertEqual(sum(t.name == "blero-loop" for t in threading.enumerate()), 1)

    def test_an_async_processor_and_a_default_named_async_task(self):
        bl = self.queue()
        seen = []

        async def proc(job):
            seen.append(threading.current_thread().name)
            await asyncio.sleep(0.01)
            return job.data + 1

        bl.register_processor(proc, names="p")
        self.assertEqual(bl.wait(bl.enqueue("p", 1), 10), 2)
        self.assertEqual(seen, ["blero-loop"])
        task = bl.task(async_double)
        self.assertEqual(task.name, "test_blero.async_double")
        self.assertEqual(task.map([1, 2, 3]), [2, 4, 6])
        self.assertEqual(asyncio.run(task(4)), 8, "called, it is the coroutine function")

    def test_timeout_cancel_and_stop_cancel_the_coroutine(self):
        bl = self.queue(retries=0)
        started, cancelled = [], []

        @bl.task(name="sleeper")
        async def sleeper(tag):
            started.append(tag)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(tag)
                raise

        timed = sleeper.using(timeout=0.2).enqueue("timeout")
        with self.assertRaises(blero.JobFailed) as cm:   # blero's timeout, not the coroutine's
            timed.result(10)
        self.assertIn("timed out", cm.exception.error)
        wait_until(lambda: "timeout" in cancelled, message="the timed-out coroutine cancelled")
        f = sleeper.enqueue("cancel")
        wait_until(lambda: "cancel" in started)
        self.assertTrue(bl.cancel(f.id))
        wait_until(lambda: "cancel" in cancelled, message="the cancelled coroutine cancelled")
        with self.assertRaises(blero.JobCancelled):
            f.result(10)
        f = sleeper.enqueue("stop")
        wait_until(lambda: "stop" in started)
        bl.stop(timeout=0.1)
        self.assertIn("stop", cancelled)
        info = bl.get_job(f.id)
        self.assertEqual((info.state, info.attempt, info.max_attempts), ("pending", 1, 2))
        self.assertFalse(any(t.name.startswith("blero-loop") for t in threading.enumerate()))

    def test_stop_from_a_coroutine_on_the_loop_does_not_deadlock(self):
        bl = self.queue()

        @bl.task(name="stopper")
        async def stopper():
            bl.stop()
            await asyncio.sleep(0.05)
            return "recorded"

        future = stopper.enqueue()
        wait_until(lambda: bl._dispatcher is None, message="the queue to stop")
        self.assertEqual(future.result(10), "recorded")
        self.assertEqual(bl.get_job(future.id).result, "recorded")

    def test_aenqueue_runs_off_the_callers_loop_and_awaits_results(self):
        bl = self.queue()
        task = bl.task(async_double)
        enqueued_on = []
        enqueue = bl.enqueue

        def recording(*args, **kwargs):
            enqueued_on.append(threading.current_thread())
            return enqueue(*args, **kwargs)
        bl.enqueue = recording

        async def main():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)
            t = asyncio.ensure_future(ticker())
            futures = [await task.aenqueue(i) for i in range(20)]
            ids = await bl.aenqueue_many([("test_blero.async_double", ((5,), {}))],
                                         connection=None)
            job = await bl.aenqueue("test_blero.async_double", ((6,), {}))
            results = [await f for f in futures]
            results += [await bl.future(ids[0]), await bl.future(job)]
            t.cancel()
            return results, ticks

        results, ticks = asyncio.run(main())
        self.assertEqual(results, [2 * i for i in range(20)] + [10, 12])
        # the async twins take what the sync ones take
        for sync, coro in ((blero.Blero.enqueue, blero.Blero.aenqueue),
                           (blero.Blero.enqueue_many, blero.Blero.aenqueue_many)):
            self.assertEqual(inspect.signature(sync), inspect.signature(coro))
        first = asyncio.run(bl.aenqueue("test_blero.async_double", ((1,), {}), priority=2))
        second = asyncio.run(bl.aenqueue("test_blero.async_double", ((2,), {}), after=[first],
                                         connection=None))
        self.assertEqual(bl.wait(second, 10), 4)
        self.assertEqual(bl.get_job(second).after, (first,))
        self.assertGreater(ticks, 0)
        self.assertTrue(enqueued_on)
        self.assertNotIn(threading.main_thread(), enqueued_on)

    def test_awaiting_many_futures_takes_no_thread_per_waiter(self):
        bl = self.queue()
        gate = threading.Event()
        self.addCleanup(gate.set)
        bl.register_processor(lambda job: gate.wait(30) and job.data, names="held")
        ids = bl.enqueue_many([("held", i) for i in range(300)])
        before = threading.active_count()

        async def main():
            waiting = [asyncio.ensure_future(_awaited(bl.future(i))) for i in ids]
            await asyncio.sleep(0.2)
            during = threading.active_count()
            gate.set()
            return await asyncio.gather(*waiting), during

        results, during = asyncio.run(main())
        self.assertEqual(results, list(range(300)))
        self.assertLessEqual(during - before, 3)

    def test_awaiting_a_job_that_raised_stop_iteration_raises(self):
        # asyncio cannot raise a StopIteration into a coroutine: the await
        # raises RuntimeError from it rather than hang.
        bl = self.queue()
        empty = bl.task(name="empty", retries=0)(lambda: next(iter(())))

        async def main():
            return await asyncio.wait_for(_awaited(empty.enqueue()), 10)

        with self.assertRaises(RuntimeError) as raised:
            asyncio.run(main())
        self.assertIsInstance(raised.exception.__cause__, StopIteration)

    def test_an_await_given_up_leaves_the_job_to_run(self):
        # A wait_for that times out, or a server whose handlers are
        # cancelled as it shuts down, gives up waiting: the job is committed
        # and still runs; future.cancel() is what cancels a job.
        bl = self.queue()
        gate = threading.Event()
        self.addCleanup(gate.set)
        bl.register_processor(lambda job: gate.wait(30) and job.data, names="held")
        first, second, third = (bl.future(i) for i in bl.enqueue_many(
            [("held", 1), ("held", 2), ("held", 3)]))

        async def main():
            with self.assertRaises(asyncio.TimeoutError):
                await asyncio.wait_for(_awaited(first), 0.05)
            waiting = asyncio.ensure_future(_awaited(second))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await waiting
            gate.set()
            return await third

        self.assertEqual(asyncio.run(main()), 3)
        self.assertEqual((first.result(10), second.result(10)), (1, 2))
        self.assertEqual([bl.get_job(f.id).state for f in (first, second)],
                         ["complete", "complete"])

        async def cancelled_job():
            future = bl.future(bl.enqueue("held", 4, delay=3600))
            self.assertTrue(future.cancel())
            with self.assertRaises(asyncio.CancelledError):
                await future
            return future.id

        self.assertEqual(bl.get_job(asyncio.run(cancelled_job())).state, "cancelled")


async def _awaited(future):
    return await future


RESUME_CHILD = NEW_QUEUE + """
import json, os, sys, time, blero
path, log, mode, n, sleep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
def note(*words):
    os.write(fd, (" ".join(map(str, words)) + " .\\n").encode())
bl = new_queue(path)

def fetch(url):
    note("start", url)
    time.sleep(sleep)
    note("end", url)
    return f"status-of-{url}"

post = bl.task(concurrency=5, retries=5)(fetch) if mode == "map" else None
urls = [f"u{i % (n // 2)}" for i in range(n)]     # every url twice
with bl:
    if mode == "map":
        statuses = post.map(urls)
    else:
        if mode == "moved" and sleep:   # the killed run: its executor is its second
            bl.executor(1)
        with bl.executor(5) as ex:
            statuses = list(ex.map(fetch, urls))
    note("results", json.dumps(statuses).replace(" ", ""))
"""


@unittest.skipUnless(POSIX, "SIGKILL")
@both_engines
class ResumableTest(TempDirTest):
    """kill -9 in the middle of post.map(urls) or Executor.map(fn, urls), run
    again: completed calls are not run again, and every result comes back in order."""

    def run_killed_then_again(self, mode):
        path, log = self.target(), os.path.join(self.dir, "log")
        n = 120
        child = start_child(RESUME_CHILD, path, log, mode, n, 0.02)
        self.addCleanup(child.kill)
        try:
            wait_until(lambda: sum(l[0] == "end" for l in read_lines(log)) >= 30
                       or child.poll() is not None, timeout=60, message="the kill point")
        finally:
            child.kill()
            child.wait()
        self.assertFalse(any(l[0] == "results" for l in read_lines(log)), "killed too late")
        bl = self.queue(start=False)
        complete = [j for j in bl.jobs("complete", limit=None)]
        self.assertGreaterEqual(len(complete), 20)
        keys = {j.key for j in complete}
        self.assertTrue(all(k and k.startswith("blero.call:") for k in keys))
        # Each url twice: the two calls are separate jobs, both stored.
        self.assertEqual(len(keys), len(complete))
        expected = [f"status-of-u{i % (n // 2)}" for i in range(n)]

        os.remove(log)
        again = run_child(RESUME_CHILD, path, log, mode, n, 0.0, timeout=120)
        self.assertEqual(again.returncode, 0, again.stderr)
        lines = read_lines(log)
        self.assertEqual(json.loads(lines[-1][1]), expected)
        runs = collections.Counter(l[1] for l in lines if l[0] == "start")
        done_before = collections.Counter(j.data[0][0] for j in complete)
        for url in set(done_before):
            # (the url's two calls: only those not complete ran again)
            self.assertLessEqual(runs[url], 2 - done_before[url], url)
        self.assertEqual(sum(runs.values()), n - len(complete), "only the rest ran")
        self.assertTrue(all(j.key is None for j in bl.jobs(limit=None)),
                        "a finished run releases its calls")

        # A run that finished, run again: every call runs again.
        os.remove(log)
        third = run_child(RESUME_CHILD, path, log, mode, n, 0.0, timeout=120)
        self.assertEqual(third.returncode, 0, third.stderr)
        lines = read_lines(log)
        self.assertEqual(json.loads(lines[-1][1]), expected)
        runs = collections.Counter(l[1] for l in lines if l[0] == "start")
        self.assertEqual(set(runs.values()), {2}, "the same call twice in a run runs twice")
        # Run 1 stored a job per call, run 2 finished them, run 3 made its own.
        self.assertEqual(bl.stats(), {"pending": 0, "inprogress": 0, "complete": 2 * n,
                                      "failed": 0, "cancelled": 0})

    def test_kill_9_in_the_middle_of_task_map(self):
        self.run_killed_then_again("map")

    def test_kill_9_in_the_middle_of_executor_map(self):
        self.run_killed_then_again("executor")

    def test_kill_9_in_the_middle_of_a_second_executors_map_resumed_by_a_first(self):
        # The calls, and the suspects among them, are the killed run's second
        # executor's: matched, the next run's first takes them.
        self.run_killed_then_again("moved")

# ---------------------------------------------------------------------------
# Flow control (issue 11): after= dependencies, pause/resume, limits
# ---------------------------------------------------------------------------

class FutureLike:
    """What `after` takes besides ids: anything with an int `.id` (JobFuture)."""

    def __init__(self, id):
        self.id = id


class JobIdLike:
    def __init__(self, job_id):
        self.job_id = job_id


def gate(events):
    """A processor whose job with data d blocks until `events[d]` is set."""
    def run(job):
        if job.data in events:
            events[job.data].wait(30)
        return job.data
    return run


@both_engines
class AfterTest(TempDirTest):
    """enqueue(after=...): a job waits until the jobs it names are complete."""

    def test_waits_for_every_job_named_then_runs(self):
        bl = self.queue()
        events = {"a": threading.Event(), "b": threading.Event()}
        self.addCleanup(lambda: [e.set() for e in events.values()])
        a, b = bl.enqueue("x", "a"), bl.enqueue("x", "b")
        c = bl.enqueue("x", "c", after=[b, a])
        for _ in range(3):
            bl.register_processor(gate(events))
        wait_until(lambda: bl.stats()["inprogress"] == 2, message="a and b running")
        info = bl.get_job(c)
        self.assertEqual((info.state, info.after), ("pending", (b, a)))
        self.assertEqual(bl.get_job(a).after, ())
        self.assertEqual(bl.stats()["pending"], 1)
        self.assertEqual([j.id for j in bl.jobs(state="pending")], [c])
        self.assertEqual([j.id for j in bl.jobs()], [a, b, c])
        events["a"].set()
        self.assertEqual(bl.wait(a, 10), "a")
        self.assertFalse(bl.join(0.2), "join() ended with a job still waiting")
        self.assertEqual(bl.get_job(c).state, "pending")
        events["b"].set()
        self.assertEqual(bl.wait(c, 10), "c")
        self.assertGreaterEqual(bl.get_job(c).started_at, bl.get_job(b).finished_at)
        self.assertTrue(bl.join(10))

    def test_ids_futures_and_a_single_id(self):
        bl = self.queue()
        a, b = bl.enqueue("x"), bl.enqueue("x")
        self.assertEqual(bl.get_job(bl.enqueue("x", after=a)).after, (a,))
        self.assertEqual(bl.get_job(bl.enqueue("x", after=FutureLike(a))).after, (a,))
        self.assertEqual(bl.get_job(bl.enqueue("x", after=[JobIdLike(b), FutureLike(a), a]))
                         .after, (b, a))
        self.assertEqual(bl.get_job(bl.enqueue("x", after=())).after, ())
        ids = bl.enqueue_many([{"name": "x", "after": [a, b]}, ("y", None),
                               {"name": "z", "after": b}])
        self.assertEqual([bl.get_job(i).after for i in ids], [(a, b), (), (b,)])
        bl.register_processor(lambda job: job.id)
        self.assertTrue(bl.join(10))
        self.assertEqual(bl.stats()["complete"], 9)

    def test_a_task_waits_on_the_futures_it_is_given(self):
        bl = self.queue()
        order = []

        @bl.task(name="flow.add")
        def add(a, b):
            order.append((a, b))
            return a + b
        first = add.enqueue(1, 2)
        second = add.using(after=first).enqueue(3, 4)
        third = add.using(after=[first, second]).enqueue(5, 6)
        self.assertEqual(bl.get_job(third.id).after, (first.id, second.id))
        self.assertEqual([f.result(10) for f in (first, second, third)], [3, 7, 11])
        self.assertEqual(order, [(1, 2), (3, 4), (5, 6)])

    def test_bad_after_raises_and_stores_nothing(self):
        bl = self.queue()
        a = bl.enqueue("x")
        for bad, error in (([a, a + 1000], ValueError), (0, ValueError), ([-1], ValueError),
                           ("1", TypeError), ([1.0], TypeError), (True, TypeError),
                           ([None], TypeError), (FutureLike("1"), TypeError),
                           (object(), TypeError)):
            with self.assertRaises(error, msg=repr(bad)):
                bl.enqueue("x", after=bad)
            with self.assertRaises(error, msg=repr(bad)):
                bl.enqueue_many([("x", 1), {"name": "x", "after": bad}])
        with self.assertRaises(ValueError) as cm:
            bl.enqueue("x", after=[a, a + 7])
        self.assertIn(str(a + 7), str(cm.exception))
        self.assertEqual(bl.stats()["pending"], 1, "a refused enqueue stored something")
        self.assertEqual(bl.enqueue("x"), a + 1)

    def test_a_failure_cancels_the_chain_below_it_not_its_siblings(self):
        bl = self.queue(retries=0)

        def run(job):
            if job.data == "fails":
                raise RuntimeError("the middle fails")
            return job.data
        first = bl.enqueue("x", "first")
        middle = bl.enqueue("x", "fails", after=first)
        below = bl.enqueue("x", "below", after=middle)
        further = bl.enqueue("x", "further", after=[below, first])
        sibling = bl.enqueue("x", "sibling", after=first)
        nephew = bl.enqueue("x", "nephew", after=sibling)
        bl.register_processor(run)
        bl.register_processor(run)
        self.assertTrue(bl.join(10))
        self.assertEqual(bl.get_job(middle).state, "failed")
        for job_id, dep in ((below, middle), (further, below)):
            info = bl.get_job(job_id)
            self.assertEqual(info.state, "cancelled")
            self.assertIsNone(info.started_at, "a cancelled dependant ran")
            self.assertIn(f"job {dep}", info.error)
            with self.assertRaises(blero.JobCancelled):
                bl.wait(job_id, 5)
        self.assertIn("failed", bl.get_job(below).error)
        self.assertEqual([bl.wait(i, 5) for i in (first, sibling, nephew)],
                         ["first", "sibling", "nephew"])

    def test_cancelling_a_job_cancels_those_waiting_on_it(self):
        bl = self.queue()
        a = bl.enqueue("x", delay=3600)
        b = bl.enqueue("x", after=a)
        c = bl.enqueue("x", after=b)
        other = bl.enqueue("x", after=bl.enqueue("x"))
        self.assertTrue(bl.cancel(b))
        self.assertEqual([bl.get_job(i).state for i in (a, b, c)],
                         ["pending", "cancelled", "cancelled"])
        self.assertIn(f"job {b}", bl.get_job(c).error)
        self.assertIn("cancelled", bl.get_job(c).error)
        bl.register_processor(lambda job: "ran")
        self.assertEqual(bl.wait(other, 10), "ran")
        self.assertTrue(bl.cancel(a))
        self.assertTrue(bl.join(10))

    def test_after_jobs_already_ended(self):
        bl = self.queue(retries=0)

        def run(job):
            if job.data == "fails":
                raise RuntimeError("fails")
        bl.register_processor(run)
        ok, bad = bl.enqueue("x"), bl.enqueue("x", "fails")
        self.assertIsNone(bl.wait(ok, 10))
        with self.assertRaises(blero.JobFailed):
            bl.wait(bad, 10)
        self.assertEqual(bl.wait(bl.enqueue("x", "runs", after=ok), 10), None)
        late = bl.enqueue("x", after=[ok, bad])
        info = bl.get_job(late)
        self.assertEqual(info.state, "cancelled")
        self.assertIn(f"job {bad}", info.error)
        self.assertIn("failed", info.error)

    def test_a_dependency_swept_after_completing_counts_as_complete(self):
        bl = self.queue()
        events = {"slow": threading.Event()}
        self.addCleanup(events["slow"].set)
        bl.register_processor(gate(events))
        bl.register_processor(gate(events))
        done, slow = bl.enqueue("x", "done"), bl.enqueue("x", "slow")
        both = bl.enqueue("x", "both", after=[done, slow])
        self.assertEqual(bl.wait(done, 10), "done")
        self.assertEqual(bl.sweep(), 1)
        self.assertIsNone(bl.get_job(done))
        later = bl.enqueue("x", "later", after=done)
        self.assertEqual(bl.wait(later, 10), "later")
        self.assertEqual(bl.get_job(both).state, "pending")
        events["slow"].set()
        self.assertEqual(bl.wait(both, 10), "both")
        self.assertEqual(bl.get_job(both).after, (done, slow))
        self.assertEqual(self.stored_rows("blero_deps"), 3)
        self.assertEqual(bl.sweep(), 3)
        self.assertEqual(self.stored_rows("blero_deps"), 0, "swept jobs' lists stay behind")
        # ids are never reused, so a swept id is told from one never given
        with self.assertRaises(ValueError):
            bl.enqueue("x", after=both + 10)

    def test_a_chain_of_a_thousand_runs_in_order(self):
        bl = self.queue()
        order = []
        lock = threading.Lock()

        def run(job):
            with lock:
                order.append(job.id)
        ids, last = [], None
        for i in range(1000):
            last = bl.enqueue("chain", i, after=last)
            ids.append(last)
        for _ in range(4):
            bl.register_processor(run)
        self.assertTrue(bl.join(120))
        self.assertEqual(order, ids)
        self.assertEqual(bl.stats()["complete"], 1000)

    def test_a_delayed_dependant_waits_for_its_time_too(self):
        bl = self.queue()
        bl.register_processor(lambda job: time.time())
        a = bl.enqueue("x")
        b = bl.enqueue("x", after=a, delay=0.3)
        began = bl.get_job(b).created_at
        self.assertGreaterEqual(bl.wait(b, 10), began + 0.3)

    def test_waiting_lasts_across_a_restart(self):
        bl = self.queue(start=False)
        bl.start()
        a = bl.enqueue("x", delay=0.5)
        b = bl.enqueue("x", after=a)
        bl.stop()
        bl.start()
        bl.register_processor(lambda job: job.id)
        self.assertEqual(bl.wait(b, 10), b)
        self.assertLess(bl.get_job(a).finished_at, bl.get_job(b).started_at)


# The last blero.py whose files are of schema 2 (before after=, pauses and
# limits): the test of that upgrade runs it to make such a file.
V2_COMMIT = "39c00f9"
# The last blero.py whose PostgreSQL schemas are of version 1.
PG_V1_COMMIT = "addf569"

# argv: db.  With the v2 blero.py: 2 jobs done, 3 left pending.
V2_CHILD = """
import sys, json, blero
bl = blero.new(sys.argv[1])
bl.register_processor(lambda job: job.data * 2, names=["done"])
bl.start()
done = bl.enqueue_many([("done", b"done %d" % i) for i in range(2)])
bl.wait(done[-1], 60)
waiting = bl.enqueue_many([("waiting", b"waits %d" % i) for i in range(3)])
bl.stop()
print(json.dumps({"done": done, "waiting": waiting}))
"""


class FlowUpgradeTest(ProcessTest):
    """A file of schema 2 gets what after=, pauses and limits store at its
    first start, and is read as if it had them on read-only storage."""

    def v2_file(self, path):
        made = json.loads(with_old_blero(self, V2_COMMIT, V2_CHILD, path))
        self.assertEqual(UpgradeTest.layout(self, path), (2, 2))
        return made

    def test_a_file_of_schema_2_is_upgraded_in_place(self):
        made = self.v2_file(self.path)
        bl = blero.new(self.path)
        bl.start()
        self.assertEqual(UpgradeTest.layout(self, self.path), (blero._SCHEMA_VERSION, 2))
        self.assertEqual((bl.paused(), bl.limits()), (set(), {}))
        self.assertEqual(bl.get_job(made["done"][0]).after, ())
        first = made["waiting"][0]
        then = bl.enqueue("waiting", b"then", after=made["waiting"])
        bl.pause("waiting")
        bl.limit("waiting", concurrency=1)
        bl.register_processor(lambda job: job.data.upper(), names=["waiting"])
        bl.register_processor(lambda job: job.data.upper(), names=["waiting"])
        self.assertFalse(bl.join(0.3))
        self.assertEqual(bl.get_job(first).state, "pending")
        bl.resume("waiting")
        self.assertEqual(bl.wait(then, 10), b"THEN")
        self.assertEqual(bl.get_job(then).after, tuple(made["waiting"]))
        bl.stop()
        bl = blero.new(self.path)
        self.assertEqual(bl.limits(), {"waiting": {"concurrency": 1, "rate": None}})
        self.assertEqual(bl.stats()["complete"], 6)

    @unittest.skipIf(POSTGRES_MISSING, POSTGRES_MISSING)
    def test_a_postgresql_schema_of_version_1_is_upgraded_in_place(self):
        schema = "test_" + os.urandom(5).hex()
        self.addCleanup(pg_run, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        made = json.loads(with_old_blero(self, PG_V1_COMMIT, """
            import sys, json, blero
            bl = blero.new(sys.argv[1], schema=sys.argv[2])
            bl.register_processor(lambda job: job.data, names="done")
            bl.start()
            done = bl.enqueue("done", "d")
            bl.wait(done, 60)
            waiting = bl.enqueue("waiting", "w")
            bl.stop()
            print(json.dumps([done, waiting]))
            """, POSTGRES, schema))
        bl = blero.new(POSTGRES, schema=schema)
        self.assertEqual(bl.stats()["pending"], 1)     # (an inspection upgrades it too)
        bl.register_processor(lambda job: job.data)
        bl.start()
        self.addCleanup(bl.stop, 5)
        then = bl.enqueue("then", "t", after=made)
        bl.limit("waiting", concurrency=1)
        self.assertEqual(bl.wait(then, 10), "t")
        self.assertEqual(bl.get_job(then).after, tuple(made))
        with pg_connect() as conn:
            versions = [r[0] for r in conn.execute(f'SELECT version FROM "{schema}".blero_meta')]
        self.assertEqual(max(versions), blero._PG_SCHEMA_VERSION)

    def test_a_file_of_schema_2_on_read_only_storage_is_read_as_the_latest(self):
        made = self.v2_file(self.path)
        copy = ReadOnlyStorageTest.read_only_copy(self, self.path)
        bl = blero.new(copy)
        self.assertEqual((bl.paused(), bl.limits()), (set(), {}))
        self.assertEqual([bl.get_job(i).after for i in made["waiting"]], [()] * 3)
        self.assertEqual(bl.stats()["pending"], 3)
        self.assertTrue(bl.jobs(state="pending"))
        for operate in (bl.pause, lambda: bl.limit("x", concurrency=1), bl.resume):
            with self.assertRaises(blero.BleroError):
                operate()



def held_until(test, bl, job_id, release):
    """Job `job_id` stays pending (and join() waits) until `release()`; then
    it runs: its result."""
    test.assertFalse(bl.join(0.3))
    test.assertEqual(bl.get_job(job_id).state, "pending")
    release()
    return bl.wait(job_id, 10)


@both_engines
class PauseTest(TempDirTest):
    """pause(name=None), resume(name=None), paused(): stored in the queue."""

    def test_a_paused_name_starts_no_job_until_resumed_others_go_on(self):
        bl = self.queue()
        ran = []
        bl.register_processor(lambda job: ran.append(job.name))
        bl.register_processor(lambda job: ran.append(job.name))
        self.assertIsNone(bl.pause("x"))
        self.assertEqual(bl.paused(), {"x"})
        xs = [bl.enqueue("x", i) for i in range(5)]
        ys = [bl.enqueue("y", i) for i in range(5)]
        for i in ys:
            bl.wait(i, 10)
        self.assertFalse(bl.join(0.3))
        self.assertEqual([bl.get_job(i).state for i in xs], ["pending"] * 5)
        self.assertNotIn("x", ran)
        bl.resume("x")
        self.assertEqual(bl.paused(), set())
        self.assertTrue(bl.join(10))
        self.assertEqual(ran.count("x"), 5)

    def test_pause_of_everything_and_resume_of_everything(self):
        bl = self.queue()
        bl.pause("x")
        bl.pause()
        self.assertEqual(bl.paused(), {None, "x"})
        bl.register_processor(lambda job: job.name)
        ids = [bl.enqueue(name) for name in "xyz"]
        self.assertFalse(bl.join(0.3))
        self.assertEqual(bl.stats()["pending"], 3)
        bl.resume("x")      # everything is still paused
        self.assertEqual(bl.paused(), {None})
        self.assertFalse(bl.join(0.2))
        bl.pause("x")
        bl.resume()         # resumes every name
        self.assertEqual(bl.paused(), set())
        self.assertEqual([bl.wait(i, 10) for i in ids], list("xyz"))
        bl.resume()         # nothing paused: nothing to do
        bl.resume("never paused")

    def test_running_jobs_finish_when_paused(self):
        bl = self.queue()
        release = threading.Event()
        self.addCleanup(release.set)
        bl.register_processor(gate({"hold": release}))
        held = bl.enqueue("x", "hold")
        wait_until(lambda: bl.get_job(held).state == "inprogress")
        waiting = bl.enqueue("x", "next")
        bl.pause("x")
        release.set()
        self.assertEqual(bl.wait(held, 10), "hold")
        self.assertEqual(held_until(self, bl, waiting, lambda: bl.resume("x")), "next")

    def test_a_pause_lasts_across_restarts_and_is_seen_by_every_handle(self):
        bl = self.queue(start=False)
        bl.start()
        bl.pause("x")
        job = bl.enqueue("x")
        bl.stop()
        other = blero.new(self.target(), **self.settings())
        self.assertEqual(other.paused(), {"x"})
        bl.register_processor(lambda job: "ran")
        bl.start()
        self.assertFalse(bl.join(0.3))
        other.resume("x")       # a stopped handle operates on the stored queue
        self.assertEqual(bl.wait(job, 10), "ran")

    def test_bad_names(self):
        bl = self.queue()
        for call in (bl.pause, bl.resume):
            for bad, error in ((b"x", TypeError), (1, TypeError), ("", ValueError)):
                with self.assertRaises(error):
                    call(bad)
        self.assertEqual(bl.paused(), set())


def concurrent_peak(spans):
    """The most spans (start, end) open at one instant."""
    edges = sorted([(start, 1) for start, end in spans] + [(end, -1) for start, end in spans],
                   key=lambda e: (e[0], e[1]))     # an end before a start at the same instant
    peak = n = 0
    for _, step in edges:
        n += step
        peak = max(peak, n)
    return peak


def most_in_a_window(times, window):
    """The most of `times` within any `window` (a span shorter than window)."""
    times = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


@both_engines
class LimitTest(TempDirTest):
    """limit(name, concurrency=, rate=) and limits()."""

    def test_concurrency_is_never_exceeded_and_other_names_go_on(self):
        bl = self.queue()
        lock, spans, others = threading.Lock(), [], []
        go = threading.Event()
        self.addCleanup(go.set)

        def run(job):
            if job.name == "free":
                with lock:
                    others.append(job.id)
                return
            start = time.monotonic()
            go.wait(30)
            time.sleep(0.01)        # the job's work
            with lock:
                spans.append((start, time.monotonic()))
        bl.limit("lim", concurrency=2)
        self.assertEqual(bl.limits(), {"lim": {"concurrency": 2, "rate": None}})
        limited = [bl.enqueue("lim", i) for i in range(12)]
        for _ in range(6):
            bl.register_processor(run)
        wait_until(lambda: bl.stats()["inprogress"] == 2, message="two limited jobs running")
        free = [bl.enqueue("free", i) for i in range(50)]
        for i in free:
            bl.wait(i, 30)          # while the limited name holds its two slots
        self.assertEqual(bl.stats()["inprogress"], 2)
        self.assertEqual(sum(bl.get_job(i).state == "pending" for i in limited), 10)
        go.set()
        self.assertTrue(bl.join(30))
        self.assertEqual(len(spans), 12)
        self.assertEqual(concurrent_peak(spans), 2)

    def test_a_rate_is_never_exceeded(self):
        bl = self.queue()
        starts = []
        bl.limit("r", rate=(5, 0.25))
        self.assertEqual(bl.limits(), {"r": {"concurrency": None, "rate": (5, 0.25)}})
        for _ in range(4):
            bl.register_processor(lambda job: job.name == "r" and starts.append(time.monotonic()))
        ids = [bl.enqueue("r", i) for i in range(16)]
        other = bl.enqueue("other")
        self.assertFalse(bl.wait(other, 10))    # not held up by the rate of another name
        self.assertTrue(bl.join(30))
        self.assertEqual(len(starts), 16)
        # Counted as the queue counts them, by each try's recorded start (its
        # claim): a processor's own clock reads a moment later, by as much as
        # the scheduler likes on a loaded machine.
        starts = sorted(bl.get_job(i).started_at for i in ids)
        self.assertLessEqual(most_in_a_window(starts, 0.25), 5)
        self.assertGreaterEqual(starts[-1] - starts[0], 0.75, "16 starts at 5 per 0.25 s")
        self.assertEqual([bl.get_job(i).state for i in ids], ["complete"] * 16)

    def test_changing_and_removing_a_limit(self):
        bl = self.queue()
        bl.limit("a", concurrency=1)
        bl.limit("b", concurrency=3, rate=(10, 60))
        bl.limit("a", rate=(2, 1.5))     # replaces a's limit
        self.assertEqual(bl.limits(), {"a": {"concurrency": None, "rate": (2, 1.5)},
                                       "b": {"concurrency": 3, "rate": (10, 60.0)}})
        bl.limit("b")
        self.assertEqual(list(bl.limits()), ["a"])
        bl.pause("a")
        bl.limit("a")
        self.assertEqual((bl.limits(), bl.paused()), ({}, {"a"}))
        bl.resume("a")
        bl.limit("gone")        # no limit to remove: nothing happens
        self.assertEqual(bl.limits(), {})

    def test_jobs_over_the_limit_run_once_the_limit_allows(self):
        bl = self.queue()
        bl.limit("x", concurrency=1)
        bl.register_processor(lambda job: job.data)
        bl.register_processor(lambda job: job.data)
        ids = [bl.enqueue("x", i) for i in range(20)]
        self.assertEqual([bl.wait(i, 10) for i in ids], list(range(20)))
        bl.limit("x", rate=(1, 3600))
        first, second = bl.enqueue("x", "first"), bl.enqueue("x", "second")
        self.assertEqual(bl.wait(first, 10), "first")
        self.assertEqual(held_until(self, bl, second, lambda: bl.limit("x")), "second")

    def test_bad_limits(self):
        bl = self.queue()
        for kwargs, error in (({"concurrency": 0}, ValueError), ({"concurrency": -1}, ValueError),
                              ({"concurrency": 1.5}, TypeError), ({"concurrency": "2"}, TypeError),
                              ({"rate": (0, 1)}, ValueError), ({"rate": (1, 0)}, ValueError),
                              ({"rate": (1, -1)}, ValueError), ({"rate": (1, math.inf)}, ValueError),
                              ({"rate": (1, math.nan)}, ValueError), ({"rate": 5}, TypeError),
                              ({"rate": (1,)}, TypeError), ({"rate": (1.5, 1)}, TypeError),
                              ({"rate": [1, 1]}, TypeError)):
            with self.assertRaises(error, msg=repr(kwargs)):
                bl.limit("x", **kwargs)
        with self.assertRaises(TypeError):
            bl.limit(None, concurrency=1)
        with self.assertRaises(ValueError):
            bl.limit("", concurrency=1)
        with self.assertRaises(TypeError):
            bl.limit("x", 2)    # keyword-only
        self.assertEqual(bl.limits(), {})



@both_engines
class FlowCommandLineTest(TempDirTest):
    """python -m blero pause|resume [--name N], and after in jobs --json."""

    def db(self):
        """The --db (and on PostgreSQL --schema) that name the test's queue."""
        return ["--db", self.target()] + (["--schema", self.settings()["schema"]]
                                          if self.engine == "postgres" else [])

    def test_pause_and_resume(self):
        bl = self.queue()
        a = bl.enqueue("x")
        b = bl.enqueue("y", after=a)
        target = self.db()
        out = run_cli("pause", "--name", "x", *target)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("'x' paused", out.stdout)
        self.assertEqual(bl.paused(), {"x"})
        out = run_cli("pause", *target)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("everything, x", out.stdout)
        self.assertEqual(bl.paused(), {None, "x"})
        out = run_cli("resume", "--name", "x", *target)
        self.assertEqual((out.returncode, bl.paused()), (0, {None}))
        out = run_cli("resume", *target)
        self.assertEqual((out.returncode, bl.paused()), (0, set()))
        self.assertIn("every job resumed", out.stdout)
        out = run_cli("jobs", "--json", *target)
        self.assertEqual([j["after"] for j in json.loads(out.stdout)], [[], [a]])
        del b

    def test_bad_usage(self):
        self.queue()
        out = run_cli("pause", "--name", "", *self.db())
        self.assertEqual(out.returncode, 2)
        self.assertIn("not a job name", out.stderr)

    @file_only
    def test_a_missing_file_is_an_error(self):
        missing = self.target("missing.db")
        out = run_cli("resume", "--db", missing)
        self.assertEqual(out.returncode, 1)
        self.assertFalse(os.path.exists(missing))


# argv: db, log, processors, go file, done file.  Each processor logs "S name
# id pid t" as its try begins and "E name id pid t" as it ends (t: monotonic
# ns, one clock for every process); a job whose data is "hold" waits for the
# go file first; a job's work takes 5 ms.  The child stops once the done file is there.
FLOW_CHILD = """
db, log_path, n, go_path, done_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
log = open_log(log_path)
def run(job):
    log("S", job.name, job.id, PID, time.monotonic_ns())
    if job.data == "hold":
        wait_for(lambda: os.path.exists(go_path))
    time.sleep(0.005)       # the job's work
    log("E", job.name, job.id, PID, time.monotonic_ns())
bl = new_queue(db)
for _ in range(n):
    bl.register_processor(run)
bl.start()
log("ready", PID)
wait_for(lambda: os.path.exists(done_path), timeout=300)
bl.stop()
"""


@both_engines
class FlowAcrossProcessesTest(ProcessTest):
    """Pauses, limits and after= hold across processes sharing the queue,
    as the processors' own logs show."""

    def children(self, count, processors):
        self.go, self.done = os.path.join(self.dir, "go"), os.path.join(self.dir, "done")
        self.addCleanup(lambda: open(self.done, "a").close())
        kids = [self.spawn(FLOW_CHILD, self.target(), self.log, processors, self.go, self.done)
                for _ in range(count)]
        self.wait_lines("ready", count=count, children=kids)
        return kids

    def end(self, kids):
        open(self.done, "a").close()
        for p in kids:
            self.finish(p)

    def spans(self, name):
        """{job id: (start, end)} of the tries of jobs named `name` (ns)."""
        starts = {int(f[2]): int(f[4]) for f in self.lines("S", name)}
        ends = {int(f[2]): int(f[4]) for f in self.lines("E", name)}
        return {i: (t, ends.get(i)) for i, t in starts.items()}

    def test_concurrency_across_three_processes_of_four_workers(self):
        bl = self.queue()
        bl.limit("lim", concurrency=2)
        limited = bl.enqueue_many([("lim", "hold" if i < 2 else i) for i in range(30)])
        kids = self.children(3, 4)
        self.wait_lines("S", "lim", count=2, children=kids)
        # The two slots are held: the other name runs on the ten other
        # workers, and no process starts a third limited job meanwhile
        # (each finished job's worker claims the next in the same commit,
        # so afterwards the slots tend to stay in the process that has them).
        free = bl.enqueue_many([("free", i) for i in range(200)])
        for i in free:
            bl.wait(i, 60)
        self.assertEqual(len(self.lines("S", "lim")), 2, "a third limited job started")
        self.assertEqual(bl.stats()["inprogress"], 2)
        open(self.go, "w").close()
        for i in limited:
            bl.wait(i, 60)
        self.end(kids)
        spans = self.spans("lim")
        self.assertEqual(sorted(spans), limited)
        self.assertEqual(concurrent_peak(list(spans.values())), 2)

    def test_rate_across_three_processes_over_five_windows(self):
        bl = self.queue()
        bl.limit("r", rate=(10, 0.25))
        ids = bl.enqueue_many([("r", i) for i in range(60)])
        kids = self.children(3, 4)
        for i in ids:
            bl.wait(i, 60)
        self.end(kids)
        self.assertEqual(len(self.spans("r")), 60)
        # (by the tries' recorded starts, their claims, as the queue counts
        # them: a processor's clock reads a moment later, as load decides)
        starts = sorted(bl.get_job(i).started_at for i in ids)
        self.assertLessEqual(most_in_a_window(starts, 0.25), 10)
        self.assertGreaterEqual(starts[-1] - starts[0], 5 * 0.25)

    def test_after_pause_returns_no_job_of_the_name_starts_in_any_process(self):
        bl = self.queue()
        bl.enqueue_many([("p", i) for i in range(5000)])
        kids = self.children(3, 2)
        for cycle, name in enumerate(["p", None, "p"]):
            seen = len(self.lines("S"))
            self.wait_lines("S", count=seen + 10, children=kids)
            bl.pause(name)
            paused_at = time.monotonic_ns()
            # (six workers on 5 ms jobs: unpaused, dozens would start meanwhile)
            self.assertFalse(bl.join(0.25))
            late = [f for f in self.lines("S") if int(f[4]) > paused_at]
            self.assertEqual(late, [], f"started after pause({name!r}) returned")
            bl.resume(name)
            resumed_at = time.monotonic_ns()
            self.wait_lines("S", count=len(self.lines("S")) + 1, children=kids)
            first = min(int(f[4]) for f in self.lines("S") if int(f[4]) > resumed_at)
            self.assertLess(first - resumed_at, 5 * 10 ** 9)
        bl.pause()
        self.end(kids)
        self.assertEqual(bl.paused(), {None})

    def test_a_chain_runs_in_order_across_processes(self):
        bl = self.queue()
        ids, last = [], None
        for i in range(300):
            last = bl.enqueue("chain", i, after=last)
            ids.append(last)
        kids = self.children(3, 2)
        bl.wait(ids[-1], 120)
        self.end(kids)
        spans = self.spans("chain")
        self.assertEqual(sorted(spans, key=lambda i: spans[i][0]), ids)
        for a, b in zip(ids, ids[1:]):
            self.assertLess(spans[a][1], spans[b][0], f"job {b} began before job {a} ended")



@both_engines
class FlowDashboardTest(TempDirTest):
    """/api/stats shows the pauses and limits, with the jobs of each limited
    name in progress; POST /api/pause and /api/resume."""

    def test_pauses_and_limits_in_the_overview(self):
        bl = self.queue()
        release = threading.Event()
        self.addCleanup(release.set)
        bl.register_processor(gate({"hold": release}))
        bl.limit("x", concurrency=2, rate=(100, 60))
        bl.limit("y", concurrency=1)
        bl.pause("z")
        bl.pause()
        bl.resume()
        bl.pause("z")
        held = bl.enqueue("x", "hold")
        wait_until(lambda: bl.get_job(held).state == "inprogress")
        server = blero.new(self.target(), **self.settings()).serve_metrics()
        self.addCleanup(server.close)
        port, own = server.port, {"Origin": f"http://127.0.0.1:{server.port}"}
        code, _, body = http_request(port, "GET", "/api/stats")
        self.assertEqual(code, 200, body)
        stats = json.loads(body)
        self.assertEqual(stats["paused"], ["z"])
        self.assertEqual(stats["limits"], {
            "x": {"concurrency": 2, "rate": [100, 60.0], "running": 1},
            "y": {"concurrency": 1, "rate": None, "running": 0}})
        code, _, body = http_request(port, "POST", "/api/pause", {}, own)
        self.assertEqual((code, json.loads(body)), (200, {"paused": [None, "z"]}))
        code, _, body = http_request(port, "POST", "/api/resume", {"name": "z"}, own)
        self.assertEqual((code, json.loads(body)), (200, {"paused": [None]}))
        self.assertEqual(bl.paused(), {None})
        code, _, body = http_request(port, "POST", "/api/pause", {"name": ""}, own)
        self.assertEqual(code, 400, body)
        code, _, _ = http_request(port, "POST", "/api/resume", {})
        self.assertEqual(code, 403, "a resume from another origin was taken")
        self.assertEqual(bl.paused(), {None})



class HeldSuspectTest(TempDirTest):
    """A job handed back after a crash (a suspect, run alone before the
    rest) whose name is paused holds nothing else up, and runs once resumed."""

    def test_a_paused_suspect_holds_nothing_up(self):
        path = self.target()
        suspect, = kill_with_running_jobs(self, path, [3])
        bl = self.queue(start=False)
        bl.pause("doomed")
        bl.register_processor(lambda job: job.name)
        bl.start()
        self.assertEqual(bl.wait(bl.enqueue("other"), 10), "other")
        calls = []
        claim = bl._storage.finish_and_claim

        def counted(*args):
            calls.append(args)
            return claim(*args)
        bl._storage.finish_and_claim = counted
        self.assertFalse(bl.join(0.5))
        self.assertLess(len(calls), 10, "the workers spin on the paused suspect")
        self.assertEqual(bl.get_job(suspect).state, "pending")
        bl.resume("doomed")
        self.assertEqual(bl.wait(suspect, 10), "doomed")
        self.assertEqual(bl.get_job(suspect).attempt, 2)


# ---------------------------------------------------------------------------
# Transactional enqueue (connection=), and what only PostgreSQL does
# ---------------------------------------------------------------------------

class TransactionalEnqueueOnAFileTest(TempDirTest):
    """enqueue(..., connection=) with the application's own sqlite3
    connection on the queue file: the job exists iff the caller commits."""

    def test_a_committed_job_runs_and_a_rolled_back_one_never_does(self):
        bl = self.queue()
        ran = []
        bl.register_processor(lambda job: ran.append(job.data))
        app = sqlite3.connect(bl.path)
        self.addCleanup(app.close)
        app.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, what TEXT)")
        app.commit()
        app.execute("INSERT INTO orders (what) VALUES ('lost')")
        lost = bl.enqueue("mail", "lost", connection=app)
        app.rollback()
        self.assertIsNone(bl.get_job(lost))
        app.execute("INSERT INTO orders (what) VALUES ('kept')")
        kept = bl.enqueue_many([("mail", "kept"), ("mail", "also")], connection=app)
        self.assertEqual(bl.stats()["pending"], 0, "seen before the caller committed")
        app.commit()
        self.assertEqual([bl.wait(i, 10) for i in kept], [None, None])
        self.assertEqual(sorted(ran), ["also", "kept"])
        self.assertEqual(app.execute("SELECT what FROM orders").fetchall(), [("kept",)])

    def test_after_in_the_callers_transaction(self):
        bl = self.queue()
        first = bl.enqueue("x", "first", delay=0.2)
        app = sqlite3.connect(bl.path)
        self.addCleanup(app.close)
        app.execute("BEGIN")
        bl.enqueue("x", "lost", after=first, connection=app)
        app.rollback()
        with self.assertRaises(ValueError):     # the savepoint goes back; the rest stays
            bl.enqueue_many([("x", 1), {"name": "x", "after": first + 99}], connection=app)
        kept = bl.enqueue("x", "kept", after=first, connection=app)
        app.commit()
        self.assertEqual([j.data for j in bl.jobs()], ["first", "kept"])   # not "lost", nor 1
        self.assertEqual(bl.get_job(kept).after, (first,))
        bl.register_processor(lambda job: job.data)
        self.assertEqual(bl.wait(kept, 10), "kept")
        self.assertLess(bl.get_job(first).finished_at, bl.get_job(kept).started_at)

    def test_a_connection_to_another_file_is_refused(self):
        bl = self.queue()
        other = sqlite3.connect(os.path.join(self.dir, "other.db"))
        self.addCleanup(other.close)
        with self.assertRaisesRegex(ValueError, "not on the queue file"):
            bl.enqueue("x", connection=other)
        with self.assertRaisesRegex(ValueError, "sqlite3 connection"):
            bl.enqueue("x", connection=object())
        self.assertEqual(bl.stats()["pending"], 0)


@unittest.skipIf(POSTGRES_MISSING, POSTGRES_MISSING or "")
class PostgresTest(OnPostgres, ProcessTest):
    """What only the PostgreSQL engine does: liveness by advisory locks,
    sessions that end, NOTIFY, the caller's transaction, its errors."""

    def test_a_killed_process_jobs_are_taken_back_within_a_second_not_a_lease(self):
        lease = 30.0        # a lease would take 30 s: the server says at once
        bl = self.queue(lease=lease)
        held = bl.enqueue("hold", "hold")
        bl.stop()
        victim = self.spawn(MP_HOLD_CHILD, self.path, self.log, lease, 10 ** 9)
        self.wait_lines("S", children=[victim])
        bl = self.queue(lease=lease)
        started = threading.Event()
        bl.register_processor(lambda job: started.set())
        killed = time.monotonic()
        self.kill(victim)
        self.assertTrue(started.wait(10))
        self.assertLess(time.monotonic() - killed, lease / 3)
        bl.wait(held, 10)
        info = bl.get_job(held)
        self.assertEqual((info.state, info.attempt), ("complete", 2))

    def test_a_terminated_session_hands_its_jobs_over_and_its_owner_carries_on(self):
        bl = self.queue(lease=30.0)
        mine = f"blero[{os.getpid()}]"
        # The other owner's sessions carry another application_name.
        other = blero.new(POSTGRES + "?application_name=other", lease=30.0, **self.settings())
        other.start()
        self.addCleanup(other.stop, 5)
        running, late = threading.Event(), []

        def stubborn(job):
            running.set()
            job.cancelled.wait(30)
            late.append(job.cancelled.is_set())
            return "late"

        stubborn_id = bl.register_processor(stubborn, names="held")
        job_id = bl.enqueue("held")
        self.assertTrue(running.wait(10))
        bl.unregister_processor(stubborn_id)     # it ends after this try: others take the job
        with pg_connect() as admin:
            ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                  " WHERE application_name = %s", (mine,)).fetchall()[0][0]
        self.assertGreater(ended, 0)
        wait_until(lambda: late, message="the running try cancelled")
        self.assertEqual(late, [True])
        other.register_processor(lambda job: "taken over", names="held")
        self.assertEqual(other.wait(job_id, 20), "taken over")   # the late result is ignored
        # It reconnected as a new owner, and carries on.
        ran = []
        bl.register_processor(lambda job: ran.append(job.id), names="after")
        after = wait_until(lambda: _enqueued(bl, "after"), message="an enqueue after reconnecting")
        self.assertEqual(bl.wait(after, 20), None)
        self.assertEqual(ran, [after])
        self.assertEqual(bl.get_job(job_id).result, "taken over")

    def test_an_idle_process_is_woken_by_notify(self):
        idle = self.queue()
        started = []
        idle.register_processor(lambda job: started.append(time.monotonic()))
        idle.enqueue("warm")
        wait_until(lambda: started, message="the first job")
        producer = self.queue()     # another owner, another listener
        enqueued = time.monotonic()
        producer.enqueue("x")
        wait_until(lambda: len(started) == 2, message="the job woken by NOTIFY")
        self.assertLess(started[1] - enqueued, 5.0)   # (the figure is in bench_blero.py)

    def test_without_listen_an_idle_process_polls_at_most_a_second_apart(self):
        # As behind PgBouncer in transaction mode: LISTEN fails.
        listen, blero._PG_LISTEN = blero._PG_LISTEN, "LISTEN {channel} IN NO MODE"
        self.addCleanup(setattr, blero, "_PG_LISTEN", listen)
        with self.assertLogs("blero", logging.WARNING) as logs:
            idle = self.queue()
        self.assertIn("LISTEN failed", logs.output[0])
        started = []
        idle.register_processor(lambda job: started.append(time.monotonic()))
        blero._PG_LISTEN = listen
        producer = self.queue()
        for _ in range(3):
            enqueued = time.monotonic()
            job_id = producer.enqueue("x")
            idle.wait(job_id, 10)
            self.assertLess(started[-1] - enqueued, 5.0)

    def test_another_schema_is_another_queue(self):
        one, other = self.queue(), self.queue("other")
        one.enqueue("x")
        self.assertEqual(other.stats()["pending"], 0)
        self.assertEqual(self.queue(start=False).stats()["pending"], 1)   # the same schema

    def test_a_cancel_from_another_process_reaches_the_running_try(self):
        runner, other = self.queue(), self.queue()    # two owners, two sessions
        running, cancelled = threading.Event(), threading.Event()

        def run(job):
            running.set()
            if job.cancelled.wait(30):
                cancelled.set()

        runner.register_processor(run)
        job_id = runner.enqueue("long")
        self.assertTrue(running.wait(10))
        self.assertTrue(other.cancel(job_id))
        self.assertTrue(cancelled.wait(10))
        with self.assertRaises(blero.JobCancelled):
            runner.wait(job_id, 10)

    def test_a_job_enqueued_in_a_rolled_back_transaction_never_runs(self):
        bl = self.queue()
        ran = []
        bl.register_processor(lambda job: ran.append(job.data))
        with pg_connect() as app:
            app.execute("CREATE TABLE public.orders_%s (what TEXT)" % self.schema)
            self.addCleanup(pg_run, f"DROP TABLE public.orders_{self.schema}")
            app.autocommit = False
            app.execute(f"INSERT INTO public.orders_{self.schema} VALUES ('lost')")
            lost = bl.enqueue("mail", "lost", connection=app)
            app.rollback()
            app.execute(f"INSERT INTO public.orders_{self.schema} VALUES ('kept')")
            kept = bl.enqueue_many([("mail", "kept"), ("mail", "also")], connection=app)
            self.assertEqual(bl.stats()["pending"], 0, "seen before the caller committed")
            app.commit()
        self.assertEqual([bl.wait(i, 10) for i in kept], [None, None])
        self.assertIsNone(bl.get_job(lost))
        self.assertEqual(sorted(ran), ["also", "kept"])

    def test_a_connection_to_another_database_is_refused(self):
        bl = self.queue()
        with psycopg.connect(POSTGRES, dbname="postgres") as elsewhere:
            with self.assertRaisesRegex(ValueError, "'postgres'"):
                bl.enqueue("x", connection=elsewhere)
        with self.assertRaisesRegex(ValueError, "psycopg connection"):
            bl.enqueue("x", connection=sqlite3.connect(":memory:"))
        self.assertEqual(bl.stats()["pending"], 0)

    def test_a_schema_holding_other_tables_is_refused_and_nothing_created(self):
        schema = self.settings()["schema"]
        with pg_connect() as admin:
            admin.execute(f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".orders (id int)')
        bl = self.queue(start=False)
        with self.assertRaisesRegex(blero.BleroError, "not blero's.*orders"):
            bl.start()
        with pg_connect() as admin:
            tables = admin.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s",
                                   (schema,)).fetchall()
        self.assertEqual(tables, [("orders",)])

    def test_a_schema_written_by_a_newer_blero_is_refused_unchanged(self):
        self.queue().stop()
        pg_run(f'UPDATE "{self.schema}".blero_meta SET version = 99')
        with self.assertRaisesRegex(blero.BleroError, "newer blero"):
            self.queue(start=False).start()
        with pg_connect() as admin:
            self.assertEqual(admin.execute(f'SELECT version FROM "{self.schema}".blero_meta')
                             .fetchall(), [(99,)])

    def test_unreachable_servers_and_missing_databases_name_the_cause(self):
        for url, cause in (("postgresql://postgres@127.0.0.1:1/x", "Connection refused"),
                           (POSTGRES.rsplit("/", 1)[0] + "/no_such_database_here",
                            "no_such_database_here")):
            bl = blero.new(url, **self.settings())
            started = time.monotonic()
            with self.assertRaisesRegex(blero.BleroError, cause):
                bl.start()
            self.assertLess(time.monotonic() - started, 30)
        with self.assertRaises(blero.BleroError) as caught:
            blero.new("postgresql://u:secret@127.0.0.1:1/x").start()
        self.assertNotIn("secret", str(caught.exception))
        self.assertIn("u:***@127.0.0.1:1", str(caught.exception))

    def test_without_psycopg_start_names_the_package_to_install(self):
        out = run_child("""
            import sys, blero
            sys.modules["psycopg"] = None       # as if not installed
            try:
                blero.new(sys.argv[1]).start()
            except blero.BleroError as exc:
                print(exc)
        """, POSTGRES)
        self.assertIn('pip install "psycopg[binary]"', out.stdout, out.stderr)

    def test_the_command_line_operates_a_queue_on_the_server(self):
        bl = self.queue()
        failed = bl.enqueue("x", delay=3600)
        bl.cancel(failed)
        bl.enqueue("y", delay=3600)
        out = subprocess.run([sys.executable, "-m", "blero", "stats", "--json", *self.cli_queue()],
                             cwd=HERE, env=child_env(), capture_output=True, text=True, timeout=60)
        self.assertEqual((out.returncode, json.loads(out.stdout)),
                         (0, {"pending": 1, "inprogress": 0, "complete": 0, "failed": 0,
                              "cancelled": 1}), out.stderr)
        out = subprocess.run([sys.executable, "-m", "blero", "stats", "--db", POSTGRES,
                              "--schema", self.schema + "_none"], cwd=HERE, env=child_env(),
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 1)
        self.assertIn("no queue there", out.stderr)

    def test_settings_of_one_engine_are_refused_on_the_other(self):
        with self.assertRaisesRegex(ValueError, "schema"):
            blero.new(os.path.join(self.dir, "q.db"), schema="blero")
        for bad in ("1abc", "a-b", "x" * 64, ""):
            with self.assertRaisesRegex(ValueError, "schema"):
                blero.new(POSTGRES, schema=bad)
        with self.assertRaises(TypeError):
            blero.new(POSTGRES, schema=3)


def _enqueued(bl, name):
    """An enqueue that may meet a connection being replaced: its id, or None."""
    try:
        return bl.enqueue(name)
    except blero.BleroError:
        return None


# ---------------------------------------------------------------------------
# The live owners and their processors, on the dashboard of any process
# (issue 12)
# ---------------------------------------------------------------------------

# argv: target.  A queue with two `send` processors taking "email" jobs and a
# Mailer taking "news"; an email job with data "hold" runs until stdin ends,
# and then the queue stops.
_OWNER_CHILD = NEW_QUEUE + """
import sys, threading
ended = threading.Event()
def send(job):
    if job.data == "hold":
        job.progress(0.4)
        ended.wait(60)
class Mailer:
    def run(self, job):
        pass
bl = new_queue(sys.argv[1])
bl.register_processor(send, names="email")
bl.register_processor(send, names=["email"])
bl.register_processor(Mailer(), names="news")
bl.start()
print("ready", flush=True)
sys.stdin.read()
ended.set()
bl.stop()
"""


@both_engines
class LiveOwnersTest(TempDirTest):
    """Every process running a queue tells, in the queue, who it is and what
    its processors take, so that a dashboard served by any process shows it."""

    def get_stats(self, port):
        code, _, body = http_request(port, "GET", "/api/stats")
        self.assertEqual(code, 200, body)
        return json.loads(body)

    def test_a_dashboard_shows_every_live_process_and_its_processors(self):
        child = start_child(_OWNER_CHILD, self.target(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, child)
        self.assertEqual(child.stdout.readline().strip(), "ready")
        here = self.queue()
        here.register_processor(lambda job: None, names="local")
        server = here.serve_metrics()
        self.addCleanup(server.close)
        held = here.enqueue("email", "hold")
        wait_until(lambda: here.get_job(held).state == "inprogress", message="the child to run it")
        owners = wait_until(lambda: len(self.get_stats(server.port)["owners"]) == 2
                            and self.get_stats(server.port)["owners"], message="two owners")
        theirs, ours = sorted(owners, key=lambda o: o["pid"] != child.pid)
        self.assertEqual((theirs["pid"], theirs["host"], theirs["serving"], theirs["running"]),
                         (child.pid, socket.gethostname(), False, 1))
        self.assertEqual(theirs["processors"], [
            {"name": "send", "names": ["email"], "concurrency": 2},
            {"name": "Mailer.run", "names": ["news"], "concurrency": 1}])
        self.assertLessEqual(theirs["started_at"], theirs["last_seen"])
        self.assertLessEqual(theirs["last_seen"], time.time() + 1)
        self.assertEqual((ours["pid"], ours["serving"], ours["running"]), (os.getpid(), True, 0))
        self.assertEqual(ours["processors"], [{"name": "<lambda>", "names": ["local"],
                                               "concurrency": 1}])
        # A processor or task registered, or removed, is told at once, not
        # at the next heartbeat; a task with its concurrency.
        more = here.register_processor(self.get_stats, names=["a", "b"])
        here.task(name="resize", concurrency=3)(len)

        def ours_now():
            return [p for o in self.get_stats(server.port)["owners"] if o["serving"]
                    for p in o["processors"]]
        wait_until(lambda: ours_now() == [
            {"name": "<lambda>", "names": ["local"], "concurrency": 1},
            {"name": "LiveOwnersTest.get_stats", "names": ["a", "b"], "concurrency": 1},
            {"name": "task", "names": ["resize"], "concurrency": 3}], message="the new ones")
        here.unregister_processor(more)
        wait_until(lambda: len(ours_now()) == 2, message="the processor gone")
        # A viewer that runs nothing shows the same, and a process that stops is gone.
        viewer = blero.new(self.target(), **self.settings())
        elsewhere = viewer.serve_metrics()
        self.addCleanup(elsewhere.close)
        self.assertEqual({o["pid"] for o in self.get_stats(elsewhere.port)["owners"]},
                         {child.pid, os.getpid()})
        child.stdin.close()
        self.assertEqual(child.wait(30), 0)
        wait_until(lambda: [o["pid"] for o in self.get_stats(elsewhere.port)["owners"]]
                   == [os.getpid()], message="the stopped process to go")
        self.assertEqual(here.get_job(held).state, "complete")

    def test_jobs_no_live_process_takes_are_shown_by_name(self):
        bl = self.queue()
        bl.register_processor(lambda job: None, names="report")
        server = bl.serve_metrics()
        self.addCleanup(server.close)
        for name in ("ad", "ad", "reprot"):
            bl.enqueue(name, delay=3600)
        bl.enqueue("report", delay=3600)
        wait_until(lambda: self.get_stats(server.port)["untaken"] == {"ad": 2, "reprot": 1},
                   message="the untaken names")
        bl.register_processor(lambda job: None, names="ad")
        wait_until(lambda: self.get_stats(server.port)["untaken"] == {"reprot": 1},
                   message="ad taken now")
        bl.stop()
        viewer = blero.new(self.target(), **self.settings())   # no process runs the queue: nothing takes any
        elsewhere = viewer.serve_metrics()
        self.addCleanup(elsewhere.close)
        stats = self.get_stats(elsewhere.port)
        self.assertEqual((stats["owners"], stats["untaken"]),
                         ([], {"ad": 2, "reprot": 1, "report": 1}))


class OwnersOfAnOlderFileTest(ProcessTest):
    """A file of schema 2 is upgraded to tell owners' hosts and processors,
    and is inspected as it is where it cannot be upgraded."""

    read_only_copy = ReadOnlyStorageTest.read_only_copy

    def v2_file(self):
        with_old_blero(self, V2_COMMIT, """
            import sys, blero
            bl = blero.new(sys.argv[1]).start()
            bl.enqueue("ad", "x")
            bl.stop()
            """, self.path)
        db = sqlite3.connect(self.path)
        try:
            self.assertEqual(db.execute("PRAGMA user_version").fetchall(), [(2,)])
        finally:
            db.close()

    def served_stats(self, path):
        viewer = blero.new(path)
        server = viewer.serve_metrics()
        self.addCleanup(server.close)
        code, _, body = http_request(server.port, "GET", "/api/stats")
        self.assertEqual(code, 200, body)
        return json.loads(body)

    def test_a_file_of_schema_2_is_shown_read_only_and_upgraded_where_it_can_be(self):
        self.v2_file()
        stats = self.served_stats(self.read_only_copy(self.path))
        self.assertEqual((stats["owners"], stats["untaken"]), ([], {"ad": 1}))
        self.assertTrue(stats["queue"]["read_only"])
        bl = blero.new(self.path).start()
        self.addCleanup(bl.stop)
        bl.register_processor(lambda job: None, names="report")
        stats = self.served_stats(self.path)
        self.assertEqual([(o["pid"], o["processors"]) for o in stats["owners"]],
                         [(os.getpid(), [{"name": "<lambda>", "names": ["report"],
                                          "concurrency": 1}])])
        self.assertEqual(stats["untaken"], {"ad": 1})
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA user_version").fetchall(),
                         [(blero._SCHEMA_VERSION,)])


@unittest.skipUnless(POSIX and find_chromium(), "Chromium is not installed")
class DashboardOfProcessesInChromiumTest(TempDirTest):
    """The page, rendered, with another process running the queue; and its
    look at a desktop's size and at a phone's (screenshots go to
    $BLERO_SCREENSHOTS when it is set, to be looked at)."""

    def test_the_page_shows_another_processes_processors_at_any_width(self):
        child = start_child(_OWNER_CHILD, self.target(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
        self.addCleanup(stop_child, child)
        self.assertEqual(child.stdout.readline().strip(), "ready")
        with blero.new(self.target()) as producer:
            held = producer.enqueue("email", "hold")
            producer.enqueue("ad", "a typo's job")
            producer.every(3600, "report", key="hourly", delay=3600)
        viewer = blero.new(self.target())
        wait_until(lambda: viewer.get_job(held).state == "inprogress", message="the child to run it")
        server = viewer.serve_metrics()
        self.addCleanup(server.close)
        shots = os.environ.get("BLERO_SCREENSHOTS") or self.dir
        text = "document.getElementById('{}').innerText"
        for width, height in ((1280, 900), (390, 844)):
            with self.subTest(width=width):
                browser = DevTools(self, server.url, width, height)
                browser.wait_for(text.format("owners") + f".includes('{child.pid}')",
                                 "the other process")
                owners = browser.evaluate(text.format("owners"))
                self.assertIn(socket.gethostname(), owners)
                for shown in ("send \u00d72 takes email", "Mailer.run \u00d71 takes news"):
                    self.assertIn(shown, " ".join(owners.split()))
                self.assertIn("1 live", browser.evaluate(text.format("n-owners")))
                self.assertRegex(browser.evaluate(text.format("untaken")),
                                 r"^jobs waiting for a processor: ad \(1\)(, report \(1\))?$")
                schedule = browser.evaluate(text.format("schedules"))
                self.assertIn("hourly", schedule)
                self.assertIn("every 1 h", schedule)
                browser.wait_for(text.format("inprogress") + ".includes('40%')", "its progress")
                self.assertEqual(browser.evaluate(
                    "document.querySelector('#inprogress .bar i').style.width"), "40%")
                self.assertLessEqual(browser.evaluate("document.documentElement.scrollWidth"),
                                     width, "the page is wider than the screen")
                sideways = browser.evaluate(
                    "[...document.querySelectorAll('.scroll')].filter(b => b.offsetParent"
                    " && b.scrollWidth > b.clientWidth + 1).map(b => b.firstChild.id)")
                self.assertEqual(sideways, [], "tables that do not fit: they scroll sideways")
                browser.screenshot(os.path.join(shots, f"dashboard-{width}.png"))
                browser.close()


@unittest.skipIf(POSTGRES_MISSING, POSTGRES_MISSING)
class OwnersOfAnOlderSchemaOnPostgresTest(OnPostgres, TempDirTest):
    """A PostgreSQL schema of version 1 is upgraded, when first opened, to
    tell owners' hosts and processors."""

    def test_a_schema_of_version_1_is_upgraded_when_first_looked_at(self):
        with_old_blero(self, PG_V1_COMMIT, """
            import sys, blero
            bl = blero.new(sys.argv[1], schema=sys.argv[2]).start()
            bl.enqueue("ad", "x")
            bl.stop()
            """, self.target(), self.schema)
        meta = f'SELECT version FROM "{self.schema}".blero_meta'
        with pg_connect() as conn:
            self.assertEqual(conn.execute(meta).fetchall(), [(1,)])
        viewer = self.queue(start=False)
        server = viewer.serve_metrics()
        self.addCleanup(server.close)
        code, _, body = http_request(server.port, "GET", "/api/stats")
        self.assertEqual(code, 200, body)
        self.assertEqual((json.loads(body)["owners"], json.loads(body)["untaken"]),
                         ([], {"ad": 1}))
        with pg_connect() as conn:
            self.assertEqual(conn.execute(meta).fetchall(), [(blero._PG_SCHEMA_VERSION,)])
        bl = self.queue()
        bl.register_processor(lambda job: None, names="ad")
        self.assertTrue(bl.join(10))
        owners = json.loads(http_request(server.port, "GET", "/api/stats")[2])["owners"]
        self.assertEqual([(o["host"], o["processors"]) for o in owners],
                         [(socket.gethostname(), [{"name": "<lambda>", "names": ["ad"],
                                                   "concurrency": 1}])])


@unittest.skipUnless(POSIX and find_chromium(), "Chromium is not installed")
class DashboardFlowInChromiumTest(TempDirTest):
    """Pauses and limits on the rendered page, and its Pause/Resume buttons."""

    def test_pause_and_resume_from_the_page(self):
        bl = self.queue()
        bl.limit("resize", concurrency=2, rate=(10, 60))
        bl.pause("report")
        server = bl.serve_metrics()
        self.addCleanup(server.close)
        browser = DevTools(self, server.url)
        rows = ("[...document.querySelectorAll('#flow tr[data-id]')]"
                ".map(r => [...r.cells].map(c => c.innerText.trim()))")
        browser.wait_for(rows + ".length === 2", "the paused and limited names")
        self.assertEqual(browser.evaluate(rows), [
            ["report", "paused", "", "", "", "Resume"],
            ["resize", "", "0", "2", "10 per 1 min", "Pause"]])
        browser.evaluate("document.querySelector('#flow tr[data-id=\"report\"] button').click()")
        wait_until(lambda: bl.paused() == set(), message="report resumed from the page")
        browser.wait_for(rows + ".length === 1", "the page to follow")
        browser.evaluate("document.getElementById('p-name').value = 'mail';"
                         "document.getElementById('pause-one').click()")
        wait_until(lambda: bl.paused() == {"mail"}, message="mail paused from the form")
        browser.evaluate("document.getElementById('pause-all').click()")
        wait_until(lambda: bl.paused() == {None, "mail"}, message="everything paused")
        browser.wait_for("document.getElementById('all-paused').innerText"
                         " === 'everything is paused'", "the page to say so")
        browser.evaluate("document.getElementById('pause-all').click()")
        wait_until(lambda: bl.paused() == set(), message="everything resumed")


# ---------------------------------------------------------------------------
# Cron schedules and schedules() (issue 11)
# ---------------------------------------------------------------------------

def cron_times(expr, after, tz, n):
    """The next `n` due times of `expr` after ISO time `after` in zone `tz`,
    as ISO strings with their offsets."""
    zone = blero._zone(tz)
    t = datetime.datetime.fromisoformat(after).timestamp()
    out = []
    for _ in range(n):
        t = blero._cron_next(expr, t, zone)
        out.append(datetime.datetime.fromtimestamp(t, zone).isoformat(timespec="minutes"))
    return out


# (expression, zone, after, the next due times): worked out by hand from the
# calendars; DST in 2026: Europe/Berlin 29 Mar 02:00 -> 03:00 and 25 Oct
# 03:00 -> 02:00; America/New_York 8 Mar 02:00 -> 03:00 and 1 Nov 02:00 -> 01:00.
CRON_ANSWERS = [
    # a time the spring change skips runs at the first minute after the gap
    ("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00+01:00",
     ["2026-03-29T03:00+02:00", "2026-03-30T02:30+02:00"]),
    ("0 * * * *", "Europe/Berlin", "2026-03-29T01:30+01:00",
     ["2026-03-29T03:00+02:00", "2026-03-29T04:00+02:00"]),
    ("*/20 2 * * *", "Europe/Berlin", "2026-03-29T00:00+01:00",     # all skipped: one run
     ["2026-03-29T03:00+02:00", "2026-03-30T02:00+02:00"]),
    # a time the autumn change repeats runs once, at its first occurrence
    ("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00+02:00",
     ["2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00"]),
    ("0 * * * *", "Europe/Berlin", "2026-10-25T01:30+02:00",
     ["2026-10-25T02:00+02:00", "2026-10-25T03:00+01:00", "2026-10-25T04:00+01:00"]),
    ("0 * * * *", "Europe/Berlin", "2026-10-25T02:10+01:00",       # in the second pass
     ["2026-10-25T03:00+01:00"]),
    ("30 2 * * *", "America/New_York", "2026-03-07T12:00-05:00",
     ["2026-03-08T03:00-04:00", "2026-03-09T02:30-04:00"]),
    ("15 2 * * SUN", "America/New_York", "2026-03-01T03:00-05:00",
     ["2026-03-08T03:00-04:00", "2026-03-15T02:15-04:00"]),
    ("30 1 * * *", "America/New_York", "2026-10-31T12:00-04:00",
     ["2026-11-01T01:30-04:00", "2026-11-02T01:30-05:00"]),
    # leap days, and 2100, which has none
    ("0 0 29 2 *", "UTC", "2026-01-01T00:00+00:00",
     ["2028-02-29T00:00+00:00", "2032-02-29T00:00+00:00"]),
    ("0 12 29 FEB *", "UTC", "2097-01-01T00:00+00:00", ["2104-02-29T12:00+00:00"]),
    ("0 0 28-29 2 *", "UTC", "2027-02-28T00:00+00:00",
     ["2028-02-28T00:00+00:00", "2028-02-29T00:00+00:00", "2029-02-28T00:00+00:00"]),
    # day of month and day of week both restricted: either matches (13 Apr
    # 2026 is a Monday; the Fridays are 3, 10, 17, 24, 1 May)
    ("0 0 13 * 5", "UTC", "2026-04-01T00:00+00:00",
     ["2026-04-03T00:00+00:00", "2026-04-10T00:00+00:00", "2026-04-13T00:00+00:00",
      "2026-04-17T00:00+00:00", "2026-04-24T00:00+00:00", "2026-05-01T00:00+00:00"]),
    # ... but a day field starting with * restricts nothing: both must match
    ("0 0 */10 * MON", "UTC", "2026-04-01T00:00+00:00",
     ["2026-05-11T00:00+00:00", "2026-06-01T00:00+00:00"]),
    ("0 0 * * 7", "UTC", "2026-04-01T00:00+00:00", ["2026-04-05T00:00+00:00"]),
    ("0 9 * jan-MAR Mon-Fri", "UTC", "2026-03-31T09:00+00:00",
     ["2027-01-01T09:00+00:00", "2027-01-04T09:00+00:00"]),
    ("10-50/20 8-18/5 * * *", "UTC", "2026-04-01T00:00+00:00",
     ["2026-04-01T08:10+00:00", "2026-04-01T08:30+00:00", "2026-04-01T08:50+00:00",
      "2026-04-01T13:10+00:00"]),
    ("0,30 0 1,15 * *", "UTC", "2026-04-01T00:00+00:00",
     ["2026-04-01T00:30+00:00", "2026-04-15T00:00+00:00"]),
    ("* * * * *", "UTC", "2026-04-01T12:00+00:00",        # strictly after
     ["2026-04-01T12:01+00:00", "2026-04-01T12:02+00:00"]),
    ("@hourly", "UTC", "2026-04-01T12:00+00:00", ["2026-04-01T13:00+00:00"]),
    ("@daily", "Asia/Kolkata", "2026-04-01T12:00+05:30", ["2026-04-02T00:00+05:30"]),
    ("@midnight", "UTC", "2026-04-01T12:00+00:00", ["2026-04-02T00:00+00:00"]),
    ("@weekly", "UTC", "2026-04-01T12:00+00:00", ["2026-04-05T00:00+00:00"]),
    ("@monthly", "UTC", "2026-01-31T00:00+00:00", ["2026-02-01T00:00+00:00"]),
    ("@yearly", "UTC", "2026-04-01T12:00+00:00", ["2027-01-01T00:00+00:00"]),
    ("@annually", "+05:30", "2026-04-01T12:00+05:30", ["2027-01-01T00:00+05:30"]),
]

CRON_REFUSED = [   # (expression, the field the error names)
    ("61 * * * *", "minute"), ("-1 * * * *", "minute"), ("*/0 * * * *", "minute"),
    ("5-1 * * * *", "minute"), ("a * * * *", "minute"), ("5/15 * * * *", "minute"),
    ("1,,2 * * * *", "minute"), ("1.5 * * * *", "minute"),
    ("* 24 * * *", "hour"), ("* */x * * *", "hour"),
    ("* * 0 * *", "day of month"), ("* * 32 * *", "day of month"),
    ("* * * 13 *", "month"), ("* * * FOO *", "month"), ("* * * DEC-JAN *", "month"),
    ("* * * * 8", "day of week"), ("* * * * MON-", "day of week"),
    ("* * * * -MON", "day of week"), ("* * * * SUNDAY", "day of week"),
    ("* * * * * *", "fields"), ("* * * *", "fields"), ("", "empty"), ("   ", "empty"),
    ("0 0 31 2 *", "never"), ("0 0 30 2 *", "never"), ("0 0 31 4,6,9,11 *", "never"),
    ("@reboot", "alias"), ("@every 5m", "alias"),
]


class CronTimesTest(unittest.TestCase):
    """The due times of cron expressions, against the table of known answers
    (no queue: the engines' twin would compute the same times again)."""

    def test_next_due_times_match_the_table_of_known_answers(self):
        for expr, tz, after, expected in CRON_ANSWERS:
            with self.subTest(expr=expr, tz=tz, after=after):
                self.assertEqual(cron_times(expr, after, tz, len(expected)), expected)

    def test_local_time_is_the_default_zone(self):
        # A process whose local time is New York's, tz=None: the same
        # answers as the zone's own, DST days included (one process works
        # out every row of New York's).
        code = """
            import datetime, json, sys, blero
            for after, expr in json.loads(sys.argv[1]):
                t = datetime.datetime.fromisoformat(after).timestamp()
                times = []
                for _ in range(2):
                    t = blero._cron_next(expr, t, None)
                    times.append(datetime.datetime.fromtimestamp(t).isoformat(timespec="minutes"))
                print(" ".join(times))
        """
        rows = [(expr, after, expected) for expr, tz, after, expected in CRON_ANSWERS
                if tz == "America/New_York"]
        self.assertTrue(rows)
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code),
                              json.dumps([(after, expr) for expr, after, _ in rows])],
                             cwd=HERE, env=dict(child_env(), TZ="America/New_York"),
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        lines = out.stdout.splitlines()
        self.assertEqual(len(lines), len(rows), out.stdout)
        for (expr, after, expected), line in zip(rows, lines):
            naive = [datetime.datetime.fromisoformat(e).replace(tzinfo=None).isoformat(
                timespec="minutes") for e in expected]
            self.assertEqual(line.split()[:len(naive)], naive, expr)


@both_engines
class CronTest(TempDirTest):
    """cron(): the grammar and the zones it takes, and schedules() /
    unschedule() for both kinds (the due times themselves: CronTimesTest)."""

    def test_invalid_expressions_name_the_field_and_store_nothing(self):
        bl = self.queue()
        for expr, field in CRON_REFUSED:
            with self.subTest(expr=expr):
                with self.assertRaises(ValueError) as cm:
                    bl.cron(expr, "tick")
                self.assertIn(field, str(cm.exception))
        for bad in (None, 5, ["* * * * *"]):
            with self.assertRaises(TypeError):
                bl.cron(bad, "tick")
        self.assertEqual(bl.schedules(), [], "a refused cron() stores nothing")

    def test_zones(self):
        bl = self.queue()
        for tz in ("Nowhere/Atlantis", "Europe/Berlinn", "", "../../etc/passwd"):
            with self.subTest(tz=tz):
                with self.assertRaises(ValueError) as cm:
                    bl.cron("0 * * * *", "tick", tz=tz)
                self.assertIn("tz", str(cm.exception))
        with self.assertRaises(TypeError):
            bl.cron("0 * * * *", "tick", tz=5)
        self.assertEqual(bl.schedules(), [])
        import zoneinfo
        given = {"a": "Europe/Berlin", "b": zoneinfo.ZoneInfo("America/New_York"),
                 "c": datetime.timezone.utc, "d": datetime.timezone(datetime.timedelta(hours=-3)),
                 "e": None}
        for key, tz in given.items():
            self.assertEqual(bl.cron("0 12 * * *", "tick", key=key, tz=tz), key)
        found = {s.key: s for s in bl.schedules()}
        self.assertEqual({k: s.tz for k, s in found.items()},
                         {"a": "Europe/Berlin", "b": "America/New_York", "c": "+00:00",
                          "d": "-03:00", "e": None})
        for key, tz in given.items():
            due = datetime.datetime.fromtimestamp(found[key].next_due, blero._zone(found[key].tz))
            self.assertEqual((due.hour, due.minute, due.second), (12, 0, 0), key)
            self.assertLess(found[key].next_due - time.time(), 86400 + 3600)

    def test_schedules_lists_both_kinds(self):
        bl = self.queue()
        bl.stop()       # a stopped queue whose file exists
        self.assertEqual(bl.every(30, "beat", {"n": 1}), "beat")
        before = time.time()
        self.assertEqual(bl.cron("*/5 * * * *", "report", [1, 2], key="r", tz="UTC",
                                 priority=3, retries=0, timeout=5), "r")
        s = {s.key: s for s in bl.schedules()}
        self.assertEqual(list(s), ["beat", "r"], "by key")
        self.assertIsInstance(s["r"], blero.ScheduleInfo)
        self.assertEqual(blero.ScheduleInfo._fields, ("key", "name", "data", "interval", "cron",
                                                      "tz", "next_due", "job_id"))
        beat, report = s["beat"], s["r"]
        self.assertEqual((beat.name, beat.data, beat.interval, beat.cron, beat.tz, beat.job_id),
                         ("beat", {"n": 1}, 30.0, None, None, None))
        self.assertEqual((report.name, report.data, report.interval, report.cron, report.tz,
                          report.job_id), ("report", [1, 2], None, "*/5 * * * *", "UTC", None))
        self.assertEqual(report.next_due % 300, 0)
        self.assertTrue(before < report.next_due <= before + 300)
        self.assertLessEqual(beat.next_due, time.time(), "an every schedule is due at once")
        with self.assertRaises(TypeError):
            bl.cron("* * * * *", "x", delay=5)      # cron says when: no delay nor run_at
        ran = threading.Event()
        bl.register_processor(lambda job: ran.set(), names="beat")
        bl.start()
        self.assertTrue(ran.wait(10))
        last = wait_until(lambda: bl.schedules()[0].job_id, message="the first run's id")
        self.assertEqual(bl.get_job(last).name, "beat")
        self.assertGreater(bl.schedules()[0].next_due, beat.next_due)
        self.assertTrue(bl.unschedule("r"))
        self.assertFalse(bl.unschedule("r"))
        self.assertTrue(bl.unschedule("beat"))
        self.assertEqual(bl.schedules(), [])

    def test_cron_again_keeps_its_slot_and_an_update_takes_effect(self):
        bl = self.queue()
        bl.stop()       # no clock: a due schedule stays due while it is looked at
        bl.cron("0 3 * * *", "nightly", tz="UTC")
        first = bl.schedules()[0]
        bl.cron("0 3 * * *", "nightly", {"v": 2}, tz="UTC")       # as each start of a program does
        again = bl.schedules()[0]
        self.assertEqual((again.next_due, again.data), (first.next_due, {"v": 2}))
        bl.cron("30 4 * * *", "nightly", tz="UTC")
        changed = bl.schedules()[0]
        self.assertEqual(datetime.datetime.fromtimestamp(changed.next_due, datetime.timezone.utc)
                         .strftime("%H:%M"), "04:30")
        bl.cron("30 4 * * *", "nightly", tz="Asia/Tokyo")         # same times, another zone
        self.assertEqual(datetime.datetime.fromtimestamp(
            bl.schedules()[0].next_due, blero._zone("Asia/Tokyo")).strftime("%H:%M"), "04:30")
        bl.every(60, "nightly")                                   # now an every schedule
        now = bl.schedules()[0]
        self.assertEqual((now.interval, now.cron, now.tz), (60.0, None, None))
        self.assertLessEqual(now.next_due, time.time())
        bl.cron("@hourly", "nightly")                             # and back
        back = bl.schedules()[0]
        self.assertEqual((back.interval, back.cron), (None, "@hourly"))
        self.assertEqual(back.next_due % 3600, 0)     # (every zone on a whole hour? most)

    def test_schedules_and_cron_on_a_stopped_queue(self):
        bl = self.queue()
        bl.stop()
        self.assertEqual(bl.cron("@daily", "d"), "d")
        self.assertEqual([s.key for s in bl.schedules()], ["d"])
        self.assertTrue(bl.unschedule("d"))


# argv: db, clock file, log.  A process on a moved clock: blero's time.time()
# is the real one plus the offset in the clock file, which the test sets
# (monotonic time stays real).
# It runs the cron schedule "tick" ("* * * * *", set again at each start).
CRON_CLOCK_CHILD = """
import mmap, struct, types
db, clock_path, log_path = sys.argv[1:4]
clock_file = open(clock_path, "r+b")
clock = mmap.mmap(clock_file.fileno(), 8)
moved = types.ModuleType("time")
moved.__dict__.update(time.__dict__)
moved.time = lambda: time.time() + struct.unpack("d", clock[:8])[0]
blero.time = moved
log = open_log(log_path)

def tick(job):
    log("T", job.id, PID, moved.time())

bl = new_queue(db)
bl.register_processor(tick, names="tick")
bl.start()
bl.cron("* * * * *", "tick", tz="UTC")
log("ready", PID)
sys.stdin.read()
bl.stop()
"""


@both_engines
class CronAcrossProcessesTest(ProcessTest):
    """Two processes running one cron schedule, on a clock the test moves
    a minute at a time: each due time runs exactly once, across a kill -9
    and a restart too; missed times collapse into one run."""

    T0 = 1_900_000_020.0 - 1_900_000_020.0 % 60 + 60     # a whole minute

    def set_clock(self, t):
        """Make it `t` now on the children's clock, which runs on from there."""
        with open(self.clock, "r+b") as f:
            f.write(struct.pack("d", t - time.time()))

    def child(self):
        self._children += 1
        out = os.path.join(self.dir, f"child{self._children}.out")
        with open(out, "w") as f:
            p = start_child(mp_child(CRON_CLOCK_CHILD), self.path, self.clock, self.log,
                            stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT,
                            text=True)
        p.out_path = out
        self.addCleanup(lambda: (p.poll() is None and p.kill(), p.wait(), p.stdin.close()))
        wait_until(lambda: [f for f in self.lines("ready") if int(f[1]) == p.pid] or
                   p.poll() is not None, timeout=30, message="the child ready")
        if p.poll() is not None:
            self.fail(f"child exited:\n{self.output(p)}")
        return p

    def runs(self):
        """{slot (minutes from T0): [(job id, pid), ...]} from the processors' own log."""
        slots = collections.defaultdict(list)
        for f in self.lines("T"):
            slots[int((float(f[3]) - self.T0) // 60)].append((int(f[1]), int(f[2])))
        return slots

    def advance_through(self, minutes):
        """Move the clock into each minute in turn, waiting for its run."""
        for m in minutes:
            self.set_clock(self.T0 + 60 * m + 1)
            wait_until(lambda: m in self.runs(), timeout=20, message=f"the run of minute {m}")

    def test_each_due_time_runs_exactly_once_across_processes_and_restarts(self):
        self.clock = os.path.join(self.dir, "clock")
        with open(self.clock, "wb") as f:
            f.write(struct.pack("d", 0.0))
        self.set_clock(self.T0 - 55)
        self.create()
        look = self.queue(start=False)
        a, b = self.child(), self.child()
        self.assertEqual(look.schedules()[0].next_due, self.T0)
        self.advance_through(range(0, 30))
        wait_until(lambda: look.stats()["inprogress"] == 0, message="the last run recorded")
        self.kill(a)                        # a kill -9, and a new process in its place
        a = self.child()                    # (it calls cron() again: no slot repeated)
        self.advance_through(range(30, 50))
        # Ten minutes pass at once (downtime, say): one run for all of them.
        self.set_clock(self.T0 + 60 * 60 + 1)
        wait_until(lambda: 60 in self.runs(), timeout=20, message="the collapsed run")
        self.advance_through(range(61, 64))
        for p in (a, b):
            p.stdin.close()
            self.finish(p)
        runs = self.runs()
        self.assertEqual(sorted(runs), list(range(50)) + list(range(60, 64)))
        self.assertEqual({m: r for m, r in runs.items() if len({i for i, _ in r}) != 1}, {},
                         "a due time had more than one run")
        jobs = look.jobs(name="tick", limit=None)
        self.assertEqual(len(jobs), 54, "one job per due time")
        self.assertEqual({j.state for j in jobs}, {"complete"})
        self.assertEqual(look.schedules()[0].next_due, self.T0 + 64 * 60)


@both_engines
class SchedulesShownTest(TempDirTest):
    """python -m blero schedules [--json] and the dashboard list the
    schedules with their next due times."""

    def make(self):
        bl = self.queue()
        bl.every(90, "beat", {"n": 1})
        bl.cron("0 3 * * MON", "weekly", key="w", tz="Europe/Berlin")
        bl.cron("@hourly", "hourly", object)       # data JSON cannot carry
        bl.stop()
        return bl

    def test_command_line(self):
        bl = self.make()
        out = run_cli("schedules", *self.cli_queue(), "--json")
        self.assertEqual((out.returncode, out.stderr), (0, ""))
        listed = json.loads(out.stdout)
        self.assertEqual([s["key"] for s in listed], ["beat", "hourly", "w"])
        for s, info in zip(listed, bl.schedules()):
            self.assertEqual(set(s), set(blero.ScheduleInfo._fields))
            self.assertEqual(s["next_due"], info.next_due)
        self.assertEqual((listed[0]["data"], listed[0]["interval"], listed[0]["cron"]),
                         ({"n": 1}, 90.0, None))
        self.assertEqual(listed[1]["data"], repr(object))
        self.assertEqual((listed[2]["cron"], listed[2]["tz"], listed[2]["interval"]),
                         ("0 3 * * MON", "Europe/Berlin", None))
        text = run_cli("schedules", *self.cli_queue(), "--serializer", "json")
        self.assertEqual(text.returncode, 0, text.stderr)
        lines = text.stdout.splitlines()
        self.assertEqual(len(lines), 3)
        self.assertIn("every 90 s", lines[0])
        self.assertIn("cron '0 3 * * MON' Europe/Berlin", lines[2])
        due = datetime.datetime.fromtimestamp(listed[2]["next_due"], blero._zone("Europe/Berlin"))
        self.assertIn(f"next {due.isoformat(sep=' ', timespec='seconds')}", lines[2])
        self.assertIn("schedules", run_cli("--help").stdout)
        self.assertEqual(run_cli("schedules", *self.cli_queue("missing.db")).returncode, 1)

    def test_dashboard(self):
        bl = self.make()
        server = bl.serve_metrics()
        self.addCleanup(server.close)
        status, _, body = http_request(server.port, "GET", "/api/stats")
        self.assertEqual(status, 200)
        shown = json.loads(body)["schedules"]
        self.assertEqual([(s["key"], s["next_due"]) for s in shown],
                         [(s.key, s.next_due) for s in bl.schedules()])
        status, _, page = http_request(server.port, "GET", "/")
        self.assertIn(b'id="schedules"', page)


# What a file of the last blero.py of schema 2 (V2_COMMIT) holds here.
V2_SCHEDULE_CHILD = """
import sys, blero
bl = blero.new(sys.argv[1])
bl.register_processor(lambda job: job.data * 2, names="double")
bl.start()
bl.wait(bl.enqueue("double", 21), 30)
bl.enqueue("later", "x")
bl.every(3600, "hourly", {"n": 1})
bl.stop()
"""


class ProgressCronUpgradeTest(ProcessTest):
    """A file of schema 2 (before progress, checkpoints and cron) is
    upgraded in place at its first start, and inspected as it is where it
    cannot be."""

    def v2_file(self):
        with_old_blero(self, V2_COMMIT, V2_SCHEDULE_CHILD, self.path)
        self.assertEqual(UpgradeTest.layout(self, self.path), (2, 2))

    def check(self, q):
        self.assertEqual([(j.name, j.state, j.progress) for j in q.jobs(name="double")],
                         [("double", "complete", None)])
        self.assertEqual(q.wait(1), 42)
        (hourly,) = q.schedules()
        self.assertEqual((hourly.key, hourly.data, hourly.interval, hourly.cron, hourly.tz),
                         ("hourly", {"n": 1}, 3600.0, None, None))

    def test_upgraded_at_its_first_start(self):
        self.v2_file()
        with blero.new(self.path) as bl:
            self.check(bl)
            bl.cron("@daily", "daily")

            def run(job):
                job.checkpoint("half")
                job.progress(0.5)
                return job.data * 2
            bl.register_processor(run, names="later")
            self.assertEqual(bl.wait(2, 10), "xx")
            self.assertEqual(bl.get_job(2).progress, 0.5)
        self.assertEqual(UpgradeTest.layout(self, self.path), (blero._SCHEMA_VERSION, 2))
        self.assertEqual([s.key for s in blero.new(self.path).schedules()], ["daily", "hourly"])

    def test_inspected_as_it_is_on_read_only_storage(self):
        self.v2_file()
        path = ReadOnlyStorageTest.read_only_copy(self, self.path)
        before = dir_state(os.path.dirname(path))
        q = blero.new(path)
        self.check(q)
        self.assertEqual(dir_state(os.path.dirname(path)), before, "the read-only copy changed")


# ---------------------------------------------------------------------------
# Flow control: Snooze, progress, checkpoints (issue 11)
# ---------------------------------------------------------------------------

@both_engines
class FlowTest(TempDirTest):
    """Snooze(seconds), job.progress(value) and job.checkpoint(value)."""

    def test_snooze_puts_the_job_back_without_using_up_a_try(self):
        bl = self.queue(on_failed=lambda job, exc: failed.append(job.id))
        failed, tries = [], []

        def run(job):
            tries.append((job.attempt, job.max_attempts, time.monotonic()))
            if job.attempt < 3:
                raise blero.Snooze(0.3 if job.attempt == 1 else datetime.timedelta(0))
            return "awake"

        bl.register_processor(run)
        job_id = bl.enqueue("nap", retries=0)       # one try only, yet three run
        self.assertEqual(bl.wait(job_id, 20), "awake")
        self.assertEqual([t[:2] for t in tries], [(1, 1), (2, 2), (3, 3)])
        self.assertGreaterEqual(tries[1][2] - tries[0][2], 0.3 - 0.01, "due after its seconds")
        info = bl.get_job(job_id)
        self.assertEqual((info.state, info.attempt, info.max_attempts, info.error),
                         ("complete", 3, 3, None))
        self.assertEqual(failed, [])
        self.assertIn('outcome="retried"} 0', bl.metrics_text(), "a snooze is no failed try")

    def test_a_snoozed_job_is_pending_until_due(self):
        bl = self.queue()
        bl.register_processor(lambda job: (_ for _ in ()).throw(blero.Snooze(3600)))
        job_id = bl.enqueue("later")
        wait_until(lambda: bl.get_job(job_id).attempt == 1 and
                   bl.get_job(job_id).state == "pending", message="snoozed")
        info = bl.get_job(job_id)
        self.assertGreater(info.run_at, time.time() + 3000)
        self.assertTrue(bl.cancel(job_id))

    def test_bad_snooze(self):
        for bad in (-1, math.nan, math.inf):
            with self.assertRaises(ValueError):
                blero.Snooze(bad)
        for bad in ("1", None):
            with self.assertRaises(TypeError):
                blero.Snooze(bad)
        self.assertEqual(blero.Snooze(2).seconds, 2.0)

    def test_progress_is_stored_while_running_and_at_the_end(self):
        bl = self.queue()
        reported, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def run(job):
            for i in range(1, 1001):
                job.progress(i / 2000)
            reported.set()
            release.wait(30)
            job.progress({"done": 10, "of": 10})
            return "ok"

        bl.register_processor(run)
        job_id = bl.enqueue("long")
        self.assertIsNone(bl.get_job(job_id).progress)
        self.assertTrue(reported.wait(10))
        wait_until(lambda: bl.get_job(job_id).progress == 0.5, timeout=10,
                   message="the latest progress stored while the job runs")
        self.assertEqual(bl.get_job(job_id).state, "inprogress")
        release.set()
        self.assertEqual(bl.wait(job_id, 10), "ok")
        self.assertEqual(bl.get_job(job_id).progress, {"done": 10, "of": 10},
                         "the last value, stored with the end of the try")
        out = run_cli("jobs", *self.cli_queue(), "--json")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout)[0]["progress"], {"done": 10, "of": 10})
        server = bl.serve_metrics()
        self.addCleanup(server.close)
        status, _, body = http_request(server.port, "GET", f"/api/job?id={job_id}")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["progress"], {"done": 10, "of": 10})

    def test_progress_the_serializer_refuses_is_a_type_error_at_the_call(self):
        bl = self.queue(serializer=json)
        raised = []

        def run(job):
            try:
                job.progress(object())
            except TypeError as exc:
                raised.append(str(exc))
            job.progress(0.25)

        bl.register_processor(run)
        job_id = bl.enqueue("x")
        bl.wait(job_id, 10)
        self.assertEqual(len(raised), 1)
        self.assertIn("progress", raised[0])
        self.assertEqual(bl.get_job(job_id).progress, 0.25)

    def test_checkpoints_come_back_on_every_later_try(self):
        bl = self.queue(backoff_base=0, retries=3)
        seen = []

        def run(job):
            seen.append((job.attempt, job.checkpointed))
            start = job.checkpointed or 0
            for step in range(start + 1, start + 3):
                job.checkpoint(step)
                self.assertEqual(job.checkpointed, step)
            if job.attempt < 3:
                raise RuntimeError("crashes after two steps")
            return start

        bl.register_processor(run)
        job_id = bl.enqueue("resumable")
        self.assertEqual(bl.wait(job_id, 20), 4)
        self.assertEqual(seen, [(1, None), (2, 2), (3, 4)])
        # a retry of a failed job resumes too
        other = bl.enqueue("resumable", retries=0)
        with self.assertRaises(blero.JobFailed):
            bl.wait(other, 20)
        self.assertEqual(bl.retry_failed([other]), 1)
        self.assertEqual(bl.wait(other, 20), 4)
        self.assertEqual(seen[-3:], [(1, None), (2, 2), (3, 4)])

    def test_a_checkpoint_of_a_try_cancelled_meanwhile_is_not_stored(self):
        bl = self.queue()
        started, go, outcome = threading.Event(), threading.Event(), []
        self.addCleanup(go.set)

        def run(job):
            started.set()
            go.wait(30)
            try:
                job.checkpoint("late")
            except blero.BleroError as exc:
                outcome.append((str(exc), job.cancelled.is_set()))

        bl.register_processor(run)
        job_id = bl.enqueue("x")
        self.assertTrue(started.wait(10))
        self.assertTrue(bl.cancel(job_id))
        go.set()
        wait_until(lambda: outcome, message="the checkpoint refused")
        self.assertIn("no longer holds the job", outcome[0][0])
        self.assertTrue(outcome[0][1])


# argv: db, log.  A long job that checkpoints after each of its 10 steps,
# logging "C step"; it never gets past step 3 on its first try (the test
# kills it there), and logs "R checkpointed" at each try's start.
CHECKPOINT_CHILD = """
db, log_path = sys.argv[1], sys.argv[2]
log = open_log(log_path)

def run(job):
    log("R", job.attempt, job.checkpointed)
    for step in range((job.checkpointed or 0) + 1, 11):
        job.checkpoint(step)
        log("C", step)
        if step == 3 and job.attempt == 1:
            time.sleep(600)
    return "done"

bl = new_queue(db)
bl.register_processor(run)
bl.start()
job_id = bl.enqueue("long", key="the long job")
log("W", job_id, bl.wait(job_id, 120))
bl.stop()
"""


@both_engines
class CheckpointKillTest(ProcessTest):

    def test_a_job_killed_after_its_third_checkpoint_resumes_from_the_third(self):
        self.create()
        first = self.spawn(CHECKPOINT_CHILD, self.path, self.log)
        self.wait_lines("C", "3", children=[first], timeout=30)
        self.kill(first)
        self.assertEqual(self.lines("C"), [["C", str(i), "."] for i in (1, 2, 3)])
        second = self.spawn(CHECKPOINT_CHILD, self.path, self.log)
        self.finish(second)
        self.assertEqual([f[1:3] for f in self.lines("R")], [["1", "None"], ["2", "3"]])
        self.assertEqual([int(f[1]) for f in self.lines("C")], [1, 2, 3] + list(range(4, 11)),
                         "resumed from the 3rd checkpoint, not from the start")
        self.assertEqual(self.lines("W")[0][2], "done")


@unittest.skipIf(POSTGRES_MISSING, POSTGRES_MISSING or "")
class PostgresProgressCronUpgradeTest(OnPostgres, ProcessTest):
    """A PostgreSQL queue of schema 3 (before progress, checkpoints and
    cron) is upgraded in place at its first start."""

    def test_a_schema_1_queue_is_upgraded(self):
        bl = self.queue()
        bl.every(3600, "hourly")
        done = bl.enqueue("old")
        bl.stop()
        with pg_connect() as admin:      # as a blero.py of schema 3 left it
            for table, column, _ in blero._FLOW_COLUMNS + blero._RUNNER_COLUMNS:
                admin.execute(f'ALTER TABLE "{self.schema}".{table} DROP COLUMN {column}')
            admin.execute(f'UPDATE "{self.schema}".blero_meta SET version = 3')
        bl = self.queue(start=False)

        def run(job):
            job.checkpoint(1)
            job.progress(1.0)
        bl.register_processor(run)
        bl.start()
        self.assertIsNone(bl.wait(done, 10))
        self.assertEqual(bl.get_job(done).progress, 1.0)
        bl.cron("@daily", "daily")
        self.assertEqual([(s.key, s.cron) for s in bl.schedules()],
                         [("daily", "@daily"), ("hourly", None)])
        with pg_connect() as admin:
            self.assertEqual(admin.execute(f'SELECT version FROM "{self.schema}".blero_meta')
                             .fetchall(), [(blero._PG_SCHEMA_VERSION,)])


V5_COMMIT = "d4b2950"   # the last blero.py of schema 5, before the runner columns

# argv: db.  With the schema 5 blero.py: three calls of the program's
# second executor left pending (their name paused, the executor never shut
# down), a plain job, and a schedule.
V5_CALLS_CHILD = """
import sys, blero
bl = blero.new(sys.argv[1]).start()
bl.pause("builtins.pow")
bl.executor(1)
ex = bl.executor(2)
for i in range(3):
    ex.submit(pow, 2, i)
bl.enqueue("plain", 21)
bl.every(3600, "hourly", delay=3600)
bl.stop()
"""


class RunnerUpgradeTest(ProcessTest):
    """A file of schema 5 (before the runner columns: whose workers run a
    job) is upgraded in place at its first start: the calls an executor
    left are resumed by the next run's, and inspected as it is where it
    cannot be upgraded."""

    def v5_file(self):
        with_old_blero(self, V5_COMMIT, V5_CALLS_CHILD, self.path)
        self.assertEqual(UpgradeTest.layout(self, self.path), (5, 2))

    def test_upgraded_at_its_first_start(self):
        self.v5_file()
        with blero.new(self.path) as bl:
            left = [j.id for j in bl.jobs(name="builtins.pow")]
            bl.resume("builtins.pow")
            bl.register_processor(lambda job: job.data * 2, names="plain")
            ex = bl.executor(1)
            self.assertEqual(list(ex.map(pow, [2] * 3, range(3), timeout=20)), [1, 2, 4])
            self.assertEqual([j.id for j in bl.jobs(name="builtins.pow")], left,
                             "matched, not new")
            self.assertEqual(bl.wait(bl.jobs(name="plain")[0].id, 20), 42)
            self.assertEqual([s.key for s in bl.schedules()], ["hourly"])
            ex.shutdown()
        self.assertEqual(UpgradeTest.layout(self, self.path), (blero._SCHEMA_VERSION, 2))

    def test_inspected_as_it_is_on_read_only_storage(self):
        self.v5_file()
        path = ReadOnlyStorageTest.read_only_copy(self, self.path)
        before = dir_state(os.path.dirname(path))
        q = blero.new(path)
        self.assertEqual([(j.name, j.state) for j in q.jobs()],
                         [("builtins.pow", "pending")] * 3 + [("plain", "pending")])
        self.assertEqual([s.key for s in q.schedules()], ["hourly"])
        self.assertEqual(dir_state(os.path.dirname(path)), before, "the read-only copy changed")


@unittest.skipIf(POSTGRES_MISSING, POSTGRES_MISSING)
class PostgresRunnerUpgradeTest(OnPostgres, ProcessTest):
    """A PostgreSQL queue of schema 4 (before the runner columns) is
    upgraded in place at its first start: the calls an executor left are
    resumed by the next run's."""

    def test_a_schema_4_queue_is_upgraded(self):
        bl = self.queue()
        bl.pause("builtins.pow")
        bl.executor(1)
        ex = bl.executor(2)
        left = [ex.submit(pow, 2, i).id for i in range(3)]
        bl.task(name="sq")(square)
        bl.every(3600, "sq", ((3,), {}))
        bl.stop()
        with pg_connect() as admin:      # as a blero.py of schema 4 left it
            for table, column, _ in blero._RUNNER_COLUMNS:
                admin.execute(f'ALTER TABLE "{self.schema}".{table} DROP COLUMN {column}')
            admin.execute(f'UPDATE "{self.schema}".blero_meta SET version = 4')
        bl = self.queue()
        bl.resume("builtins.pow")
        ex = bl.executor(1)
        self.addCleanup(ex.shutdown)
        self.assertEqual(list(ex.map(pow, [2] * 3, range(3), timeout=20)), [1, 2, 4])
        self.assertEqual([j.id for j in bl.jobs(name="builtins.pow")], left, "matched, not new")
        task = bl.task(name="sq")(square)
        self.assertEqual(task.every(3600, 4), "sq")
        with pg_connect() as admin:
            self.assertEqual(admin.execute(f'SELECT version FROM "{self.schema}".blero_meta')
                             .fetchall(), [(blero._PG_SCHEMA_VERSION,)])
            self.assertEqual(admin.execute(f'SELECT runner FROM "{self.schema}".blero_schedules')
                             .fetchall(), [("task",)])


@both_engines
class TaskScheduleTest(TempDirTest):
    """task.every(interval, *args) and task.cron(expr, *args)."""

    def test_a_task_on_a_schedule(self):
        bl = self.queue()
        calls = []

        @bl.task(name="beat")
        def beat(n, word="hi"):
            calls.append((n, word))
            return n

        self.assertEqual(beat.every(0.1, 7, word="yo"), "beat")
        wait_until(lambda: len(calls) >= 2, message="two scheduled calls")
        self.assertEqual(calls[:2], [(7, "yo"), (7, "yo")])
        self.assertEqual(beat.using(key="nightly", priority=2).cron("0 3 * * *", 1,
                                                                     tz="UTC"), "nightly")
        nightly = {s.key: s for s in bl.schedules()}["nightly"]
        self.assertEqual((nightly.name, nightly.data, nightly.cron, nightly.tz),
                         ("beat", ((1,), {}), "0 3 * * *", "UTC"))
        with self.assertRaises(TypeError):
            beat.using(delay=5).cron("0 3 * * *")
        with self.assertRaises(ValueError):
            beat.cron("0 3 * * * *")
        self.assertTrue(bl.unschedule("beat"))


@unittest.skipIf(POSTGRES_MISSING, POSTGRES_MISSING)
class PostgresSessionTest(OnPostgres, TempDirTest):
    """The owner's session and the pool on a server: what a lost, stalled or
    restarted server, or a busy process, does to them."""

    def test_a_process_with_many_files_open_keeps_its_session(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 2048:
            self.skipTest("cannot open descriptors past 1023 here")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        opened = []
        self.addCleanup(lambda: [os.close(fd) for fd in opened])
        while not opened or opened[-1] < 1100:      # the next ones are past FD_SETSIZE
            opened.append(os.open(os.devnull, os.O_RDONLY))
        bl = self.queue()
        flags = []
        # (a session lost to a descriptor past FD_SETSIZE is lost at once)
        bl.register_processor(lambda job: flags.append(job.cancelled.wait(0.5)))
        job_id = bl.enqueue("x")
        bl.wait(job_id, 20)
        self.assertEqual((flags, bl.get_job(job_id).attempt), ([False], 1))

    @unittest.skipUnless(POSIX, "SIGALRM")
    @unittest.skipIf(sys.version_info[:2] == (3, 13), "python/cpython#130279: see LifecycleTest")
    def test_ctrl_c_at_any_point_of_a_call_leaves_the_pool_usable(self):
        # A Ctrl-C wherever it lands in a call (sending a statement, waiting
        # for its answer, between two of them): the connection it was on is
        # never lent to the next call unless it is at rest, else that call
        # fails "another command is already in progress".
        bl = self.queue()
        previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        rng = random.Random(os.environ.get("BLERO_TEST_SEED"))
        for _ in range(60):
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0005, 0.005))
                while True:
                    bl.enqueue_many([("x", None)] * rng.randrange(1, 40))
                    bl.stats()
            except KeyboardInterrupt:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self.assertIsInstance(bl.stats()["pending"], int)
        bl.stop()

    def test_the_password_is_never_shown(self):
        secret = "s3cr3t-pw"
        parts = urllib.parse.urlsplit(POSTGRES)
        host = parts.netloc.rsplit("@", 1)[-1]
        user = parts.username or "postgres"
        url = urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{secret}@{host}"))
        bl = blero.new(url, **self.settings())
        shown = [repr(bl)]
        with self.assertRaises(blero.BleroError) as raised:
            bl.enqueue("x")             # not started
        shown.append(str(raised.exception))
        with self.assertLogs("blero", logging.INFO) as logs:
            bl.start()                  # trust auth: any password does
            self.addCleanup(bl.stop, 5)
            with self.assertRaises(blero.BleroError) as raised:
                bl.start()
            shown.append(str(raised.exception))
            server = bl.serve_metrics()
            self.addCleanup(server.close)
            shown.append(http_request(server.port, "GET", "/api/stats")[2].decode())
            shown.append(bl.metrics_text())
            bl.stop()
        shown += logs.output
        self.assertTrue(any(f"{user}:***@{host}" in text for text in shown), shown)
        self.assertFalse([text for text in shown if secret in text])

    def test_calls_carry_on_at_once_after_the_server_ended_every_session(self):
        bl = self.queue(lease=30.0)
        bl.register_processor(lambda job: None)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:    # several pooled connections
            wait_until(lambda: len(list(pool.map(lambda _: bl.stats(), range(8)))) and
                       len(bl._storage._idle) >= 3, message="connections in the pool")
        with pg_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = %s", (f"blero[{os.getpid()}]",))
        self.assertEqual(bl.stats()["pending"], 0)      # no BleroError: the server is there
        job_id = bl.enqueue("x")
        self.assertEqual(bl.get_job(job_id).name, "x")
        self.assertIsNone(bl.wait(job_id, 20))

    def test_a_lost_owners_late_results_are_ignored_and_it_claims_nothing(self):
        bl = self.queue(lease=2.0)
        tries, lock = [], threading.Lock()

        def stubborn(job):
            with lock:
                tries.append((job.id, job.attempt))
            # Returns as soon as cancelled: the race with the new owner's takeover.
            return ("cancelled" if job.cancelled.wait(0.3) else "ran", job.attempt)

        for _ in range(3):
            bl.register_processor(stubborn)
        ids = [bl.enqueue("x", i) for i in range(12)]
        wait_until(lambda: len(tries) >= 3, message="tries running")
        with pg_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = %s", (f"blero[{os.getpid()}]",))

        def ended():
            with contextlib.suppress(blero.BleroError):
                return all(bl.get_job(i).state == "complete" for i in ids)

        wait_until(ended, timeout=40, message="every job complete")
        results = [bl.get_job(i).result for i in ids]
        self.assertEqual([r for r in results if r[0] == "cancelled"], [])
        self.assertTrue(all(r[0] == "ran" for r in results), results)

    def test_a_stalled_server_makes_calls_fail_and_stop_return(self):
        # A server (or pooler, or network) that keeps the TCP connection up
        # and answers nothing: no keepalive fails, only a deadline helps.
        # (A new connection's wait is libpq's shortest, 2 s.)
        for name, value in (("_PG_STATEMENT_TIMEOUT", 2), ("_PG_ANSWER_MARGIN", 0.5),
                            ("_PG_CONNECT_TIMEOUT", 2)):
            self.addCleanup(setattr, blero, name, getattr(blero, name, value))
            setattr(blero, name, value)
        proxy = StallingProxy(urllib.parse.urlsplit(POSTGRES).port or 5432)
        self.addCleanup(proxy.close)
        parts = urllib.parse.urlsplit(POSTGRES)
        url = urllib.parse.urlunsplit(parts._replace(
            netloc=parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{proxy.port}"
            if "@" in parts.netloc else f"127.0.0.1:{proxy.port}"))
        bl = blero.new(url, **self.settings())
        bl.start()
        bl.register_processor(lambda job: "ok")
        self.assertEqual(bl.wait(bl.enqueue("x"), 10), "ok")
        # Stalled, nothing answers: a shorter deadline is as good as any (the
        # statements above had the server's 2 s, on a loaded machine too).
        blero._PG_STATEMENT_TIMEOUT, blero._PG_ANSWER_MARGIN = 1, 0.25
        proxy.stalled = True

        def in_thread(call):
            out = []
            thread = threading.Thread(target=lambda: out.append(_raised(call)), daemon=True)
            thread.start()
            thread.join(40)
            self.assertFalse(thread.is_alive(), f"{call} still waits on the stalled server")
            return out[0]

        self.assertIsInstance(in_thread(lambda: bl.enqueue("x")), blero.BleroError)
        self.assertIsInstance(in_thread(bl.stats), blero.BleroError)
        in_thread(bl.stop)      # (an error, or none: it returns)
        with self.assertRaises(blero.BleroError):
            bl.enqueue("x")     # stopped

    def test_a_call_of_many_slow_statements_is_not_cut(self):
        for name, value in (("_PG_STATEMENT_TIMEOUT", 1), ("_PG_ANSWER_MARGIN", 0.5)):
            self.addCleanup(setattr, blero, name, getattr(blero, name, value))
            setattr(blero, name, value)
        bl = self.queue()
        # Each statement answers within the deadline (half the server's
        # timeout); the call as a whole takes longer (2 s, against 1.5 s).
        slow = bl._storage._read(lambda db: [db.execute("SELECT pg_sleep(0.5), 1").fetchall()
                                             for _ in range(4)])
        self.assertEqual(len(slow), 4)
        self.assertEqual(bl.stats()["pending"], 0)



def _raised(call):
    """What `call()` raised, or returned."""
    try:
        return call()
    except Exception as exc:
        return exc


class StallingProxy:
    """A TCP proxy to 127.0.0.1:`port`; once `stalled`, it forwards nothing
    (and new connections get nothing), while every connection stays up."""

    def __init__(self, port):
        self.target = port
        self.stalled = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
                self.sockets += [client, server]
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        with contextlib.suppress(OSError):
            while True:
                if self.stalled:
                    time.sleep(0.05)        # (a proxy's idling, not a test's synchronisation)
                    continue
                if select.select([a], [], [], 0.05)[0]:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.close()

    def close(self):
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


if __name__ == "__main__":
    unittest.main()
