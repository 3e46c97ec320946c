"""A character n-gram baseline: interpolated modified Kneser-Ney (Chen & Goodman 1998), order 8 by default.

``python -m training.ngram --train data/default/train.txt --eval data/default/val_hn.jsonl [more.jsonl] --order 8``
prints one JSON object per evaluation file: ``bits_per_byte`` (comment text given its title and ancestors, over
UTF-8 bytes: the same figure as ``hnaas eval``), ``bits_per_byte_by_depth``, ``tag_bits_per_comment``, ``order``,
``train_chars``, ``data``.

The model reads the same character stream as the format text, with each tag (``<|endoftext|>``, ``<|c|>``,
``<|ec|>``) turned into one character of its own, so a context of 7 characters is 7 characters of text or
structure. Held-out threads are scored like ``training.evaluate`` scores them: the whole stream is the context,
only comment-text characters count towards bits per byte, tags after the first ``<|c|>`` towards the tag cost.

How it is built, in numpy without a dictionary per n-gram. Characters become 16-bit ids (up to 65,535 distinct
characters; later ones share the unknown id). An n-gram is a 64-bit hash of its ids (``sum((id + 1) * M[j])``
mod 2**64 with random odd ``M``); with ~10**8 distinct n-grams the chance of any collision is about 1e-3. The
highest order is counted by sorting the hashes of every position (in buckets by their top bits, to bound memory),
keeping one position per distinct n-gram; each lower order's continuation counts ``N1+(. w)`` come from the
distinct n-grams of the order above (their suffixes, counted), so only one sort is over the whole text. Per order
we keep the sorted n-gram hashes with their counts, and per context its total and ``D1 N1 + D2 N2 + D3 N3+``.

Memory: the text as uint16 (2 bytes/char), the highest order's hashes during the build (9 bytes/char, plus about
a quarter of that per bucket), and tables of 12 bytes per distinct n-gram and 16 per distinct context, over all
orders. Measured on ``data/default/train.txt`` (132.9 M characters once tags are one character) at order 8:
16.0 M distinct 8-grams, 0.66 GiB of tables, 3.0 GB peak resident memory, 2 minutes on one busy core (54 s of
CPU), both evaluation files included.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from model.format import CLOSE, END_OF_TEXT, OPEN, encode_thread
from model.tree import Thread, read_jsonl
from training.encode import stories

TAG_CHARS = {END_OF_TEXT: "\ue000", OPEN: "\ue001", CLOSE: "\ue002"}  # private-use characters stand for the tags
UNK = 0  # id of characters never seen in training (or beyond the 65,535 the ids hold)
UNK_SPELLING_BITS = math.log2(0x110000)  # an unknown character is also spelt out, uniformly over code points
CHUNK = 1 << 23  # positions hashed at a time (bounds temporaries to ~64 MB each)
BUCKET = 1 << 25  # positions sorted at a time when counting the highest order


@dataclass
class _Order:
    keys: np.ndarray  # sorted uint64 hashes of the distinct n-grams
    counts: np.ndarray  # uint32: raw counts (highest order) or continuation counts N1+(. w)
    ctx_keys: np.ndarray  # sorted uint64 hashes of the distinct contexts
    ctx_total: np.ndarray  # uint32: sum of counts of the n-grams with this context
    ctx_gamma: np.ndarray  # float32: D1 N1 + D2 N2 + D3 N3+ of those n-grams
    discounts: np.ndarray  # float64 [0, D1, D2, D3]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.counts, self.ctx_keys, self.ctx_total, self.ctx_gamma))


class CharKN:
    """Interpolated modified Kneser-Ney over characters. ``train`` once, then ``bits_per_byte`` or ``distribution``."""

    def __init__(self, order: int = 8, *, seed: int = 0) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order = order
        self._mult = np.random.default_rng(seed).integers(0, 2**63, order, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._code = np.zeros(0x110000, dtype=np.uint16)  # code point -> id (0: unknown)
        self._chars = ["\ufffd"]  # id -> character
        for ch in TAG_CHARS.values():
            self._add_char(ord(ch))
        self.orders: list[_Order] = []  # orders[k - 1] is order k
        self.train_chars = 0

    @property
    def vocab_size(self) -> int:
        return len(self._chars)

    def _add_char(self, point: int) -> None:
        self._code[point] = len(self._chars)
        self._chars.append(chr(point))

    # ----- text to ids -----

    def encode(self, text: str, *, grow: bool = False) -> np.ndarray:
        """uint16 ids of a format text (tags become one id each); ``grow`` adds unseen characters to the alphabet."""
        for tag, ch in TAG_CHARS.items():
            text = text.replace(tag, ch)
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if grow:
            new = np.unique(points[self._code[points] == UNK])
            for point in new[: max(0, 65535 - len(self._chars) + 1)].tolist():
                self._add_char(point)
        return self._code[points]

    # ----- training -----

    def train(self, texts: Iterable[str], *, max_chars: int = 0, log=None) -> CharKN:
        """Count a corpus given as strings (one stream, in order; do not split a tag across two strings)."""
        parts, n = [], 0
        for text in texts:
            ids = self.encode(text, grow=True)
            if max_chars and n + len(ids) > max_chars:
                ids = ids[: max_chars - n]
            parts.append(ids)
            n += len(ids)
            if max_chars and n >= max_chars:
                break
        x = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
        del parts
        if len(x) < self.order + 1:
            raise ValueError(f"need more than {self.order} characters of training text, got {len(x)}")
        self.train_chars = len(x)
        self._build(x, log or (lambda *a: None))
        return self

    def _hash_range(self, x: np.ndarray, k: int, start: int, stop: int) -> np.ndarray:
        """Hashes of the k-grams ending at positions start..stop-1 (start >= k - 1)."""
        h = np.zeros(stop - start, dtype=np.uint64)
        for j in range(k):
            h += (x[start - j: stop - j].astype(np.uint64) + np.uint64(1)) * self._mult[j]
        return h

    def _hash_at(self, x: np.ndarray, k: int, pos: np.ndarray) -> np.ndarray:
        """Hashes of the k-grams ending at the given positions (each >= k - 1); k = 0 hashes to 0."""
        h = np.zeros(len(pos), dtype=np.uint64)
        for j in range(k):
            h += (x[pos - j].astype(np.uint64) + np.uint64(1)) * self._mult[j]
        return h

    def _build(self, x: np.ndarray, log) -> None:
        n = self.order
        t0 = time.time()
        # Highest order: every position's hash, counted by sorting, one representative position per distinct n-gram.
        hashes = np.empty(len(x) - n + 1, dtype=np.uint64)
        bits = max(0, math.ceil(math.log2(max(1, len(hashes) / BUCKET))))
        top = np.zeros(len(hashes), dtype=np.uint8)  # each hash's bucket: its top bits
        for a in range(0, len(hashes), CHUNK):
            b = min(a + CHUNK, len(hashes))
            hashes[a:b] = self._hash_range(x, n, a + n - 1, b + n - 1)
            if bits:
                top[a:b] = hashes[a:b] >> np.uint64(64 - bits)
        keys_parts, count_parts, rep_parts = [], [], []
        for bucket in range(1 << bits):
            sel = np.flatnonzero(top == bucket)
            keys = hashes[sel]
            order = np.argsort(keys)
            keys, sel = keys[order], sel[order]
            del order
            starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
            keys_parts.append(keys[starts])
            count_parts.append(np.diff(np.append(starts, len(keys))).astype(np.uint32))
            rep_parts.append((sel[starts] + (n - 1)).astype(np.int64))
            del sel, keys, starts
        del hashes, top
        keys, counts, rep = np.concatenate(keys_parts), np.concatenate(count_parts), np.concatenate(rep_parts)
        del keys_parts, count_parts, rep_parts
        log(f"order {n}: {len(keys):,} distinct n-grams ({time.time() - t0:.0f} s)")

        orders: list[_Order] = []
        for k in range(n, 0, -1):
            ctx = self._hash_at(x, k - 1, rep - 1)
            orders.append(_make_order(keys, counts, ctx))
            del ctx
            if k == 1:
                break
            # Continuation counts of order k-1: how many distinct k-grams each (k-1)-gram ends.
            suffix = self._hash_at(x, k - 1, rep)
            keys, first, counts = np.unique(suffix, return_index=True, return_counts=True)
            counts = counts.astype(np.uint32)
            rep = rep[first]
            del suffix, first
            log(f"order {k - 1}: {len(keys):,} distinct n-grams ({time.time() - t0:.0f} s)")
        self.orders = orders[::-1]
        log(f"tables: {sum(o.nbytes for o in self.orders) / 2**30:.2f} GiB")

    # ----- scoring -----

    def _probs(self, x: np.ndarray, pos: np.ndarray, first: np.ndarray | int = 0) -> np.ndarray:
        """P(x[pos] | the characters before it, from index ``first`` of its stream on), for each position."""
        pad = self.order  # x is padded on the left so that every lookup below indexes inside it
        x = np.concatenate((np.zeros(pad, dtype=x.dtype), x))
        pos = np.asarray(pos, dtype=np.int64) + pad
        first = np.asarray(first, dtype=np.int64) + pad
        p = np.full(len(pos), 1.0 / self.vocab_size)
        for k, table in enumerate(self.orders, start=1):
            valid = pos - (k - 1) >= first  # the stream holds the whole context (invalid rows keep p)
            ci, found = _lookup(table.ctx_keys, self._hash_at(x, k - 1, pos - 1))
            ni, seen = _lookup(table.keys, self._hash_at(x, k, pos))
            found &= valid
            c = np.where(seen, table.counts[ni], 0).astype(np.float64)
            d = table.discounts[np.minimum(c, 3).astype(np.int64)]
            total = table.ctx_total[ci].astype(np.float64)
            mixed = (np.maximum(c - d, 0) + table.ctx_gamma[ci].astype(np.float64) * p) / np.maximum(total, 1)
            p = np.where(found, mixed, p)
        return p

    def bits(self, text: str) -> np.ndarray:
        """-log2 P of each character of a format text given the ones before it (tags count as one character)."""
        x = self.encode(text)
        return self._bits(x, np.arange(len(x)))

    def _bits(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        bits = -np.log2(self._probs(x, pos))
        return bits + np.where(x[pos] == UNK, UNK_SPELLING_BITS, 0.0)

    def distribution(self, context: str) -> np.ndarray:
        """P(next id | context) over the whole alphabet (``vocab_size`` ids, the unknown id 0 included)."""
        ctx = self.encode(context)
        width = len(ctx) + 1
        x = np.tile(np.append(ctx, np.uint16(0)), self.vocab_size)
        x[width - 1:: width] = np.arange(self.vocab_size, dtype=np.uint16)
        ends = np.arange(self.vocab_size) * width + width - 1
        return self._probs(x, ends, first=ends - (width - 1))

    def char_of(self, i: int) -> str:
        return self._chars[i]

    def bits_per_byte(self, threads: Sequence[Thread]) -> dict:
        """Bits per UTF-8 byte of comment text given title and ancestors (as ``training.evaluate.bits_per_byte``)."""
        stream, kind, sizes, comments = thread_stream(threads)
        x = self.encode(stream)
        scored = np.flatnonzero(kind != 0)
        bits = np.zeros(len(x))
        bits[scored] = self._bits(x, scored)
        text = kind > 0
        total_bytes = int(sizes[text].sum())
        depths = np.unique(kind[text])
        by_depth = {str(int(d)): float(bits[kind == d].sum() / sizes[kind == d].sum()) for d in depths}
        return {
            "bits_per_byte": float(bits[text].sum() / total_bytes) if total_bytes else None,
            "bits_per_byte_by_depth": by_depth,
            "tag_bits_per_comment": float(bits[kind == -1].sum() / comments) if comments else None,
            "bits_per_char": float(bits[text].sum() / text.sum()) if text.any() else None,
            "text_bytes": total_bytes,
            "text_chars": int(text.sum()),
            "comments": comments,
            "threads": stream.count(END_OF_TEXT) - 1,
        }


def _lookup(table: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, found) of keys in a sorted table; sorted queries make numpy's binary searches cache friendly."""
    if len(table) == 0:
        return np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
    order = np.argsort(keys)
    index = np.empty(len(keys), dtype=np.int64)
    index[order] = np.minimum(np.searchsorted(table, keys[order]), len(table) - 1)
    return index, table[index] == keys


