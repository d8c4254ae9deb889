"""The run's report: results.md (a header, each section's tables and charts, the targets with
their verdicts, the run's notes) and results.json (every raw figure)."""

import json
from pathlib import Path

from .common import LOAD_CPU, LOG, SUT_CPU
from .markdown import Report, verdict
from .sections import SECTIONS


def report(R: dict, outdir: Path) -> None:
    rep = Report(outdir=outdir)
    rep.md += [f"# GPU HA benchmarks — {R['date']}", "",
               f"Machine: {R['machine']['cpu']}, nproc {R['machine']['nproc']}, {R['machine']['mem_gib']} GiB, "
               f"kernel {R['machine']['kernel']}, load average at start {R['machine']['loadavg_at_start']}. "
               f"Mode: {'quick' if R['quick'] else 'full'}; runtime {R.get('runtime_s', 0):.0f} s. "
               f"SUT core {SUT_CPU}, load core {LOAD_CPU} (taskset). Raw figures: `results.json`.", ""]
    if R.get("command"):
        rep.md += [f"Command: `{R['command']}`", ""]
    for section in SECTIONS.values():
        section.report(R, rep)
    if rep.targets:
        rep.md += ["", "## Targets", "", "| target | verdict | measured |", "|---|---|---|"]
        for t in rep.targets:
            rep.md.append(f"| {t.name} | {verdict(t.ok)} | {t.measured} |")
    R["log"] = LOG
    R["targets"] = [{"name": t.name, "met": t.ok, "measured": t.measured} for t in rep.targets]
    rep.md += ["", "## Log", ""] + [f"- {line}" for line in LOG]
    (outdir / "results.md").write_text("\n".join(rep.md) + "\n")
    (outdir / "results.json").write_text(json.dumps(R, indent=1, default=str) + "\n")
    print("\n".join(rep.md))
