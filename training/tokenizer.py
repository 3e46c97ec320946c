"""Tokenizers for HNaaS models.

Finetuning a GPT-2 checkpoint reuses its tokenizer and adds the format's tags as special tokens (the embeddings are
resized by the trainer). Training from scratch trains a byte-level BPE on the corpus, so a small model spends its
parameters on a vocabulary that fits the data instead of GPT-2's 50k entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from model.format import END_OF_TEXT, SPECIAL_TOKENS


def wrap(tokenizer_object):
    """A ``PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer`` with the format's special tokens set."""
    from transformers import PreTrainedTokenizerFast

    # No unk token: a byte-level BPE can spell anything, and an unk aliased to <|endoftext|> would hide a real one.
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                  pad_token=END_OF_TEXT)
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t != END_OF_TEXT]})
    tok.model_max_length = 1_000_000  # the model config, not the tokenizer, bounds the context
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2):
    """Train a byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) whose first ids are the format's tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_without_tags(texts), trainer=trainer)
    return wrap(tokenizer)


def _without_tags(texts: Iterable[str]) -> Iterator[str]:
    # Tags are special tokens: split them out so BPE never learns merges across them.
    import re

    tags = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    for text in texts:
        yield from (piece for piece in tags.split(text) if piece)


def gpt2_with_tags(path: str | Path):
    """A GPT-2 checkpoint's own tokenizer with the format's tags added (ids appended after its vocabulary)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t != END_OF_TEXT]})
    tok.pad_token = tok.eos_token
    return tok


def load(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
