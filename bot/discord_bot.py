"""The Discord adapter: slash commands, pasted links and buttons in; threads out.

``HnaasBot`` turns Discord events into ``Request``s for the core and answers members; ``DiscordPoster`` is the
``Poster`` the core drives to post a finished thread. The core and the settings are passed in; nothing here touches
SQLite or torch.

How a story looks on Discord:

- a pasted link (or a message that mentions the bot): the thread starts from the member's message and the header
  is the thread's first message;
- ``/hnaas generate``: the header is posted in the channel and the thread starts from it (so the header is the
  thread's starter message, shown above the thread);
- each comment replies (``message_reference``) to its parent comment's message; the renderer's depth marker in the
  text shows the nesting, since Discord threads are flat.

The header carries Regenerate and Delete buttons whose ``custom_id`` encodes the job id (``hnaas:regen:12``); they
are ``DynamicItem``s, so they keep working after a restart without any state.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import discord
from discord import app_commands

from bot import scheduler
from bot.core import Origin, Posted, Request, length_tokens
from bot.errors import HnaasError, PlatformRefused, PostError
from bot.moderation import PurgeScope
from bot.render import RenderLimits, format_status, neutralise_mentions

if TYPE_CHECKING:
    from bot.core import Core
    from bot.queue import Job
    from bot.render import RenderedMessage
    from bot.settings import Settings

log = logging.getLogger(__name__)

PLATFORM = "discord"
MAX_CONTENT = 2000  # Discord's limit for a message's content
RENDER_MAX_CHARS = 1900  # what the renderer aims for: room for the zero-width spaces that defuse mentions
THREAD_NAME_MAX = 100
ARCHIVE_MINUTES = 1440  # one of 60, 1440, 4320, 10080
SUBMIT_GRACE = 1.5  # seconds a slash command waits for submit before deferring (3 s is Discord's limit)
HEADER_LOOKBACK = 50  # recent messages searched for an already-posted header when a post is resumed

QUEUED, DONE, FAILED = "\N{HOURGLASS WITH FLOWING SAND}", "\N{WHITE HEAVY CHECK MARK}", "\N{CROSS MARK}"

# Discord error codes (https://discord.com/developers/docs/topics/opcodes-and-status-codes#json)
UNKNOWN_MESSAGE = 10008
THREAD_ALREADY_EXISTS = 160004

NO_MENTIONS = discord.AllowedMentions.none()
LINK = re.compile(r"https?://\S+", re.IGNORECASE)

# Exactly what the bot needs, nothing more. Manage Messages is left out on purpose: the Delete button and purges
# remove only the bot's own messages, one by one, which a bot may always do; bulk delete (which would need it) is
# not used. Read Message History lets a resumed post find a header it had already sent.
INVITE_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    read_message_history=True,
    add_reactions=True,
    embed_links=True,  # the story's link in the header unfurls into a preview
)


def invite_url(application_id: int | str) -> str:
    """The OAuth2 URL that adds the bot to a server with its slash commands and the permissions above."""
    return discord.utils.oauth_url(application_id, permissions=INVITE_PERMISSIONS,
                                   scopes=("bot", "applications.commands"))


def message_content(text: str) -> str:
    """What is sent for a rendered text: mentions defused, never more than Discord's 2000 characters."""
    # The renderer already defused mentions; doing it again here is the last line of defence (and idempotent).
    content = neutralise_mentions(text) or "\N{HORIZONTAL ELLIPSIS}"
    if len(content) > MAX_CONTENT:
        # The renderer splits at RENDER_MAX_CHARS, so only text dense with mentions gets here.
        log.warning("message of %d characters cut to %d", len(content), MAX_CONTENT)
        content = content[: MAX_CONTENT - 1] + "\N{HORIZONTAL ELLIPSIS}"
    assert len(content) <= MAX_CONTENT
    return content


def thread_name(job: Job) -> str:
    name = neutralise_mentions(" ".join((job.title or job.input or "").split())) or f"HNaaS #{job.id}"
    if len(name) > THREAD_NAME_MAX:
        name = name[: THREAD_NAME_MAX - 1] + "\N{HORIZONTAL ELLIPSIS}"
    return name


def jump_url(guild_id: str | None, channel_id: str) -> str:
    return f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}"


