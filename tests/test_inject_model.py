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


def test_the_library_attention_forward_runs_unchanged():
    from transformers.models.llama.modeling_llama import LlamaAttention

    from cachebind.inject.model import AdapterAttention

    assert AdapterAttention.forward is LlamaAttention.forward


def test_grouped_query_zero_gates_give_exactly_plain_llama_logits():
    adapted, plain = model_pair(n_heads=8, n_kv_heads=2, w_bias=False, lora_rank=0)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(
            adapted(ids, visual=torch.randn(2, 64) * 5).logits, plain(ids, use_cache=False).logits
        )


def test_grouped_query_adapter_v_is_repeated_per_kv_group():
    cfg = AdapterLlamaConfig(**{**SMALL, "n_heads": 8, "n_kv_heads": 2})
    attn = AdapterLlama(cfg).llm.model.layers[0].self_attn
    with torch.no_grad():
        attn.gate.normal_()
    adapter = torch.randn(3, 64)
    term = attn.adapter_term(adapter).view(3, 8, 8)  # [B, heads, head_dim]
    v = (adapter @ attn.v_proj.weight.T).view(3, 2, 8)  # two KV heads
    for head in range(8):  # query heads 0-3 share KV head 0, heads 4-7 KV head 1
        torch.testing.assert_close(term[:, head], attn.gate[0, head, 0, 0].tanh() * v[:, head // 4])


def test_eager_and_sdpa_attention_inject_the_same_adapter():
    eager, _ = model_pair(n_heads=8, n_kv_heads=2)
    sdpa = AdapterLlama(
        AdapterLlamaConfig(
            **{**SMALL, "n_heads": 8, "n_kv_heads": 2, "attn_implementation": "sdpa"}
        )
    ).eval()
    with torch.no_grad():
        for layer in eager.llm.model.layers:
            layer.self_attn.gate.normal_()
        eager.prefix_query.weight.normal_()
    sdpa.load_state_dict(eager.state_dict())
    ids, t_i = torch.randint(0, 97, (2, 8)), torch.randn(2, 64)
    with torch.no_grad():
        want = eager(ids, visual=t_i).logits
        torch.testing.assert_close(sdpa(ids, visual=t_i).logits, want, atol=1e-5, rtol=1e-5)
        assert (want - eager(ids).logits).abs().max() > 1e-2  # the adapter is in play


def test_concurrent_calls_see_only_their_own_visual_query():
    from concurrent.futures import ThreadPoolExecutor

    adapted, _ = model_pair()
    with torch.no_grad():
        for layer in adapted.llm.model.layers:
            layer.self_attn.gate.fill_(0.8)
    ids = torch.randint(0, 97, (1, 6))
    queries = [torch.randn(1, 64) for _ in range(4)]
    with torch.no_grad():
        alone = [adapted(ids, visual=q).logits for q in queries]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda q: adapted(ids, visual=q).logits, queries * 5))
    for i, logits in enumerate(together):
        assert torch.equal(logits, alone[i % 4])


def test_adapter_terms_computed_ahead_give_the_visual_querys_logits_and_zeros_no_adapters():
    adapted, _ = model_pair(n_layers=3, query_layer=2)
    with torch.no_grad():
        for layer in adapted.llm.model.layers:
            layer.self_attn.gate.normal_()
        adapted.prefix_query.weight.normal_()
    ids = torch.randint(0, 97, (1, 7))
    t_i = torch.randn(1, 64)
    with torch.no_grad():
        terms = adapted.adapter_terms(t_i)
        assert terms.shape == (2, 1, 1, 64)  # the two adapted layers, one row
        want = adapted(ids, visual=t_i).logits
        assert torch.equal(adapted(ids, terms=terms).logits, want)
        without = adapted(ids).logits
        assert (want - without).abs().max() > 1e-2  # the adapter is in play
        assert torch.equal(adapted(ids, terms=torch.zeros_like(terms)).logits, without)
