"""The one configuration object of cachebind.

Every stage takes the section it needs as an argument; nothing reads the environment or a file
after `load_config` has run. Values come, lowest priority first, from the defaults below, a TOML
file (``--config`` or ``CACHEBIND_CONFIG``) and environment variables named
``CACHEBIND_<SECTION>__<FIELD>`` (for example ``CACHEBIND_CACHE__ALPHA=0.3``).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def default_home() -> Path:
    """Where weights, tables and indexes live unless configured otherwise."""
    return Path(os.environ.get("CACHEBIND_HOME", Path.home() / ".cache" / "cachebind"))


SPHINX_VIEWS = 5
"""SPHINX's views of one image: the whole and its four corner quarters (``view_set``)."""

ExtraEncoderName = Literal["clip336", "dinov2"]
"""The encoders ``embed --extra-encoder`` adds beside ImageBind's: ``clip336``, CLIP
ViT-L/14-336 (LLaVA-1.5's tower), and ``dinov2``, DINOv2 (``cachebind.encode.extra``)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightsConfig(Section):
    """Where downloaded checkpoints are kept (``cachebind weights download``)."""

    dir: Path = Field(default_factory=lambda: default_home() / "weights")


class EncoderConfig(Section):
    """The ImageBind encoder F_M = ImageBind_m(x)."""

    preset: str = "huge"
    """Architecture preset: ``huge`` (imagebind_huge) or a small test preset such as ``tiny``."""
    checkpoint: Path | None = None
    """A state-dict file; when unset, ``<weights.dir>/imagebind_huge.pth`` is used if present."""
    device: str = "auto"
    """``auto`` picks ``cuda`` when a GPU is present, else ``cpu``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto`` is bf16 on GPU and fp32 on CPU."""
    batch_size: int = 64
    seed: int = 0
    """Seed for random initialisation when no checkpoint is found."""
    allow_mismatch: bool = False
    """Serve or query a table whose recorded encoder (model, preset, dimensions, checkpoint
    sha256, preprocessing version) differs from this one, with a warning in the log; for
    experts comparing encoders. Off, such a table is refused (``--allow-encoder-mismatch``)."""


def _aws_env(*names: str) -> str | None:
    """The first of the standard AWS variables that is set (read once, by ``load_config``)."""
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _aws_env_secret(name: str) -> SecretStr | None:
    value = _aws_env(name)
    return SecretStr(value) if value else None


def _aws_env_flag(name: str) -> bool | None:
    value = _aws_env(name)
    return None if value is None else value.strip().lower() in ("1", "true", "yes", "on")


class S3Config(Section):
    """How to reach S3 or an S3-compatible store (MinIO, Ceph, R2 …): used for ``s3://``
    table locations (``store.uri``) and ``s3://`` sources alike.

    A field left unset falls back to the standard AWS environment variable named beside it. The
    values are resolved when the configuration is loaded, so that Ray workers on other machines
    get the driver's settings rather than whatever their own environment holds. With nothing set
    at all, botocore's and Lance's own credential chains (profiles, instance roles) apply.
    """

    endpoint_url: str | None = Field(
        default_factory=lambda: _aws_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    """``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``: a non-AWS endpoint such as
    ``http://minio:9000`` (requests use path-style addressing)."""
    region: str | None = Field(default_factory=lambda: _aws_env("AWS_REGION", "AWS_DEFAULT_REGION"))
    """``AWS_REGION`` / ``AWS_DEFAULT_REGION``."""
    access_key_id: str | None = Field(default_factory=lambda: _aws_env("AWS_ACCESS_KEY_ID"))
    """``AWS_ACCESS_KEY_ID``."""
    secret_access_key: SecretStr | None = Field(
        default_factory=lambda: _aws_env_secret("AWS_SECRET_ACCESS_KEY")
    )
    """``AWS_SECRET_ACCESS_KEY`` (never printed by ``cachebind config``)."""
    session_token: SecretStr | None = Field(
        default_factory=lambda: _aws_env_secret("AWS_SESSION_TOKEN")
    )
    """``AWS_SESSION_TOKEN``, for temporary credentials."""
    anonymous: bool = False
    """Unsigned requests, for public buckets."""
    allow_http: bool | None = Field(default_factory=lambda: _aws_env_flag("AWS_ALLOW_HTTP"))
    """``AWS_ALLOW_HTTP``: plain-HTTP endpoints; when unset, allowed exactly when
    ``endpoint_url`` is an ``http://`` URL."""

    @property
    def http_allowed(self) -> bool:
        if self.allow_http is not None:
            return self.allow_http
        return bool(self.endpoint_url and self.endpoint_url.startswith("http://"))


