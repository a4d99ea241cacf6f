"""Reference implementations used as test oracles for ``cachebind.preprocess``.

Three reference files, each run as published and loaded without its package's ``__init__``
(neither package imports in this environment, see docs/DEPENDENCIES.md):

- ImageBind's ``imagebind/models/multimodal_preprocessors.py`` (``SimpleTokenizer``), from the
  ``imagebind-unofficial==0.1.1`` wheel (installed, or downloaded with pip);
- torchaudio's ``torchaudio/compliance/kaldi.py`` (``fbank``) and the three resampling functions of
  ``torchaudio/functional/functional.py``, from the ``torchaudio==2.5.1`` wheel (downloaded with
  pip, never installed: it would break transformers' imports).

Only trivial imports are stood in for: ``timm.layers.trunc_normal_`` (weight init, unused by the
tokenizer), ``iopath``'s ``g_pathmgr.open`` (= ``open``) and a bare ``torchaudio`` module (kaldi.py
only reaches into it for MFCC's DCT, which fbank never calls). The stand-ins live in
``sys.modules`` only while a file executes, so other tests' imports are untouched.

Wheels are cached under ``$CACHEBIND_TEST_CACHE`` (default ``~/.cache/cachebind-tests``); when a
wheel is neither installed, cached nor downloadable the calling test is skipped with the reason.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
import types
import warnings
import zipfile
from functools import cache
from pathlib import Path
from typing import Optional

import pytest
import torch

IMAGEBIND_WHEEL = ("imagebind-unofficial", "0.1.1")
TORCHAUDIO_WHEEL = ("torchaudio", "2.5.1")


def _cache_dir() -> Path:
    d = Path(os.environ.get("CACHEBIND_TEST_CACHE", Path.home() / ".cache" / "cachebind-tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@cache
def _wheel(dist: str, version: str) -> Path:
    """Path of the wheel file for ``dist==version`` (cached, else ``pip download --no-deps``)."""
    prefix = dist.replace("-", "_") + "-" + version + "-"
    for found in sorted(_cache_dir().glob(prefix + "*.whl")):
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [f"{dist}=={version}", "-d", str(_cache_dir()), "-q"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"reference wheel {dist}=={version} unavailable: {e}")
    for found in sorted(_cache_dir().glob(prefix + "*.whl")):
        return found
    pytest.skip(f"pip did not leave a wheel for {dist}=={version}")


def reference_source(dist: str, version: str, member: str) -> tuple[str, str]:
    """(source text, origin) of ``member`` (a path inside the wheel) of ``dist==version``.

    An installed distribution of that exact version is used as is; else the wheel.
    """
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        installed = importlib.metadata.distribution(dist)
        if installed.version == version:
            path = Path(str(installed.locate_file(member)))
            if path.is_file():
                return path.read_text(encoding="utf-8"), str(path)
    wheel = _wheel(dist, version)
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member).decode("utf-8"), f"{wheel}!{member}"


@contextlib.contextmanager
def _temporary_modules(modules: dict[str, types.ModuleType]):
    """Put ``modules`` in sys.modules while a reference file executes, then restore."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # importable as a package
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _exec_source(name: str, source: str, origin: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__file__ = origin
    exec(compile(source, origin, "exec"), mod.__dict__)  # noqa: S102 - the oracle is this file
    return mod


def _trunc_normal_(tensor: torch.Tensor, std: float = 1.0, **_: object) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.init.trunc_normal_(tensor, std=std)


class _PathManager:
    """iopath's g_pathmgr for local files: the tokenizer only calls ``open``."""

    @staticmethod
    def open(path, mode="r", **kwargs):
        return open(path, mode, **kwargs)  # noqa: SIM115

    @staticmethod
    def exists(path) -> bool:
        return os.path.exists(path)


@cache
def imagebind_preprocessors() -> types.ModuleType:
    """ImageBind's ``imagebind/models/multimodal_preprocessors.py`` as a module."""
    dist, version = IMAGEBIND_WHEEL
    helpers_src, helpers_origin = reference_source(dist, version, "imagebind/models/helpers.py")
    src, origin = reference_source(dist, version, "imagebind/models/multimodal_preprocessors.py")
    stand_ins = {
        "imagebind": _module("imagebind"),
        "imagebind.models": _module("imagebind.models"),
        "iopath": _module("iopath"),
        "iopath.common": _module("iopath.common"),
        "iopath.common.file_io": _module("iopath.common.file_io", g_pathmgr=_PathManager()),
    }
    if importlib.util.find_spec("timm") is None:
        stand_ins["timm"] = _module("timm")
        stand_ins["timm.layers"] = _module("timm.layers", trunc_normal_=_trunc_normal_)
    with _temporary_modules(stand_ins):
        helpers = _exec_source("imagebind.models.helpers", helpers_src, helpers_origin)
        with _temporary_modules({"imagebind.models.helpers": helpers}):
            return _exec_source("imagebind.models.multimodal_preprocessors", src, origin)


def reference_bpe_path() -> str:
    """The BPE vocabulary file shipped with the reference (not cachebind's copy)."""
    dist, version = IMAGEBIND_WHEEL
    member = "imagebind/bpe/bpe_simple_vocab_16e6.txt.gz"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        installed = importlib.metadata.distribution(dist)
        path = Path(str(installed.locate_file(member)))
        if installed.version == version and path.is_file():
            return str(path)
    out = _cache_dir() / "imagebind_bpe_simple_vocab_16e6.txt.gz"
    if not out.exists():
        with zipfile.ZipFile(_wheel(dist, version)) as zf:
            out.write_bytes(zf.read(member))
    return str(out)


@cache
def reference_tokenizer():
    """ImageBind's ``SimpleTokenizer`` with the reference's own vocabulary file."""
    return imagebind_preprocessors().SimpleTokenizer(bpe_path=reference_bpe_path())


@cache
def torchaudio_kaldi() -> types.ModuleType:
    """torchaudio 2.5.1's ``torchaudio/compliance/kaldi.py`` as a module (``fbank`` etc.)."""
    src, origin = reference_source(*TORCHAUDIO_WHEEL, "torchaudio/compliance/kaldi.py")
    with _temporary_modules({"torchaudio": _module("torchaudio")}):
        return _exec_source("torchaudio.compliance.kaldi", src, origin)


@cache
def torchaudio_resample():
    """torchaudio 2.5.1's ``torchaudio.functional.resample`` (with its two helpers).

    functional.py imports much of torchaudio, so only these three function definitions are
    taken from its syntax tree and executed, unchanged, in a namespace of their imports.
    """
    src, origin = reference_source(*TORCHAUDIO_WHEEL, "torchaudio/functional/functional.py")
    wanted = {"_get_sinc_resample_kernel", "_apply_sinc_resample_kernel", "resample"}
    tree = ast.parse(src)
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in body} == wanted, "torchaudio's resample functions moved"
    namespace = {
        "math": math,
        "torch": torch,
        "warnings": warnings,
        "Optional": Optional,
        "Tensor": torch.Tensor,
        "_CPU": torch.device("cpu"),
    }
    exec(compile(ast.Module(body=body, type_ignores=[]), origin, "exec"), namespace)  # noqa: S102
    return namespace["resample"]
