"""Request and response models of the analysis routes (``POST /v1/classify``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from cachebind.config import MAX_INPUTS
from cachebind.serve.schemas import InputItem, Strict, Text


class ClassifyRequest(Strict):
    """Zero-shot labels of each input (any modality, no mixing) against the given labels."""

    inputs: list[InputItem] = Field(
        ..., min_length=1, max_length=MAX_INPUTS, description="Inputs to label, each on its own."
    )
    labels: list[Text] = Field(
        ..., min_length=2, description="The label set (at most analysis.max_labels)."
    )
    templates: list[Text] | None = Field(
        None,
        min_length=1,
        description="Prompt templates, {} standing for the label (default: CLIP's 80 "
        "ImageNet templates). labels x templates is at most analysis.max_prompts.",
    )
    top_k: int = Field(1, ge=1, le=100, description="Labels returned per input, best first.")


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="Cosine between the input and the label's class embedding.")


class ClassifiedItem(BaseModel):
    modality: str
    labels: list[LabelScore]


class ClassifyResponse(BaseModel):
    items: list[ClassifiedItem]
    templates: int = Field(description="How many templates each class embedding averages.")
    encoder: dict[str, Any]


class ExportRequest(Strict):
    """Rows to export, by id, in the order given (ids not in the served version are left out)."""

    ids: list[Annotated[int, Field(ge=0, le=2**63 - 1)]] = Field(
        ...,
        min_length=1,
        description="Row ids (decimal strings are accepted: JavaScript loses int64 digits).",
    )
    format: Literal["parquet", "csv"] = "parquet"


class PlaceRequest(Strict):
    """Where a query lands on the map: the query as ``POST /v1/search`` takes it."""

    inputs: list[InputItem] = Field(
        ..., min_length=1, max_length=MAX_INPUTS, description="One input, or a weighted mix."
    )


class PlaceResponse(BaseModel):
    x: float
    y: float
    table_version: int = Field(description="The table version of the map the query is placed on.")
    method: str = Field(description="The layout that placed it (pca or umap).")
