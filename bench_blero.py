"""bench_blero.py: blero's speed as a ratio to raw sqlite3 doing the same work.

    python3 bench_blero.py [--quick] [--json FILE] [--svg FILE] [--only ID ...]

Every figure is blero's jobs per second divided by the jobs per second of the
same work done, in the same run, with Python's sqlite3 used directly on the
same schema (`blero._SCHEMA`, so the two can never drift) and the same pragmas
(WAL, synchronous NORMAL or FULL, the same cache size, incremental
auto_vacuum), with the data pickled the same way.  The raw side is the
physical limit: what the file format costs
when nothing else runs.  Its transactions are written out plainly, with
`isolation_level=None` and explicit statements:

- one insert per commit: `BEGIN IMMEDIATE; INSERT; COMMIT`;
- one transaction of inserts: `BEGIN IMMEDIATE; executemany(INSERT); COMMIT`;
- claim-one+ack-one, per job: `BEGIN IMMEDIATE`, select the next ready job by
  the `blero_jobs_ready` index, mark it running, `COMMIT`; run it; then
  `BEGIN IMMEDIATE`, mark it complete, `COMMIT` -- so each finished job is
  recorded before the next starts, as blero promises;
- several threads: one connection each, waiting on SQLite's busy timeout.

Each workload runs in a fresh temporary directory, blero and raw alternately,
three times (once with --quick, on smaller sizes); jobs/s are the medians, and
the ratio is the median of the per-repetition ratios (their range is shown
too: on a shared machine it tells how far to trust a figure).  W6 asks how
the per-job cost grows with depth, on each side: it drains a shallow and a
deep queue in alternating slices and keeps each one's fastest slice, so that a
noisy neighbour does not pass for depth.  W7 drains one file from 1, 2 and
3 processes at once (raw: as many processes of claim+ack threads), timed
from a go given to all of them, once set up, to the last job's ack.  W8 has
no raw side: it SIGKILLs a process holding running jobs and times how long
they wait before another live process starts them.  Peak memory is measured
in child processes, since a process's peak RSS never goes down.  Progress
goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blero  # noqa: E402  (the blero.py next to this file)

BLERO, RAW = "blero", "raw"

# Sizes (jobs) of the full run and of --quick.
FULL = dict(reps=3, enqueue=20_000, many=100_000, batch=1_000, drain=20_000,
            synced=5_000, shallow=1_000, deep=200_000, finished=200_000, dequeue=5_000,
            rss_jobs=1_000_000, takeovers=5, calls=20_000, awaits=10_000, naps=1_000)
QUICK = dict(reps=1, enqueue=5_000, many=50_000, batch=1_000, drain=5_000,
             synced=1_000, shallow=1_000, deep=50_000, finished=50_000, dequeue=2_000,
             rss_jobs=200_000, takeovers=2, calls=5_000, awaits=2_000, naps=1_000)
PRODUCERS = 4    # threads in W5
PROCESSORS = 4   # processors (raw: threads) in W4
PER_PROCESS = 2  # processors (raw: threads) in each process of W7, and jobs held in W8
TASK_WORKERS = 4     # T1: the task's concurrency, and the plain processors beside it
EXECUTOR_WORKERS = 5  # T2: max_workers of both executors
LEASE = blero.Blero.__init__.__kwdefaults__["lease"]   # W8's live process keeps the default
CHILD_TIMEOUT = 120   # seconds a child may keep the parent waiting before it is killed
FILL_BATCH = 10_000
WINDOWS = 10     # W6 times its jobs in this many slices


# ---------------------------------------------------------------------------
# The two sides: a blero queue, and a raw sqlite3 connection
# ---------------------------------------------------------------------------

# Raw SQL on blero's schema: state 0 is ready, 2 running, 3 complete.
INSERT = ("INSERT INTO blero_jobs (state, priority, run_at, name, data, max_attempts, created_at)"
          " VALUES (0, 0, ?, ?, ?, 4, ?)")
NEXT_READY = ("SELECT id, name, data FROM blero_jobs WHERE state = 0"
              " ORDER BY priority DESC, id LIMIT 1")
CLAIM = ("UPDATE blero_jobs SET state = 2, owner = ?, attempt = attempt + 1, started_at = ?"
         " WHERE id = ?")
ACK = "UPDATE blero_jobs SET state = 3, finished_at = ?, owner = NULL WHERE id = ?"


def payload(i: int) -> dict:
    """The data of job i: a small dict, as a real job would carry."""
    return {"url": f"https://example.com/items/{i}", "n": i}


def payloads(n: int, start: int = 0) -> list:
    return [payload(i) for i in range(start, start + n)]


def queue(path: str, sync: str) -> blero.Blero:
    """A started blero queue on `path`."""
    return blero.Blero(path, sync=sync).start()


@contextlib.contextmanager
def connections(path: str, sync: str, count: int = 1):
    """`count` raw connections with blero's pragmas (the schema is created on
    a new file); a busy one waits on SQLite's busy timeout."""
    dbs = []
    try:
        for _ in range(count):
            db = sqlite3.connect(path, timeout=60, isolation_level=None,
                                 check_same_thread=False)
            dbs.append(db)
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")    # before a new file's first page
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {sync.upper()}")
            db.execute("PRAGMA cache_size = -8192")
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'blero_jobs'").fetchall():
                db.executescript(blero._SCHEMA)
        yield dbs
    finally:
        for db in dbs:
            db.close()


def raw_row(data) -> tuple:
    now = time.time()
    return (now, "job", pickle.dumps(data), now)


def noop(job) -> None:
    """The processor of every workload: no work, so only the queue is timed."""


def raw_worker(db: sqlite3.Connection, limit: float = float("inf"), owner: int = 1) -> int:
    """Claim-one+ack-one until the queue is empty or `limit` jobs are done."""
    done = 0
    while done < limit:
        db.execute("BEGIN IMMEDIATE")
        row = db.execute(NEXT_READY).fetchone()
        if row is None:
            db.execute("COMMIT")
            break
        db.execute(CLAIM, (owner, time.time(), row[0]))
        db.execute("COMMIT")
        noop(pickle.loads(row[2]))
        db.execute("BEGIN IMMEDIATE")
        db.execute(ACK, (time.time(), row[0]))
        db.execute("COMMIT")
        done += 1
    return done


