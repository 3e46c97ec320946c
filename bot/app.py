"""Wires the parts together for one process: queue, link resolver, engine, core and worker on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from bot.core import Core, Poster
from bot.errors import PlatformRefused
from bot.links import LinkResolver
from bot.queue import Queue
from bot.scheduler import Roundup
from bot.settings import Settings
from bot.worker import Worker

log = logging.getLogger(__name__)


class Connection(Protocol):
    """One platform's side of ``hnaas run`` (``DiscordConnection``, ``SlackBot``)."""

    poster: Poster

    async def connect(self) -> None:
        """Log in and start receiving events; raises ``PlatformRefused`` with what the operator must fix."""

    async def wait_closed(self) -> None:
        """Return (or raise) when the connection ends for good."""

    async def close(self) -> None: ...


async def serve_platforms(settings: Settings, connections: list[Callable[[Core, Settings], Connection]], *,
                          engine=None) -> int:
    """``hnaas run``: open the app, connect every platform, then start the worker; serve until one platform's
    connection ends (or the task is cancelled). The worker starts (and interrupted threads resume) only once every
    platform is connected, so each post has a logged-in client to go through. 2 when a platform refused."""
    async with App(settings, engine=engine) as app:
        assert app.core is not None
        opened: list[Connection] = []
        try:
            for make in connections:
                connection = make(app.core, settings)
                opened.append(connection)
                await connection.connect()
            await app.serve(*(c.poster for c in opened))
            waits = [asyncio.create_task(c.wait_closed()) for c in opened]
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
            for task in done:
                task.result()
        except PlatformRefused as exc:
            log.error("%s", exc.user_message)
            return 2
        finally:
            for connection in reversed(opened):
                with contextlib.suppress(Exception):
                    await connection.close()
    return 0


class App:
    """``async with App(settings) as app:`` opens everything; ``await app.serve(posters)`` starts the worker."""

    def __init__(self, settings: Settings, *, engine=None) -> None:
        self.settings = settings
        self.engine = engine
        self.queue: Queue | None = None
        self.resolver: LinkResolver | None = None
        self.core: Core | None = None
        self.worker: Worker | None = None
        self._worker_task: asyncio.Task | None = None
        self.roundup: Roundup | None = None
        self._roundup_task: asyncio.Task | None = None

    async def __aenter__(self) -> App:
        s = self.settings
        if self.engine is None:
            from model.engine import Engine  # torch loads only for processes that generate

            rows = 2 if s.guidance_scale != 1.0 else 1  # a guided job runs its untitled twin in a second slot
            self.engine = Engine(s.model, device=s.device, dtype=s.dtype, threads=s.threads,
                                 max_batch=s.batch_size * rows, token_budget=s.token_budget * rows)
        try:
            await self.engine.start()
            self.queue = await Queue.open(s.db, max_queued_per_requester=s.max_queued_per_requester,
                                          max_queued_total=s.max_queued_total)
            self.resolver = LinkResolver(hn_api_base=s.hn_api_base, allow_private=s.allow_private_fetch,
                                         timeout=s.fetch_timeout, max_bytes=s.fetch_max_bytes)
            await self.resolver.start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self.core = Core(s, self.queue, self.resolver, model_name=Path(s.model).name)
        self.worker = Worker(self.queue, self.engine, self.core.publish, s, notify=self.core.notify_worker_event,
                             stream=self.core.stream_comment)
        self.core.worker = self.worker
        return self

    async def serve(self, *posters: Poster) -> None:
        """Register the platforms' posters, finish what a previous run left, and start the worker and the daily
        roundup."""
        assert self.core is not None and self.worker is not None
        for poster in posters:
            self.core.add_poster(poster)
        for job in await self.queue.requeue_orphaned(self.worker.worker_id, self.worker.lease_owner):
            log.warning("job %s: was running when the last process stopped; %s", job.id, job.status)
        await self.core.recover()
        self._worker_task = asyncio.create_task(self.worker.run(), name="hnaas-worker")
        self.roundup = self.core.roundup = Roundup(self.core, self.resolver, self.settings)
        self._roundup_task = asyncio.create_task(self.roundup.run(), name="hnaas-roundup")

    async def idle(self) -> None:
        """Wait until no job is waiting, running or posting (the console uses this before it exits)."""
        assert self.queue is not None and self.core is not None
        while True:
            stats = await self.queue.stats()
            unfinished = sum(n for status, n in stats.by_status.items()
                             if status in ("resolving", "queued", "running", "posting"))
            if not unfinished and not self.core.busy:
                return
            await asyncio.sleep(0.1)

    async def __aexit__(self, *exc) -> None:
        if self._roundup_task is not None:
            self._roundup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._roundup_task
        if self.worker is not None:
            self.worker.stop()
        if self._worker_task is not None:
            self._worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker_task
        if self.worker is not None:
            await self.worker.drain()
        if self.resolver is not None:
            await self.resolver.close()
        if self.queue is not None:
            await self.queue.close()
        if self.engine is not None:
            await self.engine.close()
