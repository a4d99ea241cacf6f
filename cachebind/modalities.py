"""The kinds of input a query or a cache row can have, and the ImageBind trunk that encodes each."""

from __future__ import annotations

from enum import StrEnum


class Modality(StrEnum):
    IMAGE = "image"
    TEXT = "text"
    AUDIO = "audio"
    VIDEO = "video"
    DEPTH = "depth"
    THERMAL = "thermal"
    IMU = "imu"
    # Point-Bind's 3D point clouds (imagebind_w3D.pth); not one of ImageBind's own six.
    POINT = "point"

    @property
    def trunk(self) -> str:
        """The ImageBind modality key (`vision`, `text`, …) whose encoder takes this input."""
        return _TRUNK[self]


_TRUNK = {
    Modality.IMAGE: "vision",
    Modality.VIDEO: "vision",
    Modality.TEXT: "text",
    Modality.AUDIO: "audio",
    Modality.DEPTH: "depth",
    Modality.THERMAL: "thermal",
    Modality.IMU: "imu",
    Modality.POINT: "point",
}
