"""Mixing two checkpoints of one architecture: θ = β·θ_A + (1 − β)·θ_B, tensor by tensor.

SPHINX mixes the weights of two LLMs fine-tuned from one base on different data (real and
synthetic), which keeps what each learned without training on both. The mix is only defined
between checkpoints of one architecture: the same tensor names, shapes and dtypes; anything else
is refused naming the first tensors that differ, never mixed partially.

Floating-point tensors are mixed in float32 (float64 stays float64) and written back in their
dtype; β = 1 and β = 0 return A and B bit for bit (the products are not taken, so an infinity in
the other checkpoint cannot turn into NaN). Integer and boolean tensors (step counters, masks)
cannot be averaged: they must be equal in both, and are kept.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from cachebind.encode.tensorfiles import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIX,
    read_tensors,
    write_tensors,
)
from cachebind.errors import WeightsError

SHOWN = 10  # names listed in a refusal before "… (n more)"


def _names(items: list[str]) -> str:
    more = f", … ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def check_same_architecture(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Raise ``WeightsError`` naming the tensors whose names, shapes or dtypes differ."""
    problems = []
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    if only_a:
        problems.append(f"only in A ({len(only_a)}): {_names(only_a)}")
    if only_b:
        problems.append(f"only in B ({len(only_b)}): {_names(only_b)}")
    common = sorted(set(a) & set(b))
    shapes = [
        f"{k} {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        for k in common
        if a[k].shape != b[k].shape
    ]
    dtypes = [f"{k} {a[k].dtype} vs {b[k].dtype}" for k in common if a[k].dtype != b[k].dtype]
    if shapes:
        problems.append(f"shapes differ ({len(shapes)}): {_names(shapes)}")
    if dtypes:
        problems.append(f"dtypes differ ({len(dtypes)}): {_names(dtypes)}")
    if problems:
        raise WeightsError("not two checkpoints of one architecture: " + "; ".join(problems))


def mix_tensor(name: str, a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    """β·a + (1 − β)·b in ``a``'s dtype (see the module docstring for the exact cases)."""
    if beta == 1.0:
        return a.clone()
    if beta == 0.0:
        return b.clone()
    if not (a.is_floating_point() or a.is_complex()):
        if not torch.equal(a, b):
            raise WeightsError(f"{name}: {a.dtype} tensors differ and cannot be averaged")
        return a.clone()
    wide = torch.float64 if a.dtype in (torch.float64, torch.complex128) else torch.float32
    if a.is_complex():
        wide = torch.complex128 if wide is torch.float64 else torch.complex64
    mixed = beta * a.to(wide) + (1.0 - beta) * b.to(wide)
    return mixed.to(a.dtype)


def mix_states(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], beta: float
) -> dict[str, torch.Tensor]:
    """Every tensor of ``a`` and ``b`` mixed with weight ``beta`` on ``a`` (in ``a``'s order)."""
    if not 0.0 <= beta <= 1.0:
        raise WeightsError(f"beta {beta} is outside [0, 1]")
    check_same_architecture(a, b)
    return {k: mix_tensor(k, a[k], b[k], beta) for k in a}


def _is_directory_target(path: Path) -> bool:
    return path.suffix not in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)


def mix_checkpoints(a: str | Path, b: str | Path, beta: float, out: str | Path) -> Path:
    """Write the mix of checkpoints ``a`` and ``b`` (files or directories) to ``out``.

    ``out`` ending in ``.safetensors`` / ``.pth`` is one file of that format; any other path is
    a directory holding ``model.safetensors`` and, when ``a`` is a directory, A's other files
    (``config.json``, tokenizer …) so that it loads like A. Returns the weights file written.
    """
    a, b, out = Path(a), Path(b), Path(out)
    for source in (a, b):
        if out.resolve() == source.resolve():
            raise WeightsError(f"--out {out} is an input; write the mix elsewhere")
    mixed = mix_states(read_tensors(a), read_tensors(b), beta)
    written = write_tensors(mixed, out)
    if a.is_dir() and _is_directory_target(out):
        for f in sorted(a.iterdir()):
            weights = f.suffix in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
            if f.is_file() and not weights and not f.name.endswith(".index.json"):
                shutil.copyfile(f, out / f.name)
    return written
