"""Moderation: what a purge covers, how a moderator writes its time range, and what it reports back.

A purge removes HNaaS's own output (every message posted for a thread) and stops what has not been posted yet:
waiting requests are cancelled, and a thread still being generated is never posted. It is scoped to one platform
and one server (a moderator of one server can never touch another's), and narrowed by any of: one request, one
requester, one channel, a time range (when the request was made). Each purge is one audit-log entry: who, what
scope, which jobs, how many messages.

Platform-neutral and pure: adapters parse their command's options into a ``PurgeScope``; ``Core.purge`` does the work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from bot.errors import InputRejected

NOTHING_CHOSEN = "Say what to purge: a request number, a member, a channel, or a time range (since / until)."
BAD_TIME = ("I can't read {text!r} as a time. Use an age such as 30m, 2h, 3d or 1w, or a UTC date such as "
            "2026-12-01 or 2026-12-01 14:30.")
EMPTY_RANGE = "That time range is empty: 'since' must come before 'until'."

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*(m|min|mins|minutes?|h|hr|hrs|hours?|d|days?|w|weeks?)$", re.IGNORECASE)
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float) -> float:
    """A moderator's time as a Unix timestamp: an age ("90m", "2h", "3 days", "1w" ago) or an ISO date or date and
    time, read as UTC unless it carries its own offset. Raises ``InputRejected`` with the accepted forms."""
    text = text.strip()
    age = _AGE.match(text)
    if age:
        return now - float(age[1]) * _UNIT_SECONDS[age[2][0].lower()]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InputRejected(BAD_TIME.format(text=text[:40])) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


@dataclass(frozen=True)
class PurgeScope:
    """Which jobs a purge covers: all of these that are set, within one platform and server."""

    platform: str
    guild_id: str | None
    job_id: int | None = None
    requester_id: str | None = None
    channel_id: str | None = None
    since: float | None = None  # requests made at or after (Unix time)
    until: float | None = None  # requests made before

    def __post_init__(self) -> None:
        if all(v is None for v in (self.job_id, self.requester_id, self.channel_id, self.since, self.until)):
            raise InputRejected(NOTHING_CHOSEN)  # never "everything" by omission
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise InputRejected(EMPTY_RANGE)

    @classmethod
    def from_options(cls, platform: str, guild_id: str | None, *, job_id: int | None = None,
                     requester_id: str | None = None, channel_id: str | None = None, since: str | None = None,
                     until: str | None = None, now: float) -> PurgeScope:
        """From a command's options, the times as typed (see ``parse_time``)."""
        return cls(platform, guild_id, job_id, requester_id, channel_id,
                   parse_time(since, now) if since else None, parse_time(until, now) if until else None)

    def describe(self) -> dict[str, str | int]:
        """The chosen filters, for the audit log (times as ISO UTC)."""
        out: dict[str, str | int] = {}
        for name in ("job_id", "requester_id", "channel_id"):
            if (value := getattr(self, name)) is not None:
                out[name] = value
        for name in ("since", "until"):
            if (value := getattr(self, name)) is not None:
                out[name] = datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
        return out

    @property
    def target(self) -> str:
        return f"{self.platform}:guild:{self.guild_id or '-'}"


@dataclass
class PurgeReport:
    jobs: list[int] = field(default_factory=list)  # purged: their messages are gone, or they were never posted
    messages: int = 0  # messages deleted
    cancelled: int = 0  # of those jobs, requests that had not started yet
    failed: dict[int, str] = field(default_factory=dict)  # job -> why its messages could not all be deleted
    more: bool = False  # the scope holds more jobs than one purge takes: run it again

    def summary(self) -> str:
        """What the moderator reads."""
        if not self.jobs and not self.failed:
            return "Nothing to purge: no HNaaS output matches that."
        n = len(self.jobs)
        parts = [f"Purged {n} request{'s' if n != 1 else ''} ({self.messages} message{'s' if self.messages != 1 else ''}"
                 f" deleted{f', {self.cancelled} not started yet and now cancelled' if self.cancelled else ''})."]
        if self.failed:
            first = next(iter(self.failed.values()))
            ids = ", ".join(f"#{i}" for i in list(self.failed)[:10])
            parts.append(f"Could not delete everything for {ids}: {first} Run the purge again to retry them.")
        if self.more:
            parts.append("There is more: run the same purge again.")
        return " ".join(parts)
