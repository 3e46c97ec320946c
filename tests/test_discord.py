"""The Discord adapter and poster: the real discord.py client against a fake Discord on loopback, through the real
App (queue on a SQLite file, link resolver, core, worker) with a fake engine that writes a known comment tree."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib

import discord
import pytest
from aiohttp import web

from bot.app import App
from bot.discord_bot import (
    DONE,
    INVITE_PERMISSIONS,
    MAX_CONTENT,
    QUEUED,
    DiscordPoster,
    HnaasBot,
    application_id_from_token,
    invite_url,
    message_content,
    neutralise_mentions,
    register_cli,
    run_discord,
    thread_name,
)
from bot.moderation import NOTHING_CHOSEN
from bot.queue import Job
from bot.render import RenderedMessage, Story, render_thread
from bot.settings import Settings
from model.engine import GenerationResult
from model.format import OPEN, encode_comments
from model.tree import Comment, Thread
from tests.fake_discord import (
    ADMIN_PERMISSIONS,
    BOT_ID,
    EPHEMERAL,
    MANAGE_MESSAGES,
    MEMBER_PERMISSIONS,
    FakeDiscord,
    pointed_at,
)
from tests.fake_hn import FakeHN

TREE = [
    Comment("First top-level comment.", [
        Comment("A reply to the first.", [Comment("A reply to the reply.")]),
        Comment("Another reply to the first."),
    ]),
    Comment("Second top-level comment.", [Comment("The only reply to the second.")]),
]
N_TREE = 6


class FakeEngine:
    """Writes `TREE` (or the tree registered for a word in the title) in the thread format, at once."""

    def __init__(self) -> None:
        self.trees: dict[str, list[Comment]] = {}
        self.gate: asyncio.Event | None = None  # when set, generation waits for it

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def generate(self, requests, on_text=None) -> list[GenerationResult]:
        if self.gate is not None:
            await self.gate.wait()
        results = []
        for request in requests:
            title = request.prompt.split("\n", 1)[0]
            tree = next((t for word, t in self.trees.items() if word in title), TREE)
            text = encode_comments(tree)[len(OPEN):]  # the prompt already opened the first comment
            results.append(GenerationResult(text, prompt_tokens=10, new_tokens=len(text) // 4, finished=True))
        return results


class Harness:
    """One process of HNaaS: App + HnaasBot. `stop()` shuts down cleanly, `crash()` pulls the plug."""

    def __init__(self, fake: FakeDiscord, tmp_path) -> None:
        self.fake = fake
        self.settings = Settings(db=str(tmp_path / "hnaas.sqlite3"), discord_token="fake.token",
                                 discord_api_base=fake.api_base, allow_private_fetch=True, fetch_timeout=3,
                                 max_input_chars=500, batch_size=1)
        self.engine = FakeEngine()
        self.app: App | None = None
        self.bot: HnaasBot | None = None
        self._client: asyncio.Task | None = None

    async def start(self) -> HnaasBot:
        self.app = App(self.settings, engine=self.engine)
        await self.app.__aenter__()
        self.bot = HnaasBot(self.app.core, self.settings, guild_ready_timeout=0.05)
        self._client = asyncio.create_task(self.bot.start(self.settings.discord_token))
        await asyncio.wait_for(self.bot.wait_until_ready(), 10)
        await self.app.serve(self.bot.poster)
        return self.bot

    async def _close_client(self) -> None:
        await self.bot.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client, 5)

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.__aexit__(None, None, None)
            await self._close_client()
            self.app = None

    async def crash(self) -> None:
        """Everything in flight is cancelled where it stands; nothing is flushed or marked."""
        app = self.app
        tasks = [*app.worker._tasks, *app.core._tasks, app._worker_task, app._roundup_task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_client()
        await app.resolver.close()
        await app.queue.close()
        self.app = None

    async def job(self, job_id: int) -> Job:
        return await self.app.queue.get(job_id)

    async def settle(self, jobs: int = 1, timeout: float = 10) -> None:
        """Wait until at least `jobs` jobs exist, all finished, and their notices are sent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            stats = await self.app.queue.stats()
            total = sum(stats.by_status.values())
            unfinished = sum(stats.by_status[s] for s in ("resolving", "queued", "running", "posting"))
            if total >= jobs and not unfinished and not self.app.core._tasks and not self.app.worker._tasks:
                return
            if loop.time() > deadline:
                raise AssertionError(f"jobs did not settle: {stats.by_status}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def fake():
    fake = await FakeDiscord().start()
    with pointed_at(fake):
        yield fake
    await fake.close()


@pytest.fixture
async def harness(fake, tmp_path):
    harness = Harness(fake, tmp_path)
    yield harness
    await harness.stop()


def posted_edges(fake: FakeDiscord, thread_id: str, header_id: str) -> set[tuple[str, str]]:
    """(message, the message it replies to) for every comment message in a thread, by content.

    A message without a reply reference belongs under the thread's starter message (the slash-command header)."""
    by_id = {m["id"]: m for m in fake.channel_messages(thread_id)}
    starter = fake.messages.get(thread_id, {}).get("content")
    edges = set()
    for message in by_id.values():
        if message["id"] != header_id:
            ref = (message.get("message_reference") or {}).get("message_id")
            edges.add((message["content"], by_id[ref]["content"] if ref else starter))
    return edges


def rendered(job: Job) -> list[RenderedMessage]:
    return render_thread(Thread.from_json(job.result), Story(job.title or job.input, job.url, job.seed),
                         DiscordPoster.limits)


def expected_edges(job: Job) -> set[tuple[str, str]]:
    messages = rendered(job)
    text = {m.key: message_content(m.text) for m in messages}
    return {(text[m.key], text[m.parent_key]) for m in messages if m.parent_key}


def header_in(fake: FakeDiscord, channel_id: str, job_id: int) -> dict:
    return next(m for m in fake.channel_messages(channel_id) if f"hnaas:regen:{job_id}" in fake.custom_ids(m["id"]))


async def answered(fake: FakeDiscord, token: str) -> dict:
    await fake.wait_until(lambda: fake.interactions[token]["responses"], what="an interaction answer")
    return fake.interactions[token]["responses"][0]


# --- tests -------------------------------------------------------------------------------------------------


async def test_pasted_link_becomes_a_thread_that_mirrors_the_tree(harness, fake):
    await harness.start()
    alice, admin = fake.user(name="alice"), fake.user(name="admin")
    token = await fake.slash_command(fake.general, admin, "hnaas links", mode="on", permissions=ADMIN_PERMISSIONS)
    assert (await answered(fake, token))["data"]["flags"] == 64
    assert await harness.bot.links_enabled(fake.general)

    url = fake.page_url("Why-SQLite-is-enough")
    request = await fake.send_message(fake.general, alice, f"worth a read {url}")
    await harness.settle()

    job = await harness.job(1)
    assert job.status == "done" and job.title == "Why SQLite is enough" and job.message_id == request["id"]
    thread = fake.channels[request["id"]]  # a thread started from a message shares its id
    assert thread.type == 11 and thread.parent_id == fake.general and thread.name == "Why SQLite is enough"
    header = fake.channel_messages(thread.id)[0]
    assert fake.custom_ids(header["id"]) == ["hnaas:regen:1", "hnaas:delete:1"]
    assert header["content"] == message_content(rendered(job)[0].text)
    assert posted_edges(fake, thread.id, header["id"]) == expected_edges(job)
    assert len(fake.channel_messages(thread.id)) == 1 + N_TREE
    # ⏳ at once, ✅ when done
    reactions = [(r.method, r.path.split("/")[-2]) for r in fake.requests if "/reactions/" in r.path]
    assert reactions[0] == ("PUT", QUEUED) and reactions[-1] == ("PUT", DONE)
    assert fake.reactions[request["id"]] == {DONE}
    # every create: no pings, replies that never fail on a missing parent, the bot's token
    creates = fake.creates()
    assert creates and all(r.body["allowed_mentions"] == {"parse": []} for r in creates)
    assert all(r.body["message_reference"]["fail_if_not_exists"] is False
               for r in creates if "message_reference" in r.body)
    assert all(r.headers["Authorization"] == "Bot fake.token" for r in fake.requests if r.path.startswith("/channels"))
    assert all(len(r.body["content"]) <= MAX_CONTENT for r in creates)


async def test_links_need_the_channel_switched_on_but_a_mention_always_works(harness, fake):
    await harness.start()
    alice = fake.user(name="alice")
    await fake.send_message(fake.general, alice, fake.page_url("Ignored"))
    token = await fake.slash_command(fake.general, alice, "hnaas links", mode="on")  # not an admin
    assert (await answered(fake, token))["data"]["content"].startswith("Only members who can manage")
    await asyncio.sleep(0.1)
    assert (await harness.app.queue.stats()).by_status["queued"] == 0 and not fake.threads()

    mention = await fake.send_message(fake.general, alice, "Rust in the kernel", mention_bot=True)
    await harness.settle()
    job = await harness.job(1)
    assert job.input == "Rust in the kernel" and job.title == "Rust in the kernel"
    assert fake.channels[mention["id"]].name == "Rust in the kernel"
    assert len(fake.channel_messages(mention["id"])) == 1 + N_TREE


async def test_slash_command_defers_then_links_the_thread(harness, fake):
    await harness.start()
    bob = fake.user(name="bob")
    token = await fake.slash_command(fake.general, bob, "hnaas generate", title_or_url="Show HN: a tiny GPT-2",
                                     seed=7, length="short")
    await harness.settle()
    await fake.wait_until(lambda: "discord.com/channels" in (fake.original_response(token) or {}).get("content", ""),
                          what="the link to the thread")
    assert fake.callback_types(token) == [5]  # deferred ("thinking…"), then edited
    job = await harness.job(1)
    assert job.seed == 7 and job.message_id is None
    assert job.max_new_tokens == round(harness.settings.max_new_tokens / 3)
    header = header_in(fake, fake.general, 1)
    thread = fake.channels[header["id"]]  # the thread starts from the header
    assert thread.type == 11 and thread.name == "Show HN: a tiny GPT-2"
    assert fake.original_response(token)["content"].endswith(f"/{thread.id}")
    assert posted_edges(fake, thread.id, header["id"]) == expected_edges(job)
    assert len(fake.channel_messages(thread.id)) == N_TREE


async def test_bad_input_gets_a_short_private_answer(harness, fake):
    await harness.start()
    member = fake.user()
    response = await answered(fake, await fake.slash_command(fake.general, member, "hnaas generate",
                                                             title_or_url="x" * 600))
    assert response["type"] == 4 and response["data"]["flags"] == 64
    assert response["data"]["content"].startswith("That message is too long")

    # refused later (while the link is resolved): the public "thinking…" gives way to a private note
    token = await fake.slash_command(fake.general, member, "hnaas generate", title_or_url="ftp://example.com/x")
    await harness.settle()
    await fake.wait_until(lambda: fake.followups(token), what="the refusal")
    assert fake.callback_types(token) == [5] and fake.original_response(token) is None
    (note,) = fake.followups(token)
    assert note["flags"] == 64 and "http" in note["content"]

    response = await answered(fake, await fake.slash_command(fake.general, member, "hnaas cancel", job_id=99))
    assert response["data"]["flags"] == 64 and response["data"]["content"].startswith("I can't find")
    response = await answered(fake, await fake.slash_command(fake.general, member, "hnaas status"))
    assert "Waiting: 0" in response["data"]["content"] and "Version:" in response["data"]["content"]


async def test_queue_position_and_cancel(harness, fake):
    await harness.start()
    harness.engine.gate = gate = asyncio.Event()
    alice = fake.user(name="alice")
    first = await fake.send_message(fake.general, alice, "first", mention_bot=True)
    await fake.wait_until(lambda: fake.reactions.get(first["id"]), what="⏳")
    await asyncio.sleep(0.2)  # job 1 is claimed and generating (held at the gate)
    second = await fake.send_message(fake.general, alice, "second", mention_bot=True)
    third = await fake.send_message(fake.general, alice, "third", mention_bot=True)
    def notices():
        return [m for m in fake.channel_messages(fake.general) if m["content"].startswith("Queued")]

    await fake.wait_until(lambda: len(notices()) == 2, what="queue positions")
    # the running job counts as ahead
    assert [(m["content"], m["message_reference"]["message_id"]) for m in notices()] == [
        ("Queued: request #2 is number 2 in line.", second["id"]),
        ("Queued: request #3 is number 3 in line.", third["id"])]

    response = await answered(fake, await fake.slash_command(fake.general, alice, "hnaas cancel", job_id=2))
    assert response["data"] == {"content": "Cancelled request #2.", "flags": 64, **{
        k: v for k, v in response["data"].items() if k not in ("content", "flags")}}
    await fake.wait_until(lambda: fake.reactions[second["id"]] == set(), what="the ⏳ to go")
    gate.set()
    await harness.settle(jobs=3)
    assert [(await harness.job(i)).status for i in (1, 2, 3)] == ["done", "cancelled", "done"]
    assert second["id"] not in fake.channels


async def test_rate_limited_create_is_retried_without_loss_or_duplicates(harness, fake):
    await harness.start()
    other = fake.add_channel("other").id
    fake.rate_limit(fake.general, count=1, retry_after=1.0)  # the first create in general (the header) gets 429
    await fake.slash_command(fake.general, fake.user(), "hnaas generate", title_or_url="Slow channel")
    await fake.slash_command(other, fake.user(), "hnaas generate", title_or_url="Fast channel")
    await harness.settle(jobs=2)

    general = fake.creates(fake.general)
    assert [r.status for r in general] == [429, 200]
    assert general[0].body == general[1].body  # the same header, sent again once Retry-After passed
    for job_id, channel in ((1, fake.general), (2, other)):
        job = await harness.job(job_id)
        header = header_in(fake, channel, job_id)
        assert posted_edges(fake, header["id"], header["id"]) == expected_edges(job)
        assert len(fake.channel_messages(header["id"])) == N_TREE
    # general's 429 held only general: the other channel's story was all posted before general's retry
    other_thread = header_in(fake, other, 2)["id"]
    last_other = max(i for i, r in enumerate(fake.requests) if r in fake.creates(other_thread))
    assert last_other < fake.requests.index(general[1])


async def test_crash_mid_thread_then_restart_posts_the_rest_once(harness, fake):
    await harness.start()
    stalled, release = asyncio.Event(), asyncio.Event()
    replies = []

    async def hang_on_the_fourth_comment(rec):
        if rec.method == "POST" and rec.path.endswith("/messages") and rec.path != f"/channels/{fake.general}/messages":
            replies.append(rec)
            if len(replies) == 5:  # header + 3 comments went through
                stalled.set()
                await release.wait()
                return web.Response(status=503)
        return None

    fake.fault_hooks.append(hang_on_the_fourth_comment)
    request = await fake.send_message(fake.general, fake.user(name="alice"), "Crash test", mention_bot=True)
    await asyncio.wait_for(stalled.wait(), 10)
    await harness.crash()
    release.set()
    fake.fault_hooks.clear()
    assert len(fake.channel_messages(request["id"])) == 4

    await harness.start()  # a new client and App on the same SQLite file
    await harness.settle()
    job = await harness.job(1)
    thread = fake.channel_messages(request["id"])
    assert job.status == "done" and len(thread) == 1 + N_TREE
    assert len({m["content"] for m in thread}) == len(thread)  # nothing twice
    assert posted_edges(fake, request["id"], thread[0]["id"]) == expected_edges(job)
    assert fake.reactions[request["id"]] == {DONE}


async def test_crash_after_discord_took_the_header_does_not_repeat_it(harness, fake):
    await harness.start()
    stalled, release = asyncio.Event(), asyncio.Event()

    async def lose_the_answer(rec):
        if rec.method == "POST" and rec.path == f"/channels/{fake.general}/messages" and not stalled.is_set():
            fake._route(rec)  # Discord creates the header, but the answer never reaches the bot
            stalled.set()
            await release.wait()
            return web.Response(status=503)
        return None

    fake.fault_hooks.append(lose_the_answer)
    await fake.slash_command(fake.general, fake.user(), "hnaas generate", title_or_url="Lost answer")
    await asyncio.wait_for(stalled.wait(), 10)
    await harness.crash()
    release.set()
    fake.fault_hooks.clear()

    await harness.start()
    await harness.settle()
    headers = [m for m in fake.channel_messages(fake.general) if fake.custom_ids(m["id"])]
    assert len(headers) == 1  # found by its custom_id and reused
    assert posted_edges(fake, headers[0]["id"], headers[0]["id"]) == expected_edges(await harness.job(1))


async def test_mentions_are_never_pings(harness, fake):
    await harness.start()
    harness.engine.trees["Pings"] = [
        Comment("@everyone look: <@123456789012345678> and <@&223456789012345678> in <#323456789012345678>",
                [Comment("cc @here <@!123456789012345678>")])]
    request = await fake.send_message(fake.general, fake.user(), "Pings @everyone", mention_bot=True)
    await harness.settle()
    # the poster defuses on its own too, whatever the renderer did
    job = await harness.job(1)
    raw = RenderedMessage("c9", "h", 1, "@here @everyone <@123456789012345678> <@&2234567890123456> <#3234567890123456>")
    await harness.bot.poster.post(job, raw, thread_ref=job.thread_ref, reply_to=None)

    creates = fake.creates(request["id"])
    assert len(creates) == 1 + 2 + 1
    assert all(r.body["allowed_mentions"] == {"parse": []} for r in creates)
    sent = " ".join(r.body["content"] for r in creates) + fake.channels[request["id"]].name
    for ping in ("@everyone", "@here", "<@123456789012345678>", "<@!123456789012345678>", "<@&223456789012345678>",
                 "<#323456789012345678>", "<@&2234567890123456>", "<#3234567890123456>"):
        assert ping not in sent


def test_neutralising_and_the_length_guard():
    assert neutralise_mentions("@here <@!1> <@&2> <#3> a@b.c") == "@\u200bhere <\u200b@!1> <\u200b@&2> <\u200b#3> a@b.c"
    assert neutralise_mentions(neutralise_mentions("@everyone <@1>")) == "@\u200beveryone <\u200b@1>"
    assert len(message_content("@here " * 390)) == MAX_CONTENT  # defusing may grow a text, never past the limit
    assert message_content("") != ""


async def test_a_long_comment_is_split_and_chained(harness, fake):
    await harness.start()
    long_text = " ".join(f"Sentence number {i} of a comment that goes on and on." for i in range(90))
    assert len(long_text) > 4000
    harness.engine.trees["Long"] = [Comment(long_text, [Comment("Short reply.")])]
    request = await fake.send_message(fake.general, fake.user(), "Long story", mention_bot=True)
    await harness.settle()
    job = await harness.job(1)
    creates = fake.creates(request["id"])
    assert all(len(r.body["content"]) <= MAX_CONTENT for r in creates)
    parts = [m for m in rendered(job) if m.key.startswith("c0") and m.key != "c0.0"]
    assert len(parts) >= 3 and len(creates) == 1 + len(parts) + 1
    header = fake.channel_messages(request["id"])[0]
    assert posted_edges(fake, request["id"], header["id"]) == expected_edges(job)


async def test_buttons_work_after_a_restart(harness, fake):
    await harness.start()
    alice = fake.user(name="alice")
    request = await fake.send_message(fake.general, alice, "Buttons", mention_bot=True)
    await harness.settle()
    header = fake.channel_messages(request["id"])[0]
    await harness.stop()

    await harness.start()  # nothing in memory about job 1
    token = await fake.click_button(header["id"], alice, "hnaas:regen:1")
    await harness.settle(jobs=2)
    assert fake.callback_types(token) == [5]
    await fake.wait_until(lambda: "discord.com/channels" in (fake.original_response(token) or {}).get("content", ""),
                          what="the new thread's link")
    job2 = await harness.job(2)
    assert job2.seed != (await harness.job(1)).seed
    # the member's message already holds job 1's thread: job 2's header replies to it in the channel
    header2 = header_in(fake, fake.general, 2)
    assert header2["message_reference"]["message_id"] == request["id"]
    assert posted_edges(fake, header2["id"], header2["id"]) == expected_edges(job2)

    stranger = fake.user(name="stranger")
    token = await fake.click_button(header["id"], stranger, "hnaas:delete:1")
    await fake.wait_until(lambda: fake.followups(token), what="a refusal")
    assert fake.followups(token)[0]["flags"] == 64 and header["id"] in fake.messages
    token = await fake.click_button(header["id"], stranger, "hnaas:delete:1",
                                    permissions=MEMBER_PERMISSIONS | MANAGE_MESSAGES)
    await fake.wait_until(lambda: fake.followups(token), what="deleted")
    assert fake.followups(token)[0]["content"] == "Deleted."
    assert fake.channel_messages(request["id"]) == [] and fake.channels[request["id"]].archived
    assert (await harness.job(1)).purged_at is not None
    assert len(fake.channel_messages(header2["id"])) == N_TREE  # job 2 untouched


async def test_moderators_purge_a_members_threads_and_a_channels(harness, fake):
    await harness.start()
    alice, bob, mod = fake.user(name="alice"), fake.user(name="bob"), fake.user(name="mod")
    elsewhere = fake.add_channel("elsewhere").id
    asked = [await fake.send_message(channel, who, title, mention_bot=True)
             for channel, who, title in [(fake.general, alice, "Alice's story"), (elsewhere, alice, "Alice again"),
                                         (fake.general, bob, "Bob's story"), (elsewhere, bob, "Bob elsewhere")]]
    await harness.settle(jobs=4)
    threads = [m["id"] for m in asked]  # each thread starts from the member's message
    assert all(len(fake.channel_messages(t)) == N_TREE + 1 for t in threads)

    async def purge(user, permissions=ADMIN_PERMISSIONS, **options) -> str:
        token = await fake.slash_command(fake.general, user, "hnaas purge", permissions=permissions, **options)
        await fake.wait_until(lambda: fake.followups(token) or (fake.interactions[token]["responses"] and fake
                              .interactions[token]["responses"][0]["type"] == 4), what="a purge answer")
        answer = (fake.followups(token) or [fake.interactions[token]["responses"][0]["data"]])[0]
        assert answer["flags"] & EPHEMERAL
        return answer["content"]

    assert await purge(alice, MEMBER_PERMISSIONS, member=alice) == "Only members who can manage messages can purge."
    assert await purge(mod) == NOTHING_CHOSEN
    assert "30m, 2h, 3d or 1w" in await purge(mod, member=alice, since="last tuesday")
    assert all(len(fake.channel_messages(t)) == N_TREE + 1 for t in threads)  # nothing happened so far

    answer = await purge(mod, member=alice)
    assert answer == f"Purged 2 requests ({2 * (N_TREE + 1)} messages deleted)."
    assert [len(fake.channel_messages(t)) for t in threads] == [0, 0, N_TREE + 1, N_TREE + 1]
    assert fake.channels[threads[0]].archived and fake.channels[threads[1]].archived

    answer = await purge(mod, channel=fake.general, since="1h")  # bob's in #general; alice's there is gone already
    assert answer == f"Purged 1 request ({N_TREE + 1} messages deleted)."
    assert [len(fake.channel_messages(t)) for t in threads] == [0, 0, 0, N_TREE + 1]
    assert await purge(mod, job_id=1) == "Nothing to purge: no HNaaS output matches that."
    purges = [e for e in await harness.app.queue.audit_entries() if e.action == "purge"]
    assert [e.details.get("requester_id") for e in purges] == [None, None, alice["id"]]  # newest first
    assert purges[1].details["channel_id"] == fake.general and purges[1].actor == f"user:{mod['id']}"


async def test_a_channel_subscribes_to_the_daily_roundup_and_gets_todays_at_once(harness, fake):
    front_page = {7: {"id": 7, "type": "story", "title": "Top story", "url": "https://top.example/"},
                  8: {"id": 8, "type": "story", "title": "Second story", "url": "https://second.example/"},
                  9: {"id": 9, "type": "story", "title": "Third story", "url": "https://third.example/"}}
    async with FakeHN(front_page, topstories=[7, 8, 9]) as hn:
        # due from 00:00 UTC: whenever this runs, today's roundup is due
        harness.settings = harness.settings.replace(hn_api_base=hn.base_url, roundup_stories=2, roundup_time="00:00")
        await harness.start()
        alice, admin = fake.user(name="alice"), fake.user(name="admin")
        token = await fake.slash_command(fake.general, alice, "hnaas roundup", mode="on")
        assert (await answered(fake, token))["data"]["content"].startswith("Only members who can manage")
        token = await fake.slash_command(fake.general, admin, "hnaas roundup", mode="on", permissions=ADMIN_PERMISSIONS)
        answer = (await answered(fake, token))["data"]
        assert answer["flags"] == EPHEMERAL and "Every day at 00:00 UTC" in answer["content"]
        await harness.settle(jobs=2)
        headers = [m for m in fake.channel_messages(fake.general) if m["id"] in fake.channels]  # each starts a thread
        assert ["Top story" in h["content"] for h in headers] == [True, False]
        assert ["Second story" in h["content"] for h in headers] == [False, True]
        for header in headers:
            assert len(fake.channel_messages(header["id"])) == N_TREE
        assert not fake.calls("POST", "/users/@me/channels")  # no one asked, so no one is told
        await harness.app.roundup.run_due()
        assert len(await harness.app.queue.list_jobs()) == 2  # today's is done

        token = await fake.slash_command(fake.general, admin, "hnaas roundup", mode="off", permissions=ADMIN_PERMISSIONS)
        assert (await answered(fake, token))["data"]["content"] == "No more daily roundups here."
        assert await harness.app.queue.scopes_with("roundup") == []
        await harness.stop()


async def test_channel_without_permission_fails_the_job_and_the_bot_carries_on(harness, fake):
    await harness.start()
    locked = fake.add_channel("locked", forbidden=True).id
    alice = fake.user(name="alice")
    request = await fake.send_message(locked, alice, "Locked out", mention_bot=True)
    await harness.settle()
    job = await harness.job(1)
    assert job.status == "failed" and "permission" in job.error
    assert request["id"] not in fake.channels  # no thread
    dm = next(c for c in fake.channels.values() if c.type == 1 and c.owner_id == alice["id"])
    (notice,) = fake.channel_messages(dm.id)  # the channel refused the notice too, so it came by DM
    assert notice["content"] == job.error

    await fake.send_message(fake.general, alice, "Still here", mention_bot=True)
    await harness.settle(jobs=2)
    assert (await harness.job(2)).status == "done"

    # a channel deleted while its job waited: the job fails and the requester is told, privately
    doomed = fake.add_channel("doomed").id
    harness.engine.gate = gate = asyncio.Event()
    token = await fake.slash_command(doomed, alice, "hnaas generate", title_or_url="Gone soon")
    await fake.wait_until(lambda: fake.interactions[token]["responses"], what="the deferral")
    fake.delete_channel(doomed)
    gate.set()
    await harness.settle(jobs=3)
    assert (await harness.job(3)).status == "failed"
    await fake.wait_until(lambda: fake.followups(token), what="the failure notice")
    assert fake.followups(token)[0]["content"] == "The channel or thread I was posting in is gone."
    assert fake.followups(token)[0]["flags"] == 64


async def test_commands_are_synced_only_when_they_change(harness, fake):
    await harness.start()
    assert harness.bot.synced_commands
    await harness.stop()
    await harness.start()
    assert not harness.bot.synced_commands and len(fake.calls("PUT", "/commands")) == 1
    assert [c["name"] for c in fake.commands] == ["hnaas"]
    generate = next(o for o in fake.commands[0]["options"] if o["name"] == "generate")
    assert {o["name"]: o["required"] for o in generate["options"]} == {
        "title_or_url": True, "seed": False, "length": False}
    assert all(o["description"] for o in generate["options"])


async def test_run_discord_serves_until_cancelled(fake, tmp_path):
    harness = Harness(fake, tmp_path)
    run = asyncio.create_task(run_discord(harness.settings, engine=harness.engine))
    await fake.wait_until(lambda: fake.identifies, what="the client to connect")
    request = await fake.send_message(fake.general, fake.user(), "Served", mention_bot=True)
    await fake.wait_until(lambda: request["id"] in fake.channels
                          and len(fake.channel_messages(request["id"])) == 1 + N_TREE, what="the thread")
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(run, 10)
    assert fake.connected == 0


def test_thread_names_fit():
    job = Job.__new__(Job)
    object.__setattr__(job, "id", 5)
    object.__setattr__(job, "title", "  A  " + "very long " * 20)
    object.__setattr__(job, "input", "")
    assert len(thread_name(job)) == 100 and thread_name(job).startswith("A very long")
    object.__setattr__(job, "title", None)
    assert thread_name(job) == "HNaaS #5"


def test_invite_url_asks_for_exactly_what_is_needed():
    url = invite_url(1234)
    assert "client_id=1234" in url and "scope=bot+applications.commands" in url
    perms = discord.Permissions(int(url.split("permissions=")[1].split("&")[0]))
    assert perms == INVITE_PERMISSIONS
    assert perms.send_messages_in_threads and perms.create_public_threads and perms.read_message_history
    assert not perms.manage_messages and not perms.administrator


def test_cli_prints_the_invite(capsys):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["discord", "invite", "--application-id", "42"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == invite_url(42)
    token = base64.b64encode(BOT_ID.encode()).decode().rstrip("=") + ".x.y"
    assert application_id_from_token(token) == BOT_ID
    args = parser.parse_args(["discord", "invite"])
    assert args.func(args, Settings(discord_token=token)) == 0
    assert f"client_id={BOT_ID}" in capsys.readouterr().out
