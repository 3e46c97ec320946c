"""The engine against a tiny random-weight GPT-2 built offline (CPU, fp32)."""

import asyncio
import contextlib
import shutil
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2LMHeadModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from bot.errors import ModelNotInstalled
from model.engine import (
    CANDIDATES,
    DRAWS,
    STREAM_EVERY,
    CachedGPT2,
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingSettings,
    sample_tokens,
)
from model.format import CLOSE, END_OF_TEXT, OPEN, parse_generation, prompt
from model.tiny import SHAPES, build_tiny_checkpoint, build_tokenizer, gpt2_config

PROMPTS = [
    "Show HN: A tiny search engine",
    "Ask HN: What is the best way to learn about databases in depth? I would start with a book " * 3,
    f"{OPEN}This is neat.{CLOSE}{OPEN}",
    "x",
]
SHORT = SamplingSettings(max_new_tokens=24)
EOS_P = 0.1  # per-step probability of <|endoftext|> in the eos checkpoint (at temperature 1, no cut)


def _start(path, **kwargs) -> Engine:
    kwargs.setdefault("dtype", "float32")  # the numbers these tests compare against transformers are fp32
    engine = Engine(path, threads=1, **kwargs)
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def engine(tiny_path):
    engine = _start(tiny_path)
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def eos_engine(tiny_path, tmp_path_factory):
    """A unigram model: every step, <|endoftext|> has probability EOS_P and the rest is near uniform."""
    path = tmp_path_factory.mktemp("eos") / "ckpt"
    shutil.copytree(tiny_path, path)
    model = GPT2LMHeadModel.from_pretrained(path)
    eos = model.config.eos_token_id
    n_vocab, n_embd = model.transformer.wte.weight.shape
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # the final hidden state is ln_f.bias at every position
        model.transformer.ln_f.bias.fill_(1.0)
        target = torch.log(torch.tensor(EOS_P / (1 - EOS_P) * (n_vocab - 1)))
        model.transformer.wte.weight[eos] = target / n_embd  # tied to lm_head: logit(eos) = target
    model.save_pretrained(path)
    engine = _start(path)
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def tag_engine(tiny_path, tmp_path_factory):
    """A unigram model that writes tags half the time: each of <|c|>, <|ec|>, <|endoftext|> has probability 1/6,
    and blank tokens are likely too, so unconstrained output is full of broken structure."""
    path = tmp_path_factory.mktemp("tags") / "ckpt"
    shutil.copytree(tiny_path, path)
    model = GPT2LMHeadModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    n_vocab, n_embd = model.transformer.wte.weight.shape
    tags = [tokenizer.convert_tokens_to_ids(t) for t in (OPEN, CLOSE, END_OF_TEXT)]
    blank = tokenizer.encode(" ", add_special_tokens=False)[0]
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight.mul_(0.01)
        for token in tags:  # logit log(n_vocab / 5) each: with the rest near 0, three tags take about half the mass
            model.transformer.wte.weight[token] = torch.log(torch.tensor(n_vocab / 5.0)) / n_embd
        model.transformer.wte.weight[blank] = torch.log(torch.tensor(n_vocab / 5.0)) / n_embd
    model.save_pretrained(path)
    engine = _start(path)
    yield engine
    asyncio.run(engine.close())


def _requests(seed: int = 0, sampling: SamplingSettings = SHORT, prompts=PROMPTS) -> list[GenerationRequest]:
    return [GenerationRequest(p, seed + i, sampling) for i, p in enumerate(prompts)]


# ----- tiny builder -----

