"""Stage 2's rows: LLaVA-1.5 instruction JSON resolved against the cache's patch tokens.

An item is LLaVA's (``llava_v1_5_mix665k.json``): ``{"image": KEY, "conversations": [{"from":
"human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}``, or without
``image`` for a text-only conversation. ``image`` names a cache row by key, or by file name
without its suffix (``coco/train2017/0001.jpg`` -> ``0001``). The resolved examples are written
as a Lance dataset beside the run (``cache_offset`` -1 for text-only, ``conversation`` the
[question, answer] pairs as JSON), and ``InstructionSource`` reads each example with its tokens
from the cache at its pinned version: the tokens are never copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cachebind.store.schema import row_id
from cachebind.train.instruct import InstructionError, _key_candidates, load_items
from cachebind.train.rows import RowSource, _fixed_rows, _lance_dataset


def turns_of(item: Any, where: str) -> list[tuple[str, str]]:
    """An item's (question, answer) pairs; a malformed item is refused naming it."""
    if not isinstance(item, dict):
        raise InstructionError(f"{where}: an item is a JSON object, not {type(item).__name__}")
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2 or len(conversations) % 2:
        raise InstructionError(f"{where}: 'conversations' must be human/gpt pairs")
    turns = []
    for q, a in zip(conversations[::2], conversations[1::2], strict=True):
        ok = isinstance(q, dict) and isinstance(a, dict)
        if not ok or not isinstance(q.get("value"), str) or not isinstance(a.get("value"), str):
            raise InstructionError(f"{where}: every turn needs a string 'value'")
        if q.get("from", "human") != "human" or a.get("from", "gpt") != "gpt":
            raise InstructionError(f"{where}: turns must alternate human then gpt")
        turns.append((q["value"], a["value"]))
    return turns


def resolve_instructions(path: Path, table: Any) -> pa.Table:
    """The examples of ``path`` with the cache row offset of each item's image."""
    items = load_items(path)
    offsets = np.full(len(items), -1, dtype=np.int64)
    conversations = []
    wanted: dict[int, list[str]] = {}
    for i, item in enumerate(items):
        conversations.append(json.dumps(turns_of(item, f"{path} item {i}")))
        if "image" in item:
            wanted[i] = _key_candidates(str(item["image"]))
    rows = list(wanted)
    for attempt in range(2):  # the value itself, then the file name without its suffix
        todo = [r for r in rows if offsets[r] < 0]
        if not todo:
            break
        ids = [row_id(wanted[r][min(attempt, len(wanted[r]) - 1)]) for r in todo]
        found, at = table.offsets(ids)
        offsets[np.asarray(todo)[found]] = at
    missing = [str(items[r]["image"]) for r in rows if offsets[r] < 0]
    if missing:
        raise InstructionError(f"{len(missing)} images are not in the cache: {missing[:10]}")
    return pa.table({"cache_offset": offsets, "conversation": conversations})


@dataclass(frozen=True)
class InstructionSource(RowSource):
    """Examples (``uri`` at ``version``) joined with their tokens from the cache table."""

    cache_uri: str = ""
    cache_version: int = 0
    cache_storage_options: dict[str, str] | None = None
    tokens_column: str = "patch_tokens"
    token_values: int = 0
    """patches · width: a text-only row's (zero) tokens, so that every row has the same size."""

    def take(self, offsets: np.ndarray, choices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        examples = _lance_dataset(self.uri, self.version, self.storage_options).take(
            np.asarray(offsets, dtype=np.int64).tolist(), columns=["cache_offset", "conversation"]
        )
        at = examples.column("cache_offset").to_numpy()
        tokens = np.zeros((len(at), self.token_values), dtype=np.float16)
        has_image = at >= 0
        if has_image.any():
            cache = _lance_dataset(self.cache_uri, self.cache_version, self.cache_storage_options)
            got = cache.take(at[has_image].tolist(), columns=[self.tokens_column])
            tokens[has_image] = _fixed_rows(got.column(self.tokens_column).combine_chunks())
        return {
            self.tokens_column: tokens,
            "conversation": np.asarray(examples.column("conversation").to_pylist(), dtype=object),
            "has_image": has_image,
        }


def instruction_source(
    path: Path, table: Any, run_dir: Path, tokens_column: str, token_values: int
) -> tuple[InstructionSource, int]:
    """Resolve ``path`` into ``<run_dir>/llava_instructions.lance``; (source, examples)."""
    import lance

    examples = resolve_instructions(path, table)
    uri = run_dir / "llava_instructions.lance"
    ds = lance.write_dataset(examples, str(uri), mode="overwrite")
    source = InstructionSource(
        uri=str(uri.resolve()),
        version=int(ds.version),
        storage_options=None,
        columns=(),
        cache_uri=str(table.dataset.uri),
        cache_version=int(table.version),
        cache_storage_options=table.storage_options,
        tokens_column=tokens_column,
        token_values=token_values,
    )
    return source, examples.num_rows
