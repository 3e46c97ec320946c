"""The Slack adapter and poster: the real slack-bolt app (Socket Mode, and HTTP mode) against a fake Slack on
loopback, through the real App (queue on a SQLite file, link resolver, core, worker) with a fake engine that writes
a known comment tree."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3

import aiohttp
import pytest

from bot.app import App, serve_platforms
from bot.cli import main
from bot.core import length_tokens
from bot.discord_bot import DiscordConnection
from bot.links import PRIVATE_ADDRESS_MESSAGE
from bot.queue import Job
from bot.render import SLACK, Story, render_thread
from bot.settings import Settings
from bot.slack_bot import (
    DELETE,
    DONE,
    QUEUED,
    REGENERATE,
    ChannelPacer,
    SlackBot,
    generate_options,
    manifest,
    purge_options,
)
from model.tree import Comment, Thread
from tests.fake_hn import FakeHN
from tests.fake_slack import BOT_USER, FakeSlack, signed
from tests.scripted import ScriptedEngine
from tests.test_discord import N_TREE, FakeEngine, Harness

ADMIN = "UADMIN"


class SlackHarness(Harness):
    """One process of HNaaS serving Slack: App + SlackBot. ``stop()`` shuts down cleanly, ``crash()`` pulls the
    plug (both from the Discord harness)."""

    def __init__(self, fake: FakeSlack, tmp_path, **changes) -> None:
        self.fake = fake
        self.settings = Settings(db=str(tmp_path / "hnaas.sqlite3"), slack_bot_token="xoxb-fake",
                                 slack_app_token="xapp-fake", slack_signing_secret="secret",
                                 slack_api_base=fake.api_base, slack_host="127.0.0.1", slack_port=0,
                                 slack_post_interval=0.0,
                                 allow_private_fetch=True, fetch_timeout=3, max_input_chars=500,
                                 batch_size=1).replace(**changes)
        self.engine = FakeEngine()
        self.app: App | None = None
        self.bot: SlackBot | None = None

    async def start(self) -> SlackBot:
        self.app = App(self.settings, engine=self.engine)
        await self.app.__aenter__()
        self.bot = SlackBot(self.app.core, self.settings)
        await self.bot.connect()
        await self.app.serve(self.bot.poster)
        return self.bot

    async def _close_client(self) -> None:
        await self.bot.close()


@pytest.fixture
async def fake():
    async with FakeSlack(admins={ADMIN}) as fake:
        yield fake


@pytest.fixture
async def harness(fake, tmp_path):
    harness = SlackHarness(fake, tmp_path)
    yield harness
    await harness.stop()


def expected_texts(job: Job) -> list[str]:
    return [m.text for m in render_thread(Thread.from_json(job.result), Story(job.title or job.input, job.url, job.seed),
                                          SLACK)]


def story_thread(fake: FakeSlack, channel: str = "C1", index: int = 0) -> tuple[dict, list[dict]]:
    header = fake.headers(channel)[index]
    return header, fake.thread(channel, header["ts"])


# --- tests -------------------------------------------------------------------------------------------------


async def test_command_posts_the_story_in_a_thread_that_mirrors_the_tree(harness, fake):
    await harness.start()
    answer = await fake.command("Show HN: A fake Slack for tests", user="U1")
    assert "request #1" in answer and "next up" in answer
    await harness.settle()
    job = await harness.job(1)
    assert job.status == "done" and job.platform == "slack"

    header, replies = story_thread(fake)
    texts = expected_texts(job)
    assert header["thread_ts"] is None and header["text"] == texts[0]
    assert "AI-generated" in header["text"] and "Show HN: A fake Slack for tests" in header["text"]
    # every comment is a reply in the header's thread, in tree order, its depth shown in the text
    assert [m["text"] for m in replies] == texts[1:] and len(replies) == N_TREE
    assert "┃ ↳" in replies[2]["text"]  # the reply to a reply
    assert all(m["unfurl_links"] is False for m in replies)
    buttons = {e["action_id"]: e["value"] for b in header["blocks"] if b["type"] == "actions" for e in b["elements"]}
    assert buttons == {REGENERATE: "1", DELETE: "1"}
    assert any("Request #1: Posted 6 comments." in t and "Open the thread" in t for t in fake.ephemeral_to("U1"))


async def test_pasted_link_in_an_opted_in_channel_gets_reactions_and_a_thread(harness, fake, tmp_path):
    async with FakeHN({8863: {"id": 8863, "type": "story", "title": "My YC app: Dropbox", "by": "dhouston",
                              "url": "http://www.getdropbox.com/u/2/screencast.html"}}) as hn:
        harness.settings = harness.settings.replace(hn_api_base=hn.base_url)
        await harness.start()
        assert "Only workspace admins" in await fake.command("links on", user="U1")
        ts = await fake.user_message("<https://news.ycombinator.com/item?id=8863>")
        await asyncio.sleep(0.2)
        assert not fake.all_messages()  # links are off until an admin turns them on
        assert "answer links posted in this channel" in await fake.command("links on", user=ADMIN)

        harness.engine.gate = asyncio.Event()
        ts = await fake.user_message("look: <https://news.ycombinator.com/item?id=8863|the launch>")
        await fake.wait_until(lambda: fake.reactions[("C1", ts)] == [QUEUED], what="the ⏳ reaction")
        harness.engine.gate.set()
        await harness.settle()
        job = await harness.job(1)
        assert job.title == "My YC app: Dropbox" and job.message_id == ts
        assert fake.reactions[("C1", ts)] == [DONE]  # ⏳ while it was queued, then ✅
        header, replies = story_thread(fake)
        assert "My YC app: Dropbox" in header["text"] and len(replies) == N_TREE
        assert "dhouston" not in header["text"]  # never a real person's name

        # a message inside a thread, and the bot's own messages, are not requests
        await fake.user_message("<https://example.com/x>", thread_ts=header["ts"])
        await fake.event({"type": "message", "channel": "C1", "bot_id": "BOTHER", "text": "<https://example.com/y>",
                          "ts": fake.new_ts()})
        await asyncio.sleep(0.2)
        assert len(await harness.app.queue.list_jobs()) == 1


async def test_redelivered_events_and_mentions_become_one_request(harness, fake):
    await harness.start()
    ts = fake.new_ts()
    event = {"type": "app_mention", "channel": "C1", "user": "U1", "ts": ts, "team": "T1",
             "text": f"<@{BOT_USER}> Ask HN: How do you test Slack bots?"}
    await fake.event(event, event_id="Ev1")
    await fake.event(event, event_id="Ev1", retry_attempt=1)  # Slack thought the first delivery was lost
    await fake.event({**event, "type": "message", "channel_type": "channel"})  # the same message as a message event
    await harness.settle()
    jobs = await harness.app.queue.list_jobs()
    assert [j.title for j in jobs] == ["Ask HN: How do you test Slack bots?"]
    assert len(fake.headers("C1")) == 1

    # where links are on, the message event (which may come first) leaves a mention to the app_mention event
    await fake.command("links on", user=ADMIN, channel="C2")
    second = {"type": "message", "channel": "C2", "channel_type": "channel", "user": "U1", "ts": fake.new_ts(),
              "text": f"<@{BOT_USER}> Ask HN: A title without a link"}
    await fake.event(second)
    await asyncio.sleep(0.3)  # handled before the app_mention event arrives
    await fake.event({**second, "type": "app_mention"})
    await harness.settle(jobs=2)
    assert (await harness.job(2)).title == "Ask HN: A title without a link"

    # a restart does not forget what was handled
    await harness.stop()
    await harness.start()
    await fake.event(event, event_id="Ev1", retry_attempt=2)
    await asyncio.sleep(0.2)
    assert len(await harness.app.queue.list_jobs()) == 2


async def test_bad_input_gets_a_short_private_answer_and_nothing_is_queued(harness, fake):
    harness.settings = harness.settings.replace(allow_private_fetch=False)
    await harness.start()
    assert "too long" in await fake.command("x" * 600)
    assert not await harness.app.queue.list_jobs()
    assert "request #1" in await fake.command("http://10.0.0.7/admin")
    await harness.settle(jobs=1)
    job = await harness.job(1)
    assert job.status == "failed" and job.error == PRIVATE_ADDRESS_MESSAGE
    assert f"Request #1: {PRIVATE_ADDRESS_MESSAGE}" in fake.ephemeral_to("U1")
    ts = await fake.user_message(f"<@{BOT_USER}>", mention=True)
    await fake.wait_until(lambda: any("Paste a link" in t for t in fake.ephemeral_to("U1")))
    await fake.event({"type": "app_mention", "channel": "C1", "user": "U1", "ts": ts, "text": f"<@{BOT_USER}>"},
                     retry_attempt=1)
    await asyncio.sleep(0.2)
    assert sum("Paste a link" in t for t in fake.ephemeral_to("U1")) == 1  # told once, redelivered or not
    assert not fake.all_messages()


async def test_help_status_and_cancel(harness, fake):
    await harness.start()
    assert "/hnaas <link or headline>" in await fake.command("")
    assert "Waiting: 0" in await fake.command("status")
    harness.engine.gate = asyncio.Event()  # the first job holds the worker
    await fake.command("First title")
    answer = await fake.command("Second title")
    assert "request #2 (number" in answer
    assert await fake.command("cancel 2") == "Cancelled request #2."
    assert "can't find a waiting request #1 of yours" in await fake.command("cancel 1", user="U2")
    harness.engine.gate.set()
    await harness.settle(jobs=2)
    assert (await harness.job(2)).status == "cancelled"
    assert len(fake.headers("C1")) == 1


async def test_buttons_regenerate_and_delete(harness, fake):
    await harness.start()
    await fake.command("A story worth two takes")
    await harness.settle()
    await fake.click(REGENERATE, "1", user="U2")
    await harness.settle(jobs=2)
    assert any("request #2" in t for t in fake.ephemeral_to("U2"))
    assert len(fake.headers("C1")) == 2
    regenerated = await harness.job(2)
    assert regenerated.title == "A story worth two takes" and regenerated.seed != (await harness.job(1)).seed

    # only the requester or an admin may delete
    await fake.click(DELETE, "1", user="U2")
    await fake.wait_until(lambda: any("Only the person" in t for t in fake.ephemeral_to("U2")))
    posted = 1 + N_TREE
    await fake.click(DELETE, "1", user="U1")
    await fake.wait_until(lambda: "Deleted." in fake.ephemeral_to("U1"))
    assert len(fake.deleted) == posted and len(fake.headers("C1")) == 1
    assert fake.deleted[-1][1] < fake.deleted[0][1]  # replies first, the header last
    await fake.click(DELETE, "2", user=ADMIN)
    await fake.wait_until(lambda: "Deleted." in fake.ephemeral_to(ADMIN))
    assert not fake.all_messages()
    assert (await harness.job(1)).purged_at is not None


async def test_platform_errors_fail_the_job_with_a_message_or_are_retried(harness, fake):
    await harness.start()
    fake.fail_next("chat.postMessage", "ratelimited", status=429, retry_after=0)
    await fake.command("Rate limited once")
    await harness.settle()
    assert (await harness.job(1)).status == "done" and len(fake.thread("C1", fake.headers("C1")[0]["ts"])) == N_TREE

    fake.missing_channels.add("C9")
    await fake.command("Nowhere to post", channel="C9")
    await harness.settle(jobs=2)
    job = await harness.job(2)
    assert job.status == "failed" and "invite me" in job.error
    assert not fake.messages["C9"]


async def test_purge_is_for_admins(harness, fake):
    await harness.start()
    await fake.command("One", user="U1")
    await fake.command("Two", user="U2")
    await harness.settle(jobs=2)
    assert "Only workspace admins" in await fake.command("purge <@U1|alice>", user="U2")
    assert "Purging" in await fake.command("purge <@U1|alice> since=1h", user=ADMIN)
    await fake.wait_until(lambda: any(t.startswith("Purged 1 request") for t in fake.ephemeral_to(ADMIN)))
    assert [h["text"] for h in fake.headers("C1")] == [expected_texts(await harness.job(2))[0]]
    [entry] = [e for e in await harness.app.queue.audit_entries() if e.action == "purge"]
    assert entry.actor == f"user:slack:{ADMIN}" and entry.details["jobs"] == [1]
    assert "don't understand `everything`" in await fake.command("purge <@U2> everything", user=ADMIN)
    assert "Purging" in await fake.command("purge 99", user=ADMIN)
    await fake.wait_until(lambda: "Nothing to purge: no HNaaS output matches that." in fake.ephemeral_to(ADMIN))
    assert len(fake.headers("C1")) == 1



async def test_roundup_on_posts_todays_front_page_in_the_channel(harness, fake):
    stories = {i: {"id": i, "type": "story", "title": f"Front page story {i}", "url": f"https://example.com/{i}"}
               for i in (11, 12, 13)}
    async with FakeHN(stories, topstories=[12, 11, 13]) as hn:
        # a time already past today: subscribing now brings today's roundup at once
        harness.settings = harness.settings.replace(hn_api_base=hn.base_url, roundup_time="00:00",
                                                    roundup_stories=2)
        await harness.start()
        assert "Only workspace admins" in await fake.command("roundup on", user="U1")
        assert "Every day at 00:00 UTC" in await fake.command("roundup on", user=ADMIN)
        await harness.settle(jobs=2)
        headers = fake.headers("C1")
        assert ["Front page story 12" in headers[0]["text"], "Front page story 11" in headers[1]["text"]] == [True] * 2
        assert all(len(fake.thread("C1", h["ts"])) == N_TREE for h in headers)
        assert not fake.ephemeral_to("hnaas:roundup")  # no member asked: no notices
        assert "No more daily roundups here." in await fake.command("roundup off", user=ADMIN)
        assert await harness.app.core.option("slack:channel:C1", "roundup") is None


def test_purge_options_read_slack_mentions_and_times():
    assert purge_options(["12"]) == {"job_id": 12, "requester_id": None, "channel_id": None, "since": None,
                                     "until": None}
    options = purge_options(["<@U123|alice>", "<#C9|general>", "since=2h", "until=2026-12-01T14:30"])
    assert options["requester_id"] == "U123" and options["channel_id"] == "C9"
    assert options["since"] == "2h" and options["until"] == "2026-12-01T14:30"
    with pytest.raises(Exception, match="don't understand"):
        purge_options(["everything"])


async def test_http_mode_verifies_signatures(fake, tmp_path):
    harness = SlackHarness(fake, tmp_path, slack_app_token=None)
    try:
        bot = await harness.start()
        url = f"http://127.0.0.1:{bot.http_port}/slack/events"
        body = fake.command_body("Show HN: Signed requests", user="U1", channel="C1")
        async with aiohttp.ClientSession() as session:
            raw, headers = signed(body, "wrong secret", form=True)
            async with session.post(url, data=raw, headers=headers) as response:
                assert response.status == 401
            raw, headers = signed(body, "secret", form=True)
            async with session.post(url, data=raw, headers=headers) as response:
                assert response.status == 200
                assert "request #1" in await response.text()
        await harness.settle()
        header, replies = story_thread(fake)
        assert "Signed requests" in header["text"] and len(replies) == N_TREE
        assert fake.socket_connections == 0
    finally:
        await harness.stop()


def test_generated_text_cannot_mention_or_link_on_slack():
    thread = Thread("T", None, [Comment("Hey <!channel> and <@U123>, see <https://evil.example|this> & more")])
    [_, comment] = render_thread(thread, Story("T <!here>", "https://x.example/?a=1&b=2", 1), SLACK)
    assert "<!channel>" not in comment.text and "<@U123>" not in comment.text and "<https://" not in comment.text
    assert "&lt;!channel&gt;" in comment.text and "&amp; more" in comment.text
    header = render_thread(thread, Story("T <!here>", "https://x.example/?a=1&b=2", 1), SLACK)[0]
    assert "<!here>" not in header.text and "a=1&amp;b=2" in header.text


async def test_run_serves_discord_and_slack_in_one_process(fake, tmp_path):
    """``hnaas run`` with both platforms configured: one queue, one worker, each thread posted where it was asked."""
    from tests.fake_discord import FakeDiscord, pointed_at

    discord_fake = await FakeDiscord().start()
    try:
        with pointed_at(discord_fake):
            harness = SlackHarness(fake, tmp_path, discord_token="fake.token", discord_api_base=discord_fake.api_base)
            run = asyncio.create_task(serve_platforms(harness.settings, [DiscordConnection, SlackBot],
                                                      engine=harness.engine))
            await discord_fake.wait_until(lambda: discord_fake.identifies, what="the Discord client to connect")
            assert "request #1" in await fake.command("Asked on Slack")
            request = await discord_fake.send_message(discord_fake.general, discord_fake.user(), "Asked on Discord",
                                                      mention_bot=True)
            await discord_fake.wait_until(lambda: request["id"] in discord_fake.channels and len(
                discord_fake.channel_messages(request["id"])) == 1 + N_TREE, what="the Discord thread")
            await fake.wait_until(lambda: fake.headers("C1") and len(
                fake.thread("C1", fake.headers("C1")[0]["ts"])) == N_TREE, what="the Slack thread")
            assert "Asked on Slack" in fake.headers("C1")[0]["text"]
            assert "Asked on Discord" not in str(fake.all_messages())
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(run, 10)
            assert discord_fake.connected == 0
    finally:
        await discord_fake.close()


async def test_run_refuses_a_bad_slack_token_with_what_to_fix(fake, tmp_path, caplog):
    harness = SlackHarness(fake, tmp_path)
    fake.fail_next("auth.test", "invalid_auth")
    assert await serve_platforms(harness.settings, [SlackBot], engine=harness.engine) == 2
    assert "Slack refused SLACK_BOT_TOKEN: invalid_auth" in caplog.text


async def test_a_direct_message_is_a_request(harness, fake):
    await harness.start()
    await fake.event({"type": "message", "channel": "D1", "channel_type": "im", "user": "U1", "ts": fake.new_ts(),
                      "text": f"<@{BOT_USER}> Ask HN: What do you run at home?"})  # no app_mention comes in DMs
    await harness.settle()
    header, replies = story_thread(fake, "D1")
    assert (await harness.job(1)).title == "Ask HN: What do you run at home?" and len(replies) == N_TREE


def test_manifest_asks_for_what_the_bot_listens_to(capsys):
    socket = manifest()
    assert socket["settings"]["socket_mode_enabled"] is True
    assert "request_url" not in socket["settings"]["event_subscriptions"]
    [command] = socket["features"]["slash_commands"]
    assert command["command"] == "/hnaas" and command["should_escape"] is True  # purge reads <@U…> and <#C…>
    assert set(socket["settings"]["event_subscriptions"]["bot_events"]) == {
        "app_mention", "message.channels", "message.groups", "message.im"}
    assert {"commands", "chat:write", "reactions:write", "users:read", "app_mentions:read"} <= set(
        socket["oauth_config"]["scopes"]["bot"])
    http = manifest("https://bot.example/slack/events")
    assert http["settings"]["socket_mode_enabled"] is False
    assert http["settings"]["interactivity"]["request_url"] == "https://bot.example/slack/events"
    assert http["features"]["slash_commands"][0]["url"] == "https://bot.example/slack/events"
    assert main(["slack", "manifest"]) == 0
    assert json.loads(capsys.readouterr().out) == socket


async def test_streamed_comments_arrive_in_the_thread_and_the_header_gets_its_count(harness, fake):
    harness.engine = ScriptedEngine(stream_delay=0.05)
    await harness.start()
    await fake.command("Streaming to Slack")
    await fake.wait_until(lambda: fake.headers("C1") and fake.thread("C1", fake.headers("C1")[0]["ts"]),
                          what="the first streamed comment")
    assert not harness.engine.finished_at  # it was posted while the rest was still being written
    await harness.settle()
    job = await harness.job(1)
    header, replies = story_thread(fake)
    assert [m["text"] for m in replies] == expected_texts(job)[1:]
    [(channel, ts, text)] = fake.updated
    assert (channel, ts) == ("C1", header["ts"]) and text == expected_texts(job)[0]
    assert f"| {len(replies)} comments" in header["text"]


async def test_socket_mode_reconnects_when_slack_refreshes_the_connection(harness, fake):
    await harness.start()
    assert fake.socket_connections == 1
    await fake.refresh_connection()
    await fake.wait_until(lambda: fake.socket_connections >= 2, what="a new Socket Mode connection")
    assert "request #1" in await fake.command("After the refresh")
    await harness.settle()
    assert fake.calls.count("apps.connections.open") >= 2 and len(fake.headers("C1")) == 1


async def test_posts_are_paced_per_channel(fake, tmp_path):
    """Two stories in one channel at once (a roundup does that) go out at most one post per interval there."""
    harness = SlackHarness(fake, tmp_path, slack_post_interval=0.15, batch_size=3)
    try:
        await harness.start()
        harness.engine.gate = asyncio.Event()  # all three are generated in one batch
        for title, channel in (("One", "C1"), ("Two", "C1"), ("Elsewhere", "C2")):
            await fake.command(title, channel=channel)
        harness.engine.gate.set()
        await harness.settle(jobs=3, timeout=20)
        in_c1 = sorted(fake.post_times["C1"])
        assert len(in_c1) == 2 * (1 + N_TREE)
        gaps = [b - a for a, b in itertools.pairwise(in_c1)]
        assert min(gaps) >= 0.14, gaps
    finally:
        await harness.stop()


async def test_the_pacer_holds_a_channel_and_not_the_others():
    pacer = ChannelPacer(interval=100.0)
    await asyncio.wait_for(pacer.wait("C1"), 1)  # the first post goes at once
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pacer.wait("C1"), 0.05)  # the next one in C1 waits its turn
    await asyncio.wait_for(pacer.wait("C2"), 1)  # another channel does not


async def test_command_options_seed_and_length(harness, fake):
    await harness.start()
    await fake.command("Show HN: Same again seed=7 length=short")
    await harness.settle()
    job = await harness.job(1)
    assert (job.title, job.seed) == ("Show HN: Same again", 7)
    assert job.max_new_tokens == length_tokens(harness.settings, "short") < harness.settings.max_new_tokens
    assert generate_options("A title seed=12 length=LONG") == ("A title", 12, "long")
    assert generate_options("seed=5") == ("seed=5", None, None)  # nothing but options: that is the headline
    assert generate_options("Ask HN: seed=99999999999") == ("Ask HN: seed=99999999999", None, None)


async def test_crash_after_slack_took_the_header_does_not_repeat_it(harness, fake):
    await harness.start()
    stalled, release = fake.lose_next_answer("chat.postMessage")
    await fake.command("Lost answer")
    await asyncio.wait_for(stalled.wait(), 10)
    await harness.crash()
    release.set()
    assert len(fake.headers("C1")) == 1 and not fake.thread("C1", fake.headers("C1")[0]["ts"])

    await harness.start()  # a new process on the same SQLite file finishes the job
    await harness.settle()
    [header] = fake.headers("C1")  # found by its block id and reused
    assert [m["text"] for m in fake.thread("C1", header["ts"])] == expected_texts(await harness.job(1))[1:]


async def test_a_slow_queue_is_acknowledged_in_time_and_answered_after(harness, fake):
    """Slack wants an answer within 3 s: when the queue is slow (here another process holds its write lock), the
    command is acknowledged at once and the request number follows privately."""
    await harness.start()
    other = sqlite3.connect(harness.settings.db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        assert await fake.command("Slow queue") == "On it…"  # answered after SUBMIT_GRACE, not after the lock
    finally:
        other.execute("COMMIT")
        other.close()
    await fake.wait_until(lambda: any("Queued as request #1" in t for t in fake.ephemeral_to("U1")))
    await harness.settle()
    assert len(fake.headers("C1")) == 1
