"""The inference engine: one GPT-2 checkpoint, loaded once, owned by one thread, driven from asyncio.

All torch work (loading, tokenizing, forward passes, sampling) runs on the engine's single worker thread; the event
loop only awaits futures, so it never blocks on the model. Results and streamed text cross back with
`call_soon_threadsafe`.

Continuous batching (TGI/vLLM style: schedule → execute → update). `submit(request)` puts one request in a queue and
returns a future; the engine thread runs a loop that, every step,
  1. admits waiting requests (first come, first served) while a slot is free (`max_batch`) and the sum of prompt +
     max_new_tokens of the running requests stays within `token_budget` (a request that alone exceeds the budget
     still runs when nothing else does),
  2. prefills the newcomers on their own (at most `prefill_tokens` prompt tokens per step, so a joining request
     stalls the running ones for one short forward pass), then samples their first token,
  3. runs one decode step for every running row, samples, and streams; rows that finish leave at once and their
     slot is free for the next step. `generate(batch)` is `submit` for each request plus a gather.

The forward pass is `CachedGPT2`: our own GPT-2 over the checkpoint's weights (matrices re-laid out once at load)
with a static KV cache of shape [layers, slots, heads, positions, head_dim] written in place. Row i of
the running batch lives in slot i; a row that leaves is replaced by the last row (its cache entries are moved), so
the running rows are always slots 0..n-1 and each step computes exactly n rows: no padding, no per-step growth,
no vocabulary projection for prompt positions. The cache is allocated once and grows (rarely, in 128-position steps)
only when an admitted request needs more positions than any before it.

Sampling (`sample_tokens`) means what it means in transformers (temperature, then top-k, then top-p) and never
sorts the vocabulary: top-k takes `torch.topk`; top-p draws from the whole softmax by inverse CDF and keeps the draw
if it lies inside the nucleus (rejection: exact, and a draw lands outside with probability < 1 - top_p); a row
rejected three times finds the nucleus's cut-off with a 4096-bin histogram of the logits (one scatter-add) and a
sort of the one bin that holds the cut, then draws by inverse CDF over the kept tokens in vocabulary order.

Reproducibility. Each request carries a seed; its row draws DRAWS uniform numbers per step from its own
`torch.Generator` and picks the token from its own filtered distribution with them. So a request's tokens are a
function of (model, prompt, sampling settings, seed) alone and not of the other requests in the batch:
  - same request, same seed, same device, dtype and kernels -> the same tokens, byte for byte (tested on CPU fp32;
    the kernels follow the CPU's vendor and whether the row kernel is built, see `_Linear`);
  - a request in a batch vs the same request alone -> the same tokens on CPU fp32 in practice (tested), but not
    guaranteed bit for bit: the batch's size changes the shapes of the matrix products and so the rounding of the
    logits in the last bits, and a token can then differ only where the draw falls within rounding of a boundary
    between two candidates (or a candidate is within rounding of the top-k / top-p cut-off). With bf16/fp16 on CUDA
    the logits move more with batch shape: expect occasional divergences over many long generations. After a
    divergence the two continuations differ.

GPU (not run in this repository's tests: no GPU was available when this was written). The same code runs on CUDA in
bf16 (fp16 where bf16 is unsupported); the static cache is what CUDA graphs need, but the step is not captured or
compiled: `n` (running rows) and the attention length change every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bot.errors import ModelNotInstalled
from model import rowkernel
from model.format import CLOSE, END_OF_TEXT, OPEN, NextTags, without_header

log = logging.getLogger(__name__)

CANDIDATES = 256  # top-p: the bin holding the cut is resolved by topk if it has at most this many tokens, else sorted
BINS = 4096  # top-p: histogram bins between the row's smallest logit (or max - SPAN) and its largest
SPAN = 30.0  # top-p: logits more than this below the row's max share the lowest bin (e^-30: far below any top_p)
DRAWS = 4  # uniforms per row and step: up to 3 top-p draws by rejection, then one for the exact histogram path
STREAM_EVERY = 16  # on_text fires every this many new tokens, and whenever a <|c|> or <|ec|> tag is produced
CACHE_STEP = 128  # the KV cache grows in steps of this many positions
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
INT8 = ("int8", "qint8")  # dtype names for int8 matrices (CPU): activations and the KV cache stay fp32

OnText = Callable[[int, str], Any]


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each token; the same meaning as in transformers: temperature, then top-k, then top-p.

    temperature=0 or top_k=1 is greedy. top_k=0 means no top-k cut; top_p=1.0 means no nucleus cut.
    max_new_tokens counts every generated token, the closing <|endoftext|> included.
    ignore_eos: never produce <|endoftext|> (its logit is -inf, like transformers' min_new_tokens), so the row runs
    to max_new_tokens; for benchmarks.
    constrain_tags: sample only what keeps the thread a valid tree (`model.format.NextTags`: no stray <|ec|>, no
    text between blocks, no end inside a comment, at most 10 replies per item, no empty comment). The model's
    probabilities are renormalised over what is allowed; off, the sampler is transformers' exactly.
    guidance_scale: classifier-free guidance towards the title (Sanchez et al. 2023, "Stay on topic with
    classifier-free guidance"; transformers' `guidance_scale`): the request also runs, in a second slot, the same
    story without its title and URL (`model.format.without_header`), and each step samples from
    log p(x | title) + (scale - 1) * (log p(x | title) - log p(x | no title)). 1.0 is off; above 1 the text keeps
    closer to the title, at twice the compute.
    """

    temperature: float = 0.9
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 400
    ignore_eos: bool = False
    constrain_tags: bool = True
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")


@dataclass(frozen=True)
class GenerationRequest:
    """prompt: the text to continue. written: text the model already wrote for this request (a job resumed after a
    crash, whose first comments are already posted): the engine continues after prompt + written, counts written's
    tokens against max_new_tokens, and streams and returns written as the start of the text, so the result reads as
    one uninterrupted generation."""

    prompt: str
    seed: int
    sampling: SamplingSettings = SamplingSettings()
    written: str = ""


@dataclass(frozen=True)
class GenerationResult:
    """A continuation. `text` is decoded with the format tags kept and stops before <|endoftext|>.

    finished: the model wrote <|endoftext|> (rather than running out of max_new_tokens or context).
    prompt_tokens: prompt tokens actually used (after cutting a too-long prompt from the left; a resumed request's
    `written` counts as prompt).
    new_tokens: tokens this run generated (<|endoftext|> not counted); token_ids: those tokens. `text` starts with
    the request's `written`, then these tokens.
    """

    text: str
    prompt_tokens: int
    new_tokens: int
    finished: bool
    token_ids: tuple[int, ...] = field(default=(), repr=False)


# ----- sampling -------------------------------------------------------------------------------------------------

