"""Fuzz every preprocessing entry point with mutated seed files, crashes included (not in CI).

    .venv/bin/pip install hypothesis==6.170.17     # the [fuzz] extra, only for this script
    PYTHONPATH=. python scripts/fuzz_preprocess.py --seconds 480 --out /tmp/fuzz-findings

Seeds are small valid inputs of each modality (the test suite's own builders, ``tests/``);
hypothesis draws a seed and a list of mutations (bit flips, "interesting" integers written over
header fields, inserted, deleted or duplicated runs, truncation). Each case runs in a fork-server
worker: the parent imports everything once and forks a worker that handles cases until it dies,
under an address-space cap (``RLIMIT_AS``) and a per-case wall-clock deadline. A case is a
finding when it does anything but return a finite tensor of the documented shape or raise
``InputError``: another exception (a 5xx in the service), a signal (a native crash), a deadline
overrun or a MemoryError. Each distinct finding is saved under ``--out`` with the input that
caused it, and the summary is printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000]
INTERESTING += [0xFFFFFFFF, 2**40, 2**63 - 1]


# --------------------------------------------------------------------------- seeds


def seeds() -> dict[str, list[bytes]]:
    """Small valid inputs per modality, from the tests' builders."""
    import fixtures_media as fm
    import hostile_media as hm
    import test_preprocess_pointcloud as tpc

    cloud = tpc.cloud(300)
    npz = io.BytesIO()
    np.savez_compressed(npz, points=cloud)
    return {
        "image": [fm.image_bytes(f, "RGB", size=(48, 40)) for f in fm.IMAGE_FORMATS]
        + [fm.image_bytes("PNG", "RGBA", size=(40, 30)), fm.image_bytes("PNG", "P", size=(40, 30))],
        "audio": [fm.audio_bytes(f, 22050, 1, 0.3) for f in ("wav", "flac", "mp3")]
        + [fm.audio_bytes("ogg", 22050, 2, 0.3), hm.wav(8, 800), hm.wav(2, 800, 8001)],
        "video": [fm.video_bytes(f, 0.5, 8, (32, 24)) for f in ("mp4", "webm", "mp4v")],
        "depth": [fm.depth_png16_bytes((40, 30))],
        "thermal": [fm.thermal_bytes(8, (40, 32)), fm.thermal_bytes(16, (40, 32))],
        "imu": [fm.npy_bytes(fm.imu_array(40)), fm.imu_csv_bytes(fm.imu_array(40))],
        "point": [build(cloud) for build in tpc.FORMATS.values()] + [npz.getvalue()],
        "text": [b"a dog on a beach", "ça va &amp; 日本語 <|endoftext|>".encode()],
    }


# --------------------------------------------------------------------------- mutations


@st.composite
def mutated(draw, pool: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "int", "insert", "delete", "dup", "truncate", "byte"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif op == "int":
            value = draw(st.sampled_from(INTERESTING))
            width = draw(st.sampled_from([1, 2, 4, 8]))
            order = draw(st.sampled_from(["little", "big"]))
            raw = (value % (1 << (8 * width))).to_bytes(width, order)
            data[pos : pos + width] = raw
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 256))]
        elif op == "dup":
            chunk = data[pos : pos + draw(st.integers(1, 512))]
            data[pos:pos] = chunk * draw(st.integers(1, 16))
        else:
            del data[pos:]
    return bytes(data)


# --------------------------------------------------------------------------- fork server


def _serve(conn, mem_cap: int) -> None:
    """The worker: preprocess each (modality, bytes) it is sent; reply with the outcome."""
    import torch

    from cachebind.errors import InputError
    from cachebind.preprocess import INPUT_SHAPES, preprocess

    torch.set_num_threads(1)
    resource.setrlimit(resource.RLIMIT_AS, (mem_cap, mem_cap))
    while True:
        try:
            modality, data = conn.recv()
        except EOFError:
            return
        try:
            x = preprocess(modality, data, source="fuzz")
            ok = tuple(x.shape) == INPUT_SHAPES[modality] and bool(torch.isfinite(x).all())
            reply = ("tensor", "") if ok else ("bad_tensor", f"{tuple(x.shape)}")
        except InputError as e:
            reply = ("input_error", e.reason)
        except MemoryError as e:
            reply = ("memory", f"MemoryError {str(e)[:200]}")
        except Exception as e:  # noqa: BLE001 - every other exception is a finding
            where = _where(e)
            reply = ("exception", f"{type(e).__name__} at {where}: {str(e)[:200]}")
        conn.send(reply)


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}")
        tb = tb.tb_next
    ours = [f for f in frames if not f.startswith(("Image", "ImageFile", "format"))]
    return (ours or frames or ["?"])[-1]


