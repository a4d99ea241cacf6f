"""Checkpoint download (resume, size and sha256 checks, atomic rename) and strict loading.

The server is a real ``http.server`` on 127.0.0.1 that honours ``Range`` requests, serving a
small file in place of the 4.8 GB official checkpoint.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from cachebind.encode import KNOWN_WEIGHTS, build_model, download_weights, load_checkpoint
from cachebind.encode.weights import file_sha256, read_state_dict
from cachebind.errors import WeightsError

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, not a multiple of the chunk size
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer:
    """Serves ``PAYLOAD`` at ``/weights.pth``; records the Range header of every request."""

    def __init__(self) -> None:
        self.requests: list[str | None] = []
        self.honour_ranges = True
        self.cut_after: int | None = None  # close the connection after this many body bytes
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                range_header = self.headers.get("Range")
                server.requests.append(range_header)
                if self.path != "/weights.pth":
                    self.send_error(404)
                    return
                start = 0
                if range_header and server.honour_ranges:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    end = len(PAYLOAD) - 1
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(body[: server.cut_after])
                    self.wfile.flush()
                    server.cut_after = None
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights.pth"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    yield srv
    srv.close()


def _download(server: FileServer, dest: Path, **kwargs: object) -> Path:
    args = dict(dest_dir=dest, url=server.url, sha256=SHA, expected_size=len(PAYLOAD))
    args.update(kwargs)
    return download_weights("test_weights", progress=False, **args)


def test_download_verifies_and_renames_into_place(server: FileServer, tmp_path: Path) -> None:
    path = _download(server, tmp_path)
    assert path == tmp_path / "test_weights.pth"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "test_weights.pth.part").exists()
    assert server.requests == [None]
    # The verified hash is remembered, so the encoder's identity need not re-hash 4.8 GB.
    assert file_sha256(path) == SHA


def test_an_interrupted_download_resumes_with_a_range_request(
    server: FileServer, tmp_path: Path
) -> None:
    server.cut_after = 300_000
    with pytest.raises(WeightsError, match="resume"):
        _download(server, tmp_path)
    part = tmp_path / "test_weights.pth.part"
    assert part.stat().st_size == 300_000
    assert not (tmp_path / "test_weights.pth").exists()  # never a partial file under the name

    path = _download(server, tmp_path)
    assert server.requests == [None, "bytes=300000-"]
    assert path.read_bytes() == PAYLOAD
    assert not part.exists()


def test_a_leftover_part_file_is_resumed(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "test_weights.pth.part").write_bytes(PAYLOAD[:1000])
    path = _download(server, tmp_path)
    assert server.requests == ["bytes=1000-"]
    assert path.read_bytes() == PAYLOAD


def test_a_complete_part_file_needs_no_more_bytes(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "test_weights.pth.part").write_bytes(PAYLOAD)
    path = _download(server, tmp_path)
    assert server.requests == [f"bytes={len(PAYLOAD)}-"]
    assert path.read_bytes() == PAYLOAD


def test_a_server_that_ignores_ranges_restarts_from_zero(
    server: FileServer, tmp_path: Path
) -> None:
    server.honour_ranges = False
    (tmp_path / "test_weights.pth.part").write_bytes(PAYLOAD[:5000])
    path = _download(server, tmp_path)
    assert path.read_bytes() == PAYLOAD


def test_a_wrong_checksum_is_rejected_and_nothing_is_kept(
    server: FileServer, tmp_path: Path
) -> None:
    with pytest.raises(WeightsError, match="sha256"):
        _download(server, tmp_path, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_part_file_fails_the_checksum(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "test_weights.pth.part").write_bytes(b"\xff" * 1000)  # not a prefix of the file
    with pytest.raises(WeightsError, match="sha256"):
        _download(server, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert _download(server, tmp_path).read_bytes() == PAYLOAD  # the next run starts clean


def test_a_wrong_size_is_rejected(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="expected"):
        _download(server, tmp_path, expected_size=len(PAYLOAD) + 1, sha256=None)
    assert not (tmp_path / "test_weights.pth").exists()


def test_an_existing_file_is_verified_not_downloaded(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "test_weights.pth").write_bytes(PAYLOAD)
    assert _download(server, tmp_path).read_bytes() == PAYLOAD
    assert server.requests == []
    (tmp_path / "other.pth").write_bytes(PAYLOAD[:-1] + b"X")
    with pytest.raises(WeightsError, match="sha256"):
        _download(server, tmp_path, filename="other.pth")


def test_http_errors_become_weights_errors(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="HTTP 404"):
        _download(server, tmp_path, url=server.url.replace("weights.pth", "missing.pth"))
    with pytest.raises(WeightsError, match="unknown weights"):
        download_weights("no_such_weights", dest_dir=tmp_path, progress=False)


def test_the_registry_knows_the_official_checkpoint() -> None:
    huge = KNOWN_WEIGHTS["imagebind_huge"]
    assert huge.url == "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
    assert huge.sha256 == "d6f6c22bedcc90708448d5d2fbb7b2db9c73f505dc89bd0b2e09b23af1b62157"
    assert huge.size == 4_803_584_173
    assert huge.license == "CC BY-NC 4.0"
    assert huge.preset == "huge"


# --- loading ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return build_model("tiny").state_dict()


def test_load_checkpoint_is_strict_and_exact(tmp_path: Path, tiny_state) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_state, path)
    torch.manual_seed(4)
    model = load_checkpoint(build_model("tiny"), path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, tiny_state[name]), name


def test_load_checkpoint_into_a_meta_model_takes_the_tensors(tmp_path: Path, tiny_state) -> None:
    path = tmp_path / "tiny.pth"
    torch.save({"model": tiny_state}, path)  # the {"model": ...} wrapper is accepted too
    with torch.device("meta"):
        model = build_model("tiny")
    load_checkpoint(model, path)
    assert not any(t.is_meta for t in model.state_dict().values())
    with torch.no_grad():
        out = model.encode("imu", torch.randn(1, 6, 2000))
    assert torch.isfinite(out).all()


def test_layout_errors_name_the_keys(tmp_path: Path, tiny_state) -> None:
    bad = dict(tiny_state)
    del bad["modality_trunks.vision.blocks.0.attn.in_proj_weight"]
    bad["modality_trunks.vision.blocks.9.attn.bias_k"] = torch.zeros(1, 1, 64)
    bad["modality_heads.text.proj.1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(WeightsError) as info:
        load_checkpoint(build_model("tiny"), path)
    message = str(info.value)
    assert "missing keys (1): modality_trunks.vision.blocks.0.attn.in_proj_weight" in message
    assert "unexpected keys (1): modality_trunks.vision.blocks.9.attn.bias_k" in message
    assert "modality_heads.text.proj.1.weight: checkpoint (3, 3) vs model (64, 64)" in message


def test_unreadable_checkpoints_raise_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="state dict"):
        read_state_dict(tmp_path / "list.pth")
