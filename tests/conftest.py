"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
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


@pytest.fixture(scope="module")
def close_client_sessions() -> Iterator[None]:
    """Close the origin clients' HTTP sessions (kept open across requests, one per event
    loop) once a module is done with them: a module that talks to origins in this process
    uses it (``pytestmark = pytest.mark.usefixtures("close_client_sessions")``)."""
    yield
    from pathapi.aio import io_loop
    from pathapi.wire.client import close_sessions

    io_loop().run(close_sessions(), timeout=10)