def _discounts(counts: np.ndarray) -> np.ndarray:
    """Chen & Goodman's D1, D2, D3+ from the counts of counts (fallbacks where the data is too small)."""
    n1, n2, n3, n4 = (float(v) for v in np.bincount(np.minimum(counts, 5), minlength=6)[1:5])
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
    d1 = 1 - 2 * y * n2 / n1 if n1 else 0.5
    d2 = 2 - 3 * y * n3 / n2 if n2 else 1.0
    d3 = 3 - 4 * y * n4 / n3 if n3 else 1.5
    return np.array([0.0, min(max(d1, 0.05), 0.95), min(max(d2, 0.05), 1.95), min(max(d3, 0.05), 2.95)])


def _make_order(keys: np.ndarray, counts: np.ndarray, ctx: np.ndarray) -> _Order:
    discounts = _discounts(counts)
    order = np.argsort(ctx, kind="stable")
    ctx_sorted, c = ctx[order], counts[order]
    del order
    starts = np.flatnonzero(np.concatenate(([True], ctx_sorted[1:] != ctx_sorted[:-1])))
    total = np.add.reduceat(c.astype(np.int64), starts).astype(np.uint32)
    gamma = np.zeros(len(starts))
    for i in (1, 2, 3):
        hit = (c >= 3) if i == 3 else (c == i)
        gamma += discounts[i] * np.add.reduceat(hit.astype(np.int64), starts)
    return _Order(keys, counts, ctx_sorted[starts], total, gamma.astype(np.float32), discounts)


