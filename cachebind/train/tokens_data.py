"""Cached patch tokens and captions -> LLaVA-1.5 training examples.

Stage 1 uses LLaVA's ``plain`` conversation (``llava/train/train.py::preprocess_plain``): the
text is ``<image>`` followed by the caption and the separator ``"\\n"``; tokenised as
``tokenizer_image_token`` does, that is BOS, the image, the caption's tokens. The labels are
``IGNORE_INDEX`` (-100) on BOS and on every visual token, the caption's tokens elsewhere: the loss
is on the caption only. The image stands as one id per visual token (``IMAGE_INDEX``, LLaVA's
``IMAGE_TOKEN_INDEX``), which ``tokens_step.stage1_loss`` replaces by the projected tokens.

A micro-batch is padded on the right to its longest example with the tokenizer's ``unk`` id (LLaVA
-1.5 pads with ``unk``), labels -100: under the causal mask no real position sees the padding, so
no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cachebind.inject.tokenizer import Tokenizer
from cachebind.train.tokens_step import LLAVA_IGNORE

IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX
PLAIN_SEP = "\n"  # conv_llava_plain's separator, after the caption


@dataclass
class TokensBatch:
    """One micro-batch: ``patch_tokens`` [B, P, C] float16, ``input_ids`` / ``labels`` [B, S]."""

    patch_tokens: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        """``TokensLoss.forward``'s arguments."""
        return self.patch_tokens, self.input_ids, self.labels

    def to(self, device: torch.device | str) -> TokensBatch:
        return TokensBatch(
            self.patch_tokens.to(device), self.input_ids.to(device), self.labels.to(device)
        )


def plain_example(
    tok: Tokenizer, caption: str, patches: int, max_length: int
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one caption in the ``plain`` conversation, ``max_length`` at most
    (the visual tokens count; the caption is what is cut)."""
    caption_ids = tok.encode(str(caption) + PLAIN_SEP, bos=False, eos=False)
    ids = [tok.bos_id, *([IMAGE_INDEX] * patches), *caption_ids][:max_length]
    labels = [LLAVA_IGNORE] * (1 + patches) + caption_ids
    return ids, labels[:max_length]


def min_length(patches: int) -> int:
    """The shortest ``max_length`` that keeps BOS, every visual token and one caption token."""
    return patches + 2


def pad_examples(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: ids with ``pad_id``, labels with -100."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), width), LLAVA_IGNORE, dtype=torch.int64)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.int64)
    return input_ids, labels


def collate_captions(
    tok: Tokenizer,
    tokens: np.ndarray,
    captions: Sequence[str],
    patches: int,
    max_length: int,
) -> TokensBatch:
    """A stage-1 micro-batch from cache rows: ``tokens`` [B, patches · width] float16."""
    examples = [plain_example(tok, c, patches, max_length) for c in captions]
    input_ids, labels = pad_examples(examples, tok.sp.unk_id())
    flat = np.array(tokens, dtype=np.float16)  # a copy: Arrow buffers are read-only
    patch_tokens = torch.from_numpy(flat.reshape(len(examples), patches, -1))
    return TokensBatch(patch_tokens, input_ids, labels)
