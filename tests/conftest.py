"""Shared fixtures: a tiny random-weight GPT-2 checkpoint (built from a config, no download) and test settings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from model.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture
def settings(tmp_path, tiny_model):
    from bot.settings import Settings

    return Settings(model=tiny_model, db=str(tmp_path / "queue.sqlite3"), allow_private_fetch=True,
                    fetch_timeout=3.0, max_new_tokens=120, batch_size=4, worker_poll_seconds=0.5, threads=1)


class FakeClock:
    """The queue's clock, moved by hand: leases expire when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def queue(tmp_path, clock):
    """A real queue on a temporary SQLite file, with generous caps and the fake clock."""
    from bot.queue import Queue

    q = await Queue.open(tmp_path / "queue.sqlite3", clock=clock, max_queued_per_requester=100,
                         max_queued_total=1000)
    yield q
    await q.close()
