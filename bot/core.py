"""The platform-neutral core: what adapters hand in (a Request) and what they implement (a Poster).

Adapters (console, Discord, Slack) turn platform events into a ``Request`` and call ``Core.submit``; they never touch
SQLite or torch. Each platform implements the small ``Poster`` interface that the core drives to post a finished
thread: one message at a time, each in reply to its parent's message, so the platform thread mirrors the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bot.queue import Job
    from bot.render import RenderedMessage, RenderLimits


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
