"""The progress bar: shown on a terminal for transfers over 64 MiB, never otherwise."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path


def _demo(tmp_path: Path, size_mib: int, tty: bool) -> str:
    cmd = [sys.executable, "-m", "pathapi", "demo", "--size-mib", str(size_mib), "--root", str(tmp_path / "app")]
    if not tty:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    out = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not data:
            break
        out += data
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    return out.decode(errors="replace")


def test_a_large_get_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    err = _demo(tmp_path, 40, tty=True)  # two 40 MiB checkpoints: 80 MiB to move
    assert "get outputs/checkpoints" in err and "B/s" in err


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    assert "get outputs/checkpoints" not in _demo(tmp_path, 40, tty=False)


def test_no_progress_bar_for_a_small_transfer(tmp_path: Path) -> None:
    assert "get outputs/checkpoints" not in _demo(tmp_path, 4, tty=True)
