"""Specification of LoRA as LLaVA-1.5's ``finetune_lora.sh`` applies it: every linear layer of
the LLM but ``lm_head`` gets a rank-r update scaled by alpha / r, the model starts equal to the
base one, and merging folds the update into the weights so that the plain model computes what
the adapted one did."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cachebind.train.lora import (
    LORA_TARGETS,
    LoraLinear,
    add_lora,
    lora_modules,
    merge_lora,
    merge_lora_state,
)


def small_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=50, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def trained_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every adapter a non-zero B, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.normal_(0, 0.05)


def test_every_linear_layer_but_the_head_is_adapted_and_the_model_starts_as_the_base():
    base = small_llama()
    adapted = small_llama()
    ids = torch.randint(0, 50, (2, 7))
    wrapped = add_lora(adapted.model, r=4, alpha=8, dropout=0.05)
    assert len(wrapped) == 2 * len(LORA_TARGETS)  # seven per layer, two layers
    assert {name.rsplit(".", 1)[1] for name in wrapped} == set(LORA_TARGETS)
    assert not isinstance(adapted.lm_head, LoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, base(ids).logits, rtol=0, atol=0)
    module = dict(lora_modules(adapted))["model.layers.0.self_attn.q_proj"]
    assert module.scale == 2.0 and module.lora_A.shape == (4, 32) and module.lora_B.shape == (32, 4)


def test_merging_folds_the_update_into_the_weights_and_computes_what_the_adapters_did():
    model = small_llama()
    add_lora(model.model, r=4, alpha=8, dropout=0.05)
    trained_adapters(model)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        adapted = model(ids).logits  # eval: no dropout
    base = {k: v.clone() for k, v in small_llama().state_dict().items()}
    adapters = {
        f"{name}.{p}": getattr(module, p).detach().clone()
        for name, module in lora_modules(model)
        for p in ("lora_A", "lora_B")
    }
    merge_lora(model)
    assert not list(lora_modules(model))
    assert set(model.state_dict()) == set(base)  # the base's layout again
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    # The same merge from tensors alone (a checkpoint's adapters onto published weights).
    merged = merge_lora_state(base, adapters, scale=2.0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6)
    assert not torch.equal(merged["model.layers.1.mlp.down_proj.weight"],
                           base["model.layers.1.mlp.down_proj.weight"])  # fmt: skip
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])


def test_only_the_adapters_receive_gradients_and_dropout_acts_in_training_alone():
    model = small_llama()
    add_lora(model.model, r=4, alpha=8, dropout=0.5)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))
    model.train()
    ids = torch.randint(0, 50, (2, 7))
    model(ids).logits.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith((".lora_A", ".lora_B")) for n in grads)
    trained_adapters(model)
    torch.manual_seed(0)
    first = model(ids).logits
    torch.manual_seed(0)
    assert torch.equal(model(ids).logits, first)  # a seeded draw repeats (exact resume)
    torch.manual_seed(1)
    assert not torch.equal(model(ids).logits, first)
    with pytest.raises(ValueError, match="rank 0"):
        LoraLinear(torch.nn.Linear(4, 4), r=0, alpha=1, dropout=0)
