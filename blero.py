"""blero: an embedded, persistent job queue in one file, on the standard library alone.

A program enqueues jobs and runs them in the same process, on worker threads,
with every job kept in one SQLite file: a crash or a restart loses nothing.

    import blero

    with blero.new("db/") as bl:               # db/blero.db
        bl.register_processor(fetch)           # one worker thread each
        for url in urls:
            bl.enqueue("fetch", url, key=url)  # committed when it returns
        bl.join()                              # until every job has ended

The API mirrors the Go library Goblero (New / Start / RegisterProcessor /
EnqueueJob / Stop).  The file reads top to bottom in the order data flows:
settings and errors, the job types, storage (every SQL statement lives
there), the dispatcher and its workers, the public `Blero` class, the
metrics server and dashboard, and the command line (`python -m blero`).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import heapq
import http.server
import inspect
import ipaddress
import itertools
import json
import logging
import math
import os
import pickle
import random
import re
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import sys
import threading
import time
import traceback
import urllib.parse
import weakref
import zlib
import zoneinfo
from typing import Any, Callable, Iterable, NamedTuple

try:
    import fcntl
    import resource
except ImportError:  # Windows: liveness falls back to heartbeats and leases
    fcntl = resource = None

__all__ = [
    "Blero", "new", "Job", "JobInfo", "ScheduleInfo", "BleroError", "JobFailed",
    "JobCancelled", "Snooze", "STATES", "Task", "JobFuture", "Executor",
]
__version__ = "1.0.0"

log = logging.getLogger("blero")
log.addHandler(logging.NullHandler())


# ---------------------------------------------------------------------------
# Settings and errors
# ---------------------------------------------------------------------------

STATES = ("pending", "inprogress", "complete", "failed", "cancelled")


class BleroError(Exception):
    """A queue that cannot do what was asked: a bad file, a storage failure,
    or a call out of turn (enqueue before start, say)."""


class JobFailed(BleroError):
    """Raised by `Blero.wait` for a job that ended `failed`; `.error` is its
    error text (with the traceback), `.exception` the processor's original
    exception when it could be serialized and restored, else None."""

    def __init__(self, job_id: int, error: str | None, exception: BaseException | None = None):
        super().__init__(f"job {job_id} failed: {error}")
        self.job_id = job_id
        self.error = error
        self.exception = exception


class JobCancelled(BleroError, concurrent.futures.CancelledError):
    """Raised by `Blero.wait` and `JobFuture.result` for a job that was
    cancelled; a `concurrent.futures.CancelledError` too, as `result()`
    raises for a future cancelled by `future.cancel()`, so that one
    `except CancelledError` serves for both."""

    def __init__(self, job_id: int):
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


class Snooze(Exception):
    """Raised by a processor: put the job back to pending, due in `seconds`.

    The try counts in `attempt` but uses up none of the job's tries."""

    def __init__(self, seconds: float | datetime.timedelta):
        self.seconds = _seconds("seconds", seconds)
        super().__init__(f"snoozed for {self.seconds:g} s")


class _Settings:
    """The keyword settings of `new`, checked once."""

    __slots__ = ("sync", "retries", "backoff_base", "backoff_max", "lease",
                 "keep_complete", "on_complete", "on_failed", "serializer", "schema")

    def __init__(self, sync="normal", retries=3, backoff_base=1.0,
                 backoff_max=300.0, lease=10.0, keep_complete=None,
                 on_complete=None, on_failed=None, serializer=pickle, schema=None):
        if sync not in ("normal", "full"):
            raise ValueError(f"sync must be 'normal' or 'full', not {sync!r}")
        self.sync = sync
        self.retries = _retries("retries", retries)
        self.backoff_base = _seconds("backoff_base", backoff_base)
        self.backoff_max = _seconds("backoff_max", backoff_max)
        self.lease = _seconds("lease", lease, least=_MIN_LEASE)
        self.keep_complete = _seconds("keep_complete", keep_complete, optional=True)
        for name, fn in (("on_complete", on_complete), ("on_failed", on_failed)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
            if _is_async(fn):   # it would make a coroutine that nothing awaits
                raise TypeError(f"{name} is an async function: async callbacks are "
                                f"not supported yet; give a plain function")
        self.on_complete = on_complete
        self.on_failed = on_failed
        if not (callable(getattr(serializer, "dumps", None))
                and callable(getattr(serializer, "loads", None))):
            raise TypeError("serializer needs dumps() and loads(), like pickle or json")
        self.serializer = serializer
        if schema is not None:
            if not isinstance(schema, str):
                raise TypeError(f"schema must be a str, not {type(schema).__name__}")
            if not _PG_IDENTIFIER.match(schema):
                raise ValueError(f"schema must be a name of letters, digits and _ (not "
                                 f"starting with a digit, at most 63), not {schema!r}")
        self.schema = schema


# Every number the API takes goes through one of these, at the call: a value
# that would hang a wait (NaN), spin a timer, or escape later as a raw
# OverflowError from sqlite3 is refused there, naming the argument.

_INT_MIN, _INT_MAX = -2 ** 63, 2 ** 63 - 1   # what an SQLite INTEGER holds
# The shortest lease: owners heartbeat every lease/3 and look for dead ones
# every lease/4 (at most 0.5 s), so 0.1 s is already a commit every 33 ms;
# and a lease shorter than a heartbeat's commit takes would judge live
# owners dead (where no OS lock tells).
_MIN_LEASE = 0.1


def _shown(value) -> str:
    """A bad value for a message: an int too long to print whole, by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 20:
        return f"an int of {value.bit_length()} bits"
    return repr(value)


def _integer(name: str, value, least: int = 0, most: int = _INT_MAX) -> int:
    """An int from `least` to `most` (by default 0 to SQLite's largest)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be {least} or more, not {_shown(value)}")
    if value > most:
        raise ValueError(f"{name} must be at most {most}, not {_shown(value)}")
    return value


def _retries(name: str, value) -> int:
    # max_attempts, 1 + retries, is stored as an SQLite INTEGER too.
    return _integer(name, value, most=_INT_MAX - 1)


def _job_id(name: str, value) -> int:
    return _integer(name, value, least=1)


def _seconds(name: str, value, positive: bool = False, least: float = 0.0,
             optional: bool = False) -> float | None:
    """A duration in seconds (a number or a timedelta), finite and at least
    `least` (more than 0 with `positive`); None passes with `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds{' or None' if optional else ''},"
                        f" not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:     # an int past any float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < least or (positive and seconds <= 0):
        bound = ("more than 0" if positive else "0 or more" if least == 0
                 else f"{least:g} or more")
        raise ValueError(f"{name} must be a finite number of seconds, {bound}"
                         f"{' (or None)' if optional else ''}, not {_shown(value)}")
    return seconds


def _is_async(fn) -> bool:
    """An `async def` function (or bound method, or partial of one), or an
    object whose `__call__` is one: calling it only makes a coroutine."""
    return fn is not None and any(
        inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)
        for f in (fn, getattr(fn, "__call__", None)))


class _Bell:
    """Wakes the threads that sleep on it, when rung, safely from a Ctrl-C in
    either: the main thread's, where a KeyboardInterrupt may raise between
    any two calls.  A Condition is not safe so: an interrupted `with cond:`
    or `cond.wait()` can leave its lock held (and the next thread to notify
    waits for ever) or unowned (and a RuntimeError replaces the
    KeyboardInterrupt).  Here nothing is held: a sleeper sleeps on a locked
    lock of its own, in `_sleepers`, which `ring` releases; one that an
    interrupted sleeper left there goes at the next ring."""

    def __init__(self):
        self._sleepers: set = set()

    def sleeper(self):
        """A sleeper, woken from now on by `ring`: made before a look at
        what one waits for, it misses no ring after the look."""
        woken = threading.Lock()
        woken.acquire()
        self._sleepers.add(woken)
        return woken

    def sleep(self, woken, timeout: float | None) -> None:
        """Sleep until `woken` is rung, or for `timeout` seconds."""
        try:
            woken.acquire(True, -1 if timeout is None
                          else min(max(timeout, 0.0), threading.TIMEOUT_MAX))
        finally:
            self._sleepers.discard(woken)

    def forget(self, woken) -> None:
        """`woken` will not sleep after all."""
        self._sleepers.discard(woken)

    def ring(self) -> None:
        """Wake every sleeper: released, then dropped (a Ctrl-C between the
        two leaves it to the next ring, never unreleased and gone)."""
        for woken in list(self._sleepers):
            try:
                woken.release()
            except RuntimeError:    # released already, by another ring
                pass
            self._sleepers.discard(woken)


def _start_thread(thread: threading.Thread) -> None:
    """`thread.start()`, safe from a Ctrl-C.  Thread.start waits on a
    threading.Event of the thread's, where a KeyboardInterrupt can leave its
    lock held (then the new thread waits for ever, before it runs) or raise
    RuntimeError in its place (see _Bell): so on the main thread the
    Python handlers of SIGINT and SIGTERM are put off until it has started,
    then called.  (Not a blocked signal mask: another thread of the program
    may take the signal, and its handler still runs here at once.)"""
    if threading.current_thread() is not threading.main_thread():
        thread.start()
        return
    came: list[int] = []
    put_off: dict[int, Callable] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if callable(handler):
                put_off[sig] = handler
                signal.signal(sig, lambda signum, frame: came.append(signum))
        thread.start()
    finally:
        # SIGINT's handler back last: the Ctrl-C it may raise at once then
        # comes with every handler back in place.  The put-off calls: SIGINT's
        # last too, as it raises.
        for sig in sorted(put_off, key=lambda s: s == signal.SIGINT):
            signal.signal(sig, put_off[sig])
        for signum in sorted(set(came), key=lambda s: s == signal.SIGINT):
            put_off[signum](signum, inspect.currentframe())


class _Event(_Bell, threading.Event):
    """A threading.Event safe from a Ctrl-C in the threads that wait for it
    or set it, as a _Bell is."""

    def __init__(self):     # (not threading.Event's: no Condition)
        super().__init__()
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    isSet = is_set

    def set(self) -> None:
        self._flag = True
        self.ring()

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        if not self._flag:
            woken = self.sleeper()
            if self._flag:      # set meanwhile: rung before `woken` was there, maybe
                self.forget(woken)
            else:
                self.sleep(woken, timeout)
        return self._flag


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------

_cancel_lock = threading.Lock()


class Job:
    """A job as its processor sees it.

    `attempt` is 1 on the first try; `cancelled` is a `threading.Event` set
    when the try times out, the job is cancelled, or `stop` runs out of time:
    a long job should check it and return early.
    """

    __slots__ = ("id", "name", "data", "attempt", "max_attempts", "priority",
                 "key", "enqueued_at", "timeout", "checkpointed", "_event", "_cancelled",
                 "_on_cancel", "_flow", "_progress", "_owner")

    def __init__(self, id, name, data, attempt, max_attempts, priority, key,
                 enqueued_at, timeout=None, checkpointed=None):
        self.id = id
        self.name = name
        self.data = data
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.priority = priority
        self.key = key
        self.enqueued_at = enqueued_at
        self.timeout = timeout
        self._event = None      # made on first use: most jobs never need one
        self._cancelled = False
        self._on_cancel = None  # an async try's: cancels its coroutine
        # The last value checkpoint() stored, by this try or an earlier one
        # (serialized until the try begins).
        self.checkpointed = checkpointed
        self._flow = None       # the dispatcher running this try
        self._progress = None   # the latest progress() value, serialized
        self._owner = None      # the owner that claimed this try: it records its outcome

    @property
    def cancelled(self) -> threading.Event:
        """Set when this try should stop: timeout, `cancel`, or `stop` running out."""
        if self._event is None:
            with _cancel_lock:
                if self._event is None:
                    self._event = _Event()  # cancel() sets it, maybe from the main thread
                    if self._cancelled:
                        self._event.set()
        return self._event

    def progress(self, value: Any) -> None:
        """Report how far this try has got: a number from 0 to 1, or any
        value the serializer takes.  Cheap: the latest value is stored at
        least once a second, and when the try ends (`JobInfo.progress`)."""
        self._running().progress(self, value)

    def checkpoint(self, value: Any) -> None:
        """Store `value` durably (it returns once committed): every later
        try of this job finds it as `checkpointed`, to resume from there."""
        self._running().checkpoint(self, value)

    def _running(self):
        if self._flow is None:
            raise BleroError(f"job {self.id}: progress() and checkpoint() are for a "
                             f"processor, during its try")
        return self._flow

    def _cancel(self) -> None:
        with _cancel_lock:
            self._cancelled = True
            event, on_cancel = self._event, self._on_cancel
        if event is not None:
            event.set()
        if on_cancel is not None:
            on_cancel()

    def __repr__(self):
        return (f"Job(id={self.id}, name={self.name!r}, data={self.data!r}, "
                f"attempt={self.attempt}/{self.max_attempts})")


class JobInfo(NamedTuple):
    """A job as stored: what `get_job` and `jobs` return.

    Times are epoch seconds; `run_at` is when the job may next run, and
    `started_at`/`finished_at` are None until then.  `error` is the text of
    the last failure, with its traceback.  `after` holds the ids of the
    jobs it waits on (`enqueue(after=...)`), in the order given.
    """

    id: int
    name: str
    data: Any
    state: str
    attempt: int
    max_attempts: int
    priority: int
    key: str | None
    result: Any
    error: str | None
    created_at: float
    run_at: float
    started_at: float | None
    finished_at: float | None
    progress: Any           # what the processor last reported by job.progress(), or None
    after: tuple[int, ...] = ()


class ScheduleInfo(NamedTuple):
    """A recurring job as stored: what `schedules` returns.

    Either `interval` (seconds, of `every`) or `cron` (the expression, with
    `tz` its zone name, None for local time) is set, the other None.
    `next_due` is when the next run is due (epoch seconds); `job_id` is the
    last run's id, None before the first."""

    key: str
    name: str
    data: Any
    interval: float | None
    cron: str | None
    tz: str | None
    next_due: float
    job_id: int | None


# ---------------------------------------------------------------------------
# Cron expressions: when a cron schedule is due
# ---------------------------------------------------------------------------
#
# Five fields, read as Vixie cron reads them.  Due times are found on the
# wall clock of the schedule's zone, a day at a time, and each is turned into
# an instant: a wall time that a DST change skips runs at the first minute
# after the gap, and one that it repeats runs once, at its first occurrence
# (a wall time maps to its instant with fold=0, so the second pass of a
# repeated hour maps to instants already past).

_CRON_FIELDS = (   # (name, least, most, the names of its values from `least` on)
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP",
                      "OCT", "NOV", "DEC")),
    ("day of week", 0, 7, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)
_CRON_ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
                 "@annually": "0 0 1 1 *"}
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)   # at most, by month
_MINUTE = datetime.timedelta(minutes=1)
_DAY = datetime.timedelta(days=1)


class _Cron(NamedTuple):
    """A parsed cron expression: the values each field matches."""

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset
    months: frozenset
    weekdays: frozenset         # 0 is Sunday
    # Vixie cron: a day field that starts with "*" does not restrict; when
    # both restrict, a day matching either matches.
    either_day: bool


def _cron_field(text: str, name: str, least: int, most: int, names: tuple) -> set[int]:
    """The values one field matches; ValueError naming the field."""

    def value(word: str) -> int:
        if word.isascii() and word.isdigit():
            n = int(word)
            if not least <= n <= most:
                raise ValueError(f"{name} must be {least} to {most}, not {n}")
            return n
        if word.upper() in names:
            return least + names.index(word.upper())
        if not word:
            raise ValueError(f"{name}: {text!r} is incomplete")
        raise ValueError(f"{name}: {word!r} is not a number"
                         f"{' or a name (' + ', '.join(names[:3]) + ', ...)' if names else ''}")

    values: set[int] = set()
    for part in text.split(","):
        span, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()):
                raise ValueError(f"{name}: the step of {part!r} must be a number")
            step = int(step_text)
            if step < 1:
                raise ValueError(f"{name}: the step of {part!r} must be 1 or more")
        if span == "*":
            first, last = least, most
        else:
            start, dash, end = span.partition("-")
            if slash and not dash:
                raise ValueError(f"{name}: a step goes with * or a range (a-b/n), "
                                 f"not {part!r}")
            first = value(start)
            last = value(end) if dash else first
            if first > last:
                raise ValueError(f"{name}: the range {span!r} goes backwards")
        values.update(range(first, last + 1, step))
    return values


@functools.lru_cache(maxsize=256)
def _parse_cron(expr: str) -> _Cron:
    """Parse a cron expression; ValueError naming the field at fault."""
    if not isinstance(expr, str):
        raise TypeError(f"a cron expression must be a str, not {type(expr).__name__}")
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() not in _CRON_ALIASES:
            raise ValueError(f"cron expression {expr!r}: unknown alias (known: "
                             f"{', '.join(_CRON_ALIASES)})")
        text = _CRON_ALIASES[text.lower()]
    fields = text.split()
    if not fields:
        raise ValueError("a cron expression must not be empty")
    if len(fields) != 5:
        raise ValueError(f"cron expression {expr!r}: {len(fields)} fields, not 5 "
                         f"(minute, hour, day of month, month, day of week)")
    try:
        sets = [_cron_field(f, *spec) for f, spec in zip(fields, _CRON_FIELDS)]
    except ValueError as exc:
        raise ValueError(f"cron expression {expr!r}: {exc}") from None
    minutes, hours, days, months, weekdays = sets
    weekdays = {d % 7 for d in weekdays}
    either = not fields[2].startswith("*") and not fields[4].startswith("*")
    if not either and min(days) > max(_MONTH_DAYS[m - 1] for m in months):
        raise ValueError(f"cron expression {expr!r}: never due (day of month "
                         f"{min(days)} is past the end of every month it names)")
    return _Cron(tuple(sorted(minutes)), tuple(sorted(hours)), frozenset(days),
                 frozenset(months), frozenset(weekdays), either)


def _wall(t: float, tz: datetime.tzinfo | None) -> datetime.datetime:
    """The wall-clock time (naive) of instant `t` in `tz` (None: local time)."""
    return datetime.datetime.fromtimestamp(t, tz).replace(tzinfo=None)


def _instant(wall: datetime.datetime, tz: datetime.tzinfo | None) -> float:
    """When wall time `wall` of `tz` is due: its first occurrence, or the
    first minute after it if a DST change skips it."""
    t = wall.replace(tzinfo=tz).timestamp()
    while _wall(t, tz) != wall:     # skipped: the first minute that exists after it
        wall += _MINUTE
        t = wall.replace(tzinfo=tz).timestamp()
    return t


def _cron_next(expr: str, after: float, tz: datetime.tzinfo | None) -> float:
    """The first due time of a cron expression after instant `after`."""
    cron = _parse_cron(expr)
    start = _wall(after, tz).replace(second=0, microsecond=0) + _MINUTE
    day = start.date()
    for _ in range(366 * 50):   # any expression _parse_cron takes is due well within
        if day.month in cron.months:
            in_days = day.day in cron.days
            in_weekdays = day.isoweekday() % 7 in cron.weekdays
            if (in_days or in_weekdays) if cron.either_day else (in_days and in_weekdays):
                for hour in cron.hours:
                    for minute in cron.minutes:
                        wall = datetime.datetime(day.year, day.month, day.day, hour, minute)
                        if wall >= start:
                            t = _instant(wall, tz)
                            if t > after:
                                return t
        day += _DAY
    raise ValueError(f"cron expression {expr!r}: not due within 50 years")


_OFFSET = re.compile(r"([+-])(\d\d):(\d\d)")   # a fixed zone, as stored


def _zone_name(tz) -> str | None:
    """What a cron schedule stores of `tz` (None: local time): an IANA zone
    name, or a fixed offset `+HH:MM`.  ValueError for a zone that does not
    exist, TypeError for a tzinfo that names no zone."""
    if tz is None:
        return None
    if isinstance(tz, datetime.timezone):
        offset = tz.utcoffset(None)
        sign = "-" if offset < datetime.timedelta(0) else "+"
        minutes = abs(offset) // _MINUTE
        if abs(offset) % _MINUTE:
            raise ValueError(f"tz: an offset of whole minutes, not {offset}")
        return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    if isinstance(tz, datetime.tzinfo):
        name = getattr(tz, "key", None) or getattr(tz, "zone", None)   # zoneinfo, pytz
        if not isinstance(name, str):
            raise TypeError(f"tz: {tz!r} names no IANA zone; give a zone name, a "
                            f"zoneinfo.ZoneInfo or a datetime.timezone")
        tz = name
    if not isinstance(tz, str):
        raise TypeError(f"tz must be a zone name or a tzinfo, not {type(tz).__name__}")
    _zone(tz)
    return tz


@functools.lru_cache(maxsize=64)
def _zone(name: str | None) -> datetime.tzinfo | None:
    """The tzinfo of a stored zone name (None: local time)."""
    if name is None:
        return None
    fixed = _OFFSET.fullmatch(name)
    if fixed:
        sign, hours, minutes = fixed.groups()
        offset = datetime.timedelta(hours=int(hours), minutes=int(minutes))
        return datetime.timezone(-offset if sign == "-" else offset)
    try:
        return zoneinfo.ZoneInfo(name)
    except Exception as exc:    # not found, a malformed key, no tz database
        raise ValueError(f"tz: no time zone named {name!r} ({type(exc).__name__}: "
                         f"{exc}; an IANA name such as 'Europe/Berlin')") from None


# ---------------------------------------------------------------------------
# Storage: the queue file, and every SQL statement blero runs
# ---------------------------------------------------------------------------
#
# One table holds every job.  Its `state` column splits "pending" in three so
# that each question the dispatcher asks is one seek in a small partial index:
# READY jobs by (priority, id) for "next job", DELAYED ones (waiting for a time,
# or to retry) by run_at, SUSPECT ones (handed back because their process
# died, so perhaps what killed it: run alone, see _CrashGuard) by (priority,
# id), RUNNING ones by the owner that claimed them, WAITING ones (on the jobs
# their `after=` names, listed in blero_deps) by id.  The finished ones are
# only in an index by finish time, for sweeping and for the dashboard's
# throughput, so keeping millions of them slows no claim.

_READY, _DELAYED, _RUNNING, _COMPLETE, _FAILED, _CANCELLED, _SWEPT = range(7)
_SUSPECT = -1       # below READY, so that "state >= 3" still means finished
_WAITING = -2       # on its `after=` jobs; below the rest, so "state < 3" still means not ended
_STATE_NAME = {_WAITING: "pending", _SUSPECT: "pending", _READY: "pending", _DELAYED: "pending",
               _RUNNING: "inprogress", _COMPLETE: "complete", _FAILED: "failed",
               _CANCELLED: "cancelled"}
_STATE_CODES = {"pending": (_WAITING, _DELAYED), "inprogress": (_RUNNING, _RUNNING),
                "complete": (_COMPLETE, _COMPLETE), "failed": (_FAILED, _FAILED),
                "cancelled": (_CANCELLED, _CANCELLED)}



# -- What crosses into and out of storage: named tuples, never positions -------
#
# Each is also a statement's parameters or a row in its column order (the SQL
# below names the columns in the same order), so nothing is copied to cross.

class _NewJob(NamedTuple):
    """A job to store, as `Blero` checked it (`_INSERT`'s columns)."""

    state: int              # _READY, or _DELAYED when run_at is in the future
    priority: int
    run_at: float
    name: str
    data: Any               # serialized
    max_attempts: int
    timeout: float | None
    key: str | None
    created_at: float
    runner: str | None = None   # whose workers may run it (see _TASK_RUNNER)


class _Claim(NamedTuple):
    """A job claimed by a worker: what it needs to run a try (`_JOB_COLUMNS`,
    in `Job`'s argument order)."""

    id: int
    name: str
    data: Any               # serialized
    attempt: int
    max_attempts: int
    priority: int
    key: str | None
    created_at: float
    timeout: float | None
    checkpoint: Any         # serialized


class _Finish(NamedTuple):
    """The end of one try, to record (`_FINISH`'s parameters): it changes the
    job only while the claim (owner, attempt) that ran it still holds."""

    state: int
    run_at: float | None    # when it may run again, if it may
    finished_at: float | None
    result: Any             # serialized
    error: str | None
    given_back: int         # 1: cut short by a deliberate stop, no try used up
    progress: Any           # serialized; None: as stored
    id: int
    owner: int
    attempt: int


# A stored job, every column `JobInfo` shows (`_INFO_COLUMNS`), with its
# state as stored (a code) and its data and result serialized: JobInfo's
# fields, so that the two never drift.
_Stored = collections.namedtuple("_Stored", JobInfo._fields)


class _Mark(NamedTuple):
    """A running try's progress or checkpoint, to store (`_PROGRESS`'s and
    `_SAVE_CHECKPOINT`'s parameters)."""

    value: Any              # serialized
    id: int
    owner: int
    attempt: int
class _Claimed(NamedTuple):
    """What `finish_and_claim` did, in one transaction."""

    recorded: bool                      # the finished try was recorded
    claim: _Claim | None                # the job claimed, if any
    suspects_left: frozenset | None     # a suspect sought, none found: the kinds left
    # Names of jobs the finish made ready (their last `after=` job completed),
    # and, while pauses or limits are stored, the finished job's own name (a
    # slot of its limit came free): idle workers that take them look again.
    wake: tuple[str, ...] = ()
    delayed: float | None = None        # when the first job it made ready but delayed is due
    held: bool = False                  # pauses or limits are stored
    due: float | None = None            # when a rate limit lets one more job start
    cancelled: int = 0                  # jobs cancelled down the chain of a failed one


class _Ended(NamedTuple):
    """What `wait` reads of a job until it ends (`_OUTCOME`'s columns)."""

    state: int
    result: Any
    error: str | None


class _ProcessorSeen(NamedTuple):
    """What an owner tells other processes of its processors, alike ones
    together: what runs the jobs, the job names it takes (None: any) and how
    many jobs it runs at once."""

    name: str                    # the function's (or object's) name
    names: tuple | None          # sorted
    concurrency: int


class _OwnerSeen(NamedTuple):
    """An owner registered, or holding jobs though unregistered (`_OWNERS`;
    all but `id` None then)."""

    id: int
    heartbeat_at: float | None   # None: not registered
    takes: frozenset | None      # the job names its processors take; None: any name
    host: str | None             # None also for an owner that a blero.py of schema 2 wrote
    pid: int | None
    started_at: float | None
    processors: tuple[_ProcessorSeen, ...] | None   # None: not told (schema 2)


class _Schedule(NamedTuple):
    """A recurring job to store (`_UPSERT_SCHEDULE`'s parameters)."""

    key: str
    name: str
    data: Any               # serialized
    interval: float         # 0 for a cron schedule
    next_due: float
    priority: int
    retries: int | None     # None: the queue's setting at each run
    timeout: float | None
    cron: str | None        # a cron schedule's expression
    tz: str | None          # and its zone (`_zone_name`); None: local time
    runner: str | None = None   # its runs' (a task's schedule: _TASK_RUNNER)


class _DueSchedule(NamedTuple):
    """A schedule whose next run is due (`_DUE_SCHEDULES`'s columns), with
    what is known of its last run."""

    key: str
    name: str
    data: Any
    interval: float
    next_due: float
    priority: int
    retries: int | None
    timeout: float | None
    cron: str | None
    tz: str | None
    job_id: int | None          # its last run
    last_created: float | None
    last_started: float | None
    runner: str | None          # its runs'

    def following(self, t: float) -> float:
        """When this schedule is next due after a run due at `t`."""
        if self.cron is None:
            return t + self.interval
        return _cron_next(self.cron, t, _zone(self.tz))


# A stored schedule, ScheduleInfo's fields (`_SCHEDULES`'s columns), its
# data serialized and its interval 0 for a cron schedule.
_StoredSchedule = collections.namedtuple("_StoredSchedule", ScheduleInfo._fields)


_SWEEP_START = (-math.inf, 0)   # where a sweep starts: the (finished_at, id) seen last


def _chain_error(dep: int, how: str) -> str:
    """The error of a job cancelled because job `dep`, which it waits on, ended `how`."""
    return f"cancelled: job {dep}, which it waits on (after=), ended {how}"


def _rate_window(per: float) -> float:
    """How long a rate limit of n starts per `per` seconds counts each start:
    a little longer than `per` (10%, at most 0.1 s), because a try begins a
    moment after its claim (after the commit; on a server, a round trip
    later): so the limit holds by the processors' own clocks too, not only
    by the claims', unless one try begins over 0.1 s later than another."""
    return per + min(0.1, per / 10)


class _Storage:
    """Where the jobs live: the interface the dispatcher and `Blero` use, in
    their words, with named tuples in and out.  One subclass per engine
    keeps what is its own: `_SQLiteStorage` (a file) and, for a server,
    `_PostgresStorage`.

    Every method may be called from any thread.  Each write is atomic and
    committed when the method returns (a BleroError naming the cause if it
    could not be); reads see every commit made before the call.
    """

    path: str      # the target as the user gave it: what messages name
    # Why this queue cannot be changed, when `open` found storage this
    # process cannot write and opened it for inspection only (every write
    # then raises BleroError saying so); None when it can be.
    read_only: str | None = None

    def open(self, create: bool, check: bool = False) -> None:
        """Open (or, with `create`, create) the queue; raise BleroError naming
        the target and the cause, with nothing changed, if it is not a blero
        queue this code can use.  With `check`, look for damage everywhere
        first: start() does, before its workers write for hours on it; an
        inspection reads only what it needs, and meets damage there.
        Without `create`, storage this process cannot write (a snapshot, a
        backup, a read-only mount) is opened for inspection only, writing
        nothing at all: `read_only` then says why."""
        raise NotImplementedError

    def writable(self) -> None:
        """Raise BleroError saying why, when the queue is open read-only."""
        if self.read_only is not None:
            raise BleroError(f"{self.path}: read-only storage ({self.read_only}): "
                             f"the queue can be inspected, not changed")

    def close(self) -> None:
        """Close every connection once the writes under way are done; later
        calls raise BleroError ("the queue is stopped")."""
        raise NotImplementedError

    def insert(self, rows: list[_NewJob], connection=None,
               after: list[tuple[int, ...]] | None = None) -> tuple[list[int], list[bool]]:
        """Store new jobs; return their ids, and for each whether it was
        stored: a job whose key is already stored stores nothing and gets
        that job's id.  `after`, if given, holds for each row the ids of the
        jobs it waits on (most often none): such a job waits until they are
        all complete (one swept counts as complete), and is cancelled at once
        if one of them ended failed or cancelled; an id never given raises
        ValueError, and then nothing is stored.  With `connection` (the
        caller's own, on the same database: else ValueError), write them in
        the caller's open transaction, committing nothing: they exist once
        the caller commits."""
        raise NotImplementedError

    def finish_and_claim(self, finish: _Finish | None, owner: int,
                         names: frozenset | None, claim: bool, suspect: bool = False,
                         exclude: frozenset = frozenset(),
                         runner: str | None = None) -> _Claimed:
        """In one transaction, record a finished try and claim the next ready
        job (or, with `suspect`, the next suspect) this worker accepts: one
        of `names` (a job of enqueue(), or a call of the executor `runner`,
        or with None of a task), or with None any name but those in
        `exclude`, and no task's or executor's call (see _TASK_RUNNER).  A finish
        that completes a job makes ready its dependants whose `after` jobs
        are all complete now; one that ends it failed cancels its
        dependants, and theirs, down the chain.  The claim obeys the pauses
        and limits stored, checked in the same transaction: it never takes
        a job of a paused name, nor one over a limit, not even for an
        instant, whatever other processes claim meanwhile."""
        raise NotImplementedError

    def progress(self, marks: list[_Mark]) -> None:
        """Store running tries' progress (of those whose claims still hold)."""
        raise NotImplementedError

    def checkpoint(self, mark: _Mark) -> bool:
        """Store a running try's checkpoint; False if its claim no longer holds."""
        raise NotImplementedError

    def record(self, finish: _Finish) -> bool:
        """Record the end of one try; False if its claim no longer holds."""
        return self.finish_and_claim(finish, 0, None, False).recorded

    def suspect_kinds(self) -> frozenset:
        """The kinds of the suspect jobs, (name, runner) pairs (see _CrashGuard)."""
        raise NotImplementedError

    def release(self, owner: int, outcome: Callable[[_Claim], _Finish], drop_owner: bool,
                started: set[tuple[int, int]] | None = None,
                unclaimed: int = _READY) -> tuple[list[_Claim], int]:
        """Hand back every job `owner` holds, each as `outcome(claim)` says.
        With `started`, (id, attempt) pairs, the claims of tries not in it
        are undone instead (back to state `unclaimed`): those tries never
        began.  Returns the claims whose outcome was recorded, and how many
        claims were undone."""
        raise NotImplementedError

    def unclaim(self, job_id: int, owner: int, attempt: int, state: int = _READY) -> None:
        """Undo `owner`'s claim of a job whose try `attempt` never began: it
        goes back to `state`."""
        raise NotImplementedError

    def running_ids(self, owner: int) -> set[int]:
        """Ids of the jobs `owner` holds now."""
        raise NotImplementedError

    def promote(self, now: float) -> tuple[int, float | None]:
        """Make delayed jobs whose time has come ready, up to a slice of them;
        return how many, and when the next one is due (now, if more are)."""
        raise NotImplementedError

    def next_delayed(self) -> float | None:
        """When the earliest delayed job is due, or None."""
        raise NotImplementedError

    def hold_owner(self, owner: int) -> None:
        """Mark `owner` alive, for every process sharing the queue, until
        release_owner or until this process (or its session) ends, however
        it ends."""
        raise NotImplementedError

    def release_owner(self, owner: int) -> None:
        """`owner` is gone: this run of the queue has stopped."""
        raise NotImplementedError

    def owner_alive(self, owner: int) -> bool | None:
        """True or False where the engine can tell at once; None where only
        its heartbeats and the lease can."""
        raise NotImplementedError

    def owner_lost(self, owner: int) -> bool:
        """True once `owner`, held here, lost its liveness without a
        release_owner (a server's session ended): other processes may take
        its jobs now, so it must carry on as a new owner."""
        return False

    def heartbeat(self, owner: int, now: float, takes: frozenset | None,
                  processors: tuple[_ProcessorSeen, ...]) -> None:
        """Register `owner` as alive, or renew it: tell other processes, which
        may not see its liveness, that it is alive; its claims need it too.
        Store with it this host's name, this process's id, the job names its
        processors take now (`takes`; None: any name) and its processors, for
        other processes to see in `owners()`."""
        raise NotImplementedError

    def owners(self) -> list[_OwnerSeen]:
        """Every owner registered or holding jobs, with its last heartbeat
        and what it told of itself."""
        raise NotImplementedError

    def running_by_owner(self) -> dict[int, int]:
        """How many jobs each owner holds now."""
        raise NotImplementedError

    def alive(self, seen: _OwnerSeen, lease: float, now: float) -> bool:
        """Whether an owner lives: as the engine tells at once where it can,
        else by a heartbeat less than `lease` seconds old."""
        alive = self.owner_alive(seen.id)
        if alive is None:
            alive = seen.heartbeat_at is not None and now - seen.heartbeat_at <= lease
        return alive

    def untaken(self, lease: float) -> dict[str, int]:
        """The names of pending jobs that no live owner's processors take,
        each with how many of them are pending: jobs that wait for a
        processor no running queue has (a typo in a name, say).  Owners
        judged as `alive` says."""
        now = time.time()
        taken: set[str] = set()
        any_name = False    # a processor of any name, which takes no task's or executor's call
        for seen in self.owners():
            if seen.id is not None and self.alive(seen, lease, now):
                if seen.takes is None:
                    any_name = True
                else:
                    taken |= seen.takes
        untaken: dict[str, int] = {}
        for name, call, n in self.pending_by_name():
            if name not in taken and not (any_name and not call):
                untaken[name] = untaken.get(name, 0) + n
        return untaken

    def pending_by_name(self) -> list[tuple[str, bool, int]]:
        """How many jobs of each name are pending: (name, whether they are
        task or executor calls, how many)."""
        raise NotImplementedError

    def changed_elsewhere(self) -> bool:
        """True when another process may have committed since the last call
        (new work, a cancel, an ended job where `tells_of_ends`); cheap: the
        clock asks often."""
        raise NotImplementedError

    # Whether changed_elsewhere() tells of the jobs other processes end, too
    # (a file's change counter tells of every commit); a server's
    # notifications tell only of what workers act on, so there the ends of
    # others' jobs are seen by looking.
    tells_of_ends = True

    def on_change(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` (from any thread, quickly) as soon as the engine
        hears of another process's commit, so that changed_elsewhere need
        not wait for the next poll; engines that only poll ignore it."""

    def cancel(self, job_id: int, now: float,
               pending_only: bool = False) -> tuple[int, int | None, int] | None:
        """Cancel a pending or running job (only a pending one with
        `pending_only`), and its dependants down the chain; return its
        (state, owner) before and how many dependants were cancelled, or
        None if it had already ended (or started) or does not exist."""
        raise NotImplementedError

    def clear_keys(self, ids: list[int]) -> None:
        """Take the keys off these jobs: enqueueing with their keys stores
        new jobs from now on."""
        raise NotImplementedError

    def run_by(self, ids: list[int], runner: str | None) -> None:
        """These jobs, those not started yet, are `runner`'s from now on."""
        raise NotImplementedError

    def retry_failed(self, ids: Iterable[int] | None, retries: int, now: float) -> int:
        """Give failed jobs a fresh set of tries; return how many."""
        raise NotImplementedError

    def sweep(self, before: float, states: tuple[int, ...]) -> int:
        """Delete jobs in `states` that finished at or before `before`;
        return how many."""
        gone, after = 0, _SWEEP_START
        while after is not None:
            n, after = self.sweep_slice(before, states, after)
            gone += n
        if gone:
            self.give_back()
        return gone

    def sweep_slice(self, before: float, states: tuple[int, ...],
                    after: tuple[float, int]) -> tuple[int, tuple[float, int] | None]:
        """One slice of a sweep, from `after` (`_SWEEP_START` at first): return
        how many jobs it deleted, and where the next slice starts (None: done)."""
        raise NotImplementedError

    def give_back(self) -> None:
        """Give the space of swept jobs back, a slice per write transaction."""
        while self.give_back_slice():
            pass

    def give_back_slice(self) -> bool:
        """One slice of give_back, some ms long (as a sweep slice); True while
        more is left to give back."""
        raise NotImplementedError

    def compact(self) -> None:
        """Give space back now, as the queue stops, waiting for no one."""
        raise NotImplementedError

    def upsert_schedule(self, row: _Schedule) -> None:
        """Create or update a schedule (its next_due: the first run's time)."""
        raise NotImplementedError

    def drop_schedule(self, key: str) -> bool:
        """Remove a schedule; False if there was none."""
        raise NotImplementedError

    def schedules(self) -> list[_StoredSchedule]:
        """Every schedule, by key."""
        raise NotImplementedError

    def run_schedules(self, now: float, make_row: Callable[[_DueSchedule, float], _NewJob],
                      since: float) -> tuple[list[str], float | None]:
        """Enqueue one run of each schedule that is due and has none
        outstanding (this queue started at `since`).  Returns (new ready job
        names, when to look next)."""
        raise NotImplementedError

    def set_paused(self, name: str | None, paused: bool) -> None:
        """Pause or resume jobs of `name` (None: every name; resuming None
        resumes every name)."""
        raise NotImplementedError

    def paused(self) -> set[str | None]:
        """The names paused (None: every name is)."""
        raise NotImplementedError

    def set_limit(self, name: str, concurrency: int | None,
                  rate: tuple[int, float] | None) -> None:
        """Store the limit of jobs named `name` (neither: remove it)."""
        raise NotImplementedError

    def limits(self) -> dict[str, tuple[int | None, tuple[int, float] | None]]:
        """Every limit stored: name -> (concurrency, rate)."""
        raise NotImplementedError

    def claims_settled(self) -> None:
        """Return once every claim begun before a pause or limit change that
        returned has been committed (or given up)."""
        raise NotImplementedError

    def running_by_name(self) -> dict[str, int]:
        """How many jobs of each name are in progress."""
        raise NotImplementedError

    def last_claim(self, name: str | None) -> float | None:
        """When the newest try of `name` (None: any) still in progress was
        claimed, or None."""
        raise NotImplementedError

    def get(self, job_id: int) -> _Stored | None:
        """A stored job, or None."""
        raise NotImplementedError

    def outcome(self, job_id: int) -> _Ended | None:
        """What `wait` looks at until the job ends, without reading its
        data; None if there is no such job."""
        raise NotImplementedError

    def outcomes(self, ids: list[int]) -> dict[int, _Ended]:
        """`outcome` of many jobs at once, by id; those that do not exist left out."""
        raise NotImplementedError

    def list(self, state: str | None, name: str | None, limit: int | None,
             newest_first: bool = False, beyond: int | None = None) -> list[_Stored]:
        """Stored jobs by id; with `beyond`, only those after that id in
        this order (the next page of a listing)."""
        raise NotImplementedError

    def pending_in_run_order(self, limit: int) -> list[_Stored]:
        """Pending jobs in the order they may run: those ready now by
        priority, then the delayed ones by run_at (then priority, then id)."""
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        """The number of jobs in each of the five states."""
        raise NotImplementedError

    def finished_since(self, since: float, step: float) -> list[tuple[float, str, int]]:
        """How many jobs ended in each `step` seconds since `since`, by the
        state they ended in: (step start, state, count)."""
        raise NotImplementedError

    def outstanding(self) -> bool:
        """True while any job (schedule runs aside) is pending or running."""
        raise NotImplementedError


# What an owner tells of itself, in the same JSON on every engine.
_HOST = socket.gethostname()


def _takes_json(takes: frozenset | None) -> str | None:
    return None if takes is None else json.dumps(sorted(takes))


def _owner_seen(id, heartbeat_at, takes, host, pid, started_at, processors) -> _OwnerSeen:
    """An `_OWNERS` row, its JSON read."""
    if processors is not None:
        processors = tuple(_ProcessorSeen(name, None if names is None else tuple(names), n)
                           for name, names, n in json.loads(processors))
    return _OwnerSeen(id, heartbeat_at, None if takes is None else frozenset(json.loads(takes)),
                      host, pid, started_at, processors)


# -- The SQLite engine: the queue file ---------------------------------------------

_APPLICATION_ID = 0x626C6572   # b"bler": PRAGMA application_id of a blero file
_SCHEMA_VERSION = 6            # PRAGMA user_version this blero.py writes and reads
_BUSY_LIMIT = 30.0             # seconds a write waits for another process's lock
_INCREMENTAL = 2               # PRAGMA auto_vacuum of a blero file: space goes back on request

# New in schema 2: the upgrade from 1 adds them (see _schema_2).
_OWNERS_TAKES = "ALTER TABLE blero_owners ADD COLUMN takes TEXT"
_SUSPECT_INDEX = ("CREATE INDEX blero_jobs_suspect ON blero_jobs (priority DESC, id)"
                  " WHERE state = -1")
# New in schema 3 (see _schema_3): what `after=`, pauses and limits store.
# blero_jobs.dependants is 1 once a job was named in another's `after=`
# while it had not ended: the finish of a job reads it (on a server, its
# latest version, after waiting for the enqueue that set it), and so never
# misses a dependant enqueued at the same moment.
_DEPENDANTS_COLUMN = "ALTER TABLE blero_jobs ADD COLUMN dependants INTEGER NOT NULL DEFAULT 0"
# blero_deps: one row per (job, job it waits on), `seq` its place in the list; kept
# until the job itself is swept (JobInfo.after shows them).  blero_controls:
# one row per name paused or limited ('' : every name, paused), none when
# nothing is, so a claim tells "nothing held" from one look at an empty
# table.  blero_starts: when each recent try of a rate-limited name began.
_FLOW_SCHEMA = """
CREATE TABLE blero_deps (
    job_id       INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    dep_id       INTEGER NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE INDEX blero_deps_dep ON blero_deps (dep_id);
CREATE INDEX blero_jobs_waiting ON blero_jobs (id) WHERE state = -2;
CREATE TABLE blero_controls (
    name         TEXT PRIMARY KEY,
    paused       INTEGER NOT NULL DEFAULT 0,
    concurrency  INTEGER,
    rate         INTEGER,
    per          REAL
);
CREATE TABLE blero_starts (
    name         TEXT NOT NULL,
    began        REAL NOT NULL
);
CREATE INDEX blero_starts_name ON blero_starts (name, began)"""
# New in schema 4: the upgrade from 3 adds them (see _schema_4).
_OWNERS_PRESENCE = ("ALTER TABLE blero_owners ADD COLUMN host TEXT",
                    "ALTER TABLE blero_owners ADD COLUMN processors TEXT")
# New in schema 5 (see _schema_5): a job's progress and checkpoint, a
# schedule's cron expression and zone.
_FLOW_COLUMNS = (("blero_jobs", "progress", "BLOB"), ("blero_jobs", "checkpoint", "BLOB"),
                 ("blero_schedules", "cron", "TEXT"), ("blero_schedules", "tz", "TEXT"))
# New in schema 6 (see _schema_6): whose workers may run a job, and a
# schedule's runs.  blero_jobs.runner is NULL for a job of enqueue(): any
# processor that takes its name runs it.  A task's call (and a task's
# schedule's run) is _TASK_RUNNER's: the processors that name it run it,
# never one of any name, in any process.  An executor's call is its own,
# "executor <n>" (the program's n-th executor): only that executor's
# workers run it (see Executor).
_RUNNER_COLUMNS = (("blero_jobs", "runner", "TEXT"), ("blero_schedules", "runner", "TEXT"))
_TASK_RUNNER = "task"

_SCHEMA = """
CREATE TABLE blero_jobs (
    id           INTEGER PRIMARY KEY,
    state        INTEGER NOT NULL,
    priority     INTEGER NOT NULL,
    run_at       REAL NOT NULL,
    name         TEXT NOT NULL,
    data         BLOB,
    max_attempts INTEGER NOT NULL,
    timeout      REAL,
    key          TEXT,
    created_at   REAL NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    owner        INTEGER,
    started_at   REAL,
    finished_at  REAL,
    result       BLOB,
    error        TEXT,
    dependants   INTEGER NOT NULL DEFAULT 0,
    progress     BLOB,
    checkpoint   BLOB,
    runner       TEXT
);
CREATE INDEX blero_jobs_ready ON blero_jobs (priority DESC, id) WHERE state = 0;
CREATE INDEX blero_jobs_delayed ON blero_jobs (run_at) WHERE state = 1;
CREATE INDEX blero_jobs_running ON blero_jobs (owner) WHERE state = 2;
CREATE INDEX blero_jobs_finished ON blero_jobs (finished_at) WHERE state >= 3;
CREATE UNIQUE INDEX blero_jobs_key ON blero_jobs (key) WHERE key IS NOT NULL;
""" + _SUSPECT_INDEX + """;
CREATE TABLE blero_owners (
    id           INTEGER PRIMARY KEY,
    pid          INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    takes        TEXT,
    host         TEXT,
    processors   TEXT
);
CREATE TABLE blero_schedules (
    key          TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    data         BLOB,
    interval     REAL NOT NULL,
    next_due     REAL NOT NULL,
    priority     INTEGER NOT NULL,
    retries      INTEGER,
    timeout      REAL,
    job_id       INTEGER,
    cron         TEXT,
    tz           TEXT,
    runner       TEXT
);
""" + _FLOW_SCHEMA + ";"
# blero_owners.takes: the job names the owner's processors take, a JSON array
# (NULL: any name), kept up to date as processors come and go; processors:
# those processors, for the dashboard, a JSON array of _ProcessorSeen arrays.
_TABLES = frozenset(re.findall(r"CREATE TABLE (\w+)", _SCHEMA))   # blero's, in the file

# Column lists come from the named tuples, so a row and its tuple never drift.
_INSERT = (f"INSERT INTO blero_jobs ({', '.join(_NewJob._fields)})"
           f" VALUES ({', '.join('?' * len(_NewJob._fields))})")
_FIND_KEY = "SELECT id FROM blero_jobs WHERE key = ?"
_FIND_KEYS = "SELECT key, id FROM blero_jobs WHERE key IN ({keys})"
_LAST_ID = "SELECT last_insert_rowid()"
_JOB_COLUMNS = ", ".join(_Claim._fields)
_NEXT_READY = ("SELECT id FROM blero_jobs WHERE state = {state}{names}{held}"   # READY or SUSPECT
               " ORDER BY priority DESC, id LIMIT 1")
# The claim's first look takes a job only while nothing is paused or limited
# (one probe of an empty table, made once per statement); else the claim
# looks at what is held (_claim_held) and leaves out the names it must.
_NOTHING_HELD = " AND NOT EXISTS (SELECT 1 FROM blero_controls)"
# A claim is made only while its owner is registered: a claim still under
# way when its queue stopped (and dropped its owner) then claims nothing.
_CLAIM_RETURNING = ("UPDATE blero_jobs SET state = 2, owner = ?, attempt = attempt + 1,"
                    " started_at = ? WHERE id = ({next}) AND state = {state}"
                    " AND EXISTS (SELECT 1 FROM blero_owners WHERE id = ?) RETURNING " + _JOB_COLUMNS)
_CLAIM = ("UPDATE blero_jobs SET state = 2, owner = ?, attempt = attempt + 1,"
          " started_at = ? WHERE id = ? AND EXISTS (SELECT 1 FROM blero_owners WHERE id = ?)")
_JOB_BY_ID = "SELECT " + _JOB_COLUMNS + " FROM blero_jobs WHERE id = ?"
# Every end of a try, and every hand-back, is this one statement: it changes
# the job only while the claim that ran it still holds, so a late or stale
# result can never overwrite what happened since.  A try given back (cut
# short by a deliberate stop) adds one to max_attempts: it used up no try.
_FINISH = ("UPDATE blero_jobs SET state = ?, run_at = coalesce(?, run_at), finished_at = ?,"
           " result = ?, error = ?, max_attempts = max_attempts + ?,"
           " progress = coalesce(?, progress), owner = NULL"
           " WHERE id = ? AND state = 2 AND owner = ? AND attempt = ?")
# A running try's progress, or its checkpoint (a `_Mark`): stored only while
# its claim holds.
_PROGRESS = ("UPDATE blero_jobs SET progress = ?"
             " WHERE id = ? AND state = 2 AND owner = ? AND attempt = ?")
_SAVE_CHECKPOINT = ("UPDATE blero_jobs SET checkpoint = ?"
                    " WHERE id = ? AND state = 2 AND owner = ? AND attempt = ?")
_RUNNING_OF = "SELECT " + _JOB_COLUMNS + " FROM blero_jobs WHERE state = 2 AND owner = ?"
# Undo a claim whose try never began: ready (or suspect) again, its attempt
# not counted.
_UNCLAIM = ("UPDATE blero_jobs SET state = ?, owner = NULL, attempt = attempt - 1,"
            " started_at = CASE attempt WHEN 1 THEN NULL ELSE started_at END"
            " WHERE id = ? AND state = 2 AND owner = ? AND attempt = ?")
_RUNNING_IDS = "SELECT id FROM blero_jobs WHERE state = 2 AND owner = ?"
# A slice at a time, earliest first: the clock promotes the next slice at
# once (the earliest left is due), but a timeout due meanwhile never waits
# for 200,000 jobs made due at the same moment.
_PROMOTE = ("UPDATE blero_jobs SET state = 0 WHERE id IN (SELECT id FROM blero_jobs"
            " WHERE state = 1 AND run_at <= ? ORDER BY run_at LIMIT 1000) AND state = 1")
_NEXT_DELAYED = "SELECT min(run_at) FROM blero_jobs WHERE state = 1"
_SUSPECT_KINDS = "SELECT DISTINCT name, runner FROM blero_jobs WHERE state = -1"
_STATE_OF = "SELECT state, owner FROM blero_jobs WHERE id = ?"
_CANCEL = ("UPDATE blero_jobs SET state = 5, finished_at = ?, owner = NULL"
           " WHERE id = ? AND state BETWEEN -2 AND ?")     # 2: running ones too
_CLEAR_KEYS = "UPDATE blero_jobs SET key = NULL WHERE id BETWEEN ? AND ?"
# A call matched with a stored job not started yet: run by the matching run's workers.
_SET_RUNNER = "UPDATE blero_jobs SET runner = ? WHERE id = ? AND state < 2"
# (min: a sum past SQLite's largest INTEGER would turn into a REAL)
_RETRY = ("UPDATE blero_jobs SET state = 0, run_at = ?, finished_at = NULL,"
          " max_attempts = min(attempt + 1 + ?, 9223372036854775807)"
          " WHERE state = 4 AND (CAST(? AS BIGINT) IS NULL OR id = ?)")
# Sweeping goes a slice at a time, in finish order: it finds a few hundred
# rows with the read connection, then deletes them in one write transaction,
# so a big sweep never holds either connection for more than a few ms.
_SWEEPABLE = ("SELECT id, state, finished_at FROM blero_jobs WHERE state >= 3 AND finished_at <= ?"
              " AND finished_at >= ? AND (finished_at > ? OR id > ?)"
              " AND state IN ({states}, 6) ORDER BY finished_at, id LIMIT ?")
_SWEEP_SLICE = 500                      # rows a slice deletes
_MAX_ID = "SELECT max(id) FROM blero_jobs"
_SWEEP = ("DELETE FROM blero_jobs WHERE id = ? AND id < ?"
          " AND (state IN ({states}) AND finished_at <= ? OR state = 6)")
# The newest job is kept as a bare tombstone (state 6) rather than deleted, so
# that SQLite never hands its id out again: ids are never reused.
_TOMBSTONE = ("UPDATE blero_jobs SET state = 6, name = '', data = NULL, result = NULL,"
              " error = NULL, key = NULL WHERE id = ? AND state IN ({states})"
              " AND finished_at <= ?")
# JobInfo.after is no column: the ids a job waits on, "3,5", from blero_deps
# (in `seq` order: the order of its primary key).
_AFTER_IDS = "(SELECT group_concat(dep_id) FROM blero_deps d WHERE d.job_id = blero_jobs.id)"
_INFO_COLUMNS = ", ".join(_AFTER_IDS if f == "after" else f for f in _Stored._fields)
_GET = "SELECT " + _INFO_COLUMNS + " FROM blero_jobs WHERE id = ? AND state < 6"
_OUTCOME = f"SELECT {', '.join(_Ended._fields)} FROM blero_jobs WHERE id = ? AND state < 6"
_OUTCOMES = (f"SELECT id, {', '.join(_Ended._fields)} FROM blero_jobs"
             " WHERE state < 6 AND id IN ({ids})")
_IDS_SLICE = 500        # ids a statement names at most (SQLite allows 999 parameters)
_LIST = ("SELECT " + _INFO_COLUMNS + " FROM blero_jobs WHERE state BETWEEN ? AND ?"
         " AND (CAST(? AS TEXT) IS NULL OR name = ?) AND id {beyond} ? ORDER BY id {order} LIMIT ?")
# Ready (and suspect) jobs may run now, in claim order; delayed ones at run_at.
# Those waiting on other jobs come last.
_PENDING_IN_RUN_ORDER = ("SELECT " + _INFO_COLUMNS + " FROM blero_jobs WHERE state BETWEEN -2 AND 1"
                         " ORDER BY CASE state WHEN 1 THEN run_at WHEN -2 THEN 1e308 ELSE 0 END,"
                         " priority DESC, id"
                         " LIMIT ?")
_COUNTS = "SELECT state, count(*) FROM blero_jobs GROUP BY state"
_PENDING_BY_NAME = ("SELECT name, runner IS NOT NULL, count(*) FROM blero_jobs"
                    " WHERE state BETWEEN -2 AND 1 GROUP BY name, runner IS NOT NULL")
_FINISHED_SINCE = ("SELECT CAST(finished_at / ? AS INTEGER) * ?, state, count(*) FROM blero_jobs"
                   " WHERE state >= 3 AND finished_at >= ? AND state < 6 GROUP BY 1, 2")
# One statement, so one snapshot: a job moving from ready to running between
# two separate looks would otherwise be seen in neither.
_OUTSTANDING = (
    "WITH runs AS (SELECT job_id FROM blero_schedules WHERE job_id IS NOT NULL) SELECT"
    " EXISTS (SELECT 1 FROM blero_jobs WHERE state = 0 AND id NOT IN (SELECT job_id FROM runs))"
    " OR EXISTS (SELECT 1 FROM blero_jobs WHERE state = -1 AND id NOT IN (SELECT job_id FROM runs))"
    " OR EXISTS (SELECT 1 FROM blero_jobs WHERE state = 1 AND id NOT IN (SELECT job_id FROM runs))"
    " OR EXISTS (SELECT 1 FROM blero_jobs WHERE state = 2 AND id NOT IN (SELECT job_id FROM runs))"
    " OR EXISTS (SELECT 1 FROM blero_jobs WHERE state = -2 AND id NOT IN (SELECT job_id FROM runs))")
# Registers an owner, or renews it.  An owner judged dead by the lease while
# alive (its process was suspended, say) so registers again, and can claim again.
_HEARTBEAT = ("INSERT INTO blero_owners (id, pid, started_at, heartbeat_at, takes, host, processors)"
              " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
              " heartbeat_at = excluded.heartbeat_at, takes = excluded.takes,"
              " processors = excluded.processors")
_DROP_OWNER = "DELETE FROM blero_owners WHERE id = ?"
_OWNER_PIDS = "SELECT id, pid FROM blero_owners"
_OWNERS = ("SELECT id, heartbeat_at, takes, host, pid, started_at, processors FROM blero_owners"
           " UNION ALL SELECT owner, NULL, NULL, NULL, NULL, NULL, NULL FROM"
           " (SELECT DISTINCT owner FROM blero_jobs"
           " WHERE state = 2 AND owner NOT IN (SELECT id FROM blero_owners)) AS unregistered")
_RUNNING_BY_OWNER = "SELECT owner, count(*) FROM blero_jobs WHERE state = 2 GROUP BY owner"
# An `every` schedule updated keeps its cadence (sooner if the interval
# shrank); a cron one keeps its next slot while its times stay the same, so
# a program calling cron() at each start neither repeats nor skips a slot.
_UPSERT_SCHEDULE = (
    f"INSERT INTO blero_schedules ({', '.join(_Schedule._fields)})"
    f" VALUES ({', '.join('?' * len(_Schedule._fields))}) ON CONFLICT (key) DO UPDATE SET"
    " name = excluded.name, data = excluded.data, interval = excluded.interval,"
    " next_due = CASE"
    " WHEN blero_schedules.cron IS NULL AND excluded.cron IS NULL"
    " THEN min(blero_schedules.next_due,"
    " blero_schedules.next_due - blero_schedules.interval + excluded.interval)"
    " WHEN blero_schedules.cron = excluded.cron"
    " AND coalesce(blero_schedules.tz, '') = coalesce(excluded.tz, '')"
    " THEN blero_schedules.next_due"
    " ELSE excluded.next_due END,"
    " priority = excluded.priority, retries = excluded.retries, timeout = excluded.timeout,"
    " cron = excluded.cron, tz = excluded.tz, runner = excluded.runner")
_DROP_SCHEDULE = "DELETE FROM blero_schedules WHERE key = ?"
# Schedules whose next run is due and whose previous run is over.
_DUE_SCHEDULES = (
    "SELECT s.key, s.name, s.data, s.interval, s.next_due, s.priority, s.retries,"
    " s.timeout, s.cron, s.tz, s.job_id, j.created_at, j.started_at, s.runner"
    " FROM blero_schedules s LEFT JOIN blero_jobs j ON j.id = s.job_id"
    " WHERE s.next_due <= ? AND (j.state IS NULL OR j.state >= 3)")
_SCHEDULED_RUN = "UPDATE blero_schedules SET next_due = ?, job_id = ? WHERE key = ?"
_NEXT_SCHEDULE = "SELECT min(next_due) FROM blero_schedules"
_SCHEDULES = f"SELECT {', '.join(_StoredSchedule._fields)} FROM blero_schedules ORDER BY key"
# -- after=: a job waits (state -2) until the jobs it names are complete --
_ADD_DEP = "INSERT INTO blero_deps (job_id, seq, dep_id) VALUES (?, ?, ?)"
# A finish first records the try of a job that no other waits on: nearly
# every finish is that one statement, and tells by its row count alone (no
# trigger, no RETURNING to pay for); a count of 0 is a job with dependants
# (then recorded by _FINISH, which tells that it was) or a claim that no
# longer holds (then _FINISH records nothing either).
_FINISH_UNWAITED = _FINISH + " AND dependants = 0"
# A completed try recorded and the worker's next job claimed in one
# statement, which SQLite commits by itself when no other write waits: the
# finish as _FINISH_UNWAITED (?1-?10, a _Finish), the claim as
# _CLAIM_RETURNING (owner ?11, now ?12, names from ?13), made only if the
# finished job has no dependants (they are made ready in the finish's own
# transaction: _finish_and_claim).  A statement, not three, in the worker's
# hot path: under the lock of every write, the fewer statements (each lets
# the other threads run Python until they give the GIL back), the better.
_NUMBERS = tuple(str(i) for i in range(1, 1000))   # the names of ?1, ?2, ...
_COMPLETE_AND_CLAIM = (
    "UPDATE blero_jobs SET state = CASE id WHEN ?8 THEN ?1 ELSE 2 END,"
    " run_at = CASE id WHEN ?8 THEN coalesce(?2, run_at) ELSE run_at END,"
    " finished_at = CASE id WHEN ?8 THEN ?3 ELSE finished_at END,"
    " result = CASE id WHEN ?8 THEN ?4 ELSE result END,"
    " error = CASE id WHEN ?8 THEN ?5 ELSE error END,"
    " max_attempts = CASE id WHEN ?8 THEN max_attempts + ?6 ELSE max_attempts END,"
    " progress = CASE id WHEN ?8 THEN coalesce(?7, progress) ELSE progress END,"
    " owner = CASE id WHEN ?8 THEN NULL ELSE ?11 END,"
    " attempt = CASE id WHEN ?8 THEN attempt ELSE attempt + 1 END,"
    " started_at = CASE id WHEN ?8 THEN started_at ELSE ?12 END"
    " WHERE id = ?8 AND state = 2 AND owner = ?9 AND attempt = ?10 AND dependants = 0"
    " OR id = ({next}) AND state = 0 AND EXISTS (SELECT 1 FROM blero_owners WHERE id = ?11)"
    " AND NOT EXISTS (SELECT 1 FROM blero_jobs WHERE id = ?8 AND dependants != 0)"
    " RETURNING " + _JOB_COLUMNS)
# A job named in `after=` is marked first (on a server: waiting for a finish
# of it under way), then its state read afresh.
_MARK_DEPENDED_ON = "UPDATE blero_jobs SET dependants = 1 WHERE id = ? AND state < 3"
# The jobs waiting on this one (locked, on a server: two of their `after`
# jobs completing at once are then looked at one after the other) ...
_WAITING_ON = ("SELECT j.id FROM blero_deps d JOIN blero_jobs j ON j.id = d.job_id"
               " WHERE d.dep_id = ? AND j.state = -2{lock}")
# ... and, in a statement of its own (which sees what was committed before
# the lock was had), those whose every `after` job is complete now (a swept
# one, gone or a tombstone, was complete: only ended jobs are swept).
_RELEASABLE = ("SELECT j.id, j.name, j.run_at FROM blero_jobs j WHERE j.id IN ({ids})"
               " AND j.state = -2 AND NOT EXISTS (SELECT 1 FROM blero_deps e"
               " JOIN blero_jobs k ON k.id = e.dep_id WHERE e.job_id = j.id AND k.state < 3)")
_RELEASE = "UPDATE blero_jobs SET state = ? WHERE id = ? AND state = -2"
# Every job waiting on this one, directly or down a chain, each with the
# job it waits on that ends it (all of them end cancelled, the first failed).
_DOWN_THE_CHAIN = (
    "WITH RECURSIVE down(id, dep) AS (SELECT job_id, dep_id FROM blero_deps WHERE dep_id = ?"
    " UNION SELECT d.job_id, d.dep_id FROM blero_deps d JOIN down ON d.dep_id = down.id)"
    " SELECT down.id, min(down.dep) FROM down JOIN blero_jobs j ON j.id = down.id"
    " WHERE j.state = -2 GROUP BY down.id")
_CANCEL_WAITING = ("UPDATE blero_jobs SET state = 5, finished_at = ?, error = ?"
                   " WHERE id = ? AND state = -2")
_ANY_DEPS = "SELECT EXISTS (SELECT 1 FROM blero_deps)"
# A swept job's own list goes with it (the lists naming it stay: JobInfo.after).
_SWEEP_DEPS = ("DELETE FROM blero_deps WHERE job_id = ?"
               " AND NOT EXISTS (SELECT 1 FROM blero_jobs WHERE id = ? AND state < 6)")
# -- pauses and limits ------------------------------------------------------
_CONTROLS = "SELECT name, paused, concurrency, rate, per FROM blero_controls"
_PAUSE = ("INSERT INTO blero_controls (name, paused) VALUES (?, 1)"
          " ON CONFLICT (name) DO UPDATE SET paused = 1")
_RESUME = "UPDATE blero_controls SET paused = 0 WHERE name = ?"
_RESUME_ALL = "UPDATE blero_controls SET paused = 0"
_SET_LIMIT = ("INSERT INTO blero_controls (name, concurrency, rate, per) VALUES (?, ?, ?, ?)"
              " ON CONFLICT (name) DO UPDATE SET concurrency = excluded.concurrency,"
              " rate = excluded.rate, per = excluded.per")
_DROP_IDLE_CONTROLS = ("DELETE FROM blero_controls"
                       " WHERE paused = 0 AND concurrency IS NULL AND rate IS NULL")
_PAUSED = "SELECT name FROM blero_controls WHERE paused = 1"
_LIMITS = ("SELECT name, concurrency, rate, per FROM blero_controls"
           " WHERE concurrency IS NOT NULL OR rate IS NOT NULL ORDER BY name")
# (by the running jobs' index: a few rows, one per worker at most)
_RUNNING_NAMED = "SELECT count(*) FROM blero_jobs WHERE state = 2 AND name = ?"
_RUNNING_BY_NAME = "SELECT name, count(*) FROM blero_jobs WHERE state = 2 GROUP BY name"
_LAST_CLAIM = ("SELECT max(started_at) FROM blero_jobs WHERE state = 2"
               " AND (? OR name = ?)")
_STARTS_SINCE = "SELECT count(*) FROM blero_starts WHERE name = ? AND began > ?"
_NTH_START = ("SELECT began FROM blero_starts WHERE name = ? AND began > ? ORDER BY began"
              " LIMIT 1 OFFSET ?")
_ADD_START = "INSERT INTO blero_starts (name, began) VALUES (?, ?)"
_PRUNE_STARTS = "DELETE FROM blero_starts WHERE name = ? AND began <= ?"
_DROP_STARTS = "DELETE FROM blero_starts WHERE name = ?"
# Free pages go back one per statement: Pythons differ in whether they step
# an incremental_vacuum on past its first page.
_FREE_PAGES = "PRAGMA freelist_count"
_FREE_PAGE = "PRAGMA incremental_vacuum(1)"
_FREE_SLICE = 500                       # pages a write transaction gives back
_CHECKPOINT = "PRAGMA wal_checkpoint(PASSIVE)"


# -- Upgrades: a file written by an older blero.py, brought up to date --------
#
# _UPGRADES[n - 1] takes a file from user_version n to n + 1: the steps a file
# needs run in order, in one transaction with its new user_version, the first
# time this blero.py opens it (holding the -lock byte 0).  A later schema adds
# its step at the end, and raises _SCHEMA_VERSION with it.  (Incremental
# auto_vacuum needs a VACUUM, which no transaction may hold: `_init` turns it
# on apart, in any file that lacks it.)

def _schema_2(db: sqlite3.Connection) -> None:
    """1 -> 2: blero's tables and indexes are named blero_*, so that the
    application's own tables can share the file; the suspects' index; the
    job names each owner takes."""
    for table in ("jobs", "owners", "schedules"):
        db.execute(f"ALTER TABLE {table} RENAME TO blero_{table}")
    db.execute(_OWNERS_TAKES)
    for name, sql in db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
            " AND tbl_name = 'blero_jobs' AND name LIKE 'jobs!_%' ESCAPE '!'").fetchall():
        db.execute(f"DROP INDEX {name}")
        db.execute(sql.replace(f"INDEX {name} ", f"INDEX blero_{name} ", 1))
    # A schema 1 file has no suspects' index, unless a blero.py of between
    # d97611a and schema 2 made it (with the old prefix, renamed just above).
    db.execute("DROP INDEX IF EXISTS blero_jobs_suspect")
    db.execute(_SUSPECT_INDEX)


def _schema_3(db: sqlite3.Connection) -> None:
    """2 -> 3: what `after=`, pauses and limits store (_FLOW_SCHEMA)."""
    for statement in (_DEPENDANTS_COLUMN + ";" + _FLOW_SCHEMA).split(";"):
        db.execute(statement)


def _schema_4(db: sqlite3.Connection) -> None:
    """3 -> 4: each owner's host and processors, for the dashboard."""
    for statement in _OWNERS_PRESENCE:
        db.execute(statement)


def _schema_5(db: sqlite3.Connection) -> None:
    """4 -> 5: progress and checkpoints of jobs, cron schedules."""
    _add_columns(db, _FLOW_COLUMNS)


def _schema_6(db: sqlite3.Connection) -> None:
    """5 -> 6: whose workers run a job, and a schedule's runs."""
    _add_columns(db, _RUNNER_COLUMNS)


def _add_columns(db, columns, ddl: Callable[[str], str] = str) -> None:
    """Add the (table, column, type) `columns`; `ddl` makes each statement
    the engine's."""
    for table, column, kind in columns:
        db.execute(ddl(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))


_UPGRADES: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_2, _schema_3,
                                                              _schema_4, _schema_5, _schema_6)


# On read-only storage no upgrade can be written: _READ_ONLY_VIEWS[n - 1]
# shows a file of user_version n as n + 1 instead, by temporary views (in
# memory, in the connection, never in the file) that the SQL above reads as
# if they were the tables.  A later schema adds its step at the end too.

def _schema_2_views(db: sqlite3.Connection) -> None:
    """1 as 2: the old tables under their blero_* names (owners taking any name)."""
    for table, more in (("jobs", ""), ("owners", ", NULL AS takes"), ("schedules", "")):
        db.execute(f"CREATE TEMP VIEW blero_{table} AS SELECT *{more} FROM main.{table}")


def _schema_3_views(db: sqlite3.Connection) -> None:
    """2 as 3: nothing waits on other jobs, nothing is paused or limited."""
    for table, columns in (("deps", "0 AS job_id, 0 AS seq, 0 AS dep_id"),
                           ("controls", "'' AS name, 0 AS paused, NULL AS concurrency,"
                                        " NULL AS rate, NULL AS per"),
                           ("starts", "'' AS name, 0.0 AS began")):
        db.execute(f"CREATE TEMP VIEW blero_{table} AS SELECT {columns} WHERE 0")


def _schema_4_views(db: sqlite3.Connection) -> None:
    """3 as 4: owners with no host or processors told (a file of schema 1
    comes here with blero_owners a view already: this one replaces it)."""
    made = db.execute("SELECT sql FROM sqlite_temp_master WHERE name = 'blero_owners'").fetchone()
    source = "main.blero_owners"
    if made is not None:
        source = "(" + made[0].split(" AS ", 1)[1] + ")"
        db.execute("DROP VIEW temp.blero_owners")
    db.execute(f"CREATE TEMP VIEW blero_owners AS SELECT *, NULL AS host, NULL AS processors"
               f" FROM {source}")


def _schema_5_views(db: sqlite3.Connection) -> None:
    """4 as 5: no progress, no checkpoints, no cron schedules (over the views
    of older schemas, where a file of one shows these tables as views)."""
    _added_views(db, _FLOW_COLUMNS)


def _schema_6_views(db: sqlite3.Connection) -> None:
    """5 as 6: no job or schedule is a task's or an executor's (as then)."""
    _added_views(db, _RUNNER_COLUMNS)


def _added_views(db: sqlite3.Connection, columns) -> None:
    """blero_jobs and blero_schedules with the (table, column, type) `columns` NULL."""
    for table in ("blero_jobs", "blero_schedules"):
        more = "".join(f", NULL AS {c}" for t, c, _ in columns if t == table)
        view = db.execute("SELECT sql FROM temp.sqlite_master WHERE name = ?",
                          (table,)).fetchall()
        source = f"main.{table}"
        if view:
            source = f"({view[0][0].split(' AS ', 1)[1]})"
            db.execute(f"DROP VIEW temp.{table}")
        db.execute(f"CREATE TEMP VIEW {table} AS SELECT *{more} FROM {source}")


_READ_ONLY_VIEWS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_2_views,
                                                                      _schema_3_views,
                                                                      _schema_4_views,
                                                                      _schema_5_views,
                                                                      _schema_6_views)


def _uri(path: str, mode: str) -> str:
    """An SQLite URI opening the file at `path` in `mode` (ro, rw or rwc)."""
    full = os.fsencode(os.path.abspath(path)).replace(os.fsencode(os.sep), b"/")
    if not full.startswith(b"/"):
        full = b"/" + full          # file:///C:/... on Windows
    return f"file://{urllib.parse.quote(full)}?mode={mode}"


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)   # SQLITE_BUSY, SQLITE_LOCKED
    text = str(exc)
    return "locked" in text or "busy" in text


def _cannot_read_only(exc: sqlite3.Error) -> bool:
    """What a reader that may not write the -shm meets when the -wal needs
    recovering (its last writer died mid-write) or another process holds
    the WAL's locks: SQLITE_READONLY (RECOVERY, CANTINIT), SQLITE_PROTOCOL,
    SQLITE_BUSY."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6, 8, 15)
    text = str(exc)
    return any(w in text for w in ("locked", "busy", "readonly", "locking protocol"))


# -- The lock file: who may set the file up, and who is alive -----------------
#
# `<db>-lock` carries advisory (fcntl) locks.  Byte 0 is held while a process
# checks, creates or sets up the queue file, so processes starting together
# never race to create it.  Every started queue is an "owner" with a random
# id and claims jobs in its name; while it runs it holds the byte at the
# offset of its id.  The OS drops that lock the moment the process dies,
# however it dies, so another process tells a dead owner from a live one at
# once by trying that byte.  POSIX locks belong to the process, and closing
# any descriptor of the file drops them all: so each lock file is opened once
# per process (keyed by its real path) and closed when no queue here uses it,
# and owners in this process are known from a set.  Without fcntl (Windows),
# heartbeats stand in: an owner is dead after `lease` seconds of silence.

_lock_files: dict[str, list] = {}    # lock file's real path -> [fd, users]
_local_owners: set[int] = set()
_lock_files_lock = threading.Lock()
_opening_lock = threading.Lock()     # byte 0 does not keep out this process's threads


def _lock_path(real: str) -> str:
    """The lock file of the queue file at real path `real` (resolved once, by
    `_Storage`: a link re-pointed later must not change which file this is)."""
    return real + "-lock"


def _lock_fd(real: str) -> int:
    """Open (or share) the lock file; the caller holds `_lock_files_lock`."""
    key = _lock_path(real)
    entry = _lock_files.get(key)
    if entry is None:
        entry = _lock_files[key] = [os.open(key, os.O_RDWR | os.O_CREAT, 0o600), 0]
    entry[1] += 1
    return entry[0]


def _unlock_fd(real: str) -> None:
    """Stop using the lock file; the caller holds `_lock_files_lock`."""
    key = _lock_path(real)
    entry = _lock_files[key]
    entry[1] -= 1
    if entry[1] == 0:
        os.close(entry[0])
        del _lock_files[key]


@contextlib.contextmanager
def _opening(real: str):
    """Hold byte 0 of the lock file: one process at a time sets a file up."""
    with _opening_lock:
        if fcntl is None:
            yield
            return
        with _lock_files_lock:
            try:
                fd = _lock_fd(real)
            except OSError as exc:
                raise BleroError(f"{_lock_path(real)}: cannot create the lock file: "
                                 f"{exc.strerror or exc}") from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
        finally:
            with _lock_files_lock:
                _unlock_fd(real)


def _new_owner_id() -> int:
    return secrets.randbits(46) + (1 << 40)   # far above SQLite's own lock bytes


def _hold_owner(real: str, owner: int) -> None:
    """Mark `owner` alive for as long as this process runs or until released."""
    with _lock_files_lock:
        if fcntl is not None:
            fd = _lock_fd(real)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, owner)
            except BaseException:
                _unlock_fd(real)
                raise
        _local_owners.add(owner)


def _release_owner(real: str, owner: int) -> None:
    with _lock_files_lock:
        if owner in _local_owners and fcntl is not None:
            fcntl.lockf(_lock_files[_lock_path(real)][0], fcntl.LOCK_UN, 1, owner)
            _unlock_fd(real)
        _local_owners.discard(owner)


def _owner_alive(real: str, owner: int) -> bool | None:
    """True or False where the lock tells; None where only a lease can."""
    with _lock_files_lock:
        if owner in _local_owners:
            return True
        entry = _lock_files.get(_lock_path(real))
        if entry is None:
            return None
        try:
            fcntl.lockf(entry[0], fcntl.LOCK_SH | fcntl.LOCK_NB, 1, owner)
        except OSError:
            return True
        fcntl.lockf(entry[0], fcntl.LOCK_UN, 1, owner)
        return False


def _takes_cond(n: int, m: int, mark: Callable[[int], str]) -> str:
    """What a claim's SELECT adds to take a job of n names and one runner
    (0: any name but m others, of no runner), its i-th parameter `mark(i)`."""
    if n:
        return (f" AND name IN ({', '.join(mark(i) for i in range(n))})"
                f" AND (runner IS NULL OR runner = {mark(n)})")
    return " AND runner IS NULL" + (
        f" AND name NOT IN ({', '.join(mark(i) for i in range(m))})" if m else "")


class _Op:
    """One caller's part of a group transaction."""

    __slots__ = ("fn", "args", "alone", "result", "error", "done", "lock", "turn", "woken",
                 "chain", "gone")

    def __init__(self, fn, args, alone=False):
        self.fn = fn
        self.args = args
        self.alone = alone  # fn runs one statement: alone, it commits by itself
        self.result = self.error = None
        self.done = False
        self.lock = None    # held while the caller waits; released to wake it
        self.turn = False   # its caller leads: commits, then passes the turn on
        self.woken = False  # its lock was released
        self.chain = None   # once woken: the callers of its batch its caller wakes next
        self.gone = False   # its caller went (woken, or interrupted): wake it no more


class _SQLiteStorage(_Storage):
    """The queue file: one SQLite database in WAL mode, and every SQL statement.

    Writes are functions of the write connection passed to `_write`, which
    commits them in groups: a caller that finds no transaction under way
    becomes the leader, runs every write queued meanwhile in one transaction
    (and those that arrive before it commits) and commits once for all: group
    commit, with no writer thread to wake.  A waiting caller sleeps on a lock
    of its own, released either when its write is committed or to hand it the
    next turn, so each commit wakes only the callers it concerns, one after
    another (each woken caller wakes the next, `_pass_on`; with sync="full",
    all at once).  If the
    transaction fails, each write is retried alone, so one bad write never
    takes its neighbours down.  Reads use a second connection, which WAL lets
    run beside the writer.

    The locking rules, all of them:
    - `_mutex` guards the line of writes (`_queue`), whose turn it is
      (`_leading`, `_Op.turn`), the wake-ups (`_Op.woken`, `.chain`,
      `.gone`), `_closer` and `_look_wanted`.  It is held for
      a few list operations, never for I/O: the leader takes the whole line
      from under it and commits without it.
    - The turn (held by one thread at a time, passed on by `_hand_over`) is
      what owns the write connection `_db`, and `_data_version` and
      `_shared` with it.  (`_held` is a hint any worker sets: a stale one
      costs a statement, never a wrong claim.)
      I/O runs under the turn, but no thread waits for the turn except to
      write: a writer's own lock is released when its write is committed.
    - `_read_lock` makes the read connection `_reader` one thread's at a
      time (an sqlite3 connection is not for two at once): reads of the
      workers and of inspecting calls queue on it, writes never do.
    - The module's `_lock_files_lock` guards the lock files and the owners
      of this process (above); it is held while locking a byte of a lock
      file, never while waiting for one.  `_opening_lock`, then byte 0 of
      the lock file (`_opening`), are held while a file is checked, created
      or upgraded: the one wait on another process, at open only.
    Locks are only ever taken in this order, `_opening_lock`, the turn,
    `_read_lock`, `_lock_files_lock`, `_mutex`, so none waits on another
    in a circle.
    """

    _last_given = _MAX_ID    # the newest id given (kept as a tombstone once swept)
    _lock_rows = ""          # no row locks: a transaction holds the file's one write lock
    _nothing_held = _NOTHING_HELD
    _held_lock = _change_lock = None    # (see _PostgresStorage)

    def __init__(self, path: str, sync: str = "normal", real: str | None = None):
        self.path = path    # as given: what messages name
        # Every file operation uses the real path resolved here, once (or
        # the one given, a running queue's): a link on the way (a deploy's
        # `current`) re-pointed while this runs must not make it look at,
        # lock or write another file.
        try:
            self.real = os.path.realpath(path) if real is None else real
        except ValueError:  # a NUL in the path: open() names it
            self.real = path
        self._sync = sync
        self._mutex = threading.Lock()    # guards the four fields below
        self._queue: list[_Op] = []
        self._leading = False             # some thread has the turn
        self._closer: _Op | None = None   # close() waits for the turn: refuse writes
        self._look_wanted = False         # the leader should read data_version when done
        self._db = None
        self._reader = None
        self._read_lock = threading.Lock()
        self._identity = None
        self._upgraded = False            # open() committed an upgrade of the file
        self.read_only = None
        self._data_version = None
        self._shared = False              # the last commit was of several writes
        self._changed = False             # another connection committed since last asked
        self._returning = sqlite3.sqlite_version_info >= (3, 35, 0)
        self._claim_sql: dict[tuple[int, bool, int, int | None], tuple[str, str]] = {}
        self._complete_sql: dict[tuple[int, int], str] = {}
        self._held = False      # the last claim found pauses or limits stored

    _skip_locked = ""   # what the claim's inner SELECT adds (see _PostgresStorage)
    _due_schedules = _DUE_SCHEDULES     # the same, locking the schedules it runs
    _no_limit = -1      # LIMIT's "none"

    # -- opening and closing ------------------------------------------------

    def open(self, create: bool, check: bool = False) -> None:
        path, real = self.path, self.real
        folder = os.path.dirname(real) or "."
        kind = self._stat()
        if kind == "missing":
            if not create:
                raise BleroError(f"{path}: no queue file there (start() makes one)")
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise BleroError(f"{path}: cannot create its directory: "
                                 f"{exc.strerror or exc}") from exc
        why = self._why_read_only(folder)
        if why is not None and not create:
            self._open_read_only(why, check)
            return
        if why is not None:
            raise BleroError(f"{path}: read-only storage ({why}): start() needs to write there")
        lock = _lock_path(real)
        made_lock = not os.path.exists(lock)
        with _opening(real):
            try:
                self._open(create, check)
            except BaseException:
                if made_lock:
                    with contextlib.suppress(OSError):
                        os.remove(lock)
                raise

    def _open(self, create: bool, check: bool) -> None:
        path, real = self.path, self.real
        kind = self._stat()   # again: another process may have made it meanwhile
        if kind == "missing" and not create:
            raise BleroError(f"{path}: no queue file there (start() makes one)")
        # SQLite makes -wal/-shm files on connecting, even read-only; on a
        # file we then refuse it does not remove them, so we remove ours --
        # unless an upgrade was committed to them: they hold the file's data.
        side_files = [real + s for s in ("-wal", "-shm") if not os.path.exists(real + s)]
        made = self._upgraded = False
        try:
            version = self._probe(check) if kind == "file" else None
            # SQLite creates a missing file: this process never opens (and
            # so never closes) a descriptor of the queue file itself.
            self._db = self._connect("rwc" if kind == "missing" else "rw")
            if kind == "missing":
                made = True
                os.chmod(real, 0o600)   # while still empty; -wal and -shm take its mode
            self._init(version)
            self._reader = self._connect()
        except BaseException as exc:
            self.close()
            for name in ([] if self._upgraded else side_files) + ([real] if made else []):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(name)
            if isinstance(exc, sqlite3.Error):
                raise BleroError(f"{path}: cannot open the queue: {exc}") from exc
            if isinstance(exc, OSError):
                raise BleroError(f"{path}: cannot create the queue file: "
                                 f"{exc.strerror or exc}") from exc
            raise
        st = os.stat(real)
        self._identity = (st.st_dev, st.st_ino)

    def _why_read_only(self, folder: str) -> str | None:
        """Why this process cannot write the queue file (or create it), or None."""
        real = self.real
        if os.path.exists(real) and not os.access(real, os.W_OK):
            try:
                read_only_fs = bool(os.statvfs(real).f_flag & os.ST_RDONLY)
            except (AttributeError, OSError):   # no statvfs (Windows)
                read_only_fs = False
            return ("on a read-only file system" if read_only_fs
                    else "no permission to write the queue file")
        if not os.access(folder, os.W_OK) and not all(
                os.path.exists(real + s) for s in ("-wal", "-shm")):
            return (f"no permission to write its directory, where SQLite needs to create "
                    f"{os.path.basename(real)}-wal and -shm")
        return None

    def _open_read_only(self, why: str, check: bool) -> None:
        """Open the file for inspection only, writing nothing anywhere: no
        -lock, -wal or -shm made, none written, no upgrade (a file of an
        older layout is read through views of its tables, kept in memory)."""
        self.read_only = why
        try:
            version = self._probe(check)
            if version is None:
                raise BleroError(f"{self.path}: an empty database, on read-only storage: "
                                 f"no queue in it yet")
            self._reader = db = self._connect("ro", self._read_only_params())
            db.execute("PRAGMA temp_store = MEMORY")
            for step in _READ_ONLY_VIEWS[version - 1:]:
                step(db)
            db.execute("PRAGMA query_only = ON")    # and so nothing slips through
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise BleroError(f"{self.path}: cannot read the queue: {exc}") from exc
            raise
        st = os.stat(self.real)
        self._identity = (st.st_dev, st.st_ino)

    def _read_only_params(self) -> str:
        """The URI parameters that read the file, and what committed writes
        its -wal holds, without writing anything: SQLite cannot make (nor
        write to) an -shm on read-only storage.  With an -shm there (a
        snapshot of a running queue, or of a killed one), SQLite reads the
        -wal through it, read-only.  Without one (a queue that stopped
        cleanly leaves no -wal, nor -shm), the file holds every commit and
        is read as immutable: no locks, no -shm needed.  A -wal of commits
        with no -shm cannot be read here, and immutable would not see them:
        refused, naming what to do."""
        real, name = self.real, os.path.basename(self.real)
        wal = os.path.exists(real + "-wal")
        if wal and os.path.exists(real + "-shm"):
            return "&readonly_shm=1"
        if wal and os.path.getsize(real + "-wal"):
            raise BleroError(f"{self.path}: read-only storage ({self.read_only}), and its "
                             f"{name}-wal holds commits that SQLite can read there only "
                             f"with the {name}-shm beside it, which is missing: copy "
                             f"{name} and {name}-wal to writable storage and look at the copy")
        return "&immutable=1"

    def _stat(self) -> str:
        """What the path holds, "missing", "empty" or "file", judged without opening it."""
        path = self.path
        try:
            st = os.stat(self.real)
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            raise BleroError(f"{path}: {exc.strerror or exc}") from exc
        except ValueError as exc:   # a NUL in the path: shown escaped
            raise BleroError(f"{path!r}: not a usable path: {exc}") from exc
        if stat.S_ISDIR(st.st_mode):
            raise BleroError(f"{path}: is a directory, not a queue file")
        if not stat.S_ISREG(st.st_mode):
            raise BleroError(f"{path}: not a regular file, so not a queue file")
        if 0 < st.st_size < 512:    # smaller than any SQLite page: SQLite would overwrite it
            raise BleroError(f"{path}: not an SQLite database (damaged, or another "
                             f"kind of file)")
        return "empty" if st.st_size == 0 else "file"

    def _probe(self, check: bool) -> int | None:
        """Judge an existing file through a connection that cannot write, not
        even when it closes (so a refused file, and any -wal and -shm beside
        it, stay byte for byte as they were).  Returns its user_version, or
        None for an empty database; raises BleroError if blero must not use it."""
        path, real = self.path, self.real
        gone, deadline, pause = 0, time.monotonic() + 0.1, 0.001
        while gone < 10:
            # SQLite writes to an -shm it can write, even for a read-only
            # connection; readonly_shm stops that (without one, it makes its own).
            shm = os.path.exists(real + "-shm")
            params = (self._read_only_params() if self.read_only is not None
                      else "&readonly_shm=1" if shm else "")
            try:
                return self._judge(params, check)
            except sqlite3.Error as exc:
                if shm and not os.path.exists(real + "-shm"):
                    gone += 1   # another process's last connection closed, removing it
                    continue
                if shm and _cannot_read_only(exc):
                    if time.monotonic() < deadline:     # a lock held for a moment
                        time.sleep(pause)
                        pause = min(0.05, pause * 2)
                        continue
                    # The -wal needs recovering: only a reader that may
                    # rebuild the -shm (SQLite's index of the -wal, made from
                    # it) can read the file.  The file and -wal stay unwritten.
                    try:
                        return self._judge("", check)
                    except sqlite3.Error as again:
                        exc = again
                if "not a database" in str(exc):
                    raise BleroError(f"{path}: not an SQLite database (damaged, or another "
                                     f"kind of file)") from exc
                if "malformed" in str(exc):
                    raise BleroError(f"{path}: the queue file is damaged: {exc}") from exc
                raise BleroError(f"{path}: cannot read the queue file: {exc}") from exc
        raise BleroError(f"{path}: cannot read the queue file: its -shm keeps going away")

    def _judge(self, params: str, check: bool) -> int | None:
        path = self.path
        db = sqlite3.connect(_uri(self.real, "ro") + params, uri=True, timeout=1.0)
        try:
            app_id = db.execute("PRAGMA application_id").fetchall()[0][0]
            version = db.execute("PRAGMA user_version").fetchall()[0][0]
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if app_id == 0 and not names:
                return None
            if app_id != _APPLICATION_ID:
                raise BleroError(f"{path}: an SQLite database, but not a blero queue")
            if version > _SCHEMA_VERSION:
                raise BleroError(f"{path}: written by a newer blero (schema {version};"
                                 f" this blero.py knows up to {_SCHEMA_VERSION})")
            if version == _SCHEMA_VERSION and not _TABLES <= names:
                raise BleroError(f"{path}: a blero queue with tables missing (damaged)")
            if check:
                problems = [r[0] for r in db.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise BleroError(f"{path}: the queue file is damaged: {problems[0]}")
            return version
        finally:
            db.close()

    def _connect(self, mode: str = "rw", params: str = "") -> sqlite3.Connection:
        db = sqlite3.connect(_uri(self.real, mode) + params, uri=True, timeout=1.0,
                             isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA cache_size = -8192")
        return db

    def _init(self, version: int | None) -> None:
        db = self._db
        if version is None:
            self._create_schema()
        else:
            if version < _SCHEMA_VERSION:
                self._upgrade(version)
            self._begin(db)     # fails here, not later, on a file we cannot write
            db.execute("ROLLBACK")
        if db.execute("PRAGMA auto_vacuum").fetchall()[0][0] != _INCREMENTAL:
            # Files of older blero.py have none, nor has an empty database
            # another program made: only a VACUUM can turn it on, once.  It
            # needs room for a copy of the file: without, the queue works
            # all the same, and the next open tries again.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            try:
                db.execute("VACUUM")
            except sqlite3.OperationalError as exc:
                log.warning("%s: cannot compact the file yet, so swept jobs keep their space "
                            "until it can be (at the next start, or python -m blero vacuum): "
                            "%s%s", self.path, exc, self._space_hint(exc))
        db.execute(f"PRAGMA synchronous = {self._sync.upper()}")
        db.execute("PRAGMA journal_size_limit = 67108864")

    def _upgrade(self, version: int) -> None:
        """Bring a file of schema `version` up to date, in one transaction;
        refuse (and change nothing) while the older blero.py that wrote it
        still runs on it: it would not find its tables any more."""
        db = self._db
        self._begin(db)
        try:
            for step in _UPGRADES[version - 1:]:
                step(db)
            running = [str(pid) for owner, pid in db.execute(_OWNER_PIDS).fetchall()
                       if self.owner_alive(owner)]   # (None where no lock tells)
            if running:
                raise BleroError(f"{self.path}: written by an older blero.py, still running "
                                 f"on it (process {', '.join(running)}); stop it, then "
                                 f"start again: the file is upgraded then")
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            db.execute("COMMIT")
            self._upgraded = True   # in -wal, maybe: keep it, whatever fails next
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _create_schema(self) -> None:
        db = self._db
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")   # before the file's first page
        mode = db.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
        if mode.lower() != "wal":
            raise BleroError(f"{self.path}: cannot use WAL mode here (got {mode})")
        self._begin(db)
        try:
            if db.execute("SELECT 1 FROM sqlite_master").fetchall():   # made meanwhile
                raise BleroError(f"{self.path}: an SQLite database, but not a blero queue")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        # The last connection to close checkpoints the WAL into the file.
        op = _Op(None, ())
        with self._mutex:
            if self._closer is not None:
                return
            self._closer = op              # from now on, new writes are refused
            self._line_up(op)
        if not op.turn:
            op.lock.acquire()              # the turn, once the queue has drained
        try:
            with self._read_lock:
                if self._db is not None and self._identity is not None:
                    self._checkpoint_if_moved()
                for db in (self._reader, self._db):
                    if db is not None:
                        with contextlib.suppress(sqlite3.Error):
                            db.close()
                self._reader = self._db = None
        finally:
            with self._mutex:
                self._leading = False

    def _checkpoint_if_moved(self) -> None:
        # SQLite skips its closing checkpoint for a file that was removed or
        # replaced, leaving our -wal beside whatever file has the name now,
        # which would replay it on the next open: empty it into our old file.
        try:
            self._check_identity()
        except BleroError:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- the two ways in: group-committed writes, and reads -------------------

    def _write(self, fn, *args, alone: bool = False):
        """Run `fn(db, *args)` in a write transaction shared with whatever
        other writes are waiting; return its result once committed.
        `alone`: fn runs one statement, which, when no other write waits,
        is committed by itself (SQLite's autocommit: one transaction, the
        same durability, without a BEGIN and a COMMIT to run)."""
        if self.read_only is not None:
            self.writable()
        op = _Op(fn, args, alone)
        # A Ctrl-C may land anywhere in the main thread: every step from here
        # on leaves `op` in a state the `finally` can put right (its queue
        # place, its turn), so no other caller is ever left waiting.
        try:
            with self._mutex:
                if self._closer is not None:
                    raise BleroError(f"{self.path}: the queue is stopped")
                self._line_up(op)
                if not op.turn:
                    self._queue.append(op)
            if op.turn:     # the line was empty (no turn is held then): lead it
                self._commit(op, [op])
            else:
                op.lock.acquire()     # our write is done, or it is our turn to lead
                if not op.done:
                    self._commit(op)
        finally:
            late = None
            while op.turn or not op.done:
                try:
                    self._end_turn(op)
                    break
                except KeyboardInterrupt as exc:    # even here: finish first
                    late = exc
            while op.lock is not None and not op.gone or op.chain:
                try:
                    self._pass_on(op)
                except KeyboardInterrupt as exc:
                    late = exc
            if late is not None:
                raise late
        if op.error is not None:
            raise op.error
        return op.result

    def _line_up(self, op: _Op) -> None:
        """Under the mutex, before `op` joins the line: take the turn if it is
        free, else give `op` a held lock, for its caller to sleep on until a
        leader releases it."""
        if self._leading:
            op.lock = threading.Lock()
            op.lock.acquire()
        else:
            self._leading = op.turn = True

    def _end_turn(self, op: _Op) -> None:
        """Pass the turn on if `op` holds it; and if its caller was
        interrupted while it waited, take it out of line.  (A write that a
        leader has taken is committed all the same.)"""
        if not op.turn:
            with self._mutex:
                if op in self._queue:
                    self._queue.remove(op)
                if not op.turn:
                    return
        self._hand_over(op)

    def _hand_over(self, op: _Op | None = None) -> None:
        """End this turn (`op`'s, if given): read data_version if asked, then
        pass the turn to the first caller waiting (waking that one alone),
        or to close()."""
        try:
            if self._look_wanted:
                self._look_wanted = False
                self._look()
        except BaseException:
            self._changed = True    # unknown, so assume other processes wrote
            raise
        finally:
            with self._mutex:
                if op is not None and op in self._queue:    # given the turn as a Ctrl-C came
                    self._queue.remove(op)
                # `op.turn` is cleared in the step that passes the turn on,
                # with no call between: a Ctrl-C comes before (the caller
                # hands over again) or after, never between.
                if self._queue:
                    following = self._queue[0]
                    following.turn = True
                    if op is not None:
                        op.turn = False
                    following.lock.release()
                elif self._closer is not None and self._closer.lock is not None:
                    if op is not None:
                        op.turn = False
                    self._closer.lock.release()
                else:
                    self._leading = False
                    if op is not None:
                        op.turn = False

    def _commit(self, own: _Op, batch: list[_Op] | None = None) -> None:
        """Lead one transaction for `batch`, or every write queued, then wake
        their callers."""
        try:
            if batch is None:
                batch = []
                with self._mutex:
                    batch, self._queue = self._queue, []
            try:
                # Only the leader's own write may go alone (autocommitted): a
                # Ctrl-C between its commit and its `done` must not leave
                # another caller's write, done, to be done again.
                self._transaction(batch, absorb=True, lone=len(batch) == 1 and batch[0] is own)
            except Exception:
                for op in batch:     # find the write that failed; keep the others
                    if not op.done:
                        try:
                            self._transaction([op])
                        except Exception as exc:
                            op.error = self._error(exc)
                            op.done = True
            self._wake(batch, own)
        except BaseException:
            # Interrupted (Ctrl-C in the leading thread): the other callers'
            # writes not yet done go back in line, and the next turn is theirs.
            with self._mutex:
                self._queue[:0] = [op for op in batch if op is not own and not op.done
                                   and op not in self._queue]
            self._wake(batch, own)
            raise

    def _wake(self, batch: list[_Op], own: _Op) -> None:
        """Wake the callers whose writes are done (again after an interrupt):
        the first, which wakes the next (`_pass_on`), and so on.  They would
        only queue for the GIL if woken all at once, each making the others
        (and the next leader) wait for it in turn."""
        if len(batch) == 1 and batch[0] is own:
            return      # (most commits: nobody else to wake)
        with self._mutex:
            woken = [op for op in batch
                     if op.done and not op.woken and not op.gone and op is not own]
            if woken and self._sync == "full":
                # There an fsync costs far more than a herd at the GIL, and
                # the sooner they all write again, the more share the next.
                for op in woken:
                    self._wake_one(op)
            elif woken:
                woken[0].chain = woken[1:]
                self._wake_one(woken[0])

    def _pass_on(self, op: _Op) -> None:
        """`op`'s caller goes (woken, or interrupted while it waited): wake
        the next caller of its chain, and never `op`'s again."""
        with self._mutex:
            op.gone = True
            chain = op.chain or ()
            for i, after in enumerate(chain):
                if not after.woken and not after.gone:
                    after.chain = chain[i + 1:]
                    self._wake_one(after)
                    break
            op.chain = None

    @staticmethod
    def _wake_one(op: _Op) -> None:
        try:
            op.lock.release()
        except RuntimeError:    # released by a pass that a Ctrl-C cut short
            pass
        op.woken = True

    def _transaction(self, ops: list[_Op], absorb: bool = False, lone: bool = False) -> None:
        db = self._db
        if db is None:
            raise BleroError(f"{self.path}: the queue is stopped")
        if db.in_transaction:       # left open by a Ctrl-C at the wrong moment
            db.execute("ROLLBACK")
        # A lone write commits by itself, unless the last commit was shared:
        # others are likely to come then while this one runs, and share its
        # commit, which one committing by itself cannot let them.  Nor with
        # sync="full": there the fsync is what costs, and it is worth sharing.
        if (lone and ops[0].alone and not self._shared and not self._queue
                and self._sync != "full"):
            self._check_identity()
            self._done(ops, [self._retrying(ops[0].fn, db, *ops[0].args)])
            return
        committing = False
        try:
            self._begin(db)
            results = [op.fn(db, *op.args) for op in ops]
            if absorb and self._queue:
                # Writes that came while this one ran share its commit (and,
                # with sync="full", its fsync).  `ops` grows in place, so the
                # caller's retries and wake-ups cover them.
                with self._mutex:
                    n = len(ops)
                    ops.extend(self._queue)
                    del self._queue[:]
                results.extend(op.fn(db, *op.args) for op in ops[n:])
            self._check_identity()
            committing = True
            db.execute("COMMIT")
            self._shared = len(ops) > 1
            self._done(ops, results)
        except BaseException as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            if committing and not isinstance(exc, sqlite3.Error):
                self._done(ops, results)    # interrupted after the COMMIT: all done
            raise

    @staticmethod
    def _done(ops: list[_Op], results: list) -> None:
        for op, result in zip(ops, results):
            op.result = result
            op.done = True

    def _begin(self, db) -> None:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            self._retrying(db.execute, "BEGIN IMMEDIATE")

    def _retrying(self, fn, *args):
        """`fn(*args)`, a statement that takes the write lock before it does
        anything: again while another connection holds it (a while)."""
        deadline = None
        while True:
            try:
                return fn(*args)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                now = time.monotonic()
                deadline = deadline or now + _BUSY_LIMIT
                if now >= deadline:
                    raise BleroError(f"{self.path}: another connection has held the write "
                                     f"lock for over {_BUSY_LIMIT:.0f} s") from exc

    def _check_identity(self) -> None:
        # SQLite keeps writing to a file that was deleted or replaced, and
        # everything written there is lost: refuse instead.
        try:
            st = os.stat(self.real)
            same = (st.st_dev, st.st_ino) == self._identity
        except OSError:
            same = False
        if not same:
            raise BleroError(f"{self.path}: the queue file was removed or replaced "
                             f"while the queue was running")

    def _error(self, exc: Exception) -> Exception:
        if isinstance(exc, BleroError):
            return exc
        if isinstance(exc, sqlite3.Error):
            try:
                self._check_identity()
            except BleroError as moved:
                return moved
            error = BleroError(f"{self.path}: {exc}{self._space_hint(exc)}")
            error.__cause__ = exc
            return error
        return exc

    def _space_hint(self, exc: Exception) -> str:
        """Why a write failed, where SQLite only says "disk I/O error"."""
        text = str(exc)
        if "disk I/O error" not in text and "full" not in text:
            return ""
        if resource is not None:
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY:
                return f" (this process may not write files over {limit} bytes: RLIMIT_FSIZE)"
        try:
            st = os.statvfs(os.path.dirname(self.real) or ".")
        except (OSError, AttributeError):
            return ""
        free = st.f_bavail * st.f_frsize
        return f" (the disk is full: {free} bytes free)" if free < (1 << 24) else ""

    def _read(self, fn, *args):
        """Run `fn(reader, *args)` on the read connection."""
        with self._read_lock:
            db = self._reader
            if db is None:
                raise BleroError(f"{self.path}: the queue is stopped")
            deadline = None
            while True:
                try:
                    result = fn(db, *args)
                    break
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc):
                        raise self._error(exc) from exc
                    deadline = deadline or time.monotonic() + _BUSY_LIMIT
                    if time.monotonic() >= deadline:
                        raise self._error(exc) from exc
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc
        # A removed or replaced file still answers, from what it was: one
        # stat (as every commit makes) tells.
        self._check_identity()
        return result

    # -- enqueueing ------------------------------------------------------------

    def insert(self, rows: list[_NewJob], connection=None,
               after: list[tuple[int, ...]] | None = None) -> tuple[list[int], list[bool]]:
        if connection is None:
            return self._write(self._insert, rows, after,
                               alone=after is None and len(rows) == 1 and rows[0].key is None)
        self.same_database(connection)
        if not connection.in_transaction:   # (sqlite3 begins one only before its own DML)
            connection.execute("BEGIN")
        # A savepoint: enqueue_many is all or nothing, inside the caller's transaction.
        connection.execute("SAVEPOINT blero_enqueue")
        try:
            found = self._insert(connection, rows, after)
        except BaseException:
            connection.execute("ROLLBACK TO blero_enqueue")
            raise
        finally:
            connection.execute("RELEASE blero_enqueue")
        return found

    def same_database(self, connection) -> None:
        """Raise ValueError unless `connection` (sqlite3's) is open on this queue's file."""
        if not isinstance(connection, sqlite3.Connection):
            raise ValueError(f"connection must be an sqlite3 connection to {self.path}, "
                             f"not {type(connection).__name__}")
        try:
            files = [row[2] for row in connection.execute("PRAGMA database_list")
                     if row[1] == "main"]
            st = os.stat(files[0]) if files and files[0] else None
        except (sqlite3.Error, OSError) as exc:
            raise ValueError(f"connection must be open on {self.path}: {exc}") from exc
        if st is None or (st.st_dev, st.st_ino) != self._identity:
            raise ValueError(f"connection is open on {files[0] if files and files[0] else 'another database'!r}, "
                             f"not on the queue file {self.path}")

    @classmethod
    def _insert(cls, db, rows, after=None):
        if after is not None:
            return cls._insert_each(db, rows, after)
        if len(rows) == 1 and rows[0].key is None:
            return [db.execute(_INSERT, rows[0]).lastrowid], [True]
        # The keys already stored, looked up a slice at a time; then every
        # row to store goes in by executemany, in runs between the rows a
        # key answers (a key given twice in one call: the first is stored).
        keys = list({row.key for row in rows if row.key is not None})
        found: dict[str, int] = {}
        for i in range(0, len(keys), _IDS_SLICE):
            part = keys[i:i + _IDS_SLICE]
            found.update(db.execute(_FIND_KEYS.format(keys=", ".join("?" * len(part))),
                                    part).fetchall())
        ids: list[int] = []
        stored: list[bool] = []
        run: list[_NewJob] = []
        running: set[str] = set()   # keys of the rows in `run`

        def flush():
            if run:
                db.executemany(_INSERT, run)
                last = db.execute(_LAST_ID).fetchall()[0][0]
                first = last - len(run) + 1
                ids.extend(range(first, last + 1))
                stored.extend([True] * len(run))
                found.update((r.key, first + k) for k, r in enumerate(run) if r.key is not None)
                run.clear()
                running.clear()

        for row in rows:
            if row.key in running:
                flush()
            if row.key is not None and row.key in found:
                flush()
                ids.append(found[row.key])
                stored.append(False)
                continue
            run.append(row)
            if row.key is not None:
                running.add(row.key)
        flush()
        return ids, stored

    @classmethod
    def _insert_each(cls, db, rows, after):
        """Store jobs one by one, those with ids in `after` as _insert_after
        says; an id never given raises ValueError before anything is stored
        (on a server, before any id is used up)."""
        highest = max((dep for deps in after for dep in deps), default=0)
        if highest > (db.execute(cls._last_given).fetchall()[0][0] or 0):
            raise ValueError(f"after: there is no job {highest}")   # (every lower id was given)
        ids: list[int] = []
        stored: list[bool] = []
        for row, deps in zip(rows, after):
            found = row.key is not None and db.execute(_FIND_KEY, (row.key,)).fetchall()
            if found:
                ids.append(found[0][0])
            elif deps:
                ids.append(cls._insert_after(db, row, deps))
            else:
                ids.append(db.execute(_INSERT, row).lastrowid)
            stored.append(not found)
        return ids, stored

    @staticmethod
    def _insert_after(db, row, after):
        """Store a job that waits on the jobs `after` names: waiting, unless
        every one is complete; cancelled at once if one ended otherwise."""
        waits, ended = False, None
        for dep in after:   # (each was given: see _insert_each; gone: swept once ended)
            db.execute(_MARK_DEPENDED_ON, (dep,))
            found = db.execute(_STATE_OF, (dep,)).fetchall()
            state = found[0][0] if found else _SWEPT
            if state == _SWEPT:
                continue
            if state < _COMPLETE:
                waits = True
            elif state != _COMPLETE and ended is None:
                ended = (dep, _STATE_NAME[state])
        if waits or ended:
            row = row._replace(state=_WAITING)
        job_id = db.execute(_INSERT, row).lastrowid
        db.executemany(_ADD_DEP, [(job_id, seq, dep) for seq, dep in enumerate(after)])
        if ended:
            db.execute(_CANCEL_WAITING, (row.created_at, _chain_error(*ended), job_id))
        return job_id

    # -- claiming and finishing --------------------------------------------------

    def finish_and_claim(self, finish: _Finish | None, owner: int,
                         names: frozenset | None, claim: bool, suspect: bool = False,
                         exclude: frozenset = frozenset(),
                         runner: str | None = None) -> _Claimed:
        recorded = False
        if (claim and not suspect and finish is not None and finish.state == _COMPLETE
                and self._returning and not self._held):
            recorded, row = self._write(self._complete_and_claim, finish, owner,
                                        (names, exclude, runner), alone=True)
            if row is not None:
                return _Claimed(recorded, row, None)
            # Nothing claimed: no job ready (that it takes), a pause or a
            # limit stored, or a job with dependants finished (then nothing
            # was done): the usual way, for what is left.
            if recorded:
                finish = None
        done = self._write(self._finish_and_claim, finish, owner, names, claim, suspect,
                           exclude, runner)
        self._held = done.held
        return done._replace(recorded=True) if recorded else done

    def _complete_and_claim(self, db, finish, owner, takes):
        """_COMPLETE_AND_CLAIM: whether the try was recorded, and the job claimed or None."""
        n, m, params = self._claim_params(takes)
        sql = self._complete_sql.get((n, m))
        if sql is None:
            cond = _takes_cond(n, m, lambda i: f"?{13 + i}")
            sql = self._complete_sql[n, m] = _COMPLETE_AND_CLAIM.format(
                next=_NEXT_READY.format(state=_READY, names=cond, held=_NOTHING_HELD))
        values = finish + (owner, time.time()) + params
        # (numbered parameters are bound by name: "?8" is the key "8")
        rows = db.execute(sql, dict(zip(_NUMBERS, values))).fetchall()
        claimed = [r for r in rows if r[0] != finish.id]
        return len(rows) > len(claimed), _Claim._make(claimed[0]) if claimed else None

    def _finish_and_claim(self, db, finish, owner, names, claim, suspect=False,
                          exclude=frozenset(), runner=None):
        now = time.time()
        recorded, wake, delayed, due, cancelled = False, (), None, None, 0
        if finish is not None:
            recorded, chained = db.execute(_FINISH_UNWAITED, finish).rowcount == 1, False
            if not recorded:
                recorded = chained = db.execute(_FINISH, finish).rowcount == 1
            if recorded and finish.state == _FAILED:
                chained = True      # (rare: the chain below it, if any, is looked for)
            if chained and finish.state in (_COMPLETE, _FAILED):
                wake, delayed, cancelled = self._ended(db, finish.id, finish.state, now)
        if not claim:
            return _Claimed(recorded, None, None, wake, delayed, False, None, cancelled)
        takes = (names, exclude, runner)
        row, held, blocked = self._claim(db, owner, takes, suspect, now), False, ()
        if row is None:
            controls = db.execute(_CONTROLS).fetchall()
            if controls:
                held = True
                row, due, blocked = self._claim_held(db, owner, takes, suspect, now, controls)
        left = None
        if suspect and row is None:
            # Suspects held back by a pause or a limit hold nothing else up
            # (see _CrashGuard): they are run alone once they may run.
            left = frozenset(kind for kind in map(tuple, db.execute(_SUSPECT_KINDS))
                             if blocked is not None and kind[0] not in blocked)
        return _Claimed(recorded, row, left, wake, delayed, held, due, cancelled)

    def _claim(self, db, owner, takes, suspect, now, blocked=None) -> _Claim | None:
        """Claim the next job that `takes` (names, exclude, runner: as
        finish_and_claim's) while nothing is held, or, given the names
        `blocked` (paused or at a limit), one of another."""
        n, m, params = self._claim_params(takes)
        if blocked is None:
            sql = self._claim_statements(n, suspect, m)
        else:
            sql = self._claim_statements(n, suspect, m, len(blocked))
            params += tuple(blocked)
        if self._returning:
            rows = db.execute(sql[1], (owner, now) + params + (owner,)).fetchall()
            return _Claim._make(rows[0]) if rows else None
        found = db.execute(sql[0], params).fetchall()
        if found and db.execute(_CLAIM, (owner, now, found[0][0], owner)).rowcount:
            return _Claim._make(db.execute(_JOB_BY_ID, (found[0][0],)).fetchall()[0])
        return None

    def _claim_held(self, db, owner, takes, suspect, now, controls):
        """The claim while pauses or limits are stored: the names paused or at
        their limit are left out.  (The transaction holds SQLite's one write
        lock, so no other claim comes between the counts and the claim.)
        On a server, claims under pauses or limits take turns on a lock, and
        look at them afresh once they hold it (see _PostgresStorage).
        Returns the claim or None, when a rate limit lets one more start, and
        the names left out (None: all of them, everything is paused)."""
        names = takes[0]
        if self._held_lock is not None:    # on a server: the counts and the claim, alone
            db.execute(self._held_lock)
            controls = db.execute(_CONTROLS).fetchall()     # as they are now
            now = time.time()       # (a rate counts from when the claim is made)
        blocked, windows, until = [], {}, None
        for name, paused, concurrency, rate, per in controls:
            if name == "":
                if paused:
                    return None, None, None
                continue
            if names is not None and name not in names:
                continue
            if paused or concurrency is not None and db.execute(
                    _RUNNING_NAMED, (name,)).fetchall()[0][0] >= concurrency:
                blocked.append(name)
            elif rate is not None:
                window = _rate_window(per)
                started = db.execute(_STARTS_SINCE, (name, now - window)).fetchall()[0][0]
                if started >= rate:
                    blocked.append(name)
                    first = db.execute(_NTH_START, (name, now - window, started - rate)
                                       ).fetchall()[0][0]
                    until = first + window if until is None else min(until, first + window)
                else:
                    windows[name] = window
        if names is not None and names <= set(blocked):
            return None, until, blocked
        row = self._claim(db, owner, takes, suspect, now, blocked)
        if row is not None and row.name in windows:
            db.execute(_PRUNE_STARTS, (row.name, now - windows[row.name]))
            db.execute(_ADD_START, (row.name, now))
        return row, until, blocked

    @staticmethod
    def _claim_params(takes) -> tuple[int, int, tuple]:
        """How many names a claim that `takes` (names, exclude, runner)
        takes (n) or leaves out (m), and its parameters: those names (and
        the runner), or those left out."""
        names, exclude, runner = takes
        n = len(names) if names else 0
        m = 0 if n else len(exclude)
        return n, m, (tuple(names) + (_TASK_RUNNER if runner is None else runner,) if n
                      else tuple(exclude))

    def _claim_statements(self, n: int, suspect: bool = False, m: int = 0,
                          blocked: int | None = None) -> tuple[str, str]:
        """The SQL that finds, and that claims, the next job (or suspect) of
        n names and one runner (0: any name but m others, of no runner):
        while nothing is held (`blocked` None), or leaving out `blocked` names."""
        sql = self._claim_sql.get((n, suspect, m, blocked))
        if sql is None:
            cond = _takes_cond(n, m, lambda i: "?")
            held = (self._nothing_held if blocked is None else
                    f" AND name NOT IN ({', '.join('?' * blocked)})" if blocked else "")
            state = _SUSPECT if suspect else _READY
            select = _NEXT_READY.format(state=state, names=cond, held=held)
            claim = _CLAIM_RETURNING.format(next=select + self._skip_locked, state=state)
            sql = (select, claim)
            if blocked is None or blocked < 8:      # (more are rare: not kept)
                self._claim_sql[n, suspect, m, blocked] = sql
        return sql

    def progress(self, marks: list[_Mark]) -> None:
        self._write(lambda db: db.executemany(_PROGRESS, marks))

    def checkpoint(self, mark: _Mark) -> bool:
        return self._write(lambda db: db.execute(_SAVE_CHECKPOINT, mark).rowcount == 1)
    @classmethod
    def _ended(cls, db, job_id: int, state: int, now: float):
        """A job with dependants ended `state`: when complete, make ready
        those whose `after` jobs are all complete now; else cancel them, and
        theirs, down the chain.  Returns (names made ready, when the first
        made delayed is due, how many cancelled)."""
        if state != _COMPLETE:
            return (), None, cls._cancel_down(db, job_id, state, now)
        waiting = [r[0] for r in db.execute(_WAITING_ON.format(lock=cls._lock_rows),
                                            (job_id,)).fetchall()]
        if not waiting:
            return (), None, 0
        found = db.execute(_RELEASABLE.format(ids=", ".join("?" * len(waiting))),
                           waiting).fetchall()
        db.executemany(_RELEASE, [(_DELAYED if run_at > now else _READY, i)
                                  for i, _, run_at in found])
        later = [run_at for _, _, run_at in found if run_at > now]
        return (tuple(name for _, name, run_at in found if run_at <= now),
                min(later) if later else None, 0)

    @staticmethod
    def _cancel_down(db, job_id: int, state: int, now: float) -> int:
        """Cancel every job waiting on `job_id` (which ended `state`), and on
        those, down the chain; return how many."""
        found = db.execute(_DOWN_THE_CHAIN, (job_id,)).fetchall()
        db.executemany(_CANCEL_WAITING, [
            (now, _chain_error(dep, _STATE_NAME[state] if dep == job_id else "cancelled"), i)
            for i, dep in found])
        return len(found)

    def suspect_kinds(self) -> frozenset:
        return self._read(lambda db: frozenset(map(tuple, db.execute(_SUSPECT_KINDS))))

    def release(self, owner: int, outcome: Callable[[_Claim], _Finish], drop_owner: bool,
                started: set[tuple[int, int]] | None = None,
                unclaimed: int = _READY) -> tuple[list[_Claim], int]:
        return self._write(self._release, owner, outcome, drop_owner, started, unclaimed)

    def unclaim(self, job_id: int, owner: int, attempt: int, state: int = _READY) -> None:
        self._write(lambda db: db.execute(_UNCLAIM, (state, job_id, owner, attempt)))

    @classmethod
    def _release(cls, db, owner, outcome, drop_owner, started, unclaimed):
        done, undone = [], 0
        for row in map(_Claim._make, db.execute(_RUNNING_OF, (owner,)).fetchall()):
            if started is not None and (row.id, row.attempt) not in started:
                undone += db.execute(_UNCLAIM, (unclaimed, row.id, owner, row.attempt)).rowcount
                continue
            finish = outcome(row)
            if db.execute(_FINISH, finish).rowcount == 1:
                done.append(row)
                if finish.state == _FAILED:
                    cls._cancel_down(db, row.id, _FAILED, time.time())
        if drop_owner:
            db.execute(_DROP_OWNER, (owner,))
        return done, undone

    def running_ids(self, owner: int) -> set[int]:
        return self._read(lambda db: {r[0] for r in db.execute(_RUNNING_IDS, (owner,))})

    def promote(self, now: float) -> tuple[int, float | None]:
        return self._write(self._promote, now)

    @staticmethod
    def _promote(db, now):
        count = db.execute(_PROMOTE, (now,)).rowcount
        return count, db.execute(_NEXT_DELAYED).fetchall()[0][0]

    def next_delayed(self) -> float | None:
        return self._read(lambda db: db.execute(_NEXT_DELAYED).fetchall()[0][0])

    # -- owners: who holds which jobs, alive or dead -------------------------------

    def hold_owner(self, owner: int) -> None:
        _hold_owner(self.real, owner)

    def release_owner(self, owner: int) -> None:
        _release_owner(self.real, owner)

    def owner_alive(self, owner: int) -> bool | None:
        return _owner_alive(self.real, owner)

    def heartbeat(self, owner: int, now: float, takes: frozenset | None,
                  processors: tuple[_ProcessorSeen, ...]) -> None:
        row = (owner, os.getpid(), now, now, _takes_json(takes), _HOST, json.dumps(processors))
        self._write(lambda db: db.execute(_HEARTBEAT, row))

    def owners(self) -> list[_OwnerSeen]:
        return [_owner_seen(*row) for row in self._read(lambda db: db.execute(_OWNERS).fetchall())]

    def running_by_owner(self) -> dict[int, int]:
        return dict(self._read(lambda db: db.execute(_RUNNING_BY_OWNER).fetchall()))

    def changed_elsewhere(self) -> bool:
        # Never waits for a write under way (waking a waiter on every commit
        # would cost each writer a thread hand-off): that write's leader
        # looks when it is done, and the answer comes with the next call.
        took = False
        try:    # (from here: a Ctrl-C never leaves the turn taken)
            with self._mutex:
                if self._leading or self._closer is not None:
                    self._look_wanted = True
                else:
                    self._leading = took = True
            if took:
                self._look()
        finally:
            if took:
                self._hand_over()
        changed, self._changed = self._changed, False
        return changed

    def _look(self) -> None:
        # data_version changes only for other connections' commits, and is
        # read on the write connection, under the leader's turn.
        db = self._db
        if db is None:
            return
        try:
            version = db.execute("PRAGMA data_version").fetchall()[0][0]
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        if self._data_version is not None and version != self._data_version:
            self._changed = True
        self._data_version = version

    # -- operating on jobs ---------------------------------------------------------

    def cancel(self, job_id: int, now: float,
               pending_only: bool = False) -> tuple[int, int | None, int] | None:
        return self._write(self._cancel, job_id, now, _DELAYED if pending_only else _RUNNING)

    @classmethod
    def _cancel(cls, db, job_id, now, upto):
        found = db.execute(_STATE_OF, (job_id,)).fetchall()
        if not found or db.execute(_CANCEL, (now, job_id, upto)).rowcount == 0:
            return None
        return found[0] + (cls._cancel_down(db, job_id, _CANCELLED, now),)

    def clear_keys(self, ids: list[int]) -> None:
        # By runs of consecutive ids (a map's jobs mostly are one): each
        # run in one statement.
        runs: list[list[int]] = []
        for i in sorted(set(ids)):
            if runs and runs[-1][1] == i - 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        self._write(lambda db: db.executemany(_CLEAR_KEYS, runs))

    def run_by(self, ids: list[int], runner: str | None) -> None:
        self._write(lambda db: db.executemany(_SET_RUNNER, [(runner, i) for i in ids]))

    def retry_failed(self, ids: Iterable[int] | None, retries: int, now: float) -> int:
        params = ([(now, retries, None, None)] if ids is None
                  else [(now, retries, i, i) for i in ids])
        return self._write(lambda db: db.executemany(_RETRY, params).rowcount)

    def sweep_slice(self, before: float, states: tuple[int, ...],
                    after: tuple[float, int]) -> tuple[int, tuple[float, int] | None]:
        in_states = ", ".join(str(s) for s in states)
        params = (before, after[0], after[0], after[1], _SWEEP_SLICE)
        found = self._read(lambda db: db.execute(
            _SWEEPABLE.format(states=in_states), params).fetchall())
        if not found:
            return 0, None
        sql = (_SWEEP.format(states=in_states), _TOMBSTONE.format(states=in_states))
        gone = self._write(self._sweep, found, before, sql)
        last_id, _, last_finished = found[-1]
        return gone, (None if len(found) < _SWEEP_SLICE else (last_finished, last_id))

    _reuses_ids = True      # SQLite hands the highest id out again once it is deleted

    def _sweep(self, db, found, before, sql):
        # The newest job is kept as a tombstone where its id would be reused.
        newest = db.execute(_MAX_ID).fetchall()[0][0] if self._reuses_ids else _INT_MAX
        jobs = [(i, newest, before) for i, state, _ in found if state != _SWEPT]
        gone = db.executemany(sql[0], jobs).rowcount if jobs else 0
        tombstones = [(i, newest, before) for i, state, _ in found if state == _SWEPT]
        if tombstones:
            db.executemany(sql[0], tombstones)
        if any(i == newest for i, _, _ in jobs):
            gone += db.execute(sql[1], (newest, before)).rowcount
        if db.execute(_ANY_DEPS).fetchall()[0][0]:
            db.executemany(_SWEEP_DEPS, [(i, i) for i, _, _ in found])
        return gone

    def give_back_slice(self) -> bool:
        if not self._read(lambda db: db.execute(_FREE_PAGES).fetchall()[0][0]):
            return False
        return self._write(self._give_back)

    @staticmethod
    def _give_back(db) -> bool:
        """Free up to _FREE_SLICE pages; True while more are left to free."""
        free = db.execute(_FREE_PAGES).fetchall()[0][0]
        for _ in range(min(free, _FREE_SLICE)):
            db.execute(_FREE_PAGE)
        left = db.execute(_FREE_PAGES).fetchall()[0][0]
        return 0 < left < free

    def compact(self) -> None:
        self.give_back()
        self._read(lambda db: db.execute(_CHECKPOINT).fetchall())

    # -- schedules -----------------------------------------------------------------

    def upsert_schedule(self, row: _Schedule) -> None:
        self._write(lambda db: db.execute(_UPSERT_SCHEDULE, row))

    def drop_schedule(self, key: str) -> bool:
        return self._write(lambda db: db.execute(_DROP_SCHEDULE, (key,)).rowcount == 1)

    def schedules(self) -> list[_StoredSchedule]:
        return self._read(lambda db: list(map(_StoredSchedule._make, db.execute(_SCHEDULES))))

    def run_schedules(self, now: float, make_row: Callable[[_DueSchedule, float], _NewJob],
                      since: float) -> tuple[list[str], float | None]:
        if not self._read(lambda db: db.execute(_DUE_SCHEDULES, (now,)).fetchall()):
            return [], self._read(lambda db: db.execute(_NEXT_SCHEDULE).fetchall()[0][0])
        return self._write(self._run_schedules, now, make_row, since)

    def _run_schedules(self, db, now, make_row, since):
        names = []
        for sched in map(_DueSchedule._make, db.execute(self._due_schedules, (now,)).fetchall()):
            key, due = sched.key, sched.next_due
            last_id, last_made, last_start = sched.job_id, sched.last_created, sched.last_started
            if last_start is not None and last_made < since and last_start >= due:
                # The last run was left pending over downtime, and ran after
                # it: it was the run at once, and the cadence restarts from it.
                due = sched.following(last_start)
                if due > now:
                    db.execute(_SCHEDULED_RUN, (due, last_id, key))
                    continue
            job_id = db.execute(_INSERT, make_row(sched, now)).lastrowid
            after = sched.following(due)
            if after <= now:        # runs were missed: one now, and count from it
                after = sched.following(now)
            # In the transaction that enqueued the run: no other process
            # sees this slot due once it is committed.
            db.execute(_SCHEDULED_RUN, (after, job_id, key))
            names.append(sched.name)
        return names, db.execute(_NEXT_SCHEDULE).fetchall()[0][0]

    # -- pauses and limits ---------------------------------------------------------

    def set_paused(self, name: str | None, paused: bool) -> None:
        def change(db):
            self._lock_claims(db)
            if paused:
                db.execute(_PAUSE, ("" if name is None else name,))
            elif name is None:
                db.execute(_RESUME_ALL)
            else:
                db.execute(_RESUME, (name,))
            db.execute(_DROP_IDLE_CONTROLS)
        self._write(change)

    def paused(self) -> set[str | None]:
        return {name or None for (name,) in self._read(lambda db: db.execute(_PAUSED).fetchall())}

    def set_limit(self, name: str, concurrency: int | None,
                  rate: tuple[int, float] | None) -> None:
        n, per = (None, None) if rate is None else rate

        def change(db):
            self._lock_claims(db)
            db.execute(_SET_LIMIT, (name, concurrency, n, per))
            if rate is None:
                db.execute(_DROP_STARTS, (name,))
            db.execute(_DROP_IDLE_CONTROLS)
        self._write(change)

    def limits(self) -> dict[str, tuple[int | None, tuple[int, float] | None]]:
        rows = self._read(lambda db: db.execute(_LIMITS).fetchall())
        return {name: (concurrency, None if n is None else (n, per))
                for name, concurrency, n, per in rows}

    def _lock_claims(self, db) -> None:
        """Before a pause or limit changes: on a server, wait for the claims
        under way and hold off those to come until this commits (the file's
        write lock does that already)."""
        for lock in (self._change_lock, self._held_lock):
            if lock is not None:
                db.execute(lock)

    def claims_settled(self) -> None:
        if self._change_lock is not None:
            self._write(lambda db: db.execute(self._change_lock))

    def running_by_name(self) -> dict[str, int]:
        return dict(self._read(lambda db: db.execute(_RUNNING_BY_NAME).fetchall()))

    def last_claim(self, name: str | None) -> float | None:
        return self._read(lambda db: db.execute(
            _LAST_CLAIM, (name is None, name or "")).fetchall()[0][0])

    # -- inspecting ------------------------------------------------------------------

    def get(self, job_id: int) -> _Stored | None:
        rows = self._read(lambda db: db.execute(_GET, (job_id,)).fetchall())
        return _Stored._make(rows[0]) if rows else None

    def outcome(self, job_id: int) -> _Ended | None:
        rows = self._read(lambda db: db.execute(_OUTCOME, (job_id,)).fetchall())
        return _Ended._make(rows[0]) if rows else None

    def outcomes(self, ids: list[int]) -> dict[int, _Ended]:
        def look(db):
            found = {}
            for i in range(0, len(ids), _IDS_SLICE):
                part = ids[i:i + _IDS_SLICE]
                sql = _OUTCOMES.format(ids=", ".join("?" * len(part)))
                found.update((row[0], _Ended._make(row[1:])) for row in db.execute(sql, part))
            return found
        return self._read(look)

    def list(self, state: str | None, name: str | None, limit: int | None,
             newest_first: bool = False, beyond: int | None = None) -> list[_Stored]:
        lo, hi = _STATE_CODES[state] if state else (_WAITING, _CANCELLED)
        sql = _LIST.format(order="DESC" if newest_first else "ASC",
                           beyond="<" if newest_first else ">")
        if beyond is None:
            beyond = _INT_MAX if newest_first else 0
        params = (lo, hi, name, name, beyond, self._no_limit if limit is None else limit)
        return self._read(lambda db: list(map(_Stored._make, db.execute(sql, params))))

    def pending_in_run_order(self, limit: int) -> list[_Stored]:
        return self._read(lambda db: list(map(_Stored._make,
                                              db.execute(_PENDING_IN_RUN_ORDER, (limit,)))))

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for code, n in self._read(lambda db: db.execute(_COUNTS).fetchall()):
            if code < _SWEPT:
                counts[_STATE_NAME[code]] += n
        return counts

    def finished_since(self, since: float, step: float) -> list[tuple[float, str, int]]:
        rows = self._read(lambda db: db.execute(_FINISHED_SINCE, (step, step, since)).fetchall())
        return [(start, _STATE_NAME[code], n) for start, code, n in rows]

    def outstanding(self) -> bool:
        return bool(self._read(lambda db: db.execute(_OUTSTANDING).fetchall()[0][0]))

    def pending_by_name(self) -> list[tuple[str, bool, int]]:
        return [(name, bool(call), n) for name, call, n in
                self._read(lambda db: db.execute(_PENDING_BY_NAME).fetchall())]


# -- The PostgreSQL engine: one server that any number of hosts share ---------
#
# The same tables and the same statements as the file, in a schema of their
# own (`schema=`, default "blero"): `_pg_sql` turns each statement above into
# PostgreSQL's dialect once, so the two engines can never drift, and the
# SQLite engine's methods that only run statements are this engine's too
# (`_PG_SHARED`, below the class).  What is PostgreSQL's own lives here:
# connections, liveness by advisory locks, LISTEN/NOTIFY, claims that skip
# rows another transaction has locked.

_PG_SCHEMA_VERSION = 5       # blero_meta.version this blero.py writes and reads
_PG_DEFAULT_SCHEMA = "blero"  # where the tables are when `schema=` is not given
_PG_POOL = 4                 # connections for reads and writes, besides the owner's own
_PG_CONNECT_TIMEOUT = 5      # seconds: an unreachable server is an error, not a hang
_PG_STATEMENT_TIMEOUT = 30   # seconds any statement may take
_PG_POOL_WAIT = 30.0         # seconds a call waits for a free connection
_PG_ANSWER_MARGIN = 5.0      # seconds past the statement timeout a statement waits for an answer
_PG_ROW_TIME = 0.01          # seconds more a statement run for many rows at once may take per row
_PG_POLL = 0.5               # seconds between looks for other processes' commits, without LISTEN
_PG_SCHEMES = ("postgresql://", "postgres://")
_PG_BACKOFF_MAX = 5.0        # seconds between reconnections, at most
_PG_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")

# blero's tables, from the file's: the same columns, in PostgreSQL's types
# (ids never reused: an identity column never hands a value out twice).
_PG_TYPES = (("INTEGER PRIMARY KEY", "BIGINT PRIMARY KEY"), ("INTEGER", "BIGINT"),
             ("REAL", "DOUBLE PRECISION"), ("BLOB", "BYTEA"))
_PG_META = "CREATE TABLE blero_meta (version INTEGER NOT NULL)"
_PG_TABLES = _TABLES | {"blero_meta"}
# Another schema's tables are not ours: nothing is created beside them.
_PG_SCHEMA_TABLES = ("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                     " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')")
_PG_VERSION = "SELECT max(version) FROM blero_meta"
# One statement: tries the owner's lock, and gives it back at once if it got it.
_PG_OWNER_ALIVE = ("SELECT CASE WHEN pg_try_advisory_lock(%s) THEN NOT pg_advisory_unlock(%s)"
                   " ELSE true END")
# The newest id the jobs' identity gave (the newest job may have been swept).
_PG_LAST_GIVEN = "SELECT pg_sequence_last_value(pg_get_serial_sequence('blero_jobs', 'id'))"
_PG_LISTEN = "LISTEN {channel}"
# What tells two connections are on one database of one server.
_PG_WHERE = "SELECT current_database(), pg_postmaster_start_time(), inet_server_port()"
# A key in enqueue_many goes in once: a second one (or one another
# transaction is inserting) finds the first.
_PG_INSERT_KEYED = _INSERT + " ON CONFLICT (key) WHERE key IS NOT NULL DO NOTHING"
# Statements whose changes other processes act on at once: they NOTIFY.
_PG_WAKES = frozenset((_INSERT, _PG_INSERT_KEYED, _CANCEL, _RETRY, _PROMOTE, _FINISH, _UNCLAIM,
                       _FINISH_UNWAITED, _RELEASE, _RESUME, _RESUME_ALL, _SET_LIMIT,
                       _SET_RUNNER))


# _PG_UPGRADES[n - 1] takes a schema from blero_meta.version n to n + 1: a
# function of a _PGSession (so a step of the file's _UPGRADES that only runs
# statements may serve here too).  The steps a schema needs run in order, in
# the transaction that records its new version, under the creation lock, the
# first time this blero.py opens it.  A later schema appends its step and
# raises _PG_SCHEMA_VERSION with it; a new schema is made from _SCHEMA as it
# is, at the latest version.
def _pg_ddl(statement: str) -> str:
    """A CREATE (or ALTER) statement of the file's schema in PostgreSQL's types."""
    for sqlite_type, pg_type in _PG_TYPES:
        statement = re.sub(rf"\b{sqlite_type}\b", pg_type, statement)
    return statement.replace("id           BIGINT PRIMARY KEY,\n    state",
                             "id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,\n"
                             "    state")


# Many keyless jobs in one statement, a column of values per array in the
# column's own type; ids come from the sequence in the rows' order.
_PG_INSERT_ROWS = (
    f"INSERT INTO blero_jobs ({', '.join(_NewJob._fields)}) SELECT * FROM unnest("
    + ", ".join(_pg_ddl(f"?::{kind}[]") for kind in (
        dict(re.findall(r"^ +(\w+) +([A-Z]+)", _SCHEMA, re.M))[f] for f in _NewJob._fields))
    + ") RETURNING id")


def _pg_schema_2(db) -> None:
    """1 -> 2: what `after=`, pauses and limits store, as the file's schema 3 has it."""
    for statement in (_DEPENDANTS_COLUMN + ";" + _FLOW_SCHEMA).split(";"):
        db.execute(_pg_ddl(statement))


def _pg_schema_3(db) -> None:
    """2 -> 3: each owner's host and processors, as the file's schema 4 has them."""
    for statement in _OWNERS_PRESENCE:
        db.execute(_pg_ddl(statement))


def _pg_schema_4(db) -> None:
    """3 -> 4: progress and checkpoints of jobs, cron schedules, as the file's schema 5."""
    _add_columns(db, _FLOW_COLUMNS, _pg_ddl)


def _pg_schema_5(db) -> None:
    """4 -> 5: whose workers run a job, and a schedule's runs, as the file's schema 6."""
    _add_columns(db, _RUNNER_COLUMNS, _pg_ddl)


_PG_UPGRADES: tuple[Callable[[Any], None], ...] = (_pg_schema_2, _pg_schema_3, _pg_schema_4,
                                                   _pg_schema_5)


def _is_server(target) -> bool:
    """Whether `target` names a PostgreSQL server rather than a file."""
    return isinstance(target, str) and target.startswith(_PG_SCHEMES)


def _masked(url: str) -> str:
    """`url` as messages show it: without its password."""
    url = re.sub(r"(://[^:/@?]*:)[^@/?]*@", r"\1***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


def _psycopg():
    """psycopg 3, imported on first use: blero itself needs only the standard library."""
    try:
        import psycopg
    except ImportError as exc:
        raise BleroError('the PostgreSQL engine needs psycopg 3: pip install "psycopg[binary]"'
                         ) from exc
    return psycopg


@functools.lru_cache(maxsize=None)
def _pg_sql(sql: str, schema: str) -> str:
    """An SQLite statement of this section as PostgreSQL reads it: %s
    placeholders, blero's tables in `schema` (quoted), `interval` (a word
    PostgreSQL reserves) quoted, two-argument min() as LEAST, and CAST to
    INTEGER as floor (PostgreSQL's rounds), group_concat as string_agg; an
    INSERT of a job returns its id."""
    out = sql.replace("%", "%%").replace("?", "%s")
    out = re.sub(r"\bblero_(jobs|owners|schedules|meta|deps|controls|starts)\b",
                 lambda m: f"{schema}.{m.group(0)}", out)
    out = re.sub(r"\binterval\b", '"interval"', out)
    out = re.sub(r"\bmin\((?=[^()]*,)", "LEAST(", out)
    out = re.sub(r"CAST\(([^()]*) AS INTEGER\)", r"floor(\1)", out)
    out = out.replace(" WITHOUT ROWID", "").replace(       # (a job's list, in its order)
        "group_concat(dep_id)", "string_agg(CAST(dep_id AS TEXT), ',' ORDER BY seq)")
    if sql in (_INSERT, _PG_INSERT_KEYED):
        out += " RETURNING id"
    return out


def _bytes(blob):
    """A serialized value as BYTEA takes it (json's dumps gives a str)."""
    return blob.encode() if isinstance(blob, str) else blob


class _Inserted:
    """What executing `_INSERT` gives on PostgreSQL, read as sqlite3's cursor is."""

    __slots__ = ("lastrowid", "rowcount")

    def __init__(self, cursor):
        found = cursor.fetchall()
        self.lastrowid = found[0][0] if found else None
        self.rowcount = len(found)


class _PGSession:
    """One transaction (or, for reads, autocommitted statements) on one
    PostgreSQL connection, with sqlite3's `execute`/`executemany`, so that
    the SQLite engine's write and read functions run on it unchanged: each
    statement goes through `_pg_sql`, and serialized values become bytes.
    It notes whether anything changed that other processes act on at once
    (new work, a cancel, a hand-back), to NOTIFY them in the same transaction."""

    __slots__ = ("conn", "schema", "wakes", "began", "watched")

    def __init__(self, conn, schema: str):
        self.conn = conn
        self.schema = schema
        self.wakes = False
        self.began = False      # a statement was sent: retrying on another connection is not safe
        self.watched = None     # the call's _Watched: each statement has the whole time

    def execute(self, sql: str, params=()):
        params = self._params(sql, params)
        self.began = True
        if self.watched is not None:
            _unanswered.renew(self.watched)
        cursor = self.conn.execute(_pg_sql(sql, self.schema), params)
        if sql in _PG_WAKES:
            self._note(sql, params, cursor.rowcount)
            if sql in (_INSERT, _PG_INSERT_KEYED):
                return _Inserted(cursor)
        return cursor

    def executemany(self, sql: str, seq):
        seq = [self._params(sql, p) for p in seq]
        self.began = True
        if self.watched is not None:    # (a statement per row, each quick)
            _unanswered.renew(self.watched, _PG_ROW_TIME * len(seq))
        cursor = self.conn.cursor()
        cursor.executemany(_pg_sql(sql, self.schema), seq)
        if sql in _PG_WAKES and seq:
            self._note(sql, seq[0], cursor.rowcount)
        return cursor

    @staticmethod
    def _params(sql, params):
        if sql is _FINISH or sql is _FINISH_UNWAITED:
            return params._replace(result=_bytes(params.result),
                                   progress=_bytes(params.progress))
        if sql is _PROGRESS or sql is _SAVE_CHECKPOINT:
            return params._replace(value=_bytes(params.value))
        if sql is _UPSERT_SCHEDULE:
            return params._replace(data=_bytes(params.data))
        if sql in (_INSERT, _PG_INSERT_KEYED):
            return params._replace(data=_bytes(params.data))
        return params

    def _note(self, sql, params, rowcount):
        # A finished try concerns others only when it made the job ready
        # (or delayed) again: a completed one is seen by their waits' polls.
        if rowcount and (sql not in (_FINISH, _FINISH_UNWAITED) or params[0] < _RUNNING):
            self.wakes = True


class _Unanswered:
    """One thread, for every PostgreSQL connection of the process, that cuts
    a connection whose statement got no answer for `_PG_STATEMENT_TIMEOUT`
    + `_PG_ANSWER_MARGIN` seconds: a stalled server (or pooler, or network
    that keeps the TCP connection up) is an error then, never a hang.  The
    server's statement timeout ends what is merely slow before that.
    Cutting shuts the socket down (the waiting call gets an error at once):
    a cancel request (PQcancel) would itself wait on the stalled server.

    A call is one `_Watched` in `_calls`, added and removed under `_lock`,
    its deadline renewed by each statement (see _PGSession); the thread
    sleeps until the earliest deadline (`_wake_at`), and is woken for an
    earlier one only.  It ends once no call was watched for `_LINGER`
    seconds (no thread outlives the queues' use), and the next call starts
    it again."""

    _LINGER = 0.5

    def __init__(self):
        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)
        self._calls: dict[int, _Watched] = {}      # guarded by _lock, as all below
        self._next = 0
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, conn):
        """Cut `conn` if a statement in this block gets no answer in time;
        yields its `_Watched` (`cut` is True once it was cut)."""
        call = _Watched(conn)
        try:    # (from here: a Ctrl-C never leaves the call watched)
            with self._lock:
                self._next += 1
                call.key = self._next
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="blero-pg-deadlines")
                    _start_thread(self._thread)
                self._add(call, 0.0)
            yield call
        finally:
            with self._lock:
                self._calls.pop(call.key, None)     # (gone already if cut)

    def renew(self, call: _Watched, extra: float = 0.0) -> None:
        """A statement of `call` begins: it has the whole time (and `extra` seconds)."""
        with self._lock:
            if call.key in self._calls:
                self._add(call, extra)

    def _add(self, call: _Watched, extra: float) -> None:
        call.deadline = time.monotonic() + _PG_STATEMENT_TIMEOUT + _PG_ANSWER_MARGIN + extra
        self._calls[call.key] = call
        if call.deadline < self._wake_at:
            self._due.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    late = [c for c in self._calls.values() if c.deadline <= now]
                    if late:
                        break
                    self._wake_at = min((c.deadline for c in self._calls.values()),
                                        default=math.inf)
                    if self._wake_at == math.inf:
                        if not self._due.wait(self._LINGER) and not self._calls:
                            self._thread = None
                            return
                    else:       # (a look each _LINGER: have the calls all gone?)
                        self._due.wait(min(self._wake_at - now, self._LINGER))
                self._wake_at = -math.inf   # busy: no need to notify
                for call in late:
                    del self._calls[call.key]
                    call.cut = True
            for call in late:       # outside the lock: calls come and go meanwhile
                self.cut(call.conn)

    @staticmethod
    def cut(conn) -> None:
        """End `conn`'s session from this side, whatever the server does."""
        with contextlib.suppress(Exception):
            sock = socket.socket(fileno=os.dup(conn.fileno()))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()


class _Watched:
    """One call on a connection, as _Unanswered watches it."""

    __slots__ = ("conn", "key", "deadline", "cut")

    def __init__(self, conn):
        self.conn = conn
        self.key = 0
        self.deadline = math.inf
        self.cut = False


_unanswered = _Unanswered()


class _PostgresStorage(_Storage):
    """The queue on a PostgreSQL server: blero's tables in one schema, shared
    by every process (on any host) that opens the same URL and schema.

    Connections: at most `_PG_POOL` (4) for reads and writes, opened as
    needed and kept, plus, while the queue runs, one of the owner's own that
    holds its advisory lock and LISTENs: at most 5 per started Blero.  Each
    has TCP keepalives (from `lease`), a connect timeout and a statement
    timeout, so that a lost server is an error, never a hang.

    The locking rules, all of them:
    - `_using` (a token of each call using a connection, added under
      `_mutex`) bounds the connections in use; a call waits on `_freed` for
      at most `_PG_POOL_WAIT` seconds.  `_mutex` guards `_idle` (the
      connections not in use) and `_closed`, held for a list operation only;
      every I/O runs on a connection taken out of `_idle`, owned by one
      thread until it is put back.  A Ctrl-C may cut a call short anywhere
      (see _Bell): its token and connection are given back all the same,
      and a connection whose command it interrupted is closed.
    - The owner's connection belongs to its listener thread alone once
      started (`_listen`); other threads talk to it through `_wake_w` and
      flags (`_changed`, `_lost`), which are plain attributes set in one
      assignment.  `_owner_lock` guards holding and releasing owners.
    - `_claims` guards `_claiming`; a release waits on it (see below),
      holding no other lock and no connection.
    Nothing is ever waited for while `_mutex` is held.
    """

    read_only = None
    tells_of_ends = False   # (a completed try notifies no one: see _PGSession._note)
    _returning = True
    _last_given = _PG_LAST_GIVEN
    _lock_rows = " FOR UPDATE OF j"
    _skip_locked = " FOR UPDATE SKIP LOCKED"
    # Two processes never run one due slot: the second skips the schedule
    # the first is running, and sees its next slot once that commits.
    _due_schedules = _DUE_SCHEDULES + " FOR UPDATE OF s SKIP LOCKED"
    _no_limit = None

    def __init__(self, url: str, schema: str = _PG_DEFAULT_SCHEMA, lease: float = 10.0):
        self.url = self.real = url
        self.path = _masked(url)
        self.schema = schema
        self._schema_sql = '"' + schema + '"'
        self._channel = '"' + ("blero_" + schema)[:63] + '"'
        self._token = secrets.token_hex(8)   # our own NOTIFYs' payload: not news to us
        self._lease = lease
        self._using: set[object] = set()
        self._freed = _Bell()   # rung when a call gives its connection back
        self._mutex = threading.Lock()
        self._idle: list = []
        self._closed = False
        self._owner_lock = threading.Lock()
        self._owner = None                  # the owner held, with its listener below
        self._listener: threading.Thread | None = None
        self._wake_r = self._wake_w = None
        self._listening = False
        self._changed = False
        self._lost = None                   # the owner whose session ended unasked
        self._callback = None               # on_change's
        self._next_poll = 0.0
        self._retry_at = 0.0                # no reconnection before (monotonic)
        self._backoff = 0.0
        self._claim_sql: dict[tuple[int, bool, int, int | None], tuple[str, str]] = {}
        # Pauses and limits: a claim that finds nothing held holds this
        # schema's lock 2 shared (tried, never waited for: a change holding
        # it sends the claim the held way); a change (pause, limit) takes it
        # exclusive, so it waits for those claims and holds off the next; and
        # claims under pauses or limits, and changes, take turns on lock 1,
        # then count and claim: never over a limit, even for an instant.
        key = zlib.crc32(schema.encode()) - (1 << 31)
        self._nothing_held = _NOTHING_HELD + f" AND pg_try_advisory_xact_lock_shared({key}, 2)"
        self._change_lock = f"SELECT pg_advisory_xact_lock({key}, 2)"
        self._held_lock = f"SELECT pg_advisory_xact_lock({key}, 1)"
        self._claims = threading.Condition()    # guards _claiming
        self._claiming: dict[int, int] = {}     # owner -> its finish_and_claim calls under way

    # -- connections ---------------------------------------------------------------

    def _connect(self):
        psycopg = _psycopg()
        lease = self._lease
        idle, interval = max(1, round(lease / 2)), max(1, round(lease / 6))
        extra = {}
        try:
            if "application_name" not in psycopg.conninfo.conninfo_to_dict(self.url):
                extra["application_name"] = f"blero[{os.getpid()}]"
            conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=_PG_CONNECT_TIMEOUT,
                keepalives=1, keepalives_idle=idle, keepalives_interval=interval,
                keepalives_count=3, tcp_user_timeout=int(2000 * lease), **extra)
        except psycopg.Error as exc:
            raise BleroError(f"{self.path}: cannot connect to the server: "
                             f"{str(exc).strip()}") from exc
        try:
            # The server's side of the keepalives: the session of a host
            # that vanished ends, and its owner's lock with it.
            with _unanswered.watch(conn):
                conn.execute(f"SET statement_timeout = {_PG_STATEMENT_TIMEOUT * 1000};"
                             f" SET tcp_keepalives_idle = {idle};"
                             f" SET tcp_keepalives_interval = {interval};"
                             f" SET tcp_keepalives_count = 3;"
                             f" SET tcp_user_timeout = {int(2000 * lease)}")
        except psycopg.Error as exc:
            conn.close()
            raise BleroError(f"{self.path}: {str(exc).strip()}") from exc
        return conn

    def _take(self, token: object):
        """A connection for the call `token`, once fewer than `_PG_POOL`
        are in use; called inside the `try` whose `finally` is `_put(token, ...)`."""
        end = time.monotonic() + _PG_POOL_WAIT
        while True:
            woken = self._freed.sleeper()
            with self._mutex:
                if self._closed:
                    raise BleroError(f"{self.path}: the queue is stopped")
                if len(self._using) < _PG_POOL:
                    self._using.add(token)
                    conn = self._idle.pop() if self._idle else None
                    break
            if time.monotonic() >= end:
                self._freed.forget(woken)
                raise BleroError(f"{self.path}: all {_PG_POOL} connections stayed busy "
                                 f"for {_PG_POOL_WAIT:.0f} s")
            self._freed.sleep(woken, end - time.monotonic())
        self._freed.forget(woken)
        return conn if conn is not None else self._connect()

    def _put(self, token: object, conn) -> None:
        try:
            if conn is not None and not conn.closed and not conn.broken:
                with self._mutex:
                    if not self._closed:
                        self._idle.append(conn)
                        return
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        finally:
            self._using.discard(token)
            self._freed.ring()

    def _run(self, write: bool, fn, args):
        """Run `fn(session, *args)` on a pooled connection: in one
        transaction (NOTIFYing others if it changed what they act on) when
        `write`.  A connection found broken before anything was sent on it
        (the server restarted, or ended our sessions, since it was used) is
        replaced, once, by a new one: the idle ones are closed with it, as
        they most likely ended together.  One the server left unanswered
        (see _Unanswered) is an error at once."""
        psycopg = _psycopg()
        for again in (True, False):
            conn = session = None
            me = object()
            try:
                conn = self._take(me)
                session = _PGSession(conn, self._schema_sql)
                with _unanswered.watch(conn) as session.watched:
                    if not write:
                        return fn(session, *args)
                    with conn.transaction():
                        result = fn(session, *args)
                        if session.wakes:
                            conn.execute(f"NOTIFY {self._channel}, '{self._token}'")
                    return result
            except psycopg.Error as exc:
                if session.watched is not None and session.watched.cut:
                    with contextlib.suppress(Exception):
                        conn.close()
                    raise BleroError(f"{self.path}: the server did not answer for "
                                     f"{_PG_STATEMENT_TIMEOUT + _PG_ANSWER_MARGIN:g} s"
                                     ) from exc
                broken = conn.broken or conn.closed
                if broken:
                    with self._mutex:
                        stale, self._idle = self._idle, []
                    for dead in [conn] + stale:
                        with contextlib.suppress(Exception):
                            dead.close()
                if again and broken and (not session.began or not write):
                    continue
                raise BleroError(f"{self.path}: {str(exc).strip()}") from exc
            except BaseException as exc:
                if not isinstance(exc, Exception) and conn is not None:
                    # A Ctrl-C, say, maybe in the midst of a command: what the
                    # connection is doing is unknown, so it is not reused.
                    with contextlib.suppress(Exception):
                        conn.close()
                raise
            finally:
                self._put(me, conn)

    def _write(self, fn, *args):
        return self._run(True, fn, args)

    def _read(self, fn, *args):
        return self._run(False, fn, args)

    # -- opening and closing ---------------------------------------------------------

    def open(self, create: bool, check: bool = False) -> None:
        psycopg = _psycopg()
        with self._mutex:
            self._closed = False
        conn = self._connect()
        try:
            with _unanswered.watch(conn), conn.transaction():
                # Processes starting together: one creates (or upgrades), the others wait.
                conn.execute("SELECT pg_advisory_xact_lock(%s, 0)",
                             (zlib.crc32(self.schema.encode()) - (1 << 31),))
                self._check_or_create(conn, create)
        except psycopg.Error as exc:
            conn.close()
            raise BleroError(f"{self.path}: {str(exc).strip()}") from exc
        except BaseException:
            conn.close()
            raise
        with self._mutex:
            self._idle.append(conn)

    def _check_or_create(self, conn, create: bool) -> None:
        where = f"{self.path}, schema {self.schema!r}"
        tables = {r[0] for r in conn.execute(_PG_SCHEMA_TABLES, (self.schema,))}
        foreign = tables - _PG_TABLES
        if foreign:
            raise BleroError(f"{where}: holds tables that are not blero's "
                             f"({', '.join(sorted(foreign)[:5])}): give the queue a schema "
                             f"of its own (the schema setting)")
        if not tables:
            if not create:
                raise BleroError(f"{where}: no queue there (start() makes one)")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema_sql}")
            for statement in (_SCHEMA + ";" + _PG_META).split(";"):
                if statement.strip():
                    conn.execute(_pg_sql(_pg_ddl(statement), self._schema_sql))
            conn.execute(_pg_sql("INSERT INTO blero_meta VALUES (?)", self._schema_sql),
                         (_PG_SCHEMA_VERSION,))
            return
        damaged = BleroError(f"{where}: a blero queue with tables missing (damaged)")
        if "blero_meta" not in tables:
            raise damaged
        version = conn.execute(_pg_sql(_PG_VERSION, self._schema_sql)).fetchall()[0][0]
        if version is None or version > _PG_SCHEMA_VERSION:
            raise BleroError(f"{where}: written by a newer blero (schema {version}; this "
                             f"blero.py knows up to {_PG_SCHEMA_VERSION})")
        if version == _PG_SCHEMA_VERSION and not _TABLES <= tables:
            raise damaged
        if version < _PG_SCHEMA_VERSION:
            session = _PGSession(conn, self._schema_sql)
            for step in _PG_UPGRADES[version - 1:]:
                step(session)
            conn.execute(_pg_sql("UPDATE blero_meta SET version = ?", self._schema_sql),
                         (_PG_SCHEMA_VERSION,))

    def close(self) -> None:
        self._stop_listener()
        with self._mutex:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    # -- enqueueing ----------------------------------------------------------------

    def insert(self, rows: list[_NewJob], connection=None,
               after: list[tuple[int, ...]] | None = None) -> tuple[list[int], list[bool]]:
        if connection is None:
            return self._write(self._insert, rows, after)
        self.same_database(connection)
        psycopg = _psycopg()
        try:
            with connection.transaction():      # a savepoint in the caller's transaction
                session = _PGSession(connection, self._schema_sql)
                found = self._insert(session, rows, after)
                connection.execute(f"NOTIFY {self._channel}, 'x'")   # news to us too
        except psycopg.Error as exc:
            raise BleroError(f"{self.path}: {str(exc).strip()}") from exc
        return found

    @classmethod
    def _insert(cls, db, rows, after=None):
        if after is not None:
            db.wakes = True
            return cls._insert_each(db, rows, after)
        ids, stored = [], []
        keyless = [r for r in rows if r.key is None]
        if len(keyless) == len(rows) > 1:      # one round trip for the lot
            if db.watched is not None:
                _unanswered.renew(db.watched, _PG_ROW_TIME * len(rows))
            columns = [list(c) for c in zip(*rows)]
            data = _NewJob._fields.index("data")
            columns[data] = [_bytes(d) for d in columns[data]]
            ids = sorted(i for i, in db.conn.execute(_pg_sql(_PG_INSERT_ROWS, db.schema),
                                                     columns).fetchall())
            db.wakes = True
            return ids, [True] * len(ids)
        for row in rows:
            # A key stored already is found first: an insert that conflicts
            # would use up an id (ids stay dense, as on SQLite).
            found = [] if row.key is None else db.execute(_FIND_KEY, (row.key,)).fetchall()
            new = None if found else db.execute(
                _INSERT if row.key is None else _PG_INSERT_KEYED, row).lastrowid
            if new is None and not found:   # inserted meanwhile by another transaction
                found = db.execute(_FIND_KEY, (row.key,)).fetchall()
            stored.append(new is not None)
            ids.append(new if new is not None else found[0][0])
        return ids, stored

    def same_database(self, connection) -> None:
        """Raise ValueError unless `connection` (psycopg's) is on this queue's database."""
        psycopg = _psycopg()
        if not isinstance(connection, psycopg.Connection):
            raise ValueError(f"connection must be a psycopg connection to {self.path}, "
                             f"not {type(connection).__name__}")
        try:
            theirs = connection.execute(_PG_WHERE).fetchall()[0]
        except psycopg.Error as exc:
            raise BleroError(f"{self.path}: cannot use the connection given: "
                             f"{str(exc).strip()}") from exc
        ours = self._read(lambda db: db.conn.execute(_PG_WHERE).fetchall()[0])
        if theirs != ours:
            raise ValueError(f"connection is to database {theirs[0]!r} of another server "
                             f"or another database, not the queue's ({self.path})"
                             if theirs[0] == ours[0] else
                             f"connection is to database {theirs[0]!r}, not the queue's "
                             f"{ours[0]!r} ({self.path})")

    # -- claims, and a release that sees them all -----------------------------------
    #
    # Transactions here run side by side, unlike the file's: a release must
    # not miss a claim still under way (it would stay running, its owner
    # gone).  So a release that drops its owner commits that first (no claim
    # begun after it can succeed), waits for this owner's claims under way
    # (only this process makes them), and then hands back what it holds.

    def finish_and_claim(self, finish: _Finish | None, owner: int,
                         names: frozenset | None, claim: bool, suspect: bool = False,
                         exclude: frozenset = frozenset(), runner: str | None = None
                         ) -> tuple[bool, _Claim | None, frozenset | None]:
        with self._claims:
            self._claiming[owner] = self._claiming.get(owner, 0) + 1
        try:
            return self._write(self._finish_and_claim, finish, owner, names, claim, suspect,
                               exclude, runner)
        finally:
            with self._claims:
                self._claiming[owner] -= 1
                if not self._claiming[owner]:
                    del self._claiming[owner]
                    self._claims.notify_all()

    def release(self, owner: int, outcome: Callable[[_Claim], _Finish], drop_owner: bool,
                started: set[tuple[int, int]] | None = None,
                unclaimed: int = _READY) -> tuple[list[_Claim], int]:
        if drop_owner:
            self._write(lambda db: db.execute(_DROP_OWNER, (owner,)))
            with self._claims:
                while owner in self._claiming:
                    self._claims.wait()
        return self._write(self._release, owner, outcome, False, started, unclaimed)

    # -- owners: an advisory lock per owner, held by a session of its own ------------

    def hold_owner(self, owner: int) -> None:
        psycopg = _psycopg()
        with self._owner_lock:
            now = time.monotonic()
            if now < self._retry_at:
                raise BleroError(f"{self.path}: cannot reach the server; trying again "
                                 f"in {self._retry_at - now:.1f} s")
            try:
                conn = self._connect()
            except BleroError:
                self._backoff = min(_PG_BACKOFF_MAX, max(0.1, 2 * self._backoff))
                self._retry_at = time.monotonic() + self._backoff
                raise
            self._backoff = 0.0
            try:
                with _unanswered.watch(conn):
                    conn.execute("SELECT pg_advisory_lock(%s)", (owner,))
            except psycopg.Error as exc:
                conn.close()
                raise BleroError(f"{self.path}: {str(exc).strip()}") from exc
            try:
                with _unanswered.watch(conn):
                    conn.execute(_PG_LISTEN.format(channel=self._channel))
                self._listening = True
            except psycopg.Error as exc:   # a pooler in transaction mode, say: poll
                log.warning("%s: LISTEN failed (%s): looking for other processes' work "
                            "every %.1f s instead", self.path, str(exc).strip(), _PG_POLL)
                self._listening = False
            self._stop_listener()
            self._owner, self._lost = owner, None
            self._wake_r, self._wake_w = socket.socketpair()
            self._listener = threading.Thread(target=self._listen, name="blero-listener",
                                              args=(conn, owner, self._wake_r), daemon=True)
            self._listener.start()

    def _listen(self, conn, owner: int, wake) -> None:
        """The owner's connection, on a thread of its own: notifications in,
        and the first to know when the session ends."""
        psycopg = _psycopg()
        pg = conn.pgconn
        # A selector, not select.select(): that fails on a descriptor past
        # FD_SETSIZE (1023), common in a program with many files open.
        watch = selectors.DefaultSelector()
        try:
            watch.register(conn.fileno(), selectors.EVENT_READ)
            watch.register(wake, selectors.EVENT_READ, "wake")
            while True:
                ready = watch.select()
                if any(key.data == "wake" for key, _ in ready):
                    return
                pg.consume_input()
                changed = False
                while True:
                    note = pg.notifies()
                    if note is None:
                        break
                    changed = changed or note.extra.decode() != self._token
                if changed:
                    self._changed = True
                    self._changed_callback()
                if pg.status != 0:      # CONNECTION_OK
                    raise psycopg.OperationalError("the connection is lost")
        except Exception as exc:
            # The session's end (or, never expected, this thread's: closing
            # the connection below ends the session, and its lock, too).
            self._lost = owner
            self._changed = True
            self._changed_callback()
            log.warning("%s: lost the owner's session (%s): running jobs are cancelled; "
                        "reconnecting", self.path, str(exc).strip() or type(exc).__name__)
        finally:
            watch.close()
            with contextlib.suppress(Exception):
                conn.close()
            wake.close()

    def _changed_callback(self) -> None:
        callback = self._callback
        if callback is not None:
            try:
                callback()
            except Exception:   # the dispatcher's: never taken for a lost session
                log.exception("%s: on_change callback failed", self.path)

    def _stop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        listener.join()
        self._wake_w.close()

    def release_owner(self, owner: int) -> None:
        with self._owner_lock:
            if self._owner == owner:
                self._stop_listener()
                self._owner = None

    def owner_alive(self, owner: int) -> bool | None:
        if owner == self._owner and self._lost != owner:
            return True
        return self._read(lambda db: db.conn.execute(_PG_OWNER_ALIVE, (owner, owner))
                          .fetchall()[0][0])

    def owner_lost(self, owner: int) -> bool:
        return self._lost == owner

    def on_change(self, callback: Callable[[], None] | None) -> None:
        self._callback = callback

    def changed_elsewhere(self) -> bool:
        if not self._listening:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + _PG_POLL
                return True
        changed, self._changed = self._changed, False
        return changed

    # -- what PostgreSQL does itself -------------------------------------------------

    _reuses_ids = False     # a sequence never gives an id twice: no tombstones

    def give_back_slice(self) -> bool:
        return False        # autovacuum's work

    def compact(self) -> None:
        pass


# The SQLite engine's methods that only run its statements, the same here
# (`_read`/`_write` give them a _PGSession for a connection).  A method added
# to _SQLiteStorage that only runs statements belongs in this list too.
_PG_SHARED = ("_finish_and_claim", "progress", "checkpoint", "_claim", "_claim_params",
              "_claim_held", "_ended", "_cancel_down", "sweep_slice", "_sweep",
              "_insert_each", "_insert_after", "set_paused", "paused", "set_limit", "limits",
              "_lock_claims", "claims_settled", "running_by_name", "last_claim",
              "suspect_kinds", "unclaim",
              "_release", "running_ids", "promote", "_promote", "next_delayed", "heartbeat",
              "owners", "running_by_owner", "cancel", "_cancel", "retry_failed", "upsert_schedule",
              "drop_schedule", "schedules", "run_schedules", "_run_schedules", "get", "outcome",
              "pending_in_run_order", "counts", "finished_since", "outstanding",
              "pending_by_name", "_claim_statements", "list", "clear_keys", "run_by",
              "outcomes")
for _name in _PG_SHARED:
    setattr(_PostgresStorage, _name, _SQLiteStorage.__dict__[_name])
del _name


# ---------------------------------------------------------------------------
# The dispatcher and its workers
# ---------------------------------------------------------------------------
#
# Each registered processor has one worker thread (Goblero's model).  A worker
# asks storage for its next job itself, in the same transaction that records
# the job it just finished: one commit per job, shared with whatever other
# workers and producers commit at the same moment, and no thread hand-off on
# the way.  An idle worker sleeps on its own Event until new work may be
# there; a sequence number bumped on every arrival closes the race between
# "found nothing" and "went to sleep".  One clock thread does everything that
# happens on a timer, except timeouts: they have a thread of their own that
# never waits on storage, so that no commit of the clock's makes them late.

_POLL = 0.05           # seconds between looks for other processes' commits
_PROGRESS_EVERY = 0.5  # seconds between stores of the running tries' progress
_STORAGE_RETRY = 0.5   # seconds a worker waits after a storage failure


class _Changes(_Bell):
    """What `wait` and `join` sleep on until jobs may have ended: a sleeper
    made before a look is woken by any change after it.

    One finished job concerns only `wait` callers (`watchers` holds a token
    of each), so the workers' hot path wakes nobody when none is waiting;
    `join` is woken when workers run out of work, and polls besides."""

    def __init__(self):
        super().__init__()
        self.watchers: set[object] = set()

    def job_ended(self) -> None:
        if self.watchers:
            self.ring()

    wake = _Bell.ring


class _Throttle:
    """Logs each distinct failure at most once a second, however many threads
    meet it: on a full disk every worker fails twice a second, for hours."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: dict[str, list] = {}    # cause -> [when last logged, times since]

    def error(self, exc: Exception, message: str, *args) -> None:
        """Log `message % args` at ERROR (with the traceback if `exc` is not a
        BleroError), unless the same cause was logged less than a second ago."""
        # The cause, not the message: a message may carry a changing detail
        # (the bytes still free, say).
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        key = f"{type(cause).__name__}: {cause}"
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < 1.0:
                seen[1] += 1
                return
            if seen is None and len(self._seen) >= 64:   # many causes: forget old ones
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < 1.0}
            again = seen[1] if seen is not None else 0
            self._seen[key] = [now, 0]
        if again:
            message += f" (and {again} more time(s) since it was last logged)"
        log.error(message, *args, exc_info=not isinstance(exc, BleroError))


class _Processor:
    """A registered processor: the callable, the job names it takes, how
    many workers run it (a task's concurrency), what other processes are
    told it is (`label`: a task, an executor, or the function's name), and
    for an executor's, whose calls it runs (`runner`, see _TASK_RUNNER)."""

    __slots__ = ("id", "fn", "names", "exclude", "concurrency", "is_async", "retired", "label",
                 "runner")

    def __init__(self, id, fn, names, concurrency=1, label=None, runner=None):
        self.id = id
        self.fn = fn
        self.label = label or _fn_name(fn)
        self.runner = runner
        self.names = names
        # With names None: the names it does not take after all, those of
        # the tasks (a processor of any name takes no task's jobs).
        self.exclude = frozenset()
        self.concurrency = concurrency
        self.is_async = _is_async(fn)   # its workers are coroutines on the event loop
        self.retired = False    # unregistered: its workers end after their jobs


def _takes(processors: Iterable[_Processor]) -> frozenset | None:
    """The job names these processors take between them; None: any name."""
    names: set[str] = set()
    for p in processors:
        if p.names is None:
            return None
        names |= p.names
    return frozenset(names)


class _Presence(NamedTuple):
    """What an owner's heartbeat tells other processes of its processors."""

    takes: frozenset | None
    processors: tuple[_ProcessorSeen, ...]

    @classmethod
    def of(cls, processors: Iterable[_Processor]) -> _Presence:
        processors = list(processors)
        alike: collections.Counter = collections.Counter()
        for p in processors:
            alike[p.label, None if p.names is None else tuple(sorted(p.names))] += p.concurrency
        return cls(_takes(processors),
                   tuple(_ProcessorSeen(name, names, n) for (name, names), n in alike.items()))


def _fn_name(fn) -> str:
    """A processor's name as an operator knows it: `process`, `Mailer.run`
    (a function defined inside another goes by its own name)."""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return name.rsplit(".<locals>.", 1)[-1]


# Results of these exact types are never awaitables (no need to ask inspect).
_PLAIN_RESULTS = frozenset((int, float, str, bytes, bool, tuple, list, dict))


class _Outcome(NamedTuple):
    """The end of one try, waiting to be recorded."""

    job: Job
    state: int
    run_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    blob: Any = None            # the result, serialized
    error: str | None = None
    exc: BaseException | None = None
    seconds: float = 0.0
    given_back: bool = False    # cut short by a deliberate stop (or snoozed): uses up no try
    snoozed: bool = False       # the processor raised Snooze

    def finish(self, owner: int) -> _Finish:
        """What storage records of this outcome of `owner`'s try."""
        job = self.job
        return _Finish(self.state, self.run_at, self.finished_at, self.blob, self.error,
                       int(self.given_back), job._progress, job.id, owner, job.attempt)


class _Counters:
    """What `metrics_text` counts since the Blero was created."""

    def __init__(self):
        self.lock = threading.Lock()
        self.finished = dict.fromkeys(("complete", "failed", "retried", "cancelled"), 0)
        self.enqueued = 0
        self.seconds_sum = 0.0
        self.seconds_count = 0

    def add(self, outcome: str, seconds: float | None = None, count: int = 1) -> None:
        with self.lock:
            self.finished[outcome] += count
            if seconds is not None:
                self.seconds_sum += seconds
                self.seconds_count += 1

    def stored(self, n: int) -> None:
        """`n` new jobs were stored (enqueued, or a schedule's runs)."""
        with self.lock:
            self.enqueued += n


class _CrashGuard:
    """Runs the jobs that may have crashed their process one at a time, alone.

    A job handed back because its process died is a suspect (`_SUSPECT`): it
    may be what killed the process (a segfault, `os._exit`, the OOM killer),
    or it may merely have been running beside that.  While any running
    queue of this process has suspects that its workers accept, no worker
    of any queue here claims an ordinary job.  Once every try under way has
    been recorded, one worker takes the turn and claims suspects one after
    another (each in the commit that records the one before), with nothing
    else running: if the process dies again, that suspect alone loses a
    try.  A suspect whose try ends is an ordinary job from then on.  The
    turn (and the wait of the rest) ends when its worker finds no suspect
    it accepts; suspects that only other workers accept are then theirs.
    Suspects that no worker here accepts hold nothing up.  (What a worker
    accepts is told by a suspect's name and runner, as its claims do: see
    _Worker.claims.)  (Each process
    on the file runs the suspects it takes alone the same way.)

    `active` is read without the lock on every claim, so a claim costs
    nothing extra while there are no suspects.  A worker that finds it
    false sets its `holding`, then reads it again before it claims; the turn
    is given only after `active` was set and every other worker's `holding`
    was read false: so a worker that missed `active` is seen holding, and
    the turn waits for its try.  (A worker that was seen holding only
    between those two reads wakes the others when it lets go.)
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.active = False                  # some queue here has suspects to run
        self.runner: _Worker | None = None   # the worker whose turn it is
        self._queues: dict[_Dispatcher, frozenset] = {}   # running -> suspects' kinds

    def join(self, d: _Dispatcher) -> None:
        with self.lock:
            self._queues[d] = frozenset()

    def leave(self, d: _Dispatcher) -> None:
        with self.lock:
            self._queues.pop(d, None)
            if self.runner is not None and self.runner.dispatcher is d:
                self.runner = None
            wake = self._update()
        if wake:
            self.wake_all()

    def noted(self, d: _Dispatcher, kinds: frozenset) -> None:
        """`d`'s file has suspects of these kinds (name, runner) now."""
        with self.lock:
            if self._queues.get(d, kinds) == kinds:
                return          # stopped, or nothing new
            self._queues[d] = kinds
            wake = self._update()
        if wake:
            self.wake_all()

    def workers_changed(self, d: _Dispatcher) -> bool:
        """A worker of `d` came, was retired or went: who accepts what
        changed.  True if the caller should `wake_all()` (it may hold `d`'s lock)."""
        if not self._queues.get(d) and self.runner is None:
            return False
        with self.lock:
            return self._update()

    def turn(self, worker: _Worker, recording: bool) -> bool | None:
        """Whether `worker`, about to claim, takes a suspect (True), nothing
        (False), or, with no suspects left here, an ordinary job (None).
        `recording`: it has a try to record first."""
        with self.lock:
            wake = False
            if self.runner is not None and not self._alive(self.runner):
                wake = self._update()   # its worker timed out or went: the turn is free
            if not self.active:
                turn = None
                worker.holding = True   # it claims an ordinary job: seen by any turn after
            elif self.runner is worker:
                turn = True     # its turn goes on until it finds no suspect
            elif (self.runner is None
                    and any(worker.claims(*k) for k in self._queues.get(worker.dispatcher, ()))
                    and not any(w.holding for q in self._queues for w in list(q._workers)
                                if w is not worker)):
                self.runner = worker
                worker.holding = turn = True
            else:
                turn = False
                wake |= worker.holding and not recording   # another may have waited on it
                worker.holding = recording
        if wake:
            self.wake_all()
        return turn

    def released(self, worker: _Worker, kinds: frozenset) -> None:
        """The turn's worker found no suspect it accepts; `kinds` are those
        of the suspects left in its file."""
        with self.lock:
            if self.runner is worker:
                self.runner = None
            d = worker.dispatcher
            if d in self._queues:
                self._queues[d] = kinds
            wake = self._update()
        if wake:
            self.wake_all()

    def wake_all(self) -> None:
        """Wake the idle workers of every queue: the turn may be free, or
        ordinary jobs may be claimed again."""
        for d in list(self._queues):
            d.work_arrived(None)

    def _alive(self, worker: _Worker) -> bool:
        d = worker.dispatcher
        return d in self._queues and worker in d._workers

    def _update(self) -> bool:
        """Under the lock: recompute `active`; True if workers should look again."""
        was = self.active
        if self.runner is not None and not self._alive(self.runner):
            self.runner = None
        # A suspect running is no longer in the file as one: its turn keeps
        # the rest waiting until it ends.
        self.active = self.runner is not None or any(
            w.claims(*k) for d, kinds in self._queues.items() if kinds
            for w in list(d._workers) if not (w.processor.retired or w.abandoned)
            for k in kinds)
        return self.active or was


_guard = _CrashGuard()


class _Worker:
    """One thread running one processor's jobs, one at a time."""

    def __init__(self, dispatcher: _Dispatcher, processor: _Processor,
                 outcome: _Outcome | None = None):
        self.dispatcher = dispatcher
        self.processor = processor
        self.wake = _Event()    # set by enqueue() and stop(), maybe from the main thread
        self.lock = threading.Lock()   # guards job and abandoned
        self.job: Job | None = None
        self.outcome = outcome          # to record first: a timed-out worker's try
        self.settling: Job | None = outcome and outcome.job   # a try not yet recorded
        self.settled = 0                # tries recorded, callbacks run (for join)
        self.abandoned = False          # timed out, stopped or retired: starts no try
        self.holding = False            # may hold a claim, or a try not yet recorded
        self.suspect = False            # its last claim took a suspect
        self.thread = threading.Thread(
            target=self._run, name=f"blero-processor-{processor.id}", daemon=True)

    def start(self) -> None:
        _start_thread(self.thread)

    def join(self) -> None:
        self.thread.join()

    def runs_on(self, thread: threading.Thread) -> bool:
        """Whether this worker's try is what runs on `thread` now."""
        return self.thread is thread

    def accepts(self, name: str) -> bool:
        p = self.processor
        return name not in p.exclude if p.names is None else name in p.names

    def claims(self, name: str, runner: str | None) -> bool:
        """Whether its claims take a job of this name and runner (see
        _TASK_RUNNER), as finish_and_claim's do."""
        p = self.processor
        if p.names is None:
            return runner is None and name not in p.exclude
        return name in p.names and runner in (None, p.runner or _TASK_RUNNER)

    def finished_try(self) -> bool:
        """The processor returned: busy settling now; False if abandoned."""
        with self.lock:
            if self.abandoned:
                return False
            self.settling = self.job    # first: join() must never see neither
            self.job = None
            return True

    def _run(self) -> None:
        d = self.dispatcher
        outcome, self.outcome = self.outcome, None
        try:
            while True:
                claim = d.claiming(self)
                seq, cancels = d.seq, d.cancels
                try:
                    job = d.finish_and_claim(self, outcome, claim)
                    if self.settling is not None:
                        self.settled += 1   # first: join() must never see neither
                        self.settling = None
                except Exception as exc:    # storage trouble: keep the outcome, try again
                    # Cleared first: work that arrived earlier left it set,
                    # and a set Event makes the wait below return at once.
                    self.wake.clear()
                    if d.stopping:
                        return
                    d.throttle.error(exc, "%s; retrying in %.1f s", exc, _STORAGE_RETRY)
                    self.wake.wait(_STORAGE_RETRY)
                    continue
                outcome = None
                if job is not None:
                    outcome = d.execute(self, job, cancels)
                    if outcome is None:
                        return          # abandoned: the result is not ours to record
                elif not claim:
                    return
                else:
                    d.idle(self, seq)
        finally:
            d.exited(self)


class _LoopEvent:
    """What an async worker sleeps on: set from any thread (as a
    threading.Event is), waited for by a coroutine on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._flag = False
        self._event: asyncio.Event | None = None    # made on the loop (3.9 binds it there)

    def set(self) -> None:
        self._flag = True
        with contextlib.suppress(RuntimeError):     # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()

    def clear(self) -> None:
        """(On the loop.)"""
        self._flag = False
        if self._event is not None:
            self._event.clear()

    async def wait(self, timeout: float | None = None) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        if self._flag:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class _AsyncWorker(_Worker):
    """One of an `async def` processor's workers: a coroutine on the queue's
    event loop thread, running that processor's jobs one at a time, as a
    thread worker does (the same dispatcher calls, storage ones on the
    loop's I/O threads so that the loop never waits for the file).  Each try
    is a task of its own, cancelled for real when the job is cut short."""

    def __init__(self, dispatcher: _Dispatcher, processor: _Processor,
                 outcome: _Outcome | None = None):
        super().__init__(dispatcher, processor, outcome)
        self.loop = dispatcher.event_loop()
        self.thread = self.loop.thread
        self.wake = _LoopEvent(self.loop.loop)
        self.task: asyncio.Task | None = None       # the worker's own
        self.try_task: asyncio.Task | None = None   # the try running now
        self.ended = threading.Event()

    def start(self) -> None:
        self.loop.loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        self.task = self.loop.loop.create_task(self._arun())

    def join(self) -> None:
        self.ended.wait()

    def runs_on(self, thread: threading.Thread) -> bool:
        if thread is not self.thread:
            return False
        current = asyncio.current_task(self.loop.loop)
        return current is not None and current in (self.task, self.try_task)

    async def _arun(self) -> None:
        d = self.dispatcher
        loop = self.loop.loop
        outcome, self.outcome = self.outcome, None
        try:
            while True:
                claim = d.claiming(self)
                seq, cancels = d.seq, d.cancels
                try:
                    job = await loop.run_in_executor(self.loop.io, d.finish_and_claim,
                                                     self, outcome, claim)
                    if self.settling is not None:
                        self.settled += 1
                        self.settling = None
                except Exception as exc:
                    self.wake.clear()
                    if d.stopping:
                        return
                    d.throttle.error(exc, "%s; retrying in %.1f s", exc, _STORAGE_RETRY)
                    await self.wake.wait(_STORAGE_RETRY)
                    continue
                outcome = None
                if job is not None:
                    outcome = await d.execute_async(self, job, cancels)
                    if outcome is None:
                        return
                elif not claim:
                    return
                elif d.going_idle(self, seq):
                    await self.wake.wait()
        finally:
            d.exited(self)
            self.ended.set()


class _EventLoop:
    """The event loop thread of a running queue, for its `async def`
    processors and tasks: started with the first of them, stopped at the
    end of the queue's stop.  Storage calls of its workers run on a few
    I/O threads beside it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.io = concurrent.futures.ThreadPoolExecutor(_LOOP_IO_THREADS,
                                                        thread_name_prefix="blero-loop-io")
        self.thread = threading.Thread(target=self._run, name="blero-loop", daemon=True)
        _start_thread(self.thread)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def close(self) -> None:
        """Cancel what is left (the tries cut short, still unwinding),
        then stop the loop and its I/O threads."""
        async def finish():
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in left:
                t.cancel()
            if left:
                await asyncio.wait(left, timeout=_LOOP_CLOSE_WAIT)
            self.loop.stop()
        if threading.current_thread() is self.thread:
            self.loop.stop()
            return
        asyncio.run_coroutine_threadsafe(finish(), self.loop)
        self.thread.join()
        self.io.shutdown(wait=True)


_LOOP_IO_THREADS = 4      # storage calls of async workers at once
_LOOP_CLOSE_WAIT = 1.0    # seconds a stop lets cancelled tries unwind


class _Dispatcher:
    """Runs the jobs of one started Blero: its workers, its clock thread and
    its timeouts' thread."""

    def __init__(self, storage: _Storage, settings: _Settings, owner: int,
                 counters: _Counters, changed: _Changes, presence: _Presence,
                 futures: _Futures):
        self.storage = storage
        self.settings = settings
        self.owner = owner
        self._lost_owner = None    # an owner whose session ended: see live_owner()
        self.counters = counters
        self.changed = changed     # told whenever a job may have ended
        self.futures = futures     # told of every job that ends here
        self.throttle = _Throttle()  # logs storage failures, each at most once a second
        self.seq = 0               # bumped whenever new work may be ready
        self.cancels = 0           # bumped (locked) before looking for tries to cancel
        self.started_at = time.time()
        self.stopping = False
        self._presence = presence       # what its heartbeats tell of its processors
        self._beat_lock = threading.Lock()  # one heartbeat at a time, each with the latest _presence
        self._lock = threading.Lock()
        self._tick = threading.Condition(self._lock)
        self._deadline_tick = threading.Condition(self._lock)   # a new, earlier deadline
        self._gone = threading.Condition(self._lock)   # notified as workers leave
        self._stop_by = math.inf        # monotonic time the running tries are cut short
        self._keep: _Worker | None = None   # the worker that asked for the stop
        self.stopped = _Event()     # set by Blero once the whole stop is done
        self.stop_callers: set[threading.Thread] = set()   # the threads waiting in stop()
        self.stop_awaited = False           # a stop() call waits for it
        self.stop_error: Exception | None = None   # what went wrong in it, for that call
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._deadlines: list = []          # (monotonic deadline, n, worker, job)
        self._deadline_n = 0
        self._delayed_due = math.inf        # epoch time of the next delayed job
        self._schedule_due = math.inf       # epoch time of the next schedule run
        self._held_due = math.inf           # epoch time a rate limit lets a job start
        self.suspects_held = False          # a pause or limit held back a suspect, maybe
        self._clock_stop = False
        # (before, after) of a sweep under way; after None: its space going back
        self._sweeping = None
        now = time.monotonic()
        self._next = {"poll": now + _POLL, "reap": now + min(0.5, settings.lease / 4),
                      "beat": now + settings.lease / 3,
                      "sweep": now if settings.keep_complete is not None else math.inf}
        # Running tries whose progress() changed since it was last stored, by
        # id; guarded by _progress_lock, held for a dict operation only.
        self._progressed: dict[int, Job] = {}
        self._progress_lock = threading.Lock()
        # Not one of _next's duties: those wake the clock when due, and this
        # one is due only when there is progress (the clock wakes every _POLL).
        self._progress_at = now + _PROGRESS_EVERY
        self._clock = threading.Thread(target=self._clock_loop, name="blero-clock",
                                       daemon=True)
        # Timeouts have a thread of their own that never waits on storage:
        # a commit of the clock's (a promotion, a sweep, a checkpoint on a
        # slow disk) must not make a try's timeout late.
        self._timer = threading.Thread(target=self._deadline_loop, name="blero-timeouts",
                                       daemon=True)
        self._loop: _EventLoop | None = None    # for async processors, once one comes

    # -- lifecycle ------------------------------------------------------------------

    def start(self, processors: Iterable[_Processor]) -> None:
        self.storage.changed_elsewhere()    # the baseline first: nothing slips between
        self.storage.on_change(self._look_now)
        self._delayed_due = self.storage.next_delayed() or math.inf
        self._schedule_due = -math.inf      # look at schedules at once
        _guard.join(self)
        try:
            self._look_for_suspects()
            for p in processors:
                self.spawn_all(p)
            self._clock.start()
            self._timer.start()
        except BaseException:
            _guard.leave(self)
            raise

    def spawn(self, processor: _Processor, outcome: _Outcome | None = None) -> bool:
        """Start a worker thread for `processor`, which first records
        `outcome` if given.  False if stopping."""
        with self._lock:
            if self.stopping:
                return False
            worker = (_AsyncWorker if processor.is_async else _Worker)(self, processor, outcome)
            self._workers.add(worker)
            wake = _guard.workers_changed(self)   # first: it must see suspects it takes
            worker.start()      # under the lock: stop() joins only started workers
        if wake:
            _guard.wake_all()
        return True

    def spawn_all(self, processor: _Processor) -> None:
        """Start the workers of a processor: as many as its concurrency."""
        for _ in range(processor.concurrency):
            if not self.spawn(processor):
                return

    def event_loop(self) -> _EventLoop:
        """The loop thread of async workers, started by the first (under the lock)."""
        if self._loop is None:
            self._loop = _EventLoop()
        return self._loop

    def retire(self, processor: _Processor) -> None:
        """Let `processor`'s worker finish its job, then end."""
        processor.retired = True
        if _guard.workers_changed(self):
            _guard.wake_all()
        self.work_arrived(None)

    def begin_stop(self, timeout: float | None, keep: _Worker | None) -> None:
        """Claim nothing more, and cut the running tries short once `timeout`
        has passed; `keep`, the worker whose processor asked for this stop, is
        waited for however long its try takes (unless hurried)."""
        with self._lock:
            self.stopping = True
            self._keep = keep
            if timeout is not None:
                self._stop_by = time.monotonic() + timeout
            workers = list(self._workers)
            self._idle.clear()
        for w in workers:
            w.wake.set()

    def hurry(self, timeout: float | None) -> None:
        """A later stop (or a Ctrl-C during one): with a time limit, every
        running try, the one that asked for the stop too, gets at most
        `timeout` seconds more."""
        if timeout is None:
            return
        with self._lock:
            self._keep = None
            self._stop_by = min(self._stop_by, time.monotonic() + timeout)
            self._gone.notify_all()

    def runs_on(self, thread: threading.Thread) -> _Worker | bool:
        """The worker running on `thread`; True for the clock and timeouts threads (and the
        event loop's, outside a try); else False."""
        with self._lock:
            for w in self._workers:
                if w.runs_on(thread):
                    return w
        return (thread is self._clock or thread is self._timer or
                (self._loop is not None and thread is self._loop.thread))

    def stop(self) -> list[Job]:
        """After `begin_stop`: wait for the running tries until they are cut
        short, hand those back, their tries given back (a deliberate stop
        uses up no try), and stop the clock.  Returns the jobs handed back."""
        late, started, cut = [], set(), set()
        with self._lock:
            workers = list(self._workers)
            while True:
                now, waits = time.monotonic(), []
                for w in self._workers - cut:
                    by = math.inf if w is self._keep else self._stop_by
                    # (A thread that a Ctrl-C kept from starting never will:
                    # cut, as if its time ran out.)
                    if by > now and w.thread.ident is not None:
                        waits.append(by - now)
                        continue
                    cut.add(w)
                    with w.lock:
                        w.abandoned = True      # from now on it starts no try
                        started.update((j.id, j.attempt) for j in (w.job, w.settling)
                                       if j is not None)
                        if w.job is not None:
                            late.append(w.job)
                if not waits:
                    break
                wait = min(waits)   # (a wait past TIMEOUT_MAX raises)
                self._gone.wait(None if wait == math.inf else min(wait, threading.TIMEOUT_MAX))
        for job in late:
            job._cancel()
        for w in workers:
            if w not in cut and not w.abandoned:
                w.join()            # ended, or about to: nothing of it lingers
        with self._lock:
            self._clock_stop = True
            self._tick.notify()
            self._deadline_tick.notify()
        for thread in (self._clock, self._timer):
            if thread.is_alive():
                thread.join()
        self.storage.on_change(None)
        # A job claimed by a worker stopped before its try began was never
        # tried: its claim is undone, and its attempt does not count.  While
        # a worker of ours holds a suspect, that is the only job ours hold
        # (see _CrashGuard): handed back, it stays a suspect.
        try:
            self.hand_back(self.owner, drop_owner=True, started=started, given_back=True,
                           suspect=any(w.suspect for w in workers))
        finally:
            _guard.leave(self)
            if self._loop is not None:
                self._loop.close()
        return late

    def exited(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
            if worker in self._idle:
                self._idle.remove(worker)
            self._gone.notify_all()
        if _guard.workers_changed(self):
            _guard.wake_all()

    def activity(self) -> tuple[bool, int]:
        """Whether a worker here is running a try or recording one, and how
        many tries the workers have recorded: equal answers before and after
        a look at the file mean no job ended here in between."""
        workers = list(self._workers)
        return (any(w.job is not None or w.settling is not None for w in workers),
                sum(w.settled for w in workers))

    # -- waking workers -------------------------------------------------------------

    def claiming(self, worker: _Worker) -> bool:
        return not (self.stopping or worker.processor.retired or worker.abandoned)

    def idle(self, worker: _Worker, seq: int) -> None:
        """Sleep until new work may be there (unless some came since `seq`)."""
        if self.going_idle(worker, seq):
            worker.wake.wait()

    def going_idle(self, worker: _Worker, seq: int) -> bool:
        """Whether the worker should sleep on its `wake` now (no work came
        since `seq`): it is among the idle ones then."""
        with self._lock:
            if seq != self.seq or not self.claiming(worker):
                return False
            worker.wake.clear()
            self._idle.append(worker)
        self.changed.wake()     # join() looks again when workers run dry
        return True

    def work_arrived(self, names: list[str] | None) -> None:
        """Wake idle workers for new ready jobs: one per job that it accepts,
        or all of them when `names` is None (work of unknown kind)."""
        with self._lock:
            self.seq += 1
            if not self._idle:
                return
            if names is None:
                woken, self._idle = self._idle, []
            else:
                woken = []
                for name, n in collections.Counter(names).items():
                    # Workers limited to some names first: the others can
                    # take whatever comes next.  An executor's take only
                    # its own calls: n of each executor's are woken.
                    able: dict[str | None, list[_Worker]] = {}
                    for w in sorted((w for w in self._idle if w.accepts(name)),
                                    key=lambda w: w.processor.names is None):
                        able.setdefault(w.processor.runner, []).append(w)
                    for w in itertools.chain.from_iterable(a[:n] for a in able.values()):
                        self._idle.remove(w)
                        woken.append(w)
                    if not self._idle:
                        break
        for w in woken:
            w.wake.set()

    def delayed_at(self, when: float) -> None:
        """Note a delayed job due at epoch time `when`."""
        if when < self._delayed_due:
            with self._lock:
                self._delayed_due = min(self._delayed_due, when)
                self._tick.notify()

    def schedules_changed(self) -> None:
        with self._lock:
            self._schedule_due = -math.inf
            self._tick.notify()

    # -- jobs ------------------------------------------------------------------------

    def enqueue(self, rows: list[_NewJob], connection=None,
                after: list[tuple[int, ...]] | None = None) -> tuple[list[int], list[bool]]:
        """Store new jobs (each waiting on the ids `after` gives it, if
        given) and wake the workers that can take them (those written with
        the caller's `connection` are seen once committed); return their
        ids, and for each whether it was stored (not answered by a key)."""
        ids, stored = self.storage.insert(rows, connection, after)
        answered = stored
        if after is not None:
            # On a server, marking the jobs they wait on locked those rows
            # for a moment: a claim meanwhile skipped them, so look again.
            self.work_arrived(None)
        if False in stored:
            rows = [r for r, new in zip(rows, stored) if new]   # not those a key answered
        ready = [r.name for r in rows if r.state == _READY]
        if len(ready) < len(rows):
            self.delayed_at(min(r.run_at for r in rows if r.state == _DELAYED))
        if ready:
            self.work_arrived(ready)
        self.counters.stored(len(rows))
        return ids, answered

    def finish_and_claim(self, worker: _Worker, outcome: _Outcome | None,
                         claim: bool) -> Job | None:
        """Record `outcome` and claim the worker's next job, in one commit:
        while suspects wait (see _CrashGuard), a suspect on its turn, else none."""
        suspect = False
        owner = self.live_owner()
        if outcome is not None and outcome.job._owner != owner:
            outcome = None      # a try of a lost owner: its result is ignored
        if owner is None:       # nothing claimed under a lost owner: after _carry_on
            claim = worker.holding = False
            if _guard.active:
                _guard.wake_all()   # a turn may have waited for this try
        if claim:
            if not _guard.active:
                worker.holding = True   # then `active` is read again: see _CrashGuard
            if _guard.active:
                turn = _guard.turn(worker, outcome is not None)
                if turn is not None:
                    claim = suspect = turn
        if outcome is None and not claim:
            return None
        p = worker.processor
        done = self.storage.finish_and_claim(
            outcome and outcome.finish(owner), owner, p.names, claim, suspect, p.exclude,
            p.runner)
        recorded, row, left = done.recorded, done.claim, done.suspects_left
        if done.wake or done.held or done.delayed is not None or done.cancelled:
            if suspect and row is None and done.held:
                self.suspects_held = True   # some may be held back: see flow()
            self.flow(done, outcome and outcome.job.name)
        worker.suspect = suspect and row is not None
        if row is None:
            worker.holding = False
            if suspect:
                _guard.released(worker, left)
            elif _guard.active:
                _guard.wake_all()       # this try was what the turn waited for, maybe
        if outcome is not None:
            self.settle(outcome, recorded)
        if row is None:
            return None
        job = Job(*row)
        job._flow, job._owner = self, owner
        return job

    def live_owner(self) -> int | None:
        """This process's owner, or None while its session is lost (until
        _carry_on holds a new one): tries claimed by a lost owner may be
        taken over elsewhere, so nothing is recorded or claimed under it."""
        owner = self.owner
        if owner == self._lost_owner or self.storage.owner_lost(owner):
            return None
        return owner

    def progress(self, job: Job, value: Any) -> None:
        """job.progress(value): noted, for the clock to store (or the try's end)."""
        try:
            job._progress = _dumps(self.settings.serializer, value)
        except Exception as exc:
            raise TypeError(f"job {job.id}: cannot serialize its progress: {exc}") from exc
        with self._progress_lock:
            self._progressed[job.id] = job

    def _store_progress(self) -> None:
        """Store the progress noted since the last time, in one commit."""
        now = time.monotonic()
        if not self._progressed or now < self._progress_at:
            return
        self._progress_at = now + _PROGRESS_EVERY
        with self._progress_lock:
            jobs, self._progressed = self._progressed, {}
        try:
            self.storage.progress([_Mark(j._progress, j.id, j._owner, j.attempt)
                                   for j in jobs.values()])
        except BaseException:
            with self._progress_lock:       # again next time, unless newer is noted
                self._progressed = {**jobs, **self._progressed}
            raise

    def checkpoint(self, job: Job, value: Any) -> None:
        """job.checkpoint(value): stored and committed before it returns."""
        try:
            blob = _dumps(self.settings.serializer, value)
        except Exception as exc:
            raise TypeError(f"job {job.id}: cannot serialize its checkpoint: {exc}") from exc
        if (job._owner != self.live_owner()     # its owner was lost: not its job now
                or not self.storage.checkpoint(_Mark(blob, job.id, job._owner, job.attempt))):
            job._cancel()
            raise BleroError(f"job {job.id}: checkpoint not stored: this try no longer "
                             f"holds the job (cancelled, timed out or taken back)")
        job.checkpointed = value

    def flow(self, done: _Claimed, finished: str | None) -> None:
        """Act on what a finish and claim did besides (nearly all do nothing
        more, and are not brought here): wake workers for the
        jobs it made ready (and, while pauses or limits are stored, for the
        name of the job that finished: a slot of its limit came free), and
        look again when a rate limit lets one more job start."""
        wake = list(done.wake)
        if done.held and finished is not None:
            wake.append(finished)
            self.held_changed()
        if wake:
            self.work_arrived(wake)
        if done.delayed is not None:
            self.delayed_at(done.delayed)
        if done.due is not None:
            with self._lock:
                if done.due < self._held_due:
                    self._held_due = done.due
                    self._tick.notify()
        if done.cancelled:
            self.counters.add("cancelled", count=done.cancelled)

    def execute(self, worker: _Worker, job: Job, cancels: int) -> _Outcome | None:
        """Run one try of `job`, claimed when `self.cancels` was `cancels`;
        None if the worker was abandoned meanwhile."""
        began = self._begin_try(worker, job, cancels)
        if began is None or isinstance(began, _Outcome):
            return began
        exc = result = None
        try:
            result = worker.processor.fn(job)
        except BaseException as e:   # any failure is the job's, never the worker's
            exc = e
        return self._end_try(worker, job, began, exc, result)

    async def execute_async(self, worker: _AsyncWorker, job: Job,
                            cancels: int) -> _Outcome | None:
        """`execute` for an async worker: the try is a task of its own,
        cancelled (CancelledError raised in it) when the job is cut short."""
        began = self._begin_try(worker, job, cancels)
        if began is None or isinstance(began, _Outcome):
            return began
        loop = worker.loop.loop
        exc = result = None
        try:
            task = worker.try_task = asyncio.ensure_future(worker.processor.fn(job))
            job._on_cancel = lambda: loop.call_soon_threadsafe(task.cancel)
            if job._cancelled:
                task.cancel()
            result = await task
        except BaseException as e:   # CancelledError too: the try was cut short
            exc = e
        finally:
            job._on_cancel = worker.try_task = None
        return self._end_try(worker, job, began, exc, result)

    def _begin_try(self, worker: _Worker, job: Job, cancels: int):
        """Before a try: None if the worker was abandoned, an outcome if the
        try cannot begin, else (its deadline entry, its start time)."""
        with worker.lock:
            retired = worker.processor.retired and not worker.abandoned
            # Stopping: a job claimed before (in the commit that recorded
            # the last, whose callback may have called stop()) is not
            # begun; the stop undoes its claim.
            if worker.abandoned or retired or self.stopping:
                worker.abandoned = True
            else:
                worker.job = job
        if worker.abandoned:
            if retired:     # unregistered while claiming: not its job to start
                try:
                    self.storage.unclaim(job.id, job._owner, job.attempt,
                                         _SUSPECT if worker.suspect else _READY)
                except Exception as exc:    # stop() hands it back then
                    log.error("job %d: %s", job.id, exc)
                self.work_arrived([job.name])
            return None
        if self.cancels != cancels:
            # A cancel since the claim may have looked for this try before
            # worker.job was set: ask the file.
            with contextlib.suppress(Exception):
                if job.id not in self.storage.running_ids(self.owner):
                    job._cancel()
        blob, job.data = job.data, None
        serializer = self.settings.serializer
        if job.checkpointed is not None:
            job.checkpointed = _loads_or_none(serializer, job.checkpointed)
        try:
            job.data = None if blob is None else serializer.loads(blob)
        except Exception as exc:
            worker.finished_try()
            return self.failure(job, exc, retry=False, raised=False,
                                text=f"cannot deserialize the job's data: {_exc_text(exc)}")
        deadline = None if job.timeout is None else self._add_deadline(worker, job)
        return deadline, time.perf_counter()

    def _end_try(self, worker: _Worker, job: Job, began: tuple, exc: BaseException | None,
                 result: Any) -> _Outcome | None:
        """After a try: its outcome, or None if the worker was abandoned."""
        deadline, started = began
        seconds = time.perf_counter() - started
        if deadline is not None:
            self._drop_deadline(deadline)
        if not worker.finished_try():
            return None
        if exc is None:
            return self._returned(job, result, seconds)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            log.error("job %d: processor raised %r; handed back as interrupted", job.id, exc)
            return self.interrupted(job, exc, f"interrupted: the processor raised {exc!r}\n"
                                    f"{_exc_text(exc, exc.__traceback__.tb_next)}")
        if isinstance(exc, Snooze):
            # Back to pending, due then; the try counts, but uses up no try.
            run_at = time.time() + exc.seconds
            return _Outcome(job, _DELAYED if exc.seconds > 0 else _READY, run_at=run_at,
                            seconds=seconds, given_back=True, snoozed=True)
        # An executor's calls (its processor's, the one with a runner) end
        # with their exception, as ThreadPoolExecutor's do: a try that raised
        # is not retried (one cut short by a crash is).  (The traceback
        # starts in the processor, not here.)
        return self.failure(job, exc, retry=worker.processor.runner is None, seconds=seconds,
                            text=_exc_text(exc, exc.__traceback__.tb_next))

    def _returned(self, job: Job, result: Any, seconds: float) -> _Outcome:
        """The outcome of a try whose processor returned `result`.  The try
        ran, side effects and all: a result that cannot be stored ends the
        job at once, as running it again would not help."""
        if (result is not None and type(result) not in _PLAIN_RESULTS
                and inspect.isawaitable(result)):
            if inspect.iscoroutine(result):
                result.close()      # never awaited, and never warned about
            exc = TypeError(f"the processor returned an awaitable, {result!r}: "
                            f"an async processor is an `async def` function")
            return self.failure(job, exc, retry=False, seconds=seconds, raised=False,
                                text=f"TypeError: {exc}")
        try:
            out = None if result is None else _dumps(self.settings.serializer, result)
        except Exception as e:
            return self.failure(job, e, retry=False, seconds=seconds, raised=False,
                                text=f"cannot serialize the job's result: {_exc_text(e)}")
        return _Outcome(job, _COMPLETE, finished_at=time.time(), result=result,
                        blob=out, seconds=seconds)

    def failure(self, job: Job, exc: BaseException, retry: bool = True,
                text: str | None = None, seconds: float = 0.0,
                raised: bool = True) -> _Outcome:
        """The outcome of a failed try: retried after a backoff while tries
        remain.  Only an exception the processor `raised` is stored to be
        restored (futures raise it, JobFailed carries it); one blero made
        (a timeout, data it cannot read or a result it cannot store) is not,
        so that futures raise JobFailed for it."""
        if text is None:
            text = _exc_text(exc)
        now = time.time()
        if retry and job.attempt < job.max_attempts:
            s = self.settings
            # A float power: past try 1024 an int one no longer converts.
            wait = min(s.backoff_max, s.backoff_base * 2.0 ** min(job.attempt - 1, 1023))
            wait *= random.uniform(0.5, 1.0)
            state = _DELAYED if wait > 0 else _READY
            return _Outcome(job, state, run_at=now + wait, error=text, exc=exc,
                            seconds=seconds)
        return _Outcome(job, _FAILED, finished_at=now, error=text, exc=exc, seconds=seconds,
                        blob=_restorable(self.settings.serializer, exc) if raised else None)

    def interrupted(self, job: Job, exc: BaseException | None = None,
                    text: str = "interrupted", given_back: bool = False,
                    suspect: bool = False) -> _Outcome:
        """The outcome of a try cut short (by `exc`, if the processor raised
        one): ready again at once (a suspect, with `suspect`: see
        _CrashGuard), if tries remain.  One cut short by a deliberate stop
        is given back: it counts in `attempt` but uses up no try, so it is
        always ready again."""
        now = time.time()
        state = _SUSPECT if suspect else _READY
        if given_back:
            return _Outcome(job, state, run_at=now, error="handed back at stop",
                            given_back=True)
        if job.attempt < job.max_attempts:
            return _Outcome(job, state, run_at=now, error=text)
        # (an end blero made, its owner gone or stopped, is no exception to
        # restore: futures raise JobFailed for it)
        blob = None if exc is None else _restorable(self.settings.serializer, exc)
        return _Outcome(job, _FAILED, finished_at=now, error=text,
                        exc=BleroError(text) if exc is None else exc, blob=blob)

    def settle(self, outcome: _Outcome, recorded: bool) -> None:
        """After an outcome was committed: log, count, call back, wake waiters."""
        if not recorded:
            return      # cancelled or handed back meanwhile: the result is dropped
        job, state = outcome.job, outcome.state
        s = self.settings
        if outcome.snoozed:
            log.debug("job %d (%s) snoozed until %s", job.id, job.name, outcome.run_at)
            if state == _DELAYED:
                self.delayed_at(outcome.run_at)
            else:
                self.work_arrived([job.name])
        elif state == _COMPLETE:
            self.counters.add("complete", seconds=outcome.seconds)
            self.futures.ended(job.id, outcome)
            _call_back(s.on_complete, job, outcome.result)
        else:
            final = state == _FAILED
            self.counters.add("failed" if final else "retried",
                              seconds=outcome.seconds if outcome.seconds else None)
            first_line = (outcome.error or "").strip().splitlines()[-1:] or [""]
            log.warning("job %d (%s) try %d/%d failed%s: %s", job.id, job.name,
                        job.attempt, job.max_attempts,
                        ", will retry" if not final else
                        "" if job.attempt >= job.max_attempts else ", not retried",
                        first_line[0])
            log.debug("job %d error:\n%s", job.id, outcome.error)
            if final:
                self.futures.ended(job.id, outcome)
                _call_back(s.on_failed, job, outcome.exc)
            elif state == _DELAYED:
                self.delayed_at(outcome.run_at)
            else:
                self.work_arrived([job.name])
        self.changed.job_ended()

    def cancelled(self, job_id: int) -> None:
        """A job was cancelled: stop its try if it runs here."""
        with self._lock:
            self.cancels += 1
            workers = list(self._workers)
        for w in workers:
            job = w.job
            if job is not None and job.id == job_id:
                job._cancel()
        self.changed.wake()

    # -- the clock ------------------------------------------------------------------------

    def _add_deadline(self, worker: _Worker, job: Job) -> tuple:
        with self._lock:
            self._deadline_n += 1
            entry = (time.monotonic() + job.timeout, self._deadline_n, worker, job)
            heapq.heappush(self._deadlines, entry)
            self._deadline_tick.notify()
        return entry

    def _drop_deadline(self, entry: tuple) -> None:
        """A try ended before its deadline: forget it, and the job with it.
        (The heap holds at most one entry per worker, so this is cheap.)"""
        with self._lock:
            if entry in self._deadlines:    # else _expire took it
                self._deadlines.remove(entry)
                heapq.heapify(self._deadlines)

    def _clock_loop(self) -> None:
        while True:
            with self._lock:
                if self._clock_stop:
                    return
                now, epoch = time.monotonic(), time.time()
                wake = min(self._next.values())
                wake = min(wake, now + (self._delayed_due - epoch),
                           now + (self._schedule_due - epoch), now + (self._held_due - epoch))
                if wake > now and self._sweeping is None:
                    self._tick.wait(wake - now)
                    if self._clock_stop:
                        return
            for duty in (self._carry_on, self._promote, self._unhold,
                         self._run_schedules, self._poll, self._reap, self._beat,
                         self._store_progress, self._sweep):
                try:
                    duty()
                except Exception as exc:
                    self.throttle.error(exc, "%s failed: %s; will try again",
                                        duty.__name__.lstrip("_"), exc)

    def _deadline_loop(self) -> None:
        while True:
            with self._lock:
                while not self._clock_stop:
                    wait = self._deadlines[0][0] - time.monotonic() if self._deadlines else None
                    if wait is not None and wait <= 0:
                        break
                    self._deadline_tick.wait(None if wait is None
                                             else min(wait, threading.TIMEOUT_MAX))
                if self._clock_stop:
                    return
            try:
                self._expire()
            except Exception as exc:
                self.throttle.error(exc, "expire failed: %s; will try again", exc)

    def _due(self, name: str, every: float) -> bool:
        now = time.monotonic()
        if now < self._next[name]:
            return False
        self._next[name] = now + every
        return True

    def _expire(self) -> None:
        """End tries that ran past their timeout, and replace their workers."""
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._deadlines or self._deadlines[0][0] > now:
                    return
                _, _, worker, job = heapq.heappop(self._deadlines)
            with worker.lock:
                if worker.job is not job or worker.abandoned:
                    continue
                worker.abandoned = True
            with self._lock:
                self._workers.discard(worker)   # stop() need not wait for it
                self._gone.notify_all()
            job._cancel()
            exc = TimeoutError(f"job {job.id} timed out after {job.timeout:g} s")
            outcome = self.failure(job, exc, text=f"TimeoutError: {exc}",
                                   seconds=job.timeout, raised=False)
            # A new worker records it (and runs the callbacks, off this
            # thread), then goes on with the processor's jobs unless retired.
            if not self.spawn(worker.processor, outcome):
                owner = job._owner
                self.settle(outcome, owner == self.live_owner() and
                            self.storage.record(outcome.finish(owner)))

    def _promote(self) -> None:
        if time.time() < self._delayed_due:
            return
        count = self._look_and_rearm("_delayed_due", self.storage.promote)
        if count:
            self.work_arrived(None)

    def _unhold(self) -> None:
        """A rate limit lets another job start now: the idle workers look."""
        with self._lock:
            if time.time() < self._held_due:
                return
            self._held_due = math.inf
        self.held_changed()
        self.work_arrived(None)

    def held_changed(self) -> None:
        """A pause or limit may hold back fewer jobs now: suspects that one
        held back are looked for again (see _CrashGuard), to run alone."""
        if self.suspects_held:
            self.suspects_held = False
            try:
                self._look_for_suspects()
            except BleroError as exc:   # the next poll looks again
                self.suspects_held = True
                self.throttle.error(exc, "looking for suspects failed: %s; will try again", exc)

    def _run_schedules(self) -> None:
        if time.time() < self._schedule_due:
            return

        def look(now):
            names, due = self.storage.run_schedules(now, self._schedule_row, self.started_at)
            # A schedule still busy with its last run is looked at every poll.
            return names, None if due is None else max(due, now + _POLL)

        names = self._look_and_rearm("_schedule_due", look)
        if names:
            self.counters.stored(len(names))
            self.work_arrived(names)

    def _look_and_rearm(self, due_attr: str, look: Callable[[float], tuple[Any, float | None]]):
        """Run `look(now)`, which returns (result, next due epoch time or None);
        keep that time in `due_attr` and return the result."""
        # Cleared first, so a due time noted while `look` runs (by
        # delayed_at or schedules_changed, after their commit) is kept.
        with self._lock:
            setattr(self, due_attr, math.inf)
        due = time.time() + 1.0         # if `look` fails: again soon, not in a spin
        try:
            result, due = look(time.time())
        finally:
            with self._lock:
                if due is not None:
                    setattr(self, due_attr, min(getattr(self, due_attr), due))
        return result

    def _schedule_row(self, sched: _DueSchedule, now: float) -> _NewJob:
        retries = self.settings.retries if sched.retries is None else sched.retries
        return _NewJob(_READY, sched.priority, now, sched.name, sched.data, 1 + retries,
                       sched.timeout, None, now, sched.runner)

    def _carry_on(self) -> None:
        """When storage lost this owner's liveness (a server's session ended:
        other processes may be taking its jobs now), cancel the running tries
        (their late results are ignored: the claims are no longer theirs)
        and carry on as a new owner, once storage can hold one again (it
        raises meanwhile, backing off between tries)."""
        old = self.owner
        if not self.storage.owner_lost(old):
            return
        # Before cancelling: a try ending from now on records nothing, and
        # its worker claims nothing, until self.owner is the new one.
        self._lost_owner = old
        with self._lock:
            running = [w.job for w in self._workers if w.job is not None]
        for job in running:
            job._cancel()
        new = _new_owner_id()
        self.storage.hold_owner(new)
        with self._beat_lock:
            self.owner = new
            self.storage.heartbeat(new, time.time(), *self._presence)
        self.storage.release_owner(old)
        log.warning("carrying on as a new owner; %d running job(s) cancelled", len(running))
        self.work_arrived(None)

    def _look_now(self) -> None:
        """Storage heard of another process's commit: poll at once."""
        with self._lock:
            self._next["poll"] = -math.inf
            self._tick.notify()

    def _poll(self) -> None:
        """Notice other processes' commits: new work, cancels, ended jobs."""
        if not self._due("poll", _POLL) or not self.storage.changed_elsewhere():
            return
        due = self.storage.next_delayed()    # they may have added some
        self._look_for_suspects()            # or handed back a dead one's jobs
        with self._lock:
            if due is not None:     # only ever sooner: a time noted meanwhile stays
                self._delayed_due = min(self._delayed_due, due)
            self._schedule_due = min(self._schedule_due, time.time())
            self.cancels += 1       # a cancel from elsewhere, maybe
            running = [w.job for w in self._workers if w.job is not None]
        self.work_arrived(None)
        if running:
            mine = self.storage.running_ids(self.owner)
            for job in running:
                if job.id not in mine:
                    job._cancel()       # cancelled (or taken back) elsewhere
        self.changed.wake()
        self.futures.poke()

    def _reap(self) -> None:
        """Take back the jobs of owners that died (or went silent past the lease)."""
        if not self._due("reap", min(0.5, self.settings.lease / 4)):
            return
        self.reap()

    def _beat(self) -> None:
        if self._due("beat", self.settings.lease / 3):
            with self._beat_lock:
                self.storage.heartbeat(self.owner, time.time(), *self._presence)

    def processors_changed(self, presence: _Presence) -> None:
        """This queue's processors are now as `presence` says: tell other
        processes at once (their join() warns of names that no live queue
        takes, and their dashboards show them).  Not once the queue is stopping: its stop drops the
        owner's registration, and a heartbeat after that would register it
        again, letting a claim still on its way succeed with nobody left to
        hand its job back.  (Called under the Blero's lock, as begin_stop is.)"""
        with self._beat_lock:
            self._presence = presence
            if self.stopping:
                return
            try:
                self.storage.heartbeat(self.owner, time.time(), *presence)
            except BleroError as exc:   # the next heartbeat tells them
                if not self.stopping:
                    self.throttle.error(exc, "heartbeat failed: %s; will try again", exc)

    def _sweep(self) -> None:
        """Delete the jobs complete for over `keep_complete`, then give their
        space back: one slice per turn of the clock, so a due job or a
        timeout never waits for a big sweep for more than a slice."""
        keep = self.settings.keep_complete
        if keep is None:
            return
        if self._sweeping is None:
            if not self._due("sweep", max(1.0, min(keep, 60.0))):
                return
            self._sweeping = (time.time() - keep, _SWEEP_START)
        (before, after), self._sweeping = self._sweeping, None   # failed: at the next due time
        if after is None:       # all swept: now the pages they took
            if self.storage.give_back_slice():
                self._sweeping = (before, None)
            return
        _, after = self.storage.sweep_slice(before, (_COMPLETE,), after)
        self._sweeping = (before, after)

    def reap(self) -> int:
        """Hand back the jobs of every dead owner; returns how many jobs."""
        total = 0
        now = time.time()
        for seen in self.storage.owners():
            if seen.id == self.owner or seen.id is None:
                continue
            if not self.storage.alive(seen, self.settings.lease, now):
                # its jobs may be what killed it: suspects
                total += self.hand_back(seen.id, drop_owner=True, suspect=True)
        if total:
            self._look_for_suspects()
        return total

    def runners_changed(self) -> None:
        """Stored jobs not started yet got another runner: workers that
        take them now may be idle, and suspects among them are others'."""
        self._look_for_suspects()
        self.work_arrived(None)

    def _look_for_suspects(self) -> None:
        _guard.noted(self, self.storage.suspect_kinds())

    def hand_back(self, owner: int, drop_owner: bool,
                  started: set[tuple[int, int]] | None = None, given_back: bool = False,
                  suspect: bool = False) -> int:
        """Hand back `owner`'s jobs as interrupted (those in `started`, when
        given; the others' claims are undone), their tries given back if
        `given_back`, as suspects if `suspect` (see _CrashGuard); returns how many."""
        rows, undone = self.storage.release(
            owner, lambda claim: self.interrupted(Job(*claim), given_back=given_back,
                                                  suspect=suspect).finish(owner),
            drop_owner, started, _SUSPECT if suspect else _READY)
        failed = [Job(*claim) for claim in rows
                  if not given_back and claim.attempt >= claim.max_attempts]
        for job in failed:
            self.counters.add("failed")
            job.data = _loads_or_none(self.settings.serializer, job.data)
            _call_back(self.settings.on_failed, job, BleroError("interrupted"))
        if rows:
            log.info("%d interrupted job(s) handed back, %d of them out of tries",
                     len(rows), len(failed))
        if rows or undone:
            self.work_arrived(None)
            self.changed.wake()
            self.futures.poke()
        return len(rows) + undone


def _exc_text(exc: BaseException, tb=None) -> str:
    tb = exc.__traceback__ if tb is None else tb
    return "".join(traceback.format_exception(type(exc), exc, tb)).strip()


def _dumps(serializer, value):
    """`serializer.dumps(value)`, checked to be something SQLite stores: a
    value it cannot would fail every commit of the job, not just one."""
    blob = serializer.dumps(value)
    if not isinstance(blob, (bytes, bytearray, memoryview, str)):
        raise TypeError(f"the serializer's dumps() gave {type(blob).__name__}, "
                        f"not bytes or str")
    return blob


def _restorable(serializer, exc: BaseException | None):
    """`exc` serialized, if it comes back from that as an exception of its
    class (what `JobFailed.exception` gives back later); else None."""
    if exc is None:
        return None
    try:
        blob = _dumps(serializer, exc)
        back = serializer.loads(blob)
    except Exception:   # unpicklable, or refusing its own arguments when rebuilt
        return None
    return blob if type(back) is type(exc) else None


def _restored(serializer, blob) -> BaseException | None:
    """The exception a failed job's result column holds, if it still loads
    (its class may be gone since)."""
    exc = _loads_or_none(serializer, blob)
    return exc if isinstance(exc, BaseException) else None


def _loads_or_none(serializer, blob):
    if blob is None:
        return None
    try:
        return serializer.loads(blob)
    except Exception:
        return None


def _call_back(fn, job, value) -> None:
    if fn is None:
        return
    try:
        fn(job, value)
    except BaseException as exc:     # whatever a callback raises, the worker goes on
        name = getattr(fn, "__name__", repr(fn))
        log.error("callback %s raised for job %d, ignored: %s: %s", name, job.id,
                  type(exc).__name__, exc)
        log.debug("callback %s for job %d:\n%s", name, job.id, _exc_text(exc))


# ---------------------------------------------------------------------------
# The public Blero class
# ---------------------------------------------------------------------------

_BORROW_POLL = 0.005    # seconds between a stop's looks for calls still using storage


class _Sparingly:
    """A look that is costly on a big queue (counting pending jobs by name
    reads them all), taken at most 2% of the time and at most once a
    second; in between, the last answer."""

    def __init__(self):
        self._next, self._last = -math.inf, None

    def look(self, fn: Callable[..., Any], *args) -> Any:
        began = time.monotonic()
        if began >= self._next:
            self._last = fn(*args)
            self._next = began + max(1.0, 50 * (time.monotonic() - began))
        return self._last


def _db_path(path) -> str:
    path = os.fspath(path)
    if not isinstance(path, str):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("the queue's path must not be empty")
    if _is_server(path):
        return path
    if os.path.isdir(path) or path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        return os.path.join(path, "blero.db")
    return path


_PAUSE_GRACE = 0.1   # seconds pause() lets a try claimed just before it begin


def _flow_name(name, optional: bool = False) -> None:
    """Check the job name given to pause, resume or limit (None: every name)."""
    if name is None and optional:
        return
    if not isinstance(name, str):
        raise TypeError(f"a job name must be a str{' or None' if optional else ''}, "
                        f"not {type(name).__name__}")
    if not name:
        raise ValueError("a job name must not be empty")


def _when_tries_timeout(delay, run_at, priority, retries, timeout, key,
                        now: float) -> tuple[float, int | None, float | None]:
    """Check a job's options; return when it runs, its retries (None: the
    queue's) and its timeout."""
    when = now
    if delay is not None:
        if run_at is not None:
            raise ValueError("give delay or run_at, not both")
        when = now + _seconds("delay", delay)
    elif run_at is not None:
        when = _epoch(run_at)
    _integer("priority", priority, least=_INT_MIN)
    if retries is not None:
        retries = _retries("retries", retries)
    if timeout is not None:
        timeout = _seconds("timeout", timeout, positive=True)
    if key is not None and not isinstance(key, str):
        raise TypeError(f"key must be a str, not {type(key).__name__}")
    return when, retries, timeout


def _after(after) -> tuple[int, ...]:
    """`after` as job ids, each once, in the order given: an id, a future (or
    anything with an int `.id` or `.job_id`), or a collection of them."""
    if after is None:
        return ()
    if isinstance(after, (str, bytes)) or not hasattr(after, "__iter__"):
        after = (after,)
    ids = []
    for item in after:
        job_id = item
        if not isinstance(item, int) or isinstance(item, bool):
            job_id = getattr(item, "id", getattr(item, "job_id", None))
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise TypeError(f"after: a job id, or a future with an .id, not {item!r}")
        ids.append(_job_id("after", job_id))
    return tuple(dict.fromkeys(ids))


def _epoch(when) -> float:
    """`run_at` as epoch seconds: a number, or a datetime (a naive one is local time)."""
    if not isinstance(when, datetime.datetime):
        return _seconds("run_at", when)
    try:
        seconds = when.timestamp()
    except (OverflowError, OSError, ValueError) as exc:   # far out of range
        raise ValueError(f"run_at must be a time this system can convert, "
                         f"not {when!r}: {exc}") from None
    if seconds < 0:
        raise ValueError(f"run_at must be in 1970 or later, not {when!r}")
    return seconds


class Blero:
    """An embedded, persistent job queue kept in one SQLite file, or on a
    PostgreSQL server that many hosts share.

    `Blero(path, **settings)` (or `new`) touches nothing on disk and opens
    no connection; `start()` opens the queue, takes back interrupted jobs
    and starts the workers.  `path` is the database file, or a directory
    (an existing one, or any path ending in a separator) holding
    `blero.db`, or a `postgresql://` (or `postgres://`) URL: then blero's
    tables live in the schema `schema` (default "blero").
    """

    def __init__(self, path: str | os.PathLike, *, sync: str = "normal",
                 retries: int = 3, backoff_base: float = 1.0, backoff_max: float = 300.0,
                 lease: float = 10.0, keep_complete: float | None = None,
                 on_complete: Callable[[Job, Any], Any] | None = None,
                 on_failed: Callable[[Job, BaseException], Any] | None = None,
                 serializer: Any = pickle, schema: str | None = None):
        self._settings = _Settings(sync, retries, backoff_base, backoff_max, lease,
                                   keep_complete, on_complete, on_failed, serializer, schema)
        self.path = _db_path(path)
        # What messages, logs and pages name: a server's URL without its password.
        self._where = _masked(self.path) if _is_server(self.path) else self.path
        if schema is not None and not _is_server(self.path):
            raise ValueError(f"schema applies to a PostgreSQL queue (a postgresql:// URL), "
                             f"not to the file {self.path}")
        self._lock = threading.Lock()        # guards the fields below
        self._storage: _Storage | None = None
        self._dispatcher: _Dispatcher | None = None
        self._stop: _Stop | None = None      # the stop under way
        self._signals: _SignalStop | None = None
        self._borrowing = threading.Lock()     # taken to add to _borrows
        # The calls using the running storage now: a token of each, with
        # its thread (see _borrow).
        self._borrows: dict[object, threading.Thread] = {}
        self._processors: dict[int, _Processor] = {}
        self._next_processor = 1
        self._next_executor = 1     # (its calls' runner: see Executor)
        self._servers: list[_MetricsServer] = []
        self._counters = _Counters()
        self._changed = _Changes()
        self._untaken_warned: set[str] = set()   # job names join() said no queue takes
        self._futures = _Futures(self)
        self._tasks: dict[str, Task] = {}        # by name: the registered tasks
        # The names of task jobs (tasks', executors' functions), each with how
        # many registrations take it: processors of any name take none of them.
        self._task_names: collections.Counter = collections.Counter()
        self._calls = _Calls()                   # this run's resumable calls
        self._executors: weakref.WeakSet = weakref.WeakSet()   # the executors made

    def __repr__(self):
        state = "running" if self._dispatcher else "stopped"
        return f"<Blero {self._where!r} {state}, {len(self._processors)} processor(s)>"

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> Blero:
        """Open or create the queue file, take back the jobs a dead run left
        running, and start dispatching.  Raises BleroError if the file cannot
        be used; the file is then left as it was."""
        with self._lock:
            if self._stop is not None:
                raise BleroError(f"{self._where}: still stopping (stop() waits until it is done)")
            if self._dispatcher is not None:
                raise BleroError(f"{self._where}: already started")
            storage = self._new_storage()
            storage.open(create=True, check=True)
            owner = _new_owner_id()
            d = None
            try:
                storage.hold_owner(owner)
                presence = _Presence.of(self._processors.values())
                storage.heartbeat(owner, time.time(), *presence)
                d = _Dispatcher(storage, self._settings, owner, self._counters, self._changed,
                                presence, self._futures)
                recovered = d.reap()
                d.start(self._processors.values())
            except BaseException as exc:
                if d is not None:   # a Ctrl-C while it started its threads: they go first
                    with contextlib.suppress(Exception):
                        d.begin_stop(0, None)
                        d.stop()
                storage.release_owner(owner)
                storage.close()
                if isinstance(exc, OSError):
                    raise BleroError(f"{self.path}-lock: {exc.strerror or exc}") from exc
                raise
            self._storage, self._dispatcher = storage, d
            self._calls = _Calls()      # a new run: its calls are counted afresh
        log.info("started on %s; %d interrupted job(s) taken back", self._where, recovered)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming jobs and wait for the running ones (for ever with
        None).  Jobs still running when `timeout` runs out get `cancelled`
        set and go back to pending, their tries given back (a deliberate
        stop uses up no try); their late results are ignored.  Then
        everything is written and closed, the metrics servers too, and the
        handlers `stop_on_signals` replaced come back.  A Ctrl-C meanwhile
        hands the running jobs back at once, and is raised once all that is done.

        Called from inside a processor's try (or a callback), stop() cannot
        wait for that try: it returns at once, nothing more is claimed, and
        the queue stops once that try has ended and been recorded.  A stop
        while another is under way waits for it (shortening its timeout to
        its own); a second stop of a stopped queue does nothing."""
        timeout = _seconds("timeout", timeout, optional=True)
        me = threading.current_thread()
        interrupted = None
        try:
            self._end_executor_runs()
        except KeyboardInterrupt as exc:
            interrupted = exc
        while True:     # a Ctrl-C in here is put off until the queue is stopped
            try:
                d, own = self._stopping(timeout, me)
                break
            except KeyboardInterrupt as exc:
                interrupted = interrupted or exc
        if d is None:
            with self._lock:
                servers, self._servers = self._servers, []
            for server in servers:
                server.close()
            self._restore_signals()
        elif own:
            return      # a thread of the queue: the stop it began waits for it
        else:
            d.stop_awaited = True
            while True:
                try:
                    if interrupted is not None:
                        d.hurry(0)      # Ctrl-C means "get out now"
                    d.stopped.wait()
                    break
                except KeyboardInterrupt as exc:
                    interrupted = interrupted or exc
            self._restore_signals()
        if interrupted is not None:
            raise interrupted
        if d is not None and d.stop_error is not None:
            raise d.stop_error

    def _stopping(self, timeout: float | None,
                  me: threading.Thread) -> tuple[_Dispatcher | None, _Worker | bool]:
        """Begin the stop, or join the one under way (no longer than `timeout`
        says); run again after a Ctrl-C cut it short, it does what is left.
        Returns the running dispatcher (None if stopped) and `runs_on(me)`."""
        inline = None
        with self._lock:
            d, stop = self._dispatcher, self._stop
            if d is None:
                return None, False
            own = d.runs_on(me)
            if not own:     # it uses no storage while in stop(): see _no_borrowers
                d.stop_callers.add(me)
            if stop is None:
                d.begin_stop(timeout, own if isinstance(own, _Worker) else None)
            else:
                d.hurry(timeout)
            if stop is None or not stop.claimed:    # (or a Ctrl-C cut its start short)
                stop = self._stop = _Stop(self, d, self._storage)
                try:
                    _start_thread(stop.thread)
                except RuntimeError:    # the interpreter is exiting (3.12+): no new threads
                    if own:
                        raise
                    inline = stop, self._storage
        if inline is not None:
            inline[0].run(self, d, inline[1])
        return d, own

    def _finish_stop(self, d: _Dispatcher, storage: _Storage) -> None:
        """The stop itself, on a thread of its own, so that no Ctrl-C cuts
        it short: every step runs, whatever fails before it."""
        with self._lock:
            servers, self._servers = self._servers, []
        late, errors = [], []

        def give_back() -> None:
            try:
                storage.compact()   # the space of what was swept goes back
            except BleroError as exc:   # the queue stops all the same
                log.warning("%s: free space not given back: %s", self._where, exc)
        for step in (lambda: late.extend(d.stop()), *(s.close for s in servers),
                     lambda: self._no_borrowers(d), give_back,
                     lambda: storage.release_owner(d.owner), storage.close):
            try:
                step()
            except Exception as exc:
                errors.append(exc)
        with self._lock:
            self._storage = self._dispatcher = self._stop = None
            if self._signals is not None and self._signals.run is d:
                self._signals.run_over()
        if errors:
            d.stop_error = errors[0]
            if not d.stop_awaited:  # begun by a processor: no caller to raise it to
                log.error("stopping the queue failed: %s", errors[0])
        else:
            log.info("stopped on %s; %d running job(s) handed back", self._where, len(late))
        d.stopped.set()
        self._changed.wake()

    def stop_on_signals(self, *signals: int) -> None:
        """Stop the queue on one of these signals (default SIGINT and
        SIGTERM) as on Ctrl-C: the running tries are handed back at once,
        not counted, and KeyboardInterrupt (with the signal as its argument)
        is raised in the main thread, so the program ends the usual way.
        Call it from the main thread, after start(); stop() puts the
        previous handlers back."""
        chosen = []
        for sig in signals or (signal.SIGINT, signal.SIGTERM):
            if isinstance(sig, bool) or not isinstance(sig, int):
                raise TypeError(f"a signal is a signal number such as signal.SIGTERM, not {sig!r}")
            if sig not in signal.valid_signals():
                raise ValueError(f"{sig} is not a signal number on this system")
            chosen.append(_signal(sig))
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("stop_on_signals() must be called from the main thread: "
                             "Python runs signal handlers there")
        d = self._running()
        if self._signals is not None and self._signals.run is not d:
            self._restore_signals()     # left from a run stopped off the main thread
        with self._lock:
            if self._signals is None:
                self._signals = _SignalStop(self, d)
            signals = self._signals
        try:
            signals.install(chosen)
        finally:
            if not signals.previous:
                self._restore_signals()

    def _restore_signals(self) -> None:
        """Put back the handlers stop_on_signals replaced (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        with self._lock:
            signals, self._signals = self._signals, None
        if signals is not None:
            signals.restore()

    def __enter__(self) -> Blero:
        try:
            if self._dispatcher is None:
                self.start()
            return self
        except BaseException:   # a Ctrl-C as start() returned: `with` calls no __exit__
            self.stop(timeout=0)
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        # Ctrl-C means "get out now": running jobs are handed back, not awaited.
        self.stop(timeout=0 if exc_type is KeyboardInterrupt else None)

    def _new_storage(self, real: str | None = None) -> _Storage:
        """Storage for this queue's target, not yet opened: the file `real`
        names if given, else the running (or stopping) queue's own file,
        whatever a link on its path names now."""
        if _is_server(self.path):
            return _PostgresStorage(self.path, self._settings.schema or _PG_DEFAULT_SCHEMA,
                                    self._settings.lease)
        if real is None and self._storage is not None:
            real = self._storage.real
        return _SQLiteStorage(self.path, self._settings.sync, real)

    def _running(self) -> _Dispatcher:
        d = self._dispatcher
        if d is None:
            raise BleroError(f"{self._where}: the queue is not started (call start() first)")
        return d

    def _store(self, operating: bool = False):
        """The running queue's storage, or the file opened for this one call
        (`operating`: to change it, so never on read-only storage)."""
        return _Borrowed(self, operating)

    def _borrow(self, token: object) -> _Storage | None:
        """The running queue's storage, kept open while `token` is in
        `_borrows`; None when the queue is stopped or stopping (then a call
        opens the file).

        A Ctrl-C may raise in the caller's thread between any two calls,
        so the caller calls this inside its `try` and pops its token in the
        `finally` (or `except`) with no call before the pop: whatever comes
        where, the token is never left behind by one KeyboardInterrupt."""
        with self._borrowing:
            storage = self._storage
            if storage is None or self._stop is not None:
                return None
            self._borrows[token] = threading.current_thread()
            return storage

    def _no_borrowers(self, d: _Dispatcher) -> None:
        """Wait until no call uses the running storage (a stop has begun, so
        none can start to).  A token of a thread that is in stop() or has
        ended is not waited for: such a thread uses no storage, so a Ctrl-C
        (a second one, in the midst of the first's cleanup) left it behind."""
        while True:
            with self._borrowing:
                using = [t for t in self._borrows.values()
                         if t.is_alive() and t not in d.stop_callers]
                if not using:
                    self._borrows.clear()
                    return
            # Polled, not notified: a borrower may be the main thread,
            # where no notifying is safe from a Ctrl-C (see _Bell).
            time.sleep(_BORROW_POLL)

    # -- processors ------------------------------------------------------------------

    def register_processor(self, processor: Callable[[Job], Any] | Any,
                           names: str | Iterable[str] | None = None) -> int:
        """Add a processor, with a worker thread of its own; return its id.

        `processor` is a callable `f(job)` or an object with `.run(job)`; its
        return value is the job's result, and an exception a failed try.
        With `names` it takes only jobs of those names."""
        run = getattr(processor, "run", None)
        fn = run if callable(run) else processor
        if not callable(fn):
            raise TypeError("a processor is a callable f(job) or an object with .run(job)")
        if any(inspect.isasyncgenfunction(f) for f in (fn, getattr(fn, "__call__", None))):
            raise TypeError(f"{getattr(fn, '__qualname__', fn)!r} is an async generator: "
                            f"a processor returns its result (an async one with `return`)")
        if names is not None:
            names = frozenset([names] if isinstance(names, str) else names)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError("names must be one or more non-empty job names")
        return self._add_processor(fn, names).id

    def _add_processor(self, fn, names: frozenset | None, concurrency: int = 1,
                       task_names: Iterable[str] = (), replaces: int | None = None,
                       label: str | None = None, runner: str | None = None) -> _Processor:
        """Register a processor of `concurrency` workers; `task_names` are
        the names of task jobs it takes (kept from processors of any name);
        `replaces`: the id of a processor it takes the place of; `label`:
        what it is, for other processes to see (default: fn's name);
        `runner`: the executor whose calls it runs (see _TASK_RUNNER)."""
        with self._lock:
            p = _Processor(self._next_processor, fn, names, concurrency, label, runner)
            self._next_processor += 1
            old = self._processors.pop(replaces, None)
            self._processors[p.id] = p
            self._task_names.update(task_names)
            self._exclude_task_names()
            d = self._dispatcher
            if d is not None:
                # Told before its first job: no other process's join() may
                # see it run one, and yet not take that name.
                d.processors_changed(_Presence.of(self._processors.values()))
        if d is not None:
            if old is not None:
                d.retire(old)
            d.spawn_all(p)
        return p

    def _retake(self, p: _Processor, names: frozenset) -> None:
        """A processor takes `names` from now on: task names, more than before."""
        with self._lock:
            self._task_names.update(names - p.names)
            p.names = names
            self._exclude_task_names()
            d = self._dispatcher
            if d is not None:
                d.processors_changed(_Presence.of(self._processors.values()))
        if d is not None:
            d.work_arrived(None)

    def _exclude_task_names(self) -> None:
        """Under the lock: processors of any name take no task's jobs."""
        names = frozenset(n for n, k in self._task_names.items() if k > 0)
        for p in self._processors.values():
            if p.names is None:
                p.exclude = names

    def unregister_processor(self, processor_id: int) -> None:
        """Remove a processor at once; its worker finishes its current job, then ends."""
        _integer("processor_id", processor_id, least=1)
        self._drop_processor(processor_id)

    def _drop_processor(self, processor_id: int, task_names: Iterable[str] = ()) -> None:
        with self._lock:
            p = self._processors.pop(processor_id, None)
            self._task_names.subtract(task_names)
            self._exclude_task_names()
            d = self._dispatcher
            if p is not None and d is not None:
                d.processors_changed(_Presence.of(self._processors.values()))
        if p is None:
            raise KeyError(processor_id)
        if d is not None:
            d.retire(p)

    # -- enqueueing ------------------------------------------------------------------

    def enqueue(self, name: str, data: Any = None, *, delay: float | None = None,
                run_at: float | datetime.datetime | None = None, priority: int = 0,
                retries: int | None = None, timeout: float | None = None,
                key: str | None = None, after: Any = None, connection: Any = None) -> int:
        """Store a job and return its id, once it is committed.

        `delay` (seconds) or `run_at` (epoch seconds or datetime): not before
        then.  Higher `priority` runs first.  `retries`: tries after the first.
        `timeout`: seconds a try may take.  `key`: while a job with this key is
        stored, enqueueing it again returns that job's id and stores nothing.
        `after`: job ids (or futures, anything with an `.id`) this job waits
        for: it runs once they are all complete, and ends cancelled if one
        of them ends failed or cancelled.  `connection`: the caller's own
        open connection on the same database (an sqlite3 one on the queue
        file, a psycopg one on the server): the job is written in the
        caller's transaction, not committed, so it exists if and when the
        caller commits."""
        d = self._running()
        row = self._row(name, data, delay, run_at, priority, retries, timeout, key, time.time())
        deps = _after(after)
        return d.enqueue([row], connection, [deps] if deps else None)[0][0]

    def enqueue_many(self, jobs: Iterable[tuple | dict], *, connection: Any = None) -> list[int]:
        """Store many jobs in one transaction, all or nothing; return their ids.
        Each item is `(name, data)` or a dict of `enqueue`'s arguments;
        `connection` as for `enqueue`."""
        d = self._running()
        now = time.time()
        rows, after = [], []
        for item in jobs:
            if isinstance(item, dict):
                item = dict(item)
                try:
                    name = item.pop("name")
                except KeyError:
                    raise TypeError("a job given as a dict needs a 'name'") from None
                data = item.pop("data", None)
                unknown = set(item) - {"delay", "run_at", "priority", "retries", "timeout", "key",
                                       "after"}
                if unknown:
                    raise TypeError(f"unknown job option(s): {', '.join(sorted(unknown))}")
                rows.append(self._row(name, data, item.get("delay"), item.get("run_at"),
                                      item.get("priority", 0), item.get("retries"),
                                      item.get("timeout"), item.get("key"), now))
                after.append(_after(item.get("after")))
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                rows.append(self._row(item[0], item[1], None, None, 0, None, None, None, now))
                after.append(())
            else:
                raise TypeError(f"each job is a (name, data) pair or a dict, not {item!r}")
        return d.enqueue(rows, connection, after if any(after) else None)[0] if rows else []

    def _row(self, name, data, delay, run_at, priority, retries, timeout, key, now) -> _NewJob:
        """Check one job's arguments and make its storage row."""
        if not isinstance(name, str):
            raise TypeError(f"a job name must be a str, not {type(name).__name__}")
        if not name:
            raise ValueError("a job name must not be empty")
        when, retries, timeout = _when_tries_timeout(delay, run_at, priority, retries, timeout,
                                                     key, now)
        if retries is None:
            retries = self._settings.retries
        blob = None
        if data is not None:
            try:
                blob = _dumps(self._settings.serializer, data)
            except Exception as exc:
                raise TypeError(f"cannot serialize the data of job {name!r}: {exc}") from exc
        # A job of a task's name is the task's call: no processor of any
        # name takes it, here or elsewhere.
        return _NewJob(_DELAYED if when > now else _READY, priority, when, name, blob,
                       1 + retries, timeout, key, now,
                       _TASK_RUNNER if name in self._tasks else None)

    # -- waiting ---------------------------------------------------------------------

    def wait(self, job_id: int, timeout: float | None = None) -> Any:
        """Wait for a job to end and return its result.  Raises JobFailed,
        JobCancelled, TimeoutError when `timeout` runs out, KeyError for an
        unknown id."""
        _job_id("job_id", job_id)
        timeout = _seconds("timeout", timeout, optional=True)
        seen = []

        def ended(storage):
            # Only the state, result and error: the data may be big.
            row = storage.outcome(job_id)
            if row is None:
                raise KeyError(job_id)
            seen[:] = [row.state]
            return row if row.state >= _COMPLETE else None

        row = self._until(ended, timeout, watcher=True)
        if row is None:
            raise TimeoutError(f"job {job_id} still {_STATE_NAME[seen[0]]} after {timeout} s")
        state, result, error = row
        if state == _FAILED:
            raise JobFailed(job_id, error, _restored(self._settings.serializer, result))
        if state == _CANCELLED:
            raise JobCancelled(job_id)
        return _loads_or_none(self._settings.serializer, result)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is pending or running (delayed and retrying jobs
        count; runs of recurring schedules do not).  False if `timeout` ran out.
        Pending jobs that no live queue's processors take (here or in another
        process) are logged at WARNING meanwhile, once per name."""
        timeout = _seconds("timeout", timeout, optional=True)
        untaken = _Sparingly()

        def done(storage):
            d = self._dispatcher
            before = d.activity() if d is not None else (False, 0)
            if before[0] or storage.outstanding():
                self._warn_untaken(untaken.look(storage.untaken, self._settings.lease))
                return None
            # A job may have been claimed, run and recorded since `before`,
            # its on_complete still enqueueing more: then look again.
            return True if d is None or d.activity() == before else None

        return bool(self._until(done, timeout))

    def _warn_untaken(self, untaken: dict[str, int], waiter: str = "join()") -> None:
        """Log each name of pending jobs that no live queue takes, once: a
        typo in a name, or a task renamed since a run that did not finish,
        would otherwise make `waiter` wait for ever in silence."""
        for name, n in sorted(untaken.items()):
            if name not in self._untaken_warned:
                self._untaken_warned.add(name)
                log.warning("no processor takes jobs named %r (%d pending): %s waits "
                            "until a queue that takes them runs", name, n, waiter)

    def _look_for_untaken(self, untaken: _Sparingly, waiter: str) -> None:
        """`_warn_untaken`, from a wait that does not look at the queue itself."""
        try:
            with self._store() as storage:
                self._warn_untaken(untaken.look(storage.untaken, self._settings.lease), waiter)
        except BleroError as exc:
            log.debug("cannot look for jobs no processor takes: %s", exc)

    def _until(self, look: Callable[[_Storage], Any], timeout: float | None,
               watcher: bool = False) -> Any:
        """Call `look(storage)` until it returns something but None, waking
        on changes (and polling, for other processes); None once `timeout`
        has passed.  A queue that stops meanwhile is looked at in its file."""
        deadline = None if timeout is None else time.monotonic() + timeout
        changes, opened = self._changed, None
        running = self._storage     # its file is the one to look at, even after it stops
        pinned = None if running is None else running.real
        me = object()   # this call, in _borrows and among the watchers
        try:
            if watcher:
                changes.watchers.add(me)
            while True:
                woken = changes.sleeper()   # first: a change during the look wakes it
                try:
                    storage = self._borrow(me)
                    if storage is None:
                        if opened is None:
                            opened = self._new_storage(pinned)
                            opened.open(create=False)
                        found = look(opened)
                    else:
                        found = look(storage)
                finally:
                    self._borrows.pop(me, None)     # (no call before it: see _borrow)
                if found is not None:
                    changes.forget(woken)
                    return found
                wait = _POLL
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        changes.forget(woken)
                        return None
                changes.sleep(woken, wait)
        finally:
            changes.watchers.discard(me)
            if opened is not None:
                opened.close()

    # -- inspecting ------------------------------------------------------------------

    def _info(self, row: _Stored) -> JobInfo:
        loads = self._settings.serializer
        # A failed job's result column holds its exception (for
        # JobFailed.exception): it has no result.
        result = None if row.state == _FAILED else _loads_or_none(loads, row.result)
        return JobInfo(**row._replace(data=_loads_or_none(loads, row.data),
                                      state=_STATE_NAME[row.state], result=result,
                                      progress=_loads_or_none(loads, row.progress),
                                      after=tuple(map(int, row.after.split(",")))
                                      if row.after else ())._asdict())

    def get_job(self, job_id: int) -> JobInfo | None:
        """The stored job with this id, or None."""
        _job_id("job_id", job_id)
        with self._store() as storage:
            row = storage.get(job_id)
        return None if row is None else self._info(row)

    def stats(self) -> dict[str, int]:
        """The number of jobs in each of the five states."""
        with self._store() as storage:
            return storage.counts()

    def jobs(self, state: str | None = None, name: str | None = None,
             limit: int | None = 100) -> list[JobInfo]:
        """Stored jobs by id, optionally of one state and one name."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, not {state!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        if limit is not None:
            _integer("limit", limit)
        with self._store() as storage:
            rows = storage.list(state, name, limit)
        return [self._info(row) for row in rows]

    # -- operating -------------------------------------------------------------------

    def cancel(self, job_id: int) -> bool:
        """Cancel a pending or running job (a running one gets `cancelled`
        set and its result is discarded).  False if it had ended or does not exist."""
        _job_id("job_id", job_id)
        with self._store(operating=True) as storage:
            before = storage.cancel(job_id, time.time())
        if before is None:
            return False
        self._counters.add("cancelled", count=1 + before[2])
        d = self._dispatcher
        if d is not None:
            d.cancelled(job_id)
        self._futures.cancelled(job_id)
        return True

    def _cancel_pending(self, job_id: int) -> bool:
        """Cancel a job that has not started yet (JobFuture.cancel)."""
        with self._store(operating=True) as storage:
            before = storage.cancel(job_id, time.time(), pending_only=True)
        if before is None:
            return False
        self._counters.add("cancelled")
        self._changed.wake()
        return True

    def retry_failed(self, ids: Iterable[int] | None = None) -> int:
        """Send failed jobs (all, or these ids) back to pending with a fresh
        set of tries; return how many."""
        if ids is not None:
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise TypeError(f"ids must be a collection of job ids, not {type(ids).__name__}")
            ids = list(ids)
            for i in ids:
                _job_id("each of ids", i)
        with self._store(operating=True) as storage:
            n = storage.retry_failed(ids, self._settings.retries, time.time())
        d = self._dispatcher
        if n and d is not None:
            d.work_arrived(None)
        return n

    def sweep(self, older_than: float = 0, states: Iterable[str] = ("complete",)) -> int:
        """Delete jobs in `states` (of complete, failed, cancelled) that
        finished more than `older_than` seconds ago; return how many."""
        older_than = _seconds("older_than", older_than)
        states = (states,) if isinstance(states, str) else tuple(states)
        ended = ("complete", "failed", "cancelled")
        if not states or any(s not in ended for s in states):
            raise ValueError(f"states must be some of {', '.join(ended)}, not {states!r}")
        codes = tuple(sorted({_STATE_CODES[s][0] for s in states}))
        with self._store(operating=True) as storage:
            return storage.sweep(time.time() - older_than, codes)

    # -- recurring jobs --------------------------------------------------------------

    def every(self, interval: float, name: str, data: Any = None, *,
              key: str | None = None, **options) -> str:
        """Run a job every `interval` seconds, from now (or `delay`/`run_at`),
        stored in the file; return the schedule's key (default: `name`).
        Calling it again with the same key updates the schedule."""
        interval = _seconds("interval", interval, positive=True)
        return self._schedule("every", name, data, key, options, float(interval), None, None)

    def cron(self, expr: str, name: str, data: Any = None, *, key: str | None = None,
             tz: str | datetime.tzinfo | None = None, **options) -> str:
        """Run a job at the times cron expression `expr` names (five fields,
        or an alias such as "@daily"), on the wall clock of `tz` (an IANA zone
        name or a tzinfo; None: local time), stored in the file; return the
        schedule's key (default: `name`).  Options: priority, retries, timeout.
        Calling it again with the same key updates the schedule."""
        if not isinstance(expr, str):
            raise TypeError(f"a cron expression must be a str, not {type(expr).__name__}")
        _parse_cron(expr)
        zone = _zone_name(tz)
        return self._schedule("cron", name, data, key, options, 0.0, expr.strip(), zone)

    def _schedule(self, kind, name, data, key, options, interval, cron, tz) -> str:
        """Check and store a schedule of `every` or `cron` (`kind`)."""
        allowed = {"priority", "retries", "timeout"} | ({"delay", "run_at"} if cron is None
                                                      else set())
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"unknown option(s) for {kind}(): {', '.join(sorted(unknown))}")
        now = time.time()
        row = self._row(name, data, options.get("delay"), options.get("run_at"),
                        options.get("priority", 0), options.get("retries"),
                        options.get("timeout"), None, now)
        key = name if key is None else key
        if not isinstance(key, str):
            raise TypeError(f"a schedule key must be a str, not {type(key).__name__}")
        if not key:
            raise ValueError("a schedule key must not be empty")
        first = row.run_at if cron is None else _cron_next(cron, now, _zone(tz))
        with self._store(operating=True) as storage:
            storage.upsert_schedule(_Schedule(key, name, row.data, interval, first,
                                              row.priority, options.get("retries"),
                                              row.timeout, cron, tz, row.runner))
        d = self._dispatcher
        if d is not None:
            d.schedules_changed()
        return key

    def schedules(self) -> list[ScheduleInfo]:
        """Every recurring job (of `every` and `cron`), by key."""
        with self._store() as storage:
            return self._schedule_infos(storage.schedules())

    def _schedule_infos(self, rows: list[_StoredSchedule]) -> list[ScheduleInfo]:
        loads = self._settings.serializer
        return [ScheduleInfo(**row._replace(
            data=_loads_or_none(loads, row.data),
            interval=None if row.cron is not None else row.interval)._asdict())
            for row in rows]

    def unschedule(self, key: str) -> bool:
        """Remove a recurring job (of `every` or `cron`); False if there was none.  A run already
        enqueued stays, as an ordinary job."""
        if not isinstance(key, str):
            raise TypeError(f"a schedule key must be a str, not {type(key).__name__}")
        with self._store(operating=True) as storage:
            return storage.drop_schedule(key)

    # -- flow control ----------------------------------------------------------------

    def pause(self, name: str | None = None) -> None:
        """Start no job named `name` (None: no job at all), in any process
        sharing the queue, until `resume`; running jobs finish.  Stored in
        the queue: it lasts across restarts.  When it returns, no try of
        that name begins any more: a try claimed just before is given a
        moment (at most 0.1 s) to begin first."""
        _flow_name(name, optional=True)
        with self._store(operating=True) as storage:
            storage.set_paused(name, True)
            storage.claims_settled()
            # A try is claimed a moment before its processor is called: let
            # those claimed just before the pause begin before returning.
            last = storage.last_claim(name)
        if last is not None:
            wait = min(_PAUSE_GRACE, last + _PAUSE_GRACE - time.time())
            if wait > 0:
                time.sleep(wait)

    def resume(self, name: str | None = None) -> None:
        """Undo `pause(name)`; `resume()` (None) resumes every name.  Idle
        workers of every process take the jobs again within 0.1 s."""
        _flow_name(name, optional=True)
        with self._store(operating=True) as storage:
            storage.set_paused(name, False)
        d = self._dispatcher
        if d is not None:
            d.held_changed()
            d.work_arrived(None)

    def paused(self) -> set[str | None]:
        """The names paused; None among them when everything is."""
        with self._store() as storage:
            return storage.paused()

    def limit(self, name: str, *, concurrency: int | None = None,
              rate: tuple[int, float] | None = None) -> None:
        """Limit the jobs named `name`, across every process sharing the
        queue: at most `concurrency` in progress at once, and with
        `rate=(n, seconds)` at most n started in any window of that many
        seconds.  Never exceeded; the jobs over it wait, and jobs of other
        names do not.  Stored in the queue; replaces the name's limit, and
        with neither removes it."""
        _flow_name(name)
        if concurrency is not None:
            concurrency = _integer("concurrency", concurrency, least=1)
        if rate is not None:
            if not isinstance(rate, tuple) or len(rate) != 2:
                raise TypeError(f"rate must be a pair (n, seconds), not {rate!r}")
            rate = (_integer("rate's n", rate[0], least=1),
                    float(_seconds("rate's seconds", rate[1], positive=True)))
        with self._store(operating=True) as storage:
            storage.set_limit(name, concurrency, rate)
        d = self._dispatcher
        if d is not None:
            d.held_changed()
            d.work_arrived(None)

    def limits(self) -> dict[str, dict]:
        """Every limit stored: name -> {"concurrency": n or None, "rate":
        (n, seconds) or None}."""
        with self._store() as storage:
            found = storage.limits()
        return {name: {"concurrency": concurrency, "rate": rate}
                for name, (concurrency, rate) in found.items()}

    # -- tasks, futures and executors --------------------------------------------------

    def task(self, name: str | Callable | None = None, *, concurrency: int = 1,
             retries: int | None = None, timeout: float | None = None,
             priority: int = 0):
        """Register a function as a task (`@bl.task` or `@bl.task(...)`) and
        return its `Task`: its calls are jobs named `name` (by default
        `module.qualname`), run by `concurrency` workers here (for an `async
        def` function: that many coroutines on the queue's event loop).
        Registering a task of a name that exists replaces it."""
        if callable(name):
            return self.task()(name)
        if name is not None:
            if not isinstance(name, str):
                raise TypeError(f"a task name must be a str, not {type(name).__name__}")
            if not name:
                raise ValueError("a task name must not be empty")
        _integer("concurrency", concurrency, least=1)
        options = {"priority": _integer("priority", priority, least=_INT_MIN)}
        if retries is not None:
            options["retries"] = _retries("retries", retries)
        if timeout is not None:
            options["timeout"] = _seconds("timeout", timeout, positive=True)

        def register(fn) -> Task:
            if isinstance(fn, Task):
                fn = fn.fn
            if not callable(fn):
                raise TypeError(f"a task is a function, not {type(fn).__name__}")
            task = Task(self, fn, _function_name(fn) if name is None else name,
                        concurrency, options)
            with self._lock:
                old = self._tasks.get(task.name)
            replaces = None if old is None else old._processor.id
            run = task._arun if _is_async(fn) else task._run
            task._processor = self._add_processor(run, frozenset([task.name]),
                                                  concurrency, [task.name], replaces, "task")
            with self._lock:
                if old is not None:
                    self._task_names[task.name] -= 1
                    self._exclude_task_names()
                self._tasks[task.name] = task
            return task
        return register

    def executor(self, max_workers: int = 5) -> Executor:
        """A `concurrent.futures.Executor` whose calls are jobs of this queue,
        run by `max_workers` workers of its own: resumable after a crash."""
        return Executor(self, max_workers)

    def _executor_runner(self, executor: Executor) -> str:
        """The runner of the next executor made: the program's n-th."""
        with self._lock:
            n, self._next_executor = self._next_executor, self._next_executor + 1
            self._executors.add(executor)
        return f"executor {n}"

    def _end_executor_runs(self) -> None:
        """The run ends (a stop): the calls of each executor whose calls have
        all ended are released, as a shutdown would, so that the next run
        computes them afresh; those of one with calls left stay resumable."""
        if self._dispatcher is None:
            return
        with self._lock:
            executors = list(self._executors)
        for executor in executors:
            try:
                executor._end_run()
            except BleroError as exc:
                log.error("releasing the calls of %r at stop failed: %s", executor, exc)

    def future(self, job_id: int) -> JobFuture:
        """A JobFuture of any stored job (also one of another run or
        process), resolved when its outcome is recorded.  KeyError for an
        unknown id."""
        _job_id("job_id", job_id)
        future = JobFuture(self, job_id)
        self._futures.add([future])     # first: an end from now on resolves it
        with self._store() as storage:
            row = storage.outcome(job_id)
        if row is None:
            self._futures.forget(future)
            raise KeyError(job_id)
        if row.state >= _COMPLETE:
            self._futures.forget(future)
            future._stored(row, self._settings.serializer)
        return future

    async def aenqueue(self, name: str, data: Any = None, *, delay: float | None = None,
                       run_at: float | datetime.datetime | None = None, priority: int = 0,
                       retries: int | None = None, timeout: float | None = None,
                       key: str | None = None, after: Any = None,
                       connection: Any = None) -> int:
        """`enqueue` from async code, without blocking the caller's loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(
            self.enqueue, name, data, delay=delay, run_at=run_at, priority=priority,
            retries=retries, timeout=timeout, key=key, after=after, connection=connection))

    async def aenqueue_many(self, jobs: Iterable[tuple | dict], *,
                            connection: Any = None) -> list[int]:
        """`enqueue_many` from async code, without blocking the caller's loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(
            self.enqueue_many, list(jobs), connection=connection))

    def _enqueue_calls(self, name: str, calls: list[tuple[tuple, dict]], options: dict,
                       resumable: bool = False, waiter: Callable | None = None,
                       runner: str = _TASK_RUNNER,
                       fn: Callable | None = None) -> list[JobFuture]:
        """Store a job per call (args, kwargs) of the task `name`; return
        their futures (or what `waiter(job_id)` makes for each, Task.map's
        lighter `_MapCall`s).  `resumable`: each call is matched with the
        stored job of the same call of a run that did not finish (see _Calls).
        `runner`: whose workers run them (an executor's, or a task's);
        `fn`: the function each call is checked against."""
        if fn is not None:
            _check_calls(fn, name, calls)
        d = self._running()
        connection = options.get("connection")
        if resumable and connection is not None:
            raise ValueError("connection= is for enqueue(): the calls of a map or an "
                             "executor are committed as they are made")
        if resumable and options.get("key") is not None:
            raise ValueError("key= is for enqueue(): each call of a map or an executor "
                             "gets a key of its own")
        if not calls:
            return []
        # The options are checked once, with the first call; each call's
        # own is its data.
        first = self._row(name, calls[0], options.get("delay"), options.get("run_at"),
                          options.get("priority", 0), options.get("retries"),
                          options.get("timeout"), options.get("key"), time.time())
        blobs = [first.data]
        serializer = self._settings.serializer
        for call in calls[1:]:
            try:
                blobs.append(_dumps(serializer, call))
            except Exception as exc:
                raise TypeError(f"cannot serialize the data of job {name!r}: {exc}") from exc
        keys = self._calls.keys(name, blobs) if resumable else [first.key] * len(blobs)
        state, priority, run_at, _, _, attempts, timeout, _, now, _ = first
        rows = [_NewJob(state, priority, run_at, name, blob, attempts, timeout, key, now, runner)
                for blob, key in zip(blobs, keys)]
        deps = _after(options.get("after"))
        futures: list[JobFuture] = []
        me = object()
        try:
            self._futures.expecting.add(me)
            # Slices of growing size, a commit each: the workers start on the
            # first while the rest are stored.  (Every call was checked
            # above: a bad one stored nothing.)
            i, size = 0, _CALLS_SLICE
            while i < len(rows):
                futures += self._enqueue_slice(d, rows[i:i + size], connection,
                                               waiter or functools.partial(JobFuture, self),
                                               deps)
                i, size = i + size, min(size * 2, _CALLS_SLICE_MAX)
        finally:
            self._futures.expecting.discard(me)
        return futures

    def _enqueue_slice(self, d: _Dispatcher, rows: list[_NewJob], connection: Any,
                       waiter: Callable, deps: tuple[int, ...] = ()) -> list[JobFuture]:
        """Store these calls' jobs (while in `_futures.expecting`), each
        waiting on the jobs `deps` names; their futures."""
        ids, stored = d.enqueue(rows, connection, [deps] * len(rows) if deps else None)
        futures = [waiter(i) for i in ids]
        self._futures.add([f for f, new in zip(futures, stored) if new])
        matched = [k for k, new in enumerate(stored) if not new]
        if not matched:
            return futures
        # Calls a stored job answered: a complete one gives its result,
        # a pending or running one goes on, a failed or cancelled one
        # (or one swept meanwhile) runs again as a new job.
        found = d.storage.outcomes([ids[k] for k in matched])
        again, going = [], []
        for k in matched:
            row = found.get(ids[k])
            if row is None or row.state in (_FAILED, _CANCELLED):
                again.append(k)
            elif row.state == _COMPLETE:
                futures[k]._stored(row, self._settings.serializer)
            else:
                going.append(futures[k])
        self._futures.add(going)
        if going:
            # Those not started yet are run by this run's workers (its
            # executor's), whoever made them.
            d.storage.run_by([f.id for f in going], rows[0].runner)
            d.runners_changed()
        if again:
            d.storage.clear_keys([ids[k] for k in again if ids[k] in found])
            new_ids, _ = d.enqueue([rows[k] for k in again], None,
                                   [deps] * len(again) if deps else None)
            renewed = [waiter(i) for i in new_ids]
            for k, f in zip(again, renewed):
                futures[k] = f
            self._futures.add(renewed)
        return futures

    def _wait_all(self, calls: _MapCalls) -> None:
        """Wait until every call of a map has ended; BleroError if the queue
        stops first."""
        d = self._dispatcher
        untaken = _Sparingly()
        while not calls.done.wait(_FUTURES_LOOK):
            if self._dispatcher is not d or d is None:
                raise BleroError(f"{self._where}: the queue stopped with {calls.left} "
                                 f"call(s) not ended; a later run carries on with them")
            self._look_for_untaken(untaken, "map()")

    def _release(self, ids: list[int]) -> None:
        """Clear the keys of these calls' jobs: a later run computes them afresh."""
        if ids:
            with self._store(operating=True) as storage:
                storage.clear_keys(ids)

    # -- metrics ---------------------------------------------------------------------

    def metrics_text(self) -> str:
        """The queue's metrics in the Prometheus text format."""
        counts = self.stats()
        c = self._counters
        with c.lock:
            finished = dict(c.finished)
            enqueued, seconds_sum, seconds_count = c.enqueued, c.seconds_sum, c.seconds_count
        lines = ["# HELP blero_jobs Jobs in the queue file, by state.",
                 "# TYPE blero_jobs gauge"]
        lines += [f'blero_jobs{{state="{s}"}} {n}' for s, n in counts.items()]
        lines += ["# HELP blero_jobs_finished_total Tries ended by this queue, by outcome.",
                  "# TYPE blero_jobs_finished_total counter"]
        lines += [f'blero_jobs_finished_total{{outcome="{o}"}} {n}' for o, n in finished.items()]
        lines += ["# HELP blero_jobs_enqueued_total Jobs this queue stored (not those a key"
                  " answered), schedule runs included.",
                  "# TYPE blero_jobs_enqueued_total counter",
                  f"blero_jobs_enqueued_total {enqueued}",
                  "# HELP blero_job_seconds Time processors spent on each try.",
                  "# TYPE blero_job_seconds summary",
                  f"blero_job_seconds_sum {seconds_sum!r}",
                  f"blero_job_seconds_count {seconds_count}",
                  "# HELP blero_processors Registered processors.",
                  "# TYPE blero_processors gauge",
                  f"blero_processors {len(self._processors)}"]
        return "\n".join(lines) + "\n"

    def serve_metrics(self, port: int = 0, host: str = "127.0.0.1") -> _MetricsServer:
        """Serve `GET /metrics` and the live dashboard at `GET /` from a daemon
        thread; return a handle with `.port` and `.close()`.  `stop()` closes it."""
        _integer("port", port, most=65535)
        if not isinstance(host, str):
            raise TypeError(f"host must be a str, not {type(host).__name__}")
        server = _MetricsServer(self, host, port)
        with self._lock:
            self._servers.append(server)
        return server


class _Borrowed:
    """`with`-able: the running queue's storage, which a stop leaves open
    until this call is done, or the file opened just for this call when the
    queue is stopped or stopping (never created: it must exist)."""

    def __init__(self, blero: Blero, operating: bool = False):
        self._blero = blero
        self._operating = operating
        self._opened = None

    def __enter__(self) -> _Storage:
        try:
            storage = self._blero._borrow(self)
            if storage is None:
                storage = self._blero._new_storage()
                storage.open(create=False)
                if self._operating and storage.read_only is not None:
                    # Refused whatever it would change: even a sweep with
                    # nothing to delete says it cannot operate here.
                    storage.close()
                    storage.writable()
                self._opened = storage
            return storage
        except BaseException:   # (a Ctrl-C, say: then `with` calls no __exit__)
            self._blero._borrows.pop(self, None)    # (no call before it: see _borrow)
            raise

    def __exit__(self, *exc) -> None:
        self._blero._borrows.pop(self, None)
        if self._opened is not None:
            self._opened.close()


class _Stop:
    """The thread that does a stop (not a daemon: a program that ends
    meanwhile lets it end).  Started under the Blero's lock, it goes on only
    if it is still the Blero's `_stop`: a Ctrl-C that cut its start short
    leaves it unclaimed, and the stop() run again makes another."""

    def __init__(self, blero: Blero, d: _Dispatcher, storage: _Storage):
        self.claimed = False
        self.thread = threading.Thread(target=self.run, args=(blero, d, storage),
                                       name="blero-stop")

    def run(self, blero: Blero, d: _Dispatcher, storage: _Storage) -> None:
        """The stop itself, on its thread (or, at exit, the caller's)."""
        with blero._lock:
            if blero._stop is not self:
                return
            self.claimed = True
        blero._finish_stop(d, storage)


def _signal(number: int):
    """The signal.Signals member of that number (real-time signals have none)."""
    try:
        return signal.Signals(number)
    except ValueError:
        return number


class _SignalStop:
    """What stop_on_signals() set up for one run: the handlers it replaced,
    and a thread that stops the queue when one of the signals comes.

    A signal handler runs in the main thread between two steps of whatever
    it was doing, maybe holding one of the queue's locks: so it takes none,
    and only writes a byte to a pipe, which the thread reads."""

    def __init__(self, blero: Blero, run: _Dispatcher):
        self.blero, self.run = blero, run
        self.previous: dict[int, Any] = {}
        self.fired = False
        self._read, self._write = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="blero-signals", daemon=True)
        self._thread.start()
        # The thread is a daemon (a program that never gets the signal must
        # not wait for it at exit); one that got it waits for its stop.
        atexit.register(self._at_exit)

    def install(self, signals: list[int]) -> None:
        added = []
        try:
            for sig in signals:
                if sig not in self.previous:
                    self.previous[sig] = signal.signal(sig, self._handle)
                    added.append(sig)
        except (OSError, ValueError) as exc:
            self.put_back(added)
            raise ValueError(f"cannot handle {getattr(sig, 'name', sig)}: {exc}") from None

    def _handle(self, signum, frame) -> None:
        if self.blero._dispatcher is not self.run:
            # That run was stopped off the main thread (by a processor, say),
            # which cannot put handlers back: act as if never set.
            self.put_back()
            signal.raise_signal(signum)
            return
        with contextlib.suppress(OSError):
            os.write(self._write, b"!")     # first: whatever comes next, the stop is begun
        self.fired = True
        self.put_back()
        raise KeyboardInterrupt(_signal(signum))

    def _watch(self) -> None:
        if os.read(self._read, 1) == b"!" and self.blero._dispatcher is self.run:
            try:
                self.blero.stop(timeout=0)
            except Exception as exc:
                log.error("stopping the queue on a signal failed: %s", exc)

    def run_over(self) -> None:
        """The run stopped (under the Blero's lock): the thread may end."""
        with contextlib.suppress(OSError):
            os.write(self._write, b".")

    def put_back(self, signals: Iterable[int] | None = None) -> None:
        """The previous handlers of `signals` (default: all) back (main thread)."""
        for sig in list(self.previous if signals is None else signals):
            handler = self.previous.pop(sig)    # None: not set from Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def restore(self) -> None:
        """The previous handlers back, the thread ended, the pipe closed (main thread)."""
        self.put_back()
        if not self.fired:
            atexit.unregister(self._at_exit)
        self.run_over()
        self._thread.join()
        os.close(self._read)
        os.close(self._write)

    def _at_exit(self) -> None:
        if self.fired:
            self._thread.join()


def new(path: str | os.PathLike, **settings) -> Blero:
    """Make a queue on `path` (Goblero's New); nothing touches the disk until `start()`."""
    return Blero(path, **settings)


# ---------------------------------------------------------------------------
# Tasks, futures and the executor
# ---------------------------------------------------------------------------
#
# The Python way onto the same jobs: a task call is a job whose data is the
# serialized (args, kwargs) and whose result is the return value.  A call
# made through `Task.map` or an `Executor` is resumable: its job gets the key
# "blero.call:<name>:<blake2b of its data>:<n>", n counting the identical
# calls of this run, so that the same program run again after a crash meets
# the jobs of the run that did not finish (a key answers with the stored
# job); once the map or executor is done with them, their keys are cleared,
# and the next run computes them afresh.

_JOB_OPTIONS = ("delay", "run_at", "priority", "retries", "timeout", "key", "after",
                "connection")


class _Calls:
    """The resumable calls of one run: how many times each was made."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}    # (name, digest) -> calls so far

    def keys(self, name: str, blobs: list) -> list[str]:
        """The keys of the next calls of `name` with data `blobs` (each
        serialized), in order."""
        digests = [hashlib.blake2b(b.encode() if isinstance(b, str) else bytes(b or b""),
                                   digest_size=16).hexdigest() for b in blobs]
        prefix = f"blero.call:{name}:"
        seen = self._seen
        keys = []
        with self._lock:
            for digest in digests:
                n = seen[name, digest] = seen.get((name, digest), 0) + 1
                keys.append(f"{prefix}{digest}:{n}")
        return keys


def _call_args(job: Job) -> tuple[tuple, dict]:
    """The (args, kwargs) a task call's job carries."""
    data = job.data
    if (not isinstance(data, (tuple, list)) or len(data) != 2
            or not isinstance(data[0], (tuple, list)) or not isinstance(data[1], dict)):
        raise TypeError(f"job {job.id} ({job.name}) is not a task call: its data is "
                        f"{_shown(data)}, not (args, kwargs)")
    return tuple(data[0]), data[1]


def _module_of(fn) -> str | None:
    """The module a function's qualified name is in: a builtin method's
    (`str.upper`, `dict.fromkeys`) has none of its own, its class's is it."""
    module = getattr(fn, "__module__", None)
    if isinstance(module, str):
        return module
    owner = getattr(fn, "__objclass__", None)      # a method descriptor: str.upper
    if owner is None:
        owner = getattr(fn, "__self__", None)       # a builtin class method: dict.fromkeys
    return owner.__module__ if isinstance(owner, type) else None


def _function_name(fn, what: str = "a task") -> str:
    """`module.qualname` of a function that can be found again by that
    name after a restart; TypeError naming why for anything else."""
    module = _module_of(fn)
    qualname = getattr(fn, "__qualname__", None)
    hint = "give the task a name" if what == "a task" else "or make it a task with a name"
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(f"{fn!r} has no qualified name: {what} needs a module-level "
                        f"function ({hint})")
    if "<lambda>" in qualname:
        raise TypeError(f"{module}.{qualname} is a lambda: {what} needs a function "
                        f"that can be imported by its name ({hint})")
    if "<locals>" in qualname:
        raise TypeError(f"{module}.{qualname} is a nested function: {what} needs a "
                        f"module-level function ({hint})")
    return f"{module}.{qualname}"


def _unwrapped(fn, args: tuple, kwargs: dict) -> tuple[Callable, tuple, dict]:
    """A call of a functools.partial as the call of its function: the
    partial's arguments travel with the call's own."""
    while isinstance(fn, functools.partial):
        fn, args, kwargs = fn.func, fn.args + args, {**fn.keywords, **kwargs}
    return fn, args, kwargs


def _importable(fn) -> str:
    """The name of a function an executor runs: it must be what that name
    imports (so that a later run finds the same function by it)."""
    name = _function_name(fn, "an executor")
    obj = sys.modules.get(_module_of(fn))
    for part in fn.__qualname__.split("."):
        obj = getattr(obj, part, None)
    # (a builtin class method is made anew at each look: equal, not the same)
    # (a classmethod imports as bound to its class: its function is `fn`)
    if obj is not fn and obj != fn and getattr(obj, "fn", None) is not fn \
            and getattr(obj, "__func__", None) is not fn:
        raise TypeError(f"{name} does not import as {fn!r}: an executor needs a function "
                        f"that can be imported by its qualified name")
    return name


def _check_options(options: dict) -> dict:
    """`options` of Task.using, checked at the call as enqueue's are."""
    unknown = set(options) - set(_JOB_OPTIONS)
    if unknown:
        raise TypeError(f"unknown job option(s): {', '.join(sorted(unknown))}")
    _when_tries_timeout(options.get("delay"), options.get("run_at"), options.get("priority", 0),
                        options.get("retries"), options.get("timeout"), options.get("key"),
                        time.time())
    _after(options.get("after"))
    return options


@functools.lru_cache(maxsize=256)
def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        # (not follow_wrapped: a decorator's wrapper is what runs, and may
        # take other arguments than the function it wraps)
        return inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):     # a builtin without one: its own call tells
        return None


def _check_calls(fn: Callable, name: str, calls: list[tuple[tuple, dict]]) -> None:
    """Raise TypeError for a call that `fn`'s signature refuses, at the call
    and before anything is stored, rather than in every try of its job."""
    try:
        signature = _signature(fn)
    except TypeError:                   # (unhashable: not looked at)
        return
    if signature is None:
        return
    for args, kwargs in calls:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}: {exc}") from None


class JobFuture(concurrent.futures.Future):
    """The outcome of a job, as a `concurrent.futures.Future` (so it works
    with `concurrent.futures.wait` and `as_completed`), and awaitable.

    `result()` returns the job's result once recorded, or raises the job's
    own exception (the original one when it could be restored, else
    JobFailed), JobCancelled for a cancelled job.  `cancel()` cancels only a
    job not started yet, as concurrent.futures does."""

    def __init__(self, blero: Blero, job_id: int):
        super().__init__()
        self.id = job_id
        self._blero = blero
        self._cancelling = False    # cancel() under way: outcomes wait for it
        # Set once it is resolved: what result() sleeps on, not the Future's
        # Condition (see _Event: a Ctrl-C there could leave it held, and the
        # worker resolving it would wait for ever).
        self._settled = _Event()
        self._then: Callable[[JobFuture], Any] | None = None   # called once settled

    def __repr__(self):
        return f"<JobFuture job {self.id} {self._state.lower()}>"

    def result(self, timeout: float | None = None) -> Any:
        self._settled.wait(timeout)
        return super().result(0)    # (TimeoutError if it is not resolved yet)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._settled.wait(timeout)
        return super().exception(0)

    def cancel(self) -> bool:
        """Cancel the job if it has not started: True if it is cancelled."""
        if self.cancelled():
            return True
        if self.done():
            return False
        futures = self._blero._futures
        try:
            self._cancelling = True     # (inside the try: a Ctrl-C never leaves it set)
            cancelled = self._blero._cancel_pending(self.id)
        finally:
            self._cancelling = False
        if not cancelled:
            futures.look_now(self)  # it may have ended while its outcome waited
            return False
        futures.forget(self)
        super().cancel()
        self.set_running_or_notify_cancel()     # waiters of wait()/as_completed see it now
        self._settle()
        return True

    def __await__(self):
        # Not asyncio.wrap_future, which cancels the job when the awaiting
        # task is cancelled (a wait_for timing out, a server shutting down):
        # the job is committed, and only cancel() or bl.cancel() ends it.
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def done(_):
            with contextlib.suppress(RuntimeError):     # the loop closed meanwhile
                loop.call_soon_threadsafe(_copy_outcome, self, waiter)
        self.add_done_callback(done)
        return (yield from waiter)

    def _deliver(self, result: Any = None, exc: BaseException | None = None) -> None:
        """Resolve it, unless it is resolved (or cancelled) already."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if exc is None:
                self.set_result(result)
            else:
                self.set_exception(exc)
        self._settle()

    def _settle(self) -> None:
        self._settled.set()
        then = self._then
        if then is not None:
            then(self)

    def _stored(self, row: _Ended, serializer) -> None:
        """Resolve it from the stored outcome of its job, which has ended."""
        if row.state == _COMPLETE:
            self._deliver(_loads_or_none(serializer, row.result))
        elif row.state == _FAILED:
            exc = _restored(serializer, row.result)
            if exc is not None and hasattr(exc, "add_note"):   # (3.11+)
                # Unpickled, it has no traceback: the stored one tells where.
                exc.add_note(f"blero: job {self.id} raised it; its traceback there:\n"
                             f"{(row.error or '').rstrip()}")
            self._deliver(exc=exc or JobFailed(self.id, row.error))
        else:
            self._deliver(exc=JobCancelled(self.id))


def _copy_outcome(source: concurrent.futures.Future, waiter: asyncio.Future) -> None:
    """Resolve `waiter`, unless cancelled, as `source` (done) is."""
    if waiter.cancelled():
        return
    if source.cancelled():
        waiter.cancel()
    elif isinstance(source.exception(), StopIteration):
        # (asyncio refuses to raise one into a coroutine, as generators do)
        error = RuntimeError(f"the job raised {source.exception()!r}")
        error.__cause__ = source.exception()
        waiter.set_exception(error)
    elif source.exception() is not None:
        waiter.set_exception(source.exception())
    else:
        waiter.set_result(source.result())


class _MapCall:
    """A call of `Task.map` waiting for its job's outcome: what `_Futures`
    resolves, as a JobFuture, without a Future's Condition each (a map of
    20,000 calls makes 20,000); its map's `_MapCalls` counts them down."""

    __slots__ = ("id", "_cancelling", "_calls", "_result", "_exc", "_done")

    def __init__(self, calls: _MapCalls, job_id: int):
        self.id = job_id
        self._cancelling = False
        self._calls = calls
        self._result = self._exc = None
        self._done = False

    _stored = JobFuture._stored

    def _deliver(self, result: Any = None, exc: BaseException | None = None) -> None:
        calls = self._calls
        with calls.lock:
            if self._done:
                return
            self._result, self._exc, self._done = result, exc, True
            calls.left -= 1
            if not calls.left:
                calls.done.set()

    def result(self):
        if self._exc is not None:
            raise self._exc
        return self._result


class _MapCalls:
    """The calls of one `Task.map`, and how many have not ended."""

    def __init__(self, n: int):
        self.lock = threading.Lock()
        self.left = n
        self.done = _Event()    # waited for by the map's caller, maybe the main thread
        if not n:
            self.done.set()


class _Futures:
    """The JobFutures of one Blero not yet resolved, by job id.

    A job that ends in this process resolves its futures at once, from the
    dispatcher's record of it (`ended`, with the result as returned, even if
    a sweep removes the job right after).  For jobs that other processes or
    earlier runs own, one watcher thread (started with the first future
    waiting, ended with the last) looks at their stored outcomes whenever
    the queue may have changed: never a thread per future.

    `_lock` guards `_waiting` and `_early`; no I/O and no future's
    callbacks run under it."""

    def __init__(self, blero: Blero):
        self._blero = blero
        self._lock = threading.Lock()
        self._waiting: dict[int, list[JobFuture]] = {}
        # While calls are being enqueued (a token of each enqueuer in
        # `expecting`), a job that ends before its future is added leaves
        # its outcome in `_early` for it.  The enqueuer adds its token inside
        # its `try` and discards it in the `finally`, with no call before:
        # a Ctrl-C never leaves it there.
        self.expecting: set[object] = set()
        self._early: dict[int, _Outcome | None] = {}
        self._watcher: threading.Thread | None = None
        self._poked = threading.Event()     # other processes committed: look now
        self._missing: set[int] = set()     # ids the watcher's last look did not find

    def add(self, futures: list[JobFuture]) -> None:
        early = []
        with self._lock:
            for f in futures:
                if f.id in self._early:
                    early.append((f, self._early[f.id]))
                else:
                    self._waiting.setdefault(f.id, []).append(f)
            if self._watcher is None and self._waiting:
                self._watcher = threading.Thread(target=self._watch, name="blero-futures",
                                                 daemon=True)
                _start_thread(self._watcher)
        for f, outcome in early:
            self._resolve(f, outcome)

    def forget(self, future: JobFuture) -> None:
        with self._lock:
            waiting = self._waiting.get(future.id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiting.pop(future.id, None)

    def ended(self, job_id: int, outcome: _Outcome | None) -> None:
        """The job ended here (None: cancelled): resolve its futures."""
        if not self._waiting and not self.expecting and not self._early:
            return      # the workers' hot path: nothing to look up
        with self._lock:
            futures = self._waiting.pop(job_id, ())
            keep = [f for f in futures if f._cancelling]
            if keep:
                self._waiting[job_id] = keep
            if self.expecting:
                self._early[job_id] = outcome
            else:   # nobody enqueues: what the last enqueuer left is no one's
                self._early.clear()
        for f in futures:
            if not f._cancelling:
                self._resolve(f, outcome)

    def cancelled(self, job_id: int) -> None:
        self.ended(job_id, None)

    def poke(self) -> None:
        """Jobs may have ended where `ended` does not see (another process,
        a dead owner's jobs handed back out of tries)."""
        if self._waiting:
            self._poked.set()

    def _resolve(self, f: JobFuture, outcome: _Outcome | None) -> None:
        if outcome is None:
            f._deliver(exc=JobCancelled(f.id))
        elif outcome.state == _COMPLETE:
            serializer = self._blero._settings.serializer
            # What another process or a later run would read back (json
            # makes a tuple a list): a resumed map is all of one kind.
            f._deliver(outcome.result if serializer is pickle
                       else _loads_or_none(serializer, outcome.blob))
        elif outcome.blob is not None:      # restorable: the original itself
            f._deliver(exc=outcome.exc)
        else:
            f._deliver(exc=JobFailed(f.id, outcome.error))

    def look_now(self, future: JobFuture) -> None:
        """Resolve `future` now if its job has ended."""
        with self._blero._store() as storage:
            row = storage.outcome(future.id)
        if row is not None and row.state >= _COMPLETE:
            self.forget(future)
            future._stored(row, self._blero._settings.serializer)

    def _watch(self) -> None:
        blero = self._blero
        next_look = 0.0
        untaken = _Sparingly()
        told = True
        while True:
            with self._lock:
                ids = list(self._waiting)
                if not ids:
                    self._watcher = None
                    return
            now = time.monotonic()
            if now >= next_look:
                try:
                    with blero._store() as storage:
                        found = storage.outcomes(ids)
                        told = storage.tells_of_ends
                except BleroError as exc:
                    found = None
                    log.debug("futures: cannot look at the queue: %s", exc)
                # A look reads every waiting job: with very many it is made at
                # most 2% of the time.
                next_look = time.monotonic() + max(_POLL, 50 * (time.monotonic() - now))
                if found is not None:
                    self._found(ids, found)
                    if any(row.state < _COMPLETE for row in found.values()):
                        blero._look_for_untaken(untaken, "a future's result()")
            # Running, the queue pokes it when other processes commit (and it
            # looks now and then for what nobody tells); where they do not
            # tell of the jobs they end (a server), it looks as often as
            # wait() does; stopped, only the file tells.
            if blero._dispatcher is None:
                self._poked.wait(_FUTURES_STOPPED_LOOK)
            else:
                self._poked.wait(_FUTURES_LOOK if told else _POLL)
            self._poked.clear()
            pause = next_look - time.monotonic()
            if pause > 0:
                time.sleep(pause)   # (the 2% bound above)

    def _found(self, ids: list[int], found: dict[int, _Ended]) -> None:
        resolved = []
        missing, self._missing = self._missing, {i for i in ids if i not in found}
        with self._lock:
            for i in ids:
                row = found.get(i)
                if row is not None and row.state < _COMPLETE:
                    continue
                if row is None and i not in missing:
                    # Swept, maybe, right after it ended here: its end, on
                    # its way, resolves it; gone at the next look too, it is.
                    continue
                futures = [f for f in self._waiting.get(i, ()) if not f._cancelling]
                if futures:
                    left = [f for f in self._waiting[i] if f._cancelling]
                    if left:
                        self._waiting[i] = left
                    else:
                        del self._waiting[i]
                    resolved.append((futures, row, i))
        serializer = self._blero._settings.serializer
        for futures, row, i in resolved:
            for f in futures:
                if row is None:
                    f._deliver(exc=BleroError(f"job {i} is gone (swept) before its "
                                              f"outcome was seen"))
                else:
                    f._stored(row, serializer)


_FUTURES_LOOK = 1.0             # seconds between looks at most, while running
_CALLS_SLICE = 256              # calls of a map stored by its first commit
_CALLS_SLICE_MAX = 8192         # and by any later one
_FUTURES_STOPPED_LOOK = 0.25    # and on a stopped queue (its file may change)


class Task:
    """A function whose calls are jobs, made by `Blero.task`.

    Calling it runs the function directly; `enqueue(*args, **kwargs)` makes
    a job of the call and returns its JobFuture; `map(*iterables)` runs one
    job per call, resumably, and returns the results in order; `using(...)`
    gives a copy with other job options."""

    def __init__(self, blero: Blero, fn: Callable, name: str, concurrency: int,
                 options: dict):
        self.fn = fn
        self.name = name
        self.concurrency = concurrency
        self._blero = blero
        self._options = options
        functools.update_wrapper(self, fn)

    def __repr__(self):
        return f"<blero.Task {self.name!r}>"

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def using(self, **options) -> Task:
        """A copy of this task whose jobs get these options (`delay`,
        `run_at`, `priority`, `retries`, `timeout`, `key`, `after`,
        `connection`), as `Blero.enqueue` takes them."""
        copy = Task.__new__(Task)
        copy.__dict__.update(self.__dict__)
        copy._options = _check_options({**self._options, **options})
        return copy

    def enqueue(self, *args, **kwargs) -> JobFuture:
        """Make a job of this call; return its future."""
        return self._blero._enqueue_calls(self.name, [(args, kwargs)], self._options,
                                          fn=self.fn)[0]

    async def aenqueue(self, *args, **kwargs) -> JobFuture:
        """`enqueue` from async code, without blocking the caller's loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(self.enqueue, *args,
                                                                  **kwargs))

    def every(self, interval: float, *args, **kwargs) -> str:
        """Call this task every `interval` seconds with these arguments, as
        `Blero.every` schedules a job (the schedule's key: the task's name,
        or its `using(key=...)`); return the key."""
        return self._blero.every(interval, self.name, (args, kwargs), **self._schedule_options())

    def cron(self, expr: str, *args, tz: str | datetime.tzinfo | None = None,
             **kwargs) -> str:
        """Call this task at the times cron expression `expr` names, with
        these arguments, as `Blero.cron` schedules a job (`tz` is the
        schedule's zone, not an argument); return the schedule's key."""
        return self._blero.cron(expr, self.name, (args, kwargs), tz=tz,
                                **self._schedule_options())

    def _schedule_options(self) -> dict:
        options = {k: v for k, v in self._options.items()
                   if k in ("key", "priority", "retries", "timeout")}
        others = set(self._options) - set(options)
        if others:
            raise TypeError(f"a schedule takes no {', '.join(sorted(others))} "
                            f"(of using()): its runs are due when it says")
        return options

    def map(self, *iterables) -> list:
        """One job per call `fn(*items)`, with the task's concurrency; the
        results in order.  The first failure is raised once every job has
        ended.  Resumable: run again after a crash, the calls that completed
        return their stored results without running again."""
        calls = [(args, {}) for args in zip(*iterables)]
        blero = self._blero
        group = _MapCalls(len(calls))
        waiting = blero._enqueue_calls(self.name, calls, self._options, resumable=True,
                                       waiter=functools.partial(_MapCall, group), fn=self.fn)
        blero._wait_all(group)
        blero._release([c.id for c in waiting])
        return [c.result() for c in waiting]

    def _run(self, job: Job):
        args, kwargs = _call_args(job)
        return self.fn(*args, **kwargs)

    async def _arun(self, job: Job):
        args, kwargs = _call_args(job)
        return await self.fn(*args, **kwargs)


class Executor(concurrent.futures.Executor):
    """A `concurrent.futures.Executor` whose calls are jobs, made by
    `Blero.executor`: a drop-in for ThreadPoolExecutor whose work survives
    crashes.  `fn` is a Task (run by its own workers) or a function that
    can be imported by its qualified name (run by this executor's
    `max_workers` workers, and no others).  Calls are resumable, as
    `Task.map`'s are, and released once the executor is shut down with all
    of them ended.

    An executor's calls are its own (their runner, see _TASK_RUNNER): the
    program's n-th executor is "executor <n>", so that the same program run
    again (or another copy of it) takes the calls a run left, and a
    resumed call, matched with a stored job, is the matching executor's."""

    def __init__(self, blero: Blero, max_workers: int = 5):
        if isinstance(max_workers, int) and not isinstance(max_workers, bool) \
                and max_workers <= 0:
            raise ValueError(f"max_workers must be greater than 0, not {max_workers}")
        self._max_workers = _integer("max_workers", max_workers, least=1)
        self._blero = blero
        self._runner = blero._executor_runner(self)
        self._setting_up = threading.Lock()     # held while its workers are set up
        self._lock = threading.Lock()   # guards everything below; held for no I/O
        self._fns: dict[str, Callable] = {}     # the functions its workers run, by name
        self._processor: _Processor | None = None
        # Its calls' job ids (released at the end), and the futures not done
        # yet: a done one is the caller's alone (its result may be big).
        self._ids: list[int] = []
        self._pending: set[JobFuture] = set()
        self._shutdown = False
        self._released = False

    def __repr__(self):
        return f"<blero.Executor max_workers={self._max_workers}>"

    def _target(self, fn, args: tuple) -> tuple[str, dict, tuple, str, Callable]:
        """The job name, options, arguments, runner and function of a call of `fn`."""
        if isinstance(fn, Task):
            return fn.name, fn._options, args, _TASK_RUNNER, fn.fn
        if inspect.ismethod(fn):      # its object travels with the arguments
            fn, args = fn.__func__, (fn.__self__,) + args
        elif inspect.isbuiltin(fn) and _module_of(fn) is None:
            # A builtin bound to an object ("a".upper): its class's method
            # descriptor, called with the object, as a bound method above.
            owner = getattr(fn, "__self__", None)
            unbound = getattr(type(owner), getattr(fn, "__name__", ""), None)
            if getattr(unbound, "__objclass__", None) is not None:
                fn, args = unbound, (owner,) + args
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        name = _importable(fn)
        if _is_async(fn):
            raise TypeError(f"{name} is an async function: make it a task (bl.task) "
                            f"to run its calls on the queue's event loop")
        # One submitter at a time sets the workers up (registering them
        # writes): not under `_lock`, which the workers' callbacks take.
        with self._setting_up:
            with self._lock:
                if self._shutdown:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                known = name in self._fns
                self._fns.setdefault(name, fn)
                p = self._processor
            if p is None:
                p = self._blero._add_processor(self._run, frozenset([name]),
                                               self._max_workers, task_names=[name],
                                               label="executor", runner=self._runner)
                with self._lock:
                    self._processor = p
            elif not known:
                self._blero._retake(p, p.names | {name})
        return name, {}, args, self._runner, fn

    def submit(self, fn, /, *args, **kwargs) -> JobFuture:
        """Run `fn(*args, **kwargs)` as a job; return its future."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fn, args, kwargs = _unwrapped(fn, args, kwargs)
        name, options, args, runner, fn = self._target(fn, args)
        future = self._blero._enqueue_calls(name, [(args, kwargs)], options,
                                            resumable=True, runner=runner, fn=fn)[0]
        self._track([future])
        return future

    def map(self, fn, *iterables, timeout: float | None = None, chunksize: int = 1):
        """`fn` over the iterables, a job per call: an iterator of the
        results in order, as `concurrent.futures.Executor.map`."""
        timeout = _seconds("timeout", timeout, optional=True)
        _integer("chunksize", chunksize, least=1)    # (every call is a job of its own)
        end = None if timeout is None else time.monotonic() + timeout
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        calls = list(zip(*iterables))
        futures = []
        if calls:
            fn, given, kwargs = _unwrapped(fn, (), {})
            name, options, first, runner, fn = self._target(fn, given + calls[0])
            extra = first[:len(first) - len(calls[0])]   # a partial's and a bound method's
            calls = [(extra + args, kwargs) for args in calls]
            futures = self._blero._enqueue_calls(name, calls, options, resumable=True,
                                                 runner=runner, fn=fn)
            self._track(futures)
        return self._results(futures, end)

    @staticmethod
    def _results(futures: list[JobFuture], end: float | None):
        futures.reverse()
        try:
            while futures:
                # (no name holds the future while its result is yielded)
                yield _result_of(futures.pop(), end)
        finally:
            for f in futures:
                f.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls; with `cancel_futures` cancel those not
        started; with `wait`, return once every call has ended.  Once they
        all have, the calls are released and the workers go."""
        with self._lock:
            self._shutdown = True
            futures = list(self._pending)
        if cancel_futures:
            for f in futures:
                f.cancel()
        if wait:
            for f in futures:
                f._settled.wait()
        self._ended_one(None)

    def __exit__(self, exc_type, exc_val, exc_tb):
        # A Ctrl-C (or SystemExit) leaves at once, as it leaves the queue's
        # `with`: the stop hands the running calls back, resumable, rather
        # than this waiting for them to end.
        self.shutdown(wait=exc_type is None or issubclass(exc_type, Exception))
        return False

    def _end_run(self) -> None:
        """The queue stops: release the calls made so far if all have ended."""
        with self._lock:
            if self._pending or self._released or not self._ids:
                return
            ids, self._ids = self._ids, []
        self._blero._release(ids)

    def _track(self, futures: list[JobFuture]) -> None:
        with self._lock:
            self._ids.extend(f.id for f in futures)
            self._pending.update(futures)
        # Not add_done_callback, which takes the future's Condition: see
        # JobFuture._settled.  Set first, then looked at, as _settle does
        # the other way round: one of them sees the other (twice is harmless).
        for f in futures:
            f._then = self._ended_one
            if f._settled.is_set():
                self._ended_one(f)

    def _ended_one(self, future: JobFuture | None) -> None:
        with self._lock:
            self._pending.discard(future)
            if not self._shutdown or self._pending or self._released:
                return
            self._released = True
            ids, self._ids = self._ids, []
            p = self._processor
        self._blero._release(ids)
        if p is not None:
            self._blero._drop_processor(p.id, task_names=p.names)

    def _run(self, job: Job):
        args, kwargs = _call_args(job)
        return self._fns[job.name](*args, **kwargs)


def _result_of(future: JobFuture, end: float | None):
    return future.result(None if end is None else max(0.0, end - time.monotonic()))


# ---------------------------------------------------------------------------
# The metrics server and dashboard
# ---------------------------------------------------------------------------
#
# Plain http.server on a daemon thread.  Every request but GET /metrics must
# name this server in its Host header, by an IP address or by one of the
# machine's own names (so a DNS-rebinding page, which comes with a domain of
# its own, cannot read it), and every POST must also come from a page of this
# very origin (so no other site can make a visitor's browser act on the queue).

def _json_value(value):
    """`value` itself where JSON carries it (so `jq .data.url` works), else its repr."""
    try:
        json.dumps(value, allow_nan=False)  # NaN is no JSON: jq and most parsers refuse it
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    return value


def _job_json(info: JobInfo, shorten: bool = False) -> dict:
    """A JobInfo as JSON, data and result as JSON values where they can be,
    else their repr; for the page (`shorten`), their repr cut short."""
    out = info._asdict()
    for field in ("data", "result"):
        if shorten:
            text = repr(out[field])
            out[field] = text[:297] + "..." if len(text) > 300 else text
        else:
            out[field] = _json_value(out[field])
    out["progress"] = _json_value(info.progress)   # a number stays one: the page draws a bar
    return out


def _schedule_json(info: ScheduleInfo) -> dict:
    """A ScheduleInfo as JSON, its data a JSON value where it can be, else its repr."""
    return info._replace(data=_json_value(info.data))._asdict()


class _DashboardHandler(http.server.BaseHTTPRequestHandler):
    """One request to the metrics server (`self.server` is a `_HTTPServer`)."""

    server_version = "blero/" + __version__

    def log_message(self, format, *args):
        log.debug("http %s " + format, self.address_string(), *args)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        # /metrics holds only counts, and Prometheus scrapes by whatever name
        # it knows the host by; everything else must name this server.
        if url.path != "/metrics" and not self._host_ok():
            return
        query = dict(urllib.parse.parse_qsl(url.query))
        bl = self.server.blero
        try:
            if url.path == "/":
                self._send(200, _DASHBOARD.encode(), "text/html; charset=utf-8")
            elif url.path == "/metrics":
                self._send(200, bl.metrics_text().encode(),
                           "text/plain; version=0.0.4; charset=utf-8")
            elif url.path == "/api/stats":
                self._json(200, self._stats())
            elif url.path == "/api/jobs":
                self._json(200, self._jobs(query))
            elif url.path == "/api/job":
                if "id" not in query:
                    raise ValueError("which job? /api/job?id=N")
                job_id = _job_id("id", _query_int(query, "id", None))
                with bl._store() as storage:
                    row = storage.get(job_id)
                if row is None:
                    self._json(404, {"error": f"no such job: {job_id}"})
                else:
                    self._json(200, _job_json(bl._info(row)))
            else:
                self._json(404, {"error": f"no such page: {url.path}"})
        except (ValueError, TypeError) as exc:
            self._json(400, {"error": str(exc)})
        except BleroError as exc:
            self._json(500, {"error": str(exc)})

    def do_POST(self):
        if not self._host_ok():
            return
        origin = self.headers.get("Origin") or ""
        if urllib.parse.urlsplit(origin).netloc.lower() != self.headers["Host"].lower():
            self._json(403, {"error": "refused: the request does not come from this dashboard"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            path = urllib.parse.urlsplit(self.path).path
            if path == "/api/retry":
                self._json(200, {"retried": self.server.blero.retry_failed(body.get("ids"))})
            elif path == "/api/cancel":
                self._json(200, {"cancelled": self.server.blero.cancel(body["id"])})
            elif path in ("/api/pause", "/api/resume"):
                # {"name": "x"}, or {} / {"name": null} for every name
                bl = self.server.blero
                getattr(bl, path[5:])(body.get("name"))
                self._json(200, {"paused": sorted(bl.paused(),
                                                  key=lambda n: (n is not None, n or ""))})
            else:
                self._json(404, {"error": f"no such action: {path}"})
        except (ValueError, TypeError, KeyError) as exc:
            self._json(400, {"error": f"bad request: {exc}"})
        except BleroError as exc:
            self._json(500, {"error": str(exc)})

    def _host_ok(self) -> bool:
        """The Host header names this server: by an IP address, or by one of
        its own names (a DNS-rebinding page comes with a name of its own)."""
        url = urllib.parse.urlsplit("//" + self.headers.get("Host", ""))
        try:
            port = url.port
        except ValueError:
            port = None
        name = (url.hostname or "").lower()
        if port == self.server.server_address[1] and (
                name in self.server.names or _is_ip(name)):
            return True
        self._json(421, {"error": "refused: the Host header does not name this server"})
        return False

    def _stats(self) -> dict:
        """The overview: all of it read from the stored queue in one opening,
        none of it from this process's counters (which know only its own
        work), so any process serving a queue shows the same."""
        bl = self.server.blero
        d = bl._dispatcher
        now = time.time()
        step, span = 10, 300
        start = (now - span) // step * step
        with bl._store() as storage:
            rows = {"inprogress": storage.list("inprogress", None, 50),
                    "pending": storage.pending_in_run_order(20),
                    "completions": storage.list("complete", None, 10, newest_first=True),
                    "failures": storage.list("failed", None, 20, newest_first=True)}
            ended = {(at, state): n for at, state, n in storage.finished_since(start, step)}
            counts, read_only = storage.counts(), storage.read_only is not None
            schedules = storage.schedules()
            paused, limits = storage.paused(), storage.limits()
            by_name = storage.running_by_name() if limits else {}
            owners = [o for o in storage.owners() if o.heartbeat_at is not None
                      and storage.alive(o, bl._settings.lease, now)]
            by_owner = storage.running_by_owner()
            untaken = self.server.untaken.look(storage.untaken, bl._settings.lease)
        steps = [start + i * step for i in range(span // step + 1)]
        out = {"queue": {"path": bl._where, "read_only": read_only},
               # who answers: a process that may or may not run the queue itself
               "served_by": {"pid": os.getpid(), "running": d is not None,
                             "processors": len(bl._processors)},
               "time": now, "counts": counts,
               # jobs that ended in each `step` seconds of the last 5 minutes,
               # oldest first; the last step is still under way
               "throughput": {"step": step, "start": start,
                              "complete": [ended.get((at, "complete"), 0) for at in steps],
                              "failed": [ended.get((at, "failed"), 0) for at in steps]},
               # every live process running the queue, as it told of itself
               "owners": [{"id": o.id, "serving": d is not None and o.id == d.owner,
                           "host": o.host, "pid": o.pid, "started_at": o.started_at,
                           "last_seen": o.heartbeat_at, "running": by_owner.get(o.id, 0),
                           "processors": None if o.processors is None else [
                               p._asdict() for p in o.processors]}
                          for o in sorted(owners, key=lambda o: o.started_at)],
               # pending jobs, by name, that no live process takes
               "untaken": untaken}
        out["schedules"] = [_schedule_json(info) for info in bl._schedule_infos(schedules)]
        # Pauses: the names paused, sorted, null first for "everything";
        # limits: each with how many of its jobs are in progress now.
        out["paused"] = sorted(paused, key=lambda n: (n is not None, n or ""))
        out["limits"] = {name: {"concurrency": concurrency,
                                "rate": None if rate is None else list(rate),
                                "running": by_name.get(name, 0)}
                         for name, (concurrency, rate) in limits.items()}
        for part, found in rows.items():
            out[part] = [_job_json(bl._info(r), shorten=True) for r in found]
        return out

    def _jobs(self, query: dict) -> list:
        """`/api/jobs`: a page of jobs by id, filtered by `state` and `name`;
        `order=desc` for the newest first; `after=ID` for the page after the
        one that ended with that id, `limit` (default 100, at most 1000) long."""
        bl = self.server.blero
        state, name = query.get("state") or None, query.get("name") or None
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, not {state!r}")
        order = query.get("order", "asc")
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, not {order!r}")
        limit = _integer("limit", _query_int(query, "limit", 100), most=1000)
        after = _query_int(query, "after", None)
        if after is not None:
            _integer("after", after)
        with bl._store() as storage:
            rows = storage.list(state, name, limit, order == "desc", after)
        return [_job_json(bl._info(r), shorten=True) for r in rows]

    def _json(self, code: int, obj) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
        self.end_headers()
        self.wfile.write(body)


def _query_int(query: dict, name: str, default):
    """The integer a query parameter gives, or `default` where it is absent."""
    if name not in query:
        return default
    try:
        return int(query[name])
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {query[name]!r}") from None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _HTTPServer(http.server.ThreadingHTTPServer):
    """The server, with what its handlers need: the queue, and its own names."""

    daemon_threads = True

    def __init__(self, blero: Blero, host: str, port: int):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _DashboardHandler)
        self.blero = blero
        named = f"[{host}]" if ":" in host else host
        self.url = f"http://{named}:{self.server_address[1]}/"
        # the names a Host header may give this server by (besides IP addresses)
        self.names = frozenset(n.lower() for n in (
            host, "localhost", socket.gethostname(), socket.getfqdn()))
        self.untaken = _Sparingly()     # storage.untaken, as join() looks at it

    def handle_error(self, request, client_address):
        # a client that hangs up early is its own business: never print
        log.debug("http request from %s failed", client_address, exc_info=True)


class _MetricsServer:
    """What `serve_metrics` returns: the server's `.port`, `.url` and `.close()`."""

    def __init__(self, blero: Blero, host: str, port: int):
        try:
            self._httpd = _HTTPServer(blero, host, port)
        except OSError as exc:
            raise BleroError(f"cannot serve metrics on {host}:{port}: "
                             f"{exc.strerror or exc}") from exc
        self.host = host
        self.port = self._httpd.server_address[1]
        self.url = self._httpd.url
        self._closed = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="blero-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (a second close does nothing)."""
        if not self._closed:
            self._closed = True
            self._httpd.shutdown()
            self._httpd.server_close()


_DASHBOARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>blero dashboard</title>
<style>
:root{--bg:#f3f5f8;--card:#fff;--ink:#1d2633;--muted:#667085;--line:#e6e9ef;
--pending:#7c8aa0;--inprogress:#2f6fdb;--complete:#1f9d55;--failed:#d93f3f;--cancelled:#b7791f}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:var(--bg);color:var(--ink)}
a{color:var(--inprogress);text-decoration:none} a:hover{text-decoration:underline}
header{background:#1b2533;color:#fff;padding:10px 20px;display:flex;flex-wrap:wrap;gap:6px 16px;align-items:center}
header h1{font-size:18px;margin:0;letter-spacing:.5px} header h1 a{color:#fff}
#target{font:13px ui-monospace,Menlo,Consolas,monospace;opacity:.9;word-break:break-all}
#updated{margin-left:auto;font-size:12px;opacity:.75;white-space:nowrap}
.badge{display:inline-block;font-size:12px;padding:1px 8px;border-radius:10px;background:#ffffff22;white-space:nowrap}
.badge.warn{background:#f5b94a;color:#3a2600}
#msg:empty{display:none} #msg{background:#fde8e8;color:#8a1c1c;padding:8px 20px;border-bottom:1px solid #f5c2c2}
.note{background:#fff4dc;color:#5c3c00;border-radius:8px;padding:8px 14px;box-shadow:0 0 0 1px #f0d9a8}
.procs{margin:0;padding:0;list-style:none} .procs li{white-space:nowrap}
.procs code,.names code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#f1f3f6;border-radius:3px;padding:0 4px}
.x{color:var(--muted)}
main{padding:16px 20px;max-width:1280px;margin:0 auto;display:grid;gap:16px}
.cards{display:grid;grid-template-columns:repeat(5,1fr);gap:12px}
.card{background:var(--card);border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px #0001,0 0 0 1px #0000000a;
border-top:3px solid var(--c);cursor:pointer;color:var(--ink)}
.card b{display:block;font-size:26px;line-height:1.2;font-variant-numeric:tabular-nums}
.card span{color:var(--muted)}
section{background:var(--card);border-radius:8px;padding:12px 16px;box-shadow:0 1px 2px #0001,0 0 0 1px #0000000a;min-width:0}
h2{font-size:15px;margin:0 0 8px;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
h2 small{font-weight:normal;color:var(--muted)} h2 button{margin-left:auto}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px;align-items:start}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:baseline}
th{font-size:12px;font-weight:600;color:var(--muted);white-space:nowrap}
tr.has-detail td{border-bottom:0} tr.detail td{padding-top:0}
td.num{font-variant-numeric:tabular-nums;white-space:nowrap} td.none{color:var(--muted);font-style:italic}
td.val{max-width:18em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;font:12px ui-monospace,Menlo,Consolas,monospace}
pre{margin:0;max-height:9em;overflow:auto;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;
word-break:break-word;background:#f7f8fa;border-radius:4px;padding:4px 6px}
button{cursor:pointer;font:inherit;font-size:12px;padding:2px 10px;border-radius:5px;border:1px solid #c9cfd8;background:#fff;color:var(--ink)}
button:hover:not(:disabled){background:#eef2f7} button:disabled{cursor:default;opacity:.45}
button.retry,#retry-all{border-color:#9cc3f5;color:#1c4f9c}
button.cancel{border-color:#f0b4b4;color:#9b2020}
.state{font-size:12px;padding:0 7px;border-radius:9px;color:#fff;background:var(--c);white-space:nowrap}
.bar{display:inline-block;width:90px;height:8px;border-radius:4px;background:var(--line);vertical-align:middle;overflow:hidden}
.bar i{display:block;height:100%;background:var(--inprogress)}
.legend{display:flex;gap:16px;flex-wrap:wrap;color:var(--muted);font-size:13px}
.legend b{color:var(--ink);font-variant-numeric:tabular-nums}
.key{display:inline-block;width:12px;height:3px;border-radius:2px;vertical-align:middle;margin-right:5px;background:var(--c)}
#chart{display:block;width:100%;height:190px;margin-top:6px}
#chart text{font-size:11px;fill:var(--muted)} #chart .grid-line{stroke:var(--line)} #chart .axis{stroke:#9aa4b2}
form.filter{display:flex;gap:8px 14px;flex-wrap:wrap;align-items:center;margin-bottom:8px;color:var(--muted)}
input,select{font:inherit;padding:3px 6px;border:1px solid #c9cfd8;border-radius:5px;background:#fff}
.pager{display:flex;gap:10px;align-items:center;justify-content:flex-end;margin-top:8px;color:var(--muted)}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0 0 12px}
dt{color:var(--muted)} dd{margin:0;font-variant-numeric:tabular-nums;word-break:break-word}
h3{font-size:13px;margin:14px 0 4px;color:var(--muted)}
.job pre{max-height:none} .err{font-weight:600;color:#9b2020;margin-bottom:3px;word-break:break-word}
[hidden]{display:none!important}
@media (max-width:900px){.grid{grid-template-columns:1fr}}
@media (max-width:640px){
 header{padding:8px 12px} main{padding:10px;gap:10px} section{padding:10px}
 .cards{gap:6px} .card{padding:5px 7px} .card b{font-size:19px} .card span{font-size:11px;display:block;line-height:1.2}
 .wide{display:none} td.val{max-width:9em} .procs li{white-space:normal}
 td,th{padding:5px 5px} th{white-space:normal} .bar{width:48px} td.num{white-space:normal} #chart{height:160px}}
</style></head><body>
<header><h1><a href="#">blero</a></h1><span id="target"></span><span id="badges"></span>
<span id="updated"></span></header>
<div id="msg" role="alert"></div>
<main id="overview">
<div class="note" id="untaken" hidden></div>
<div class="cards" id="counts"></div>
<section><h2>Processes <small id="n-owners"></small></h2><div class="scroll"><table id="owners"></table></div></section>
<section><h2>Throughput <small>jobs per second, last 5 minutes, from the stored jobs</small></h2>
<div class="legend" id="rates"></div><svg id="chart" role="img" aria-label="jobs per second"></svg></section>
<section><h2>Running <small id="n-inprogress"></small></h2><div class="scroll"><table id="inprogress"></table></div></section>
<div class="grid">
<section><h2>Pending <small>in the order they may run</small></h2><div class="scroll"><table id="pending"></table></div></section>
<section><h2>Recently completed</h2><div class="scroll"><table id="completions"></table></div></section>
</div>
<section id="schedules-box" hidden><h2>Schedules <small>by when they run next</small></h2>
<div class="scroll"><table id="schedules"></table></div></section>
<section id="flow-box" hidden><h2>Pauses and limits <small id="all-paused"></small>
<button type="button" id="pause-all">Pause everything</button></h2>
<div class="scroll"><table id="flow"></table></div>
<form class="filter" id="pause-form"><label>jobs named <input id="p-name" size="14" required></label>
<button type="submit" id="pause-one">Pause</button></form></section>
<section><h2>Failures <small>newest first</small><button id="retry-all">Retry all failed</button></h2>
<div class="scroll"><table id="failures"></table></div></section>
<section id="browse"><h2>Jobs <small>newest first</small></h2>
<form class="filter" id="filter"><label>name <input id="f-name" size="14" placeholder="any"></label>
<label>state <select id="f-state"><option value="">any</option></select></label></form>
<div class="scroll"><table id="jobs"></table></div>
<div class="pager"><button type="button" id="newer">&larr; Newer</button><span id="page-no"></span>
<button type="button" id="older">Older &rarr;</button></div></section>
</main>
<main id="jobpage" hidden><section class="job" id="job"></section></main>
<script>
"use strict";
const STATES = ["pending", "inprogress", "complete", "failed", "cancelled"];
const LABEL = {pending: "pending", inprogress: "in progress", complete: "complete",
               failed: "failed", cancelled: "cancelled"};
const PAGE = 25;
let last = null;                 // the latest /api/stats
const browse = {name: "", state: "", pages: [null], rows: []};   // pages: the cursor of each page

function $(id) { return document.getElementById(id); }
function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  return e;
}
function show(text) { $("msg").textContent = text || ""; }
function getJSON(path) {
  return fetch(path).then(r => r.json().then(j => {
    if (!r.ok) throw new Error(j.error || r.statusText); return j; }));
}
function post(path, body) {
  return fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                      body: JSON.stringify(body)})
    .then(r => r.json()).then(j => { show(j.error); refresh(); })
    .catch(e => show(String(e)));
}
// A time, with its date when it is not today.
function when(t) {
  if (t === null || t === undefined) return "";
  const d = new Date(t * 1000), now = new Date();
  const time = d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23"});
  if (d.toDateString() === now.toDateString()) return time;
  return d.toLocaleDateString([], {year: d.getFullYear() === now.getFullYear() ? undefined : "numeric",
                                   month: "short", day: "numeric"}) + " " + time;
}
function span(seconds) {
  const s = Math.abs(seconds);
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  // one decimal at most, and none when it is 0: "1 h", "1.5 h", "2 days"
  const short = (v, digits) => v.toFixed(digits).replace(/[.]0$/, "");
  if (s < 86400) return short(s / 3600, s < 36000 ? 1 : 0) + " h";
  const days = s / 86400;
  return short(days, 1) + (short(days, 1) === "1" ? " day" : " days");
}
function runs(j, now) { return j.run_at <= now ? "now" : when(j.run_at) + " (in " + span(j.run_at - now) + ")"; }
function stateTag(s) { return el("span", LABEL[s] || s, {"class": "state", style: "--c:var(--" + s + ")"}); }
function jobLink(id) { return el("a", "#" + id, {href: "#job/" + id}); }
function progress(p) {
  // JobInfo.progress: a number from 0 to 1 shows as a bar, any other value as itself
  if (typeof p === "number" && p >= 0 && p <= 1) {
    const bar = el("span", undefined, {"class": "bar", title: Math.round(p * 100) + "%"});
    bar.appendChild(el("i", undefined, {style: "width:" + (p * 100).toFixed(1) + "%"}));
    const box = el("span", undefined, {style: "white-space:nowrap"});
    box.append(bar, " " + Math.round(p * 100) + "%"); return box;
  }
  return p === null || p === undefined ? "" : (typeof p === "string" ? p : JSON.stringify(p));
}
function readOnly() { return last !== null && last.queue.read_only; }
function button(label, cls, act) {
  const b = el("button", label, {"class": cls, type: "button"});
  if (readOnly()) { b.disabled = true; b.title = "the queue is read-only here"; }
  b.onclick = act; return b;
}
const retry = j => button("Retry", "retry", () => post("/api/retry", {ids: [j.id]}));
const cancel = j => button("Cancel", "cancel", () => post("/api/cancel", {id: j.id}));

// columns: [heading, value(job) -> text or node, class]; the class "wide" is hidden on a phone.
// detail(job): a node shown in a row of its own under the job's, the whole width of the table.
function table(id, jobs, columns, action, empty, detail) {
  const t = $(id);
  t.replaceChildren();
  const head = el("tr");
  for (const c of columns) head.appendChild(el("th", c[0], c[2] ? {"class": c[2]} : {}));
  if (action) head.appendChild(el("th", ""));
  t.appendChild(head);
  for (const j of jobs) {
    const row = el("tr", undefined, {"data-id": j.id});
    for (const c of columns) {
      const td = el("td", undefined, c[2] ? {"class": c[2]} : {}), v = c[1](j);
      if (v instanceof Node) td.appendChild(v); else td.textContent = v;
      if (c[2] && c[2].includes("val")) td.title = td.textContent;
      row.appendChild(td);
    }
    if (action) { const td = el("td"); td.appendChild(action(j)); row.appendChild(td); }
    t.appendChild(row);
    if (detail) {
      row.className = "has-detail";
      const td = el("td", undefined, {colspan: columns.length + (action ? 1 : 0)});
      td.appendChild(detail(j));
      t.appendChild(el("tr", undefined, {"class": "detail"})).appendChild(td);
    }
  }
  if (!jobs.length) {
    const td = el("td", empty || "none", {"class": "none", colspan: columns.length + (action ? 1 : 0)});
    t.appendChild(el("tr")).appendChild(td);
  }
}
const ID = ["id", j => jobLink(j.id), "num"], NAME = ["name", j => j.name];
const DATA = ["data", j => j.data, "val wide"];

function header(s) {
  $("target").textContent = s.queue.path;
  const badges = $("badges");
  badges.replaceChildren();
  if (s.queue.read_only) badges.appendChild(el("span", "read-only: viewing only", {"class": "badge warn"}));
  // This process is only the one answering: say what it does, never as the queue's.
  const by = s.served_by;
  badges.appendChild(el("span", by.running ? "served by pid " + by.pid + ", running " + by.processors +
      " processor" + (by.processors === 1 ? "" : "s") : "served by pid " + by.pid + ", which runs no jobs",
      {"class": "badge", id: "served-by"}));
  $("updated").textContent = "updated " + when(s.time);
}
function counts(s) {
  const box = $("counts");
  box.replaceChildren();
  for (const k of STATES) {
    const c = el("div", undefined, {"class": "card", style: "--c:var(--" + k + ")",
                                    title: "list the " + LABEL[k] + " jobs", id: "count-" + k});
    c.appendChild(el("b", String(s.counts[k]))); c.appendChild(el("span", LABEL[k]));
    c.onclick = () => { $("f-state").value = k; filter(); $("browse").scrollIntoView(); };
    box.appendChild(c);
  }
}
function niceTop(v) {
  // the smallest 1, 2 or 5 times a power of ten at or above v
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  return [1, 2, 5, 10].map(m => m * p).find(x => x >= v - 1e-9);
}
function chart(s) {
  const t = s.throughput, svg = $("chart"), ns = "http://www.w3.org/2000/svg";
  // the last step is still under way: its rate is over the part gone by
  const now = Math.max(1, s.time - (t.start + (t.complete.length - 1) * t.step));
  const rate = series => series.map((n, i) => n / (i < series.length - 1 ? t.step : now));
  const done = rate(t.complete), failed = rate(t.failed);
  // over the last minute: the six steps before this one, and this one so far
  const minute = series => series.slice(-7).reduce((a, b) => a + b, 0) / (6 * t.step + now);
  const legend = $("rates");
  legend.replaceChildren(el("span", "last minute:"));
  for (const [k, series] of [["complete", t.complete], ["failed", t.failed]]) {
    const item = el("span"); item.appendChild(el("span", undefined, {"class": "key", style: "--c:var(--" + k + ")"}));
    item.append(k + " ");
    item.appendChild(el("b", minute(series).toFixed(2) + "/s", {id: "rate-" + k}));
    legend.appendChild(item);
  }
  const W = svg.clientWidth || 600, H = svg.clientHeight || 190, L = 44, R = 12, T = 24, B = 24;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.replaceChildren();
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e); return e;
  };
  const top = niceTop(Math.max(0.1, ...done, ...failed));
  const x = i => L + i * (W - L - R) / (done.length - 1), y = v => H - B - v / top * (H - T - B);
  for (let k = 0; k <= 4; k++) {
    const v = top * k / 4;
    add("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), "class": k ? "grid-line" : "axis"});
    add("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, +v.toFixed(3) + "");
  }
  add("text", {x: 2, y: 10, "text-anchor": "start"}, "jobs/s");
  add("line", {x1: L, x2: L, y1: T, y2: H - B, "class": "axis"});
  const every = W < 560 ? 120 : 60;                    // a label each minute, or two on a phone
  for (let i = 0; i < done.length; i++) {
    const at = t.start + i * t.step;
    if (at % every) continue;
    add("line", {x1: x(i), x2: x(i), y1: H - B, y2: H - B + 4, "class": "axis"});
    add("text", {x: x(i), y: H - 6, "text-anchor": x(i) > W - R - 20 ? "end" : "middle"},
        new Date(at * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", hourCycle: "h23"}));
  }
  for (const [k, series] of [["complete", done], ["failed", failed]])
    add("polyline", {fill: "none", stroke: "var(--" + k + ")", "stroke-width": 2, "stroke-linejoin": "round",
                     points: series.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ")});
}
function running(s) {
  $("n-inprogress").textContent = s.counts.inprogress > s.inprogress.length
    ? "the first " + s.inprogress.length + " of " + s.counts.inprogress : "";
  const columns = [ID, NAME, DATA, ["try", j => j.attempt + "/" + j.max_attempts, "num wide"],
                   ["since", j => when(j.started_at), "num"]];
  if (s.inprogress.some(j => "progress" in j)) columns.push(["progress", j => progress(j.progress)]);
  table("inprogress", s.inprogress, columns, cancel);
}
function pending(s) {
  table("pending", s.pending, [ID, NAME, DATA, ["priority", j => j.priority, "num wide"],
        ["runs", j => runs(j, s.time), "num"]], cancel);
}
// the exception's own line, where the eye looks; the traceback in a row under it
function error(j) {
  const lines = (j.error || "").trim().split(String.fromCharCode(10));
  return el("div", lines[lines.length - 1], {"class": "err"});
}
// A list of job names, or "any name".
function names(list) {
  const box = el("span", undefined, {"class": "names"});
  if (list === null) { box.appendChild(el("span", "any name", {"class": "x"})); return box; }
  list.forEach((n, i) => { if (i) box.append(" "); box.appendChild(el("code", n)); });
  return box;
}
function processors(o) {
  if (o.processors === null) return el("span", "not told (an older blero.py)", {"class": "x"});
  if (!o.processors.length) return el("span", "none", {"class": "x"});
  const ul = el("ul", undefined, {"class": "procs"});
  for (const p of o.processors) {
    const li = el("li"); li.appendChild(el("code", p.name));
    li.append(" " + String.fromCharCode(215) + p.concurrency + " ");
    li.appendChild(el("span", "takes ", {"class": "x"})); li.appendChild(names(p.names));
    ul.appendChild(li);
  }
  return ul;
}
function owners(s) {
  $("n-owners").textContent = s.owners.length ? s.owners.length + " live, running the queue"
                                              : "no process is running the queue now";
  const here = o => o.serving ? " (serving this page)" : "";
  table("owners", s.owners, [["host", o => o.host === null ? "?" : o.host], ["pid", o => o.pid + here(o), "num"],
        ["processors", processors], ["running", o => o.running, "num"],
        ["started", o => when(o.started_at), "num wide"], ["last seen", o => when(o.last_seen), "num wide"]],
        null, "none");
}
function schedules(s) {
  $("schedules-box").hidden = !("schedules" in s);
  if (!("schedules" in s)) return;
  const sorted = s.schedules.slice().sort((a, b) => a.next_due - b.next_due);
  table("schedules", sorted, [["key", j => j.key], NAME,
        ["runs", j => j.cron !== null ? j.cron + (j.tz ? " (" + j.tz + ")" : "") : "every " + span(j.interval)],
        ["next", j => runs({run_at: j.next_due}, s.time), "num"],
        ["last run", j => j.job_id === null ? "none yet" : jobLink(j.job_id), "num wide"]], null, "no schedules");
}
// Pauses and limits, by job name; null in s.paused: everything is paused.
function flow(s) {
  const shown = "paused" in s || "limits" in s;
  $("flow-box").hidden = !shown;
  if (!shown) return;
  const paused = s.paused || [], limits = s.limits || {}, all = paused.includes(null);
  const names = [...new Set([...paused.filter(n => n !== null), ...Object.keys(limits)])].sort();
  const rows = names.map(n => ({id: n, name: n, paused: paused.includes(n), limit: limits[n] || {}}));
  $("all-paused").textContent = all ? "everything is paused" : "";
  const whole = $("pause-all");
  whole.textContent = all ? "Resume everything" : "Pause everything";
  whole.disabled = readOnly() || !("paused" in s);
  whole.onclick = () => post(all ? "/api/resume" : "/api/pause", {name: null});
  $("pause-one").disabled = readOnly() || !("paused" in s);
  const toggle = r => r.paused ? button("Resume", "retry", () => post("/api/resume", {name: r.name}))
                               : button("Pause", "cancel", () => post("/api/pause", {name: r.name}));
  table("flow", rows, [NAME, ["state", r => r.paused ? "paused" : ""],
        ["in progress", r => r.limit.running == null ? "" : r.limit.running, "num wide"],
        ["max at once", r => r.limit.concurrency == null ? "" : r.limit.concurrency, "num"],
        ["max rate", r => r.limit.rate == null ? "" : r.limit.rate[0] + " per " + span(r.limit.rate[1]), "num"]],
        "paused" in s ? toggle : null, "no job name is paused or limited");
}
function untaken(s) {
  const box = $("untaken"), found = Object.keys(s.untaken).sort();
  box.hidden = !found.length;
  box.textContent = "jobs waiting for a processor: " + found.map(n => n + " (" + s.untaken[n] + ")").join(", ");
  box.title = "no live process takes jobs of these names: a typo in a name, or a worker that is not running";
}
function failures(s) {
  $("retry-all").disabled = readOnly() || !s.counts.failed;
  table("failures", s.failures, [ID, NAME, ["tries", j => j.attempt, "num wide"],
        ["failed", j => when(j.finished_at), "num"], ["error", error]], retry, undefined,
        j => el("pre", j.error || ""));
}
function completions(s) {
  table("completions", s.completions, [ID, NAME, ["result", j => j.result, "val"],
        ["took", j => j.started_at ? span(j.finished_at - j.started_at) : "", "num wide"],
        ["finished", j => when(j.finished_at), "num"]]);
}
// The overview, one renderer per section; a section whose part /api/stats
// does not give stays hidden.
const SECTIONS = [header, untaken, counts, owners, chart, running, pending, failures, completions,
                  schedules, flow];

function jobs() {
  const q = new URLSearchParams({order: "desc", limit: PAGE});
  if (browse.name) q.set("name", browse.name);
  if (browse.state) q.set("state", browse.state);
  const cursor = browse.pages[browse.pages.length - 1];
  if (cursor !== null) q.set("after", cursor);
  return getJSON("/api/jobs?" + q).then(rows => {
    browse.rows = rows;
    table("jobs", rows, [ID, NAME, ["state", j => stateTag(j.state)], DATA,
          ["tries", j => j.attempt + "/" + j.max_attempts, "num wide"], ["created", j => when(j.created_at), "num wide"],
          ["ended", j => when(j.finished_at), "num"]], null, "no jobs match");
    $("newer").disabled = browse.pages.length === 1;
    $("older").disabled = rows.length < PAGE;
    $("page-no").textContent = "page " + browse.pages.length;
  });
}
function filter() {
  browse.name = $("f-name").value.trim(); browse.state = $("f-state").value; browse.pages = [null];
  jobs().catch(e => show(String(e)));
}

const FIELDS = [["state", j => stateTag(j.state)], ["name", j => j.name],
  ["tries", j => j.attempt + " of at most " + j.max_attempts], ["priority", j => j.priority],
  ["key", j => j.key === null ? "none" : j.key], ["created", j => when(j.created_at)],
  ["may run", j => j.state === "pending" ? runs(j, last ? last.time : Date.now() / 1000) : when(j.run_at)],
  ["started", j => when(j.started_at) || "not yet"], ["ended", j => when(j.finished_at) || "not yet"]];
const SHOWN = ["id", "data", "result", "error", "state", "name", "attempt", "max_attempts", "priority", "key",
               "created_at", "run_at", "started_at", "finished_at", "progress", "after"];
function text(v) { return typeof v === "string" ? v : JSON.stringify(v, null, 2); }
function jobPage(j) {
  const box = $("job");
  box.replaceChildren();
  const h = el("h2", "Job #" + j.id + " ");
  h.appendChild(el("small", j.name));
  if (j.state === "failed") h.appendChild(retry(j));
  if (j.state === "pending" || j.state === "inprogress") h.appendChild(cancel(j));
  box.appendChild(el("a", String.fromCharCode(8592) + " the whole queue", {href: "#"}));
  box.appendChild(h);
  const dl = el("dl");
  const rows = FIELDS.slice();
  if ("progress" in j) rows.push(["progress", j => progress(j.progress)]);
  if ("after" in j) rows.push(["waits on", j => {
    const s = el("span"); if (!j.after || !j.after.length) s.textContent = "nothing";
    (j.after || []).forEach((id, i) => { if (i) s.append(", "); s.appendChild(jobLink(id)); }); return s; }]);
  for (const k in j) if (!SHOWN.includes(k)) rows.push([k, j => text(j[k])]);   // fields added later
  for (const [label, f] of rows) {
    dl.appendChild(el("dt", label)); const dd = el("dd"), v = f(j);
    if (v instanceof Node) dd.appendChild(v); else dd.textContent = v;
    dl.appendChild(dd);
  }
  box.appendChild(dl);
  for (const [label, k] of [["Data", "data"], ["Result", "result"], ["Error", "error"]]) {
    if (k === "error" && !j.error) continue;
    box.appendChild(el("h3", label)); box.appendChild(el("pre", text(j[k]), {id: "job-" + k}));
  }
}
function route() {
  const m = /^#job[/]([0-9]+)$/.exec(location.hash);
  $("overview").hidden = !!m; $("jobpage").hidden = !m;
  return m ? +m[1] : null;
}
function refresh() {
  const id = route();
  const stats = getJSON("/api/stats").then(s => {
    last = s; for (const f of (id === null ? SECTIONS : [header])) f(s);
  });
  const more = id === null ? jobs() : getJSON("/api/job?id=" + id).then(jobPage);
  return Promise.all([stats, more]).then(() => show(""), e => show(String(e.message || e)));
}
for (const s of STATES) $("f-state").appendChild(el("option", LABEL[s], {value: s}));
$("filter").onsubmit = e => { e.preventDefault(); filter(); };
$("f-name").oninput = filter; $("f-state").onchange = filter;
$("older").onclick = () => { browse.pages.push(browse.rows[browse.rows.length - 1].id); jobs(); };
$("newer").onclick = () => { browse.pages.pop(); jobs(); };
$("retry-all").onclick = () => post("/api/retry", {});
$("pause-form").onsubmit = e => {
  e.preventDefault(); const name = $("p-name").value.trim();
  if (name) post("/api/pause", {name: name}).then(() => { $("p-name").value = ""; });
};
window.onhashchange = () => { window.scrollTo(0, 0); refresh(); };
window.onresize = () => { if (last && route() === null) chart(last); };
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""


# ---------------------------------------------------------------------------
# The command line: python -m blero ...
# ---------------------------------------------------------------------------

_SERIALIZERS = {"pickle": pickle, "json": json}


def _cli_queue(args, **settings) -> Blero:
    """The queue a command names, read with the serializer it names (with
    json, nothing in the file is ever unpickled)."""
    if args.schema is not None:
        settings["schema"] = args.schema
    return Blero(args.db, serializer=_SERIALIZERS[args.serializer], **settings)


class _DemoOutput:
    """Whole lines to stdout; on a terminal, a progress line kept below them.

    The cursor rests at the start of the line under the progress line, so
    what the terminal echoes there (the ^C of a Ctrl-C) is on a line of its
    own; each redraw goes up one line to the progress line."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()
        self._tty = stream.isatty()
        self._bar = ""      # the progress line on the screen, above the cursor
        self._ended = False
        self.total = self.done = self._done_before = 0
        self._started = time.monotonic()

    def line(self, text: str) -> None:
        with self._lock:
            self._write(("\x1b[A\r\x1b[K" + text + "\n\x1b[K" + self._bar + "\n")
                        if self._tty and self._bar else text + "\n")

    def _write(self, text: str) -> None:
        """Write and flush; the lock is held.  A reader gone away (| head) is
        no reason for the demo's jobs to fail: the rest goes unprinted."""
        try:
            self._stream.write(text)
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self._tty = False
            self._stream = open(os.devnull, "w")

    def begin(self, counts: dict) -> None:
        """Count from `counts`, taken before any processor could end a job."""
        self.total = sum(counts.values())
        self.done = self._done_before = counts["complete"] + counts["failed"] + counts["cancelled"]
        self._started = time.monotonic()

    def added(self, n: int) -> None:
        with self._lock:
            self.total += n

    def finished(self, job=None, value=None) -> None:
        with self._lock:
            self.done += 1
        self.progress()

    def progress(self) -> None:
        with self._lock:
            if not self._tty or not self.total or self._ended:
                return
            done, total = self.done, self.total
            rate = (done - self._done_before) / max(1e-9, time.monotonic() - self._started)
            eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
            filled = int(30 * done / total)
            bar = (f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} jobs"
                   f"  {rate:.2f} jobs/s  ETA {eta}")
            # One screen line, or going up one line would not reach its start
            # (a terminal that does not tell its width says 0).
            width = shutil.get_terminal_size().columns
            if width > 1:
                bar = bar[:width - 1]
            self._write(("\x1b[A\r\x1b[K" if self._bar else "") + bar + "\n")
            self._bar = bar

    def end(self, echoed: bool = False) -> None:
        """Leave the progress line where it is, above the cursor; `echoed`:
        after a Ctrl-C, whose ^C the terminal echoed at the cursor.  A job
        ending late (its callback after a Ctrl-C) draws no progress line again."""
        with self._lock:
            if self._tty and echoed:
                self._write("\n")
            self._bar = ""
            self._ended = True


def _jobs_text(n: int, what: str = "") -> str:
    """Counted jobs: "1 job", "5 interrupted jobs"."""
    return " ".join(filter(None, (str(n), what, "job" if n == 1 else "jobs")))


def _carrying_on(bl: Blero, counts: dict) -> str:
    """What a run on a queue that already has jobs left does first."""
    # Taken back at start(), the jobs a killed run had running are pending
    # again, like those a stopped one handed back: started, not ended.
    interrupted = sum(1 for j in bl.jobs("pending", limit=None) if j.attempt)
    rest = counts["pending"] + counts["inprogress"] - interrupted
    if not interrupted:
        return f"carrying on: {_jobs_text(rest)} left"
    first = _jobs_text(interrupted, "interrupted")
    return f"carrying on: {first} first, {rest} left" if rest else f"carrying on: {first}"


def _nothing_to_do(given: str, path: str, counts: dict) -> str:
    """What a run on a queue whose jobs have all ended says, with the
    command that deletes the queue (its folder, when it holds nothing else)."""
    total = sum(counts.values())
    one = total == 1
    what = "the 1 job" if one else f"all {total} jobs"
    if counts["complete"] == total:
        ended = f"{what} {'is' if one else 'are'} complete"
    else:
        ended = f"{what} {'has' if one else 'have'} ended, " + ", ".join(
            f"{n} {state}" for state, n in counts.items() if n)
    if _is_server(path):    # (dropping the schema starts over: no command to give)
        return f"nothing to do: {ended}"
    base = os.path.basename(path)
    own = {base + suffix for suffix in ("", "-lock", "-wal", "-shm")}
    if os.path.isdir(given) and set(os.listdir(given)) <= own:
        delete = "rm -r " + shlex.quote(given.rstrip(os.sep + (os.altsep or "")) or given)
    else:
        delete = f"rm {shlex.quote(path)} {shlex.quote(path + '-lock')}"
    return f"nothing to do: {ended} ({delete} to start over)"


def _demo(args) -> int:
    out = _DemoOutput(sys.stdout)
    out.line("Starting Blero ...")
    bl = _cli_queue(args, on_complete=out.finished, on_failed=out.finished)
    bl.start()
    # Like Goblero's signal.Notify: Ctrl-C and SIGTERM stop the demo cleanly,
    # even when it was started with SIGINT ignored (as a background job).
    bl.stop_on_signals()

    def processor(k):
        def process(job):
            out.line(f"[Processor {k}] Processing job: {job.name} - data: {job.data}")
            if job.cancelled.wait(min(args.sleep, threading.TIMEOUT_MAX)):
                return      # stopped: the job goes back to pending for the next run
            out.line(f"[Processor {k}] Done Processing job: {job.name}")
        return process

    try:
        counts = bl.stats()     # no processor yet, so no job has ended since start()
        out.begin(counts)
        if out.total and not counts["pending"] + counts["inprogress"]:
            out.line(_nothing_to_do(args.db, bl.path, counts))
        else:
            if out.total:
                out.line(_carrying_on(bl, counts))
            # Every line of these before any job's: on a queue with jobs left,
            # the first processor registered starts one at once.
            for k in range(1, args.n + 1):
                out.line(f"Registering Processor {k} ...")
            if not out.total:
                out.line("Enqueuing jobs ...")
                bl.enqueue_many([(f"Job #{i}", f"Job Data #{i}") for i in range(1, 51)])
                out.added(50)
            out.progress()
            for k in range(1, args.n + 1):
                bl.register_processor(processor(k))
            bl.join()
            out.end()
            out.line("All jobs done.")
        timeout = None
    except KeyboardInterrupt as exc:
        terminated = exc.args == (signal.SIGTERM,)
        out.end(echoed=not terminated)
        out.line(f"Caught signal {'terminated' if terminated else 'interrupt'}. Exiting ...")
        timeout = 0.0
    out.line("Stopping Blero ...")
    bl.stop(timeout)
    return 0


def _print_jobs(jobs: list[JobInfo], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_job_json(j) for j in jobs], indent=1))
        return
    for j in jobs:
        error = (j.error or "").strip().splitlines()[-1:] or [""]
        data = _job_json(j, shorten=True)["data"]
        print(f"{j.id}\t{j.state}\t{j.name}\ttry {j.attempt}/{j.max_attempts}"
              f"\tdata={data}" + (f"\terror={error[0]}" if j.error else ""))


def _print_schedules(schedules: list[ScheduleInfo], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_schedule_json(s) for s in schedules], indent=1))
        return
    for s in schedules:
        when = (f"every {s.interval:g} s" if s.cron is None
                else f"cron {s.cron!r}" + (f" {s.tz}" if s.tz else " (local time)"))
        try:        # a cron schedule's time on its own clock
            zone = _zone(s.tz) if s.cron is not None else None
        except ValueError:      # a zone this machine does not know
            zone = None
        due = datetime.datetime.fromtimestamp(s.next_due, zone).astimezone(zone).isoformat(
            sep=" ", timespec="seconds")
        last = "" if s.job_id is None else f"\tlast run {s.job_id}"
        print(f"{s.key}\t{s.name}\t{when}\tnext {due}{last}")


def _cli_type(parse: Callable[[str], Any], expected: str) -> Callable[[str], Any]:
    """An argparse type: `parse(text)`, through the API's own checks; a
    value they refuse is a usage error (exit 2) saying what was expected."""
    def convert(text: str):
        try:
            return parse(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
    return convert


_cli_seconds = _cli_type(lambda text: _seconds("seconds", float(text)),
                         "a number of seconds, 0 or more")
_cli_port = _cli_type(lambda text: _integer("port", int(text), most=65535),
                      "a port (0 to 65535)")
_cli_job_id = _cli_type(lambda text: _job_id("ID", int(text)), "a job id (1 or more)")
_cli_limit = _cli_type(lambda text: None if text == "all" else _integer("--limit", int(text)),
                       "a number of jobs (0 or more) or all")
_cli_processors = _cli_type(lambda text: _integer("-n", int(text), least=1),
                            "a number of processors (1 or more)")
_cli_name = _cli_type(lambda text: _flow_name(text) or text, "a job name (not empty)")


def _why_not(bl: Blero, job_id: int, wanted: str) -> str:
    """Why an operation on one job did nothing: it does not exist, or its state."""
    info = bl.get_job(job_id)
    if info is None:
        return f"no such job: {job_id}"
    return f"job {job_id} {wanted}: {info.state}"


def _serve(args) -> int:
    bl = _cli_queue(args)
    bl.stats()      # a missing or foreign file fails here, and nothing is created
    # A viewer, not one more worker: the queue is never started here, so
    # serving claims, recovers and changes nothing by itself, and the page
    # shows what is stored (whoever runs it), not this process's idleness.
    server = bl.serve_metrics(port=args.port, host=args.host)

    def terminate(signum, frame):
        raise KeyboardInterrupt(signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        schema = bl._settings.schema or _PG_DEFAULT_SCHEMA
        schema = f" (schema {schema})" if _is_server(bl.path) else ""
        print(f"Serving the dashboard of {bl._where}{schema} at {server.url} (Ctrl-C to stop)",
              flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C while it closes must not end in a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, previous)
        server.close()
    return 0


def _paused_text(paused: set) -> str:
    return ", ".join(["everything"] * (None in paused) + sorted(n for n in paused if n))


def _vacuum(path: str) -> str:
    """`vacuum`: check the file, bring one of an older blero up to date
    (which compacts it) and give its free pages back; say the sizes."""
    if _is_server(path):
        return f"{_masked(path)}: nothing to do: the server's autovacuum gives space back"
    storage = _SQLiteStorage(path)
    real = storage.real
    before = os.path.getsize(real) if os.path.isfile(real) else 0
    storage.open(create=False, check=True)
    try:
        storage.writable()
        storage.compact()
    finally:
        storage.close()
    return f"{path}: {before:,} -> {os.path.getsize(real):,} bytes"


def main(argv: list[str] | None = None) -> int:
    """The command line: `python -m blero --help`."""
    parser = argparse.ArgumentParser(
        prog="python -m blero", description="blero: an embedded, persistent job queue.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="the Goblero demo: 50 jobs, N processors")
    demo.add_argument("-n", type=_cli_processors, default=5,
                      help="number of processors (default 5)")
    demo.add_argument("--db", default="db/", help="queue file or directory (default db/)")
    demo.add_argument("--sleep", type=_cli_seconds, default=2.0,
                      help="seconds each job takes (default 2)")

    def serializer_option(p):
        p.add_argument("--serializer", choices=_SERIALIZERS, default="pickle",
                       help="how the queue's data is written (default pickle); json never "
                            "unpickles anything: the safe way to look at a file you do not trust")
        p.add_argument("--schema", default=None,
                       help="with a postgresql:// --db, the schema of the queue's tables "
                            "(default blero)")

    def queue_command(name, help):
        p = commands.add_parser(name, help=help)
        p.add_argument("--db", required=True, help="the queue file (or its directory), "
                       "or a postgresql:// URL")
        serializer_option(p)
        return p

    serializer_option(demo)

    p = queue_command("stats", "count the jobs in each state")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p = queue_command("jobs", "list jobs by id")
    p.add_argument("--state", choices=STATES, help="only jobs in this state")
    p.add_argument("--name", help="only jobs of this name")
    p.add_argument("--limit", type=_cli_limit, default=100,
                   help="at most N jobs (default 100; all: every one)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p = queue_command("schedules", "list the recurring jobs (every, cron) and when they are due")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p = queue_command("retry", "send failed jobs back to pending")
    p.add_argument("ids", nargs="*", type=_cli_job_id, metavar="ID",
                   help="(default: all failed)")
    p = queue_command("cancel", "cancel pending or running jobs")
    p.add_argument("ids", nargs="+", type=_cli_job_id, metavar="ID")
    p = queue_command("sweep", "delete finished jobs")
    p.add_argument("--older-than", type=_cli_seconds, default=0.0, metavar="SECONDS",
                   help="only jobs that finished at least this long ago (default 0)")
    p.add_argument("--state", action="append", choices=("complete", "failed", "cancelled"),
                   help="state to sweep (repeatable; default complete)")
    for name, what in (("pause", "start no more jobs (of one name, or none at all), in any process"),
                       ("resume", "start jobs again (of one name, or every name)")):
        p = queue_command(name, what)
        p.add_argument("--name", type=_cli_name,
                       help="only jobs of this name (default: every name)")
    queue_command("vacuum", "give the file's free space back (files of older blero too)")
    p = queue_command("serve", "serve the live dashboard and /metrics for a queue file")
    p.add_argument("--port", type=_cli_port, default=0, help="port (default: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "serve":
            return _serve(args)
        bl = _cli_queue(args)
        if args.command == "stats":
            counts = bl.stats()
            print(json.dumps(counts) if args.json
                  else "\n".join(f"{s} {n}" for s, n in counts.items()))
        elif args.command == "jobs":
            _print_jobs(bl.jobs(args.state, args.name, args.limit), args.json)
        elif args.command == "schedules":
            _print_schedules(bl.schedules(), args.json)
        elif args.command == "retry":
            missed = [_why_not(bl, i, "is not failed") for i in args.ids
                      if bl.retry_failed([i]) == 0]
            if not args.ids:
                print(f"{bl.retry_failed()} job(s) sent back to pending")
            else:
                print(f"{len(args.ids) - len(missed)} job(s) sent back to pending")
            for reason in missed:
                print(f"blero: {reason}", file=sys.stderr)
            if missed:
                return 1
        elif args.command == "cancel":
            missed = [_why_not(bl, i, "already ended") for i in args.ids if not bl.cancel(i)]
            print(f"{len(args.ids) - len(missed)} job(s) cancelled")
            for reason in missed:
                print(f"blero: {reason}", file=sys.stderr)
            if missed:
                return 1
        elif args.command == "sweep":
            print(f"{bl.sweep(args.older_than, args.state or ('complete',))} job(s) deleted")
        elif args.command in ("pause", "resume"):
            getattr(bl, args.command)(args.name)
            what = "every job" if args.name is None else f"jobs named {args.name!r}"
            print(f"{what} {args.command}d" + ("" if args.command == "resume" else
                  f" (paused now: {_paused_text(bl.paused())})"))
        elif args.command == "vacuum":
            print(_vacuum(bl.path))
    except BleroError as exc:
        print(f"blero: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