def test_tiny_checkpoint_is_fast_and_deterministic(tmp_path):
    start = time.perf_counter()
    a = build_tiny_checkpoint(tmp_path / "a")
    assert time.perf_counter() - start < 2
    b = build_tiny_checkpoint(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_tiny_checkpoint(tmp_path / "c", seed=1)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_gpt2_config_shapes():
    assert set(SHAPES) == {"tiny", "gpt2", "gpt2-medium"}
    small, medium = gpt2_config("gpt2"), gpt2_config("gpt2-medium")
    assert (small.n_layer, small.n_embd, small.n_head) == (12, 768, 12)
    assert (medium.n_layer, medium.n_embd, medium.n_head) == (24, 1024, 16)
    assert small.vocab_size == 50259 and small.eos_token_id == 50256
    with pytest.raises(ValueError):
        gpt2_config("gpt5")


# ----- loading -----

async def test_missing_checkpoint(tmp_path):
    engine = Engine(tmp_path / "nothing-here")
    with pytest.raises(ModelNotInstalled) as err:
        await engine.start()
    assert "nothing-here" in str(err.value) and err.value.user_message
    with pytest.raises(RuntimeError):
        await engine.generate(_requests())


def test_info(engine, tiny_path):
    info = engine.info
    assert info["path"] == str(tiny_path)
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["vocab_size"] == 600 and info["context_length"] == 512
    assert 50_000 < info["parameters"] < 500_000


# ----- generation -----

async def test_generates(engine):
    results = await engine.generate(_requests())
    assert len(results) == len(PROMPTS)
    for r in results:
        assert isinstance(r, GenerationResult)
        assert r.prompt_tokens > 0 and 0 < r.new_tokens <= SHORT.max_new_tokens
        assert r.new_tokens == len(r.token_ids) and END_OF_TEXT not in r.text
        assert r.finished or r.new_tokens == SHORT.max_new_tokens
    assert await engine.generate([]) == []


async def test_same_seed_same_text_and_different_seed_differs(engine):
    request = GenerationRequest(PROMPTS[0], 1234, SamplingSettings(max_new_tokens=40))
    first, again = await engine.generate([request]), await engine.generate([request])
    assert first[0].text.encode() == again[0].text.encode()
    other = await engine.generate([GenerationRequest(PROMPTS[0], 1235, request.sampling)])
    assert other[0].token_ids != first[0].token_ids


@pytest.mark.parametrize("which", ["random", "eos"])
async def test_batch_matches_alone(engine, eos_engine, which):
    eng = engine if which == "random" else eos_engine
    settings = [SamplingSettings(max_new_tokens=30), SamplingSettings(temperature=1.3, top_k=40, max_new_tokens=12),
                SamplingSettings(temperature=0.7, top_p=0.5, max_new_tokens=25), SamplingSettings(top_p=1.0)]
    requests = [GenerationRequest(p, 99 + i, s) for i, (p, s) in enumerate(zip(PROMPTS, settings, strict=True))]
    together = await eng.generate(requests)
    alone = [(await eng.generate([r]))[0] for r in requests]
    assert together == alone
    reversed_batch = await eng.generate(requests[::-1])
    assert reversed_batch[::-1] == alone


async def test_max_new_tokens_respected(engine):
    for n in (1, 7):
        results = await engine.generate(_requests(sampling=SamplingSettings(max_new_tokens=n)))
        assert all(r.new_tokens <= n for r in results)
        assert all(r.new_tokens == n for r in results if not r.finished)


async def test_stops_at_end_of_text(eos_engine):
    # Raw sampling: the format's rules would forbid <|endoftext|> inside a comment.
    results = await eos_engine.generate(_requests(sampling=SamplingSettings(temperature=1.0, top_p=1.0,
                                                                            max_new_tokens=300, constrain_tags=False)))
    assert all(r.finished for r in results)  # P(a row runs 300 steps without eos) = 0.9**300
    assert all(END_OF_TEXT not in r.text and r.new_tokens < 300 for r in results)
    assert len({r.new_tokens for r in results}) > 1  # rows stop independently
    capped = await eos_engine.generate([GenerationRequest("x", s, SamplingSettings(max_new_tokens=1, constrain_tags=False))
                                        for s in range(8)])
    assert all(r.finished == (r.new_tokens == 0) for r in capped)


def _greedy_reference(path, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding with full forward passes (no cache, no padding)."""
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


async def test_top_k_1_and_temperature_0_are_greedy(engine, tiny_path):
    # A batch of prompts of different lengths: greedy must match unpadded, uncached decoding token for token,
    # which checks left padding, position ids from the mask and the KV cache.
    n = 12
    k1 = await engine.generate(_requests(sampling=SamplingSettings(top_k=1, max_new_tokens=n, constrain_tags=False)))
    t0 = await engine.generate(_requests(seed=50, sampling=SamplingSettings(temperature=0, max_new_tokens=n,
                                                                            constrain_tags=False)))
    tokenizer = engine._tokenizer
    for text, a, b in zip(PROMPTS, k1, t0, strict=True):
        reference = _greedy_reference(tiny_path, tokenizer.encode(text), n)
        eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        if eos in reference:
            reference = reference[: reference.index(eos)]
        assert list(a.token_ids) == reference
        assert b.token_ids == a.token_ids


async def test_long_prompt_is_cut_from_the_left(engine):
    long_prompt = "The comments here are missing the point. " * 200  # far beyond the 512-token context
    (r,) = await engine.generate([GenerationRequest(long_prompt, 0, SamplingSettings(max_new_tokens=20))])
    assert r.prompt_tokens == 512 - 20 and r.new_tokens == 20
    (r,) = await engine.generate([GenerationRequest(long_prompt, 0, SamplingSettings(max_new_tokens=1000))])
    assert r.prompt_tokens == 256 and (r.new_tokens == 256 or r.finished)  # half the context is left to generate
    (r,) = await engine.generate([GenerationRequest("", 0, SamplingSettings(max_new_tokens=5))])
    assert r.prompt_tokens == 1  # an empty prompt starts from <|endoftext|>


async def test_event_loop_not_blocked(engine):
    ticks: list[float] = []

    async def ticker():
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = time.perf_counter()
    await engine.generate(_requests(sampling=SamplingSettings(max_new_tokens=150)) * 2)
    elapsed = time.perf_counter() - start
    task.cancel()
    during = [t for t in ticks if start <= t]
    assert elapsed > 0.05, "generation too quick to measure"
    assert len(during) >= 5
    assert max(b - a for a, b in zip(during, during[1:], strict=False)) < max(0.25, elapsed / 4)


async def test_streams_text_on_the_loop_thread(engine):
    seen: dict[int, list[str]] = {}
    loop_thread = threading.get_ident()

    def on_text(index: int, text: str) -> None:
        assert threading.get_ident() == loop_thread
        seen.setdefault(index, []).append(text)

    results = await engine.generate(_requests(sampling=SamplingSettings(max_new_tokens=60)), on_text=on_text)
    await asyncio.sleep(0)  # let the last call_soon_threadsafe callbacks run
    assert sorted(seen) == list(range(len(PROMPTS)))
    for i, r in enumerate(results):
        texts = seen[i]
        assert texts[-1] == r.text.rstrip("\ufffd")
        assert len(texts) >= min(2, r.new_tokens // STREAM_EVERY)
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))


async def test_cancel_stops_and_engine_stays_usable(engine):
    task = asyncio.create_task(engine.generate(_requests(sampling=SamplingSettings(max_new_tokens=500)) * 4))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (r,) = await engine.generate([GenerationRequest("x", 1, SamplingSettings(max_new_tokens=3))])
    assert r.new_tokens == 3 or r.finished


# ----- the sampler -----

def _reference_keep(logits, temperature, top_k, top_p):
    """transformers' warpers (temperature, top-k, top-p) with a full sort: the tokens that may be drawn."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores > float("-inf"), torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("spread", [4.0, 0.3])  # peaked: nucleus inside the 256 candidates; flat: full-sort fallback
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.9, 0, 0.95), (1.0, 0, 0.5), (0.7, 50, 0.9),
                                                               (1.2, 1000, 0.99), (1.0, 0, 1.0)])
