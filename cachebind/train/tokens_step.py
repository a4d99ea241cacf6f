"""LLaVA-1.5 stage 1 on visual tokens: the projector learns, the encoder and the LLM do not.

The step is the same whether the patch tokens come from the cache (``embed --tokens``) or from
the encoder on the spot: tokens -> projector -> placed where the prompt's image-token ids stand
-> LLM -> next-token cross-entropy over the labelled positions (LLaVA's ``IGNORE_INDEX`` -100
on the image and prompt positions). Tokens are taken in the cache's dtype (float16) on both
paths, so a cached row and a fresh pass feed the projector the same numbers.

Only the projector is handed to the optimiser; the LLM's parameters are frozen
(``requires_grad_(False)``) so that no gradient is computed for them at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from cachebind.inject.placement import place_visual_tokens

LLAVA_IGNORE = -100  # LLaVA's IGNORE_INDEX
TOKEN_DTYPE = torch.float16  # what the cache stores; both paths round to it


def stage1_loss(
    projector: nn.Module,
    llm: LlamaForCausalLM,
    patch_tokens: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    image_token_id: int,
) -> torch.Tensor:
    """Cross-entropy of ``llm`` on ``labels`` [B, S] with ``patch_tokens`` [B, P, C] projected
    into the image-token positions of ``input_ids`` [B, S]. ``projector`` is LLaVA's
    ``LlavaProjector`` or SPHINX's ``bind.mixed.MixedProjector`` (whose input is the encoders'
    tokens side by side, [B, sum P_i·C_i])."""
    weight = next(projector.parameters())
    tokens = patch_tokens.to(TOKEN_DTYPE).to(device=weight.device, dtype=weight.dtype)
    # A negative image id (LLaVA's IMAGE_TOKEN_INDEX, -200) is no row of the embedding table:
    # those positions are overwritten by the visual tokens, so any row stands in for them.
    embeds = llm.get_input_embeddings()(input_ids.clamp(min=0))
    embeds = place_visual_tokens(embeds, input_ids, image_token_id, projector(tokens))
    logits = llm(inputs_embeds=embeds).logits
    output, target = logits[:, :-1, :], labels[:, 1:]
    if not bool((target != LLAVA_IGNORE).any()):  # every answer cut off: no loss, still a graph
        return output.float().mean() * 0
    return F.cross_entropy(
        output.reshape(-1, output.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=LLAVA_IGNORE,
    )


def stage1_step(
    projector: nn.Module,
    llm: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    patch_tokens: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    image_token_id: int,
) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimiser step on the projector; returns the loss and the projector's gradients
    (copies, taken before the step)."""
    llm.requires_grad_(False)
    optimizer.zero_grad(set_to_none=True)
    loss = stage1_loss(projector, llm, patch_tokens, input_ids, labels, image_token_id)
    loss.backward()
    grads = {
        name: p.grad.detach().clone()
        for name, p in projector.named_parameters()
        if p.grad is not None
    }
    optimizer.step()
    return float(loss.detach()), grads


def frozen(module: nn.Module) -> bool:
    """Whether no parameter of ``module`` would receive a gradient."""
    return not any(p.requires_grad for p in module.parameters())
