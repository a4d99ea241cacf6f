"""Stage 2, the mapper on GPU (or CPU) actors: pixels -> F_M = ImageBind vision embedding;
with the distributed sink, the actor also writes the batch's rows (:mod:`jobs.embed.fragments`)
where they were produced."""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from cachebind.config import EncoderConfig, WeightsConfig
from cachebind.errors import InputError
from jobs.embed.decode import PIXELS
from jobs.embed.fragments import FragmentTarget, write_block

if TYPE_CHECKING:
    from cachebind.encode.extra import ExtraEncoder


class EncodeActor:
    """Holds one Encoder (one GPU, or CPU threads) and turns pixels into F_M = vector."""

    def __init__(
        self,
        encoder_cfg: EncoderConfig,
        weights_cfg: WeightsConfig,
        pixel_dtype: str,
        captions: bool,
        threads: int,
        target: FragmentTarget | None = None,
        views: int = 0,
        tokens_layer: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        import torch

        from cachebind.encode import Encoder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        self.encoder = Encoder.from_config(encoder_cfg, weights_cfg)
        self.pixel_dtype = pixel_dtype
        self.captions = captions
        self.target = target
        self.views = views
        self.tokens_layer = tokens_layer  # embed --tokens: the hidden state cached, else None
        patches, width = self.encoder.model.vision_token_shape()
        self.token_values = patches * width if tokens_layer is not None else 0
        # embed.extra_encoders: each reads its own pixels (pixels_<name>) on this actor's device
        self.extra: dict[str, ExtraEncoder] = {}
        if extra:
            # Imported only here: the module imports transformers' CLIP and DINOv2, ~3 CPU-s
            # that every actor of every job paid before, extra encoders or not.
            from cachebind.encode.extra import ExtraEncoder

            device = str(self.encoder.device)
            self.extra = {n: ExtraEncoder.load(n, d, device) for n, d in sorted(extra.items())}

    def __call__(self, batch: pa.Table) -> pa.Table:
        dim = self.encoder.out_dim
        n = batch.num_rows
        status = batch["status"].to_numpy(zero_copy_only=False)
        ok = np.flatnonzero(status == "ok")
        vectors = np.zeros((n, dim), dtype=np.float32)
        text_vectors = np.zeros((n, dim), dtype=np.float32)
        has_text = np.zeros(n, dtype=bool)
        encode_s = np.zeros(n, dtype=np.float64)
        view_vectors = np.zeros((n, self.views, dim), dtype=np.float32)
        patch_tokens = np.zeros((n, self.token_values), dtype=np.float16)
        extra_out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        if len(ok):
            start = time.perf_counter()
            x = pixel_batch(batch["pixels"], ok, self.pixel_dtype)
            if self.tokens_layer is None:
                vectors[ok] = self._encode(x)
            else:  # the same pass yields the vector and the tokens
                vectors[ok], patch_tokens[ok] = self._encode_with_tokens(x, self.tokens_layer)
            if self.views:
                # One encoder pass per view, each of the batch's size: the actor's (GPU) memory
                # holds what it holds without views.
                xs = pixel_batch(batch["view_pixels"], ok, self.pixel_dtype, self.views)
                for v in range(self.views):
                    view_vectors[ok, v] = self._encode(np.ascontiguousarray(xs[:, v]))
            extra_out = self._encode_extra(batch, ok)
            if self.captions:
                has_text = self._embed_captions(batch, ok, text_vectors)
            encode_s[ok] = (time.perf_counter() - start) / len(ok)
        pixels = [c for c in batch.column_names if c == "view_pixels" or c.startswith("pixels")]
        out = batch.drop_columns(pixels)
        out = out.append_column("vector", _fixed_list(vectors))
        if self.views:
            # [views · dim] a row: the table's layout (store.schema.views_type).
            out = out.append_column("view_vectors", _fixed_list(view_vectors.reshape(n, -1)))
        if self.tokens_layer is not None:  # [patches · width] float16 a row
            out = out.append_column("patch_tokens", _fixed_list(patch_tokens))
        for name in self.extra:
            vec, tok = extra_out.get(name) or self._empty_extra(name, n)
            out = out.append_column(f"vector_{name}", _fixed_list(vec))
            if tok is not None:
                out = out.append_column(f"patch_tokens_{name}", _fixed_list(tok))
        if self.captions:
            out = out.append_column("text_vector", _fixed_list(text_vectors, valid=has_text))
        out = out.append_column("encode_s", pa.array(encode_s))
        return write_block(out, self.target) if self.target is not None else out

    def _encode(self, x: np.ndarray) -> np.ndarray:
        """F_M of a pixel batch: the vision encoder's output, L2-normalised (float32 [n, d])."""
        import torch
        import torch.nn.functional as F

        from cachebind.modalities import Modality

        with warnings.catch_warnings():
            # The array views Arrow's read-only buffer; the model only reads its input.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            feats = self.encoder.encode(Modality.IMAGE, torch.from_numpy(x))
        return F.normalize(feats.float(), dim=-1).numpy()

    def _empty_extra(self, name: str, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        shape = self.extra[name].shape
        tok = None
        if self.tokens_layer is not None:
            tok = np.zeros((n, shape.patches * shape.width), dtype=np.float16)
        return np.zeros((n, shape.out_dim), dtype=np.float32), tok

    def _encode_extra(
        self, batch: pa.Table, ok: np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Each extra encoder's vectors (and tokens) of the ``ok`` rows, zero elsewhere: the
        rows of a block are written whole, the error rows of it go to the errors table."""
        import torch

        out = {}
        for name, extra in self.extra.items():
            vec, tok = self._empty_extra(name, batch.num_rows)
            pixels = pixel_batch(
                batch[f"pixels_{name}"], ok, self.pixel_dtype, shape=extra.preprocess.shape
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                v, t = extra.encode(torch.from_numpy(pixels), self.tokens_layer)
            vec[ok] = v.numpy()
            if tok is not None and t is not None:
                tok[ok] = t.reshape(len(ok), -1).numpy()
            out[name] = (vec, tok)
        return out

    def _encode_with_tokens(self, x: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """F_M as ``_encode`` and the patch tokens of ``layer``: float16 [n, patches · width]."""
        import torch
        import torch.nn.functional as F

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            feats, tokens = self.encoder.encode_image_tokens(torch.from_numpy(x), layer)
        flat = tokens.reshape(tokens.shape[0], -1).numpy()
        return F.normalize(feats.float(), dim=-1).numpy(), flat

    def _embed_captions(self, batch: pa.Table, ok: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Caption embeddings (text encoder) into ``out``; returns which rows have one. A row
        without a usable caption gets a null ``text_vector``, never a failed batch."""
        from cachebind.modalities import Modality

        has_text = np.zeros(len(out), dtype=bool)
        captions = batch["caption"].to_pylist()
        rows = [int(i) for i in ok if captions[i] and captions[i].strip()]
        if not rows:
            return has_text
        try:
            out[rows] = self.encoder.embed(Modality.TEXT, [captions[i] for i in rows])
            has_text[rows] = True
        except InputError:  # one bad caption: embed one by one, skipping the bad ones
            for i in rows:
                try:
                    out[i] = self.encoder.embed(Modality.TEXT, [captions[i]])[0]
                    has_text[i] = True
                except InputError:
                    continue
        return has_text


def pixel_batch(
    column: pa.ChunkedArray | pa.Array,
    rows: np.ndarray,
    dtype: str,
    per_row: int = 0,
    shape: tuple[int, ...] = PIXELS,
) -> np.ndarray:
    """The ``rows`` of a binary column of pixel tensors as one ``[len(rows), *PIXELS]`` array
    (``[len(rows), per_row, *PIXELS]`` when each row holds ``per_row`` tensors: view pixels).

    A view of Arrow's buffer when every row is taken (the usual batch), else one copy by
    ``take``: going through Python ``bytes`` would copy each batch three times, ~0.15 ms an
    image at 256 images a batch, a sixth of what a GPU spends encoding one. ``shape`` is one
    tensor's (an extra encoder's preprocessing has its own).
    """
    column = column if len(rows) == len(column) else column.take(pa.array(rows))
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], dtype=width)
    first, last = int(offsets[column.offset]), int(offsets[column.offset + len(column)])
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[first:last]
    full = (len(column), per_row, *shape) if per_row else (len(column), *shape)
    return data.view(dtype).reshape(full)


def _fixed_list(values: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    mask = pa.array(~valid) if valid is not None else None
    return pa.FixedSizeListArray.from_arrays(
        pa.array(values.reshape(-1)), values.shape[1], mask=mask
    )
