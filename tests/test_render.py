from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.render import (
    AI_LABEL,
    CONSOLE,
    DISCORD,
    SLACK,
    RenderLimits,
    Story,
    age_minutes,
    handle,
    neutralise_mentions,
    render_comment,
    render_thread,
    split_text,
)
from model.tree import Comment, Thread

STORY = Story("Show HN: A tiny Lisp", "https://www.example.com/lisp", seed=42)


def sample_thread() -> Thread:
    return Thread(STORY.title, STORY.url, [
        Comment("Neat. How big is the GC?", [Comment("About 200 lines."), Comment("Mark and sweep?",
                                                                                    [Comment("Yes.")])]),
        Comment("Reminds me of SICP."),
    ])


def rebuild(messages) -> dict[str, str | None]:
    """Map each comment's first-part key to the comment key it replies to (None for top level)."""
    first_parts = {m.key: m for m in messages if m.part == 0}
    return {m.key: (m.parent_key if m.parent_key != "h" else None)
            for m in first_parts.values() if m.parent_key is not None}


def test_header_shows_the_story_the_hn_way():
    header = render_thread(sample_thread(), STORY, DISCORD)[0]
    assert header.key == "h" and header.parent_key is None and header.depth == 0
    text = header.text
    assert "Show HN: A tiny Lisp" in text and "(example.com)" in text
    assert " points by " in text and " ago" in text and "| 5 comments" in text
    assert AI_LABEL in text


def test_comments_follow_the_tree_depth_first():
    messages = render_thread(sample_thread(), STORY, DISCORD)
    assert [m.key for m in messages] == ["h", "c0", "c0.0", "c0.1", "c0.1.0", "c1"]
    assert rebuild(messages) == {"c0": None, "c0.0": "c0", "c0.1": "c0", "c0.1.0": "c0.1", "c1": None}
    assert [m.depth for m in messages] == [0, 1, 2, 2, 3, 1]
    assert "Mark and sweep?" in messages[3].text


def test_handles_are_fictional_stable_and_vary():
    assert handle(1, (0,)) == handle(1, (0,))
    names = {handle(seed, (i,)) for seed in range(20) for i in range(5)}
    assert len(names) > 50
    first = render_thread(sample_thread(), STORY, DISCORD)
    again = render_thread(sample_thread(), STORY, DISCORD)
    assert first == again


def test_replies_are_younger_than_their_parents():
    for seed in range(50):
        assert age_minutes(seed, (0, 1, 2)) <= age_minutes(seed, (0, 1)) <= age_minutes(seed, (0,)) \
            <= age_minutes(seed, ())


def test_mentions_are_neutralised():
    text = "@everyone look <@123> and <@&456> in <#789>, @here <!channel>"
    safe = neutralise_mentions(text)
    for raw in ("@everyone", "@here", "<@123>", "<@&456>", "<#789>", "<!channel>"):
        assert raw not in safe
    assert safe.replace("\u200b", "") == text


def test_generated_headings_do_not_become_discord_headings():
    [message] = render_comment(STORY, (0,), Comment("# Huge\nnormal"), DISCORD)
    assert "\n\\# Huge" in message.text


def test_long_comment_is_split_within_the_limit_at_word_boundaries():
    words = [f"word{i}" for i in range(900)]
    text = " ".join(words)  # ~7,000 characters, no paragraph breaks
    messages = render_comment(STORY, (0, 1), Comment(text), DISCORD)
    assert len(messages) > 3
    assert all(len(m.text) <= DISCORD.max_chars for m in messages)
    body = " ".join(m.text.split("\n", 1)[1] for m in messages)
    assert body.split() == words  # nothing lost, no word cut in two
    assert [m.key for m in messages][:3] == ["c0.1", "c0.1#1", "c0.1#2"]
    assert messages[1].parent_key == "c0.1" and messages[2].parent_key == "c0.1#1"


def test_split_prefers_paragraphs_and_cuts_giant_words_only_when_it_must():
    text = "First paragraph here.\n\nSecond paragraph is here."
    assert split_text(text, 30) == ["First paragraph here.", "Second paragraph is here."]
    giant = "x" * 250
    parts = split_text(giant, 100)
    assert "".join(parts) == giant and all(len(p) <= 100 for p in parts)


def test_slack_replies_name_their_parent():
    """A Slack thread is flat: a reply's byline names the comment it answers (Discord shows a reply preview)."""
    messages = {m.key: m for m in render_thread(sample_thread(), STORY, SLACK)}
    assert f"replying to {handle(STORY.seed, (0, 1))}" in messages["c0.1.0"].text.split("\n")[0]
    assert "replying to" not in messages["c0"].text
    assert all("replying to" not in m.text for m in render_thread(sample_thread(), STORY, DISCORD))


def test_slack_and_console_limits():
    long = Comment("a" * 10 + " " + "b " * 4000)
    for limits in (SLACK, CONSOLE):
        messages = render_comment(STORY, (0,), long, limits)
        assert all(len(m.text) <= limits.max_chars for m in messages)
    assert len(render_comment(STORY, (0,), long, CONSOLE)) == 1


texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=600).filter(str.strip)
trees = st.recursive(
    st.builds(Comment, texts),
    lambda children: st.builds(Comment, texts, st.lists(children, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(trees, min_size=1, max_size=4), st.integers(200, 2000), st.sampled_from(["markdown", "mrkdwn", "plain"]))
def test_any_tree_renders_within_limits_and_mirrors_the_tree(comments, max_chars, markup):
    thread = Thread("T", None, comments)
    limits = RenderLimits(max_chars=max_chars, markup=markup)
    messages = render_thread(thread, Story("T", None, 1), limits)
    assert all(len(m.text) <= max_chars for m in messages)
    expected = {("c" + ".".join(map(str, p))): ("c" + ".".join(map(str, p[:-1])) if len(p) > 1 else None)
                for p, _ in thread.walk()}
    assert rebuild(messages) == expected


def test_a_resolution_note_is_shown_under_the_header():
    story = Story("Example", "https://example.com/x", 1, note="Couldn't read that page, so the title comes from the link.")
    for limits, mark in ((DISCORD, "-# ⚠ Couldn't"), (SLACK, "_⚠ Couldn't"), (CONSOLE, "(⚠ Couldn't")):
        assert mark in render_thread(Thread("Example", None, []), story, limits)[0].text
