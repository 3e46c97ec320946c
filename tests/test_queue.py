"""The job queue on real temporary SQLite files, with a fake clock for leases."""

from __future__ import annotations

import asyncio
import random
import sqlite3

import pytest

from bot.errors import JobNotFound, QueueFull
from bot.queue import (
    ALREADY_STARTED,
    GAVE_UP,
    NOT_YOURS,
    SCHEMA_VERSION,
    Job,
    JobStatus,
    NewJob,
    Queue,
    default_cost,
)


def new_job(requester: str = "u1", title: str | None = "Show HN: A tiny Lisp", **changes) -> NewJob:
    values = dict(platform="console", channel_id="c1", requester_id=requester, input=title or "https://x.test/a",
                  seed=42, temperature=0.9, top_p=0.95, top_k=0, max_new_tokens=100, max_attempts=3, title=title)
    values.update(changes)
    return NewJob(**values)


async def claim(q: Queue, owner: str = "w1", limit: int = 8, budget: int = 100_000, lease: float = 60.0,
                **kw) -> list[Job]:
    return await q.claim(owner, limit=limit, token_budget=budget, lease_seconds=lease, **kw)


# --- schema ---------------------------------------------------------------------------------------------------


async def test_schema_version_wal_and_tables(tmp_path, queue):
    assert await queue.schema_version() == SCHEMA_VERSION >= 1
    assert await queue.journal_mode() == "wal"
    with sqlite3.connect(tmp_path / "queue.sqlite3") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent, seen by any connection
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
    assert {"jobs", "posts", "audit_log", "jobs_claim", "jobs_requester", "jobs_channel", "jobs_created"} <= names
    with pytest.raises(sqlite3.IntegrityError):  # foreign_keys = on: a post needs its job
        await queue.record_post(999, "h", "m1")


async def test_reopen_is_idempotent_and_keeps_jobs(tmp_path, clock):
    path = tmp_path / "q.sqlite3"
    first, second = await asyncio.gather(Queue.open(path, clock=clock), Queue.open(path, clock=clock))
    job = await first.enqueue(new_job())
    await first.close()
    await second.close()
    for _ in range(2):
        q = await Queue.open(path, clock=clock)
        assert await q.schema_version() == SCHEMA_VERSION
        assert (await q.get(job.id)).title == job.title
        await q.close()


async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "q.sqlite3"
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        await Queue.open(path)


# --- enqueue and claim ----------------------------------------------------------------------------------------


async def test_enqueue_statuses_and_claim_order(queue, clock):
    a = await queue.enqueue(new_job(title="A"))
    link = await queue.enqueue(new_job(title=None, input="https://example.com/x"))
    c = await queue.enqueue(new_job(title="C"))
    assert (a.status, link.status, c.status) == (JobStatus.QUEUED, JobStatus.RESOLVING, JobStatus.QUEUED)
    assert a.created_at == clock.now and not a.is_finished and a.is_waiting
    assert a.sampling == {"temperature": 0.9, "top_p": 0.95, "top_k": 0, "max_new_tokens": 100}
    assert [j.id for j in await queue.jobs_needing_resolution()] == [link.id]

    assert [j.id for j in await claim(queue, limit=1)] == [a.id]  # resolving jobs are never claimed
    resolved = await queue.set_resolved(link.id, "Example title", "https://example.com/x", "title from the page")
    assert resolved is not None and resolved.status is JobStatus.QUEUED and resolved.note == "title from the page"
    assert await queue.set_resolved(link.id, "again") is None  # only a resolving job resolves
    claimed = await claim(queue, owner="w9", lease=30)
    assert [j.id for j in claimed] == [link.id, c.id]  # the resolved link kept its place ahead of C
    assert all(j.status is JobStatus.RUNNING and j.lease_owner == "w9" for j in claimed)
    assert all(j.lease_expires_at == clock.now + 30 and j.started_at == clock.now for j in claimed)
    assert await claim(queue) == []


