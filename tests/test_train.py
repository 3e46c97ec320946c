"""Training internals: the fast forward, the learning-rate schedule, precision."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from training.train import TrainConfig, fast_path_ok, gpt2_logits, lr_at, use_bf16


def _model(**overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, **overrides)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("tied", [True, False])
def test_fast_forward_matches_transformers_and_its_gradients(tied):
    model = _model(tie_word_embeddings=tied).eval()
    assert fast_path_ok(model.config)
    x = torch.randint(0, 300, (3, 40))
    expected = model(input_ids=x).logits
    got = gpt2_logits(model, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    gpt2_logits(model, x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fast_forward_refuses_variants_it_does_not_compute():
    assert not fast_path_ok(_model(scale_attn_by_inverse_layer_idx=True).config)
    assert not fast_path_ok(_model(activation_function="relu").config)


def test_cosine_schedule_ends_at_the_step_limit_or_the_time_limit():
    c = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=1010)
    assert lr_at(0, c) == pytest.approx(1e-4)  # warmup
    assert lr_at(10, c) == pytest.approx(1e-3)
    assert lr_at(510, c) == pytest.approx(5.5e-4)  # half way
    assert lr_at(1010, c) == pytest.approx(1e-4)
    timed = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100_000, max_minutes=10)
    assert lr_at(20, timed, elapsed_s=300) == pytest.approx(5.5e-4, rel=1e-3)  # half the time: half the decay
    assert lr_at(20, timed, elapsed_s=600) == pytest.approx(1e-4)
    assert lr_at(20, timed, elapsed_s=0) == pytest.approx(1e-3, rel=1e-3)


def test_precision_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_bf16(TrainConfig(precision="bf16"), cpu)
    assert not use_bf16(TrainConfig(precision="fp32"), cuda)
    assert use_bf16(TrainConfig(precision="auto"), cuda)
    with pytest.raises(ValueError, match="precision"):
        use_bf16(TrainConfig(precision="fp8"), cpu)


def test_run_names_say_what_the_run_is_and_stay_short_along_a_chain(tmp_path):
    from training.train import run_name

    first = run_name(TrainConfig(data="data/default", n_layer=4, n_embd=256, block_size=1024, lr=2e-3))
    assert first.startswith("default-4L256d-ctx1024-lr0.002-")
    base = tmp_path / "runs" / first
    (base / "best").mkdir(parents=True)
    (base / "config.json").write_text("{}")
    second = run_name(TrainConfig(data="data/hn-focus", init=str(base / "best"), lr=5e-4))
    assert second.startswith(f"hn-focus-ft-{first.rsplit('-', 1)[-1]}-ctx512-lr0.0005-") and len(second) < 50
    assert run_name(TrainConfig(init="gpt2-medium")).startswith("default-ft-gpt2-medium-")


def test_growing_a_model_deeper_keeps_what_it_computes():
    from training.train import grow_depth

    model = _model().eval()
    x = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        before = model(input_ids=x).logits
        greedy = model.generate(x[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    first_blocks = list(model.transformer.h)
    grow_depth(model, 5)
    assert model.config.n_layer == len(model.transformer.h) == 5
    # 2 -> 5: block 0, two copies of it, block 1, one copy of it.
    assert model.transformer.h[0] is first_blocks[0] and model.transformer.h[3] is first_blocks[1]
    copies = [model.transformer.h[i] for i in (1, 2, 4)]
    assert all(block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
               for block in copies)
    torch.testing.assert_close(copies[0].attn.c_attn.weight, first_blocks[0].attn.c_attn.weight)
    assert [block.attn.layer_idx for block in model.transformer.h] == [0, 1, 2, 3, 4]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before)
        torch.testing.assert_close(gpt2_logits(model, x), before, atol=1e-5, rtol=1e-5)
        # The KV cache is per layer: generating with it must still match.
        assert torch.equal(model.generate(x[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0), greedy)
    # The copies learn: their zero projections get gradient at once.
    gpt2_logits(model, x).square().mean().backward()
    assert copies[0].mlp.c_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least"):
        grow_depth(_model(), 1)


def test_a_grown_run_says_so_in_its_name(tmp_path):
    from training.train import run_name

    assert "-ft-gpt2-grow16L-" in run_name(TrainConfig(init="gpt2", grow_layers=16))
    assert "grow" not in run_name(TrainConfig(init="gpt2"))
