"""Builders of hostile inputs, generated at test time and small on disk: what an attacker with
one user key, or a messy collection, sends to the preprocessing entry points.

Every builder streams what it compresses, so building a bomb never costs the memory that
decoding it naively would.
"""

from __future__ import annotations

import io
import struct
import wave
import zipfile
import zlib

import av
import numpy as np
import torch

# --------------------------------------------------------------------------- audio


def wav(channels: int, samples: int = 500, rate: int = 16000, seed: int = 0) -> bytes:
    """16-bit PCM WAV of low noise. 8 channels x 500 samples: 8,044 bytes; the issue's 1,068-byte
    crasher is the same layout with 33 samples."""
    rng = np.random.default_rng(seed)
    pcm = rng.integers(-1000, 1000, samples * channels).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}.get(channels, f"{channels}c")


def encoded_audio(
    codec: str, fmt: str, channels: int, seconds: float = 0.5, rate: int = 48000
) -> bytes:
    """A short tone encoded by FFmpeg's ``codec`` in container ``fmt`` (e.g. flac/flac,
    libvorbis/ogg, libopus/ogg, aac/adts): decoders of these emit planar frames."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=_layout(channels))
        n = int(seconds * rate)
        t = np.arange(n) / rate
        tone = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        frame_size = stream.codec_context.frame_size or 1024
        pts = 0
        for start in range(0, n, frame_size):
            chunk = np.repeat(tone[None, start : start + frame_size], channels, axis=0)
            fmt_name = stream.codec_context.format.name
            if fmt_name == "s16":
                arr = (chunk.T.reshape(1, -1) * 32767).astype(np.int16)
            elif fmt_name == "s16p":
                arr = (chunk * 32767).astype(np.int16)
            elif fmt_name == "flt":
                arr = np.ascontiguousarray(chunk.T.reshape(1, -1))
            else:  # fltp
                arr = np.ascontiguousarray(chunk)
            frame = av.AudioFrame.from_ndarray(arr, format=fmt_name, layout=stream.layout)
            frame.sample_rate = rate
            frame.pts = pts
            pts += arr.shape[-1] if fmt_name.endswith("p") else arr.shape[-1] // channels
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def flac_declaring(seconds: float, channels: int = 6, rate: int = 192000) -> bytes:
    """A tiny FLAC whose STREAMINFO declares ``seconds`` of audio at ``rate`` x ``channels``
    (the issue's 85 KB 240 s / 6 ch / 192 kHz file holds exactly that in silence)."""
    raw = bytearray(encoded_audio("flac", "flac", channels, seconds=0.05, rate=rate))
    # STREAMINFO follows "fLaC" + a 4-byte block header; total samples are the low 36 bits of
    # the 8 bytes at offset 10 of the block (after rate 20 bits, channels 3, bits 5).
    pos = 4 + 4 + 10
    packed = int.from_bytes(raw[pos : pos + 8], "big")
    packed = (packed & ~((1 << 36) - 1)) | int(seconds * rate)
    raw[pos : pos + 8] = packed.to_bytes(8, "big")
    return bytes(raw)


# --------------------------------------------------------------------------- images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, color_type: int = 6, fill: int = 0) -> bytes:
    """An 8-bit PNG of one flat value (color type 6 = RGBA, 2 = RGB, 0 = grey), deflated row by
    row: a 9000x9000 RGBA image (324 MB of pixels) is a few hundred KB."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" + bytes([fill]) * (width * channels)
    deflate = zlib.compressobj(9)
    parts = []
    rows_per_call = max(1, (1 << 22) // len(row))
    block = row * rows_per_call
    left = height
    while left > 0:
        n = min(left, rows_per_call)
        parts.append(deflate.compress(block if n == rows_per_call else row * n))
        left -= n
    parts.append(deflate.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- video


def h264(width: int, height: int, frames: int = 2, fps: int = 10) -> bytes:
    """An MP4 of flat grey H.264 frames: a 4096x4096 pair is ~50 KB."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        grey = np.full((height, width, 3), 128, np.uint8)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(grey, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


# --------------------------------------------------------------------------- containers


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """An ``.npy`` header (format 1.0) declaring ``shape``, and no data."""
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}"
    header = header.encode("latin-1")
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _zip_stream(members: dict[str, tuple[bytes, int]], lie_sizes: bool = False) -> bytes:
    """A deflated zip whose member ``name`` is ``head`` followed by ``zeros`` zero bytes, built
    by streaming (``zeros`` may be gigabytes). ``lie_sizes`` patches every directory entry to
    declare 1 KB, so only inflating can tell."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, (head, zeros) in members.items():
            with archive.open(name, "w", force_zip64=True) as member:
                member.write(head)
                block = bytes(1 << 20)
                left = zeros
                while left > 0:
                    member.write(block[: min(left, len(block))])
                    left -= len(block)
    raw = out.getvalue()
    if lie_sizes:
        raw = _declare_small(raw)
    return raw


def _declare_small(raw: bytes) -> bytes:
    """Rewrite each central-directory entry's uncompressed size (zip64 extra) to 1024."""
    out = bytearray(raw)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        name_len, extra_len = struct.unpack("<HH", out[pos + 28 : pos + 32])
        comment_len = struct.unpack("<H", out[pos + 32 : pos + 34])[0]
        extra = pos + 46 + name_len
        end = extra + extra_len
        while extra + 4 <= end:
            tag, size = struct.unpack("<HH", out[extra : extra + 4])
            if tag == 0x0001 and size >= 8:
                out[extra + 4 : extra + 12] = struct.pack("<Q", 1024)
            extra += 4 + size
        if struct.unpack("<I", out[pos + 24 : pos + 28])[0] != 0xFFFFFFFF:
            out[pos + 24 : pos + 28] = struct.pack("<I", 1024)
        pos = out.find(b"PK\x01\x02", pos + 46 + name_len + extra_len + comment_len)
    return bytes(out)


