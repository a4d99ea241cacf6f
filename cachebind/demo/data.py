"""A small, deterministic sample collection for the demo and the tests.

Images are coloured shapes on coloured backgrounds with captions that say what they show, written
in img2dataset's webdataset layout (``00000.tar`` holding ``<key>.jpg/.txt/.json`` plus a
``00000.parquet`` and ``00000_stats.json`` per shard), so the embedding job reads them exactly as
it reads a real CC3M download. Audio clips and a short video are written for queries.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "stripes")
SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Collection:
    """Where the generated files are."""

    root: Path
    shards: list[Path]
    audio: dict[str, Path]
    video: Path
    query_image: Path
    point_cloud: Path

    @property
    def webdataset_spec(self) -> str:
        return str(self.root / "images")


# The side of the box each shape fills, as a fraction of the image. A random-weight encoder (the
# demo has no checkpoint) sees colour mixtures, hardly outlines: drawn at one size, the five shapes
# differ by 0.2% of the features' variance and stage 1 learns them slowly and seed by seed. Drawn
# at sizes that give each its own share of object colour (a small square, a large circle), the
# shape's part of a (colour, background) setting's features doubles, and the demo learns it in a
# minute (BENCHMARKS.md, "Training means something").
SHAPE_BOX = {"circle": 0.92, "square": 0.5, "triangle": 0.9, "star": 0.9, "stripes": 0.9}


def draw(
    shape: str, colour: str, background: str, size: int, rng: np.random.Generator
) -> Image.Image:
    """``shape`` in ``colour`` on ``background``, centred (shifted a little), with pixel noise."""
    img = Image.new("RGB", (size, size), COLOURS[background])
    d = ImageDraw.Draw(img)
    c = COLOURS[colour]
    w = size * SHAPE_BOX[shape]
    x0 = (size - w) / 2 + rng.uniform(-0.03, 0.03) * size
    y0 = (size - w) / 2
    if shape == "circle":
        d.ellipse([x0, y0, x0 + w, y0 + w], fill=c)
    elif shape == "square":
        d.rectangle([x0 + 0.1 * w, y0 + 0.1 * w, x0 + 0.9 * w, y0 + 0.9 * w], fill=c)
    elif shape == "triangle":
        d.polygon([(x0 + w / 2, y0), (x0, y0 + w), (x0 + w, y0 + w)], fill=c)
    elif shape == "star":
        points = []
        for i in range(10):
            r = w * (0.5 if i % 2 == 0 else 0.2)
            a = math.pi / 2 + i * math.pi / 5
            points.append((x0 + w / 2 + r * math.cos(a), y0 + w / 2 - r * math.sin(a)))
        d.polygon(points, fill=c)
    else:  # stripes
        for x in range(int(x0), int(x0 + w), max(3, int(w) // 4)):
            d.rectangle([x, y0, x + max(1, int(w) // 8), y0 + w], fill=c)
    noise = rng.normal(0, 6, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def write_images(out: Path, count: int = 240, per_shard: int = 100, seed: int = 0) -> list[Path]:
    """Write ``count`` captioned images as img2dataset webdataset shards under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    shards: list[Path] = []
    for shard_no, start in enumerate(range(0, count, per_shard)):
        tar_path = out / f"{shard_no:05d}.tar"
        rows = []
        with tarfile.open(tar_path, "w") as tar:
            for i in range(start, min(start + per_shard, count)):
                key = f"{shard_no:05d}{i - start:04d}"
                shape = SHAPES[i % len(SHAPES)]
                colour = colours[(i // len(SHAPES)) % len(colours)]
                background = colours[(i // len(SHAPES) + 1 + i % 3) % len(colours)]
                size = int(rng.choice([160, 224, 256, 320]))
                img = draw(shape, colour, background, size, rng)
                article = "an" if colour[0] in "aeiou" else "a"
                caption = f"{article} {colour} {shape} on a {background} background"
                url = f"https://example.invalid/demo/{key}.jpg"
                meta = {
                    "url": url,
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": size,
                    "height": size,
                    "original_width": size,
                    "original_height": size,
                }
                _add(tar, f"{key}.jpg", _jpeg(img))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), out / f"{shard_no:05d}.parquet")
        stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0}
        (out / f"{shard_no:05d}_stats.json").write_text(json.dumps(stats))
        shards.append(tar_path)
    return shards


def tone(frequency: float, seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    wave = 0.5 * np.sin(2 * math.pi * frequency * t) + 0.02 * rng.normal(size=t.shape)
    return wave.astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """A mono 16-bit PCM WAV, written with PyAV so the encoder path is the real one."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_audio(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    chirp_t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    chirp = (0.5 * np.sin(2 * math.pi * (200 + 300 * chirp_t) * chirp_t)).astype(np.float32)
    clips = {
        "low_tone": tone(220.0, 3.0, seed=1),
        "high_tone": tone(1760.0, 3.0, seed=2),
        "chirp": chirp,
    }
    return {name: write_wav(out / f"{name}.wav", wave) for name, wave in clips.items()}


def write_video(path: Path, seconds: float = 4.0, fps: int = 10, size: int = 240) -> Path:
    """A short MP4 of a red square moving across a blue background."""
    rng = np.random.default_rng(3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            img = Image.new("RGB", (size, size), COLOURS["blue"])
            x = int(i * (size - 80) / (seconds * fps))
            ImageDraw.Draw(img).rectangle([x, 80, x + 80, 160], fill=COLOURS["red"])
            arr = np.clip(np.asarray(img, np.float32) + rng.normal(0, 4, (size, size, 3)), 0, 255)
            frame = av.VideoFrame.from_ndarray(arr.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_point_cloud(path: Path, points: int = 4096, seed: int = 0) -> Path:
    """A sphere of points as an ASCII PLY file (what scanners and Point-Bind's users have)."""
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(points, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    header = (
        f"ply\nformat ascii 1.0\nelement vertex {points}\n"
        "property float x\nproperty float y\nproperty float z\nend_header\n"
    )
    body = "\n".join(f"{x:.5f} {y:.5f} {z:.5f}" for x, y, z in xyz)
    path.write_text(header + body + "\n")
    return path


def write_collection(root: Path, count: int = 240, seed: int = 0) -> Collection:
    """Write the whole demo collection under ``root`` (deterministic for a given seed)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = write_images(root / "images", count=count, seed=seed)
    audio = write_audio(root / "audio")
    video = write_video(root / "video.mp4")
    query = root / "query_green_circle.png"
    draw("circle", "green", "white", 224, np.random.default_rng(seed + 99)).save(query)
    cloud = write_point_cloud(root / "sphere.ply", seed=seed)
    return Collection(
        root=root, shards=shards, audio=audio, video=video, query_image=query, point_cloud=cloud
    )
