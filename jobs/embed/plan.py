"""How many decode workers and encoder actors, and how large their batches, for the resources
that Ray reports; and joining or starting Ray."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachebind.config import EmbedConfig
from cachebind.raycluster import start_or_join_ray


@dataclass
class Plan:
    """How the job uses the cluster: derived from ``ray.cluster_resources()``, overridable."""

    gpus: int
    cpus: int
    num_encoders: int
    encoder_cpus: float
    encoder_gpus: float
    batch_size: int
    num_readers: int
    pixel_dtype: str
    """float16 halves the transfer to GPU actors; CPU actors get float32 (exactly what a
    single-process loop would feed the model)."""
    chunk_rows: int
    """Rows per block out of a decode task: bounds a block to ~chunk_rows x 300 KB of pixels
    (x (1 + embed.views): each row then carries that many tensors, so fewer rows a block)."""


def plan_resources(resources: dict[str, float], cfg: EmbedConfig) -> Plan:
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus:
        num_encoders = cfg.num_encoders or gpus  # one actor per GPU of every box
        encoder_cpus, encoder_gpus = 1.0, 1.0
        batch_size = cfg.batch_size or 256
        pixel_dtype = "float16"
    else:
        num_encoders = cfg.num_encoders or 1
        # On a CPU box the encoder is the bottleneck: give it half the cores (its matmuls use
        # them all), the other half decode.
        encoder_cpus = float(max(1, cpus // (2 * num_encoders)))
        encoder_gpus = 0.0
        batch_size = cfg.batch_size or 32
        pixel_dtype = "float32"
    spare = max(1, cpus - int(encoder_cpus * num_encoders)) if not gpus else max(1, cpus - gpus)
    num_readers = cfg.num_readers or spare
    return Plan(
        gpus=gpus,
        cpus=cpus,
        num_encoders=num_encoders,
        encoder_cpus=encoder_cpus,
        encoder_gpus=encoder_gpus,
        batch_size=batch_size,
        num_readers=num_readers,
        pixel_dtype=pixel_dtype,
        chunk_rows=max(1, max(8, min(batch_size, 64)) // (1 + cfg.views)),
    )


def init_ray(cfg: EmbedConfig) -> bool:
    """Join ``cfg.ray_address`` or start a local Ray; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
    # Keep the operator's terminal for the progress bar and the report: Ray Data's INFO lines
    # go to its log files, and the accelerator-env opt-in silences a FutureWarning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Workers of a local instance inherit this; see the fork-safety note below.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:lance is not fork-safe")
    os.environ.setdefault(
        "RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml"))
    )
    with warnings.catch_warnings():
        # Ray starts its processes with fork+exec: lance's warnings about forking a process
        # that has used it concern children that keep running Python, not these.
        warnings.filterwarnings("ignore", message="lancedb fork support")
        warnings.filterwarnings("ignore", message="lance is not fork-safe")
        # A local instance gets every core; workers import cachebind from this environment.
        return start_or_join_ray(cfg.ray_address, num_cpus=os.cpu_count() or 1, **kwargs)