def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, *, candidates: int = CANDIDATES,
                  kernels: rowkernel.Kernels | None = None) -> torch.Tensor:
    """Pick one token per row. Row i depends only on logits[i], uniforms[i] and its own settings.

    logits [B, V] float; uniforms [B] or [B, R] in [0, 1) (R > 1: top-p may draw by rejection, below);
    temperature [B] float (0 = greedy); top_k [B] long (0 = off); top_p [B] float in (0, 1]. Returns [B] long ids.

    Rows are grouped by what they need, and no group sorts the vocabulary:
      - greedy: argmax;
      - top-k (then top-p inside it, as transformers renormalises over the top-k): torch.topk(k), exact;
      - top-p without top-k: with R > 1 uniforms, `_sample_nucleus_by_rejection`, and for the rows it leaves (rare)
        or with one uniform, `_sample_nucleus` (histogram + one small topk); both exact;
      - neither: the full softmax, drawn in vocabulary order.
    With `kernels` (the compiled row kernel), up to `rowkernel.BLOCK_ROWS` CPU rows of top-p or plain temperature
    sampling run in C (`rowkernel.sample`: the same arithmetic, so the same tokens but where a uniform falls within a
    rounding error of a boundary), and only the rows it leaves come here.
    """
    logits = logits.float()
    if uniforms.dim() == 1:
        uniforms = uniforms.unsqueeze(1)
    if kernels is not None and logits.device.type == "cpu" and len(logits) <= rowkernel.BLOCK_ROWS:
        tokens, left = rowkernel.sample(kernels, logits, uniforms, temperature, top_k, top_p)
        if left:
            rows = torch.nonzero(tokens < 0).flatten()
            tokens[rows] = sample_tokens(logits[rows], uniforms[rows], temperature[rows], top_k[rows], top_p[rows],
                                         candidates=candidates)
        return tokens
    device = logits.device
    greedy = temperature <= 0
    scaled = logits * (1 / torch.where(greedy, torch.ones_like(temperature), temperature)).unsqueeze(1)
    has_k = (top_k > 0) & ~greedy
    kind = (has_k.long() + 2 * (~has_k & ~greedy & (top_p < 1)).long() + 3 * (~has_k & ~greedy & (top_p >= 1)).long())
    groups: dict[int, list[int]] = {}
    for row, k in enumerate(kind.tolist()):  # one host sync
        groups.setdefault(k, []).append(row)
    tokens = logits.argmax(dim=-1) if 0 in groups else torch.empty(len(kind), dtype=torch.long, device=device)
    for k, rows in groups.items():
        if k == 0:
            continue
        index: slice | torch.Tensor = slice(None) if len(rows) == len(kind) else torch.tensor(rows, device=device)
        x, u = scaled[index], uniforms[index]
        if k == 1:
            tokens[index] = _sample_top_k(x, u[:, 0], top_k[index], top_p[index])
        elif k == 2 and u.shape[1] > 1:
            tokens[index] = _sample_nucleus_by_rejection(x, u, top_p[index], candidates=candidates)
        elif k == 2:
            tokens[index] = _sample_nucleus(x, u[:, 0], top_p[index], candidates=candidates)
        else:
            tokens[index] = _inverse_cdf(torch.softmax(x, dim=-1), u[:, 0])
    return tokens


