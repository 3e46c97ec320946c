"""`hnaas bench` end to end on the tiny shape with tiny sizes: it runs and reports what it promises (no timing)."""

import argparse
import json

import pytest

from model import bench

BATCHES = ("1", "2")


@pytest.fixture(scope="module")
def result():
    return bench.run_bench("tiny", batches=(1, 2), prompt_len=8, new_tokens=6, repeats=1, threads=1,
                           comment_tokens=4)


def test_reports_the_required_keys(result):
    for key in ("engine_tok_per_s", "generate_tok_per_s", "speedup_vs_generate", "engine_fraction_of_limit"):
        assert tuple(result[key]) == BATCHES, key
        assert all(v > 0 for v in result[key].values()), key
    limits = result["limits"]
    assert limits["memory_bandwidth_gb_s"] > 0 and limits["matmul_gflop_s"] > 0
    assert tuple(limits["tok_per_s"]) == BATCHES and limits["weight_bytes"] > 0
    assert result["first_token_s"] > 0 and result["first_comment_s"] > 0 and result["first_comment_busy_s"] > 0
    assert "random weights" in result["first_comment_basis"]
    assert result["peak_memory_mb"]["engine"] > 0 and result["peak_memory_mb"]["generate"] > 0
    assert result["model"]["shape"] == "tiny" and result["model"]["vocab_size"] == 600
    assert result["settings"]["new_tokens"] == 6 and result["machine"]["torch_threads"] == 1
    for b in BATCHES:  # threads of new_tokens (6) each
        assert result["threads_per_minute"][b] == pytest.approx(result["engine_tok_per_s"][b] * 10, rel=0.01)


def test_continuous_batching_gives_the_same_tokens(result):
    c = result["continuous"]
    assert c["requests"] == 16 and len(c["new_tokens"]) == 16
    assert c["one_by_one_s"] > 0 and c["together_s"] > 0 and c["together_max_batch_4_s"] > 0
    assert c["same_tokens_as_alone"] == 16  # tiny vocabulary: no near-ties for rounding to flip


def test_table_and_json(result, capsys, monkeypatch):
    table = bench.format_table(result)
    assert "engine/generate" in table and "first comment" in table

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shape", "tiny", "--batches", "1", "--new-tokens", "3", "--repeats", "1",
                              "--json", "--no-continuous", "--no-generate", "--threads", "1"])
    monkeypatch.setattr(bench, "measure_limits", lambda *a: {"memory_bandwidth_gb_s": 10.0, "matmul_gflop_s": 100.0})
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert out["engine_tok_per_s"]["1"] > 0 and out["generate_tok_per_s"] == {} and "continuous" not in out


def test_gpt2_shapes_get_the_full_vocabulary():
    tokenizer = bench.synthetic_tokenizer(50_259)
    assert len(tokenizer) == 50_259 and tokenizer.eos_token_id == 50_256
    ids = [5, 17, 50_000]
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids


def test_int8_runs_the_engine_and_generate_with_int8_matrices():
    r = bench.run_bench("tiny", batches=(1, 2), prompt_len=8, new_tokens=6, repeats=1, threads=1, dtype="int8",
                        continuous=False)
    assert r["model"]["dtype"] == "int8" and r["limits"]["matmul_dtype"] == "int8"
    assert all(v > 0 for v in r["speedup_vs_generate"].values())
    # int8 weights, fp32 cache: one byte per weight, four per cached number
    tiny = r["limits"]
    d, layers, vocab = 64, 2, 600
    assert tiny["kv_bytes_per_row_step"] == 2 * layers * d * (8 + 6 / 2) * 4
    assert tiny["weight_bytes"] < (layers * 12 * d * d + vocab * d) * 2
