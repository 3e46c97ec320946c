"""``hnaas data …``: import, crawl, build and inspect the training data. Every step can be stopped and run again.

    hnaas data import --format firebase stories-2016-2020.jsonl.gz
    hnaas data import --format algolia thread-18321884-algolia.json
    hnaas data import --format threads reddit-threads-2015.jsonl.gz
    hnaas data crawl --stories top            # or --last 100000, or --from-id 1 --to-id 5000
    hnaas data build --out data/build
    hnaas data tokenize --data data/build     # --from-gpt2 CHECKPOINT to finetune a GPT-2
    hnaas data encode --data data/build
    hnaas data stats

Until the ``hnaas`` CLI includes it: ``python -m training.data_cli data …``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from tqdm import tqdm

DEFAULT_DB = "data/hn-items.db"
DEFAULT_OUT = "data/build"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command to a CLI's subparsers. Each leaf sets ``func(args) -> exit code``."""
    data = subparsers.add_parser("data", help="import, crawl and build training data",
                                 description="Import, crawl and build training data (each step restartable).")
    steps = data.add_subparsers(dest="data_command", required=True, metavar="STEP")

    def db_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", default=DEFAULT_DB, help=f"item store (SQLite file, default {DEFAULT_DB})")

    p = steps.add_parser("import", help="import item files into the store")
    p.add_argument("--format", required=True, choices=("firebase", "algolia", "threads"),
                   help="firebase: HN API items, one per line; algolia: Algolia /items trees; threads: thread JSON")
    p.add_argument("paths", nargs="+", metavar="FILE", help="input files (.gz allowed)")
    p.add_argument("--source", help="threads only: source name to record (default: each thread's 'source')")
    db_option(p)
    p.set_defaults(func=cmd_import)

    p = steps.add_parser("crawl", help="fetch items from the HN API into the store (resumes where it stopped)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--stories", choices=("top", "new", "best"), help="a story list and full comment trees")
    what.add_argument("--last", type=int, metavar="N", help="the newest N items")
    what.add_argument("--from-id", type=int, help="first id of a range (with --to-id)")
    p.add_argument("--to-id", type=int, help="last id of a range (default: the newest item)")
    p.add_argument("--limit", type=int, help="--stories: only the first N stories of the list")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--retries", type=int, default=5, help="retries per request (default 5)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    p.add_argument("--refresh", action="store_true", help="fetch again items already done")
    p.add_argument("--max-age", type=float, default=86400.0,
                   help="--stories: refetch stored items older than this many seconds (default 86400)")
    p.add_argument("--api-base", help="HN API base URL (default: $HNAAS_HN_API_BASE or the official API)")
    db_option(p)
    p.set_defaults(func=cmd_crawl)

    p = steps.add_parser("build", help="write train/val thread JSON and text from the store")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of stories for validation (0.02)")
    p.add_argument("--min-comments", type=int, default=1, help="skip stories with fewer comments (1)")
    p.add_argument("--max-stories", type=int, help="stop after this many stories")
    db_option(p)
    p.set_defaults(func=cmd_build)

    p = steps.add_parser("tokenize", help="make the tokenizer: a GPT-2's own plus the format's tags, or a new BPE")
    p.add_argument("--data", default=DEFAULT_OUT, help=f"folder with train.txt (default {DEFAULT_OUT})")
    p.add_argument("--from-gpt2", metavar="CHECKPOINT",
                   help="finetuning: reuse this checkpoint's tokenizer and add the tags (embeddings are resized "
                        "by `hnaas train`)")
    p.add_argument("--vocab-size", type=int, default=8192, help="training from scratch: BPE vocabulary (8192)")
    p.add_argument("--sample-stories", type=int, default=40_000,
                   help="stories of train.txt to learn the BPE from (40000)")
    p.set_defaults(func=cmd_tokenize)

    p = steps.add_parser("encode", help="tokenize train/val text once into memory-mapped token files")
    p.add_argument("--data", default=DEFAULT_OUT, help=f"folder with *.txt and tokenizer/ (default {DEFAULT_OUT})")
    p.set_defaults(func=cmd_encode)

    p = steps.add_parser("stats", help="counts of what the store holds")
    db_option(p)
    p.set_defaults(func=cmd_stats)
    return data


