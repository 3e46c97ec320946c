"""The thread text format (model/format.py) and comment trees (model/tree.py).

Round trips (tree -> text -> tree, tree -> JSON -> tree) are checked as hypothesis properties over valid trees; the
parser is checked against hostile, model-like generations given as data, against arbitrary strings (it must never
raise and must give the same tree however its input is chunked), and against very large and very deep inputs.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import model.format as fmt
from model.format import (
    CLOSE,
    END_OF_TEXT,
    MAX_CHILDREN,
    OPEN,
    PROBLEMS,
    NextTags,
    ParseResult,
    ThreadParser,
    _cut_loop,
    clean_text,
    clean_title,
    clean_url,
    encode_comments,
    encode_corpus,
    encode_thread,
    header,
    parse_comments,
    parse_story,
    prompt,
    without_header,
)
from model.tree import Comment, Thread, walk

# The training job shares the CPU: keep example counts moderate and never fail on timing.
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LOSSES = ("empty", "duplicate", "excess_children", "inside_dropped", "truncated")  # what ParseResult.dropped counts


# --- helpers -------------------------------------------------------------------------------------------------


def outline(comments: list[Comment]) -> list[str]:
    """A tree as lines of text indented one space per level below the top: easy to write expected trees as data."""
    return [" " * (len(path) - 1) + comment.text for path, comment in walk(comments)]


def key(text: str) -> str:
    return " ".join(text.lower().split())


def chain(n: int, prefix: str = "c") -> list[Comment]:
    """A reply chain n deep (built without recursion)."""
    root = Comment(f"{prefix}0")
    node = root
    for i in range(1, n):
        child = Comment(f"{prefix}{i}")
        node.children.append(child)
        node = child
    return [root]


def chain_text(n: int, prefix: str = "c") -> str:
    return "".join(f"{OPEN}{prefix}{i}" for i in range(n)) + CLOSE * n


def feed_chunks(text: str, cuts: list[int], *, opened: bool = False, max_children: int = MAX_CHILDREN):
    """Feed text split at the given offsets; return (result, streamed events)."""
    parser = ThreadParser(max_children, opened=opened)
    events = []
    start = 0
    for cut in sorted(set(cuts)) + [len(text)]:
        events += parser.feed(text[start:cut])
        start = cut
    return parser.finish(), events


def opens_before_end(text: str, opened: bool) -> int:
    """How many comment blocks the parser opens: <|c|> tags up to the first <|endoftext|>."""
    n = int(opened)
    for match in fmt._TAG.finditer(text):
        if match.group() == END_OF_TEXT:
            break
        n += match.group() == OPEN
    return n


def assert_valid_tree(comments: list[Comment], max_children: int = MAX_CHILDREN) -> None:
    """What the parser promises about any tree it returns: the encoder's rules hold, so it re-encodes losslessly."""
    assert len(comments) <= max_children
    seen = set()
    for _path, comment in walk(comments):
        assert comment.text and comment.text == clean_text(comment.text)
        assert "<|" not in comment.text
        assert _cut_loop(comment.text) == (comment.text, False)
        assert len(comment.children) <= max_children
        assert key(comment.text) not in seen
        seen.add(key(comment.text))


# --- strategies ----------------------------------------------------------------------------------------------

# Pieces a model (or a hostile user) might produce: tags, tag fragments, line breaks, unicode, repeated sentences.
FRAGMENTS = [OPEN, CLOSE, END_OF_TEXT, "<|", "<|c", "<|e", "<|ec", "<|endof", "|>", "c|>", "<", "|", ">", "< |c|>",
             "<|C|>", "<||", "<<||c|>", "\n", "\r\n", "\r", "\n\n\n", " ", "\t", "\u2028", "\x0b", "\x00", "é",
             "日本語", "🦀", "\u200b", "Same here. ", "This line keeps coming back.\n", ".", "!?", "Agreed.", "x"]
