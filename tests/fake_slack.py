"""A fake Slack on loopback: the Web API methods HNaaS calls, and a Socket Mode websocket that delivers events,
slash commands and button clicks the way Slack frames them.

    fake = await FakeSlack(admins={"UADMIN"}).start()
    settings = Settings(slack_bot_token="xoxb-fake", slack_app_token="xapp-fake", slack_api_base=fake.api_base)
    ...                                    # the real slack-bolt app connects through apps.connections.open
    answer = await fake.command("/hnaas", "Show HN: a title", user="U1", channel="C1")   # the ack's payload
    await fake.event({"type": "message", "channel": "C1", "user": "U1", "text": "<https://x.com>", "ts": ...})

Messages the bot posts are kept per channel (``messages``), with their ``thread_ts``; ephemerals, reactions,
deletions and updates are recorded too. ``fail_next(method, error, status=200, retry_after=None)`` makes a method
answer an error (a 429 with ``Retry-After`` when ``error`` is ``"ratelimited"``); ``missing_channels`` answer
``channel_not_found``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
from collections import defaultdict
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

BOT_USER, BOT_ID, TEAM, APP = "UBOT", "BBOT", "T1", "A1"


class FakeSlack:
    def __init__(self, *, admins: set[str] = frozenset()) -> None:
        self.admins = set(admins)
        self.messages: dict[str, list[dict[str, Any]]] = defaultdict(list)  # channel -> the bot's live messages
        self.post_times: dict[str, list[float]] = defaultdict(list)  # channel -> when each post arrived
        self.deleted: list[tuple[str, str]] = []
        self.updated: list[tuple[str, str, str]] = []  # (channel, ts, new text)
        self.ephemeral: list[dict[str, Any]] = []
        self.reactions: dict[tuple[str, str], list[str]] = defaultdict(list)  # (channel, ts) -> names, in order
        self.calls: list[str] = []  # every Web API method called, in order
        self.missing_channels: set[str] = set()
        self.socket_connections = 0
        self._failures: dict[str, list[tuple[str, int, float | None]]] = defaultdict(list)
        self._lost_answers: dict[str, list[tuple[asyncio.Event, asyncio.Event]]] = defaultdict(list)
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)
        self._ws: web.WebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._acks: dict[str, asyncio.Future] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- setup --

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeSlack:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def lose_next_answer(self, method: str) -> tuple[asyncio.Event, asyncio.Event]:
        """The next call of ``method`` takes effect, then hangs until ``release`` is set and fails with a 503:
        (stalled, release)."""
        events = (asyncio.Event(), asyncio.Event())
        self._lost_answers[method].append(events)
        return events

    def fail_next(self, method: str, error: str, *, status: int = 200, retry_after: float | None = None,
                  times: int = 1) -> None:
        self._failures[method].extend([(error, status, retry_after)] * times)

    # -- what the bot did --

    def all_messages(self) -> list[dict[str, Any]]:
        return [m for channel in self.messages.values() for m in channel]

    def thread(self, channel: str, ts: str) -> list[dict[str, Any]]:
        """The replies in the thread under ``ts``, in order."""
        return [m for m in self.messages[channel] if m.get("thread_ts") == ts and m["ts"] != ts]

    def headers(self, channel: str) -> list[dict[str, Any]]:
        """The bot's messages that carry buttons (story headers)."""
        return [m for m in self.messages[channel] if any(b["type"] == "actions" for b in m.get("blocks") or [])]

    def ephemeral_to(self, user: str) -> list[str]:
        return [e["text"] for e in self.ephemeral if e["user"] == user]

    async def wait_until(self, predicate, timeout: float = 10, what: str = "the condition") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    # -- what Slack sends --

    async def send(self, kind: str, payload: dict[str, Any], *, retry_attempt: int = 0,
                   accepts_response_payload: bool = False) -> dict[str, Any] | None:
        """Deliver one Socket Mode envelope and wait for its acknowledgement; the ack's payload."""
        await asyncio.wait_for(self._connected.wait(), 10)
        envelope_id = f"env-{next(self._ids)}"
        ack = self._acks[envelope_id] = asyncio.get_running_loop().create_future()
        await self._ws.send_json({"envelope_id": envelope_id, "type": kind, "payload": payload,
                                  "accepts_response_payload": accepts_response_payload,
                                  "retry_attempt": retry_attempt, "retry_reason": "timeout" if retry_attempt else ""})
        return await asyncio.wait_for(ack, 10)

    def event_body(self, event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        return {"token": "verification", "team_id": TEAM, "api_app_id": APP, "type": "event_callback",
                "event": {"event_ts": event.get("ts"), **event}, "event_id": event_id or f"Ev{next(self._ids)}",
                "event_time": int(time.time()),
                "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": True}]}

    async def event(self, event: dict[str, Any], *, event_id: str | None = None, retry_attempt: int = 0) -> None:
        await self.send("events_api", self.event_body(event, event_id), retry_attempt=retry_attempt)

    def new_ts(self) -> str:
        return f"{1_700_000_000 + next(self._ts)}.000100"

    async def user_message(self, text: str, *, user: str = "U1", channel: str = "C1", mention: bool = False,
                           thread_ts: str | None = None) -> str:
        """A member's message as Slack delivers it: a ``message`` event, and an ``app_mention`` as well when it
        mentions the bot. Its ts."""
        ts = self.new_ts()
        event = {"type": "message", "channel": channel, "channel_type": "channel", "user": user, "text": text,
                 "ts": ts, "team": TEAM}
        if thread_ts:
            event["thread_ts"] = thread_ts
        await self.event(event)
        if mention:
            await self.event({**event, "type": "app_mention"})
        return ts

    def command_body(self, text: str, *, user: str, channel: str) -> dict[str, Any]:
        return {"token": "verification", "team_id": TEAM, "team_domain": "fake", "channel_id": channel,
                "channel_name": "general", "user_id": user, "user_name": user.lower(), "command": "/hnaas",
                "text": text, "api_app_id": APP, "response_url": f"http://127.0.0.1:{self.port}/respond",
                "trigger_id": f"trigger-{next(self._ids)}"}

    async def command(self, text: str, *, user: str = "U1", channel: str = "C1") -> str:
        """``/hnaas text``; the text of the ack (what the member sees at once)."""
        ack = await self.send("slash_commands", self.command_body(text, user=user, channel=channel),
                              accepts_response_payload=True)
        return (ack or {}).get("text", "")

    async def click(self, action_id: str, value: str, *, user: str = "U1", channel: str = "C1") -> None:
        await self.send("interactive", {
            "type": "block_actions", "team": {"id": TEAM}, "user": {"id": user}, "api_app_id": APP,
            "channel": {"id": channel}, "container": {"type": "message", "channel_id": channel},
            "trigger_id": f"trigger-{next(self._ids)}", "response_url": f"http://127.0.0.1:{self.port}/respond",
            "actions": [{"action_id": action_id, "block_id": "b", "value": value, "type": "button",
                         "action_ts": str(time.time())}]})

    async def refresh_connection(self) -> None:
        """What Slack does every few hours: ask the client to reconnect, then drop the socket."""
        ws = self._ws
        await ws.send_json({"type": "disconnect", "reason": "refresh_requested"})
        await ws.close()

    # -- the Web API --

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        self.calls.append(method)
        args: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            args.update(await request.json())
        elif request.method == "POST":
            args.update(await request.post())
        if self._failures[method]:
            error, status, retry_after = self._failures[method].pop(0)
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return web.json_response({"ok": False, "error": error}, status=status, headers=headers)
        channel = args.get("channel")
        if channel in self.missing_channels:
            return web.json_response({"ok": False, "error": "channel_not_found"})
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"}, status=404)
        body = {"ok": True, **handler(args)}
        if self._lost_answers[method]:
            stalled, release = self._lost_answers[method].pop(0)
            stalled.set()  # Slack did it, but the answer never reaches the bot
            await release.wait()
            return web.Response(status=503)
        return web.json_response(body)

    def _auth_test(self, args) -> dict:
        return {"url": "https://fake.slack.com/", "team": "Fake", "user": "hnaas", "team_id": TEAM,
                "user_id": BOT_USER, "bot_id": BOT_ID}

    def _apps_connections_open(self, args) -> dict:
        return {"url": f"ws://127.0.0.1:{self.port}/socket"}

    def _chat_postMessage(self, args) -> dict:
        ts = self.new_ts()
        blocks = args.get("blocks")
        message = {"ts": ts, "channel": args["channel"], "text": args.get("text", ""), "bot_id": BOT_ID,
                   "thread_ts": args.get("thread_ts"), "unfurl_links": args.get("unfurl_links"),
                   "blocks": json.loads(blocks) if isinstance(blocks, str) else blocks}
        self.messages[args["channel"]].append(message)
        self.post_times[args["channel"]].append(time.monotonic())
        return {"channel": args["channel"], "ts": ts, "message": message}

    def _find(self, channel: str, ts: str) -> dict | None:
        return next((m for m in self.messages[channel] if m["ts"] == ts), None)

    def _conversations_history(self, args) -> dict:
        newest_first = [m for m in reversed(self.messages[args["channel"]]) if not m.get("thread_ts")]
        return {"messages": newest_first[: int(args.get("limit", 100))]}

    def _conversations_replies(self, args) -> dict:
        thread = [m for m in self.messages[args["channel"]] if m.get("thread_ts") == args["ts"]]
        return {"messages": thread[: int(args.get("limit", 100))]}

    def _chat_update(self, args) -> dict:
        message = self._find(args["channel"], args["ts"])
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        message["text"] = args.get("text", "")
        self.updated.append((args["channel"], args["ts"], message["text"]))
        return {"channel": args["channel"], "ts": args["ts"]}

    def _chat_delete(self, args) -> dict:
        message = self._find(args["channel"], args["ts"])
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        self.messages[args["channel"]].remove(message)
        self.deleted.append((args["channel"], args["ts"]))
        return {"channel": args["channel"], "ts": args["ts"]}

    def _chat_postEphemeral(self, args) -> dict:
        self.ephemeral.append({"channel": args["channel"], "user": args["user"], "text": args.get("text", ""),
                               "thread_ts": args.get("thread_ts")})
        return {"message_ts": self.new_ts()}

    def _chat_getPermalink(self, args) -> dict:
        return {"channel": args["channel"],
                "permalink": f"https://fake.slack.com/archives/{args['channel']}/p{args['message_ts'].replace('.', '')}"}

    def _reactions_add(self, args) -> dict:
        names = self.reactions[(args["channel"], args["timestamp"])]
        if args["name"] in names:
            return {"ok": False, "error": "already_reacted"}
        names.append(args["name"])
        return {}

    def _reactions_remove(self, args) -> dict:
        names = self.reactions[(args["channel"], args["timestamp"])]
        if args["name"] not in names:
            return {"ok": False, "error": "no_reaction"}
        names.remove(args["name"])
        return {}

    def _users_info(self, args) -> dict:
        user = args["user"]
        return {"user": {"id": user, "name": user.lower(), "is_admin": user in self.admins, "is_owner": False}}

    # -- Socket Mode --

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._ws = ws
        self.socket_connections += 1
        await ws.send_json({"type": "hello", "num_connections": 1, "connection_info": {"app_id": APP},
                            "debug_info": {"host": "fake", "approximate_connection_time": 3600}})
        self._connected.set()
        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(frame.data)
            ack = self._acks.pop(data.get("envelope_id"), None)
            if ack is not None and not ack.done():
                ack.set_result(data.get("payload"))
        self._connected.clear()
        return ws


def signed(body: dict[str, Any], secret: str, *, timestamp: int | None = None, form: bool = False,
           ) -> tuple[bytes, dict[str, str]]:
    """A request body as Slack signs it for HTTP mode (``v0`` HMAC-SHA256 of ``v0:timestamp:body``)."""
    raw = (urlencode(body) if form else json.dumps(body)).encode()
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"v0:{timestamp}:".encode() + raw, hashlib.sha256).hexdigest()
    content_type = "application/x-www-form-urlencoded" if form else "application/json"
    return raw, {"X-Slack-Request-Timestamp": str(timestamp), "X-Slack-Signature": f"v0={digest}",
                 "Content-Type": content_type}
