"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

# Ray, whenever a test starts it, stays on loopback (without this it advertises the machine's
# external address) and reports nothing: set before anything imports ray, which reads them then.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

if TYPE_CHECKING:
    from raycluster import RayTestCluster
    from s3server import SeaweedServer


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS S3 server on loopback for the whole session, with the bucket ``pathapi-test``.

    Tests that share it use a prefix of their own. Fails (never skips) when ``weed`` or boto3
    is missing: the ``test`` extra installs both. Imported here, not at the top, so that
    such a failure is the S3 tests' alone.
    """
    from s3server import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("s3server"))
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def ray_cluster(s3_server: SeaweedServer) -> Iterator[RayTestCluster]:
    """A real Ray cluster on loopback for the whole session (see tests/raycluster.py): a head
    and 3 one-CPU worker nodes; the session's SeaweedFS reaches the works' actors through
    the nodes' environment, as on a real cluster. This process is connected to it and
    ``RAY_ADDRESS`` names it. Skipped only when Ray is not installed (the ``test`` extra
    installs it)."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' (or '.[ray]')")
    from raycluster import RayTestCluster

    cluster = RayTestCluster(workers=3, env=s3_server.env())
    try:
        cluster.start()
        old = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = cluster.address
        yield cluster
    finally:
        cluster.shutdown()
    if old is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = old


@pytest.fixture(scope="module")
def close_client_sessions() -> Iterator[None]:
    """Close the origin clients' HTTP sessions (kept open across requests, one per event
    loop) once a module is done with them: a module that talks to origins in this process
    uses it (``pytestmark = pytest.mark.usefixtures("close_client_sessions")``)."""
    yield
    from pathapi.aio import io_loop
    from pathapi.wire.client import close_sessions

    io_loop().run(close_sessions(), timeout=10)
