"""The router's side of the control channel's mutual TLS (render.py --dnsd-tls DIR).

The gpuha_fleet cluster (the picker's fleet poll and the EDS poll both go through it) gets an
UpstreamTlsContext whose client certificate and trusted CA come over SDS from two small files
that name the PEM files in DIR: Envoy watches DIR and re-reads the certificates when a file is
renamed into it (deploy/tls/make-certs.sh writes that way; Kubernetes' Secret volumes swap a
symlink, the same event), so a rotation needs no restart. dnsd's certificate must name the host
of --fleet (a DNS name or an IP address: SAN checked; SNI sent for a name).

DIR holds ca.crt (the CA(s) dnsd's certificate is checked against), client.crt and client.key
(this router's certificate, signed by a CA that dnsd's http.tls.client_ca_file trusts).

Rendering for another machine (render.py --remote-paths, e.g. a Kubernetes ConfigMap): DIR and
the SDS directory are paths on the machine that runs Envoy, so nothing is checked or written here;
sds_texts() gives the SDS files' texts, to be installed at the paths it names.
"""

import ipaddress
import os

FILES = ("ca.crt", "client.crt", "client.key")
CERT_SECRET = "gpuha_dnsd_client_cert"
CA_SECRET = "gpuha_dnsd_ca"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class TlsError(ValueError):
    pass


def sds_files(out, sds_dir, remote=False):
    """Where the two SDS files go: beside the rendered config, named after it."""
    if remote:
        if sds_dir is None or not os.path.isabs(sds_dir):
            raise TlsError("--remote-paths: give --sds-dir as an absolute path on the machine that runs Envoy")
        sds_dir = os.path.normpath(sds_dir)
    if sds_dir is None:
        if out == "-":
            raise TlsError("--dnsd-tls with --out -: give --sds-dir (where the SDS files that name the certificates are written)")
        sds_dir = os.path.dirname(os.path.abspath(out))
    stem = "gpuha-router" if out == "-" else os.path.splitext(os.path.basename(out))[0]
    return (os.path.join(os.path.abspath(sds_dir), f"{stem}.dnsd-cert.sds.yaml"),
            os.path.join(os.path.abspath(sds_dir), f"{stem}.dnsd-ca.sds.yaml"))


def check_dir(d):
    d = os.path.abspath(d)
    missing = [f for f in FILES if not os.path.isfile(os.path.join(d, f))]
    if missing:
        raise TlsError(f"--dnsd-tls {d}: missing {', '.join(missing)} (deploy/tls/make-certs.sh all {d})")
    return d


def sds_texts(d, out="-", sds_dir=None, remote=False):
    """{path: text} of the two SDS files for certificate directory `d` (the client certificate
    and the trusted CA, each with `d` watched): what render.py --dnsd-tls d writes, or with
    --remote-paths what the machine that runs Envoy must hold at those paths."""
    if remote:
        if not os.path.isabs(d):
            raise TlsError(f"--remote-paths: give --dnsd-tls as an absolute path on the machine that runs Envoy, not {d!r}")
        d = os.path.normpath(d)
    else:
        d = os.path.abspath(d)
    cert_file, ca_file = sds_files(out, sds_dir, remote)
    cert = "\n".join([
        "resources:",
        f"- \"@type\": {SECRET_TYPE}",
        f"  name: {CERT_SECRET}",
        "  tls_certificate:",
        f"    certificate_chain: {{ filename: \"{d}/client.crt\" }}",
        f"    private_key: {{ filename: \"{d}/client.key\" }}",
        f"    watched_directory: {{ path: \"{d}\" }}",
    ]) + "\n"
    ca = "\n".join([
        "resources:",
        f"- \"@type\": {SECRET_TYPE}",
        f"  name: {CA_SECRET}",
        "  validation_context:",
        f"    trusted_ca: {{ filename: \"{d}/ca.crt\" }}",
        f"    watched_directory: {{ path: \"{d}\" }}",
    ]) + "\n"
    return {cert_file: cert, ca_file: ca}


def write_sds(texts):
    """Each SDS file written atomically (a watcher never reads half a file)."""
    for path, text in texts.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)


def transport_socket(d, fleet_host, out, sds_dir, remote=False):
    """The gpuha_fleet cluster's transport_socket YAML (indented for a cluster), after writing
    the SDS files (not with `remote`: then `d` and `sds_dir` are paths on the machine that runs
    Envoy, neither checked nor written here). `d`: the --dnsd-tls directory."""
    texts = sds_texts(d if remote else check_dir(d), out, sds_dir, remote)
    if not remote:
        write_sds(texts)
    cert_file, ca_file = texts
    try:
        ipaddress.ip_address(fleet_host)
        san, sni = f"{{ san_type: IP_ADDRESS, matcher: {{ exact: \"{fleet_host}\" }} }}", None
    except ValueError:
        san, sni = f"{{ san_type: DNS, matcher: {{ exact: \"{fleet_host}\" }} }}", fleet_host

    lines = [
        "    transport_socket:",
        "      name: envoy.transport_sockets.tls",
        "      typed_config:",
        "        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    ]
    if sni:
        lines.append(f"        sni: \"{sni}\"")
    lines += [
        "        common_tls_context:",
        # Envoy's client default stops at TLS 1.2; dnsd (rustls) speaks both.
        "          tls_params: { tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3 }",
        "          tls_certificate_sds_secret_configs:",
        f"          - name: {CERT_SECRET}",
        "            sds_config:",
        "              resource_api_version: V3",
        f"              path_config_source: {{ path: \"{cert_file}\" }}",
        "          combined_validation_context:",
        "            default_validation_context:",
        f"              match_typed_subject_alt_names: [{san}]",
        "            validation_context_sds_secret_config:",
        f"              name: {CA_SECRET}",
        "              sds_config:",
        "                resource_api_version: V3",
        f"                path_config_source: {{ path: \"{ca_file}\" }}",
    ]
    return "\n".join(lines)
