"""The worker: takes batches of queued jobs, has the engine write them, and hands finished threads to the publisher.

One round (TGI's schedule → execute → update, arq's "log and keep going"):

1. ``requeue_expired`` (jobs abandoned by a dead worker come back, or fail when out of attempts);
2. claim up to ``batch_size`` jobs within ``token_budget``;
3. ``engine.generate`` for the whole batch, while a background task keeps the leases alive;
4. parse each output; a thread with at least one comment is stored (``posting``) and published by its own task,
   so a slow platform never stalls the next batch; an output with no usable comment is retried with a new seed
   (``generation_retries`` times), then failed; an engine error sends the whole batch back to the queue.

The worker sleeps on an ``asyncio.Event`` that ``wake()`` sets (the core calls it after each enqueue or
resolution), with ``worker_poll_seconds`` as a fallback for jobs added by another process. It depends on the engine
only through ``generate(requests, on_text=None) -> list[GenerationResult]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from bot.queue import Job, JobStatus, Queue
from bot.settings import Settings
from model.engine import GenerationRequest, GenerationResult, SamplingSettings
from model.format import ThreadParser, parse_generation, prompt
from model.tree import Comment, Path, Thread

log = logging.getLogger(__name__)

NO_USABLE_OUTPUT = ("The model couldn't write a usable discussion for that title. "
                    "Try rephrasing it or press Regenerate.")
BAD_SETTINGS = "That request's generation settings aren't valid, so it couldn't be started."

Publish = Callable[[Job, Thread], Awaitable[None]]  # posts the thread, then marks the job done or failed itself
Notify = Callable[[Job, str], Awaitable[None]]  # (job, "started" | "failed")
Stream = Callable[[Job, Path, Comment], Awaitable[None]]  # posts one comment as soon as the model closed it


class GenerationEngine(Protocol):
    async def generate(self, requests: Sequence[GenerationRequest],
                       on_text: Callable[[int, str], Any] | None = None) -> list[GenerationResult]: ...


def next_seed(seed: int) -> int:
    """The seed of a generation retry: a fixed function of the last one, so a job's history is reproducible."""
    return (seed * 1_000_003 + 1) % 2**31


