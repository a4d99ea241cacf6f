"""Ray Train's ``TorchTrainer`` without its placement-group cleaner, which can end a healthy run.

Ray Train (2.54) starts a detached ``PlacementGroupCleaner`` beside each run's controller; it asks
Ray's state API whether the controller is still alive and removes the run's placement group --
killing every training worker -- when the answer is "not found". The state API it asks is found
the way ``ray.init()`` finds a cluster: ``RAY_ADDRESS``, else the latest cluster started on the
machine (``/tmp/ray/ray_current_cluster``, written by ``ray start``). A run on a local instance
(``cachebind train`` without ``train.ray_address``) on a machine where another Ray was started
therefore asks the other cluster, hears "not found", and its workers are destroyed mid-step
("Destroying worker since its placement group was removed"). ``tests/test_train_ray.py``
reproduces it with a second cluster running.

The cleaner only matters when a controller dies and its driver lives on; here the driver is
``run_training``, which raises when the run fails, and a placement group belongs to its job, so
Ray frees it when the driver exits. Dropping the cleaner loses nothing we rely on.
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2.torch.torch_trainer import TorchTrainer


class ContainedTorchTrainer(TorchTrainer):
    """``TorchTrainer`` whose run asks no other cluster whether it is still alive."""

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