fragment = st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6))
soup = st.lists(fragment, max_size=50).map("".join)  # arbitrary strings, weighted toward the interesting ones
raw_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS[9:]), st.text(max_size=8)), max_size=6).map("".join)

titles = raw_text.map(lambda s: clean_title("T " + s))  # canonical and never empty
urls = st.one_of(st.none(), raw_text.map(lambda s: clean_url("https://example.com/" + s)))


def canonical(i: int, raw: str) -> str:
    """A valid comment text, unique in its thread (the parser drops repeats), that the loop cutter leaves alone."""
    text = clean_text(f"c{i}: {raw}")
    return text if _cut_loop(text) == (text, False) else f"c{i}:"


@st.composite
def forests(draw, max_depth: int = 8, max_comments: int = 40) -> list[Comment]:
    """Valid comment trees: 0..MAX_CHILDREN children per item, depth up to max_depth, unique canonical texts."""
    budget = draw(st.integers(0, max_comments))
    width = st.one_of(st.integers(0, 3), st.integers(0, MAX_CHILDREN))

    def forest(depth: int) -> list[Comment]:
        nonlocal budget
        if depth > max_depth or budget <= 0:
            return []
        n = min(draw(width), budget)
        budget -= n
        return [Comment(draw(raw_text), forest(depth + 1)) for _ in range(n)]

    comments = forest(1)
    for i, (_path, comment) in enumerate(walk(comments)):
        comment.text = canonical(i, comment.text)
    return comments


@st.composite
def deep_forests(draw) -> list[Comment]:
    """A reply chain 100-300 deep with small valid trees hanging off random levels."""
    comments = chain(draw(st.integers(100, 300)))
    spine = [c for _p, c in walk(comments)]
    for _ in range(draw(st.integers(0, 5))):
        node = spine[draw(st.integers(0, len(spine) - 1))]
        node.children += draw(forests(max_depth=3, max_comments=8))[: MAX_CHILDREN - len(node.children)]
    for i, (_path, comment) in enumerate(walk(comments)):
        comment.text = canonical(i, "deep")
    return comments


threads = st.builds(Thread, titles, urls, forests())

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                   st.dictionaries(st.text(max_size=5), inner,
                                                                                   max_size=3)), max_leaves=6)


def extras(reserved: tuple[str, ...]):
    return st.dictionaries(st.text(max_size=8).filter(lambda k: k not in reserved), json_values, max_size=4)


@st.composite
def threads_with_extras(draw) -> Thread:
    thread = draw(st.builds(Thread, titles, urls, forests(max_comments=12)))
    thread.extra = draw(extras(("title", "url", "comments")))
    for _path, comment in thread.walk():
        comment.extra = draw(extras(("text", "children")))
    return thread


# --- round trips (properties) ---------------------------------------------------------------------------------


@FAST
@given(threads)
def test_thread_text_round_trip(thread):
    text = encode_thread(thread)
    for story in (text, END_OF_TEXT + text):
        parsed, result = parse_story(story)
        assert (parsed.title, parsed.url) == (thread.title, thread.url)
        assert parsed.comments == thread.comments
        assert not result.problems and not result.ended and result.dropped == 0
        assert result.comment_count == thread.comment_count


@FAST
@given(forests())
def test_comments_text_round_trip(comments):
    text = encode_comments(comments)
    result = parse_comments(text)
    assert result.comments == comments and not result.problems
    # Closed with <|endoftext|>, and with the first <|c|> already written by the prompt.
    ended = parse_comments(text + END_OF_TEXT)
    assert ended.comments == comments and not ended.problems and ended.ended
    if comments:
        opened = parse_comments(text.removeprefix(OPEN), opened=True)
        assert opened.comments == comments and not opened.problems


@SLOW
@given(deep_forests())
def test_deep_round_trip(comments):
    thread = Thread("Deep", "https://example.com/deep", comments)
    parsed, result = parse_story(encode_thread(thread))
    assert parsed == thread and not result.problems
    assert Thread.from_json(thread.to_json()) == thread
    assert Thread.from_json(thread.dumps()) == thread  # json itself recurses, but 300 levels are fine


