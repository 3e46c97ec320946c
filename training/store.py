"""The item store: one SQLite file of raw HN items, the input of ``data build`` and the output of import and crawl.

Items are kept as received (Firebase API shape, text as HTML), indexed by id and by parent, so that a story's tree
can be rebuilt from any mix of sources: the Firebase API (crawled or from a dump), Algolia trees and thread JSON.

``kids`` holds a parent's children in HN rank order as a JSON list, or NULL when the source does not know that order
(Algolia): ``children()`` then falls back to time order. Items that are not from HN (thread JSON such as the Reddit
file) get negative synthetic ids, so they can never collide with an HN id.

This is an offline batch tool, so it uses the blocking ``sqlite3`` module on one connection; the crawler calls it
from its event loop between batches.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1

PRAGMAS = """
PRAGMA journal_mode = wal;
PRAGMA synchronous = normal;
"""

CREATE = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    type TEXT,
    by TEXT,
    time INTEGER,
    parent INTEGER,
    kids TEXT,                      -- JSON list of child ids in HN rank order; NULL = order unknown
    title TEXT,
    url TEXT,
    text TEXT,                      -- as received: HTML for HN items
    score INTEGER,
    descendants INTEGER,
    dead INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL,           -- firebase | crawl | algolia | the thread file's own source (reddit...)
    fetched_at REAL,                -- when the crawler last fetched it; NULL for imported items
    raw TEXT NOT NULL               -- the item's JSON as received (an Algolia node or thread comment without children)
);
CREATE INDEX IF NOT EXISTS items_by_parent ON items (parent, time, id);
CREATE INDEX IF NOT EXISTS items_roots ON items (id) WHERE parent IS NULL;

-- Crawl state: id ranges (inclusive) whose items have been fetched and stored (or found null) by the crawler.
CREATE TABLE IF NOT EXISTS crawl_done (
    lo INTEGER PRIMARY KEY,
    hi INTEGER NOT NULL
);
"""

COLUMNS = ("id", "type", "by", "time", "parent", "kids", "title", "url", "text", "score", "descendants",
           "dead", "deleted", "source", "fetched_at", "raw")

# Identical data is not rewritten (so re-importing a file changes nothing); anything newer replaces what was there,
# except that a source without rank order (NULL kids) does not erase a known order.
UPSERT = f"""
INSERT INTO items ({", ".join(COLUMNS)}) VALUES ({", ".join("?" for _ in COLUMNS)})
ON CONFLICT (id) DO UPDATE SET
    type = excluded.type, by = excluded.by, time = excluded.time, parent = excluded.parent,
    kids = COALESCE(excluded.kids, items.kids), title = excluded.title, url = excluded.url, text = excluded.text,
    score = excluded.score, descendants = excluded.descendants, dead = excluded.dead, deleted = excluded.deleted,
    source = excluded.source, fetched_at = excluded.fetched_at, raw = excluded.raw
WHERE items.raw IS NOT excluded.raw OR items.source IS NOT excluded.source
    OR items.fetched_at IS NOT excluded.fetched_at
"""

SELECT = f"SELECT {', '.join(COLUMNS)} FROM items"
GET = SELECT + " WHERE id = ?"
CHILDREN = SELECT + " WHERE parent = ? ORDER BY time, id"
# INDEXED BY: without it SQLite picks items_by_parent and sorts every page, quadratic over a large store.
STORIES = (SELECT + " INDEXED BY items_roots WHERE parent IS NULL AND type IN ('story', 'poll') AND id > ?"
           " ORDER BY id LIMIT ?")
COUNT_BY_TYPE = "SELECT COALESCE(type, '?'), source, COUNT(*) FROM items GROUP BY 1, 2 ORDER BY 1, 2"
DONE_OVERLAPPING = "SELECT lo, hi FROM crawl_done WHERE hi >= ? AND lo <= ? ORDER BY lo"
DONE_DELETE = "DELETE FROM crawl_done WHERE hi >= ? AND lo <= ?"
DONE_INSERT = "INSERT INTO crawl_done (lo, hi) VALUES (?, ?)"


@dataclass(frozen=True)
class Item:
    id: int
    type: str | None
    by: str | None
    time: int | None
    parent: int | None
    kids: tuple[int, ...] | None  # None: rank order unknown (Algolia); () no children known
    title: str | None
    url: str | None
    text: str | None
    score: int | None
    descendants: int | None
    dead: bool
    deleted: bool
    source: str
    fetched_at: float | None
    raw: str

    @classmethod
    def from_row(cls, row: tuple) -> Item:
        values = dict(zip(COLUMNS, row, strict=True))
        values["kids"] = None if values["kids"] is None else tuple(json.loads(values["kids"]))
        values["dead"], values["deleted"] = bool(values["dead"]), bool(values["deleted"])
        return cls(**values)

    @property
    def is_hn(self) -> bool:
        return self.id > 0


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def item_row(item: dict[str, Any], source: str, fetched_at: float | None = None,
             raw: str | None = None) -> tuple:
    """A Firebase-shaped item dict as a row. A missing ``kids`` means no children (Firebase omits empty lists);
    a source that does not know rank order (Algolia) passes ``"kids": None`` explicitly."""
    if "kids" in item and item["kids"] is None:
        kids = None
    else:
        kids = json.dumps([k for k in item.get("kids") or [] if _int(k) is not None])
    if raw is None:
        raw = json.dumps(item, ensure_ascii=False, sort_keys=True)
    return (
        item["id"], _str(item.get("type")), _str(item.get("by")), _int(item.get("time")), _int(item.get("parent")),
        kids, _str(item.get("title")), _str(item.get("url")), _str(item.get("text")), _int(item.get("score")),
        _int(item.get("descendants")), int(bool(item.get("dead"))), int(bool(item.get("deleted"))), source,
        fetched_at, raw,
    )


