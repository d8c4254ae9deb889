"""GPU HA benchmarks as a package: one module per section (`l7`, `failover`, `ingest`, `fleet`,
`sidecar`, `dns`, `affinity`), what they share (`common`), the report (`markdown`, `report`),
and the registry (`sections`). `bench/run.py` is the entry point."""
