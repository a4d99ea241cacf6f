"""LLaMA + ImageBind-LLM adapter: model, checkpoint conversion, loading and generation."""

from cachebind.inject.generate import Generator, load_generator, load_llm, sample_top_p
from cachebind.inject.load import LoadReport, load_adapter_llama
from cachebind.inject.model import AdapterLlama, AdapterLlamaConfig
from cachebind.inject.prompts import format_prompt
from cachebind.inject.tiny import build_tiny_llm
from cachebind.inject.tokenizer import Tokenizer

__all__ = [
    "AdapterLlama",
    "AdapterLlamaConfig",
    "Generator",
    "LoadReport",
    "Tokenizer",
    "build_tiny_llm",
    "format_prompt",
    "load_adapter_llama",
    "load_generator",
    "load_llm",
    "sample_top_p",
]
