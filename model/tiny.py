"""A tiny random-weight GPT-2 checkpoint built offline, for tests and benchmarks.

`build_tiny_checkpoint(path)` writes a complete Hugging Face checkpoint directory (config, safetensors weights, a
byte-level BPE tokenizer that knows the thread format's special tokens, a generation config) in well under a second,
with no network. The same arguments give the same files byte for byte.

`gpt2_config(shape)` gives the config of a real GPT-2 size ("gpt2", "gpt2-medium") for benchmarks with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from model.format import CLOSE, END_OF_TEXT, OPEN, SPECIAL_TOKENS

GPT2_VOCAB = 50257  # the stock GPT-2 vocabulary; <|endoftext|> is its last id (50256)
TINY_BPE_VOCAB = 600  # 256 bytes + the special tokens + ~340 merges: trains in a few milliseconds

SHAPES = {  # name: (n_layer, n_embd, n_head)
    "tiny": (2, 64, 2),
    "gpt2": (12, 768, 12),  # 124M
    "gpt2-medium": (24, 1024, 16),  # 355M
}

# A small English sample in the register of the bot's threads; only used to give the tiny tokenizer real merges.
SAMPLE_TEXT = """\
Show HN: I built a search engine for my own notes in a weekend
This is neat. I have been looking for something like this for a long time, but the hard part is always the
ranking, not the indexing. How do you handle typos in the query?
We use a simple edit distance over the vocabulary and it works well enough for a personal collection.
I think the real problem with personal knowledge tools is that people stop using them after a month.
That has not been my experience. The trick is to make capture so cheap that you never have to think about it.
Why would anyone pay for this when grep exists? Serious question, not trying to be dismissive.
Because most people do not know what grep is, and the ones who do still want a nice interface on their phone.
The article makes a good point about latency: anything over a hundred milliseconds feels slow to the user.
Ask HN: What is the best way to learn about databases in depth?
Read the SQLite source code and its documentation. It is one of the best written programs I have ever seen.
I would start with a book on the internals of a relational database, then build a small key value store yourself.
Writing your own storage engine teaches you more than any course, because every shortcut you take comes back later.
The comments here are missing the point. The author is not saying that the old system was bad, only that it
did not scale to the number of users they have today, which is a completely different problem.
I worked on a similar project at a previous company. We spent two years on the rewrite and then went back.
This is the kind of story that shows up every few months, and the answer is always the same: measure first.
Interesting paper. The results look good on the benchmark, but I would like to see how it does on real data.
Does anyone know if there is a version of this that runs in the browser? I would love to try it without
installing anything on my machine.
The license is the real issue here. Open source does not mean you can do whatever you want with the code.
People underestimate how much work it takes to maintain a popular library for free over many years.
I have been using this for three years in production and it has never let me down. Highly recommended.
Counterpoint: the documentation is poor, the error messages are confusing, and the community is small.
Small communities can be a feature. You get answers from the people who wrote the code, not from a bot.
"""


def gpt2_config(shape: str, *, vocab_size: int = GPT2_VOCAB + 2, eos_token_id: int = GPT2_VOCAB - 1,
                n_positions: int = 1024, **overrides) -> GPT2Config:
    """The GPT2Config of a named shape ("tiny", "gpt2", "gpt2-medium").

    The default vocabulary is the stock GPT-2 one plus the two format tags (<|c|>, <|ec|>), with <|endoftext|> at
    its stock id. `overrides` are passed to GPT2Config as they are.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    n_layer, n_embd, n_head = SHAPES[shape]
    settings = dict(
        vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    settings.update(overrides)
    return GPT2Config(**settings)


def build_tokenizer(vocab_size: int = TINY_BPE_VOCAB) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer trained in-process on SAMPLE_TEXT.

    The format's special tokens come first (ids 0, 1, 2...), so <|endoftext|> is id 0 here, unlike stock GPT-2;
    code must always look ids up through the tokenizer.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXT.splitlines(keepends=True), trainer=trainer)
    extra = [t for t in SPECIAL_TOKENS if t != END_OF_TEXT]
    assert OPEN in extra and CLOSE in extra
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=None,
        additional_special_tokens=extra,
        padding_side="left",  # what generation wants; the engine pads by itself anyway
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_checkpoint(path: str | Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                          n_positions: int = 512, vocab_size: int | None = None, seed: int = 0) -> Path:
    """Write a complete random-weight GPT-2 checkpoint directory at `path` (created if needed) and return it.

    `vocab_size` defaults to the tokenizer's size; a larger value pads the embedding with ids the tokenizer never
    produces (as real checkpoints often do). Weights come from `torch.manual_seed(seed)`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    n_vocab = len(tokenizer)
    if vocab_size is not None and vocab_size < n_vocab:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({n_vocab} tokens)")
    config = gpt2_config(
        "tiny", vocab_size=vocab_size or n_vocab, eos_token_id=eos_id, n_positions=n_positions,
        n_layer=n_layer, n_embd=n_embd, n_head=n_head,
    )
    tokenizer.model_max_length = n_positions
    # fork_rng: building a checkpoint must not disturb the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=400,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
