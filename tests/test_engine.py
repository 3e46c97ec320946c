"""The engine against a tiny random-weight GPT-2 built offline (CPU, fp32)."""

import asyncio
import shutil
import threading
import time

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from bot.errors import ModelNotInstalled
from model.engine import (
    CANDIDATES,
    STREAM_EVERY,
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingSettings,
    sample_tokens,
)
from model.format import CLOSE, END_OF_TEXT, OPEN
from model.tiny import SHAPES, build_tiny_checkpoint, gpt2_config

PROMPTS = [
    "Show HN: A tiny search engine",
    "Ask HN: What is the best way to learn about databases in depth? I would start with a book " * 3,
    f"{OPEN}This is neat.{CLOSE}{OPEN}",
    "x",
]
SHORT = SamplingSettings(max_new_tokens=24)
EOS_P = 0.1  # per-step probability of <|endoftext|> in the eos checkpoint (at temperature 1, no cut)


def _start(path, **kwargs) -> Engine:
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
    results = await eos_engine.generate(_requests(sampling=SamplingSettings(temperature=1.0, top_p=1.0,
                                                                            max_new_tokens=300)))
    assert all(r.finished for r in results)  # P(a row runs 300 steps without eos) = 0.9**300
    assert all(END_OF_TEXT not in r.text and r.new_tokens < 300 for r in results)
    assert len({r.new_tokens for r in results}) > 1  # rows stop independently
    capped = await eos_engine.generate([GenerationRequest("x", s, SamplingSettings(max_new_tokens=1)) for s in range(8)])
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
    k1 = await engine.generate(_requests(sampling=SamplingSettings(top_k=1, max_new_tokens=n)))
    t0 = await engine.generate(_requests(seed=50, sampling=SamplingSettings(temperature=0, max_new_tokens=n)))
    tokenizer = engine._tokenizer
    for prompt, a, b in zip(PROMPTS, k1, t0, strict=True):
        reference = _greedy_reference(tiny_path, tokenizer.encode(prompt), n)
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
