"""Specification of the adapter model: zero gates are plain LLaMA, open gates inject T_I."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from cachebind.inject.model import AdapterLlama, AdapterLlamaConfig, LoRALinear

SMALL = dict(
    dim=64,
    n_layers=2,
    n_heads=4,
    vocab_size=97,
    ffn_hidden=192,
    query_layer=2,
    bind_in_dim=32,
    bind_hidden=128,
    attn_implementation="eager",
)


def model_pair(**overrides) -> tuple[AdapterLlama, LlamaForCausalLM]:
    torch.manual_seed(0)
    cfg = AdapterLlamaConfig(**{**SMALL, **overrides})
    plain = LlamaForCausalLM(cfg.llama_config()).eval()
    adapted = AdapterLlama(cfg).eval()
    missing, unexpected = adapted.llm.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    # Only the adapter's own tensors are absent from plain LLaMA.
    assert all(any(s in k for s in ("gate", "lora_", "_proj.bias")) for k in missing)
    return adapted, plain


def test_zero_gates_give_exactly_plain_llama_logits():
    adapted, plain = model_pair(w_bias=False, lora_rank=0)  # the 7B-pretrained structure
    ids = torch.randint(0, 97, (3, 9))
    t_i = torch.randn(3, 64) * 5
    with torch.no_grad():
        assert torch.equal(adapted(ids, visual=t_i).logits, plain(ids, use_cache=False).logits)


def test_zero_gates_zero_bias_zero_lora_l2_match_plain_llama():
    adapted, plain = model_pair()  # fine-tuned structure at its released initialisation
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(("lora_l2.weight", ".bias")) and name.startswith("llm."):
                p.zero_()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            adapted(ids, visual=torch.randn(2, 64)).logits,
            plain(ids, use_cache=False).logits,
            rtol=0,
            atol=1e-6,
        )


def test_open_gates_make_logits_depend_on_the_visual_query():
    adapted, plain = model_pair(w_bias=False, lora_rank=0)
    with torch.no_grad():
        adapted.llm.model.layers[1].self_attn.gate.fill_(0.7)
        adapted.prefix_query.weight.normal_()
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        a = adapted(ids, visual=torch.randn(1, 64)).logits
        b = adapted(ids, visual=torch.randn(1, 64)).logits
        no_visual = adapted(ids, visual=None).logits
    assert not torch.allclose(a, b)
    assert torch.equal(
        no_visual, plain(ids, use_cache=False).logits
    )  # no visual input: no injection at all


def test_adapter_goes_only_to_the_last_query_layer_layers():
    cfg = AdapterLlamaConfig(**{**SMALL, "n_layers": 3, "query_layer": 2})
    model = AdapterLlama(cfg)
    assert [layer.self_attn.adapter_index for layer in model.llm.model.layers] == [None, 0, 1]
    assert model.prefix_query.weight.shape == (2, 64)
    assert model.llm.model.layers[0].self_attn.gate.shape == (1, 4, 1, 1)
    assert torch.count_nonzero(model.llm.model.layers[0].self_attn.gate) == 0


def test_lora_linear_is_base_plus_unscaled_low_rank_update():
    layer = LoRALinear(8, 6, bias=True, rank=3)
    x = torch.randn(4, 8)
    expected = (
        x @ layer.weight.T + layer.bias + (x @ layer.lora_l1.weight.T) @ layer.lora_l2.weight.T
    )
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.base(x), x @ layer.weight.T + layer.bias)
    assert layer.lora_l1.weight.shape == (3, 8) and layer.lora_l2.weight.shape == (6, 3)
