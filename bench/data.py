"""Data that looks like what the project moves: training checkpoints, and many small files.

A checkpoint folder of ``size`` bytes in all:

| file | share | content |
|---|---|---|
| ``model.f32`` | 1/2 | float32 weights, normal(0, 0.02): compresses ~1.08x, like real weights |
| ``model.bf16`` | 1/8 | the same kind of values in bfloat16 (top half of each float32): ~1.3x |
| ``optimizer.f32`` | 1/4 | Adam state: exp_avg normal(0, 1e-3), exp_avg_sq abs(normal) * 1e-6 |
| ``rng.bin`` | 1/8 | random bytes (a packed tokenizer, a blob): incompressible |
| ``config.json`` | small | hyperparameters and the step |

Values come from numpy's seeded generator, made in 16 MiB blocks (bounded memory whatever
the size), so every run of the suite moves the same bytes. The edits below are what the
scenarios apply at the origin between gets; each is deterministic given its seed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

BLOCK = 16 << 20
SHARES = {"model.f32": 4, "model.bf16": 1, "optimizer.f32": 2, "rng.bin": 1}  # eighths


def _backdate(path: Path, seconds: float = 60.0) -> None:
    """An mtime in the past: a file written just now is "racy" for a stat cache (it may be
    written again in the same timestamp tick) and would be read twice by any snapshot."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def _write_blocks(path: Path, size: int, make: callable) -> None:  # type: ignore[valid-type]
    with open(path, "wb") as f:
        done = 0
        while done < size:
            n = min(BLOCK, size - done)
            f.write(make(done, n))
            done += n


