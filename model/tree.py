"""Comment trees and thread JSON, the project's interchange shape for threads in and out.

Thread JSON::

    {"title": str, "url": str | null, "comments": [{"text": str, "children": [...]}]}

Extra keys (``id``, ``score``, ``time``, ``source``...) are allowed on the thread and on each comment; they are
kept in ``extra`` and written back out, so a file can pass through the project without losing what it carried.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

Path = tuple[int, ...]  # a comment's position: indexes from the top level down, e.g. (0, 2) = 3rd reply to 1st comment


@dataclass(eq=False)
class Comment:
    # from_json, to_json and == walk the tree with explicit stacks, never recursion, so that a model's runaway
    # reply chain (hundreds or thousands deep) cannot hit the recursion limit. (json.dumps and json.loads still
    # recurse: Thread.dumps and Thread.from_json(str) handle up to about 490 levels.)
    text: str
    children: list[Comment] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Comment:
        def one(item: Any) -> tuple[Comment, list]:
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise ValueError("a comment needs a string 'text'")
            children = item.get("children") or []
            if not isinstance(children, list):
                raise ValueError("'children' must be a list")
            extra = {k: v for k, v in item.items() if k not in ("text", "children")}
            return cls(item["text"], [], extra), children

        root, children = one(data)
        stack = [(root, children)]
        while stack:
            parent, children = stack.pop()
            for item in children:
                child, grandchildren = one(item)
                parent.children.append(child)
                stack.append((child, grandchildren))
        return root

    def to_json(self) -> dict[str, Any]:
        root = {**self.extra, "text": self.text, "children": []}
        stack = [(self, root["children"])]
        while stack:
            comment, out = stack.pop()
            for child in comment.children:
                data = {**child.extra, "text": child.text, "children": []}
                out.append(data)
                stack.append((child, data["children"]))
        return root

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        stack = [(self, other)]
        while stack:
            a, b = stack.pop()
            if a is b:
                continue
            if (a.__class__ is not b.__class__ or a.text != b.text or a.extra != b.extra
                    or len(a.children) != len(b.children)):
                return False
            stack.extend(zip(a.children, b.children, strict=True))
        return True

    __hash__ = None  # mutable, like the dataclass-generated __eq__ it replaces


@dataclass
class Thread:
    title: str
    url: str | None = None
    comments: list[Comment] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Thread:
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, dict) or not isinstance(data.get("title"), str):
            raise ValueError("a thread needs a string 'title'")
        url = data.get("url")
        if url is not None and not isinstance(url, str):
            raise ValueError("'url' must be a string or null")
        comments = data.get("comments") or []
        if not isinstance(comments, list):
            raise ValueError("'comments' must be a list")
        extra = {k: v for k, v in data.items() if k not in ("title", "url", "comments")}
        return cls(data["title"], url, [Comment.from_json(c) for c in comments], extra)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "title": self.title,
            "url": self.url,
            "comments": [c.to_json() for c in self.comments],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False)

    def walk(self) -> Iterator[tuple[Path, Comment]]:
        """Every comment with its path, depth first, parents before children, siblings in rank order."""
        return walk(self.comments)

    @property
    def comment_count(self) -> int:
        return sum(1 for _ in self.walk())

    @property
    def depth(self) -> int:
        """Deepest level present: 0 for no comments, 1 for top-level comments only."""
        return max((len(path) for path, _ in self.walk()), default=0)


def walk(comments: list[Comment], prefix: Path = ()) -> Iterator[tuple[Path, Comment]]:
    # Iterative so that a model's 500-deep runaway reply chain cannot hit the recursion limit.
    stack: list[tuple[Path, Comment]] = [(prefix + (i,), c) for i, c in enumerate(comments)][::-1]
    while stack:
        path, comment = stack.pop()
        yield path, comment
        stack.extend((path + (i,), c) for i, c in reversed(list(enumerate(comment.children))))


def read_jsonl(path: str) -> Iterator[Thread]:
    """Threads from a JSON-lines file (optionally gzip-compressed), skipping blank lines."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield Thread.from_json(line)
