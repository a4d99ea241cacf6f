"""Video (MP4/H.264, WebM/VP8/VP9, … anything FFmpeg decodes) -> [15, 3, 2, 224, 224].

As ImageBind's ``load_and_transform_video_data`` (pytorchvideo + decord there, PyAV here):
1. duration ``D = frames / average fps`` (decord's definition: a frame count, not the container's
   declared duration);
2. 5 clips of 2 s at starts ``i * max(D - 2, 0) / 5`` (``clips.py``); a clip holds frames
   ``ceil(fps * start) .. ceil(fps * end) - 1``, cut at the last frame;
3. 2 frames per clip: pytorchvideo's ``UniformTemporalSubsample(2)`` picks indices
   ``linspace(0, n - 1, 2)`` of the clip's ``n`` frames, i.e. its **first and last** frames;
4. RGB / 255, ``ShortSideScale(224)``: bilinear ``interpolate`` (no antialias) to short side 224,
   long side ``floor(224 * long / short)``; CLIP mean/std normalisation;
5. ``SpatialCrop(224, 3)``: for each clip three 224 crops along the long side: left, centre,
   right (landscape) or top, centre, bottom (portrait); centre offset ``ceil((L - 224) / 2)``.
Order: clip-major, crop-minor -> 15 = 5 clips x 3 crops, each [C=3, T=2, 224, 224].

Frames are turned by the stream's display matrix first (``display.py``; a portrait phone video
is encoded upright), unless ``input.honour_pixel_metadata`` is off.

Videos shorter than 10 s give overlapping clips; shorter than 2 s, five identical clips of the
whole video (first and last frame). A single-frame video repeats that frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import av
import numpy as np
import torch

from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.preprocess.clips import clip_timepoints
from cachebind.preprocess.common import (
    DEFAULT_LIMITS,
    IMAGE_SIZE,
    RawInput,
    as_stream,
    over_limit,
    read_bytes,
    resolve_limits,
)
from cachebind.preprocess.display import display_matrix, orient
from cachebind.preprocess.image import CLIP_MEAN, CLIP_STD

CLIP_DURATION = 2
CLIPS_PER_VIDEO = 5
FRAMES_PER_CLIP = 2
NUM_CROPS = 3
MAX_FRAMES = DEFAULT_LIMITS.max_video_frames
"""``input.max_video_frames``: videos with more frames are refused as ``too_large``."""
MAX_PIXELS_PER_FRAME = DEFAULT_LIMITS.max_video_frame_pixels
"""``input.max_video_frame_pixels``: larger frames are refused from the stream's header."""
DECODE_THREADS = 2
"""Codec threads per decode: each frame thread holds frames in flight (memory), and the service
runs several decodes at once."""
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError)


@dataclass(frozen=True)
class VideoClips:
    """The decode stage's output: ``frames`` [clips, T, H, W, 3] uint8 RGB, and where they came
    from (``indices`` [clips, T] frame numbers, ``num_frames``, ``fps``)."""

    frames: np.ndarray
    indices: list[list[int]]
    num_frames: int
    fps: float


def clip_frame_indices(
    num_frames: int, fps: float, clips: int = CLIPS_PER_VIDEO, per_clip: int = FRAMES_PER_CLIP
) -> list[list[int]]:
    """The frame numbers ImageBind samples: ``per_clip`` per clip, ``clips`` clips."""
    duration = num_frames / fps
    out = []
    for start, end in clip_timepoints(duration, CLIP_DURATION, clips):
        first = math.ceil(fps * start)
        stop = min(math.ceil(fps * end), num_frames)
        n = stop - first
        if n <= 0:
            # No frame starts inside the clip (a slideshow-like rate, under one frame per clip):
            # the frame on screen at the clip's start stands for it. pytorchvideo would return
            # an empty clip here and ImageBind fail on it.
            shown = min(math.floor(fps * start), num_frames - 1)
            out.append([shown] * per_clip)
            continue
        picks = torch.linspace(0, n - 1, per_clip).clamp(0, n - 1).long().tolist()
        out.append([first + p for p in picks])
    return out


