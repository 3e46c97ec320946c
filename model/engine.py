"""The inference engine: one GPT-2 checkpoint, loaded once, owned by one thread, driven from asyncio.

All torch work (loading, tokenizing, forward passes, sampling) runs on the engine's single worker thread; the event
loop only awaits futures, so it never blocks on the model. Streaming callbacks cross back with
`call_soon_threadsafe`.

A `generate` call is one batch: left padding (pad = <|endoftext|>), an attention mask, position ids computed from
the mask (GPT-2 has learned absolute positions, so a left-padded row must still start at position 0), a KV cache,
and per-row stopping at <|endoftext|> or at the row's token limit. Rows that stop leave the batch, so the rest run
on a smaller batch.

Reproducibility. Each request carries a seed; its row draws one uniform number per step from its own
`torch.Generator` and picks the token by inverse CDF over its own filtered distribution. So a request's tokens are a
function of (model, prompt, sampling settings, seed) alone and not of the other requests in the batch:
  - same request, same seed, same device and dtype -> the same tokens, byte for byte (tested on CPU fp32);
  - a request in a batch vs the same request alone -> the same tokens on CPU fp32 in practice (tested), but not
    guaranteed bit for bit: padding and batch shape can change the rounding of the logits in the last bits, and a
    token can then differ only where the draw falls within rounding of a boundary between two candidates (or two
    candidates are within rounding of the top-k / top-p cut-off). With bf16/fp16 on CUDA the logits move more with
    batch shape: expect occasional divergences over many long generations. After a divergence the two
    continuations differ.

The step code is split into `_prefill`, `_decode_step`, `_sample` and `_advance` around a `_Batch`, so continuous
batching (rows joining as others leave, within a token budget) can be added without touching the sampler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bot.errors import ModelNotInstalled
from model.format import CLOSE, END_OF_TEXT, OPEN

log = logging.getLogger(__name__)

CANDIDATES = 256  # top-p looks at this many best tokens first; a full sort only when they hold < top_p of the mass
STREAM_EVERY = 16  # on_text fires every this many new tokens, and whenever a <|c|> or <|ec|> tag is produced
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

OnText = Callable[[int, str], Any]


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each token; the same meaning as in transformers: temperature, then top-k, then top-p.

    temperature=0 or top_k=1 is greedy. top_k=0 means no top-k cut; top_p=1.0 means no nucleus cut.
    max_new_tokens counts every generated token, the closing <|endoftext|> included.
    """

    temperature: float = 0.9
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 400

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seed: int
    sampling: SamplingSettings = SamplingSettings()


