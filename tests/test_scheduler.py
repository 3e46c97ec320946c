"""The daily roundup: when it is due, what it reads from the HN API (a fake one on loopback), and that each subscribed
channel gets each day's roundup exactly once, across restarts and failed fetches (real queue, worker, publisher)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from bot.app import App
from bot.scheduler import MARKER, REQUESTER, SUBSCRIPTION, Roundup, due_day, scope_channel, seconds_until
from bot.settings import Settings
from tests.conftest import FakeClock
from tests.fake_hn import FakeHN
from tests.scripted import ScriptedEngine
from tests.test_core import RecordingPoster, finished


def at(day: int, hour: int, minute: int = 0) -> float:
    return datetime(2026, 12, day, hour, minute, tzinfo=timezone.utc).timestamp()


def test_the_roundup_is_due_from_its_utc_time_until_the_day_ends():
    assert due_day(at(5, 7, 59), "08:00") is None
    assert due_day(at(5, 8, 0), "08:00") == "2026-12-05"
    assert due_day(at(5, 23, 59), "08:00") == "2026-12-05"
    assert due_day(at(6, 0, 1), "08:00") is None  # the next day, before its time
    assert seconds_until(at(5, 7, 30), "08:00") == 1800
    assert seconds_until(at(5, 8, 0), "08:00") == 86400  # just run: the next one is tomorrow
    assert seconds_until(at(5, 23, 0), "00:30") == 5400
    assert scope_channel("discord:channel:123") == ("discord", "123")
    assert scope_channel("discord:guild:1") is None and scope_channel("oops") is None


@pytest.mark.parametrize("bad", ["8am", "24:00", "08:60", "8:5", "08"])
def test_a_bad_roundup_time_stops_the_start_with_the_expected_form(bad):
    with pytest.raises(ValueError, match="HH:MM in UTC"):
        Settings.load(env={"HNAAS_ROUNDUP_TIME": bad})


FRONT_PAGE = {
    1: {"id": 1, "type": "story", "title": "First, foremost", "url": "https://one.example/a"},
    2: {"id": 2, "type": "story", "title": "Dead story", "url": "https://two.example/", "dead": True},
    3: {"id": 3, "type": "story", "title": "Ask HN: What are you reading?"},  # no link: a text post
    4: {"id": 4, "type": "story", "title": "Fourth", "url": "https://four.example/"},
    5: {"id": 5, "type": "story", "title": "Fifth", "url": "https://five.example/"},
}


async def test_each_subscribed_channel_gets_each_days_front_page_once(settings):
    clock = FakeClock(at(5, 7, 59))
    poster = RecordingPoster()
    async with FakeHN(FRONT_PAGE, topstories=[1, 2, 3, 4, 5]) as hn:
        # the app's own roundup is off: this test runs one on the fake clock
        settings = settings.replace(hn_api_base=hn.base_url, roundup_stories=0)
        async with App(settings, engine=ScriptedEngine()) as app:
            await app.serve(poster)
            daily = settings.replace(roundup_stories=3, roundup_time="08:00")
            roundup = Roundup(app.core, app.resolver, daily, clock=clock)
            for scope in ("test:channel:chan-1", "test:channel:chan-2", "elsewhere:channel:x"):
                await app.core.set_option(scope, SUBSCRIPTION, {"guild_id": "g1"})

            assert await roundup.run_due() == [] and hn.requests == []  # not yet its time
            clock.now = at(5, 8, 0)
            jobs = await roundup.run_due()
            by_channel = {c: [j.title for j in jobs if j.channel_id == c] for c in ("chan-1", "chan-2")}
            assert by_channel == {c: ["First, foremost", "Ask HN: What are you reading?", "Fourth"]
                                  for c in by_channel}  # page order, the dead one skipped; no job for "elsewhere"
            assert {(j.requester_id, j.guild_id, j.platform) for j in jobs} == {(REQUESTER, "g1", "test")}
            assert [j.url for j in jobs[:3]] == ["https://one.example/a", None, "https://four.example/"]
            for job in jobs:
                assert (await finished(app, job.id)).status == "done"
            assert {key for key, _, _ in poster.posts if key == "h"} and not poster.notices  # posted, nobody told
            assert await app.core.option("test:channel:chan-1", MARKER) == "2026-12-05"

            requests = len(hn.requests)
            clock.now = at(5, 20, 0)
            assert await roundup.run_due() == []  # once a day...
            assert await Roundup(app.core, app.resolver, daily, clock=clock).run_due() == []  # ... restarts included
            assert len(hn.requests) == requests  # and nothing is fetched for a day that is done

            clock.now = at(6, 9, 0)
            hn.fail_next("topstories", 503)
            assert await roundup.run_due() == []  # the front page can't be read: nothing marked...
            assert await app.core.option("test:channel:chan-1", MARKER) == "2026-12-05"
            await app.core.set_option("test:channel:chan-2", SUBSCRIPTION, None)  # chan-2 unsubscribes
            again = await roundup.run_due()  # ... so the next check posts the day's roundup
            assert [j.channel_id for j in again] == ["chan-1"] * 3
            for job in again:
                await finished(app, job.id)
