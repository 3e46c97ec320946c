"""The Slack adapter: the /hnaas command, pasted links, mentions and buttons in; threads out.

``SlackBot`` turns Slack events (through slack-bolt, in Socket Mode or over HTTP) into ``Request``s for the core and
answers members; ``SlackPoster`` is the ``Poster`` the core drives to post a finished thread. The core and the
settings are passed in; nothing here touches SQLite or torch.

How a story looks on Slack:

- the header is a message in the channel, with Regenerate and Delete buttons; every comment is a reply in the
  header's thread (``thread_ts``). Slack threads are one level deep, so the renderer's depth marker in the text
  shows the nesting. A request made inside a thread gets its story in that thread instead;
- a pasted link gets reactions on the member's message (⏳ queued, ✅ posted, ❌ failed); a command is answered
  privately (ephemeral messages), and so are failures.

Slack delivers an event again when it thinks the first delivery was missed, and a message that mentions the bot
arrives twice (``message`` and ``app_mention``): each message is claimed once in the queue (``first_delivery``),
so it never becomes two requests, even across a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.app.async_server import AsyncSlackAppServer
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot import scheduler
from bot.core import LENGTHS, Origin, Posted, Request, length_tokens
from bot.errors import HnaasError, InputRejected, PlatformRefused, PostError
from bot.moderation import PurgeScope
from bot.render import SLACK, format_status

if TYPE_CHECKING:
    from bot.core import Core
    from bot.queue import Job
    from bot.render import RenderedMessage
    from bot.settings import Settings

log = logging.getLogger(__name__)

PLATFORM = "slack"
COMMAND = "/hnaas"
EVENTS_PATH = "/slack/events"
QUEUED, DONE, FAILED = "hourglass_flowing_sand", "white_check_mark", "x"
REGENERATE, DELETE = "hnaas_regenerate", "hnaas_delete"  # action ids; the button's value is the job id
HEADER_LOOKBACK = 50  # recent messages searched for an already-posted header when a post is resumed
SUBMIT_GRACE = 2.0  # seconds a command waits for submit before acknowledging (3 s is Slack's limit)
RATE_LIMIT_RETRIES = 5  # chat.postMessage allows about one message a second per channel: wait out a 429

# Errors that would come back the same on a retry: the job fails with a message instead.
NOT_IN_CHANNEL = {"not_in_channel", "channel_not_found", "is_archived"}
REFUSED = {"msg_too_long", "msg_blocks_too_long", "invalid_blocks", "no_text", "restricted_action",
           "thread_not_found", "cant_reply_to_message"}
BAD_TOKEN = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "missing_scope", "token_expired"}

PURGE_USAGE = ("Use `/hnaas purge` with a request number, a @member or a #channel, and optionally since=2h or "
               "until=2026-12-01 (an age, or a UTC date; with a time: 2026-12-01T14:30).")

HELP = """*HNaaS* writes a Hacker News style discussion of a link or a headline, as a thread.
• `/hnaas <link or headline>`: a discussion in this channel (add `seed=N` to get the same one again, \
`length=short|medium|long`)
• paste a link and mention me, or turn on `/hnaas links on` to have every pasted link answered
• `/hnaas status`: how long the queue is
• `/hnaas cancel <request number>`: cancel one of your requests that hasn't started
Workspace admins: `/hnaas links on|off`, `/hnaas roundup on|off` (a daily discussion of the HN front page here), \
`/hnaas purge <request number | @member | #channel> [since=2h] [until=2026-12-01]`.
Everything I post is AI-generated; the users in it are fictional."""

_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")
_CHANNEL = re.compile(r"<#([CG][A-Z0-9]+)(?:\|[^>]*)?>")


def settings_problem(settings: Settings) -> str | None:
    """What is missing for Slack, or None: checked before anything is loaded."""
    if not settings.slack_bot_token:
        return "SLACK_BOT_TOKEN is not set (the bot token, xoxb-...)"
    if not settings.slack_app_token and not settings.slack_signing_secret:
        return ("Set SLACK_APP_TOKEN (xapp-..., Socket Mode: no public URL needed) or SLACK_SIGNING_SECRET "
                "(HTTP mode: Slack sends events to this server)")
    return None


def web_client(settings: Settings) -> AsyncWebClient:
    """The Web API client: Slack's own retries wait out rate limits (429 + Retry-After) and dropped connections."""
    return AsyncWebClient(token=settings.slack_bot_token, base_url=settings.slack_api_base,
                          retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=RATE_LIMIT_RETRIES),
                                          AsyncConnectionErrorRetryHandler()])