@FAST
@given(forests(), st.booleans(), st.data())
def test_chunked_feed_matches_one_feed_and_streams_the_final_tree(comments, ended, data):
    text = encode_comments(comments) + (END_OF_TEXT if ended else "")
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=25))
    whole, whole_events = feed_chunks(text, [])
    result, events = feed_chunks(text, cuts)
    assert result == whole and result.comments == comments and not result.problems
    final = list(walk(result.comments))  # parents before children, the order and paths Thread.walk() gives
    assert [path for path, _c in events] == [path for path, _c in final] == [p for p, _c in whole_events]
    assert all(streamed is kept for (_p, streamed), (_q, kept) in zip(events, final, strict=True))


def test_one_character_chunks_split_every_tag():
    comments = [Comment("a <| b", [Comment("reply")]), Comment("x")]
    text = encode_comments(comments) + END_OF_TEXT + "ignored"
    result, events = feed_chunks(text, list(range(len(text))))
    assert outline(result.comments) == ["a < | b", " reply", "x"]
    assert [p for p, _c in events] == [(0,), (0, 0), (1,)]
    assert result.problems == {"after_end": 1} and result.ended


@SOME
@given(threads_with_extras())
def test_thread_json_round_trip_keeps_extra_keys(thread):
    assert Thread.from_json(thread.to_json()) == thread
    line = thread.dumps()
    assert Thread.from_json(line) == thread
    assert Thread.from_json(line).dumps() == line
    assert json.loads(line) == thread.to_json()


@SOME
@given(st.lists(threads, max_size=3))
def test_corpus_is_stories_each_after_endoftext(stories):
    corpus = encode_corpus(stories)
    assert corpus.count(END_OF_TEXT) == len(stories)
    parts = corpus.split(END_OF_TEXT)
    assert parts[0] == ""
    for part, story in zip(parts[1:], stories, strict=True):
        parsed, result = parse_story(END_OF_TEXT + part)
        assert parsed == story and not result.problems


# --- any string (properties) ----------------------------------------------------------------------------------


@FAST
@given(soup, st.booleans(), st.integers(1, MAX_CHILDREN), st.data())
def test_any_string_parses_the_same_however_chunked(text, opened, max_children, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=20))
    whole, whole_events = feed_chunks(text, [], opened=opened, max_children=max_children)
    result, events = feed_chunks(text, cuts, opened=opened, max_children=max_children)
    assert result == whole
    final = list(walk(result.comments))
    assert [p for p, _c in events] == [p for p, _c in whole_events] == [p for p, _c in final]
    assert all(streamed is kept for (_p, streamed), (_q, kept) in zip(events, final, strict=True))
    assert parse_comments(text, opened=opened, max_children=max_children) == result


@FAST
@given(soup, st.booleans(), st.integers(1, MAX_CHILDREN))
def test_any_string_gives_a_valid_tree_and_an_honest_account(text, opened, max_children):
    result = parse_comments(text, opened=opened, max_children=max_children)
    assert_valid_tree(result.comments, max_children)
    assert set(result.problems) <= set(PROBLEMS) and all(n > 0 for n in result.problems.values())
    assert isinstance(result.describe(), str)
    assert result.ended == (END_OF_TEXT in text)
    # Every opened block is kept or counted as dropped, except a blank block left open at the very end.
    opens = opens_before_end(text, opened)
    kept = result.comment_count
    assert kept + result.dropped <= opens <= kept + result.dropped + (0 if result.ended else 1)
    # What the parser returns is a fixed point: it encodes and parses back unchanged and clean.
    again = parse_comments(encode_comments(result.comments, max_children), max_children=max_children)
    assert again.comments == result.comments and not again.problems


@FAST
@given(soup)
def test_any_string_parses_as_a_story(text):
    thread, result = parse_story(text)
    assert "\n" not in thread.title and "<|" not in thread.title
    assert thread.url is None or (thread.url and "<|" not in thread.url and "".join(thread.url.split()) == thread.url)
    assert_valid_tree(thread.comments)
    assert thread.comments == result.comments