def test_sampler_matches_transformers_nucleus(spread, temperature, top_k, top_p):
    torch.manual_seed(0)
    vocab, n_draws = 2000, 4000
    logits = torch.randn(1, vocab) * spread
    allowed, probs = _reference_keep(logits, temperature, top_k, top_p)
    if spread == 0.3 and not top_k and top_p < 1:
        assert probs[0].topk(CANDIDATES).values.sum() < top_p  # this case really takes the fallback
    uniforms = (torch.arange(n_draws, dtype=torch.float64) + 0.5) / n_draws  # a grid: inverse CDF, exactly
    tokens = sample_tokens(logits.expand(n_draws, vocab), uniforms, torch.full((n_draws,), temperature),
                           torch.full((n_draws,), top_k), torch.full((n_draws,), top_p))
    assert allowed[0, tokens].all()  # only tokens inside the nucleus
    counts = torch.bincount(tokens, minlength=vocab).double() / n_draws
    assert (counts - probs[0].double()).abs().max() < 2 / n_draws + 1e-4  # in the right proportions
    assert (counts > 0)[probs[0] > 2 / n_draws].all()  # every token with a visible share is drawn


@pytest.mark.parametrize("draws", [DRAWS, 2])  # the engine's uniforms per step; 2: many rows reach the fallback
@pytest.mark.parametrize(("spread", "temperature", "top_p"), [(4.0, 0.9, 0.95), (0.3, 1.0, 0.5), (2.0, 1.2, 0.3)])
def test_rejection_nucleus_draws_the_nucleus_distribution(draws, spread, temperature, top_p):
    """Several uniforms per row: top-p by rejection (then the histogram path for rows rejected every time) must draw
    only nucleus tokens, in transformers' proportions (a statistical check: 4 standard errors)."""
    torch.manual_seed(4)
    vocab, n_draws = 500, 20_000
    logits = torch.randn(1, vocab) * spread
    allowed, probs = _reference_keep(logits, temperature, 0, top_p)
    generator = torch.Generator().manual_seed(5)
    uniforms = torch.rand(n_draws, draws, dtype=torch.float64, generator=generator)
    tokens = sample_tokens(logits.expand(n_draws, vocab), uniforms, torch.full((n_draws,), temperature),
                           torch.zeros(n_draws, dtype=torch.long), torch.full((n_draws,), top_p))
    assert allowed[0, tokens].all()
    counts = torch.bincount(tokens, minlength=vocab).double() / n_draws
    p = probs[0].double()
    assert ((counts - p).abs() <= 4 * (p * (1 - p) / n_draws).sqrt() + 1e-4).all()


def test_rejection_nucleus_rows_are_independent_and_seeded():
    """With several uniforms a row's token still depends on its own logits, settings and uniforms only."""
    torch.manual_seed(6)
    logits = torch.randn(6, 50_257) * torch.tensor([0.3, 0.55, 2.0, 5.0, 0.55, 1.0]).unsqueeze(1)
    logits[:, 0] = float("-inf")
    uniforms = torch.rand(6, DRAWS, dtype=torch.float64)
    temperature, top_k, top_p = torch.full((6,), 0.9), torch.zeros(6, dtype=torch.long), torch.tensor(
        [0.9, 0.95, 0.5, 0.9, 0.2, 0.99])
    together = sample_tokens(logits, uniforms, temperature, top_k, top_p)
    alone = [sample_tokens(logits[i:i + 1], uniforms[i:i + 1], temperature[i:i + 1], top_k[i:i + 1],
                           top_p[i:i + 1]) for i in range(6)]
    assert together.tolist() == torch.cat(alone).tolist()
    assert (together != 0).all()
    allowed = torch.stack([_reference_keep(logits[i:i + 1], 0.9, 0, float(top_p[i]))[0][0] for i in range(6)])
    assert allowed[torch.arange(6), together].all()


def test_sampler_rows_are_independent_and_greedy():
    torch.manual_seed(1)
    logits = torch.randn(4, 700) * 2
    uniforms = torch.rand(4, dtype=torch.float64)
    temperature, top_k, top_p = torch.tensor([0.9, 0.0, 1.1, 0.5]), torch.tensor([0, 0, 1, 300]), torch.tensor(
        [0.95, 0.9, 0.9, 1.0])
    together = sample_tokens(logits, uniforms, temperature, top_k, top_p)
    alone = [sample_tokens(logits[i:i + 1], uniforms[i:i + 1], temperature[i:i + 1], top_k[i:i + 1],
                           top_p[i:i + 1]) for i in range(4)]
    assert together.tolist() == torch.cat(alone).tolist()
    assert together[1] == logits[1].argmax() and together[2] == logits[2].argmax()


def test_settings_are_validated():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)


# ----- the forward pass against transformers -----

