"""The embedding job: sources -> decode + preprocess (CPU tasks) -> ImageBind vision encoder
(actors, one per GPU) -> the cache's LanceDB table.

Modules follow the data: ``plan`` (resources, Ray), ``decode`` (stage 1, CPU tasks), ``encode``
(stage 2, actors), ``sink`` (stage 3, the driver's writer), ``report``, and ``runner`` which
wires them together; ``python -m jobs.embed`` is the command line and ``ray job submit`` entry.
"""

from jobs.embed.decode import decode_sample, thumbnail_jpeg
from jobs.embed.plan import Plan, init_ray, plan_resources
from jobs.embed.report import EmbedReport
from jobs.embed.runner import probe_encoder, run_embed, table_schema

__all__ = [
    "EmbedReport",
    "Plan",
    "decode_sample",
    "init_ray",
    "plan_resources",
    "probe_encoder",
    "run_embed",
    "table_schema",
    "thumbnail_jpeg",
]