class StoreConfig(Section):
    """The LanceDB database holding the cache's rows."""

    uri: str = Field(default_factory=lambda: str(default_home() / "lancedb"))
    """A local directory or an object-store URI such as ``s3://bucket/cachebind``."""
    table: str = "images"
    errors_table: str | None = None
    """Where the job records its bad inputs; default ``<table>_errors``. One errors table per
    images table: a job consults the errors it already recorded to resume, so two collections
    sharing one (img2dataset names every collection's shards ``00000.tar``…) would skip each
    other's keys."""
    vector_dtype: Literal["float16", "float32"] = "float16"
    retention_s: float = Field(default=0.0, ge=0)
    """Table versions older than this, that no published index version references (Lance
    tags), are removed after a job, after ``index add`` and by ``cachebind store gc``. 0 keeps
    only the latest and the tagged versions: the table directory then holds its live data
    (a reader pinned to an untagged older version, e.g. an index build running meanwhile,
    needs a retention longer than it runs)."""
    s3: S3Config = Field(default_factory=S3Config)
    """Connection options for ``s3://`` locations, of the table and of sources
    (``[store.s3]``, ``CACHEBIND_STORE__S3__<FIELD>``)."""

    @property
    def errors_table_name(self) -> str:
        return self.errors_table or f"{self.table}_errors"


class EmbedConfig(Section):
    """The Ray embedding job."""

    ray_address: str | None = None
    """``None`` starts a local Ray instance; ``auto`` or ``ray://host:port`` joins a cluster."""
    batch_size: int | None = None
    """Encoder batch size; ``None`` follows the resources present."""
    num_encoders: int | None = None
    """Encoder actors; ``None`` is one per GPU, or one on a CPU-only machine."""
    num_readers: int | None = None
    sink: Literal["workers", "driver"] = "workers"
    """Where rows are written: ``workers`` (each encoder actor writes its batch's rows as Lance
    fragments to the table location and sends the driver a small descriptor, which the
    driver commits) or ``driver`` (every row travels to the driver, which appends it: for a
    cluster without a location every node sees; on one box both run at the same rate,
    BENCHMARKS.md)."""
    thumbnails: bool = True
    thumbnail_size: int = 256
    caption_embeddings: bool = False
    max_image_pixels: int | None = Field(default=None, gt=0)
    """Images larger than this are refused as decompression bombs; unset: the service's
    ``input.max_image_pixels``, so a job and the API refuse the same images."""
    max_image_bytes: int | None = Field(default=None, gt=0)
    """Files and tar members over this are refused unread (``too_large``); unset: the
    service's ``input.max_bytes``."""
    max_row_group_bytes: int = Field(default=1024**3, gt=0)
    """A parquet row group whose columns hold more, uncompressed, is not read: each of its rows
    is a ``too_large`` error (reading one takes about twice that in the reader's memory;
    img2dataset's row groups of 10,000 images hold about 300 MB)."""
    views: int = Field(default=0, ge=0, le=16)
    """Augmented views cached per image besides the centre crop's ``vector`` (``embed
    --views N``): the release's training crop (``RandomResizedCrop(224, scale=(0.9, 1.0))``,
    seeded per sample id and view), stored as ``view_vectors`` [N, d]. Each costs one more
    encoder pass and one more vector a row; 0 writes today's table (no such column). A table
    keeps the value it was created with."""
    view_set: Literal["random-crop", "sphinx"] = "random-crop"
    """What the ``views`` are (``embed --view-set``): ``random-crop``, the release's seeded
    training crops above; ``sphinx``, SPHINX's five 224-px views of the image padded to a
    square and resized to 448 px (the whole, resized to 224, then its top-left, top-right,
    bottom-left and bottom-right quarters; ``views`` must then be 5). Recorded in the table's
    metadata beside the count; a table keeps it."""

    tokens: bool = False
    """Also cache each image's patch tokens (``embed --tokens``): the vision trunk's hidden
    state ``tokens_layer`` without its CLS token, float16, as ``patch_tokens`` beside the
    global ``vector``, in the same pass and the same exactly-once row. A row holds patches x
    width x 2 bytes: 256 x 1280 x 2 = 655,360 (0.66 MB, 655 GB per million rows) for
    ImageBind-huge's ViT-H/14 at 224 px. A table keeps the setting it was created with."""
    tokens_layer: int = -2
    """The hidden state whose patch tokens ``tokens`` caches: 0 is the trunk's input, i the
    output of block i, negative counts from the end (-2: LLaVA-1.5's second-to-last layer)."""

    extra_encoders: dict[ExtraEncoderName, Path] = Field(default_factory=dict)
    """More encoders of the same images in the same table (``embed --extra-encoder
    NAME=DIR``): each name's Hugging Face checkpoint directory (``config.json`` and its
    weights, as transformers writes them). Each writes the global column ``vector_<name>``
    (L2-normalised) and, with ``tokens``, ``patch_tokens_<name>`` (hidden state
    ``tokens_layer`` without CLS), from its own preprocessing of the image. A table keeps the
    set (and each encoder's identity) it was created with."""

    @field_validator("extra_encoders", mode="before")
    @classmethod
    def _name_equals_dir(cls, value: Any) -> Any:
        # The CLI and environment give NAME=DIR strings; a config file gives a table.
        if not isinstance(value, list | tuple):
            return value
        out: dict[str, str] = {}
        for item in value:
            name, sep, path = str(item).partition("=")
            if not sep or not name or not path:
                example = "e.g. clip336=/models/clip"
                raise ValueError(f"extra encoder {item!r} is not NAME=DIR ({example})")
            if name in out:
                raise ValueError(f"extra encoder {name!r} is given twice")
            out[name] = path
        return out

    @model_validator(mode="after")
    def _views_fit_the_view_set(self) -> EmbedConfig:
        if self.view_set == "sphinx" and self.views != SPHINX_VIEWS:
            raise ValueError(
                f"embed.view_set 'sphinx' caches {SPHINX_VIEWS} views (the whole image and its "
                f"four corners), but embed.views is {self.views}: give --views {SPHINX_VIEWS}"
            )
        return self


