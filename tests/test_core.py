"""The platform-neutral path end to end: request → queue (real SQLite) → link resolution (loopback HTTP) →
worker → engine seam → parse → render → poster, including restarts and platform errors."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from bot.app import App
from bot.core import Origin, Posted, Request
from bot.errors import InputRejected, JobNotFound, PostError
from bot.render import DISCORD
from tests.fake_hn import FakeHN
from tests.scripted import ScriptedEngine, scripted_comments

ORIGIN = Origin("test", "chan-1", message_id="m-1")


class RecordingPoster:
    platform = "test"
    limits = DISCORD

    def __init__(self, fail_at: int | None = None, error: Exception | None = None) -> None:
        self.posts: list[tuple[str, str | None, str]] = []  # (key, reply_to, text)
        self.notices: list[tuple[int, str, str]] = []
        self.deleted: list[str] = []
        self.edits: list[tuple[str, str]] = []
        self.times: dict[str, float] = {}
        self.fail_at = fail_at
        self.error = error or RuntimeError("platform exploded")
        self.calls = 0

    async def post(self, job, message, *, thread_ref, reply_to):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise self.error
        self.posts.append((message.key, reply_to, message.text))
        self.times[message.key] = asyncio.get_running_loop().time()
        assert len(message.text) <= self.limits.max_chars
        return Posted(f"msg-{job.id}-{message.key}", thread_ref or f"thread-{job.id}")

    async def notify(self, job, event, text):
        self.notices.append((job.id, event, text))

    async def delete(self, job, message_ids, thread_ref):
        self.deleted.extend(message_ids)

    async def edit(self, job, message_id, message):
        self.edits.append((message_id, message.text))


@pytest.fixture
async def site():
    async def page(request):
        return web.Response(text="<html><head><title>A fine article</title></head><body>x</body></html>",
                            content_type="text/html")

    app = web.Application()
    app.router.add_get("/article", page)
    runner = web.AppRunner(app)
    await runner.setup()
    server = web.TCPSite(runner, "127.0.0.1", 0)
    await server.start()
    port = server._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def wait_for(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def finished(app, job_id):
    for _ in range(500):
        job = await app.queue.get(job_id)
        if job.is_finished:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {job.status}")


async def test_pasted_link_becomes_a_posted_tree(settings, site):
    poster = RecordingPoster()
    async with App(settings, engine=ScriptedEngine()) as app:
        await app.serve(poster)
        [accepted] = await app.core.submit(Request(ORIGIN, "alice", f"look at this {site}/article !"))
        assert accepted.position == 1 and accepted.input == f"{site}/article"
        job = await finished(app, accepted.job_id)
    assert job.status == "done" and job.title == "A fine article"
    keys = [key for key, _, _ in poster.posts]
    expected = scripted_comments("A fine article", job.seed)
    from model.tree import Thread

    assert keys == ["h"] + ["c" + ".".join(map(str, p)) for p, _ in Thread("", None, expected).walk()]
    by_key = {key: reply_to for key, reply_to, _ in poster.posts}
    assert by_key["h"] is None
    assert by_key["c0"] == f"msg-{job.id}-h"
    if "c0.0" in by_key:
        assert by_key["c0.0"] == f"msg-{job.id}-c0"
    assert poster.notices[-1][1] == "done"


async def test_chat_without_a_link_is_not_a_request_but_a_command_title_is(settings):
    async with App(settings, engine=ScriptedEngine()) as app:
        await app.serve(RecordingPoster())
        assert await app.core.submit(Request(ORIGIN, "bob", "good morning everyone")) == []
        [accepted] = await app.core.submit(Request(ORIGIN, "bob", "  Ask HN: What   are you reading?", command=True))
        job = await finished(app, accepted.job_id)
    assert job.status == "done" and job.title == "Ask HN: What are you reading?" and job.url is None


async def test_huge_message_is_refused_with_a_short_reason(settings):
    async with App(settings, engine=ScriptedEngine()) as app:
        with pytest.raises(InputRejected) as e:
            await app.core.submit(Request(ORIGIN, "bob", "x" * 50_000, command=True))
        assert "too long" in e.value.user_message and len(e.value.user_message) < 200
        assert (await app.queue.stats()).queue_length == 0


async def test_private_address_link_fails_the_job_with_a_notice(settings):
    poster = RecordingPoster()
    async with App(settings, engine=ScriptedEngine()) as app:
        await app.serve(poster)
        [accepted] = await app.core.submit(Request(ORIGIN, "eve", "http://10.0.0.1/admin"))
        job = await finished(app, accepted.job_id)
    assert job.status == "failed" and "private" in job.error
    assert poster.notices == [(job.id, "failed", job.error)] and poster.posts == []


async def test_hn_item_link_uses_the_story_title(settings):
    hn = FakeHN({8863: {"id": 8863, "type": "story", "title": "My YC app: Dropbox",
                        "url": "http://www.getdropbox.com/u/2/screencast.html"}}, [8863])
    base = await hn.start()
    try:
        async with App(settings.replace(hn_api_base=base), engine=ScriptedEngine()) as app:
            await app.serve(RecordingPoster())
            [accepted] = await app.core.submit(
                Request(ORIGIN, "pg", "https://news.ycombinator.com/item?id=8863"))
            job = await finished(app, accepted.job_id)
    finally:
        await hn.close()
    assert (job.title, job.url) == ("My YC app: Dropbox", "http://www.getdropbox.com/u/2/screencast.html")


async def test_crash_mid_posting_resumes_after_restart_without_duplicates(settings):
    crashing = RecordingPoster(fail_at=3)
    async with App(settings, engine=ScriptedEngine()) as app:
        await app.serve(crashing)
        [accepted] = await app.core.submit(Request(ORIGIN, "alice", "A title", command=True))
        await wait_for(lambda: crashing.calls >= 3)
        await app.worker.drain()
        job = await app.queue.get(accepted.job_id)
        assert job.status == "posting"
    first_keys = [key for key, _, _ in crashing.posts]
    assert first_keys == ["h", "c0"]

    resumed = RecordingPoster()
    async with App(settings, engine=ScriptedEngine()) as app:
        await app.serve(resumed)  # recover() finishes what the crashed process left
        job = await finished(app, accepted.job_id)
    assert job.status == "done"
    resumed_keys = [key for key, _, _ in resumed.posts]
    assert not set(resumed_keys) & set(first_keys)
    replies = {key: reply_to for key, reply_to, _ in resumed.posts}
    assert replies[resumed_keys[0]].startswith(f"msg-{job.id}-")  # threads onto the messages posted before


async def test_permanent_platform_error_fails_the_job_and_other_jobs_go_on(settings):
    poster = RecordingPoster(fail_at=1, error=PostError("I can't post in that channel.", permanent=True))
    async with App(settings, engine=ScriptedEngine()) as app:
        await app.serve(poster)
        [bad] = await app.core.submit(Request(ORIGIN, "alice", "First", command=True))
        bad_job = await finished(app, bad.job_id)
        [good] = await app.core.submit(Request(ORIGIN, "alice", "Second", command=True))
        good_job = await finished(app, good.job_id)
    assert bad_job.status == "failed" and bad_job.error == "I can't post in that channel."
    assert (bad_job.id, "failed", "I can't post in that channel.") in poster.notices
    assert good_job.status == "done"


async def test_cancel_regenerate_and_delete(settings):
    poster = RecordingPoster()
    # One job per batch, so the second job is surely still queued while the first generates.
    async with App(settings.replace(batch_size=1), engine=ScriptedEngine(delay=0.3)) as app:
        await app.serve(poster)
        [first] = await app.core.submit(Request(ORIGIN, "alice", "First title", command=True))
        [second] = await app.core.submit(Request(ORIGIN, "alice", "Second title", command=True))
        with pytest.raises(JobNotFound):
            await app.core.cancel(second.job_id, "mallory")
        await wait_for(lambda: bool(app.engine.batches))
        cancelled = await app.core.cancel(second.job_id, "alice")
        assert cancelled.status == "cancelled"
        done = await finished(app, first.job_id)
        regenerated = await app.core.regenerate(done.id, "alice")
        again = await finished(app, regenerated.job_id)
        assert again.title == done.title and again.seed != done.seed
        with pytest.raises(JobNotFound):
            await app.core.delete_output(done.id, "mallory")
        purged = await app.core.delete_output(done.id, "mod", is_moderator=True)
        assert purged.purged_at is not None
        assert {m for m in poster.deleted} == set((await app.queue.posts(done.id)).values())
        actions = [entry.action for entry in await app.queue.audit_entries()]
    assert {"cancel", "regenerate", "delete"} <= set(actions)


async def test_comments_are_posted_while_the_thread_is_still_generating(settings):
    poster = RecordingPoster()
    engine = ScriptedEngine(stream_delay=0.1)
    async with App(settings, engine=engine) as app:
        await app.serve(poster)
        [accepted] = await app.core.submit(Request(ORIGIN, "alice", "Streaming title", command=True))
        job = await finished(app, accepted.job_id)
    assert job.status == "done"
    [generation_end] = engine.finished_at
    assert poster.times["h"] < poster.times["c0"] < generation_end  # the first comment did not wait for the rest
    keys = [key for key, _, _ in poster.posts]
    assert len(keys) == len(set(keys))  # streamed and final publishing never post a message twice
    from model.tree import Thread

    comments = scripted_comments("Streaming title", job.seed)
    assert keys == ["h"] + ["c" + ".".join(map(str, p)) for p, _ in Thread("", None, comments).walk()]
    [(edited_id, header)] = poster.edits  # the header went out before the count was known, then got it
    assert edited_id == f"msg-{job.id}-h" and f"| {len(keys) - 1} comments" in header


async def test_restart_reruns_a_job_the_dead_process_was_generating_without_waiting_for_its_lease(settings):
    async with App(settings, engine=ScriptedEngine(delay=30)) as app:  # "crashes" mid-generation
        await app.serve(RecordingPoster())
        [accepted] = await app.core.submit(Request(ORIGIN, "alice", "Interrupted title", command=True))
        await wait_for(lambda: bool(app.engine.batches))
    poster = RecordingPoster()
    async with App(settings, engine=ScriptedEngine()) as app:  # lease_seconds is 600: only the restart helps
        assert (await app.queue.get(accepted.job_id)).status == "running"
        await app.serve(poster)
        job = await finished(app, accepted.job_id)
    assert job.status == "done" and job.attempts == 1 and poster.posts[0][0] == "h"


async def test_the_engine_has_a_second_slot_per_job_for_guidance(settings):
    async with App(settings.replace(batch_size=3, token_budget=1000, guidance_scale=1.5)) as app:
        assert (app.engine.max_batch, app.engine.token_budget) == (6, 2000)
    async with App(settings.replace(batch_size=3, token_budget=1000, guidance_scale=1.0)) as app:
        assert (app.engine.max_batch, app.engine.token_budget) == (3, 1000)
