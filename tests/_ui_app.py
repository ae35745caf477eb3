"""The app the storage-browser and CLI-view tests look at: ``pathapi run tests/_ui_app.py``.

A trainer persists a checkpoint folder twice (a safetensors file with three tensors of which
the second run changes one, JSON, CSV, text, a PNG, an executable, a symlink, a file named
like an XSS payload); a deploy work gets it after each run. What each version holds is
spelled out in ``VERSION_1`` / ``VERSION_2`` so the tests compare against it.
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib

from pathapi import App, Flow, Work

XSS_NAME = "<img src=x onerror=alert(1)>.txt"
TENSOR_BYTES = 300_000


def safetensors_bytes(tensors: dict[str, bytes]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, data in tensors.items():
        header[name] = {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [off, off + len(data)]}
        off += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(tensors.values())


def png_bytes(width: int = 4, height: int = 4) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([200, 40, 40]) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def tensors(step: int) -> dict[str, bytes]:
    rng = random.Random(5)
    out = {name: rng.randbytes(TENSOR_BYTES) for name in ("embed.weight", "layer.0.weight", "head.weight")}
    if step:
        b = bytearray(out["layer.0.weight"])
        b[1000:1016] = bytes(16)  # 16 bytes of one tensor change
        out["layer.0.weight"] = bytes(b)
    return out


def version_files(step: int) -> dict[str, bytes]:
    """Relative path -> bytes of each file the trainer leaves after run ``step``."""
    files = {
        "model.safetensors": safetensors_bytes(tensors(step)),
        "config.json": json.dumps({"lr": 0.1 / (step + 1), "layers": 2}).encode(),
        "metrics.csv": ("step,loss\n" + "".join(f"{i},{1 / (i + 1):.4f}\n" for i in range(step + 3))).encode(),
        "logo.png": png_bytes(),
        "sub/run.sh": b"#!/bin/sh\necho hi\n",
        XSS_NAME: b"an innocent file with a hostile name\n",
    }
    if step == 0:
        files["notes.txt"] = b"first run\n"
    else:
        files["added.txt"] = b"second run\n"
    return files


class Trainer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.ckpt = "lit://outputs/ckpt"

    def run(self, step: int) -> None:
        os.makedirs(self.ckpt / "sub", exist_ok=True)
        os.makedirs(self.ckpt / "empty", exist_ok=True)
        for name in os.listdir(self.ckpt):
            if os.path.isfile(self.ckpt / name) and not os.path.islink(self.ckpt / name):
                os.unlink(self.ckpt / name)
        for rel, data in version_files(step).items():
            (self.ckpt / rel).write_bytes(data)
        os.chmod(self.ckpt / "sub" / "run.sh", 0o755)
        if not os.path.lexists(self.ckpt / "latest"):
            os.symlink("model.safetensors", self.ckpt / "latest")


class Deploy(Work):
    def __init__(self) -> None:
        super().__init__()
        self.moved: list[int] = []

    def run(self, ckpt) -> None:  # type: ignore[no-untyped-def]
        self.moved.append(ckpt.last_transfer.chunks_transferred)


class Root(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.train = Trainer()
        self.deploy = Deploy()

    def run(self) -> None:
        for step in range(2):
            self.train.run(step)
            self.deploy.run(self.train.ckpt)


app = App(Root())
