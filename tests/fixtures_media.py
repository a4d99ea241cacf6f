"""Deterministic generators of test media for every modality (and broken variants of them).

Every function returns the encoded file as ``bytes`` (write it wherever a test needs a path with
``write(tmp_path / "name.ext", data)``). Same arguments, same bytes: the content comes from
seeded NumPy generators and closed-form signals, and the encoders run single-threaded.
Other test files may import these freely.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- images

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


def pattern_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8: smooth gradients plus seeded noise (compresses realistically)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 0 * x], axis=-1
    )
    noise = rng.normal(0, 20, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def image_bytes(
    fmt: str = "PNG", mode: str = "RGB", size: tuple[int, int] = (320, 240), seed: int = 0
) -> bytes:
    """An image of ``size`` (width, height) in Pillow ``mode``, encoded as ``fmt``.

    Modes: RGB, L, LA, RGBA (left half transparent), P (palette), P+transparency (palette with
    index 0 transparent), CMYK, I;16 (16-bit grey).
    """
    w, h = size
    rgb = pattern_rgb(w, h, seed)
    if mode == "RGB":
        img = Image.fromarray(rgb, "RGB")
    elif mode == "L":
        img = Image.fromarray(rgb[..., 0], "L")
    elif mode in ("LA", "RGBA"):
        alpha = np.full((h, w), 255, np.uint8)
        alpha[:, : w // 2] = 0
        base = Image.fromarray(rgb, "RGB").convert(mode[:-1])
        img = Image.merge(mode, [*base.split(), Image.fromarray(alpha, "L")])
    elif mode == "P":
        img = Image.fromarray(rgb, "RGB").quantize(colors=16, dither=Image.Dither.NONE)
    elif mode == "P+transparency":
        img = Image.fromarray(rgb, "RGB").quantize(colors=16, dither=Image.Dither.NONE)
        img.info["transparency"] = 0
    elif mode == "CMYK":
        img = Image.fromarray(rgb, "RGB").convert("CMYK")
    elif mode == "I;16":
        grey = (rgb[..., 0].astype(np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(grey)  # uint16 -> I;16
    else:
        raise ValueError(f"unknown mode {mode}")
    buf = io.BytesIO()
    kwargs: dict = {}
    if fmt == "JPEG":
        kwargs["quality"] = 90
    if fmt == "WEBP":
        kwargs["lossless"] = True
    if "transparency" in img.info:
        kwargs["transparency"] = img.info["transparency"]
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def constant_image_bytes(color: tuple[int, int, int], size=(300, 200), fmt="PNG") -> bytes:
    """A single-colour image: its model input is known in closed form."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def animated_gif_bytes(size=(64, 48), frames=3) -> bytes:
    """A GIF whose frame i is a constant grey of 40 + 80 * i."""
    imgs = [Image.new("L", size, 40 + 80 * i).convert("P") for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, "GIF", save_all=True, append_images=imgs[1:], duration=100, loop=0)
    return buf.getvalue()


def bomb_png_bytes(width: int = 10_000, height: int = 10_000) -> bytes:
    """A tiny PNG whose header declares ``width * height`` pixels (1-bit, highly compressible)."""
    buf = io.BytesIO()
    Image.new("1", (width, height), 0).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def depth_png16_bytes(size=(320, 240), near_mm: int = 500, far_mm: int = 4000) -> bytes:
    """A 16-bit depth PNG in millimetres: a left-to-right ramp from ``near_mm`` to ``far_mm``."""
    w, h = size
    ramp = np.linspace(near_mm, far_mm, w, dtype=np.float64)
    depth = np.broadcast_to(ramp, (h, w)).round().astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(depth)).save(buf, "PNG")  # uint16 -> I;16
    return buf.getvalue()


def thermal_bytes(bits: int = 8, size=(320, 256), seed: int = 0) -> bytes:
    """A greyscale thermal-like PNG (a warm blob on a cool background), 8 or 16 bits."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((x - w / 2) / (w / 6)) ** 2 + ((y - h / 2) / (h / 6)) ** 2))
    img01 = np.clip(0.2 + 0.7 * blob + rng.normal(0, 0.02, (h, w)), 0, 1)
    if bits == 8:
        img = Image.fromarray((img01 * 255).round().astype(np.uint8), "L")
    elif bits == 16:
        img = Image.fromarray((img01 * 65535).round().astype(np.uint16))
    else:
        raise ValueError("bits must be 8 or 16")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- audio

AUDIO_FORMATS = {
    # name: (container, codec, sample format the encoder takes)
    "wav": ("wav", "pcm_s16le", "s16"),
    "flac": ("flac", "flac", "s16"),
    "mp3": ("mp3", "libmp3lame", "fltp"),
    "ogg": ("ogg", "vorbis", "fltp"),  # FFmpeg's own Vorbis encoder (mono/stereo only)
    "opus": ("ogg", "libopus", "flt"),  # Ogg Opus (always 48 kHz)
}


def tone(
    duration_s: float, rate: int, channels: int = 1, freq: float = 440.0, amplitude: float = 0.5
) -> np.ndarray:
    """[channels, N] float32 sine; channel c is at ``freq * (c + 1)`` so channels differ."""
    n = int(round(duration_s * rate))
    t = np.arange(n) / rate
    return np.stack(
        [amplitude * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]
    ).astype(np.float32)


def noise(duration_s: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """[channels, N] float32 seeded white noise in [-0.5, 0.5] (a rich spectrum for fbank tests)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, size=(channels, int(round(duration_s * rate)))).astype(np.float32)


