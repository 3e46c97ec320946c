"""Export a training run as the Hugging Face model directory the bot loads, with a model card.

``hnaas export RUN_DIR_OR_CHECKPOINT --out DIR [--eval-json FILE ...] [--dtype float16|float32]``

The source is a run directory (its ``best/`` checkpoint, or ``ckpt.pt`` with ``--latest`` or when there is no
``best/``), a Hugging Face checkpoint directory, or a ``ckpt.pt`` file. ``DIR`` receives ``config.json``,
``model.safetensors``, the tokenizer files, ``generation_config.json`` (the bot's default sampling: temperature,
top-p, max_new_tokens; eos = pad = ``<|endoftext|>``) and ``README.md``, a model card that records the data, the
model's size, its training (from the run's ``config.json`` and ``metrics.jsonl``) and the evaluation figures of the
given JSON files (``hnaas eval`` output, or ``training.ngram`` output for the baseline; JSON lines are fine).

``--dtype float16`` halves the file; the engine casts the weights to float32 when it loads them on CPU (it asks
``from_pretrained`` for float32 there), and uses bf16/fp16 on CUDA. The directory is written next to ``DIR`` and
moved into place at the end, so a failed export never leaves a half-written model where the bot looks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from model.format import END_OF_TEXT

DTYPES = ("float16", "float32", "bfloat16")
MAX_DEPTH_ROWS = 5  # bits per byte by depth in the card: depths 1..5 (deeper levels hold few bytes)

# Rows of the card's evaluation table: key in the eval JSON, label, format.
EVAL_ROWS = (
    ("bits_per_byte", "comment text, bits per UTF-8 byte (lower is better)", "{:.3f}"),
    ("tag_bits_per_comment", "structure tags, bits per comment", "{:.2f}"),
    ("valid_tree_rate", "sampled threads that parse into a valid tree", "{:.1%}"),
    ("usable_rate", "sampled threads with at least one comment", "{:.1%}"),
    ("finished_rate", "sampled threads the model ended itself", "{:.1%}"),
    ("comments_per_thread", "comments per sampled thread", "{:.1f}"),
    ("distinct_2", "distinct word bigrams / all (samples)", "{:.3f}"),
    ("repeated_line_rate", "repeated lines within a thread (samples)", "{:.1%}"),
    ("topicality_win_rate", "samples closer to their own title than to another", "{:.1%}"),
    ("topicality_margin", "mean cosine margin, own title vs another", "{:.3f}"),
    ("real_topicality_win_rate", "the same for the real threads", "{:.1%}"),
    ("real_topicality_margin", "the same margin for the real threads", "{:.3f}"),
)


def resolve(source: str | Path, *, latest: bool = False) -> tuple[Path | None, Path | None, Path | None]:
    """(Hugging Face checkpoint dir, ckpt.pt file, run dir) for a source path; exactly one of the first two is set."""
    source = Path(source)
    if source.is_file():
        return None, source, source.parent if (source.parent / "config.json").is_file() else None
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist")
    if (source / "config.json").is_file() and _is_hf_config(source / "config.json"):
        parent = source.parent
        return source, None, parent if (parent / "metrics.jsonl").is_file() else None
    best, ckpt = source / "best", source / "ckpt.pt"
    if latest or not best.is_dir():
        if not ckpt.is_file():
            raise FileNotFoundError(f"{source} has neither best/ nor ckpt.pt")
        return None, ckpt, source
    return best, None, source


def _is_hf_config(path: Path) -> bool:
    return "model_type" in json.loads(path.read_text())


def load(source: str | Path, *, latest: bool = False):
    """(model in float32 on CPU, tokenizer, run dir or None, the checkpoint it came from)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_dir, ckpt, run_dir = resolve(source, latest=latest)
    if hf_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True)
        return model, tokenizer, run_dir, hf_dir
    assert ckpt is not None
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    from training.train import TrainConfig, build_model

    config = TrainConfig(**state["config"])
    # The shape and tokenizer: from best/ when the run wrote one, else rebuilt from the run's config.
    best = ckpt.parent / "best"
    tokenizer_dir = best if (best / "tokenizer_config.json").is_file() else Path(config.data) / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if (best / "config.json").is_file():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(best), local_files_only=True))
    elif config.init == "scratch":
        model = build_model(config, tokenizer)
    else:
        raise ValueError(f"{ckpt} is from a finetuning run: its best/ directory is needed for the model's shape")
    model.load_state_dict(state["model"])
    return model.float().eval(), tokenizer, run_dir, ckpt


