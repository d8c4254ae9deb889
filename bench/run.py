#!/usr/bin/env python3
"""GPU HA benchmarks: every tier measured beside the tools users would pick instead, in one run.

Usage: bench/run.py [--quick] [--only SECTION[,SECTION]] [--out DIR]
Sections: l7, l7_paced, failover, big_bodies, ingest, fleet, xds, sidecar, dns_failover, dnsperf, reload, affinity.
Normally started by bench/run.sh (which installs and builds what this needs).

Everything listens on 127.0.0.1; every process started here is tracked by PID and killed by PID
at the end (the harness's `Proc`). Cores: the proxy / server under test gets CPU 0 ("SUT core"); load generators,
workers and helpers get CPU 1 ("load core"). See bench/README.md for what each number means.

The sections live in bench/gpuha_bench/ (one module each; the registry is `sections.py`).
"""

import argparse
import datetime
import json
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gpuha_harness
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpuha_bench

from gpuha_bench.common import BENCH, LOG, PROCS, WORK, machine, note  # noqa: E402
from gpuha_bench.report import report  # noqa: E402
from gpuha_bench.sections import OPT_IN, SECTIONS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (CI smoke)")
    ap.add_argument("--only", default=",".join(n for n in SECTIONS if n not in OPT_IN),
                    help=f"comma-separated sections (opt-in, not in the default run: {', '.join(OPT_IN)})")
    ap.add_argument("--out", help="results dir (default bench/results/<date>-<host>)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other sections' figures from OUT/results.json (re-run a few sections)")
    args = ap.parse_args()
    unknown = [n for n in args.only.split(",") if n not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    outdir = Path(args.out) if args.out else BENCH / "results" / f"{date}-{socket.gethostname()}{'-quick' if args.quick else ''}"
    outdir.mkdir(parents=True, exist_ok=True)
    R = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick, "machine": machine(),
         "command": " ".join(["python3", "bench/run.py", *sys.argv[1:]]),
         "work_dir": str(WORK)}
    if args.merge and (outdir / "results.json").exists():
        old = json.loads((outdir / "results.json").read_text())
        LOG.extend(old.pop("log", []))
        old.update({k: v for k, v in R.items() if k in ("work_dir", "command")})
        old.setdefault("merged_at", []).append(R["date"])
        R = old
    t0 = time.time()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for name in args.only.split(","):
            t = time.time()
            note(f"== {name}")
            try:
                SECTIONS[name].run(R, args.quick)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one section failing must not lose the others
                note(f"section {name} failed: {e}")
                traceback.print_exc()
                R.setdefault("errors", {})[name] = str(e)
            finally:
                PROCS.stop_all()
            R.setdefault("section_s", {})[name] = round(time.time() - t, 1)
    finally:
        PROCS.stop_all()
        R["runtime_s"] = R.get("runtime_s", 0) + time.time() - t0 if args.merge else time.time() - t0
        report(R, outdir)
        print(f"\nresults: {outdir}  (scratch logs: {WORK})")


if __name__ == "__main__":
    main()