def header_block_id(job_id: int) -> str:
    return f"hnaas_header_{job_id}"


def blocks(text: str, job_id: int | None = None) -> list[dict[str, Any]]:
    """A rendered message as blocks: one mrkdwn section (the renderer keeps it under its 3000 characters), and the
    header's buttons."""
    result: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    if job_id is not None:
        result.append({"type": "actions", "block_id": header_block_id(job_id), "elements": [
            {"type": "button", "action_id": REGENERATE, "value": str(job_id),
             "text": {"type": "plain_text", "text": "Regenerate"}},
            {"type": "button", "action_id": DELETE, "value": str(job_id), "style": "danger",
             "text": {"type": "plain_text", "text": "Delete"}},
        ]})
    return result


def post_error(exc: SlackApiError) -> PostError:
    """Channel and permission errors fail the job; rate limits and server errors are worth another try."""
    code = exc.response.get("error", "") if exc.response is not None else ""
    status = exc.response.status_code if exc.response is not None else 0
    detail = f"{status} {code}"
    if code in NOT_IN_CHANNEL:
        return PostError("I can't post in that channel: invite me to it (`/invite @HNaaS`), then ask again.",
                         detail, permanent=True)
    if code in BAD_TOKEN:
        return PostError("Slack refused my credentials; an admin needs to check the app's token and scopes.",
                         detail, permanent=True)
    if code in REFUSED or (400 <= status < 500 and status != 429):
        return PostError("Slack refused one of the messages.", detail, permanent=True)
    return PostError("Slack had a problem; I'll try again.", detail)


def _user_text(exc: BaseException, doing: str) -> str:
    """What a member reads about an error: its own message, or a generic one (the details go to the log)."""
    if isinstance(exc, HnaasError):
        return exc.user_message
    log.error("%s failed", doing, exc_info=exc)
    return "Something went wrong on my side; please try again later."


# --- the poster ----------------------------------------------------------------------------------------------


