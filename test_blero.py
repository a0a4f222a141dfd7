"""Tests for blero: `python -m unittest -v` from the repository root.

Crash safety is tested with real child processes killed with SIGKILL, and
multi-process safety with real processes sharing one file.  Nothing waits
with a bare sleep: every wait is for a condition, with a deadline.
"""

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

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


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_lines(path):
    """The whole lines of a log file that children append to."""
    try:
        with open(path) as f:
            return [line.split() for line in f.read().splitlines() if line.endswith(".")]
    except FileNotFoundError:
        return []


class TempDirTest(unittest.TestCase):
    """A fresh directory per test, and queues that are always stopped."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="blero-test-")
        self.dir = self._tmp.name
        self.addCleanup(self._tmp.cleanup)

    def queue(self, name="q.db", start=True, **settings):
        bl = blero.new(os.path.join(self.dir, name), **settings)
        if start:
            bl.start()
        self.addCleanup(bl.stop, 5)
        return bl


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

    def assert_refused(self, path, *words):
        before = file_digest(path)
        listing = sorted(os.listdir(os.path.dirname(path)))
        bl = blero.new(path)
        with self.assertRaises(blero.BleroError) as cm:
            bl.start()
        message = str(cm.exception)
        self.assertIn(path, message)
        for word in words:
            self.assertIn(word, message)
        self.assertEqual(file_digest(path), before, "the file was modified")
        self.assertEqual(sorted(os.listdir(os.path.dirname(path))), listing,
                         "files were left beside it")
        return message

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

    @unittest.skipUnless(POSIX, "file modes are POSIX")
    def test_new_files_are_private(self):
        bl = self.queue()
        bl.enqueue("x")
        for suffix in ("", "-wal", "-shm"):
            mode = os.stat(bl.path + suffix).st_mode & 0o777
            self.assertEqual(mode, 0o600, f"{suffix or 'db'} has mode {oct(mode)}")

    def test_unknown_or_bad_setting(self):
        with self.assertRaises(TypeError):
            blero.new(self.dir, retry=3)
        with self.assertRaises(ValueError):
            blero.new(self.dir, sync="sometimes")
        with self.assertRaises(TypeError):
            blero.new(self.dir, serializer=object())

    def test_text_file_is_refused_unchanged(self):
        path = os.path.join(self.dir, "notes.txt")
        with open(path, "w") as f:
            f.write("these are my notes, not a queue\n" * 20)
        self.assert_refused(path, "not an SQLite database")

    def test_foreign_sqlite_database_is_refused_unchanged(self):
        path = os.path.join(self.dir, "app.db")
        db = sqlite3.connect(path)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ann')")
        db.commit()
        db.close()
        self.assert_refused(path, "not a blero queue")

    def test_empty_file_and_empty_database_are_new(self):
        for name in ("empty", "emptydb"):
            path = os.path.join(self.dir, name)
            open(path, "wb").close()
            if name == "emptydb":
                sqlite3.connect(path).execute("VACUUM").connection.close()
            bl = blero.new(path).start()
            self.assertEqual(bl.enqueue("x"), 1)
            bl.stop()

    def test_newer_schema_is_refused_unchanged(self):
        bl = self.queue()
        bl.enqueue("x")
        bl.stop()
        db = sqlite3.connect(bl.path)
        db.execute("PRAGMA user_version = 99")
        db.close()
        self.assert_refused(bl.path, "newer blero")

    def damaged_copy(self, damage):
        bl = self.queue("good.db")
        bl.enqueue_many([("x", "y" * 500)] * 200)
        bl.stop()
        with open(bl.path, "rb") as f:
            data = bytearray(f.read())
        path = os.path.join(self.dir, "bad.db")
        with open(path, "wb") as f:
            f.write(damage(data))
        return path

    def test_damaged_files_are_refused_unchanged(self):
        rng = random.Random(7)
        damages = {
            "header": lambda d: bytes(rng.randrange(256) for _ in range(100)) + d[100:],
            # sqlite_master's cells sit at the end of page 1
            "schema page": lambda d: d[:2600] + bytes(1496) + d[4096:],
            "data pages": lambda d: d[:8192] + bytes(rng.randrange(256) for _ in range(8192))
                                    + d[16384:],
            "truncated": lambda d: d[:len(d) // 3],
        }
        for kind, damage in damages.items():
            with self.subTest(kind):
                path = self.damaged_copy(damage)
                self.assert_refused(path)
                os.remove(path)

    def test_path_that_cannot_be_created(self):
        blocker = os.path.join(self.dir, "plain-file")
        open(blocker, "w").close()
        bl = blero.new(os.path.join(blocker, "sub", "q.db"))
        with self.assertRaises(blero.BleroError) as cm:
            bl.start()
        self.assertIn("plain-file", str(cm.exception))

    @unittest.skipUnless(POSIX and os.geteuid() != 0, "root ignores file permissions")
    def test_read_only_file_is_refused(self):
        bl = self.queue()
        bl.enqueue("x")
        bl.stop()
        os.chmod(bl.path, 0o400)
        self.addCleanup(os.chmod, bl.path, 0o600)
        with self.assertRaises(blero.BleroError):
            blero.new(bl.path).start()

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

    def test_concurrent_enqueues_share_commits(self):
        bl = self.queue()
        storage = bl._storage
        transactions = []
        real = storage._transaction

        def counting(ops):
            transactions.append(len(ops))
            return real(ops)

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
        self.assertEqual(db.execute("SELECT count(*) FROM jobs").fetchone()[0], 1600)
        db.close()

    def test_next_job_is_one_index_seek(self):
        bl = self.queue()
        bl.enqueue_many([("a", i) for i in range(50)] + [("b", i) for i in range(50)])
        storage = bl._storage
        for n in (0, 1, 2):
            names = tuple(["a", "b"][:n])
            select, claim = storage._claim_statements(n)
            for sql, params in ((select, names), (claim, (1, 2.0) + names)):
                plan = " ".join(str(r) for r in storage._db.execute(
                    "EXPLAIN QUERY PLAN " + sql, params))
                self.assertIn("jobs_ready", plan)
                self.assertNotIn("TEMP B-TREE", plan, "the claim sorts instead of seeking")
