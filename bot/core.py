"""The platform-neutral core: what adapters hand in (a Request) and what they implement (a Poster).

Adapters (console, Discord, Slack) turn platform events into a ``Request`` and call ``Core.submit``; they never touch
SQLite or torch. Each platform implements the small ``Poster`` interface that the core drives to post a finished
thread: one message at a time, each in reply to its parent's message, so the platform thread mirrors the tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bot import __version__
from bot.errors import HnaasError, InputRejected, JobNotFound, PostError
from bot.links import LinkResolver, ResolvedStory, extract_urls
from bot.moderation import PurgeReport, PurgeScope
from bot.queue import Job, NewJob, Queue
from bot.render import RenderedMessage, RenderLimits, Story, render_comment, render_header, render_thread
from bot.scheduler import REQUESTER as ROUNDUP_REQUESTER
from bot.settings import Settings
from model.tree import Comment, Path, Thread

if TYPE_CHECKING:
    from bot.scheduler import Roundup
    from bot.worker import Worker

log = logging.getLogger(__name__)

LENGTHS = {"short": 1 / 3, "medium": 2 / 3, "long": 1.0}  # a request's length: its share of max_new_tokens
PURGE_LIMIT = 200  # jobs per purge: each costs a platform call per message, and the moderator waits for the answer


@dataclass(frozen=True)
class Origin:
    """Where a request came from, and so where its thread goes."""

    platform: str  # "console", "discord", "slack"
    channel_id: str
    message_id: str | None = None  # the requesting message (a Discord thread starts from it)
    thread_id: str | None = None  # set when the request was made inside a thread
    guild_id: str | None = None  # Discord guild or Slack team


@dataclass(frozen=True)
class Request:
    origin: Origin
    requester_id: str
    text: str  # the pasted message, or a command's title-or-URL argument
    seed: int | None = None
    max_new_tokens: int | None = None
    command: bool = False  # from /hnaas or the console: a plain title is a valid request


def length_tokens(settings: Settings, length: str | None) -> int | None:
    """New tokens for a named length ("short", "medium", "long"; None: the default)."""
    if length is None:
        return None
    return max(32, round(settings.max_new_tokens * LENGTHS[length]))


@dataclass(frozen=True)
class Accepted:
    job_id: int
    position: int  # 1 = next to run
    input: str


@dataclass(frozen=True)
class Posted:
    message_id: str
    thread_ref: str | None  # the platform thread the story lives in (set by the header's post)


class Poster(Protocol):
    """What a platform does for the core. Methods raise ``PostError`` on platform failures."""

    platform: str
    limits: RenderLimits

    async def post(self, job: Job, message: RenderedMessage, *, thread_ref: str | None,
                   reply_to: str | None) -> Posted:
        """Post one rendered message. The header (``message.parent_key is None``) creates the thread."""

    async def notify(self, job: Job, event: str, text: str) -> None:
        """Tell the requester about a job: event is "queued", "started", "done", "failed" or "cancelled"."""

    async def delete(self, job: Job, message_ids: list[str], thread_ref: str | None) -> None:
        """Remove posted messages (purge, Delete button)."""

    # Optional: ``async edit(job, message_id, message)`` replaces a posted message's text. When present, a header
    # posted while its thread was still streaming is edited to show the final comment count.


class Core:
    """Turns requests into queued jobs, resolves their links, and posts finished threads through the posters.

    ``worker`` is attached after construction (the worker needs ``core.publish``, the core needs ``worker.wake``).
    """

    def __init__(self, settings: Settings, queue: Queue, resolver: LinkResolver,
                 posters: dict[str, Poster] | None = None, *, model_name: str = "") -> None:
        self.settings = settings
        self.queue = queue
        self.resolver = resolver
        self.posters: dict[str, Poster] = dict(posters or {})
        self.model_name = model_name
        self.worker: Worker | None = None
        self.roundup: Roundup | None = None  # attached by the app when it serves (bot.scheduler)
        self._tasks: set[asyncio.Task] = set()
        self._publishing: dict[int, asyncio.Lock] = {}  # one poster at a time per job, in call order
        self._streamed: set[int] = set()  # jobs whose header went out before their comment count was known
        self._random = random.SystemRandom()

    def add_poster(self, poster: Poster) -> None:
        self.posters[poster.platform] = poster

    # -- requests -----------------------------------------------------------------------------------------------

    async def submit(self, request: Request) -> list[Accepted]:
        """Queue one job per link in the message (or the command's title). A plain chat message without a link is
        not a request and returns ``[]``. Raises ``HnaasError`` subclasses whose ``user_message`` explains why not."""
        text = request.text.strip()
        if len(text) > self.settings.max_input_chars:
            raise InputRejected(
                f"That message is too long ({len(text):,} characters). Paste just the link or a title "
                f"(up to {self.settings.max_input_chars:,} characters).")
        inputs = extract_urls(text, self.settings.max_links_per_message)
        if not inputs:
            if not request.command:
                return []
            if not text:
                raise InputRejected("Give me a title or a link, e.g. `/hnaas Show HN: My weekend project`.")
            inputs = [text]
        if request.max_new_tokens is not None and request.max_new_tokens < 16:
            raise InputRejected("That length is too short to write a discussion.")
        accepted = []
        for item in inputs:
            job = await self.queue.enqueue(self._new_job(request, item))
            accepted.append(Accepted(job.id, await self.queue.position(job.id) or 1, item))
            self._spawn(self._resolve(job))
        return accepted

    def _new_job(self, request: Request, item: str, *, seed: int | None = None, title: str | None = None,
                 url: str | None = None) -> NewJob:
        s = self.settings
        origin = request.origin
        return NewJob(
            platform=origin.platform, channel_id=origin.channel_id, requester_id=request.requester_id, input=item,
            seed=seed if seed is not None else (request.seed if request.seed is not None
                                                else self._random.randrange(2**31)),
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            max_new_tokens=min(request.max_new_tokens or s.max_new_tokens, s.max_new_tokens),
            max_attempts=s.max_attempts, thread_id=origin.thread_id, message_id=origin.message_id,
            guild_id=origin.guild_id, title=title, url=url,
        )

    async def _resolve(self, job: Job) -> None:
        try:
            story = await self.resolver.resolve_text(job.input)
        except HnaasError as e:
            failed = await self.queue.fail(job.id, e.user_message)
            if failed is not None:
                await self._notify(failed, "failed", e.user_message)
            return
        except Exception:
            log.exception("job %s: link resolution crashed; using the input as the title", job.id)
            story = None
        title = story.title if story else (job.input[:200] or "Untitled")
        resolved = await self.queue.set_resolved(job.id, title, story.url if story else None,
                                                 story.note if story else None)
        if resolved is not None and self.worker is not None:
            self.worker.wake()

    async def cancel(self, job_id: int, requester_id: str) -> Job:
        job = await self.queue.cancel(job_id, requester_id)
        await self.queue.audit(f"user:{requester_id}", "cancel", f"job:{job_id}")
        return job

    async def regenerate(self, job_id: int, requester_id: str) -> Accepted:
        """A new thread for the same story with a new seed, posted as a new thread where the old one was asked."""
        old = await self.queue.get(job_id)
        request = Request(Origin(old.platform, old.channel_id, old.message_id, old.thread_id, old.guild_id),
                          requester_id, old.input, command=True)
        job = await self.queue.enqueue(self._new_job(request, old.input, seed=self._random.randrange(2**31),
                                                     title=old.title or old.input, url=old.url))
        await self.queue.audit(f"user:{requester_id}", "regenerate", f"job:{job_id}", {"new_job": job.id})
        if self.worker is not None:
            self.worker.wake()
        return Accepted(job.id, await self.queue.position(job.id) or 1, old.input)

    async def delete_output(self, job_id: int, actor_id: str, *, is_moderator: bool = False) -> Job:
        job = await self.queue.get(job_id)
        if actor_id != job.requester_id and not is_moderator:
            raise JobNotFound("Only the person who asked for this thread, or a moderator, can delete it.")
        messages = await self._remove_output(job)
        await self.queue.audit(f"user:{actor_id}", "delete", f"job:{job_id}",
                               {"messages": messages, "moderator": is_moderator})
        return await self.queue.get(job_id)

    async def purge(self, scope: PurgeScope, actor_id: str, *, limit: int = PURGE_LIMIT) -> PurgeReport:
        """A moderator's purge (``bot.moderation``): for each job in scope, cancel it if it has not started, delete
        what was posted for it, and mark it purged, so that nothing of it is posted later. Up to ``limit`` jobs per
        call (the report says when more are left). One audit entry per purge. The caller checks the actor's right
        to moderate; the scope keeps the purge inside the actor's own server."""
        jobs = await self.queue.jobs_in_scope(scope, limit + 1)
        report = PurgeReport(more=len(jobs) > limit)
        for job in jobs[:limit]:
            cancelled = await self.queue.cancel_waiting(job.id)
            try:
                report.messages += await self._remove_output(job)
            except PostError as e:
                log.warning("purge: job %s: %s", job.id, e)
                report.failed[job.id] = e.user_message
                continue
            report.jobs.append(job.id)
            if cancelled is not None:
                report.cancelled += 1
                await self._notify(cancelled, "cancelled", "Removed by a moderator.")
        await self.queue.audit(f"user:{actor_id}", "purge", scope.target,
                               {**scope.describe(), "jobs": report.jobs, "messages": report.messages,
                                "cancelled": report.cancelled, "failed": report.failed})
        return report

    async def _remove_output(self, job: Job) -> int:
        """Delete every message posted for a job and mark it purged; the number of messages. Under the job's
        publishing lock: a post in flight finishes first (and is deleted too), and none follows (``publish`` and
        ``stream_comment`` skip purged jobs). Raises ``PostError`` (the job stays unpurged, so it can be retried)."""
        async with self._lock(job.id):
            posts = await self.queue.posts(job.id)
            if posts:
                poster = self.posters.get(job.platform)
                if poster is None:
                    raise PostError(f"I'm not connected to {job.platform} right now, so I can't delete its messages.")
                current = await self.queue.get(job.id)  # the thread may have been created since `job` was read
                await poster.delete(current, list(posts.values()), current.thread_ref)
            await self.queue.mark_purged(job.id)
        return len(posts)

    async def queue_roundup(self, platform: str, channel_id: str, guild_id: str | None, scope: str, marker: str,
                            day: str, stories: list[ResolvedStory]) -> list[Job]:
        """Queue one roundup (``bot.scheduler``) in a channel: a job per story, each its own thread there, written
        together with the channel's ``marker`` = ``day`` (none if the channel already has that day's)."""
        request = Request(Origin(platform, channel_id, guild_id=guild_id), ROUNDUP_REQUESTER, "", command=True)
        jobs = await self.queue.enqueue_once(scope, marker, day, [
            self._new_job(request, story.url or story.title, title=story.title, url=story.url) for story in stories])
        if jobs and self.worker is not None:
            self.worker.wake()
        return jobs

    async def first_delivery(self, key: str) -> bool:
        """Claim a platform delivery (``Queue.first_delivery``): False when ``key`` was already handled."""
        return await self.queue.first_delivery(key)

    async def option(self, scope: str, name: str, default=None):
        return await self.queue.option(scope, name, default)

    async def set_option(self, scope: str, name: str, value, *, actor: str | None = None) -> None:
        """Change a setting; changes made by a person are written to the audit log."""
        await self.queue.set_option(scope, name, value)
        if actor is not None:
            await self.queue.audit(actor, "set_option", scope, {"name": name, "value": value})

    async def status(self) -> dict:
        stats = await self.queue.stats()
        return {"queue_length": stats.queue_length, "running": stats.running, "model": self.model_name,
                "version": __version__, "by_status": stats.by_status}

    # -- posting ------------------------------------------------------------------------------------------------

    async def publish(self, job: Job, thread: Thread) -> None:
        """Post a finished thread, skipping messages already posted (streamed, or before a restart), so a restart
        resumes without duplicates; then mark the job done, or failed with the platform's reason.

        A message is recorded right after the platform accepts it; a crash between the two can repeat that one
        message at most (platforms offer no lasting idempotency key for posts)."""
        poster = self.posters.get(job.platform)
        if poster is None:
            log.warning("job %s: no poster for platform %r; left for a later start", job.id, job.platform)
            return
        story = self._story(job)
        async with self._lock(job.id):
            try:
                if (await self.queue.get(job.id)).purged_at is not None:  # a moderator removed it meanwhile
                    await self.queue.mark_done(job.id)
                    return
                posted = await self.queue.posts(job.id)
                header_streamed = "h" in posted and job.id in self._streamed
                await self._post_all(poster, job, render_thread(thread, story, poster.limits), posted)
                if header_streamed and hasattr(poster, "edit"):  # the streamed header had no comment count
                    with contextlib.suppress(PostError):
                        await poster.edit(job, posted["h"], render_header(story, thread.comment_count,
                                                                          poster.limits))
            except PostError as e:
                log.warning("job %s: posting failed: %s", job.id, e)
                failed = await self.queue.fail(job.id, e.user_message)
                await self._notify(failed or job, "failed", e.user_message)
                return
            finally:
                self._streamed.discard(job.id)
                self._publishing.pop(job.id, None)
        done = await self.queue.mark_done(job.id)
        await self._notify(done or job, "done", f"Posted {thread.comment_count} comments.")

    async def stream_comment(self, job: Job, path: Path, comment: Comment) -> None:
        """Post one comment while the rest of its thread is still being generated (the header goes first)."""
        poster = self.posters.get(job.platform)
        if poster is None:
            return
        story = self._story(job)
        messages = render_comment(story, path, comment, poster.limits)
        async with self._lock(job.id):
            if (await self.queue.get(job.id)).purged_at is not None:
                return
            posted = await self.queue.posts(job.id)
            if "h" not in posted:
                messages.insert(0, render_header(story, None, poster.limits))
                self._streamed.add(job.id)
            await self._post_all(poster, job, messages, posted)

    def _story(self, job: Job) -> Story:
        return Story(job.title or job.input, job.url, job.seed, job.note)

    def _lock(self, job_id: int) -> asyncio.Lock:
        return self._publishing.setdefault(job_id, asyncio.Lock())

    async def _post_all(self, poster: Poster, job: Job, messages: list[RenderedMessage],
                        posted: dict[str, str]) -> None:
        """Post the messages not yet in ``posted``, each replying to its parent's message, recording each."""
        thread_ref = (await self.queue.get(job.id)).thread_ref
        for message in messages:
            if message.key in posted:
                continue
            reply_to = posted.get(message.parent_key) if message.parent_key else None
            result = await self._post_with_retry(poster, job, message, thread_ref, reply_to)
            if message.parent_key is None and result.thread_ref != thread_ref:
                thread_ref = result.thread_ref
                await self.queue.set_thread_ref(job.id, thread_ref)
            posted[message.key] = await self.queue.record_post(job.id, message.key, result.message_id, thread_ref)

    async def _post_with_retry(self, poster: Poster, job: Job, message: RenderedMessage, thread_ref: str | None,
                               reply_to: str | None, attempts: int = 3) -> Posted:
        for attempt in range(attempts):
            try:
                return await poster.post(job, message, thread_ref=thread_ref, reply_to=reply_to)
            except PostError as e:
                if e.permanent or attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def _notify(self, job: Job, event: str, text: str) -> None:
        poster = self.posters.get(job.platform)
        if poster is None or job.requester_id == ROUNDUP_REQUESTER:  # no member to tell
            return
        try:
            await poster.notify(job, event, text)
        except Exception:  # a notice that can't be delivered must never take the job or the bot down
            log.warning("job %s: could not send %s notice", job.id, event, exc_info=True)

    async def notify_worker_event(self, job: Job, event: str) -> None:
        """The worker's hook: a job started, or failed during generation."""
        text = {"started": "Writing the discussion…", "failed": job.error or "Generation failed."}.get(event, event)
        await self._notify(job, event, text)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart: resolve links that were mid-resolution, and finish posting interrupted threads."""
        for job in await self.queue.jobs_needing_resolution():
            self._spawn(self._resolve(job))
        for job in await self.queue.jobs_needing_posting():
            if job.result and job.platform in self.posters:
                self._spawn(self.publish(job, Thread.from_json(job.result)))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def busy(self) -> bool:
        """Link resolutions or recovered posts still in flight."""
        return bool(self._tasks)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