class SandboxConfig(Section):
    """The pool of worker processes that decodes untrusted media (``cachebind.sandbox``).

    Every limit is per task: a worker that crashes, passes ``memory_mb`` or ``cpu_seconds``, or
    runs past ``timeout_s`` is killed and replaced, and only its task fails.
    """

    workers: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)), ge=1)
    """Worker processes (each decodes one input at a time)."""
    memory_mb: int = Field(default=2048, ge=64)
    """Address space a worker may add to its idle footprint (``RLIMIT_AS``), in MiB; more is
    answered ``too_large``."""
    cpu_seconds: int = Field(default=30, ge=1)
    """CPU time one task may use (``RLIMIT_CPU``); more is answered ``too_slow``."""
    timeout_s: float = Field(default=30.0, gt=0)
    """Wall-clock deadline of one task, enforced by the parent; later is ``too_slow``."""
    max_queue: int = Field(default=64, ge=0)
    """Tasks that may wait for a worker; one more is refused (``SandboxBusy``, HTTP 429)."""


class InputLimits(Section):
    """Budgets every preprocessing entry point checks before (and while) decoding untrusted
    input (``[input]``, ``CACHEBIND_INPUT__<FIELD>``). Limits come from headers where a format
    declares them, and are enforced again on what is actually decoded, since headers lie.
    Each refusal is an ``InputError`` whose detail names the limit (``input.<field>``)."""

    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """Raw bytes of one input (any modality); larger is ``too_large`` before any decoding."""
    max_image_pixels: int = Field(default=50_000_000, gt=0)
    """Width x height of one image, depth or thermal map, from its header: above is
    ``decompression_bomb`` (a decoded RGBA pixel costs ~4-16 bytes on the way to 224²)."""
    max_image_aspect_ratio: float = Field(default=50.0, ge=1.0)
    """Long side / short side of an image, depth or thermal map; above is ``too_large``. The
    resize works on the centre crop only, so this guards nonsense, not memory."""
    max_audio_seconds: float = Field(default=600.0, gt=0)
    """Duration of an audio input (declared, then decoded); above is ``too_large``."""
    max_audio_values: int = Field(default=64_000_000, gt=0)
    """Samples x channels of an audio input at its own rate (4 bytes each once decoded, so
    256 MB at the default: 11 min of 48 kHz stereo); above is ``too_large``."""
    max_audio_channels: int = Field(default=32, gt=0)
    """Channels of an audio stream; above is ``unsupported_format``."""
    max_audio_sample_rate: int = Field(default=384_000, gt=0)
    """Sample rate of an audio stream in Hz; above is ``unsupported_format``."""
    max_video_frames: int = Field(default=36_000, gt=0)
    """Frames of a video (20 min at 30 fps); every frame is decoded, so this bounds CPU time."""
    max_video_frame_pixels: int = Field(default=3840 * 2160, gt=0)
    """Width x height of a video frame (4K UHD); above is ``too_large`` from the header."""
    max_video_pixels: int = Field(default=40_000_000_000, gt=0)
    """Frames x width x height decoded from one video (~20 min of 1080p at 30 fps)."""
    max_decompressed_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    """Total uncompressed size of the members of a zip container (``.pt``, ``.npz``), by its
    directory and again while inflating; above is ``decompression_bomb``."""
    max_points: int = Field(default=5_000_000, gt=0)
    """Points of a point cloud (declared by a header, or rows of a table); above is
    ``too_large``. Kept as float32 x, y, z: 60 MB at the default."""
    max_array_values: int = Field(default=64_000_000, gt=0)
    """Elements of an array an ``.npy`` header declares (IMU, point clouds)."""
    max_text_bytes: int = Field(default=1024 * 1024, gt=0)
    """UTF-8 bytes of one text input (only the first 75 tokens count)."""
    honour_pixel_metadata: bool = True
    """Pixels as the file means them: an ICC-tagged image is converted to sRGB (relative
    colorimetric) and video frames are turned by their stream's display matrix, in the service
    and the embedding job alike. False decodes the stored pixels as they are, byte for byte
    what ImageBind's reference transforms give (EXIF orientation is applied either way)."""
    max_icc_profile_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    """An embedded ICC profile larger than this is ignored unparsed (the image is read as
    sRGB, as an untagged one is); real profiles are a few KB, the largest LUT ones ~1 MB."""