class Worker:
    def __init__(self, queue: Queue, engine: GenerationEngine, publish: Publish, settings: Settings, *,
                 worker_id: str = "worker-1", tokens_per_char: float = 0.3, notify: Notify | None = None,
                 stream: Stream | None = None) -> None:
        self.queue = queue
        self.engine = engine
        self.publish = publish
        self.stream = stream
        self.settings = settings
        self.worker_id = worker_id
        # Unique per Worker object: a restarted worker with the same name must not take an old lease for its own.
        self.lease_owner = f"{worker_id}:{os.getpid()}:{secrets.token_hex(3)}"
        self.tokens_per_char = tokens_per_char
        self.notify = notify
        self.jobs_complete = 0  # generated and handed to the publisher
        self.jobs_failed = 0  # failed by this worker (no usable output, out of attempts)
        self.jobs_retried = 0  # sent back to the queue: new seed, or after an engine error
        self.batches = 0
        self.publish_errors = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()  # publishing and notifications in flight

    # -- control --

    def wake(self) -> None:
        """New work may be claimable (called by the core after an enqueue or a resolution)."""
        self._wake.set()

    def stop(self) -> None:
        """Ask ``run`` to return after the current batch."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Process batches until ``stop()``; sleep on ``wake()`` (or ``worker_poll_seconds``) when idle."""
        log.info("worker %s started (lease owner %s)", self.worker_id, self.lease_owner)
        while not self._stopping:
            self._wake.clear()  # before looking: a wake() from now on is not lost
            try:
                claimed = await self.run_once()
            except Exception:
                log.exception("worker %s: round failed; waiting before the next", self.worker_id)
                claimed = 0
            if claimed or self._stopping:
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.worker_poll_seconds)
        await self.drain()
        log.info("worker %s stopped", self.worker_id)

    async def run_burst(self) -> None:
        """Process until nothing is claimable, wait for publishing to finish, and return (tests, one-off runs)."""
        while await self.run_once():
            pass
        await self.drain()

    async def drain(self) -> None:
        """Wait for publishing and notification tasks in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- one round --

    def cost(self, job: Job) -> int:
        """Estimated tokens of a job in a batch: its prompt plus its token limit."""
        return math.ceil(len(prompt(job.title or job.input, job.url)) * self.tokens_per_char) + job.max_new_tokens

    async def run_once(self) -> int:
        """One round; returns the number of jobs claimed (0: nothing to do)."""
        for job in await self.queue.requeue_expired():
            if job.status is JobStatus.FAILED:
                self.jobs_failed += 1
                self._log(logging.WARNING, job, "lease expired; out of attempts, failed")
                self._notify(job, "failed")
            else:
                self._log(logging.WARNING, job, "lease expired; back in the queue (attempt %d)", job.attempts)
        s = self.settings
        jobs = await self.queue.claim(self.lease_owner, limit=s.batch_size, token_budget=s.token_budget,
                                      lease_seconds=s.lease_seconds, cost=self.cost)
        if not jobs:
            return 0
        self.batches += 1
        await self._run_batch(jobs)
        return len(jobs)

    async def _run_batch(self, jobs: list[Job]) -> None:
        batch: list[Job] = []
        requests: list[GenerationRequest] = []
        for job in jobs:
            try:
                requests.append(GenerationRequest(prompt(job.title or job.input, job.url), job.seed,
                                                  SamplingSettings(**job.sampling)))
            except Exception:
                self._log(logging.ERROR, job, "could not build the generation request", exc_info=True)
                await self._fail(job, BAD_SETTINGS)
                continue
            batch.append(job)
            if job.attempts == 0 and job.generations == 0:
                self._notify(job, "started")
        if not batch:
            return
        ids = [job.id for job in batch]
        log.info("worker %s: generating batch of %d: jobs %s", self.worker_id, len(batch), ids,
                 extra={"job_ids": ids, "worker": self.worker_id})
        keeper = asyncio.create_task(self._keep_leases(ids))
        error: Exception | None = None
        try:
            results = await self.engine.generate(requests, on_text=self._streamer(batch))
            if len(results) != len(requests):
                raise RuntimeError(f"engine returned {len(results)} results for {len(requests)} requests")
        except Exception as exc:
            error = exc
        finally:
            # If this task is cancelled (shutdown, crash) the jobs stay leased and come back when the lease expires.
            keeper.cancel()
            await asyncio.wait([keeper])  # no stray extend_lease once the jobs have moved on
        if error is not None:
            log.error("worker %s: engine failed on jobs %s; releasing them", self.worker_id, ids, exc_info=error,
                      extra={"job_ids": ids, "worker": self.worker_id})
            for job in batch:
                await self._release(job, f"engine error: {error!r}")
            return
        for job, result in zip(batch, results, strict=True):
            try:
                await self._finish(job, result)
            except Exception as exc:
                self._log(logging.ERROR, job, "handling the output failed", exc_info=True)
                with contextlib.suppress(Exception):
                    await self._release(job, f"worker error: {exc!r}")

    def _streamer(self, batch: list[Job]) -> Callable[[int, str], None] | None:
        """An ``on_text`` callback that parses each request's text as it grows and streams every comment the
        moment the model closes it. The final output is parsed again in ``_finish``; comments streamed here are
        recorded as posted, so the publisher skips them then."""
        if self.stream is None:
            return None
        parsers = [ThreadParser(opened=True) for _ in batch]
        fed = [""] * len(batch)

        def on_text(index: int, text: str) -> None:
            if parsers[index] is None or not text.startswith(fed[index]):
                parsers[index] = None  # the text was rewritten: leave this job to the final publish
                return
            delta, fed[index] = text[len(fed[index]):], text
            for path, comment in parsers[index].feed(delta):
                self._spawn(self._stream(batch[index], path, comment))

        return on_text

    async def _stream(self, job: Job, path: Path, comment: Comment) -> None:
        assert self.stream is not None
        try:
            await self.stream(job, path, comment)
        except Exception:  # the final publish posts whatever streaming could not
            self._log(logging.WARNING, job, "streaming comment %s failed", path, exc_info=True)

    async def _finish(self, job: Job, result: GenerationResult) -> None:
        parsed = parse_generation(result.text, result.finished)
        thread = Thread(job.title or job.input, job.url, parsed.comments)
        if parsed.comments:
            stored = await self.queue.complete(job.id, thread.dumps(), parsed.describe(), owner=self.lease_owner)
            if stored is None:
                self._log(logging.WARNING, job, "lease lost before completion; output dropped")
                return
            self.jobs_complete += 1
            self._log(logging.INFO, job, "generated %d comments in %d tokens (%s)", parsed.comment_count,
                      result.new_tokens, parsed.describe())
            self._spawn(self._publish(stored, thread))
        elif job.generations < self.settings.generation_retries:
            seed = next_seed(job.seed)
            if await self.queue.reseed(job.id, seed, owner=self.lease_owner) is not None:
                self.jobs_retried += 1
                self._log(logging.INFO, job, "no usable comment (%s); retrying with seed %d", parsed.describe(),
                          seed)
        else:
            self._log(logging.WARNING, job, "no usable comment (%s) after %d retries", parsed.describe(),
                      job.generations)
            await self._fail(job, NO_USABLE_OUTPUT)

    # -- outcomes --

    async def _release(self, job: Job, error: str) -> None:
        try:
            released = await self.queue.release(job.id, error, owner=self.lease_owner)
        except Exception:
            self._log(logging.ERROR, job, "could not release", exc_info=True)
            return
        if released is None:
            return
        if released.status is JobStatus.FAILED:
            self.jobs_failed += 1
            self._log(logging.WARNING, released, "out of attempts, failed")
            self._notify(released, "failed")
        else:
            self.jobs_retried += 1
            self._log(logging.INFO, released, "back in the queue (attempt %d)", released.attempts)

    async def _fail(self, job: Job, error: str) -> None:
        failed = await self.queue.fail(job.id, error, owner=self.lease_owner)
        if failed is not None:
            self.jobs_failed += 1
            self._notify(failed, "failed")

    async def _publish(self, job: Job, thread: Thread) -> None:
        try:
            await self.publish(job, thread)
        except Exception:
            self.publish_errors += 1
            self._log(logging.ERROR, job, "publishing failed", exc_info=True)

    def _notify(self, job: Job, event: str) -> None:
        if self.notify is None:
            return
        notify = self.notify

        async def send() -> None:
            try:
                await notify(job, event)
            except Exception:
                self._log(logging.ERROR, job, "notifying %r failed", event, exc_info=True)

        self._spawn(send())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_leases(self, job_ids: list[int]) -> None:
        interval = max(self.settings.lease_seconds / 3, 0.01)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.queue.extend_lease(job_ids, self.settings.lease_seconds, owner=self.lease_owner)
            except Exception:
                log.exception("worker %s: extending leases of jobs %s failed", self.worker_id, job_ids)

    def _log(self, level: int, job: Job, message: str, *args: Any, exc_info: bool = False) -> None:
        log.log(level, "job %d: " + message, job.id, *args, exc_info=exc_info,
                extra={"job_id": job.id, "worker": self.worker_id})
