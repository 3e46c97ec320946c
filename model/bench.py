"""`hnaas bench`: the engine against transformers `generate` on the same model, and against this machine's limits.

    hnaas bench                                  # random-weight gpt2 (124M) shape, batches 1, 4, 16, 32
    hnaas bench --shape tiny --batches 1,4 --new-tokens 16 --repeats 1 --json
    hnaas bench --model model/default            # a checkpoint: real text, so "time to first comment" is real
    python -m model.bench ...                    # the same without the CLI

What it measures (all in this process, one phase after the other):
  - limits: memory read bandwidth (best of a large sum and a large matrix-vector product) and matmul
    throughput in the model's dtype (best over model-like shapes), probed in a process of their own before the
    first run and after every run (a shared host's bandwidth moves from minute to minute, and by 10-20 % from one
    second to the next); from them and the model's shape, a roofline: a decode step cannot beat max(bytes read /
    bandwidth, flops / matmul throughput), where bytes are the weights plus the batch's KV cache and flops are 2 per
    weight per row plus attention. Each run is compared with the two probes either side of it (`engine_runs`), and
    a batch size's fraction of the limit is the median of its runs'; `limits` holds the median of all probes, every
    probe's figures, and the median of each batch size's own probes (`by_batch`);
  - tokens/s of the engine and of transformers `generate` per batch size: B requests of `prompt_len` tokens, each
    forced to write exactly `new_tokens` (engine: ignore_eos; generate: min_new_tokens), with the same sampling
    (do_sample, temperature, top_k, top_p); wall time from submit to the last result, prefill included; median of
    `repeats` (`generate_repeats` for generate, 1 by default: it is the slow half);
  - continuous batching: 16 requests of mixed lengths one by one, then all at once, then all at once with room for
    only 4 rows (the others join as rows finish);
  - time to first token, and to first comment: until the engine streams a closing or opening tag; random weights
    never write one, so there it is the time to `comment_tokens` tokens (the basis is stated in the output); once
    alone, once joining a running batch of 15;
  - peak resident memory of each phase (CUDA: peak allocated), the engine's KV cache size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

DEFAULT_BATCHES = (1, 4, 16, 32)
CONTINUOUS_REQUESTS = 16
BUSY_OTHERS = 15
LIMIT_KEYS = ("memory_bandwidth_gb_s", "matmul_gflop_s")  # what a roofline needs from a probe
BUSY_TOKENS = 480  # what the requests the first comment joins ask for (at least): longer than the probe's wait
TITLES = ("Show HN: I built a search engine for my own notes in a weekend",
          "Ask HN: What is the best way to learn about databases in depth?",
          "The hidden cost of microservices", "Why SQLite is so great for embedded use")


# ----- the model under test -------------------------------------------------------------------------------------

def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries: words "w0".."w{n}" and the format's tags last
    (<|endoftext|> at vocab_size - 3, stock GPT-2's 50256 for the gpt2 shapes). Prompts of N tokens are N words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from model.format import CLOSE, END_OF_TEXT, OPEN

    words = vocab_size - 3
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([END_OF_TEXT, OPEN, CLOSE])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT, unk_token="w0", additional_special_tokens=[OPEN, CLOSE],
                                   model_max_length=1 << 20, clean_up_tokenization_spaces=False)


def build_random_checkpoint(path: str | Path, shape: str, *, seed: int = 0) -> Path:
    """A random-weight checkpoint of a named shape. "tiny" is the test checkpoint (its 600-token BPE); the GPT-2
    shapes get the stock vocabulary size (50259 with the two tags) and a synthetic word-level tokenizer."""
    import torch
    from transformers import GPT2LMHeadModel

    from model.tiny import build_tiny_checkpoint, gpt2_config

    path = Path(path)
    if shape == "tiny":
        return build_tiny_checkpoint(path, seed=seed)
    config = gpt2_config(shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    synthetic_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def _prompt_ids(tokenizer, length: int, index: int, real_text: bool) -> list[int]:
    """A prompt of exactly `length` tokens (different per index)."""
    if real_text:  # a checkpoint: text in the thread format, cut to length
        from model.format import prompt
        from model.tiny import SAMPLE_TEXT

        lines = [line for line in SAMPLE_TEXT.splitlines() if line.strip()]
        text = "".join(prompt(lines[(index + i) % len(lines)]) for i in range(64))
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids[-length:]
    import random

    rng = random.Random(index)
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    ids = []
    while len(ids) < length:
        t = rng.randrange(vocab)
        if t not in special:
            ids.append(t)
    return ids


def _stable(tokenizer, ids: list[int]) -> list[int]:
    """Ids that survive decode -> encode unchanged (so the engine, given text, sees what generate is given)."""
    for _ in range(4):
        again = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)
        if again == ids:
            break
        ids = again[-len(ids):]
    return ids


# ----- measuring ------------------------------------------------------------------------------------------------

def _best_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], Any] = lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


class LimitMeter:
    """This machine's memory read bandwidth (GB/s) and matmul throughput (GFLOP/s in `dtype`; int8: int8 x int8 ->
    int32 operations per second, `torch._int_mm`); each `measure()` is the best of `repeats`.

    Reads a tensor larger than the last-level cache (1 GiB) with a sum and with a matrix-vector product (the shape
    of a batch-1 decode step); multiplies model-like matrices. The buffers are made once, so measuring again costs
    only the reads (about a second).
    """

    def __init__(self, device: str = "cpu", dtype: str = "float32", *, bandwidth_bytes: int = 1 << 30,
                 repeats: int = 5) -> None:
        import torch

        self.dtype, self.repeats = dtype, repeats
        self._sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        dt = getattr(torch, dtype)
        if dt == torch.int8:
            def matrix(rows: int, cols: int) -> torch.Tensor:
                return torch.randint(-127, 128, (rows, cols), device=device, dtype=dt)
            self._multiply = torch._int_mm
        else:
            def matrix(rows: int, cols: int) -> torch.Tensor:
                return torch.randn(rows, cols, device=device, dtype=dt)
            self._multiply = torch.mm
        self.bandwidth_bytes = bandwidth_bytes - bandwidth_bytes % (4 * 768)
        self._x = torch.ones(self.bandwidth_bytes // 4, device=device)
        self._v = torch.ones(768, device=device)
        self._products = [(matrix(rows, k), matrix(k, n), 2 * rows * k * n)
                          for rows, k, n in ((1024, 768, 3072), (1024, 3072, 768))]

    def measure(self) -> dict[str, Any]:
        import torch

        with torch.inference_mode():
            x, m = self._x, self._x.view(-1, 768)
            sum_gbs = self.bandwidth_bytes / _best_seconds(lambda: x.sum(), self.repeats, self._sync) / 1e9
            mv_gbs = self.bandwidth_bytes / _best_seconds(lambda: torch.mv(m, self._v), self.repeats,
                                                          self._sync) / 1e9
            gflops = max(flops / _best_seconds(lambda a=a, b=b: self._multiply(a, b), self.repeats, self._sync) / 1e9
                         for a, b, flops in self._products)
        return {"memory_bandwidth_gb_s": round(max(sum_gbs, mv_gbs), 1), "read_sum_gb_s": round(sum_gbs, 1),
                "read_mv_gb_s": round(mv_gbs, 1), "matmul_gflop_s": round(gflops, 1), "matmul_dtype": self.dtype}


def measure_limits(device: str = "cpu", dtype: str = "float32", *, bandwidth_bytes: int = 1 << 30,
                   repeats: int = 5) -> dict[str, Any]:
    """One measurement of this machine's limits, in this process (see LimitMeter)."""
    return LimitMeter(device, dtype, bandwidth_bytes=bandwidth_bytes, repeats=repeats).measure()


