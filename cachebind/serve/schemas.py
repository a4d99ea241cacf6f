"""Request and response models of the HTTP API (``/v1``), which FastAPI turns into OpenAPI."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, model_validator

from cachebind.config import MAX_INPUTS
from cachebind.modalities import Modality
from cachebind.serve.ids import RowId


def _valid_unicode(value: str) -> str:
    # JSON's \\uXXXX escapes can spell half of a surrogate pair, which no UTF-8 text holds:
    # tokenizers, LanceDB and the query log would each fail on it later, as a 500.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"not valid Unicode: a lone surrogate {value[exc.start]!r} at character {exc.start}"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""A client's string: any Unicode text, never a lone surrogate."""


class Strict(BaseModel):
    # Unknown fields are an error: a misspelt "filtre" must not silently search everything.
    # NaN and Infinity (which Python's JSON parser accepts) are refused in every number.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InputItem(Strict):
    """One query input: text, a medium as base64 bytes, or a raw embedding; with a mix weight.

    Media travel as bytes only: the service never reads a path or fetches a URL a client names.
    """

    modality: Modality | None = Field(
        None,
        description="Required for text and data. For a raw embedding optional: the modality it "
        "embeds; the response's recall (and the query log) then count it as that modality.",
    )
    text: Text | None = Field(None, description="The text of a text input.")
    data: str | None = Field(
        None,
        description="The file's bytes (image, audio, video, depth, thermal, imu) as base64 or "
        "as a data: URL ('data:image/png;base64,...').",
    )
    embedding: list[float] | None = Field(
        None, description="A raw query embedding of the encoder's dimension (L2-normalised here)."
    )
    weight: float = Field(1.0, gt=0, description="Mix weight w_i (> 0).")

    @model_validator(mode="after")
    def _one_payload(self) -> InputItem:
        given = [n for n in ("text", "data", "embedding") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of text, data or embedding")
        if self.embedding is None and self.modality is None:
            raise ValueError("modality is required for text and data inputs")
        if self.text is not None and self.modality is not Modality.TEXT:
            raise ValueError(f"'text' is for modality 'text'; send {self.modality} as 'data'")
        if self.data is not None and self.modality is Modality.TEXT:
            raise ValueError("send text as 'text', not 'data'")
        return self


class EmbedRequest(Strict):
    inputs: list[InputItem] = Field(
        ..., min_length=1, max_length=MAX_INPUTS, description="Inputs to embed (no mixing)."
    )


class Embedding(BaseModel):
    modality: str
    embedding: list[float]


class EmbedResponse(BaseModel):
    dim: int
    encoder: dict[str, Any] = Field(description="The encoder's identity (preset, checkpoint …).")
    items: list[Embedding]


class LabelFilter(Strict):
    """Keep the rows whose zero-shot label (a side table of `cachebind classify`) is listed."""

    table: Text = Field(description="The side table, e.g. images_labels_3d52e0349001.")
    labels: list[Text] = Field(..., min_length=1, max_length=1000)


class SearchRequest(Strict):
    """Nearest cached rows to F_M, the (weighted mix of the) inputs' embedding."""

    inputs: list[InputItem] = Field(
        ..., min_length=1, max_length=MAX_INPUTS, description="One input, or a weighted mix."
    )
    k: int = Field(10, ge=1, description="Results per page (at most the server's max_k).")
    offset: int = Field(0, ge=0, description="Results to skip (pagination).")
    cursor: Text | None = Field(None, description="next_cursor of a previous page (beats offset).")
    filter: Text | None = Field(
        None,
        description="SQL-style filter on id, key, caption, url, width, height, shard, e.g. "
        "\"width > 100 AND caption LIKE '%dog%'\".",
    )
    dedup: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Drop a result whose cosine to an already kept one exceeds this threshold.",
    )
    label_filter: LabelFilter | None = Field(
        None, description="Only rows whose best zero-shot label is one of these (ANDed)."
    )


class SearchHit(BaseModel):
    id: RowId = Field(description="The row id: a string unless the request asks ?ids=number.")
    score: float
    key: str | None = None
    caption: str | None = None
    url: str | None = None
    width: int | None = None
    height: int | None = None
    image_url: str = Field(description="Thumbnail served by this service (404 when none).")
    thumbnail_url: str = Field(
        description="The same thumbnail as an absolute signed URL that needs no key (for an "
        "<img src>), valid for serve.image_url_ttl_s seconds."
    )


