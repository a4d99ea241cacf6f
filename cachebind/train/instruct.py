"""Stage 2's data: LLaVA-style instruction JSON resolved against the cache (``data/dataset.py``
``FinetuneDataset`` of the release).

Two kinds of item, as the release reads them:

* ``{"image": KEY_OR_PATH, "conversations": [{"value": question}, {"value": answer}, ...]}``:
  the prompt is the Alpaca template of the question (no input), the answer the first reply.
  The image's F_M is the cache row whose key is ``image`` (or the file name without its
  suffix); an image the cache lacks but that exists as a file is embedded on the fly through
  the configured encoder, the same one the cache was built with.
* ``{"instruction": ..., "input": ..., "output": ...}`` (text only): the release feeds an
  all-zero image tensor through ImageBind; here that feature is computed once with the encoder.

The resolved examples are written as a Lance dataset (``vector``, ``prompt``, ``answer``) beside
the run, so that the workers read them exactly as they read cache rows (``rows.RowSource``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cachebind.errors import CachebindError
from cachebind.inject.prompts import format_prompt
from cachebind.store.schema import row_id


class InstructionError(CachebindError):
    """An instruction file that cannot be resolved against the cache."""


def load_items(path: Path) -> list[dict[str, Any]]:
    items = json.loads(Path(path).read_text())
    if not isinstance(items, list):
        raise InstructionError(f"{path}: expected a JSON list of instruction items")
    return items


def prompt_and_answer(item: dict[str, Any]) -> tuple[str, str]:
    """The release's prompt and target text of one item."""
    if "image" in item:
        conversations = item.get("conversations") or []
        if len(conversations) < 2:
            raise InstructionError(f"item with image {item['image']!r} has no question/answer")
        return format_prompt(conversations[0]["value"]), str(conversations[1]["value"])
    try:
        return format_prompt(item["instruction"], item.get("input")), str(item["output"])
    except KeyError as e:
        raise InstructionError(f"text-only item lacks {e.args[0]!r}: {item}") from None


def resolve(
    items: list[dict[str, Any]],
    table: Any,  # cachebind.store.CacheTable
    embed_files: Callable[[list[Path]], np.ndarray],
    blank_feature: Callable[[], np.ndarray],
    base_dir: Path | None = None,
) -> pa.Table:
    """Examples with their F_M: cache rows by key, else files embedded by ``embed_files``;
    text-only items get ``blank_feature()`` (the zero image's feature)."""
    prompts, answers = [], []
    keys: list[str | None] = []
    for item in items:
        prompt, answer = prompt_and_answer(item)
        prompts.append(prompt)
        answers.append(answer)
        keys.append(str(item["image"]) if "image" in item else None)
    vectors = np.zeros((len(items), table.dim), dtype=np.float32)
    image_keys = {i: k for i, k in enumerate(keys) if k is not None}
    image_rows = list(image_keys)
    candidates = [_key_candidates(image_keys[i]) for i in image_rows]
    found_at: dict[int, int] = {}
    for attempt in range(2):  # the value itself, then the file name without its suffix
        ids = [row_id(c[min(attempt, len(c) - 1)]) for c in candidates]
        found, offsets = table.offsets(ids)
        rows = [image_rows[j] for j in np.flatnonzero(found)]
        for row, offset in zip(rows, offsets, strict=True):
            found_at.setdefault(row, int(offset))
    if found_at:
        rows = sorted(found_at)
        got = table.dataset.take([found_at[r] for r in rows], columns=["vector"])["vector"]
        from cachebind.store.table import vectors_to_numpy

        vectors[rows] = vectors_to_numpy(got)
    missing = [i for i in image_rows if i not in found_at]
    if missing:
        paths = [_as_path(image_keys[i], base_dir) for i in missing]
        absent = [keys[i] for i, p in zip(missing, paths, strict=True) if not p.is_file()]
        if absent:
            raise InstructionError(
                f"{len(absent)} images are neither in the cache nor files: {absent[:10]}"
            )
        vectors[missing] = embed_files(paths)
    text_only = [i for i, k in enumerate(keys) if k is None]
    if text_only:
        vectors[text_only] = blank_feature()
    dim = vectors.shape[1]
    return pa.table(
        {
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "prompt": prompts,
            "answer": answers,
            "has_image": [k is not None for k in keys],
        }
    )


def _key_candidates(value: str) -> list[str]:
    stem = Path(value).stem
    return [value, stem] if stem != value else [value]


def _as_path(value: str, base_dir: Path | None) -> Path:
    path = Path(value)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def encoder_callbacks(settings: Any) -> tuple[Callable, Callable]:
    """(embed files, zero-image feature) through ``settings.encoder``, built on first use."""
    state: dict[str, Any] = {}

    def encoder() -> Any:
        if "encoder" not in state:
            from cachebind.encode import Encoder

            state["encoder"] = Encoder.from_config(settings.encoder, settings.weights)
        return state["encoder"]

    def embed_files(paths: list[Path]) -> np.ndarray:
        return encoder().embed("image", [p.read_bytes() for p in paths], [str(p) for p in paths])

    def blank_feature() -> np.ndarray:
        import torch
        import torch.nn.functional as F

        zeros = torch.zeros(1, 3, 224, 224)  # the release's image of a text-only item
        return F.normalize(encoder().encode("image", zeros), dim=-1).numpy()[0]

    return embed_files, blank_feature


def write_examples(examples: pa.Table, uri: Path) -> tuple[str, int]:
    """Write (overwrite) the resolved examples as a Lance dataset; returns (uri, version)."""
    import lance

    ds = lance.write_dataset(examples, str(uri), mode="overwrite")
    return str(uri), int(ds.version)
