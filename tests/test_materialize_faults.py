"""A disk that refuses writes while a sync stages its files (EFBIG from RLIMIT_FSIZE, set
for real in a child process): a clear MaterializeError naming the destination, errno kept,
and the previous tree intact."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

from cas import LocalChunkStore, SeedSource, Workspace

CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from cas import LocalChunkStore, Manifest, MaterializeError, Workspace
job = json.loads(sys.argv[2])
m = Manifest.decode(open(job["manifest"], "rb").read())
ws, store = Workspace(job["state"]), LocalChunkStore(job["store"])
resource.setrlimit(resource.RLIMIT_FSIZE, (job["limit"], job["limit"]))  # Python ignores SIGXFSZ: writes get EFBIG
try:
    ws.sync(m, job["dest"], remote=store)
except MaterializeError as e:
    print(json.dumps({"type": type(e).__name__, "errno": e.errno, "message": str(e), "is_oserror": isinstance(e, OSError)}))
else:
    print(json.dumps({"type": None}))
"""


def test_a_file_size_limit_hit_while_staging_raises_materialize_error_and_changes_nothing(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "small.txt").write_bytes(b"new small")
    (origin / "big.bin").write_bytes(os.urandom(8 << 20))
    with Workspace(tmp_path / "ostate") as ows, LocalChunkStore(tmp_path / "store") as store:
        m = ows.snapshot(origin)
        store.put_many(SeedSource(m, origin).get_many(sorted(m.chunk_ids())))
    (tmp_path / "m.bin").write_bytes(m.encode())
    dest = tmp_path / "consumer" / "data"
    dest.mkdir(parents=True)
    (dest / "small.txt").write_bytes(b"old small")
    (dest / "local-only").write_bytes(b"mine")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    job = {"manifest": str(tmp_path / "m.bin"), "state": str(tmp_path / "cstate"), "store": str(tmp_path / "store"),
           "dest": str(dest), "limit": 4 << 20}
    out = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).resolve().parents[1]), json.dumps(job)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["type"] == "MaterializeError" and got["is_oserror"]
    assert got["errno"] == errno.EFBIG
    assert str(dest) in got["message"] and "nothing at" in got["message"]
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert not (tmp_path / "cstate" / "txn").exists()
