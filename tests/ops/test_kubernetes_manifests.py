"""deploy/kubernetes/, checked offline: every object against the Kubernetes schemas
(kubernetes-validate, which ships them: no cluster, no network), the router's Envoy config as
render.py makes it today and as Envoy itself accepts it (with its SDS files and certificates from
deploy/tls/make-certs.sh), the addresses and ports the files must agree on (mTLS port, metrics
port, NetworkPolicy), the names they reference (Secrets with the files the configs read), dnsd's
config as dnsd reads it, the shipped router and dnsd configs talking over mutual TLS, and the
vLLM drain hook against a fake vLLM. (A little over 500 lines: one check per thing the manifests
must agree on, in one place.)"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import yaml

import gpuha_harness as harness

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
sys.path.insert(0, str(K8S))
import generate  # noqa: E402  (deploy/kubernetes/generate.py)

sys.path.insert(0, str(REPO / "envoy"))
import dnsd_tls  # noqa: E402  (envoy/dnsd_tls.py)

KUBERNETES_VERSION = "1.37.0"
NAMESPACE = "gpuha"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def objects() -> list[dict]:
    out = []
    for p in manifest_files():
        for doc in yaml.safe_load_all(p.read_text()):
            if doc is not None:
                doc["__file"] = p.name
                out.append(doc)
    return out


def by_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == kind}


def pod_specs() -> dict[str, dict]:
    """Workload name -> (pod template spec, pod labels, replicas)."""
    out = {}
    for o in objects():
        if o["kind"] in ("Deployment", "StatefulSet"):
            t = o["spec"]["template"]
            out[o["metadata"]["name"]] = {"spec": t["spec"], "labels": t["metadata"]["labels"], "obj": o}
    return out


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def dnsd_config() -> dict:
    return tomllib.loads(by_kind("ConfigMap")["gpuha-dnsd-config"]["data"]["dnsd.toml"])


def router_config() -> dict:
    return yaml.safe_load(by_kind("ConfigMap")["gpuha-router-config"]["data"]["pool-router.yaml"])


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def fleet_host() -> str:
    return generate.option("--fleet").rsplit(":", 1)[0]


def make_certs(d: Path, *args: str) -> None:
    """deploy/tls/make-certs.sh all D ARGS: the CA, dnsd's and a router's certificate."""
    r = subprocess.run(["bash", str(REPO / "deploy" / "tls" / "make-certs.sh"), "all", str(d), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def readme_secret_files() -> dict[str, dict[str, str]]:
    """Secret name -> {key: the make-certs.sh file it is made from}, from the README's commands."""
    out = {}
    for line in (K8S / "README.md").read_text().splitlines():
        m = re.search(r"kubectl -n gpuha create secret generic ([a-z0-9-]+)(.*)", line)
        if m:
            out[m.group(1)] = dict(re.findall(r"--from-file=([^=\s]+)=(\S+)", m.group(2)))
    return out


def mounts_of(workload: str, container: str) -> dict[str, tuple[str, dict]]:
    """Volume mount path -> (volume name, volume) of one container."""
    spec = pod_specs()[workload]["spec"]
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    c = next(x for x in spec["containers"] if x["name"] == container)
    return {m["mountPath"]: (m["name"], vols.get(m["name"], {})) for m in c.get("volumeMounts", [])}


def test_every_object_passes_the_kubernetes_schemas_offline() -> None:
    import kubernetes_validate  # deploy/ensure-deps.sh installs it; it ships the schemas

    seen = []
    for o in objects():
        doc = {k: v for k, v in o.items() if k != "__file"}
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{o['__file']}: {o['kind']}/{o['metadata']['name']}: {e.message} at {list(e.path)}")
        seen.append(o["kind"])
    for kind in ("StatefulSet", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy", "Namespace"):
        assert kind in seen, f"no {kind} in deploy/kubernetes"


def test_the_schema_check_catches_a_bad_field() -> None:
    import kubernetes_validate

    sts = dict(by_kind("StatefulSet")["gpuha-dnsd"])
    sts.pop("__file")
    bad = json.loads(json.dumps(sts))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/healthz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_all_live_in_one_namespace() -> None:
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in manifest_files())
    for o in objects():
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']}"


