"""SPEC "Persistence" and "Stores and transport" with ``App(..., store="s3://bucket/prefix")``.

Real apps (spawned work processes) persist to the session's SeaweedFS server; the endpoint
and credentials reach the work processes only through the standard AWS environment
variables. Two apps with different roots share nothing but the bucket, as works on two
machines would: what one persisted, the other gets after its origin stopped.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path as FsPath
from typing import Any

import pytest
from s3server import SeaweedServer
from trees import listing

from pathapi import App, Flow, Path, Work
from pathapi.artifacts import ArtifactStore

BUCKET = "pathapi-test"
MiB = 1 << 20


def transfer(p: Path) -> dict[str, object]:
    t = p.last_transfer
    assert t is not None
    return {k: getattr(t, k) for k in ("files", "bytes_total", "chunks_transferred", "bytes_transferred", "chunks_reused", "source")}


class Trainer(Work):
    """Writes the same checkpoint folder on every run (a large file, a small one, an
    executable, a symlink, an empty folder)."""

    def __init__(self) -> None:
        super().__init__()
        self.ckpt = "lit://outputs/ckpt"

    def run(self) -> None:
        os.makedirs(self.ckpt / "sub" / "empty", exist_ok=True)
        (self.ckpt / "weights.bin").write_bytes(random.Random(1).randbytes(6 * MiB))
        (self.ckpt / "config.json").write_text('{"lr": 0.1}')
        (self.ckpt / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
        os.chmod(self.ckpt / "sub" / "run.sh", 0o755)
        if not os.path.lexists(self.ckpt / "latest"):
            os.symlink("weights.bin", self.ckpt / "latest")
        self.listing = listing(self.ckpt)


class Reader(Work):
    def run(self, ckpt: Path) -> None:
        # ckpt was fetched before run started; its origin has stopped.
        self.auto_listing = listing(ckpt) if os.path.lexists(ckpt) else None
        self.auto = transfer(ckpt)
        self.exists_remote = ckpt.exists_remote()
        ckpt.get(overwrite=True)
        self.again = transfer(ckpt)
        (ckpt / "config.json").write_text("changed here")
        os.remove(ckpt / "weights.bin")
        ckpt.get(overwrite=True)
        self.repaired_listing = listing(ckpt)
        self.repaired = transfer(ckpt)
        never = Path("lit://outputs/never-persisted", origin=ckpt.origin_name)
        self.never_exists_remote = never.exists_remote()
        try:
            never.get()
        except FileNotFoundError as e:
            self.never_get = f"FileNotFoundError: {e}"


class Machine(Flow):
    """What runs on one machine: the trainer runs and stops (persisting), then the reader."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer = Trainer()
        self.reader = Reader()

    def run(self) -> None:
        self.trainer.run()
        self.trainer.stop()
        self.reader.run(self.trainer.ckpt)


def objects(server: SeaweedServer, prefix: str) -> dict[str, int]:
    client: Any = server.client()
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


@pytest.fixture(scope="module")
def two_machines(s3_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    prefix = f"apps/{uuid.uuid4().hex}"
    url = f"s3://{BUCKET}/{prefix}"
    base = tmp_path_factory.mktemp("app-s3")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        first = Machine()
        App(first, root=base / "machine-a", store=url).run()
        after_first = objects(s3_server, prefix + "/")
        second = Machine()
        App(second, root=base / "machine-b", store=url).run()
        after_second = objects(s3_server, prefix + "/")
        store = ArtifactStore.open(url, base)
        try:
            persisted = store.manifest("root.trainer", "outputs/ckpt")
        finally:
            store.close()
    yield {"first": first, "second": second, "after_first": after_first, "after_second": after_second,
           "prefix": prefix, "persisted": persisted, "base": base}


def test_after_the_origin_stopped_the_run_argument_comes_from_the_bucket(two_machines: dict[str, Any]) -> None:
    first = two_machines["first"]
    assert first.reader.auto_listing == first.trainer.listing
    assert first.reader.auto["source"] == "artifacts"
    assert first.reader.auto["files"] == 3  # weights.bin, config.json, sub/run.sh
    assert first.reader.auto["chunks_transferred"] > 10
    assert first.reader.auto["bytes_transferred"] >= 6 * MiB
    assert first.reader.exists_remote is True


def test_a_second_get_from_the_bucket_moves_nothing_and_a_damaged_copy_is_repaired(two_machines: dict[str, Any]) -> None:
    first = two_machines["first"]
    assert first.reader.again["bytes_transferred"] == 0
    assert first.reader.again["chunks_transferred"] == 0
    assert first.reader.repaired_listing == first.trainer.listing
    assert 0 < first.reader.repaired["bytes_transferred"] <= 6 * MiB + 100


def test_a_path_never_persisted_is_not_found_in_the_bucket(two_machines: dict[str, Any]) -> None:
    reader = two_machines["first"].reader
    assert reader.never_exists_remote is False
    assert reader.never_get.startswith("FileNotFoundError")


def test_another_machine_sharing_only_the_bucket_gets_the_files(two_machines: dict[str, Any]) -> None:
    first, second = two_machines["first"], two_machines["second"]
    assert second.reader.auto_listing == first.trainer.listing
    assert second.reader.auto["source"] == "artifacts"


def test_persisting_an_unchanged_checkpoint_again_uploads_no_chunk(two_machines: dict[str, Any]) -> None:
    """The second machine's trainer wrote the same bytes: its persist found every chunk in
    the bucket, so no pack object was added (only its manifest's ref was rewritten)."""
    prefix = two_machines["prefix"]
    first, second = ({k: v for k, v in objs.items() if k.startswith(prefix + "/chunks/packs/")}
                     for objs in (two_machines["after_first"], two_machines["after_second"]))
    assert first
    assert second == first


def test_the_bucket_holds_the_documented_layout_and_the_manifest_ref(two_machines: dict[str, Any]) -> None:
    prefix = two_machines["prefix"] + "/"
    keys = set(two_machines["after_second"])
    assert prefix + "chunks/FORMAT" in keys
    assert prefix + "refs/root.trainer%2Foutputs%2Fckpt" in keys
    for key in keys:
        assert key.startswith((prefix + "chunks/FORMAT", prefix + "chunks/packs/", prefix + "chunks/index/",
                               prefix + "refs/", prefix + "leases/")), key
    m = two_machines["persisted"]
    assert m is not None
    assert {e.path for e in m.files()} >= {"weights.bin", "config.json", "sub/run.sh"}


def test_nothing_is_written_outside_the_app_roots(two_machines: dict[str, Any]) -> None:
    base: FsPath = two_machines["base"]
    assert sorted(p.name for p in base.iterdir()) == ["machine-a", "machine-b"]