def fill(side: str, path: str, n: int, sync: str = "normal") -> None:
    """Add n pending jobs, FILL_BATCH per transaction (blero: enqueue_many)."""
    batches = (payloads(min(FILL_BATCH, n - i), i) for i in range(0, n, FILL_BATCH))
    if side == BLERO:
        with queue(path, sync) as bl:
            for batch in batches:
                bl.enqueue_many(("job", p) for p in batch)
        return
    with connections(path, sync) as (db,):
        for batch in batches:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(INSERT, [raw_row(p) for p in batch])
            db.execute("COMMIT")


def mark_complete(path: str) -> None:
    """Turn every pending job into a finished one.  Running 200k jobs through
    the queue would take minutes; this writes the same rows at once."""
    db = sqlite3.connect(path, isolation_level=None)
    now = time.time()
    db.execute("UPDATE blero_jobs SET state = 3, attempt = 1, started_at = ?, finished_at = ?"
               " WHERE state = 0", (now, now))
    db.close()


def in_threads(count: int, target: Callable[[int], None]) -> None:
    """Run target(0..count-1) in `count` threads at once; wait for them all."""
    threads = [threading.Thread(target=target, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------------------
# The workloads: each runs one side once in a fresh directory, returns seconds
# ---------------------------------------------------------------------------

def enqueue_one(side: str, path: str, sync: str, n: int) -> float:
    """W1: n jobs enqueued one at a time from one thread, each durable on return."""
    data = payloads(n)
    if side == BLERO:
        with queue(path, sync) as bl:
            start = time.perf_counter()
            for p in data:
                bl.enqueue("job", p)
            return time.perf_counter() - start
    with connections(path, sync) as (db,):
        start = time.perf_counter()
        for p in data:
            db.execute("BEGIN IMMEDIATE")
            db.execute(INSERT, raw_row(p))
            db.execute("COMMIT")
        return time.perf_counter() - start


def enqueue_batches(side: str, path: str, sync: str, n: int, batch: int) -> float:
    """W2: n jobs enqueued `batch` per call (raw: per transaction)."""
    batches = [payloads(batch, i) for i in range(0, n, batch)]
    if side == BLERO:
        with queue(path, sync) as bl:
            start = time.perf_counter()
            for b in batches:
                bl.enqueue_many([("job", p) for p in b])
            return time.perf_counter() - start
    with connections(path, sync) as (db,):
        start = time.perf_counter()
        for b in batches:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(INSERT, [raw_row(p) for p in b])
            db.execute("COMMIT")
        return time.perf_counter() - start


def drain(side: str, path: str, sync: str, n: int, workers: int) -> float:
    """W3/W4: n pre-filled jobs run to the end by `workers` no-op processors
    (blero: from register_processor to join(); raw: threads of claim+ack)."""
    fill(side, path, n, sync)
    if side == BLERO:
        with queue(path, sync) as bl:
            start = time.perf_counter()
            for _ in range(workers):
                bl.register_processor(noop)
            bl.join()
            return time.perf_counter() - start
    with connections(path, sync, workers) as dbs:
        start = time.perf_counter()
        in_threads(workers, lambda k: raw_worker(dbs[k], owner=k + 1))
        return time.perf_counter() - start


def noop_call(i) -> None:
    """T1's task: nothing, as `noop` for a processor."""


def sleep_1ms(i) -> int:
    """T2's function: a call that does real work, 1 ms of it."""
    time.sleep(0.001)
    return i


def task_map(side: str, path: str, sync: str, n: int) -> float:
    """T1: n calls of a no-op task by task.map (results in order, resumable
    keys and all) -- against the same work done the lower way, by
    enqueue_many and as many plain processors, until join()."""
    with queue(path, sync) as bl:
        if side == BLERO:
            task = bl.task(concurrency=TASK_WORKERS)(noop_call)
            start = time.perf_counter()
            task.map(range(n))
            return time.perf_counter() - start
        start = time.perf_counter()
        bl.enqueue_many([("noop", ((i,), {})) for i in range(n)])
        for _ in range(TASK_WORKERS):
            bl.register_processor(noop)
        bl.join()
        return time.perf_counter() - start


def executor_map(side: str, path: str, sync: str, n: int) -> float:
    """T2: n calls of a function sleeping 1 ms, by blero's durable executor
    against concurrent.futures.ThreadPoolExecutor, both of EXECUTOR_WORKERS."""
    if side == BLERO:
        with queue(path, sync) as bl:
            start = time.perf_counter()
            with bl.executor(EXECUTOR_WORKERS) as ex:
                list(ex.map(sleep_1ms, range(n)))
            return time.perf_counter() - start
    import concurrent.futures
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(EXECUTOR_WORKERS) as ex:
        list(ex.map(sleep_1ms, range(n)))
    return time.perf_counter() - start


def progress_calls(side: str, path: str, sync: str, n: int) -> float:
    """F1: n job.progress() calls in a tight loop, inside one job -- against
    the same loop storing each value in a dict.  The issue asks for 100,000
    of them in under 1 s in all: 100k/s or more."""
    done = {}

    def report(job):
        start = time.perf_counter()
        if side == BLERO:
            for i in range(n):
                job.progress(i / n)
        else:
            seen = {}
            for i in range(n):
                seen[job.id] = i / n
        done["seconds"] = time.perf_counter() - start

    with queue(path, sync) as bl:
        bl.register_processor(report)
        bl.wait(bl.enqueue("report"), 600)
    return done["seconds"]


def drain_beside_progress(side: str, path: str, sync: str, n: int) -> float:
    """F2: W4's drain while another job calls job.progress() in a tight loop
    the whole time -- against the same drain beside a job that loops as
    tightly without reporting: how much the progress stores slow others' commits."""
    fill(BLERO, path, n, sync)
    stop = threading.Event()
    looping = threading.Event()

    def busy(job):
        looping.set()
        i = 0
        while not stop.is_set():
            i += 1
            if side == BLERO:
                job.progress(i)

    with queue(path, sync) as bl:
        bl.register_processor(busy, names="busy")
        bl.enqueue("busy")
        looping.wait(60)
        start = time.perf_counter()
        for _ in range(PROCESSORS):
            bl.register_processor(noop, names="job")
        while bl.stats()["complete"] < n:
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        stop.set()
    return seconds


def awaiting(n: int, naps: int, progress: Progress, step: str) -> dict:
    """T3: n pending jobs, each awaited (`await bl.future(id)`) by a
    coroutine of one asyncio loop: the threads that takes (none per waiter),
    and how long after a result is recorded (on_complete runs right after
    the commit) its await returns.  T4: `naps` calls of an async task that
    sleeps 1 s, with concurrency=naps, on the queue's one loop thread."""
    import asyncio
    progress.show(f"{step} T3: await bl.future(id) for {n:,} pending jobs")
    tmp = tempfile.mkdtemp(prefix="bench-await-")
    recorded = {}
    try:
        bl = blero.new(os.path.join(tmp, "jobs.db"),
                       on_complete=lambda job, result: recorded.__setitem__(
                           job.id, time.perf_counter()))
        with bl:
            ids = bl.enqueue_many([("held", i) for i in range(n)])
            gate = threading.Event()
            for _ in range(PROCESSORS):
                bl.register_processor(lambda job: gate.wait(), names="held")
            threads_before = threading.active_count()

            async def main():
                delivered = {}

                async def wait_one(job_id):
                    await bl.future(job_id)
                    delivered[job_id] = time.perf_counter()
                waiters = [asyncio.ensure_future(wait_one(i)) for i in ids]
                await asyncio.sleep(0.5)
                during = threading.active_count()
                gate.set()
                await asyncio.gather(*waiters)
                return delivered, during

            delivered, during = asyncio.run(main())
            lat = sorted((delivered[i] - recorded[i]) * 1000 for i in ids)

            progress.show(f"{step} T4: {naps:,} async calls sleeping 1 s, concurrency {naps:,}")

            @bl.task(name="nap", concurrency=naps)
            async def nap(i):
                await asyncio.sleep(1)
            start = time.perf_counter()
            nap.map(range(naps))
            nap_s = time.perf_counter() - start
            loop_threads = sum(t.name == "blero-loop" for t in threading.enumerate())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"jobs": n, "threads_added": during - threads_before,
            "latency_ms": {"median": statistics.median(lat), "p99": lat[int(len(lat) * 0.99)],
                           "max": lat[-1]},
            "met": during - threads_before <= 1 and lat[int(len(lat) * 0.99)] <= 10,
            "naps": naps, "nap_seconds": nap_s, "loop_threads": loop_threads}


def enqueue_threads(side: str, path: str, sync: str, n: int) -> float:
    """W5: n jobs enqueued one at a time by PRODUCERS threads at once."""
    share = n // PRODUCERS
    data = [payloads(share, k * share) for k in range(PRODUCERS)]
    if side == BLERO:
        with queue(path, sync) as bl:
            def produce(k):
                for p in data[k]:
                    bl.enqueue("job", p)
            start = time.perf_counter()
            in_threads(PRODUCERS, produce)
            return time.perf_counter() - start
    with connections(path, sync, PRODUCERS) as dbs:
        def produce(k):
            db = dbs[k]
            for p in data[k]:
                db.execute("BEGIN IMMEDIATE")
                db.execute(INSERT, raw_row(p))
                db.execute("COMMIT")
        start = time.perf_counter()
        in_threads(PRODUCERS, produce)
        return time.perf_counter() - start


def dequeue_at_depth(side: str, path: str, sync: str, n: int, depths: tuple,
                     finished: int) -> dict:
    """W6: n jobs taken one by one by one processor from each of queues
    `depths` pending jobs deep (plus n), each behind `finished` finished jobs.

    The cost compared here differs little from depth to depth, and a busy
    machine easily drowns it: so the queues are drained in turns, a slice of
    n / WINDOWS jobs at a time, and each one's time is its fastest slice's
    times WINDOWS."""
    paths = {short(d): f"{path}.{d}" for d in depths}
    for depth, p in zip(depths, paths.values()):
        if finished:
            fill(side, p, finished, sync)
            mark_complete(p)
        fill(side, p, depth + n, sync)
    size = n // WINDOWS
    best = dict.fromkeys(paths, float("inf"))
    with contextlib.ExitStack() as stack:
        slicer = raw_slicer if side == RAW else blero_slicer
        take = {part: slicer(stack, p, sync, size) for part, p in paths.items()}
        for _ in range(WINDOWS):
            for part in paths:
                start = time.perf_counter()
                take[part]()
                best[part] = min(best[part], time.perf_counter() - start)
    return {part: seconds * WINDOWS for part, seconds in best.items()}


def raw_slicer(stack: contextlib.ExitStack, path: str, sync: str, size: int):
    """A function that takes `size` jobs from the file with raw sqlite3."""
    (db,) = stack.enter_context(connections(path, sync))
    return lambda: raw_worker(db, limit=size)


def blero_slicer(stack: contextlib.ExitStack, path: str, sync: str, size: int):
    """A function that takes `size` jobs from the file with a blero processor
    (registered for the slice; jobs it claims past `size` are not timed)."""
    bl = stack.enter_context(queue(path, sync))

    def take():
        done = threading.Event()
        count = 0

        def count_jobs(job):
            nonlocal count
            count += 1
            if count == size:
                done.set()
        processor = bl.register_processor(count_jobs)
        done.wait()
        bl.unregister_processor(processor)
    return take


# ---------------------------------------------------------------------------
# Several processes on one file (W7, W8).  The children are this file run
# with `--child ROLE ARGS`; parent and child talk in lines of words on pipes.
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def spawned(*roles: tuple):
    """A child per role, `--child *role`; on the way out each is told to end
    (its stdin closed), and killed if that fails or the block raised."""
    children = []
    try:
        for role in roles:
            children.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--child", *map(str, role)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        yield children
    except BaseException:
        for c in children:
            c.kill()
        raise
    finally:
        for c in children:
            with contextlib.suppress(OSError):
                c.stdin.close()
            try:
                c.wait(CHILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
            c.stdout.close()


def tell(child: subprocess.Popen, *words) -> None:
    child.stdin.write(" ".join(map(str, words)) + "\n")
    child.stdin.flush()


def expect(child: subprocess.Popen, word: str) -> list[str]:
    """The child's next line, which must begin with `word`: its other words."""
    watchdog = threading.Timer(CHILD_TIMEOUT, child.kill)
    watchdog.start()
    try:
        line = child.stdout.readline().split()
    finally:
        watchdog.cancel()
    if line[:1] != [word]:
        raise RuntimeError(f"child {child.args[3:]} said {line or 'nothing'}, not {word!r}")
    return line[1:]


def say(*words) -> None:
    """The child's side of `expect` (from any of its threads)."""
    print(*words, flush=True)


def drain_processes(side: str, path: str, sync: str, n: int, procs: int) -> float:
    """W7: n pre-filled jobs run to the end by `procs` processes at once, each
    with PER_PROCESS no-op processors (raw: threads of claim+ack), timed from
    the go given to all (once set up) to the last job's ack in any of them."""
    fill(side, path, n, sync)
    return race([("drain", side, path, sync)] * procs, n, "W7")


def race(roles: list[tuple], n: int, label: str) -> float:
    """Seconds from the go given to children of these roles, all ready, to
    the last job's ack in any of them; they must have run `n` jobs in all."""
    with spawned(*roles) as children:
        for c in children:
            expect(c, "ready")
        start = time.monotonic_ns()
        for c in children:
            tell(c, "go")
        done = [[int(w) for w in expect(c, "done")] for c in children]
    if sum(count for count, _ in done) != n:
        raise RuntimeError(f"{label}: {n} jobs, but the processes ran {[c for c, _ in done]}")
    return (max(end for _, end in done) - start) / 1e9


def blero_drain(target: str, **settings) -> list[int]:
    """W7's blero side in a child: once told "go", PER_PROCESS processors
    drain the queue; when each job it ran was acked (time.monotonic_ns())."""
    ends: list[int] = []
    with blero.Blero(target, on_complete=lambda job, result: ends.append(time.monotonic_ns()),
                     **settings) as bl:
        say("ready")
        sys.stdin.readline()
        for _ in range(PER_PROCESS):
            bl.register_processor(noop)
        bl.join()
    return ends


def drain_child(side: str, path: str, sync: str) -> None:
    """W7's child: after "go", drain the file; say how many jobs it ran and
    when it last acked one (raw: found the queue empty just after)."""
    ends = []       # time.monotonic_ns() per job acked (raw: per thread ended)
    if side == BLERO:
        ends = blero_drain(path, sync=sync)
        count = len(ends)
    else:
        with connections(path, sync, PER_PROCESS) as dbs:
            say("ready")
            sys.stdin.readline()
            counts = []

            def work(k):
                counts.append(raw_worker(dbs[k], owner=os.getpid() * PER_PROCESS + k))
                ends.append(time.monotonic_ns())
            in_threads(PER_PROCESS, work)
            count = sum(counts)
    say("done", count, max(ends, default=0))


def takeover(reps: int, progress: Progress, step: str) -> dict:
    """W8: a process runs PER_PROCESS jobs that never end and is SIGKILLed;
    another live process (one processor, the default lease) shares the file.
    The wait of each job is from the kill to that process starting it.  The
    kill comes at a random moment up to a second after the live process
    started, so as to fall anywhere in the rhythm of its checks."""
    waits = []
    for rep in range(reps):
        progress.show(f"{step} W8: takeover after SIGKILL, run {rep + 1}/{reps}")
        tmp = tempfile.mkdtemp(prefix="bench-takeover-")
        path = os.path.join(tmp, "jobs.db")
        try:
            fill(BLERO, path, PER_PROCESS)
            with spawned(("hold", path), ("take", path)) as (holder, taker):
                expect(holder, "holding")
                expect(taker, "ready")
                tell(taker, "go")       # start only now, or it would take the jobs first
                expect(taker, "started")
                time.sleep(random.uniform(0, 1))
                killed = time.monotonic_ns()
                os.kill(holder.pid, signal.SIGKILL)
                for _ in range(PER_PROCESS):
                    waits.append((int(expect(taker, "took")[1]) - killed) / 1e6)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"lease_s": LEASE, "runs": reps, "jobs_per_run": PER_PROCESS, "waits_ms": waits,
            "longest_ms": max(waits), "median_ms": statistics.median(waits)}


def hold_child(path: str) -> None:
    """W8's process to kill: PER_PROCESS processors, each on a job that runs
    until cancelled; says "holding" once all have started."""
    started = threading.Semaphore(0)

    def hold(job):
        started.release()
        job.cancelled.wait()
    with blero.Blero(path) as bl:
        for _ in range(PER_PROCESS):
            bl.register_processor(hold)
        for _ in range(PER_PROCESS):
            started.acquire()
        say("holding")
        sys.stdin.readline()        # killed first, normally
        bl.stop(timeout=0)


def take_child(path: str) -> None:
    """W8's live process: after "go", one processor that says when (monotonic
    ns, system-wide on Linux) it starts each job."""
    say("ready")
    sys.stdin.readline()
    with blero.Blero(path) as bl:
        bl.register_processor(lambda job: say("took", job.id, time.monotonic_ns()))
        say("started")
        sys.stdin.readline()


CHILDREN = {"drain": drain_child, "hold": hold_child, "take": take_child,
            "pgdrain": lambda *a: pg_drain_child(*a)}


class Workload(NamedTuple):
    """A row of the table (or, for a run that returns {part: seconds}, one
    row per part, with `{part}` in the label)."""
    id: str
    label: str
    run: Callable[..., float | dict]
    params: dict            # the run's keyword arguments; `n` is the jobs timed
    sync: str = "normal"
    target: float | None = None     # blero ÷ raw must be at least this
    engine: str = "sqlite"  # "postgres": the run gets a fresh schema, not a path


# ---------------------------------------------------------------------------
# PostgreSQL (--postgres URL): blero beside raw psycopg on the same tables
# (blero's, in a fresh schema per run) with the same statements: one insert
# per transaction; claim-one (FOR UPDATE SKIP LOCKED, in the statement that
# marks the job running) + ack-one per job, each in a transaction of its
# own, as the raw sqlite3 side does.  blero records a job and claims the next
# in one transaction.
# ---------------------------------------------------------------------------

POSTGRES = None     # the URL given with --postgres
PG_INSERT = INSERT.replace("?", "%s")
PG_CLAIM = ("UPDATE blero_jobs SET state = 2, owner = %s, attempt = attempt + 1,"
            " started_at = %s WHERE id = (SELECT id FROM blero_jobs WHERE state = 0"
            " ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED) AND state = 0"
            " RETURNING id, name, data")
PG_ACK = ACK.replace("?", "%s")


def pg_queue(schema: str, **settings) -> blero.Blero:
    return blero.Blero(POSTGRES, schema=schema, **settings).start()


def pg_sql(sql: str, schema: str) -> str:
    return sql.replace("blero_jobs", f'"{schema}".blero_jobs')


@contextlib.contextmanager
def pg_connections(schema: str, count: int = 1):
    """`count` raw psycopg connections, on a schema blero made (so both
    sides use the same tables and indexes)."""
    import psycopg
    pg_queue(schema).stop()
    conns = [psycopg.connect(POSTGRES, autocommit=True) for _ in range(count)]
    try:
        yield conns
    finally:
        for c in conns:
            c.close()


def pg_fill(side: str, schema: str, n: int) -> None:
    batches = [payloads(min(FILL_BATCH, n - i), i) for i in range(0, n, FILL_BATCH)]
    if side == BLERO:
        with pg_queue(schema) as bl:
            for batch in batches:
                bl.enqueue_many(("job", p) for p in batch)
        return
    with pg_connections(schema) as (conn,):
        for batch in batches:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(pg_sql(PG_INSERT, schema), [raw_row(p) for p in batch])


def pg_raw_worker(conn, schema: str, owner: int) -> int:
    claim, ack = pg_sql(PG_CLAIM, schema), pg_sql(PG_ACK, schema)
    done = 0
    while True:
        with conn.transaction():
            row = conn.execute(claim, (owner, time.time())).fetchone()
        if row is None:
            return done
        noop(pickle.loads(row[2]))
        with conn.transaction():
            conn.execute(ack, (time.time(), row[0]))
        done += 1


def pg_enqueue_one(side: str, schema: str, sync: str, n: int) -> float:
    """PG W1: n jobs enqueued one at a time from one thread."""
    data = payloads(n)
    if side == BLERO:
        with pg_queue(schema) as bl:
            start = time.perf_counter()
            for p in data:
                bl.enqueue("job", p)
            return time.perf_counter() - start
    with pg_connections(schema) as (conn,):
        sql = pg_sql(PG_INSERT, schema)
        start = time.perf_counter()
        for p in data:
            with conn.transaction():
                conn.execute(sql, raw_row(p))
        return time.perf_counter() - start


def pg_enqueue_batches(side: str, schema: str, sync: str, n: int, batch: int) -> float:
    """PG W2: n jobs enqueued `batch` per call (raw: per transaction)."""
    batches = [payloads(batch, i) for i in range(0, n, batch)]
    if side == BLERO:
        with pg_queue(schema) as bl:
            start = time.perf_counter()
            for b in batches:
                bl.enqueue_many([("job", p) for p in b])
            return time.perf_counter() - start
    with pg_connections(schema) as (conn,):
        sql = pg_sql(PG_INSERT, schema)
        start = time.perf_counter()
        for b in batches:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, [raw_row(p) for p in b])
        return time.perf_counter() - start


