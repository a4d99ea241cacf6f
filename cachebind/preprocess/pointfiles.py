"""Point-cloud files -> ``[N, C]`` arrays: the format parsers behind :func:`load_point_cloud`.

``.npy``, ``.npz`` / ``torch.save`` zips, PLY (ASCII, binary little/big-endian; the ``vertex``
element), PCD (``DATA ascii`` / ``binary``) and whitespace- or comma-separated text. Every parser
checks the point count a header declares against ``max_points`` before reading the body, so a
header that lies about a huge cloud costs nothing; bad bytes raise ``InputError``.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.preprocess.arrays import load_npy, read_zip, stored_zip
from cachebind.preprocess.common import over_limit

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format, and .npz
_MAX_FIELD_COUNT = 1024
"""A PCD field with a larger COUNT (values per point) is refused: real ones hold a few."""
_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}
_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4"}
_PCD_TYPES |= {("I", 8): "i8", ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def decode_points(raw: bytes, source: str, limits: InputLimits) -> np.ndarray:
    """``raw`` bytes -> ``[N, C]`` array, the format told by its first bytes (never the name)."""
    if raw.startswith(_NPY_MAGIC):
        return load_npy(raw, source, limits.max_array_values)
    if raw.startswith(_ZIP_MAGIC):
        return _load_zip(raw, source, limits)
    if raw[:3] == b"ply" and raw[3:4] in (b"\n", b"\r"):
        return _load_ply(raw, source, limits.max_points)
    if _looks_like_pcd(raw):
        return _load_pcd(raw, source, limits.max_points)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            source, "unsupported_format", "not NPY, torch, PLY, PCD or text coordinates"
        ) from e
    return _parse_columns(text, source, limits.max_points)


def check_points(count: int, source: str, max_points: int) -> None:
    """Refuse a declared or actual point count above ``input.max_points`` (``too_large``)."""
    if count > max_points:
        raise over_limit(source, "too_large", "points", count, "max_points", max_points)


def _load_zip(raw: bytes, source: str, limits: InputLimits) -> np.ndarray:
    """A ``torch.save`` file (its ``data.pkl``) or an ``.npz`` (its only array, or the one
    named ``points`` / ``xyz``), inflated within the decompressed-size budget."""
    members = read_zip(raw, source, limits.max_decompressed_bytes)
    if any(name == "data.pkl" or name.endswith("/data.pkl") for name in members):
        return _load_torch(stored_zip(members), source, limits)
    arrays = {n.removesuffix(".npy"): b for n, b in members.items() if n.endswith(".npy")}
    if not arrays:
        raise InputError(source, "undecodable", "zip archive is neither a torch file nor .npz")
    name: str | None = next((n for n in ("points", "xyz") if n in arrays), None)
    if name is None and len(arrays) != 1:
        raise InputError(
            source, "wrong_shape", f".npz of {sorted(arrays)}: name the cloud 'points' or 'xyz'"
        )
    return load_npy(arrays[name or next(iter(arrays))], source, limits.max_array_values)


def _load_torch(raw: bytes, source: str, limits: InputLimits) -> np.ndarray:
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise InputError(source, "undecodable", f"bad torch file: {e}") from e
    if not isinstance(obj, torch.Tensor):
        raise InputError(source, "wrong_type", f"torch file holds a {type(obj).__name__}")
    if obj.ndim == 3 and obj.shape[0] == 1:
        obj = obj[0]  # a saved batch of one
    # A tensor may be a strided view claiming far more elements than its storage holds.
    if obj.numel() > limits.max_array_values:
        raise over_limit(
            source,
            "too_large",
            "tensor values",
            obj.numel(),
            "max_array_values",
            limits.max_array_values,
        )
    if obj.ndim == 2:
        check_points(obj.shape[0], source, limits.max_points)
        obj = obj[:, :3]
    if obj.is_complex() or obj.dtype == torch.bool:
        raise InputError(source, "wrong_type", f"point tensor of dtype {obj.dtype}")
    return obj.detach().to(torch.float32).numpy()


def _parse_columns(text: str, source: str, max_points: int) -> np.ndarray:
    lines = [
        ln.replace(",", " ")
        for ln in text.splitlines()
        if ln.strip() and not ln.lstrip().startswith(("#", "//"))
    ]
    if lines and not _is_numeric_row(lines[0]):
        lines = lines[1:]  # a header line ("x y z", "X,Y,Z,R,G,B" ...)
    if not lines:
        raise InputError(source, "empty", "no numeric rows")
    check_points(len(lines), source, max_points)
    try:
        return np.loadtxt(io.StringIO("\n".join(lines)), dtype=np.float32, ndmin=2)
    except ValueError as e:
        raise InputError(source, "undecodable", f"not a numeric table: {e}") from e


def _is_numeric_row(line: str) -> bool:
    try:
        [float(v) for v in line.split()]
    except ValueError:
        return False
    return True


def _split_header(raw: bytes, end: bytes, source: str, fmt: str) -> tuple[list[str], bytes]:
    """Header lines up to and including the line that starts with ``end``, and the body."""
    pos = 0
    lines: list[str] = []
    while True:
        nl = raw.find(b"\n", pos)
        if nl < 0:
            raise InputError(source, "undecodable", f"{fmt} header never ends ({end.decode()})")
        line = raw[pos:nl].decode("latin-1").strip()
        lines.append(line)
        pos = nl + 1
        if line.encode("latin-1").startswith(end):
            return lines, raw[pos:]
        if len(lines) > 10_000:
            raise InputError(source, "undecodable", f"{fmt} header too long")


def _load_ply(raw: bytes, source: str, max_points: int) -> np.ndarray:
    header, body = _split_header(raw, b"end_header", source, "PLY")
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str | None]]]] = []
    for line in header[1:-1]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        try:
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property" and words[1] == "list":
                elements[-1][2].append((words[4], None))  # a list: no fixed type
            elif words[0] == "property":
                if words[1] not in _PLY_TYPES:
                    raise InputError(source, "undecodable", f"PLY property type {words[1]!r}")
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise InputError(source, "undecodable", f"PLY header line {line!r}")
        except (IndexError, ValueError) as e:
            raise InputError(source, "undecodable", f"PLY header line {line!r}") from e
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise InputError(source, "unsupported_format", f"PLY format {fmt!r}")
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise InputError(source, "undecodable", "PLY file has no vertex element")
    v = names.index("vertex")
    _, count, props = elements[v]
    prop_names = [p[0] for p in props]
    if not {"x", "y", "z"} <= set(prop_names):
        raise InputError(source, "wrong_shape", f"PLY vertices have {prop_names}, not x, y, z")
    if count <= 0:
        raise InputError(source, "empty", f"PLY file has {count} vertices")
    check_points(count, source, max_points)
    if any(e[1] < 0 for e in elements):
        raise InputError(source, "undecodable", "PLY element with a negative count")
    if any(t is None for _, t in props) or any(t is None for e in elements[:v] for _, t in e[2]):
        raise InputError(
            source, "unsupported_format", "PLY list properties in or before the vertex element"
        )
    xyz_cols = [prop_names.index(c) for c in ("x", "y", "z")]
    if fmt == "ascii":
        return _ply_ascii(body, sum(e[1] for e in elements[:v]), count, xyz_cols, source)
    order = "<" if fmt == "binary_little_endian" else ">"
    offset = sum(
        e[1] * np.dtype([(n, order + str(t)) for n, t in e[2]]).itemsize for e in elements[:v]
    )
    dtype = np.dtype([(n, order + str(t)) for n, t in props])
    if len(body) < offset + count * dtype.itemsize:
        raise InputError(
            source, "truncated", f"{len(body)} body bytes < {offset + count * dtype.itemsize}"
        )
    rec = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return _xyz32(rec)


def _xyz32(rec: np.ndarray) -> np.ndarray:
    """[N, 3] float32 of a record array's x, y, z fields (beyond float32: inf, dropped later)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.stack([rec[c].astype(np.float32) for c in ("x", "y", "z")], axis=1)