class ItemStore:
    """One SQLite file of items. Use as a context manager, or call ``close``."""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        # isolation_level=None: we open transactions ourselves, one per batch.
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.executescript(PRAGMAS)
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema {version}, newer than this code ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            # One script, one transaction (executescript would commit a transaction opened outside it).
            self.db.executescript(f"BEGIN IMMEDIATE;\n{CREATE}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")

    def __enter__(self) -> ItemStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> _Transaction:
        return _Transaction(self.db)

    # -- writing --

    def upsert_many(self, items: Iterable[dict[str, Any]], source: str = "firebase",
                    fetched_at: float | None = None) -> int:
        """Insert or replace Firebase-shaped items in one transaction; returns how many rows changed."""
        rows = [item_row(item, source, fetched_at) for item in items]
        return self.upsert_rows(rows)

    def upsert_rows(self, rows: list[tuple], done_ids: Iterable[int] = ()) -> int:
        """Write prepared rows (see ``item_row``) and mark ``done_ids`` as crawled, atomically."""
        with self.transaction():
            before = self.db.total_changes
            self.db.executemany(UPSERT, rows)
            changed = self.db.total_changes - before
            self._mark_done(done_ids)
        return changed

    def mark_done(self, ids: Iterable[int]) -> None:
        with self.transaction():
            self._mark_done(ids)

    def _mark_done(self, ids: Iterable[int]) -> None:
        for lo, hi in _runs(sorted(set(ids))):
            # Merge with every stored range that overlaps or touches [lo, hi].
            for old_lo, old_hi in self.db.execute(DONE_OVERLAPPING, (lo - 1, hi + 1)).fetchall():
                lo, hi = min(lo, old_lo), max(hi, old_hi)
            self.db.execute(DONE_DELETE, (lo - 1, hi + 1))
            self.db.execute(DONE_INSERT, (lo, hi))

    # -- reading --

    def get(self, item_id: int) -> Item | None:
        row = self.db.execute(GET, (item_id,)).fetchone()
        return Item.from_row(row) if row else None

    def children(self, item_id: int, parent: Item | None = None) -> list[Item]:
        """Direct children: in the parent's ``kids`` order when known, the rest (or all) after them by time."""
        items = [Item.from_row(row) for row in self.db.execute(CHILDREN, (item_id,))]
        if parent is None:
            parent = self.get(item_id)
        if parent is None or not parent.kids:
            return items
        rank = {kid: i for i, kid in enumerate(parent.kids)}
        # sorted() is stable, so unranked children (not in kids: a stale list) keep their time order at the end.
        return sorted(items, key=lambda item: rank.get(item.id, len(rank)))

    def stories(self, batch: int = 1000) -> Iterator[Item]:
        """Every story (and poll), by id, read in pages so that iterating holds one page at a time."""
        after = -(2**63)
        while True:
            page = [Item.from_row(row) for row in self.db.execute(STORIES, (after, batch))]
            yield from page
            if len(page) < batch:
                return
            after = page[-1].id

    def done_ranges(self, lo: int | None = None, hi: int | None = None) -> list[tuple[int, int]]:
        lo = -(2**63) if lo is None else lo
        hi = 2**63 - 1 if hi is None else hi
        return [tuple(r) for r in self.db.execute(DONE_OVERLAPPING, (lo, hi))]

    def pending_ids(self, lo: int, hi: int) -> Iterator[int]:
        """Ids in [lo, hi] not yet marked done, ascending (a snapshot of the crawl state taken at the call)."""
        ranges = self.done_ranges(lo, hi)
        start = lo
        for done_lo, done_hi in ranges:
            yield from range(start, min(done_lo, hi + 1))
            start = max(start, done_hi + 1)
        yield from range(start, hi + 1)

    def count_pending(self, lo: int, hi: int) -> int:
        done = sum(min(h, hi) - max(l, lo) + 1 for l, h in self.done_ranges(lo, hi))  # noqa: E741
        return max(0, hi - lo + 1 - done)

    def counts(self) -> dict[str, Any]:
        by_type: dict[str, int] = {}
        by_source: dict[str, int] = {}
        for type_, source, n in self.db.execute(COUNT_BY_TYPE):
            by_type[type_] = by_type.get(type_, 0) + n
            by_source[source] = by_source.get(source, 0) + n
        flags = self.db.execute("SELECT COALESCE(SUM(dead), 0), COALESCE(SUM(deleted), 0), "
                                "COALESCE(SUM(kids IS NULL), 0) FROM items").fetchone()
        done = self.db.execute("SELECT COUNT(*), COALESCE(SUM(hi - lo + 1), 0) FROM crawl_done").fetchone()
        return {
            "items": sum(by_type.values()), "by_type": by_type, "by_source": by_source,
            "dead": flags[0], "deleted": flags[1], "rank_order_unknown": flags[2],
            "crawl_done_ranges": done[0], "crawl_done_ids": done[1],
        }


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on error: a batch is stored whole or not at all."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _runs(ids: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted distinct ids as inclusive runs: [1, 2, 3, 7] -> (1, 3), (7, 7)."""
    start = prev = None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            yield start, prev
            start = prev = i
    if start is not None:
        yield start, prev
