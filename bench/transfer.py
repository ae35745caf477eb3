"""First get, re-get and 1 % scattered edits of a checkpoint between two works, next to
``cp`` + fsync and ``rsync`` in the same run: the first three scenarios of the suite.

    python -m bench.transfer [--size 1G] [--repeat 3] [--dir DIR]

Kept as a shortcut; ``python -m bench`` runs every scenario and writes docs/benchmarks.md.
This prints the results table and writes the JSON to bench/results/ only.
"""

from __future__ import annotations

import sys

from .__main__ import main as bench_main


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    bench_main(["--scenarios", "first,reget,edits", "--no-docs", *args])


if __name__ == "__main__":
    main()
