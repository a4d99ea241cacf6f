"""Where a model runs and in which precision: the ``auto`` rules shared by every stage."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is ``cuda`` when a GPU is present, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(
    dtype: str, device: torch.device, gpu_default: torch.dtype = torch.bfloat16
) -> torch.dtype:
    """``auto`` is ``gpu_default`` on a GPU and fp32 elsewhere (CPU half precision is slow)."""
    if dtype == "auto":
        return gpu_default if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