def encode_audio(samples: np.ndarray, rate: int, fmt: str = "wav") -> bytes:
    """Encode [channels, N] float samples in [-1, 1] as ``fmt`` (a key of AUDIO_FORMATS)."""
    container, codec, sample_fmt = AUDIO_FORMATS[fmt]
    channels = samples.shape[0]
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        # Opus only runs at 48 kHz: the resampler below converts to the stream's rate.
        stream = out.add_stream(codec, rate=48000 if codec == "libopus" else rate)
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}
        stream.layout = layout
        stream.codec_context.thread_count = 1
        fifo = av.AudioFifo()
        resampler = av.AudioResampler(format=sample_fmt, layout=layout, rate=stream.rate)
        if sample_fmt == "s16":
            data = (np.clip(samples, -1, 1) * 32767).round().astype(np.int16)
            frame = av.AudioFrame.from_ndarray(data.T.reshape(1, -1), format="s16", layout=layout)
        else:
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples), format="fltp", layout=layout
            )
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = Fraction(1, rate)
        for f in resampler.resample(frame) + resampler.resample(None):
            f.pts = None
            fifo.write(f)
        frame_size = stream.codec_context.frame_size or 1024
        while fifo.samples >= frame_size:
            for packet in stream.encode(fifo.read(frame_size)):
                out.mux(packet)
        rest = fifo.read()
        if rest is not None:
            for packet in stream.encode(rest):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def audio_bytes(
    fmt: str = "wav", rate: int = 16000, channels: int = 1, duration_s: float = 3.0
) -> bytes:
    """A tone of ``duration_s`` encoded as ``fmt`` at ``rate`` Hz with ``channels`` channels."""
    return encode_audio(tone(duration_s, rate, channels), rate, fmt)


# ----------------------------------------------------------------------------- video

VIDEO_FORMATS = {
    # name: (container, codec, pixel format)
    "mp4": ("mp4", "libx264", "yuv420p"),
    "mp4v": ("mp4", "mpeg4", "yuv420p"),
    "webm": ("webm", "libvpx", "yuv420p"),
    "webm-vp9": ("webm", "libvpx-vp9", "yuv420p"),
    "mov-png": ("mov", "png", "rgb24"),  # lossless: frames decode to exactly what was stored
}


def video_frame(index: int, width: int, height: int) -> np.ndarray:
    """Frame ``index``: a grey level that encodes the index (16 + 8*index, mod 240) with a bar.

    The flat grey survives lossy coding well enough to tell frames apart in tests.
    """
    level = 16 + (8 * index) % 224
    frame = np.full((height, width, 3), level, np.uint8)
    frame[: height // 8, : width // 8] = (255, 0, 0)  # a red corner marks the top-left
    return frame


def video_bytes(
    fmt: str = "mp4",
    duration_s: float = 3.0,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    bframes: int = 0,
    *,
    rotation: int | None = None,
    hflip: bool = False,
    turn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> bytes:
    """A ``duration_s`` video of ``video_frame(i)`` frames at ``fps``, size (width, height).

    ``bframes`` > 0 lets H.264 reorder frames (decode order differs from display order).
    ``rotation`` (degrees counter-clockwise) and ``hflip`` are written as the stream's display
    matrix; ``turn`` changes the pixels themselves (each frame is stored as ``turn(frame)``).
    """
    container, codec, pix_fmt = VIDEO_FORMATS[fmt]
    turn = turn or (lambda frame: frame)
    width, height = size
    stored_height, stored_width = turn(video_frame(0, width, height)).shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = stored_width, stored_height, pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip)
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast", "bf": str(bframes)}
        elif codec.startswith("libvpx"):
            stream.options = {"crf": "4", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        else:
            stream.options = {"qscale": "2"}
        for i in range(int(round(duration_s * fps))):
            pixels = np.ascontiguousarray(turn(video_frame(i, width, height)))
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


# ----------------------------------------------------------------------------- IMU


def imu_array(timesteps: int = 1000, seed: int = 0) -> np.ndarray:
    """[6, T] float32: accelerometer (x, y, z) then gyroscope (x, y, z), smooth and seeded."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 10, timesteps)
    phases = rng.uniform(0, 2 * np.pi, size=(6, 1))
    freqs = np.array([0.5, 0.7, 1.1, 1.3, 1.7, 1.9])[:, None]
    return (np.sin(2 * np.pi * freqs * t + phases) + 0.01 * rng.normal(size=(6, timesteps))).astype(
        np.float32
    )


def imu_csv_bytes(arr: np.ndarray, layout: str = "columns", header: bool = True) -> bytes:
    """``arr`` [6, T] as CSV: ``columns`` = T rows of 6 values, ``rows`` = 6 rows of T values."""
    table = arr.T if layout == "columns" else arr
    lines = []
    if header and layout == "columns":
        lines.append("acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z")
    lines += [",".join(repr(float(v)) for v in row) for row in table]
    return ("\n".join(lines) + "\n").encode()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- broken inputs


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` fraction of ``data`` (a download cut off midway)."""
    return data[: max(1, int(len(data) * keep))]


def garbage(n: int = 4096, seed: int = 0) -> bytes:
    """Seeded random bytes that are no known media format."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` and return it (for tests that need a file path)."""
    path.write_bytes(data)
    return path
