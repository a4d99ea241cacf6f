"""The embedding job: sources -> decode + preprocess (CPU tasks) -> ImageBind vision encoder
(actors, one per GPU) -> the cache's LanceDB table.

Modules follow the data: ``plan`` (resources, Ray), ``decode`` (stage 1, CPU tasks; each sample
decoded by ``sample`` inside a sandbox worker), ``encode`` (stage 2, actors), ``sink`` (stage 3,
the driver's writer), ``report``, and ``runner`` which wires them together; ``python -m
jobs.embed`` is the command line and ``ray job submit`` entry.

The names below are imported on first use, so that a sandbox worker importing
``jobs.embed.sample`` does not pay for Ray and LanceDB.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EmbedReport": "jobs.embed.report",
    "Plan": "jobs.embed.plan",
    "decode_sample": "jobs.embed.sample",
    "init_ray": "jobs.embed.plan",
    "plan_resources": "jobs.embed.plan",
    "probe_encoder": "jobs.embed.runner",
    "run_embed": "jobs.embed.runner",
    "table_schema": "jobs.embed.runner",
    "thumbnail_jpeg": "jobs.embed.sample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jobs.embed' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
