"""``App(cluster=...)``: which runner runs the works, and the store rule for clusters.

``"local"`` (the default) runs each work in a local process; ``"ray"`` runs each as a Ray
actor on the cluster that ``RAY_ADDRESS`` names (the one started on this machine with
``ray start`` when it is unset); ``"ray://HOST:PORT"`` on the cluster whose Ray Client
server listens there. Ray is imported only for a Ray cluster, so it stays an extra
(``pip install 'pathapi[ray]'``).

Works on several machines can only fall back to persisted artifacts that all of them reach:
a local-folder artifact store is refused on a cluster unless declared shared
(:class:`SharedFolder`, e.g. an NFS mount present at the same path on every node).
"""

from __future__ import annotations

import importlib.util
import os

from .process import LocalProcessRunner
from .runner import Runner

LOCAL = "local"


class SharedFolder(os.PathLike[str]):
    """An artifact store folder that every node of the cluster sees at the same path (a
    network filesystem): ``App(flow, cluster="ray", store=SharedFolder("/mnt/shared/store"))``.
    Stating it is the user's promise; pathapi cannot check that other machines see the folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"SharedFolder({self.path!r})"


def ray_address(cluster: str) -> str:
    """The address ``ray.init`` is given for ``cluster`` ("ray" or "ray://HOST:PORT")."""
    if cluster == "ray":
        return os.environ.get("RAY_ADDRESS") or "auto"
    return cluster


def runner_for(cluster: str) -> Runner:
    """The runner of ``App(cluster=cluster)``; ValueError for a value no runner reads, and
    ImportError (saying what to install) for a Ray cluster without Ray."""
    if cluster == LOCAL:
        return LocalProcessRunner()
    if cluster == "ray" or cluster.startswith("ray://"):
        if importlib.util.find_spec("ray") is None:
            raise ImportError(f"cluster={cluster!r} needs Ray, which is not installed: pip install 'pathapi[ray]'")
        from .ray_runner import RayRunner

        return RayRunner(ray_address(cluster))
    raise ValueError(f"cluster={cluster!r}: give 'local' (works as local processes, the default), "
                     "'ray' (the Ray cluster RAY_ADDRESS names) or 'ray://HOST:PORT'")


def check_store(store: str | os.PathLike[str] | None, runner: Runner) -> None:
    """Refuse a store that works on other machines cannot reach: ValueError saying what to give."""
    if not runner.needs_shared_store or isinstance(store, SharedFolder):
        return
    text = os.fspath(store) if store is not None else None
    if text is not None and "://" in text and not text.startswith("file://"):
        return  # s3://: every node reaches the bucket
    where = f"the folder {text}" if text is not None else "the default folder under the app root"
    raise ValueError(
        f"works on a cluster run on several machines, and the artifact store is {where}, which only this "
        "machine sees: give store='s3://bucket/prefix', or store=SharedFolder(path) for a folder every node "
        "mounts at the same path"
    )
