"""``pathapi demo``: the checkpoint-sharing example of the original "Path Storage" page, end to end.

A training work writes two checkpoints into ``lit://outputs/checkpoints``; a deploy work
receives them when its run starts and loads them. Then the trainer changes one checkpoint
(two regions, 1 % of it, as a fine-tuning step on a few layers would) and the deploy work
gets again: only the changed chunks move. Every load is checked against the trainer's digests.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import os
import random
import tempfile

from .app import App
from .flow import Flow
from .work import Work

MiB = 1 << 20


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


class ModelTraining(Work):
    def __init__(self, size: int = 32 * MiB) -> None:
        super().__init__()
        self.checkpoint_dir = "lit://outputs/checkpoints"
        self.size = size
        self.step = 0
        self.digests: dict[str, str] = {}

    def run(self) -> None:
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        rng = random.Random(self.step)
        ckpt_2 = os.path.join(self.checkpoint_dir, "checkpoint_2.ckpt")
        if self.step == 0:
            for name in ("checkpoint_1.ckpt", "checkpoint_2.ckpt"):
                with open(os.path.join(self.checkpoint_dir, name), "wb") as f:
                    f.write(rng.randbytes(self.size))  # float32 weights, as raw bytes
        else:
            with open(ckpt_2, "r+b") as f:  # update 1 % of the weights, in 2 places
                for _ in range(2):
                    f.seek(rng.randrange(self.size - self.size // 200) // 4 * 4)
                    f.write(rng.randbytes(self.size // 200))
        self.step += 1
        self.digests = {n: _digest(os.path.join(self.checkpoint_dir, n)) for n in sorted(os.listdir(self.checkpoint_dir))}


class ModelDeploy(Work):
    def __init__(self) -> None:
        super().__init__()
        self.loaded: dict[str, str] = {}
        self.transfers: list[dict[str, object]] = []

    def run(self, checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
        ckpts = sorted(os.listdir(checkpoint_dir))
        for name in ckpts:
            weights = array.array("f")
            with open(os.path.join(checkpoint_dir, name), "rb") as f:
                weights.frombytes(f.read())  # "load" the checkpoint
        self.loaded = {n: _digest(os.path.join(checkpoint_dir, n)) for n in ckpts}
        self.transfers.append(dict(vars(checkpoint_dir.last_transfer)))


class CheckpointFlow(Flow):
    def __init__(self, size: int = 32 * MiB) -> None:
        super().__init__()
        self.train = ModelTraining(size)
        self.deploy = ModelDeploy()

    def run(self) -> None:
        for _ in range(2):
            self.train.run()
            self.deploy.run(checkpoint_dir=self.train.checkpoint_dir)
            if self.deploy.loaded != self.train.digests:
                raise SystemExit("demo failed: the deploy work loaded different bytes than the trainer wrote")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pathapi demo")
    ap.add_argument("--root", default=None, help="app folder (default: a new temporary folder)")
    ap.add_argument("--store", default=None)
    ap.add_argument("--size-mib", type=int, default=32, help="size of each checkpoint")
    args = ap.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="pathapi-demo-")
    flow = CheckpointFlow(args.size_mib * MiB)
    App(flow, root=root, store=args.store).run()
    for label, t in zip(("first get", "after update"), flow.deploy.transfers):
        print(
            f"{label:13s} {t['files']} files, {t['bytes_total'] / MiB:6.1f} MiB | moved {t['chunks_transferred']:4d} chunks, "
            f"{t['bytes_transferred'] / MiB:6.2f} MiB ({100 * t['bytes_transferred'] / t['bytes_total']:5.1f} %) | "  # type: ignore[operator]
            f"reused {t['chunks_reused']:4d} | {t['seconds']:.2f} s | from {t['source']}"
        )
    print(f"deploy loaded checkpoints identical to the trainer's: {sorted(flow.deploy.loaded)} (app folder {root})")
