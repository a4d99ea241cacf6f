"""Specification of the bind network (eq. 1) in both released variants."""

from __future__ import annotations

import pytest
import torch
from reference_llama import RefAdapter, RefArgs, randomize_

from cachebind.bind import BindNetwork, detect_variant
from cachebind.errors import WeightsError


def bridge_state(variant: str, in_dim: int = 48, dim: int = 32) -> tuple[RefAdapter, dict]:
    ref = randomize_(
        RefAdapter(RefArgs(dim=dim, n_heads=4, bind_variant=variant, bind_in_dim=in_dim)), 0
    )
    state = {k: v for k, v in ref.state_dict().items() if k.startswith("image_bind_")}
    return ref, state


@pytest.mark.parametrize("variant", ["layernorm", "rmsnorm"])
def test_bind_network_loads_released_keys_and_matches_released_bridge(variant):
    ref, state = bridge_state(variant)
    assert detect_variant(state) == variant
    net = BindNetwork.from_state_dict(state)
    assert (net.variant, net.in_dim, net.dim, net.hidden) == (variant, 48, 32, 128)
    assert set(net.state_dict()) == set(state)
    f_m = torch.nn.functional.normalize(torch.randn(5, 48), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(
            net(f_m), ref.forward_visual(f_m).squeeze(1), atol=1e-5, rtol=1e-5
        )


def test_variants_differ_in_norm_and_bias_layout():
    ln = set(BindNetwork("layernorm", in_dim=8, dim=16, hidden=64).state_dict())
    rms = set(BindNetwork("rmsnorm", in_dim=8, dim=16, hidden=64).state_dict())
    assert "image_bind_norm_2.bias" in ln and "image_bind_f3_3.bias" in ln
    assert "image_bind_norm_2.bias" not in rms and "image_bind_f3_3.bias" not in rms
    assert "image_bind_proj.bias" in rms  # the projection is biased in both
    assert len(ln) == 2 + 3 * 8 and len(rms) == 2 + 3 * 4


def test_default_dimensions_are_the_7b_ones():
    with torch.device("meta"):
        net = BindNetwork()
    assert net.image_bind_proj.weight.shape == (4096, 1024)
    assert net.image_bind_f1_1.weight.shape == (16384, 4096)
    assert net.image_bind_f2_3.weight.shape == (4096, 16384)


def test_from_state_dict_names_missing_keys_and_variant_conflicts():
    _, state = bridge_state("layernorm")
    broken = dict(state)
    del broken["image_bind_f2_2.weight"]
    with pytest.raises(WeightsError, match="image_bind_f2_2.weight"):
        BindNetwork.from_state_dict(broken)
    with pytest.raises(WeightsError, match="'layernorm' variant, configured 'rmsnorm'"):
        BindNetwork.from_state_dict(state, variant="rmsnorm")


def test_default_variant_is_the_rmsnorm_bridge_of_todays_7b():
    # The released load() builds legacy_bridge=False strictly: 7B.pth holds the RMSNorm bridge;
    # LayerNorm is 7B-beta's legacy bridge.
    from cachebind.inject.model import AdapterLlamaConfig

    with torch.device("meta"):
        net = BindNetwork()
    assert net.variant == "rmsnorm" and "image_bind_norm_1.bias" not in net.state_dict()
    assert AdapterLlamaConfig().bind_variant == "rmsnorm"