async def test_token_budget_and_limit(queue):
    jobs = [await queue.enqueue(new_job(title=f"T{i}", max_new_tokens=100)) for i in range(6)]
    one = default_cost(jobs[0])
    assert [j.id for j in await claim(queue, limit=1)] == [jobs[0].id]
    assert [j.id for j in await claim(queue, budget=2 * one + 1)] == [jobs[1].id, jobs[2].id]
    assert [j.id for j in await claim(queue, budget=10, cost=lambda j: 1000)] == [jobs[3].id]  # always one
    costs = {jobs[4].id: 5, jobs[5].id: 1}
    assert [j.id for j in await claim(queue, budget=5, cost=lambda j: costs[j.id])] == [jobs[4].id]
    assert [j.id for j in await claim(queue, budget=5, cost=lambda j: costs[j.id])] == [jobs[5].id]


async def test_budget_takes_a_prefix_not_later_small_jobs(queue):
    big, small = await queue.enqueue(new_job(title="big")), await queue.enqueue(new_job(title="small"))
    first = await queue.enqueue(new_job(title="first"))
    costs = {first.id: 0, big.id: 90, small.id: 5}
    got = await claim(queue, budget=50, cost=lambda j: costs[j.id])
    assert [j.id for j in got] == [big.id]  # first in line, admitted alone although over budget
    got = await claim(queue, budget=50, cost=lambda j: costs[j.id])
    assert [j.id for j in got] == [small.id, first.id]


async def test_claim_is_atomic_across_connections(tmp_path, clock):
    path = tmp_path / "q.sqlite3"
    q1, q2 = [await Queue.open(path, clock=clock, max_queued_total=10_000, max_queued_per_requester=10_000)
              for _ in range(2)]
    rng = random.Random(7)
    try:
        for round_ in range(6):
            ids = {(await q1.enqueue(new_job(title=f"r{round_} j{i}"))).id for i in range(25)}

            async def drain(q: Queue, owner: str) -> list[int]:
                got: list[int] = []
                while batch := await claim(q, owner=owner, limit=rng.randint(1, 3)):
                    got += [j.id for j in batch]
                    await asyncio.sleep(0)
                return got

            a, b = await asyncio.gather(drain(q1, "a"), drain(q2, "b"))
            assert not set(a) & set(b)
            assert len(a) == len(set(a)) and len(b) == len(set(b))
            assert set(a) | set(b) == ids
            owners = {j.id: j.lease_owner for j in await q1.list_jobs(JobStatus.RUNNING, limit=1000)}
            assert all(owners[i] == "a" for i in a) and all(owners[i] == "b" for i in b)
    finally:
        await q1.close()
        await q2.close()


# --- caps and positions ---------------------------------------------------------------------------------------


async def test_requester_and_global_caps(tmp_path, clock):
    q = await Queue.open(tmp_path / "q.sqlite3", clock=clock, max_queued_per_requester=2, max_queued_total=3)
    try:
        first = await q.enqueue(new_job("alice"))
        await q.enqueue(new_job("alice", title=None))  # resolving jobs count too
        with pytest.raises(QueueFull) as full:
            await q.enqueue(new_job("alice"))
        assert full.value.user_message == "You already have 2 requests waiting; try again when one finishes."
        await q.enqueue(new_job("bob"))
        with pytest.raises(QueueFull) as full:
            await q.enqueue(new_job("carol"))
        assert full.value.user_message == ("The queue is full right now (3 waiting); "
                                           "please try again in a few minutes.")
        await q.cancel(first.id, "alice")  # a finished job frees its place
        await q.enqueue(new_job("alice"))
    finally:
        await q.close()


async def test_default_caps(tmp_path, clock):
    q = await Queue.open(tmp_path / "caps.sqlite3", clock=clock)  # defaults: 5 per requester, 200 in all
    try:
        for _ in range(5):
            await q.enqueue(new_job("dave"))
        with pytest.raises(QueueFull) as full:
            await q.enqueue(new_job("dave"))
        assert full.value.user_message.startswith("You already have 5 requests waiting")
    finally:
        await q.close()


