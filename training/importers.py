"""Importers: files of items into the item store, streamed and committed in batches.

* ``firebase``: one HN Firebase API item per line (``{"id", "type", "by", "time", "kids", "text", ...}``), optionally
  gzip-compressed, as ``stories-2016-2020.jsonl.gz`` has them.
* ``algolia``: HN Algolia ``/items/{id}`` trees (nested ``children``), one per line, or one whole JSON document (a
  tree, a list of trees, or a search answer ``{"hits": [...]}``). Algolia has no ``kids``: its children come in time
  order, so items are stored with unknown rank order and ``build`` keeps time order.
* ``threads``: thread JSON lines (``model.tree``), e.g. the Reddit file. Their items get negative synthetic ids
  derived from a hash of the line, so they can never collide with HN ids and re-importing a line gives the same ids;
  the children's order is the file's, recorded in ``kids``.

Memory is bounded by one batch (and, for a single-document Algolia file, by that document).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from training.store import ItemStore, item_row

log = logging.getLogger(__name__)

BATCH = 5000
COMMENT_BITS = 19  # synthetic ids: -(line_hash << COMMENT_BITS | index), at most 2**19 - 1 comments per thread
LINE_HASH_BITS = 43  # 43 + 19 = 62 bits: fits SQLite's signed 64-bit integers


@dataclass
class ImportStats:
    lines: int = 0
    items: int = 0
    changed: int = 0  # rows inserted or replaced; 0 when re-importing the same data
    skipped: int = 0  # lines or nodes that are not items (null, no id, bad JSON)
    errors: list[str] = field(default_factory=list)  # the first few problems, for the log

    def problem(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.errors) < 20:
            self.errors.append(f"{where}: {why}")


def open_text(path: str):
    opener = gzip.open if str(path).endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8")


def _json_lines(path: str, stats: ImportStats) -> Iterator[tuple[int, Any]]:
    for number, _, value in _json_lines_raw(path, stats):
        yield number, value


def _json_lines_raw(path: str, stats: ImportStats) -> Iterator[tuple[int, str, Any]]:
    """(line number, the line as read, its JSON value) for each non-blank line; bad JSON is counted and skipped."""
    with open_text(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            stats.lines += 1
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                stats.problem(f"{path}:{number}", f"bad JSON ({error.msg})")
                continue
            yield number, line, value


def _write(store: ItemStore, rows: Iterable[tuple], stats: ImportStats, batch: int,
           progress: Callable[[int], None] | None) -> None:
    pending: list[tuple] = []
    for row in rows:
        pending.append(row)
        if len(pending) >= batch:
            _flush(store, pending, stats, progress)
    _flush(store, pending, stats, progress)


def _flush(store: ItemStore, rows: list[tuple], stats: ImportStats, progress: Callable[[int], None] | None) -> None:
    if rows:
        stats.changed += store.upsert_rows(rows)
        stats.items += len(rows)
        if progress:
            progress(len(rows))
        rows.clear()


# --- Firebase API items ----------------------------------------------------------------------------------------

def import_firebase(store: ItemStore, paths: Iterable[str], *, source: str = "firebase", batch: int = BATCH,
                    progress: Callable[[int], None] | None = None) -> ImportStats:
    stats = ImportStats()

    def rows() -> Iterator[tuple]:
        for path in paths:
            for number, item in _json_lines(path, stats):
                if not isinstance(item, dict) or not isinstance(item.get("id"), int) or item["id"] <= 0:
                    stats.problem(f"{path}:{number}", "not an HN item")
                    continue
                yield item_row(item, source)

    _write(store, rows(), stats, batch, progress)
    return stats


# --- Algolia trees ---------------------------------------------------------------------------------------------

def _algolia_documents(path: str, stats: ImportStats) -> Iterator[tuple[str, Any]]:
    """Trees from a JSON-lines file, or from one (pretty-printed) JSON document."""
    with open_text(path) as f:
        first = next((line for line in f if line.strip()), "")
    try:
        json.loads(first)
        one_per_line = True
    except json.JSONDecodeError:
        one_per_line = False
    if one_per_line:
        for number, doc in _json_lines(path, stats):
            yield from _trees(f"{path}:{number}", doc)
    else:
        stats.lines += 1
        with open_text(path) as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as error:
                stats.problem(path, f"bad JSON ({error.msg})")
                return
        yield from _trees(path, doc)


def _trees(where: str, doc: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(doc, dict) and isinstance(doc.get("hits"), list):
        doc = doc["hits"]
    for tree in doc if isinstance(doc, list) else [doc]:
        yield where, tree


def algolia_items(tree: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """An Algolia tree as Firebase-shaped items (``kids`` = None: rank order unknown), parents first."""
    stack = [(tree, None)]
    while stack:
        node, parent_id = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("id"), int):
            continue
        children = node.get("children") or []
        raw = {k: v for k, v in node.items() if k != "children"}
        item_type = node.get("type") or ("story" if node.get("parent_id") is None else "comment")
        created = node.get("created_at_i")
        if not isinstance(created, int) and isinstance(node.get("created_at"), str):
            try:
                created = int(dt.datetime.fromisoformat(node["created_at"].replace("Z", "+00:00")).timestamp())
            except ValueError:
                created = None
        parent = node.get("parent_id", parent_id)
        item = {
            "id": node["id"], "type": item_type, "by": node.get("author"), "time": created,
            "parent": parent if item_type != "story" else None, "kids": None,
            "title": node.get("title"), "url": node.get("url"), "text": node.get("text"),
            "score": node.get("points"),
            "descendants": node.get("num_comments") if item_type == "story" else None,
            # Algolia leaves deleted comments in the tree with neither author nor text.
            "deleted": item_type == "comment" and node.get("author") is None and not node.get("text"),
        }
        yield {"item": item, "raw": raw}
        stack.extend((child, node["id"]) for child in reversed(children))


def import_algolia(store: ItemStore, paths: Iterable[str], *, batch: int = BATCH,
                   progress: Callable[[int], None] | None = None) -> ImportStats:
    stats = ImportStats()

    def rows() -> Iterator[tuple]:
        for path in paths:
            for where, tree in _algolia_documents(path, stats):
                if not isinstance(tree, dict) or not isinstance(tree.get("id"), int):
                    stats.problem(where, "not an Algolia item")
                    continue
                for entry in algolia_items(tree):
                    yield item_row(entry["item"], "algolia",
                                   raw=json.dumps(entry["raw"], ensure_ascii=False, sort_keys=True))

    _write(store, rows(), stats, batch, progress)
    return stats


# --- thread JSON -----------------------------------------------------------------------------------------------

def thread_base_id(line: str) -> int:
    """The synthetic story id of a thread JSON line: negative, from a hash of the line's content."""
    digest = hashlib.blake2b(line.strip().encode("utf-8"), digest_size=8).digest()
    line_hash = int.from_bytes(digest, "big") >> (64 - LINE_HASH_BITS)
    return -((line_hash or 1) << COMMENT_BITS)


