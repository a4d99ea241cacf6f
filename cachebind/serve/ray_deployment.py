"""The same FastAPI app as a Ray Serve deployment, for scale-out over a Ray cluster.

Each replica builds its own app (and loads its own encoder, index and LLM) from the settings,
so a replica counts as started only once it can answer; Ray Serve's proxy spreads requests over
replicas, and each replica still micro-batches its own concurrent requests.

    from cachebind.serve.ray_deployment import run_on_ray
    run_on_ray(settings, num_replicas=4, ray_actor_options={"num_gpus": 1})

Needs ``ray[serve]`` (Ray's serve extra: grpcio, aiohttp, starlette, uvicorn, watchfiles …).
"""

from __future__ import annotations

from typing import Any

from cachebind.config import Settings
from cachebind.raycluster import start_or_join_ray


def build_application(
    settings: Settings,
    *,
    num_replicas: int = 1,
    ray_actor_options: dict[str, Any] | None = None,
    max_ongoing_requests: int = 64,
    name: str = "cachebind",
) -> Any:
    """A bound Ray Serve application (``serve.run`` it) serving ``create_app(settings)``."""
    from ray import serve

    # The settings travel as JSON: the app itself (threads, locks, models) is built on the
    # replica by the builder below, never pickled from the driver.
    settings_json = settings.model_dump_json()

    def build_asgi_app() -> Any:
        from cachebind.config import Settings
        from cachebind.serve.app import create_app
        from cachebind.serve.runtime import Runtime

        replica_settings = Settings.model_validate_json(settings_json)
        runtime = Runtime.from_settings(replica_settings)
        return create_app(replica_settings, runtime)

    deployment = serve.deployment(
        name=name,
        num_replicas=num_replicas,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
        # Enough concurrency per replica for its micro-batcher to form batches.
        max_ongoing_requests=max_ongoing_requests,
    )(serve.ingress(build_asgi_app)())
    return deployment.bind()


def run_on_ray(
    settings: Settings,
    *,
    num_replicas: int = 1,
    ray_actor_options: dict[str, Any] | None = None,
    host: str | None = None,
    port: int | None = None,
    blocking: bool = False,
) -> str:
    """Start Ray Serve's HTTP proxy on ``host:port`` (default ``serve.host``/``serve.port``)
    and deploy the app at ``/``; returns the base URL. Joins ``embed.ray_address`` when set,
    else starts a local Ray."""
    from ray import serve

    start_or_join_ray(settings.embed.ray_address, include_dashboard=False)
    host = host or settings.serve.host
    port = settings.serve.port if port is None else port
    serve.start(http_options={"host": host, "port": port})
    app = build_application(
        settings, num_replicas=num_replicas, ray_actor_options=ray_actor_options
    )
    serve.run(app, name="cachebind", route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"
