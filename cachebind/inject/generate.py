"""Text generation with the visual adapter: batched, KV-cached, streaming.

Follows the released ``LLaMA_adapter.generate``: Alpaca prompt (``format_prompt``), BOS then the
prompt, temperature 0.1 with top-p 0.75 nucleus sampling (``sample_top_p`` as released),
temperature 0 = greedy, stop at EOS, at most ``max_seq_len`` (512) tokens in all. Unlike the
released loop (batch size 1, right padding), prompts of different lengths run together here:
left padding, an attention mask, and position ids that start at 0 on each prompt's BOS, so every
row computes exactly what it would alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from cachebind.config import (
    RELEASED_MAX_NEW_TOKENS,
    RELEASED_TEMPERATURE,
    RELEASED_TOP_P,
    LLMConfig,
)
from cachebind.device import resolve_device, resolve_dtype
from cachebind.errors import InputError, WeightsError
from cachebind.inject.load import LoadReport, load_adapter_llama
from cachebind.inject.model import AdapterLlama
from cachebind.inject.prompts import format_prompt
from cachebind.inject.sampling import sample_top_p, tempered_probs
from cachebind.inject.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA when present; fp16 on GPU (the released inference precision), fp32 on CPU."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev, gpu_default=torch.float16)


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Raise ``InputError`` unless the sampling settings are usable."""
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise InputError(
            "generation",
            "out_of_range",
            f"need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1; got "
            f"{temperature}, {top_p}, {max_new_tokens}",
        )


