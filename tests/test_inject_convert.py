"""Specification of checkpoint conversion and loading: files in the released layouts (Meta
LLaMA, possibly sharded, or a transformers directory + ``{"model": ...}`` ImageBind-LLM) load
into a model whose logits equal an independent implementation of the released math."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from reference_llama import RefAdapter, RefArgs, randomize_, released_checkpoints, shard_meta
from transformers import LlamaConfig, LlamaForCausalLM

from cachebind.errors import WeightsError
from cachebind.inject.convert import permute_rotary, unpermute_rotary
from cachebind.inject.load import load_adapter_llama
from cachebind.inject.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)


def make_ref(**kw) -> RefAdapter:
    args = RefArgs(**{"vocab_size": 400, "bind_in_dim": 1024, **kw})
    return randomize_(RefAdapter(args), seed=3).eval()


def write_meta(root: Path, ref: RefAdapter, tokenizer: Path, shards: int = 1) -> Path:
    """``root/7B/{params.json, consolidated.*.pth}``, ``root/tokenizer.model``, adapter .pth."""
    base, adapter = released_checkpoints(ref)
    (root / "7B").mkdir(parents=True)
    (root / "7B" / "params.json").write_text(json.dumps(ref.args.params_json()))
    for i, shard in enumerate(shard_meta(base, shards)):
        torch.save(shard, root / "7B" / f"consolidated.{i:02d}.pth")
    shutil.copy(tokenizer, root / "tokenizer.model")
    torch.save(adapter, root / "adapter.pth")
    return root / "adapter.pth"


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # transformers' convert_llama_weights_to_hf.py permutation, written out independently.
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_hf(root: Path, ref: RefAdapter, tokenizer: Path) -> Path:
    """A transformers LLaMA directory for the base + the released adapter file."""
    base, adapter = released_checkpoints(ref)
    a = ref.args
    config = LlamaConfig(
        hidden_size=a.dim,
        intermediate_size=a.ffn_hidden,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        vocab_size=a.vocab_size,
        rms_norm_eps=a.norm_eps,
        tie_word_embeddings=False,
        max_position_embeddings=512,
    )
    hf = LlamaForCausalLM(config)
    names = {
        "wq": "self_attn.q_proj",
        "wk": "self_attn.k_proj",
        "wv": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "w1": "mlp.gate_proj",
        "w2": "mlp.down_proj",
        "w3": "mlp.up_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    state = {
        "model.embed_tokens.weight": base["tok_embeddings.weight"],
        "model.norm.weight": base["norm.weight"],
        "lm_head.weight": base["output.weight"],
    }
    for key, value in base.items():
        parts = key.split(".")
        if parts[0] != "layers":
            continue
        leaf = parts[-2]
        if leaf in ("wq", "wk"):
            value = hf_permute(value, a.n_heads)
        state[f"model.layers.{parts[1]}.{names[leaf]}.weight"] = value
    hf.load_state_dict(state, strict=True)
    hf.save_pretrained(root / "hf")
    shutil.copy(tokenizer, root / "hf" / "tokenizer.model")
    torch.save(adapter, root / "adapter.pth")
    return root / "adapter.pth"


def assert_matches_reference(model, ref: RefAdapter, atol: float = 2e-5) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, ref.args.vocab_size, (2, 11), generator=g)
    f_m = torch.nn.functional.normalize(torch.randn(2, ref.args.bind_in_dim, generator=g), dim=-1)
    with torch.no_grad():
        want = ref(ids, f_m)
        got = model(ids, visual=model.visual_query(f_m)).logits
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
        # The visual input matters (gates open), so the comparison covers the injection.
        assert (ref(ids, None) - want).abs().max() > 1e-2
        torch.testing.assert_close(model(ids).logits, ref(ids, None), atol=atol, rtol=1e-5)


def test_permutation_maps_meta_pairs_to_hf_halves():
    n_heads, hd = 2, 8
    w = torch.randn(n_heads * hd, 5)
    x = torch.randn(5)
    q_meta = (w @ x).view(n_heads, hd // 2, 2)  # Meta: consecutive pairs are (re, im)
    q_hf = (permute_rotary(w, n_heads) @ x).view(n_heads, 2, hd // 2)  # HF: halves
    torch.testing.assert_close(q_hf[:, 0], q_meta[..., 0])
    torch.testing.assert_close(q_hf[:, 1], q_meta[..., 1])
    torch.testing.assert_close(unpermute_rotary(permute_rotary(w, n_heads), n_heads), w)
    b = torch.randn(n_heads * hd)  # biases and LoRA l2 rows follow the same map
    torch.testing.assert_close(
        permute_rotary(b, n_heads), permute_rotary(b[:, None], n_heads)[:, 0]
    )


@pytest.mark.parametrize(
    "kw",
    [
        {},  # 7B-beta: legacy (LayerNorm) bridge, biases, LoRA, open gates
        {"bind_variant": "rmsnorm"},  # today's 7B: RMSNorm bridge without biases
        {"w_bias": False, "w_lora": False},  # 7B-pretrained: gates, bridge, prefix only
        {"n_layers": 3, "query_layer": 2},  # only the last query_layer layers adapted
    ],
    ids=["7B-finetune", "rmsnorm-bridge", "7B-pretrained", "partial-query-layers"],
)
def test_meta_llama_plus_released_checkpoint_matches_reference(tmp_path, tokenizer_path, kw):
    ref = make_ref(**kw)
    adapter = write_meta(tmp_path, ref, tokenizer_path)
    model, tok, report = load_adapter_llama(tmp_path, adapter)
    assert tok.n_words == 400
    assert report.llama_format == "meta" and report.unused == []
    assert report.config.w_bias == ref.args.w_bias
    assert report.config.lora_rank == (16 if ref.args.w_lora else 0)
    assert report.config.bind_variant == ref.args.bind_variant
    assert "layers.0.attention_norm.weight" in report.overridden  # fine-tuned norms win
    assert_matches_reference(model, ref)


def test_sharded_meta_checkpoint(tmp_path, tokenizer_path):
    ref = make_ref()
    adapter = write_meta(tmp_path, ref, tokenizer_path, shards=2)
    model, _, report = load_adapter_llama(tmp_path / "7B", adapter)  # the model dir works too
    assert len(report.llama_files) == 2
    assert_matches_reference(model, ref)


def test_transformers_llama_directory_plus_released_checkpoint(tmp_path, tokenizer_path):
    ref = make_ref()
    adapter = write_hf(tmp_path, ref, tokenizer_path)
    model, _, report = load_adapter_llama(tmp_path / "hf", adapter)
    assert report.llama_format == "hf"
    assert_matches_reference(model, ref)


def test_missing_tensors_are_named(tmp_path, tokenizer_path):
    ref = make_ref()
    adapter = write_meta(tmp_path, ref, tokenizer_path)
    ckpt = torch.load(adapter)
    del ckpt["model"]["llama.layers.1.attention.gate"]
    del ckpt["model"]["llama.layers.0.feed_forward.lora_w2_l1.weight"]
    torch.save(ckpt, adapter)
    with pytest.raises(WeightsError) as err:
        load_adapter_llama(tmp_path, adapter)
    # Named as the released files spell them.
    assert (
        "'llama.layers.0.feed_forward.lora_w2_l1.weight', 'llama.layers.1.attention.gate'"
        in str(err.value)
    )
    assert str(err.value).startswith("2 tensors missing")


def test_model_names_map_back_to_released_file_names():
    from cachebind.inject.convert import meta_to_model_key, model_to_file_key

    for key in [
        "tok_embeddings.weight",
        "output.weight",
        "layers.3.attention.wq.weight",
        "layers.3.feed_forward.w2.weight",
        "layers.3.ffn_norm.weight",
    ]:
        assert model_to_file_key(meta_to_model_key(key)) == key
    for key in [
        "llama.layers.3.attention.gate",
        "llama.layers.3.attention.wo.bias",
        "llama.layers.3.attention.lora_wk_l2.weight",
        "llama.layers.3.feed_forward.lora_w3_l1.weight",
    ]:
        assert model_to_file_key(meta_to_model_key(key[len("llama.") :])) == key
    assert model_to_file_key("bind.image_bind_f2_3.bias") == "image_bind_f2_3.bias"


def test_unused_tensors_are_reported(tmp_path, tokenizer_path):
    ref = make_ref()
    adapter = write_meta(tmp_path, ref, tokenizer_path)
    ckpt = torch.load(adapter)
    ckpt["model"]["image_bind.modality_heads.vision.0.weight"] = torch.zeros(3)
    ckpt["model"]["llama.layers.0.attention.extra.weight"] = torch.zeros(3)
    torch.save(ckpt, adapter)
    _, _, report = load_adapter_llama(tmp_path, adapter)
    assert report.unused == [
        "image_bind.modality_heads.vision.0.weight",
        "llama.layers.0.attention.extra.weight",
    ]


def test_bad_inputs_raise_weights_errors(tmp_path, tokenizer_path):
    ref = make_ref()
    adapter = write_meta(tmp_path, ref, tokenizer_path)
    with pytest.raises(WeightsError, match="neither a Meta LLaMA"):
        load_adapter_llama(tokenizer_path.parent, adapter)
    with pytest.raises(WeightsError, match="not found"):
        load_adapter_llama(tmp_path, tmp_path / "nope.pth")
    torch.save({"state_dict": {}}, tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="not an ImageBind-LLM checkpoint"):
        load_adapter_llama(tmp_path, tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="'layernorm' bind network, configured 'rmsnorm'"):
        load_adapter_llama(tmp_path, adapter, bind_variant="rmsnorm")
    other_tok = train_tokenizer(tmp_path / "t2" / "tokenizer.model", vocab_size=360)
    shutil.copy(other_tok, tmp_path / "tokenizer.model")
    with pytest.raises(WeightsError, match="tokenizer has 360 words"):
        load_adapter_llama(tmp_path, adapter)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_grouped_query_meta_llama_matches_reference(tmp_path, tokenizer_path, n_kv_heads):
    # Each KV head's adapter_v serves the query heads of its group, like its values.
    ref = make_ref(n_heads=8, n_kv_heads=n_kv_heads)
    adapter = write_meta(tmp_path, ref, tokenizer_path, shards=2)
    model, _, report = load_adapter_llama(tmp_path, adapter)
    assert (report.config.n_heads, report.config.n_kv_heads) == (8, n_kv_heads)
    assert model.llm.model.layers[0].self_attn.v_proj.weight.shape == (n_kv_heads * 8, 64)
    assert_matches_reference(model, ref)


def test_grouped_query_key_rows_round_trip_through_hf_order():
    from cachebind.inject.convert import convert_llama, hf_to_meta

    n_heads, n_kv, hd = 8, 2, 8
    meta = {
        "layers.0.attention.wq.weight": torch.randn(n_heads * hd, 64),
        "layers.0.attention.wk.weight": torch.randn(n_kv * hd, 64),
    }
    state, unused = convert_llama(meta, n_heads, n_kv)
    assert unused == []
    k_hf = state["llm.model.layers.0.self_attn.k_proj.weight"]
    torch.testing.assert_close(k_hf, hf_permute(meta["layers.0.attention.wk.weight"], n_kv))
    hf = {
        "model.layers.0.self_attn.q_proj.weight": state[
            "llm.model.layers.0.self_attn.q_proj.weight"
        ],
        "model.layers.0.self_attn.k_proj.weight": k_hf,
    }
    back, _ = hf_to_meta(hf, n_heads, n_kv)
    for key, value in meta.items():
        assert torch.equal(back[key], value)


def test_n_heads_not_a_multiple_of_n_kv_heads_is_a_weights_error(tmp_path, tokenizer_path):
    ref = make_ref()
    adapter = write_meta(tmp_path, ref, tokenizer_path)
    params = json.loads((tmp_path / "7B" / "params.json").read_text())
    (tmp_path / "7B" / "params.json").write_text(json.dumps({**params, "n_kv_heads": 3}))
    with pytest.raises(WeightsError, match="not a multiple of n_kv_heads 3"):
        load_adapter_llama(tmp_path, adapter)