async def test_positions(queue):
    a, b, c = [await queue.enqueue(new_job(title=t)) for t in "abc"]
    link = await queue.enqueue(new_job(title=None))
    assert [await queue.position(j.id) for j in (a, b, c, link)] == [1, 2, 3, 4]
    await claim(queue, limit=1)
    assert await queue.position(a.id) == 0  # running
    assert [await queue.position(j.id) for j in (b, c, link)] == [2, 3, 4]  # the running job is still ahead
    await queue.complete(a.id, "{}", "clean")
    await queue.mark_done(a.id)
    assert await queue.position(a.id) is None
    assert [await queue.position(j.id) for j in (b, c, link)] == [1, 2, 3]
    await queue.cancel(b.id, "u1")
    assert [await queue.position(j.id) for j in (c, link)] == [1, 2]
    assert await queue.position(12345) is None


# --- leases, attempts, retries --------------------------------------------------------------------------------


async def test_lease_expiry_requeues_then_fails(queue, clock):
    job = await queue.enqueue(new_job(max_attempts=3))
    for attempt in (1, 2):
        [running] = await claim(queue, lease=10)
        clock.advance(9)
        assert await queue.requeue_expired() == []
        clock.advance(1)
        [back] = await queue.requeue_expired()
        assert (back.id, back.status, back.attempts) == (job.id, JobStatus.QUEUED, attempt)
        assert back.lease_owner is None and back.lease_expires_at is None
    await claim(queue, lease=10)
    clock.advance(11)
    [failed] = await queue.requeue_expired()
    assert failed.status is JobStatus.FAILED and failed.is_finished
    assert failed.error == GAVE_UP.format(n=3) == "Generation kept failing (3 attempts); giving up."
    assert failed.finished_at == clock.now
    assert await claim(queue) == []


async def test_expired_leases_are_requeued_at_open(tmp_path, clock):
    path = tmp_path / "q.sqlite3"
    q = await Queue.open(path, clock=clock)
    job = await q.enqueue(new_job())
    await claim(q, lease=5)
    await q.close()
    clock.advance(6)
    q = await Queue.open(path, clock=clock)
    try:
        reopened = await q.get(job.id)
        assert (reopened.status, reopened.attempts) == (JobStatus.QUEUED, 1)
    finally:
        await q.close()


async def test_extend_lease(queue, clock):
    a, b = await queue.enqueue(new_job()), await queue.enqueue(new_job())
    await claim(queue, owner="w1", lease=10)
    clock.advance(8)
    assert await queue.extend_lease([a.id, b.id], 10, owner="someone-else") == 0
    assert await queue.extend_lease([a.id, b.id], 10, owner="w1") == 2
    clock.advance(8)
    assert await queue.requeue_expired() == []
    assert (await queue.get(a.id)).lease_expires_at == clock.now + 2


async def test_release_counts_attempts(queue):
    job = await queue.enqueue(new_job(max_attempts=2))
    await claim(queue, owner="w1")
    assert await queue.release(job.id, "boom", owner="other") is None  # not that worker's lease
    released = await queue.release(job.id, "engine error: boom", owner="w1")
    assert (released.status, released.attempts, released.error) == (JobStatus.QUEUED, 1, "engine error: boom")
    await claim(queue)
    failed = await queue.release(job.id, "boom again")
    assert failed.status is JobStatus.FAILED and failed.error == GAVE_UP.format(n=2)
    assert await queue.release(job.id, "late") is None  # not running any more


async def test_reseed_does_not_count_an_attempt(queue):
    job = await queue.enqueue(new_job(seed=42))
    await claim(queue, owner="w1")
    again = await queue.reseed(job.id, 4242, owner="w1")
    assert (again.status, again.seed, again.generations, again.attempts) == (JobStatus.QUEUED, 4242, 1, 0)
    assert [j.seed for j in await claim(queue)] == [4242]