def export(source: str | Path, out: str | Path, *, eval_json: list[str | Path] = (), dtype: str = "float16",
           latest: bool = False, corpus: str | Path | None = None, notes: str | Path | None = None) -> Path:
    """Write the model directory ``out`` (replacing a previous export there) and return it."""
    import torch
    from transformers import GenerationConfig

    from bot.settings import Settings

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not (out / "config.json").is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a model directory: not replacing it")
    model, tokenizer, run_dir, origin = load(source, latest=latest)
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    defaults = Settings()
    generation = GenerationConfig(
        do_sample=True, temperature=defaults.temperature, top_p=defaults.top_p, max_new_tokens=defaults.max_new_tokens,
        top_k=defaults.top_k, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,  # top_k 0: no top-k cut
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, eos)
    model.generation_config = generation
    tokenizer.model_max_length = model.config.max_position_embeddings
    parameters = sum(p.numel() for p in model.parameters())  # tied embeddings counted once

    tmp = out.with_name(out.name + ".export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    weights_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    run = _run_info(run_dir)
    corpus_path = Path(corpus) if corpus else _find_corpus(run)
    earlier: list[tuple[Path, dict]] = []  # the corpora of a curriculum's earlier stages
    stage = run.get("base")
    while stage:
        path = _find_corpus(stage)
        if path and path.is_file() and path != corpus_path and path not in [p for p, _ in earlier]:
            earlier.insert(0, (path, json.loads(path.read_text())))
        stage = stage.get("base")
    card = model_card(
        model.config, parameters=parameters, dtype=dtype, weights_bytes=weights_bytes, origin=origin, run=run,
        corpus=json.loads(corpus_path.read_text()) if corpus_path and corpus_path.is_file() else None,
        corpus_path=corpus_path, evals=[(Path(p), e) for p in eval_json for e in read_eval(p)],
        sampling=generation, earlier_corpora=earlier, guidance_scale=defaults.guidance_scale,
        notes=Path(notes).read_text(encoding="utf-8") if notes else "",
    )
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_eval(path: str | Path) -> list[dict]:
    """The JSON objects of an evaluation file: one object, or one per line."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _run_info(run_dir: Path | None, depth: int = 0) -> dict[str, Any]:
    """What a run directory says about itself, and (as ``base``) about the run it was initialised from, when that
    was another run's checkpoint that is still on disk: a curriculum is a chain of runs."""
    if run_dir is None:
        return {}
    info: dict[str, Any] = {"name": run_dir.name}
    if (run_dir / "config.json").is_file():
        info["config"] = json.loads((run_dir / "config.json").read_text())
        init = Path(info["config"].get("init", "scratch"))
        base_dir = init.parent if init.name in ("best", "ckpt.pt") else init
        if depth < 10 and info["config"].get("init", "scratch") != "scratch" and (base_dir / "config.json").is_file() \
                and (base_dir / "metrics.jsonl").is_file():
            info["base"] = _run_info(base_dir, depth + 1)
        elif (init / "README.md").is_file():  # an exported model: its card carries the stages before it
            info["init_card"] = (str(init), (init / "README.md").read_text(encoding="utf-8"))
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics:
            info["last"] = metrics[-1]
            scored = [m for m in metrics if m.get("val_loss") is not None]
            if scored:
                info["best"] = min(scored, key=lambda m: m["val_loss"])
    return info


def _find_corpus(run: dict[str, Any]) -> Path | None:
    data = run.get("config", {}).get("data")
    return Path(data) / "corpus.json" if data else None


def _fmt(value: Any, pattern: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        return pattern.format(value)
    return str(value)


def model_card(config, *, parameters: int, dtype: str, weights_bytes: int, origin: Path, run: dict[str, Any],
               corpus: dict | None, corpus_path: Path | None, evals: list[tuple[Path, dict]], sampling,
               earlier_corpora: list[tuple[Path, dict]] = (), notes: str = "", guidance_scale: float = 1.0) -> str:
    """The README.md of an exported model (pure: everything it states is passed in)."""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "language: en",
        "tags: [gpt2, hnaas, hacker-news, synthetic-comments]",
        "---",
        "",
        "# HNaaS comment-thread model",
        "",
        "A GPT-2 model that writes a Hacker News style discussion (a tree of comments) for a story title, for",
        "HNaaS (\"Hacker News as a Service\"), a Discord and Slack bot.",
        "",
        "> **Everything this model writes is AI-generated. The comments are not written by real people, do not",
        "> quote real users, and are not real Hacker News discussions. Do not present them as such.**",
        "",
        "## Format",
        "",
        "A story is `<|endoftext|>title\\n[url\\n]` followed by comment blocks `<|c|>text ...replies... <|ec|>`;",
        "the model continues `prompt(title, url)` = `<|endoftext|>title\\n[url\\n]<|c|>` and ends the story with",
        "`<|endoftext|>`. Parse what it writes with `model.format.ThreadParser` (it keeps the valid prefix).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        "ids = tok(\"<|endoftext|>Show HN: A tiny Lisp\\n<|c|>\", return_tensors=\"pt\", add_special_tokens=False)",
        "out = model.generate(**ids)  # sampling settings come from generation_config.json",
        "print(tok.decode(out[0][ids.input_ids.shape[1]:]))",
        "```",
        "",
        f"Default sampling (`generation_config.json`, the bot's defaults): temperature {sampling.temperature}, "
        f"top-p {sampling.top_p}, max_new_tokens {sampling.max_new_tokens}.",
        "",
        "HNaaS's engine (`model/engine.py`) also samples only what keeps the thread a valid tree",
        "(`model.format.NextTags`), and by default applies classifier-free guidance towards the title: the same",
        "story without its title (`model.format.without_header`) is the unconditional prompt "
        f"(scale {guidance_scale}, `HNAAS_GUIDANCE_SCALE`).",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        "| architecture | GPT-2 (decoder-only transformer) |",
        f"| parameters | {parameters:,} ({parameters / 1e6:.1f} M) |",
        f"| layers | {config.n_layer} |",
        f"| width (n_embd) | {config.n_embd} |",
        f"| attention heads | {config.n_head} |",
        f"| context (tokens) | {config.n_positions} |",
        f"| vocabulary | {config.vocab_size} |",
        f"| weights | {dtype}, {weights_bytes / 2**20:.1f} MiB |",
        f"| exported from | `{origin}` |",
        "",
    ]
    lines += _training_section(run)
    lines += _data_section(corpus, corpus_path, run, earlier_corpora)
    lines += _eval_section(evals)
    if notes.strip():
        lines += [notes.strip(), ""]
    lines += [
        "## Intended use",
        "",
        "Entertainment and prototyping: a bot that answers a shared link with a plausible-sounding, clearly labelled",
        "synthetic discussion. Not for producing facts, advice, reviews or opinions attributed to anyone, and not for",
        "posting where readers could take the comments for real people's.",
        "",
        "## Limitations",
        "",
        "- It is a small model trained on a small corpus: comments are often generic, off-topic, repetitive or wrong,",
        "  and it knows nothing about a story beyond its title (and URL).",
        "- Its training data (see Data) is what it imitates: where most threads come from Reddit, the voice is only",
        "  partly Hacker News's. It writes English only.",
        "- It can reproduce the rudeness, bias and misinformation of online discussions. Outputs are not filtered.",
        "- The figures above are measured on held-out data close to the training data; they do not show quality to",
        "  a reader.",
        "",
    ]
    return "\n".join(lines)


def _training_section(run: dict[str, Any]) -> list[str]:
    if not run:
        return ["## Training", "", "No run directory was found next to the checkpoint; training details unknown.", ""]
    stages = [run]
    while "base" in stages[0]:
        stages.insert(0, stages[0]["base"])
    init_path, init_card = stages[0].get("init_card") or ("", "")
    earlier = earlier_stages(init_card)
    names = {f"Run `{stage.get('name')}`." for stage in stages}
    repeated = next((i for i, block in enumerate(earlier) if block and block[0] in names), None)
    earlier = earlier[:repeated]  # exported again over the model it started from: each run counts once
    if len(stages) == 1 and not earlier:
        return ["## Training", "", *_run_lines(run)]
    lines = ["## Training", "", f"A curriculum of {len(earlier) + len(stages)} runs, each continuing from the previous "
             "one's exported checkpoint.", ""]
    if earlier:
        copied = f"Stages 1 to {len(earlier)} are" if len(earlier) > 1 else "Stage 1 is"
        lines += [f"{copied} copied from the model card of `{init_path}`, the exported checkpoint stage "
                  f"{len(earlier) + 1} started from.", ""]
    for n, block in enumerate(earlier, 1):
        lines += [f"### Stage {n}", "", *block, ""]
    for n, stage in enumerate(stages, len(earlier) + 1):
        lines += [f"### Stage {n}", "", *_run_lines(stage)]
    tokens = sum(stage_tokens_hours(block)[0] for block in earlier)
    tokens += sum((s.get("last") or {}).get("tokens") or 0 for s in stages) / 1e6
    hours = sum(stage_tokens_hours(block)[1] for block in earlier)
    hours += sum((s.get("last") or {}).get("elapsed_s") or 0 for s in stages) / 3600
    lines += [f"In all: {tokens:.1f} M tokens" + (f", {hours:.2f} h." if hours else "."), ""]
    return lines


def earlier_stages(card: str) -> list[list[str]]:
    """The training stages recorded in an exported model's card (its "## Training" section, as `_training_section`
    writes it), each stage's lines without its heading. A model exported from an exported model keeps its whole
    curriculum on record, also when the earlier run directories are gone."""
    lines = card.splitlines()
    try:
        start = lines.index("## Training") + 1
    except ValueError:
        return []
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = lines[start:end]
    if not any(line.startswith("### Stage ") for line in body):  # one run: its lines are the only stage
        stage = [line for line in body if line.strip()]
        return [stage] if stage else []
    stages: list[list[str]] = []
    for line in body:
        if line.startswith("### Stage "):
            stages.append([])
        elif stages and not line.startswith("In all: "):
            stages[-1].append(line)
    return [_strip_blank(stage) for stage in stages]


def stage_tokens_hours(stage: list[str]) -> tuple[float, float]:
    """(M tokens, hours) from a card stage's "- trained: N steps, X M tokens, Y h" line (0 where it says none)."""
    for line in stage:
        if match := re.match(r"- trained: .*?([\d.]+) M tokens(?:, ([\d.]+) h)?", line):
            return float(match.group(1)), float(match.group(2) or 0.0)
    return 0.0, 0.0


def _strip_blank(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _run_lines(run: dict[str, Any]) -> list[str]:
    c = run.get("config", {})
    lines = [f"Run `{run.get('name')}`.", ""]
    if c:
        init = c.get("init", "scratch")
        start = "from scratch" if init == "scratch" else f"finetuned from `{init}`"
        if c.get("grow_layers") and init != "scratch":
            start += (f", grown to {c['grow_layers']} layers (each new layer a copy of the one before it, its "
                      "output projections at zero: the same function at step 0)")
        lines.append(f"- initialisation: {start}")
        lines.append(f"- data: `{c.get('data')}`; sequences of {c.get('block_size')} tokens, "
                     f"{c.get('batch_size')} × {c.get('grad_accum', 1)} sequences per step")
        lines.append(f"- optimiser: AdamW, learning rate {c.get('lr')} (warm-up {c.get('warmup_steps')} steps, "
                     f"cosine to {c.get('min_lr')}), weight decay {c.get('weight_decay')}, dropout {c.get('dropout')}")
        lines.append(f"- planned steps: {c.get('max_steps')}")
    last, best = run.get("last"), run.get("best")
    if last:
        tokens = last.get("tokens")
        lines.append(f"- trained: {last.get('step')} steps, {tokens / 1e6:.1f} M tokens"
                     + (f", {last['elapsed_s'] / 3600:.2f} h" if last.get("elapsed_s") else ""))
    if best:
        lines.append(f"- exported checkpoint: the lowest validation loss, {best['val_loss']:.4f} nats/token "
                     f"at step {best.get('step')} ({best.get('tokens', 0) / 1e6:.1f} M tokens)")
    lines.append("")
    return lines


def _data_section(corpus: dict | None, corpus_path: Path | None, run: dict[str, Any],
                  earlier_corpora: list[tuple[Path, dict]] = ()) -> list[str]:
    lines = ["## Data", ""]
    data_dir = run.get("config", {}).get("data", "")
    stage, data_names = run, set()
    while stage:
        data_names.add(Path(stage.get("config", {}).get("data", "")).name)
        stage = stage.get("base")
    if "default" in data_names:
        from training import default_corpus

        doc = default_corpus.__doc__ or ""
        body = doc.strip().splitlines()[1:]
        while body and not body[0].strip():
            body.pop(0)
        lines += [line.rstrip() for line in body] + [""]
    for path, splits in [*earlier_corpora, *([(corpus_path, corpus)] if corpus else [])]:
        lines += [f"Splits (`{path}`):", "", "| split | threads | comments |", "|---|---|---|"]
        lines += [f"| {name} | {s.get('threads', '–'):,} | {s.get('comments', '–'):,} |" for name, s in splits.items()
                  if isinstance(s, dict)]
        lines.append("")
    if not corpus and not data_dir:
        lines += ["Unknown (no corpus.json given or found).", ""]
    return lines


def _eval_section(evals: list[tuple[Path, dict]]) -> list[str]:
    if not evals:
        return ["## Evaluation", "", "No evaluation figures were given at export.", ""]
    columns = []
    for path, e in evals:
        name = Path(str(e.get("data") or path)).stem
        if "order" in e:
            name += f" ({e['order']}-gram baseline)"
        columns.append((name, e))
    lines = [
        "## Evaluation",
        "",
        "Bits per byte: the model's cost of the real comment text given the story header and the parent comments,",
        "over its UTF-8 bytes (`hnaas eval`), comparable across tokenizers and with the character n-gram baseline",
        "(`training.ngram`). `val_hn` is a held-out real HN thread, `val_reddit` held-out Reddit threads. Sample",
        "figures come from threads generated for the data's titles with the default sampling settings.",
        "",
        "| | " + " | ".join(name for name, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, label, pattern in EVAL_ROWS:
        if any(key in e for _, e in columns):
            lines.append(f"| {label} | " + " | ".join(_fmt(e.get(key), pattern) for _, e in columns) + " |")
    depths = sorted({d for _, e in columns for d in (e.get("bits_per_byte_by_depth") or {})}, key=int)[:MAX_DEPTH_ROWS]
    for d in depths:
        lines.append(f"| bits per byte at depth {d} | "
                     + " | ".join(_fmt((e.get("bits_per_byte_by_depth") or {}).get(d), "{:.3f}") for _, e in columns)
                     + " |")
    lines.append("")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="run directory, Hugging Face checkpoint directory, or ckpt.pt")
    parser.add_argument("--out", required=True, help="model directory to write (replaced if it holds a model)")
    parser.add_argument("--eval-json", nargs="*", default=[], help="evaluation JSON files to put in the model card")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="weights dtype (default: float16)")
    parser.add_argument("--latest", action="store_true", help="export the run's latest ckpt.pt instead of best/")
    parser.add_argument("--corpus", help="corpus.json describing the data (default: the run's data dir)")
    parser.add_argument("--notes", help="a Markdown file put in the card after the evaluation figures")


def main(args: argparse.Namespace) -> int:
    out = export(args.source, args.out, eval_json=args.eval_json, dtype=args.dtype, latest=args.latest,
                 corpus=args.corpus, notes=args.notes)
    print(out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
