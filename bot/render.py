"""Pure rendering: a comment tree and its story → the messages a platform posts, within that platform's limits.

Nothing here does I/O or reads a clock: the same thread and seed always render to the same messages, which is what
makes posting resumable (a message's ``key`` names the same message after a restart).

Keys: the header is ``"h"``; a comment is ``"c"`` + its path (``"c0.2"`` = 3rd reply to the 1st top-level comment);
a long comment split over several messages adds ``"#1"``, ``"#2"``... for its later parts. A comment's first part
replies to its parent comment's first part (or to the header); later parts reply to the part before them.

Handles, points and ages are fictional, derived from the job's seed and the comment's position, never from a real
username, and stay the same for the same job.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from model.tree import Comment, Path, Thread

AI_LABEL = "AI-generated discussion · fictional users · not written by real people"


@dataclass(frozen=True)
class RenderLimits:
    max_chars: int  # most characters in one message
    markup: str = "markdown"  # "markdown" (Discord), "mrkdwn" (Slack) or "plain" (console)


DISCORD = RenderLimits(max_chars=2000, markup="markdown")
SLACK = RenderLimits(max_chars=2900, markup="mrkdwn")  # one section block holds 3000; keep a margin
CONSOLE = RenderLimits(max_chars=100_000, markup="plain")


@dataclass(frozen=True)
class Story:
    """What rendering needs to know about a job."""

    title: str
    url: str | None
    seed: int
    note: str | None = None  # e.g. why the title came from the link: shown under the header


@dataclass(frozen=True)
class RenderedMessage:
    key: str
    parent_key: str | None  # None for the header
    depth: int  # 0 for the header, 1 for top-level comments
    text: str
    path: Path = ()
    part: int = 0


# --- fictional people ----------------------------------------------------------------------------------------

_FIRST = ("quiet", "lazy", "rusty", "amber", "tidy", "feral", "lucid", "brisk", "sober", "odd", "mellow", "stray",
          "polar", "spare", "dusty", "fuzzy", "nimble", "plain", "hollow", "vivid", "swift", "gentle", "coarse",
          "silent", "static", "modest", "civic", "lunar", "solar", "cobalt", "mossy", "frank")
_SECOND = ("lambda", "otter", "kernel", "heron", "pixel", "cactus", "monad", "falcon", "tensor", "walrus", "sprocket",
           "badger", "vector", "parsnip", "gopher", "lemur", "socket", "turnip", "quokka", "beacon", "cipher",
           "marmot", "thunk", "ferret", "lichen", "piston", "raven", "bobbin", "widget", "mantis", "ember", "nomad")


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def handle(seed: int, path: Path) -> str:
    """A fictional HN-style username for the comment at ``path`` (the story's submitter has path ``()``)."""
    h = _hash("handle", seed, path)
    first, second = _FIRST[h % len(_FIRST)], _SECOND[(h >> 8) % len(_SECOND)]
    style = (h >> 16) % 4
    if style == 0:
        return f"{first}{second}"
    if style == 1:
        return f"{first}_{second}"
    if style == 2:
        return f"{second}{(h >> 20) % 100}"
    return f"{first[:3]}{second}"


def points(seed: int) -> int:
    h = _hash("points", seed)
    return 3 + int(2 ** ((h % 1000) / 1000 * 9.5))  # 4 .. ~730, most stories small, a few large


def age_minutes(seed: int, path: Path) -> int:
    """Minutes since posting. The story is 1–14 hours old; every reply is younger than its parent."""
    age = 60 + _hash("age", seed) % (13 * 60)
    for depth in range(1, len(path) + 1):
        fraction = 0.35 + (_hash("age", seed, path[:depth]) % 600) / 1000  # 0.35 .. 0.95 of the parent's age
        age = max(1, int(age * fraction))
    return age


def format_age(minutes: int) -> str:
    if minutes < 60:
        return f"{minutes} minute{'s' if minutes != 1 else ''} ago"
    hours = minutes // 60
    return f"{hours} hour{'s' if hours != 1 else ''} ago"


def domain(url: str | None) -> str | None:
    if not url:
        return None
    host = urlsplit(url).hostname or ""
    return host.removeprefix("www.") or None


# --- text safety -----------------------------------------------------------------------------------------------

_ZWSP = "\u200b"
_MENTIONS = re.compile(r"@(everyone|here|channel)\b|<([@#!][^>\s]*)>", re.IGNORECASE)


def neutralise_mentions(text: str) -> str:
    """Break every form of mass or user mention, so generated text can never ping anyone."""
    return _MENTIONS.sub(lambda m: f"@{_ZWSP}{m.group(1)}" if m.group(1) else f"<{_ZWSP}{m.group(2)}>", text)


def _safe(text: str, markup: str) -> str:
    if markup == "mrkdwn":
        # Slack reads <...> as links and mentions (<!channel>, <@U123>) and & as an entity: escaped, generated text
        # can only ever be text.
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = neutralise_mentions(text)
    if markup == "markdown":
        # A generated line starting with "#" would become a giant Discord heading.
        text = re.sub(r"(?m)^(#{1,3}|-#)\s", lambda m: "\\" + m.group(0), text)
    return text


def _bold(text: str, markup: str) -> str:
    return {"markdown": f"**{text}**", "mrkdwn": f"*{text}*"}.get(markup, text)


# --- messages --------------------------------------------------------------------------------------------------


def header_text(story: Story, comment_count: int | None, limits: RenderLimits) -> str:
    title = _safe(story.title, limits.markup)
    site = domain(story.url)
    headline = f"▲ {_bold(title, limits.markup)}" + (f" ({site})" if site else "")
    counts = f"{points(story.seed)} points by {handle(story.seed, ())} {format_age(age_minutes(story.seed, ()))}"
    if comment_count is not None:
        counts += f" | {comment_count} comment{'s' if comment_count != 1 else ''}"
    label = {"markdown": f"-# 🤖 {AI_LABEL}", "mrkdwn": f"_🤖 {AI_LABEL}_"}.get(limits.markup, f"[{AI_LABEL}]")
    lines = [headline, counts]
    if story.url:
        lines.append({"markdown": f"<{story.url}>", "mrkdwn": _safe(story.url, "mrkdwn")}.get(limits.markup, story.url))
    lines.append(label)
    if story.note:
        note = _safe(story.note, limits.markup)
        lines.append({"markdown": f"-# ⚠ {note}", "mrkdwn": f"_⚠ {note}_"}.get(limits.markup, f"(⚠ {note})"))
    return _fit("\n".join(lines), limits.max_chars)


def depth_marker(depth: int, markup: str) -> str:
    if markup == "plain":
        return ""
    return "┃ " * (depth - 1) + "↳" if depth > 1 else "▸"


def render_header(story: Story, comment_count: int | None, limits: RenderLimits) -> RenderedMessage:
    return RenderedMessage("h", None, 0, header_text(story, comment_count, limits))


def render_comment(story: Story, path: Path, comment: Comment, limits: RenderLimits) -> list[RenderedMessage]:
    """One comment as one or more messages (split only when it does not fit in one)."""
    depth = len(path)
    key = comment_key(path)
    parent = comment_key(path[:-1]) if depth > 1 else "h"
    marker = depth_marker(depth, limits.markup)
    byline = f"{marker} {_bold(handle(story.seed, path), limits.markup)} {format_age(age_minutes(story.seed, path))}"
    byline = byline.strip()
    if limits.markup == "mrkdwn" and depth > 1:
        # A Slack thread is one flat list with no reply links: name the parent, as Discord's reply preview does.
        byline += f" · replying to {handle(story.seed, path[:-1])}"
    body = _safe(comment.text, limits.markup)
    continued = f"{marker} {_bold(handle(story.seed, path), limits.markup)} (continued)".strip()
    room_first = limits.max_chars - len(byline) - 1
    room_rest = limits.max_chars - len(continued) - 1
    chunks = split_text(body, room_first, room_rest)
    messages = []
    for part, chunk in enumerate(chunks):
        head = byline if part == 0 else continued
        messages.append(RenderedMessage(
            key if part == 0 else f"{key}#{part}",
            parent if part == 0 else (key if part == 1 else f"{key}#{part - 1}"),
            depth, f"{head}\n{chunk}", path, part,
        ))
    return messages


def comment_key(path: Path) -> str:
    return "c" + ".".join(map(str, path))


def render_thread(thread: Thread, story: Story, limits: RenderLimits) -> list[RenderedMessage]:
    """Header, then every comment depth first (parents before replies, siblings in rank order)."""
    messages = [render_header(story, thread.comment_count, limits)]
    for path, comment in thread.walk():
        messages.extend(render_comment(story, path, comment, limits))
    return messages


def split_text(text: str, first: int, rest: int | None = None) -> list[str]:
    """Split into chunks of at most ``first`` (then ``rest``) characters, at the cleanest boundary available:
    a blank line, a line break, a sentence end, a space; mid-word only for a word longer than a whole chunk."""
    rest = first if rest is None else rest
    chunks: list[str] = []
    limit = first
    while len(text) > limit:
        window = text[: limit + 1]
        cut = -1
        for sep in ("\n\n", "\n", ". ", "! ", "? ", " "):
            at = window.rfind(sep)
            if at >= limit // 3:  # never leave a uselessly short chunk behind
                cut = at + (len(sep) if sep.strip() else 0)
                break
        if cut <= 0:
            cut = limit
        chunks.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
        limit = rest
    chunks.append(text)
    return [c for c in chunks if c] or [""]


def _fit(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def format_status(status: dict) -> str:
    """``Core.status`` as the lines a member reads."""
    names = {"queue_length": "Waiting", "running": "Writing now", "model": "Model", "version": "Version"}
    return "\n".join(f"{label}: {status[key]}" for key, label in names.items() if status.get(key) not in (None, ""))
