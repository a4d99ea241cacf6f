"""LLaMA's sentencepiece tokenizer, as the released ``llama/tokenizer.py`` uses it."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from cachebind.errors import WeightsError


class Tokenizer:
    """encode(s, bos, eos) / decode(ids) over a ``tokenizer.model`` file."""

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise WeightsError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for LLaMA: padding is masked, never embedded

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