async def test_progress_only_grows_only_under_the_lease_and_a_new_seed_clears_it(queue, clock):
    job = await queue.enqueue(new_job())
    assert await queue.save_progress(job.id, "first<|ec|>") is False  # not running yet
    await claim(queue, owner="w1")
    assert await queue.save_progress(job.id, "first<|ec|>", owner="w2") is False  # not this worker's lease
    assert await queue.save_progress(job.id, "first<|ec|><|c|>second<|ec|>", owner="w1")
    assert await queue.save_progress(job.id, "first<|ec|>", owner="w1") is False  # a late, shorter save loses
    assert await queue.save_progress(job.id, "first<|ec|><|c|>second<|ec|>", owner="w1")  # the same again: fine
    assert (await queue.get(job.id)).progress == "first<|ec|><|c|>second<|ec|>"
    clock.advance(61)  # the worker dies: the progress stays for the next claim
    await queue.requeue_expired()
    [again] = await claim(queue, owner="w3")
    assert again.progress == "first<|ec|><|c|>second<|ec|>"
    reseeded = await queue.reseed(job.id, 43, owner="w3")  # no usable output: a new seed starts over
    assert reseeded.progress is None


async def test_a_database_from_before_progress_is_migrated(tmp_path, clock):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as raw:  # the schema as version 2 left it, with a running job
        from bot.queue import MIGRATIONS
        for migration in MIGRATIONS[:2]:
            for statement in migration:
                raw.execute(statement)
        raw.execute("PRAGMA user_version = 2")
        raw.execute("INSERT INTO jobs (status, platform, channel_id, requester_id, input, seed, temperature, top_p, "
                    "top_k, max_new_tokens, max_attempts, created_at, updated_at) "
                    "VALUES ('queued', 'console', 'c1', 'u1', 'A title', 1, 0.9, 0.95, 0, 100, 3, 0, 0)")
    q = await Queue.open(path, clock=clock)
    try:
        assert await q.schema_version() == SCHEMA_VERSION
        [job] = await claim(q)
        assert job.progress is None and await q.save_progress(job.id, "x<|ec|>")
    finally:
        await q.close()


async def test_complete_done_and_owner_guard(queue, clock):
    job = await queue.enqueue(new_job())
    await claim(queue, owner="w1")
    assert await queue.complete(job.id, '{"title": "x"}', "clean", owner="w2") is None  # lost lease: refused
    stored = await queue.complete(job.id, '{"title": "x"}', "clean", owner="w1")
    assert stored.status is JobStatus.POSTING and stored.result == '{"title": "x"}' and stored.problems == "clean"
    assert [j.id for j in await queue.jobs_needing_posting()] == [job.id]
    assert await queue.complete(job.id, "{}", "clean") is None  # only once
    clock.advance(5)
    done = await queue.mark_done(job.id)
    assert done.status is JobStatus.DONE and done.finished_at == clock.now and done.is_finished
    assert await queue.mark_done(job.id) is None
    assert await queue.fail(job.id, "too late") is None  # finished jobs stay as they are
    assert await queue.jobs_needing_posting() == []


async def test_fail(queue):
    job = await queue.enqueue(new_job(title=None))
    failed = await queue.fail(job.id, "That link could not be read.")
    assert failed.status is JobStatus.FAILED and failed.error == "That link could not be read."


async def test_cancel_rules(queue):
    mine = await queue.enqueue(new_job("alice"))
    resolving = await queue.enqueue(new_job("alice", title=None))
    running = await queue.enqueue(new_job("alice"))
    with pytest.raises(JobNotFound) as err:
        await queue.cancel(mine.id, "bob")
    assert err.value.user_message == NOT_YOURS.format(id=mine.id)
    cancelled = await queue.cancel(mine.id, "alice")
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    with pytest.raises(JobNotFound):
        await queue.cancel(mine.id, "alice")  # already cancelled
    assert (await queue.cancel(resolving.id, "alice")).status is JobStatus.CANCELLED
    assert await queue.set_resolved(resolving.id, "Too late") is None
    await claim(queue)
    with pytest.raises(JobNotFound) as err:
        await queue.cancel(running.id, "alice")
    assert err.value.user_message == ALREADY_STARTED.format(id=running.id)
    with pytest.raises(JobNotFound):
        await queue.cancel(9999, "alice")
    with pytest.raises(JobNotFound):
        await queue.get(9999)


