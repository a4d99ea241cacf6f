"""Shared fixtures. ``served``: a real HTTP server on 127.0.0.1 over a generated cache.

A test module states the server it needs with a module mark, for example
``pytestmark = pytest.mark.served(rows=200, llm=True, max_k=50)``: ``rows`` of the demo cache,
``llm`` for a tiny LLaMA with the ImageBind-LLM adapter, ``llm_settings`` for its ``llm``
section, and any ``serve`` setting by name.
One server per module (and per indirect parameter of ``served``, whose dictionary adds to the
mark's settings): it starts before the module's first test and stops after its last.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from builders import (
    DemoCache,
    ServiceSettings,
    TableFlatLoader,
    build_demo_cache,
    service_settings,
    tiny_runtime,
)
from ray_local import stop_local_ray

from cachebind.serve import Runtime, ServerHandle, start_server

# Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a
# run is noticed to have ended, or a worker to have died, up to 2 s late: about 4 s of waiting
# per `fit` on these machines, over a dozen fits. Polling every 0.2 s changes what the tests
# see only in that latency (a poll that takes longer is awaited on the next round; a worker is
# declared dead after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 minutes, either way). Set
# before any Ray cluster of the suite starts, so that every Ray process inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "served(rows=200, llm=False, llm_settings={}, **serve): the server 'served' starts",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a ``slow`` test run first. Under pytest-xdist each file stays on one worker
    and files are handed out in this order, so the long ones start at once and the short ones
    fill the gaps, instead of one worker finishing a long file alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file order kept


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_stops_with_the_session() -> Iterator[None]:
    """The local Ray that modules share (``ray_local.use_local_ray``) ends with the session."""
    yield
    stop_local_ray()


OTHER_CLUSTER = """
import socket, sys, time, urllib.request
import ray._private.services as services
from ray._private import ray_constants
from ray.cluster_utils import Cluster

# Its dashboard with the state API alone: what Ray's look-ups ask a cluster (the other modules
# are a process each, about 20 s of CPU that the rest of the suite needs).
start_process = services.start_ray_process
def state_api_only(command, process_type, *args, **kwargs):
    if process_type == ray_constants.PROCESS_TYPE_DASHBOARD:
        command = [*command, "--modules-to-load=StateHead"]
    return start_process(command, process_type, *args, **kwargs)
services.start_ray_process = state_api_only

with socket.socket() as s:  # a free port: Ray's default 8265 is often another test's dashboard
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": port})
if not cluster.webui_url:
    sys.exit("its dashboard did not start")
deadline = time.monotonic() + 300
while True:  # its state API answers: what makes it the cluster that look-ups ask
    try:
        urllib.request.urlopen(f"http://{cluster.webui_url}/api/v0/actors", timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


DASHBOARD_TIMEOUTS = ("SUBPROCESS_MODULE_WAIT_READY_TIMEOUT", "STARTUP_TIMEOUT_S")


@pytest.fixture(scope="module")
def another_ray_is_current() -> Iterator[str]:
    """A second Ray cluster, started the way ``ray start`` starts one, so that it is the machine's
    latest (``/tmp/ray/ray_current_cluster``): what Ray's own look-ups find when nothing tells
    them which cluster they belong to. Work on a test's local instance must not be disturbed."""
    # A dashboard's modules get 30 s to start by default, which a busy 2-core machine exceeds.
    patient = {f"RAY_DASHBOARD_{name}": "300" for name in DASHBOARD_TIMEOUTS}
    proc = subprocess.Popen(
        [sys.executable, "-c", OTHER_CLUSTER],
        env={**os.environ, **patient},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        address = proc.stdout.readline().strip()
        assert address, "the second Ray cluster did not start"
        yield address
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Served:
    """A running server, its settings and keys, and the runtime it serves."""

    server: ServerHandle
    svc: ServiceSettings
    runtime: Runtime
    cache: DemoCache

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    mark = request.node.get_closest_marker("served")
    options: dict[str, Any] = {"rows": 200, "llm": False, "index_poll_s": 0}
    options.update(mark.kwargs if mark else {})
    # parametrize("served", [{...}], indirect=True): one server per set of settings.
    options.update(getattr(request, "param", {}))
    rows, llm = options.pop("rows"), options.pop("llm")
    llm_settings = options.pop("llm_settings", {})
    root = tmp_path_factory.mktemp("served")
    cache = build_demo_cache(root, rows=rows, dim=64)
    svc = service_settings(root, cache, **options)
    svc.settings.llm = svc.settings.llm.model_copy(update=llm_settings)
    generator: Any = None
    if llm == "llava":  # tokens mode: a small random LLaVA-1.5 over a table of its tokens
        from llava_checkpoints import write_served_llava, write_tokens_cache

        from cachebind.inject.llava_serve import load_llava_generator

        directory, _ = write_served_llava(root / "llava")
        update = {"mode": "llava", "llava_dir": directory, "device": "cpu", "dtype": "float32"}
        svc.settings.llm = svc.settings.llm.model_copy(update=update)
        generator = load_llava_generator(svc.settings.llm)
        cache = write_tokens_cache(root, generator, rows)
    elif llm:
        from cachebind.inject.tiny import build_tiny_llm

        generator = build_tiny_llm(root / "llm", visual_dim=64)
    runtime = tiny_runtime(svc.settings, TableFlatLoader(cache.store), generator)
    server = start_server(svc.settings, runtime, port=0)
    yield Served(server, svc, runtime, cache)
    server.stop()
