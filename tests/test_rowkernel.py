"""The compiled few-row matrix kernel: its products, its build cache, and the engine's fallback without it."""

from __future__ import annotations

import logging
import os
import shlex
import shutil

import pytest
import torch
import torch.nn.functional as F

from model import rowkernel

HAVE_COMPILER = shutil.which(shlex.split(os.environ.get("CC") or "cc")[0]) is not None
needs_compiler = pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine")


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """rowkernel.load() as on a first start: nothing cached in this process, an empty cache directory."""
    monkeypatch.setenv("HNAAS_KERNEL_CACHE", str(tmp_path / "kernels"))
    rowkernel.load.cache_clear()
    yield rowkernel.load
    rowkernel.load.cache_clear()


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3])
# inputs: below one vector, whole blocks of 32 (16 for two rows), and each loop followed by a long tail (47, 65)
@pytest.mark.parametrize(("outputs", "inputs"), [(1, 1), (5, 7), (8, 64), (33, 47), (97, 65), (300, 256)])
def test_the_kernel_computes_what_torch_computes(rows, outputs, inputs):
    kernel = rowkernel.load()
    assert kernel is not None  # a compiler is here, so the kernel must build
    torch.manual_seed(rows * 1000 + outputs)
    weight, bias = torch.randn(outputs, inputs), torch.randn(outputs)
    x, residual = torch.randn(rows, inputs), torch.randn(rows, outputs)
    product = F.linear(x, weight, bias)
    tolerance = 1e-5 * (1 + product.abs().max().item())
    assert (rowkernel.linear(kernel, weight, x, bias) - product).abs().max() <= tolerance
    assert (rowkernel.linear(kernel, weight, x) - F.linear(x, weight)).abs().max() <= tolerance
    gelu = rowkernel.linear(kernel, weight, x, bias, gelu=True)
    assert (gelu - F.gelu(product, approximate="tanh")).abs().max() <= tolerance
    added = rowkernel.linear(kernel, weight, x, bias, add=residual)
    assert (added - (product + residual)).abs().max() <= 2 * tolerance
    # a strided input (a column slice) is read correctly, and the result is a fresh [rows, outputs] tensor
    wide = torch.randn(rows, 2 * inputs)
    assert torch.allclose(rowkernel.linear(kernel, weight, wide[:, ::2], bias), F.linear(wide[:, ::2], weight, bias),
                          atol=tolerance, rtol=0)


@needs_compiler
def test_the_kernel_refuses_a_matrix_it_cannot_read():
    kernel = rowkernel.load()
    with pytest.raises(ValueError, match="contiguous fp32"):
        rowkernel.linear(kernel, torch.randn(8, 4).t(), torch.randn(1, 8))
    with pytest.raises(ValueError, match="contiguous fp32"):
        rowkernel.linear(kernel, torch.randn(8, 4, dtype=torch.float64), torch.randn(1, 4))


@needs_compiler
def test_a_build_is_cached_and_reused(fresh_load, tmp_path):
    assert fresh_load() is not None
    [built] = (tmp_path / "kernels").glob("rowkernel-*.so")
    stamp = built.stat().st_mtime_ns
    rowkernel.load.cache_clear()
    assert fresh_load() is not None  # a second start loads the same file instead of compiling again
    assert list((tmp_path / "kernels").glob("rowkernel-*")) == [built] and built.stat().st_mtime_ns == stamp


