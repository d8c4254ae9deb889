#!/bin/sh
# Runs zonemaster-cli (Debian package) against two dnsd instances, entirely inside a private
# network namespace that has only a loopback interface, so no query can leave the machine:
#
#   127.0.0.1:53, 127.0.0.2:53   dnsd (ns1, ns2 of gpuha.test.)
#   127.0.0.3:53                 nsd serving a stand-in root zone that delegates gpuha.test.
#
# zonemaster is pointed at the stand-in root with --hints. Needs root (unshare -n), nsd and
# zonemaster-cli. Usage: zonemaster.sh [path/to/gpuha-dnsd] [extra zonemaster-cli args...]
# Output: the zonemaster report on stdout; dnsd/nsd logs under $WORK.
set -eu
BIN=${1:-target-dns/debug/gpuha-dnsd}
[ $# -gt 0 ] && shift
BIN=$(realpath "$BIN")
WORK=$(mktemp -d /tmp/gpuha-zonemaster.XXXXXX)
head -c 32 /dev/urandom > "$WORK/key"

for i in 1 2; do
cat > "$WORK/dnsd$i.toml" <<TOML
[ingest]
listen = "127.0.0.$i:9400"
keys = [{ id = 1, file = "$WORK/key" }]
[http]
listen = "127.0.0.$i:9401"
[dns]
listen = "127.0.0.$i:53"
[[dns.zones]]
origin = "gpuha.test."
ns = ["ns1.gpuha.test.", "ns2.gpuha.test."]
ttl = 3600
soa = { rname = "hostmaster.gpuha.test.", serial = 2026010101, refresh = 14400, retry = 3600, expire = 1209600, minimum = 300 }
records = [
  { name = "ns1", type = "A", value = "127.0.0.1" },
  { name = "ns2", type = "A", value = "127.0.0.2" },
  { name = "@", type = "MX", value = "10 mail.gpuha.test." },
  { name = "mail", type = "A", value = "127.0.0.25" },
]
[[dns.pools]]
id = "pool-a"
routers = ["127.0.0.11"]
[[dns.services]]
name = "api.gpuha.test."
pools = ["pool-a"]
fail_whale = ["127.0.0.99"]
TOML
done

cat > "$WORK/root.zone" <<ZONE
.                 86400 IN SOA ns.root. hostmaster.root. 1 1800 900 604800 86400
.                 86400 IN NS  ns.root.
ns.root.          86400 IN A   127.0.0.3
gpuha.test.       86400 IN NS  ns1.gpuha.test.
gpuha.test.       86400 IN NS  ns2.gpuha.test.
ns1.gpuha.test.   86400 IN A   127.0.0.1
ns2.gpuha.test.   86400 IN A   127.0.0.2
ZONE
cat > "$WORK/hints" <<HINTS
.                 3600000 IN NS ns.root.
ns.root.          3600000 IN A  127.0.0.3
HINTS
cat > "$WORK/nsd.conf" <<CONF
server:
  ip-address: 127.0.0.3
  port: 53
  username: ""
  chroot: ""
  zonesdir: "$WORK"
  pidfile: "$WORK/nsd.pid"
  xfrdfile: "$WORK/xfrd.state"
  zonelistfile: "$WORK/zone.list"
  logfile: "$WORK/nsd.log"
  verbosity: 1
remote-control:
  control-enable: no
zone:
  name: "."
  zonefile: "root.zone"
CONF

exec unshare --net sh -eu -c '
ip link set lo up
WORK=$1; BIN=$2; shift 2
nsd -c "$WORK/nsd.conf"
PIDS=""
for i in 1 2; do
  GPUHA_LOG=warn "$BIN" --config "$WORK/dnsd$i.toml" > "$WORK/dnsd$i.out" 2> "$WORK/dnsd$i.log" &
  PIDS="$PIDS $!"
done
for i in 1 2; do
  n=0; until grep -q READY "$WORK/dnsd$i.out"; do n=$((n+1)); [ $n -lt 100 ] || { echo "dnsd$i did not start" >&2; cat "$WORK/dnsd$i.log" >&2; exit 1; }; sleep 0.1; done
done
n=0; until [ -s "$WORK/nsd.pid" ]; do n=$((n+1)); [ $n -lt 100 ] || { echo "nsd did not start" >&2; exit 1; }; sleep 0.1; done
zonemaster-cli --hints "$WORK/hints" --no-ipv6 --show-testcase --show-module --level NOTICE --count --no-progress "$@" gpuha.test || true
echo "work dir: $WORK"
kill $(cat "$WORK/nsd.pid") 2>/dev/null || true
kill $PIDS 2>/dev/null || true
' sh "$WORK" "$BIN" "$@"
