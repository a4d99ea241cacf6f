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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def default_home() -> Path:
    """Where weights, tables and indexes live unless configured otherwise."""
    return Path(os.environ.get("CACHEBIND_HOME", Path.home() / ".cache" / "cachebind"))


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
    errors_table: str = "errors"
    vector_dtype: Literal["float16", "float32"] = "float16"
    s3: S3Config = Field(default_factory=S3Config)
    """Connection options for ``s3://`` locations, of the table and of sources
    (``[store.s3]``, ``CACHEBIND_STORE__S3__<FIELD>``)."""


class EmbedConfig(Section):
    """The Ray embedding job."""

    ray_address: str | None = None
    """``None`` starts a local Ray instance; ``auto`` or ``ray://host:port`` joins a cluster."""
    batch_size: int | None = None
    """Encoder batch size; ``None`` follows the resources present."""
    num_encoders: int | None = None
    """Encoder actors; ``None`` is one per GPU, or one on a CPU-only machine."""
    num_readers: int | None = None
    thumbnails: bool = True
    thumbnail_size: int = 256
    caption_embeddings: bool = False
    max_image_pixels: int = 89_478_485
    """Larger images are rejected as decompression bombs (Pillow's own default limit)."""
    max_image_bytes: int = 64 * 1024 * 1024


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


# "s3://b/x" as a Path collapses to "s3:/b/x"; one letter before the colon is a drive.
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


class IndexConfig(Section):
    """Index selection, tuning and publishing."""

    dir: Path = Field(default_factory=lambda: default_home() / "index")
    """A local directory (or a mounted network file system), never an object-store URI."""
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


class LLMConfig(Section):
    """LLaMA with the ImageBind-LLM adapter."""

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
    max_new_tokens: int = 256
    temperature: float = 0.1
    top_p: float = 0.75
    max_batch: int = Field(8, ge=1)
    """Generations decoded together (in-flight batching): the KV cache holds this many slots of
    the model's ``max_seq_len`` positions, allocated and checked against free memory at start."""
    max_queue: int = Field(64, ge=0)
    """Generations waiting for a slot; one more is refused with 429 and Retry-After."""
    prefill_chunk: int = Field(256, ge=1)
    """Prompt tokens prefilled per decode step (the joining prompts' chunks share one forward):
    a long prompt that joins delays the running generations by at most this many tokens' work
    per step. Smaller: steadier token pace for running streams; larger: joiners start sooner."""


class ServeConfig(Section):
    """The HTTP service."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: Path | None = None
    """A file of ``sha256:<hex>`` lines (one per user key); see ``cachebind serve --help``."""
    admin_keys_file: Path | None = None
    auth: bool = True
    max_request_bytes: int = 32 * 1024 * 1024
    max_k: int = 1000
    request_timeout_s: float = 60.0
    batch_window_ms: float = 5.0
    max_batch: int = 64
    index_poll_s: float = 2.0


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
    llm: LLMConfig = Field(default_factory=LLMConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)

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