@needs_compiler
def test_the_kernel_shares_torchs_openmp_runtime():
    """Two OpenMP runtimes in one process would each keep spinning threads on a 2-core machine."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc here")
    assert rowkernel.load() is not None
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes


@pytest.mark.parametrize("env", [{"HNAAS_ROW_KERNEL": "0"}, {"CC": "/nonexistent/cc"}, {"CC": "false"}],
                         ids=["switched off", "no compiler", "compiler fails"])
def test_without_a_kernel_load_says_why_and_gives_none(fresh_load, monkeypatch, caplog, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="model.rowkernel"):
        assert fresh_load() is None
    assert "row kernel" in caplog.text


def test_the_engine_runs_without_the_kernel(monkeypatch, tiny_model):
    """Where no kernel can be built, single rows go through oneDNN or MKL, with the same results."""
    from transformers import GPT2LMHeadModel

    from model import engine as engine_module
    from model.engine import CachedGPT2

    model = GPT2LMHeadModel.from_pretrained(tiny_model).eval()
    outputs = {}
    for available in (True, False):
        monkeypatch.setattr(engine_module, "mkl_reads_one_row_fastest", lambda: False)
        monkeypatch.setattr(rowkernel, "load", (rowkernel.load if available else lambda: None))
        forward = CachedGPT2(model, slots=2)
        uses_kernel = available and HAVE_COMPILER and engine_module._packing_rows(2) is not None
        assert (forward.layers[0][2].few_rows is not None) is uses_kernel
        with torch.inference_mode():
            forward.prefill(0, [[5, 6, 7]])
            outputs[available] = forward.decode(torch.tensor([8]), torch.tensor([3]), 4, ragged=False)
    assert (outputs[True] - outputs[False]).abs().max() < 1e-4


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_fused_blocks_decode_what_the_torch_ops_decode(monkeypatch, tiny_model, rows):
    """CachedGPT2.decode through the compiled blocks gives the torch path's logits and leaves the same keys and
    values in the cache, with each row at its own position (a ragged batch)."""
    from transformers import GPT2LMHeadModel

    from model import engine as engine_module
    from model.engine import CachedGPT2

    monkeypatch.setattr(engine_module, "mkl_reads_one_row_fastest", lambda: False)  # the AMD choice, on any CPU
    model = GPT2LMHeadModel.from_pretrained(tiny_model).eval()
    forward = CachedGPT2(model, slots=4)
    if forward.layers[0][2].packed is None:
        pytest.skip("this torch cannot pack weights, so no one-row path is built")
    blocks = forward.blocks
    assert blocks is not None
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14], [15, 16, 17, 18]][:rows]
    tokens, positions = torch.tensor([3, 4, 5, 6][:rows]), torch.tensor([6, 3, 1, 4][:rows])
    _assert_decodes_alike(forward, "blocks", prompts, tokens, positions)


@needs_compiler
@pytest.mark.parametrize(("rows", "blocks"), [(8, True), (5, True), (3, False), (1, False)])
def test_compiled_attention_decodes_what_the_torch_ops_decode(monkeypatch, tiny_model, rows, blocks):
    """More rows than the fused blocks take (or no blocks, as on Intel): oneDNN's matrices around the compiled
    attention give the torch path's logits and cache, ragged positions included."""
    from transformers import GPT2LMHeadModel

    from model import engine as engine_module
    from model.engine import CachedGPT2

    monkeypatch.setattr(engine_module, "mkl_reads_one_row_fastest", lambda: not blocks)
    forward = CachedGPT2(GPT2LMHeadModel.from_pretrained(tiny_model).eval(), slots=8)
    attention = forward.attention
    assert attention is not None and (forward.blocks is not None) is (blocks and forward.layers[0][2].packed
                                                                      is not None)
    torch.manual_seed(rows)
    prompts = [torch.randint(0, 500, (length,)).tolist() for length in (6, 3, 1, 4, 9, 2, 7, 5)[:rows]]
    positions = torch.tensor([len(p) for p in prompts])
    tokens = torch.randint(0, 500, (rows,))
    _assert_decodes_alike(forward, "attention", prompts, tokens, positions)


def _assert_decodes_alike(forward, kernel: str, prompts, tokens, positions):
    """Prefill, then three decode steps, without and with forward's `kernel` attribute: the same logits, and the same
    keys and values left in the cache."""
    rows, compiled = len(prompts), getattr(forward, kernel)
    results = []
    with torch.inference_mode():
        for use in (None, compiled):
            setattr(forward, kernel, use)
            forward.prefill(0, prompts)
            logits = [forward.decode(tokens, positions)]
            logits.append(forward.decode(tokens + 1, positions + 1))  # reads what the step before wrote
            same = torch.full((rows,), 10)  # every row at one position: the unmasked torch path
            logits.append(forward.decode(tokens + 2, same, 11, ragged=False))
            results.append((torch.cat(logits), forward.k[:, :rows].clone(), forward.v[:, :rows].clone()))
    (ref, ref_k, ref_v), (got, got_k, got_v) = results
    assert (got - ref).abs().max() < 1e-4 * (1 + ref.abs().max())
    assert (got_k - ref_k).abs().max() < 1e-5 and (got_v - ref_v).abs().max() < 1e-5


@needs_compiler
def test_compiled_attention_refuses_what_would_write_out_of_bounds(tiny_model):
    from transformers import GPT2LMHeadModel

    from model.engine import CachedGPT2

    forward = CachedGPT2(GPT2LMHeadModel.from_pretrained(tiny_model).eval(), slots=2)
    forward.reserve(8)
    attention = forward.attention
    for positions in ([forward.capacity, 0], [-1], [0, 1, 2]):
        with pytest.raises(ValueError, match="positions"):
            attention.step(forward.k, forward.v, torch.tensor(positions))
    with pytest.raises(ValueError, match="caches"):
        attention.step(forward.k[:1], forward.v, torch.tensor([0]))
    attend = attention.step(forward.k, forward.v, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="input"):
        attend(0, torch.zeros(2, forward.d))
    assert attend(0, torch.zeros(2, 3 * forward.d)).shape == (2, forward.d)


