"""Moderators' purges: the scope and its time forms, the queue's selection (real SQLite), and Core.purge end to end
(real queue, worker and publisher; a recording poster)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

import pytest

from bot.app import App
from bot.core import Origin, Request
from bot.errors import InputRejected, PostError
from bot.moderation import NOTHING_CHOSEN, PurgeScope, parse_time
from tests.scripted import ScriptedEngine
from tests.test_core import RecordingPoster, finished, wait_for
from tests.test_queue import new_job

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(("text", "expected"), [
    ("30m", NOW - 1800), ("2h", NOW - 7200), ("3 days", NOW - 3 * 86400), ("1w", NOW - 7 * 86400),
    ("1.5h", NOW - 5400),
    ("2026-12-01", datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp()),
    ("2026-12-01 14:30", datetime(2026, 12, 1, 14, 30, tzinfo=timezone.utc).timestamp()),
    ("2026-12-01T14:30+01:00", datetime(2026, 12, 1, 13, 30, tzinfo=timezone.utc).timestamp()),
])
def test_times_are_ages_or_utc_dates(text, expected):
    assert parse_time(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-3d", "2026-13-01", ""])
def test_unreadable_times_say_what_is_accepted(text):
    with pytest.raises(InputRejected, match="30m, 2h, 3d or 1w"):
        parse_time(text, NOW)


def test_a_scope_must_choose_something_and_a_range_must_be_open():
    with pytest.raises(InputRejected) as refused:
        PurgeScope.from_options("discord", "g1", now=NOW)
    assert refused.value.user_message == NOTHING_CHOSEN
    with pytest.raises(InputRejected, match="before"):
        PurgeScope.from_options("discord", "g1", since="1h", until="2h", now=NOW)
    scope = PurgeScope.from_options("discord", "g1", requester_id="alice", since="2026-12-01", now=NOW)
    assert scope.describe() == {"requester_id": "alice", "since": "2026-12-01T00:00:00+00:00"}
    assert scope.target == "discord:guild:g1"


async def test_the_queue_selects_exactly_the_scope(queue, clock):
    def job(requester, channel, guild="g1", platform="discord"):
        return new_job(requester, platform=platform, channel_id=channel, guild_id=guild)

    jobs = {}
    for name, args in [("a1", ("alice", "c1")), ("a2", ("alice", "c2")), ("b1", ("bob", "c1")),
                       ("other_guild", ("alice", "c1", "g2")), ("other_platform", ("alice", "c1", "g1", "slack"))]:
        jobs[name] = (await queue.enqueue(job(*args))).id
        clock.advance(3600)

    async def ids(**filters):
        return {j.id for j in await queue.jobs_in_scope(PurgeScope("discord", "g1", **filters))}

    assert await ids(requester_id="alice") == {jobs["a1"], jobs["a2"]}
    assert await ids(channel_id="c1") == {jobs["a1"], jobs["b1"]}
    assert await ids(requester_id="alice", channel_id="c1") == {jobs["a1"]}
    start = 1_000_000.0  # the fake clock's start: a1 at +0 h, a2 at +1 h, b1 at +2 h
    assert await ids(since=start + 3600) == {jobs["a2"], jobs["b1"]}
    assert await ids(until=start + 3600) == {jobs["a1"]}
    assert await ids(since=start + 1800, until=start + 5400) == {jobs["a2"]}
    assert await ids(job_id=jobs["other_guild"]) == set()  # another server's request, even by number
    await queue.mark_purged(jobs["a1"])
    assert await ids(requester_id="alice") == {jobs["a2"]}  # purged jobs are not taken twice


ALICE = Origin("test", "chan-1", message_id="m-1", guild_id="g1")


async def test_purging_a_member_removes_their_threads_and_stops_what_is_waiting(settings):
    poster = RecordingPoster()
    # one job at a time, so the last request is surely still waiting when the purge runs
    async with App(settings.replace(batch_size=1), engine=ScriptedEngine(delay=0.3)) as app:
        await app.serve(poster)
        asked = []
        for origin, who, title in [(ALICE, "alice", "First"), (Origin("test", "chan-2", guild_id="g1"), "alice",
                                                                 "Second"),
                                   (ALICE, "bob", "Bob's"), (Origin("test", "chan-1", guild_id="g2"), "alice",
                                                             "Elsewhere")]:
            [accepted] = await app.core.submit(Request(origin, who, title, command=True))
            asked.append(accepted.job_id)
        for job_id in asked:
            await finished(app, job_id)
        [waiting] = await app.core.submit(Request(ALICE, "alice", "Still waiting", command=True))
        [queued_too] = await app.core.submit(Request(ALICE, "alice", "Queued too", command=True))
        await wait_for(lambda: len(app.engine.batches) == 5)  # "Still waiting" is generating, "Queued too" is not

        posted = {job_id: set((await app.queue.posts(job_id)).values()) for job_id in asked}
        report = await app.core.purge(PurgeScope("test", "g1", requester_id="alice"), "mod")
        assert set(report.jobs) == {asked[0], asked[1], waiting.job_id, queued_too.job_id}
        assert set(poster.deleted) == posted[asked[0]] | posted[asked[1]]
        assert report.messages == len(poster.deleted) and report.cancelled == 1 and not report.failed
        assert report.summary().startswith(f"Purged 4 requests ({report.messages} messages deleted, 1 not started")
        assert (await app.queue.get(queued_too.job_id)).status == "cancelled"
        assert (queued_too.job_id, "cancelled", "Removed by a moderator.") in poster.notices

        generating = await finished(app, waiting.job_id)  # the thread being written when the purge came
        assert generating.status == "done" and generating.purged_at is not None
        assert await app.queue.posts(waiting.job_id) == {}
        for untouched in asked[2:]:  # bob's, and alice's in another server
            job = await app.queue.get(untouched)
            assert job.purged_at is None and not posted[untouched] & set(poster.deleted)

        [entry] = [e for e in await app.queue.audit_entries() if e.action == "purge"]
        assert (entry.actor, entry.target) == ("user:mod", "test:guild:g1")
        assert entry.details["requester_id"] == "alice" and sorted(entry.details["jobs"]) == sorted(report.jobs)
        again = await app.core.purge(PurgeScope("test", "g1", requester_id="alice"), "mod")
        assert again.jobs == [] and again.summary().startswith("Nothing to purge")


async def test_a_delete_the_platform_refuses_is_reported_and_can_be_retried(settings):
    poster = RecordingPoster()
    async with App(settings, engine=ScriptedEngine()) as app:
        await app.serve(poster)
        [accepted] = await app.core.submit(Request(ALICE, "alice", "Refused", command=True))
        await finished(app, accepted.job_id)
        real_delete = poster.delete

        async def refuse(job, message_ids, thread_ref):
            raise PostError("Discord had a problem; I'll try again.")

        poster.delete = refuse
        report = await app.core.purge(PurgeScope("test", "g1", job_id=accepted.job_id), "mod")
        assert report.jobs == [] and report.failed == {accepted.job_id: "Discord had a problem; I'll try again."}
        assert "Run the purge again" in report.summary()
        assert (await app.queue.get(accepted.job_id)).purged_at is None
        poster.delete = real_delete
        report = await app.core.purge(PurgeScope("test", "g1", job_id=accepted.job_id), "mod")
        assert report.jobs == [accepted.job_id] and report.messages == len(poster.deleted) > 0


async def test_a_large_purge_says_there_is_more(settings):
    async with App(settings, engine=ScriptedEngine()) as app:
        await app.serve(RecordingPoster())
        for i in range(3):
            await app.core.submit(Request(ALICE, "alice", f"Title {i}", command=True))
        await asyncio.sleep(0)
        scope = PurgeScope("test", "g1", requester_id="alice")
        first = await app.core.purge(scope, "mod", limit=2)
        assert len(first.jobs) == 2 and first.more and "run the same purge again" in first.summary()
        second = await app.core.purge(scope, "mod", limit=2)
        assert len(second.jobs) == 1 and not second.more


async def test_the_audit_command_prints_the_trail_read_only(tmp_path, capsys):
    from bot import cli
    from bot.queue import Queue

    db = tmp_path / "queue.sqlite3"
    async with await Queue.open(db) as queue:
        await queue.audit("user:mod", "purge", "discord:guild:g1", {"requester_id": "alice", "jobs": [1, 2]})
        await queue.audit("user:alice", "delete", "job:3", {"messages": 7})
        assert cli.main(["audit", "--db", str(db), "--json"]) == 0  # beside a running bot
        entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(e["actor"], e["action"], e["target"]) for e in entries] == [
            ("user:alice", "delete", "job:3"), ("user:mod", "purge", "discord:guild:g1")]
        assert entries[1]["details"] == {"requester_id": "alice", "jobs": [1, 2]}
    before = db.stat().st_mtime_ns
    assert cli.main(["audit", "--db", str(db), "--limit", "1"]) == 0  # and with no bot running
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.rstrip().endswith('user:alice  delete  job:3  {"messages": 7}')
    assert db.stat().st_mtime_ns == before
    missing = tmp_path / "none.sqlite3"
    assert cli.main(["audit", "--db", str(missing)]) == 2 and not missing.exists()
    assert "No queue database" in capsys.readouterr().err