# --- buttons -------------------------------------------------------------------------------------------------


class RegenerateButton(discord.ui.DynamicItem[discord.ui.Button], template=r"hnaas:regen:(?P<job_id>\d+)"):
    """Write the story again with a new seed, in a new thread."""

    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label="Regenerate", emoji="\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS}",
                                           style=discord.ButtonStyle.secondary, custom_id=f"hnaas:regen:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item,
                             match: re.Match[str], /) -> RegenerateButton:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: HnaasBot = interaction.client  # type: ignore[assignment]
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            accepted = await bot.core.regenerate(self.job_id, str(interaction.user.id))
        except Exception as exc:
            await bot.answer(interaction, _user_text(exc, f"regenerating job {self.job_id}"))
            return
        where = f", number {accepted.position} in line" if accepted.position > 1 else ""
        await interaction.edit_original_response(
            content=f"Writing it again as request #{accepted.job_id}{where}; I'll link the new thread here.")
        bot.remember_interaction(accepted.job_id, interaction)  # after the edit above, so the link replaces it


class DeleteButton(discord.ui.DynamicItem[discord.ui.Button], template=r"hnaas:delete:(?P<job_id>\d+)"):
    """Remove the story (the requester, or anyone with Manage Messages)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label="Delete", emoji="\N{WASTEBASKET}", style=discord.ButtonStyle.danger,
                                           custom_id=f"hnaas:delete:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item,
                             match: re.Match[str], /) -> DeleteButton:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: HnaasBot = interaction.client  # type: ignore[assignment]
        await interaction.response.defer(ephemeral=True, thinking=True)
        moderator = interaction.permissions.manage_messages
        try:
            await bot.core.delete_output(self.job_id, str(interaction.user.id), is_moderator=moderator)
        except Exception as exc:
            await bot.answer(interaction, _user_text(exc, f"deleting job {self.job_id}"))
            return
        await interaction.followup.send("Deleted.", ephemeral=True)


def _user_text(exc: Exception, doing: str) -> str:
    """What a member reads about an error: its own message, or a generic one (the details go to the log)."""
    if isinstance(exc, HnaasError):
        return exc.user_message
    log.error("%s failed", doing, exc_info=exc)
    return "Something went wrong on my side; please try again later."


def header_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(RegenerateButton(job_id))
    view.add_item(DeleteButton(job_id))
    return view


def _is_header_of(message: dict[str, Any], job_id: int) -> bool:
    wanted = f"hnaas:regen:{job_id}"
    return any(c.get("custom_id") == wanted for row in message.get("components") or []
               for c in row.get("components") or [])


def _is_any_header(message: dict[str, Any]) -> bool:
    return any(str(c.get("custom_id", "")).startswith("hnaas:regen:") for row in message.get("components") or []
               for c in row.get("components") or [])


# --- the poster ----------------------------------------------------------------------------------------------


class DiscordPoster:
    """Posts rendered messages for the core. Every send goes out with ``allowed_mentions=none``.

    Rate limits are left to discord.py, which waits per route and channel: a 429 in one channel holds only that
    channel's bucket, and the core's publisher runs one task per job, so other channels go on posting.
    """

    platform = PLATFORM
    limits = RenderLimits(max_chars=RENDER_MAX_CHARS, markup="markdown")

    def __init__(self, bot: HnaasBot) -> None:
        self.bot = bot

    def _channel(self, channel_id: str | int) -> discord.PartialMessageable:
        return self.bot.get_partial_messageable(int(channel_id))

    async def post(self, job: Job, message: RenderedMessage, *, thread_ref: str | None,
                   reply_to: str | None) -> Posted:
        content = message_content(message.text)
        try:
            if message.parent_key is None:
                posted = await self._post_header(job, content)
                await self._link_thread(job, posted)
                return posted
            return await self._post_comment(job, content, thread_ref or job.thread_ref, reply_to)
        except discord.HTTPException as exc:
            raise post_error(exc) from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise PostError("I couldn't reach Discord; I'll try again.", repr(exc)) from exc

    async def _post_header(self, job: Job, content: str) -> Posted:
        view = header_view(job.id)
        if job.thread_id:
            # Asked inside a thread: threads don't nest, so the story goes in that thread.
            header = await self._find_header(job.thread_id, job.id)
            if header is None:
                sent = await self._channel(job.thread_id).send(
                    content, view=view, allowed_mentions=NO_MENTIONS, reference=self._ref(job.message_id, job.thread_id))
                header = str(sent.id)
            return Posted(header, job.thread_id)
        if job.message_id:
            started = await self._thread_from_request(job)
            if started is not None:
                thread_id, header = started
                if header is None:
                    sent = await self._channel(thread_id).send(content, view=view, allowed_mentions=NO_MENTIONS)
                    header = str(sent.id)
                return Posted(header, thread_id)
        # A slash command (or a second story for the same message): header in the channel, thread from it.
        header = await self._find_header(job.channel_id, job.id)
        if header is None:
            sent = await self._channel(job.channel_id).send(
                content, view=view, allowed_mentions=NO_MENTIONS, reference=self._ref(job.message_id, job.channel_id))
            header = str(sent.id)
        try:
            await self.bot.http.start_thread_with_message(job.channel_id, header, name=thread_name(job),
                                                          auto_archive_duration=ARCHIVE_MINUTES)
        except discord.HTTPException as exc:
            if exc.code != THREAD_ALREADY_EXISTS:  # resumed after a crash: the thread is there already
                raise
        return Posted(header, header)  # a thread started from a message shares its id

    async def _thread_from_request(self, job: Job) -> tuple[str, str | None] | None:
        """Start the thread from the member's message: (thread id, this job's header if already posted there).

        None when the story must go elsewhere: the member's message can hold only one thread, so when it already
        has one holding another story (several links in one message, a regeneration), or when the message is
        gone, the caller falls back to a header in the channel.
        """
        assert job.message_id
        try:
            await self.bot.http.start_thread_with_message(job.channel_id, job.message_id, name=thread_name(job),
                                                          auto_archive_duration=ARCHIVE_MINUTES)
            return job.message_id, None  # a new thread is empty
        except discord.NotFound as exc:
            if exc.code == UNKNOWN_MESSAGE:
                return None
            raise
        except discord.HTTPException as exc:
            if exc.code != THREAD_ALREADY_EXISTS:
                raise
        # The thread exists: ours from before a restart, or another story's.
        recent = await self._recent(job.message_id)
        mine = next((str(m["id"]) for m in recent if _is_header_of(m, job.id)), None)
        if mine is None and any(_is_any_header(m) for m in recent):
            return None
        return job.message_id, mine

    async def _recent(self, channel_id: str) -> list[dict[str, Any]]:
        try:
            return await self.bot.http.logs_from(channel_id, HEADER_LOOKBACK)
        except discord.HTTPException as exc:
            log.debug("could not read channel %s: %s", channel_id, exc)
            return []

    async def _find_header(self, channel_id: str, job_id: int) -> str | None:
        """The id of this job's header if an earlier attempt (before a crash) already posted it."""
        # only the bot's own messages carry components (a member's can't), so the custom_id is proof enough
        for message in await self._recent(channel_id):
            if _is_header_of(message, job_id):
                return str(message["id"])
        return None

    @staticmethod
    def _ref(message_id: str | None, channel_id: str) -> discord.MessageReference | None:
        if not message_id:
            return None
        return discord.MessageReference(message_id=int(message_id), channel_id=int(channel_id),
                                        fail_if_not_exists=False)

    async def _post_comment(self, job: Job, content: str, thread_ref: str | None, reply_to: str | None) -> Posted:
        channel_id = thread_ref or job.thread_id or job.channel_id
        # A thread's starter message sits in the parent channel, above the thread: replies can't cross channels,
        # and a top-level comment needs no reply to show where it belongs.
        reference = self._ref(reply_to, channel_id) if reply_to and reply_to != channel_id else None
        sent = await self._channel(channel_id).send(content, reference=reference, allowed_mentions=NO_MENTIONS)
        return Posted(str(sent.id), channel_id)

    async def _link_thread(self, job: Job, posted: Posted) -> None:
        """Answer a waiting slash command (or Regenerate click) with a link to the new thread."""
        await self.bot.thread_ready(job.id, jump_url(job.guild_id, posted.thread_ref or posted.message_id))

    async def notify(self, job: Job, event: str, text: str) -> None:
        """Reactions on the member's message for pasted links; the deferred answer for slash commands."""
        try:
            if job.message_id and not self.bot.pending_interaction(job.id):
                await self._notify_message(job, event, text)
            else:
                await self._notify_interaction(job, event, text)
        except (discord.HTTPException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.info("could not tell the requester of job %s about %s: %s", job.id, event, exc)

    async def _notify_message(self, job: Job, event: str, text: str) -> None:
        assert job.message_id
        channel_id, message_id = job.thread_id or job.channel_id, job.message_id
        http = self.bot.http
        if event == "queued":
            await http.add_reaction(channel_id, message_id, QUEUED)
            return
        if event not in ("done", "failed", "cancelled"):
            return
        with contextlib.suppress(discord.HTTPException):
            await http.remove_own_reaction(channel_id, message_id, QUEUED)
        if event == "done":
            await http.add_reaction(channel_id, message_id, DONE)
        elif event == "failed":
            with contextlib.suppress(discord.HTTPException):
                await http.add_reaction(channel_id, message_id, FAILED)
            await self._tell(job, text)

    async def _notify_interaction(self, job: Job, event: str, text: str) -> None:
        interaction = self.bot.pending_interaction(job.id)
        if interaction is None:
            if event == "failed":
                await self._tell(job, text)
            return
        if event == "started":
            await interaction.edit_original_response(content=message_content(f"Request #{job.id}: {text}"))
        elif event in ("failed", "cancelled"):
            self.bot.forget_interaction(job.id)
            # Only the requester needs to know: swap the public answer for a private one.
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()
            if event == "failed":
                await interaction.followup.send(message_content(text), ephemeral=True)

    async def _tell(self, job: Job, text: str) -> None:
        """A short notice to the requester: in the channel if the bot may post there, else by DM."""
        content = message_content(text)
        try:
            await self._channel(job.thread_id or job.channel_id).send(
                content, allowed_mentions=NO_MENTIONS, reference=self._ref(job.message_id, job.thread_id or job.channel_id))
            return
        except (discord.Forbidden, discord.NotFound):
            pass
        dm = await self.bot.http.start_private_message(int(job.requester_id))
        await self._channel(dm["id"]).send(content, allowed_mentions=NO_MENTIONS)

    async def delete(self, job: Job, message_ids: list[str], thread_ref: str | None) -> None:
        """Delete the bot's own messages one by one (no Manage Messages needed), newest first."""
        for message_id in reversed(message_ids):
            # a thread's starter message (the slash-command header) lives in the parent channel
            channel_id = job.channel_id if message_id == thread_ref or not thread_ref else thread_ref
            try:
                await self.bot.http.delete_message(channel_id, message_id)
            except discord.NotFound:
                continue  # already gone
            except discord.HTTPException as exc:
                raise post_error(exc) from exc
        if thread_ref and thread_ref != job.thread_id:
            with contextlib.suppress(discord.HTTPException):  # an empty thread left behind: tuck it away
                await self.bot.http.edit_channel(thread_ref, archived=True)


def post_error(exc: discord.HTTPException) -> PostError:
    """403 and 404 fail the job; 4xx form errors would fail again; 5xx and the rest are worth a retry."""
    detail = f"{exc.status} {exc.code}: {exc.text}"
    if isinstance(exc, discord.Forbidden):
        return PostError("I don't have permission to post there: I need Send Messages, Create Public Threads "
                         "and Send Messages in Threads in that channel.", detail, permanent=True)
    if isinstance(exc, discord.NotFound):
        return PostError("The channel or thread I was posting in is gone.", detail, permanent=True)
    if 400 <= exc.status < 500 and exc.status not in (408, 429):
        return PostError("Discord refused one of the messages.", detail, permanent=True)
    return PostError("Discord had a problem; I'll try again.", detail)


# --- the bot -------------------------------------------------------------------------------------------------


def default_intents(message_content: bool = True) -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    # Privileged: needed to see links in messages that don't mention the bot. Without it, mentions still work.
    intents.message_content = message_content
    return intents


class HnaasBot(discord.AutoShardedClient):
    """The Discord side of HNaaS. ``core`` and ``settings`` are passed in; ``options`` go to discord.py.

    ``AutoShardedClient`` asks ``GET /gateway/bot`` for the gateway URL, so pointing ``discord.http.Route.BASE``
    elsewhere (tests, a proxy) moves the gateway too.
    """

    def __init__(self, core: Core, settings: Settings, *, intents: discord.Intents | None = None,
                 **options: Any) -> None:
        if intents is None:
            intents = default_intents(settings.discord_message_content)
        super().__init__(intents=intents, allowed_mentions=NO_MENTIONS, **options)
        self.core = core
        self.settings = settings
        self.poster = DiscordPoster(self)
        self.tree = app_commands.CommandTree(self)
        self.tree.add_command(HnaasCommands(self))
        self.tree.on_error = self._on_app_command_error  # type: ignore[method-assign]
        self._interactions: dict[int, discord.Interaction] = {}  # job id -> deferred command awaiting its link
        self._thread_links: dict[int, str] = {}  # job id -> thread link posted before its command deferred
        self._background: set[asyncio.Future[Any]] = set()
        self.synced_commands = False  # whether this start uploaded the commands (for logs and tests)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(RegenerateButton, DeleteButton)
        await self.sync_commands()

    # -- commands --

    def command_signature(self) -> str:
        payload = [command.to_dict(self.tree) for command in self.tree.get_commands()]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    async def sync_commands(self) -> bool:
        """Upload the commands only when their signature changed since the last upload (they're rate limited)."""
        signature = self.command_signature()
        scope = f"discord:application:{self.application_id}"
        if await self.core.option(scope, "command_signature") == signature:
            log.info("slash commands unchanged; not syncing")
            return False
        await self.tree.sync()
        self.synced_commands = True
        await self.core.set_option(scope, "command_signature", signature)
        log.info("slash commands synced")
        return True

    async def _on_app_command_error(self, interaction: discord.Interaction,
                                    error: app_commands.AppCommandError) -> None:
        original = getattr(error, "original", error)
        name = interaction.command.qualified_name if interaction.command else "?"
        await self.answer(interaction, _user_text(original, f"/{name}"))

    @staticmethod
    async def answer(interaction: discord.Interaction, text: str) -> None:
        """A short ephemeral answer, whatever state the interaction is in."""
        with contextlib.suppress(discord.HTTPException):
            if not interaction.response.is_done():
                await interaction.response.send_message(text, ephemeral=True)
            else:
                await interaction.followup.send(text, ephemeral=True)

    # -- interactions awaiting a link --

    def remember_interaction(self, job_id: int, interaction: discord.Interaction) -> None:
        """A deferred command waits for its job's thread; if the thread came first, answer now."""
        self._interactions[job_id] = interaction
        link = self._thread_links.pop(job_id, None)
        if link is not None:
            task = asyncio.ensure_future(self.thread_ready(job_id, link))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def pending_interaction(self, job_id: int) -> discord.Interaction | None:
        interaction = self._interactions.get(job_id)
        if interaction is not None and interaction.is_expired():  # tokens last 15 minutes
            del self._interactions[job_id]
            return None
        return interaction

    def forget_interaction(self, job_id: int) -> None:
        self._interactions.pop(job_id, None)

    async def thread_ready(self, job_id: int, link: str) -> None:
        interaction = self.pending_interaction(job_id)
        if interaction is None or not interaction.response.is_done():
            # The command has not deferred (or not learnt its job id) yet: keep the link for it, briefly.
            self._thread_links[job_id] = link
            while len(self._thread_links) > 256:
                self._thread_links.pop(next(iter(self._thread_links)))
            return
        self.forget_interaction(job_id)
        with contextlib.suppress(discord.HTTPException):
            await interaction.edit_original_response(content=f"Here it is: {link}")

    # -- link detection --

    async def links_enabled(self, channel_id: str) -> bool:
        """Whether pasted links are answered in this channel without a mention (off unless an admin turned it on)."""
        return bool(await self.core.option(f"discord:channel:{channel_id}", "links", False))

    async def set_links(self, channel_id: str, enabled: bool, actor_id: str) -> None:
        await self.core.set_option(f"discord:channel:{channel_id}", "links", enabled, actor=f"discord:{actor_id}")

    # -- pasted links --

    async def on_message(self, message: discord.Message) -> None:
        if (message.author.bot or message.guild is None or self.user is None
                or message.type not in (discord.MessageType.default, discord.MessageType.reply)):
            return
        role = message.guild.self_role  # members often pick the bot's role from the @ list
        mentioned = self.user.id in message.raw_mentions or (role is not None and role.id in message.raw_role_mentions)
        channel = message.channel
        in_thread = isinstance(channel, discord.Thread)
        text = re.sub(rf"<@!?{self.user.id}>" + (rf"|<@&{role.id}>" if role else ""), " ", message.content).strip()
        # Links alone count only in top-level channels that opted in (not in threads, HNaaS's own included).
        if not mentioned and (in_thread or not LINK.search(text) or not await self.links_enabled(str(channel.id))):
            return
        if not text:
            await self._reply(message, "Paste a link (or a title) after mentioning me, or use `/hnaas generate`.")
            return
        origin = Origin(PLATFORM, channel_id=str(channel.id), message_id=str(message.id),
                        thread_id=str(channel.id) if in_thread else None, guild_id=str(message.guild.id))
        # A mention is an explicit request, so a plain title is fine; a pasted message needs a link.
        request = Request(origin, str(message.author.id), text, command=mentioned)
        http = self.http
        with contextlib.suppress(discord.HTTPException):
            await http.add_reaction(channel.id, message.id, QUEUED)  # at once: the member sees it was heard
        try:
            accepted = await self.core.submit(request)
        except HnaasError as exc:
            with contextlib.suppress(discord.HTTPException):
                await http.remove_own_reaction(channel.id, message.id, QUEUED)
            await self._reply(message, exc.user_message)
            return
        if not accepted:
            with contextlib.suppress(discord.HTTPException):
                await http.remove_own_reaction(channel.id, message.id, QUEUED)
            return
        waiting = [a for a in accepted if a.position > 1]
        if waiting:
            await self._reply(message, "Queued: " + ", ".join(
                f"request #{a.job_id} is number {a.position} in line" for a in waiting) + ".")

    @staticmethod
    async def _reply(message: discord.Message, text: str) -> None:
        with contextlib.suppress(discord.HTTPException):
            await message.reply(message_content(text), mention_author=False, allowed_mentions=NO_MENTIONS)


class HnaasCommands(app_commands.Group):
    """/hnaas: the commands members see."""

    def __init__(self, bot: HnaasBot) -> None:
        super().__init__(name="hnaas", description="Hacker News as a Service: an HN-style discussion of any link",
                         guild_only=True)
        self.bot = bot

    @app_commands.command(name="generate")
    @app_commands.describe(
        title_or_url="A link to discuss, or a headline to imagine a discussion about",
        seed="A number to get the same discussion again (leave empty for a new one)",
        length="How long the discussion runs",
    )
    async def generate(self, interaction: discord.Interaction, title_or_url: str,
                       seed: app_commands.Range[int, 0, 2**31 - 1] | None = None,
                       length: Literal["short", "medium", "long"] | None = None) -> None:
        """Write a Hacker News style discussion of a link or a headline, in a new thread."""
        channel = interaction.channel
        in_thread = isinstance(channel, discord.Thread)
        channel_id = str(interaction.channel_id)
        origin = Origin(PLATFORM, channel_id=channel_id, thread_id=channel_id if in_thread else None,
                        guild_id=str(interaction.guild_id) if interaction.guild_id else None)
        request = Request(origin, str(interaction.user.id), title_or_url, seed=seed,
                          max_new_tokens=length_tokens(self.bot.settings, length), command=True)
        # Fast refusals (queue full, a bad link) are answered privately; anything slower is deferred in time.
        task = asyncio.ensure_future(self.bot.core.submit(request))
        await asyncio.wait({task}, timeout=SUBMIT_GRACE)
        if task.done() and not task.cancelled() and isinstance(task.exception(), HnaasError):
            await interaction.response.send_message(task.exception().user_message, ephemeral=True)  # type: ignore[union-attr]
            return
        await interaction.response.defer(thinking=True)
        try:
            accepted = await task
        except Exception as exc:
            text = _user_text(exc, f"submitting {request!r}")
            # Whether an answer is ephemeral is fixed at defer time: replace the public "thinking" with a private note.
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()
            await interaction.followup.send(text, ephemeral=True)
            return
        first = accepted[0]
        if first.position > 1:
            with contextlib.suppress(discord.HTTPException):
                await interaction.edit_original_response(
                    content=f"Queued as request #{first.job_id}, number {first.position} in line. "
                            "I'll link the thread here when it's posted.")
        self.bot.remember_interaction(first.job_id, interaction)  # after the edit above, so the link replaces it

    @app_commands.command(name="status")
    async def status(self, interaction: discord.Interaction) -> None:
        """How long the queue is, and which model is writing."""
        status = await self.bot.core.status()
        await interaction.response.send_message(format_status(status), ephemeral=True)

    @app_commands.command(name="cancel")
    @app_commands.describe(job_id="The request number I gave you when you asked")
    async def cancel(self, interaction: discord.Interaction, job_id: app_commands.Range[int, 1]) -> None:
        """Cancel one of your requests that hasn't started yet."""
        job = await self.bot.core.cancel(job_id, str(interaction.user.id))
        await interaction.response.send_message(f"Cancelled request #{job_id}.", ephemeral=True)
        await self.bot.poster.notify(job, "cancelled", "Cancelled.")  # the ⏳, or the command's "thinking…"

    @app_commands.command(name="links")
    @app_commands.describe(mode="on: answer every link posted in this channel; off: only when mentioned")
    async def links(self, interaction: discord.Interaction, mode: Literal["on", "off"]) -> None:
        """Turn automatic answers to pasted links on or off in this channel (needs Manage Channels)."""
        channel_id = await _managed_channel(interaction)
        if channel_id is None:
            return
        await self.bot.set_links(channel_id, mode == "on", str(interaction.user.id))
        text = ("I'll answer links posted in this channel." if mode == "on"
                else "I'll only answer in this channel when mentioned or asked with /hnaas generate.")
        if mode == "on" and not self.bot.intents.message_content:
            text += " (I can't read message content here, so mention me with the link.)"
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="roundup")
    @app_commands.describe(mode="on: post discussions of the HN front page here every day; off: stop")
    async def roundup(self, interaction: discord.Interaction, mode: Literal["on", "off"]) -> None:
        """A daily roundup here: the top Hacker News stories, each discussed in a thread (needs Manage Channels)."""
        channel_id = await _managed_channel(interaction)
        if channel_id is None:
            return
        settings = self.bot.settings
        value = {"guild_id": str(interaction.guild_id)} if mode == "on" else None
        await self.bot.core.set_option(f"{PLATFORM}:channel:{channel_id}", scheduler.SUBSCRIPTION, value,
                                       actor=f"{PLATFORM}:{interaction.user.id}")
        if mode == "off":
            text = "No more daily roundups here."
        elif settings.roundup_stories <= 0:
            text = "Noted, but the daily roundup is turned off on this bot (HNAAS_ROUNDUP_STORIES=0)."
        else:
            text = (f"Every day at {settings.roundup_time} UTC I'll post discussions of the top "
                    f"{settings.roundup_stories} Hacker News stories here, one thread each.")
        await interaction.response.send_message(text, ephemeral=True)
        if mode == "on" and self.bot.core.roundup is not None:
            await self.bot.core.roundup.run_due()  # past today's time already: today's comes now, not tomorrow

    @app_commands.command(name="purge")
    @app_commands.describe(
        job_id="One request number",
        member="Everything this member asked for",
        channel="Everything asked for in this channel",
        since="Requests made since: an age (30m, 2h, 3d, 1w) or a UTC date (2026-12-01 or 2026-12-01 14:30)",
        until="Requests made before: an age or a UTC date",
    )
    async def purge(self, interaction: discord.Interaction, job_id: app_commands.Range[int, 1] | None = None,
                    member: discord.User | None = None, channel: discord.TextChannel | discord.Thread | None = None,
                    since: str | None = None, until: str | None = None) -> None:
        """Remove HNaaS threads in this server: one request, a member's, a channel's, a time range's (moderators)."""
        if not interaction.permissions.manage_messages:
            await interaction.response.send_message("Only members who can manage messages can purge.",
                                                    ephemeral=True)
            return
        try:
            scope = PurgeScope.from_options(
                PLATFORM, str(interaction.guild_id), job_id=job_id, requester_id=str(member.id) if member else None,
                channel_id=str(channel.id) if channel else None, since=since, until=until, now=time.time())
        except HnaasError as exc:
            await interaction.response.send_message(exc.user_message, ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)  # one delete call per message: can be slow
        try:
            report = await self.bot.core.purge(scope, str(interaction.user.id))
        except Exception as exc:
            await self.bot.answer(interaction, _user_text(exc, f"purging {scope}"))
            return
        await interaction.followup.send(report.summary(), ephemeral=True)


