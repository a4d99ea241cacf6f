"""``POST /v1/classify``: zero-shot labels of a request's inputs, the CLIP way.

Class embeddings are the normalised means of the labels' prompt embeddings
(:mod:`cachebind.analysis.classify`); the prompts go through the same text micro-batcher as
every other text input, and their number is capped by ``analysis.max_prompts`` before any is
encoded, so a request's cost is bounded whatever its label set.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter

from cachebind.analysis.classify import ensemble, prompts_of, top_labels
from cachebind.analysis.templates import (
    IMAGENET_TEMPLATES,
    LabelSetError,
    check_labels,
    check_templates,
)
from cachebind.modalities import Modality
from cachebind.serve import schemas_analysis as sa
from cachebind.serve.deps import RequestLimits, State
from cachebind.serve.errors import ApiError, unprocessable
from cachebind.serve.inputs import embed_items

router = APIRouter()


@router.post("/v1/classify", response_model=sa.ClassifyResponse, tags=["v1"])
async def classify(
    body: sa.ClassifyRequest, state: State, limits: RequestLimits
) -> sa.ClassifyResponse:
    """Each input's best labels among ``labels`` (cosine to prompt-ensembled class embeddings)."""
    runtime = state.require_runtime()
    config = state.settings.analysis
    limits.check_inputs(body.inputs)
    try:
        labels = check_labels(body.labels, config.max_labels)
        templates = check_templates(body.templates or IMAGENET_TEMPLATES, config.max_templates)
    except LabelSetError as exc:
        raise unprocessable("bad_labels", str(exc)) from exc
    prompts = prompts_of(labels, templates)
    if len(prompts) > config.max_prompts:
        raise unprocessable(
            "too_many_prompts",
            f"{len(labels)} labels x {len(templates)} templates = {len(prompts)} prompts; the "
            f"limit is {config.max_prompts} (analysis.max_prompts): send fewer templates",
        )
    text_bytes = sum(len(p.encode("utf-8")) for p in [*labels, *templates])
    if text_bytes > limits.config.max_text_bytes:
        raise ApiError(
            413,
            "text_too_large",
            f"labels and templates hold {text_bytes} bytes of text; the limit is "
            f"{limits.config.max_text_bytes}",
        )

    async def work() -> sa.ClassifyResponse:
        vectors = await embed_items(body.inputs, state.embed_one, runtime.dim)
        prompt_vectors = await asyncio.gather(
            *(
                state.embed_one(Modality.TEXT, p, f"labels[{i // len(templates)}]")
                for i, p in enumerate(prompts)
            )
        )
        classes = ensemble(np.stack(prompt_vectors), len(labels), len(templates))
        idx, scores = top_labels(np.stack(vectors), classes, body.top_k)
        return sa.ClassifyResponse(
            items=[
                sa.ClassifiedItem(
                    modality=item.modality.value if item.modality else "embedding",
                    labels=[
                        sa.LabelScore(label=labels[j], score=float(sc))
                        for j, sc in zip(row_idx, row_scores, strict=True)
                    ],
                )
                for item, row_idx, row_scores in zip(body.inputs, idx, scores, strict=True)
            ],
            templates=len(templates),
            encoder=runtime.encoder_identity,
        )

    return await limits.timed(work())