def _open_store(path: str):
    import os

    from training.store import ItemStore

    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return ItemStore(path)


def _bar(**kwargs) -> tqdm:
    return tqdm(file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def cmd_import(args: argparse.Namespace) -> int:
    from training.importers import IMPORTERS

    importer = IMPORTERS[args.format]
    extra = {"source": args.source} if args.format == "threads" and args.source else {}
    with _open_store(args.db) as store, _bar(unit="item", desc=f"import {args.format}") as bar:
        stats = importer(store, args.paths, progress=bar.update, **extra)
    for problem in stats.errors:
        logging.warning("skipped %s", problem)
    print(f"{stats.items} items from {stats.lines} lines: {stats.changed} new or changed, {stats.skipped} skipped")
    return 0


def cmd_crawl(args: argparse.Namespace) -> int:
    from training.crawl import Crawler, CrawlError, api_base

    if args.to_id is not None and args.from_id is None:
        raise SystemExit("--to-id needs --from-id")
    base = (args.api_base or api_base()).rstrip("/")

    async def run() -> None:
        with _open_store(args.db) as store:
            async with Crawler(store, base, concurrency=args.concurrency, retries=args.retries,
                               timeout=args.timeout, refresh=args.refresh, max_age=args.max_age) as crawler:
                if args.stories:
                    await crawler.crawl_stories(args.stories, args.limit)
                elif args.last is not None:
                    await crawler.crawl_last(args.last)
                else:
                    to_id = args.to_id if args.to_id is not None else await crawler.max_item()
                    await crawler.crawl_range(args.from_id, to_id)
                return crawler.stats

    try:
        stats = asyncio.run(run())
    except CrawlError as error:
        print(f"crawl failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("crawl interrupted; what was done is stored, run the same command to resume", file=sys.stderr)
        return 130
    print(f"{stats.fetched} fetched ({stats.missing} null), {stats.stored} stored, {stats.skipped} already done, "
          f"{stats.failed} failed, {stats.retries} retries")
    if stats.failed:
        print(f"{stats.failed} items failed (e.g. {stats.failed_ids[:10]}); run again to retry them",
              file=sys.stderr)
        return 2
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from training.build import BuildOptions, build

    options = BuildOptions(val_fraction=args.val_fraction, min_comments=args.min_comments,
                           max_stories=args.max_stories)
    with _open_store(args.db) as store, _bar(unit="story", desc="build") as bar:
        bar.total = store.counts()["by_type"].get("story", 0)
        stats = build(store, args.out, options, progress=bar.update)
    print(f"train: {stats.written['train']} stories, {stats.comments['train']} comments; "
          f"val: {stats.written['val']} stories, {stats.comments['val']} comments; "
          f"{stats.skipped_few_comments} skipped (too few comments, {stats.story_texts} kept in story_texts.jsonl)"
          f" -> {args.out}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    import itertools
    from pathlib import Path

    from training.encode import stories
    from training.tokenizer import gpt2_with_tags, train_bpe

    data = Path(args.data)
    if args.from_gpt2:
        tokenizer = gpt2_with_tags(args.from_gpt2)
    else:
        tokenizer = train_bpe(itertools.islice(stories(data / "train.txt"), args.sample_stories), args.vocab_size)
    tokenizer.save_pretrained(data / "tokenizer")
    print(f"tokenizer with {len(tokenizer)} entries -> {data / 'tokenizer'}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.encode import encode_file
    from training.tokenizer import load

    data = Path(args.data)
    tokenizer = load(data / "tokenizer")
    for text in sorted(data.glob("*.txt")):
        meta = encode_file(text, tokenizer, text.with_suffix(".bin"))
        print(f"{text.name}: {meta['tokens']:,} tokens -> {text.with_suffix('.bin').name}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _open_store(args.db) as store:
        print(json.dumps(store.counts(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnaas")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