def _open(raw: bytes, source: str, limits: InputLimits):
    """The container, its first video stream's header checked against the budgets."""
    try:
        container = av.open(as_stream(raw), mode="r")
    except _AV_ERRORS as e:
        raise InputError(source, "undecodable", f"not a media file FFmpeg can open: {e}") from e
    try:
        if not container.streams.video:
            raise InputError(source, "unsupported_format", "no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:
            raise InputError(source, "unsupported_format", "no decoder for the video codec")
        width, height = ctx.width or 0, ctx.height or 0
        _check_frame_size(width, height, source, limits)
        _check_frame_count(stream.frames or 0, width * height, source, limits, "declared ")
    except BaseException:
        container.close()
        raise
    return container


def _check_frame_size(width: int, height: int, source: str, limits: InputLimits) -> None:
    if width * height > limits.max_video_frame_pixels:
        raise over_limit(
            source,
            "too_large",
            f"{width}x{height} frames: pixels",
            width * height,
            "max_video_frame_pixels",
            limits.max_video_frame_pixels,
        )


def _check_frame_count(
    frames: int, pixels: int, source: str, limits: InputLimits, how: str = ""
) -> None:
    if frames > limits.max_video_frames:
        raise over_limit(
            source, "too_large", f"{how}frames", frames, "max_video_frames", limits.max_video_frames
        )
    if frames * pixels > limits.max_video_pixels:
        raise over_limit(
            source,
            "too_large",
            f"{how}frames x width x height",
            frames * pixels,
            "max_video_pixels",
            limits.max_video_pixels,
        )


def _count_packets(raw: bytes, source: str, limits: InputLimits) -> int:
    """Frames in the first video stream, counted from its packets (no decoding)."""
    with _open(raw, source, limits) as container:
        stream = container.streams.video[0]
        pixels = (stream.codec_context.width or 0) * (stream.codec_context.height or 0)
        count = 0
        try:
            for packet in container.demux(stream):
                if packet.size > 0:
                    count += 1
                    if count > limits.max_video_frames:
                        _check_frame_count(count, pixels, source, limits)
            _check_frame_count(count, pixels, source, limits)
            return count
        except InputError:
            raise  # our own refusals (InputError is a ValueError) pass through
        except _AV_ERRORS as e:
            raise InputError(source, "undecodable", f"video demuxing failed: {e}") from e


def _decode(
    raw: bytes, source: str, wanted: set[int], limits: InputLimits
) -> tuple[dict[int, np.ndarray], int, float]:
    """Decode every frame, keeping RGB arrays only for ``wanted`` indices; (kept, count, fps).

    Frame by frame: only the wanted frames are converted (at most 10), and each decoded frame's
    size and the running frames x pixels total are checked against the budgets (a stream may
    change size mid-way, whatever its header said)."""
    kept: dict[int, np.ndarray] = {}
    count = 0
    decoded_pixels = 0
    with _open(raw, source, limits) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = DECODE_THREADS
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        try:
            for frame in container.decode(stream):
                _check_frame_size(frame.width, frame.height, source, limits)
                if count in wanted:
                    pixels = frame.to_ndarray(format="rgb24")
                    if limits.honour_pixel_metadata:
                        pixels = orient(pixels, display_matrix(frame))
                    kept[count] = pixels
                count += 1
                decoded_pixels += frame.width * frame.height
                if count > limits.max_video_frames or decoded_pixels > limits.max_video_pixels:
                    _check_frame_count(count, frame.width * frame.height, source, limits)
                    raise over_limit(
                        source,
                        "too_large",
                        "decoded pixels",
                        decoded_pixels,
                        "max_video_pixels",
                        limits.max_video_pixels,
                    )
        except InputError:
            raise  # our own refusals (InputError is a ValueError) pass through
        except _AV_ERRORS as e:
            raise InputError(source, "undecodable", f"video decoding failed: {e}") from e
    return kept, count, fps


def load_video(
    data: RawInput,
    source: str = "<input>",
    *,
    max_bytes: int | None = None,
    limits: InputLimits | None = None,
) -> VideoClips:
    """The decode stage: ``data`` -> the 5 x 2 sampled RGB frames (uint8, native size).

    Within ``input.max_video_*``: frame size and declared frame count from the header, packet
    count from demuxing (no decoding), then every decoded frame again."""
    limits = resolve_limits(limits, max_bytes=max_bytes)
    raw = read_bytes(data, source, limits.max_bytes)
    # Packet count = frame count for ordinary streams; if decoding disagrees, select again
    # with the decoded count (what decord's frame index would say).
    estimate = _count_packets(raw, source, limits)
    kept: dict[int, np.ndarray] = {}
    count, fps = estimate, 0.0
    for _attempt in range(2):
        if count <= 0:
            break
        probe_fps = fps or _stream_fps(raw, source, limits)
        if probe_fps <= 0:
            raise InputError(source, "undecodable", "video stream has no frame rate")
        indices = clip_frame_indices(count, probe_fps)
        wanted = {i for clip in indices for i in clip}
        kept, decoded, fps = _decode(raw, source, wanted, limits)
        if decoded == count and wanted <= kept.keys():
            frames = np.stack([np.stack([kept[i] for i in clip]) for clip in indices])
            return VideoClips(frames, indices, count, fps)
        count = decoded
    raise InputError(source, "empty", "no decodable video frames")


def _stream_fps(raw: bytes, source: str, limits: InputLimits) -> float:
    with _open(raw, source, limits) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return float(rate) if rate else 0.0


def short_side_scale(x: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """pytorchvideo's ``short_side_scale`` on [C, T, H, W] float: bilinear, no antialias."""
    _, _, h, w = x.shape
    if w < h:
        new_h, new_w = int(math.floor(h / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(w / h * size))
    return torch.nn.functional.interpolate(
        x, size=(new_h, new_w), mode="bilinear", align_corners=False
    )


def uniform_crop(x: torch.Tensor, size: int, spatial_idx: int) -> torch.Tensor:
    """Crop ``spatial_idx`` (0, 1, 2) of [C, T, H, W] along its long side (ImageBind's rule)."""
    h, w = x.shape[-2:]
    y0 = int(math.ceil((h - size) / 2))
    x0 = int(math.ceil((w - size) / 2))
    if h > w:
        y0 = {0: 0, 1: y0, 2: h - size}[spatial_idx]
    else:
        x0 = {0: 0, 1: x0, 2: w - size}[spatial_idx]
    return x[..., y0 : y0 + size, x0 : x0 + size]


def video_tensor(clips: VideoClips) -> torch.Tensor:
    """The transform stage: sampled frames -> [15, 3, 2, 224, 224] float32."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None, None]
    out: list[torch.Tensor] = []
    for clip in clips.frames:  # [T, H, W, 3] uint8
        # One frame at a time: bilinear scaling treats each frame and channel on its own, so
        # this is the same as scaling the [C, T, H, W] clip, with one native frame in float.
        scaled = []
        for frame in clip:
            x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[:, None]
            scaled.append(short_side_scale(x.to(torch.float32) / 255.0))
        x = torch.cat(scaled, dim=1)
        x = (x - mean) / std
        out.extend(uniform_crop(x, IMAGE_SIZE, i) for i in range(NUM_CROPS))
    return torch.stack(out)


def preprocess_video(
    data: RawInput, source: str = "<input>", *, limits: InputLimits | None = None
) -> torch.Tensor:
    """``load_video`` then ``video_tensor``."""
    return video_tensor(load_video(data, source, limits=limits))
