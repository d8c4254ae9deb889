"""Every bench section, in the order `bench/run.py` runs them and the report shows them: what it
measures (`run(R, quick)`, which stores its figures under R[name]) and how it reports them
(`report(R, rep)`)."""

from dataclasses import dataclass
from typing import Callable

from . import affinity, dns, failover, fleet, ingest, l7, l7_floor, l7_instr, sidecar, xds
from .markdown import Report


@dataclass(frozen=True)
class Section:
    run: Callable[[dict, bool], None]
    report: Callable[[dict, Report], None]


SECTIONS = {
    "l7": Section(l7.sec_l7, l7.report_l7),
    "l7_paced": Section(l7.sec_l7_paced, l7.report_l7_paced),
    "l7_floor": Section(l7_floor.sec_l7_floor, l7_floor.report_l7_floor),
    "l7_instr": Section(l7_instr.sec_l7_instr, l7_instr.report_l7_instr),
    "failover": Section(failover.sec_failover, failover.report_failover),
    "big_bodies": Section(failover.sec_big_bodies, failover.report_big_bodies),
    "ingest": Section(ingest.sec_ingest, ingest.report_ingest),
    "fleet": Section(fleet.sec_fleet, fleet.report_fleet),
    "xds": Section(xds.sec_xds, xds.report_xds),
    "sidecar": Section(sidecar.sec_sidecar, sidecar.report_sidecar),
    "dns_failover": Section(dns.sec_dns_failover, dns.report_dns_failover),
    "dnsperf": Section(dns.sec_dnsperf, dns.report_dnsperf),
    "reload": Section(dns.sec_reload, dns.report_reload),
    "affinity": Section(affinity.sec_affinity, affinity.report_affinity),
    "affinity_vllm": Section(affinity.sec_affinity_vllm, affinity.report_affinity_vllm),
}

# Sections only run when named in --only (diagnostics, not part of the 15-minute default run).
OPT_IN = ("l7_floor", "l7_instr")