def _hf_last_logits(model, seqs: list[list[int]], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits per sequence: each alone (no cache, no padding), and all together left-padded."""
    alone = torch.stack([model(torch.tensor([s])).logits[0, -1, :vocab] for s in seqs])
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1, :vocab]
    return alone, padded


@pytest.mark.parametrize("untied", [False, True])
def test_forward_matches_transformers(tiny_path, tmp_path, untied):
    """CachedGPT2 (prefill of ragged groups, decode steps at ragged positions, a slot move) vs transformers."""
    path = tiny_path
    if untied:  # an untied output layer and a padded embedding: the other weight layout
        path = build_tiny_checkpoint(tmp_path / "untied", vocab_size=640, seed=3)
        model = GPT2LMHeadModel.from_pretrained(path)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.1)
    else:
        model = GPT2LMHeadModel.from_pretrained(path)
    model.eval()
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    seqs = [tokenizer.encode(p) for p in PROMPTS] + [tokenizer.encode("Ask HN: why?")]
    forward = CachedGPT2(model, slots=6, vocab=vocab)
    with torch.inference_mode():
        ours = torch.cat([forward.prefill(0, seqs[:3]), forward.prefill(3, seqs[3:])])
        alone, padded = _hf_last_logits(model, seqs, vocab)
        assert (ours - alone).abs().max() < 1e-4 and (ours - padded).abs().max() < 1e-4
        gen = torch.Generator().manual_seed(0)
        for step in range(6):
            if step == 3:  # row 1 leaves; the last row moves into its slot, as the engine does
                forward.move(len(seqs) - 1, 1, len(seqs[-1]))
                seqs[1] = seqs.pop()
            tokens = torch.randint(0, vocab, (len(seqs),), generator=gen)
            positions = torch.tensor([len(s) for s in seqs])
            for s, t in zip(seqs, tokens.tolist(), strict=True):
                s.append(t)
            ours = forward.decode(tokens, positions)
            alone, padded = _hf_last_logits(model, seqs, vocab)
            assert (ours - alone).abs().max() < 1e-4, step
            assert (ours - padded).abs().max() < 1e-4, step
    assert forward.capacity >= max(len(s) for s in seqs) and forward.k.shape[1] == 6


def test_cache_grows_without_losing_entries(tiny_path):
    model = GPT2LMHeadModel.from_pretrained(tiny_path).eval()
    forward = CachedGPT2(model, slots=2)
    with torch.inference_mode():
        forward.prefill(0, [[5, 6, 7]])
        before = forward.k[:, 0, :, :3].clone()
        forward.reserve(300)
        assert forward.capacity == 384 and torch.equal(forward.k[:, 0, :, :3], before)
        with pytest.raises(ValueError):
            forward.reserve(513)


# ----- continuous batching and streaming -----

def _long(n: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=n, ignore_eos=True)


async def test_short_request_joins_a_running_batch_and_finishes_first(engine):
    done: list[str] = []
    started = asyncio.Event()
    long_request = GenerationRequest(PROMPTS[1], 5, _long(300))
    long_task = engine.submit(long_request, on_text=lambda _: started.set())
    long_task.add_done_callback(lambda _: done.append("long"))
    await started.wait()  # the long request is decoding
    short_request = GenerationRequest(PROMPTS[0], 6, _long(10))
    short = await engine.submit(short_request)
    done.append("short")
    long_result = await long_task
    assert done == ["short", "long"]
    assert short == (await engine.generate([short_request]))[0]  # joining mid-batch changes nothing
    assert long_result == (await engine.generate([long_request]))[0]
    assert long_result.new_tokens == 300 and not long_result.finished and short.new_tokens == 10


async def test_slots_free_up_for_waiting_requests(tiny_path):
    engine = Engine(tiny_path, threads=1, max_batch=2)
    await engine.start()
    widths: list[int] = []
    step = engine._step

    def counting_step() -> None:
        widths.append(len(engine._rows))
        step()

    engine._step = counting_step
    try:
        requests = [GenerationRequest(PROMPTS[0], 1, _long(200)), GenerationRequest(PROMPTS[1], 2, _long(5)),
                    GenerationRequest(PROMPTS[2], 3, _long(5)), GenerationRequest(PROMPTS[3], 4, _long(5))]
        order: list[int] = []
        futures = [engine.submit(r) for r in requests]
        for i, f in enumerate(futures):
            f.add_done_callback(lambda _, i=i: order.append(i))
        results = await asyncio.gather(*futures)
        assert order == [1, 2, 3, 0]  # the short ones took turns in the second slot while the long one ran
        assert max(widths) == 2 and engine.in_flight == 0
        alone = [(await engine.generate([r]))[0] for r in requests]
        assert results == alone
    finally:
        await engine.close()


async def test_token_budget_bounds_the_batch(tiny_path):
    budget = 150
    engine = Engine(tiny_path, threads=1, token_budget=budget)
    await engine.start()
    used: list[int] = []
    step = engine._step

    def counting_step() -> None:
        used.append((len(engine._rows), sum(row.cost for row in engine._rows)))
        step()

    engine._step = counting_step
    try:
        results = await engine.generate(_requests(sampling=_long(60)))
        assert all(r.new_tokens == 60 for r in results)
        assert all(cost <= budget or rows == 1 for rows, cost in used)
        assert max(rows for rows, _ in used) < len(PROMPTS) and len(used) > 60  # never all four at once
        (big,) = await engine.generate([GenerationRequest(PROMPTS[0], 0, _long(budget + 10))])
        assert big.new_tokens == budget + 10  # alone, a request larger than the budget still runs
    finally:
        await engine.close()


async def test_stream_yields_the_text_in_pieces(engine):
    request = GenerationRequest(PROMPTS[2], 11, SamplingSettings(max_new_tokens=80))
    pieces = [piece async for piece in engine.stream(request)]
    (result,) = await engine.generate([request])
    assert "".join(pieces) == result.text
    assert len(pieces) >= min(2, result.new_tokens // STREAM_EVERY) and all(pieces)


async def test_leaving_a_stream_early_cancels_the_request(engine):
    request = GenerationRequest(PROMPTS[0], 12, _long(400))
    async with contextlib.aclosing(engine.stream(request)) as pieces:
        async for _ in pieces:
            break
    await asyncio.sleep(0)  # the future's done callbacks
    assert engine.in_flight == 0
    async for _ in engine.stream(request):  # without aclosing: closed when the generator is collected
        break
    for _ in range(3):
        await asyncio.sleep(0)
    assert engine.in_flight == 0
    (r,) = await engine.generate([GenerationRequest("x", 1, SamplingSettings(max_new_tokens=3))])
    assert r.new_tokens == 3 or r.finished


async def test_cancelled_submit_frees_its_slot(engine):
    future = engine.submit(GenerationRequest(PROMPTS[0], 13, _long(500)))
    await asyncio.sleep(0.02)
    future.cancel()
    await asyncio.sleep(0)
    assert engine.in_flight == 0
    results = await engine.generate(_requests(sampling=SamplingSettings(max_new_tokens=5)))
    assert len(results) == len(PROMPTS)


async def test_ignore_eos_runs_to_the_limit(eos_engine):
    results = await eos_engine.generate(_requests(sampling=SamplingSettings(temperature=1.0, top_p=1.0,
                                                                            max_new_tokens=60, ignore_eos=True)))
    assert all(r.new_tokens == 60 and not r.finished for r in results)


async def test_an_engine_error_fails_the_batch_and_the_engine_recovers(tiny_path):
    engine = Engine(tiny_path, threads=1)
    await engine.start()
    try:
        decode = engine._model.decode
        calls = 0

        def failing(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("boom")
            return decode(*args, **kwargs)

        engine._model.decode = failing
        with pytest.raises(RuntimeError, match="boom"):
            await engine.generate(_requests(sampling=_long(10)))
        results = await engine.generate(_requests(sampling=_long(10)))
        assert all(r.new_tokens == 10 for r in results) and engine.in_flight == 0
    finally:
        await engine.close()


async def test_closed_engine_refuses_requests(tiny_path):
    engine = Engine(tiny_path, threads=1)
    await engine.start()
    pending = engine.submit(GenerationRequest("x", 1, _long(20)))
    await engine.close()  # waits for the running request
    assert (await pending).new_tokens == 20
    with pytest.raises(RuntimeError):
        engine.submit(GenerationRequest("x", 1, _long(2)))


# ----- the sampler at full vocabulary size -----

def test_sampler_never_sorts_a_gpt2_sized_vocabulary(monkeypatch):
    """Batch 32 over 50k tokens, flat (random-weight, with and without a masked token) and peaked logits: the top-p
    path must not sort."""
    sort = torch.sort

    def no_full_sort(t, *args, **kwargs):
        assert t.shape[-1] < 1000, "a full sort"
        return sort(t, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", no_full_sort)
    monkeypatch.setattr(torch.Tensor, "sort", no_full_sort)
    torch.manual_seed(2)
    rows, vocab = 32, 50_259
    drawn = []
    for spread, masked in ((0.55, False), (0.3, True), (5.0, False)):
        logits = torch.randn(rows, vocab) * spread
        if masked:  # <|endoftext|> under ignore_eos: -inf must not stretch the histogram
            logits[:, 0] = float("-inf")
        temperature, top_p = torch.full((rows,), 0.9), torch.full((rows,), 0.9)
        drawn.append((logits, sample_tokens(logits, torch.rand(rows, dtype=torch.float64), temperature,
                                            torch.zeros(rows, dtype=torch.long), top_p)))
    monkeypatch.undo()
    for logits, tokens in drawn:
        allowed, _ = _reference_keep(logits, 0.9, 0, 0.9)
        assert allowed[torch.arange(rows), tokens].all()


@pytest.mark.parametrize("candidates", [0, 3])  # the sort fallback for every row; a mix of both paths
def test_sampler_fallback_matches_transformers(candidates):
    torch.manual_seed(3)
    vocab, n_draws = 3000, 3000
    logits = torch.randn(1, vocab) * 0.3
    allowed, probs = _reference_keep(logits, 1.0, 0, 0.8)
    uniforms = (torch.arange(n_draws, dtype=torch.float64) + 0.5) / n_draws
    tokens = sample_tokens(logits.expand(n_draws, vocab), uniforms, torch.ones(n_draws),
                           torch.zeros(n_draws, dtype=torch.long), torch.full((n_draws,), 0.8),
                           candidates=candidates)
    assert allowed[0, tokens].all()
    counts = torch.bincount(tokens, minlength=vocab).double() / n_draws
    assert (counts - probs[0].double()).abs().max() < 2 / n_draws + 1e-4


def test_sampler_with_masked_tokens_and_ties():
    logits = torch.zeros(2, 1000)
    logits[:, 0] = float("-inf")  # e.g. <|endoftext|> under ignore_eos
    logits[1, 5:10] = 10.0  # five tied favourites holding 99 % (ties at the cut-off are all kept)
    tokens = sample_tokens(logits, torch.tensor([0.999, 0.5], dtype=torch.float64), torch.ones(2),
                           torch.zeros(2, dtype=torch.long), torch.tensor([0.5, 0.5]))
    assert tokens[0] != 0 and 5 <= tokens[1] < 10


async def test_loads_a_tokenizer_whose_unknown_token_is_end_of_text(tiny_path, tmp_path):
    """The training pipeline's tokenizers use <|endoftext|> as their unk token: still a known special token."""
    from transformers import AutoTokenizer

    path = tmp_path / "unk"
    shutil.copytree(tiny_path, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.unk_token = END_OF_TEXT
    tokenizer.save_pretrained(path)
    engine = Engine(path, threads=1)
    await engine.start()
    try:
        (r,) = await engine.generate([GenerationRequest("x", 1, SamplingSettings(max_new_tokens=3))])
        assert r.new_tokens == 3 or r.finished
    finally:
        await engine.close()


def test_forward_in_bfloat16_stays_close(tiny_path):
    """bf16 on CPU (packed oneDNN/AMX matrices, SDPA attention): close to fp32 transformers."""
    reference = GPT2LMHeadModel.from_pretrained(tiny_path).eval()
    forward = CachedGPT2(GPT2LMHeadModel.from_pretrained(tiny_path, dtype=torch.bfloat16).eval(), slots=3)
    tokenizer = build_tokenizer()
    seqs = [tokenizer.encode(p) for p in PROMPTS[:3]]
    with torch.inference_mode():
        ours = forward.prefill(0, seqs).float()
        alone, _ = _hf_last_logits(reference, seqs, forward.vocab)
        assert ours.dtype == torch.float32 and (ours - alone).abs().max() < 0.05
        for n in (3, 1):  # batched rows, then one row alone
            tokens = torch.tensor([7, 8, 9][:n])
            ours = forward.decode(tokens, torch.tensor([len(s) for s in seqs[:n]])).float()
            for s, t in zip(seqs, tokens.tolist(), strict=False):
                s.append(t)
            alone, _ = _hf_last_logits(reference, seqs[:n], forward.vocab)
            assert (ours - alone).abs().max() < 0.05
            seqs = seqs[:n]


@pytest.mark.parametrize(("mkl_one_row", "row_kernel"), [(True, True), (False, True), (False, False)],
                         ids=["intel", "amd", "amd without a compiler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_matrix_kernel_computes_the_same_product(dtype, mkl_one_row, row_kernel, monkeypatch):
    """_Linear picks a kernel by row count (packed oneDNN weights, bf16 only where oneDNN packs it; for one fp32 row
    MKL over [in, out] on Intel, and on AMD the compiled row kernel for up to two rows, or weights packed for one row
    where it cannot be built; F.linear elsewhere): each must give x @ W.T + b for every row count the engine uses,
    whichever choice this machine would make."""
    from model import engine as engine_module
    from model import rowkernel
    from model.engine import _Linear, _packing_rows

    monkeypatch.setattr(engine_module, "mkl_reads_one_row_fastest", lambda: mkl_one_row)
    if not row_kernel:
        monkeypatch.setattr(rowkernel, "load", lambda: None)
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
    variants = {"packed": _Linear(weight, bias, pack=_packing_rows(4, dtype), single_row=dtype == torch.float32),
                "plain": _Linear(weight, bias, pack=None, single_row=False)}
    if _packing_rows(4, dtype) is not None:
        packed = variants["packed"]
        assert packed.packed is not None
        layouts = (packed.in_out is not None, packed.few_rows is not None, packed.packed_one_row is not None)
        if dtype == torch.float32:  # exactly one of the small-row layouts, the vendor's
            kernel = not mkl_one_row and rowkernel.load() is not None
            assert layouts == (mkl_one_row, kernel, not mkl_one_row and not kernel)
        else:
            assert layouts == (False, False, False)
    variants["no bias"] = _Linear(weight, None, pack=_packing_rows(4, dtype), single_row=dtype == torch.float32)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    for rows in (1, 2, 3, 4, 7, 32):
        x, residual = torch.randn(rows, 64).to(dtype), torch.randn(rows, 96).to(dtype)
        for name, matrix in variants.items():
            product = F.linear(x.float(), weight.float(), None if name == "no bias" else bias.float())
            # plain, then with the fused tanh GELU, then with the fused residual add
            assert (matrix(x).float() - product).abs().max() < tolerance, (name, rows)
            gelu = F.gelu(product, approximate="tanh")
            assert (matrix(x, gelu=True).float() - gelu).abs().max() < tolerance, (name, rows, "gelu")
            added = product + residual.float()
            assert (matrix(x, add=residual).float() - added).abs().max() < 2 * tolerance, (name, rows, "add")


def test_int8_matrices_match_fp32_closely_and_rows_do_not_depend_on_the_batch(tiny_path):
    """dtype="int8": int8 weights (a scale per output) times int8 activations (a scale per row), summed exactly in
    int32: within ~1 % of the fp32 product, and a row's logits are the same bits alone or in any batch."""
    from model.engine import _int8_linear, _int8_weight, int8_model

    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(32, 64)
    q, scale = _int8_weight(weight)
    full = _int8_linear(x, q, scale, bias)
    exact = F.linear(x, weight, bias)
    assert (full - exact).norm() / exact.norm() < 0.02
    for rows in (1, 2, 3, 7):
        assert torch.equal(_int8_linear(x[:rows], q, scale, bias), full[:rows])

    model = GPT2LMHeadModel.from_pretrained(tiny_path).eval()
    fp32 = CachedGPT2(model, slots=4)
    int8 = CachedGPT2(model, slots=4, int8=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    with torch.inference_mode():
        together = int8.prefill(0, prompts)
        alone = torch.cat([int8.prefill(3, [p]) for p in prompts])  # slot 3, one prompt at a time
        reference = fp32.prefill(0, prompts)
        step = int8.decode(torch.tensor([1, 2, 3]), torch.full((3,), 4), 5, ragged=False)
        int8.prefill(0, prompts[:1])
        step_alone = int8.decode(torch.tensor([1]), torch.full((1,), 4), 5, ragged=False)
        # transformers' own forward with int8_model's modules computes the same numbers
        scored = int8_model(GPT2LMHeadModel.from_pretrained(tiny_path).eval())(torch.tensor(prompts)).logits
    assert torch.equal(together, alone) and torch.equal(step[:1], step_alone)
    assert (together - reference).abs().max() < 0.05 * reference.abs().max()
    assert (scored[:, -1] - together).abs().max() < 1e-4


async def test_engine_runs_int8_on_request(tiny_path):
    engine = Engine(tiny_path, dtype="int8", threads=1)
    await engine.start()
    try:
        assert engine.info["dtype"] == "int8"
        sampling = SamplingSettings(max_new_tokens=12)
        [one] = await engine.generate([GenerationRequest(PROMPTS[0], 3, sampling)])
        together = await engine.generate([GenerationRequest(p, 3, sampling) for p in PROMPTS[:3]])
        assert one.new_tokens > 0 and together[0].token_ids == one.token_ids
    finally:
        await engine.close()
    with pytest.raises(ValueError, match="unknown dtype"):
        Engine(tiny_path, dtype="int4")._resolve_dtype(torch.device("cpu"))


def test_loading_frees_the_checkpoint_matrices_it_does_not_read(tiny_path):
    """With release, CachedGPT2 empties each checkpoint matrix once it holds its own copy, and keeps (without
    copying) the ones it reads directly: GPT-2's [in, out] layout for single fp32 rows (where MKL reads it fastest)."""
    from model.engine import _packing_rows, mkl_reads_one_row_fastest

    for dtype in (torch.float32, torch.bfloat16):
        model = GPT2LMHeadModel.from_pretrained(tiny_path, dtype=dtype).eval()
        kept = model.transformer.h[0].mlp.c_fc.weight.data_ptr()
        forward = CachedGPT2(model, slots=4, release=True)
        weight = model.transformer.h[0].mlp.c_fc.weight
        if _packing_rows(4, dtype) is not None and dtype == torch.bfloat16:
            assert weight.numel() == 0  # packed: the checkpoint's copy is gone
        elif _packing_rows(4) is not None and mkl_reads_one_row_fastest():
            assert forward.layers[0][6].in_out.data_ptr() == kept  # read in place for one row, not copied
        elif _packing_rows(4) is not None:
            assert weight.numel() == 0  # AMD: its own copy for the row kernel (or packed for one row), not this one
        assert model.transformer.wte.weight.numel() > 0  # the embedding is always read


async def test_the_kv_cache_is_allocated_once(engine):
    await engine.generate(_requests(sampling=_long(40)))
    k, v, capacity = engine._model.k, engine._model.v, engine._model.capacity
    await engine.generate(_requests(seed=5, sampling=_long(40)) * 3)  # more rows, the same lengths
    assert engine._model.k is k and engine._model.v is v and engine._model.capacity == capacity
    assert k.shape[:3] == (2, engine.max_batch, 2) and k.shape[4] == 32  # layers, slots, heads, ..., head_dim


def test_decode_without_a_mask_when_rows_are_level(tiny_path):
    model = GPT2LMHeadModel.from_pretrained(tiny_path).eval()
    forward = CachedGPT2(model, slots=3)
    with torch.inference_mode():
        forward.prefill(0, [[5, 6, 7], [8, 9, 10], [11, 12, 13]])
        tokens, positions = torch.tensor([1, 2, 3]), torch.tensor([3, 3, 3])
        masked = forward.decode(tokens, positions, 4)
        plain = forward.decode(tokens, positions, 4, ragged=False)
    assert torch.equal(masked, plain) or (masked - plain).abs().max() < 1e-6


# ----- format-constrained sampling -----

STRUCTURAL = ("stray_close", "stray_text", "after_end", "excess_children", "empty")  # not "duplicate": a content rule


def _faults(result: GenerationResult) -> dict[str, int]:
    parsed = parse_generation(result.text, result.finished)
    faults = {k: parsed.problems[k] for k in STRUCTURAL if parsed.problems[k]}
    if result.finished and (parsed.problems["unclosed"] or parsed.comment_count == 0):
        faults["ended_badly"] = 1
    return faults


async def test_constrained_sampling_writes_only_valid_trees(tag_engine):
    free = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=120, constrain_tags=False)
    constrained = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=120)
    titles = [prompt(f"Story number {i}") for i in range(24)]
    unconstrained = await tag_engine.generate([GenerationRequest(t, i, free) for i, t in enumerate(titles)])
    assert sum(bool(_faults(r)) for r in unconstrained) > 12  # the model alone breaks most trees
    results = await tag_engine.generate([GenerationRequest(t, i, constrained) for i, t in enumerate(titles)])
    assert [_faults(r) for r in results] == [{}] * len(results)
    assert sum(r.finished for r in results) > 12
    # ... and in a batch that mixes constrained and free rows, each row keeps its own rules
    mixed = await tag_engine.generate([GenerationRequest(t, i, constrained if i % 2 else free)
                                       for i, t in enumerate(titles)])
    assert all(not _faults(r) for r in mixed[1::2])


async def test_constrained_sampling_caps_replies_and_respects_the_prompt(tag_engine):
    # The prompt already holds ten top-level comments, the last one open with a reply begun: once they close, the
    # story can take no eleventh comment.
    ten = "".join(f"{OPEN}comment {i}{CLOSE}" for i in range(10)).removesuffix(CLOSE) + f"{OPEN}a reply to come:"
    opened = prompt("T").removesuffix(OPEN) + ten
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=200)
    results = await tag_engine.generate([GenerationRequest(opened, seed, sampling) for seed in range(12)])
    for r in results:
        parsed = parse_generation(ten.removeprefix(OPEN) + f"{OPEN}a reply to come:" + r.text, r.finished)
        assert not parsed.problems["excess_children"] and not parsed.problems["stray_close"]


async def test_a_resumed_request_continues_after_what_it_had_written(tag_engine, tiny_path):
    """A job resumed after a crash passes the text it had written: the engine continues after it under the same
    rules (here: inside the open second comment), counts it against max_new_tokens, and streams and returns it as
    the start of the text."""
    written = f"first comment{CLOSE}{OPEN}a second one, still open:"
    n_written = len(AutoTokenizer.from_pretrained(tiny_path).encode(written, add_special_tokens=False))
    streamed: dict[int, list[str]] = {}
    for guidance in (1.0, 2.0):  # with guidance, the untitled shadow row continues the same text
        sampling = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=n_written + 40,
                                    guidance_scale=guidance)
        requests = [GenerationRequest(prompt(f"Story {seed}"), seed, sampling, written=written) for seed in range(8)]
        streamed.clear()
        results = await tag_engine.generate(requests, on_text=lambda i, t: streamed.setdefault(i, []).append(t))
        for i, r in enumerate(results):
            assert r.text.startswith(written) and r.new_tokens <= 40
            assert streamed[i] and all(t.startswith(written) for t in streamed[i])
            assert _faults(r) == {}  # the rules picked up inside the second comment: no stray close, no excess
            parsed = parse_generation(r.text, r.finished)
            assert parsed.comments[0].text == "first comment"
            assert parsed.comments[1].text.startswith("a second one, still open:")
        assert len({r.text for r in results}) > 1  # not a copy of the written text: the seeds continue it


async def test_constrained_sampling_with_ignore_eos_runs_to_the_limit(tag_engine):
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=150, ignore_eos=True)
    results = await tag_engine.generate([GenerationRequest(prompt("T"), seed, sampling) for seed in range(6)])
    assert all(r.new_tokens == 150 and not r.finished for r in results)


