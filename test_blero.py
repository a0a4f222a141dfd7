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
import re
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
        self.assertEqual(seen_cancel, [True])
        info = bl.get_job(slow_id)
        self.assertEqual(info.attempt, 2)
        self.assertIsNone(info.error)
        # One processor, one worker blocked: a replacement keeps capacity.
        self.assertEqual(bl.wait(bl.enqueue("fast"), timeout=10), "fast")
        release.set()
        wait_until(lambda: not any(t.name == "blero-processor-1" and t.is_alive()
                                   and t is not bl._processors[1].worker.thread
                                   for t in threading.enumerate()), message="old worker ends")
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
        t0 = time.monotonic()
        bl.unregister_processor(second)        # returns at once ...
        self.assertLess(time.monotonic() - t0, 1)
        after = bl.enqueue("x")
        block.set()
        self.assertEqual(bl.wait(job_id, timeout=10), "finished")   # ... the job finishes
        self.assertEqual(bl.get_job(after).state, "pending")        # ... and nothing more runs
        self.assertEqual(counter.jobs, [1])

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


class OperatingTest(TempDirTest):
    """cancel, retry_failed, sweep, wait, join, stats, jobs, and stop's hand-back."""

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
        self.assertEqual((info.state, info.attempt, info.result), ("pending", 1, None))
        # Started again, it runs the handed-back job first; out of tries, the
        # next cut-short try ends failed "interrupted".
        started.clear()
        bl.start()
        self.assertTrue(started.wait(10))
        self.assertEqual(bl.get_job(job_id).attempt, 2)
        bl.stop(timeout=0)
        info = bl.get_job(job_id)
        self.assertEqual((info.state, info.error), ("failed", "interrupted"))
        self.assertEqual(interrupted, [(job_id, "interrupted")])
        self.assertEqual(bl.get_job(last).state, "pending")

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


CRASH_CHILD = """
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
bl = blero.new(path).start()
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
        path, log = os.path.join(self.dir, "q.db"), os.path.join(self.dir, "log")
        lines = self.run_until_killed(
            path, log, 200, 5, 0.002,
            lambda ls: sum(1 for l in ls if l[0] == "end") >= 30)
        enqueued = [int(l[1]) for l in lines if l[0] == "enqueued"]
        ended = {int(l[1]) for l in lines if l[0] == "end"}
        started = {int(l[1]) for l in lines if l[0] == "start"}
        self.assertGreaterEqual(len(ended), 30)
        bl = blero.new(path)
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
        self.assertEqual([int(l[1]) for l in again if l[0] == "enqueued"], list(range(1, 201)))

    def test_kill_9_at_random_points(self):
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        path, log = os.path.join(self.dir, "q.db"), os.path.join(self.dir, "log")
        returned, runs = set(), []
        for round_ in range(6):
            at = rng.randrange(1, 120)
            lines = self.run_until_killed(path, log, 150, 3, 0.001,
                                          lambda ls: len(ls) >= at)
            returned |= {int(l[1]) for l in lines if l[0] == "enqueued"}
            runs.append(lines)
            os.remove(log)
        child = run_child(CRASH_CHILD, path, log, 150, 3, 0.0, timeout=60)
        self.assertEqual(child.returncode, 0, child.stderr)
        bl = blero.new(path)
        info = {j.id: j for j in bl.jobs(limit=None)}
        self.assertTrue(returned <= set(info), f"seed {seed}: an enqueued job was lost")
        self.assertEqual({j.state for j in info.values()}, {"complete"}, f"seed {seed}")
        # Attempts count the tries that started (a try starts when it is
        # claimed, just before its processor is called), and a kill makes at
        # most one job per processor run again.
        starts = {}
        for lines in runs + [read_lines(log)]:
            for l in lines:
                if l[0] == "start":
                    starts.setdefault(int(l[1]), []).append(int(l[2]))
        extra = 0
        for job_id, attempts in starts.items():
            self.assertEqual(attempts, sorted(set(attempts)), f"seed {seed}")
            self.assertEqual(info[job_id].attempt, attempts[-1], f"seed {seed}")
            extra += attempts[-1] - 1
        self.assertLessEqual(extra, 3 * len(runs), f"seed {seed}: too many re-runs")


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
        # The second run enqueues nothing and starts with the interrupted jobs.
        out = subprocess.run(self.demo("-n", "2", "--sleep", "0"), cwd=HERE, env=child_env(),
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotIn("Enqueuing jobs", out.stdout)
        self.assertEqual(sorted(started.findall(out.stdout)[:2]), ["1", "2"], out.stdout)
        bl = blero.new(self.dir)
        self.assertEqual(bl.stats()["complete"], 50)
        self.assertEqual({bl.get_job(1).attempt, bl.get_job(2).attempt}, {2})


class LibraryHygieneTest(TempDirTest):
    """The library prints nothing and logs on the "blero" logger."""

    def test_prints_nothing_and_logs_failed_tries(self):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                self.assertLogs("blero", "DEBUG") as logs:
            bl = self.queue(retries=1, backoff_base=0)
            bl.register_processor(lambda job: 1 / 0)
            job_id = bl.enqueue("x")
            with self.assertRaises(blero.JobFailed):
                bl.wait(job_id, timeout=10)
            bl.stop()
        self.assertEqual((out.getvalue(), err.getvalue()), ("", ""))
        warnings = [r for r in logs.records if r.levelno == logging.WARNING]
        self.assertEqual(len(warnings), 2)
        self.assertIn(f"job {job_id}", warnings[0].getMessage())
        self.assertIn("ZeroDivisionError", warnings[0].getMessage())
        self.assertTrue(any(r.levelno == logging.DEBUG and "Traceback" in r.getMessage()
                            for r in logs.records))
        self.assertTrue(any(r.levelno == logging.INFO and "started" in r.getMessage()
                            for r in logs.records))
        handlers = logging.getLogger("blero").handlers
        self.assertTrue(any(isinstance(h, logging.NullHandler) for h in handlers))