def pg_drain(side: str, schema: str, sync: str, n: int, workers: int) -> float:
    """PG W3/W4: n pre-filled jobs run to the end by `workers` processors
    (raw: threads of claim+ack, a connection each)."""
    pg_fill(side, schema, n)
    if side == BLERO:
        with pg_queue(schema) as bl:
            start = time.perf_counter()
            for _ in range(workers):
                bl.register_processor(noop)
            bl.join()
            return time.perf_counter() - start
    with pg_connections(schema, workers) as conns:
        start = time.perf_counter()
        in_threads(workers, lambda k: pg_raw_worker(conns[k], schema, k + 1))
        return time.perf_counter() - start


def pg_drain_processes(side: str, schema: str, sync: str, n: int, procs: int) -> float:
    """PG W7: as W7, on the server: `procs` processes at once."""
    pg_fill(side, schema, n)
    return race([("pgdrain", side, POSTGRES, schema)] * procs, n, "PG W7")


def pg_drain_child(side: str, url: str, schema: str) -> None:
    global POSTGRES
    POSTGRES = url
    ends = []
    if side == BLERO:
        ends = blero_drain(url, schema=schema)
        count = len(ends)
    else:
        import psycopg
        conns = [psycopg.connect(url, autocommit=True) for _ in range(PER_PROCESS)]
        say("ready")
        sys.stdin.readline()
        counts = []

        def work(k):
            counts.append(pg_raw_worker(conns[k], schema, os.getpid() * PER_PROCESS + k))
            ends.append(time.monotonic_ns())
        in_threads(PER_PROCESS, work)
        count = sum(counts)
    say("done", count, max(ends, default=0))


