"""Recovery at the start of every materialize: a committed journal is finished, an
uncommitted transaction is kept for resume."""

from __future__ import annotations

import logging
import os
import shutil

from ..errors import MaterializeError
from ..fsutil import fsync_dir
from . import journal
from .apply import apply
from .resume import keep_for_resume

_log = logging.getLogger("cas.materialize")


def recover(state_dir: str | os.PathLike[str]) -> bool:
    """Finish a committed, half-applied materialize, or discard an uncommitted one.

    Call with :func:`locked` held. Returns True if a committed journal was replayed.
    """
    txn = os.path.join(os.fspath(state_dir), "txn")
    ops_path = os.path.join(txn, "ops")
    replayed = False
    if os.path.exists(ops_path):
        try:
            committed = journal.load(ops_path)
            apply(committed.dest, txn, committed.ops)
            replayed = True
        except (OSError, MaterializeError) as e:
            # It cannot be finished now (a folder made read-only, a file where a folder must
            # go, a damaged journal...). The sync that committed it reported its destination
            # as partly updated; its staged files are kept for resume below, and the next
            # sync of that destination plans afresh from what is there. Never fatal here:
            # one destination's trouble must not block syncs of the others.
            _log.warning("abandoned the unfinished sync recorded in %s (the next sync of its destination "
                         "completes that destination): %s", ops_path, e)
    if os.path.lexists(txn):
        if replayed:
            shutil.rmtree(txn)
        else:
            keep_for_resume(os.fspath(state_dir))
        fsync_dir(state_dir)
    return replayed
