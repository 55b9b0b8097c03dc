#!/usr/bin/env python3
"""Render the cuttle Helm chart and check what matters (run by .ci/deploy-checks.sh).

For every scenario (the default values, both modes, every examples/*.yaml, and a parent chart
that includes the sidecar templates) this renders with `helm template`, validates every
manifest against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields
fail), checks the CRD kinds that those schemas do not have (ServiceMonitor, HTTPRoute) for the
fields the chart relies on, and runs `cuttle check` on the proxy.yaml and policy that the chart
renders. Then property tests: the policy is mounted as a directory (no subPath), probes,
termination grace above the drain, PDB, security context, rolling update, the settings
checksum, the native sidecar, and the template's refusals.

Environment: HELM (the helm binary), CUTTLE_BIN (the cuttle binary), K8S_SCHEMA_VERSION,
CHART_TEST_TMP (a scratch directory).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "cuttle"
PARENT = ROOT / "helm" / "examples" / "broker-with-cuttle"
HELM = os.environ["HELM"]
CUTTLE = os.environ["CUTTLE_BIN"]
K8S = os.environ.get("K8S_SCHEMA_VERSION", "1.30.0")
TMP = Path(os.environ.get("CHART_TEST_TMP", "/tmp/cuttle-chart-test"))
RELEASE = "rel"

# Kinds that are CRDs, not in the core schemas: checked by check_crd() instead.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------

class RenderError(Exception):
    pass


def helm_template(chart=CHART, files=(), sets=(), set_json=(), kube=None):
    cmd = [HELM, "template", RELEASE, str(chart), "--namespace", "edge"]
    for f in files:
        cmd += ["-f", str(f)]
    for s in sets:
        cmd += ["--set", s]
    for s in set_json:
        cmd += ["--set-json", s]
    if kube:
        cmd += ["--kube-version", kube]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RenderError(p.stderr.strip())
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def render(*args, **kw):
    return Manifests(helm_template(*args, **kw))


class Manifests:
    def __init__(self, docs):
        self.docs = docs

    def of(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind, name=None):
        found = [d for d in self.of(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def configmap_data(self, suffix):
        return self.one("ConfigMap", f"{RELEASE}-cuttle-{suffix}")["data"]

    def settings(self):
        return yaml.safe_load(self.configmap_data("config")["proxy.yaml"])

    def workload(self):
        """The pod template that runs the proxy (edge Deployment, sidecar demo, parent's)."""
        found = [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet")
                 and any(c["name"] == "cuttle" for c in pod_containers(d["spec"]["template"]["spec"]))]
        assert len(found) == 1, f"expected one workload running cuttle, found {len(found)}"
        return found[0]

    def pod(self):
        return self.workload()["spec"]["template"]

    def cuttle(self):
        cs = [c for c in pod_containers(self.pod()["spec"]) if c["name"] == "cuttle"]
        assert len(cs) == 1
        return cs[0]


def pod_containers(pod_spec):
    return list(pod_spec.get("containers", [])) + list(pod_spec.get("initContainers", []))


# ------------------------------------------------------------------------------------------
# Validation of every rendered manifest
# ------------------------------------------------------------------------------------------

def check_crd(doc):
    kind, spec = doc["kind"], doc["spec"]
    assert doc["metadata"].get("name"), f"{kind} without a name"
    if kind == "ServiceMonitor":
        assert spec["selector"]["matchLabels"], "ServiceMonitor selects nothing"
        assert spec["endpoints"], "ServiceMonitor without endpoints"
        for ep in spec["endpoints"]:
            assert isinstance(ep.get("port"), str) and ep.get("path", "").startswith("/")
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "metricRelabelings",
                               "relabelings", "scheme"}, f"unexpected endpoint fields {set(ep)}"
    elif kind == "HTTPRoute":
        assert spec["parentRefs"] and all("name" in r for r in spec["parentRefs"])
        for rule in spec["rules"]:
            for m in rule.get("matches", []):
                assert m["path"]["type"] in ("PathPrefix", "Exact", "RegularExpression")
            for b in rule["backendRefs"]:
                assert b["name"] and isinstance(b["port"], int)
    else:
        raise AssertionError(f"no check for CRD kind {kind}")