def pg_workloads(size: dict) -> list[Workload]:
    return [
        Workload("PG W1", "enqueue, 1 thread", pg_enqueue_one, dict(n=size["enqueue"] // 4),
                 engine="postgres"),
        Workload("PG W2", f"enqueue_many, batches of {size['batch']:,}", pg_enqueue_batches,
                 dict(n=size["many"] // 4, batch=size["batch"]), engine="postgres"),
        Workload("PG W3", "drain, 1 processor", pg_drain,
                 dict(n=size["drain"] // 4, workers=1), target=1.0, engine="postgres"),
        Workload("PG W4", f"end to end, {PROCESSORS} processors", pg_drain,
                 dict(n=size["drain"] // 4, workers=PROCESSORS), target=1.0, engine="postgres"),
    ] + [
        Workload(f"PG W7 {k} proc{'s' if k > 1 else ''}",
                 f"drain, {k} process{'es' if k > 1 else ''} × {PER_PROCESS} processors",
                 pg_drain_processes, dict(n=size["drain"] // 4, procs=k), engine="postgres")
        for k in (1, 2, 4)
    ]


def pg_wake_latency(samples: int) -> dict:
    """An idle queue (its own owner, its own LISTEN) starts a job another
    enqueues: milliseconds from the enqueue's return to the job's start."""
    schema = "bench_" + os.urandom(4).hex()
    started = []
    try:
        with pg_queue(schema) as idle, pg_queue(schema) as producer:
            got = threading.Event()
            idle.register_processor(lambda job: (started.append(time.perf_counter()), got.set()))
            idle.enqueue("warm")
            got.wait(10)
            waits = []
            for _ in range(samples):
                got.clear()
                time.sleep(0.05)        # idle again (a benchmark: no test here)
                t = time.perf_counter()
                producer.enqueue("x")
                got.wait(10)
                waits.append((started[-1] - t) * 1000)
    finally:
        pg_drop(schema)
    return {"samples": samples, "median_ms": statistics.median(waits), "max_ms": max(waits)}


def pg_drop(schema: str) -> None:
    import psycopg
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def workloads(size: dict) -> list[Workload]:
    """The table of workloads at these sizes."""
    shallow, deep, fin, n = size["shallow"], size["deep"], size["finished"], size["dequeue"]
    return [
        Workload("W1", "enqueue, 1 thread, each durable", enqueue_one,
                 dict(n=size["enqueue"]), target=0.75),
        Workload("W1 full", "enqueue, 1 thread, sync=full", enqueue_one,
                 dict(n=size["synced"]), sync="full"),
        Workload("W2", f"enqueue_many, batches of {size['batch']:,}", enqueue_batches,
                 dict(n=size["many"], batch=size["batch"]), target=0.50),
        Workload("W3", "drain, 1 processor", drain,
                 dict(n=size["drain"], workers=1), target=0.90),
        Workload("W4", f"end to end, {PROCESSORS} processors", drain,
                 dict(n=size["drain"], workers=PROCESSORS), target=1.0),
        Workload("W5", f"enqueue, {PRODUCERS} threads", enqueue_threads,
                 dict(n=size["enqueue"]), target=0.80),
        Workload("W5 full", f"enqueue, {PRODUCERS} threads, sync=full", enqueue_threads,
                 dict(n=size["synced"]), sync="full", target=2.0),
        Workload("W6", "dequeue, {part} pending", dequeue_at_depth,
                 dict(n=n, depths=(shallow, deep), finished=0)),
        Workload("W6+fin", f"dequeue, {{part}} pending + {short(fin)} done",
                 dequeue_at_depth, dict(n=n, depths=(shallow, deep), finished=fin)),
    ] + [
        Workload(f"W7 {k} proc{'s' if k > 1 else ''}",
                 f"drain, {k} process{'es' if k > 1 else ''} × {PER_PROCESS} processors",
                 drain_processes, dict(n=size["drain"], procs=k))
        for k in (1, 2, 3)
    ] + [
        # Against another baseline than raw sqlite3 (the "raw" column): the
        # cost of the task layer, and of durability when the work is real.
        Workload("T1", f"task.map ÷ enqueue_many+{TASK_WORKERS} processors", task_map,
                 dict(n=size["calls"]), target=0.80),
        Workload("T2", f"Executor.map ÷ ThreadPool({EXECUTOR_WORKERS}), 1 ms", executor_map,
                 dict(n=size["calls"]), target=0.80),
        # Flow control (issue 11): both sides are blero.
        Workload("F1", "job.progress() × 100k ÷ a dict store", progress_calls,
                 dict(n=100_000)),
        Workload("F2", f"drain, {PROCESSORS} processors, beside progress() ÷ beside a loop",
                 drain_beside_progress, dict(n=size["drain"] // 4), target=0.80),
    ]


# The W6 workloads whose deep and shallow queues are compared.
DEPTH_CHECKS = [("W6", "without finished jobs"), ("W6+fin", "with finished jobs kept")]
DEPTH_TOLERANCE = 0.1


def short(n: int) -> str:
    """1000 -> 1k, 1000000 -> 1M."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# ---------------------------------------------------------------------------
# Running, and the results
# ---------------------------------------------------------------------------

class Progress:
    """One line on stderr, rewritten in place on a terminal."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def show(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:5.0f} s] {text}"
        sys.stderr.write(f"\r\x1b[K{line}" if self.tty else line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run_once(w: Workload, side: str) -> dict:
    """One run of one side in a fresh directory: {part: jobs per second}."""
    if w.engine == "postgres":
        schema = f"bench_{side}_{os.urandom(4).hex()}"
        try:
            seconds = w.run(side, schema, w.sync, **w.params)
        finally:
            pg_drop(schema)
    else:
        tmp = tempfile.mkdtemp(prefix=f"bench-{side}-")
        try:
            seconds = w.run(side, os.path.join(tmp, "jobs.db"), w.sync, **w.params)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    parts = seconds if isinstance(seconds, dict) else {"": seconds}
    return {part: w.params["n"] / s for part, s in parts.items()}


def measure(w: Workload, reps: int, progress: Progress, step: str) -> list[dict]:
    """Both sides `reps` times, alternating which goes first: its table rows."""
    runs = {BLERO: [], RAW: []}
    for rep in range(reps):
        for side in ((BLERO, RAW) if rep % 2 == 0 else (RAW, BLERO)):
            progress.show(f"{step} {w.id}: {w.label.format(part='*')} -- {side}, "
                          f"run {rep + 1}/{reps}")
            runs[side].append(run_once(w, side))
    rows = []
    for part in runs[BLERO][0]:
        rates = {side: [r[part] for r in runs[side]] for side in runs}
        ratios = [b / r for b, r in zip(rates[BLERO], rates[RAW])]
        ratio = statistics.median(ratios)
        rows.append({"id": f"{w.id} {part}".strip(), "label": w.label.format(part=part),
                     "sync": w.sync, "jobs": w.params["n"],
                     "blero_jobs_per_s": statistics.median(rates[BLERO]),
                     "raw_jobs_per_s": statistics.median(rates[RAW]),
                     "ratio": ratio, "ratio_range": [min(ratios), max(ratios)],
                     "target": w.target,
                     "met": None if w.target is None else ratio >= w.target,
                     "runs": rates})
    return rows


def depth_checks(results: list[dict], size: dict) -> list[dict]:
    """W6: how much a deep queue slows blero, beside how much it slows raw
    sqlite3 (deep ÷ shallow jobs/s, paired run by run, medians)."""
    by_id = {r["id"]: r for r in results}
    checks = []
    for wid, label in DEPTH_CHECKS:
        deep, shallow = (by_id.get(f"{wid} {short(size[k])}") for k in ("deep", "shallow"))
        if deep is None or shallow is None:
            continue
        mine, raw = (statistics.median(d / s for d, s in zip(deep["runs"][side],
                                                               shallow["runs"][side]))
                     for side in (BLERO, RAW))
        checks.append({"id": wid, "label": f"depth cost, {label}",
                       "blero_ratio": mine, "raw_ratio": raw, "difference": mine - raw,
                       "met": abs(mine - raw) <= DEPTH_TOLERANCE})
    return checks


def peak_rss(pending: int, finished: int = 0, drain_n: int = 0) -> int:
    """Peak RSS (bytes) of a fresh process that opens a queue with these
    many pending and finished jobs, then runs `drain_n` of them.  On Linux a
    process's ru_maxrss starts from its parent's at the fork: call this while
    the parent is still small."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-probe",
                          str(pending), str(finished), str(drain_n)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def rss_probe(pending: int, finished: int, drain_n: int) -> None:
    """The child side of `peak_rss`: set up like W6, print ru_maxrss in bytes."""
    tmp = tempfile.mkdtemp(prefix="bench-rss-")
    try:
        if pending or finished:
            dequeue_at_depth(BLERO, os.path.join(tmp, "jobs.db"), "normal",
                             n=drain_n, depths=(pending - drain_n,), finished=finished)
        else:
            queue(os.path.join(tmp, "jobs.db"), "normal").stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    scale = 1 if sys.platform == "darwin" else 1024   # Linux reports KiB
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def memory(size: dict, progress: Progress) -> dict:
    """Peak RSS of an empty queue, of W6's setup, and of a big pending queue."""
    mb = 1 << 20
    progress.show("memory: peak RSS of an empty queue")
    empty = peak_rss(0)
    cases = [("w6_setup", f"{short(size['deep'])} pending + {short(size['finished'])} done",
              size["deep"], size["finished"]),
             ("big_queue", f"{short(size['rss_jobs'])} pending", size["rss_jobs"], 0)]
    out = {"empty_mb": empty / mb}
    for key, label, pending, finished in cases:
        progress.show(f"memory: peak RSS with {label}")
        peak = peak_rss(pending, finished, size["dequeue"])
        out[key] = {"label": label, "peak_mb": peak / mb, "added_mb": (peak - empty) / mb,
                    "met": peak - empty <= 50 * mb}
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu or "unknown",
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "blero": blero.__version__}


# ---------------------------------------------------------------------------
# Output: the table, JSON, and an SVG bar chart
# ---------------------------------------------------------------------------

def verdict(met: bool | None) -> str:
    return "" if met is None else ("ok" if met else "MISSED")


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"blero {m['blero']} on {m['platform']}, {m['cpu']}, {m['cpus']} CPUs, "
             f"Python {m['python']}, SQLite {m['sqlite']}",
             f"{report['mode']} run, {report['reps']} run(s) per figure (medians), "
             f"{report['seconds']:.0f} s; ratio = blero / raw sqlite3", ""]
    head = (f"{'':12} {'workload':39} {'jobs':>7} {'jobs/s':>9} {'raw jobs/s':>10}"
            f" {'ratio':>5} {'(runs)':11}  target")
    lines += [head, "-" * (len(head) + 8)]
    for r in report["results"]:
        target = "" if r["target"] is None else f">= {r['target']:.2f}"
        low, high = r["ratio_range"]
        spread = f"({low:.2f}-{high:.2f})" if report["reps"] > 1 else ""
        lines.append(f"{r['id']:12} {r['label']:39} {r['jobs']:7,} {r['blero_jobs_per_s']:9,.0f}"
                     f" {r['raw_jobs_per_s']:10,.0f} {r['ratio']:5.2f} {spread:11}"
                     f"  {target:8} {verdict(r['met'])}".rstrip())
    if report["depth"]:
        lines += ["", "W6 depth cost: jobs/s deep ÷ jobs/s shallow "
                  f"(blero's within {DEPTH_TOLERANCE} of raw's)"]
    for c in report["depth"]:
        lines.append(f"  {c['label']:35} blero {c['blero_ratio']:.2f}  raw {c['raw_ratio']:.2f}"
                     f"  difference {c['difference']:+.2f}  {verdict(c['met'])}")
    t = report["takeover"]
    if t:
        lines += ["", f"W8 takeover: a process SIGKILLed while running {t['jobs_per_run']} jobs; "
                  f"another live one starts them", f"  {takeover_text(t)}"]
    a = report["awaiting"]
    if a:
        lat = a["latency_ms"]
        lines += ["", f"T3 await bl.future(id) for {a['jobs']:,} pending jobs on one asyncio loop:",
                  f"  threads added {a['threads_added']} (target: none per waiter); from recorded"
                  f" to delivered: median {lat['median']:.2f} ms, p99 {lat['p99']:.2f} ms,"
                  f" max {lat['max']:.2f} ms (target p99 <= 10 ms)  {verdict(a['met'])}",
                  f"T4 {a['naps']:,} async calls of asyncio.sleep(1), concurrency {a['naps']:,}:"
                  f" {a['nap_seconds']:.2f} s on {a['loop_threads']} loop thread"]
    mem = report["memory"]
    if mem is None:
        return "\n".join(lines)
    lines += ["", f"Peak RSS (fresh process): empty queue {mem['empty_mb']:.0f} MB"]
    for key in ("w6_setup", "big_queue"):
        c = mem[key]
        lines.append(f"  {c['label']:35} {c['peak_mb']:.0f} MB (+{c['added_mb']:.0f} MB, "
                     f"limit +50 MB)  {verdict(c['met'])}")
    return "\n".join(lines)


def takeover_text(t: dict) -> str:
    """W8's figures in a line."""
    return (f"wait from the kill: longest {t['longest_ms']:,.0f} ms, median "
            f"{t['median_ms']:,.0f} ms (lease {t['lease_s']:g} s; "
            f"{t['runs']} runs × {t['jobs_per_run']} jobs)")


def svg(report: dict) -> str:
    """A horizontal bar per figure: blero ÷ raw, with its target marked
    (W6 depth checks: blero's depth ratio, with raw's ± tolerance shaded)."""
    bars = [(f"{r['id']}: {r['label']}", r["ratio"], r["target"], None, r["met"])
            for r in report["results"]]
    bars += [(f"W6 {c['label']}", c["blero_ratio"], None, c["raw_ratio"], c["met"])
             for c in report["depth"]]
    left, width, row, top = 330, 420, 24, 40
    scale = width / max(2.5, max((b[1] for b in bars), default=0) * 1.15)
    notes = ["dashed: target; shaded: raw sqlite3's depth ratio ± "
             f"{DEPTH_TOLERANCE}; green met, red missed"]
    if report["takeover"]:
        notes.append(f"W8 takeover after SIGKILL, {takeover_text(report['takeover'])}")
    height = top + row * len(bars) + 24 + 16 * len(notes)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" '
           f'height="{height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">blero ÷ raw sqlite3 '
           f'({_escape(report["mode"])} run, {_escape(report["machine"]["platform"])})</text>']
    for tick in range(0, int(width / scale) + 1):
        x = left + tick * scale
        out.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" '
                   f'y2="{top + row * len(bars)}" stroke="{"#888" if tick == 1 else "#ddd"}"/>')
        out.append(f'<text x="{x:.1f}" y="{top + row * len(bars) + 16}" '
                   f'text-anchor="middle">{tick}×</text>')
    for i, (label, value, target, band, met) in enumerate(bars):
        y = top + i * row
        color = "#4a8" if met else ("#d55" if met is False else "#89a")
        out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{_escape(label)}</text>')
        out.append(f'<rect x="{left}" y="{y + 5}" width="{value * scale:.1f}" '
                   f'height="{row - 10}" fill="{color}"/>')
        end = value
        if band is not None:
            end = max(end, band + DEPTH_TOLERANCE)
            out.append(f'<rect x="{left + (band - DEPTH_TOLERANCE) * scale:.1f}" y="{y + 2}" '
                       f'width="{2 * DEPTH_TOLERANCE * scale:.1f}" height="{row - 4}" '
                       f'fill="#fc5" opacity="0.5"/>')
        if target is not None:
            end = max(end, target)
            x = left + target * scale
            out.append(f'<line x1="{x:.1f}" y1="{y + 1}" x2="{x:.1f}" y2="{y + row - 1}" '
                       f'stroke="black" stroke-width="2" stroke-dasharray="3,2"/>')
        out.append(f'<text x="{left + end * scale + 5:.1f}" y="{y + 16}">{value:.2f}</text>')
    for i, note in enumerate(reversed(notes)):
        out.append(f'<text x="10" y="{height - 6 - 16 * i}" fill="#555">{_escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="blero ÷ raw sqlite3, workload by workload.")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each (< 30 s)")
    parser.add_argument("--json", metavar="FILE", help="also save the results as JSON")
    parser.add_argument("--svg", metavar="FILE", help="also draw the ratios as an SVG bar chart")
    parser.add_argument("--only", metavar="ID", action="append",
                        help="run only workloads whose id starts with ID (repeatable)")
    parser.add_argument("--postgres", metavar="URL",
                        help="run the PostgreSQL workloads on this server (a scratch database:"
                             " each run makes and drops a schema), beside raw psycopg")
    parser.add_argument("--rss-probe", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_probe:
        rss_probe(*args.rss_probe)
        return 0
    if args.child:
        CHILDREN[args.child[0]](*args.child[1:])
        return 0

    size = QUICK if args.quick else FULL
    if args.postgres:
        return postgres_main(args, size)
    picked = lambda wid: not args.only or any(wid.startswith(o) for o in args.only)  # noqa: E731
    chosen = [w for w in workloads(size) if picked(w.id)]
    steps = len(chosen) + picked("W8") + picked("T3")
    progress = Progress()
    # Memory first: a child's peak RSS includes its parent's at the fork.
    mem = None if args.only else memory(size, progress)
    results = [row for i, w in enumerate(chosen, 1)
               for row in measure(w, size["reps"], progress, f"[{i}/{steps}]")]
    report = {"machine": machine(), "mode": "quick" if args.quick else "full",
              "reps": size["reps"], "sizes": size, "results": results,
              "depth": depth_checks(results, size),
              "takeover": (takeover(size["takeovers"], progress, f"[{steps}/{steps}]")
                           if picked("W8") else None),
              "awaiting": (awaiting(size["awaits"], size["naps"], progress, f"[{steps}/{steps}]")
                           if picked("T3") else None),
              "memory": mem}
    report["seconds"] = time.monotonic() - progress.started
    progress.done()
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(svg(report))
    return 0


def postgres_main(args, size: dict) -> int:
    """--postgres: the PostgreSQL workloads, and how fast NOTIFY wakes an idle queue."""
    global POSTGRES
    POSTGRES = args.postgres
    picked = lambda wid: not args.only or any(wid.startswith(o) for o in args.only)  # noqa: E731
    chosen = [w for w in pg_workloads(size) if picked(w.id)]
    progress = Progress()
    results = [row for i, w in enumerate(chosen, 1)
               for row in measure(w, size["reps"], progress, f"[{i}/{len(chosen)}]")]
    wake = pg_wake_latency(20 if args.quick else 100)
    report = {"machine": machine(), "mode": "quick" if args.quick else "full",
              "reps": size["reps"], "sizes": size, "results": results, "depth": [],
              "takeover": None, "awaiting": None, "memory": None, "wake": wake}
    report["seconds"] = time.monotonic() - progress.started
    progress.done()
    text = table(report).replace("ratio = blero / raw sqlite3", "ratio = blero / raw psycopg")
    one = next((r for r in results if r["id"] == "PG W7 1 proc"), None)
    four = next((r for r in results if r["id"] == "PG W7 4 procs"), None)
    if one and four:
        text += (f"\n\nPG W7 scaling: 4 processes ÷ 1 process = "
                 f"{four['blero_jobs_per_s'] / one['blero_jobs_per_s']:.2f} (blero), "
                 f"{four['raw_jobs_per_s'] / one['raw_jobs_per_s']:.2f} (raw)")
    text += (f"\nNOTIFY wake-up: an idle queue starts a job another enqueued in "
             f"{wake['median_ms']:.1f} ms (median), {wake['max_ms']:.1f} ms at most "
             f"({wake['samples']} samples)")
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
