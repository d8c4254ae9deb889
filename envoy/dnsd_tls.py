"""The router's side of the control channel's mutual TLS (render.py --dnsd-tls DIR).

The gpuha_fleet cluster (the picker's fleet poll and the EDS poll both go through it) gets an
UpstreamTlsContext whose client certificate and trusted CA come over SDS from two small files
that name the PEM files in DIR: Envoy watches DIR and re-reads the certificates when a file is
renamed into it (deploy/tls/make-certs.sh writes that way; Kubernetes' Secret volumes swap a
symlink, the same event), so a rotation needs no restart. dnsd's certificate must name the host
of --fleet (a DNS name or an IP address: SAN checked; SNI sent for a name).

DIR holds ca.crt (the CA(s) dnsd's certificate is checked against), client.crt and client.key
(this router's certificate, signed by a CA that dnsd's http.tls.client_ca_file trusts).
"""

import ipaddress
import os

FILES = ("ca.crt", "client.crt", "client.key")
CERT_SECRET = "gpuha_dnsd_client_cert"
CA_SECRET = "gpuha_dnsd_ca"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class TlsError(ValueError):
    pass


def sds_files(out, sds_dir):
    """Where the two SDS files go: beside the rendered config, named after it."""
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


def write_sds(d, cert_file, ca_file):
    """The SDS resources: the client certificate and the trusted CA, each with DIR watched."""
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
    os.makedirs(os.path.dirname(cert_file), exist_ok=True)
    for path, text in ((cert_file, cert), (ca_file, ca)):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)


def transport_socket(d, fleet_host, out, sds_dir):
    """The gpuha_fleet cluster's transport_socket YAML (indented for a cluster), after writing
    the SDS files. `d`: the --dnsd-tls directory."""
    d = check_dir(d)
    cert_file, ca_file = sds_files(out, sds_dir)
    write_sds(d, cert_file, ca_file)
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
