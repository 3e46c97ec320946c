"""``hnaas``: the one command line for serving, generating, training and benchmarking."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
from pathlib import Path

from bot.errors import HnaasError
from bot.settings import DEFAULT_MODEL, Settings

MISSING_MODEL = """No model at {path}.
The embedded default model lives in model/default/ of the HNaaS repository; reinstall from a full clone, or
point --model / HNAAS_MODEL at a Hugging Face GPT-2 checkpoint directory (see `hnaas train` and `hnaas export`)."""

NO_PLATFORM = """No platform is configured, so there is nothing for `hnaas run` to connect to.
  Discord: set DISCORD_TOKEN (Developer Portal → your application → Bot → Reset Token; enable the Message Content
           intent there too). `hnaas discord invite` prints the URL that adds the bot to a server.
  Slack:   set SLACK_BOT_TOKEN (xoxb-...) and either SLACK_APP_TOKEN (xapp-..., Socket Mode: no public URL) or
           SLACK_SIGNING_SECRET (HTTP mode: events arrive at http://HOST:HNAAS_SLACK_PORT/slack/events).
           `hnaas slack manifest` prints the app manifest to create the app with.
To try HNaaS without any account, run `hnaas chat`: a terminal channel with the same bot."""


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.load(getattr(args, "config", None))
    changes = {name: getattr(args, name) for name in ("model", "db", "device")
               if getattr(args, name, None) is not None}
    return settings.replace(**changes)


def _model_ok(settings: Settings) -> bool:
    if (Path(settings.model) / "config.json").exists():
        return True
    print(MISSING_MODEL.format(path=settings.model), file=sys.stderr)
    return False


# -- serving ----------------------------------------------------------------------------------------------------

def cmd_chat(args: argparse.Namespace) -> int:
    from bot.app import App
    from bot.console import chat

    settings = _settings(args)
    if not _model_ok(settings):
        return 2

    async def main() -> int:
        async with App(settings) as app:
            return await chat(app)

    return asyncio.run(main())


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    connections = []
    if settings.discord_token:
        from bot.discord_bot import DiscordConnection

        connections.append(DiscordConnection)
    if settings.slack_bot_token or settings.slack_app_token or settings.slack_signing_secret:
        from bot.slack_bot import SlackBot, settings_problem

        problem = settings_problem(settings)
        if problem:
            print(f"Slack: {problem}.", file=sys.stderr)
            return 2
        connections.append(SlackBot)
    if not connections:
        print(NO_PLATFORM, file=sys.stderr)
        return 2
    if not _model_ok(settings):
        return 2
    from bot.app import serve_platforms

    return asyncio.run(serve_platforms(settings, connections))


# -- one thread -------------------------------------------------------------------------------------------------

async def generate_thread(engine, title: str, url: str | None, seed: int, settings: Settings,
                          max_new_tokens: int | None = None):
    """One thread for a title, retrying with the worker's next seeds when a generation has no usable comment.
    Returns (thread, parse result, the seed that produced it)."""
    from bot.worker import next_seed
    from model.engine import GenerationRequest
    from model.format import parse_generation, prompt
    from model.tree import Thread

    sampling = settings.sampling(max_new_tokens=max_new_tokens or None)
    for _ in range(settings.generation_retries + 1):
        [result] = await engine.generate([GenerationRequest(prompt(title, url), seed, sampling)])
        parsed = parse_generation(result.text, result.finished)
        if parsed.comments:
            break
        seed = next_seed(seed)
    return Thread(title, url, parsed.comments), parsed, seed


def cmd_generate(args: argparse.Namespace) -> int:
    from bot.console import format_block
    from bot.render import CONSOLE, Story, render_thread
    from model.engine import Engine

    settings = _settings(args)
    if not _model_ok(settings):
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)

    async def main():
        engine = Engine(settings.model, device=settings.device, dtype=settings.dtype, threads=settings.threads)
        await engine.start()
        try:
            return await generate_thread(engine, args.title, args.url, seed, settings, args.max_new_tokens)
        finally:
            await engine.close()

    thread, parsed, used_seed = asyncio.run(main())
    if args.json:
        thread.extra.update({"seed": used_seed, "model": str(settings.model), "problems": parsed.describe()})
        print(thread.dumps())
        return 0 if thread.comments else 1
    if not thread.comments:
        print(f"The model couldn't write a usable discussion ({parsed.describe()}).", file=sys.stderr)
        return 1
    for message in render_thread(thread, Story(args.title, args.url, used_seed), CONSOLE):
        print(message.text if message.depth == 0 else format_block(message))  # generate's header stays flush
        print()
    print(f"(seed {used_seed})", file=sys.stderr)
    return 0


# -- moderation -------------------------------------------------------------------------------------------------

def cmd_audit(args: argparse.Namespace) -> int:
    """The audit trail, newest first: who deleted, purged, cancelled, regenerated or changed a setting."""
    import dataclasses
    import json
    from datetime import datetime, timezone

    from bot.queue import read_audit

    settings = _settings(args)
    if not Path(settings.db).exists():
        print(f"No queue database at {settings.db} (set --db or HNAAS_DB).", file=sys.stderr)
        return 2
    for entry in read_audit(settings.db, args.limit):
        if args.json:
            print(json.dumps(dataclasses.asdict(entry), ensure_ascii=False))
            continue
        when = datetime.fromtimestamp(entry.at, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        details = json.dumps(entry.details, ensure_ascii=False) if entry.details else ""
        print(f"{when}  {entry.actor}  {entry.action}  {entry.target or '-'}  {details}".rstrip())
    return 0


# -- wiring -----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnaas", description="Hacker News as a Service")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, db: bool = True) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML settings file (default: $HNAAS_CONFIG)")
        p.add_argument("--model", help=f"checkpoint directory (default: $HNAAS_MODEL or {DEFAULT_MODEL})")
        p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
        if db:
            p.add_argument("--db", help="queue SQLite file (default: $HNAAS_DB or hnaas.sqlite3)")
        return p

    p = common(commands.add_parser("chat", help="a terminal channel: paste links or titles, read discussions"))
    p.set_defaults(func=cmd_chat)

    p = common(commands.add_parser("run", help="serve every configured platform (Discord, Slack) and the worker"))
    p.set_defaults(func=cmd_run)

    p = common(commands.add_parser("generate", help="print one generated thread and exit"), db=False)
    p.add_argument("title", help="the story title")
    p.add_argument("--url", help="the story link")
    p.add_argument("--seed", type=int, help="sampling seed: the same seed and model give the same thread")
    p.add_argument("--max-new-tokens", type=int, help="length budget in tokens")
    p.add_argument("--json", action="store_true", help="print thread JSON instead of the rendered thread")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("audit", help="print the audit trail (deletes, purges, setting changes), newest first")
    p.add_argument("--config", help="TOML settings file (default: $HNAAS_CONFIG)")
    p.add_argument("--db", help="queue SQLite file (default: $HNAAS_DB or hnaas.sqlite3)")
    p.add_argument("--limit", type=int, default=50, help="how many entries (default: 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: id, at, actor, action, target, "
                                                      "details")
    p.set_defaults(func=cmd_audit)

    from training import data_cli

    data_cli.register(commands)

    from training import train

    p = commands.add_parser("train", help="train or finetune a GPT-2 on encoded data")
    train.add_arguments(p)
    p.set_defaults(func=train.main)

    for module_name, name, help_text in (
        ("training.evaluate", "eval", "evaluate a model: bits per byte, sampled tree validity, diversity"),
        ("training.export", "export", "export a run as a Hugging Face model directory with a model card"),
        ("model.bench", "bench", "measure engine speed against transformers generate and the machine's limits"),
    ):
        module = _optional(module_name)
        if module is not None:
            p = commands.add_parser(name, help=help_text)
            module.add_arguments(p)
            p.set_defaults(func=module.main)

    for module_name in ("bot.discord_bot", "bot.slack_bot"):
        module = _optional(module_name)
        if module is not None:
            module.register_cli(commands)
    return parser


def _optional(module_name: str):
    import importlib

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    # Before transformers is imported: no download progress bars or hub chatter in a CLI that never downloads.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    # The chat shares the terminal with its user: only errors there, unless asked for more.
    quiet = logging.ERROR if args.command == "chat" else logging.WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else quiet,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except HnaasError as e:
        print(e.user_message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
