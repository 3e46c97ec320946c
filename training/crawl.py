"""Crawler: items from the HN Firebase API into the item store, restartable.

Two ways to crawl:

* an id range (``crawl_range``, ``crawl_last``): every item from ``lo`` to ``hi``. Ids whose item was stored (or
  found null) are recorded as done ranges in the store, in the same transaction as the items, so a crawl stopped at
  any point resumes where it stopped: done ids are never fetched again (unless ``refresh``).
* a story list (``crawl_stories``: top, new, best): the listed stories and their whole comment trees, following
  ``kids``. A stored item that the crawler fetched less than ``max_age`` seconds ago is not fetched again, but its
  stored ``kids`` are still followed, so an interrupted tree crawl resumes too.

At most ``concurrency`` requests are in flight (that many workers, one request each). Network errors, timeouts,
429 and 5xx are retried with exponential backoff and jitter; an item that still fails is logged, counted and left
not done, for the next run to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tqdm import tqdm

from training.store import ItemStore, item_row

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://hacker-news.firebaseio.com/v0"
API_BASE_ENV = "HNAAS_HN_API_BASE"
STORY_LISTS = ("top", "new", "best")
USER_AGENT = "hnaas-crawler/0.1"


def api_base(environ: Mapping[str, str] = os.environ) -> str:
    return (environ.get(API_BASE_ENV) or DEFAULT_API_BASE).rstrip("/")


class CrawlError(Exception):
    """A request that failed for good (after its retries, or with a status not worth retrying)."""


@dataclass
class CrawlStats:
    fetched: int = 0  # items received (null ones included)
    stored: int = 0  # rows written
    missing: int = 0  # the API answered null
    skipped: int = 0  # already done (tree crawl: fresh in the store)
    failed: int = 0
    retries: int = 0
    failed_ids: list[int] = field(default_factory=list)  # the first few, for the log


class Crawler:
    """Use as ``async with Crawler(store, base_url) as crawler: await crawler.crawl_range(1, 1000)``."""

    def __init__(self, store: ItemStore, base_url: str = DEFAULT_API_BASE, *, concurrency: int = 16,
                 retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0, timeout: float = 10.0,
                 batch: int = 500, refresh: bool = False, max_age: float = 86400.0, progress: bool | None = None,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.concurrency = max(1, concurrency)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.batch = batch
        self.refresh = refresh
        self.max_age = max_age
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.session = session
        self._own_session = session is None
        self.stats = CrawlStats()

    async def __aenter__(self) -> Crawler:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=self.concurrency)
            self.session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._own_session and self.session is not None:
            await self.session.close()
            self.session = None

    # -- requests --

    async def get_json(self, path: str) -> Any:
        """GET ``{base_url}/{path}`` as JSON, retried; 404 reads as null (as the API answers a missing item)."""
        assert self.session is not None, "use the crawler as an async context manager"
        url = f"{self.base_url}/{path}"
        for attempt in range(self.retries + 1):
            try:
                async with self.session.get(url, timeout=self.timeout) as response:
                    if response.status == 200:
                        return await response.json(content_type=None)
                    if response.status == 404:
                        return None
                    if response.status != 429 and response.status < 500:
                        raise CrawlError(f"{url}: HTTP {response.status}")
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
                problem = f"{type(error).__name__}: {error}"
            if attempt == self.retries:
                raise CrawlError(f"{url}: {problem} (gave up after {attempt + 1} tries)")
            self.stats.retries += 1
            delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
            log.debug("%s: %s, retrying in %.2fs", url, problem, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def fetch_item(self, item_id: int) -> dict[str, Any] | None:
        item = await self.get_json(f"item/{item_id}.json")
        if item is not None and (not isinstance(item, dict) or item.get("id") != item_id):
            raise CrawlError(f"item {item_id}: unexpected answer {str(item)[:100]!r}")
        return item

    async def max_item(self) -> int:
        value = await self.get_json("maxitem.json")
        if not isinstance(value, int):
            raise CrawlError(f"maxitem: unexpected answer {value!r}")
        return value

    async def story_ids(self, kind: str) -> list[int]:
        if kind not in STORY_LISTS:
            raise ValueError(f"story list must be one of {', '.join(STORY_LISTS)}")
        ids = await self.get_json(f"{kind}stories.json")
        if not isinstance(ids, list):
            raise CrawlError(f"{kind}stories: unexpected answer {str(ids)[:100]!r}")
        return [i for i in ids if isinstance(i, int)]

    # -- crawls --

    async def crawl_range(self, lo: int, hi: int) -> CrawlStats:
        """Every item with ``lo <= id <= hi`` not already done."""
        if self.refresh:
            ids: Iterator[int] = iter(range(lo, hi + 1))
            total = max(0, hi - lo + 1)
        else:
            total = self.store.count_pending(lo, hi)
            self.stats.skipped += max(0, hi - lo + 1) - total
            ids = self.store.pending_ids(lo, hi)
        await self._crawl(ids, total, follow_kids=False)
        return self.stats

    async def crawl_last(self, n: int) -> CrawlStats:
        """The newest ``n`` items."""
        top = await self.max_item()
        return await self.crawl_range(max(1, top - n + 1), top)

    async def crawl_stories(self, kind: str, limit: int | None = None) -> CrawlStats:
        """The stories of a list (top, new, best) and their whole comment trees."""
        ids = await self.story_ids(kind)
        if limit is not None:
            ids = ids[:limit]
        await self._crawl(iter(ids), len(ids), follow_kids=True)
        return self.stats

    async def _crawl(self, ids: Iterator[int], total: int, *, follow_kids: bool) -> None:
        run = _Run(self, ids, follow_kids)
        bar = tqdm(total=total, unit="item", file=sys.stderr, disable=not self.progress, dynamic_ncols=True)
        run.bar = bar
        workers = [asyncio.ensure_future(run.worker()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            # Interrupted (cancelled, Ctrl-C) or done: stop the workers, then store what was completed, so that a
            # resumed crawl skips it. Items that were in flight are not done and will be fetched next time.
            for task in workers:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*workers, return_exceptions=True)
            run.flush()
            bar.close()
        s = self.stats
        log.info("crawl: %d fetched, %d stored, %d null, %d skipped, %d failed, %d retries",
                 s.fetched, s.stored, s.missing, s.skipped, s.failed, s.retries)


class _Run:
    """The shared state of one crawl's workers: work to do, results not yet stored."""

    def __init__(self, crawler: Crawler, ids: Iterator[int], follow_kids: bool) -> None:
        self.crawler = crawler
        self.store = crawler.store
        self.stats = crawler.stats
        self.ids = ids
        self.follow_kids = follow_kids
        self.kids: deque[int] = deque()  # discovered while crawling trees, taken before the next listed id
        self.seen: set[int] = set()
        self.busy = 0  # workers holding an item: they may still discover kids
        self.changed = asyncio.Condition()
        self.rows: list[tuple] = []
        self.done: list[int] = []
        self.bar: tqdm | None = None

    def _next_id(self) -> int | None:
        if self.kids:
            return self.kids.popleft()
        if not self.follow_kids:  # a range: ids are distinct already, and there may be millions of them
            return next(self.ids, None)
        for item_id in self.ids:
            if item_id not in self.seen:
                self.seen.add(item_id)
                return item_id
        return None

    async def worker(self) -> None:
        while True:
            item_id = self._next_id()
            if item_id is None:
                if self.busy == 0 or not self.follow_kids:
                    return
                async with self.changed:  # another worker may still find kids: wait for it
                    await self.changed.wait_for(lambda: self.kids or self.busy == 0)
                continue
            self.busy += 1
            try:
                await self._one(item_id)
            finally:
                self.busy -= 1
                if self.follow_kids:
                    async with self.changed:
                        self.changed.notify_all()

    async def _one(self, item_id: int) -> None:
        crawler = self.crawler
        if self.follow_kids and not crawler.refresh:
            stored = self.store.get(item_id)
            if stored is not None and stored.fetched_at is not None \
                    and stored.fetched_at >= time.time() - crawler.max_age:
                self.stats.skipped += 1
                self._add_kids(stored.kids or ())
                self._tick()
                return
        try:
            item = await crawler.fetch_item(item_id)
        except CrawlError as error:
            self.stats.failed += 1
            if len(self.stats.failed_ids) < 100:
                self.stats.failed_ids.append(item_id)
            log.warning("item %d failed: %s", item_id, error)
            self._tick()
            return
        self.stats.fetched += 1
        if item is None:
            self.stats.missing += 1
        else:
            self.rows.append(item_row(item, "crawl", fetched_at=time.time()))
            if self.follow_kids:
                self._add_kids(item.get("kids") or ())
        self.done.append(item_id)
        self._tick()
        if len(self.done) >= crawler.batch:
            # A blocking write on the event loop: a few milliseconds per batch, and it keeps "done" and the items
            # in one transaction.
            self.flush()

    def _add_kids(self, kids: Iterable[int]) -> None:
        new = [k for k in kids if isinstance(k, int) and k not in self.seen]
        self.seen.update(new)
        self.kids.extend(new)
        if new and self.bar is not None:
            self.bar.total += len(new)
            self.bar.refresh()

    def _tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def flush(self) -> None:
        if not self.done and not self.rows:
            return
        rows, done = self.rows, self.done
        self.rows, self.done = [], []
        self.store.upsert_rows(rows, done)
        self.stats.stored += len(rows)