class RecallPart(BaseModel):
    set: str | None = Field(description="The query set measured for this modality (None: none).")
    recall_at_10: float | None
    trusted: bool = Field(description="The set had enough queries to stand behind its figure.")
    verified: bool = Field(description="A measured set covers this modality.")


class RecallInfo(BaseModel):
    """What recall the served index version's manifest promises for this query's modality.

    A mixed query is searched with one blended F_M, so its recall is bounded by its weakest
    part: the worst part's set and figure are reported. ``verified`` is false when some part's
    modality was never measured (a raw embedding sent without ``modality``, or a modality no
    query set covers): the figure then speaks only for the parts that were.
    """

    set: str | None = Field(description="The query set whose recall applies (the worst part's).")
    recall_at_10: float | None = Field(description="recall@10 of that set in the manifest.")
    trusted: bool = Field(description="Every part's set had enough queries to be trusted.")
    verified: bool = Field(description="Every part's modality is covered by a measured set.")
    parts: dict[str, RecallPart] = Field(
        description="Per input modality ('embedding' for unlabelled raw embeddings)."
    )


class ExtraSearchRequest(Strict):
    """Nearest cached rows to an extra encoder's vector of one image."""

    input: InputItem = Field(description="One image (base64 or a data: URL).")
    k: int = Field(10, ge=1, description="Results (at most the server's max_k).")


class ExtraSearchResponse(BaseModel):
    encoder: str = Field(description="The extra encoder whose column was searched.")
    column: str
    index_version: str | None
    results: list[SearchHit]


class SearchResponse(BaseModel):
    results: list[SearchHit]
    offset: int
    next_offset: int | None
    next_cursor: str | None
    index_version: str | None
    exhausted: bool = Field(description="True when the table has no further matching rows.")
    recall: RecallInfo
    partial: bool = Field(
        False,
        description="True when a filtered or deduplicated search stopped widening its candidate "
        "set (serve.search_max_widenings / search_max_candidates) before it found k results: "
        "more matching rows may exist further down the ranking. Narrow the query or the filter.",
    )


class EnhanceRequest(Strict):
    """F~_M = normalize((1 - alpha) F_M + alpha F_cache) with the top-k cached neighbours."""

    inputs: list[InputItem] = Field(..., min_length=1, max_length=MAX_INPUTS)
    k: int | None = Field(None, ge=1, description="Neighbours (default from CacheConfig).")
    t: float | None = Field(None, gt=0, description="Softmax temperature (default CacheConfig).")
    alpha: float | None = Field(None, ge=0, le=1, description="Blend (default CacheConfig).")


class Neighbour(BaseModel):
    id: RowId = Field(description="The row id: a string unless the request asks ?ids=number.")
    similarity: float = Field(description="S_topk entry: cosine of F_M and the cached vector")
    weight: float = Field(description="softmax(t * S_topk) entry")
    key: str | None = None
    caption: str | None = None


class EnhanceResponse(BaseModel):
    query_embedding: list[float] = Field(description="F_M")
    embedding: list[float] = Field(description="F~_M")
    cosine_to_query: float = Field(description="cosine(F_M, F~_M)")
    neighbours: list[Neighbour]
    k: int
    t: float
    alpha: float
    index_version: str | None
    recall: RecallInfo = Field(description="The recall the S_topk neighbours were found with.")


class GenerateRequest(Strict):
    prompt: Text = Field(..., min_length=1, max_length=20_000)
    inputs: list[InputItem] = Field(
        default_factory=list,
        max_length=MAX_INPUTS,
        description="Visual context (a mix); none for text only.",
    )
    image_ids: list[Annotated[int, Field(ge=-(2**63), lt=2**63)]] = Field(
        default_factory=list,
        max_length=MAX_INPUTS,
        description="llava mode: cached rows (ids of the served table) whose stored patch "
        "tokens stand for images, before the images of inputs; no encoder runs for them.",
    )
    k: int | None = Field(None, ge=1)
    t: float | None = Field(None, gt=0)
    alpha: float | None = Field(None, ge=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Seeds this request's own sampler (reproducible)."
    )
    # Strict: a lax bool would read 0, "no" or "off" as a choice the client may not have meant.
    stream: StrictBool = Field(
        True, description="Server-sent events when true, one JSON otherwise."
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="The prompt's tokens as fed (template and BOS).")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int