def _limit_probe_main(conn, device: str, dtype: str, threads: int, bandwidth_bytes: int, repeats: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        meter = LimitMeter(device, dtype, bandwidth_bytes=bandwidth_bytes, repeats=repeats)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", repr(e)))
        return
    conn.send(("ready", None))
    while conn.recv():
        try:
            conn.send(("ok", meter.measure()))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", repr(e)))


class LimitProbe:
    """A LimitMeter in a process of its own, measuring on demand between the engine's runs.

    On a shared host the memory bandwidth moves by up to 2x from one minute to the next (26.8-52.7 GB/s within one
    session on the AMD machine), so one measurement, taken minutes away from a batch size's runs, made the engine's
    fraction of the limit a lottery. The benchmark probes before the first run and after each run, and compares
    each run with the probes either side of it. In its own process so that its 1 GiB buffer does not count in the
    engine's peak memory, and is made once. Its threads sleep between probes.
    """

    def __init__(self, device: str, dtype: str, threads: int, *, bandwidth_bytes: int = 1 << 30,
                 repeats: int = 3) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # not fork: this process runs OpenMP and maybe CUDA
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_limit_probe_main, daemon=True, name="hnaas-limit-probe",
                                        args=(child, device, dtype, threads, bandwidth_bytes, repeats))
        self._process.start()
        child.close()
        self._ready = False
        self.results: list[dict[str, Any]] = []

    def _receive(self) -> Any:
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the limit probe exited (code {self._process.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"the limit probe failed: {value}")
        return value

    def measure(self) -> dict[str, Any]:
        if not self._ready:
            self._receive()
            self._ready = True
        self._conn.send(True)
        result = self._receive()
        self.results.append(result)
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(False)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


def combine_limits(probes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of several limit measurements, key by key, with the measured values kept."""
    out = dict(probes[0])
    for key in ("memory_bandwidth_gb_s", "read_sum_gb_s", "read_mv_gb_s", "matmul_gflop_s"):
        out[key] = round(statistics.median(p[key] for p in probes), 1)
    out["probes"] = len(probes)
    out["memory_bandwidth_probes_gb_s"] = [p["memory_bandwidth_gb_s"] for p in probes]
    out["matmul_probes_gflop_s"] = [p["matmul_gflop_s"] for p in probes]
    return out


def roofline(config, vocab: int, element_size: int, batches: Sequence[int], prompt_len: int, new_tokens: int,
             bandwidth_gb_s: float, gflop_s: float, kv_element_size: int | None = None) -> dict[str, Any]:
    """Fastest possible decode tokens/s per batch size for this model on this machine (see the module docstring).
    element_size: bytes per weight; kv_element_size: per cached key or value (default: the same)."""
    d, layers = config.n_embd, config.n_layer
    matmul_weights = layers * 12 * d * d + vocab * d  # c_attn 3d², c_proj d², c_fc 4d², mlp c_proj 4d²; the head
    other = layers * (4 * d + 3 * d + d + 4 * d + d) + 2 * d  # biases, layer norms
    positions = prompt_len + new_tokens / 2  # the average attention length over a generation
    weight_bytes = (matmul_weights + other) * element_size
    kv_bytes = 2 * layers * d * positions * (kv_element_size or element_size)  # one row's K and V read per step
    flops = 2 * matmul_weights + 4 * layers * d * positions
    limit = {}
    for b in batches:
        step = max((weight_bytes + b * kv_bytes) / (bandwidth_gb_s * 1e9), b * flops / (gflop_s * 1e9))
        limit[str(b)] = round(b / step, 1)
    return {"weight_bytes": int(weight_bytes), "kv_bytes_per_row_step": int(kv_bytes),
            "flops_per_token": int(flops), "tok_per_s": limit}


@contextlib.contextmanager
def _peak_memory(out: dict[str, Any], key: str, device: str) -> Iterator[None]:
    """Peak resident memory (MB) of the enclosed phase: VmHWM after resetting it (Linux), else ru_maxrss; on
    CUDA, peak allocated device memory as well."""
    import torch

    reset = False
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        mb = None
        if reset:
            with contextlib.suppress(OSError, ValueError):
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        mb = int(line.split()[1]) / 1024
        if mb is None:
            import resource

            mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process lifetime, Linux KiB
        out[key] = round(mb, 1)
        if device.startswith("cuda"):
            out[f"{key}_cuda"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


async def _engine_phase(path: Path, prompts: list[list[int]], real_text: bool, s: dict[str, Any],
                        say: Callable[[str], None]) -> dict[str, Any]:
    from model.engine import Engine, GenerationRequest, SamplingSettings
    from model.format import CLOSE, OPEN, prompt

    batches, new_tokens = s["batches"], s["new_tokens"]
    # The first-comment probe on a checkpoint is guided like the bot's requests: a row and its unconditional shadow,
    # so it needs two slots beside the busy ones, or it would wait for one of them to finish instead of joining.
    biggest = max(max(batches), CONTINUOUS_REQUESTS, BUSY_OTHERS + 2)
    engine = Engine(path, device=s["device"], dtype=s["dtype"], threads=s["threads"], max_batch=biggest,
                    token_budget=1 << 30)  # slots are the only bound here
    await engine.start()
    out: dict[str, Any] = {"info": engine.info}
    probe = (LimitProbe(engine.info["device"], engine.info["dtype"], s["threads"], bandwidth_bytes=s["probe_bytes"])
             if s["limits"] else None)
    tokenizer = engine._tokenizer
    texts = [tokenizer.decode(p) for p in prompts]
    got = len(tokenizer.encode(texts[0], add_special_tokens=False))
    out["prompt_tokens"] = got

    def sampling(n: int, **extra: Any) -> SamplingSettings:
        return SamplingSettings(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                                max_new_tokens=n, **extra)

    def requests(b: int, n: int = new_tokens) -> list[GenerationRequest]:
        return [GenerationRequest(texts[i % len(texts)], 1000 + i, sampling(n, ignore_eos=True, constrain_tags=False))
                for i in range(b)]

    try:
        await engine.generate(requests(2, 4))  # warm up
        out["tok_per_s"], out["batch_limits"], out["runs"] = {}, {}, {}
        before = probe.measure() if probe else None
        for b in batches:
            times, around = [], [before]
            for _ in range(s["repeats"]):
                start = time.perf_counter()
                results = await engine.generate(requests(b))
                times.append(time.perf_counter() - start)
                assert all(r.new_tokens == new_tokens for r in results), "a row stopped early"
                if probe:  # after each run, so that each run has a probe on either side of it
                    around.append(probe.measure())
            out["tok_per_s"][str(b)] = round(b * new_tokens / statistics.median(times), 1)
            say(f"engine batch {b}: {out['tok_per_s'][str(b)]} tok/s")
            if probe:
                out["batch_limits"][str(b)] = combine_limits(around)
                out["runs"][str(b)] = [(b * new_tokens / t, combine_limits(pair))
                                       for t, pair in zip(times, itertools.pairwise(around), strict=True)]
                before = around[-1]
        out["kv_cache_mb"] = round(engine._model.cache_bytes() / 2**20, 1)

        if s["continuous"]:
            # 16 requests of mixed lengths (1/4 to all of new_tokens).
            lengths = [max(1, new_tokens * (4 + 12 * i // (CONTINUOUS_REQUESTS - 1)) // 16)
                       for i in range(CONTINUOUS_REQUESTS)]
            mixed = [GenerationRequest(texts[i % len(texts)], 2000 + i, sampling(n, ignore_eos=True))
                     for i, n in enumerate(lengths)]
            start = time.perf_counter()
            alone = [(await engine.generate([r]))[0] for r in mixed]
            one_by_one = time.perf_counter() - start
            start = time.perf_counter()
            together = await engine.generate(mixed)
            together_s = time.perf_counter() - start
            tokens = sum(lengths)
            out["continuous"] = {
                "requests": CONTINUOUS_REQUESTS, "new_tokens": lengths, "one_by_one_s": round(one_by_one, 2),
                "together_s": round(together_s, 2), "one_by_one_tok_per_s": round(tokens / one_by_one, 1),
                "together_tok_per_s": round(tokens / together_s, 1), "speedup": round(one_by_one / together_s, 2),
            }

        # Time to first token and to first comment.
        probe_prompt = prompt(TITLES[0]) if real_text else texts[0]
        start = time.perf_counter()
        await engine.generate([GenerationRequest(probe_prompt, 7, sampling(1))])
        out["first_token_s"] = round(time.perf_counter() - start, 3)

        async def first_comment() -> tuple[float | None, int | None]:
            """Seconds to the first comment, and (a checkpoint's probe streams text) the rows of the batch it
            joined, its own included."""
            start = time.perf_counter()
            if not real_text:
                await engine.generate([GenerationRequest(probe_prompt, 7, sampling(s["comment_tokens"],
                                                                                   ignore_eos=True))])
                return time.perf_counter() - start, None
            closed: list[float] = []
            rows: list[int] = []

            def on_text(text: str) -> None:
                if not rows:
                    rows.append(len(engine._rows))
                if not closed and (CLOSE in text or OPEN in text):
                    closed.append(time.perf_counter() - start)

            # What a user gets: the bot's own sampling settings, guidance and format rules included.
            from bot.settings import Settings

            await engine.submit(GenerationRequest(probe_prompt, 7, Settings().sampling(max_new_tokens=400)),
                                on_text=on_text)
            return (closed[0] if closed else None), (rows[0] if rows else None)

        out["first_comment_s"] = _round((await first_comment())[0])
        running: set[int] = set()
        all_running = asyncio.Event()

        def started(i: int) -> Callable[[str], None]:
            def on_text(_: str) -> None:
                running.add(i)
                if len(running) == BUSY_OTHERS:
                    all_running.set()
            return on_text

        # The others outlast the probe whatever --new-tokens says (they are cancelled once it has its comment).
        busy_tokens = max(BUSY_TOKENS, 2 * s["comment_tokens"])
        others = [engine.submit(r, on_text=started(i)) for i, r in enumerate(requests(BUSY_OTHERS, busy_tokens))]
        await all_running.wait()  # they stream their first text after 16 tokens: all are in the batch
        busy_s, busy_rows = await first_comment()
        out["first_comment_busy_s"] = _round(busy_s)
        if busy_rows is not None:
            out["first_comment_busy_rows"] = busy_rows
        for f in others:
            f.cancel()
        out["first_comment_basis"] = (
            "until the first closing/opening comment tag is streamed, with the bot's sampling settings" if real_text else
            f"random weights never close a comment: time to {s['comment_tokens']} new tokens")
        say(f"first token {out['first_token_s']}s, first comment {out['first_comment_s']}s alone, "
            f"{out['first_comment_busy_s']}s joining a batch of {BUSY_OTHERS}")
    finally:
        await engine.close()
        if probe:
            probe.close()
            out["limit_probes"] = probe.results

    if s["continuous"]:  # the same 16 requests through 4 slots: the others join as rows finish
        narrow = Engine(path, device=s["device"], dtype=s["dtype"], threads=s["threads"], max_batch=4)
        await narrow.start()
        try:
            start = time.perf_counter()
            joined = await narrow.generate(mixed)
            narrow_s = time.perf_counter() - start
        finally:
            await narrow.close()
        out["continuous"]["together_max_batch_4_s"] = round(narrow_s, 2)
        # requests whose tokens are those they get alone, in both batched runs (see engine.py on rounding)
        out["continuous"]["same_tokens_as_alone"] = sum(
            a.token_ids == b.token_ids == c.token_ids for a, b, c in zip(alone, together, joined, strict=True))
        say(f"continuous: one by one {one_by_one:.1f}s, together {together_s:.1f}s, max_batch 4 {narrow_s:.1f}s")
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _generate_phase(path: Path, prompts: list[list[int]], device: str, dtype: str, s: dict[str, Any],
                    say: Callable[[str], None]) -> dict[str, float]:
    """transformers generate on the same checkpoint, device and dtype as the engine (int8: the engine's own int8
    matrices swapped into the model, `int8_model`)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    int8 = dtype == "int8"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if int8 else getattr(torch, dtype),
                                                 local_files_only=True)
    model = model.to(device).eval()
    if int8:
        from model.engine import int8_model

        model = int8_model(model)
    eos = model.config.eos_token_id
    new_tokens = s["new_tokens"]

    def run(b: int, n: int) -> None:
        ids = torch.tensor([prompts[i % len(prompts)] for i in range(b)], device=device)
        config = GenerationConfig(do_sample=s["temperature"] > 0, temperature=s["temperature"] or None,
                                  top_k=s["top_k"], top_p=s["top_p"], max_new_tokens=n, min_new_tokens=n,
                                  eos_token_id=eos, pad_token_id=eos)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert out.shape[1] == ids.shape[1] + n
        out.cpu()  # wait for the device

    result = {}
    with torch.inference_mode():
        run(2, 4)
        for b in s["batches"]:
            times = []
            for _ in range(s["generate_repeats"]):
                start = time.perf_counter()
                run(b, new_tokens)
                times.append(time.perf_counter() - start)
            result[str(b)] = round(b * new_tokens / statistics.median(times), 1)
            say(f"generate batch {b}: {result[str(b)]} tok/s")
    return result


def run_bench(shape: str = "gpt2", model: str | Path | None = None, *, batches: Sequence[int] = DEFAULT_BATCHES,
              prompt_len: int = 64, new_tokens: int = 256, temperature: float = 1.0, top_p: float = 0.9,
              top_k: int = 0, repeats: int = 3, generate_repeats: int = 1, threads: int | None = None,
              device: str | None = None, dtype: str | None = None, generate: bool = True, continuous: bool = True,
              comment_tokens: int = 80, limits: bool = True, probe_bytes: int = 1 << 30,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) and return its results as a JSON-ready dict.

    Keys: engine_tok_per_s, generate_tok_per_s, speedup_vs_generate, engine_fraction_of_limit, threads_per_minute
    (objects keyed by batch size as a string), engine_runs (per batch size, each run's tok/s, the limits probed
    either side of it and its fraction of the roofline at those), limits, continuous, first_token_s, first_comment_s,
    first_comment_busy_s, first_comment_busy_rows (a checkpoint: the rows of the batch the probe joined, its own two included),
    first_comment_basis, peak_memory_mb, model, settings, machine.
    """
    import torch
    import transformers

    say = progress or (lambda _: None)
    if threads:
        torch.set_num_threads(threads)
    batches = sorted(set(batches))
    settings = dict(batches=batches, prompt_len=prompt_len, new_tokens=new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, repeats=repeats, generate_repeats=generate_repeats,
                    threads=threads or torch.get_num_threads(), device=device, dtype=dtype, continuous=continuous,
                    comment_tokens=comment_tokens, limits=limits, probe_bytes=probe_bytes)
    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": settings["threads"], "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "settings": {k: v for k, v in settings.items() if k not in ("continuous", "limits", "probe_bytes")},
    }
    with contextlib.ExitStack() as stack:
        if model is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hnaas-bench-")))
            say(f"building a random-weight {shape} checkpoint")
            from model.engine import on_passing_thread

            # not on this thread: its OpenMP workers would slow the engine's thread down (see on_passing_thread)
            path = on_passing_thread(build_random_checkpoint, tmp / shape, shape)
            real_text = False
        else:
            path, real_text = Path(model), True
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        prompts = [_stable(tokenizer, _prompt_ids(tokenizer, prompt_len, i, real_text))
                   for i in range(max(batches))]
        if len({len(p) for p in prompts}) > 1:  # generate gets them unpadded, as one tensor
            shortest = min(len(p) for p in prompts)
            prompts = [p[-shortest:] for p in prompts]

        memory: dict[str, Any] = {}
        with _peak_memory(memory, "engine", device or ("cuda" if torch.cuda.is_available() else "cpu")):
            engine = asyncio.run(_engine_phase(path, prompts, real_text, settings, say))
        info = engine.pop("info")
        out["model"] = {**info, "shape": None if model else shape, "path": str(model) if model else None,
                        "prompt_tokens": engine.pop("prompt_tokens")}
        out["engine_tok_per_s"] = engine.pop("tok_per_s")
        # Whole threads of new_tokens each (the GPU figure: --new-tokens 1000), at each batch size.
        out["threads_per_minute"] = {b: round(t * 60 / new_tokens, 1) for b, t in out["engine_tok_per_s"].items()}
        if generate:
            with _peak_memory(memory, "generate", info["device"]):
                out["generate_tok_per_s"] = _generate_phase(path, prompts, info["device"], info["dtype"], settings,
                                                            say)
            out["speedup_vs_generate"] = {b: round(out["engine_tok_per_s"][b] / g, 2)
                                          for b, g in out["generate_tok_per_s"].items()}
        else:
            out["generate_tok_per_s"] = out["speedup_vs_generate"] = {}
        probes, by_batch, runs = engine.pop("limit_probes", None), engine.pop("batch_limits"), engine.pop("runs")
        if probes:
            # limits.tok_per_s: each batch size at the median of its own probes; the headline figures are the
            # median of all probes.
            element = torch.empty(0, dtype=getattr(torch, info["dtype"])).element_size()
            kv_element = 4 if info["dtype"] == "int8" else element  # int8 matrices, fp32 activations and cache

            def ceiling(lim: dict[str, Any], sizes: Sequence[int]) -> dict[str, Any]:
                return roofline(config, info["vocab_size"], element, sizes, prompt_len, new_tokens,
                                lim["memory_bandwidth_gb_s"], lim["matmul_gflop_s"], kv_element)

            out["limits"] = {**combine_limits(probes), **ceiling(combine_limits(probes), batches)}
            out["limits"]["tok_per_s"] = {b: ceiling(lim, [int(b)])["tok_per_s"][b] for b, lim in by_batch.items()}
            out["limits"]["by_batch"] = {b: {k: lim[k] for k in LIMIT_KEYS} for b, lim in by_batch.items()}
            # Each run against the two probes on either side of it: seconds apart, not a batch size's minute, so a
            # host whose bandwidth moves does not decide the fraction. A batch size's fraction is its runs' median.
            out["engine_runs"] = {b: [{"tok_per_s": round(t, 1), **{k: lim[k] for k in LIMIT_KEYS},
                                       "fraction_of_limit": round(t / ceiling(lim, [int(b)])["tok_per_s"][b], 3)}
                                      for t, lim in each] for b, each in runs.items()}
            out["engine_fraction_of_limit"] = {
                b: round(statistics.median(run["fraction_of_limit"] for run in each), 3)
                for b, each in out["engine_runs"].items()}
        else:
            out["limits"], out["engine_fraction_of_limit"] = {}, {}
        out.update(engine)  # continuous, first_*, kv_cache_mb
        out["peak_memory_mb"] = memory
    return out


# ----- command line ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="gpt2", choices=("tiny", "gpt2", "gpt2-medium"),
                        help="random-weight model shape (default gpt2, 124M)")
    parser.add_argument("--model", help="a checkpoint directory instead of random weights")
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                        help="batch sizes, comma-separated (default 1,4,16,32)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per request (default 256)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    parser.add_argument("--temperature", type=float, default=1.0, help="(default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="(default 0: off)")
    parser.add_argument("--repeats", type=int, default=3, help="engine runs per batch size; the median counts (3)")
    parser.add_argument("--generate-repeats", type=int, default=1, help="transformers generate runs (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16, int8 (int8 matrices, CPU) (default: fp32 on "
                                        "CPU, bf16 on CUDA)")
    parser.add_argument("--no-generate", action="store_true", help="skip transformers generate")
    parser.add_argument("--no-continuous", action="store_true", help="skip the continuous batching runs")
    parser.add_argument("--comment-tokens", type=int, default=80,
                        help="random weights: 'first comment' means this many tokens (default 80)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_bench(
        args.shape, args.model, batches=[int(b) for b in args.batches.split(",") if b.strip()],
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repeats=args.repeats, generate_repeats=args.generate_repeats, threads=args.threads,
        device=args.device, dtype=args.dtype, generate=not args.no_generate, continuous=not args.no_continuous,
        comment_tokens=args.comment_tokens, progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True),
    )
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def format_table(r: dict[str, Any]) -> str:
    m, s, lim = r["model"], r["settings"], r["limits"]
    name = m.get("shape") or m.get("path")
    lines = [
        f"model: {name} ({m['parameters'] / 1e6:.1f}M parameters, vocab {m['vocab_size']}), {m['device']} "
        f"{m['dtype']}{_compiled(m)}, {r['machine']['torch_threads']} threads; prompt {m['prompt_tokens']} tokens, "
        f"{s['new_tokens']} new tokens, temperature {s['temperature']}, top_k {s['top_k']}, top_p {s['top_p']}",
    ]
    if lim:
        reads, products = lim.get("memory_bandwidth_probes_gb_s", []), lim.get("matmul_probes_gflop_s", [])
        lines.append(f"limits (median of {lim.get('probes', 1)} probes, one before the first run and one after each "
                     f"run): memory read {lim['memory_bandwidth_gb_s']} GB/s{_spread(reads)}, "
                     f"{lim.get('matmul_dtype', '')} matmul {lim['matmul_gflop_s']} GFLOP/s{_spread(products)}; "
                     f"{lim['weight_bytes'] / 1e6:.0f} MB of weights per step; limit tok/s: at the median of each "
                     f"batch size's probes; engine/limit: the median of its runs, each against the probes either "
                     f"side of it (range in brackets)")
    lines.append(f"load average at start: {r['machine']['load_average_at_start']}")
    lines.append("")
    lines.append(f"{'batch':>5} | {'engine tok/s':>12} | {'generate tok/s':>14} | {'engine/generate':>15} | "
                 f"{'limit tok/s':>11} | {'engine/limit':>12} | {'threads/min':>11}")
    lines.append("-" * 102)
    for b, e in r["engine_tok_per_s"].items():
        g = r["generate_tok_per_s"].get(b)
        x = r["speedup_vs_generate"].get(b)
        li = lim.get("tok_per_s", {}).get(b) if lim else None
        f = r["engine_fraction_of_limit"].get(b)
        each = [round(100 * run["fraction_of_limit"]) for run in r.get("engine_runs", {}).get(b, [])]
        fraction = None if f is None else f"{round(100 * f)} %{_spread(each)}"
        lines.append(f"{b:>5} | {e:>12} | {_cell(g):>14} | {_cell(x, 'x'):>15} | {_cell(li):>11} | "
                     f"{_cell(fraction):>12} | "
                     f"{_cell(r['threads_per_minute'].get(b)):>11}")
    lines.append("")
    c = r.get("continuous")
    if c:
        lines.append(f"{c['requests']} requests of {min(c['new_tokens'])}-{max(c['new_tokens'])} new tokens: one by one "
                     f"{c['one_by_one_s']} s, together {c['together_s']} s ({c['speedup']}x), together with 4 "
                     f"slots {c['together_max_batch_4_s']} s; requests with the same tokens as alone: "
                     f"{c['same_tokens_as_alone']} of {c['requests']}")
    lines.append(f"time to first token {r['first_token_s']} s; first comment {r['first_comment_s']} s alone, "
                 f"{r['first_comment_busy_s']} s joining a batch of {BUSY_OTHERS} ({r['first_comment_basis']})")
    mem = ", ".join(f"{k} {v} MB" for k, v in r["peak_memory_mb"].items())
    lines.append(f"peak memory: {mem}; engine KV cache {r.get('kv_cache_mb')} MB")
    return "\n".join(lines)


def _compiled(model: dict[str, Any]) -> str:
    """Which compiled kernels (model/rowkernel.py) the engine ran, for the table's header."""
    parts = [name for key, name in (("row_kernel", "row kernel"), ("attention_kernel", "attention kernel"))
             if model.get(key)]
    return f" ({', '.join(parts)})" if parts else ""


def _spread(xs: Sequence[float]) -> str:
    """The range as " (lowest-highest)"; nothing where the values do not differ (one value, or all equal)."""
    return f" ({min(xs)}-{max(xs)})" if len(set(xs)) > 1 else ""


def _cell(x: Any, suffix: str = "") -> str:
    return "-" if x is None else f"{x}{suffix}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
