"""The examples in examples/ (the original page's), run through the real command line:
``python -m pathapi run examples/X.py --root ...`` and ``python -m pathapi demo``."""

from __future__ import annotations

import os
import subprocess
import sys
from array import array
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def pathapi(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "pathapi", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"pathapi {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def run_example(name: str, tmp_path: Path) -> tuple[str, Path]:
    root = tmp_path / "app"
    out = pathapi("run", str(EXAMPLES / f"{name}.py"), "--root", str(root), cwd=tmp_path)
    return out.stdout, root / "works"


def load_floats(path: Path) -> list[float]:
    a = array("f")
    a.frombytes(path.read_bytes())
    return a.tolist()


def test_every_example_is_tested():
    # drive: tests/test_drive.py::test_the_drive_example_runs_and_its_file_outlives_the_run
    tested = {"share_checkpoint_dir", "get_overwrite", "exists_checks", "persist_files", "model_checkpoint", "drive"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_share_checkpoint_dir_transfers_the_folder_to_the_destination(tmp_path):
    stdout, works = run_example("share_checkpoint_dir", tmp_path)
    assert "root.destination received ['checkpoint_1.ckpt', 'checkpoint_2.ckpt'] from root.source" in stdout
    for i in (1, 2):
        sent = works / "root.source" / "outputs" / "checkpoints" / f"checkpoint_{i}.ckpt"
        got = works / "root.destination" / "outputs" / "checkpoints" / f"checkpoint_{i}.ckpt"
        assert got.read_bytes() == sent.read_bytes() == bytes([i]) * 10_000
    assert not (tmp_path / ".pathapi").exists()  # --root was used


def test_get_overwrite_fetches_each_epoch_and_moves_only_new_chunks(tmp_path):
    stdout, works = run_example("get_overwrite", tmp_path)
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("get() ") and "reused 0" in lines[0]
    assert all(line.startswith("get(overwrite=True)") for line in lines[1:]) and len(lines) == 3
    assert "reused 0" not in lines[2]  # the earlier epochs were already here
    got = works / "root.evaluator" / "outputs" / "checkpoints"
    sent = works / "root.trainer" / "outputs" / "checkpoints"
    assert sorted(os.listdir(got)) == ["epoch_1.ckpt", "epoch_2.ckpt", "epoch_3.ckpt"]
    assert all((got / n).read_bytes() == (sent / n).read_bytes() for n in os.listdir(sent))


def test_exists_checks_waits_for_the_producers_results(tmp_path):
    stdout, works = run_example("exists_checks", tmp_path)
    assert "remote_at_start=False" in stdout
    assert "local_after_get=True" in stdout
    assert "metrics=accuracy 0.93" in stdout
    assert (works / "root.consumer" / "outputs" / "results" / "metrics.txt").read_text() == "accuracy 0.93\n"


def test_persist_files_keeps_lit_paths_after_the_work_stopped_but_not_plain_strings(tmp_path):
    stdout, works = run_example("persist_files", tmp_path)
    assert "checkpoints=['model.ckpt'] checkpoints_exist_remote=True logs_exist_remote=False logs=not persisted" in stdout
    assert (works / "root.reader" / "outputs" / "checkpoints" / "model.ckpt").read_bytes() == b"\x00\x01" * 50_000
    assert not (works / "root.reader" / "outputs" / "logs").exists()
    assert (works / "root.trainer" / "outputs" / "logs" / "train.log").exists()


def test_model_checkpoint_deploy_loads_the_trainers_checkpoints(tmp_path):
    stdout, works = run_example("model_checkpoint", tmp_path)
    assert "deploy loaded {'checkpoint_1.ckpt': [0.0, 1.0, 2.0, 3.0, 4.0], 'checkpoint_2.ckpt': [5.0, 6.0, 7.0, 8.0, 9.0]}" in stdout
    got = works / "root.deploy" / "outputs" / "checkpoints"
    assert load_floats(got / "checkpoint_1.ckpt") == [0, 1, 2, 3, 4]
    assert load_floats(got / "checkpoint_2.ckpt") == [5, 6, 7, 8, 9]


def test_run_uses_dot_pathapi_in_the_current_folder_without_root(tmp_path):
    pathapi("run", str(EXAMPLES / "model_checkpoint.py"), cwd=tmp_path)
    assert (tmp_path / ".pathapi" / "works" / "root.deploy" / "outputs" / "checkpoints" / "checkpoint_2.ckpt").is_file()


def test_demo_shares_checkpoints_end_to_end(tmp_path):
    root = tmp_path / "demo"
    out = pathapi("demo", "--size-mib", "4", "--root", str(root), cwd=tmp_path)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("first get") and "2 files" in lines[0]
    assert lines[1].startswith("after update")
    assert "identical to the trainer's" in lines[-1]
    first_moved = float(lines[0].split("MiB (")[1].split("%")[0])
    update_moved = float(lines[1].split("MiB (")[1].split("%")[0])
    assert update_moved < first_moved / 5  # an update moves only the changed chunks
    deploy = root / "works" / "root.deploy" / "outputs" / "checkpoints"
    train = root / "works" / "root.train" / "outputs" / "checkpoints"
    for name in ("checkpoint_1.ckpt", "checkpoint_2.ckpt"):
        assert (deploy / name).read_bytes() == (train / name).read_bytes()


def test_run_without_an_app_fails_clearly(tmp_path):
    bad = tmp_path / "no_app.py"
    bad.write_text("x = 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pathapi", "run", str(bad)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "defines no `app = App(...)`" in out.stderr