@dataclass(frozen=True)
class GenerationResult:
    """A continuation. `text` is decoded with the format tags kept and stops before <|endoftext|>.

    finished: the model wrote <|endoftext|> (rather than running out of max_new_tokens or context).
    prompt_tokens: prompt tokens actually used (after cutting a too-long prompt from the left).
    new_tokens: tokens in `text` (<|endoftext|> not counted); token_ids: those tokens.
    """

    text: str
    prompt_tokens: int
    new_tokens: int
    finished: bool
    token_ids: tuple[int, ...] = field(default=(), repr=False)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, *, candidates: int = CANDIDATES) -> torch.Tensor:
    """Pick one token per row. Row i depends only on logits[i], uniforms[i] and its own settings.

    logits [B, V] float; uniforms [B] in [0, 1); temperature [B] float (0 = greedy); top_k [B] long (0 = off);
    top_p [B] float in (0, 1]. Returns [B] long token ids.

    No full-vocabulary sort per step: we take torch.topk of a bounded candidate set (top_k if set, else
    `candidates`). With top_k set, that set is exact (transformers renormalises over the top-k before top-p). Without
    it, the candidates' probabilities are normalised over the full vocabulary (one logsumexp, no sort); if they hold
    at least top_p of the mass, the nucleus lies inside them (a token outside has at least their mass before it), so
    the answer is exact. Only rows whose candidates hold less than top_p fall back to a full sort; rows with top_p=1
    and no top-k sample from the full softmax in vocabulary order, which needs no sort either.
    """
    logits = logits.float()
    vocab = logits.shape[1]
    device = logits.device
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    has_k = top_k > 0
    row_k = torch.where(has_k, top_k.clamp(max=vocab), torch.full_like(top_k, min(candidates, vocab)))
    n_cand = int(row_k.max())
    vals, idx = torch.topk(scaled, n_cand, dim=-1)  # sorted, best first
    in_k = torch.arange(n_cand, device=device).unsqueeze(0) < row_k.unsqueeze(1)
    vals = vals.masked_fill(~in_k, float("-inf"))
    norm = torch.where(has_k, torch.logsumexp(vals, dim=-1), torch.logsumexp(scaled, dim=-1))
    probs = torch.exp(vals - norm.unsqueeze(1))
    tokens = _pick(probs, idx, uniforms, top_p)

    # Rows without top-k whose candidates do not hold the nucleus (one host sync; rare with a trained model).
    whole = ~has_k & (top_p >= 1.0)
    short = ~has_k & ~whole & (probs.sum(-1) < top_p)
    if bool((whole | short).any()):
        rows = torch.nonzero(whole).flatten()
        if len(rows):  # the full distribution: inverse CDF in vocabulary order, no sort needed
            full = torch.softmax(scaled[rows], dim=-1)
            tokens[rows] = _inverse_cdf(full, uniforms[rows], torch.full_like(rows, vocab))
        rows = torch.nonzero(short).flatten()
        if len(rows):  # the full sort fallback
            row_vals, row_idx = torch.sort(scaled[rows], dim=-1, descending=True)
            row_probs = torch.exp(row_vals - norm[rows].unsqueeze(1))
            tokens[rows] = _pick(row_probs, row_idx, uniforms[rows], top_p[rows])

    return torch.where(greedy, logits.argmax(dim=-1), tokens)