class Generator:
    """Generates text conditioned on cache-enhanced features F~_M.

    ``visual`` arguments are F~_M [n, bind_in_dim] (one row per prompt; a single row is shared
    by all prompts), or None for plain LLaMA without the visual adapter.
    """

    def __init__(
        self,
        model: AdapterLlama,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int | None = None,
        seed: int | None = None,
        load_report: LoadReport | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len or model.cfg.max_seq_len
        self.seed = seed
        self.load_report = load_report
        self.visual_dim = model.cfg.bind_in_dim

    mode = "adapter"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prompt_ids(self, prompt: str, *, template: bool, images: Any = None) -> list[int]:
        """BOS and the prompt's ids, in the release's Alpaca template unless ``template`` is
        off. The adapter takes one feature F~_M, never images in the prompt."""
        if images is not None:
            raise InputError(
                "images", "unsupported", "the adapter mode takes F~_M, not images in the prompt"
            )
        return self.tokenizer.encode(format_prompt(prompt) if template else prompt, bos=True)

    def check_images(self, images: Any) -> None:
        raise InputError("images", "unsupported", "the adapter mode takes no images in prompts")

    def prompt_embeds(self, ids: list[int], images: Any) -> torch.Tensor:
        raise InputError("images", "unsupported", "the adapter mode takes no images in prompts")

    def generate(
        self,
        prompts: list[str],
        visual: torch.Tensor | np.ndarray | None,
        max_new_tokens: int = RELEASED_MAX_NEW_TOKENS,
        temperature: float = RELEASED_TEMPERATURE,
        top_p: float = RELEASED_TOP_P,
        *,
        template: bool = True,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> list[str]:
        """Generated text for each prompt (EOS and everything after it cut off)."""
        texts = [""] * len(prompts)
        for pieces in self.stream(
            prompts,
            visual,
            max_new_tokens,
            temperature,
            top_p,
            template=template,
            seed=seed,
            ignore_eos=ignore_eos,
        ):
            for i, piece in enumerate(pieces):
                texts[i] += piece
        return texts

    @torch.inference_mode()
    def stream(
        self,
        prompts: list[str],
        visual: torch.Tensor | np.ndarray | None,
        max_new_tokens: int = RELEASED_MAX_NEW_TOKENS,
        temperature: float = RELEASED_TEMPERATURE,
        top_p: float = RELEASED_TOP_P,
        *,
        template: bool = True,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[list[str]]:
        """Yield, after each decoding step, the new text of every prompt (``""`` when none).

        ``template``: wrap each prompt in the Alpaca template (``format_prompt``); pass False for
        prompts that are already formatted. ``ignore_eos`` decodes exactly ``max_new_tokens``
        (for benchmarks). Concatenating the pieces gives ``generate``'s output.
        """
        if isinstance(prompts, str) or not prompts:
            raise InputError("prompts", "wrong_type", "a non-empty list of strings is required")
        check_sampling(temperature, top_p, max_new_tokens)
        n = len(prompts)
        t_i = self._visual_query(visual, n)
        texts = [format_prompt(p) if template else p for p in prompts]
        ids = [self.tokenizer.encode(t, bos=True, eos=False) for t in texts]
        longest = max(len(x) for x in ids)
        if longest >= self.max_seq_len:
            raise InputError(
                "prompt", "too_long", f"{longest} tokens; the limit is {self.max_seq_len - 1}"
            )
        budget = min(max_new_tokens, self.max_seq_len - longest)

        device = self.device
        pad = self.tokenizer.eos_id  # any real id: padded positions are masked out
        input_ids = torch.full((n, longest), pad, dtype=torch.long, device=device)
        mask = torch.zeros((n, longest), dtype=torch.long, device=device)
        for row, x in enumerate(ids):
            input_ids[row, longest - len(x) :] = torch.tensor(x, device=device)
            mask[row, longest - len(x) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generator = None
        chosen_seed = seed if seed is not None else self.seed
        if chosen_seed is not None:
            generator = torch.Generator(device=device).manual_seed(chosen_seed)

        cache = DynamicCache(config=self.model.llm.config)
        out = self.model(
            input_ids,
            visual=t_i,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        generated: list[list[int]] = [[] for _ in range(n)]
        emitted = [""] * n
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for step in range(budget):
            logits = out.logits[:, -1, :].float()
            if ignore_eos:
                logits[:, self.tokenizer.eos_id] = -float("inf")
            if temperature > 0:
                probs = tempered_probs(logits, temperature)
                next_token = sample_top_p(probs, top_p, generator)
            else:
                next_token = torch.argmax(logits, dim=-1)
            next_token = torch.where(done, torch.full_like(next_token, pad), next_token)
            finished_before = done.tolist()
            done |= next_token == self.tokenizer.eos_id
            for row, token in enumerate(next_token.tolist()):
                if not finished_before[row] and token != self.tokenizer.eos_id:
                    generated[row].append(token)
            last = step == budget - 1 or bool(done.all())
            yield self._increments(generated, emitted, final=last)
            if last:
                return
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                next_token[:, None],
                visual=t_i,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )

    def _increments(self, generated: list[list[int]], emitted: list[str], final: bool) -> list[str]:
        """New decoded text per row since the last call. A trailing U+FFFD (half of a multi-byte
        character in byte-fallback pieces) waits for the next token unless this is the end."""
        pieces = []
        for row, ids in enumerate(generated):
            text = self.tokenizer.decode(ids)
            if not final and text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")
            if text.startswith(emitted[row]):
                piece = text[len(emitted[row]) :]
                emitted[row] = text
            else:  # decoding is prefix-stable for sentencepiece; keep output consistent anyway
                piece = ""
            pieces.append(piece)
        return pieces

    def _visual_query(
        self, visual: torch.Tensor | np.ndarray | None, n: int
    ) -> torch.Tensor | None:
        if visual is None:
            return None
        f = torch.as_tensor(
            np.asarray(visual, dtype=np.float32) if isinstance(visual, np.ndarray) else visual
        ).float()
        if f.ndim == 1:
            f = f[None]
        if f.ndim != 2 or f.shape[1] != self.visual_dim or f.shape[0] not in (1, n):
            raise InputError(
                "visual",
                "wrong_shape",
                f"expected [{n}, {self.visual_dim}] (or one row), got {tuple(f.shape)}",
            )
        if not torch.isfinite(f).all():
            raise InputError("visual", "not_finite", "visual features contain NaN or inf")
        return self.model.visual_query(f.expand(n, -1).to(self.device))


def load_generator(llm_cfg: LLMConfig, *, seed: int | None = None) -> Generator:
    """The Generator that ``llm_cfg`` describes (base LLaMA + ImageBind-LLM checkpoint)."""
    if llm_cfg.llama_dir is None or llm_cfg.adapter_checkpoint is None:
        raise WeightsError(
            "generation needs llm.llama_dir (Meta or transformers LLaMA) and "
            "llm.adapter_checkpoint (ImageBind-LLM 7B / 7B-beta / 7B-pretrained .pth)"
        )
    device, dtype = resolve_device_dtype(llm_cfg.device, llm_cfg.dtype)
    start = time.perf_counter()
    model, tok, report = load_adapter_llama(
        llm_cfg.llama_dir,
        llm_cfg.adapter_checkpoint,
        bind_variant=llm_cfg.bind_variant,
        device=device,
        dtype=dtype,
    )
    log.info(
        "loaded LLaMA + adapter in %.1f s (%s, %s)", time.perf_counter() - start, device, dtype
    )
    return Generator(model, tok, seed=seed, load_report=report)


load_llm = load_generator  # the name docs/ARCHITECTURE.md uses