@FAST
@given(st.text(), st.text())
def test_cleaners_are_idempotent_and_tag_free(text, other):
    for clean in (clean_text, clean_title, clean_url):
        once = clean(text + other)
        assert clean(once) == once
        assert once is None or "<|" not in once
    assert "\n" not in clean_title(text)
    assert "\n\n\n" not in clean_text(text) and "\r" not in clean_text(text)


# --- hostile and model-like generations (data) ----------------------------------------------------------------

P = OPEN  # shorthand in the table
E = CLOSE
END = END_OF_TEXT
TWELVE = "".join(f"{P}r{i}{E}" for i in range(12))

# (name, generation, opened, expected outline, expected problems, ended)
HOSTILE = [
    ("clean", f"{P}a{P}b{E}{E}{P}c{E}", False, ["a", " b", "c"], {}, False),
    ("unclosed blocks at the end are closed and kept", f"{P}a{P}b{END}", False, ["a", " b"], {"unclosed": 2}, True),
    ("unclosed without endoftext", f"{P}a{P}b{E}", False, ["a", " b"], {"unclosed": 1}, False),
    ("last comment cut off mid-text is dropped", f"{P}a{E}{P}Half a sent", False, ["a"], {"truncated": 1}, False),
    ("cut off reply", f"{P}a{P}b", False, ["a"], {"truncated": 1, "unclosed": 1}, False),
    ("blank block left open is not a comment", f"{P}a{E}{P} \n", False, ["a"], {}, False),
    ("empty comment dropped with its subtree", f"{P}a{E}{P} {P}orphan{P}deeper{E}{E}{E}{P}b{E}", False, ["a", "b"],
     {"empty": 1, "inside_dropped": 2}, False),
    ("empty block closed by endoftext", f"{P}a{E}{P}{END}", False, ["a"], {"empty": 1}, True),
    ("stray close", f"{P}a{E}{E}{P}b{E}", False, ["a", "b"], {"stray_close": 1}, False),
    ("text outside comments", f"hello{P}a{E} junk {P}b{E}tail", False, ["a", "b"], {"stray_text": 3}, False),
    ("text after a reply, inside its parent", f"{P}a{P}b{E}more of a{E}", False, ["a", " b"], {"stray_text": 1},
     False),
    ("whitespace between blocks is fine", f"\n{P}a{E}\n\n{P}b{E} \n", False, ["a", "b"], {}, False),
    ("12 replies: the first 10 are kept", f"{P}p{TWELVE}{E}", False, ["p"] + [f" r{i}" for i in range(10)],
     {"excess_children": 2}, False),
    ("12 top-level comments", TWELVE, False, [f"r{i}" for i in range(10)], {"excess_children": 2}, False),
    ("an excess reply's own replies", f"{P}p{TWELVE[:-len(E)]}{P}deep{E}{E}{E}", False,
     ["p"] + [f" r{i}" for i in range(10)], {"excess_children": 2, "inside_dropped": 1}, False),
    ("dropped replies free their slots", f"{P}p{P} {E}{P}r0{E}{P}R0{E}" + TWELVE[len(f"{P}r0{E}"):] + E, False,
     ["p"] + [f" r{i}" for i in range(10)], {"empty": 1, "duplicate": 1, "excess_children": 2}, False),
    ("duplicate comment dropped with its replies", f"{P}Same here.{E}{P}same   HERE.{P}reply{E}{E}", False,
     ["Same here."], {"duplicate": 1, "inside_dropped": 1}, False),
    ("duplicate at another level", f"{P}Yes.{P}No.{P}yes.{E}{E}{E}", False, ["Yes.", " No."], {"duplicate": 1},
     False),
    ("runaway repetition is cut", f"{P}I think so. This is the loop. This is the loop. This is the loop. "
     f"This is the loop.{E}", False, ["I think so. This is the loop. This is the loop."], {"repetition": 1}, False),
    ("repeated lines", f"{P}ok\nsame line here\nsame line here\nsame line here\n{E}", False,
     ["ok\nsame line here\nsame line here"], {"repetition": 1}, False),
    ("short repeats are fine", f"{P}Ha. Ha. Ha. Ha.{E}", False, ["Ha. Ha. Ha. Ha."], {}, False),
    ("text after endoftext is ignored", f"{P}a{E}{END}Next story\n{P}x{E}", False, ["a"], {"after_end": 1}, True),
    ("whitespace after endoftext", f"{P}a{E}{END}\n ", False, ["a"], {}, True),
    ("endoftext completes the last text", f"{P}a{P}b{E}{P}last words{END}", False, ["a", " b", " last words"],
     {"unclosed": 2}, True),
    ("prompt opened the first comment", f"First!{P}reply{E}{E}{P}second{E}{END}", True,
     ["First!", " reply", "second"], {}, True),
    ("opened, then cut off", "Half", True, [], {"truncated": 1}, False),
    ("opened, nothing written", "", True, [], {}, False),
    ("opened, empty first comment", f"{E}{P}b{E}", True, ["b"], {"empty": 1}, False),
    ("tag-like text is neutralised", f"{P}a <|foo|> <|c b{E}", False, ["a < |foo|> < |c b"], {}, False),
    ("line breaks are normalised", f"{P}one\r\n\r\n\r\n\r\ntwo   \n{E}", False, ["one\n\ntwo"], {}, False),
    ("nothing at all", "", False, [], {}, False),
    ("just endoftext", END, False, [], {}, True),
]