# ----- precision -----

def test_cpu_default_precision_is_float32(tiny_path):
    assert Engine(tiny_path, device="cpu")._resolve_dtype(torch.device("cpu")) == torch.float32
    assert Engine(tiny_path, dtype="bf16")._resolve_dtype(torch.device("cpu")) == torch.bfloat16


async def test_bfloat16_engine_is_deterministic_and_writes_valid_trees(tiny_path):
    engine = Engine(tiny_path, threads=1, dtype="bfloat16")
    await engine.start()
    try:
        requests = [GenerationRequest(prompt(f"Title {i}"), i, SamplingSettings(max_new_tokens=40)) for i in range(6)]
        first, again = await engine.generate(requests), await engine.generate(requests)
        assert [r.text for r in first] == [r.text for r in again]
        assert all(not _faults(r) for r in first)
    finally:
        await engine.close()


# ----- classifier-free guidance -----

def _guided_greedy_reference(path, prompt_ids: list[int], untitled_ids: list[int], scale: float, n: int) -> list[int]:
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    cond, uncond, out = list(prompt_ids), list(untitled_ids), []
    with torch.inference_mode():
        for _ in range(n):
            c = torch.log_softmax(model(torch.tensor([cond])).logits[0, -1], -1)
            u = torch.log_softmax(model(torch.tensor([uncond])).logits[0, -1], -1)
            token = int((u + scale * (c - u)).argmax())
            out.append(token)
            cond.append(token)
            uncond.append(token)
    return out


