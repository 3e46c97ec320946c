"""A fake Discord on loopback: enough of REST API v10 and the gateway for the real discord.py client.

Start it, point discord.py at it (``pointed_at(fake)`` moves ``Route.BASE`` and restores it), then drive it like a
guild: ``send_message`` dispatches MESSAGE_CREATE, ``slash_command`` and ``click_button`` dispatch
INTERACTION_CREATE. Every REST request is recorded (``fake.requests``) for assertions; ``fake.messages`` holds the
channel state as Discord would (content, reply references, thread ids).

It also serves web pages (``page_url("A-story")`` has the title "A story") for links members paste.

Failure controls: ``rate_limit(channel_id, n)`` answers the next n message creates there with 429 (with
``Retry-After``, a JSON ``retry_after`` and a ``Via`` header, as discord.py needs to retry); ``forbid(channel_id)``
answers writes with 403 / 50013; ``delete_channel(channel_id)`` with 404 / 10003.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from aiohttp import WSMsgType, web

API = "/api/v10"
APP_ID = "1100000000000000001"
BOT_ID = APP_ID  # a bot user shares its application's id
GUILD_ID = "1100000000000000002"
BOT_ROLE_ID = "1100000000000000003"
OWNER_ID = "1100000000000000004"

# Permission bits (https://discord.com/developers/docs/topics/permissions)
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
READ_MESSAGE_HISTORY = 1 << 16
ADD_REACTIONS = 1 << 6
MANAGE_CHANNELS = 1 << 4
CREATE_PUBLIC_THREADS = 1 << 35
SEND_MESSAGES_IN_THREADS = 1 << 38
BOT_PERMISSIONS = (VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | READ_MESSAGE_HISTORY | ADD_REACTIONS
                   | CREATE_PUBLIC_THREADS | SEND_MESSAGES_IN_THREADS)
MEMBER_PERMISSIONS = VIEW_CHANNEL | SEND_MESSAGES | READ_MESSAGE_HISTORY | ADD_REACTIONS | SEND_MESSAGES_IN_THREADS
ADMIN_PERMISSIONS = MEMBER_PERMISSIONS | MANAGE_MESSAGES | MANAGE_CHANNELS

USER_OPTION, CHANNEL_OPTION = 6, 7  # application command option types

DISCORD_EPOCH_MS = 1420070400000
EPHEMERAL = 1 << 6  # message flag
JSON = "application/json"  # discord.py checks the content type exactly


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class Recorded:
    method: str
    path: str  # without the /api/v10 prefix
    query: dict[str, str]
    body: Any  # parsed JSON, or None
    headers: dict[str, str]
    status: int = 0


@dataclass
class Channel:
    id: str
    name: str
    type: int = 0  # 0 text, 11 public thread, 1 DM
    parent_id: str | None = None
    owner_id: str | None = None
    forbidden: bool = False
    deleted: bool = False
    archived: bool = False
    rate_limits: int = 0  # message creates still to answer with 429
    retry_after: float = 0.2
    messages: list[str] = field(default_factory=list)  # message ids in order


class FakeDiscord:
    def __init__(self) -> None:
        self._last_id = 0
        self.requests: list[Recorded] = []
        self.channels: dict[str, Channel] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.reactions: dict[str, set[str]] = {}  # message id -> emoji the bot has on it
        self.commands: list[dict[str, Any]] = []  # the global application commands, as last PUT
        self.interactions: dict[str, dict[str, Any]] = {}  # token -> {"response": ..., "original": msg id}
        self.identifies: list[dict[str, Any]] = []
        self.users: dict[str, dict[str, Any]] = {}
        self.bot_user = self._user(BOT_ID, "HNaaS", bot=True)
        self.owner = self.user(OWNER_ID, "owner")
        self._nonces: dict[str, str] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.general = self.add_channel("general").id
        # called with each request before it is served; a hook returning a response (or awaitable) answers it
        self.fault_hooks: list[Callable[[Recorded], Any]] = []

    # --- setup --------------------------------------------------------------------------------------------------

    def new_id(self) -> str:
        """A snowflake for now: discord.py reads times from ids (an interaction's token expires 15 min after)."""
        snowflake = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last_id = max(snowflake, self._last_id + 1)
        return str(self._last_id)

    def _user(self, user_id: str, name: str, *, bot: bool = False) -> dict[str, Any]:
        user = {"id": user_id, "username": name, "discriminator": "0", "global_name": name, "avatar": None,
                "bot": bot, "public_flags": 0, "flags": 0}
        self.users[user_id] = user
        return user

    def user(self, user_id: str | None = None, name: str = "member") -> dict[str, Any]:
        return self._user(user_id or self.new_id(), name)

    def add_channel(self, name: str, *, forbidden: bool = False) -> Channel:
        channel = Channel(self.new_id(), name, forbidden=forbidden)
        self.channels[channel.id] = channel
        return channel

    def forbid(self, channel_id: str) -> None:
        self.channels[channel_id].forbidden = True

    def delete_channel(self, channel_id: str) -> None:
        self.channels[channel_id].deleted = True

    def rate_limit(self, channel_id: str, count: int = 1, retry_after: float = 0.2) -> None:
        self.channels[channel_id].rate_limits = count
        self.channels[channel_id].retry_after = retry_after

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}{API}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/web/{slug}", self._page)
        app.router.add_route("*", API + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def page_url(self, slug: str) -> str:
        """A web page on loopback whose <title> is the slug with spaces, for links members paste."""
        return f"http://127.0.0.1:{self.port}/web/{slug}"

    async def _page(self, request: web.Request) -> web.Response:
        title = request.match_info["slug"].replace("-", " ")
        return web.Response(text=f"<html><head><title>{title}</title></head><body>hi</body></html>",
                            content_type="text/html")

    # --- payloads -----------------------------------------------------------------------------------------------

    def channel_payload(self, channel: Channel) -> dict[str, Any]:
        data: dict[str, Any] = {"id": channel.id, "type": channel.type, "name": channel.name, "guild_id": GUILD_ID,
                                "position": 0, "permission_overwrites": [], "nsfw": False, "topic": None,
                                "last_message_id": channel.messages[-1] if channel.messages else None,
                                "rate_limit_per_user": 0, "flags": 0}
        if channel.forbidden and channel.type == 0:
            # what makes Discord answer 403: the bot's role may not send or start threads here
            deny = SEND_MESSAGES | CREATE_PUBLIC_THREADS | SEND_MESSAGES_IN_THREADS | ADD_REACTIONS
            data["permission_overwrites"] = [{"id": BOT_ROLE_ID, "type": 0, "allow": "0", "deny": str(deny)}]
        if channel.type == 11:
            data.update(parent_id=channel.parent_id, owner_id=channel.owner_id, message_count=len(channel.messages),
                        member_count=1, total_message_sent=len(channel.messages),
                        thread_metadata={"archived": channel.archived, "auto_archive_duration": 1440,
                                         "archive_timestamp": now_iso(), "locked": False})
        return data

    def guild_payload(self) -> dict[str, Any]:
        everyone = {"id": GUILD_ID, "name": "@everyone", "permissions": str(MEMBER_PERMISSIONS), "position": 0,
                    "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}
        bot_role = {"id": BOT_ROLE_ID, "name": "HNaaS", "permissions": str(BOT_PERMISSIONS), "position": 1,
                    "color": 0, "hoist": False, "managed": True, "mentionable": False, "flags": 0,
                    "tags": {"bot_id": BOT_ID}}
        me = {"user": self.bot_user, "roles": [BOT_ROLE_ID], "joined_at": now_iso(), "deaf": False, "mute": False,
              "flags": 0, "nick": None}
        channels = [self.channel_payload(c) for c in self.channels.values() if c.type == 0 and not c.deleted]
        return {"id": GUILD_ID, "name": "Fake Guild", "icon": None, "owner_id": OWNER_ID, "roles": [everyone, bot_role],
                "channels": channels, "threads": [], "members": [me], "member_count": 2, "features": [],
                "emojis": [], "stickers": [], "voice_states": [], "presences": [], "large": False,
                "unavailable": False, "joined_at": now_iso(), "verification_level": 0, "mfa_level": 0,
                "premium_tier": 0, "preferred_locale": "en-US", "system_channel_flags": 0, "nsfw_level": 0}

    def member_payload(self, user: dict[str, Any], permissions: int) -> dict[str, Any]:
        return {"user": user, "roles": [], "joined_at": now_iso(), "deaf": False, "mute": False, "flags": 0,
                "nick": None, "permissions": str(permissions)}

    def _message(self, channel: Channel, author: dict[str, Any], content: str, **extra: Any) -> dict[str, Any]:
        message = {"id": self.new_id(), "channel_id": channel.id, "guild_id": GUILD_ID, "author": author,
                   "content": content, "timestamp": now_iso(), "edited_timestamp": None, "tts": False,
                   "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
                   "pinned": False, "type": 0, "flags": 0, "components": [], **extra}
        self.messages[message["id"]] = message
        if not message["flags"] & EPHEMERAL:  # only the member sees those: not part of the channel
            channel.messages.append(message["id"])
        return message

    # --- queries for tests --------------------------------------------------------------------------------------

    def channel_messages(self, channel_id: str) -> list[dict[str, Any]]:
        return [self.messages[m] for m in self.channels[channel_id].messages if m in self.messages]

    def calls(self, method: str, path_contains: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == method and path_contains in r.path]

    def creates(self, channel_id: str | None = None) -> list[Recorded]:
        """Message-create requests (in one channel, or anywhere), whatever their answer."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/messages")
                and r.path.startswith(f"/channels/{channel_id or ''}")]

    def threads(self) -> list[Channel]:
        return [c for c in self.channels.values() if c.type == 11]

    async def wait_until(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    # --- gateway ------------------------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        try:
            await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                op = payload.get("op")
                if op == 1:
                    await ws.send_json({"op": 11, "d": None, "s": None, "t": None})
                elif op == 2:
                    self.identifies.append(payload["d"])
                    await self._identified(ws, payload["d"])
                elif op == 6:  # resume: not supported here, so start a fresh session
                    await ws.send_json({"op": 9, "d": False, "s": None, "t": None})
        finally:
            if ws in self._sockets:
                self._sockets.remove(ws)
        return ws

    async def _send_dispatch(self, ws: web.WebSocketResponse, event: str, data: dict[str, Any]) -> None:
        self._seq += 1
        await ws.send_json({"op": 0, "t": event, "s": self._seq, "d": data})

    async def _identified(self, ws: web.WebSocketResponse, identify: dict[str, Any]) -> None:
        shard = identify.get("shard", [0, 1])
        ready = {"v": 10, "user": self.bot_user, "guilds": [{"id": GUILD_ID, "unavailable": True}],
                 "session_id": self.new_id(), "resume_gateway_url": self.gateway_url, "shard": shard,
                 "application": {"id": APP_ID, "flags": 0}, "private_channels": [], "relationships": []}
        await self._send_dispatch(ws, "READY", ready)
        await self._send_dispatch(ws, "GUILD_CREATE", self.guild_payload())

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        for ws in list(self._sockets):
            if not ws.closed:
                await self._send_dispatch(ws, event, data)

    @property
    def connected(self) -> int:
        return sum(1 for ws in self._sockets if not ws.closed)

    async def send_message(self, channel_id: str, author: dict[str, Any], content: str, *,
                           mention_bot: bool = False) -> dict[str, Any]:
        """A member posts a message: stored, then dispatched as MESSAGE_CREATE."""
        channel = self.channels[channel_id]
        if mention_bot:
            content = f"<@{BOT_ID}> {content}"
        message = self._message(channel, author, content,
                                mentions=[self.bot_user] if f"<@{BOT_ID}>" in content else [],
                                member={"roles": [], "joined_at": now_iso(), "deaf": False, "mute": False,
                                        "flags": 0})
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    def _interaction(self, kind: int, channel_id: str, user: dict[str, Any], data: dict[str, Any],
                     permissions: int, **extra: Any) -> dict[str, Any]:
        channel = self.channels[channel_id]
        token = "tok-" + self.new_id()
        interaction = {"id": self.new_id(), "application_id": APP_ID, "type": kind, "data": data,
                       "guild_id": GUILD_ID, "channel_id": channel_id, "channel": self.channel_payload(channel),
                       "member": self.member_payload(user, permissions), "token": token, "version": 1,
                       "app_permissions": str(0 if channel.forbidden else BOT_PERMISSIONS), "locale": "en-US",
                       "guild_locale": "en-US", "entitlements": [], "authorizing_integration_owners": {"0": GUILD_ID},
                       "context": 0, "attachment_size_limit": 8 * 1024 * 1024, **extra}
        self.interactions[token] = {"interaction": interaction, "responses": [], "original": None, "followups": []}
        return interaction

    async def slash_command(self, channel_id: str, user: dict[str, Any], path: str, *,
                            permissions: int = MEMBER_PERMISSIONS, **options: Any) -> str:
        """Invoke a registered command, e.g. ``slash_command(ch, user, "hnaas generate", title_or_url="x")``. A user
        option takes a user payload (``fake.user()``), a channel option a channel id.

        Option types come from the commands the bot registered, as Discord would send them. Returns the token.
        """
        names = path.split()
        command = next((c for c in self.commands if c["name"] == names[0]), None)
        if command is None:
            raise AssertionError(f"/{names[0]} was never registered (commands: {[c['name'] for c in self.commands]})")
        data: dict[str, Any] = {"id": command["id"], "name": names[0], "type": 1}
        node, holder = command, data
        for name in names[1:]:
            node = next(o for o in node.get("options", []) if o["name"] == name)
            inner = {"name": name, "type": node["type"]}
            holder["options"] = [inner]
            holder = inner
        declared = {o["name"]: o for o in node.get("options", [])}
        holder["options"] = holder.get("options", [])
        resolved: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            if name not in declared:
                raise AssertionError(f"/{path} has no option {name!r}")
            kind = declared[name]["type"]
            if kind == USER_OPTION:  # given as a user payload; Discord sends the id and the resolved user/member
                member = self.member_payload(value, MEMBER_PERMISSIONS)
                del member["user"]
                resolved.setdefault("users", {})[value["id"]] = value
                resolved.setdefault("members", {})[value["id"]] = member
                value = value["id"]
            elif kind == CHANNEL_OPTION:  # given as a channel id
                channel = self.channel_payload(self.channels[value])
                resolved.setdefault("channels", {})[value] = {
                    key: channel[key] for key in ("id", "name", "type", "parent_id", "thread_metadata")
                    if key in channel} | {"permissions": str(MEMBER_PERMISSIONS)}
            holder["options"].append({"name": name, "type": kind, "value": value})
        if resolved:
            data["resolved"] = resolved
        interaction = self._interaction(2, channel_id, user, data, permissions)
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction["token"]

    async def click_button(self, message_id: str, user: dict[str, Any], custom_id: str, *,
                           permissions: int = MEMBER_PERMISSIONS) -> str:
        message = self.messages[message_id]
        interaction = self._interaction(3, message["channel_id"], user,
                                        {"custom_id": custom_id, "component_type": 2}, permissions, message=message)
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction["token"]

    def custom_ids(self, message_id: str) -> list[str]:
        return [c["custom_id"] for row in self.messages[message_id].get("components", [])
                for c in row.get("components", []) if "custom_id" in c]

    # --- REST ---------------------------------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body = None
        if request.can_read_body:
            raw = await request.read()
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
        rec = Recorded(request.method, path, dict(request.query), body, dict(request.headers))
        self.requests.append(rec)
        response = None
        for hook in self.fault_hooks:
            response = hook(rec)
            if inspect.isawaitable(response):
                response = await response
            if response is not None:
                break
        if response is None:
            try:
                response = self._route(rec)
            except KeyError:
                response = error(404, 0, "404: Not Found")
        rec.status = response.status
        return response

    def _route(self, r: Recorded) -> web.Response:
        parts = [unquote(p) for p in r.path.strip("/").split("/")]
        m, n = r.method, len(parts)
        if parts == ["gateway"]:
            return ok({"url": self.gateway_url})
        if parts == ["gateway", "bot"]:
            return ok({"url": self.gateway_url, "shards": 1, "session_start_limit": {
                "total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}})
        if parts == ["users", "@me"]:
            return ok(self.bot_user)
        if parts == ["users", "@me", "channels"] and m == "POST":
            return self._open_dm(str(r.body["recipient_id"]))
        if parts in (["oauth2", "applications", "@me"], ["applications", "@me"]):
            return ok({"id": APP_ID, "name": "HNaaS", "icon": None, "description": "", "bot_public": True,
                       "bot_require_code_grant": False, "owner": self.owner, "verify_key": "0" * 64, "flags": 0,
                       "team": None, "summary": "", "rpc_origins": [], "interactions_endpoint_url": None})
        if parts[0] == "applications" and parts[-1] == "commands":
            if m == "PUT":
                self.commands = [{**c, "id": self.new_id(), "application_id": APP_ID, "version": self.new_id()}
                                 for c in r.body]
            return ok(self.commands)
        if parts[0] == "channels":
            return self._channel_route(r, parts)
        if parts[0] == "interactions" and n == 4 and parts[3] == "callback":
            return self._callback(parts[2], r.body)
        if parts[0] == "webhooks" and n >= 3:
            return self._webhook(r, parts)
        raise KeyError(r.path)

    def _channel_route(self, r: Recorded, parts: list[str]) -> web.Response:
        m, n = r.method, len(parts)
        channel = self.channels[parts[1]]
        if channel.deleted:
            return error(404, 10003, "Unknown Channel")
        writes = m != "GET"
        if writes and self._forbidden(channel):
            return error(403, 50013, "Missing Permissions")
        if n == 2:
            if m == "GET":
                return ok(self.channel_payload(channel))
            if m == "PATCH":
                channel.archived = bool(r.body.get("archived", channel.archived))
                return ok(self.channel_payload(channel))
            if m == "DELETE":
                channel.deleted = True
                return ok(self.channel_payload(channel))
        if parts[2] == "messages":
            if n == 3 and m == "POST":
                return self._create_message(channel, r)
            if n == 3 and m == "GET":
                return self._list_messages(channel, r.query)
            message = self.messages.get(parts[3])
            if message is None or message["channel_id"] != channel.id:
                return error(404, 10008, "Unknown Message")
            if n == 4:
                if m == "GET":
                    return ok(message)
                if m == "PATCH":
                    message.update({k: v for k, v in r.body.items() if k in ("content", "components", "embeds")},
                                   edited_timestamp=now_iso())
                    return ok(message)
                if m == "DELETE":
                    del self.messages[message["id"]]
                    channel.messages.remove(message["id"])
                    return web.Response(status=204)
            if n == 5 and parts[4] == "threads" and m == "POST":
                return self._start_thread(channel, r.body, message)
            if n == 7 and parts[4] == "reactions" and parts[6] == "@me":
                emoji = parts[5]
                mine = self.reactions.setdefault(message["id"], set())
                if m == "PUT":
                    mine.add(emoji)
                else:
                    mine.discard(emoji)
                return web.Response(status=204)
        if n == 3 and parts[2] == "threads" and m == "POST":
            return self._start_thread(channel, r.body, None)
        raise KeyError(r.path)

    def _forbidden(self, channel: Channel) -> bool:
        if channel.forbidden:
            return True
        return channel.parent_id is not None and self.channels[channel.parent_id].forbidden

    def _create_message(self, channel: Channel, r: Recorded) -> web.Response:
        body = r.body or {}
        if channel.rate_limits > 0:
            channel.rate_limits -= 1
            retry = channel.retry_after
            return ok({"message": "You are being rate limited.", "retry_after": retry, "global": False}, status=429,
                      headers={"Retry-After": str(retry), "Via": "1.1 google", "X-RateLimit-Scope": "user",
                               "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                               "X-RateLimit-Reset-After": str(retry), "X-RateLimit-Bucket": "fake-bucket"})
        content = body.get("content") or ""
        if len(content) > 2000:
            return error(400, 50035, "Invalid Form Body",
                         {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH",
                                                   "message": "Must be 2000 or fewer in length."}]}})
        nonce = body.get("nonce")
        if nonce and body.get("enforce_nonce") and nonce in self._nonces:
            return ok(self.messages[self._nonces[nonce]])
        extra: dict[str, Any] = {"components": body.get("components", [])}
        ref = body.get("message_reference")
        if ref:
            target = self.messages.get(str(ref.get("message_id")))
            if target is None or target["channel_id"] != channel.id:
                if ref.get("fail_if_not_exists", True):
                    return error(400, 50035, "Invalid Form Body",
                                 {"message_reference": {"_errors": [{"code": "REPLIES_UNKNOWN_MESSAGE",
                                                                     "message": "Unknown message"}]}})
            else:
                extra.update(type=19, message_reference={"message_id": target["id"], "channel_id": channel.id,
                                                         "guild_id": GUILD_ID})
        if nonce:
            extra["nonce"] = nonce
        message = self._message(channel, self.bot_user, content, **extra)
        if nonce:
            self._nonces[nonce] = message["id"]
        asyncio.get_running_loop().create_task(self.dispatch("MESSAGE_CREATE", message))
        return ok(message)

    def _list_messages(self, channel: Channel, query: dict[str, str]) -> web.Response:
        ids = list(channel.messages)
        limit = int(query.get("limit", 50))
        if "after" in query:
            ids = [i for i in ids if int(i) > int(query["after"])][:limit]
            ids.reverse()
        else:
            if "before" in query:
                ids = [i for i in ids if int(i) < int(query["before"])]
            ids = ids[-limit:][::-1]
        return ok([self.messages[i] for i in ids if i in self.messages])  # newest first, like Discord

    def _start_thread(self, channel: Channel, body: dict[str, Any], message: dict[str, Any] | None) -> web.Response:
        name = (body or {}).get("name", "")
        if not 1 <= len(name) <= 100:
            return error(400, 50035, "Invalid Form Body", {"name": {"_errors": [{"code": "BASE_TYPE_BAD_LENGTH"}]}})
        if channel.type != 0:
            return error(400, 50024, "Cannot execute action on this channel type")
        if message is not None and message["id"] in self.channels:
            return error(400, 160004, "A thread has already been created for this message")
        thread_id = message["id"] if message is not None else self.new_id()  # a message's thread shares its id
        thread = Channel(thread_id, name, type=11, parent_id=channel.id, owner_id=BOT_ID)
        self.channels[thread_id] = thread
        if message is not None:
            message["thread"] = self.channel_payload(thread)
        payload = self.channel_payload(thread)
        asyncio.get_running_loop().create_task(self.dispatch("THREAD_CREATE", {**payload, "newly_created": True}))
        return ok(payload, status=201)

    def _open_dm(self, recipient_id: str) -> web.Response:
        channel = next((c for c in self.channels.values() if c.type == 1 and c.owner_id == recipient_id), None)
        if channel is None:
            channel = Channel(self.new_id(), "dm", type=1, owner_id=recipient_id)
            self.channels[channel.id] = channel
        user = self.users.get(recipient_id) or self.user(recipient_id)
        return ok({"id": channel.id, "type": 1, "recipients": [user], "last_message_id": None, "flags": 0})

    # --- interactions -------------------------------------------------------------------------------------------

    def _callback(self, token: str, body: dict[str, Any]) -> web.Response:
        state = self.interactions.get(token)
        if state is None:
            return error(404, 10062, "Unknown interaction")
        if state["responses"]:
            return error(400, 40060, "Interaction has already been acknowledged.")
        state["responses"].append(body)
        interaction = state["interaction"]
        kind = body["type"]
        flags = (body.get("data") or {}).get("flags", 0)
        result: dict[str, Any] = {"interaction": {
            "id": interaction["id"], "type": interaction["type"], "response_message_loading": kind == 5,
            "response_message_ephemeral": bool(flags & EPHEMERAL)}}
        if kind in (4, 5):
            content = (body.get("data") or {}).get("content", "")
            message = self._webhook_message(interaction, content, flags, body.get("data") or {})
            state["original"] = message["id"]
            result["interaction"]["response_message_id"] = message["id"]
            result["resource"] = {"type": kind, "message": message}
        return ok(result)

    def _webhook_message(self, interaction: dict[str, Any], content: str, flags: int,
                         data: dict[str, Any]) -> dict[str, Any]:
        channel = self.channels[interaction["channel_id"]]
        return self._message(channel, self.bot_user, content, flags=flags, webhook_id=APP_ID,
                             application_id=APP_ID, components=data.get("components", []),
                             interaction_metadata={"id": interaction["id"], "type": interaction["type"],
                                                   "user": interaction["member"]["user"]})

    def _webhook(self, r: Recorded, parts: list[str]) -> web.Response:
        token = parts[2]
        state = self.interactions.get(token)
        if state is None or not state["responses"]:
            return error(404, 10015, "Unknown Webhook")
        body = r.body or {}
        if len(parts) == 3 and r.method == "POST":  # follow-up
            message = self._webhook_message(state["interaction"], body.get("content", ""), body.get("flags", 0),
                                            body)
            state["followups"].append(message["id"])
            return ok(message)
        if len(parts) == 5 and parts[3] == "messages":
            target = state["original"] if parts[4] == "@original" else parts[4]
            message = self.messages.get(target or "")
            if message is None:
                return error(404, 10008, "Unknown Message")
            if r.method == "PATCH":
                message.update({k: v for k, v in body.items() if k in ("content", "components", "embeds")},
                               edited_timestamp=now_iso())
                return ok(message)
            if r.method == "GET":
                return ok(message)
            if r.method == "DELETE":
                del self.messages[message["id"]]
                with contextlib.suppress(ValueError):
                    self.channels[message["channel_id"]].messages.remove(message["id"])
                return web.Response(status=204)
        raise KeyError(r.path)

    def original_response(self, token: str) -> dict[str, Any] | None:
        original = self.interactions[token]["original"]
        return self.messages.get(original) if original else None

    def callback_types(self, token: str) -> list[int]:
        return [b["type"] for b in self.interactions[token]["responses"]]

    def followups(self, token: str) -> list[dict[str, Any]]:
        return [self.messages[m] for m in self.interactions[token]["followups"] if m in self.messages]


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # body + an explicit header: aiohttp's content_type= would append "; charset=utf-8", which discord.py rejects
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": JSON, **(headers or {})})


def error(status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> web.Response:
    payload: dict[str, Any] = {"message": message, "code": code}
    if errors:
        payload["errors"] = errors
    return ok(payload, status=status)


@contextlib.contextmanager
def pointed_at(fake: FakeDiscord) -> Iterator[None]:
    """Point discord.py's REST (and so its gateway lookup) at the fake; restore the globals afterwards."""
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    saved_base, saved_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = fake.api_base
    try:
        yield
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved_base, saved_gateway
