"""``pathapi ls``, ``log``, ``diff``, ``cat`` and ``pathapi run``'s transfer lines, as a user
runs them: real processes, ``--json`` parsed, compared with what the app wrote
(tests/_ui_app.py spells out both versions). One app run feeds the module; an S3 store
(SeaweedFS) gets a Path persisted directly, to show the views read S3 too.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from _ui_app import XSS_NAME, version_files

REPO = Path(__file__).resolve().parent.parent
APP_FILE = REPO / "tests" / "_ui_app.py"
CKPT = "root.train/outputs/ckpt"
TIMEOUT = 120


def pathapi(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **(env or {})}
    r = subprocess.run([sys.executable, "-m", "pathapi", *args], cwd=REPO, env=full, capture_output=True,
                       timeout=TIMEOUT)
    if check:
        assert r.returncode == 0, r.stderr.decode()
    return r


def as_json(*args: str, **kw: Any) -> Any:
    return json.loads(pathapi(*args, "--json", **kw).stdout)


@pytest.fixture(scope="module")
def app_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("uiapp")
    r = pathapi("run", str(APP_FILE), "--root", str(root))
    return root, r.stderr.decode()  # transfer lines go to stderr: the app's stdout is its own


def test_run_prints_one_line_per_transfer_saying_what_moved_and_what_was_reused(app_root: tuple[Path, str]) -> None:
    lines = [ln for ln in app_root[1].splitlines() if ln.startswith("pathapi: root.deploy got")]
    assert len(lines) == 2, app_root[1]
    first, second = lines
    assert f"got {CKPT} from origin" in first and "reused 0 chunks" in first
    assert "moved 9 chunks" in first and " s" in first
    assert "reused 5 chunks" in second  # the second get moves only what changed


def test_run_quiet_prints_no_transfer_line(tmp_path: Path) -> None:
    r = pathapi("run", str(APP_FILE), "--root", str(tmp_path), "-q")
    assert b"got root.train" not in r.stderr and b"got root.train" not in r.stdout


def test_ls_lists_works_and_their_paths(app_root: tuple[Path, str]) -> None:
    doc = as_json("ls", "--root", str(app_root[0]))
    works = {w["name"]: w for w in doc["works"]}
    assert set(works) == {"root.train"}  # the deploy work persists nothing of its own
    (p,) = works["root.train"]["paths"]
    files = version_files(1)
    assert (p["path"], p["kind"], p["files"], p["versions"], p["consumers"]) == ("outputs/ckpt", "dir", len(files), 2, 1)
    assert p["size"] == sum(len(b) for b in files.values())
    text = pathapi("ls", "--root", str(app_root[0])).stdout.decode()
    assert "root.train" in text and "outputs/ckpt" in text and "2 versions" in text


def test_ls_of_a_path_lists_its_files_with_sizes_and_modes(app_root: tuple[Path, str]) -> None:
    doc = as_json("ls", CKPT, "--root", str(app_root[0]))
    got = {e["path"]: e for e in doc["entries"]}
    for rel, data in version_files(1).items():
        assert got[rel]["size"] == len(data) and got[rel]["kind"] == "file"
    assert got["sub/run.sh"]["mode"] == "0755" and got["config.json"]["mode"] == "0644"
    assert got["latest"]["kind"] == "symlink" and got["latest"]["target"] == "model.safetensors"
    assert got["empty"]["kind"] == "dir"
    old = {e["path"] for e in as_json("ls", CKPT, "--root", str(app_root[0]), "--version", "1")["entries"]}
    assert "notes.txt" in old and "added.txt" not in old


def test_log_shows_versions_and_transfers(app_root: tuple[Path, str]) -> None:
    doc = as_json("log", CKPT, "--root", str(app_root[0]))
    v1, v2 = doc["versions"]
    assert (v1["run"], v2["run"], v2["current"]) == (1, 2, True)
    assert v1["new_chunks"] == v1["chunks"] and 0 < v2["new_chunks"] < v2["chunks"]
    t1, t2 = doc["transfers"]
    assert {t1["consumer"], t2["consumer"]} == {"root.deploy"} and t1["source"] == "origin"
    assert t1["chunks_reused"] == 0 and t1["chunks_transferred"] == v1["chunks"]
    assert t2["chunks_transferred"] == v2["new_chunks"] and t2["chunks_reused"] == v2["chunks"] - v2["new_chunks"]
    assert t2["bytes_reused"] > 0 and t2["version"] == v2["version"] and t2["manifest_id"] == v2["manifest_id"]


def test_diff_names_each_changed_file_and_the_changed_tensor(app_root: tuple[Path, str]) -> None:
    d = as_json("diff", CKPT, "1", "2", "--root", str(app_root[0]))
    by = {c["path"]: c for c in d["changes"]}
    assert by["added.txt"]["status"] == "added" and by["notes.txt"]["status"] == "removed"
    assert {p for p, c in by.items() if c["status"] == "changed"} == {"config.json", "metrics.csv", "model.safetensors"}
    model = by["model.safetensors"]
    assert model["chunks_added"] >= 1 and model["bytes_added"] > 0
    tensors = {t["name"]: t for t in model["tensors"]}
    assert tensors["layer.0.weight"]["status"] == "changed" and tensors["layer.0.weight"]["changed_bytes"] == 16
    assert tensors["embed.weight"]["status"] == tensors["head.weight"]["status"] == "same"
    assert d["unchanged"] == 6  # logo, run.sh, the XSS-named file, latest, sub, empty
    text = pathapi("diff", CKPT, "--root", str(app_root[0])).stdout.decode()  # default: the last two
    assert "+ added.txt" in text and "- notes.txt" in text and "tensor layer.0.weight" in text


def test_cat_writes_the_exact_bytes_of_a_file_of_any_kept_version(app_root: tuple[Path, str]) -> None:
    root = str(app_root[0])
    assert pathapi("cat", f"{CKPT}/model.safetensors", "--root", root).stdout == version_files(1)["model.safetensors"]
    assert pathapi("cat", f"{CKPT}/notes.txt", "--root", root, "--version", "1").stdout == b"first run\n"
    assert pathapi("cat", f"{CKPT}/{XSS_NAME}", "--root", root).stdout == version_files(1)[XSS_NAME]
    preview = as_json("cat", f"{CKPT}/model.safetensors", "--root", root)["preview"]
    assert [t["name"] for t in preview["tensors"]] == ["embed.weight", "layer.0.weight", "head.weight"]
    assert preview["tensors"][0]["shape"] == [75000] and preview["tensors"][0]["size"] == 300_000


def test_cat_of_a_folder_is_a_tar_with_exact_contents(app_root: tuple[Path, str]) -> None:
    out = pathapi("cat", f"{CKPT}/sub", "--root", str(app_root[0])).stdout
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        names = tar.getnames()
        member = tar.getmember("sub/run.sh")
        assert names == ["sub", "sub/run.sh"] and member.mode == 0o755
        assert tar.extractfile(member).read() == b"#!/bin/sh\necho hi\n"  # type: ignore[union-attr]


def test_errors_are_one_line_naming_what_is_missing(app_root: tuple[Path, str], tmp_path: Path) -> None:
    r = pathapi("ls", "--root", str(tmp_path / "nothing"), check=False)
    assert r.returncode == 1 and b"no artifact store" in r.stderr and len(r.stderr.splitlines()) == 1
    r = pathapi("log", "root.nobody/x", "--root", str(app_root[0]), check=False)
    assert r.returncode == 1 and b"root.train" in r.stderr  # names the works there are
    r = pathapi("diff", CKPT, "1", "7", "--root", str(app_root[0]), check=False)
    assert r.returncode == 1 and b"version 7 does not exist" in r.stderr


def test_the_views_read_an_s3_store(s3_server: Any, tmp_path: Path) -> None:
    from s3server import aws_env

    from cas.workspace import Workspace
    from pathapi.artifacts import ArtifactStore
    from pathapi.version import Version

    url = "s3://pathapi-test/ui-views"
    src = tmp_path / "tree"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a.txt").write_text("on s3\n")
    with aws_env(s3_server.env()):
        store = ArtifactStore.open(url, tmp_path)
        with Workspace(tmp_path / "ws") as ws:
            store.persist("root.w", "data", str(src), ws, version=Version(1, 1, 1))
            (src / "d" / "b.txt").write_text("second\n")
            store.persist("root.w", "data", str(src), ws, version=Version(1, 2, 1))
        store.close()
    env = s3_server.env()
    doc = as_json("ls", "--store", url, env=env)
    assert [(p["work"], p["path"], p["versions"]) for w in doc["works"] for p in w["paths"]] == [("root.w", "data", 2)]
    d = as_json("diff", "root.w/data", "1", "2", "--store", url, env=env)
    assert [(c["path"], c["status"]) for c in d["changes"]] == [("d/b.txt", "added")]
    assert pathapi("cat", "root.w/data/d/a.txt", "--store", url, env=env).stdout == b"on s3\n"
