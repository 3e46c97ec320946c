"""`hnaas bench` end to end on the tiny shape with tiny sizes: it runs and reports what it promises (no timing)."""

import argparse
import json
import os

import pytest

from model import bench

BATCHES = ("1", "2")
PROBE_BYTES = 64 << 20


class ScriptedProbe:
    """Stands in for LimitProbe where a test needs known limits: the real one measures this machine."""

    readings = [(10.0, 100.0), (30.0, 300.0), (50.0, 200.0)]

    def __init__(self, *args, **kwargs):
        self.results = []

    def measure(self):
        gbs, gflops = self.readings[len(self.results)]
        self.results.append({"memory_bandwidth_gb_s": gbs, "read_sum_gb_s": gbs, "read_mv_gb_s": gbs / 2,
                             "matmul_gflop_s": gflops, "matmul_dtype": "float32"})
        return self.results[-1]

    def close(self):
        pass


@pytest.fixture(scope="module")
def result():
    return bench.run_bench("tiny", batches=(1, 2), prompt_len=8, new_tokens=6, repeats=1, threads=1,
                           comment_tokens=4, probe_bytes=PROBE_BYTES)


def test_reports_the_required_keys(result):
    for key in ("engine_tok_per_s", "generate_tok_per_s", "speedup_vs_generate", "engine_fraction_of_limit"):
        assert tuple(result[key]) == BATCHES, key
        assert all(v > 0 for v in result[key].values()), key
    limits = result["limits"]
    assert limits["memory_bandwidth_gb_s"] > 0 and limits["matmul_gflop_s"] > 0
    # probed before the first batch size and after each one, in a process of its own
    assert limits["probes"] == 3 and len(limits["memory_bandwidth_probes_gb_s"]) == 3
    assert tuple(limits["by_batch"]) == BATCHES
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
    monkeypatch.setattr(bench, "LimitProbe", ScriptedProbe)
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert out["engine_tok_per_s"]["1"] > 0 and out["generate_tok_per_s"] == {} and "continuous" not in out


def test_the_first_comment_joins_the_busy_batch_instead_of_waiting_for_a_slot(tiny_model):
    # A checkpoint's probe is guided like the bot's requests (a row and its shadow). With batch sizes of 16 or
    # less the engine once had 16 slots, so the probe waited for one of the 15 others to finish.
    r = bench.run_bench(model=tiny_model, batches=(1,), prompt_len=8, new_tokens=6, repeats=1, threads=1,
                        generate=False, continuous=False, limits=False)
    assert r["first_comment_busy_rows"] == bench.BUSY_OTHERS + 2
    assert "closing/opening comment tag" in r["first_comment_basis"]


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


def test_each_batch_size_is_held_to_the_limits_probed_around_it(monkeypatch):
    monkeypatch.setattr(bench, "LimitProbe", ScriptedProbe)
    r = bench.run_bench("tiny", batches=(1, 2), prompt_len=8, new_tokens=6, repeats=1, threads=1, generate=False,
                        continuous=False)
    limits = r["limits"]
    # probes 10, 30, 50 GB/s: batch 1 ran between the first two, batch 2 between the last two
    assert limits["by_batch"] == {"1": {"memory_bandwidth_gb_s": 20.0, "matmul_gflop_s": 200.0},
                                  "2": {"memory_bandwidth_gb_s": 40.0, "matmul_gflop_s": 250.0}}
    assert limits["memory_bandwidth_gb_s"] == 30.0 and limits["matmul_gflop_s"] == 200.0  # medians
    assert limits["memory_bandwidth_probes_gb_s"] == [10.0, 30.0, 50.0]
    from model.tiny import gpt2_config

    config = gpt2_config("tiny")
    for b, gbs, gflops in (("1", 20.0, 200.0), ("2", 40.0, 250.0)):
        alone = bench.roofline(config, 600, 4, [int(b)], 8, 6, gbs, gflops)["tok_per_s"][b]
        assert limits["tok_per_s"][b] == alone
        assert r["engine_fraction_of_limit"][b] == round(r["engine_tok_per_s"][b] / alone, 3)
    assert "memory read 30.0 GB/s (10.0-50.0)" in bench.format_table(r)


def test_each_run_is_held_to_the_limits_probed_either_side_of_it(monkeypatch):
    # A shared host's bandwidth moves within seconds: a probe after every run, not only after each batch size, and
    # each run compared with its own neighbours. Probes 10, 30, 50, 20, 40 GB/s around runs 1a, 1b, 2a, 2b.
    class Probe(ScriptedProbe):
        readings = [(10.0, 100.0), (30.0, 300.0), (50.0, 200.0), (20.0, 100.0), (40.0, 400.0)]

    monkeypatch.setattr(bench, "LimitProbe", Probe)
    r = bench.run_bench("tiny", batches=(1, 2), prompt_len=8, new_tokens=6, repeats=2, threads=1, generate=False,
                        continuous=False)
    from model.tiny import gpt2_config

    config = gpt2_config("tiny")
    assert r["limits"]["probes"] == 5
    # a batch size's limit tok/s: the median of its own probes (before its first run and after each of its runs)
    assert r["limits"]["by_batch"] == {"1": {"memory_bandwidth_gb_s": 30.0, "matmul_gflop_s": 200.0},
                                       "2": {"memory_bandwidth_gb_s": 40.0, "matmul_gflop_s": 200.0}}
    neighbours = {"1": [(20.0, 200.0), (40.0, 250.0)], "2": [(35.0, 150.0), (30.0, 250.0)]}
    for b, runs in r["engine_runs"].items():
        assert [(run["memory_bandwidth_gb_s"], run["matmul_gflop_s"]) for run in runs] == neighbours[b]
        fractions = []
        for run, (gbs, gflops) in zip(runs, neighbours[b], strict=True):
            ceiling = bench.roofline(config, 600, 4, [int(b)], 8, 6, gbs, gflops)["tok_per_s"][b]
            assert run["fraction_of_limit"] == pytest.approx(run["tok_per_s"] / ceiling, abs=2e-3)
            fractions.append(run["fraction_of_limit"])
        assert r["engine_fraction_of_limit"][b] == round(sum(fractions) / 2, 3)  # the median of two
        assert min(run["tok_per_s"] for run in runs) <= r["engine_tok_per_s"][b] <= max(
            run["tok_per_s"] for run in runs)
    assert "30.0 GB/s (10.0-50.0)" in bench.format_table(r)


def test_the_limit_probe_measures_again_in_its_own_process():
    probe = bench.LimitProbe("cpu", "float32", 1, bandwidth_bytes=PROBE_BYTES)
    try:
        first, second = probe.measure(), probe.measure()
        pid = probe._process.pid
    finally:
        probe.close()
    assert pid != os.getpid() and not probe._process.is_alive()
    for r in (first, second):
        assert r["memory_bandwidth_gb_s"] > 0 and r["matmul_gflop_s"] > 0 and r["matmul_dtype"] == "float32"
    assert probe.results == [first, second]


def test_a_failing_limit_probe_says_why():
    probe = bench.LimitProbe("cpu", "no_such_dtype", 1, bandwidth_bytes=PROBE_BYTES)
    try:
        with pytest.raises(RuntimeError, match="limit probe failed.*no_such_dtype"):
            probe.measure()
    finally:
        probe.close()
