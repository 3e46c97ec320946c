"""`hnaas chat` and `hnaas generate` as a user runs them."""

from __future__ import annotations

import io
import json

from bot.app import App
from bot.cli import main
from bot.console import chat
from tests.fake_hn import FakeHN
from tests.scripted import ScriptedEngine


class SlowLines(io.StringIO):
    """Standard input where the user types the next line only after a pause, like a person."""

    def readline(self, *args):
        import time

        time.sleep(0.05)
        return super().readline(*args)


async def test_console_session_end_to_end(settings):
    hn = FakeHN({8863: {"id": 8863, "type": "story", "title": "My YC app: Dropbox",
                        "url": "http://www.getdropbox.com/u/2/screencast.html"}}, [8863])
    base = await hn.start()
    out = io.StringIO()
    typed = SlowLines("Show HN: A tiny Lisp\nhttps://news.ycombinator.com/item?id=8863\n/status\n/cancel x\n")
    try:
        # Streamed comments: the header is posted before the count is known and edited once it is.
        engine = ScriptedEngine(delay=0.2, stream_delay=0.01)
        async with App(settings.replace(hn_api_base=base), engine=engine) as app:
            assert await chat(app, stdin=typed, out=out) == 0
            jobs = await app.queue.list_jobs()
    finally:
        await hn.close()
    text = out.getvalue()
    assert "Queued #1: Show HN: A tiny Lisp" in text and "Queued #2: https://news.ycombinator.com" in text
    assert "queue:" in text and "Usage: /cancel" in text
    assert {job.status for job in jobs} == {"done"}
    for title in ("Show HN: A tiny Lisp", "My YC app: Dropbox (getdropbox.com)"):
        assert f"▲ {title}" in text
    assert text.count("AI-generated discussion") == 2
    thread = text[text.index("▲ My YC app"):]
    assert "\n      " in thread  # replies are indented under their parents
    assert " points by " in thread and " comments\n" in thread.split("\n\n")[0]


async def test_console_with_the_real_engine(settings):
    """The real engine (tiny random GPT-2) behind the console: every request ends as a thread or a clear note."""
    out = io.StringIO()
    async with App(settings.replace(max_new_tokens=40)) as app:
        await chat(app, stdin=SlowLines("Ask HN: What are you working on?\n"), out=out)
        [job] = await app.queue.list_jobs()
    assert job.status in ("done", "failed")
    text = out.getvalue()
    assert ("▲ Ask HN: What are you working on?" in text) or ("✗ #1" in text and "couldn't write" in text)


def test_generate_is_reproducible_and_prints_thread_json(tiny_model, capsys):
    args = ["generate", "Show HN: A tiny Lisp", "--url", "https://example.com/lisp", "--model", tiny_model,
            "--max-new-tokens", "60", "--seed", "7"]
    main(args + ["--json"])
    first = capsys.readouterr().out
    main(args + ["--json"])
    assert capsys.readouterr().out == first
    data = json.loads(first)
    assert data["title"] == "Show HN: A tiny Lisp" and data["url"] == "https://example.com/lisp"
    assert isinstance(data["comments"], list) and data["seed"] >= 7
    main(args)
    rendered = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == rendered


def test_missing_model_and_missing_platforms_say_what_to_do(tmp_path, capsys, monkeypatch):
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert main(["generate", "x", "--model", str(tmp_path / "nothing")]) == 2
    assert "No model at" in capsys.readouterr().err
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "DISCORD_TOKEN" in err and "hnaas chat" in err and "ignored" not in err
    assert "SLACK_BOT_TOKEN" in err and "SLACK_APP_TOKEN" in err
    # half of Slack's credentials: the user is told which one is missing, before anything loads
    monkeypatch.setenv("SLACK_APP_TOKEN", "xapp-1")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "SLACK_BOT_TOKEN is not set" in err and "xapp-1" not in err
    monkeypatch.delenv("SLACK_APP_TOKEN")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "Set SLACK_APP_TOKEN" in err and "SLACK_SIGNING_SECRET" in err and "xoxb-1" not in err