@needs_compiler
def test_fused_blocks_refuse_what_would_write_out_of_bounds(monkeypatch, tiny_model):
    from transformers import GPT2LMHeadModel

    from model import engine as engine_module
    from model.engine import CachedGPT2

    monkeypatch.setattr(engine_module, "mkl_reads_one_row_fastest", lambda: False)
    forward = CachedGPT2(GPT2LMHeadModel.from_pretrained(tiny_model).eval(), slots=2)
    if forward.blocks is None:
        pytest.skip("this torch cannot pack weights, so no one-row path is built")
    forward.reserve(8)
    x = torch.zeros(1, forward.d)
    for positions in ([forward.capacity], [-1], [0, 1]):
        with pytest.raises(ValueError, match="positions"):
            forward.blocks(x, forward.k, forward.v, torch.tensor(positions))
    with pytest.raises(ValueError, match="input"):
        forward.blocks(torch.zeros(1, forward.d + 1), forward.k, forward.v, torch.tensor([0]))
    with pytest.raises(ValueError, match="caches"):
        forward.blocks(x, forward.k.double(), forward.v, torch.tensor([0]))
    with pytest.raises(ValueError, match="weights"):
        rowkernel.DecodeBlocks(rowkernel.load(), [[torch.ones(4)] * 12], heads=2, eps=1e-5, scales=[1.0])


async def test_the_engine_says_whether_it_uses_the_kernel_and_writes_the_same_thread(monkeypatch, tiny_model):
    from model import engine as engine_module
    from model.engine import Engine, GenerationRequest, SamplingSettings

    monkeypatch.setattr(engine_module, "mkl_reads_one_row_fastest", lambda: False)
    request = GenerationRequest("<|endoftext|>Show HN: A tiny Lisp\n<|c|>", 7, SamplingSettings(max_new_tokens=24))
    results = {}
    for available in (True, False):
        monkeypatch.setattr(rowkernel, "load", (rowkernel.load if available else lambda: None))
        engine = Engine(tiny_model, threads=1)
        await engine.start()
        try:
            assert engine.info["row_kernel"] is (available and HAVE_COMPILER and engine._model.layers[0][2].packed
                                                 is not None)
            assert engine.info["attention_kernel"] is (available and HAVE_COMPILER)
            assert engine.info["sampling_kernel"] is (available and HAVE_COMPILER)
            [results[available]] = await engine.generate([request])
        finally:
            await engine.close()
    assert results[True].new_tokens > 0 and results[True].token_ids == results[False].token_ids


@needs_compiler
@pytest.mark.parametrize("vocab", [1, 7, 300, 8192])
def test_the_sampling_kernel_draws_what_torch_draws(vocab):
    """Same logits, uniforms and settings: the same tokens as engine.sample_tokens, row by row (a token may differ
    only where a uniform falls within a rounding error of a boundary: at most 1 row in 200 is allowed); greedy and
    top-k rows, and rows whose draws all fell outside the nucleus, are left to torch, which sample_tokens then uses."""
    from model.engine import DRAWS, sample_tokens

    kernel = rowkernel.load()
    generator = torch.Generator().manual_seed(vocab)
    compared = differ = 0
    for trial in range(100):
        rows = 1 + trial % 4
        logits = torch.randn(rows, vocab, generator=generator) * (0.3 + 4 * trial / 100)
        if trial % 3 == 0 and vocab > 2:
            logits[:, : vocab // 2] = float("-inf")  # masked tokens, as the format's rules and ignore_eos make
        uniforms = torch.rand(rows, DRAWS, generator=generator, dtype=torch.float64)
        temperature = torch.tensor([0.7, 1.0, 1.3, 0.0])[:rows]  # the fourth row is greedy
        top_k = torch.tensor([0, 0, 0, 0]) if trial % 2 else torch.tensor([0, 5, 0, 0])
        top_p = torch.tensor([0.9, 1.0, 0.5, 0.95])[:rows]
        top_k = top_k[:rows]
        expected = sample_tokens(logits, uniforms, temperature, top_k, top_p)
        got, left = rowkernel.sample(kernel, logits, uniforms, temperature, top_k, top_p)
        assert left == int((got < 0).sum())
        handed_over = (temperature <= 0) | (top_k > 0)
        assert (got[handed_over] == -1).all()
        drawn = got >= 0
        compared += int(drawn.sum())
        differ += int((got[drawn] != expected[drawn]).sum())
        assert ((got[drawn] >= 0) & (got[drawn] < vocab)).all()
        assert torch.isfinite(logits[drawn.nonzero().flatten(), got[drawn]]).all()  # never a masked token
        together = sample_tokens(logits, uniforms, temperature, top_k, top_p, kernels=kernel)
        assert (together[~drawn] == expected[~drawn]).all() and (together[drawn] == got[drawn]).all()
    assert compared >= 150
    assert differ <= compared // 200
    if vocab > 2:  # a uniform of exactly 0 draws the first token that has any probability, never a masked one
        logits = torch.zeros(1, vocab)
        logits[0, :2] = float("-inf")
        token, left = rowkernel.sample(kernel, logits, torch.zeros(1, DRAWS, dtype=torch.float64), torch.ones(1),
                                       torch.zeros(1, dtype=torch.long), torch.ones(1))
        assert (left, token.tolist()) == (0, [2])