def torch_points_bomb(points: int = 40_000_000, lie_sizes: bool = False) -> bytes:
    """A ``torch.save`` file of a ``[points, 3]`` float32 zero tensor, deflated (the issue's
    933 KB file of 40M points), built without ever holding the tensor."""
    small = io.BytesIO()
    torch.save(torch.zeros(1, 3), small)
    members: dict[str, tuple[bytes, int]] = {}
    with zipfile.ZipFile(io.BytesIO(small.getvalue())) as archive:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith("data.pkl"):
                members[info.filename] = (_pickle_with_rows(data, points), 0)
            elif info.filename.endswith("/data/0"):
                members[info.filename] = (b"", points * 3 * 4)
            else:
                members[info.filename] = (data, 0)
    return _zip_stream(members, lie_sizes)


def _pickle_with_rows(pickle: bytes, rows: int) -> bytes:
    """torch's data.pkl for a [1, 3] tensor of storage size 3 -> [rows, 3] of size 3 * rows.

    The pickle stores the storage's element count and the shape as small ints (BININT1 'K');
    they are re-encoded as 4-byte BININT ('J')."""
    assert b"cpuq\x04K\x03" in pickle, "unexpected torch pickle layout"
    # The first 'K\x03' is the storage numel (3), then shape (1, 3): K\x01 K\x03; stride (3, 1).
    out = pickle.replace(b"K\x03", b"J" + struct.pack("<i", 3 * rows), 1)
    return out.replace(b"K\x01K\x03", b"J" + struct.pack("<i", rows) + b"K\x03", 1)


def npz_points_bomb(points: int = 40_000_000, lie_sizes: bool = False) -> bytes:
    """An ``np.savez_compressed``-style archive of ``points.npy``: [points, 3] float32 zeros."""
    head = npy_header((points, 3))
    return _zip_stream({"points.npy": (head, points * 3 * 4)}, lie_sizes)


def strided_tensor_pt(rows: int = 10**9) -> bytes:
    """A .pt whose tensor is an expanded view: one stored element claiming ``rows`` x 3."""
    out = io.BytesIO()
    torch.save(torch.zeros(1, 1).expand(rows, 3), out)
    return out.getvalue()


def pcd(count_z: str = "1", points: str = "1", data: str = "binary") -> bytes:
    """A one-point PCD whose header says ``COUNT 1 1 <count_z>`` and ``POINTS <points>``."""
    header = (
        "# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\n"
        f"COUNT 1 1 {count_z}\nWIDTH 1\nHEIGHT 1\nPOINTS {points}\nDATA {data}\n"
    ).encode()
    body = b"1 2 3\n" if data == "ascii" else np.array([1, 2, 3], "<f4").tobytes()
    return header + body


def ply_declaring(vertices: int) -> bytes:
    """A binary PLY header declaring ``vertices`` float x, y, z vertices, with one present."""
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {vertices}\nproperty float x\nproperty float y\nproperty float z\n"
        "end_header\n"
    ).encode()
    return header + np.array([1, 2, 3], "<f4").tobytes()


def zip_with_member_at(offset: int) -> bytes:
    """A one-member zip whose directory puts the member's local header at ``offset`` (a zip64
    extra field, so up to 2^64): zipfile's seek overflowed there (found by the fuzzer)."""
    name, data = b"points.npy", b"x"
    crc = zlib.crc32(data)
    local = struct.pack("<I5H3I2H", 0x04034B50, 20, 0, 0, 0, 0, crc, 1, 1, len(name), 0)
    local += name + data
    extra = struct.pack("<HHQ", 1, 8, offset)
    central = struct.pack(
        "<I6H3I5H2I",
        0x02014B50,
        45,
        45,
        0,
        0,
        0,
        0,
        crc,
        1,
        1,
        len(name),
        len(extra),
        0,
        0,
        0,
        0,
        0xFFFFFFFF,
    )
    central += name + extra
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end
