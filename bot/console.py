"""The console adapter: a terminal "channel" on the same Request/Poster seams that Discord and Slack use.

``hnaas chat`` reads lines (links, HN item links or titles), queues each at once and prints the position; finished
threads are printed whole, indented by depth, as soon as each is posted, while you keep typing.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import textwrap
from typing import TextIO

from bot.core import Origin, Posted, Request
from bot.errors import HnaasError
from bot.queue import Job
from bot.render import CONSOLE, RenderedMessage

PROMPT = "› "
HELP = """Paste a link, an HN item link (https://news.ycombinator.com/item?id=…) or a title, then Enter.
Commands: /status, /cancel JOB, /help, /quit (or Ctrl-D: waits for queued threads, then exits)."""


def format_block(message: RenderedMessage, width: int | None = None) -> str:
    """A rendered message as terminal text: the header flush left with its details under it, each comment indented
    by its depth; with ``width``, comment paragraphs are wrapped to fit."""
    lines = message.text.split("\n")
    if message.depth == 0:
        return "\n".join([lines[0]] + ["  " + line for line in lines[1:]])
    indent = "    " * (message.depth - 1) + "  "

    def body(line: str) -> str:
        if width is None:
            return indent + line
        if not line.strip():
            return ""
        return textwrap.fill(line, width=max(40, width - len(indent)), initial_indent=indent,
                             subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)

    return "\n".join([indent + lines[0]] + [body(line) for line in lines[1:]])


class ConsolePoster:
    """Collects a job's messages and prints the thread in one piece when it is done, so that threads generated
    side by side never interleave on the screen."""

    platform = "console"
    limits = CONSOLE

    def __init__(self, out: TextIO, width: int | None = None) -> None:
        self.out = out
        self.width = width or min(100, shutil.get_terminal_size((100, 24)).columns)
        self._threads: dict[int, dict[str, str]] = {}

    async def post(self, job: Job, message: RenderedMessage, *, thread_ref: str | None,
                   reply_to: str | None) -> Posted:
        blocks = self._threads.setdefault(job.id, {})  # message key -> printed block, in posting order
        blocks[message.key] = format_block(message, self.width)
        return Posted(message_id=f"{job.id}:{message.key}", thread_ref=f"console:{job.id}")

    async def edit(self, job: Job, message_id: str, message: RenderedMessage) -> None:
        """The header streamed before the comment count was known: replace it before the thread is printed."""
        blocks = self._threads.get(job.id, {})
        key = message_id.split(":", 1)[1]
        if key in blocks:
            blocks[key] = format_block(message, self.width)

    async def notify(self, job: Job, event: str, text: str) -> None:
        if event == "done":
            thread = self._threads.pop(job.id, {})
            self._print(f"\n── #{job.id} ──\n" + "\n\n".join(thread.values()) + "\n")
        elif event == "failed":
            self._threads.pop(job.id, None)
            self._print(f"✗ #{job.id} ({job.title or job.input}): {text}")
        elif event == "started":
            self._print(f"… #{job.id}: writing “{job.title or job.input}”")

    async def delete(self, job: Job, message_ids: list[str], thread_ref: str | None) -> None:
        self._print(f"(#{job.id}: {len(message_ids)} messages deleted)")

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)


async def chat(app, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Run the console channel on an opened ``App`` until /quit or end of input."""
    poster = ConsolePoster(out)
    await app.serve(poster)
    info = getattr(app.engine, "info", {}) or {}
    print(f"HNaaS chat · model {info.get('path', app.settings.model)}\n{HELP}", file=out, flush=True)
    loop = asyncio.get_running_loop()
    origin = Origin("console", "console")
    while True:
        line = await loop.run_in_executor(None, stdin.readline)  # a thread, so generation goes on while we wait
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        try:
            await _handle(app, origin, line, out)
        except HnaasError as e:
            print(f"✗ {e.user_message}", file=out, flush=True)
    print("Waiting for queued threads…", file=out, flush=True)
    await app.idle()
    return 0


async def _handle(app, origin: Origin, line: str, out: TextIO) -> None:
    core = app.core
    if line == "/help":
        print(HELP, file=out, flush=True)
    elif line == "/status":
        status = await core.status()
        print(f"queue: {status['queue_length']} waiting, {status['running']} running · model {status['model']}"
              f" · HNaaS {status['version']}", file=out, flush=True)
    elif line.startswith("/cancel"):
        job_id = line.removeprefix("/cancel").strip().lstrip("#")
        if not job_id.isdigit():
            print("Usage: /cancel JOB (the number shown when it was queued)", file=out, flush=True)
            return
        job = await core.cancel(int(job_id), "you")
        print(f"Cancelled #{job.id}.", file=out, flush=True)
    else:
        accepted = await core.submit(Request(origin, "you", line, command=True))
        for a in accepted:
            where = "next up" if a.position <= 1 else f"position {a.position} in the queue"
            print(f"Queued #{a.job_id}: {a.input[:80]} ({where})", file=out, flush=True)