# --- posts, audit, listing ------------------------------------------------------------------------------------


async def test_posts_are_idempotent(queue):
    job = await queue.enqueue(new_job())
    assert await queue.record_post(job.id, "h", "m-100", "thread-1") == "m-100"
    assert await queue.record_post(job.id, "c0#1", "m-101", "thread-1") == "m-101"
    assert await queue.record_post(job.id, "h", "m-999", "thread-1") == "m-100"  # the first post stands
    assert await queue.posts(job.id) == {"h": "m-100", "c0#1": "m-101"}
    records = await queue.post_records(job.id)
    assert [(p.key, p.message_id, p.thread_ref) for p in records] == [("h", "m-100", "thread-1"),
                                                                     ("c0#1", "m-101", "thread-1")]
    await queue.set_thread_ref(job.id, "thread-1")
    assert (await queue.get(job.id)).thread_ref == "thread-1"
    purged = await queue.mark_purged(job.id)
    assert purged.purged_at is not None
    assert await queue.posts(12345) == {}


async def test_audit_log(queue, clock):
    await queue.audit("admin:1", "purge", "job:3", {"messages": 4})
    clock.advance(1)
    await queue.audit("admin:2", "ban", "user:9")
    entries = await queue.audit_entries(10)
    assert [(e.actor, e.action, e.target, e.details) for e in entries] == [
        ("admin:2", "ban", "user:9", {}), ("admin:1", "purge", "job:3", {"messages": 4})]
    assert entries[0].at == clock.now
    assert len(await queue.audit_entries(1)) == 1


async def test_list_jobs_and_stats(queue, clock):
    a = await queue.enqueue(new_job("alice", platform="discord", channel_id="c1"))
    b = await queue.enqueue(new_job("bob", platform="slack", channel_id="c2"))
    c = await queue.enqueue(new_job("bob", platform="slack", channel_id="c2", title=None))
    await claim(queue, limit=1)
    assert [j.id for j in await queue.list_jobs()] == [c.id, b.id, a.id]  # newest first
    assert [j.id for j in await queue.list_jobs(status=JobStatus.RUNNING)] == [a.id]
    assert [j.id for j in await queue.list_jobs(status=["queued", "resolving"])] == [c.id, b.id]
    assert [j.id for j in await queue.list_jobs(platform="slack", requester_id="bob", limit=1)] == [c.id]
    assert [j.id for j in await queue.list_jobs(channel_id="c1")] == [a.id]
    clock.advance(30)
    stats = await queue.stats()
    assert stats.by_status["running"] == 1 and stats.by_status["queued"] == 1 and stats.by_status["done"] == 0
    assert (stats.queue_length, stats.running, stats.oldest_waiting_age) == (2, 1, 30)


async def test_options_are_json_values_that_survive_a_reopen(tmp_path):
    path = tmp_path / "options.sqlite3"
    async with await Queue.open(path) as q:
        assert await q.option("discord:channel:1", "links", False) is False
        await q.set_option("discord:channel:1", "links", True)
        await q.set_option("discord:application:9", "command_signature", {"sha": "abc"})
        await q.set_option("discord:channel:1", "links", False)
        await q.set_option("discord:channel:2", "links", True)
    async with await Queue.open(path) as q:
        assert await q.option("discord:channel:1", "links") is False
        assert await q.option("discord:channel:2", "links") is True
        assert await q.option("discord:application:9", "command_signature") == {"sha": "abc"}
