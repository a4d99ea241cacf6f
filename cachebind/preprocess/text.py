"""Text -> the text trunk's [77] int64 token ids (CLIP byte-pair encoding, as ImageBind).

Same algorithm as ImageBind's ``SimpleTokenizer`` (itself OpenAI CLIP's):
- clean: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse whitespace, lowercase;
- split with CLIP's regex, map each UTF-8 byte to a printable symbol, apply BPE merges by rank;
- ids: ``[SOT] + tokens``, cut to ``context_length - 1`` ids, append ``EOT``, zero-pad.
So a long text keeps SOT and its first 75 BPE tokens, and always ends in EOT (49407) at
position 76; the text trunk pools at the EOT (argmax id) position.
"""

from __future__ import annotations

import gzip
import html
from functools import cache, lru_cache
from importlib import resources

import ftfy
import regex
import torch

from cachebind.config import InputLimits
from cachebind.errors import InputError

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
SOT_TOKEN = 49406
EOT_TOKEN = 49407
BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"

MAX_TEXT_BYTES = InputLimits().max_text_bytes
"""``input.max_text_bytes``: longer inputs are refused (only the first 75 tokens count, and
cleaning costs O(length))."""

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@cache
def byte_symbols() -> dict[int, str]:
    """Each byte 0..255 -> a printable unicode character (GPT-2/CLIP's reversible byte map).

    Printable Latin-1 bytes map to themselves; the others to code points from 256 upwards, so
    BPE never sees whitespace or control characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # Insertion order (printable bytes first) is the order of the vocabulary's first 256 ids.
    return table


def clean_text(text: str) -> str:
    """ftfy fix, double html unescape, whitespace collapse, lowercase (as the reference)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:], strict=False))


class BPETokenizer:
    """CLIP's byte-level BPE with a 49,408-entry vocabulary."""

    def __init__(self, merges_gz: bytes, context_length: int = CONTEXT_LENGTH) -> None:
        lines = gzip.decompress(merges_gz).decode("utf-8").split("\n")
        # Line 0 is a version header; CLIP keeps the first 49152 - 256 - 2 merges.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols]
        vocab += ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.ranks: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}
        self.context_length = context_length
        self.sot = self.encoder["<|startoftext|>"]
        self.eot = self.encoder["<|endoftext|>"]
        self._bytes = byte_symbols()
        self._specials = {"<|startoftext|>", "<|endoftext|>"}

    @lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer lives per process
    def bpe(self, token: str) -> tuple[str, ...]:
        """Merge the symbols of one pre-token, lowest merge rank first, until none applies."""
        if token in self._specials:
            return (token,)
        word = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return word
        while True:
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        return word

    def encode(self, text: str) -> list[int]:
        """BPE token ids of ``text`` (cleaned), without SOT/EOT."""
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_text(text)):
            symbols = "".join(self._bytes[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(symbols))
        return ids

    def __call__(self, text: str) -> torch.Tensor:
        """[context_length] int64: SOT, ids cut to fit, EOT, zero padding."""
        ids = [self.sot, *self.encode(text)][: self.context_length - 1] + [self.eot]
        out = torch.zeros(self.context_length, dtype=torch.int64)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out


@cache
def default_tokenizer() -> BPETokenizer:
    """The tokenizer built from the packaged ``assets/bpe_simple_vocab_16e6.txt.gz``."""
    merges = (
        resources.files("cachebind.preprocess").joinpath("assets").joinpath(BPE_ASSET).read_bytes()
    )
    return BPETokenizer(merges)


def load_text(
    data: str | bytes, source: str = "<input>", *, limits: InputLimits | None = None
) -> str:
    """The decode stage: a str, or UTF-8 bytes -> a non-empty str of at most
    ``input.max_text_bytes`` UTF-8 bytes."""
    max_bytes = limits.max_text_bytes if limits is not None else MAX_TEXT_BYTES
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) > max_bytes:
            raise _too_long(source, len(data), max_bytes)
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(source, "undecodable", f"text is not UTF-8: {e}") from e
    if not isinstance(data, str):
        raise InputError(source, "wrong_type", f"text must be str or bytes, not {type(data)}")
    # A character is 1-4 UTF-8 bytes: only texts near the limit need encoding to measure.
    if len(data) > max_bytes:
        raise _too_long(source, len(data), max_bytes, "characters")
    if 4 * len(data) > max_bytes and (size := _utf8_len(data)) > max_bytes:
        raise _too_long(source, size, max_bytes)
    if not data.strip():
        # An empty query would embed as a bare [SOT, EOT]: almost surely a caller's mistake.
        raise InputError(source, "empty", "text is empty or only whitespace")
    return data


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _too_long(source: str, size: int, limit: int, unit: str = "bytes") -> InputError:
    detail = f"text of {size:,} {unit} > input.max_text_bytes = {limit:,}"
    return InputError(source, "too_large", detail)


def text_tensor(text: str) -> torch.Tensor:
    """The transform stage: str -> [77] int64 token ids."""
    return default_tokenizer()(text)


def preprocess_text(data: str | bytes, source: str = "<input>") -> torch.Tensor:
    """``load_text`` then ``text_tensor``."""
    return text_tensor(load_text(data, source))