# "s3://b/x" as a Path collapses to "s3:/b/x"; one letter before the colon is a drive.
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


class IndexConfig(Section):
    """Index selection, tuning and publishing."""

    dir: Path = Field(default_factory=lambda: default_home() / "index")
    """A local directory (or a mounted network file system), never an object-store URI."""
    column: str = Field(default="vector", pattern=r"^vector(_[a-z0-9]+)?$")
    """The table's global column the index holds (``index --column``): ``vector``,
    ImageBind's, or an extra encoder's ``vector_<name>`` (``embed --extra-encoder``), whose
    queries must come from that encoder. Such an index is built without the caption and
    query-log query sets (ImageBind's space) and is refused by a table handle of another
    column, the service's included; give it its own ``dir``."""
    memory_budget_gb: float = 16.0
    recall_target: float = 0.95
    recall_k: int = 10
    latency_budget_ms: float | None = None
    keep_versions: int = 3
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    rebuild_when_outgrown: bool = True
    """`index add` rebuilds, rather than adds to, an index the grown table has outgrown."""
    merge_on_disk: Literal["auto", "yes", "no"] = "auto"
    """Sharded builds of IVF indexes: merge the shards' inverted lists into one memory-mapped
    ``index.ivfdata`` in the version folder instead of in the driver's RAM. ``auto`` does so when
    the in-memory merge would need more than ``merge_memory_gb``; ``yes`` refuses keys that
    cannot be merged on disk (``…,RFlat``, fast-scan ``x4fs``, Flat)."""
    merge_memory_gb: float = 4.0
    """Driver RAM an in-memory merge may take. It peaks near twice the index (every shard's
    serialised index plus the merged one)."""
    shard_dir: Path | None = None
    """Where shard tasks of an on-disk merge write their inverted lists: a directory that every
    Ray node and the driver see (a shared file system, not an object-store URI). Unset, the
    lists travel through Ray's object store and the driver spools them, one at a time, into the
    build's staging folder."""
    caption_queries: bool = True
    """Tune and verify on the table's caption embeddings (``text_vector``, written by ``embed
    --caption-embeddings``) as the ``text:captions`` query set, when the table has them."""
    query_log: bool = True
    """Tune and verify on the service's query log (``<dir>/query_log.npz``): one query set per
    modality it has served."""
    min_queries_per_set: int = Field(default=200, ge=1)
    """A query set with fewer queries is reported as untrusted and does not steer tuning: the
    sampling error of its recall (~+-0.03 at 200) is too wide to stand behind."""
    max_queries_per_set: int = Field(default=1000, ge=1)
    """Each query set is a seeded sample of at most this many queries (tuning time grows with
    the total)."""
    escalate: bool = True
    """When no setting of the selected key reaches ``recall_target`` on every trusted query set
    (within ``latency_budget_ms``), build a stronger key (re-ranked IVF, HNSW32, exact Flat)
    within ``memory_budget_gb`` and record why in the manifest's ``selection_reason``."""

    @field_validator("dir", mode="before")
    @classmethod
    def _local_dir(cls, value: Any) -> Any:
        if _URI_SCHEME.match(str(value)):
            raise ValueError(
                f"index.dir must be a local directory, not {value!r}: versions are published by "
                "atomic directory renames and read by FAISS from files, which object stores do "
                "not offer. The table (store.uri) may live on an object store; keep the index on "
                "local disk or a mounted file system"
            )
        return value

    @field_validator("shard_dir", mode="before")
    @classmethod
    def _mounted_shard_dir(cls, value: Any) -> Any:
        if value is not None and _URI_SCHEME.match(str(value)):
            raise ValueError(
                f"index.shard_dir must be a mounted directory, not {value!r}: FAISS maps the "
                "shards' files; leave it unset to pass them through Ray's object store"
            )
        return value


class CacheConfig(Section):
    """Retrieval and blend (ImageBind-LLM eq. 3-4); per-request values override these."""

    k: int = 10
    t: float = 20.0
    alpha: float = 0.5


