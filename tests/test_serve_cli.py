"""`cachebind serve` (the CLI over ``serve_forever``) in its own process: it binds where it is
told, answers with keys from hashed key files, and exits cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from builders import build_demo_cache

import indexing
from cachebind.cli import main
from cachebind.config import EncoderConfig, IndexConfig, WeightsConfig
from cachebind.serve.auth import create_key
from cachebind.store import CacheTable
from cachebind.store.identity import configured_encoder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cachebind_serve_command(tmp_path):
    cache = build_demo_cache(tmp_path, rows=50, dim=64)
    index_dir = tmp_path / "index"
    indexing.build(
        CacheTable.open(cache.store),
        IndexConfig(dir=index_dir, use_gpu="no"),
        indexing.BuildOptions(progress=False),
    )
    users, admins = tmp_path / "users.txt", tmp_path / "admins.txt"
    key, admin_key = create_key(users), create_key(admins)
    port = free_port()
    env = {**os.environ, "CACHEBIND_HOME": str(tmp_path / "home"), "CACHEBIND_INDEX__USE_GPU": "no"}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "cachebind.cli", "serve",
            "--host", "127.0.0.1", "--port", str(port),
            "--table-uri", cache.store.uri, "--index-dir", str(index_dir),
            "--preset", "tiny",
            "--api-keys-file", str(users), "--admin-keys-file", str(admins),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", headers={"X-API-Key": key}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server not ready in 120 s"
            time.sleep(0.2)
        r = httpx.post(
            f"{url}/v1/search",
            json={"inputs": [{"modality": "text", "text": "a dog"}], "k": 4},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200 and len(r.json()["results"]) == 4
        assert httpx.get(f"{url}/v1/index").status_code == 401
        r = httpx.post(f"{url}/v1/admin/reload", headers={"X-API-Key": admin_key})
        assert r.status_code == 200
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "cachebind" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode in (0, 130), output[-2000:]
    assert "Application startup complete" in output


# --------------------------------------------------------------------------- the table's encoder


@pytest.fixture
def small_table(tmp_path, monkeypatch):
    """A demo table recorded as embedded by the small preset, its index published; the
    environment configures the tiny encoder over it."""
    weights = WeightsConfig(dir=tmp_path / "weights")
    small = configured_encoder(EncoderConfig(preset="small"), weights)
    cache = build_demo_cache(tmp_path, rows=50, dim=64, encoder=small)
    index_dir = tmp_path / "index"
    indexing.build(
        CacheTable.open(cache.store),
        IndexConfig(dir=index_dir, use_gpu="no"),
        indexing.BuildOptions(progress=False),
    )
    for name, value in {
        "CACHEBIND_HOME": str(tmp_path / "home"),
        "CACHEBIND_WEIGHTS__DIR": str(weights.dir),
        "CACHEBIND_STORE__URI": cache.store.uri,
        "CACHEBIND_INDEX__DIR": str(index_dir),
        "CACHEBIND_INDEX__USE_GPU": "no",
        "CACHEBIND_ENCODER__PRESET": "tiny",
        "CACHEBIND_ENCODER__DEVICE": "cpu",
    }.items():
        monkeypatch.setenv(name, value)
    return cache


def test_cachebind_serve_exits_non_zero_naming_both_encoders_of_a_mismatched_table(small_table):
    users = small_table.store.uri + "-users.txt"
    create_key(users)
    proc = subprocess.run(
        [
            sys.executable, "-m", "cachebind.cli", "serve",
            "--host", "127.0.0.1", "--port", str(free_port()), "--api-keys-file", users,
        ],
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    output = proc.stderr.decode()
    assert proc.returncode != 0, output[-2000:]
    assert "preset 'small'" in output and "preset 'tiny'" in output
    assert "--allow-encoder-mismatch" in output


@pytest.mark.parametrize(
    "command",
    [["search", "--text", "a dog"], ["enhance", "--text", "a dog"], ["index", "add"]],
    ids=["search", "enhance", "index-add"],
)
def test_an_in_process_command_against_a_mismatched_table_refuses(small_table, command, capsys):
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "preset 'small'" in err and "preset 'tiny'" in err and "--preset small" in err


def test_an_in_process_search_with_the_override_answers(small_table, capsys):
    assert main(["search", "--text", "a dog", "-k", "3", "--allow-encoder-mismatch"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
