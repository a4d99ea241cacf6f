"""The reference ImageBind model code, loaded as a test oracle.

The model files of the ``imagebind-unofficial==0.1.1`` wheel (``imagebind/models/*.py``) are the
official code; the package ``__init__`` cannot be imported here (it pulls in pytorchvideo,
torchaudio and pkg_resources), and timm cannot be installed without torchvision. So we load only
the model files, behind empty ``imagebind`` / ``imagebind.models`` package modules, with minimal
stand-ins for the two timm names and the one iopath name they import. The stand-ins are removed
from ``sys.modules`` again once the files are loaded, so that other code probing for timm or
iopath is not misled.

Install: ``pip install --no-deps imagebind-unofficial==0.1.1``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import sys
import types
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

DISTRIBUTION = "imagebind-unofficial"


class _DropPath(nn.Module):
    """timm's DropPath as the oracle needs it: the tests run in eval mode, where it is identity."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_prob > 0:
            raise NotImplementedError("the oracle's DropPath stand-in only supports eval mode")
        return x


class _PathManager:
    """iopath's ``g_pathmgr`` for local files."""

    @staticmethod
    def open(path: str, mode: str = "r", **kwargs: object):  # noqa: ANN205
        return open(path, mode, **kwargs)  # noqa: SIM115


def _module(name: str, path: Path | None = None, **attrs: object) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
    if path is not None:
        mod.__path__ = [str(path)]
        mod.__spec__.submodule_search_locations = [str(path)]
    mod.__dict__.update(attrs)
    return mod


def models_dir() -> Path:
    """Where the wheel's ``imagebind/models`` files are installed."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:  # pragma: no cover - setup error
        raise RuntimeError(
            "the test oracle needs `pip install --no-deps imagebind-unofficial==0.1.1`"
        ) from exc
    return Path(dist.locate_file("imagebind/models"))


@cache
def reference() -> types.ModuleType:
    """The reference ``imagebind.models.imagebind_model`` module."""
    models = models_dir()
    stand_ins: dict[str, types.ModuleType] = {
        "imagebind": _module("imagebind", models.parent),
        "imagebind.models": _module("imagebind.models", models),
    }
    try:
        importlib.import_module("timm.layers")
    except ImportError:
        layers = _module(
            "timm.layers", DropPath=_DropPath, trunc_normal_=torch.nn.init.trunc_normal_
        )
        stand_ins["timm"] = _module("timm", Path("/nonexistent/timm"), layers=layers)
        stand_ins["timm.layers"] = layers
    try:
        importlib.import_module("iopath.common.file_io")
    except ImportError:
        file_io = _module("iopath.common.file_io", g_pathmgr=_PathManager())
        common = _module("iopath.common", Path("/nonexistent/iopath/common"), file_io=file_io)
        stand_ins["iopath"] = _module("iopath", Path("/nonexistent/iopath"), common=common)
        stand_ins["iopath.common"] = common
        stand_ins["iopath.common.file_io"] = file_io

    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        module = importlib.import_module("imagebind.models.imagebind_model")
    finally:
        # The loaded modules keep their own references; drop every name we put in sys.modules.
        loaded = [n for n in sys.modules if n == "imagebind" or n.startswith("imagebind.")]
        for name in loaded:
            sys.modules.pop(name, None)
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


def reference_model(**kwargs: object) -> nn.Module:
    """A reference ``ImageBindModel(**kwargs)`` in eval mode."""
    return reference().ImageBindModel(**kwargs).eval()


class _MetaExceptLinspace(TorchFunctionMode):
    """Like ``with torch.device("meta")``, except that ``torch.linspace`` stays on the CPU: the
    reference calls ``.item()`` on its drop-path schedule, which a meta tensor cannot answer."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        constructor = func in _device_constructors() and func is not torch.linspace
        if constructor and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def reference_huge(meta: bool = True) -> nn.Module:
    """The reference ``imagebind_huge()`` (random init), by default without allocating weights."""
    module = reference()
    if not meta:
        return module.imagebind_huge(pretrained=False).eval()
    with _MetaExceptLinspace():
        return module.imagebind_huge(pretrained=False).eval()
