"""``python -m bench``: every benchmark, one command; results to bench/results/ and docs/.

    python -m bench                         # 1 GiB checkpoint, 100k small files, 3 repeats, all scenarios
    python -m bench --size 64M --files 10k --repeat 1 --scenarios first,reget,edits
    python -m bench --report bench/results/latest.json   # re-render docs/ from saved results

Scenarios: first, reget, edits, insert, nextstep, small, fanout, persist (transfers, one
App), rss (a first get of a --rss-size checkpoint: peak RSS per process), snapshot (the
read + chunk + hash pipeline against FastCDC and BLAKE3 alone and together).

Not tests: nothing here asserts a goal. The report says which goals were met, in one run,
with each of pathapi's figures next to its peers' measured right beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import report, rss, snapshot, suite

ALL = ["first", "reget", "edits", "insert", "nextstep", "small", "fanout", "persist", "rss", "snapshot"]
TRANSFER = {"first", "reget", "edits", "insert", "nextstep", "small", "fanout", "persist"}
RESULTS = Path(__file__).resolve().parent / "results"


def parse_size(text: str) -> int:
    """``1G``, ``64M``, ``512K``, ``1.5G`` or a byte count (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def parse_count(text: str) -> int:
    t = text.strip().lower()
    return int(float(t[:-1]) * 1000) if t.endswith("k") else int(t)


def _save(res: dict[str, object], partial: bool = False) -> Path:
    """Write the results (also as latest.json); ``partial`` while scenarios are still to run,
    so that a long run interrupted later keeps what it measured."""
    RESULTS.mkdir(exist_ok=True)
    stamp = str(res["started"]).replace(":", "").replace("-", "")[:15].replace("T", "-")
    out = RESULTS / f"{stamp}{'.partial' if partial else ''}.json"
    out.write_text(json.dumps(res, indent=1))
    if not partial:
        (RESULTS / "latest.json").write_text(json.dumps(res, indent=1))
        out.with_name(out.stem + ".partial.json").unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="checkpoint size (default 1G)")
    ap.add_argument("--rss-size", type=parse_size, default=4 << 30, help="checkpoint size for the rss scenario (default 4G)")
    ap.add_argument("--files", type=parse_count, default=100_000, help="small files for scenario 6 (default 100k)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of each measurement; the median is reported (default 3)")
    ap.add_argument("--small-repeat", type=int, default=1,
                    help="repeats for the small-files scenario (default 1: 100k files take minutes per tool)")
    ap.add_argument("--fan-repeat", type=int, default=1,
                    help="repeats for the 8-consumer scenario (default 1: each writes 8x the checkpoint per tool)")
    ap.add_argument("--scenarios", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--dir", default=None, help="where to make the data (default: a temp dir; removed after)")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds the disk settles (after a sync) before each measurement")
    ap.add_argument("--keep", action="store_true", help="keep the data folder")
    ap.add_argument("--no-docs", action="store_true", help="write results JSON only, not docs/")
    ap.add_argument("--tls", action="store_true",
                    help="the transfer scenarios with TLS between the works (App(tls=True)), as on a cluster")
    ap.add_argument("--cluster", choices=["local", "ray"], default="local",
                    help="where the works run: local processes (default), or the nodes of a Ray cluster started on "
                         "this machine for the run (a head and 3 one-CPU nodes on loopback; TLS on, as on any cluster)")
    ap.add_argument("--no-same-host", action="store_true",
                    help="turn the same-host fast path off (PATHAPI_SAME_HOST=0): every chunk crosses the origin's "
                         "socket, as between machines")
    ap.add_argument("--report", metavar="JSON", help="only render docs/ from a saved results file")
    ap.add_argument("--rerun", metavar="JSON", action="append", default=[],
                    help="with --report: a later run whose scenarios replace the same scenarios of the first "
                         "(each is named, with its own command and load, in the docs)")
    args = ap.parse_args(argv)

    if args.report:
        res = json.loads(Path(args.report).read_text())
        reruns = [(json.loads(Path(p).read_text()), Path(p)) for p in args.rerun]
        report.write_docs(report.merge(res, reruns), Path(args.report), reruns)
        return
    if args.no_same_host:
        os.environ["PATHAPI_SAME_HOST"] = "0"  # inherited by every work process
    want = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(want) - set(ALL)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; choose from {ALL}")
    cmd = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, object] = {
        "command": cmd.strip(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "load_at_start": os.getloadavg()},
        "size": args.size, "rss_size": args.rss_size, "files": args.files, "repeat": args.repeat,
        "small_repeat": args.small_repeat, "fan_repeat": args.fan_repeat, "scenarios": want, "tls": args.tls,
        "cluster": args.cluster, "same_host": not args.no_same_host,
        "aggregate": "median of the repeats (seconds); bytes of the median repeat; peak RSS: max over repeats",
    }
    base = Path(tempfile.mkdtemp(prefix="pathapi-bench-", dir=args.dir))
    try:
        if TRANSFER & set(want):
            cfg = {"base": str(base / "transfers"), "size": args.size, "files": args.files, "repeat": args.repeat,
                   "small_repeat": args.small_repeat, "fan_repeat": args.fan_repeat, "scenarios": want,
                   "pause": args.pause, "tls": args.tls, "cluster": args.cluster}
            res["transfers"] = suite.run_transfers(cfg)
            _save(res, partial=True)
            if not args.keep:
                shutil.rmtree(base / "transfers", ignore_errors=True)
        if "rss" in want:
            res["rss"] = rss.run(base / "rss", args.rss_size, args.pause)
            if not args.keep:
                shutil.rmtree(base / "rss", ignore_errors=True)
        if "snapshot" in want:
            res["snapshot"] = snapshot.run(base / "snapshot", args.size)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"data kept in {base}", file=sys.stderr)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    res["machine"]["load_at_end"] = os.getloadavg()  # type: ignore[index]
    out = _save(res)
    print(f"results: {out}", file=sys.stderr)
    if not args.no_docs:
        report.write_docs(res, out)
    print(report.markdown_table(res))


if __name__ == "__main__":
    main()