class ForkServer:
    """One worker at a time, forked from this (fully imported) process; replaced when it dies
    or overruns."""

    def __init__(self, mem_cap: int, deadline_s: float) -> None:
        self.ctx = multiprocessing.get_context("fork")
        self.mem_cap, self.deadline_s = mem_cap, deadline_s
        self.proc = None
        self.restarts = 0

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child, self.mem_cap), daemon=True)
        self.proc.start()
        self.restarts += 1

    def run(self, modality: str, data: bytes) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((modality, data))
        if self.conn.poll(self.deadline_s):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        else:
            self.proc.kill()
            self.proc.join()
            self.proc = None
            return "timeout", f"over {self.deadline_s} s"
        self.proc.join()
        code = self.proc.exitcode
        self.proc = None
        return "crash", f"exit code {code} (signal {-code})" if code and code < 0 else f"{code}"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()


# --------------------------------------------------------------------------- driver


class _TimeUp(BaseException):
    """This modality's share of the time is spent."""


def fuzz(modality: str, pool: list[bytes], server: ForkServer, seconds: float, out: Path):
    counts: collections.Counter[str] = collections.Counter()
    findings: dict[str, dict[str, Any]] = {}
    stop = time.monotonic() + seconds

    @settings(
        max_examples=1_000_000,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(mutated(pool))
    def case(data: bytes) -> None:
        if time.monotonic() > stop:
            raise _TimeUp  # a BaseException: hypothesis lets it through at once
        kind, detail = server.run(modality, data)
        counts[kind] += 1
        if kind in ("tensor", "input_error"):
            counts[f"{kind}:{detail}"] += kind == "input_error"
            return
        key = f"{kind}: {detail.split(':')[0] if kind == 'exception' else detail}"
        if key not in findings:
            digest = hashlib.sha256(data).hexdigest()[:12]
            path = out / f"{modality}-{kind}-{digest}.bin"
            path.write_bytes(data)
            findings[key] = {"kind": kind, "detail": detail, "example": str(path), "count": 0}
        findings[key]["count"] += 1

    try:
        case()
    except _TimeUp:
        pass
    except Exception as e:  # hypothesis may stop early (e.g. it ran out of examples)
        print(f"{modality}: hypothesis stopped: {e!r}", file=sys.stderr)
    return counts, findings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=480.0, help="total fuzzing time")
    parser.add_argument("--modalities", default="image,audio,video,depth,thermal,imu,point,text")
    parser.add_argument("--deadline", type=float, default=20.0, help="seconds per case")
    parser.add_argument(
        "--mem-gb", type=float, default=3.0, help="worker address space above start"
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/cachebind-fuzz"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import cachebind.preprocess  # noqa: F401 - imported once, before forking workers

    pool = seeds()
    modalities = [m for m in args.modalities.split(",") if m]
    status = Path("/proc/self/status").read_text().splitlines()
    vm_kb = next(int(ln.split()[1]) for ln in status if ln.startswith("VmSize"))
    server = ForkServer(vm_kb * 1024 + int(args.mem_gb * 2**30), args.deadline)
    report = {}
    start = time.monotonic()
    try:
        for i, modality in enumerate(modalities):
            left = args.seconds - (time.monotonic() - start)
            share = left / (len(modalities) - i)
            t0 = time.monotonic()
            counts, findings = fuzz(modality, pool[modality], server, share, args.out)
            report[modality] = {
                "cases": sum(
                    counts[k]
                    for k in (
                        "tensor",
                        "input_error",
                        "exception",
                        "crash",
                        "timeout",
                        "memory",
                        "bad_tensor",
                    )
                ),
                "seconds": round(time.monotonic() - t0, 1),
                "counts": dict(counts),
                "findings": findings,
            }
            print(json.dumps({modality: report[modality]}, indent=1), flush=True)
    finally:
        server.close()
    print("\n| modality | cases | s | tensor | InputError | findings |")
    print("|---|---:|---:|---:|---:|---|")
    for modality, r in report.items():
        c = r["counts"]
        found = "; ".join(f"{k} (x{v['count']})" for k, v in r["findings"].items()) or "none"
        print(
            f"| {modality} | {r['cases']} | {r['seconds']} | {c.get('tensor', 0)} "
            f"| {c.get('input_error', 0)} | {found} |"
        )
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
