"""Which run of its origin produced a tree: the order of a Path's versions.

A Path's files change only while its origin work runs. Every manifest an origin serves, and
every manifest it persists, is stamped with a :class:`Version` saying which run produced that
state, so that a consumer can tell whether a tree is older than the one it holds:

- ``app_run``: when the app run started (nanoseconds since the epoch, from the flow's clock),
  so that a later app run on the same root orders after an earlier one;
- ``run``: how many ``run()`` calls of the origin work had started in that app run (0 before
  the first);
- ``phase``: ``DURING`` while run number ``run`` is in progress, ``ENDED`` once it returned
  (or ``stop()`` ended it).

Versions order lexicographically: the state at the end of run *n* is newer than any state
seen during run *n*, and older than any state seen during run *n + 1*. A version crosses
processes (as the ``X-Pathapi-Version`` header of the origin protocol) and rests on disk
(in persisted refs, see :mod:`pathapi.artifacts`); its text form is ``APP_RUN.RUN.PHASE``,
specified in docs/format.md ("Versions").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

_TEXT = re.compile(r"(\d{1,20})\.(\d{1,12})\.([01])")


@dataclass(frozen=True, order=True)
class Version:
    app_run: int
    run: int
    phase: int

    DURING: ClassVar[int] = 0
    ENDED: ClassVar[int] = 1

    def __str__(self) -> str:
        return f"{self.app_run}.{self.run}.{self.phase}"

    @classmethod
    def parse(cls, text: str) -> Version:
        """The version written by ``str(version)``; ``ValueError`` on anything else."""
        m = _TEXT.fullmatch(text)
        if m is None:
            raise ValueError(f"not a version (APP_RUN.RUN.PHASE): {text[:80]!r}")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))

    def describe(self) -> str:
        """For messages: ``run 3 of the app run started at 2026-12-07 06:18:01 UTC (ended)``."""
        import time

        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.app_run / 1e9))
        state = "ended" if self.phase == Version.ENDED else "in progress"
        return f"run {self.run} of the app run started at {started} ({state})"


#: The version of a tree persisted before versions existed: older than every stamped one.
UNKNOWN = Version(0, 0, 0)