def _ply_ascii(body: bytes, skip: int, count: int, cols: list[int], source: str) -> np.ndarray:
    rows = body.decode("latin-1").splitlines()[skip : skip + count]
    if len(rows) < count:
        raise InputError(source, "truncated", f"{len(rows)} of {count} vertex lines")
    try:
        table = np.loadtxt(io.StringIO("\n".join(rows)), dtype=np.float32, ndmin=2)
    except ValueError as e:
        raise InputError(source, "undecodable", f"PLY vertex lines: {e}") from e
    if table.shape[1] <= max(cols):
        raise InputError(source, "undecodable", f"PLY vertex lines have {table.shape[1]} values")
    return table[:, cols]


def _looks_like_pcd(raw: bytes) -> bool:
    head = raw[:512].lstrip()
    return head.startswith((b"# .PCD", b"VERSION", b"FIELDS"))


def _load_pcd(raw: bytes, source: str, max_points: int) -> np.ndarray:
    header, body = _split_header(raw, b"DATA", source, "PCD")
    fields: dict[str, list[str]] = {}
    for line in header:
        words = line.split()
        if words and not words[0].startswith("#"):
            fields[words[0].upper()] = words[1:]
    names = fields.get("FIELDS", [])
    if not {"x", "y", "z"} <= set(names):
        raise InputError(source, "wrong_shape", f"PCD fields {names}, not x, y, z")
    try:
        counts = [int(c) for c in fields.get("COUNT", ["1"] * len(names))]
        sizes = [int(s) for s in fields.get("SIZE", [])]
        points = int(fields.get("POINTS", ["-1"])[0])
    except ValueError as e:
        raise InputError(source, "undecodable", f"PCD header: {e}") from e
    if any(not 1 <= c <= _MAX_FIELD_COUNT for c in counts):
        raise InputError(source, "undecodable", f"PCD COUNT {counts}: each must be 1..1024")
    check_points(points, source, max_points)
    data = (fields.get("DATA") or [""])[0].lower()
    if data == "ascii":
        text = body.decode("latin-1")
        table = _parse_columns(text, source, max_points)
        starts = np.cumsum([0, *counts])
        cols = [int(starts[names.index(c)]) for c in ("x", "y", "z")]
        if table.shape[1] <= max(cols):
            raise InputError(source, "undecodable", f"PCD rows have {table.shape[1]} values")
        return table[:, cols]
    if data != "binary":
        raise InputError(source, "unsupported_format", f"PCD DATA {data!r}")
    types = fields.get("TYPE", [])
    if not (len(names) == len(sizes) == len(types) == len(counts)) or points < 0:
        raise InputError(source, "undecodable", "PCD header lacks SIZE/TYPE/COUNT/POINTS")
    try:
        dtype = np.dtype(
            [
                (n, "<" + _PCD_TYPES[(t.upper(), s)], (c,) if c > 1 else ())
                for n, t, s, c in zip(names, types, sizes, counts, strict=True)
            ]
        )
    except KeyError as e:
        raise InputError(source, "undecodable", f"PCD type {e}") from e
    if len(body) < points * dtype.itemsize:
        raise InputError(source, "truncated", f"{len(body)} bytes < {points * dtype.itemsize}")
    if points == 0:
        raise InputError(source, "empty", "PCD file has 0 points")
    rec = np.frombuffer(body, dtype=dtype, count=points)
    return _xyz32(rec)
