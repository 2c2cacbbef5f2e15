#!/usr/bin/env python3
"""fleetsync benchmark harness: fleetsync side by side with `rsync -a --delete` and lsyncd.

    make bench                               # every scenario at 100k files (tens of minutes)
    make bench ARGS="--quick"                # small sizes, about two minutes
    make bench ARGS="round latency"          # only some scenarios
    make bench ARGS="--million"              # round + memory at 1M files (~27 GB per tree copy, 8 copies)
    .venv/bin/python bench/run.py report [RESULTS.jsonl]   # table of a results file (default: newest)
    .venv/bin/python bench/run.py plot [RESULTS.jsonl ...] # PNGs into bench/plots/

Scenarios: bootstrap, round (also measures egress), latency, burst, memory, egress (= round). Every
process runs on loopback; corpora live in a scratch directory that is deleted afterwards unless --keep.
Results are appended as JSON lines to bench/results/<run-id>.jsonl and printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness.util import REPO, CpuAudit, Results, git_dirty, git_rev, load_results, log, machine  # noqa: E402

ORDER = ["bootstrap", "round", "latency", "burst", "memory", "egress"]
#: Bytes of disk per corpus file, a little above the generator's mean (~22 KB) plus block overhead.
BYTES_PER_FILE = 27_000
#: Tree copies on disk at once besides the fleetsync replicas: the origin and a bootstrap target;
BASE_COPIES = 2
#: and the peers' 3 target dirs when any peer runs.
PEER_COPIES = 3


def parse(argv: list[str]) -> argparse.Namespace:
    """Command line."""
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", metavar="SCENARIO",
                    help="all (default), bootstrap, round, latency, burst, memory, egress; or 'report', 'plot'")
    ap.add_argument("--quick", action="store_true", help="small sizes (5k files, 200-change round, 2k burst)")
    ap.add_argument("--files", type=int, default=None, help="files in the origin tree (default 100000)")
    ap.add_argument("--million", action="store_true",
                    help="1,000,000 files; with no scenario given runs round and memory")
    ap.add_argument("--huge-dirs", type=int, default=None,
                    help="directories of 20k files in the corpus (default 1 at >=50k files, 3 at >=500k)")
    ap.add_argument("--changes", type=int, default=None, help="changes per round (default 1000)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per tool, median reported (default 3)")
    ap.add_argument("--burst", type=int, default=None, help="files in the burst (default 20000)")
    ap.add_argument("--samples", type=int, default=None, help="latency samples for fleetsync (default 50)")
    ap.add_argument("--peer-samples", default=None, metavar="RSYNC,LSYNCD1,LSYNCDDEF",
                    help="latency samples for rsync, lsyncd delay=1, lsyncd default (default 5,50,5)")
    ap.add_argument("--bootstrap-repeat", type=int, default=None, help="bootstrap repetitions (default 1)")
    ap.add_argument("--peers", default="rsync,lsyncd-d1,lsyncd-default",
                    help="comma list of peers: rsync, lsyncd-d1, lsyncd-default, or none (default: all three)")
    ap.add_argument("--replicas", type=int, default=3, choices=range(1, 10), metavar="N",
                    help="fleetsync replicas (default 3, as many as the peers' targets). Fewer shows what one "
                         "replica per host would see where all replicas share this machine's cores; the peers "
                         "keep 3 targets, so use it with --peers none")
    ap.add_argument("--settle", type=float, default=0.2, help="fleetsync origin --settle (default 0.2 s)")
    ap.add_argument("--detector", default="auto", choices=["auto", "inotify", "fanotify", "scan"],
                    help="the origin's --detector (default auto: fanotify when root, else inotify). On one host "
                         "fanotify also hears the replicas' writes, which a real fleet's origin would not")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before a run counts as FAILED")
    ap.add_argument("--poll", type=float, default=0.05,
                    help="interval of GET /v1/status while waiting for fleetsync to converge (default 0.05 s; "
                         "each call costs the origin a SELECT count(*) over the manifest)")
    ap.add_argument("--seed", type=int, default=1, help="corpus seed (default 1)")
    ap.add_argument("--size-scale", type=float, default=1.0, metavar="F",
                    help="multiply every generated file size by F (same file count and shape, F times the "
                         "bytes; e.g. 0.25 to fit 1M-file trees on a smaller disk). Default 1")
    ap.add_argument("--verify", choices=["auto", "each", "last", "meta"], default="auto",
                    help="full fingerprint (BLAKE3 of every file) after every round ('each'), or a metadata "
                         "comparison per round and the full one after each tool's last round ('last'), "
                         "metadata only ('meta': paths, kinds, modes, sizes, mtimes; for 1M runs on a slow "
                         "disk); 'auto' = each up to 100k files (default)")
    ap.add_argument("--workdir", default=None,
                    help="scratch dir for corpora (default: system temp dir if on the repo's disk, "
                         "else bench/work/); a run-<id> subdir is created and deleted unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (and print where it is)")
    ap.add_argument("--cold", action="store_true",
                    help="drop page caches (echo 3 > /proc/sys/vm/drop_caches) before each bootstrap and round run")
    ap.add_argument("--profile", action="store_true",
                    help="attach py-spy (record, raw collapsed stacks) to the origin and one replica")
    ap.add_argument("--profile-gil", action="store_true",
                    help="with --profile: only samples that hold the GIL (Python's own work, no system calls)")
    ap.add_argument("--debug-origin", action="store_true",
                    help="start the origin with -v (a debug line per committed batch, in logs/origin.log)")
    ap.add_argument("--debug-replicas", action="store_true",
                    help="start the replicas with -v: their logs (in the workdir's logs/, see --keep) get one "
                         "line per applied batch with its records and the time of each phase")
    ap.add_argument("--profile-dir", default=os.path.join(REPO, "bench", "profiles"))
    ap.add_argument("--force", action="store_true", help="run even if the disk space check fails")
    ap.add_argument("--rest", type=float, default=0.0, metavar="SECONDS",
                    help="before a timed measurement, wait until SECONDS have passed since the harness last "
                         "removed a tree (ext4 without a journal scans past inodes freed in the last 60-360 s "
                         "when creating files; 400 covers it; default 0)")
    ap.add_argument("--wait-idle", type=float, default=120.0, metavar="SECONDS",
                    help="before each timed run wait up to this long for other processes to go quiet "
                         "(default 120; 0 = don't wait). CPU used by others during a run is recorded either way")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    """Entry point."""
    args = parse(argv)
    what = args.what or []
    if what and what[0] in ("report", "plot"):
        return tools(what[0], what[1:])
    from harness.peers import missing_tools
    from harness.report import failures, plots, setup_lines, table
    from harness.scenarios import PEERS, Bench, Sizes, sizes_dict

    bad = [w for w in what if w not in ORDER + ["all"]]
    if bad:
        print(f"unknown scenario(s): {', '.join(bad)}; choose from all, {', '.join(ORDER)}, report, plot")
        return 2
    if not what or "all" in what:
        what = ["round", "memory"] if args.million and not what else ["bootstrap", "round", "latency", "burst",
                                                                       "memory"]
    what = [w for w in ORDER if w in what]
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        print(f"unknown peer(s) {unknown}; choose from {PEERS}")
        return 2
    need = missing_tools(args.peers)
    if need:
        print(f"missing tools: {', '.join(need)}. Install them with:\n"
              f"    sudo apt-get update && sudo apt-get install -y {' '.join(need)}\n"
              f"(or leave them out with --peers)")
        return 2
    if args.cold and os.geteuid() != 0:
        print("--cold writes /proc/sys/vm/drop_caches and needs root")
        return 2
    if args.profile:
        args.py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
        if not args.py_spy:
            print("--profile needs py-spy: .venv/bin/pip install py-spy")
            return 2

    sizes = Sizes.quick() if args.quick else Sizes()
    if args.million:
        sizes.files = 1_000_000
    if args.files:
        sizes.files = args.files
    sizes.huge_dirs = args.huge_dirs if args.huge_dirs is not None else (
        sizes.huge_dirs if args.quick and not (args.files or args.million)
        else 3 if sizes.files >= 500_000 else 1 if sizes.files >= 50_000 else 0)
    for name in ("changes", "rounds", "burst", "samples", "bootstrap_repeat", "timeout"):
        v = getattr(args, name)
        if v is not None:
            setattr(sizes, name, v)
    if args.peer_samples:
        a, b, c = (int(x) for x in args.peer_samples.split(","))
        sizes.rsync_samples, sizes.lsyncd_samples, sizes.lsyncd_default_samples = a, b, c
    if sizes.files >= 500_000 and args.timeout is None:
        sizes.timeout = 3600.0

    # Scratch space on the repo's disk.
    base = args.workdir
    if base is None:
        tmp = tempfile.gettempdir()
        base = tmp if os.stat(tmp).st_dev == os.stat(REPO).st_dev else os.path.join(REPO, "bench", "work")
    os.makedirs(base, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else f"-{sizes.files}")
    per_file = BYTES_PER_FILE * args.size_scale + 4096  # content plus inode and block rounding
    copies = BASE_COPIES + args.replicas + (PEER_COPIES if args.peers else 0)
    need_bytes = int(sizes.files * per_file * copies + sizes.burst * per_file * (copies + 1))
    free = shutil.disk_usage(base).free
    if need_bytes > free * 0.95 and not args.force:
        print(f"not enough disk in {base}: about {need_bytes / 1e9:.0f} GB needed for {sizes.files:,} files "
              f"({copies} tree copies of ~{sizes.files * per_file / 1e9:.1f} GB), {free / 1e9:.0f} GB free. "
              f"Use --workdir on a bigger disk (or --force).")
        return 2
    wd = os.path.join(base, f"fleetsync-bench-{run_id}")
    os.makedirs(wd)
    info = machine(wd)
    common = {"n_files": sizes.files, "commit": git_rev()}
    res = Results(run_id, common)
    res.add(scenario="meta", metric="run", tool="-", value=None, unit="", status="ok",
            detail={"argv": sys.argv, "scenarios": what, "sizes": sizes_dict(sizes), "machine": info,
                    "peers": args.peers, "settle": args.settle, "cold": args.cold, "workdir": wd,
                    "poll": args.poll, "verify": args.verify, "size_scale": args.size_scale,
                    "detector": args.detector,
                    "dirty_files": git_dirty()})
    log(f"run {run_id}: scenarios {', '.join(what)} at {sizes.files:,} files; workdir {wd}")
    log(f"machine: {info['nproc']} cpus, kernel {info['kernel']}, {info['fstype']} on {info['device']} "
        f"({info['disk']}), {info['mem_bytes'] / 2**30:.0f} GiB RAM")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    watches = int(open("/proc/sys/fs/inotify/max_user_watches").read())
    dirs_est = (sizes.files + sizes.burst) // 400 + 100
    if watches < dirs_est * 5:
        log(f"WARNING: fs.inotify.max_user_watches is {watches}; fleetsync and 3 lsyncd syncs need about "
            f"{dirs_est * 5} here (sysctl -w fs.inotify.max_user_watches=524288)")
    audit = CpuAudit()
    audit.start()
    time.sleep(3)
    idle = audit.stop()
    busy_note = []
    if idle["share"] > 0.05:
        msg = (f"machine not idle before the run: other processes used {idle['share'] * 100:.0f}% of the CPUs "
               f"(load {' '.join(idle['loadavg'])}; top: {idle['top_foreign']})")
        log("WARNING: " + msg)
        busy_note.append(msg)
    bench = Bench(args, sizes, wd, res)
    rc = 0
    t0 = time.monotonic()
    try:
        for w in what:
            log(f"=== {w} ===")
            audit.start()
            try:
                getattr(bench, w)()
            finally:
                a = audit.stop()
                res.add(scenario="setup", metric=f"foreign CPU during {w}", tool="-", value=a["foreign_cpu"],
                        unit="s", status="ok", detail=a)
                # A scenario that only reads figures (memory) lasts milliseconds: no share to speak of.
                if a["share"] > 0.05 and a["foreign_cpu"] >= 0.5:
                    msg = (f"during {w}: other processes used {a['foreign_cpu']:.0f} CPU-s of "
                           f"{a['wall'] * (os.cpu_count() or 1):.0f} ({a['share'] * 100:.0f}%; top: {a['top_foreign']})")
                    log("WARNING: machine shared " + msg)
                    busy_note.append(msg)
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    except Exception as e:  # noqa: BLE001 - reported; partial results are kept
        import traceback
        traceback.print_exc()
        log(f"aborted: {type(e).__name__}: {e}")
        rc = 1
    finally:
        bench.close()
        if args.keep:
            log(f"kept {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)
    recs = [r for r in res.records if r["scenario"] != "meta"]
    print()
    print(f"## fleetsync benchmark {run_id} ({sizes.files:,} files, settle {args.settle} s"
          f"{', cold cache' if args.cold else ''}; {time.monotonic() - t0:.0f} s)")
    print()
    print("\n".join(setup_lines(recs)))
    print()
    print(table(recs, args.peers))
    fl = failures(recs)
    if fl:
        print("\nFAILED:\n" + "\n".join(fl))
        rc = rc or 1
    if busy_note:
        print("\nWARNING, the machine was not ours alone (figures are suspect):\n" +
              "\n".join("- " + m for m in busy_note))
    print(f"\nresults: {res.path}")
    written = plots([res.path], out_dir=os.path.join(os.path.dirname(res.path), run_id))
    for f in written:
        print(f"plot: {f}")
    return rc


def tools(cmd: str, paths: list[str]) -> int:
    """`report` and `plot` over existing results files."""
    from harness.report import failures, latest_results, plots, setup_lines, table

    if not paths:
        p = latest_results()
        if p is None:
            print("no results in bench/results/ yet")
            return 1
        paths = [p]
    if cmd == "plot":
        for f in plots(paths):
            print(f"plot: {f}")
        return 0
    for p in paths:
        recs = load_results(p)
        meta = next((r for r in recs if r["scenario"] == "meta"), None)
        recs = [r for r in recs if r["scenario"] != "meta"]
        print(f"## {os.path.basename(p)}")
        if meta:
            print(f"\n```\n{json.dumps(meta['detail'].get('argv'))}\n```")
        print()
        print("\n".join(setup_lines(recs)))
        print()
        print(table(recs))
        fl = failures(recs)
        if fl:
            print("\nFAILED:\n" + "\n".join(fl))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
