#!/usr/bin/env bash
# The small CA of GPU HA's control channel (dnsd's HTTP side, mutual TLS; deploy/tls/README.md),
# with the openssl CLI only. EC P-256 keys, PEM files, written atomically (a temporary file in
# DIR, then rename) so that a watcher (Envoy's SDS) never reads half a file.
#
#   make-certs.sh all    DIR [--san SANS]   a CA if DIR has none, then dnsd's and a router's cert
#   make-certs.sh ca     DIR [--force]      a new CA: ca.crt, ca.key (refuses to replace one)
#   make-certs.sh server DIR [--san SANS]   dnsd.crt, dnsd.key, signed by DIR/ca.*
#   make-certs.sh client DIR [--name CN]    client.crt, client.key (a router), signed by DIR/ca.*
#
# SANS: dnsd's names and addresses as routers dial them (render.py --fleet), openssl syntax,
# e.g. "DNS:dnsd.internal,IP:10.0.0.5"; default "DNS:localhost,IP:127.0.0.1".
# Options: --days N (leaf lifetime, default 397; the CA gets 3650), --name CN.
#
# dnsd reads DIR/dnsd.crt, DIR/dnsd.key and DIR/ca.crt ([http.tls]); a router reads DIR/ca.crt,
# DIR/client.crt and DIR/client.key (render.py --dnsd-tls DIR). Copy each its own; ca.key
# stays with whoever issues certificates.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 dir=$2; shift 2
san="DNS:localhost,IP:127.0.0.1" name="" days=397 force=0
while [ $# -gt 0 ]; do
  case $1 in
    --san) san=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --force) force=1; shift ;;
    *) echo "make-certs.sh: unknown option $1" >&2; usage ;;
  esac
done
command -v openssl >/dev/null || { echo "make-certs.sh: openssl not found (Debian: apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
umask 077
tmp=$(mktemp -d "$dir/.make-certs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
curve=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)

# install SRC DST: rename into place (atomic on one filesystem); certificates readable by all.
install_file() { chmod "$3" "$1"; mv -f "$1" "$dir/$2"; }

make_ca() {
  if [ -e "$dir/ca.key" ] && [ "$force" != 1 ]; then
    echo "make-certs.sh: $dir/ca.key exists; --force replaces it (every certificate it signed stops being trusted)" >&2
    exit 1
  fi
  openssl req -x509 "${curve[@]}" -days 3650 -subj "/CN=${name:-gpuha control CA}" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$tmp/ca.key" -out "$tmp/ca.crt" 2>/dev/null
  install_file "$tmp/ca.key" ca.key 600
  install_file "$tmp/ca.crt" ca.crt 644
  echo "CA: $dir/ca.crt"
}

# leaf BASENAME CN EXTENSIONS
leaf() {
  [ -e "$dir/ca.key" ] || { echo "make-certs.sh: no CA in $dir (make-certs.sh ca $dir)" >&2; exit 1; }
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "$3" > "$tmp/$1.ext"
  openssl req -new "${curve[@]}" -subj "/CN=$2" -keyout "$tmp/$1.key" -out "$tmp/$1.csr" 2>/dev/null
  openssl x509 -req -in "$tmp/$1.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days "$days" -extfile "$tmp/$1.ext" -out "$tmp/$1.crt" 2>/dev/null
  # Key first: a watcher that reloads on the certificate's rename finds the matching key.
  install_file "$tmp/$1.key" "$1.key" 600
  install_file "$tmp/$1.crt" "$1.crt" 644
  echo "$1: $dir/$1.crt ($2)"
}

case $cmd in
  ca) make_ca ;;
  server) leaf dnsd "${name:-gpuha-dnsd}" "$(printf 'extendedKeyUsage=serverAuth\nsubjectAltName=%s' "$san")" ;;
  client) leaf client "${name:-gpuha-router}" "extendedKeyUsage=clientAuth" ;;
  all)
    [ -e "$dir/ca.key" ] || make_ca
    leaf dnsd gpuha-dnsd "$(printf 'extendedKeyUsage=serverAuth\nsubjectAltName=%s' "$san")"
    leaf client "${name:-gpuha-router}" "extendedKeyUsage=clientAuth" ;;
  *) usage ;;
esac
