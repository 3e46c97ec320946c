"""Tokenize a corpus once into a memory-mapped token file, so training never tokenizes.

``train.txt`` (stories joined by ``<|endoftext|>``, as ``model.format.encode_corpus`` writes them) becomes
``train.bin`` (uint16 token ids when the vocabulary fits, else uint32) and ``train.bin.json`` (dtype, token count,
tokenizer path). Encoding is restartable: an up-to-date ``.bin`` is left alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.format import END_OF_TEXT


def stories(text_path: str | Path, chunk_chars: int = 1 << 22) -> Iterator[str]:
    """Stories of a corpus file, each with its leading ``<|endoftext|>``, read in bounded chunks."""
    pending = ""
    with open(text_path, encoding="utf-8") as f:
        while chunk := f.read(chunk_chars):
            pending += chunk
            parts = pending.split(END_OF_TEXT)
            pending = parts.pop()
            yield from (END_OF_TEXT + p for p in parts if p)
    if pending:
        yield END_OF_TEXT + pending


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def encode_file(text_path: str | Path, tokenizer, out_path: str | Path, *, batch: int = 512) -> dict:
    text_path, out_path = Path(text_path), Path(out_path)
    meta_path = out_path.with_suffix(out_path.suffix + ".json")
    if meta_path.exists() and out_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("source_mtime") == os.path.getmtime(text_path):
            return meta
    dtype = dtype_for(len(tokenizer))
    tmp = out_path.with_suffix(".partial")
    count = 0
    with open(tmp, "wb") as out:
        pending: list[str] = []
        for story in stories(text_path):
            pending.append(story)
            if len(pending) == batch:
                count += _write(out, tokenizer, pending, dtype)
                pending = []
        if pending:
            count += _write(out, tokenizer, pending, dtype)
    os.replace(tmp, out_path)
    meta = {"dtype": np.dtype(dtype).name, "tokens": count, "vocab_size": len(tokenizer),
            "source": str(text_path), "source_mtime": os.path.getmtime(text_path)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def _write(out, tokenizer, texts: list[str], dtype) -> int:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = np.fromiter((i for seq in ids for i in seq), dtype=dtype)
    flat.tofile(out)
    return len(flat)


def open_tokens(path: str | Path) -> np.memmap:
    meta = json.loads(Path(str(path) + ".json").read_text())
    return np.memmap(path, dtype=meta["dtype"], mode="r")
