"""The training pipeline end to end on CPU: thread JSON → item store → build → tokenizer → encode → train →
resume → the best checkpoint loads in the engine and generates."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from bot.cli import main
from model.engine import Engine, GenerationRequest, SamplingSettings
from model.format import prompt

WORDS = ["the", "compiler", "rust", "memory", "safety", "startup", "funding", "python", "garbage", "collector",
         "latency", "database", "index", "query", "browser", "privacy", "search", "engine", "battery", "laptop",
         "kernel", "scheduler", "open", "source", "license"]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."


def write_threads(path, n=60, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            comments = [{"text": sentence(rng), "children": [{"text": sentence(rng), "children": []}
                                                             for _ in range(rng.randint(0, 3))]}
                        for _ in range(rng.randint(1, 4))]
            f.write(json.dumps({"title": f"Story {i}: {sentence(rng)}", "url": None, "comments": comments}) + "\n")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
async def test_pipeline_from_thread_json_to_a_generating_checkpoint(tmp_path, capsys):
    threads, db, data, runs = tmp_path / "t.jsonl", tmp_path / "items.db", tmp_path / "data", tmp_path / "runs"
    write_threads(threads)
    assert main(["data", "import", "--format", "threads", str(threads), "--db", str(db)]) == 0
    assert main(["data", "build", "--db", str(db), "--out", str(data), "--val-fraction", "0.3"]) == 0
    assert main(["data", "tokenize", "--data", str(data), "--vocab-size", "320"]) == 0
    assert main(["data", "encode", "--data", str(data)]) == 0
    assert (data / "train.bin").stat().st_size > 0 and (data / "val.bin").stat().st_size > 0
    capsys.readouterr()

    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--n-positions", "128", "--block-size", "32",
            "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--checkpoint-every", "2",
            "--warmup-steps", "1", "--threads", "1"]
    assert main(["train", "--data", str(data), "--out-dir", str(runs), "--max-steps", "4", *tiny]) == 0
    [run] = list(runs.iterdir())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    config = json.loads((run / "config.json").read_text())
    assert config["n_layer"] == 1 and run.name.startswith("data-1L32d-ctx32")
    capsys.readouterr()

    compiled = tmp_path / "compiled" / run.name
    shutil.copytree(run, compiled)
    assert main(["train", "--resume", str(run), "--max-steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "at step 4" in out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert all(m["val_loss"] < 7 for m in metrics)  # ln(320) ≈ 5.8: learning, not diverging

    # The same two steps with the training step compiled: the same windows, so the same losses up to rounding.
    assert main(["train", "--resume", str(compiled), "--max-steps", "6", "--compile"]) == 0
    assert "compiled" in capsys.readouterr().out
    again = json.loads((compiled / "metrics.jsonl").read_text().splitlines()[-1])
    assert again["step"] == 6 and json.loads((compiled / "config.json").read_text())["compile"] is True
    assert again["train_loss"] == pytest.approx(metrics[-1]["train_loss"], rel=1e-4)
    assert again["val_loss"] == pytest.approx(metrics[-1]["val_loss"], rel=1e-4)

    # Grow the run one layer deeper and go on training it: the grown checkpoint is what the engine loads.
    assert main(["train", "--data", str(data), "--out-dir", str(runs), "--init", str(run / "best"),
                 "--grow-layers", "2", "--max-steps", "2", *tiny]) == 0
    [grown] = [r for r in runs.iterdir() if r != run]
    assert "-grow2L-" in grown.name
    assert json.loads((grown / "best" / "config.json").read_text())["n_layer"] == 2

    engine = Engine(grown / "best", threads=1)
    await engine.start()
    try:
        [result] = await engine.generate([GenerationRequest(prompt("Story 1: rust memory"), 3,
                                                            SamplingSettings(max_new_tokens=20))])
    finally:
        await engine.close()
    assert result.new_tokens > 0
