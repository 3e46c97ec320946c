"""The one definition of HNaaS's thread text format, used by training and by serving.

A story is a header followed by its top-level comments::

    <title>\\n[<url>\\n]<comment><comment>...

and every comment is one block that holds its own text and then its replies::

    <|c|><text><reply block><reply block>...<|ec|>

So ``<|c|>`` opens a comment, its text runs to the next tag, the blocks that follow before its ``<|ec|>`` are its
children (in HN rank order), and ``<|ec|>`` closes it. Sibling boundaries are therefore unambiguous: a sibling starts
exactly where the previous sibling's ``<|ec|>`` ends, and text can never belong to two comments. Stories in a corpus
are separated by ``<|endoftext|>``. Example (story with a link, two top-level comments, the first with one reply)::

    Show HN: A tiny Lisp
    https://example.com/lisp
    <|c|>Neat. How big is the GC?<|c|>About 200 lines.<|ec|><|ec|><|c|>Reminds me of SICP.<|ec|><|endoftext|>

Rules the encoder applies (and the parser checks): titles are one line; texts are stripped, use ``\\n`` line breaks,
never contain a tag (a literal ``<|`` in text becomes ``< |``) and are never empty; at most ``MAX_CHILDREN``
children per item (top level included); depth is unbounded.

Generation starts from ``prompt(title, url)``, which ends inside an opened top-level comment, so the model writes
the first comment's text at once. ``ThreadParser`` turns what the model writes back into a tree, incrementally (so a
worker can post each comment as soon as its text is closed), keeping the valid prefix of whatever it is given and
counting what it dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from model.tree import Comment, Path, Thread

END_OF_TEXT = "<|endoftext|>"
OPEN = "<|c|>"
CLOSE = "<|ec|>"
SPECIAL_TOKENS = (END_OF_TEXT, OPEN, CLOSE)
MAX_CHILDREN = 10

_TAG = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_LONGEST_TAG = max(len(t) for t in SPECIAL_TOKENS)


def clean_title(title: str) -> str:
    return " ".join(title.replace("<|", "< |").split())


def clean_url(url: str | None) -> str | None:
    if url is None:
        return None
    url = "".join(url.split())
    while "<|" in url:  # one pass is not enough: removing the "<|" in "<<||" leaves "<|"
        url = url.replace("<|", "")
    return url or None


def clean_text(text: str) -> str:
    """Canonical comment text: no tags, ``\\n`` line breaks, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("<|", "< |")
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def header(title: str, url: str | None = None) -> str:
    title, url = clean_title(title), clean_url(url)
    return f"{title}\n{url}\n" if url else f"{title}\n"


def prompt(title: str, url: str | None = None) -> str:
    """The text a model continues to write a thread: a fresh story whose first comment is already opened."""
    return END_OF_TEXT + header(title, url) + OPEN


def without_header(text: str) -> str:
    """The same story text with its title and URL removed (the header of the last story becomes an empty title):
    what the model writes for "no title" is the baseline that classifier-free guidance pushes away from."""
    start = text.rfind(END_OF_TEXT)
    start = 0 if start < 0 else start + len(END_OF_TEXT)
    tag = _TAG.search(text, start)
    return text[:start] + header("") + (text[tag.start():] if tag else "")


def encode_comments(comments: list[Comment], max_children: int = MAX_CHILDREN) -> str:
    parts: list[str] = []
    # Explicit stack of (comment, closing?) so that arbitrarily deep trees encode without recursion.
    stack: list[tuple[Comment | None, bool]] = [(c, False) for c in reversed(_kept(comments, max_children))]
    while stack:
        comment, closing = stack.pop()
        if closing:
            parts.append(CLOSE)
            continue
        assert comment is not None
        parts.append(OPEN + clean_text(comment.text))
        stack.append((None, True))
        stack.extend((c, False) for c in reversed(_kept(comment.children, max_children)))
    return "".join(parts)


def _kept(comments: list[Comment], max_children: int) -> list[Comment]:
    return [c for c in comments if clean_text(c.text)][:max_children]


def encode_thread(thread: Thread, max_children: int = MAX_CHILDREN) -> str:
    """One story in text form, without the ``<|endoftext|>`` separators."""
    return header(thread.title, thread.url) + encode_comments(thread.comments, max_children)


def encode_corpus(threads, max_children: int = MAX_CHILDREN) -> str:
    """Stories joined for training: every story is preceded by ``<|endoftext|>``, as ``prompt`` is at inference."""
    return "".join(END_OF_TEXT + encode_thread(t, max_children) for t in threads)


# --- parsing -------------------------------------------------------------------------------------------------

# What the parser may drop, with the words used when reporting it.
PROBLEMS = {
    "empty": "empty comment",
    "duplicate": "repeated comment",
    "repetition": "comment cut at a repeating loop",
    "excess_children": "reply beyond the 10-per-item cap",
    "inside_dropped": "reply to a dropped comment",
    "truncated": "comment cut off before it ended",
    "unclosed": "comment block left open",
    "stray_close": "close tag with nothing open",
    "stray_text": "text outside any comment",
    "after_end": "text after the end of the story",
}