def _pick(probs: torch.Tensor, idx: torch.Tensor, uniforms: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sample from sorted candidates (best first), keeping the nucleus: token j stays if the mass before it < top_p.

    This is transformers' TopPLogitsWarper rule (ascending cumsum <= 1 - top_p is dropped), written descending.
    """
    before = torch.cumsum(probs, dim=-1) - probs
    keep = (before < top_p.unsqueeze(1)) & (probs > 0)
    keep[:, 0] = True  # the best token is always kept
    n_keep = keep.sum(-1)
    pos = _inverse_cdf(probs * keep, uniforms, n_keep)
    return idx.gather(1, pos.unsqueeze(1)).squeeze(1)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """Index j of the first cumulative weight > u * total, per row; never past the row's last valid entry."""
    cdf = torch.cumsum(weights, dim=-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    pos = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return torch.minimum(pos, n_valid - 1)


@dataclass
class _Row:
    """One request's state while it is in a batch."""

    index: int  # position in the caller's request list
    prompt_ids: list[int]
    limit: int  # max new tokens, already capped by the context
    generator: torch.Generator
    sampling: SamplingSettings
    new_ids: list[int] = field(default_factory=list)
    finished: bool = False
    streamed: int = -1  # len(new_ids) at the last on_text call (-1: never called)


@dataclass
class _Batch:
    """The running rows and their device state. rows[i] is row i of every tensor."""

    rows: list[_Row]
    cache: Any  # a transformers Cache
    mask: torch.Tensor  # [B, L] attention mask over the cache plus the next token
    next_pos: torch.Tensor  # [B] position id of each row's next input token
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor


class Engine:
    """Loads a Hugging Face GPT-2 checkpoint directory once and generates on its own thread.

    `await start()` before use and `await close()` after. `device` defaults to CUDA when available (bf16, or fp16
    where bf16 is unsupported), else CPU fp32. `threads` sets torch's intra-op threads (a process-wide setting).
    Concurrent `generate` calls run one after the other.
    """

    def __init__(self, model_path: str | Path, *, device: str | None = None, dtype: torch.dtype | str | None = None,
                 threads: int | None = None) -> None:
        self.model_path = Path(model_path)
        self._device_arg = device
        self._dtype_arg = dtype
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._info: dict[str, Any] | None = None

    # ----- lifecycle (event loop side) -----

    async def start(self) -> None:
        """Load the checkpoint on the engine thread. Raises ModelNotInstalled if there is none at model_path."""
        if self._info is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hnaas-engine")
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        log.info("engine ready: %s", self._info)

    async def close(self) -> None:
        """Wait for running work, free the model and stop the thread."""
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        await asyncio.get_running_loop().run_in_executor(executor, self._unload)
        executor.shutdown(wait=False)  # its queue is empty: the thread exits at once

    @property
    def info(self) -> dict[str, Any]:
        """path, parameters, device, dtype, vocab_size, context_length (of a started engine)."""
        if self._info is None:
            raise RuntimeError("engine not started")
        return dict(self._info)

    async def generate(self, requests: Sequence[GenerationRequest],
                       on_text: OnText | None = None) -> list[GenerationResult]:
        """Generate a continuation for each request, as one batch; results are in request order.

        on_text(index, text_so_far), if given, is called on the event loop as text grows (every STREAM_EVERY tokens,
        at each format tag, and at the end of each row unless its text did not change since the last call). It runs
        after the step that produced the text, must be cheap and must not raise.
        """
        if self._executor is None or self._info is None:
            raise RuntimeError("engine not started")
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        emit = None
        if on_text is not None:
            def emit(index: int, text: str) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is listening
                    loop.call_soon_threadsafe(on_text, index, text)
        cancel = threading.Event()
        try:
            return await loop.run_in_executor(self._executor, self._generate, list(requests), emit, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops at its next step instead of finishing the batch for nobody
            raise

    # ----- engine thread -----

    def _load(self) -> None:
        path = self.model_path
        if not (path / "config.json").is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
            raise ModelNotInstalled(
                "The model is not installed yet, so no discussion can be generated.",
                f"no GPT-2 checkpoint at {path} (expected config.json and model.safetensors); "
                "install one or set the model path",
            )
        # transformers is slow to import: do it here, on the engine thread, not when the bot imports this module
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._threads:
            torch.set_num_threads(self._threads)
        device = torch.device(self._device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = self._resolve_dtype(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelNotInstalled(
                "The model is installed incorrectly, so no discussion can be generated.",
                f"could not load the checkpoint at {path}: {e}",
            ) from e
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TEXT, OPEN, CLOSE)}
        for token, token_id in ids.items():
            if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.encode(
                    token, add_special_tokens=False) != [token_id]:
                raise ModelNotInstalled(
                    "The model is installed incorrectly, so no discussion can be generated.",
                    f"the tokenizer at {path} does not know the special token {token!r}",
                )
        model.to(device).eval()
        self._model, self._tokenizer = model, tokenizer
        self._device = device
        self._eos = ids[END_OF_TEXT]
        self._tags = {ids[OPEN], ids[CLOSE]}
        self._vocab = min(len(tokenizer), model.config.vocab_size)  # ignore padded embedding rows
        self._context = model.config.max_position_embeddings
        self._info = {
            "path": str(path),
            "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "vocab_size": self._vocab,
            "context_length": self._context,
        }

    def _resolve_dtype(self, device: torch.device) -> torch.dtype:
        dtype = self._dtype_arg
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
            return _DTYPES[dtype]
        if dtype is not None:
            return dtype
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    def _unload(self) -> None:
        self._model = self._tokenizer = self._info = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, requests: list[GenerationRequest], emit: Callable[[int, str], None] | None,
                  cancel: threading.Event) -> list[GenerationResult]:
        with torch.inference_mode():
            rows = [self._make_row(i, r) for i, r in enumerate(requests)]
            batch, logits = self._prefill(rows)
            while batch.rows and not cancel.is_set():
                tokens = self._sample(batch, logits)
                last = self._advance(batch, tokens, emit)
                if not batch.rows:
                    break
                logits = self._decode_step(batch, last)
        return [self._result(row) for row in rows]

    def _make_row(self, index: int, request: GenerationRequest) -> _Row:
        ids = self._tokenizer.encode(request.prompt, add_special_tokens=False, verbose=False) or [self._eos]
        # Keep the end of a too-long prompt, leaving room for up to half the context (or max_new_tokens) to generate.
        room = min(request.sampling.max_new_tokens, self._context // 2)
        ids = ids[-(self._context - room):]
        generator = torch.Generator(device="cpu")  # CPU draws: the same numbers whatever the model's device
        generator.manual_seed(request.seed & 0xFFFF_FFFF_FFFF_FFFF)
        limit = min(request.sampling.max_new_tokens, self._context - len(ids))
        return _Row(index, ids, limit, generator, request.sampling)

    def _prefill(self, rows: list[_Row]) -> tuple[_Batch, torch.Tensor]:
        """Run the left-padded prompts through the model; return the batch and each row's next-token logits."""
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self._eos, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.prompt_ids)
            ids[i, width - n:] = torch.tensor(row.prompt_ids)
            mask[i, width - n:] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from 0 at its first real token
        cache = DynamicCache(config=self._model.config)
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
        batch = _Batch(
            rows=list(rows), cache=out.past_key_values, mask=mask, next_pos=mask.sum(-1),
            temperature=torch.tensor([r.sampling.temperature for r in rows], device=self._device),
            top_k=torch.tensor([r.sampling.top_k for r in rows], device=self._device),
            top_p=torch.tensor([r.sampling.top_p for r in rows], device=self._device),
        )
        return batch, out.logits[:, -1, : self._vocab]

    def _decode_step(self, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each running row its last token; return the next-token logits [B, V]."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        out = self._model(input_ids=tokens.unsqueeze(1), attention_mask=batch.mask,
                          position_ids=batch.next_pos.unsqueeze(1), past_key_values=batch.cache, use_cache=True)
        batch.cache = out.past_key_values
        batch.next_pos = batch.next_pos + 1
        return out.logits[:, -1, : self._vocab]

    def _sample(self, batch: _Batch, logits: torch.Tensor) -> torch.Tensor:
        """One token per running row, each from its own generator (one uniform per row per step)."""
        uniforms = torch.cat([torch.rand(1, generator=r.generator, dtype=torch.float64) for r in batch.rows])
        return sample_tokens(logits, uniforms.to(self._device), batch.temperature, batch.top_k, batch.top_p)

    def _advance(self, batch: _Batch, tokens: torch.Tensor, emit: Callable[[int, str], None] | None) -> torch.Tensor:
        """Append the sampled tokens, drop rows that are done, and return the tokens of the rows that go on."""
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)):
            if token == self._eos:
                row.finished = True
            else:
                row.new_ids.append(token)
            done = row.finished or len(row.new_ids) >= row.limit
            if emit is not None and len(row.new_ids) > row.streamed and (
                    done or token in self._tags or len(row.new_ids) - row.streamed >= STREAM_EVERY):
                row.streamed = len(row.new_ids)
                emit(row.index, self._decode(row.new_ids).rstrip("\ufffd"))  # hide a half-written character
            if not done:
                keep.append(i)
        if len(keep) < len(batch.rows):
            self._select(batch, keep)
            tokens = tokens[keep] if keep else tokens[:0]
        return tokens

    def _select(self, batch: _Batch, keep: list[int]) -> None:
        """Keep only the given rows (a future continuous batcher will also add rows here)."""
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self._device)
        batch.cache.batch_select_indices(index)
        batch.mask = batch.mask[index]
        batch.next_pos = batch.next_pos[index]
        batch.temperature = batch.temperature[index]
        batch.top_k = batch.top_k[index]
        batch.top_p = batch.top_p[index]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _result(self, row: _Row) -> GenerationResult:
        return GenerationResult(
            text=self._decode(row.new_ids), prompt_tokens=len(row.prompt_ids), new_tokens=len(row.new_ids),
            finished=row.finished, token_ids=tuple(row.new_ids),
        )