async def test_guidance_matches_a_reference_and_leaves_other_rows_alone(engine, tiny_path):
    from model.format import without_header

    n, text = 10, prompt("Show HN: A tiny search engine", "https://example.com")
    greedy = SamplingSettings(temperature=0, max_new_tokens=n, constrain_tags=False)
    guided = SamplingSettings(temperature=0, max_new_tokens=n, constrain_tags=False, guidance_scale=2.5)
    plain = [GenerationRequest(p, i, SHORT) for i, p in enumerate(PROMPTS)]
    alone = await engine.generate(plain)
    together = await engine.generate([GenerationRequest(text, 0, guided), *plain, GenerationRequest(text, 0, greedy)])
    tokenizer = engine._tokenizer
    ids, untitled = tokenizer.encode(text), tokenizer.encode(without_header(text))
    assert untitled != ids
    reference = _guided_greedy_reference(tiny_path, ids, untitled, 2.5, n)
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if eos in reference:
        reference = reference[: reference.index(eos)]
    assert list(together[0].token_ids) == reference
    assert list(together[-1].token_ids) != reference  # guidance changed the greedy path
    assert [r.text for r in together[1:-1]] == [r.text for r in alone]  # the other rows are untouched


async def test_guided_requests_are_reproducible_and_use_two_slots(tiny_path):
    engine = Engine(tiny_path, threads=1, dtype="float32", max_batch=4)
    await engine.start()
    try:
        sampling = SamplingSettings(max_new_tokens=30, guidance_scale=1.5)
        requests = [GenerationRequest(prompt(f"Title {i}"), i, sampling) for i in range(5)]
        first = await engine.generate(requests)
        again = await engine.generate(requests[::-1])  # other neighbours, other slots
        assert [r.text for r in first] == [r.text for r in again[::-1]]
        assert all(r.new_tokens > 0 and not _faults(r) for r in first)
        started = engine.submit(requests[0])
        await asyncio.sleep(0)
        engine.submit(requests[1]).cancel()
        await started
        for _ in range(200):  # the engine thread retires rows just after delivering
            if not engine._rows and not engine._waiting:
                break
            await asyncio.sleep(0.01)
        assert engine.in_flight == 0 and not engine._rows  # both rows of each request left
    finally:
        await engine.close()


