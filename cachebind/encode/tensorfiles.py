"""Named tensors of a checkpoint as distributed: one ``.pth`` / ``.bin`` / ``.safetensors`` file,
or a directory of them (a transformers directory, sharded or not, with its ``*.index.json``).

Reading never runs code from the file (``weights_only`` for pickles; safetensors holds no code),
and a name found in two files of one directory is refused rather than silently overwritten.
Writing goes to a temporary name first and is renamed into place, so a crash leaves no
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from cachebind.encode.weights import read_state_dict
from cachebind.errors import WeightsError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types; name the file
        raise WeightsError(f"cannot read safetensors file {path}: {exc}") from exc


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_state_dict(path)
    raise WeightsError(
        f"{path}: not a checkpoint file (expected {SAFETENSORS_SUFFIX} or one of "
        f"{', '.join(PICKLE_SUFFIXES)})"
    )


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: those its ``*.index.json`` names (sharded
    transformers layout), else every safetensors file, else every pickle file."""
    for index in sorted(directory.glob(f"*{SAFETENSORS_SUFFIX}.index.json")):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index}: not a readable weight index ({exc})") from exc
        files = []
        for name in names:
            # A hostile index must not point outside its directory.
            if not isinstance(name, str) or Path(name).name != name:
                raise WeightsError(f"{index}: weight file {name!r} is not a file of {directory}")
            files.append(directory / name)
        return files
    files = sorted(directory.glob(f"*{SAFETENSORS_SUFFIX}"))
    if not files:
        files = sorted(p for s in PICKLE_SUFFIXES for p in directory.glob(f"*{s}"))
    if not files:
        raise WeightsError(f"{directory}: no {SAFETENSORS_SUFFIX} / .pth / .bin weight files")
    return files


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every named tensor of the checkpoint file or directory ``path``, on the CPU."""
    path = Path(path)
    if path.is_dir():
        out: dict[str, torch.Tensor] = {}
        origin: dict[str, Path] = {}
        for f in checkpoint_files(path):
            if not f.is_file():
                raise WeightsError(f"{path}: weight file {f.name} is missing")
            for name, tensor in _read_file(f).items():
                if name in out:
                    raise WeightsError(
                        f"{path}: tensor {name} is in both {origin[name].name} and {f.name}"
                    )
                out[name], origin[name] = tensor, f
        return out
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    return _read_file(path)


def write_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``tensors`` to ``path`` in the format its suffix names (``.safetensors`` or a
    pickle suffix); any other path is a directory that receives ``model.safetensors``."""
    path = Path(path)
    if path.suffix not in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES):
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"model{SAFETENSORS_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import save_file

            # safetensors refuses views that share storage; each tensor is written on its own.
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        else:
            torch.save(dict(tensors), tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
