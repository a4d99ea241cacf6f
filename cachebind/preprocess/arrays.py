"""Array containers from untrusted bytes, within budgets: ``.npy`` by its header, zip archives
(``.npz``, ``torch.save``'s ``.pt``) by their directory and again while inflating.

``np.load`` allocates whatever shape an ``.npy`` header declares (a 1 TiB shape is a
MemoryError), and ``torch.load`` inflates every zip member in full whatever its size. Here the
declared sizes are checked against the bytes present and the configured limits first; zip
members are inflated by Python's ``zipfile`` in bounded reads (so a member that inflates past
what its directory entry says stops there, and fails its CRC) and torch then reads a copy of the
archive re-written without compression: it only ever sees bytes that were counted.
"""

from __future__ import annotations

import io
import math
import zipfile

import numpy as np

from cachebind.errors import InputError

MAX_ZIP_MEMBERS = 10_000
"""Archives listing more members are refused (a torch file holds a few per tensor)."""

# zipfile parses untrusted structures in Python: besides BadZipFile, a crafted directory raises
# OverflowError (offsets past 2^63, found by scripts/fuzz_preprocess.py), struct.error, …
_ZIP_ERRORS = (Exception,)


def load_npy(raw: bytes, source: str, max_values: int) -> np.ndarray:
    """The array of an ``.npy`` file, a read-only view of ``raw`` (nothing allocated).

    Raises InputError ``too_large`` when the header declares more than ``max_values`` elements
    (``input.max_array_values``), ``truncated`` when it declares more bytes than follow it,
    ``wrong_type`` for object arrays, ``undecodable`` for a bad header.
    """
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise InputError(source, "unsupported_format", f".npy format version {version}")
    except InputError:
        raise
    except Exception as e:  # numpy's header parser raises many types (TokenError, …)
        reason = "truncated" if "EOF" in str(e) or len(raw) < 16 else "undecodable"
        raise InputError(source, reason, f"bad .npy header: {e}") from e
    if dtype.hasobject:
        raise InputError(source, "wrong_type", ".npy of Python objects (pickles are refused)")
    values = math.prod(shape)
    if values > max_values:
        detail = f".npy declares {values:,} values > input.max_array_values = {max_values:,}"
        raise InputError(source, "too_large", detail)
    offset = stream.tell()
    if values * dtype.itemsize > len(raw) - offset:
        raise InputError(
            source,
            "truncated",
            f".npy declares {values * dtype.itemsize:,} bytes, {len(raw) - offset:,} follow",
        )
    flat = np.frombuffer(raw, dtype=dtype, count=values, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def read_zip(raw: bytes, source: str, max_total: int) -> dict[str, bytes]:
    """Every member of a zip archive, inflated, at most ``max_total`` bytes in all.

    Raises InputError ``decompression_bomb`` when the directory declares, or inflating yields,
    more than ``max_total`` (``input.max_decompressed_bytes``); ``undecodable`` for a corrupt
    archive (bad CRC, sizes that disagree with the data, encryption).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        infos = [i for i in archive.infolist() if not i.is_dir()]
    except _ZIP_ERRORS as e:
        raise InputError(source, "undecodable", f"bad zip archive: {e}") from e
    if len(infos) > MAX_ZIP_MEMBERS:
        raise InputError(source, "too_large", f"{len(infos):,} zip members > {MAX_ZIP_MEMBERS:,}")
    declared = sum(i.file_size for i in infos)
    if declared > max_total:
        raise _bomb(source, f"zip directory declares {declared:,} bytes", max_total)
    members: dict[str, bytes] = {}
    total = 0
    try:
        for info in infos:
            with archive.open(info) as member:
                data = _inflate(member, max_total - total, source)
                if len(data) != info.file_size:
                    raise InputError(
                        source,
                        "undecodable",
                        f"zip member {info.filename!r} inflates to a size its entry does not say",
                    )
            total += len(data)
            if total > max_total:
                raise _bomb(source, f"zip members inflate to more than {total:,} bytes", max_total)
            members[info.filename] = data
    except InputError:
        raise
    except _ZIP_ERRORS as e:
        raise InputError(source, "undecodable", f"bad zip archive: {e}") from e
    return members


_INFLATE_STEP = 1 << 20


def _inflate(member, budget: int, source: str) -> bytes:
    """A member's bytes, inflated a MiB at a time (``ZipExtFile.read(n)`` may inflate up to
    ``n`` bytes in one go before cutting to the member's size), at most ``budget`` of them."""
    parts: list[bytes] = []
    size = 0
    while part := member.read(_INFLATE_STEP):
        size += len(part)
        if size > budget:
            raise _bomb(source, "inflated zip members", budget)
        parts.append(part)
    return b"".join(parts)


def stored_zip(members: dict[str, bytes]) -> bytes:
    """The same members in a zip archive without compression (what torch then reads)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def _bomb(source: str, what: str, limit: int) -> InputError:
    detail = f"{what} > input.max_decompressed_bytes = {limit:,}"
    return InputError(source, "decompression_bomb", detail)
