"""Build: the item store's stories as training threads, split into train and validation.

For every story in the store (by id, streamed), rebuild its comment tree: children in HN rank order (the parent's
``kids``; time order where the source had no rank order), dead, deleted and empty comments dropped together with
their replies, at most ``MAX_CHILDREN`` children per item, any depth. HN's HTML becomes plain text (``training.html``).

A story goes to ``val`` when a hash of its id falls below ``val_fraction``, so a story's split never depends on
what else is in the store or on the order of the run. Output, in ``out_dir``::

    train.jsonl, val.jsonl      thread JSON lines (extra keys: id, score, time, source; comments carry id)
    train.txt, val.txt          the same threads in the model's text form (model.format.encode_corpus)
    story_texts.jsonl           stories skipped for too few comments that have their own text (Ask HN...), with
                                their split, so that prose is not lost
    build.json                  options and counts

Files are written under temporary names and renamed at the end: an interrupted build leaves the previous output
in place, and running it again gives the same files.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.format import MAX_CHILDREN, clean_text, encode_corpus
from model.tree import Comment, Thread
from training.html import html_to_text
from training.store import Item, ItemStore

SPLITS = ("train", "val")
OUTPUTS = ("train.jsonl", "val.jsonl", "train.txt", "val.txt", "story_texts.jsonl")


@dataclass
class BuildOptions:
    val_fraction: float = 0.02  # share of stories in the validation split
    min_comments: int = 1  # stories with fewer surviving comments are skipped (never fewer than 1)
    max_stories: int | None = None  # stop after writing this many stories (both splits together)
    max_children: int = MAX_CHILDREN  # children kept per item, first ones in rank order


@dataclass
class BuildStats:
    stories_seen: int = 0
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    comments: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped_few_comments: int = 0
    skipped_dead_stories: int = 0
    story_texts: int = 0
    dropped_dead: int = 0  # comments dropped (each with its whole subtree, not counted here)
    dropped_deleted: int = 0
    dropped_empty: int = 0
    dropped_over_cap: int = 0


def split_of(story_id: int, val_fraction: float) -> str:
    digest = hashlib.blake2b(str(story_id).encode(), digest_size=8, person=b"hnaas-split").digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


def item_text(item: Item) -> str:
    """Plain text of an item: HN's HTML converted; other sources' text (markdown with entities) unescaped."""
    if not item.text:
        return ""
    return clean_text(html_to_text(item.text) if item.is_hn else html.unescape(item.text))


def story_title(item: Item) -> str:
    title = item.title or ""
    return title if item.is_hn else html.unescape(title)


def story_thread(store: ItemStore, story: Item, stats: BuildStats | None = None,
                 max_children: int = MAX_CHILDREN) -> Thread:
    """One story's surviving comment tree. Iterative, so a 1000-deep reply chain is fine."""
    stats = stats if stats is not None else BuildStats()
    extra: dict[str, Any] = {}
    if not story.is_hn:  # thread JSON imports: keep what the line carried (forum, date...)
        try:
            raw = json.loads(story.raw)
            extra.update({k: v for k, v in raw.items() if k not in ("title", "url", "comments", "text")})
        except (ValueError, AttributeError):
            pass
    extra.update({"id": story.id, "score": story.score, "time": story.time, "source": story.source})
    text = item_text(story)
    if text:
        extra["text"] = text
    thread = Thread(story_title(story), story.url, [], extra)
    stack: list[tuple[Item, list[Comment]]] = [(story, thread.comments)]
    while stack:
        parent, into = stack.pop()
        for child in store.children(parent.id, parent):
            if child.type not in ("comment", None):
                continue  # poll options hang off their poll too
            if child.deleted:
                stats.dropped_deleted += 1
                continue
            if child.dead:
                stats.dropped_dead += 1
                continue
            text = item_text(child)
            if not text:
                stats.dropped_empty += 1
                continue
            if len(into) >= max_children:
                stats.dropped_over_cap += 1
                continue
            comment = Comment(text, [], {"id": child.id})
            into.append(comment)
            stack.append((child, comment.children))
    return thread


def build(store: ItemStore, out_dir: str | Path, options: BuildOptions | None = None,
          progress: Callable[[int], None] | None = None) -> BuildStats:
    options = options or BuildOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = BuildStats()
    files = {name: open(out / f"{name}.tmp", "w", encoding="utf-8") for name in OUTPUTS}  # noqa: SIM115
    try:
        for story in store.stories():
            if options.max_stories is not None and sum(stats.written.values()) >= options.max_stories:
                break
            stats.stories_seen += 1
            if progress:
                progress(1)
            if story.dead or story.deleted:
                stats.skipped_dead_stories += 1
                continue
            thread = story_thread(store, story, stats, options.max_children)
            split = split_of(story.id, options.val_fraction)
            count = thread.comment_count
            if count < max(1, options.min_comments):
                stats.skipped_few_comments += 1
                if thread.extra.get("text"):
                    thread.extra["split"] = split
                    files["story_texts.jsonl"].write(thread.dumps() + "\n")
                    stats.story_texts += 1
                continue
            files[f"{split}.jsonl"].write(thread.dumps() + "\n")
            files[f"{split}.txt"].write(encode_corpus([thread], options.max_children))
            stats.written[split] += 1
            stats.comments[split] += count
    except BaseException:
        for f in files.values():
            f.close()
            os.unlink(f.name)
        raise
    for name, f in files.items():
        f.close()
        os.replace(f.name, out / name)
    with open(out / "build.json", "w", encoding="utf-8") as f:
        json.dump({"db": store.path, "options": asdict(options), "stats": asdict(stats)}, f, indent=2)
        f.write("\n")
    return stats