def test_generated_configmaps_are_what_render_py_and_the_drain_script_make_today() -> None:
    assert (K8S / "generated.yaml").read_text() == generate.generate(), "run deploy/kubernetes/generate.py"
    cms = by_kind("ConfigMap")
    assert cms["gpuha-router-config"]["data"]["pool-router.yaml"] == generate.render_router()
    assert cms["gpuha-vllm-drain"]["data"]["vllm_drain.py"] == (K8S / "vllm_drain.py").read_text()
    c = router_config()
    workers = next(x for x in c["static_resources"]["clusters"] if x["name"] == "gpuha_workers")
    assert workers["type"] == "EDS" and "load_assignment" not in workers, "no worker list: membership from dnsd"
    # The SDS files: what dnsd_tls writes for the pod's paths, named by the fleet cluster's TLS.
    sds_dir, tls_dir = generate.option("--sds-dir"), generate.option("--dnsd-tls")
    want = dnsd_tls.sds_texts(tls_dir, "-", sds_dir, remote=True)
    assert cms["gpuha-router-sds"]["data"] == {Path(p).name: t for p, t in want.items()}
    for text in want.values():
        assert f'"{tls_dir}/' in text
    fleet = next(x for x in c["static_resources"]["clusters"] if x["name"] == "gpuha_fleet")
    tls = fleet["transport_socket"]["typed_config"]
    assert tls["sni"] == fleet_host()
    ctx = tls["common_tls_context"]
    named = [ctx["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]["path"],
             ctx["combined_validation_context"]["validation_context_sds_secret_config"]["sds_config"]["path_config_source"]["path"]]
    assert sorted(named) == sorted(want), "the router config names the SDS files of ConfigMap gpuha-router-sds"
    sans = ctx["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "DNS", "matcher": {"exact": fleet_host()}}]


def router_config_here(tmp_path: Path, wasm: Path, certs: Path) -> Path:
    """The shipped router config and SDS files with the pod's paths replaced by local ones."""
    cms = by_kind("ConfigMap")
    sds_dir, tls_dir = generate.option("--sds-dir"), generate.option("--dnsd-tls")
    sds = tmp_path / "sds"
    sds.mkdir()
    for name, text in cms["gpuha-router-sds"]["data"].items():
        assert text.count(f'"{tls_dir}') >= 2
        (sds / name).write_text(text.replace(f'"{tls_dir}', f'"{certs}'))
    text = cms["gpuha-router-config"]["data"]["pool-router.yaml"]
    assert text.count('"/etc/gpuha/wasm/gpuha_filter.wasm"') >= 2 and text.count(f'"{sds_dir}/') == 2
    cfg = tmp_path / "pool-router.yaml"
    cfg.write_text(text.replace("/etc/gpuha/wasm/gpuha_filter.wasm", str(wasm)).replace(f'"{sds_dir}/', f'"{sds}/'))
    return cfg


def envoy_validate(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(harness.envoy_bin()), "--mode", "validate", "-c", str(cfg), "--service-node", "gpuha-router-0"],
                          capture_output=True, text=True, timeout=120)


def test_the_shipped_router_config_passes_envoy_validate(tmp_path: Path) -> None:
    try:
        wasm = harness.wasm_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    certs = tmp_path / "certs"
    make_certs(certs, "--san", f"DNS:{fleet_host()}")
    cfg = router_config_here(tmp_path, wasm, certs)
    r = envoy_validate(cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "configuration" in r.stdout and "OK" in r.stdout, r.stdout
    # (Validate mode does not read the SDS files; the test below runs them.)


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_the_shipped_router_and_dnsd_configs_talk_over_mutual_tls(tmp_path: Path) -> None:
    """dnsd on its shipped config and Envoy on the shipped router config and SDS files, with
    certificates from make-certs.sh for the --fleet name and only the addresses made local: the
    router's EDS polls reach dnsd over mutual TLS (SAN and SNI as shipped), and nothing is refused."""
    try:
        wasm, dnsd_bin, envoy = harness.wasm_path(), harness.binary("gpuha-dnsd"), harness.envoy_bin()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    certs = tmp_path / "certs"
    make_certs(certs, "--san", f"DNS:{fleet_host()}")
    text = by_kind("ConfigMap")["gpuha-dnsd-config"]["data"]["dnsd.toml"]
    (tmp_path / "frame.key").write_bytes(bytes(range(32)))
    (tmp_path / "admin.token").write_text("0123456789abcdef0123456789abcdef\n")
    tls_port = harness.free_port()
    for old, new in [("/etc/gpuha/keys/frame.key", tmp_path / "frame.key"), ("/etc/gpuha/admin/admin.token", tmp_path / "admin.token"),
                     ("/var/lib/gpuha-dnsd/", f"{tmp_path}/"), ("/etc/gpuha/tls/dnsd.crt", certs / "dnsd.crt"),
                     ("/etc/gpuha/tls/dnsd.key", certs / "dnsd.key"), ("/etc/gpuha/tls/client-ca.crt", certs / "ca.crt"),
                     ('"0.0.0.0:9401"', f'"127.0.0.1:{tls_port}"'), ("0.0.0.0:", "127.0.0.1:0#")]:
        assert old in text
        text = text.replace(old, str(new))
    text = re.sub(r'"127\.0\.0\.1:0#\d+"', '"127.0.0.1:0"', text)
    (tmp_path / "dnsd.toml").write_text(text)
    cfg = yaml.safe_load(router_config_here(tmp_path, wasm, certs).read_text())
    cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = harness.free_port()
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=(admin := harness.free_port()))
    fleet = next(x for x in cfg["static_resources"]["clusters"] if x["name"] == "gpuha_fleet")
    sa = fleet["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    sa.update(address="127.0.0.1", port_value=tls_port)  # the name stays in SNI and the SAN check
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(cfg))
    dnsd = harness.Proc("dnsd", [dnsd_bin, "--config", tmp_path / "dnsd.toml"], tmp_path)
    router = None
    try:
        metrics_addr = dnsd.wait_line(r"^READY .*metrics=(\S+)").group(1)
        router = harness.Proc("envoy", [envoy, "-c", tmp_path / "router.yaml", "--service-node", "gpuha-router-0",
                                        "--disable-hot-restart", "--concurrency", "1", "-l", "warning"], tmp_path)

        def dnsd_metrics() -> str:
            return harness.http_get(f"http://{metrics_addr}/metrics")[1].decode()

        harness.wait_for(lambda: metric(dnsd_metrics(), "gpuha_dnsd_eds_requests_total") >= 1 or None, 30, "an EDS poll over mTLS")
        m = dnsd_metrics()
        assert metric(m, "gpuha_dnsd_http_tls_handshakes_total") >= 1 and metric(m, "gpuha_dnsd_http_tls_refused_total") == 0, m
        stats = harness.http_get(f"http://127.0.0.1:{admin}/stats?filter=gpuha_fleet.ssl")[1].decode()
        assert re.search(r"^cluster\.gpuha_fleet\.ssl\.handshake: [1-9]", stats, re.M), stats
        # The client certificate in use is the Secret's (Envoy read it through the SDS files).
        serial = subprocess.run(["openssl", "x509", "-in", str(certs / "client.crt"), "-noout", "-serial"],
                                capture_output=True, text=True, timeout=30).stdout.strip().split("=")[-1].lower()
        assert serial and serial in harness.http_get(f"http://127.0.0.1:{admin}/certs")[1].decode().lower()
    finally:
        if router is not None:
            router.terminate()
        dnsd.terminate()


def test_services_select_pods_that_have_their_target_ports() -> None:
    pods = pod_specs()
    for name, svc in by_kind("Service").items():
        sel = svc["spec"]["selector"]
        matched = []
        for wname, w in pods.items():
            labels = dict(w["labels"])
            if w["obj"]["kind"] == "StatefulSet":
                # The per-replica Services select one pod by the label the StatefulSet sets.
                names = [f"{wname}-{i}" for i in range(w["obj"]["spec"]["replicas"])]
                if "statefulset.kubernetes.io/pod-name" in sel:
                    if sel["statefulset.kubernetes.io/pod-name"] in names:
                        labels["statefulset.kubernetes.io/pod-name"] = sel["statefulset.kubernetes.io/pod-name"]
            if all(labels.get(k) == v for k, v in sel.items()):
                matched.append(w)
        assert matched, f"Service {name} selects no pod"
        for w in matched:
            cports = [p for c in w["spec"]["containers"] for p in c.get("ports", [])]
            for sp in svc["spec"]["ports"]:
                proto = sp.get("protocol", "TCP")
                target = sp.get("targetPort", sp["port"])
                hit = [p for p in cports if (p.get("name") == target or p["containerPort"] == target) and p.get("protocol", "TCP") == proto]
                assert hit, f"Service {name} port {sp['name']} ({target}/{proto}) is no container port of its pods"


def test_probes_name_ports_of_their_own_container() -> None:
    for wname, w in pod_specs().items():
        for c in containers(w["spec"]):
            names = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in c:
                    port = c[probe]["httpGet"]["port"]
                    assert port in names, f"{wname}/{c['name']} {probe} port {port}"


def test_dnsd_listens_where_its_container_and_services_say() -> None:
    cfg = dnsd_config()
    dnsd = pod_specs()["gpuha-dnsd"]["spec"]["containers"][0]
    ports = {(p["containerPort"], p["protocol"]): p["name"] for p in dnsd["ports"]}
    assert ports[(port_of(cfg["ingest"]["listen"]), "UDP")] == "ingest"
    assert ports[(port_of(cfg["http"]["listen"]), "TCP")] == "https"
    assert ports[(port_of(cfg["http"]["metrics_listen"]), "TCP")] == "metrics"
    assert cfg["http"]["metrics_listen"].startswith("0.0.0.0:"), "the kubelet's probes reach the pod IP"
    # The mTLS port needs a client certificate: the kubelet's probes go to the metrics listener.
    for probe in ("livenessProbe", "readinessProbe"):
        assert dnsd[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    # [http.tls]: files of Secret gpuha-dnsd-tls, mounted as a directory.
    tls = cfg["http"]["tls"]
    dirs = {str(Path(tls[k]).parent) for k in ("cert_file", "key_file", "client_ca_file")}
    assert len(dirs) == 1
    name, vol = mounts_of("gpuha-dnsd", "dnsd")[dirs.pop()]
    assert vol["secret"]["secretName"] == "gpuha-dnsd-tls" and "optional" not in vol["secret"]
    assert set(readme_secret_files()["gpuha-dnsd-tls"]) == {Path(tls[k]).name for k in ("cert_file", "key_file", "client_ca_file")}
    assert ports[(port_of(cfg["dns"]["listen"]), "UDP")] == "dns-udp"
    assert ports[(port_of(cfg["dns"]["listen"]), "TCP")] == "dns-tcp"
    for key in ("ingest", "http", "dns"):
        assert cfg[key]["listen"].startswith("0.0.0.0:"), f"{key}: the pod's address, not loopback"
    assert "--config /etc/gpuha/config/dnsd.toml" in " ".join(dnsd["command"])


def test_sidecars_send_to_every_dnsd_replica_and_name_a_known_pool() -> None:
    svcs = by_kind("Service")
    pods = pod_specs()
    replicas = pods["gpuha-dnsd"]["obj"]["spec"]["replicas"]
    want = []
    for i in range(replicas):
        s = svcs[f"gpuha-dnsd-{i}"]
        assert s["spec"]["publishNotReadyAddresses"] is True
        ingest = next(p for p in s["spec"]["ports"] if p["name"] == "ingest")
        want.append(f"{s['spec']['clusterIP']}:{ingest['port']}")
    sidecar = next(c for c in pods["vllm"]["spec"]["containers"] if c["name"] == "gpuha-sidecar")
    args = dict(a[2:].split("=", 1) for a in sidecar["args"] if a.startswith("--") and "=" in a)
    ingests = [a.split("=", 1)[1] for a in sidecar["args"] if a.startswith("--ingest=")]
    assert ingests == want
    assert args["metrics-url"] == "http://127.0.0.1:8000/metrics"
    vllm = next(c for c in pods["vllm"]["spec"]["containers"] if c["name"] == "vllm")
    assert args["serve-addr"] == f"$(POD_IP):{vllm['ports'][0]['containerPort']}"
    assert args["pool"] in [p["id"] for p in dnsd_config()["dns"]["pools"]]
    assert generate.ROUTER_ARGS[generate.ROUTER_ARGS.index("--pool") + 1] == args["pool"]
    assert pods["vllm"]["spec"]["shareProcessNamespace"] is True


def test_router_listens_where_its_container_says_and_polls_the_headless_service() -> None:
    c = router_config()
    envoy = next(x for x in pod_specs()["gpuha-router"]["spec"]["containers"] if x["name"] == "envoy")
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    listener = c["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["port_value"] == ports["http"] and listener["address"] == "0.0.0.0"
    assert c["admin"]["address"]["socket_address"]["port_value"] == ports["admin"]
    fleet = next(x for x in c["static_resources"]["clusters"] if x["name"] == "gpuha_fleet")
    sa = fleet["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    headless = by_kind("Service")["gpuha-dnsd"]
    assert headless["spec"]["clusterIP"] == "None" and fleet["type"] == "STRICT_DNS"
    assert sa["address"] == f"gpuha-dnsd.{NAMESPACE}.svc.cluster.local"
    assert sa["port_value"] == next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "https")
    assert "/etc/gpuha/envoy/pool-router.yaml" in " ".join(envoy["command"])
    mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    assert mounts["config"] == "/etc/gpuha/envoy" and mounts["wasm"] == "/etc/gpuha/wasm"
    # Mutual TLS to dnsd: the Secret at --dnsd-tls, the SDS ConfigMap at --sds-dir.
    m = mounts_of("gpuha-router", "envoy")
    tls_vol = m[generate.option("--dnsd-tls")][1]
    assert tls_vol["secret"]["secretName"] == "gpuha-router-tls" and "optional" not in tls_vol["secret"]
    assert set(readme_secret_files()["gpuha-router-tls"]) == set(dnsd_tls.FILES)
    assert m[generate.option("--sds-dir")][1]["configMap"]["name"] == "gpuha-router-sds"
    assert "--remote-paths" in generate.ROUTER_ARGS
    # Mode 0440: readable through fsGroup by Envoy's user.
    sc = pod_specs()["gpuha-router"]["spec"]["securityContext"]
    assert tls_vol["secret"]["defaultMode"] == 0o440 and sc["fsGroup"] == sc["runAsUser"]


def test_dnsd_certificate_names_the_fleet_host_and_secrets_come_from_make_certs() -> None:
    text = (K8S / "README.md").read_text()
    cmd = re.search(r"deploy/tls/make-certs.sh all (\S+) --san \"([^\"]+)\"", text)
    assert cmd, "README: the make-certs.sh command for the control channel"
    assert f"DNS:{fleet_host()}" in cmd.group(2).split(","), "dnsd's certificate must name the routers' --fleet host"
    d = cmd.group(1)
    files = readme_secret_files()
    assert files["gpuha-dnsd-tls"] == {"dnsd.crt": f"{d}/dnsd.crt", "dnsd.key": f"{d}/dnsd.key", "client-ca.crt": f"{d}/ca.crt"}
    assert files["gpuha-router-tls"] == {"ca.crt": f"{d}/ca.crt", "client.crt": f"{d}/client.crt", "client.key": f"{d}/client.key"}
    assert not any(v.endswith("ca.key") for f in files.values() for v in f.values()), "the CA key stays off the cluster"


def test_network_policy_admits_routers_to_tls_and_prometheus_to_metrics() -> None:
    cfg = dnsd_config()
    policy = by_kind("NetworkPolicy")["gpuha-dnsd"]
    who = {}
    for rule in policy["spec"]["ingress"]:
        apps = sorted(p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name", "?") for p in rule.get("from", [{}]))
        for p in rule["ports"]:
            who.setdefault((p["port"], p["protocol"]), []).extend(apps)
    assert who[(port_of(cfg["http"]["listen"]), "TCP")] == ["gpuha-router"]
    assert who[(port_of(cfg["http"]["metrics_listen"]), "TCP")] == ["prometheus"]
    headless = {p["name"]: p["port"] for p in by_kind("Service")["gpuha-dnsd"]["spec"]["ports"]}
    assert headless["https"] == port_of(cfg["http"]["listen"]) and headless["metrics"] == port_of(cfg["http"]["metrics_listen"])


def test_dns_addresses_agree_with_the_zone_and_the_pools() -> None:
    cfg = dnsd_config()
    svcs = by_kind("Service")
    zone = cfg["dns"]["zones"][0]
    glue = {r["name"]: r["value"] for r in zone["records"] if r["type"] == "A"}
    ns = [n.removesuffix("." + zone["origin"]) for n in zone["ns"]]
    replicas = pod_specs()["gpuha-dnsd"]["obj"]["spec"]["replicas"]
    assert len(ns) == replicas
    for i, name in enumerate(ns):
        s = svcs[f"gpuha-dnsd-{i}-dns"]
        assert s["spec"]["loadBalancerIP"] == glue[name], f"{name}: glue != Service gpuha-dnsd-{i}-dns"
        assert sorted((p["port"], p["protocol"]) for p in s["spec"]["ports"]) == [(53, "TCP"), (53, "UDP")]
    assert svcs["gpuha-router"]["spec"]["loadBalancerIP"] in cfg["dns"]["pools"][0]["routers"]


def readme_secrets_and_claims() -> tuple[set[str], set[str]]:
    text = (K8S / "README.md").read_text()
    secrets = set(re.findall(r"kubectl -n gpuha create secret generic ([a-z0-9-]+)", text))
    claims = set(re.findall(r"PersistentVolumeClaim `([a-z0-9-]+)`", text))
    return secrets, claims


def test_every_referenced_configmap_secret_and_claim_exists() -> None:
    cms = set(by_kind("ConfigMap"))
    secrets, claims = readme_secrets_and_claims()
    assert {"gpuha-frame-key", "gpuha-dnsd-admin"} <= secrets, "README: the kubectl commands that make the Secrets"
    for wname, w in pod_specs().items():
        spec = w["spec"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in w["obj"]["spec"].get("volumeClaimTemplates", [])}
        for v in vols.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in cms, f"{wname}: ConfigMap {v['configMap']['name']}"
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, f"{wname}: Secret {v['secret']['secretName']} not made in README"
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{wname}: claim not described in README"
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols or m["name"] in templates, f"{wname}/{c['name']} mounts unknown volume {m['name']}"
    for pdb in by_kind("PodDisruptionBudget").values():
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(all(w["labels"].get(k) == v for k, v in sel.items()) for w in pod_specs().values()), pdb["metadata"]["name"]


def test_dnsd_accepts_its_config(tmp_path: Path) -> None:
    """The ConfigMap's dnsd.toml through `gpuha-dnsd --check`, with its files made here."""
    try:
        dnsd = harness.binary("gpuha-dnsd")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    text = by_kind("ConfigMap")["gpuha-dnsd-config"]["data"]["dnsd.toml"]
    (tmp_path / "frame.key").write_bytes(bytes(range(32)))
    (tmp_path / "admin.token").write_text("0123456789abcdef0123456789abcdef\n")
    certs = tmp_path / "certs"
    make_certs(certs, "--san", f"DNS:{fleet_host()}")
    for old, new in [("/etc/gpuha/keys/frame.key", tmp_path / "frame.key"), ("/etc/gpuha/admin/admin.token", tmp_path / "admin.token"),
                     ("/var/lib/gpuha-dnsd/", f"{tmp_path}/"), ("/etc/gpuha/tls/dnsd.crt", certs / "dnsd.crt"),
                     ("/etc/gpuha/tls/dnsd.key", certs / "dnsd.key"), ("/etc/gpuha/tls/client-ca.crt", certs / "ca.crt")]:
        assert old in text
        text = text.replace(old, str(new))
    (tmp_path / "dnsd.toml").write_text(text)
    r = subprocess.run([str(dnsd), "--config", str(tmp_path / "dnsd.toml"), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "config ok" in r.stdout, r.stdout + r.stderr
    # Without [http.tls] the same config is refused: plain HTTP only on loopback.
    plain = "\n".join(line for line in text.splitlines() if not line.startswith("tls = "))
    (tmp_path / "dnsd.toml").write_text(plain)
    r = subprocess.run([str(dnsd), "--config", str(tmp_path / "dnsd.toml"), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "loopback" in r.stderr, r.stderr
    (tmp_path / "dnsd.toml").write_text(text.replace('listen = "0.0.0.0:5353"', 'listen = "0.0.0.0:5353"\nbogus = 1'))
    r = subprocess.run([str(dnsd), "--config", str(tmp_path / "dnsd.toml"), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "bogus" in r.stderr, r.stderr


def test_the_vllm_drain_hook_waits_for_the_request_in_flight(tmp_path: Path) -> None:
    """vllm_drain.py returns at once on an idle vLLM, waits out a stream in flight, and fails open
    (returns) when /metrics cannot be read."""
    try:
        fake = harness.binary("fake-vllm")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    hook = [sys.executable, str(K8S / "vllm_drain.py"), "--gate-s", "0", "--period-s", "0.1"]
    w = harness.Proc("fake-drain", [fake, "--port", "0", "--id", "d", "--ttft-ms", "0", "--tokens-per-s", "10"], tmp_path)
    try:
        addr = w.wait_line(r"LISTENING (\S+)").group(1)
        url = f"http://{addr}/metrics"
        r = subprocess.run([*hook, "--metrics-url", url], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "no request running" in r.stdout, r.stdout + r.stderr

        done = {}

        def stream() -> None:
            host, port = addr.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 25, "stream": True})
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            conn.getresponse().read()
            done["t"] = time.monotonic()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        harness.wait_for(lambda: "vllm:num_requests_running{" in (m := harness.http_get(url)[1].decode())
                         and re.search(r"^vllm:num_requests_running\{[^}]*\} [1-9]", m, re.M), 10, "the stream to run")
        r = subprocess.run([*hook, "--metrics-url", url], capture_output=True, text=True, timeout=30)
        ended = time.monotonic()
        t.join(10)
        assert r.returncode == 0 and "no request running" in r.stdout, r.stdout + r.stderr
        assert "t" in done and done["t"] <= ended, "the hook returned while the stream still ran"
    finally:
        w.terminate()
    port = harness.free_port()
    r = subprocess.run([*hook, "--metrics-url", f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "unreadable" in r.stdout, r.stdout + r.stderr


def test_generate_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "generated.yaml"
    stale.write_text((K8S / "generated.yaml").read_text().replace("--pool us-east-gcp", "--pool other"))
    monkeypatch.setattr(generate, "OUT", str(stale))
    assert generate.main(["--check"]) == 1
    monkeypatch.setattr(generate, "OUT", str(K8S / "generated.yaml"))
    assert generate.main(["--check"]) == 0


def test_readme_commands_match_the_manifests() -> None:
    text = (K8S / "README.md").read_text()
    assert "python3 deploy/kubernetes/generate.py" in text
    assert "kubectl apply -k deploy/kubernetes" in text
    assert "STATIC" not in text and "EDS" in text, "membership comes from dnsd over EDS, not a static list"
