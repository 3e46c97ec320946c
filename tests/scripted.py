"""A scripted engine for tests of the serving path: it writes a well-formed thread in the model's text format.

The real tiny GPT-2 (random weights) exercises the engine seam itself, but it writes noise, not trees; tests that
check how a tree is posted need a generation whose tree is known. This engine stands exactly at the engine seam
(``async generate(requests)``) and answers from the prompt and seed, like a model would.
"""

from __future__ import annotations

import asyncio
import random

from model.engine import GenerationResult
from model.format import CLOSE, OPEN, encode_comments
from model.tree import Comment


def scripted_comments(title: str, seed: int, *, long_text: str | None = None) -> list[Comment]:
    rng = random.Random(f"{title}:{seed}")
    comments = []
    for i in range(rng.randint(2, 3)):
        replies = [Comment(f"Reply {i}.{j} about {title} (seed {seed}).",
                           [Comment(f"Deeper reply {i}.{j}.0.")] if j == 0 else [])
                   for j in range(rng.randint(1 if i == 0 else 0, 2))]  # the first always has a reply
        comments.append(Comment(f"Top comment {i} on {title} (seed {seed}).", replies))
    if long_text:
        comments[0].children.append(Comment(long_text))
    return comments


class ScriptedEngine:
    """Generates ``scripted_comments`` for each prompt's title. ``delay`` makes a batch take time."""

    def __init__(self, *, delay: float = 0.0, long_text: str | None = None, empty_titles: tuple[str, ...] = (),
                 stream_delay: float | None = None):
        self.delay = delay
        self.stream_delay = stream_delay  # when set, on_text gets the text tag by tag, this many seconds apart
        self.finished_at: list[float] = []
        self.long_text = long_text
        self.empty_titles = empty_titles
        self.batches: list[list] = []
        self.info = {"path": "scripted"}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def generate(self, requests, on_text=None):
        self.batches.append(list(requests))
        if self.delay:
            await asyncio.sleep(self.delay)
        results = []
        for request in requests:
            title = request.prompt.split("\n", 1)[0].removeprefix("<|endoftext|>")
            if title in self.empty_titles:
                text = ""
            else:
                # The prompt opened the first comment: drop the leading <|c|> of the encoded comments.
                text = encode_comments(scripted_comments(title, request.seed, long_text=self.long_text))
                text = text.removeprefix(OPEN)
            assert not text or text.endswith(CLOSE)
            results.append(GenerationResult(text, 10, len(text) // 4, True))
        if on_text is not None and self.stream_delay is not None:
            for index, result in enumerate(results):
                for end in range(len(result.text)):
                    if result.text.startswith((OPEN, CLOSE), end):
                        on_text(index, result.text[:end + 1])  # a tag just began: like an engine mid-token
                        await asyncio.sleep(self.stream_delay)
                on_text(index, result.text)
        self.finished_at.append(asyncio.get_running_loop().time())
        return results
