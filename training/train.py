"""Train or finetune a GPT-2 on encoded token files.

``hnaas train --data DIR`` reads ``DIR/train.bin``, ``DIR/val.bin`` and the tokenizer in ``DIR/tokenizer`` (written by
``hnaas data tokenize``/``encode``). ``--init`` is ``scratch`` (a new model of ``--n-layer``/``--n-embd``/... size), a
local checkpoint directory, or a hub name such as ``gpt2-medium`` where the hub is reachable.

Each run writes ``runs/<run name>/``: ``config.json`` (the full config), ``metrics.jsonl`` (one JSON object per
evaluation), ``ckpt.pt`` (latest state, for ``--resume``) and ``best/`` (a Hugging Face checkpoint of the lowest
validation loss so far). The run name is made from the config, not by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.encode import open_tokens


@dataclass
class TrainConfig:
    data: str = "data/default"  # directory with train.bin, val.bin, tokenizer/
    out_dir: str = "runs"  # runs are written to out_dir/<run name>
    run_name: str = ""  # empty: derived from the config
    init: str = "scratch"  # "scratch", a checkpoint directory, or a hub name (gpt2, gpt2-medium, ...)
    grow_layers: int = 0  # deepen the --init checkpoint to this many layers (see grow_depth); 0 = keep its depth
    # model shape (scratch only)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_positions: int = 1024  # context the model can use when generating
    dropout: float = 0.0  # small data epochs are few here; dropout mostly slows learning
    # optimisation
    block_size: int = 512  # tokens per training sequence
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 4000
    lr: float = 2e-3
    min_lr: float = 2e-4  # cosine decay floor
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta2: float = 0.99  # lower than 0.999 because batches are small
    grad_clip: float = 1.0
    # bookkeeping
    eval_every: int = 250
    eval_batches: int = 40
    checkpoint_every: int = 250
    max_minutes: float = 0.0  # stop (and checkpoint) after this much training time, summed over resumptions; 0 = none
    seed: int = 1337
    threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = ""  # "" = cuda when available
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 on CUDA and on CPUs with native bf16 (AMX)
    # torch.compile the training step's forward and loss: fewer, fused kernels. On the 2-core Zen 3 (12 layers x 256,
    # 8 x 1024 tokens, fp32) a step takes 7.3 s instead of 8.4 after ~30 s of compiling; off by default because short
    # runs (and the tests) would spend longer compiling than they gain.
    compile: bool = False


def run_name(config: TrainConfig) -> str:
    """A name that says what the run is, plus a short hash of everything else."""
    if config.run_name:
        return config.run_name
    base = Path(config.init)
    base_name = base.parent.name if base.name == "best" else base.name  # runs/<name>/best -> <name>
    if (base.parent / "config.json").is_file() and base.name == "best":
        base_name = base_name.rsplit("-", 1)[-1]  # another run: its hash names it (chains of runs stay short)
    shape = "ft-" + base_name if config.init != "scratch" else f"{config.n_layer}L{config.n_embd}d"
    if config.grow_layers and config.init != "scratch":
        shape += f"-grow{config.grow_layers}L"
    blob = json.dumps(dataclasses.asdict(config), sort_keys=True).encode()
    return f"{Path(config.data).name}-{shape}-ctx{config.block_size}-lr{config.lr:g}-{hashlib.sha1(blob).hexdigest()[:6]}"


def lr_at(step: int, c: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at ``max_steps`` or at ``max_minutes``, whichever comes first,
    so a run cut short by its time budget still ends on a decayed learning rate rather than mid-schedule."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    if c.max_minutes:
        progress = max(progress, min(1.0, elapsed_s / (c.max_minutes * 60)))
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (c.lr - c.min_lr)


def build_model(c: TrainConfig, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if c.init == "scratch":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        return GPT2LMHeadModel(config)
    model = AutoModelForCausalLM.from_pretrained(c.init, dtype=torch.float32)  # a shipped fp16 export trains in fp32
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))  # the format's tags are new tokens
    if c.grow_layers:
        grow_depth(model, c.grow_layers)
    return model


def grow_depth(model, n_layer: int) -> None:
    """Deepen a trained GPT-2 to ``n_layer`` blocks without changing what it computes.

    Growing a small model that has stopped improving is cheaper than training the deeper one from scratch
    (progressive stacking, Gong et al. 2019). Each new block is a copy of the block it follows, so its attention and
    MLP start with useful input weights, but its two output projections start at zero: the block adds nothing to the
    residual stream, so the grown model's logits equal the original's at step 0 and training starts from the
    original's loss instead of a jump. The copies' zero projections get gradient at once and open up from there."""
    import copy

    import torch

    blocks = model.transformer.h
    old = len(blocks)
    if n_layer < old:
        raise ValueError(f"grow_layers ({n_layer}) must be at least the checkpoint's depth ({old})")
    grown = []
    for i in range(n_layer):
        source = i * old // n_layer  # spread the copies evenly: 4 -> 8 gives 0, 0', 1, 1', 2, 2', 3, 3'
        if grown and grown[-1][0] == source:
            block = copy.deepcopy(blocks[source])
            with torch.no_grad():
                for projection in (block.attn.c_proj, block.mlp.c_proj):
                    projection.weight.zero_()
                    projection.bias.zero_()
        else:
            block = blocks[source]
        grown.append((source, block))
    model.transformer.h = torch.nn.ModuleList(block for _, block in grown)
    for i, block in enumerate(model.transformer.h):
        block.attn.layer_idx = i  # the KV cache is indexed by layer
    model.config.n_layer = n_layer


class Batches:
    """Random windows of ``block_size + 1`` tokens from a memory-mapped token file (nanoGPT's sampler)."""

    def __init__(self, path: Path, block_size: int, batch_size: int, seed: int) -> None:
        self.tokens = open_tokens(path)
        if len(self.tokens) <= block_size + 1:
            raise ValueError(f"{path} has {len(self.tokens)} tokens, fewer than one block of {block_size}")
        self.block_size, self.batch_size = block_size, batch_size
        self.rng = np.random.default_rng(seed)

    def next(self, device):
        import torch

        starts = self.rng.integers(0, len(self.tokens) - self.block_size - 1, self.batch_size)
        window = np.stack([self.tokens[s: s + self.block_size + 1].astype(np.int64) for s in starts])
        window = torch.from_numpy(window).to(device)
        return window[:, :-1], window[:, 1:]


RESUME_OVERRIDABLE = ("max_steps", "max_minutes", "threads", "device", "precision", "compile", "eval_every",
                      "checkpoint_every")


def use_bf16(c: TrainConfig, device) -> bool:
    if c.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {c.precision!r}")
    if c.precision != "auto":
        return c.precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: without them bf16 autocast on CPU is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def train(c: TrainConfig | None = None, *, resume: str | None = None, overrides: dict | None = None,
          log=print) -> Path:
    """Run (or, with ``resume``, continue) a training run and return its directory.

    A resumed run keeps its saved config; only ``RESUME_OVERRIDABLE`` fields may change (e.g. a larger
    ``max_steps`` extends a run: the cosine schedule then stretches over the new length)."""
    import torch

    from training.tokenizer import load as load_tokenizer

    if resume:
        run_dir = Path(resume)
        saved = json.loads((run_dir / "config.json").read_text())
        overrides = overrides or {}
        refused = set(overrides) - set(RESUME_OVERRIDABLE)
        if refused:
            raise ValueError(f"a resumed run keeps its config; can't change {', '.join(sorted(refused))}")
        c = TrainConfig(**{**saved, **overrides})
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(c), indent=1))
    else:
        assert c is not None
        run_dir = Path(c.out_dir) / run_name(c)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(c), indent=1))
    if c.threads:
        torch.set_num_threads(c.threads)
    device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(c.seed)
    data = Path(c.data)
    tokenizer = load_tokenizer(data / "tokenizer")
    model = build_model(c, tokenizer).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=c.lr, betas=(0.9, c.beta2), fused=device.type == "cuda",
    )
    step, best_val, elapsed_before = 0, float("inf"), 0.0
    train_batches = Batches(data / "train.bin", c.block_size, c.batch_size, c.seed)
    ckpt_path = run_dir / "ckpt.pt"
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best_val = state["step"], state["best_val"]
        elapsed_before = state.get("elapsed_s", 0.0)
        train_batches.rng = np.random.default_rng([c.seed, step])  # fresh windows, not a replay of the first ones
        log(f"resumed {run_dir} at step {step} (best val {best_val:.4f})")
    bf16 = use_bf16(c, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else _nullcontext()
    # Evaluation stays eager: compiling its no-grad graph too would cost a second compile for ~5 % of the time.
    step_loss = torch.compile(_loss) if c.compile else _loss
    log(f"training on {device}{' with bf16 autocast' if bf16 else ' in fp32'}{', compiled' if c.compile else ''}")
    mlflow = _mlflow(run_dir, c)

    def evaluate() -> float:
        model.eval()
        batches = Batches(data / "val.bin", c.block_size, c.batch_size, seed=0)  # same windows every time
        losses = []
        with torch.no_grad():
            for _ in range(c.eval_batches):
                x, y = batches.next(device)
                with autocast:
                    losses.append(_loss(model, x, y).item())
        model.train()
        return float(np.mean(losses))

    def save(reason: str) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "best_val": best_val, "elapsed_s": elapsed(), "config": dataclasses.asdict(c)}, tmp)
        os.replace(tmp, ckpt_path)  # atomic, so a kill mid-save never leaves a broken checkpoint

    start = time.time()

    def elapsed() -> float:  # training time over all resumptions of this run
        return elapsed_before + time.time() - start

    model.train()
    tokens_per_step = c.batch_size * c.block_size * c.grad_accum
    last_log = time.time()
    while step < c.max_steps:
        lr = lr_at(step, c, elapsed())
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(c.grad_accum):
            x, y = train_batches.next(device)
            with autocast:
                loss = step_loss(model, x, y) / c.grad_accum
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0:
            now = time.time()
            log(f"step {step} loss {total:.4f} lr {lr:.2e} |g| {norm:.2f} "
                f"{tokens_per_step * 10 / (now - last_log):.0f} tok/s")
            last_log = now
        done = step >= c.max_steps or (c.max_minutes and elapsed() > c.max_minutes * 60)
        if step % c.eval_every == 0 or done:
            val = evaluate()
            record = {"step": step, "train_loss": total, "val_loss": val, "lr": lr, "tokens": step * tokens_per_step,
                      "elapsed_s": round(elapsed(), 1), "time": time.time()}
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if mlflow:
                mlflow.log_metrics({"val_loss": val, "train_loss": total}, step=step)
            log(f"eval step {step}: val loss {val:.4f}")
            if val < best_val:
                best_val = val
                _save_hf(model, tokenizer, run_dir / "best")
        if step % c.checkpoint_every == 0 or done:
            save("periodic")
        if done:
            break
    if mlflow:
        mlflow.end_run()
    return run_dir