class ChannelPacer:
    """Spaces the bot's posts in each channel ``interval`` seconds apart. chat.postMessage allows about one message
    a second per channel: a roundup streams several threads into one channel at once, and without pacing most of
    its posts would come back 429 and wait out Retry-After penalties (or fail). Other channels are not held up."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}  # channel -> the earliest time its next post may go

    async def wait(self, channel: str) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = max(now, self._next.get(channel, 0.0))
        self._next[channel] = at + self.interval  # reserved before sleeping: callers queue in call order
        if at > now:
            await asyncio.sleep(at - now)


class SlackPoster:
    """Posts rendered messages for the core. Generated text reaches Slack escaped (``bot.render``), so it can
    never mention anyone or form a link."""

    platform = PLATFORM
    limits = SLACK

    def __init__(self, client: AsyncWebClient, *, post_interval: float = 1.0) -> None:
        self.client = client
        self.pacer = ChannelPacer(post_interval)

    async def post(self, job: Job, message: RenderedMessage, *, thread_ref: str | None,
                   reply_to: str | None) -> Posted:
        header = message.parent_key is None
        # The header opens the story's thread, unless the request was made inside a thread (threads don't nest).
        thread_ts = job.thread_id if header else (thread_ref or job.thread_id)
        if header and (found := await self._find_header(job)) is not None:
            return Posted(found, thread_ts or found)  # posted before a crash, not recorded: not posted twice
        await self.pacer.wait(job.channel_id)
        try:
            response = await self.client.chat_postMessage(
                channel=job.channel_id, thread_ts=thread_ts, text=message.text,
                blocks=blocks(message.text, job.id if header else None),
                unfurl_links=header, unfurl_media=False)  # the story's link previews; links in comments don't
        except SlackApiError as exc:
            raise post_error(exc) from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise PostError("I couldn't reach Slack; I'll try again.", repr(exc)) from exc
        ts = response["ts"]
        return Posted(ts, (thread_ts or ts) if header else thread_ts)

    async def _find_header(self, job: Job) -> str | None:
        """The ts of this job's header if an earlier attempt already posted it: the bot's recent messages where the
        header goes are searched for its buttons' block id. None when there is none, or they can't be read."""
        wanted = header_block_id(job.id)
        try:
            if job.thread_id:
                response = await self.client.conversations_replies(channel=job.channel_id, ts=job.thread_id,
                                                                   limit=HEADER_LOOKBACK)
            else:
                response = await self.client.conversations_history(channel=job.channel_id, limit=HEADER_LOOKBACK)
        except (SlackApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.debug("could not read %s for job %s's header: %s", job.channel_id, job.id, exc)
            return None
        for message in response.get("messages") or []:
            if message.get("bot_id") and any(b.get("block_id") == wanted for b in message.get("blocks") or []):
                return message["ts"]
        return None

    async def edit(self, job: Job, message_id: str, message: RenderedMessage) -> None:
        """The header of a streamed thread gets its final comment count."""
        try:
            await self.client.chat_update(channel=job.channel_id, ts=message_id, text=message.text,
                                          blocks=blocks(message.text, job.id))
        except SlackApiError as exc:
            raise post_error(exc) from exc

    async def delete(self, job: Job, message_ids: list[str], thread_ref: str | None) -> None:
        """Delete the bot's own messages, replies first (a thread's parent goes last)."""
        for ts in reversed(message_ids):
            try:
                await self.client.chat_delete(channel=job.channel_id, ts=ts)
            except SlackApiError as exc:
                if exc.response.get("error") == "message_not_found":
                    continue  # already gone
                raise post_error(exc) from exc

    async def notify(self, job: Job, event: str, text: str) -> None:
        """Reactions on the member's message for pasted links; private messages for commands and failures."""
        try:
            if job.message_id:
                await self.react(job, event)
                if event == "failed":
                    await self.tell(job.channel_id, job.requester_id, text, thread_ts=job.thread_id)
            elif event in ("failed", "cancelled"):
                await self.tell(job.channel_id, job.requester_id, f"Request #{job.id}: {text}",
                                thread_ts=job.thread_id)
            elif event == "done":
                await self.tell(job.channel_id, job.requester_id, f"Request #{job.id}: {text}",
                                thread_ts=job.thread_id, link_to=job.thread_ref)
        except (SlackApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.info("could not tell the requester of job %s about %s: %s", job.id, event, exc)

    async def react(self, job: Job, event: str) -> None:
        channel, ts = job.channel_id, job.message_id
        if event == "queued":
            await self.reaction("add", channel, ts, QUEUED)
            return
        if event not in ("done", "failed", "cancelled"):
            return
        await self.reaction("remove", channel, ts, QUEUED)
        if event in ("done", "failed"):
            await self.reaction("add", channel, ts, DONE if event == "done" else FAILED)

    async def reaction(self, action: str, channel: str, ts: str | None, name: str) -> None:
        method = self.client.reactions_add if action == "add" else self.client.reactions_remove
        try:
            await method(channel=channel, timestamp=ts, name=name)
        except SlackApiError as exc:
            # already there, already gone, or the message was deleted: a reaction is never worth failing a job
            log.debug("reactions.%s %s on %s/%s: %s", action, name, channel, ts, exc.response.get("error"))

    async def tell(self, channel: str, user: str, text: str, *, thread_ts: str | None = None,
                   link_to: str | None = None) -> None:
        """A message only ``user`` sees, in the channel; by direct message when the bot can't post there."""
        if link_to:
            with contextlib.suppress(SlackApiError):
                permalink = await self.client.chat_getPermalink(channel=channel, message_ts=link_to)
                text += f" <{permalink['permalink']}|Open the thread>"
        try:
            await self.client.chat_postEphemeral(channel=channel, user=user, text=text, thread_ts=thread_ts)
        except SlackApiError as exc:
            if exc.response.get("error") not in NOT_IN_CHANNEL | {"user_not_in_channel"}:
                raise
            await self.client.chat_postMessage(channel=user, text=text)  # the app's direct messages with them


# --- the bot -------------------------------------------------------------------------------------------------


class SlackBot:
    """The Slack side of HNaaS: a bolt app whose listeners call the core. ``connect`` picks the transport: Socket
    Mode with an app-level token (no public URL needed), else HTTP on ``settings.slack_port`` with the signing
    secret."""

    def __init__(self, core: Core, settings: Settings, *, client: AsyncWebClient | None = None) -> None:
        self.core = core
        self.settings = settings
        self.client = client or web_client(settings)
        self.poster = SlackPoster(self.client, post_interval=settings.slack_post_interval)
        socket_mode = bool(settings.slack_app_token)
        self.app = AsyncApp(client=self.client, signing_secret=settings.slack_signing_secret or "",
                            request_verification_enabled=not socket_mode,  # Socket Mode frames are not signed
                            process_before_response=False)
        self.app.command(COMMAND)(self.on_command)
        self.app.event("app_mention")(self.on_mention)
        self.app.event("message")(self.on_message)
        self.app.action(REGENERATE)(self.on_regenerate)
        self.app.action(DELETE)(self.on_delete)
        self.app.error(self.on_error)
        self.bot_user_id: str | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self.http_port: int | None = None  # the port HTTP mode listens on (known after connect)
        self._background: set[asyncio.Task] = set()

    # -- connection --

    async def connect(self) -> None:
        """Check the token, then start receiving events. Raises ``PlatformRefused`` with what to fix."""
        problem = settings_problem(self.settings)
        if problem:
            raise PlatformRefused(problem)
        try:
            identity = await self.client.auth_test()
        except SlackApiError as exc:
            raise PlatformRefused(f"Slack refused SLACK_BOT_TOKEN: {exc.response.get('error')}") from None
        self.bot_user_id = identity.get("user_id")
        if self.settings.slack_app_token:
            self._socket = AsyncSocketModeHandler(self.app, self.settings.slack_app_token)
            try:
                await self._socket.connect_async()
            except SlackApiError as exc:
                raise PlatformRefused(f"Slack refused SLACK_APP_TOKEN: {exc.response.get('error')}") from None
            log.info("Slack: connected in Socket Mode as %s", identity.get("user"))
            return
        server = AsyncSlackAppServer(port=self.settings.slack_port, path=EVENTS_PATH, app=self.app,
                                     host=self.settings.slack_host)
        self._runner = web.AppRunner(server.web_app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.slack_host, self.settings.slack_port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("Slack: listening for events on http://%s:%s%s as %s", self.settings.slack_host, self.http_port,
                 EVENTS_PATH, identity.get("user"))

    async def wait_closed(self) -> None:
        """Both transports reconnect or keep listening on their own: served until the process is stopped."""
        await asyncio.Event().wait()

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def on_error(self, error: Exception, body: dict) -> None:
        log.error("Slack listener failed on %s", body.get("type"), exc_info=error)

    # -- who may do what --

    async def is_admin(self, user_id: str) -> bool:
        """Workspace admins and owners moderate and change channel settings (Slack has no per-channel right that a
        bot can read)."""
        try:
            user = (await self.client.users_info(user=user_id))["user"]
        except SlackApiError as exc:
            log.warning("users.info %s: %s", user_id, exc.response.get("error"))
            return False
        return bool(user.get("is_admin") or user.get("is_owner"))

    # -- pasted links and mentions --

    async def on_message(self, event: dict, body: dict) -> None:
        if event.get("subtype") or event.get("bot_id"):  # edits, joins, bots (this one included)
            return
        text = event.get("text") or ""
        direct = event.get("channel_type") == "im"  # a direct message to the bot is always a request
        if not direct and self.bot_user_id and f"<@{self.bot_user_id}" in text:
            return  # the app_mention event for the same message handles it (Slack sends none in DMs)
        if not direct and (event.get("thread_ts") or not await self.links_enabled(event["channel"])):
            return  # links alone count only in top-level messages of channels that opted in
        if await self._first_delivery(event):
            await self._request(event, body, self._without_mention(text), explicit=direct)

    async def on_mention(self, event: dict, body: dict) -> None:
        if event.get("bot_id") or not await self._first_delivery(event):
            return
        text = self._without_mention(event.get("text") or "")
        if not text:
            await self.poster.tell(event["channel"], event["user"],
                                   f"Paste a link (or a headline) after mentioning me, or use `{COMMAND}`.",
                                   thread_ts=event.get("thread_ts"))
            return
        await self._request(event, body, text, explicit=True)

    async def _first_delivery(self, event: dict) -> bool:
        """False for a message already handled: a redelivery, or the other event of a mention."""
        return await self.core.first_delivery(f"{PLATFORM}:{event['channel']}:{event['ts']}")

    def _without_mention(self, text: str) -> str:
        return _MENTION.sub(lambda m: " " if m.group(1) == self.bot_user_id else m.group(0), text).strip()

    async def _request(self, event: dict, body: dict, text: str, *, explicit: bool) -> None:
        channel, ts, user = event["channel"], event["ts"], event["user"]
        origin = Origin(PLATFORM, channel_id=channel, message_id=ts, thread_id=event.get("thread_ts"),
                        guild_id=body.get("team_id") or event.get("team"))
        request = Request(origin, user, text, command=explicit)
        await self.poster.reaction("add", channel, ts, QUEUED)  # at once: the member sees it was heard
        try:
            accepted = await self.core.submit(request)
        except HnaasError as exc:
            await self.poster.reaction("remove", channel, ts, QUEUED)
            await self.poster.tell(channel, user, exc.user_message, thread_ts=event.get("thread_ts"))
            return
        if not accepted:
            await self.poster.reaction("remove", channel, ts, QUEUED)
            return
        waiting = [a for a in accepted if a.position > 1]
        if waiting:
            await self.poster.tell(channel, user, "Queued: " + ", ".join(
                f"request #{a.job_id} is number {a.position} in line" for a in waiting) + ".",
                thread_ts=event.get("thread_ts"))

    async def links_enabled(self, channel_id: str) -> bool:
        return bool(await self.core.option(f"{PLATFORM}:channel:{channel_id}", "links", False))

    # -- /hnaas --

    async def on_command(self, ack, command: dict) -> None:
        text = (command.get("text") or "").strip()
        words = text.split()
        verb = words[0].lower() if words else ""
        user = command["user_id"]
        try:
            if verb in ("", "help") and len(words) <= 1:
                await ack(HELP)
            elif verb == "status" and len(words) == 1:
                await ack(format_status(await self.core.status()))
            elif verb == "cancel" and len(words) == 2 and words[1].lstrip("#").isdigit():
                job = await self.core.cancel(int(words[1].lstrip("#")), user)
                await ack(f"Cancelled request #{job.id}.")
                if job.message_id:
                    await self.poster.react(job, "cancelled")  # the ⏳ on the member's message goes
            elif verb in ("links", "roundup") and len(words) == 2 and words[1].lower() in ("on", "off"):
                await self._channel_setting(ack, command, verb, words[1].lower() == "on")
            elif verb == "purge" and (len(words) == 1 or words[1].startswith(("<", "#", "since=", "until="))
                                      or words[1].isdigit()):
                await self._purge(ack, command, words[1:])
            else:
                await self._generate(ack, command, text)
        except HnaasError as exc:
            await ack(exc.user_message)

    async def _generate(self, ack, command: dict, text: str) -> None:
        user, channel = command["user_id"], command["channel_id"]
        origin = Origin(PLATFORM, channel_id=channel, guild_id=command.get("team_id"))
        text, seed, length = generate_options(text)
        request = Request(origin, user, text, seed=seed, max_new_tokens=length_tokens(self.settings, length),
                          command=True)
        # Answered within Slack's 3 s: with the request number when submit is quick (it usually is), else at once
        # with a holding answer and the number in a private message after.
        task = asyncio.ensure_future(self.core.submit(request))
        await asyncio.wait({task}, timeout=SUBMIT_GRACE)
        acked = not task.done()
        if acked:
            await ack("On it…")
        try:
            accepted = await task
            first = accepted[0]
            where = f"number {first.position} in line" if first.position > 1 else "next up"
            answer = f"Queued as request #{first.job_id} ({where}); the discussion will appear in this channel."
        except Exception as exc:
            answer = _user_text(exc, f"submitting {request!r}")
        if acked:
            await self.poster.tell(channel, user, answer)
        else:
            await ack(answer)

    async def _channel_setting(self, ack, command: dict, name: str, on: bool) -> None:
        user, channel = command["user_id"], command["channel_id"]
        if not await self.is_admin(user):
            await ack("Only workspace admins can change that.")
            return
        scope = f"{PLATFORM}:channel:{channel}"
        actor = f"{PLATFORM}:{user}"
        settings = self.settings
        if name == "links":
            await self.core.set_option(scope, "links", on, actor=actor)
            await ack("I'll answer links posted in this channel (invite me to it if I'm not in it yet)." if on
                      else f"I'll only answer in this channel when mentioned or asked with `{COMMAND}`.")
            return
        await self.core.set_option(scope, scheduler.SUBSCRIPTION, {"guild_id": command.get("team_id")} if on else None,
                                   actor=actor)
        if not on:
            await ack("No more daily roundups here.")
        elif settings.roundup_stories <= 0:
            await ack("Noted, but the daily roundup is turned off on this bot (HNAAS_ROUNDUP_STORIES=0).")
        else:
            await ack(f"Every day at {settings.roundup_time} UTC I'll post discussions of the top "
                      f"{settings.roundup_stories} Hacker News stories here, one thread each.")
            if self.core.roundup is not None:
                self._spawn(self.core.roundup.run_due())  # past today's time already: today's comes now

    async def _purge(self, ack, command: dict, words: list[str]) -> None:
        user = command["user_id"]
        if not await self.is_admin(user):
            await ack("Only workspace admins can purge.")
            return
        options = purge_options(words)
        scope = PurgeScope.from_options(PLATFORM, command.get("team_id") or "", now=time.time(), **options)
        await ack("Purging…")
        try:
            report = await self.core.purge(scope, f"{PLATFORM}:{user}")
            text = report.summary()
        except Exception as exc:
            text = _user_text(exc, f"purging {scope}")
        await self.poster.tell(command["channel_id"], user, text)

    # -- buttons --

    async def on_regenerate(self, ack, body: dict, action: dict) -> None:
        await ack()
        user, channel = body["user"]["id"], body["channel"]["id"]
        try:
            accepted = await self.core.regenerate(int(action["value"]), user)
            where = f", number {accepted.position} in line" if accepted.position > 1 else ""
            text = f"Writing it again as request #{accepted.job_id}{where}."
        except Exception as exc:
            text = _user_text(exc, f"regenerating job {action['value']}")
        await self.poster.tell(channel, user, text)

    async def on_delete(self, ack, body: dict, action: dict) -> None:
        await ack()
        user, channel = body["user"]["id"], body["channel"]["id"]
        job_id = int(action["value"])
        try:
            await self.core.delete_output(job_id, user, is_moderator=await self.is_admin(user))
            text = "Deleted."
        except Exception as exc:
            text = _user_text(exc, f"deleting job {job_id}")
        await self.poster.tell(channel, user, text)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


_GENERATE_OPTION = re.compile(rf"\s+(seed=(?P<seed>\d{{1,10}})|length=(?P<length>{'|'.join(LENGTHS)}))\s*$",
                              re.IGNORECASE)


def generate_options(text: str) -> tuple[str, int | None, str | None]:
    """``/hnaas <link or headline> [seed=N] [length=short|medium|long]``: the text without its trailing options,
    the seed (the same seed and model give the same discussion again) and the length."""
    seed = length = None
    while (m := _GENERATE_OPTION.search(text)) is not None:
        if m["seed"] is not None and int(m["seed"]) < 2**31:
            seed = int(m["seed"])
        elif m["length"] is not None:
            length = m["length"].lower()
        else:
            break
        text = text[: m.start()]
    return text.strip(), seed, length


def purge_options(words: list[str]) -> dict[str, Any]:
    """``/hnaas purge`` arguments as ``PurgeScope.from_options`` keywords: a request number, a member (``@name``,
    which Slack sends as ``<@U123|name>``), a channel (``#name``), ``since=`` and ``until=`` (an age or a UTC date;
    a date with a time is written ``2026-12-01T14:30``)."""
    options: dict[str, Any] = {"job_id": None, "requester_id": None, "channel_id": None, "since": None, "until": None}
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key.lower() in ("since", "until"):
            options[key.lower()] = value
        elif word.lstrip("#").isdigit():
            options["job_id"] = int(word.lstrip("#"))
        elif m := _MENTION.fullmatch(word):
            options["requester_id"] = m.group(1)
        elif m := _CHANNEL.fullmatch(word):
            options["channel_id"] = m.group(1)
        else:
            raise InputRejected(f"I don't understand `{word}`. " + PURGE_USAGE)
    return options



# --- command line --------------------------------------------------------------------------------------------

SCOPES = [
    "commands",  # /hnaas
    "app_mentions:read",  # "@HNaaS <link or headline>"
    "channels:history", "groups:history", "im:history",  # pasted links (channels that opted in) and DMs
    "chat:write", "chat:write.public",  # threads, also in public channels the bot was not invited to
    "reactions:write",  # ⏳ ✅ ❌ on a member's message
    "users:read",  # is_admin, for moderation and channel settings
]
BOT_EVENTS = ["app_mention", "message.channels", "message.groups", "message.im"]


def manifest(request_url: str | None = None) -> dict[str, Any]:
    """The Slack app manifest (api.slack.com/apps → Create New App → From a manifest): Socket Mode, or HTTP mode
    with every request sent to ``request_url`` (``https://HOST/slack/events``)."""
    command: dict[str, Any] = {"command": COMMAND, "description": "An HN-style discussion of a link or a headline",
                               "usage_hint": "<link or headline> | status | cancel N | help", "should_escape": True}
    events: dict[str, Any] = {"bot_events": BOT_EVENTS}
    interactivity: dict[str, Any] = {"is_enabled": True}
    if request_url:
        command["url"] = events["request_url"] = interactivity["request_url"] = request_url
    return {
        "display_information": {"name": "HNaaS", "description": "AI-generated Hacker News style discussions of any "
                                                                "link, in a thread. The users in them are fictional."},
        "features": {"bot_user": {"display_name": "HNaaS", "always_online": True},
                     "app_home": {"messages_tab_enabled": True, "messages_tab_read_only_enabled": False},
                     "slash_commands": [command]},
        "oauth_config": {"scopes": {"bot": SCOPES}},
        "settings": {"event_subscriptions": events, "interactivity": interactivity,
                     "socket_mode_enabled": not request_url, "org_deploy_enabled": False,
                     "token_rotation_enabled": False},
    }


def register_cli(subparsers) -> None:
    """``hnaas slack manifest [--request-url URL]``: print the app manifest to create the Slack app with."""
    slack_parser = subparsers.add_parser("slack", help="Slack helpers")
    commands = slack_parser.add_subparsers(dest="slack_command", required=True)
    p = commands.add_parser("manifest", help="print the Slack app manifest (JSON) to create the app from")
    p.add_argument("--request-url", help=f"HTTP mode: the public URL of {EVENTS_PATH} (default: Socket Mode)")
    p.set_defaults(func=_cli_manifest)


def _cli_manifest(args) -> int:
    import json

    print(json.dumps(manifest(args.request_url), indent=2, ensure_ascii=False))
    return 0