class AnalysisConfig(Section):
    """The analyst's workbench: zero-shot labels over the cache (``cachebind classify``,
    ``POST /v1/classify``), the modality-gap report and the map of the collection."""

    top_k: int = Field(default=1, ge=1, le=100)
    """Labels kept per row (the best first) unless a run asks for another number."""
    batch_rows: int = Field(default=65_536, ge=1)
    """Rows read, scored and committed at a time: a run's memory is this many vectors, the
    class matrix and the set of ids already labelled (8 bytes each)."""
    prompt_batch: int = Field(default=256, ge=1)
    """Prompts (label x template) encoded per encoder call when building class embeddings."""
    max_labels: int = Field(default=1_000, ge=2)
    """Most labels in one label set (the CLI and the API)."""
    max_templates: int = Field(default=100, ge=1)
    """Most prompt templates in one run (CLIP's ImageNet set has 80)."""
    max_prompts: int = Field(default=4_096, ge=1)
    """Most prompts (labels x templates) one ``/v1/classify`` request may make the service
    encode: the request's cost is bounded by this, whatever its label set."""
    gap_images: int = Field(default=20_000, ge=1)
    """Image rows (a seeded uniform sample) the gap report measures queries against and
    retrieves the blend's neighbours from (exactly): its cost is queries x this."""
    gap_queries: int = Field(default=2_000, ge=1)
    """Queries per query set in the gap report (a seeded sample of larger sets)."""
    seed: int = 0
    """Seed of the report's and the map's samples."""
    map_method: Literal["umap", "pca"] = "umap"
    """The map's 2-D layout: UMAP (umap-learn, the ``analysis`` extra) or PCA (fast)."""
    map_sample: int = Field(default=20_000, ge=10)
    """Rows the layout is fitted on (a seeded sample); every other row is transformed in
    batches of ``batch_rows``, so memory follows the sample, not the table."""
    map_neighbours: int = Field(default=15, ge=2)
    """UMAP's n_neighbors."""
    map_partition_rows: int = Field(default=131_072, ge=1)
    """Rows of one map partition: the unit a Ray task places (in batches of ``batch_rows``)
    and the unit a stopped map run resumes from."""
    map_max_points: int = Field(default=200_000, ge=1)
    """Points ``GET /v1/map`` sends at most (a seeded sample of larger maps)."""
    max_export_rows: int = Field(default=100_000, ge=1)
    """Rows one ``POST /v1/export`` may ask for (a map selection can be large)."""


RELEASED_MAX_NEW_TOKENS = 256
RELEASED_TEMPERATURE = 0.1
RELEASED_TOP_P = 0.75
"""The released demo's generation defaults (``llama.generate``): every default of a generation,
in the settings and in the library's signatures, is one of these."""
PREFILL_CHUNK = 256
"""Prompt tokens prefilled per decode step, unless ``llm.prefill_chunk`` says otherwise."""
LLAVA_MAX_SEQ_LEN = 2048
"""LLaVA-1.5's training length (``--model_max_length 2048``): prompt, visual tokens and answer."""
PREFILL_PAD_WASTE = 0.25
"""The share of a prefill forward's columns that may be left padding: the step's chunks are
split into forwards of similar lengths beyond it (a padding column costs a token's compute)."""


class LLMConfig(Section):
    """The served LLM: LLaMA with the ImageBind-LLM adapter, or LLaVA-1.5 (tokens mode)."""

    mode: Literal["adapter", "llava"] = "adapter"
    """``adapter``: LLaMA + the ImageBind-LLM adapter (``llama_dir``, ``adapter_checkpoint``),
    one cache-blended feature F~_M per request. ``llava``: a llava-hf LLaVA-1.5 directory
    (``llava_dir``), each image's projected CLIP patch tokens placed in the prompt."""
    llava_dir: Path | None = None
    """A llava-hf LLaVA-1.5 directory (``config.json``, safetensors, ``tokenizer.model``) for
    ``mode = "llava"``."""
    mixed_projector: Path | None = None
    """SPHINX's mixed embedding (``mode = "llava"``): a ``mixed_projector.pth`` that ``train
    llava-pretrain`` wrote with ``tokens_train.mix``, serving its encoders' channel-concatenated
    tokens (ImageBind's trunk for ``imagebind``, ``embed.extra_encoders`` for the others) to the
    LLM of ``llava_dir`` (its language model) or ``llama_dir`` (a transformers LLaMA)."""
    llava_max_seq_len: int = Field(default=LLAVA_MAX_SEQ_LEN, ge=2)
    """Positions per generation in llava mode (each image takes 576 of them at 336 px); the
    KV cache holds ``max_batch`` slots of this many, capped at the model's own limit."""
    llama_dir: Path | None = None
    """A Meta-format (consolidated.*.pth, params.json, tokenizer.model) or Hugging Face LLaMA."""
    adapter_checkpoint: Path | None = None
    """An ImageBind-LLM checkpoint as released ({"model": state_dict})."""
    bind_variant: Literal["auto", "layernorm", "rmsnorm"] = "auto"
    """Bind network variant: ``auto`` detects it from the checkpoint's keys; ``rmsnorm`` is
    today's released ``7B.pth``, ``layernorm`` 7B-beta's "legacy bridge". A fixed value is a
    check: a checkpoint of the other variant is refused."""
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_new_tokens: int = RELEASED_MAX_NEW_TOKENS
    temperature: float = RELEASED_TEMPERATURE
    top_p: float = RELEASED_TOP_P
    max_batch: int = Field(default=8, ge=1)
    """Generations decoded together (in-flight batching): the KV cache holds this many slots of
    the model's ``max_seq_len`` positions, allocated and checked against free memory at start."""
    max_queue: int = Field(default=64, ge=0)
    """Generations waiting for a slot; one more is refused with 429 and Retry-After."""
    prefill_chunk: int = Field(default=PREFILL_CHUNK, ge=1)
    """Prompt tokens prefilled per decode step (the joining prompts' chunks share one forward):
    a long prompt that joins delays the running generations by at most this many tokens' work
    per step. Smaller: steadier token pace for running streams; larger: joiners start sooner."""


