"""The mix the embedded default model is trained on, built from ``../shared/data`` (see its README).

Decisions, and why:
- Reddit link threads (72,950 threads, ~88 MB) teach "title -> comment tree": they are the only real trees with
  titles here. HTML entities are unescaped; the markdown is kept (HN readers write much the same way).
- HN prose teaches HN's voice: Ask/Show HN story texts (~31k, title -> the poster's own text, as a one-comment
  thread), 2,000 parent -> reply pairs (a two-comment chain), 1,000 random comments and the 2025 front-page comments
  (one-comment threads: their titles and parents are unknown, so they get an empty title rather than a false one).
  HN text is small next to Reddit, so it is repeated ``hn_repeat`` times in the training split.
- Curriculum: the model first trains on that whole mix, then continues on an HN-heavy mix (``--reddit-fraction 0.25
  --hn-repeat 1``: a quarter of the Reddit threads keep the tree structure alive while HN's voice dominates). Both mixes
  share the same validation splits, so their figures compare.
- Validation: 2 % of Reddit threads by a hash of the title, and the complete "IBM acquires Red Hat" HN thread
  (Algolia), never trained on, cut into threads of at most 10 top-level comments under the same title, so held-out
  HN comments are scored given their real title and ancestors.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from model.format import MAX_CHILDREN, encode_corpus
from model.tree import Comment, Thread
from training.html import html_to_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _unescape_tree(comments: list[dict]) -> list[Comment]:
    return [Comment(html.unescape(c["text"]), _unescape_tree(c.get("children") or [])) for c in comments]


def reddit_threads(shared: Path) -> Iterator[Thread]:
    with gzip.open(shared / "reddit" / "reddit-threads-2015.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            yield Thread(html.unescape(d["title"]), d.get("url"), _unescape_tree(d["comments"]),
                         {"source": "reddit", "forum": d.get("forum")})


def hn_story_texts(shared: Path) -> Iterator[Thread]:
    with gzip.open(shared / "hn" / "stories-2016-2020.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if d.get("text") and d.get("title") and not d.get("dead") and not d.get("deleted"):
                yield Thread(d["title"], d.get("url"), [Comment(html_to_text(d["text"]))], {"source": "hn-story"})


def hn_comment_threads(shared: Path) -> Iterator[Thread]:
    with open(shared / "hn" / "comment-reply-pairs-2000.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            yield Thread("", None, [Comment(d["prompt"], [Comment(d["completion"])])], {"source": "hn-pair"})
    with open(shared / "hn" / "comments-random-1000.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if d.get("text"):
                yield Thread("", None, [Comment(html_to_text(d["text"]))], {"source": "hn-comment"})
    db = sqlite3.connect(f"file:{shared / 'hn' / 'frontpage-comments-2025.sqlite'}?mode=ro", uri=True)
    try:
        for (text,) in db.execute("SELECT text FROM comments ORDER BY id"):
            yield Thread("", None, [Comment(text)], {"source": "hn-frontpage"})
    finally:
        db.close()


def algolia_validation(shared: Path) -> list[Thread]:
    data = json.loads((shared / "hn" / "thread-18321884-algolia.json").read_text())
    story = data["hits"][0] if "hits" in data else data

    def convert(items: list[dict]) -> list[Comment]:
        return [Comment(html_to_text(c["text"]), convert(c.get("children") or []))
                for c in items if c.get("text") and c.get("author")]

    top = convert(story.get("children") or [])
    title, url = story.get("title") or "IBM acquires Red Hat", story.get("url")
    return [Thread(title, url, top[i: i + MAX_CHILDREN], {"source": "hn-algolia"})
            for i in range(0, len(top), MAX_CHILDREN)]


def in_validation(thread: Thread, fraction: float) -> bool:
    digest = hashlib.sha1(thread.title.encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def build(out: Path, shared: Path = SHARED, *, val_fraction: float = 0.02, hn_repeat: int = 2,
          reddit_fraction: float = 1.0, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    train: list[Thread] = []
    val_reddit: list[Thread] = []
    keep = random.Random(seed + 1)
    for thread in reddit_threads(shared):
        if in_validation(thread, val_fraction):
            val_reddit.append(thread)
        elif keep.random() < reddit_fraction:
            train.append(thread)
    hn = list(hn_story_texts(shared)) + list(hn_comment_threads(shared))
    train += hn * hn_repeat
    random.Random(seed).shuffle(train)
    val_hn = algolia_validation(shared)
    splits = {"train": train, "val": val_reddit + val_hn, "val_reddit": val_reddit, "val_hn": val_hn}
    for name, threads in splits.items():
        (out / f"{name}.txt").write_text(encode_corpus(threads), encoding="utf-8")
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(t.dumps() + "\n" for t in threads)
    stats = {name: {"threads": len(t), "comments": sum(x.comment_count for x in t)} for name, t in splits.items()}
    (out / "corpus.json").write_text(json.dumps(stats, indent=1))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/default"))
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--hn-repeat", type=int, default=2)
    parser.add_argument("--reddit-fraction", type=float, default=1.0, help="share of Reddit training threads kept")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out, args.shared, val_fraction=args.val_fraction, hn_repeat=args.hn_repeat,
                           reddit_fraction=args.reddit_fraction)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
