"""A fake HN Firebase API on loopback, for tests of anything that reads HN (crawler, link resolution, roundups).

    hn = FakeHN({1: {"id": 1, "type": "story", "title": "Hi", "kids": [2]}, 2: {...}}, topstories=[1])
    base = await hn.start()          # "http://127.0.0.1:PORT/v0", what HNAAS_HN_API_BASE would be
    ...
    await hn.close()

Serves ``/v0/item/{id}.json`` (unknown ids answer ``null``, as the real API does), ``/v0/maxitem.json`` and
``/v0/{top,new,best}stories.json``. Records every request (``requests``, ``item_requests``) and the most requests
in flight at once (``max_in_flight``). Failures can be injected: ``fail_next(key, status, times)`` answers an error
status, ``hang_next(key, seconds, times)`` answers late (a client timeout), ``flaky`` fails that share of item
requests with a 500 (seeded, so a test is repeatable). ``key`` is an item id or a path name such as
``"topstories"`` or ``"maxitem"``. ``delay`` slows every answer down (to make requests overlap).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

from aiohttp import web

Key = int | str


class FakeHN:
    def __init__(self, items: dict[int, dict[str, Any] | None], topstories: list[int] | None = None, *,
                 newstories: list[int] | None = None, beststories: list[int] | None = None,
                 maxitem: int | None = None, delay: float = 0.0, flaky: float = 0.0, seed: int = 0) -> None:
        self.items = items
        self.lists = {"topstories": list(topstories or []), "newstories": list(newstories or []),
                      "beststories": list(beststories or [])}
        self.maxitem = maxitem
        self.delay = delay
        self.flaky = flaky
        self.random = random.Random(seed)
        self.requests: list[str] = []  # every path asked for, in order
        self.item_requests: list[int] = []  # item ids asked for, in order (repeats included)
        self.in_flight = 0
        self.max_in_flight = 0
        self._failures: dict[Key, list[tuple[str, float | int]]] = {}
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # -- failure injection --

    def fail_next(self, key: Key, status: int = 500, times: int = 1) -> None:
        """The next ``times`` requests for ``key`` answer ``status``."""
        self._failures.setdefault(key, []).extend([("status", status)] * times)

    def hang_next(self, key: Key, seconds: float = 5.0, times: int = 1) -> None:
        """The next ``times`` requests for ``key`` wait ``seconds`` before answering (longer than a client timeout)."""
        self._failures.setdefault(key, []).extend([("hang", seconds)] * times)

    # -- inspection --

    def served(self, item_id: int) -> int:
        """How many times an item was asked for."""
        return self.item_requests.count(item_id)

    def repeated(self) -> dict[int, int]:
        """Item ids asked for more than once, with their counts."""
        return {i: n for i, n in Counter(self.item_requests).items() if n > 1}

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        """Until at least ``n`` item requests have arrived."""
        assert self._changed is not None, "start() first"
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.item_requests) >= n), timeout)

    # -- server --

    async def start(self) -> str:
        self._changed = asyncio.Condition()
        app = web.Application()
        app.router.add_get("/v0/item/{id}.json", self._item)
        app.router.add_get("/v0/maxitem.json", self._maxitem)
        app.router.add_get("/v0/{name:(top|new|best)stories}.json", self._list)
        # A short shutdown_timeout: a test closing the server must not wait for a hung answer to finish.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v0"
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeHN:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _answer(self, request: web.Request, key: Key, value: Any) -> web.Response:
        self.requests.append(request.path)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if isinstance(key, int):
                self.item_requests.append(key)
                assert self._changed is not None
                async with self._changed:
                    self._changed.notify_all()
            if self.delay:
                await asyncio.sleep(self.delay)
            pending = self._failures.get(key)
            if pending:
                kind, arg = pending.pop(0)
                if kind == "status":
                    return web.Response(status=int(arg), text="injected failure")
                await asyncio.sleep(arg)
            elif isinstance(key, int) and self.flaky and self.random.random() < self.flaky:
                return web.Response(status=500, text="flaky")
            return web.Response(text=json.dumps(value), content_type="application/json")
        finally:
            self.in_flight -= 1

    async def _item(self, request: web.Request) -> web.Response:
        try:
            item_id = int(request.match_info["id"])
        except ValueError:
            return web.Response(status=400, text="bad id")
        return await self._answer(request, item_id, self.items.get(item_id))

    async def _maxitem(self, request: web.Request) -> web.Response:
        value = self.maxitem if self.maxitem is not None else max(self.items, default=0)
        return await self._answer(request, "maxitem", value)

    async def _list(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return await self._answer(request, name, self.lists[name])
