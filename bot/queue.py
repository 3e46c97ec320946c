"""The job queue: one SQLite file, and the only module in HNaaS that speaks SQL.

A request is a row in ``jobs`` with a status and an attempt count (litequeue's shape)::

    resolving ──set_resolved──▶ queued ──claim──▶ running ──complete──▶ posting ──mark_done──▶ done
        │                         ▲                 │
        │                         └─release/reseed/─┤   (lease expired: requeue_expired)
        └──cancel / fail──▶ cancelled / failed ◀────┘

Claiming is one ``UPDATE … RETURNING`` inside ``BEGIN IMMEDIATE``, so two workers (even in two processes, on two
connections) never get the same job. A claimed job holds a lease; a worker that dies leaves it to expire, and
``requeue_expired`` (run at open and before every claim) puts it back, counting the attempt, or fails it when the job
is out of attempts. Generation retries with a new seed (``reseed``) do not count as attempts.

Every write runs in its own ``BEGIN IMMEDIATE`` transaction under a per-connection lock, because coroutines share one
aiosqlite connection and a transaction must not interleave with another coroutine's statements. All times come from
the injected ``clock`` (seconds, float), so tests drive leases with a fake clock. Methods return frozen dataclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import aiosqlite

from bot.errors import JobNotFound, QueueFull
from bot.moderation import PurgeScope

BUSY_TIMEOUT_MS = 5000  # a second connection waits this long for the write lock instead of failing at once


class JobStatus(str, enum.Enum):
    RESOLVING = "resolving"  # waiting for its title (a link being fetched)
    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # claimed by a worker, under a lease
    POSTING = "posting"  # generated; the publisher is posting it
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


WAITING = (JobStatus.RESOLVING, JobStatus.QUEUED)
UNFINISHED = (JobStatus.RESOLVING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.POSTING)
FINISHED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)

# User-facing messages.
REQUESTER_FULL = "You already have {n} requests waiting; try again when one finishes."
QUEUE_FULL = "The queue is full right now ({n} waiting); please try again in a few minutes."
GAVE_UP = "Generation kept failing ({n} attempts); giving up."
NOT_YOURS = "I can't find a waiting request #{id} of yours to cancel."
ALREADY_STARTED = "Request #{id} has already started, so it can't be cancelled any more."
NO_JOB = "I can't find request #{id}."


# --- schema --------------------------------------------------------------------------------------------------

# MIGRATIONS[i] takes the schema from version i to i + 1 (PRAGMA user_version). Append; never edit a shipped one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            status TEXT NOT NULL,
            platform TEXT NOT NULL,
            channel_id TEXT NOT NULL,
            thread_id TEXT,
            message_id TEXT,
            guild_id TEXT,
            requester_id TEXT NOT NULL,
            input TEXT NOT NULL,
            title TEXT,
            url TEXT,
            note TEXT,
            seed INTEGER NOT NULL,
            temperature REAL NOT NULL,
            top_p REAL NOT NULL,
            top_k INTEGER NOT NULL,
            max_new_tokens INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            generations INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_expires_at REAL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            result TEXT,
            problems TEXT,
            error TEXT,
            thread_ref TEXT,
            purged_at REAL
        )
        """,
        "CREATE INDEX jobs_claim ON jobs (status, id)",
        "CREATE INDEX jobs_lease ON jobs (status, lease_expires_at)",
        "CREATE INDEX jobs_requester ON jobs (requester_id, status)",
        "CREATE INDEX jobs_channel ON jobs (platform, channel_id, created_at)",
        "CREATE INDEX jobs_created ON jobs (created_at)",
        """
        CREATE TABLE posts (
            job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            message_id TEXT NOT NULL,
            thread_ref TEXT,
            created_at REAL NOT NULL,
            UNIQUE (job_id, key)
        )
        """,
        """
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT,
            details TEXT NOT NULL DEFAULT '{}'
        )
        """,
        "CREATE INDEX audit_at ON audit_log (at)",
    ),
    (
        # Small named settings: a channel's link detection, the slash-command signature last uploaded...
        """
        CREATE TABLE options (
            scope TEXT NOT NULL,
            name TEXT NOT NULL,
            value TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (scope, name)
        )
        """,
    ),
    (
        # The model's text so far, up to its last tag, saved before each streamed comment is posted: a job resumed
        # after a crash continues from it instead of generating again (which need not give the same comments).
        "ALTER TABLE jobs ADD COLUMN progress TEXT",
    ),
    (
        # Platform deliveries already handled (Slack redelivers an event it thinks was missed, and sends a mention
        # as two events): the key is claimed once, so the same message never becomes two requests.
        """
        CREATE TABLE deliveries (
            key TEXT PRIMARY KEY,
            at REAL NOT NULL
        )
        """,
        "CREATE INDEX deliveries_at ON deliveries (at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# --- statements ----------------------------------------------------------------------------------------------

CLAIM_DELIVERY = "INSERT OR IGNORE INTO deliveries (key, at) VALUES (?, ?)"
DELETE_OLD_DELIVERIES = "DELETE FROM deliveries WHERE at < ?"
DELIVERY_KEEP_SECONDS = 86_400.0

PRAGMA_BUSY_TIMEOUT = f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"
PRAGMA_WAL = "PRAGMA journal_mode = wal"
PRAGMA_SYNCHRONOUS = "PRAGMA synchronous = normal"  # safe with WAL: a power cut may lose the last commits only
PRAGMA_FOREIGN_KEYS = "PRAGMA foreign_keys = on"
GET_USER_VERSION = "PRAGMA user_version"
GET_JOURNAL_MODE = "PRAGMA journal_mode"
BEGIN = "BEGIN IMMEDIATE"  # take the write lock up front: reads inside the transaction are never stale
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
SET_USER_VERSION = "PRAGMA user_version = {version:d}"  # pragmas take no parameters

INSERT_JOB = """
INSERT INTO jobs (status, platform, channel_id, thread_id, message_id, guild_id, requester_id, input, title, url,
                  note, seed, temperature, top_p, top_k, max_new_tokens, max_attempts, created_at, updated_at)
VALUES (:status, :platform, :channel_id, :thread_id, :message_id, :guild_id, :requester_id, :input, :title, :url,
        :note, :seed, :temperature, :top_p, :top_k, :max_new_tokens, :max_attempts, :now, :now)
RETURNING *
"""
COUNT_UNFINISHED = "SELECT count(*) FROM jobs WHERE status IN ('resolving', 'queued', 'running', 'posting')"
COUNT_UNFINISHED_BY_REQUESTER = COUNT_UNFINISHED + " AND requester_id = ?"
SELECT_JOB = "SELECT * FROM jobs WHERE id = ?"
SET_RESOLVED = """
UPDATE jobs SET status = 'queued', title = ?, url = ?, note = ?, updated_at = ?
WHERE id = ? AND status = 'resolving'
RETURNING *
"""
# Claim order is id order: a job that goes back to the queue keeps its place at the front.
POSITION = """
SELECT (SELECT count(*) FROM jobs WHERE status = 'running')
     + (SELECT count(*) FROM jobs WHERE status IN ('resolving', 'queued') AND id < ?) + 1
"""
CLAIM_CANDIDATES = "SELECT * FROM jobs WHERE status = 'queued' ORDER BY id LIMIT ?"
CLAIM = """
UPDATE jobs SET status = 'running', lease_owner = ?, lease_expires_at = ?, started_at = ?, updated_at = ?
WHERE id = ? AND status = 'queued'
RETURNING *
"""
EXTEND_LEASE = """
UPDATE jobs SET lease_expires_at = ?, updated_at = ?
WHERE id = ? AND status = 'running' AND (? IS NULL OR lease_owner = ?)
"""
SELECT_EXPIRED = "SELECT * FROM jobs WHERE status = 'running' AND lease_expires_at <= ? ORDER BY id"
# Running jobs of an earlier process of the same worker (owner "<worker id>:<pid>:<random>", not the current one).
SELECT_ORPHANED = """
    SELECT * FROM jobs WHERE status = 'running' AND lease_owner LIKE ? ESCAPE '\\' AND lease_owner != ? ORDER BY id
"""
# A failed attempt: back to the queue, or failed for good when it was the last one. Params: error, error-if-final,
# now, now, id, owner, owner.
COUNT_ATTEMPT = """
UPDATE jobs SET attempts = attempts + 1,
                status = CASE WHEN attempts + 1 >= max_attempts THEN 'failed' ELSE 'queued' END,
                error = CASE WHEN attempts + 1 >= max_attempts THEN ? ELSE ? END,
                finished_at = CASE WHEN attempts + 1 >= max_attempts THEN ? ELSE NULL END,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = ?
WHERE id = ? AND status = 'running' AND (? IS NULL OR lease_owner = ?)
RETURNING *
"""
RESEED = """
UPDATE jobs SET status = 'queued', seed = ?, generations = generations + 1, progress = NULL,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = ?
WHERE id = ? AND status = 'running' AND (? IS NULL OR lease_owner = ?)
RETURNING *
"""
# Only forward (a late write of a shorter text loses), and only under the job's lease.
SAVE_PROGRESS = """
UPDATE jobs SET progress = ?, updated_at = ?
WHERE id = ? AND status = 'running' AND (? IS NULL OR lease_owner = ?) AND length(coalesce(progress, '')) <= length(?)
"""
COMPLETE = """
UPDATE jobs SET status = 'posting', result = ?, problems = ?, error = NULL,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = ?
WHERE id = ? AND status = 'running' AND (? IS NULL OR lease_owner = ?)
RETURNING *
"""
MARK_DONE = """
UPDATE jobs SET status = 'done', finished_at = ?, updated_at = ?
WHERE id = ? AND status = 'posting'
RETURNING *
"""
FAIL = """
UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, updated_at = ?,
                lease_owner = NULL, lease_expires_at = NULL
WHERE id = ? AND status IN ('resolving', 'queued', 'running', 'posting') AND (? IS NULL OR lease_owner = ?)
RETURNING *
"""
CANCEL = """
UPDATE jobs SET status = 'cancelled', finished_at = ?, updated_at = ?
WHERE id = ? AND requester_id = ? AND status IN ('resolving', 'queued')
RETURNING *
"""
LIST_JOBS = "SELECT * FROM jobs{where} ORDER BY id DESC LIMIT ?"
STATS = "SELECT status, count(*) FROM jobs GROUP BY status"
OLDEST_WAITING = "SELECT min(created_at) FROM jobs WHERE status IN ('resolving', 'queued')"
NEEDING_RESOLUTION = "SELECT * FROM jobs WHERE status = 'resolving' ORDER BY id"
NEEDING_POSTING = "SELECT * FROM jobs WHERE status = 'posting' ORDER BY id"
INSERT_POST = """
INSERT INTO posts (job_id, key, message_id, thread_ref, created_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (job_id, key) DO NOTHING
"""
SELECT_POST_MESSAGE = "SELECT message_id FROM posts WHERE job_id = ? AND key = ?"
SELECT_POSTS = "SELECT * FROM posts WHERE job_id = ? ORDER BY rowid"
SET_THREAD_REF = "UPDATE jobs SET thread_ref = ?, updated_at = ? WHERE id = ?"
MARK_PURGED = "UPDATE jobs SET purged_at = ?, updated_at = ? WHERE id = ? RETURNING *"
CANCEL_WAITING = """
UPDATE jobs SET status = 'cancelled', finished_at = ?, updated_at = ?
WHERE id = ? AND status IN ('resolving', 'queued')
RETURNING *
"""
INSERT_AUDIT = "INSERT INTO audit_log (at, actor, action, target, details) VALUES (?, ?, ?, ?, ?)"
SELECT_AUDIT = "SELECT * FROM audit_log ORDER BY id DESC LIMIT ?"
SELECT_OPTION = "SELECT value FROM options WHERE scope = ? AND name = ?"
SELECT_SCOPES_WITH = "SELECT scope, value FROM options WHERE name = ? AND value != 'null' ORDER BY scope"
UPSERT_OPTION = """
    INSERT INTO options (scope, name, value, updated_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (scope, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at
"""


# --- records -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewJob:
    """What the core hands to ``enqueue``. With a title the job is ``queued`` at once, else ``resolving``."""

    platform: str
    channel_id: str
    requester_id: str
    input: str  # what the member typed (a link or a title)
    seed: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    max_attempts: int
    thread_id: str | None = None
    message_id: str | None = None
    guild_id: str | None = None
    title: str | None = None
    url: str | None = None
    note: str | None = None  # e.g. "title taken from the page", shown with the thread


@dataclass(frozen=True)
class Job:
    id: int
    status: JobStatus
    platform: str
    channel_id: str
    thread_id: str | None
    message_id: str | None
    guild_id: str | None
    requester_id: str
    input: str
    title: str | None
    url: str | None
    note: str | None
    seed: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    attempts: int  # claims that ended in an error or an expired lease
    max_attempts: int
    generations: int  # generation retries with a new seed (not attempts)
    lease_owner: str | None
    lease_expires_at: float | None
    created_at: float
    updated_at: float
    started_at: float | None  # last claim
    finished_at: float | None
    result: str | None  # thread JSON
    problems: str | None  # the parser's report ("clean", "1 × comment cut off before it ended")
    error: str | None  # user-facing reason when failed; the last error while being retried
    thread_ref: str | None  # the platform thread the output went to
    purged_at: float | None
    progress: str | None = None  # the model's text up to its last tag while running (see SAVE_PROGRESS)

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def is_waiting(self) -> bool:
        return self.status in WAITING

    @property
    def sampling(self) -> dict[str, Any]:
        """temperature, top_p, top_k, max_new_tokens: ``SamplingSettings(**job.sampling)``."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class Post:
    job_id: int
    key: str  # the rendered message's key: "h" for the header, "c0.2#1" for a comment part
    message_id: str
    thread_ref: str | None
    created_at: float


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    target: str | None
    details: dict[str, Any]


@dataclass(frozen=True)
class QueueStats:
    by_status: dict[str, int]  # every status value, zero included
    queue_length: int  # resolving + queued
    running: int
    oldest_waiting_age: float | None  # seconds the oldest waiting job has waited


_JOB_FIELDS = tuple(f.name for f in fields(Job))


def _job(row: sqlite3.Row) -> Job:
    values = {name: row[name] for name in _JOB_FIELDS}
    values["status"] = JobStatus(values["status"])
    return Job(**values)


def default_cost(job: Job, tokens_per_char: float = 0.3) -> int:
    """Estimated tokens of a job: its prompt (from the title and URL) plus what it may generate."""
    chars = len(job.title or job.input) + len(job.url or "") + 8  # + tags and newlines
    return math.ceil(chars * tokens_per_char) + job.max_new_tokens


# --- the queue -----------------------------------------------------------------------------------------------


class Queue:
    """The job queue on one aiosqlite connection. Open with ``await Queue.open(path)``; ``close()`` when done."""

    def __init__(self, db: aiosqlite.Connection, *, clock: Callable[[], float], max_queued_per_requester: int,
                 max_queued_total: int) -> None:
        self._db = db
        self._clock = clock
        self._lock = asyncio.Lock()
        self.max_queued_per_requester = max_queued_per_requester
        self.max_queued_total = max_queued_total

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
                   max_queued_per_requester: int = 5, max_queued_total: int = 200) -> Queue:
        """Connect, set the pragmas, migrate the schema, and requeue jobs whose lease expired while no worker ran.
        The caps (from ``Settings.max_queued_per_requester`` / ``max_queued_total``) count unfinished jobs."""
        # isolation_level=None: no implicit transactions; every write below opens BEGIN IMMEDIATE itself.
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute(PRAGMA_BUSY_TIMEOUT)
            await db.execute(PRAGMA_WAL)
            await db.execute(PRAGMA_SYNCHRONOUS)
            await db.execute(PRAGMA_FOREIGN_KEYS)
            queue = cls(db, clock=clock, max_queued_per_requester=max_queued_per_requester,
                        max_queued_total=max_queued_total)
            await queue._migrate()
            await queue.requeue_expired()  # leases left by a crashed worker
        except BaseException:
            await db.close()
            raise
        return queue

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Queue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction, not interleaved with this connection's other coroutines."""
        async with self._lock:
            try:
                await self._db.execute(BEGIN)
                yield self._db
                await self._db.execute(COMMIT)
            except BaseException:
                # Also when cancelled while BEGIN was on its way: aiosqlite runs statements in order on its thread,
                # so this ROLLBACK follows it there and the connection is never left inside a transaction.
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute(ROLLBACK)
                raise

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock, self._db.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    async def _migrate(self) -> None:
        async with self._write() as db:  # re-read inside the lock: another process may have just migrated
            async with db.execute(GET_USER_VERSION) as cursor:
                (version,) = await cursor.fetchone()
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"queue database schema {version} is newer than this code ({SCHEMA_VERSION})")
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number]:
                    await db.execute(statement)
                await db.execute(SET_USER_VERSION.format(version=number + 1))

    async def schema_version(self) -> int:
        return (await self._read(GET_USER_VERSION))[0][0]

    async def journal_mode(self) -> str:
        return (await self._read(GET_JOURNAL_MODE))[0][0]

    # -- jobs in --

    async def enqueue(self, new: NewJob) -> Job:
        """Add a job; raises ``QueueFull`` when the requester or the whole queue is at its cap."""
        now = self._clock()
        async with self._write() as db:
            async with db.execute(COUNT_UNFINISHED_BY_REQUESTER, (new.requester_id,)) as cursor:
                (mine,) = await cursor.fetchone()
            if mine >= self.max_queued_per_requester:
                raise QueueFull(REQUESTER_FULL.format(n=mine), f"requester {new.requester_id} has {mine} unfinished")
            async with db.execute(COUNT_UNFINISHED) as cursor:
                (total,) = await cursor.fetchone()
            if total >= self.max_queued_total:
                raise QueueFull(QUEUE_FULL.format(n=total), f"{total} unfinished jobs")
            return await _insert_job(db, new, now)

    async def set_resolved(self, job_id: int, title: str, url: str | None = None,
                           note: str | None = None) -> Job | None:
        """A ``resolving`` job got its title: it joins the queue in its original place. None if it is no longer
        resolving (cancelled or failed meanwhile)."""
        return await self._update_one(SET_RESOLVED, (title, url, note, self._clock(), job_id))

    # -- the worker's side --

    async def claim(self, worker_id: str, *, limit: int, token_budget: int, lease_seconds: float,
                    cost: Callable[[Job], int] = default_cost, take_first: bool = True) -> list[Job]:
        """Mark up to ``limit`` of the oldest queued jobs ``running`` under a lease held by ``worker_id``.

        Jobs are taken in claim order while their summed ``cost`` fits ``token_budget``; with ``take_first`` (an
        idle worker) the first job is always taken, however large, so a big job cannot block the queue. Taking a
        prefix (not filling the budget with later small jobs) keeps the queue first come, first served. Call ``requeue_expired`` before each claim (the
        worker does), so that abandoned jobs come back first.
        """
        now = self._clock()
        async with self._write() as db:
            async with db.execute(CLAIM_CANDIDATES, (max(limit, 1),)) as cursor:
                candidates = [_job(row) for row in await cursor.fetchall()]
            chosen: list[int] = []
            spent = 0
            for job in candidates:
                job_cost = cost(job)
                if (chosen or not take_first) and spent + job_cost > token_budget:
                    break
                chosen.append(job.id)
                spent += job_cost
            claimed = []
            for job_id in chosen:
                async with db.execute(CLAIM, (worker_id, now + lease_seconds, now, now, job_id)) as cursor:
                    row = await cursor.fetchone()
                if row is not None:
                    claimed.append(_job(row))
            return claimed

    async def extend_lease(self, job_ids: Iterable[int], seconds: float, *, owner: str | None = None) -> int:
        """Push the leases of running jobs ``seconds`` past now; returns how many were extended."""
        now = self._clock()
        extended = 0
        async with self._write() as db:
            for job_id in job_ids:
                cursor = await db.execute(EXTEND_LEASE, (now + seconds, now, job_id, owner, owner))
                extended += cursor.rowcount
                await cursor.close()
        return extended

    async def requeue_expired(self) -> list[Job]:
        """Running jobs whose lease has expired go back to the queue (attempt counted), or fail when out of
        attempts. Returns the jobs moved, with their new status."""
        now = self._clock()
        moved = []
        async with self._write() as db:
            async with db.execute(SELECT_EXPIRED, (now,)) as cursor:
                expired = [_job(row) for row in await cursor.fetchall()]
            for job in expired:
                row = await self._count_attempt(db, job.id, "the worker stopped answering (lease expired)",
                                                None, job.attempts + 1, now)
                if row is not None:
                    moved.append(row)
        return moved

    async def requeue_orphaned(self, worker_id: str, current_owner: str) -> list[Job]:
        """At start: jobs a previous process of this worker was running when it died go back to the queue now
        (attempt counted) instead of waiting for their lease to expire. Worker ids must be unique per process
        when several processes share one database."""
        now = self._clock()
        moved = []
        pattern = worker_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ":%"
        async with self._write() as db:
            async with db.execute(SELECT_ORPHANED, (pattern, current_owner)) as cursor:
                orphaned = [_job(row) for row in await cursor.fetchall()]
            for job in orphaned:
                row = await self._count_attempt(db, job.id, "the bot restarted while writing this thread",
                                                None, job.attempts + 1, now)
                if row is not None:
                    moved.append(row)
        return moved

    async def release(self, job_id: int, error: str, *, owner: str | None = None) -> Job | None:
        """A claim ended in an error: back to the queue (attempt counted), or failed when out of attempts.
        None if the job was not running (under ``owner``'s lease, when given)."""
        now = self._clock()
        async with self._write() as db:
            async with db.execute(SELECT_JOB, (job_id,)) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            return await self._count_attempt(db, job_id, error, owner, row["attempts"] + 1, now)

    async def _count_attempt(self, db: aiosqlite.Connection, job_id: int, error: str, owner: str | None,
                             attempts: int, now: float) -> Job | None:
        params = (GAVE_UP.format(n=attempts), error, now, now, job_id, owner, owner)
        async with db.execute(COUNT_ATTEMPT, params) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _job(row)

    async def reseed(self, job_id: int, seed: int, *, owner: str | None = None) -> Job | None:
        """Generate again with a new seed: back to the queue, ``generations`` + 1, no attempt counted."""
        return await self._update_one(RESEED, (seed, self._clock(), job_id, owner, owner))

    async def save_progress(self, job_id: int, text: str, *, owner: str | None = None) -> bool:
        """Remember what the model has written so far (a prefix of its final text, ending at a tag), so that a run
        after a crash resumes from it. False if the job is not running (under ``owner``'s lease, when given) or a
        longer text is already saved."""
        async with self._write() as db, db.execute(SAVE_PROGRESS, (text, self._clock(), job_id, owner, owner,
                                                                    text)) as cursor:
            return cursor.rowcount == 1

    async def complete(self, job_id: int, result_json: str, problems: str | None = None, *,
                       owner: str | None = None) -> Job | None:
        """Store the generated thread; the job moves to ``posting``. None if the job was not running (under
        ``owner``'s lease, when given): a worker whose lease lapsed must not overwrite a newer claim."""
        return await self._update_one(COMPLETE, (result_json, problems, self._clock(), job_id, owner, owner))

    async def mark_done(self, job_id: int) -> Job | None:
        """The publisher posted everything. None if the job was not ``posting``."""
        now = self._clock()
        return await self._update_one(MARK_DONE, (now, now, job_id))

    async def fail(self, job_id: int, error: str, *, owner: str | None = None) -> Job | None:
        """Fail an unfinished job with a user-facing ``error``. None if it was already finished."""
        now = self._clock()
        return await self._update_one(FAIL, (error, now, now, job_id, owner, owner))

    async def cancel(self, job_id: int, requester_id: str) -> Job:
        """Cancel the requester's own waiting (queued or resolving) job, else raise ``JobNotFound``."""
        now = self._clock()
        async with self._write() as db:
            async with db.execute(CANCEL, (now, now, job_id, requester_id)) as cursor:
                row = await cursor.fetchone()
            if row is not None:
                return _job(row)
            async with db.execute(SELECT_JOB, (job_id,)) as cursor:
                existing = await cursor.fetchone()
        if existing is not None and existing["requester_id"] == requester_id and existing["status"] in (
                JobStatus.RUNNING.value, JobStatus.POSTING.value):
            raise JobNotFound(ALREADY_STARTED.format(id=job_id), f"job {job_id} is {existing['status']}")
        raise JobNotFound(NOT_YOURS.format(id=job_id), f"job {job_id}: no waiting job of {requester_id}")

    async def _update_one(self, sql: str, params: tuple[Any, ...]) -> Job | None:
        async with self._write() as db, db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _job(row)

    # -- reading --

    async def get(self, job_id: int) -> Job:
        """The job, or ``JobNotFound``."""
        rows = await self._read(SELECT_JOB, (job_id,))
        if not rows:
            raise JobNotFound(NO_JOB.format(id=job_id))
        return _job(rows[0])

    async def position(self, job_id: int) -> int | None:
        """Place in line of a waiting job: 1 = next. Running jobs count as ahead of every waiting one. 0 when the
        job is running or posting; None when it is finished or unknown."""
        rows = await self._read(SELECT_JOB, (job_id,))
        if not rows:
            return None
        status = JobStatus(rows[0]["status"])
        if status in FINISHED:
            return None
        if status not in WAITING:
            return 0
        return (await self._read(POSITION, (job_id,)))[0][0]

    async def list_jobs(self, status: JobStatus | str | Iterable[JobStatus | str] | None = None,
                        platform: str | None = None, requester_id: str | None = None, limit: int = 50, *,
                        channel_id: str | None = None) -> list[Job]:
        """Jobs, newest first, filtered by status (one or several), platform, requester and channel."""
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params += [JobStatus(s).value for s in statuses]
        for column, value in (("platform", platform), ("requester_id", requester_id), ("channel_id", channel_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = LIST_JOBS.format(where=" WHERE " + " AND ".join(where) if where else "")
        return [_job(row) for row in await self._read(sql, (*params, limit))]

    async def stats(self) -> QueueStats:
        counts = {s.value: 0 for s in JobStatus}
        for status, count in await self._read(STATS):
            counts[status] = count
        oldest = (await self._read(OLDEST_WAITING))[0][0]
        return QueueStats(
            by_status=counts,
            queue_length=counts[JobStatus.RESOLVING.value] + counts[JobStatus.QUEUED.value],
            running=counts[JobStatus.RUNNING.value],
            oldest_waiting_age=None if oldest is None else max(0.0, self._clock() - oldest),
        )

    async def jobs_needing_resolution(self) -> list[Job]:
        """Jobs still ``resolving`` (after a restart: resolve them again)."""
        return [_job(row) for row in await self._read(NEEDING_RESOLUTION)]

    async def jobs_needing_posting(self) -> list[Job]:
        """Jobs generated but not fully posted (after a restart: publish them again; posts are idempotent)."""
        return [_job(row) for row in await self._read(NEEDING_POSTING)]

    # -- posts --

    async def record_post(self, job_id: int, key: str, message_id: str, thread_ref: str | None = None) -> str:
        """Remember a posted message. Idempotent: recording a key again keeps the first message; returns the
        message id stored for the key."""
        async with self._write() as db:
            await db.execute(INSERT_POST, (job_id, key, message_id, thread_ref, self._clock()))
            async with db.execute(SELECT_POST_MESSAGE, (job_id, key)) as cursor:
                (stored,) = await cursor.fetchone()
        return stored

    async def posts(self, job_id: int) -> dict[str, str]:
        """key → message id of what was posted for a job, in posting order."""
        return {row["key"]: row["message_id"] for row in await self._read(SELECT_POSTS, (job_id,))}

    async def post_records(self, job_id: int) -> list[Post]:
        return [Post(**dict(row)) for row in await self._read(SELECT_POSTS, (job_id,))]

    async def set_thread_ref(self, job_id: int, ref: str | None) -> None:
        async with self._write() as db:
            await db.execute(SET_THREAD_REF, (ref, self._clock(), job_id))

    async def mark_purged(self, job_id: int) -> Job | None:
        now = self._clock()
        return await self._update_one(MARK_PURGED, (now, now, job_id))

    async def cancel_waiting(self, job_id: int) -> Job | None:
        """Cancel a job that has not started (whoever asked for it: a moderator's purge). None if it had."""
        now = self._clock()
        return await self._update_one(CANCEL_WAITING, (now, now, job_id))

    async def jobs_in_scope(self, scope: PurgeScope, limit: int = 200) -> list[Job]:
        """Jobs a purge covers that are not purged yet, oldest first: the scope's platform and server, and each
        filter it sets (``bot.moderation.PurgeScope``). A channel covers the requests made in it (for one made inside
        a thread, ``channel_id`` is that thread)."""
        where = ["purged_at IS NULL", "platform = ?", "guild_id IS ?"]
        params: list[Any] = [scope.platform, scope.guild_id]
        for clause, value in (("id = ?", scope.job_id), ("requester_id = ?", scope.requester_id),
                              ("channel_id = ?", scope.channel_id), ("created_at >= ?", scope.since),
                              ("created_at < ?", scope.until)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        return [_job(row) for row in await self._read(sql, (*params, limit))]

    # -- audit --

    async def audit(self, actor: str, action: str, target: str | None = None,
                    details: dict[str, Any] | None = None) -> None:
        async with self._write() as db:
            await db.execute(INSERT_AUDIT, (self._clock(), actor, action, target,
                                            json.dumps(details or {}, ensure_ascii=False, default=str)))

    async def option(self, scope: str, name: str, default: Any = None) -> Any:
        """A named setting (any JSON value) of a scope such as ``"discord:channel:123"``."""
        rows = await self._read(SELECT_OPTION, (scope, name))
        return json.loads(rows[0]["value"]) if rows else default

    async def set_option(self, scope: str, name: str, value: Any) -> None:
        async with self._write() as db:
            await db.execute(UPSERT_OPTION, (scope, name, json.dumps(value), self._clock()))

    async def scopes_with(self, name: str) -> list[tuple[str, Any]]:
        """(scope, value) of every scope whose option ``name`` is set to something other than null."""
        return [(row["scope"], json.loads(row["value"])) for row in await self._read(SELECT_SCOPES_WITH, (name,))]

    async def enqueue_once(self, scope: str, marker: str, value: Any, jobs: Iterable[NewJob]) -> list[Job]:
        """Jobs the bot asks for itself (the daily roundup), at most once per ``value`` of the option ``marker``:
        the marker and the jobs are written in one transaction, so a restart neither repeats nor loses them. [] when
        ``marker`` already holds ``value``. The requester caps do not apply (no member asked)."""
        now = self._clock()
        encoded = json.dumps(value)
        async with self._write() as db:
            async with db.execute(SELECT_OPTION, (scope, marker)) as cursor:
                row = await cursor.fetchone()
            if row is not None and row["value"] == encoded:
                return []
            added = [await _insert_job(db, new, now) for new in jobs]
            await db.execute(UPSERT_OPTION, (scope, marker, encoded, now))
        return added

    async def first_delivery(self, key: str, *, keep_seconds: float = DELIVERY_KEEP_SECONDS) -> bool:
        """Claim a platform delivery (an event, a message): True the first time ``key`` is seen, False for a repeat.
        Claims older than ``keep_seconds`` are forgotten (platforms stop redelivering after minutes)."""
        now = self._clock()
        async with self._write() as db:
            await db.execute(DELETE_OLD_DELIVERIES, (now - keep_seconds,))
            async with db.execute(CLAIM_DELIVERY, (key, now)) as cursor:
                return cursor.rowcount == 1

    async def audit_entries(self, limit: int = 50) -> list[AuditEntry]:
        """Newest first."""
        return [_audit_entry(row) for row in await self._read(SELECT_AUDIT, (limit,))]


async def _insert_job(db: aiosqlite.Connection, new: NewJob, now: float) -> Job:
    status = JobStatus.QUEUED if new.title else JobStatus.RESOLVING
    params = {f.name: getattr(new, f.name) for f in fields(NewJob)}
    params.update(status=status.value, now=now)
    async with db.execute(INSERT_JOB, params) as cursor:
        return _job(await cursor.fetchone())


def read_audit(path: str | os.PathLike[str], limit: int = 50) -> list[AuditEntry]:
    """The audit log of a queue file, newest first, read-only: a reader beside a running bot changes nothing (opening
    a ``Queue`` would migrate and requeue expired leases)."""
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        db.execute(PRAGMA_BUSY_TIMEOUT)
        return [_audit_entry(row) for row in db.execute(SELECT_AUDIT, (limit,))]
    finally:
        db.close()


def _audit_entry(row: sqlite3.Row) -> AuditEntry:
    return AuditEntry(row["id"], row["at"], row["actor"], row["action"], row["target"], json.loads(row["details"]))
