"""Markdown tables and PNG plots from results files (JSON lines in bench/results/)."""

from __future__ import annotations

import glob
import os
from collections import Counter, OrderedDict
from typing import Any

from harness.scenarios import FLEETSYNC, PEERS, TOOL_TITLES
from harness.util import BENCH, RESULTS, load_results, median


def fmt(value: float | None, unit: str) -> str:
    """A value with its unit, human-sized."""
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.3f} s" if value < 1 else f"{value:.2f} s" if value < 100 else f"{value:.0f} s"
    if unit == "ms":
        return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"
    if unit == "bytes":
        if value >= 1e9:
            return f"{value / 1e9:.2f} GB"
        if value >= 1e6:
            return f"{value / 1e6:.1f} MB"
        return f"{value / 1e3:.1f} kB"
    if unit == "x":
        return f"{value:.2f}"
    return f"{value:g} {unit}"


def cell(rec: dict[str, Any] | None) -> str:
    """Table cell for one record."""
    if rec is None:
        return "n/a"
    if rec["status"] != "ok":
        return "**FAILED**"
    return fmt(rec["value"], rec["unit"])


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """fleetsync / peer."""
    if not a or not b or a["status"] != "ok" or b["status"] != "ok" or not b["value"] or a["value"] is None:
        return "—"
    r = a["value"] / b["value"]
    return f"{r:.3f}×" if r < 0.1 else f"{r:.2f}×"


def table(records: list[dict[str, Any]], peers: list[str] | None = None) -> str:
    """The results table: one row per (scenario, metric); fleetsync, then each peer and the ratio."""
    rows: "OrderedDict[tuple[str, str, int], dict[str, dict[str, Any]]]" = OrderedDict()
    for r in records:
        if r["scenario"] == "setup":
            continue
        key = (r["scenario"], r["metric"], r.get("n_files", 0))
        rows.setdefault(key, {})[r["tool"]] = r  # the last record of a tool wins
    present = {t for v in rows.values() for t in v}
    peers = [p for p in (peers or PEERS) if p in present]
    head = ["scenario", "files", "metric", TOOL_TITLES[FLEETSYNC]]
    for p in peers:
        head += [TOOL_TITLES[p], f"fleetsync / {p}"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (sc, metric, n), by_tool in rows.items():
        fs = by_tool.get(FLEETSYNC)
        line = [sc, f"{n:,}", metric, cell(fs)]
        for p in peers:
            line += [cell(by_tool.get(p)), ratio(fs, by_tool.get(p))]
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def setup_lines(records: list[dict[str, Any]]) -> list[str]:
    """Corpus and initial-index facts."""
    out = []
    for r in records:
        if r["scenario"] != "setup":
            continue
        d = r.get("detail", {})
        if r["metric"] == "corpus":
            out.append(f"- corpus: {d.get('files'):,} files in {d.get('dirs'):,} directories, "
                       f"{d.get('bytes', 0) / 1e6:,.0f} MB (seed {d.get('seed')}, {d.get('huge_dirs')} directories "
                       f"of 20k files), generated in {r['value']:.1f} s")
        elif r["metric"].startswith("foreign CPU"):
            if d.get("share", 0) > 0.05:
                out.append(f"- WARNING {r['metric']}: other processes used {r['value']:.0f} CPU-s "
                           f"({d['share'] * 100:.0f}% of the machine; top {d.get('top_foreign')})")
        elif r["metric"] == "origin initial index":
            out.append(f"- fleetsync origin initial index: {d.get('entries'):,} entries in {r['value']:.1f} s "
                       f"(peak RSS so far {(d.get('vmhwm') or 0) / 1e6:.0f} MB)")
    return out


def failures(records: list[dict[str, Any]]) -> list[str]:
    """Why each FAILED measurement failed."""
    return [f"- {r['scenario']} / {r['metric']} / {r['tool']}: {r.get('detail', {}).get('error', '')[:500]}"
            for r in records if r["status"] != "ok"]


def latest_results() -> str | None:
    """The newest results file."""
    files = sorted(glob.glob(os.path.join(RESULTS, "*.jsonl")), key=os.path.getmtime)
    return files[-1] if files else None


def plots(paths: list[str], out_dir: str | None = None) -> list[str]:
    """Latency distribution (CDF) and round time vs tree size; returns the PNG files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: .venv/bin/pip install matplotlib  (plots skipped)")
        return []
    out_dir = out_dir or os.path.join(BENCH, "plots")
    os.makedirs(out_dir, exist_ok=True)
    recs = [r for p in paths for r in load_results(p)]
    written = []
    # Latency CDF: the latest p50 record per tool carries the samples.
    lat: dict[str, tuple[int, list[float]]] = {}
    for r in recs:
        if r["scenario"] == "latency" and r["metric"] == "p50" and r["status"] == "ok":
            lat[r["tool"]] = (r.get("n_files", 0), r["detail"]["samples"])
    if lat:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for tool, (n, xs) in lat.items():
            xs = sorted(xs)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{TOOL_TITLES.get(tool, tool)} ({len(xs)} samples, {n:,} files)")
        ax.set_xscale("log")
        ax.set_xlabel("write on the origin → readable on all 3 replicas (ms, log scale)")
        ax.set_ylabel("fraction of samples")
        ax.set_title("Single-file latency (CDF)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        f = os.path.join(out_dir, "latency_cdf.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        written.append(f)
    # Round time vs tree size: median over every ok round record per (tool, n_files).
    rt: dict[str, dict[int, list[float]]] = {}
    round_metrics = Counter(r["metric"] for r in recs if r["scenario"] == "round" and r["metric"].endswith("converged"))
    main_metric = round_metrics.most_common(1)[0][0] if round_metrics else ""
    for r in recs:
        if r["scenario"] == "round" and r["metric"] == main_metric and r["status"] == "ok":
            rt.setdefault(r["tool"], {}).setdefault(r.get("n_files", 0), []).extend(r["detail"].get("samples")
                                                                                     or [r["value"]])
    if rt:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for tool, by_n in rt.items():
            ns = sorted(by_n)
            ax.plot(ns, [median(by_n[n]) for n in ns], marker="o", label=TOOL_TITLES.get(tool, tool))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("files in the tree (log scale)")
        ax.set_ylabel("seconds, last write → 3 replicas converged (log)")
        ax.set_title(f"{main_metric.split(',')[0]}: time vs tree size (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        f = os.path.join(out_dir, "round_vs_size.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        written.append(f)
    return written
