"""Turn a results JSON into docs/benchmarks.md (tables, goals met or missed) and
docs/benchmarks.png (the chart the README links). Every number comes from the JSON;
the prose under "Where the time goes" is bench/analysis.md, written by hand from profiles.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .measure import median

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MiB = 1 << 20
TOOLS = ["pathapi", "cp", "rsync", "lightning"]
PEERS = ["cp", "rsync", "lightning"]
TITLES = {
    "first_cold": "1. first get, origin never read the files",
    "first": "1. first get (empty receiver)",
    "reget": "2. unchanged re-get",
    "edits": "3. 1% scattered edits (100 regions)",
    "insert": "4. 100-byte insert in the middle",
    "nextstep": "5. next training step (tensor perturbed + new file)",
    "small_first": "6. small files, first get",
    "small_1pct": "6. small files, re-get after 1% changed",
    "fan_1": "7. one consumer (flow-timed)",
    "fan_8": "7. 8 consumers at once (flow-timed)",
    "persist_quiet": "first get, origin idle",
    "persist_busy": "first get while the origin persists",
}


def merge(res: dict[str, Any], reruns: list[tuple[dict[str, Any], Path]]) -> dict[str, Any]:
    """``res`` with the transfer rows of each rerun's scenarios replacing its own (a scenario
    measured again, e.g. after a fix, in a run of its own with its peers beside it)."""
    out = json.loads(json.dumps(res))
    for rr, path in reruns:
        rows = rr.get("transfers", {}).get("rows", [])
        scen = {r["scenario"] for r in rows}
        out["transfers"]["rows"] = [r for r in out["transfers"]["rows"] if r["scenario"] not in scen] + [
            {**r, "run": os.path.relpath(path, ROOT)} for r in rows]
    return out


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> tool -> {seconds (median), min, max, n, bytes_moved (of the median
    repeat), peak RSS (max over repeats), the median repeat's row}."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["scenario"], r["tool"])].append(r)
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (sc, tool), rs in groups.items():
        secs = [r["seconds"] for r in rs]
        mid = sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2]
        out[sc][tool] = {
            "seconds": median(secs), "min": min(secs), "max": max(secs), "n": len(rs),
            "bytes_moved": mid["bytes_moved"],
            "rss_max_process": max(r.get("peak_rss_max_process_MiB", 0) for r in rs),
            "rss_total": max(r.get("peak_rss_total_MiB", 0) for r in rs),
            "row": mid,
        }
    for tools in out.values():
        peer = [v["seconds"] for t, v in tools.items() if t in PEERS]
        best = min(peer) if peer else None
        for v in tools.values():
            v["vs_best_peer"] = v["seconds"] / best if best else None
    return out


def _fmt_bytes(n: int | None) -> str:
    if n is None or n < 0:
        return "?"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def _fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def markdown_table(res: dict[str, Any]) -> str:
    tr = res.get("transfers")
    if not tr:
        return ""
    agg = aggregate(tr["rows"])
    lines = [
        "| scenario | tool | seconds (median) | min-max | bytes moved | peak RSS, largest process | peak RSS, all processes | x best peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in TITLES:
        if sc not in agg:
            continue
        for tool in TOOLS:
            v = agg[sc].get(tool)
            if v is None:
                continue
            ratio = f"{v['vs_best_peer']:.2f}x" if v["vs_best_peer"] is not None else ""
            lines.append(
                f"| {TITLES[sc]} | {'**pathapi**' if tool == 'pathapi' else tool} | {_fmt_s(v['seconds'])} | "
                f"{_fmt_s(v['min'])}-{_fmt_s(v['max'])} | {_fmt_bytes(v['bytes_moved'])} | "
                f"{v['rss_max_process']:.0f} MiB | {v['rss_total']:.0f} MiB | {ratio} |"
            )
    return "\n".join(lines)


def goals(res: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(scenario, goal, measured, met) for each goal of issue 5 the run covered."""
    out: list[tuple[str, str, str, bool | None]] = []
    tr = res.get("transfers")
    agg = aggregate(tr["rows"]) if tr else {}

    def s(sc: str, tool: str) -> float | None:
        v = agg.get(sc, {}).get(tool)
        return v["seconds"] if v else None

    ours = lambda sc: agg.get(sc, {}).get("pathapi")
    size = f"{res['size'] / (1 << 30):g} GiB"
    if ours("first") and s("first", "cp") and s("first", "rsync"):
        r_cp, r_rs = s("first", "pathapi") / s("first", "cp"), s("first", "pathapi") / s("first", "rsync")
        out.append((f"first get {size}", "<= 1.2x cp+fsync", f"{r_cp:.2f}x cp", r_cp <= 1.2))
        out.append((f"first get {size}", "faster than rsync", f"{r_rs:.2f}x rsync", r_rs < 1))
    if ours("reget") and ours("first"):
        b = ours("reget")["bytes_moved"]
        r = s("reget", "pathapi") / s("first", "pathapi")
        out.append(("unchanged re-get", "0 payload bytes", f"{b} B", b == 0))
        out.append(("unchanged re-get", "<= 5% of first-get time", f"{100 * r:.1f}% of first get", r <= 0.05))
    if ours("edits") and s("edits", "rsync"):
        row = ours("edits")["row"]
        fsize = tr["checkpoint_files"]["model.f32"]
        pct = 100 * ours("edits")["bytes_moved"] / fsize
        r = s("edits", "pathapi") / s("edits", "rsync")
        out.append(("1% scattered edits", "<= 1.5% of bytes moved",
                    f"{pct:.2f}% of the edited file ({100 * row['bytes_changed'] / fsize:.2f}% changed)", pct <= 1.5))
        out.append(("1% scattered edits", "<= 0.25x rsync's time", f"{r:.2f}x rsync", r <= 0.25))
    if ours("insert") and s("insert", "rsync"):
        n = ours("insert")["row"]["chunks_transferred"]
        r = s("insert", "pathapi") / s("insert", "rsync")
        out.append(("100 B insert", "<= 2 chunks moved", f"{n} chunk{'s' if n != 1 else ''}", n <= 2))
        out.append(("100 B insert", "<= 0.1x rsync's time", f"{r:.2f}x rsync", r <= 0.1))
    for sc, what in (("small_first", "first"), ("small_1pct", "re-get")):
        if ours(sc) and s(sc, "rsync"):
            r = s(sc, "pathapi") / s(sc, "rsync")
            out.append((f"{res['files']} small files, {what}", "<= rsync's time", f"{r:.2f}x rsync", r <= 1))
    if ours("fan_8") and ours("fan_1"):
        row = ours("fan_8")["row"]
        reads, distinct = row.get("origin_chunk_reads"), row.get("distinct_chunks")
        r = s("fan_8", "pathapi") / s("fan_1", "pathapi")
        cp = (f" (8 cp at once: {s('fan_8', 'cp') / s('first', 'cp'):.2f}x one cp)"
              if s("fan_8", "cp") and s("first", "cp") else "")
        out.append(("8 consumers", "the origin reads each chunk from disk once",
                    f"{reads} chunk reads for {distinct} distinct chunks", reads is not None and reads <= distinct))
        out.append(("8 consumers", "total <= 3x one consumer", f"{r:.2f}x one consumer{cp}", r <= 3))
    if res.get("rss"):
        m = res["rss"]["peak_rss_max_process_MiB"]
        out.append((f"peak RSS moving {res['rss']['size'] / (1 << 30):g} GiB", "<= 256 MiB per process",
                    f"{m:.0f} MiB (largest process)", m <= 256))
    return out


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(res["transfers"]["rows"])
    scen = [sc for sc in TITLES if sc in agg and not sc.startswith("persist")]
    colors = {"pathapi": "#1f77b4", "cp": "#7f7f7f", "rsync": "#ff7f0e", "lightning": "#9467bd"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.55 * len(scen) + 1.8), sharey=True)
    h = 0.8 / len(TOOLS)
    for ax, key, label in ((axes[0], "seconds", "seconds (median, log scale)"),
                           (axes[1], "bytes_moved", "bytes moved (MiB, log scale)")):
        for j, tool in enumerate(TOOLS):
            ys, xs = [], []
            for i, sc in enumerate(scen):
                v = agg[sc].get(tool)
                if v is None:
                    continue
                x = v[key] / (MiB if key == "bytes_moved" else 1)
                ys.append(i + (j - 1.5) * h)
                xs.append(max(x, 1e-3))
            ax.barh(ys, xs, height=h, color=colors[tool], label=tool)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(scen)), [TITLES[s] for s in scen], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    size = res["size"] / (1 << 30)
    fig.suptitle(f"pathapi vs peers, {size:g} GiB checkpoint, {res['files']} small files; median of "
                 f"{res['repeat']} (small files: {res.get('small_repeat', res['repeat'])}, 8 consumers: "
                 f"{res.get('fan_repeat', res['repeat'])}); 2 shared vCPUs, load {res['machine']['load_at_start'][0]:.1f} "
                 "at start", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(res: dict[str, Any], source: Path, reruns: list[tuple[dict[str, Any], Path]] | None = None) -> None:
    DOCS.mkdir(exist_ok=True)
    rel = os.path.relpath(source, ROOT)
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench` (bench/report.py) from "
        f"[`{rel}`](../{rel}); do not edit by hand: re-run, or re-render with "
        f"`python -m bench --report {rel}"
        + "".join(f" --rerun {os.path.relpath(p, ROOT)}" for _, p in (reruns or []))
        + "`. The prose under \"Where the time goes\" is "
        "[bench/analysis.md](../bench/analysis.md).",
        "",
        f"Command: `{res['command']}`  ",
        f"Run: {res['started']} to {res.get('finished', '?')} on {res['machine']['cpus']} vCPUs "
        f"(load at start {', '.join(f'{x:.2f}' for x in res['machine']['load_at_start'])}), "
        f"Python {res['machine']['python']}, kernel {res['machine']['kernel']}.",
        "",
        *[f"Re-run: scenarios {', '.join(sorted({r['scenario'] for r in rr['transfers']['rows']}))} come from "
          f"[`{os.path.relpath(p, ROOT)}`](../{os.path.relpath(p, ROOT)}) (`{rr['command']}`, {rr['started']}, load at "
          f"start {', '.join(f'{x:.2f}' for x in rr['machine']['load_at_start'])}), measured again after a fix, "
          "each tool beside the others in that run." for rr, p in (reruns or [])],
        "",
        "## How it is measured",
        "",
        "- Data: a checkpoint folder (float32 weights, bf16 weights, Adam state, random bytes, a JSON; see "
        "bench/data.py) and a tree of small files (1-8 KiB).",
        "- pathapi: through the public API, an App with an origin work and consumer works; the time is the "
        "consumer's `get` (`Path.last_transfer.seconds`: manifest request, the origin's snapshot of changed "
        "files, transfer, verification, durable write), bytes are payload bytes that crossed the socket.",
        "- Peers, each right next to each pathapi get with the disk settled (`sync` + pause) between any two "
        "measurements: `cp -r` + fsync (the floor for a first copy; no incremental mode), "
        "`rsync -a --no-whole-file` into a folder that keeps its last copy (its delta path), and a model of "
        "the original Lightning transfer (origin -> shared staging -> receiver, whole, every get; "
        "bench/lightning_model.py). Every tool's receiver copy is made durable the same way (fsync per file, "
        "one syncfs beyond 32 files).",
        f"- Aggregation: {res['aggregate']}. Peak RSS: VmHWM of the work processes (reset at the start of each "
        "measurement; read at its end) and of every command a peer runs and its children (polled every 50 ms); "
        "\"largest process\" is the goal's "
        "per-process figure, \"all processes\" the sum of the per-process peaks.",
        "- x best peer: median seconds over the fastest peer's median seconds in that scenario.",
        "",
        "## Goals (issue 5)",
        "",
        "| scenario | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for sc, goal, measured, met in goals(res):
        parts.append(f"| {sc} | {goal} | {measured} | {'yes' if met else 'NO' if met is not None else '?'} |")
    if res.get("transfers"):
        parts += ["", "## Transfers", "", "![pathapi vs peers](benchmarks.png)", "", markdown_table(res), ""]
        tr = res["transfers"]
        agg = aggregate(tr["rows"])
        files = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in tr["checkpoint_files"].items())
        parts.append(f"Checkpoint files: {files}. Small files: {res['files']}, {_fmt_bytes(tr['small_files_bytes'])}.")
        if "small_origin_first_snapshot_s" in tr["notes"]:
            parts.append(f"The small-files origin's first snapshot of its tree (before the first gets, as its "
                         f"persist would have done): {tr['notes']['small_origin_first_snapshot_s']:.1f} s.")
        fan = agg.get("fan_8", {}).get("pathapi")
        if fan:
            st = fan["row"].get("origin_stats", {})
            parts += ["", f"8 consumers: origin chunk reads {fan['row'].get('origin_chunk_reads')} for "
                      f"{fan['row'].get('distinct_chunks')} distinct chunks; per-consumer get seconds "
                      f"{', '.join(f'{x:.2f}' for x in fan['row'].get('per_consumer_seconds', []))}; origin frame "
                      f"cache after the run: {st.get('cache')}."]
        q, b = agg.get("persist_quiet", {}).get("pathapi"), agg.get("persist_busy", {}).get("pathapi")
        if q and b:
            parts += ["", f"Persist contention: a first get took {q['seconds']:.2f} s with the origin idle and "
                      f"{b['seconds']:.2f} s ({b['seconds'] / q['seconds']:.2f}x) while the origin persisted the "
                      f"same checkpoint to its artifact store (the persist took "
                      f"{tr['notes'].get('persist_seconds', float('nan')):.2f} s from the end of the origin's run)."]
        chart(res, DOCS / "benchmarks.png")
    if res.get("rss"):
        r = res["rss"]
        parts += ["", "## Memory", "",
                  f"A first get of a {r['size'] / (1 << 30):g} GiB checkpoint (the origin snapshots it inside the "
                  f"get): {r['seconds']:.1f} s (cp + fsync: {r['cp_seconds']:.1f} s). Peak RSS per process: "
                  + ", ".join(f"{k} {v:.0f} MiB" for k, v in r["processes"].items()) + "."]
    if res.get("snapshot"):
        t = res["snapshot"]["throughput"]
        rs = res["snapshot"]["resnapshot"]
        parts += ["", "## Snapshot pipeline vs its physical limit", "",
                  f"On one {_fmt_bytes(t['size_bytes'])} buffer of random bytes (file in page cache):", "",
                  "| what | GB/s |", "|---|---:|",
                  f"| FastCDC alone (1 thread) | {t['fastcdc_GBps']:.2f} |",
                  f"| BLAKE3 alone, 1 thread | {t['blake3_1t_GBps']:.2f} |",
                  f"| BLAKE3 alone, 2 threads | {t['blake3_2t_GBps']:.2f} |",
                  f"| FastCDC and BLAKE3 concurrently on two threads (the ceiling here) | "
                  f"{t['fastcdc_and_blake3_concurrently_GBps']:.2f} |",
                  f"| **snapshot: read + chunk + hash** | **{t['snapshot_GBps']:.2f}** |",
                  "",
                  f"The snapshot runs at {100 * t['snapshot_vs_concurrent_ceiling']:.0f}% of the concurrent ceiling "
                  f"({100 * t['snapshot_vs_slower_stage']:.0f}% of the slower stage alone). Re-snapshot of the "
                  f"unchanged file: {rs['resnapshot_ms']:.2f} ms."]
    analysis = Path(__file__).resolve().parent / "analysis.md"
    if analysis.exists():
        parts += ["", analysis.read_text().rstrip()]
    (DOCS / "benchmarks.md").write_text("\n".join(parts) + "\n")