def _normal_f32(rng: np.random.Generator, scale: float) -> callable:  # type: ignore[valid-type]
    def make(_: int, n: int) -> bytes:
        return (rng.standard_normal(n // 4, dtype=np.float32) * np.float32(scale)).tobytes()
    return make


def make_checkpoint(folder: Path, size: int, seed: int = 0) -> dict[str, int]:
    """Write a checkpoint folder of about ``size`` bytes; {file name: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    unit = (size // 8) // 4096 * 4096
    sizes = {name: share * unit for name, share in SHARES.items()}
    _write_blocks(folder / "model.f32", sizes["model.f32"], _normal_f32(rng, 0.02))

    def bf16(_: int, n: int) -> bytes:
        f = rng.standard_normal(n // 2, dtype=np.float32) * np.float32(0.02)
        return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()

    _write_blocks(folder / "model.bf16", sizes["model.bf16"], bf16)

    half = sizes["optimizer.f32"] // 2

    def adam(done: int, n: int) -> bytes:
        # exp_avg for the first half of the file, exp_avg_sq for the second (a block may straddle).
        out = np.empty(n // 4, dtype=np.float32)
        k = max(0, min(n, half - done)) // 4
        out[:k] = rng.standard_normal(k, dtype=np.float32) * np.float32(1e-3)
        out[k:] = np.abs(rng.standard_normal(n // 4 - k, dtype=np.float32)) * np.float32(1e-6)
        return out.tobytes()

    _write_blocks(folder / "optimizer.f32", sizes["optimizer.f32"], adam)
    _write_blocks(folder / "rng.bin", sizes["rng.bin"], lambda _, n: rng.bytes(n))
    config = {"step": 1000, "lr": 3e-4, "betas": [0.9, 0.95], "layers": 24, "hidden": 2048, "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    sizes["config.json"] = (folder / "config.json").stat().st_size
    for name in sizes:
        _backdate(folder / name)
    return sizes


def scattered_edits(path: Path, seed: int, regions: int = 100, fraction: float = 0.01) -> int:
    """Overwrite ``regions`` regions spread evenly over the file, ``fraction`` of it in all,
    with new random bytes (in place, as a writer that updates part of a tensor does).
    Returns the bytes written."""
    size = path.stat().st_size
    rng = np.random.default_rng(1000 + seed)
    stride = size // regions
    region = int(size * fraction) // regions
    with open(path, "r+b") as f:
        for i in range(regions):
            f.seek(i * stride + int(rng.integers(0, stride - region)))
            f.write(rng.bytes(region))
    _backdate(path)
    return region * regions


def insert_middle(path: Path, n: int = 100, seed: int = 0) -> None:
    """Insert ``n`` new bytes in the middle of the file: every byte after it moves by ``n``
    (what defeats fixed-size blocks). Written to a new file and renamed, as tools that
    rewrite a file do."""
    size = path.stat().st_size
    mid = size // 2
    tmp = path.with_name(path.name + ".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        _copy(src, dst, 0, mid)
        dst.write(np.random.default_rng(2000 + seed).bytes(n))
        _copy(src, dst, mid, size - mid)
    os.replace(tmp, path)
    _backdate(path)


def _copy(src, dst, offset: int, length: int) -> None:  # type: ignore[no-untyped-def]
    src.seek(offset)
    while length:
        chunk = src.read(min(BLOCK, length))
        if not chunk:
            raise OSError(f"{src.name} ended early")
        dst.write(chunk)
        length -= len(chunk)


def training_step(folder: Path, step: int) -> tuple[str, int]:
    """The next training step: every float of ``model.f32`` perturbed (w -= lr * g, with a
    random g: every chunk of the file changes, what no chunking can save) and a new file
    ``model-step{step}.bf16`` (this step's bf16 export) written next to the old ones.
    Returns (new file name, bytes that really changed)."""
    rng = np.random.default_rng(3000 + step)
    path = folder / "model.f32"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for off in range(0, size, BLOCK):
            n = min(BLOCK, size - off)
            f.seek(off)
            w = np.frombuffer(f.read(n), dtype=np.float32)
            with np.errstate(invalid="ignore"):  # the random bytes of earlier edits hold NaNs
                w = w - np.float32(3e-4) * rng.standard_normal(w.size, dtype=np.float32)
            f.seek(off)
            f.write(w.tobytes())
    _backdate(path)
    new = f"model-step{step}.bf16"
    bf = folder / "model.bf16"

    def make(_: int, n: int) -> bytes:
        v = rng.standard_normal(n // 2, dtype=np.float32) * np.float32(0.02)
        return (v.view(np.uint32) >> 16).astype(np.uint16).tobytes()

    _write_blocks(folder / new, bf.stat().st_size, make)
    _backdate(folder / new)
    return new, size + bf.stat().st_size


def make_small_files(folder: Path, count: int, seed: int = 0) -> int:
    """``count`` files of 1-8 KiB (random bytes) in 100 folders of 10 sub-folders: a source
    tree or a dataset of small records. Returns the total bytes."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1024, 8 * 1024 + 1, count)
    blob = rng.bytes(1 << 20)
    offs = rng.integers(0, len(blob) - int(sizes.max()), count)
    total = 0
    made: set[Path] = set()
    for i in range(count):
        d = folder / f"d{i % 100:02d}" / f"s{(i // 100) % 10}"
        if d not in made:
            d.mkdir(parents=True, exist_ok=True)
            made.add(d)
        n = int(sizes[i])
        # A distinct 8-byte header makes every file unique (no chunk dedups across files).
        data = i.to_bytes(8, "little") + blob[offs[i] : offs[i] + n - 8]
        (d / f"f{i:06d}.bin").write_bytes(data)
        total += n
    t = time.time() - 60
    for p in folder.rglob("*.bin"):
        os.utime(p, (t, t))
    return total


def change_small_files(folder: Path, fraction: float, seed: int) -> int:
    """Rewrite ``fraction`` of the files (chosen at random) with new bytes; returns how many."""
    files = sorted(folder.rglob("*.bin"))
    rng = np.random.default_rng(4000 + seed)
    pick = rng.choice(len(files), max(1, int(len(files) * fraction)), replace=False)
    t = time.time() - 60
    for i in pick:
        p = files[int(i)]
        p.write_bytes(rng.bytes(int(rng.integers(1024, 8 * 1024 + 1))))
        os.utime(p, (t, t))
    return len(pick)