async def test_guidance_needs_two_slots_and_is_skipped_with_one(tiny_path):
    engine = Engine(tiny_path, threads=1, dtype="float32", max_batch=1)
    await engine.start()
    try:
        request = GenerationRequest(prompt("T"), 3, SamplingSettings(max_new_tokens=12, guidance_scale=2.0))
        unguided = GenerationRequest(prompt("T"), 3, SamplingSettings(max_new_tokens=12))
        [a], [b] = await engine.generate([request]), await engine.generate([unguided])
        assert a.text == b.text
    finally:
        await engine.close()


def test_guidance_scale_is_validated():
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplingSettings(guidance_scale=-1)


def test_one_row_kernel_follows_the_cpu_vendor(monkeypatch):
    from model import engine as engine_module

    assert engine_module._cpu_vendor() in ("GenuineIntel", "AuthenticAMD", "")  # the machines this project uses
    for vendor, mkl in (("GenuineIntel", True), ("AuthenticAMD", False), ("", True)):
        monkeypatch.setattr(engine_module, "_cpu_vendor", lambda v=vendor: v)
        assert engine_module.mkl_reads_one_row_fastest() is mkl


def test_on_passing_thread_returns_raises_and_leaves_no_thread_behind():
    """Parallel torch work beside an engine runs on a thread that ends (its OpenMP workers end with it)."""
    from model.engine import on_passing_thread

    # Other tests' threads (aiosqlite, executors) may end meanwhile, so count only the threads this test made.
    ran_on: list[threading.Thread] = []

    def add(a, b=0):
        ran_on.append(threading.current_thread())
        return a + b

    def fail():
        ran_on.append(threading.current_thread())
        return {}["gone"]

    assert on_passing_thread(add, 2, b=3) == 5
    with pytest.raises(KeyError, match="gone"):
        on_passing_thread(fail)
    assert [t.name for t in ran_on] == ["hnaas-passing", "hnaas-passing"]
    assert threading.current_thread() not in ran_on
    assert not any(t.is_alive() for t in ran_on)
