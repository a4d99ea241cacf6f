"""LLaMA with the ImageBind-LLM adapter, built on transformers' ``LlamaForCausalLM``.

What the released ``llama.py`` / ``llama_adapter.py`` do, and how it maps here:

* The bind network turns F~_M into one visual token T_I [B, dim].
* Each of the last ``query_layer`` layers (all 32 in the 7B release) gets one adapter token
  adapter_i = T_I + prefix_query_i.
* Inside that layer's attention, adapter_v = W_v(adapter_i) with the *base* W_v (no LoRA), and
  tanh(gate_i) · adapter_v is added to every position's per-head attention output before W_o.
  gate_i is [1, n_heads, 1, 1] and zero-initialised, so an untrained adapter is plain LLaMA.
* Fine-tuned checkpoints add biases on wq, wo, w1, w2, w3 and rank-r LoRA (no scaling) on wq,
  wk, wv, wo, w1, w2, w3: y = W x + b + L2 (L1 x).

The HF model runs as the library wrote it: norms, rotary embedding, masks, KV cache and the
attention kernels (eager / SDPA / flash) are untouched. Each layer's projections become
``LoRALinear``; the adapter term enters through a forward pre-hook on ``o_proj``, whose input is
the per-head attention output ``attn_output.reshape(*input_shape, -1)`` in transformers 5.23's
``LlamaAttention.forward`` (a changed shape is an error, not a silent miscomputation). The
adapter tokens of the current call travel in the ``adapter_tokens`` context variable, set by
``AdapterLlama.forward`` for the duration of the call: per thread and per asyncio task, so
concurrent calls cannot see each other's tokens.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from cachebind.bind import BindNetwork, Variant

# [query_layer, B, dim] adapter tokens of the forward call in progress (None: plain LLaMA).
adapter_tokens: ContextVar[torch.Tensor | None] = ContextVar("adapter_tokens", default=None)
# [B] 1.0 for a row with a visual query, 0.0 for a text-only row of a mixed batch (None: all 1).
adapter_rows: ContextVar[torch.Tensor | None] = ContextVar("adapter_rows", default=None)
# [query_layer, B, 1, n_heads * head_dim] terms computed ahead (``AdapterLlama.adapter_terms``):
# a decoder keeps them per row, since they depend on the row's visual query alone.
terms_ahead: ContextVar[torch.Tensor | None] = ContextVar("terms_ahead", default=None)


@dataclass(frozen=True)
class AdapterLlamaConfig:
    """Shape of a LLaMA + ImageBind-LLM adapter (defaults: LLaMA-7B with today's released 7B,
    whose bridge is the RMSNorm one; the loader reads every field from the files)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention; None: n_heads (LLaMA-1 7B)
    vocab_size: int = 32000
    ffn_hidden: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 512  # the released inference setting
    w_bias: bool = True
    lora_rank: int = 16  # 0: no LoRA (the "7B-pretrained" checkpoint)
    query_layer: int = 32  # rows of prefix_query = adapted (last) layers
    bind_variant: Variant = "rmsnorm"
    bind_in_dim: int = 1024
    bind_hidden: int = 16384
    bos_id: int = 1
    eos_id: int = 2
    attn_implementation: str = "sdpa"

    def llama_config(self) -> LlamaConfig:
        config = LlamaConfig(
            hidden_size=self.dim,
            intermediate_size=self.ffn_hidden,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads or self.n_heads,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            pad_token_id=None,
            bos_token_id=self.bos_id,
            eos_token_id=self.eos_id,
        )
        config._attn_implementation = self.attn_implementation
        return config


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4·dim (times the optional multiplier), rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class LoRALinear(nn.Linear):
    """y = W x + b + L2(L1 x): the released bias + LoRA tuning (no LoRA scaling).

    ``lora_l1`` is [r, in] and ``lora_l2`` [out, r] (the released ``lora_*_l1/_l2`` weights).
    ``base`` applies W x + b alone, which the adapter's W_v uses.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.lora_l1 = nn.Linear(in_features, rank, bias=False) if rank else None
        self.lora_l2 = nn.Linear(rank, out_features, bias=False) if rank else None

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_l1 is not None and self.lora_l2 is not None:
            out = out + self.lora_l2(self.lora_l1(x))
        return out


class AdapterAttention(LlamaAttention):
    """LlamaAttention + the gated visual adapter (released ``Attention`` with ``adapter_len == 1``).

    The library's ``forward`` runs unchanged (eager, SDPA or flash); only the projections are
    swapped for ``LoRALinear`` and a forward pre-hook on ``o_proj`` adds
    tanh(gate) · adapter_v to its input, the per-head attention output [B, S, n_heads · head_dim].
    With grouped-query attention (n_kv_heads < n_heads) W_v yields n_kv_heads heads, and each
    is repeated for the query heads of its group, as the attention repeats its values.

    ``adapter_index`` is this layer's row in the adapter tokens (None: a layer without adapter).
    The tokens of the current forward call come from ``adapter_tokens`` (see ``AdapterLlama``).
    """

    def __init__(
        self,
        config: LlamaConfig,
        layer_idx: int,
        w_bias: bool,
        lora_rank: int,
        adapter_index: int | None,
    ) -> None:
        super().__init__(config, layer_idx)
        dim, heads = config.hidden_size, config.num_attention_heads
        # LlamaConfig fills num_key_value_heads in (with num_attention_heads when unset).
        kv_heads = config.num_key_value_heads or heads
        # Released layout: wq and wo carry a bias, wk and wv never do.
        self.q_proj = LoRALinear(dim, heads * self.head_dim, w_bias, lora_rank)
        self.k_proj = LoRALinear(dim, kv_heads * self.head_dim, False, lora_rank)
        self.v_proj: LoRALinear = LoRALinear(dim, kv_heads * self.head_dim, False, lora_rank)
        self.o_proj = LoRALinear(heads * self.head_dim, dim, w_bias, lora_rank)
        self.adapter_index = adapter_index
        self.gate = nn.Parameter(torch.zeros(1, heads, 1, 1))  # zero-init: starts as LLaMA
        if adapter_index is not None:
            self.o_proj.register_forward_pre_hook(self._inject)

    def adapter_term(self, adapter: torch.Tensor) -> torch.Tensor:
        """tanh(gate) · W_v(adapter_i) per head, flattened: [B, dim] -> [B, 1, n_heads · head_dim].

        Base W_v (no LoRA, no norm); KV head j serves query heads j·n_rep ... (j+1)·n_rep - 1.
        """
        batch, heads = adapter.shape[0], self.gate.shape[1]
        adapter_v = self.v_proj.base(adapter).view(batch, -1, self.head_dim)
        adapter_v = adapter_v.repeat_interleave(self.num_key_value_groups, dim=1)
        return (self.gate.tanh().view(1, heads, 1) * adapter_v).view(batch, 1, -1)

    def _inject(self, o_proj: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple | None:
        adapters, terms = adapter_tokens.get(), terms_ahead.get()
        if adapters is None and terms is None:
            return None
        (out,) = args  # [B, S, n_heads * head_dim]: the attention output before W_o
        if out.shape[-1] != self.gate.shape[1] * self.head_dim:
            raise RuntimeError(
                f"o_proj input {tuple(out.shape)} is not [B, S, n_heads * head_dim]: "
                "the installed transformers changed LlamaAttention"
            )
        if terms is not None:  # computed ahead; a text-only row's are zeros (x + 0.0 is exact)
            return (out + terms[self.adapter_index].to(out.dtype),)
        assert adapters is not None  # one of the two is set, checked above
        term = self.adapter_term(adapters[self.adapter_index])
        rows = adapter_rows.get()
        if rows is not None:  # x * 1.0 is exact: a visual row is what it is alone
            term = term * rows.to(term.dtype).view(-1, 1, 1)
        return (out + term.to(out.dtype),)  # broadcast over every position


class AdapterMLP(LlamaMLP):
    """SwiGLU with the released bias + LoRA on w1 (gate_proj), w3 (up_proj), w2 (down_proj)."""

    def __init__(self, config: LlamaConfig, w_bias: bool, lora_rank: int) -> None:
        super().__init__(config)
        dim, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = LoRALinear(dim, hidden, w_bias, lora_rank)
        self.up_proj = LoRALinear(dim, hidden, w_bias, lora_rank)
        self.down_proj = LoRALinear(hidden, dim, w_bias, lora_rank)


class AdapterLlama(nn.Module):
    """LLaMA + bind network + prefix_query + gated injection.

    ``llm`` is a transformers ``LlamaForCausalLM`` whose layers hold ``AdapterAttention`` /
    ``AdapterMLP``; ``bind`` maps F~_M to T_I; ``prefix_query`` is [query_layer, dim].
    """

    def __init__(self, cfg: AdapterLlamaConfig) -> None:
        super().__init__()
        if not 1 <= cfg.query_layer <= cfg.n_layers:
            raise ValueError(f"query_layer {cfg.query_layer} not in [1, {cfg.n_layers}]")
        kv_heads = cfg.n_kv_heads or cfg.n_heads
        if cfg.n_heads % kv_heads:
            raise ValueError(f"n_heads {cfg.n_heads} is not a multiple of n_kv_heads {kv_heads}")
        self.cfg = cfg
        hf_config = cfg.llama_config()
        self.llm = LlamaForCausalLM(hf_config)
        first_adapted = cfg.n_layers - cfg.query_layer  # released: layers[-query_layer:]
        for i, layer in enumerate(self.llm.model.layers):
            index = i - first_adapted if i >= first_adapted else None
            layer.self_attn = AdapterAttention(hf_config, i, cfg.w_bias, cfg.lora_rank, index)
            layer.mlp = AdapterMLP(hf_config, cfg.w_bias, cfg.lora_rank)
        self.bind = BindNetwork(cfg.bind_variant, cfg.bind_in_dim, cfg.dim, cfg.bind_hidden)
        self.prefix_query = nn.Embedding(cfg.query_layer, cfg.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.prefix_query.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.prefix_query.weight.device

    def visual_query(self, f_m: torch.Tensor) -> torch.Tensor:
        """T_I = bind(F~_M): [B, bind_in_dim] -> [B, dim]."""
        return self.bind(f_m.to(device=self.device, dtype=self.dtype))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings of ``ids`` [B, S] -> [B, S, dim]."""
        embeds: torch.Tensor = self.llm.get_input_embeddings()(ids)
        return embeds

    def adapters(self, t_i: torch.Tensor) -> torch.Tensor:
        """adapter_i = T_I + prefix_query_i for every adapted layer: [query_layer, B, dim]."""
        return t_i[None, :, :] + self.prefix_query.weight[:, None, :]

    def adapter_terms(self, t_i: torch.Tensor) -> torch.Tensor:
        """Every adapted layer's tanh(gate) · W_v(T_I + prefix_query_i):
        [B, dim] -> [query_layer, B, 1, n_heads · head_dim]. They depend on T_I alone, so a
        decoder computes them once per row and passes them to ``forward`` on every step."""
        adapters = self.adapters(t_i)
        attentions = [layer.self_attn for layer in self.llm.model.layers]
        adapted = [a for a in attentions if a.adapter_index is not None]
        adapted.sort(key=lambda a: a.adapter_index)
        return torch.stack([a.adapter_term(adapters[a.adapter_index]) for a in adapted])

    def forward(
        self,
        input_ids: torch.Tensor,
        visual: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        visual_rows: torch.Tensor | None = None,
        terms: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits for ``input_ids`` [B, S]; ``visual`` is T_I [B, dim] (None: plain LLaMA).

        ``visual_rows`` [B] (1: adapter on, 0: off) lets text-only rows share a batch with
        visual ones: an off row gets no adapter term at all, as plain LLaMA. ``terms``
        (from ``adapter_terms``, a text-only row's all zeros) replaces ``visual``: the same
        logits without recomputing each layer's W_v(adapter) on every call."""
        if terms is not None and visual is not None:
            raise ValueError("pass the visual query or its adapter terms, not both")
        token = adapter_tokens.set(self.adapters(visual) if visual is not None else None)
        rows_token = adapter_rows.set(visual_rows if visual is not None else None)
        terms_token = terms_ahead.set(terms)
        try:
            return self.llm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
            )
        finally:
            terms_ahead.reset(terms_token)
            adapter_rows.reset(rows_token)
            adapter_tokens.reset(token)