FinishReason = Literal["stop", "length"]


class GenerateResponse(BaseModel):
    text: str
    neighbours: list[Neighbour]
    finish_reason: FinishReason = Field(
        description="stop: end of sequence; length: max_new_tokens reached."
    )
    usage: Usage


class GenerateDoneEvent(BaseModel):
    """``event: done``, the stream's last event: the whole text, why it ended, token counts."""

    text: str
    finish_reason: FinishReason
    usage: Usage


GENERATE_EVENTS = (
    'Server-sent events, in order: `event: neighbours` with `data: {"neighbours": [Neighbour]}`; '
    'one `data: {"text": piece}` (no event name) per piece of text; then either `event: done` '
    'with `data: GenerateDoneEvent` (`{"text", "finish_reason", "usage"}`) or '
    '`event: error` with `data: {"error", "detail"}`.'
)


class QuerySetLatency(BaseModel):
    batch1_p50: float | None = Field(None, description="ms per query, one query per call (p50)")
    batch64_per_query: float | None = Field(None, description="ms per query in batches of 64")


class QuerySetReport(BaseModel):
    """One kind of query the version was tuned and measured on (the manifest's query_sets)."""

    name: str = Field(description="'image:held_out', 'text:captions', '<modality>:query_log' …")
    modality: str
    source: str | None = None
    n: int | None = Field(None, description="Queries measured.")
    trusted: bool = Field(description="n reached the build's min_queries_per_set.")
    recall_at_1: float | None = None
    recall_at_10: float | None = None
    recall_at_100: float | None = None
    latency_ms: QuerySetLatency
    search_params: dict[str, int] | None = Field(
        None,
        description="The setting this set was measured with: what queries of its modality are "
        "searched with (its own, or the version's global one).",
    )


class QueryLogInfo(BaseModel):
    enabled: bool
    capacity_per_modality: int
    modalities: dict[str, dict[str, int]] = Field(
        description="{modality: {seen, kept, dim}}: queries offered to the sample and kept."
    )


class IndexInfo(BaseModel):
    version: str | None
    manifest: dict[str, Any] | None
    table_version: int | None
    rows: int | None
    dim: int | None
    query_sets: list[QuerySetReport] = Field(
        default_factory=list,
        description="Recall@1/10/100 and latency per query set (a manifest from before query "
        "sets gives its one held-out image set; an unmeasured index none).",
    )
    recall_by_modality: dict[str, RecallPart] = Field(
        default_factory=dict, description="The worst trusted set of each modality."
    )
    query_log: QueryLogInfo


class ReloadResponse(BaseModel):
    reloaded: bool
    version: str | None
    detail: str = ""
    extra_versions: dict[str, str | None] = Field(
        default_factory=dict,
        description="Each extra encoder's index version now served (serve.extra_indexes).",
    )


class FieldError(BaseModel):
    loc: list[str] = Field(description="Where in the request, e.g. ['body', 'inputs', '0'].")
    msg: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a short machine tag and a sentence saying what is wrong (and, for a
    bad input, which one; for an invalid request, the fields at fault)."""

    error: str
    detail: str
    source: str | None = Field(None, description="The input that could not be decoded.")
    param: str | None = Field(None, description="The request field at fault.")
    fields: list[FieldError] | None = Field(None, description="Each invalid field (422).")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    why = {
        401: "missing or invalid API key",
        403: "the route needs an admin key",
        404: "no such row",
        408: "the request body did not arrive within the configured time",
        409: "the reload was refused (bad key file, index not matching the table)",
        413: "request body, inputs or text over the configured limit",
        422: "a body that is not JSON, an invalid request or an undecodable input; `detail` "
        "says which field and why",
        429: "busy: too many inputs are being decoded, or the generation queue is full; retry "
        "after the `Retry-After` seconds",
        500: "the server failed (details only in its log)",
        503: "not ready (no index or encoder loaded yet), or no LLM configured",
        504: "the request took longer than the configured timeout",
    }
    return {code: {"model": ErrorResponse, "description": why[code]} for code in codes}


COMMON_ERRORS = _errors(401, 408, 413, 422, 429, 500, 503, 504)
"""What any authenticated route may answer besides 200."""
ROW_ERRORS = _errors(404)
ADMIN_ERRORS = _errors(403, 409)
QUEUE_ERRORS = _errors(429)