class TrainConfig(Section):
    """Training ImageBind-LLM from the cache on Ray Train (``cachebind train``).

    Defaults follow the release (``main_pretrain.py``, ``exps/*.sh``) and the paper: AdamW
    (0.9, 0.95), lr = blr · effective batch / 256 with effective batch = ``batch_size`` ·
    ``accum_iter`` · ``num_workers``, warmup then half-cycle cosine, 96 words per example."""

    llama_dir: Path | None = None
    """The base LLM (Meta or transformers LLaMA directory); unset: ``llm.llama_dir``."""
    init_checkpoint: Path | None = None
    """A released-layout ``{"model": ...}`` file to start from: stage 2 starts from stage 1's
    output; unset for stage 1 starts from the release's initialisation (zero gates)."""
    instructions: Path | None = None
    """Stage 2's LLaVA-style instruction JSON (images by cache key or path, text-only items);
    unset: stage 2 trains on the cache's captions with stage 1's prompt."""
    output_dir: Path = Field(default_factory=lambda: default_home() / "train")
    """Checkpoints (``<output_dir>/ray/<run_name>``), the loss log and the final file."""
    run_name: str = "imagebind-llm"
    """A second run with the same name and output_dir resumes from its latest checkpoint."""
    epochs: float = Field(default=3.0, gt=0)
    warmup_epochs: float = Field(default=0.1, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimiser steps (the schedule still spans ``epochs``)."""
    batch_size: int = Field(default=4, ge=1)
    """Examples per worker per micro-batch."""
    accum_iter: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimiser step (to reach a global batch on fewer GPUs)."""
    blr: float | None = None
    """Base lr; unset: 1e-4 for pretrain (paper: 4e-4 at batch 1024), 1e-3 for finetune."""
    lr: float | None = None
    """Absolute lr; overrides ``blr``."""
    min_lr: float = 0.0
    weight_decay: float | None = None
    """Unset: 0.05 for pretrain, 0.02 for finetune (``exps/*.sh``)."""
    max_words: int = Field(default=96, ge=8)
    seed: int = 0
    num_workers: int = Field(default=1, ge=1)
    """Ray Train workers (DDP ranks): one per GPU."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """``auto``: GPUs when the cluster has them (NCCL, bf16 autocast), else CPU (gloo, fp32)."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    data_cpus: float = Field(default=0.25, gt=0)
    """CPUs each Ray Data read task asks for (reads are light; keep training workers fed)."""
    ray_address: str | None = None
    """``None`` starts a local Ray instance; ``auto`` or ``ray://host:port`` joins a cluster."""
    checkpoint_every: int = Field(default=200, ge=1)
    """Optimiser steps between Ray Train checkpoints (and at the end)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=0, ge=-1)
    """Worker failures Ray Train recovers from (restart from the latest checkpoint)."""
    lora_rank: int = Field(default=16, ge=1)
    """Stage 2's LoRA rank when ``init_checkpoint`` has no LoRA yet."""
    bind_variant: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    """Stage 1's bridge: today's release (``legacy_bridge=False``) is ``rmsnorm``."""
    output_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    progress: bool = True
    use_views: bool = True
    """On a table with ``view_vectors`` (``embed --views N``), each row's F_M in an epoch is one
    of {centre ``vector``, view 1..N}, drawn per (seed, epoch, row) (the release's random crop,
    from the cache); False always trains on the centre ``vector``."""


class TokensTrainConfig(Section):
    """Training LLaVA-1.5's connector from cached patch tokens (``cachebind train
    llava-pretrain | llava-finetune``). The run itself (workers, output_dir, run_name, micro
    batch ``batch_size``, checkpoints, seed, max_steps) is ``train``'s; this section holds what
    differs: the model, the tokens' column and LLaVA-1.5's recipe (``scripts/v1_5/pretrain.sh``
    and ``finetune.sh``: AdamW, warmup ratio 0.03 then cosine to 0, no weight decay, gradient
    norm clipped at 1 as transformers' Trainer does)."""

    llava_dir: Path | None = None
    """A llava-hf LLaVA-1.5 directory (``config.json`` with ``model_type: "llava"``, weights,
    ``tokenizer.model``): its LLM is trained against; stage 2 needs it (its vision tower goes
    into the output directory unchanged)."""
    llama_dir: Path | None = None
    """Stage 1 without ``llava_dir``: a transformers LLaMA/Vicuna directory (``config.json``,
    safetensors, ``tokenizer.model``) and a fresh projector."""
    encoder: str = Field(default="clip336", min_length=1)
    """Whose cached tokens: ``imagebind`` reads ``patch_tokens``, any other name the extra
    encoder's ``patch_tokens_<name>`` (``clip336`` is LLaVA-1.5's tower)."""
    init_projector: Path | None = None
    """An ``mm_projector.bin`` to start from (stage 2 from stage 1's); unset: stage 1 starts
    from a seeded fresh projector, stage 2 from ``llava_dir``'s."""
    instructions: Path | None = None
    """Stage 2's LLaVA instruction JSON (``image`` a cache key, ``conversations`` human/gpt
    turns with ``<image>`` in the first)."""
    pretrain_lr: float = Field(default=1e-3, gt=0)
    finetune_lr: float = Field(default=2e-5, gt=0)
    pretrain_batch: int = Field(default=256, ge=1)
    """Global batch of stage 1 (8 GPUs x 32); micro-batches are accumulated to reach it."""
    finetune_batch: int = Field(default=128, ge=1)
    """Global batch of stage 2 (8 GPUs x 16)."""
    epochs: float = Field(default=1.0, gt=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    """Linear warmup over the first ceil(ratio x steps) steps (transformers' cosine schedule)."""
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Global gradient-norm clip (transformers' default, under which LLaVA trains); None: off."""
    max_length: int = Field(default=LLAVA_MAX_SEQ_LEN, ge=8)
    """Tokens an example keeps, its visual tokens included (``model_max_length``)."""
    mix: list[str] = Field(default_factory=list)
    """SPHINX's mixed embedding (stage 1 only): the encoders (names as ``encoder``) whose cached
    tokens are concatenated channel by channel, in this order, and projected by
    ``bind.mixed.MixedProjector`` instead of LLaVA's projector; empty: LLaVA's over ``encoder``."""
    mix_side: int | None = Field(default=None, ge=1)
    """The common grid's side the mixed encoders are resampled to; unset: the first one's."""
    lora_r: int = Field(default=0, ge=0)
    """Stage 2 with LoRA (``finetune_lora.sh``: 128): the LLM frozen, a rank-``lora_r`` update
    learnt in each of its linear layers but ``lm_head``, merged into the llava-hf output; 0:
    the whole LLM trains (``finetune.sh``)."""
    lora_alpha: float = Field(default=256.0, gt=0)
    """The update's scale is ``lora_alpha / lora_r`` (LLaVA: 256 / 128 = 2)."""
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapters' input (LLaVA's ``lora_dropout`` default)."""
    lora_lr: float = Field(default=2e-4, gt=0)
    """The adapters' peak learning rate with LoRA (``--learning_rate 2e-4``)."""
    lora_projector_lr: float = Field(default=2e-5, gt=0)
    """The projector's with LoRA (``--mm_projector_lr 2e-5``): the same schedule, scaled."""


MAX_INPUTS = 4096
"""The request schemas' own ceiling on inputs per request (``serve.max_inputs`` is at most this),
so that a body of 100k inputs is refused before each one is validated."""


class QueryLogConfig(Section):
    """The service's sample of the query embeddings F_M it answered, which ``cachebind
    index build | add | tune`` tune and verify on: one bounded reservoir per modality, embeddings
    only (never the text or media sent), in ``<index.dir>/query_log.npz``."""

    enabled: bool = True
    """Off: nothing is sampled or written (an existing file is left as it is)."""
    capacity_per_modality: int = Field(default=5000, ge=1)
    """Vectors kept per modality (a uniform sample of all it served): 5000 1024-d vectors are
    20 MB in memory and on disk; a build samples ``index.max_queries_per_set`` of them."""
    flush_interval_s: float = Field(default=60.0, gt=0)
    """How often a changed sample is written (atomically, off the event loop); it is also
    written on shutdown."""
    raw_embeddings: bool = True
    """Also log a client's raw embedding when the request labels its ``modality`` (an
    unlabelled one never is). Off: only embeddings this service encoded are logged, so no key
    holder can steer tuning with vectors of their own choosing."""


class OpenAIConfig(Section):
    """The OpenAI-compatible routes (``/v1/models``, ``/v1/chat/completions``,
    ``/v1/completions``, ``/v1/embeddings``)."""

    llm_model: str = Field("imagebind-llm", min_length=1)
    """The id ``/v1/models`` lists for the LLM with its adapter; chat and completion requests
    name it as ``model``."""
    embedding_model: str = Field("imagebind", min_length=1)
    """The id ``/v1/models`` lists for the encoder; ``/v1/embeddings`` requests name it."""
    media_hosts: list[str] = Field(default_factory=list)
    """Hosts whose http(s) media URLs a chat or embedding request may name (exact names,
    lower case). Empty: no URL is fetched and a remote URL is a 400; media travel as data URLs."""
    media_fetch_timeout_s: float = Field(10.0, gt=0)
    """Time to fetch one allow-listed media URL whole."""


class ServeConfig(Section):
    """The HTTP service."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: Path | None = None
    """A file of ``sha256:<hex>`` lines (one per user key); see ``cachebind serve --help``."""
    admin_keys_file: Path | None = None
    auth: bool = True
    max_request_bytes: int = 32 * 1024 * 1024
    """Largest request body, counted as it arrives (chunked or not): 413 past it."""
    max_inputs: int = Field(default=64, ge=1, le=MAX_INPUTS)
    """Inputs per request (embed, search, enhance, generate): 413 ``too_many_inputs`` past it."""
    max_text_bytes: int = Field(default=1024 * 1024, ge=1)
    """Total UTF-8 bytes of the texts of one request: 413 ``text_too_large`` past it."""
    max_k: int = 1000
    extra_indexes: dict[ExtraEncoderName, Path] = Field(default_factory=dict)
    """Indexes of extra encoders' columns the service searches (``POST /v1/search/{name}``):
    each name's index directory (``cachebind index --column vector_<name> --index-dir DIR``),
    its queries encoded by that encoder, loaded from ``embed.extra_encoders[name]``. Loaded
    at start-up, beside ImageBind's index."""
    request_timeout_s: float = 60.0
    """Budget of one request's work; past it 504 ``timeout`` and its queued work is dropped."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A connection that has not sent a whole request head within this is closed."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """A request body not received whole within this gets 408 ``body_timeout``."""
    keep_alive_s: int = Field(default=5, ge=1)
    """An idle keep-alive connection is closed after this."""
    max_connections: int = Field(default=1000, ge=1)
    """Open connections (and running requests) at once; uvicorn answers 503 past it."""
    max_connections_per_address: int = Field(128, ge=1)
    """Open connections from one client address; a connection past it is answered 429
    ``too_many_connections`` and closed at once, so that one address cannot hold the server
    at ``max_connections`` (clients behind one NAT or proxy share an address)."""
    max_pending_per_address: int = Field(64, ge=1)
    """Connections from one client address that have not yet sent their first whole request
    head (each may hold up to ``max_head_bytes`` until ``header_timeout_s``); 429 and closed
    past it."""
    max_head_bytes: int = Field(32 * 1024, ge=1024)
    """Request line plus headers of one request, counted as they arrive: 431
    ``head_too_large`` and the connection closed past it."""
    max_headers: int = Field(100, ge=1)
    """Header fields of one request: 431 ``head_too_large`` past it."""
    http: Literal["httptools", "h11"] = "httptools"
    """uvicorn's HTTP parser; both enforce the limits above."""
    search_max_widenings: int = Field(default=3, ge=0)
    """Times a filtered or deduplicated search re-queries the index with a wider candidate
    set; then it answers what it has with ``partial: true``."""
    search_max_candidates: int = Field(default=20_000, ge=1)
    """Most candidates one search ranks and filters (it never ranks beyond this either)."""
    cursor_secret: SecretStr | None = None
    """HMAC-SHA256 key of the pagination cursors; random at each start when unset (set it
    when several replicas serve one index, so a cursor from one is valid on another)."""
    image_url_ttl_s: int = Field(600, ge=1)
    """How long the signed ``thumbnail_url`` of a search result stays valid."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins (``scheme://host[:port]``) whose pages may call the API from a browser; ``*``
    for any. Empty: no cross-origin access (CORS off)."""
    batch_window_ms: float = 5.0
    max_batch: int = 64
    index_poll_s: float = 2.0
    query_log: QueryLogConfig = Field(default_factory=QueryLogConfig)
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)


class Settings(BaseSettings):
    """All of cachebind's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="CACHEBIND_", env_nested_delimiter="__", extra="forbid"
    )

    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tokens_train: TokensTrainConfig = Field(default_factory=TokensTrainConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    input: InputLimits = Field(default_factory=InputLimits)
    """Budgets for untrusted input, shared by the service and the embedding job."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init values), which beats the defaults.
        return (env_settings, init_settings)


def load_config(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (``path`` or ``$CACHEBIND_CONFIG``), then the environment.

    ``overrides`` are section dictionaries (``encoder={"preset": "tiny"}``) applied over the
    file and the environment, for callers such as the CLI whose flags beat everything.
    """
    path = path or os.environ.get("CACHEBIND_CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"configuration file not found: {p}")
        file_values = tomllib.loads(p.read_text())
    settings = Settings(**file_values)
    for section, values in overrides.items():
        current = getattr(settings, section)
        values = {k: v for k, v in values.items() if v is not None}
        setattr(settings, section, type(current).model_validate({**current.model_dump(), **values}))
    return settings
