"""The app deployed on Ray Serve (one replica on a local Ray) answers like the plain server."""

from __future__ import annotations

import base64
import socket

import httpx
import pytest
from builders import build_demo_cache, service_settings
from fixtures_media import image_bytes
from ray_local import stop_local_ray

import indexing
from cachebind.store import CacheTable, row_id

serve = pytest.importorskip("ray.serve", reason="needs ray[serve]")
protobuf = pytest.importorskip("google.protobuf")
# Ray Serve 2.54's controller reads FieldDescriptor.label, which protobuf 7 removed: deploying
# fails inside Ray with AttributeError. protobuf 6.33.x works.
if int(protobuf.__version__.split(".")[0]) >= 7:
    pytest.skip(
        f"Ray Serve 2.54 needs protobuf<7 (found {protobuf.__version__})", allow_module_level=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_serve_deployment_serves_search(tmp_path):
    import ray

    from cachebind.serve.ray_deployment import run_on_ray

    cache = build_demo_cache(tmp_path, rows=100, dim=64)
    svc = service_settings(tmp_path, cache, index_poll_s=0)
    svc.settings.index.use_gpu = "no"
    indexing.build(
        CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
    )
    stop_local_ray()  # Ray Serve lives and ends with a cluster of its own
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = run_on_ray(
            svc.settings,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0.5},
            host="127.0.0.1",
            port=free_port(),
        )
        with httpx.Client(base_url=url, headers={"X-API-Key": svc.user_key}, timeout=60) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            assert http.get("/v1/index").status_code == 200
            query = CacheTable.open(cache.store).vectors([row_id("sample-000033")])[0]
            r = http.post("/v1/search", json={"inputs": [{"embedding": query.tolist()}], "k": 2})
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["key"] == "sample-000033"
            r = http.post("/v1/search", json={"inputs": [{"modality": "text", "text": "a cat"}]})
            assert r.status_code == 200 and len(r.json()["results"]) == 10
            # Media are decoded in the replica's own sandbox pool (started by the app's lifespan).
            image = base64.b64encode(image_bytes(size=(96, 80))).decode()
            r = http.post("/v1/search", json={"inputs": [{"modality": "image", "data": image}]})
            assert r.status_code == 200, r.text
            assert http.get("/v1/index", headers={"X-API-Key": "wrong"}).status_code == 401
    finally:
        serve.shutdown()
        ray.shutdown()
