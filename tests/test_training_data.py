"""Training data pipeline: item store, importers, HTML to text, build rules and splits, crawler against FakeHN."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from pathlib import Path

import pytest

from model.format import encode_corpus
from model.tree import Thread, read_jsonl
from tests.fake_hn import FakeHN
from training.build import BuildOptions, build, split_of, story_thread
from training.crawl import API_BASE_ENV, Crawler, api_base
from training.data_cli import main
from training.html import html_to_text
from training.importers import import_algolia, import_firebase, import_threads
from training.store import ItemStore

# --- fixtures ------------------------------------------------------------------------------------------------


def story(item_id: int, kids: list[int] | None = None, **extra) -> dict:
    item = {"id": item_id, "type": "story", "by": "op", "time": 1_000_000 + item_id, "title": f"Story {item_id}",
            "url": f"https://example.com/{item_id}", "score": 10, "descendants": len(kids or [])}
    if kids:
        item["kids"] = kids
    return {**item, **extra}


def comment(item_id: int, parent: int, text: str | None = None, kids: list[int] | None = None, **extra) -> dict:
    item = {"id": item_id, "type": "comment", "by": f"u{item_id}", "time": 1_000_000 + item_id, "parent": parent,
            "text": text if text is not None else f"comment {item_id}"}
    if kids:
        item["kids"] = kids
    return {**item, **extra}


def write_lines(path: Path, objects: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(o) + "\n" for o in objects)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path):
    with ItemStore(str(tmp_path / "items.db")) as s:
        yield s


def texts(comments) -> list[str]:
    return [c.text for c in comments]


# --- HTML ----------------------------------------------------------------------------------------------------


def test_html_paragraphs_italics_entities():
    html = "It&#x27;s <i>really</i> fast &amp; small.\nStill the same paragraph.<p>Second &quot;one&quot; 1 &lt; 2"
    assert html_to_text(html) == 'It\'s *really* fast & small. Still the same paragraph.\n\nSecond "one" 1 < 2'


def test_html_links_keep_the_target():
    html = ('See <a href="https:&#x2F;&#x2F;example.com&#x2F;a&#x2F;very&#x2F;long&#x2F;path?x=1&amp;y=2" '
            'rel="nofollow">https:&#x2F;&#x2F;example.com&#x2F;a&#x2F;very&#x2F;lo...</a> for more')
    assert html_to_text(html) == "See https://example.com/a/very/long/path?x=1&y=2 for more"
    assert html_to_text('<a href="https://x.org/a">click here</a>') == "click here (https://x.org/a)"


def test_html_quotes_kept():
    html = "&gt; You can&#x27;t do that.<p>Yes you can.<p>&gt; <i>quoted italics</i>"
    assert html_to_text(html) == "> You can't do that.\n\nYes you can.\n\n> *quoted italics*"


def test_html_code_verbatim_and_indented():
    html = ("Try this:<p><pre><code>  def f(x):\n      return x &lt; 2\n\n  print(f(1))\n</code></pre>"
            "Works.<pre><code>a = 1\n  b = 2</code></pre>")
    assert html_to_text(html) == ("Try this:\n\n  def f(x):\n      return x < 2\n\n  print(f(1))\n\nWorks.\n\n"
                                  "  a = 1\n    b = 2")


def test_html_empty_and_odd_input():
    assert html_to_text(None) == ""
    assert html_to_text("") == ""
    assert html_to_text("<p><p>") == ""
    assert html_to_text("unclosed <i>italics and <a href='https://a.b/c'>https://a.b/c") == \
        "unclosed *italics and https://a.b/c"


# --- importers and store ------------------------------------------------------------------------------------


def test_firebase_import_plain_and_gz_idempotent(store, tmp_path):
    items = [story(1, [3, 2]), comment(2, 1), comment(3, 1, "<i>hi</i>")]
    plain = write_lines(tmp_path / "a.jsonl", items[:2])
    gz = write_lines(tmp_path / "b.jsonl.gz", [items[2], None, {"no": "id"}], gz=True)
    (tmp_path / "b2.jsonl").write_text("not json\n\n", encoding="utf-8")

    stats = import_firebase(store, [str(plain), str(gz), str(tmp_path / "b2.jsonl")], batch=2)
    assert (stats.items, stats.changed, stats.skipped) == (3, 3, 3)
    assert store.get(3).text == "<i>hi</i>" and store.get(3).parent == 1
    assert store.get(1).kids == (3, 2) and store.get(2).kids == ()  # Firebase omits empty kids: known, none
    before = store.counts()

    again = import_firebase(store, [str(plain), str(gz)])
    assert (again.items, again.changed) == (3, 0)
    assert store.counts() == before

    # Later data for the same id replaces the earlier.
    write_lines(tmp_path / "c.jsonl", [comment(2, 1, "edited", dead=True)])
    assert import_firebase(store, [str(tmp_path / "c.jsonl")]).changed == 1
    assert store.get(2).text == "edited" and store.get(2).dead
    assert [i.id for i in store.children(1)] == [3, 2]
    assert [s.id for s in store.stories()] == [1]


ALGOLIA = {
    "id": 50, "type": "story", "author": "op", "created_at": "2018-10-28T17:57:59.000Z", "created_at_i": 100,
    "parent_id": None, "story_id": 50, "title": "Algolia story", "url": "https://a.example", "text": None,
    "points": 42, "num_comments": 4, "children": [
        {"id": 53, "type": "comment", "author": "a", "created_at_i": 101, "parent_id": 50, "story_id": 50,
         "text": "first in time", "points": None, "children": [
             {"id": 54, "type": "comment", "author": "b", "created_at_i": 102, "parent_id": 53, "story_id": 50,
              "text": "reply", "children": []}]},
        {"id": 51, "type": "comment", "author": None, "created_at_i": 103, "parent_id": 50, "story_id": 50,
         "text": None, "children": [
             {"id": 55, "type": "comment", "author": "c", "created_at_i": 104, "parent_id": 51, "story_id": 50,
              "text": "under a deleted one", "children": []}]},
        {"id": 52, "type": "comment", "author": "d", "created_at": "1970-01-01T00:01:45.000Z", "parent_id": 50,
         "story_id": 50, "text": "third in time", "children": []},
    ]}


def test_algolia_import_keeps_time_order_and_marks_rank_unknown(store, tmp_path):
    doc = tmp_path / "thread.json"
    doc.write_text(json.dumps({"hits": [ALGOLIA]}, indent=2), encoding="utf-8")  # pretty-printed, one document
    stats = import_algolia(store, [str(doc)])
    assert (stats.items, stats.skipped) == (6, 0)
    top = store.get(50)
    assert top.kids is None and top.score == 42 and top.parent is None and top.source == "algolia"
    assert store.get(52).time == 105  # from created_at when created_at_i is missing
    assert store.get(51).deleted and not store.get(53).deleted
    assert [c.id for c in store.children(50)] == [53, 51, 52]  # time order, not id order

    lines = write_lines(tmp_path / "trees.jsonl", [ALGOLIA])  # the same tree as JSON lines: nothing changes
    assert import_algolia(store, [str(lines)]).changed == 0

    thread = story_thread(store, top)
    assert texts(thread.comments) == ["first in time", "third in time"]  # deleted 51 dropped with its reply 55
    assert texts(thread.comments[0].children) == ["reply"]


def test_algolia_after_firebase_keeps_rank_order(store, tmp_path):
    import_firebase(store, [str(write_lines(tmp_path / "s.jsonl", [story(50, [52, 53, 51])]))])
    import_algolia(store, [str(write_lines(tmp_path / "t.jsonl", [ALGOLIA]))])
    assert store.get(50).kids == (52, 53, 51)
    assert [c.id for c in store.children(50)] == [52, 53, 51]


REDDIT = [
    {"source": "reddit", "forum": "programming", "date": "2015-03-03", "title": "Unity 5 &amp; friends", "url": None,
     "comments": [
         {"text": "zeta first", "children": [{"text": "&gt; quoted\n\nreply", "children": []},
                                             {"text": "second reply", "children": []}]},
         {"text": "alpha second", "children": []}]},
    {"title": "Other", "url": "https://o.example", "comments": [{"text": "only", "children": []}]},
]


def test_thread_import_synthetic_ids_and_order(tmp_path):
    path = write_lines(tmp_path / "threads.jsonl.gz", REDDIT, gz=True)
    with ItemStore(str(tmp_path / "one.db")) as one, ItemStore(str(tmp_path / "two.db")) as two:
        stats = import_threads(one, [str(path)])
        assert (stats.items, stats.changed) == (7, 7)
        assert import_threads(one, [str(path)]).changed == 0
        import_threads(two, [str(path)])
        ids_one = sorted(s.id for s in one.stories())
        assert ids_one == sorted(s.id for s in two.stories())  # deterministic from the line
        assert all(i < 0 for i in ids_one) and len(set(ids_one)) == 2

        reddit = next(s for s in one.stories() if s.source == "reddit")
        assert next(s for s in one.stories() if s.id != reddit.id).source == "threads"
        thread = story_thread(one, reddit)
        assert thread.title == "Unity 5 & friends"
        assert texts(thread.comments) == ["zeta first", "alpha second"]  # file order, not alphabetical or id
        assert texts(thread.comments[0].children) == ["> quoted\n\nreply", "second reply"]
        assert thread.extra["forum"] == "programming" and thread.extra["source"] == "reddit"
        assert thread.extra["time"] == 1425340800


# --- build ---------------------------------------------------------------------------------------------------


def rules_items() -> list[dict]:
    items = [
        # Story 100: kids rank order 105, 103, 104 differs from id and time order; 103 is dead, 104 deleted.
        story(100, [105, 103, 104, 106]),
        comment(103, 100, "dead one", [110], dead=True),
        comment(110, 103, "under the dead one"),
        {"id": 104, "type": "comment", "deleted": True, "parent": 100, "time": 1_000_104, "kids": [111]},
        comment(111, 104, "under the deleted one"),
        comment(105, 100, "best ranked", [108, 107]),
        comment(107, 105, "reply ranked second"),
        comment(108, 105, "reply ranked first"),
        comment(106, 100, "<p>"),  # nothing left after conversion: dropped
        # Story 200: 12 kids, rank order the reverse of id order: the first 10 in rank order are kept.
        story(200, list(range(212, 200, -1))),
        *[comment(i, 200) for i in range(201, 213)],
        # Story 300: a 50-deep reply chain.
        story(300, [301]),
        *[comment(i, i - 1 if i > 301 else 300, kids=[i + 1] if i < 350 else None) for i in range(301, 351)],
        # Story 400: no comments at all; 500: only a dead comment but its own text (Ask HN); 600: dead story.
        story(400),
        story(500, [501], text="Ask HN: how do you <i>test</i>?", url=None),
        comment(501, 500, "flagged", dead=True),
        story(600, [601], dead=True),
        comment(601, 600),
    ]
    return items


def test_build_rules(store, tmp_path):
    store.upsert_many(rules_items(), "firebase")
    stats = build(store, tmp_path / "out", BuildOptions(val_fraction=0.0))
    threads = {t.extra["id"]: t for t in read_jsonl(str(tmp_path / "out" / "train.jsonl"))}
    assert sorted(threads) == [100, 200, 300]

    t100 = threads[100]
    assert texts(t100.comments) == ["best ranked"]
    assert texts(t100.comments[0].children) == ["reply ranked first", "reply ranked second"]
    assert t100.extra["score"] == 10 and t100.extra["time"] == 1_000_100 and t100.extra["source"] == "firebase"
    assert t100.url == "https://example.com/100"

    assert [c.extra["id"] for c in threads[200].comments] == list(range(212, 202, -1))

    assert threads[300].depth == 50 and threads[300].comment_count == 50

    assert stats.written == {"train": 3, "val": 0}
    assert stats.comments["train"] == 3 + 10 + 50
    assert (stats.dropped_dead, stats.dropped_deleted, stats.dropped_empty, stats.dropped_over_cap) == (2, 1, 1, 2)
    assert (stats.skipped_few_comments, stats.skipped_dead_stories, stats.story_texts) == (2, 1, 1)

    # The text form is exactly the format module's encoding of the JSON threads, in the same order.
    train_threads = list(read_jsonl(str(tmp_path / "out" / "train.jsonl")))
    assert (tmp_path / "out" / "train.txt").read_text(encoding="utf-8") == encode_corpus(train_threads)
    assert (tmp_path / "out" / "val.jsonl").read_text() == "" and (tmp_path / "out" / "val.txt").read_text() == ""

    # Ask HN text survives in story_texts.jsonl even though the story has no comment left.
    [ask] = read_jsonl(str(tmp_path / "out" / "story_texts.jsonl"))
    assert ask.extra["text"] == "Ask HN: how do you *test*?" and ask.extra["split"] == "train"
    assert json.loads((tmp_path / "out" / "build.json").read_text())["stats"]["written"]["train"] == 3


def test_build_min_comments_and_max_stories(store, tmp_path):
    store.upsert_many(rules_items(), "firebase")
    stats = build(store, tmp_path / "a", BuildOptions(val_fraction=0.0, min_comments=4))
    assert stats.written["train"] == 2  # 100 has only 3 comments left
    stats = build(store, tmp_path / "b", BuildOptions(val_fraction=0.0, max_stories=1))
    assert stats.written["train"] == 1
    assert [t.extra["id"] for t in read_jsonl(str(tmp_path / "b" / "train.jsonl"))] == [100]


def test_splits_deterministic_and_disjoint(store, tmp_path):
    items = []
    for s in range(1, 61):
        sid = s * 100
        items += [story(sid, [sid + 1]), comment(sid + 1, sid)]
    store.upsert_many(items, "firebase")
    options = BuildOptions(val_fraction=0.3)
    build(store, tmp_path / "one", options)
    build(store, tmp_path / "two", options)
    for name in ("train.jsonl", "val.jsonl", "train.txt", "val.txt"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    train = {t.extra["id"] for t in read_jsonl(str(tmp_path / "one" / "train.jsonl"))}
    val = {t.extra["id"] for t in read_jsonl(str(tmp_path / "one" / "val.jsonl"))}
    assert train and val and not train & val and len(train | val) == 60
    assert all(split_of(i, 0.3) == "val" for i in val)
    # A story's split depends on its id only: a store holding half of the stories splits them the same way.
    with ItemStore(str(tmp_path / "half.db")) as half:
        half.upsert_many([i for i in items if i["id"] // 100 % 2], "firebase")
        build(half, tmp_path / "half", options)
    half_val = {t.extra["id"] for t in read_jsonl(str(tmp_path / "half" / "val.jsonl"))}
    assert half_val == {i for i in val if i // 100 % 2}
    assert split_of(12345, 0.0) == "train" and split_of(12345, 1.0) == "val"


def test_build_replaces_output_only_when_done(store, tmp_path, monkeypatch):
    store.upsert_many(rules_items(), "firebase")
    out = tmp_path / "out"
    build(store, out, BuildOptions(val_fraction=0.0))
    before = (out / "train.jsonl").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("training.build.story_thread", boom)
    with pytest.raises(RuntimeError):
        build(store, out, BuildOptions(val_fraction=0.0))
    assert (out / "train.jsonl").read_bytes() == before
    assert not list(out.glob("*.tmp"))


# --- crawler -------------------------------------------------------------------------------------------------


def hn_items(n: int) -> dict[int, dict | None]:
    """Ids 1..n: a story every 10 ids, its comments after it; every 7th id is null (e.g. a missing item)."""
    items: dict[int, dict | None] = {}
    for i in range(1, n + 1):
        root = (i - 1) // 10 * 10 + 1
        items[i] = story(i, list(range(i + 1, min(root + 10, n + 1)))) if i == root else comment(i, root)
        if i % 7 == 0:
            items[i] = None
    return items


def crawler(store: ItemStore, base: str, **kwargs) -> Crawler:
    kwargs = {"concurrency": 4, "retries": 3, "backoff": 0.01, "timeout": 2.0, "progress": False, **kwargs}
    return Crawler(store, base, **kwargs)


async def test_crawl_range_bounded_concurrency(store):
    async with FakeHN(hn_items(40), delay=0.05) as hn, crawler(store, hn.base_url, concurrency=5) as c:
        stats = await c.crawl_range(1, 40)
    assert hn.max_in_flight == 5  # requests did overlap, and never more than --concurrency
    assert sorted(hn.item_requests) == list(range(1, 41))
    assert (stats.fetched, stats.missing, stats.stored, stats.failed) == (40, 5, 35, 0)
    assert store.get(7) is None and store.get(8).source == "crawl" and store.get(8).fetched_at
    assert store.done_ranges() == [(1, 40)] and store.count_pending(1, 40) == 0


async def test_crawl_retries_errors_and_timeouts(store):
    async with FakeHN(hn_items(12)) as hn:
        hn.fail_next(2, 500, times=2)
        hn.fail_next(3, 503)
        hn.fail_next(4, 429)
        hn.hang_next(5, seconds=1.0)
        hn.fail_next(6, 500, times=10)  # more than the retries: fails for good this run
        hn.fail_next(8, 400)  # a client error is not retried
        async with crawler(store, hn.base_url, timeout=0.4, retries=3) as c:
            stats = await c.crawl_range(1, 12)
        assert (hn.served(2), hn.served(3), hn.served(4), hn.served(5), hn.served(6), hn.served(8)) == \
            (3, 2, 2, 2, 4, 1)
        assert (stats.failed, stats.retries) == (2, 2 + 1 + 1 + 1 + 3)
        assert sorted(stats.failed_ids) == [6, 8]
        assert all(store.get(i) is not None for i in (2, 3, 4, 5))
        assert list(store.pending_ids(1, 12)) == [6, 8]

        hn.item_requests.clear()
        hn._failures.clear()
        async with crawler(store, hn.base_url) as c:
            stats = await c.crawl_range(1, 12)
        assert hn.item_requests in ([6, 8], [8, 6]) and stats.failed == 0 and stats.skipped == 10
        assert store.get(6).text == "comment 6"


async def test_crawl_resume_after_interruption(store):
    async with FakeHN(hn_items(80), delay=0.01) as hn:
        async def run() -> None:
            # A batch larger than what gets done before the interruption: only the final flush stores anything.
            async with crawler(store, hn.base_url, batch=50) as c:
                await c.crawl_range(1, 80)

        task = asyncio.ensure_future(run())
        await hn.wait_for_requests(30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        first = set(hn.item_requests)
        done = {i for lo, hi in store.done_ranges() for i in range(lo, hi + 1)}
        assert 25 <= len(done) < 80 and done <= first
        assert len(first - done) <= 4  # only the requests in flight (at most --concurrency) were lost
        assert all(store.get(i) is not None for i in done if hn.items[i] is not None)

        hn.item_requests.clear()
        async with crawler(store, hn.base_url, batch=5) as c:
            stats = await c.crawl_range(1, 80)
        second = hn.item_requests
        assert len(second) == len(set(second))  # each remaining item fetched once
        assert not set(second) & done  # done items never fetched again
        assert set(second) | done == set(range(1, 81)) and stats.skipped == len(done)
        assert first - done <= set(second)  # what was in flight when interrupted is fetched again
        assert store.count_pending(1, 80) == 0
        assert store.counts()["items"] == sum(1 for v in hn.items.values() if v is not None)


async def test_crawl_last_uses_maxitem(store):
    async with FakeHN(hn_items(30)) as hn, crawler(store, hn.base_url) as c:
        await c.crawl_last(5)
        assert sorted(hn.item_requests) == [26, 27, 28, 29, 30]
        assert "/v0/maxitem.json" in hn.requests


def tree_items() -> dict[int, dict]:
    items = [story(1, [3, 2]), comment(2, 1, kids=[4]), comment(3, 1), comment(4, 2, kids=[5]), comment(5, 4),
             story(20, [21]), comment(21, 20, deleted=True), story(30, [31]), comment(31, 30)]
    return {i["id"]: i for i in items}


async def test_crawl_story_list_follows_kids_and_resumes(store, tmp_path):
    async with FakeHN(tree_items(), [1, 20], beststories=[30]) as hn:
        async with crawler(store, hn.base_url) as c:
            stats = await c.crawl_stories("top")
        assert sorted(hn.item_requests) == [1, 2, 3, 4, 5, 20, 21]  # not 30/31: not in the list
        assert stats.stored == 7 and "/v0/topstories.json" in hn.requests
        thread = story_thread(store, store.get(1))
        assert texts(thread.comments) == ["comment 3", "comment 2"]
        assert thread.comments[1].children[0].children[0].text == "comment 5"

        # Run again: everything is fresh in the store, nothing is fetched, kids are still followed.
        hn.item_requests.clear()
        async with crawler(store, hn.base_url) as c:
            stats = await c.crawl_stories("top")
        assert hn.item_requests == [] and stats.skipped == 7

        # An interrupted tree crawl: story 1 was stored but none of its replies were.
        with ItemStore(str(tmp_path / "partial.db")) as partial:
            async with crawler(partial, hn.base_url) as c:
                await c.crawl_stories("top", limit=1)
            partial.db.execute("DELETE FROM items WHERE id IN (2, 4, 5)")
            hn.item_requests.clear()
            async with crawler(partial, hn.base_url) as c:
                await c.crawl_stories("top", limit=1)
            assert sorted(hn.item_requests) == [2, 4, 5]

        hn.item_requests.clear()
        async with crawler(store, hn.base_url, refresh=True) as c:
            await c.crawl_stories("best")
        assert sorted(hn.item_requests) == [30, 31]


async def test_crawl_flaky_server_eventually_complete(store):
    async with FakeHN(hn_items(30), flaky=0.3, seed=1) as hn, crawler(store, hn.base_url, retries=8) as c:
        stats = await c.crawl_range(1, 30)
    assert stats.failed == 0 and stats.retries > 0 and store.count_pending(1, 30) == 0


def test_api_base_setting(monkeypatch):
    monkeypatch.delenv(API_BASE_ENV, raising=False)
    assert api_base() == "https://hacker-news.firebaseio.com/v0"
    assert api_base({API_BASE_ENV: "http://127.0.0.1:9/v0/"}) == "http://127.0.0.1:9/v0"


# --- CLI -----------------------------------------------------------------------------------------------------


def test_cli_import_build_stats(tmp_path, capsys):
    db = str(tmp_path / "cli.db")
    firebase = write_lines(tmp_path / "items.jsonl.gz", rules_items(), gz=True)
    threads = write_lines(tmp_path / "threads.jsonl", REDDIT)
    assert main(["data", "import", "--format", "firebase", "--db", db, str(firebase)]) == 0
    assert main(["data", "import", "--format", "threads", "--db", db, str(threads)]) == 0
    assert main(["data", "build", "--db", db, "--out", str(tmp_path / "out"), "--val-fraction", "0"]) == 0
    assert len(list(read_jsonl(str(tmp_path / "out" / "train.jsonl")))) == 5
    capsys.readouterr()
    assert main(["data", "stats", "--db", db]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["by_source"] == {"firebase": len(rules_items()), "reddit": 5, "threads": 2}


def test_cli_crawl_against_fake_hn(tmp_path, monkeypatch):
    # The CLI runs its own event loop, so the fake server gets a loop of its own on a thread.
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    hn = FakeHN(tree_items(), [1, 20])
    try:
        base = asyncio.run_coroutine_threadsafe(hn.start(), loop).result(5)
        monkeypatch.setenv(API_BASE_ENV, base)
        db = str(tmp_path / "crawl.db")
        assert main(["data", "crawl", "--db", db, "--stories", "top", "--concurrency", "2"]) == 0
        assert main(["data", "crawl", "--db", db, "--from-id", "30", "--to-id", "31"]) == 0
        with ItemStore(db) as s:
            assert s.counts()["items"] == 9 and s.done_ranges() == [(1, 5), (20, 21), (30, 31)]
    finally:
        asyncio.run_coroutine_threadsafe(hn.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()


def test_thread_json_roundtrip_of_build_output(store, tmp_path):
    store.upsert_many(rules_items(), "firebase")
    build(store, tmp_path / "out", BuildOptions(val_fraction=0.0))
    line = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    thread = Thread.from_json(line)
    assert thread.dumps() == line
