"""IMU recordings -> the IMU trunk's [6, 2000] input.

ImageBind's IMU trunk takes 6 channels (accelerometer x/y/z, gyroscope x/y/z, as Ego4D's IMU
streams) by 2000 time steps (10 s at 200 Hz in its training data). Its released code has no IMU
loader; we take the recording as given (no unit conversion or normalisation) and resample each
channel linearly to 2000 samples with the end points kept:
``y[k] = x(k * (T - 1) / 1999)`` (``np.interp``), so a 200 Hz, 10 s recording passes through
unchanged. Callers should pass ~10 s windows at the sensor's own scale (m/s^2 and rad/s).

Accepted: a [6, T] or [T, 6] array, an ``.npy`` file, or CSV text/bytes with 6 columns (T rows,
optional header line) or 6 rows (T columns). A [6, 6] input is read as [channels, time].
"""

from __future__ import annotations

import io

import numpy as np
import torch

from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.preprocess.arrays import load_npy
from cachebind.preprocess.common import RawInput, read_bytes, resolve_limits

CHANNELS = 6
TIMESTEPS = 2000
MIN_TIMESTEPS = 2
_NPY_MAGIC = b"\x93NUMPY"


def _parse_csv(raw: bytes, source: str) -> np.ndarray:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(source, "undecodable", "neither NPY nor UTF-8 CSV") from e
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and not _is_numeric_row(lines[0]):
        lines = lines[1:]  # a header line
    if not lines:
        raise InputError(source, "empty", "no numeric rows in CSV")
    try:
        return np.loadtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as e:
        raise InputError(source, "undecodable", f"CSV is not a numeric table: {e}") from e


def _is_numeric_row(line: str) -> bool:
    try:
        [float(v) for v in line.split(",")]
    except ValueError:
        return False
    return True


def load_imu(
    data: RawInput | np.ndarray,
    source: str = "<input>",
    *,
    max_bytes: int | None = None,
    limits: InputLimits | None = None,
) -> np.ndarray:
    """The decode stage: ``data`` -> [6, T] float32, T >= 2, all finite."""
    limits = resolve_limits(limits, max_bytes=max_bytes)
    if isinstance(data, np.ndarray):
        arr = data
    else:
        raw = read_bytes(data, source, limits.max_bytes)
        if raw.startswith(_NPY_MAGIC):
            arr = load_npy(raw, source, limits.max_array_values)
        else:
            arr = _parse_csv(raw, source)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(source, "wrong_type", f"IMU array of dtype {arr.dtype}")
    if arr.ndim != 2 or CHANNELS not in arr.shape:
        raise InputError(source, "wrong_shape", f"IMU must be [6, T] or [T, 6], got {arr.shape}")
    if arr.shape[0] != CHANNELS:
        arr = arr.T
    if arr.shape[1] < MIN_TIMESTEPS:
        raise InputError(source, "empty", f"{arr.shape[1]} time steps; need at least 2")
    if not np.isfinite(arr).all():
        raise InputError(source, "undecodable", "IMU values contain NaN or infinity")
    return np.ascontiguousarray(arr, dtype=np.float32)


def imu_tensor(arr: np.ndarray, timesteps: int = TIMESTEPS) -> torch.Tensor:
    """The transform stage: [6, T] -> [6, 2000] float32, linear interpolation, ends kept."""
    t = arr.shape[1]
    if t == timesteps:
        return torch.from_numpy(arr.astype(np.float32, copy=True))
    positions = np.linspace(0.0, t - 1, timesteps)
    grid = np.arange(t, dtype=np.float64)
    out = np.stack([np.interp(positions, grid, ch.astype(np.float64)) for ch in arr])
    return torch.from_numpy(out.astype(np.float32))


def preprocess_imu(
    data: RawInput | np.ndarray, source: str = "<input>", *, limits: InputLimits | None = None
) -> torch.Tensor:
    """``load_imu`` then ``imu_tensor``."""
    return imu_tensor(load_imu(data, source, limits=limits))
