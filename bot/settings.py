"""One settings object, read from environment variables and an optional TOML file, passed in explicitly.

Precedence: environment > TOML file (``HNAAS_CONFIG`` or ``--config``) > defaults. Every ``HNAAS_*`` variable maps to
the field of the same name in lower case (``HNAAS_BATCH_SIZE`` → ``batch_size``); the TOML file uses the field names
(``batch_size = 8``). Platform secrets keep their usual names and are never logged (``repr`` masks them).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PACKAGE_ROOT / "model" / "default"

SECRET_ENV = {
    "discord_token": "DISCORD_TOKEN",
    "slack_bot_token": "SLACK_BOT_TOKEN",
    "slack_app_token": "SLACK_APP_TOKEN",
    "slack_signing_secret": "SLACK_SIGNING_SECRET",
}


def _secret() -> str | None:
    return field(default=None, repr=False)


@dataclass(frozen=True)
class Settings:
    model: str = str(DEFAULT_MODEL)  # checkpoint directory (Hugging Face GPT-2 format)
    db: str = "hnaas.sqlite3"  # the queue's SQLite file
    device: str | None = None  # "cpu", "cuda"; None picks CUDA when present
    dtype: str | None = None  # "float32", "bfloat16", "float16", "int8" (CPU); None: bf16 on CUDA, fp32 on CPU
    threads: int | None = None  # torch CPU threads; None lets torch decide

    # Batching and sampling
    batch_size: int = 8  # most jobs generated together
    token_budget: int = 8192  # most prompt + new tokens in one batch
    max_new_tokens: int = 600  # tokens per thread unless the request asks for less
    temperature: float = 0.9
    top_p: float = 0.95
    top_k: int = 0
    guidance_scale: float = 2.0  # classifier-free guidance towards the title; 1 = off (half the compute)
    generation_retries: int = 2  # new seeds for a job whose output had no usable comment
    max_attempts: int = 3  # claims of one job before it fails (crashes, errors)
    lease_seconds: float = 600.0  # a claimed job returns to the queue if its worker goes quiet this long
    worker_poll_seconds: float = 30.0  # fallback wake-up; enqueue normally wakes the worker at once

    # Caps
    max_links_per_message: int = 3
    max_queued_per_requester: int = 5
    max_queued_total: int = 200
    max_input_chars: int = 4000  # longer messages are refused with a short note, never truncated silently

    # Link resolution
    hn_api_base: str = "https://hacker-news.firebaseio.com/v0"
    allow_private_fetch: bool = False  # tests only: lets link resolution reach loopback
    fetch_timeout: float = 8.0
    fetch_max_bytes: int = 512_000

    # The daily roundup: discussions of the HN front page, posted in every channel that asked (/hnaas roundup on)
    roundup_time: str = "08:00"  # HH:MM, UTC (no daylight-saving jumps: never twice, never skipped)
    roundup_stories: int = 5  # top stories per roundup; 0 turns the roundup off

    # Platforms
    discord_api_base: str = "https://discord.com/api/v10"
    discord_message_content: bool = True  # privileged intent; off: the bot answers only messages that mention it
    slack_api_base: str = "https://slack.com/api/"
    slack_host: str = "0.0.0.0"  # HTTP mode (no SLACK_APP_TOKEN): where Slack's event requests are received
    slack_port: int = 3000
    slack_post_interval: float = 1.0  # seconds between the bot's posts in one Slack channel (Slack allows ~1/s)
    discord_token: str | None = _secret()
    slack_bot_token: str | None = _secret()
    slack_app_token: str | None = _secret()
    slack_signing_secret: str | None = _secret()

    def __post_init__(self) -> None:
        roundup_clock(self.roundup_time)  # a typo here should stop the start, not the first roundup
        if self.roundup_stories < 0:
            raise ValueError(f"roundup_stories must be 0 (off) or more, not {self.roundup_stories}")

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    def sampling(self, **overrides):
        """The engine's ``SamplingSettings`` for these settings (what users get); ``overrides`` that are not None
        replace a field (e.g. ``max_new_tokens``)."""
        from model.engine import SamplingSettings  # torch: only when something is about to generate

        values = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                      max_new_tokens=self.max_new_tokens, guidance_scale=self.guidance_scale)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingSettings(**values)

    @classmethod
    def load(cls, config_file: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        config_file = config_file or env.get("HNAAS_CONFIG")
        if config_file:
            with open(config_file, "rb") as f:
                data = tomllib.load(f)
            known = {f.name for f in fields(cls)}
            unknown = set(data) - known
            if unknown:
                raise ValueError(f"unknown settings in {config_file}: {', '.join(sorted(unknown))}")
            values.update(data)
        for f in fields(cls):
            name = SECRET_ENV.get(f.name, "HNAAS_" + f.name.upper())
            if name in env and env[name] != "":
                values[f.name] = _parse(f, env[name], name)
        return cls(**values)  # type: ignore[arg-type]


def roundup_clock(text: str) -> tuple[int, int]:
    """"HH:MM" (UTC) as (hours, minutes); ValueError with the expected form otherwise."""
    hours, sep, minutes = text.strip().partition(":")
    if sep and hours.isdigit() and minutes.isdigit() and len(minutes) == 2 and int(hours) < 24 and int(minutes) < 60:
        return int(hours), int(minutes)
    raise ValueError(f"roundup_time must be HH:MM in UTC (e.g. 08:00), not {text!r}")


def _parse(f: dataclasses.Field, raw: str, name: str) -> object:
    kind = str(f.type)
    try:
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.split(' ')[0]}") from None
    return raw
