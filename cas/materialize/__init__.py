"""Materialize: make a file or folder equal to a manifest, crash-safely.

Two phases, under a lock on the state folder (:mod:`.lock`):

1. *Prepare* (:mod:`.staging`, :mod:`.fill`). Every file that changes is written aside (a
   staging file in the state folder, pre-allocated, filled from local sources first and the
   remote source for the rest), or, when only a small part of an existing file changes, the
   new ranges are written into a journal data file. Everything is fsynced. No user file is
   touched; failure here (a missing or corrupt chunk, an origin that dies, a full disk)
   leaves the tree as it was; what was staged is kept as ``resume/`` (:mod:`.resume`) so the
   next sync does not fetch it again. What would make the commit unappliable is refused
   before it (:mod:`.checks`).
2. *Commit and apply* (:mod:`.journal`, :mod:`.apply`). The list of operations is written and
   fsynced, then renamed into place: that rename is the commit point. The operations (rename
   staging files over targets, patch ranges from the journal, make directories and links,
   set modes, remove extras) are each idempotent, so a process killed while applying them is
   finished by the next :func:`recover` (:mod:`.recover`, run at the start of every
   materialize): every file ends old or new, never torn.

The journal format is specified in docs/format.md ("Materialize journal").
"""

from __future__ import annotations

from ..fsutil import SYNCFS_MIN_FILES
from .files import BACKDATE_NS, MAX_OPEN_FILES
from .fill import WRITEBACK_EVERY
from .journal import JOURNAL_FORMAT, JOURNAL_VERSION
from .lock import locked
from .recover import recover
from .resume import RESUME_FORMAT, RESUME_INDEX
from .run import MaterializeResult, materialize

__all__ = [
    "BACKDATE_NS",
    "JOURNAL_FORMAT",
    "JOURNAL_VERSION",
    "MAX_OPEN_FILES",
    "RESUME_FORMAT",
    "RESUME_INDEX",
    "SYNCFS_MIN_FILES",
    "WRITEBACK_EVERY",
    "MaterializeResult",
    "locked",
    "materialize",
    "recover",
]
