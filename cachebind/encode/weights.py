"""Known ImageBind checkpoints: resumable, verified download and strict loading.

The weights are licensed CC BY-NC 4.0 by Meta: cachebind downloads them on request and never
ships them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

from cachebind.errors import WeightsError

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
OFFICIAL_SHA256 = "d6f6c22bedcc90708448d5d2fbb7b2db9c73f505dc89bd0b2e09b23af1b62157"
OFFICIAL_SIZE = 4_803_584_173
_CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownWeights:
    """A published checkpoint: where it is, what it must hash to, and for which preset."""

    url: str
    sha256: str
    size: int
    license: str
    preset: str
    filename: str


KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    "imagebind_huge": KnownWeights(
        url=OFFICIAL_URL,
        # The publisher gives no hash; this is the one every public mirror agrees on.
        sha256=OFFICIAL_SHA256,
        size=OFFICIAL_SIZE,
        license="CC BY-NC 4.0",
        preset="huge",
        filename="imagebind_huge.pth",
    ),
}


def download_weights(
    name: str = "imagebind_huge",
    *,
    dest_dir: str | Path,
    url: str | None = None,
    sha256: str | None = None,
    expected_size: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    filename: str | None = None,
) -> Path:
    """Download checkpoint ``name`` into ``dest_dir`` and return its path.

    ``url``, ``sha256`` and ``expected_size`` default to the ``KNOWN_WEIGHTS`` entry (and must be
    given for other names). Bytes go to ``<file>.part``; an interrupted download resumes from it
    with an HTTP ``Range`` request (restarting from zero if the server ignores ranges). The file is
    checked for size and sha256 and only then renamed atomically into place, so a file under the
    final name is always complete. A checksum mismatch deletes the partial file and raises
    ``WeightsError``. A final file that already exists is verified, not downloaded again.
    """
    known = KNOWN_WEIGHTS.get(name)
    url = url or (known.url if known else None)
    if url is None:
        raise WeightsError(
            f"unknown weights {name!r} and no url given; known: {list(KNOWN_WEIGHTS)}"
        )
    if known is not None:
        sha256 = sha256 or known.sha256
        expected_size = expected_size if expected_size is not None else known.size
    dest = Path(dest_dir) / (filename or (known.filename if known else f"{name}.pth"))
    dest.parent.mkdir(parents=True, exist_ok=True)

    if dest.exists():
        _verify(dest, sha256, expected_size, delete=False)
        return dest

    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the real file: it cannot be a prefix of it
        offset = 0
    if offset:
        _hash_into(part, digest)

    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            with client.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 416 and offset:
                    pass  # nothing left to fetch: the .part file is complete
                elif resp.status_code == 206 and offset:
                    _check_range(resp, offset)
                    _append(resp, part, digest, "ab", offset, expected_size, progress, name)
                elif resp.status_code == 200:
                    # A fresh download, or a server that ignored our Range: start over.
                    digest = hashlib.sha256()
                    _append(resp, part, digest, "wb", 0, expected_size, progress, name)
                else:
                    raise WeightsError(f"downloading {url}: HTTP {resp.status_code}")
    except httpx.HTTPError as exc:
        raise WeightsError(
            f"downloading {url} failed ({exc}); run again to resume from {part}"
        ) from exc

    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        raise WeightsError(
            f"{part}: got {size} bytes, expected {expected_size}; run again to resume"
        )
    actual = digest.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        part.unlink()
        raise WeightsError(f"{url}: sha256 {actual} does not match the expected {sha256}")
    os.replace(part, dest)  # atomic on one filesystem: readers never see a partial file
    _write_sha_sidecar(dest, actual)
    return dest


def _check_range(resp: httpx.Response, offset: int) -> None:
    content_range = resp.headers.get("content-range", "")
    if not content_range.startswith(f"bytes {offset}-"):
        raise WeightsError(f"server answered range {content_range!r} to a request from {offset}")


def _append(
    resp: httpx.Response,
    part: Path,
    digest: Any,
    mode: str,
    offset: int,
    total: int | None,
    progress: bool,
    name: str,
) -> None:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=name)
    try:
        with open(part, mode) as fh:
            # No chunk size: write bytes as they arrive, so an interruption loses none of them.
            for chunk in resp.iter_bytes():
                fh.write(chunk)
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def _hash_into(path: Path, digest: Any) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)


def _verify(path: Path, sha256: str | None, size: int | None, *, delete: bool) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise WeightsError(f"{path}: {actual_size} bytes, expected {size}")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256.lower():
            if delete:
                path.unlink()
            raise WeightsError(f"{path}: sha256 {actual} does not match the expected {sha256}")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _write_sha_sidecar(path: Path, sha: str) -> None:
    st = path.stat()
    record = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    # A read-only weights folder only costs a re-hash next time.
    with contextlib.suppress(OSError):
        _sidecar(path).write_text(json.dumps(record))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached in ``<file>.sha256.json`` while its size and mtime are unchanged
    (hashing the 4.8 GB huge checkpoint takes ~10 s; the encoder's identity needs it)."""
    path = Path(path)
    st = path.stat()
    try:
        record = json.loads(_sidecar(path).read_text())
        if record["size"] == st.st_size and record["mtime_ns"] == st.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    _hash_into(path, digest)
    sha = digest.hexdigest()
    _write_sha_sidecar(path, sha)
    return sha


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (a plain state dict, or ``{"model": ...}`` /
    ``{"state_dict": ...}``), read safely (``weights_only``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        try:
            # mmap avoids a second in-memory copy of a 4.8 GB file; old-format files refuse it.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/unsafe files
        raise WeightsError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def check_layout(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Raise ``WeightsError`` naming missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_names(shapes)}")
        where = f"{source} " if source else ""
        raise WeightsError(f"checkpoint {where}does not match the model: " + "; ".join(parts))


def _names(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model`` strictly (every name and shape must match).

    A model built on the meta device (``with torch.device("meta"): build_model("huge")``) takes
    the checkpoint's tensors as they are (``assign``), which skips random initialisation and a
    second copy of the weights.
    """
    state = read_state_dict(path)
    check_layout(model, state, str(path))
    on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model
