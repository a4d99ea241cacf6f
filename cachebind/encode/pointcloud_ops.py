"""Point-cloud geometry for the Point-BERT trunk: farthest point sampling and kNN grouping.

Point-BERT (Yu et al., 2022) cuts a cloud of N points into G local patches: G centres chosen by
farthest point sampling (FPS), each with its M nearest neighbours, expressed relative to its
centre. These are the "tokens" the mini-PointNet embeds. Reference: ``Group`` in
``models/pointbert/dvae.py`` and ``fps`` in ``models/pointbert/misc.py`` of Point-Bind
(ZiyuGuo99/Point-Bind_Point-LLM) and of LLaMA-Adapter's ``imagebind_LLM/ImageBind``.

Differences from the reference, on purpose:

- FPS starts from point 0, as the ``pointnet2_ops`` CUDA kernel of the original Point-BERT does;
  the pure-torch ``fps`` copied into Point-Bind starts from a *random* point
  (``torch.randint``), which makes the same cloud embed differently on every call. After the
  first centre both follow the same rule (next centre = the point farthest from all chosen ones;
  ties go to the lowest index).
- kNN uses ``torch.cdist`` + ``topk`` (the reference: ``-2·x·yᵀ + |x|² + |y|²`` + ``topk``,
  unsorted); neighbours come back sorted by distance, which the trunk cannot see (the
  mini-PointNet max-pools over each patch).
- Both run in float32 even under autocast: which points are chosen must not depend on the
  compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def farthest_point_sample(xyz: Tensor, num_samples: int, start: int = 0) -> Tensor:
    """Indices ``[B, num_samples]`` of FPS over ``xyz`` ``[B, N, 3]``, beginning at ``start``.

    Sequential over the samples (each depends on the last) but vectorised over the batch and the
    points: O(num_samples) small kernels of O(B·N) work each.
    """
    if xyz.ndim != 3:
        raise ValueError(f"expected points [B, N, C], got shape {tuple(xyz.shape)}")
    b, n, _ = xyz.shape
    if not 0 < num_samples <= n:
        raise ValueError(f"cannot pick {num_samples} of {n} points")
    if not 0 <= start < n:
        raise ValueError(f"start index {start} outside 0..{n - 1}")
    xyz = xyz.float()
    batch = torch.arange(b, device=xyz.device)
    chosen = torch.empty(b, num_samples, dtype=torch.long, device=xyz.device)
    # Squared distance from every point to its nearest chosen centre so far.
    nearest = torch.full((b, n), float("inf"), device=xyz.device)
    farthest = torch.full((b,), start, dtype=torch.long, device=xyz.device)
    for i in range(num_samples):
        chosen[:, i] = farthest
        centre = xyz[batch, farthest].unsqueeze(1)  # [B, 1, 3]
        nearest = torch.minimum(nearest, (xyz - centre).square().sum(-1))
        farthest = nearest.argmax(dim=-1)  # first maximum: the lowest index wins ties
    return chosen


def knn_indices(xyz: Tensor, centres: Tensor, k: int) -> Tensor:
    """Indices ``[B, G, k]`` of the ``k`` points of ``xyz`` ``[B, N, 3]`` nearest to each of
    ``centres`` ``[B, G, 3]``, nearest first (a centre taken from ``xyz`` is its own first
    neighbour)."""
    if k > xyz.shape[1]:
        raise ValueError(f"cannot take {k} neighbours among {xyz.shape[1]} points")
    dist = torch.cdist(centres.float(), xyz.float())  # [B, G, N]
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(xyz: Tensor, idx: Tensor) -> Tensor:
    """``xyz`` ``[B, N, C]`` at ``idx`` ``[B, *S]`` -> ``[B, *S, C]``."""
    b = xyz.shape[0]
    flat = idx.reshape(b, -1)
    out = torch.gather(xyz, 1, flat.unsqueeze(-1).expand(-1, -1, xyz.shape[-1]))
    return out.reshape(*idx.shape, xyz.shape[-1])


class Group(nn.Module):
    """FPS centres + kNN patches (reference ``Group(num_group, group_size)``; no parameters).

    ``forward(xyz [B, N, 3]) -> (neighborhood [B, G, M, 3], center [B, G, 3])`` where each patch
    is relative to its centre.
    """

    def __init__(self, num_group: int, group_size: int) -> None:
        super().__init__()
        self.num_group = num_group
        self.group_size = group_size

    def forward(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        if xyz.ndim != 3 or xyz.shape[-1] != 3:
            raise ValueError(f"expected points [B, N, 3], got shape {tuple(xyz.shape)}")
        with torch.autocast(device_type=xyz.device.type, enabled=False):
            xyz = xyz.float()
            center = gather_points(xyz, farthest_point_sample(xyz, self.num_group))
            idx = knn_indices(xyz, center, self.group_size)
            neighborhood = gather_points(xyz, idx) - center.unsqueeze(2)
        return neighborhood, center

    def extra_repr(self) -> str:
        return f"num_group={self.num_group}, group_size={self.group_size}"