def thread_stream(threads: Sequence[Thread]) -> tuple[str, np.ndarray, np.ndarray, int]:
    """The corpus text of threads (as ``encode_corpus`` writes it, plus a closing ``<|endoftext|>``) with, per
    character once tags are one character each: kind (depth > 0 for comment text, -1 for a scored tag, 0 for the
    rest), UTF-8 size; and the number of comments."""
    from training.evaluate import TAG, char_depths

    texts = [END_OF_TEXT + encode_thread(t) for t in threads]
    texts = [t for t in texts if OPEN in t] + [END_OF_TEXT]  # threads without comments are left out
    kinds, sizes = [], []
    comments = 0
    for n, text in enumerate(texts):
        depths = char_depths(text)
        keep = np.ones(len(text), dtype=bool)
        tags = list(TAG.finditer(text))
        for m in tags:
            keep[m.start() + 1: m.end()] = False
        kind = depths.copy()
        for i, m in enumerate(tags):
            # The story's opening <|endoftext|> closes the previous story (scored, except before the first story);
            # the first <|c|> is part of the prompt.
            kind[m.start()] = -1 if (i == 0 and n > 0) or i >= 2 else 0
        comments += text.count(OPEN)
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        size = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
        kinds.append(kind[keep])
        sizes.append(size[keep])
    return "".join(texts), np.concatenate(kinds), np.concatenate(sizes), comments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="corpus text (stories joined by <|endoftext|>)")
    parser.add_argument("--eval", nargs="+", required=True, help="held-out threads (thread JSON lines)")
    parser.add_argument("--order", type=int, default=8)
    parser.add_argument("--max-train-chars", type=int, default=0, help="use only the first N characters (0: all)")
    parser.add_argument("--verbose", action="store_true", help="progress and memory on stderr")
    args = parser.parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else None
    t0 = time.time()
    model = CharKN(args.order).train(stories(args.train), max_chars=args.max_train_chars, log=log)
    if log:
        log(f"trained on {model.train_chars:,} characters in {time.time() - t0:.0f} s")
    for path in args.eval:
        result = model.bits_per_byte(list(read_jsonl(path)))
        result.update({"order": args.order, "train_chars": model.train_chars, "data": str(path), "model": "char-kn"})
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