def _loss(model, x, y):
    import torch.nn.functional as F

    logits = gpt2_logits(model, x) if fast_path_ok(model.config) else model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def fast_path_ok(config) -> bool:
    """Whether ``gpt2_logits`` computes exactly what this model's own forward does."""
    return (config.model_type == "gpt2" and config.activation_function == "gelu_new" and config.scale_attn_weights
            and not config.scale_attn_by_inverse_layer_idx and not config.reorder_and_upcast_attn
            and getattr(config, "add_cross_attention", False) is False)


def gpt2_logits(model, input_ids):
    """GPT-2's training forward over the Hugging Face model's own parameters, with causal flash attention.

    Hugging Face's forward builds an explicit attention mask, which sends CPU attention down the slow math kernel; with
    ``is_causal`` PyTorch uses its fused kernel instead. On this 2-core CPU (4 layers x 256, 8 x 1024 tokens) a step is
    1.4x faster in fp32 and 4x faster under bf16 autocast. Optimizer, checkpoints and ``save_pretrained`` stay the
    model's own, because the parameters are."""
    import torch
    import torch.nn.functional as F

    cfg, t = model.config, model.transformer
    batch, length = input_ids.shape
    width, heads, eps, training = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon, model.training
    positions = torch.arange(length, device=input_ids.device)
    x = F.dropout(t.wte(input_ids) + t.wpe(positions), cfg.embd_pdrop, training)
    for block in t.h:
        h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, eps)
        qkv = torch.matmul(h, block.attn.c_attn.weight) + block.attn.c_attn.bias  # Conv1D keeps weights [in, out]
        q, k, v = (part.view(batch, length, heads, width // heads).transpose(1, 2) for part in qkv.split(width, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=cfg.attn_pdrop if training else 0.0)
        y = torch.matmul(y.transpose(1, 2).reshape(batch, length, width), block.attn.c_proj.weight)
        x = x + F.dropout(y + block.attn.c_proj.bias, cfg.resid_pdrop, training)
        h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, eps)
        h = F.gelu(torch.matmul(h, block.mlp.c_fc.weight) + block.mlp.c_fc.bias, approximate="tanh")
        x = x + F.dropout(torch.matmul(h, block.mlp.c_proj.weight) + block.mlp.c_proj.bias, cfg.resid_pdrop, training)
    x = F.layer_norm(x, (width,), t.ln_f.weight, t.ln_f.bias, eps)
    return F.linear(x, model.lm_head.weight)


def _save_hf(model, tokenizer, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _mlflow(run_dir: Path, c: TrainConfig):
    try:
        import mlflow
    except ImportError:
        return None
    mlflow.set_experiment("hnaas")
    mlflow.start_run(run_name=run_dir.name)
    mlflow.log_params(dataclasses.asdict(c))
    return mlflow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # type=bool would read "--compile False" as True
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"(default: {f.default!r})")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its ckpt.pt")


def main(args: argparse.Namespace) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.resume:  # only what the user typed changes a resumed run
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) != f.default}
        run_dir = train(resume=args.resume, overrides=given)
    else:
        run_dir = train(config)
    print(run_dir)
    return 0
