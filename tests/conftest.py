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
