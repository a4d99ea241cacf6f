"""Point clouds -> Point-Bind's ``[8192, 3]`` input.

What Point-Bind does (ZiyuGuo99/Point-Bind_Point-LLM, ``data/dataset_3d.py`` ``ModelNet``, and
``models/pointbert/PointTransformer_8192point.yaml`` ``npoints: 8192``): keep the x, y, z
columns (``USE_NORMALS`` off), reduce a larger cloud to 8192 points by farthest point sampling,
then ``pc_normalize``: subtract the centroid (mean) and divide by the largest distance from it,
so the cloud fits the unit sphere. Its demos feed tensors saved that way (``examples/*.pt``).

Where we must decide what the reference leaves open:

- FPS starts at point 0 (the reference's NumPy FPS starts at a random point), so one file always
  gives one tensor. A cloud above ``4 × 8192`` points is first thinned to that many by a random
  subset with a fixed seed (FPS costs O(8192 · N); the patches the trunk sees are unaffected
  at that density).
- A cloud with fewer than 8192 points (the reference never has one) is padded by repeating
  points drawn with a fixed seed; every original point is kept.
- Rows with a NaN/inf coordinate are dropped (PCL writes NaN for missing points of organised
  clouds); a cloud whose points all coincide has no shape and is refused.

Accepted inputs: a NumPy array ``[N, C]`` (C >= 3: x, y, z first; normals/colours dropped),
``.npy``, ``.pt`` (a tensor saved with ``torch.save``, like Point-Bind's examples), ``.ply``
(ASCII, binary little/big-endian; the ``vertex`` element's x, y, z), ``.pcd`` (``DATA ascii``
or ``binary``), and ``.xyz`` / ``.txt`` / ``.pts`` / ``.csv`` text (whitespace or comma
columns, optional header line, ``#`` comments). Bad input raises ``InputError(source, reason,
detail)``: ``empty``, ``undecodable``, ``truncated``, ``wrong_shape``, ``wrong_type``,
``unsupported_format`` (plus ``not_found`` / ``too_large`` from reading).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.preprocess.common import RawInput, read_bytes, resolve_limits
from cachebind.preprocess.pointfiles import check_points, decode_points

NUM_POINTS = 8192
"""Points per cloud (Point-Bind's ``npoints``)."""

MAX_FPS_POINTS = 4 * NUM_POINTS
"""Clouds above this are thinned by a seeded random subset before FPS."""

SEED = 0
"""Seed of the thinning subset and of the padding draws."""

SUFFIXES = frozenset({".npy", ".pt", ".pth", ".ply", ".pcd", ".xyz", ".txt", ".pts", ".csv"})


# --------------------------------------------------------------------------- decode stage


def load_point_cloud(
    data: RawInput | np.ndarray,
    source: str = "<input>",
    *,
    max_bytes: int | None = None,
    limits: InputLimits | None = None,
) -> np.ndarray:
    """The decode stage: ``data`` -> ``[N, 3]`` float32, all finite, not all coincident.

    At most ``input.max_points`` points, checked on every header that declares a count (PLY,
    PCD, ``.npy``, a torch tensor's shape) before reading its body; zip containers within
    ``input.max_decompressed_bytes``. Coordinates are converted to float32 once (no float64
    copy of the cloud)."""
    limits = resolve_limits(limits, max_bytes=max_bytes)
    if isinstance(data, np.ndarray):
        arr = data
    else:
        if isinstance(data, str | Path) and Path(data).suffix:
            suffix = Path(data).suffix.lower()
            if suffix not in SUFFIXES:
                raise InputError(
                    source, "unsupported_format", f"{suffix} files; expected {sorted(SUFFIXES)}"
                )
        arr = decode_points(read_bytes(data, source, limits.max_bytes), source, limits)
    return _validate(arr, source, limits.max_points)


def _validate(arr: np.ndarray, source: str, max_points: int) -> np.ndarray:
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(source, "wrong_type", f"point array of dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise InputError(
            source, "wrong_shape", f"points must be [N, 3] or [N, C>3], got {arr.shape}"
        )
    check_points(arr.shape[0], source, max_points)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, dropped below
        xyz = np.asarray(arr[:, :3], dtype=np.float32)
    xyz = xyz[np.isfinite(xyz).all(axis=1)]
    if len(xyz) == 0:
        raise InputError(source, "empty", "no points with finite coordinates")
    if not (xyz != xyz[0]).any():
        raise InputError(source, "empty", f"all {len(xyz)} points coincide: no shape")
    return np.ascontiguousarray(xyz, dtype=np.float32)


# --------------------------------------------------------------------------- transform stage


def resample_indices(
    points: np.ndarray, num_points: int = NUM_POINTS, seed: int = SEED
) -> np.ndarray:
    """Indices of ``num_points`` rows of ``points`` ``[N, 3]``: FPS (from row 0) when there are
    more (after a seeded thinning above ``MAX_FPS_POINTS``), all rows plus seeded repeats when
    there are fewer, all rows in order when exactly ``num_points``."""
    n = len(points)
    rng = np.random.default_rng(seed)
    if n == num_points:
        return np.arange(n)
    if n < num_points:
        return np.concatenate([np.arange(n), rng.integers(0, n, num_points - n)])
    pool = np.arange(n)
    if n > max(MAX_FPS_POINTS, num_points):
        pool = np.sort(rng.choice(n, MAX_FPS_POINTS, replace=False))
    return pool[farthest_point_sample(points[pool], num_points)]


def farthest_point_sample(points: np.ndarray, num_samples: int, start: int = 0) -> np.ndarray:
    """Row indices of FPS over ``points`` ``[N, 3]`` from row ``start`` (the reference's NumPy
    ``farthest_point_sample``, whose first row is random). NumPy in float64 rather than torch:
    thousands of tiny sequential steps cost ~5x less without torch's per-op dispatch."""
    x, y, z = (np.ascontiguousarray(points[:, i], dtype=np.float64) for i in range(3))
    nearest = np.full(len(x), np.inf)
    chosen = np.empty(num_samples, dtype=np.int64)
    far = start
    for i in range(num_samples):
        chosen[i] = far
        d = (x - x[far]) ** 2
        d += (y - y[far]) ** 2
        d += (z - z[far]) ** 2
        np.minimum(nearest, d, out=nearest)
        far = int(nearest.argmax())  # the first maximum: ties go to the lowest index
    return chosen


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Point-Bind's ``pc_normalize``: centroid to the origin, farthest point at distance 1."""
    centred = points - points.mean(axis=0)
    return centred / np.sqrt((centred**2).sum(axis=1)).max()


def point_cloud_tensor(
    points: np.ndarray, num_points: int = NUM_POINTS, seed: int = SEED
) -> torch.Tensor:
    """The transform stage: ``[N, 3]`` -> ``[num_points, 3]`` float32 in the unit sphere."""
    picked = points[resample_indices(points, num_points, seed)].astype(np.float64)
    return torch.from_numpy(normalize_unit_sphere(picked).astype(np.float32))


def preprocess_point_cloud(
    data: RawInput | np.ndarray, source: str = "<input>", *, limits: InputLimits | None = None
) -> torch.Tensor:
    """``load_point_cloud`` then ``point_cloud_tensor``."""
    return point_cloud_tensor(load_point_cloud(data, source, limits=limits))