def thread_items(thread: dict[str, Any], base_id: int) -> Iterator[tuple[dict[str, Any], dict]]:
    """A thread JSON object as Firebase-shaped items with synthetic ids ``base_id - n`` (n = 1, 2... depth first)."""
    story_time = thread.get("time") if isinstance(thread.get("time"), int) else _date_time(thread.get("date"))
    comments = thread.get("comments") or []
    next_n = 1  # ids are handed out as children are reached, so an item's kids are known when it is written

    def assign(nodes: list[Any]) -> list[int]:
        nonlocal next_n
        ids = []
        for node in nodes:
            if not isinstance(node, dict):
                continue
            if next_n >= 2**COMMENT_BITS:
                raise ValueError(f"more than {2**COMMENT_BITS - 1} comments in one thread")
            ids.append(base_id - next_n)
            next_n += 1
        return ids

    top = assign(comments)
    raw_story = {k: v for k, v in thread.items() if k != "comments"}
    yield {"id": base_id, "type": "story", "title": thread.get("title"), "url": thread.get("url"),
           "time": story_time, "score": thread.get("score") if isinstance(thread.get("score"), int) else None,
           "by": thread.get("by") if isinstance(thread.get("by"), str) else None, "kids": top}, raw_story
    stack = [(node, item_id, base_id) for node, item_id in zip(
        [c for c in comments if isinstance(c, dict)], top, strict=True)][::-1]
    while stack:
        node, item_id, parent = stack.pop()
        children = [c for c in node.get("children") or [] if isinstance(c, dict)]
        kids = assign(children)
        raw = {k: v for k, v in node.items() if k != "children"}
        text = node.get("text")
        yield {"id": item_id, "type": "comment", "parent": parent, "kids": kids,
               "text": text if isinstance(text, str) else None,
               "time": node.get("time") if isinstance(node.get("time"), int) else story_time,
               "by": node.get("by") if isinstance(node.get("by"), str) else None}, raw
        stack.extend((child, kid, item_id) for child, kid in reversed(list(zip(children, kids, strict=True))))


def _date_time(date: Any) -> int | None:
    if not isinstance(date, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(date)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return int(parsed.timestamp())


def import_threads(store: ItemStore, paths: Iterable[str], *, source: str | None = None, batch: int = BATCH,
                   progress: Callable[[int], None] | None = None) -> ImportStats:
    """Thread JSON lines. ``source`` defaults to each thread's own ``source`` key, else ``threads``."""
    stats = ImportStats()

    def rows() -> Iterator[tuple]:
        for path in paths:
            for number, line, thread in _json_lines_raw(path, stats):
                try:
                    if not isinstance(thread, dict) or not isinstance(thread.get("title"), str):
                        raise ValueError("a thread needs a string 'title'")
                    own = thread.get("source")
                    src = source or (own if isinstance(own, str) and own else "threads")
                    items = list(thread_items(thread, thread_base_id(line)))
                except ValueError as error:
                    stats.problem(f"{path}:{number}", str(error))
                    continue
                for item, raw in items:
                    yield item_row(item, src, raw=json.dumps(raw, ensure_ascii=False, sort_keys=True))

    _write(store, rows(), stats, batch, progress)
    return stats


IMPORTERS = {"firebase": import_firebase, "algolia": import_algolia, "threads": import_threads}