async def _managed_channel(interaction: discord.Interaction) -> str | None:
    """The channel a channel setting is for (a thread's parent), or None once a member without Manage Channels has
    been told they can't change it."""
    if not interaction.permissions.manage_channels:
        await interaction.response.send_message("Only members who can manage this channel can change that.",
                                                ephemeral=True)
        return None
    channel = interaction.channel
    return str(channel.parent_id if isinstance(channel, discord.Thread) else interaction.channel_id)



# --- running ---------------------------------------------------------------------------------------------------


class DiscordConnection:
    """Discord's side of ``hnaas run`` (``bot.app.serve_platforms``): the client logged in and ready."""

    def __init__(self, core: Core, settings: Settings) -> None:
        # discord.py keeps its API base in a class attribute: a process-wide setting, so it is set here, before the
        # client exists. AutoShardedClient then finds the gateway through GET /gateway/bot on that base.
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
        self.settings = settings
        self.bot = HnaasBot(core, settings)
        self.poster = self.bot.poster
        self._client: asyncio.Task | None = None

    async def connect(self) -> None:
        if not self.settings.discord_token:
            raise PlatformRefused("DISCORD_TOKEN is not set")
        await self.bot.__aenter__()
        self._client = asyncio.create_task(self.bot.start(self.settings.discord_token), name="discord-client")
        ready = asyncio.create_task(self.bot.wait_until_ready())
        await asyncio.wait({self._client, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not self._client.done():
            log.info("Discord: connected as %s; invite: %s", self.bot.user, invite_url(self.bot.application_id or 0))
            return
        ready.cancel()  # it stopped before it was ready: a bad token, a missing intent...
        try:
            self._client.result()
        except discord.LoginFailure:
            raise PlatformRefused("Discord refused the token: check DISCORD_TOKEN") from None
        except discord.PrivilegedIntentsRequired:
            raise PlatformRefused("Enable the Message Content intent for the bot in the Developer Portal, or set "
                                  "HNAAS_DISCORD_MESSAGE_CONTENT=false (then members mention the bot)") from None
        raise PlatformRefused("The Discord client stopped before it was ready")

    async def wait_closed(self) -> None:
        assert self._client is not None
        await self._client

    async def close(self) -> None:
        await self.bot.close()
        if self._client is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._client, 5)


async def run_discord(settings: Settings, *, engine: Any = None) -> int:
    """``hnaas run`` with Discord alone."""
    from bot.app import serve_platforms

    return await serve_platforms(settings, [DiscordConnection], engine=engine)


# --- command line --------------------------------------------------------------------------------------------


def application_id_from_token(token: str) -> str:
    """A bot token's first part is its user id in base64; a bot's user id is its application id."""
    first = token.split(".", 1)[0]
    return base64.b64decode(first + "=" * (-len(first) % 4)).decode()


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``hnaas discord invite``: print the URL that adds the bot to a server."""
    discord_parser = subparsers.add_parser("discord", help="Discord helpers")
    commands = discord_parser.add_subparsers(dest="discord_command", required=True)
    invite = commands.add_parser("invite", help="print the URL that adds the bot to a server")
    invite.add_argument("--application-id", help="defaults to the id inside DISCORD_TOKEN")
    invite.set_defaults(func=_cli_invite)


def _cli_invite(args: argparse.Namespace, settings: Settings | None = None) -> int:
    application_id = getattr(args, "application_id", None)
    if not application_id:
        if settings is None:
            from bot.settings import Settings

            settings = Settings.load(getattr(args, "config", None))
        if not settings.discord_token:
            print("Set DISCORD_TOKEN or pass --application-id.")
            return 2
        application_id = application_id_from_token(settings.discord_token)
    print(invite_url(application_id))
    return 0
