"""``pathapi demo``: the checkpoint-sharing example of the original "Path Storage" page, end to end.

A training work writes two checkpoints into ``lit://outputs/checkpoints``; a deploy work
receives them when its run starts and loads them. Then the trainer changes one checkpoint
(two regions, 1 % of it, as a fine-tuning step on a few layers would) and the deploy work
gets again: only the changed chunks move. Every load is checked against the trainer's digests.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import hashlib
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from .runtime.app import App
from .runtime.flow import Flow
from .runtime.work import Work

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
        self.transfers: list[dict[str, Any]] = []

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


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The demo's options, on its own parser or on ``pathapi demo``'s sub-parser."""
    ap.add_argument("--root", default=None,
                    help="app folder, kept after the demo (default: a temporary folder, removed when the demo ends)")
    ap.add_argument("--store", default=None, help="artifact store (default a folder under the app folder)")
    ap.add_argument("--size-mib", type=_positive_int, default=32, help="size of each checkpoint (MiB)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"give at least 1, not {value}")
    return value


@contextlib.contextmanager
def _app_folder(root: str | None) -> Iterator[tuple[str, bool]]:
    """``(folder, temporary)``: ``root`` if given (kept), else a new temporary folder that
    is removed when the block ends, also on an error, Ctrl-C or SIGTERM (``App.run`` has
    stopped the works by then). The demo writes about 6 times ``--size-mib`` MiB there."""
    if root is not None:
        yield os.path.abspath(root), False
        return
    folder = tempfile.mkdtemp(prefix="pathapi-demo-")
    try:
        yield folder, True
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if os.path.lexists(folder):  # a work process that outlived its stop() still writing there
            print(f"pathapi demo: could not remove the temporary app folder {folder}; delete it by hand",
                  file=sys.stderr)


def _report(flow: CheckpointFlow, where: str) -> None:
    for label, t in zip(("first get", "after update"), flow.deploy.transfers, strict=False):
        print(
            f"{label:13s} {t['files']} files, {t['bytes_total'] / MiB:6.1f} MiB | moved {t['chunks_transferred']:4d} chunks, "
            f"{t['bytes_transferred'] / MiB:6.2f} MiB ({100 * t['bytes_transferred'] / t['bytes_total']:5.1f} %) | "
            f"reused {t['chunks_reused']:4d} | {t['seconds']:.2f} s | from {t['source']}"
        )
    print(f"deploy loaded checkpoints identical to the trainer's: {sorted(flow.deploy.loaded)} ({where})")


def run(args: argparse.Namespace) -> None:
    """Run the demo with parsed options (see :func:`add_arguments`); print what moved.

    Without ``--root`` nothing is left behind: the app folder is temporary and removed at
    the end, whatever ends the demo. Raises ``SystemExit`` if the deploy work loaded
    different bytes than the trainer wrote; a work's failure raises ``WorkError``.
    """
    with _app_folder(args.root) as (root, temporary):
        flow = CheckpointFlow(args.size_mib * MiB)
        App(flow, root=root, store=args.store).run()
        _report(flow, f"app folder {root}, temporary: removed when the demo ends; --root DIR keeps one" if temporary
                else f"app folder {root}")


def main(argv: list[str] | None = None) -> None:
    """``pathapi demo [options]`` (without the command line's error reporting)."""
    ap = argparse.ArgumentParser(prog="pathapi demo")
    add_arguments(ap)
    run(ap.parse_args(argv))
