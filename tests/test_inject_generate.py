"""Specification of generation: released prompt and sampling, KV-cached decoding equal to the
reference's full recomputation, batches with left padding, streaming, the tiny demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference_llama import RefAdapter, RefArgs

from cachebind.config import LLMConfig
from cachebind.errors import InputError, WeightsError
from cachebind.inject import Generator, build_tiny_llm, format_prompt, load_generator
from cachebind.inject.generate import sample_top_p
from cachebind.inject.tiny import write_adapter_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Generator, Path]:
    workdir = tmp_path_factory.mktemp("tiny")
    return build_tiny_llm(workdir, seed=0), workdir


@pytest.fixture(scope="module")
def reference(tiny) -> RefAdapter:
    """The released math loaded strictly from the very files build_tiny_llm wrote."""
    gen, workdir = tiny
    cfg = gen.model.cfg
    ref = RefAdapter(
        RefArgs(
            dim=cfg.dim,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            vocab_size=cfg.vocab_size,
            multiple_of=32,
            norm_eps=cfg.norm_eps,
            bind_in_dim=cfg.bind_in_dim,
        )
    )
    base = torch.load(workdir / "7B" / "consolidated.00.pth")
    base.pop("rope.freqs")
    state = {"llama." + k: v.float() for k, v in base.items()}
    state.update(torch.load(workdir / "imagebind_llm_tiny.pth")["model"])
    ref.load_state_dict(state, strict=True)  # exact released names and shapes
    return ref.eval()


def reference_greedy(ref: RefAdapter, gen: Generator, prompt: str, f_m, n: int) -> str:
    ids = gen.tokenizer.encode(format_prompt(prompt), bos=True)
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = ref(torch.tensor([ids + out]), torch.as_tensor(f_m)[None])[0, -1]
        token = int(logits.argmax())
        if token == gen.tokenizer.eos_id:
            break
        out.append(token)
    return gen.tokenizer.decode(out)


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_alpaca_template_is_the_released_one():
    assert format_prompt("Describe it.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDescribe it.\n\n### Response:"
    )
    assert format_prompt("Q", "ctx").endswith(
        "### Instruction:\nQ\n\n### Input:\nctx\n\n### Response:"
    )
    assert "paired with an input" in format_prompt("Q", "ctx")


def test_sample_top_p_keeps_the_released_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.2]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_top_p(probs.clone(), 0.75, g)
    assert set(drawn.tolist()) == {0, 1}  # mass before token 2 is 0.8 > 0.75: cut
    assert 0.55 < (drawn == 0).float().mean() < 0.70  # renormalised 0.5 / 0.8 = 0.625
    assert set(sample_top_p(probs.clone(), 0.4, g).tolist()) == {0}


def test_tiny_model_is_built_through_the_real_loading_path(tmp_path):
    gen = build_tiny_llm(tmp_path, seed=1)
    assert (tmp_path / "7B" / "params.json").is_file() and (tmp_path / "tokenizer.model").is_file()
    assert gen.load_report.llama_format == "meta" and gen.load_report.unused == []
    gates = [layer.self_attn.gate for layer in gen.model.llm.model.layers]
    assert all(torch.count_nonzero(g) == g.numel() for g in gates)  # injection is on


def test_greedy_kv_cached_batch_equals_reference_recomputation(tiny, reference):
    gen, _ = tiny
    prompts = ["Describe the image.", "What is the person playing with near the river?"]
    visual = unit(2, 1024, 0)
    out = gen.generate(prompts, visual, max_new_tokens=12, temperature=0.0)
    for prompt, f_m, text in zip(prompts, visual, out, strict=True):
        assert text == reference_greedy(reference, gen, prompt, f_m, 12)
    # Each row of the left-padded batch is what it would be alone.
    assert out == [
        gen.generate([p], v[None], 12, temperature=0.0)[0]
        for p, v in zip(prompts, visual, strict=True)
    ]


def test_visual_input_changes_the_generation(tiny):
    gen, _ = tiny
    a = gen.generate(["Describe the image."] * 3, unit(3, 1024, 1), 10, temperature=0.0)
    assert len(set(a)) > 1
    plain = gen.generate(["Describe the image."], None, 10, temperature=0.0)
    assert len(plain) == 1


def test_stream_pieces_concatenate_to_generate_and_seeds_reproduce(tiny):
    gen, _ = tiny
    v = unit(1, 1024, 2)
    pieces = list(gen.stream(["What is this?"], v, max_new_tokens=16, seed=5))
    assert all(len(p) == 1 for p in pieces) and 1 <= len(pieces) <= 16
    assert "".join(p[0] for p in pieces) == gen.generate(["What is this?"], v, 16, seed=5)[0]
    sampled = {
        gen.generate(["What is this?"], v, 16, temperature=1.0, top_p=1.0, seed=s)[0]
        for s in range(4)
    }
    assert len(sampled) > 1


def test_shared_visual_row_and_validation(tiny):
    gen, _ = tiny
    v = unit(1, 1024, 3)
    assert gen.generate(["a", "b"], v, 4, temperature=0) == [
        gen.generate(["a"], v, 4, temperature=0)[0],
        gen.generate(["b"], v, 4, temperature=0)[0],
    ]
    with pytest.raises(InputError, match="expected \\[2, 1024\\]"):
        gen.generate(["a", "b"], unit(3, 1024, 0), 4)
    with pytest.raises(InputError, match="not_finite"):
        gen.generate(["a"], np.full((1, 1024), np.nan, np.float32), 4)
    with pytest.raises(InputError, match="too_long"):
        gen.generate(["dog " * 600], v, 4)
    with pytest.raises(InputError):
        gen.generate("a", v, 4)
    with pytest.raises(InputError, match="top_p"):
        gen.generate(["a"], v, 4, top_p=0.0)


def test_generation_stops_at_the_sequence_budget(tiny):
    gen, _ = tiny
    n_prompt = len(gen.tokenizer.encode(format_prompt("x"), bos=True))
    short = Generator(gen.model, gen.tokenizer, max_seq_len=n_prompt + 3)
    pieces = list(short.stream(["x"], unit(1, 1024, 4), max_new_tokens=50, temperature=0))
    assert len(pieces) <= 3


def test_load_generator_needs_both_paths_and_checks_variant(tiny):
    _, workdir = tiny
    with pytest.raises(WeightsError, match="llm.llama_dir"):
        load_generator(LLMConfig())
    rms = write_adapter_checkpoint(
        workdir / "rms.pth", dim=64, n_layers=2, n_heads=4, variant="rmsnorm"
    )
    gen = load_generator(LLMConfig(llama_dir=workdir, adapter_checkpoint=rms, device="cpu"))
    assert gen.model.bind.variant == "rmsnorm" and gen.model.dtype == torch.float32


def test_bfloat16_on_cpu_and_device_dtype_resolution(tiny):
    from cachebind.inject.generate import resolve_device_dtype
    from cachebind.inject.load import load_adapter_llama

    _, workdir = tiny
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    model, tok, _ = load_adapter_llama(
        workdir, workdir / "imagebind_llm_tiny.pth", dtype=torch.bfloat16
    )
    assert model.dtype == torch.bfloat16 and model.llm.lm_head.weight.dtype == torch.bfloat16
    (text,) = Generator(model, tok).generate(["Describe."], unit(1, 1024, 5), 5, temperature=0)
    assert isinstance(text, str)


def test_unreadable_checkpoint_is_a_weights_error(tiny, tmp_path):
    _, workdir = tiny
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        load_generator(LLMConfig(llama_dir=workdir, adapter_checkpoint=bad, device="cpu"))