def _sample_top_k(x: torch.Tensor, uniforms: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    row_k = top_k.clamp(max=x.shape[1])
    vals, idx = torch.topk(x, int(row_k.max()), dim=-1)  # sorted, best first
    in_k = torch.arange(vals.shape[1], device=x.device).unsqueeze(0) < row_k.unsqueeze(1)
    probs = torch.softmax(vals.masked_fill(~in_k, float("-inf")), dim=-1)
    return _pick(probs, idx, uniforms, top_p)


def _pick(probs: torch.Tensor, idx: torch.Tensor, uniforms: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sample from sorted candidates (best first), keeping the nucleus: token j stays if the mass before it < top_p.

    This is transformers' TopPLogitsWarper rule (ascending cumsum <= 1 - top_p is dropped), written descending.
    """
    before = torch.cumsum(probs, dim=-1) - probs
    keep = (before < top_p.unsqueeze(1)) & (probs > 0)
    keep[:, 0] = True  # the best token is always kept
    pos = _inverse_cdf(probs * keep, uniforms, keep.sum(-1))
    return idx.gather(1, pos.unsqueeze(1)).squeeze(1)


def _sample_nucleus(x: torch.Tensor, uniforms: torch.Tensor, top_p: torch.Tensor, *,
                    candidates: int = CANDIDATES) -> torch.Tensor:
    """Top-p over the whole vocabulary without sorting it (transformers' rule: keep a token if the mass of the
    tokens above it is < top_p).

    The kept tokens are those with a logit >= the cut-off, the logit of the last kept token in descending order. A
    histogram of the logits (BINS bins, weighted by probability: one scatter-add) says which bin holds the cut-off
    and the mass above that bin; sorting that bin's tokens alone (a few dozen, typically) finds the exact cut-off
    inside it. Rows whose bin holds more than `candidates` tokens (near-ties by the thousand), or is the catch-all
    lowest bin, sort the whole row instead. The draw is an inverse CDF over the kept tokens in vocabulary order.
    Tokens tied with the cut-off are all kept (transformers keeps those of them its sort happens to put first).
    Masks over the vocabulary are float 0/1 tensors: on CPU, bool masks mixed with floats take a slow path.
    """
    rows, vocab = x.shape
    device = x.device
    hi = x.amax(-1, keepdim=True)
    # the smallest finite logit: masked tokens (-inf, e.g. <|endoftext|> under ignore_eos) must not widen the bins
    lo = torch.maximum(torch.nan_to_num(x, neginf=torch.inf).amin(-1, keepdim=True), hi - SPAN)
    per_bin = ((BINS - 1) / (hi - lo)).clamp(max=1e30)  # hi == lo (all equal): everything in bin 0
    e = (x - hi).exp_()  # probabilities up to one normalising factor
    bins = (x - lo).mul_(per_bin).clamp_(0, BINS - 1).trunc_()  # bin numbers, as floats
    hist = torch.zeros(rows, BINS, device=device, dtype=e.dtype).scatter_add_(1, bins.long(), e)
    above = hist.flip(-1).cumsum(-1).flip(-1) - hist  # mass of the bins above each bin
    target = top_p.to(e.dtype).unsqueeze(1) * hist.sum(-1, keepdim=True)
    boundary = BINS - (above < target).sum(-1, keepdim=True)  # the lowest bin that still holds a kept token
    in_bin = torch.eq(bins, boundary.to(bins.dtype), out=bins)  # 1.0 in the boundary bin, else 0.0

    counts = in_bin.sum(-1).long()
    crowded = torch.nonzero((counts > candidates) | (boundary.squeeze(1) == 0)).flatten().tolist()
    if crowded:  # leave these rows out of the matrix below (rare: ties by the thousand at the cut-off)
        in_bin[crowded] = 0.0
        counts[crowded] = 0
    # The boundary bin's tokens of every row, best first, in a [rows, n] matrix (-inf pads).
    r, c = torch.nonzero(in_bin, as_tuple=True)  # grouped by row
    j = torch.arange(len(r), device=device) - (torch.cumsum(counts, 0) - counts)[r]  # place within its row
    vals = torch.full((rows, max(int(counts.max()), 1)), float("-inf"), device=device, dtype=x.dtype)
    vals = vals.index_put_((r, j), x[r, c]).sort(dim=-1, descending=True).values
    cut = _cut(vals, hi, above.gather(1, boundary), target)
    if crowded:  # a sort of the whole row
        vals = torch.sort(x[crowded], dim=-1, descending=True).values
        cut[crowded] = _cut(vals, hi[crowded], torch.zeros_like(hi[crowded]), target[crowded])
    return _inverse_cdf(torch.ge(x, cut, out=in_bin).mul_(e), uniforms)


def _cut(vals: torch.Tensor, hi: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The logit of the last kept token: vals holds candidates best first (-inf: none), start the mass above them
    and target top_p times the total (both in units of exp(logit - hi))."""
    p = torch.exp(vals - hi)
    before = start + torch.cumsum(p, dim=-1) - p
    n_keep = ((before < target) & (p > 0)).sum(-1, keepdim=True).clamp(min=1)
    return vals.gather(1, n_keep - 1)


def _sample_nucleus_by_rejection(x: torch.Tensor, uniforms: torch.Tensor, top_p: torch.Tensor, *,
                                 candidates: int = CANDIDATES) -> torch.Tensor:
    """Top-p by rejection: draw from the whole softmax (inverse CDF in vocabulary order, uniforms[:, r]) and keep the
    draw if it is in the nucleus, i.e. the mass of the tokens above it is < top_p (transformers' rule; tokens tied
    with the cut-off are all kept, as in `_sample_nucleus`). A kept draw is distributed exactly as the renormalised
    nucleus. A draw lands outside with probability < 1 - top_p, so after R - 1 tries almost every row has its token;
    the rest go to `_sample_nucleus` with the last uniform. About 8 passes over the logits against ~17 and a
    scatter for the histogram (half the sampler's time at 32 rows x 50k tokens on this project's CPU)."""
    rows = x.shape[0]
    e = (x - x.amax(-1, keepdim=True)).exp_()  # probabilities up to one normalising factor
    cdf = torch.cumsum(e, dim=-1)
    target = top_p.to(e.dtype) * cdf[:, -1]
    tokens = torch.empty(rows, dtype=torch.long, device=x.device)
    pending = torch.arange(rows, device=x.device)
    for r in range(uniforms.shape[1] - 1):
        everyone = len(pending) == rows  # the first round: no row copies
        px, pe, pcdf = (x, e, cdf) if everyone else (x[pending], e[pending], cdf[pending])
        drawn = _draw(pcdf, uniforms[pending, r])
        cut = px.gather(1, drawn.unsqueeze(1))
        # a float 0/1 mask: torch.where or a bool mask times floats is 5x slower on CPU
        above = torch.gt(px, cut, out=torch.empty_like(px)).mul_(pe).sum(-1)
        kept = above < target[pending]
        tokens[pending[kept]] = drawn[kept]
        pending = pending[~kept]
        if not len(pending):
            return tokens
    tokens[pending] = _sample_nucleus(x[pending], uniforms[pending, -1], top_p[pending], candidates=candidates)
    return tokens


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Index j of the first cumulative weight > u * total, per row (so never a zero-weight entry); with n_valid,
    never past the row's last valid entry."""
    pos = _draw(torch.cumsum(weights, dim=-1), uniforms)
    return torch.minimum(pos, (n_valid if n_valid is not None else torch.full_like(pos, weights.shape[1])) - 1)


def _draw(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index j of the first cdf entry > u * total (the last entry), per row."""
    u = uniforms.to(cdf.dtype).clamp(max=1 - torch.finfo(cdf.dtype).eps / 2)  # u * total < total, even rounded
    pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return pos.clamp_(max=cdf.shape[1] - 1)


# ----- the forward pass -----------------------------------------------------------------------------------------

class CachedGPT2:
    """GPT-2's forward pass over a transformers GPT2LMHeadModel's weights, with a static per-slot KV cache.

    The cache is `k`, `v` of shape [layers, slots, heads, capacity, head_dim]. A sequence lives in one slot with
    its token at position p stored at index p (no padding inside a slot). `decode` runs rows 0..n-1 = slots 0..n-1.
    Weight matrices are held by `_Linear` in the layout that suits the device (packed for oneDNN on CPU); the
    embeddings, layer norms and biases are the model's own tensors; the model object itself is not kept. Only the
    first `vocab` output rows are computed (a checkpoint's padding rows are never produced).
    """

    def __init__(self, model: Any, slots: int, vocab: int | None = None, *, release: bool = False,
                 int8: bool = False) -> None:
        """release: empty the model's matrices once they are repacked (the model is unusable afterwards), so loading
        needs one extra copy of one matrix at a time, not of the whole model. int8: int8 matrices (an fp32 model on
        CPU; see `_int8_linear`)."""
        config = model.config
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported")
        body = model.transformer
        self.n_layer, self.n_head, self.d = config.n_layer, config.n_head, config.n_embd
        self.head_dim = self.d // self.n_head
        self.eps = config.layer_norm_epsilon
        self.context = config.n_positions
        self.slots = slots
        self.vocab = vocab or config.vocab_size
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        self.scales = [scale / (i + 1) if config.scale_attn_by_inverse_layer_idx else scale
                       for i in range(self.n_layer)]
        # GPT-2's own activation is the tanh GELU, which the matrix kernels can apply as they write their output
        self.tanh_gelu = config.activation_function in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
        if not self.tanh_gelu:
            from transformers.activations import ACT2FN
            self.act: Callable[[torch.Tensor], torch.Tensor] = ACT2FN[config.activation_function]
        out = model.lm_head.weight.detach()
        cpu = out.device.type == "cpu"
        if int8 and not (cpu and out.dtype == torch.float32 and int8_available()):
            raise ValueError("int8 matrices need an fp32 model on a CPU whose torch has torch._int_mm")
        pack = (_packing_rows(slots, out.dtype) if cpu and out.dtype in (torch.float32, torch.bfloat16) and not int8
                else None)
        single_row = cpu and out.dtype == torch.float32 and not int8

        def linear(conv: Any) -> _Linear:
            # GPT-2's Conv1D stores its weight [in, out]; _Linear takes [out, in] (a view is enough).
            matrix = _Linear(conv.weight.detach().t(), conv.bias.detach(), pack=pack, single_row=single_row,
                             int8=int8)
            if release and not matrix.keeps(conv.weight):
                conv.weight.data = torch.empty(0, device=conv.weight.device, dtype=conv.weight.dtype)
            return matrix

        self.layers = [
            (b.ln_1.weight.detach(), b.ln_1.bias.detach(), linear(b.attn.c_attn), linear(b.attn.c_proj),
             b.ln_2.weight.detach(), b.ln_2.bias.detach(), linear(b.mlp.c_fc), linear(b.mlp.c_proj))
            for b in body.h
        ]
        # Few rows (a request alone, with its guidance row): one compiled call per block instead of ~15 torch ops,
        # where the row kernel holds every matrix (see model/rowkernel.py).
        kernels = self.layers[0][2].row_kernel if self.layers else None
        self.blocks = None
        if kernels is not None and self.tanh_gelu and all(
                b[j].few_rows is not None and b[j].bias is not None for b in self.layers for j in (2, 3, 6, 7)):
            self.blocks = rowkernel.DecodeBlocks(
                kernels, [(b[0], b[1], b[2].few_rows, b[2].bias, b[3].few_rows, b[3].bias, b[4], b[5], b[6].few_rows,
                           b[6].bias, b[7].few_rows, b[7].bias) for b in self.layers], self.n_head, self.eps,
                self.scales)
        # More rows (or no blocks): oneDNN's matrices around the same library's attention, where it builds.
        self.attention = None
        if cpu and out.dtype == torch.float32 and (kernels := rowkernel.load()) is not None:
            self.attention = rowkernel.DecodeAttention(kernels, self.n_head, self.d, self.scales)
        self.wpe = body.wpe.weight.detach()
        self.wte = body.wte.weight.detach()
        self.ln_f = (body.ln_f.weight.detach(), body.ln_f.bias.detach())
        # Only the first `vocab` rows: [vocab, d], a view of the embedding itself when tied (GPT-2's default), which
        # the embedding lookup needs anyway: never released.
        self.head = _Linear(out[: self.vocab], None, pack=pack, single_row=single_row, int8=int8)
        self.device, self.dtype = out.device, out.dtype
        self.capacity = 0
        self.k = self.v = self._empty_cache(0)

    def _empty_cache(self, capacity: int) -> torch.Tensor:
        # zeros, not empty: positions past a row's length are read (and masked); they must hold finite numbers
        return torch.zeros(self.n_layer, self.slots, self.n_head, capacity, self.head_dim, device=self.device,
                           dtype=self.dtype)

    @torch.inference_mode()
    def reserve(self, positions: int) -> None:
        """Make room for `positions` positions per slot (growing, rarely, in CACHE_STEP steps; never shrinking)."""
        if positions <= self.capacity:
            return
        if positions > self.context:
            raise ValueError(f"{positions} positions exceed the model's context of {self.context}")
        capacity = min(self.context, -(-positions // CACHE_STEP) * CACHE_STEP)
        k, v = self._empty_cache(capacity), self._empty_cache(capacity)
        k[..., : self.capacity, :] = self.k
        v[..., : self.capacity, :] = self.v
        self.k, self.v, self.capacity = k, v, capacity

    def cache_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _mlp(self, x: torch.Tensor, layer: tuple[Any, ...]) -> torch.Tensor:
        h = F.layer_norm(x, (self.d,), layer[4], layer[5], self.eps)
        h = layer[6](h, gelu=True) if self.tanh_gelu else self.act(layer[6](h))
        return layer[7](h, add=x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.layer_norm(x, (self.d,), *self.ln_f, self.eps))

    @torch.inference_mode()
    def prefill(self, first: int, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run prompts (one per slot, slots first, first+1, ...) from position 0; return next-token logits [m, V].

        The prompts are right-padded to the longest: with a causal mask a real token never sees the padding, and
        the padding's cache entries lie past the row's length, where decode masks them until it overwrites them.
        """
        m, width = len(prompts), max(len(p) for p in prompts)
        if first + m > self.slots:
            raise ValueError(f"slots {first}..{first + m - 1} do not exist (there are {self.slots})")
        self.reserve(width)
        ids = torch.zeros(m, width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        ids = ids.to(self.device)
        x = (F.embedding(ids, self.wte) + self.wpe[:width]).view(m * width, self.d)
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, (self.d,), layer[0], layer[1], self.eps)
            qkv = layer[2](h).view(m, width, 3, self.n_head, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [m, heads, width, head_dim] each
            self.k[i, first: first + m, :, :width] = k
            self.v[i, first: first + m, :, :width] = v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scales[i])
            x = layer[3](a.transpose(1, 2).reshape(m * width, self.d), add=x)
            x = self._mlp(x, layer)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self._logits(x.view(m, width, self.d)[torch.arange(m, device=self.device), last])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int | None = None,
               ragged: bool = True) -> torch.Tensor:
        """Feed row i (slot i) its token at its position; return the next-token logits [n, V].

        `length` (max position + 1, if the caller knows it without a device sync) bounds the attention; ragged=False
        says every row is at position length - 1 (nothing to mask). Up to `rowkernel.BLOCK_ROWS` rows go through the
        compiled blocks where they are built, and more rows through the compiled attention; both attend by each
        row's position, so they need neither.
        """
        n = tokens.shape[0]
        x = F.embedding(tokens, self.wte) + self.wpe[positions]
        if self.blocks is not None and n <= rowkernel.BLOCK_ROWS:
            self.blocks(x, self.k, self.v, positions)
            return self._logits(x)
        if self.attention is not None:
            attend = self.attention.step(self.k, self.v, positions)
            for i, layer in enumerate(self.layers):
                a = attend(i, layer[2](F.layer_norm(x, (self.d,), layer[0], layer[1], self.eps)).contiguous())
                x = self._mlp(layer[3](a, add=x), layer)
            return self._logits(x)
        if length is None:
            length = int(positions.max()) + 1
        mask = None
        if ragged:
            visible = torch.arange(length, device=self.device).unsqueeze(0) <= positions.unsqueeze(1)
            mask = torch.zeros(n, 1, 1, length, device=self.device, dtype=self.dtype).masked_fill_(
                ~visible.view(n, 1, 1, length), float("-inf"))
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, (self.d,), layer[0], layer[1], self.eps)
            q, k, v = layer[2](h).view(n, 3, self.n_head, self.head_dim).unbind(1)
            keys, values = self.k[i], self.v[i]
            if ragged:  # in place, at each row's own position
                rows = torch.arange(n, device=self.device)
                keys[rows, :, positions] = k
                values[rows, :, positions] = v
            else:  # all at length - 1: a plain slice copy, several times cheaper than indexing per row
                keys[:n, :, length - 1] = k
                values[:n, :, length - 1] = v
            a = self._attend(q.unsqueeze(2), keys[:n, :, :length], values[:n, :, :length], mask, self.scales[i])
            x = layer[3](a.reshape(n, self.d), add=x)
            x = self._mlp(x, layer)
        return self._logits(x)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        """One query per row over its cached keys. On CPU in fp32, two batched matrix products and a softmax: 10-30 %
        faster than SDPA's CPU kernel for this shape (measured: 32 rows x 200 positions, and 4 rows), the same
        numbers. In bf16/fp16 the batched products first copy the strided cache slice (23 ms of a 65 ms step at 32
        rows x 200 positions, gpt2 shape), while SDPA reads it in place: 17 ms against 37 ms for the attention."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale)
        if mask is not None:
            scores.add_(mask)
        return torch.matmul(torch.softmax(scores, dim=-1), values)

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` cache positions into slot dst."""
        if length:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]


# ----- the engine -----------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Job:
    """One submitted request, shared by the event loop (which may cancel it) and the engine thread."""

    request: GenerationRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    on_text: Callable[[str], Any] | None
    cancelled: bool = False  # set on the loop when the future is cancelled; read by the engine thread
    row: _Row | None = None  # made on the engine thread when the job is first considered for admission


@dataclass(eq=False)
class _Row:
    """One request's state while it waits or runs."""

    job: _Job
    prompt_ids: list[int]
    limit: int  # max new tokens, already capped by the context
    generator: torch.Generator
    sampling: SamplingSettings
    next_tags: NextTags | None = None  # the format's rules, when the request constrains tags
    shadow: _Row | None = None  # guidance: the row that runs the untitled story beside this one
    is_shadow: bool = False  # this row is another row's shadow: never sampled, streamed or delivered
    new_ids: list[int] = field(default_factory=list)
    finished: bool = False
    streamed: int = -1  # len(new_ids) at the last on_text call (-1: never called)

    @property
    def cost(self) -> int:
        """Cache positions the row may use: what the token budget counts."""
        return len(self.prompt_ids) + self.limit

    @property
    def written(self) -> int:
        """Cache positions written: the prompt and every new token but the last (fed at the next step)."""
        return len(self.prompt_ids) + max(len(self.new_ids) - 1, 0)


class Engine:
    """Loads a Hugging Face GPT-2 checkpoint directory once and generates on its own thread.

    `await start()` before use and `await close()` after. `device` defaults to CUDA when available (bf16, or fp16
    where bf16 is unsupported), else CPU fp32 (bf16 on request: faster on CPUs with AMX, less reproducible). `threads` sets torch's intra-op threads (a process-wide setting).
    max_batch: rows decoded together (and KV cache slots); token_budget: most prompt + max_new_tokens summed over
    the running rows; prefill_tokens: most prompt tokens prefilled between two decode steps.
    Requests from concurrent `generate`/`submit`/`stream` calls share the running batch. Parallel torch work on
    another thread of the same process slows every step down for as long as that thread lives: run it with
    `on_passing_thread`.
    """

    def __init__(self, model_path: str | Path, *, device: str | None = None, dtype: torch.dtype | str | None = None,
                 threads: int | None = None, max_batch: int = 32, token_budget: int = 16384,
                 prefill_tokens: int = 512) -> None:
        if max_batch < 1 or token_budget < 1 or prefill_tokens < 1:
            raise ValueError("max_batch, token_budget and prefill_tokens must be >= 1")
        self.model_path = Path(model_path)
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.prefill_tokens = prefill_tokens
        self._device_arg = device
        self._dtype_arg = dtype
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._model: CachedGPT2 | None = None
        self._tokenizer: Any = None
        self._sampler: rowkernel.Kernels | None = None
        self._info: dict[str, Any] | None = None
        self._closing = False
        self._in_flight = 0
        # Shared between the loop and the engine thread, under _lock:
        self._lock = threading.Lock()
        self._inbox: list[_Job] = []
        self._serving = False  # the batching loop is scheduled or running on the engine thread
        # Engine thread only:
        self._waiting: deque[_Job] = deque()
        self._rows: list[_Row] = []

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
        self._closing = False
        log.info("engine ready: %s", self._info)

    async def close(self) -> None:
        """Refuse new requests, wait for the running ones, free the model and stop the thread."""
        if self._executor is None:
            return
        self._closing = True
        executor, self._executor = self._executor, None
        # The executor runs one task at a time, in order: _unload runs once the batching loop has drained.
        await asyncio.get_running_loop().run_in_executor(executor, self._unload)
        executor.shutdown(wait=False)

    @property
    def info(self) -> dict[str, Any]:
        """path, parameters, device, dtype, vocab_size, context_length, max_batch, token_budget, row_kernel,
        attention_kernel (started engine)."""
        if self._info is None:
            raise RuntimeError("engine not started")
        return dict(self._info)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (running or waiting for a slot)."""
        return self._in_flight

    # ----- requests (event loop side) -----

    def submit(self, request: GenerationRequest,
               on_text: Callable[[str], Any] | None = None) -> asyncio.Future[GenerationResult]:
        """Queue one request; it joins the running batch as soon as a slot and the token budget allow.

        Call on the event loop. Returns a future for the result; cancelling it drops the request at the next step.
        on_text(text_so_far), if given, is called on the event loop as the text grows: every STREAM_EVERY tokens,
        at each <|c|> or <|ec|> tag (so a comment arrives as soon as the model closes it), and at the end unless the
        text did not change since the last call. It runs after the step that produced the text, must be cheap and
        must not raise.
        """
        if self._executor is None or self._info is None or self._closing:
            raise RuntimeError("engine not started")
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), loop, on_text)
        self._in_flight += 1

        def done(future: asyncio.Future) -> None:
            self._in_flight -= 1
            if future.cancelled():
                job.cancelled = True

        job.future.add_done_callback(done)
        with self._lock:
            self._inbox.append(job)
            start = not self._serving
            self._serving = True
        if start:
            self._executor.submit(self._serve)
        return job.future

    async def generate(self, requests: Sequence[GenerationRequest],
                       on_text: OnText | None = None) -> list[GenerationResult]:
        """Generate a continuation for each request; results are in request order.

        The requests join the running batch (with any other caller's); on_text(index, text_so_far) as in `submit`.
        Cancelling the call cancels its requests.
        """
        if not requests:
            if self._info is None:
                raise RuntimeError("engine not started")
            return []
        futures = [self.submit(r, None if on_text is None else _bind(on_text, i)) for i, r in enumerate(requests)]
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()  # no-op for finished ones; frees the slots of the rest on error or cancellation

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Yield the request's text in pieces as it is generated (as `submit`'s on_text would see it grow).

        The pieces join to the result's text. Closing the generator early cancels the request: at once with
        `contextlib.aclosing(engine.stream(r))`, else when the abandoned generator is collected.
        """
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        future = self.submit(request, on_text=queue.put_nowait)
        future.add_done_callback(lambda _: queue.put_nowait(None))
        sent = ""
        try:
            while (text := await queue.get()) is not None:
                if len(text) > len(sent):
                    yield text[len(sent):]
                    sent = text
            text = future.result().text
            if len(text) > len(sent):
                yield text[len(sent):]
        finally:
            future.cancel()

    # ----- engine thread: loading -----

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
        int8 = self._dtype_arg in INT8
        if int8 and (device.type != "cpu" or not int8_available()):
            raise ValueError("int8 matrices run on CPU only, with a torch that has torch._int_mm")
        dtype = torch.float32 if int8 else self._resolve_dtype(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelNotInstalled(
                "The model is installed incorrectly, so no discussion can be generated.",
                f"could not load the checkpoint at {path}: {e}",
            ) from e
        if model.config.model_type != "gpt2":
            raise ModelNotInstalled(
                "The model is installed incorrectly, so no discussion can be generated.",
                f"the checkpoint at {path} is a {model.config.model_type!r} model; the engine runs GPT-2 only",
            )
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TEXT, OPEN, CLOSE)}
        for token, token_id in ids.items():
            unknown = token_id == tokenizer.unk_token_id and token != tokenizer.unk_token  # unk may be eos itself
            if token_id is None or unknown or tokenizer.encode(token, add_special_tokens=False) != [token_id]:
                raise ModelNotInstalled(
                    "The model is installed incorrectly, so no discussion can be generated.",
                    f"the tokenizer at {path} does not know the special token {token!r}",
                )
        model.to(device).eval()
        parameters = sum(p.numel() for p in model.parameters())
        self._vocab = min(len(tokenizer), model.config.vocab_size)  # ignore padded embedding rows
        with torch.inference_mode():
            self._model = CachedGPT2(model, self.max_batch, self._vocab, release=True, int8=int8)
        del model  # only the engine's copies remain
        if device.type == "cpu":
            _keep_freed_memory()  # after loading: the model's freed memory goes back to the OS first
        self._tokenizer = tokenizer
        self._device = device
        # a few rows sample in C where the row kernel is built (CPU): ~100 small torch ops less per step
        self._sampler = rowkernel.load() if device.type == "cpu" else None
        self._eos = ids[END_OF_TEXT]
        self._tags = {ids[OPEN], ids[CLOSE]}
        self._tag_kinds = {ids[END_OF_TEXT]: END_OF_TEXT, ids[OPEN]: OPEN, ids[CLOSE]: CLOSE}
        self._tag_columns = torch.tensor([ids[END_OF_TEXT], ids[OPEN], ids[CLOSE]], device=device)
        texts = tokenizer.batch_decode([[i] for i in range(self._vocab)], clean_up_tokenization_spaces=False)
        self._blank_ids = torch.tensor([i for i, t in enumerate(texts) if not t.strip() and i not in self._tag_kinds],
                                       dtype=torch.long, device=device)
        self._context = self._model.context
        # Per-slot state of the running rows (row i = slot i), preallocated.
        slots = self.max_batch
        self._tok = torch.zeros(slots, dtype=torch.long, device=device)  # each row's next input token
        self._pos = torch.zeros(slots, dtype=torch.long, device=device)  # ... and its position
        self._temperature = torch.zeros(slots, device=device)
        self._top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self._top_p = torch.ones(slots, device=device)
        self._no_eos = torch.zeros(slots, dtype=torch.bool, device=device)
        self._info = {
            "path": str(path),
            "parameters": parameters,
            "device": str(device),
            "dtype": "int8" if int8 else str(dtype).removeprefix("torch."),
            "vocab_size": self._vocab,
            "context_length": self._context,
            "max_batch": self.max_batch,
            "token_budget": self.token_budget,
            "row_kernel": self._model.blocks is not None,  # 1-4 rows decode through model/rowkernel.py
            "attention_kernel": self._model.attention is not None,  # the other steps attend through it
            "sampling_kernel": self._sampler is not None,  # up to rowkernel.BLOCK_ROWS rows sample through it
        }

    def _resolve_dtype(self, device: torch.device) -> torch.dtype:
        dtype = self._dtype_arg
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted([*_DTYPES, *INT8])}")
            return _DTYPES[dtype]
        if dtype is not None:
            return dtype
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # fp32 on CPU even where bf16 is native (AMX: 2.5x faster matrix products): in bf16 a request's tokens
        # depend on the other rows of its batch far more often (rounding to 8 bits turns kernel-order differences
        # into different draws), so the same seed need not give the same thread.
        return torch.float32

    def _unload(self) -> None:
        self._model = self._tokenizer = self._info = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----- engine thread: the batching loop -----

    def _serve(self) -> None:
        """Admit, prefill newcomers, decode one step; until nothing is running or waiting."""
        try:
            with torch.inference_mode():
                while self._collect():
                    try:
                        self._drop_cancelled()
                        joining = self._admit()
                        if joining:
                            self._join(joining)
                        if self._rows:
                            self._step()
                    except Exception as exc:
                        log.exception("engine step failed; failing %d running and %d waiting requests",
                                      len(self._rows), len(self._waiting))
                        self._fail_all(exc)
        except BaseException as exc:  # not expected: leave no caller waiting forever
            log.exception("engine loop crashed")
            with self._lock:
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                self._serving = False
            self._fail_all(exc if isinstance(exc, Exception) else RuntimeError("engine loop stopped"))
            raise

    def _collect(self) -> bool:
        """Move newly submitted jobs to the waiting line; False (and the loop stops) when there is no work."""
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            if self._waiting or self._rows:
                return True
            self._serving = False
            return False

    def _drop_cancelled(self) -> None:
        if any(job.cancelled for job in self._waiting):
            self._waiting = deque(job for job in self._waiting if not job.cancelled)
        gone = [i for i, row in enumerate(self._rows) if row.job.cancelled]
        if gone:
            self._remove(gone, deliver=False)

    def _admit(self) -> list[_Row]:
        """Take waiting jobs, first come first served, while a slot, the token budget and this step's prefill
        allowance last (a job always runs if nothing else is running)."""
        joining: list[_Row] = []
        used = sum(row.cost for row in self._rows)
        prompt_tokens = 0
        while self._waiting and len(self._rows) + len(joining) < self.max_batch:
            job = self._waiting[0]
            if job.row is None:
                try:
                    job.row = self._make_row(job)
                except Exception as exc:
                    self._waiting.popleft()
                    _deliver(job, exc)
                    continue
            rows = [job.row] if job.row.shadow is None else [job.row, job.row.shadow]
            cost, prompt = sum(r.cost for r in rows), sum(len(r.prompt_ids) for r in rows)
            if len(self._rows) + len(joining) + len(rows) > self.max_batch:
                break
            if joining and prompt_tokens + prompt > self.prefill_tokens:
                break
            if (self._rows or joining) and used + cost > self.token_budget:
                break
            self._waiting.popleft()
            joining += rows
            used += cost
            prompt_tokens += prompt
        return joining

    def _make_row(self, job: _Job) -> _Row:
        request = job.request
        text = request.prompt + request.written  # the format's tags are special tokens: no merge across the seam
        ids = self._tokenizer.encode(text, add_special_tokens=False, verbose=False) or [self._eos]
        written = len(self._tokenizer.encode(request.written, add_special_tokens=False, verbose=False))
        new_tokens = max(request.sampling.max_new_tokens - written, 1)
        # Keep the end of a too-long prompt, leaving room for up to half the context (or max_new_tokens) to generate.
        room = min(new_tokens, self._context // 2)
        ids = ids[-(self._context - room):]
        generator = torch.Generator(device="cpu")  # CPU draws: the same numbers whatever the model's device
        generator.manual_seed(request.seed & 0xFFFF_FFFF_FFFF_FFFF)
        limit = min(new_tokens, self._context - len(ids))
        next_tags = None
        if request.sampling.constrain_tags:
            next_tags = NextTags()
            for token in ids:
                next_tags.feed(self._tag_kinds.get(token))
        row = _Row(job, ids, limit, generator, request.sampling, next_tags)
        if request.sampling.guidance_scale != 1.0 and self.max_batch >= 2:
            base = self._tokenizer.encode(without_header(text), add_special_tokens=False, verbose=False)
            row.shadow = _Row(job, (base or [self._eos])[-len(ids):], limit, generator, request.sampling,
                              is_shadow=True)
        return row

    def _join(self, rows: list[_Row]) -> None:
        """Prefill the newcomers together (right-padded, shortest first), then sample their first tokens."""
        assert self._model is not None
        rows.sort(key=lambda r: len(r.prompt_ids))
        self._model.reserve(max(row.cost for row in rows))
        first, s = len(self._rows), slice(len(self._rows), len(self._rows) + len(rows))
        logits = self._model.prefill(first, [row.prompt_ids for row in rows])
        self._rows.extend(rows)
        device = self._device
        self._pos[s] = torch.tensor([len(row.prompt_ids) for row in rows], device=device)
        self._temperature[s] = torch.tensor([row.sampling.temperature for row in rows], device=device)
        self._top_k[s] = torch.tensor([row.sampling.top_k for row in rows], device=device)
        self._top_p[s] = torch.tensor([row.sampling.top_p for row in rows], device=device)
        self._no_eos[s] = torch.tensor([row.sampling.ignore_eos for row in rows], device=device)
        self._sample_and_advance(first, logits)

    def _step(self) -> None:
        """One decode step for every running row."""
        assert self._model is not None
        n = len(self._rows)
        written = [row.written for row in self._rows]
        logits = self._model.decode(self._tok[:n], self._pos[:n], max(written) + 1, min(written) != max(written))
        self._pos[:n] += 1
        self._sample_and_advance(0, logits)

    def _sample_and_advance(self, first: int, logits: torch.Tensor) -> None:
        """Sample a token for rows first.. (whose logits these are), append it, stream, and retire finished rows."""
        rows = self._rows[first:]
        s = slice(first, first + len(rows))
        position = {id(row): i for i, row in enumerate(rows)}
        pairs = [(i, position[id(row.shadow)]) for i, row in enumerate(rows) if row.shadow is not None]
        if pairs:
            self._guide(rows, logits, pairs)
        if any(row.sampling.ignore_eos for row in rows):
            logits[:, self._eos].masked_fill_(self._no_eos[s], float("-inf"))
        if any(row.next_tags is not None for row in rows):
            self._constrain(rows, logits)
        # Shadows never draw: each takes its guided row's token.
        drawn = [i for i, row in enumerate(rows) if not row.is_shadow]
        index: slice | torch.Tensor = slice(None) if not pairs else torch.tensor(drawn, device=self._device)
        uniforms = torch.stack([torch.rand(DRAWS, generator=rows[i].generator, dtype=torch.float64) for i in drawn])
        tokens = torch.empty(len(rows), dtype=torch.long, device=self._device)
        tokens[index] = sample_tokens(logits[index], uniforms.to(self._device), self._temperature[s][index],
                                      self._top_k[s][index], self._top_p[s][index], kernels=self._sampler)
        if pairs:
            guided, shadows = (torch.tensor(side, device=self._device) for side in zip(*pairs, strict=True))
            tokens[shadows] = tokens[guided]
        self._tok[s] = tokens
        done = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if token == self._eos:
                row.finished = True
            else:
                row.new_ids.append(token)
            finished = row.finished or len(row.new_ids) >= row.limit
            if finished:
                done.append(first + i)
            if row.is_shadow:
                continue
            if row.next_tags is not None:
                row.next_tags.feed(self._tag_kinds.get(token))
            if row.job.on_text is not None and len(row.new_ids) > row.streamed and (
                    finished or token in self._tags or len(row.new_ids) - row.streamed >= STREAM_EVERY):
                row.streamed = len(row.new_ids)
                _call(row.job, row.job.on_text, self._text(row).rstrip("\ufffd"))  # hide a half character
        if done:
            self._remove(done)

    def _guide(self, rows: list[_Row], logits: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Classifier-free guidance: for each (guided row, its shadow) pair, the guided row's logits become
        log p(cond) + (scale - 1) * (log p(cond) - log p(uncond)), with the shadow's logits as the unconditional
        ones.

        Computed as uncond + scale * (cond - uncond) on the raw logits: log_softmax only subtracts a constant per
        row, and the result differs from the formula's by such a constant, which sampling (temperature, top-k,
        top-p, greedy) ignores. Half the time of the two log_softmax at the default model's 8k vocabulary."""
        cond = torch.tensor([i for i, _ in pairs], device=logits.device)
        uncond = torch.tensor([j for _, j in pairs], device=logits.device)
        scale = torch.tensor([rows[i].sampling.guidance_scale for i, _ in pairs], device=logits.device,
                             dtype=torch.float32).unsqueeze(1)
        logits[cond] = torch.lerp(logits[uncond].float(), logits[cond].float(), scale).to(logits.dtype)

    def _constrain(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Set to -inf the logits of what the format does not allow next (`NextTags`), row by row."""
        forbidden_tags: list[list[bool]] = []  # per row: <|endoftext|>, <|c|>, <|ec|>
        tags_only: list[int] = []  # rows just after <|ec|>: no text
        no_blank: list[int] = []  # rows just after <|c|>: no whitespace-only text
        for i, row in enumerate(rows):
            rules = row.next_tags
            if rules is None:
                forbidden_tags.append([False, False, False])
                continue
            allowed = [rules.allows(END_OF_TEXT) and not row.sampling.ignore_eos, rules.allows(OPEN),
                       rules.allows(CLOSE)]
            if not rules.allows_text():
                tags_only.append(i)
                if not any(allowed):  # only the end was allowed, and ignore_eos forbids it: the parser drops extras
                    allowed[1] = True
            elif not rules.allows_blank():
                no_blank.append(i)
            forbidden_tags.append([not a for a in allowed])
        columns = self._tag_columns
        mask = torch.tensor(forbidden_tags, device=logits.device)
        logits[:, columns] = logits[:, columns].masked_fill(mask, float("-inf"))
        if tags_only:
            index = torch.tensor(tags_only, device=logits.device).unsqueeze(1)
            kept = logits[index, columns]
            logits[index.squeeze(1)] = float("-inf")
            logits[index, columns] = kept
        if no_blank and len(self._blank_ids):
            logits[torch.tensor(no_blank, device=logits.device).unsqueeze(1), self._blank_ids] = float("-inf")

    def _remove(self, indices: list[int], *, deliver: bool = True) -> None:
        """Retire rows; the last row moves into each freed slot, so the running rows stay slots 0..n-1."""
        assert self._model is not None
        for i in sorted(indices, reverse=True):
            if deliver and not self._rows[i].is_shadow:
                row = self._rows[i]
                _deliver(row.job, GenerationResult(
                    text=self._text(row), prompt_tokens=len(row.prompt_ids), new_tokens=len(row.new_ids),
                    finished=row.finished, token_ids=tuple(row.new_ids)))
            last = len(self._rows) - 1
            if i != last:
                moved = self._rows[last]
                self._model.move(last, i, moved.written)
                for t in (self._tok, self._pos, self._temperature, self._top_k, self._top_p, self._no_eos):
                    t[i] = t[last]
                self._rows[i] = moved
            self._rows.pop()

    def _fail_all(self, exc: Exception) -> None:
        for job in [row.job for row in self._rows] + list(self._waiting):
            _deliver(job, exc)
        self._rows.clear()
        self._waiting.clear()

    def _text(self, row: _Row) -> str:
        """What the request has written: what it had written before (a resumed job), then this run's tokens."""
        return row.job.request.written + self._decode(row.new_ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class _Linear:
    """``x @ weight.T + bias`` with the kernel that reads these weights fastest for x's row count.

    On CPU in fp32 and bf16 the weights are packed once into oneDNN's blocked layout (what torch.compile's
    freezing does): oneDNN then streams them instead of reordering them every call. Measured on this project's
    2-core CPU, gpt2 shape, all 49 matrices of a decode step: fp32 14-27 % faster from 4 rows on and as fast at 2;
    bf16 9-35 % faster at every row count. One row in fp32 is the exception: MKL over the [in, out] layout (GPT-2's
    own) reads at ~31 GB/s against ~25 for the packed weights, so fp32 keeps that copy too, for single rows (one
    extra copy of the matrices, 340 MB for gpt2-124M; a request with guidance always runs two rows). On AMD, where
    MKL is the slower one, that extra copy is an [out, in] copy for the compiled row kernel (`model/rowkernel.py`, up
    to two rows), or without a C compiler the weights packed for one row (`mkl_reads_one_row_fastest`).
    Elsewhere (CUDA, fp16 on CPU, a torch without oneDNN) it is ``F.linear`` over [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, pack: int | None,
                 single_row: bool, int8: bool = False) -> None:
        """weight: [out, in] (a view is fine); pack: the row count to pack for, or None not to pack; int8: hold the
        matrix as int8 with a scale per output (see `_int8_linear`) instead."""
        self.bias = bias
        self.int8 = _int8_weight(weight) if int8 else None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), pack) if pack else None
        self.plain = None if self.packed is not None or self.int8 is not None else weight.contiguous()
        one_row = single_row and self.packed is not None
        # [in, out] contiguous: for a view of GPT-2's Conv1D weight that is the checkpoint's own tensor (no copy).
        self.in_out = weight.t().contiguous() if one_row and mkl_reads_one_row_fastest() else None
        # Where MKL is not the fastest (AMD): this project's own kernel for up to rowkernel.MAX_ROWS rows, else
        # weights packed for exactly one row.
        self.row_kernel = rowkernel.load() if one_row and self.in_out is None else None
        self.few_rows = weight.contiguous() if self.row_kernel is not None else None
        self.packed_one_row = (torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
                               if one_row and self.in_out is None and self.few_rows is None else None)

    def keeps(self, tensor: torch.Tensor) -> bool:
        """Whether this still reads `tensor`'s memory (then it must not be freed)."""
        ptr = tensor.data_ptr()
        return any(t is not None and t.data_ptr() == ptr for t in (self.plain, self.in_out, self.few_rows))

    def __call__(self, x: torch.Tensor, *, add: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
        """x @ weight.T + bias, then the tanh GELU (gelu=True) or plus `add` (a residual). Fused into the matrix
        kernel where it can be: a decode step is ~200 small ops besides its matrices, and each costs a few us."""
        if self.int8 is not None:
            y = _int8_linear(x, *self.int8, self.bias)
            if gelu:
                y = F.gelu(y, approximate="tanh")
            return y if add is None else y.add_(add)
        if self.few_rows is not None and x.shape[0] <= rowkernel.MAX_ROWS:
            return rowkernel.linear(self.row_kernel, self.few_rows, x, self.bias, add=add, gelu=gelu)
        if self.in_out is not None and x.shape[0] == 1:
            if self.bias is None:
                y = torch.mm(x, self.in_out) if add is None else torch.addmm(add, x, self.in_out)
            else:
                y = torch.addmm(self.bias, x, self.in_out) if add is None else torch.addmm(add, x, self.in_out).add_(
                    self.bias)
            return F.gelu(y, approximate="tanh") if gelu else y
        if self.packed is not None:
            packed = self.packed_one_row if self.packed_one_row is not None and x.shape[0] == 1 else self.packed
            if add is not None and not gelu:
                return torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, self.bias, "add")
            y = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "gelu" if gelu else "none", [],
                                                   "tanh" if gelu else "")
        else:
            y = F.linear(x, self.plain, self.bias)
            if gelu:
                y = F.gelu(y, approximate="tanh")
        return y if add is None else y.add_(add)


def _int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [in, out] as the transposed view of a contiguous [out, in], fp32 scale [out]):
    symmetric, one scale per output, the largest weight of each output mapped to 127."""
    w = weight.detach().float()
    scale = w.abs().amax(1).clamp_(min=1e-12).div_(127)
    q = torch.div(w, scale.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
    return q.t(), scale  # _int_mm reads [out, in] rows ~1.6x faster than a contiguous [in, out] (measured here)


def _int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b with int8 W (`_int8_weight`) and x quantized to int8 per row (symmetric, the row's largest
    magnitude mapped to 127), multiplied exactly in int32 by `torch._int_mm`, then rescaled.

    Per row, not per tensor (as fbgemm's dynamic int8 linear does, ~1.4x faster at one row): a row's result then
    depends on that row alone, and integer sums are exact whatever the kernel's blocking, so the matrix products
    give bit-identical rows whatever the batch; and scoring a sequence (`int8_model`) quantizes every token
    exactly as decoding it does."""
    x_scale = x.abs().amax(1, keepdim=True).clamp_(min=1e-12).div_(127)
    xq = torch.div(x, x_scale).round_().to(torch.int8)
    y = torch._int_mm(xq, q).float().mul_(x_scale).mul_(scale)
    return y if bias is None else y.add_(bias)


def int8_available() -> bool:
    """Whether this torch can run `_int8_linear` on CPU (torch._int_mm for any row count)."""
    try:
        a, b = torch.ones(1, 8, dtype=torch.int8), torch.ones(8, 3, dtype=torch.int8)
        return bool(torch.equal(torch._int_mm(a, b), torch.full((1, 3), 8, dtype=torch.int32)))
    except (AttributeError, RuntimeError):
        return False


class Int8Linear(torch.nn.Module):
    """A transformers Conv1D or Linear with int8 matrices, computed as the engine computes them (`_int8_linear`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """weight: [out, in]."""
        super().__init__()
        self.matrix = _Linear(weight, None if bias is None else bias.detach().float(), pack=None, single_row=False,
                              int8=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def int8_model(model: Any) -> Any:
    """A transformers GPT-2 (fp32, CPU) with its matrices int8, in place: what the engine computes with
    dtype="int8", for scoring (`hnaas eval --dtype int8`) and for `generate` in `hnaas bench --dtype int8`. The
    embeddings stay fp32, the output projection (tied to them) gets its own int8 copy."""
    if not int8_available():
        raise ValueError("this torch cannot multiply int8 matrices on CPU (no torch._int_mm)")
    for block in model.transformer.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            conv = getattr(parent, name)
            setattr(parent, name, Int8Linear(conv.weight.detach().t(), conv.bias))
    head = model.lm_head
    model.lm_head = Int8Linear(head.weight.detach(), head.bias)
    return model


def mkl_reads_one_row_fastest() -> bool:
    """Whether one fp32 row should go through MKL over GPT-2's [in, out] matrices rather than the packed oneDNN ones.

    Which is faster depends on the CPU, and deterministically so (it is a vendor's code path, not noise), so it is
    decided by the vendor rather than timed at load, which could pick differently from one start to the next and
    change a seed's thread in its last bits. Measured with 1 row over the 48 matrices of gpt2-124M's blocks (340 MB)
    and its 50k x 768 output projection, streaming from memory: on Intel (Sapphire Rapids) MKL reads ~31 GB/s against
    ~25 for the packed weights; on AMD (Zen 4) MKL takes 21.3 + 7.4 ms against 18.5 + 7.5 for the packed weights
    and 17.1 + 6.6 ms for weights packed for exactly one row, so AMD keeps those instead of the [in, out] copy (the
    same memory; MKL is known to take slower code paths on AMD CPUs)."""
    return _cpu_vendor() != "AuthenticAMD"


@functools.cache
def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"), or "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _packing_rows(slots: int, dtype: torch.dtype = torch.float32) -> int | None:
    """The row count to pack CPU weights of this dtype for (the decode batch), or None where this torch cannot pack
    them: oneDNN packs bf16 only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and refuses on AVX2-only ones
    (AMD Zen 3), where bf16 then runs on F.linear."""
    try:
        op, pack = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
        if not torch.backends.mkldnn.is_available():
            return None
        x, w = torch.ones(2, 4, dtype=dtype), torch.arange(12.0, dtype=dtype).view(3, 4)
        if torch.equal(op(x, pack(w, 2), None, "none", [], ""), F.linear(x, w)):
            return max(1, slots)
    except (AttributeError, RuntimeError):
        pass
    return None


def on_passing_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) on a thread that ends when it returns (its result or exception passed on).

    For parallel torch work in a process that runs, or will run, an Engine. torch's OpenMP workers belong to the
    thread that started the parallel work, and live as long as it does; once two threads own a team each, the
    process has more OpenMP threads than cores, libgomp stops spinning between parallel regions, and every region
    of the engine's step pays a futex wake-up. Measured on this project's 2-core CPU (gpt2 shape, after one big
    matrix product on the main thread): +9 ms on a 19 ms batch-1 step, +10 ms on a 76 ms batch-32 step. A thread
    that ends takes its team with it."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            outcome.append((False, e))

    thread = threading.Thread(target=run, name="hnaas-passing")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _keep_freed_memory() -> None:
    """Have glibc keep freed memory instead of returning it to the OS (process-wide, Linux only).

    Each decode step allocates and frees tensors of a few MB (logits, sampling scratch). By default glibc serves
    such sizes with fresh mmaps or trims them off the heap when freed, so every step page-faults them in again:
    on this project's 2-core CPU that doubled the sampler's time. With these two settings the heap keeps its peak
    (tens of MB) and reuses it.
    """
    import ctypes
    import ctypes.util

    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
        libc.mallopt(m_mmap_threshold, 256 << 20)  # blocks under 256 MB come from the heap ...
        libc.mallopt(m_trim_threshold, 1 << 30)  # ... which is not trimmed unless 1 GB lies free at its top


def _bind(on_text: OnText, index: int) -> Callable[[str], Any]:
    return lambda text: on_text(index, text)


def _call(job: _Job, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is listening
        job.loop.call_soon_threadsafe(fn, *args)


def _deliver(job: _Job, outcome: GenerationResult | BaseException) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    _call(job, settle)