@pytest.mark.parametrize(("generation", "opened", "expected", "problems", "ended"),
                         [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_generation(generation, opened, expected, problems, ended):
    result = parse_comments(generation, opened=opened)
    assert outline(result.comments) == expected
    assert dict(result.problems) == problems
    assert result.ended is ended
    assert result.dropped == sum(n for k, n in problems.items() if k in LOSSES)
    assert result.comment_count == len(expected)
    # Streaming it a character at a time changes nothing.
    chunked, _events = feed_chunks(generation, list(range(len(generation))), opened=opened)
    assert chunked == result


def test_prompt_opens_the_first_comment_and_parse_story_recovers_the_header():
    text = prompt("Show HN:  A tiny\nLisp", " https://example.com/lisp ")
    assert text == f"{END_OF_TEXT}Show HN: A tiny Lisp\nhttps://example.com/lisp\n{OPEN}"
    assert text.startswith(END_OF_TEXT) and text.endswith(OPEN)
    continuation = f"Neat. How big is the GC?{OPEN}About 200 lines.{CLOSE}{CLOSE}{OPEN}Reminds me of SICP.{CLOSE}"
    thread, result = parse_story(text + continuation + END_OF_TEXT)
    assert (thread.title, thread.url) == ("Show HN: A tiny Lisp", "https://example.com/lisp")
    assert outline(thread.comments) == ["Neat. How big is the GC?", " About 200 lines.", "Reminds me of SICP."]
    assert not result.problems and result.ended
    # The worker's way: only the continuation, with the first comment already opened.
    assert parse_comments(continuation + END_OF_TEXT, opened=True) == result
    assert prompt("Ask HN: x") == f"{END_OF_TEXT}Ask HN: x\n{OPEN}"


def test_parse_generation_if_present():
    parse_generation = getattr(fmt, "parse_generation", None)
    if parse_generation is None:
        pytest.skip("model.format.parse_generation is gone")
    finished = parse_generation(f"First{OPEN}last words", True)
    assert outline(finished.comments) == ["First", " last words"] and finished.ended
    assert finished.problems == {"unclosed": 2}
    cut = parse_generation(f"First{OPEN}last words", False)
    assert outline(cut.comments) == ["First"] and cut.problems == {"truncated": 1, "unclosed": 1}


# --- encoder rules --------------------------------------------------------------------------------------------


def test_titles_are_one_line_and_urls_have_no_whitespace():
    thread = Thread(" Ask HN:\n  multi\r\nline\ttitle\u2028here ", " https://exa mple.com/\n", [Comment("hi")])
    text = encode_thread(thread)
    assert text == f"Ask HN: multi line title here\nhttps://example.com/\n{OPEN}hi{CLOSE}"
    assert header("Title") == "Title\n" and header("Title", "") == "Title\n" and header("Title", " \n") == "Title\n"


def test_tags_in_comment_text_cannot_inject_structure():
    injected = f"see {OPEN}fake{CLOSE}{CLOSE}{OPEN}x{END_OF_TEXT}"
    thread = Thread(f"Title {OPEN}", f"https://e.com/{CLOSE}", [Comment(injected)])
    parsed, result = parse_story(encode_thread(thread))
    assert not result.problems
    assert outline(parsed.comments) == ["see < |c|>fake< |ec|>< |ec|>< |c|>x< |endoftext|>"]
    assert parsed.title == "Title < |c|>" and parsed.url == "https://e.com/ec|>"


@pytest.mark.parametrize("url", ["<<||c|>", "https://e.com/<<<|||ec|>", "<\n<||endoftext|>", "<<||"])
def test_urls_cannot_smuggle_a_tag(url):
    # Removing "<|" once is not enough: "<<||c|>" became "<|c|>", a tag in the header.
    assert "<|" not in (clean_url(url) or "")
    thread = Thread("T", url, [Comment("a")])
    parsed, result = parse_story(encode_thread(thread))
    assert parsed.title == "T" and outline(parsed.comments) == ["a"] and not result.problems


def test_encoder_cleans_texts_drops_empty_comments_and_caps_children():
    thread = Thread("T", None, [
        Comment(" \n ", [Comment("lost with its empty parent")]),
        Comment("  parent\r\n", [Comment(f"r{i}") for i in range(12)]),
        Comment("b  \r\nc\n\n\n\nd"),
    ])
    text = encode_comments(thread.comments)
    assert "lost" not in text and "r10" not in text and "r11" not in text
    result = parse_comments(text)
    assert outline(result.comments) == ["parent"] + [f" r{i}" for i in range(10)] + ["b\nc\n\nd"]
    assert not result.problems
    assert outline(parse_comments(encode_comments(thread.comments, max_children=2), max_children=2).comments) == [
        "parent", " r0", " r1", "b\nc\n\nd"]


def test_docstring_example():
    text = (f"Show HN: A tiny Lisp\nhttps://example.com/lisp\n{OPEN}Neat. How big is the GC?{OPEN}About 200 lines."
            f"{CLOSE}{CLOSE}{OPEN}Reminds me of SICP.{CLOSE}")
    thread = Thread("Show HN: A tiny Lisp", "https://example.com/lisp", [
        Comment("Neat. How big is the GC?", [Comment("About 200 lines.")]), Comment("Reminds me of SICP.")])
    assert encode_thread(thread) == text
    assert encode_corpus([thread]) == END_OF_TEXT + text
    assert parse_story(text + END_OF_TEXT)[0] == thread


def test_empty_title_with_url_round_trips():
    parsed, _ = parse_story(encode_thread(Thread("", "https://example.com/", [Comment("a")])))
    assert (parsed.title, parsed.url) == ("", "https://example.com/")


# --- reporting ------------------------------------------------------------------------------------------------


def test_describe_reads_well():
    assert ParseResult([]).describe() == "clean"
    result = parse_comments(f"{P}a{E}{P} {P}orphan{P}deeper{E}{E}{E}{P}cut of")
    assert result.describe() == "1 × empty comment, 2 × reply to a dropped comment, 1 × comment cut off before it ended"
    every = ParseResult([], Counter({k: 2 for k in PROBLEMS}))
    assert every.describe().count(" × ") == len(PROBLEMS)


def test_dropped_counts_only_lost_comments():
    harmless = Counter(unclosed=3, stray_close=1, stray_text=2, after_end=1, repetition=4)
    assert ParseResult([], harmless).dropped == 0
    for loss in LOSSES:
        assert ParseResult([], harmless + Counter({loss: 2})).dropped == 2
    assert set(LOSSES) | set(harmless) == set(PROBLEMS)


# --- size and depth -------------------------------------------------------------------------------------------


def test_huge_inputs_parse_quickly():
    tree = [Comment(f"{a}", [Comment(f"{a}.{b}", [Comment(f"{a}.{b}.{c}", [Comment(f"Reply {a}.{b}.{c}.{d}.")
                                                                          for d in range(10)])
                                                    for c in range(10)]) for b in range(10)]) for a in range(10)]
    story = encode_comments(tree)
    one_comment = P + "All work and no play makes Jack a dull boy " * 5000 + E
    empties = P * 40_000  # a model stuck writing <|c|>: 200k characters, 40,000 levels, all dropped
    soup_text = ("<|c|>x<|ec|><|<|e\n\r<|endof<|c" * 8000)[:200_000]
    for text in (story, one_comment, empties, soup_text):
        assert len(text) >= 200_000
        start = time.perf_counter()
        result = parse_comments(text)
        assert time.perf_counter() - start < 5, "quadratic somewhere?"
        assert_valid_tree(result.comments)
    assert parse_comments(story).comments == tree
    assert parse_comments(empties).problems == {"empty": 1, "inside_dropped": 39_999}


def test_ten_thousand_deep_chain():
    n = 10_000
    comments = chain(n)
    text = chain_text(n)
    assert encode_comments(comments) == text
    # Parse it streamed, in 4 kB chunks.
    result, events = feed_chunks(text, list(range(0, len(text), 4096)))
    assert not result.problems and result.comments == comments
    assert [len(path) for path, _c in events] == list(range(1, n + 1))
    thread = Thread("Deep", None, result.comments)
    assert thread.comment_count == n and thread.depth == n
    assert all(c.text == f"c{len(path) - 1}" for path, c in thread.walk())
    # JSON as objects (json.dumps itself recurses, so Thread.dumps is not asked for here).
    data = thread.to_json()
    level, depth = data["comments"], 0
    while level:
        assert len(level) == 1
        level, depth = level[0]["children"], depth + 1
    assert depth == n
    assert Thread.from_json(data) == thread
    assert Thread.from_json(data) != Thread("Deep", None, chain(n - 1))
    other = chain(n)
    last = other[0]
    while last.children:
        last = last.children[0]
    last.text = "different"
    assert other != comments


def test_ten_thousand_deep_runaway_of_two_texts():
    # <|c|>x<|c|>y<|c|>x...: x and y are kept, the rest is one repeat and the replies to it.
    result = parse_comments(f"{P}x{P}y" * 5000)
    assert outline(result.comments) == ["x", " y"]
    assert result.problems == {"duplicate": 1, "inside_dropped": 9997, "unclosed": 2}
    assert result.dropped == 9998


def test_from_json_validates_deeply():
    data = chain(2000)[0].to_json()
    node = data
    while node["children"]:
        node = node["children"][0]
    node["children"] = [{"text": 5}]
    with pytest.raises(ValueError, match="string 'text'"):
        Comment.from_json(data)
    node["children"] = "not a list"
    with pytest.raises(ValueError, match="must be a list"):
        Comment.from_json(data)
    for bad in ({"url": "u"}, {"title": "t", "url": 3}, {"title": "t", "comments": {"a": 1}}, [], "[]"):
        with pytest.raises(ValueError):
            Thread.from_json(bad)


def test_comment_equality():
    assert Comment("a", [Comment("b")]) == Comment("a", [Comment("b")])
    assert Comment("a", [Comment("b")]) != Comment("a", [Comment("b", extra={"id": 1})])
    assert Comment("a", [Comment("b")]) != Comment("a", [Comment("b"), Comment("c")])
    assert Comment("a") != "a" and Comment("a") != Thread("a")
    with pytest.raises(TypeError):
        hash(Comment("a"))


# --- NextTags: the decoding-side rules ---------------------------------------------------------------------------

_KINDS = re.compile(f"({re.escape(OPEN)}|{re.escape(CLOSE)}|{re.escape(END_OF_TEXT)})")


def _kinds(text: str) -> list[str | None]:
    """The story as NextTags sees it: tags, and None for each piece of text (blank text marked " ")."""
    out: list[str | None] = []
    for piece in _KINDS.split(text):
        if piece in (OPEN, CLOSE, END_OF_TEXT):
            out.append(piece)
        elif piece:
            out.append(" " if not piece.strip() else None)
    return out


def _allowed(rules: NextTags, kind: str | None) -> bool:
    if kind is None:
        return rules.allows_text()
    if kind == " ":
        return rules.allows_blank()
    return rules.allows(kind)


@FAST
@given(st.lists(threads, min_size=1, max_size=3))
def test_next_tags_allow_every_encoded_story(stories):
    text = "".join(encode_thread(t) + END_OF_TEXT for t in stories if OPEN in encode_thread(t))
    rules = NextTags()
    for kind in _kinds(text):
        assert _allowed(rules, kind), (kind, text)
        rules.feed(None if kind == " " else kind)


@FAST
@given(st.lists(st.sampled_from([OPEN, CLOSE, END_OF_TEXT, None, " "]), max_size=60))
def test_a_sequence_the_rules_allow_parses_without_a_fault(choices):
    """Whatever a sampler picks among the allowed kinds, the result parses as a clean tree."""
    rules, parts = NextTags(), [prompt("A title")]
    rules.feed(OPEN)
    for n, kind in enumerate(choices):
        if not _allowed(rules, kind):
            continue
        parts.append({OPEN: OPEN, CLOSE: CLOSE, END_OF_TEXT: END_OF_TEXT, " ": " ", None: f"text {n}."}[kind])
        rules.feed(None if kind == " " else kind)
        if kind == END_OF_TEXT:
            break
    generated = "".join(parts).removeprefix(prompt("A title"))
    finished = generated.endswith(END_OF_TEXT)
    result = fmt.parse_generation(generated.removesuffix(END_OF_TEXT), finished)
    faults = {k: v for k, v in result.problems.items() if k not in ("truncated", "unclosed") and v}
    assert not faults, generated
    assert not finished or (result.comment_count >= 1 and not result.problems["unclosed"])


def test_next_tags_rules():
    rules = NextTags(max_children=2)
    assert rules.allows_text() and rules.allows(OPEN)  # the header
    assert not rules.allows(CLOSE) and not rules.allows(END_OF_TEXT)  # no comment yet
    rules.feed(OPEN)
    assert rules.fresh and not any(rules.allows(t) for t in (OPEN, CLOSE, END_OF_TEXT)) and not rules.allows_blank()
    rules.feed(None)
    assert rules.allows(OPEN) and rules.allows(CLOSE) and not rules.allows(END_OF_TEXT) and rules.allows_blank()
    rules.feed(CLOSE)
    assert not rules.allows_text() and rules.allows(END_OF_TEXT) and rules.allows(OPEN) and not rules.allows(CLOSE)
    rules.feed(OPEN)
    rules.feed(None)
    rules.feed(CLOSE)
    assert rules.children == [2] and not rules.allows(OPEN) and rules.allows(END_OF_TEXT)  # the story is full
    rules.feed(END_OF_TEXT)
    assert rules.children == [0] and rules.allows_text() and not rules.allows(END_OF_TEXT)


def test_without_header_keeps_the_story_but_not_its_title():
    assert without_header(prompt("Show HN: x", "https://a.example")) == prompt("")
    assert without_header(prompt("T") + "Nice.<|ec|>") == prompt("") + "Nice.<|ec|>"
    corpus = encode_corpus([Thread("First", None, [Comment("a")])]) + prompt("Second", "https://b.example")
    assert without_header(corpus) == corpus[: corpus.rindex(END_OF_TEXT)] + prompt("")  # only the last story
    assert without_header("just a title") == header("")
