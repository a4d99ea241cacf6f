"""Specification of `cachebind weights mix`: θ = β·θ_A + (1 − β)·θ_B for two checkpoints of one
architecture, refused naming the tensor when they are not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llava_checkpoints import reference_llava, write_llava_hf
from safetensors.torch import load_file, save_file

from cachebind.cli import main
from cachebind.encode.tensorfiles import read_tensors
from cachebind.errors import WeightsError
from cachebind.inject.llava_load import load_llava
from cachebind.inject.mix import mix_checkpoints


def state(seed: int) -> dict[str, torch.Tensor]:
    """A small mixed-dtype state dict (weights in fp32 and fp16, an integer counter)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(8, 4, generator=g),
        "layer.bias": torch.randn(8, generator=g).half(),
        "norm.weight": torch.randn(4, generator=g, dtype=torch.float64),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


def saved(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def exact_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a + b) / 2 rounded once to a's dtype (exact in float64 for fp16 / fp32 inputs)."""
    if not a.is_floating_point():
        return a
    return ((a.double() + b.double()) / 2).to(a.dtype)


@pytest.mark.parametrize(("beta", "expect"), [(1.0, "A"), (0.0, "B")])
def test_beta_one_returns_a_and_beta_zero_returns_b_exactly(tmp_path, capsys, beta, expect):
    a = saved(state(1), tmp_path / "a.safetensors")
    b = saved(state(2), tmp_path / "b.pth")
    out = tmp_path / "c.safetensors"
    assert main(["weights", "mix", str(a), str(b), "--beta", str(beta), "--out", str(out)]) == 0
    assert f"saved {out}" in capsys.readouterr().out
    mixed, wanted = load_file(str(out)), state(1 if expect == "A" else 2)
    assert mixed.keys() == wanted.keys()
    for name, tensor in wanted.items():
        assert mixed[name].dtype == tensor.dtype and torch.equal(mixed[name], tensor), name


def test_beta_one_half_gives_the_mean_of_every_tensor_in_its_dtype(tmp_path):
    a = saved(state(1), tmp_path / "a.pth")
    b = saved(state(2), tmp_path / "b.pth")
    mixed = read_tensors(mix_checkpoints(a, b, 0.5, tmp_path / "c.pth"))
    first, second = state(1), state(2)
    for name in first:
        assert mixed[name].dtype == first[name].dtype
        assert torch.equal(mixed[name], exact_mean(first[name], second[name])), name


def test_two_llava_directories_mix_into_a_directory_that_loads_as_llava(tmp_path):
    a = write_llava_hf(reference_llava(seed=1), tmp_path / "a")
    b = write_llava_hf(reference_llava(seed=2), tmp_path / "b", published=True)
    out = tmp_path / "mixed"
    code = main(["weights", "mix", str(a), str(b), "--beta", "0.5", "--out", str(out)])
    # B spells the tower the published way: names differ, so the mix is refused.
    assert code == 2 and not out.exists()
    b = write_llava_hf(reference_llava(seed=2), tmp_path / "b2")
    assert main(["weights", "mix", str(a), str(b), "--beta", "0.5", "--out", str(out)]) == 0
    assert (out / "config.json").read_text() == (a / "config.json").read_text()
    model = load_llava(out)
    w_a, w_b = (load_file(str(d / "model.safetensors")) for d in (a, b))
    key = "multi_modal_projector.linear_1.weight"
    want = exact_mean(w_a[key], w_b[key])
    assert torch.equal(model.multi_modal_projector.linear_1.weight.detach(), want)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda s: {k: v for k, v in s.items() if k != "layer.bias"}, "only in A (1): layer.bias"),
        (lambda s: {**s, "extra.weight": torch.zeros(2)}, "only in B (1): extra.weight"),
        (
            lambda s: {**s, "layer.weight": torch.zeros(8, 5)},
            "shapes differ (1): layer.weight (8, 4) vs (8, 5)",
        ),
        (
            lambda s: {**s, "layer.bias": s["layer.bias"].float()},
            "dtypes differ (1): layer.bias torch.float16 vs torch.float32",
        ),
        (
            lambda s: {**s, "steps": torch.tensor([8])},
            "steps: torch.int64 tensors differ and cannot be averaged",
        ),
    ],
    ids=["missing", "extra", "shape", "dtype", "integers"],
)
def test_checkpoints_that_differ_are_refused_naming_the_tensor(tmp_path, capsys, change, named):
    a = saved(state(1), tmp_path / "a.safetensors")
    b = saved(change(state(2)), tmp_path / "b.safetensors")
    out = tmp_path / "c.safetensors"
    assert main(["weights", "mix", str(a), str(b), "--beta", "0.5", "--out", str(out)]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_a_beta_outside_zero_to_one_or_an_input_as_output_is_refused(tmp_path):
    a = saved(state(1), tmp_path / "a.pth")
    b = saved(state(2), tmp_path / "b.pth")
    with pytest.raises(WeightsError, match=r"beta 1.5 is outside \[0, 1\]"):
        mix_checkpoints(a, b, 1.5, tmp_path / "c.pth")
    with pytest.raises(WeightsError, match="is an input"):
        mix_checkpoints(a, b, 0.5, a)
    assert torch.equal(read_tensors(a)["layer.weight"], state(1)["layer.weight"])


def test_a_checkpoint_that_is_not_tensors_is_refused_with_its_name(tmp_path):
    a = saved(state(1), tmp_path / "a.safetensors")
    junk = tmp_path / "b.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="cannot read safetensors file .*b.safetensors"):
        mix_checkpoints(a, junk, 0.5, tmp_path / "c.safetensors")
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    with pytest.raises(WeightsError, match="notes.txt: not a checkpoint file"):
        mix_checkpoints(a, notes, 0.5, tmp_path / "c.safetensors")
