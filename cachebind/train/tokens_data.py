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

from cachebind.inject.llava_prompt import IMAGE_INDEX
from cachebind.inject.tokenizer import Tokenizer
from cachebind.train.tokens_step import LLAVA_IGNORE

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
    flat: bool = False,
) -> TokensBatch:
    """A stage-1 micro-batch from cache rows: ``tokens`` [B, patches · width] float16, given
    as [B, patches, width] (``flat``: as they are, the mixed projector's input)."""
    examples = [plain_example(tok, c, patches, max_length) for c in captions]
    input_ids, labels = pad_examples(examples, tok.sp.unk_id())
    values = np.array(tokens, dtype=np.float16)  # a copy: Arrow buffers are read-only
    shape = (len(examples), -1) if flat else (len(examples), patches, -1)
    patch_tokens = torch.from_numpy(values.reshape(shape))
    return TokensBatch(patch_tokens, input_ids, labels)


# LLaVA-1.5's stage-2 conversation (``conv_vicuna_v1``): system, "USER: ... ASSISTANT: ...</s>".
V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TAG = "<image>"


def conversation_example(
    tok: Tokenizer, turns: Sequence[tuple[str, str]], patches: int, has_image: bool, max_length: int
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a stage-2 conversation [(question, answer), ...] in LLaVA-1.5's
    ``v1`` template, the loss on each answer and its ``</s>``. With an image, ``<image>\\n``
    leads the first question (LLaVA's ``preprocess_multimodal`` moves it there) and stands as
    ``patches`` visual tokens. Turns are tokenised one piece at a time (LLaVA tokenises the
    conversation whole and masks by round lengths: a piece boundary may split differently).
    The example is cut at ``max_length``, or after the image's last token if that is later."""
    ids: list[int] = [tok.bos_id]
    labels: list[int] = [LLAVA_IGNORE]
    for i, (question, answer) in enumerate(turns):
        question = question.replace(IMAGE_TAG, "").strip()
        head = f"{V1_SYSTEM} USER: " if i == 0 else "USER: "
        if i == 0 and has_image:
            before = tok.encode(head, bos=False, eos=False)
            after = tok.encode(f"\n{question} ASSISTANT:", bos=False, eos=False)
            prompt = [*before, *([IMAGE_INDEX] * patches), *after]
        else:
            prompt = tok.encode(f"{head}{question} ASSISTANT:", bos=False, eos=False)
        reply = [*tok.encode(str(answer), bos=False, eos=False), tok.eos_id]
        ids += prompt + reply
        labels += [LLAVA_IGNORE] * len(prompt) + reply
    # Cut at max_length but never inside the image: its tokens are placed whole or not at all.
    cut = max(max_length, ids.index(IMAGE_INDEX) + patches) if has_image else max_length
    return ids[:cut], labels[:cut]


def collate_conversations(
    tok: Tokenizer,
    tokens: np.ndarray,
    conversations: Sequence[str],
    has_image: np.ndarray,
    patches: int,
    max_length: int,
) -> TokensBatch:
    """A stage-2 micro-batch: ``conversations`` JSON lists of [question, answer] pairs; only
    rows with an image contribute tokens (a text-only row has no image positions)."""
    import json

    flags = np.asarray(has_image, dtype=bool)
    examples = [
        conversation_example(tok, json.loads(c), patches, bool(f), max_length)
        for c, f in zip(conversations, flags, strict=True)
    ]
    input_ids, labels = pad_examples(examples, tok.sp.unk_id())
    flat = np.array(tokens, dtype=np.float16)[flags]  # a copy: Arrow buffers are read-only
    patch_tokens = torch.from_numpy(flat.reshape(int(flags.sum()), patches, -1))
    return TokensBatch(patch_tokens, input_ids, labels)