def validate_all(m, scenario):
    skipped = []
    for doc in m.docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            check_crd(doc)
            skipped.append(doc["kind"])
            continue
        try:
            kubernetes_validate.validate(doc, K8S, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{scenario}: {doc['kind']}/{doc['metadata']['name']} "
                                 f"fails the Kubernetes {K8S} schema: {e.message} at "
                                 f"{'/'.join(map(str, e.path))}") from None
    return skipped


def self_signed(dirpath):
    dirpath.mkdir(parents=True, exist_ok=True)
    crt, key = dirpath / "tls.crt", dirpath / "tls.key"
    if not crt.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=cuttle.test", "-keyout", str(key), "-out", str(crt)],
                       check=True, capture_output=True)
    return crt, key


def cuttle_check(m, scenario, values_env=()):
    """`cuttle check` on the rendered proxy.yaml, with the policy where the chart puts it
    (rewritten to a scratch directory) and dummy values for the Secret-provided variables."""
    work = TMP / scenario
    shutil.rmtree(work, ignore_errors=True)
    (work / "policy").mkdir(parents=True)
    settings = m.settings()
    policy_path = Path(settings["policy_file"])
    policy_cms = [d for d in m.of("ConfigMap") if d["metadata"]["name"].endswith("-cuttle-policy")]
    if policy_cms:
        text = policy_cms[0]["data"][policy_path.name]
    else:  # policy.existingConfigMap: not the chart's to render; any valid policy will do
        text = "projects: []\n"
    (work / "policy" / policy_path.name).write_text(text)
    settings["policy_file"] = str(work / "policy" / policy_path.name)
    if "tls" in settings:
        crt, key = self_signed(work / "tls")
        settings["tls"] = {"cert": str(crt), "key": str(key)}
    (work / "proxy.yaml").write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}
    for name in values_env:
        env[name] = "x" * 48
    p = subprocess.run([CUTTLE, "check", "--config", str(work / "proxy.yaml")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, f"{scenario}: cuttle check refused the rendered config:\n{p.stderr}"
    return p.stdout.strip()


def secret_env_names(m):
    return [e["name"] for e in m.cuttle().get("env", []) if "valueFrom" in e]


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def parent_chart():
    """The example parent chart, with this chart as its dependency, rendered."""
    copy = TMP / "parent"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(ROOT / "helm", copy, ignore=shutil.ignore_patterns("charts", "*.tgz"))
    chart = copy / "examples" / PARENT.name
    p = subprocess.run([HELM, "dependency", "build", str(chart)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([HELM, "lint", "--strict", str(chart)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return render(chart)


def memo(make):
    """Each scenario is rendered once (its Manifests are only read)."""
    cache = []

    def get():
        if not cache:
            cache.append(make())
        return cache[0]
    return get


SCENARIOS = {"default": lambda: render(),
             "sidecar-default-native": lambda: render(sets=["mode=sidecar", "sidecar.native=true",
                                                            "config.settings.upstream.broker=mqtt://127.0.0.1:1883"]),
             "parent-chart": parent_chart}
for f in sorted((CHART / "examples").glob("*.yaml")):
    SCENARIOS[f"example-{f.stem}"] = (lambda f=f: render(files=[f]))
SCENARIOS = {name: memo(make) for name, make in SCENARIOS.items()}


@test
def every_scenario_validates_and_its_config_passes_cuttle_check():
    assert len(SCENARIOS) >= 7, sorted(SCENARIOS)
    crds = set()
    for name, make in SCENARIOS.items():
        m = make()
        crds.update(validate_all(m, name))
        out = cuttle_check(m, name, secret_env_names(m))
        print(f"    {name}: {len(m.docs)} manifests valid; {out}")
    # The production example exercises both CRD checks.
    assert crds == {"ServiceMonitor", "HTTPRoute"}, crds


@test
def policy_and_settings_are_directory_mounts_never_subpath():
    for name in ("default", "example-sidecar-mosquitto", "example-sidecar-native",
                 "example-existing-configmap", "parent-chart"):
        m = SCENARIOS[name]()
        c, pod = m.cuttle(), m.pod()["spec"]
        mounts = {v["name"]: v for v in c["volumeMounts"]}
        for v in c["volumeMounts"]:
            assert "subPath" not in v and "subPathExpr" not in v, f"{name}: {v} uses subPath"
        volumes = {v["name"]: v for v in pod["volumes"]}
        settings = m.settings()
        policy_dir = mounts["cuttle-policy"]["mountPath"]
        assert Path(settings["policy_file"]).parent == Path(policy_dir), (settings["policy_file"], policy_dir)
        policy_vol = volumes["cuttle-policy"]["configMap"]
        assert "items" not in policy_vol, "the policy volume must carry the whole ConfigMap"
        config_env = {e["name"]: e.get("value") for e in c["env"]}["CUTTLE_CONFIG"]
        assert Path(config_env).parent == Path(mounts["cuttle-config"]["mountPath"])
        assert volumes["cuttle-config"]["configMap"]["name"] == f"{RELEASE}-cuttle-config"
        if name == "example-existing-configmap":
            assert policy_vol["name"] == "cuttle-policy"
            assert not [d for d in m.of("ConfigMap") if d["metadata"]["name"].endswith("-policy")]
        else:
            assert policy_vol["name"] == f"{RELEASE}-cuttle-policy"
            m.one("ConfigMap", policy_vol["name"])


@test
def probes_use_healthz_and_readyz_on_the_admin_port():
    for sets in ([], ["ports.admin=9191", "ports.client=8181"]):
        m = render(sets=sets)
        c, s = m.cuttle(), m.settings()
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert ports[c[probe]["httpGet"]["port"]] == int(s["admin"].rsplit(":", 1)[1])
        assert s["admin"].startswith("0.0.0.0:") and s["listen"].startswith("0.0.0.0:")
        assert ports["cuttle-ws"] == int(s["listen"].rsplit(":", 1)[1])
        # Every Service port targets a port the container has.
        for svc in m.of("Service"):
            for p in svc["spec"]["ports"]:
                assert p["targetPort"] in ports, (svc["metadata"]["name"], p)


@test
def termination_grace_is_above_the_drain():
    cases = [([], 20, 5), (["config.settings.shutdown.grace_s=90", "probes.liveness.failureThreshold=10"], 90, 5),
             (["preStop.sleepSeconds=0"], 20, 0), (["config.settings.shutdown=null"], 20, 5)]
    for sets, grace, sleep in cases:
        m = render(sets=sets)
        spec = m.pod()["spec"]
        assert spec["terminationGracePeriodSeconds"] > grace + sleep, (sets, spec["terminationGracePeriodSeconds"])
        pre = m.cuttle().get("lifecycle", {}).get("preStop")
        assert (pre == {"sleep": {"seconds": sleep}}) if sleep else pre is None, pre
    m = render(sets=["terminationGracePeriodSeconds=120"])
    assert m.pod()["spec"]["terminationGracePeriodSeconds"] == 120
    for bad in ("25", "20"):
        try:
            render(sets=[f"terminationGracePeriodSeconds={bad}"])
        except RenderError as e:
            assert "must be above shutdown.grace_s" in str(e), e
        else:
            raise AssertionError(f"terminationGracePeriodSeconds={bad} (<= 20 + 5) was accepted")
    # The sidecar templates compute it the same way.
    m = SCENARIOS["example-sidecar-mosquitto"]()
    assert m.pod()["spec"]["terminationGracePeriodSeconds"] > 10 + 5


@test
def edge_mode_has_pdb_services_and_rolling_update_never_all_at_once():
    for m in (render(), SCENARIOS["example-edge-production"]()):
        d = m.workload()
        assert d["kind"] == "Deployment"
        labels = d["spec"]["template"]["metadata"]["labels"]
        pdb = m.one("PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable")
        ru = d["spec"]["strategy"]["rollingUpdate"]
        assert d["spec"]["strategy"]["type"] == "RollingUpdate"
        assert ru["maxUnavailable"] == 0 and ru["maxSurge"] not in (0, "0", "0%"), ru
        names = {s["metadata"]["name"] for s in m.of("Service")}
        assert names == {f"{RELEASE}-cuttle", f"{RELEASE}-cuttle-admin"}, names
        for svc in m.of("Service"):
            assert svc["spec"]["selector"].items() <= labels.items()
        tsc = d["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {t["topologyKey"] for t in tsc} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for t in tsc:
            assert t["labelSelector"]["matchLabels"].items() <= labels.items()
    # PDB with minAvailable instead; both at once is refused.
    m = render(sets=["pdb.maxUnavailable=null", "pdb.minAvailable=1"])
    assert m.one("PodDisruptionBudget")["spec"] == {
        "minAvailable": 1, "selector": m.one("PodDisruptionBudget")["spec"]["selector"]}
    expect_failure(["pdb.minAvailable=1"], "set one of minAvailable and maxUnavailable")
    # No PDB or edge objects in sidecar mode.
    m = SCENARIOS["example-sidecar-mosquitto"]()
    assert not m.of("PodDisruptionBudget") and not m.of("HorizontalPodAutoscaler")
    assert not m.of("ServiceAccount")


@test
def non_root_read_only_security_context():
    for name in ("default", "example-sidecar-native", "parent-chart"):
        m = SCENARIOS[name]()
        sc = m.cuttle()["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, sc
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], sc
        assert sc["seccompProfile"]["type"] == "RuntimeDefault" and sc["runAsUser"] != 0
        pod = m.pod()["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        if name == "default":
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            assert pod["automountServiceAccountToken"] is False
            assert m.one("ServiceAccount")["automountServiceAccountToken"] is False
        # Writable scratch space only where mounted.
        assert any(v["mountPath"] == "/tmp" for v in m.cuttle()["volumeMounts"])


def checksum(m):
    return m.pod()["metadata"]["annotations"]["checksum/settings"]


@test
def settings_checksum_follows_settings_not_policy():
    base = render()
    c0 = checksum(base)
    # It is the digest of exactly the rendered proxy.yaml.
    text = base.configmap_data("config")["proxy.yaml"]
    assert c0 == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
    # Settings changes roll the pods.
    for sets in (["config.settings.limits.send_queue=2048"], ["ports.client=8081"],
                 ["config.tls.existingSecret=tls"], ["config.settings.log.level=debug"]):
        assert checksum(render(sets=sets)) != c0, sets
    # Policy changes do not (they hot-reload), whatever the policy.
    for set_json in (['policy.content={"projects":[{"id":"p2"}]}'],):
        m = render(set_json=set_json)
        assert m.configmap_data("policy") != base.configmap_data("policy")
        assert checksum(m) == c0, set_json
    demo = SCENARIOS["example-demo"]()
    assert demo.configmap_data("policy") != base.configmap_data("policy")
    # The demo example has other settings too (limits); with the default's settings and the
    # demo's policy the checksum is the default's.
    demo_policy = yaml.safe_load((CHART / "examples" / "demo.yaml").read_text())["policy"]
    m = render(set_json=[f"policy={__import__('json').dumps(demo_policy)}"])
    assert checksum(m) == c0
    # Only the settings checksum is on the pod template: nothing derived from the policy.
    assert set(base.pod()["metadata"]["annotations"]) == {"checksum/settings"}
    # The parent chart's pod carries the same checksum as the subchart's ConfigMap.
    p = SCENARIOS["parent-chart"]()
    text = p.configmap_data("config")["proxy.yaml"]
    assert p.pod()["metadata"]["annotations"]["checksum/cuttle-settings"] == \
        hashlib.sha256(text.rstrip("\n").encode()).hexdigest()


@test
def native_sidecar_renders_into_init_containers_with_restart_policy_always():
    for name in ("example-sidecar-native", "sidecar-default-native", "parent-chart"):
        spec = SCENARIOS[name]().pod()["spec"]
        inits = [c for c in spec.get("initContainers", []) if c["name"] == "cuttle"]
        assert len(inits) == 1 and inits[0]["restartPolicy"] == "Always", name
        assert all(c["name"] != "cuttle" for c in spec["containers"]), name
        assert any(c["name"] in ("broker", "mosquitto") for c in spec["containers"]), name
    spec = SCENARIOS["example-sidecar-mosquitto"]().pod()["spec"]
    names = [c["name"] for c in spec["containers"]]
    assert names == ["broker", "cuttle"], names
    assert "restartPolicy" not in spec["containers"][1]
    assert not spec.get("initContainers")
    # The demo's broker listens on loopback only, where the sidecar's upstream points.
    m = SCENARIOS["example-sidecar-mosquitto"]()
    conf = m.one("ConfigMap", f"{RELEASE}-cuttle-mosquitto")["data"]["mosquitto.conf"]
    assert "listener 1883 127.0.0.1" in conf
    assert m.settings()["upstream"]["broker"] == "mqtt://127.0.0.1:1883"


@test
def edge_production_hpa_ingress_servicemonitor_httproute():
    m = SCENARIOS["example-edge-production"]()
    d = m.workload()
    assert "replicas" not in d["spec"], "with an HPA the Deployment must not set replicas"
    hpa = m.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]
    kinds = {(x["type"], (x.get("resource") or x.get("pods"))["metric"]["name"] if x["type"] == "Pods"
              else x["resource"]["name"]) for x in hpa["spec"]["metrics"]}
    assert kinds == {("Resource", "cpu"), ("Pods", "cuttle_connections")}, kinds
    ing = m.one("Ingress")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert ann["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    svc = m.one("Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    sm = m.one("ServiceMonitor")
    admin = m.one("Service", f"{RELEASE}-cuttle-admin")
    assert sm["spec"]["selector"]["matchLabels"].items() <= admin["metadata"]["labels"].items()
    assert not sm["spec"]["selector"]["matchLabels"].items() <= m.one("Service", f"{RELEASE}-cuttle")["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in admin["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    route = m.one("HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0] == {"name": f"{RELEASE}-cuttle", "port": 8080}
    # Secrets come from Secrets, by reference.
    env = {e["name"]: e for e in m.cuttle()["env"]}
    assert env["CUTTLE_UPSTREAM_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "cuttle-broker", "key": "password"}
    assert m.settings()["upstream"]["password_env"] == "CUTTLE_UPSTREAM_PASSWORD"
    assert not m.of("Secret"), "the chart must not render Secrets"
    # Its resources keep the HPA's CPU target meaningful.
    assert m.cuttle()["resources"]["requests"]["cpu"]


@test
def tls_from_an_existing_secret_is_a_directory_mount():
    m = SCENARIOS["example-existing-configmap"]()
    c, pod = m.cuttle(), m.pod()["spec"]
    mount = [v for v in c["volumeMounts"] if v["name"] == "cuttle-tls"][0]
    vol = [v for v in pod["volumes"] if v["name"] == "cuttle-tls"][0]
    assert vol["secret"]["secretName"] == "cuttle-tls" and "items" not in vol["secret"]
    s = m.settings()["tls"]
    assert Path(s["cert"]).parent == Path(mount["mountPath"]) == Path(s["key"]).parent
    assert c["envFrom"] == [{"secretRef": {"name": "cuttle-secrets"}}]
    assert pod["terminationGracePeriodSeconds"] == 60


def expect_failure(sets, message, kube=None, files=()):
    try:
        render(sets=sets, kube=kube, files=files)
    except RenderError as e:
        assert message in str(e), f"{sets}: expected {message!r} in: {e}"
    else:
        raise AssertionError(f"{sets} rendered; expected a failure ({message})")


@test
def refusals():
    # Settings the chart owns.
    expect_failure(["config.settings.listen=0.0.0.0:1"], "listen")
    expect_failure(["config.settings.policy_file=x"], "policy_file")
    # Schema: unknown keys and modes, a broker URL with credentials.
    expect_failure(["replicas=3"], "replicas")
    expect_failure(["mode=gateway"], "mode")
    expect_failure(["config.settings.upstrem.broker=x"], "upstrem")
    expect_failure(["config.settings.upstream.broker=mqtt://u:p@host:1883"], "broker")
    expect_failure(["rollingUpdate.maxSurge=0"], "maxSurge")
    # An embedded broker per replica shares nothing.
    expect_failure(["replicaCount=3"], "embedded")
    expect_failure(["autoscaling.enabled=true"], "embedded")
    expect_failure(["mode=sidecar"], "sidecar.demo")
    # The preStop sleep action needs Kubernetes 1.30; without it, 1.29 renders.
    expect_failure([], "sleep lifecycle action", kube="1.29.4")
    m = render(sets=["preStop.sleepSeconds=0"], kube="1.29.4")
    assert "lifecycle" not in m.cuttle()
    assert render(kube="1.30.0").cuttle()["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    expect_failure(["config.settings.upstream.broker=mqtt://b:1883", "autoscaling.enabled=true",
                    "autoscaling.targetCPUUtilizationPercentage=null"], "at least one metric")


def main():
    TMP.mkdir(parents=True, exist_ok=True)
    passed = failed = 0
    for fn in TESTS:
        try:
            fn()
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAIL {fn.__name__}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {fn.__name__}")
    print(f"chart: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