@dataclass
class ParseResult:
    comments: list[Comment]
    problems: Counter = field(default_factory=Counter)
    ended: bool = False  # the text reached <|endoftext|> (the model finished the story on its own)

    @property
    def comment_count(self) -> int:
        return sum(1 for _ in Thread("", None, self.comments).walk())

    @property
    def dropped(self) -> int:
        """Comments lost (not counting unclosed blocks, which are closed and kept)."""
        return sum(n for k, n in self.problems.items() if k not in ("unclosed", "stray_close", "stray_text",
                                                                   "after_end", "repetition"))

    def describe(self) -> str:
        if not self.problems:
            return "clean"
        return ", ".join(f"{n} × {PROBLEMS[k]}" for k, n in sorted(self.problems.items()))


@dataclass
class _Open:
    comment: Comment | None  # None when this block is being dropped (it and everything inside it)
    path: Path
    text: list[str] = field(default_factory=list)
    text_done: bool = False
    kept_children: int = 0
    seen_children: int = 0


class ThreadParser:
    """Incremental parser for the comment part of a story (everything after the header).

    ``feed`` returns the comments whose text has just been closed, each with its final path, parents before their
    children: once returned, a comment is never taken back. ``finish`` closes what is still open and returns the tree.
    Any string is accepted; nothing raises.
    """

    def __init__(self, max_children: int = MAX_CHILDREN, *, opened: bool = False) -> None:
        self.max_children = max_children
        self.result = ParseResult([])
        self._stack: list[_Open] = []
        self._top_kept = 0
        self._top_seen = 0
        self._buffer = ""
        self._outside: list[str] = []
        self._seen_texts: set[str] = set()
        self._ended = False
        if opened:  # the prompt already opened the first comment
            self._open()

    def feed(self, chunk: str) -> list[tuple[Path, Comment]]:
        if self._ended:
            if chunk.strip():
                self.result.problems["after_end"] = 1
            return []
        self._buffer += chunk
        emitted: list[tuple[Path, Comment]] = []
        while True:
            match = _TAG.search(self._buffer)
            if match is None:
                break
            self._add_text(self._buffer[: match.start()])
            self._buffer = self._buffer[match.end():]
            tag = match.group()
            if tag == OPEN:
                emitted += self._close_text()
                self._open()
            elif tag == CLOSE:
                emitted += self._close_text()
                self._close()
            else:
                emitted += self._end()
                return emitted
        # Hold back a tail that may be the start of a tag split across chunks.
        keep = next((n for n in range(min(_LONGEST_TAG - 1, len(self._buffer)), 0, -1)
                     if any(t.startswith(self._buffer[-n:]) for t in SPECIAL_TOKENS)), 0)
        if len(self._buffer) > keep:
            self._add_text(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
        return emitted

    def finish(self) -> ParseResult:
        """End of input without ``<|endoftext|>``: the last comment's unfinished text is dropped as truncated."""
        if not self._ended:
            self._add_text(self._buffer)
            self._buffer = ""
            top = self._stack[-1] if self._stack else None
            if top is not None and not top.text_done:
                if top.comment is not None and "".join(top.text).strip():
                    self.result.problems["truncated"] += 1
                top.comment = None
                top.text_done = True
            self._close_all()
        self._flush_outside()
        return self.result

    # -- state machine --

    def _add_text(self, text: str) -> None:
        if not text:
            return
        top = self._stack[-1] if self._stack else None
        if top is not None and not top.text_done:
            top.text.append(text)
        else:
            self._outside.append(text)

    def _flush_outside(self) -> None:
        if "".join(self._outside).strip():
            self.result.problems["stray_text"] += 1
        self._outside.clear()

    def _open(self) -> None:
        self._flush_outside()
        parent = self._stack[-1] if self._stack else None
        if parent is None:
            self._top_seen += 1
            over = self._top_kept >= self.max_children
            inside_dropped = False
            index = self._top_kept
            path: Path = (index,)
        else:
            parent.seen_children += 1
            over = parent.kept_children >= self.max_children
            inside_dropped = parent.comment is None
            # A dropped block's path is never used (nothing inside it is kept), so it shares its parent's tuple:
            # a run of dropped blocks ("<|c|><|c|><|c|>...") then costs linear, not quadratic, memory.
            path = parent.path if inside_dropped or over else parent.path + (parent.kept_children,)
        node = _Open(Comment(""), path)
        if inside_dropped:
            node.comment = None
            self.result.problems["inside_dropped"] += 1
        elif over:
            node.comment = None
            self.result.problems["excess_children"] += 1
        self._stack.append(node)

    def _close_text(self) -> list[tuple[Path, Comment]]:
        if not self._stack or self._stack[-1].text_done:
            return []
        node = self._stack[-1]
        node.text_done = True
        if node.comment is None:
            return []
        text, looped = _cut_loop(clean_text("".join(node.text)))
        if looped:
            self.result.problems["repetition"] += 1
        if not text:
            self.result.problems["empty"] += 1
            node.comment = None
            return []
        key = " ".join(text.lower().split())
        if key in self._seen_texts:
            self.result.problems["duplicate"] += 1
            node.comment = None
            return []
        self._seen_texts.add(key)
        node.comment.text = text
        parent = self._stack[-2] if len(self._stack) > 1 else None
        if parent is None:
            self.result.comments.append(node.comment)
            self._top_kept += 1
        else:
            assert parent.comment is not None  # a kept node's parent is kept
            parent.comment.children.append(node.comment)
            parent.kept_children += 1
        return [(node.path, node.comment)]

    def _close(self) -> None:
        if not self._stack:
            self.result.problems["stray_close"] += 1
            return
        self._stack.pop()

    def _close_all(self) -> None:
        kept_open = sum(1 for node in self._stack if node.comment is not None)
        if kept_open:
            self.result.problems["unclosed"] += kept_open
        self._stack.clear()

    def _end(self) -> list[tuple[Path, Comment]]:
        emitted = self._close_text()  # the model ended the story: its last text is complete
        self._close_all()
        self._ended = True
        self.result.ended = True
        if self._buffer.strip():
            self.result.problems["after_end"] += 1
        self._buffer = ""
        return emitted


class NextTags:
    """What may come next while a story is being written, so that sampling can only produce a valid tree.

    The decoding-side twin of ``ThreadParser``: fed one token kind at a time (``OPEN``, ``CLOSE``, ``END_OF_TEXT``, or
    ``None`` for text), it says which kinds the format allows next:
      - right after ``<|c|>`` the comment's text must start: no tag, no end, and no blank text (texts are stripped);
      - after a ``<|ec|>`` only a tag or the end: text there would belong to no comment;
      - ``<|ec|>`` only inside a comment; ``<|endoftext|>`` only outside every comment, once a comment exists;
      - ``<|c|>`` only while the item it would reply to (the story, at the top) has fewer than ``max_children``.
    Some kind is always allowed, so a constrained sampler never runs out of choices.
    """

    __slots__ = ("max_children", "children", "fresh", "after_close")

    def __init__(self, max_children: int = MAX_CHILDREN) -> None:
        self.max_children = max_children
        self.children = [0]  # replies so far of each open item: the story first, then each open comment
        self.fresh = False  # just after <|c|>: the comment has no text yet
        self.after_close = False  # just after <|ec|>

    @property
    def depth(self) -> int:
        return len(self.children) - 1

    def feed(self, kind: str | None) -> None:
        if kind == OPEN:
            self.children[-1] += 1
            self.children.append(0)
            self.fresh, self.after_close = True, False
        elif kind == CLOSE:
            if len(self.children) > 1:
                self.children.pop()
            self.fresh, self.after_close = False, True
        elif kind == END_OF_TEXT:
            self.children = [0]
            self.fresh = self.after_close = False
        else:
            self.fresh = False

    def allows_text(self) -> bool:
        return not self.after_close

    def allows_blank(self) -> bool:
        """Whitespace-only text: not as a comment's first token."""
        return not self.after_close and not self.fresh

    def allows(self, tag: str) -> bool:
        if self.fresh:
            return False
        if tag == OPEN:
            return self.children[-1] < self.max_children
        if tag == CLOSE:
            return self.depth > 0
        return self.depth == 0 and self.children[0] > 0  # END_OF_TEXT


_UNIT = re.compile(r"[^\n.!?]+[.!?]*\s*|\n")


def _cut_loop(text: str, max_repeats: int = 2) -> tuple[str, bool]:
    """Cut a comment where one sentence or line comes round for the third time: a model stuck in a loop."""
    counts: Counter = Counter()
    end = 0
    for match in _UNIT.finditer(text):
        unit = " ".join(match.group().split()).lower()
        if len(unit) >= 8:
            counts[unit] += 1
            if counts[unit] > max_repeats:
                return text[:end].strip(), True
        end = match.end()
    return text, False


def parse_comments(text: str, *, opened: bool = False, max_children: int = MAX_CHILDREN) -> ParseResult:
    parser = ThreadParser(max_children, opened=opened)
    parser.feed(text)
    return parser.finish()


def parse_story(text: str, max_children: int = MAX_CHILDREN) -> tuple[Thread, ParseResult]:
    """A whole story (header and comments, optional leading ``<|endoftext|>``) back into a thread."""
    text = text.removeprefix(END_OF_TEXT)
    cut = _TAG.search(text)
    head, body = (text[: cut.start()], text[cut.start():]) if cut else (text, "")
    lines = head.split("\n")  # line 1 is the title (possibly empty), line 2 the URL when there is one
    title = clean_title(lines[0])
    url = clean_url(lines[1]) if len(lines) > 1 else None
    result = parse_comments(body, max_children=max_children)
    return Thread(title, url, result.comments), result


def parse_generation(text: str, finished: bool, max_children: int = MAX_CHILDREN) -> ParseResult:
    """Parse what a model wrote after ``prompt()``. ``finished`` means it stopped at ``<|endoftext|>`` (which
    engines cut off): then its last text is complete; otherwise the generation ran out of tokens mid-comment."""
    parser = ThreadParser(max_children, opened=True)
    parser.feed(text)
    if finished:
        parser.feed(END_OF_TEXT)
    return parser.finish()
