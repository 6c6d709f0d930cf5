"""The fleet's security: keys (hashed, rotated with a grace window, SIGHUP), certificates, mutual TLS between
real `quantchat controller` / `worker` / `api` processes on loopback, the plain-HTTP warning, /openapi.json.

Every server binds 127.0.0.1; nothing is sent anywhere else.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from quantchat.errors import QuantchatError
from quantchat.serving.keys import KeyRing, SecretSource, hash_key, install_sighup

START_TIMEOUT = 90.0
CHAT = [{"role": "user", "content": "hello there"}]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- keys ---------------------------------------------------------------------------------------
def touch_later(path: Path, text: str) -> None:
    """Rewrite ``path`` with a clearly newer mtime (filesystems with coarse timestamps)."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(old + 2_000_000_000, old + 2_000_000_000))


def test_key_ring_plain_and_hashed_entries(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# client keys\nplain-key-0123456789\n{hash_key('hashed-key-0123456789')}\n\n")
    ring = KeyRing(["from-a-flag-0123456789"], path=f)
    for good in ("plain-key-0123456789", "hashed-key-0123456789", "from-a-flag-0123456789"):
        assert ring.check(good), good
    for bad in (None, "", "plain-key-012345678", hash_key("hashed-key-0123456789"), "x" * 10_000, "\udcff"):
        assert not ring.check(bad), bad
    assert hash_key("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    f.write_text("sha256:1234\n")
    with pytest.raises(QuantchatError, match="line 1: bad hashed key entry"):
        KeyRing(path=f)
    f.write_text("# nothing\n")
    with pytest.raises(QuantchatError, match="no key in the file"):
        KeyRing(path=f)
    with pytest.raises(QuantchatError, match="cannot read keys"):
        KeyRing(path=tmp_path / "missing")
    assert not KeyRing()  # no keys: the API is open (as with no --api-key)


def test_rotation_keeps_the_old_key_for_the_grace_window(tmp_path):
    now = [100.0]
    logs: list[str] = []
    f = tmp_path / "keys"
    f.write_text(hash_key("old-key-0123456789") + "\n")
    ring = KeyRing(path=f, grace_s=60, clock=lambda: now[0], log=logs.append)
    assert ring.check("old-key-0123456789") and not ring.check("new-key-0123456789")
    touch_later(f, "new-key-0123456789\n")
    now[0] += 0.5  # the file is looked at no more than once a second
    assert not ring.check("new-key-0123456789")
    now[0] += 1.0
    seen = now[0]
    assert ring.check("new-key-0123456789")  # seen by its mtime, no restart
    assert ring.check("old-key-0123456789")  # within the grace window
    assert any("accepted for 60 s more" in line for line in logs)
    now[0] = seen + 59.9
    assert ring.check("old-key-0123456789")
    now[0] = seen + 60.1
    assert not ring.check("old-key-0123456789")  # the window is over
    assert ring.check("new-key-0123456789")
    # a key file being rewritten (empty for a moment) keeps the keys there were
    touch_later(f, "")
    now[0] += 2
    assert ring.check("new-key-0123456789")
    assert any("keeping the current" in line for line in logs)
    with pytest.raises(QuantchatError, match=">= 0"):
        KeyRing(grace_s=-1)


def test_sighup_reloads_key_files(tmp_path):
    f = tmp_path / "keys"
    f.write_text("first-key-0123456789\n")
    ring = KeyRing(path=f, grace_s=0, poll_s=3600)  # no mtime polling within the test: only the signal
    old = signal.getsignal(signal.SIGHUP)
    try:
        assert install_sighup([ring], lambda s: None)
        f.write_text("second-key-0123456789\n")
        assert not ring.check("second-key-0123456789")
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)
        assert ring.check("second-key-0123456789") and not ring.check("first-key-0123456789")
    finally:
        signal.signal(signal.SIGHUP, old)


def test_secret_source_follows_its_file(tmp_path):
    f = tmp_path / "s"
    f.write_text("# the worker secret\nsecret-one-0123456789\n")
    src = SecretSource(path=f)
    assert src.header() == {"Authorization": "Bearer secret-one-0123456789"}
    touch_later(f, "secret-two-0123456789\n")
    assert src.get() == "secret-two-0123456789"
    f.write_text(hash_key("x") + "\n")
    with pytest.raises(QuantchatError, match="no plain secret"):
        SecretSource(path=f)
    with pytest.raises(QuantchatError, match="no secret given"):
        SecretSource("")


# -- certificates -------------------------------------------------------------------------------
def run_cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "quantchat", *args], capture_output=True, text=True, timeout=60,
                       env=env or os.environ.copy())
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_deploy_certs(tmp_path):
    from cryptography import x509

    out = tmp_path / "certs"
    run_cli("deploy", "certs", "--out", str(out), "--host", "worker-0.qc.svc", "--host", "10.1.2.3")
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ("api", "controller", "worker"):
        cert = x509.load_pem_x509_certificate((out / f"{role}.pem").read_bytes())
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"localhost", "worker-0.qc.svc", role} <= set(san.get_values_for_type(x509.DNSName))
        assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
                ipaddress.ip_address("10.1.2.3")} <= set(san.get_values_for_type(x509.IPAddress))
        assert stat.S_IMODE((out / f"{role}-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca-key.pem").stat().st_mode) == 0o600
    r = run_cli("deploy", "certs", "--out", str(out), check=False)
    assert r.returncode == 2 and "already exist" in r.stderr
    r = run_cli("deploy", "certs", "--out", str(out), "--role", "Bad/Role", "--force", check=False)
    assert r.returncode == 2 and "--role" in r.stderr
    # the deploy verbs never import torch
    code = ("import sys; from quantchat.cli.main import main; "
            f"main(['deploy', 'certs', '--out', {str(tmp_path / 'c2')!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_deploy_keygen_and_hash_key():
    r = run_cli("deploy", "keygen")
    key, entry = r.stdout.split()
    assert len(key) >= 40 and entry == hash_key(key)
    r = subprocess.run([sys.executable, "-m", "quantchat", "deploy", "hash-key"], input="k1\n\nk2\n",
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == [hash_key("k1"), hash_key("k2")]


def test_plain_http_warning(capsys):
    from quantchat.cli.serve_cmds import warn_plain_http
    from quantchat.serving.tls import TLSConfig

    warn_plain_http("10.0.0.5", TLSConfig(), "the controller")
    err = capsys.readouterr().err
    assert "warning: the controller serves plain HTTP on 10.0.0.5" in err and "--tls-cert" in err
    for host in ("127.0.0.1", "localhost", "::1"):
        warn_plain_http(host, TLSConfig(), "the API server")
    assert capsys.readouterr().err == ""


def test_tls_options_are_checked(tmp_path):
    from quantchat.serving.tls import TLSConfig

    with pytest.raises(QuantchatError, match="go together"):
        TLSConfig(cert="a.pem")
    with pytest.raises(QuantchatError, match="no such file"):
        TLSConfig(ca=str(tmp_path / "nope.pem"))
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(QuantchatError, match="needs this server's own --tls-cert"):
        TLSConfig(ca=str(tmp_path / "ca.pem")).uvicorn_kwargs(require_client_cert=True)


# -- /openapi.json ------------------------------------------------------------------------------
def test_openapi_schema_is_published():
    from starlette.testclient import TestClient
    from test_openai_streaming import ScriptedBackend

    from quantchat.serving.openai.app import create_app

    client = TestClient(create_app(ScriptedBackend(), api_keys={"k-0123456789"}))
    r = client.get("/openapi.json")  # public, like /health: clients are generated from it
    assert r.status_code == 200
    schema = r.json()
    assert schema["openapi"].startswith("3.")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health"):
        assert path in schema["paths"], path
    assert "ChatCompletionRequest" in schema["components"]["schemas"]
    for page in ("/docs", "/redoc"):  # no docs pages (they would load scripts from a CDN)
        r = client.get(page, headers={"Authorization": "Bearer k-0123456789"})
        assert r.status_code == 404 and "error" in r.json()
    assert client.get("/v1/models").status_code == 401


# -- mutual TLS between real processes ----------------------------------------------------------
def client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class Fleet:
    def __init__(self, root: Path, certs: Path) -> None:
        self.root, self.certs = root, certs
        self.procs: dict[str, subprocess.Popen] = {}
        self.cport, self.wport, self.aport = free_port(), free_port(), free_port()
        self.controller = f"https://127.0.0.1:{self.cport}"
        self.worker = f"https://127.0.0.1:{self.wport}"
        self.api = f"https://127.0.0.1:{self.aport}"
        self.worker_secret, self.admin_secret = "worker-secret-0123456789abcdef", "admin-secret-0123456789abcdef"
        (root / "worker.secret").write_text(self.worker_secret + "\n")
        (root / "admin.secret").write_text(self.admin_secret + "\n")
        self.keys = root / "api.keys"
        self.keys.write_text(hash_key("sk-first-0123456789") + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTCHAT_") or k == "QUANTCHAT_KERNELS_DIR"}
        self.env = {**env, "PYTHONUNBUFFERED": "1", "QUANTCHAT_HOME": str(root / "home"), "OMP_NUM_THREADS": "1"}

    def tls(self, role: str) -> list[str]:
        c = self.certs
        return ["--tls-cert", str(c / f"{role}.pem"), "--tls-key", str(c / f"{role}-key.pem"), "--tls-ca", str(c / "ca.pem")]

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "quantchat", *args], stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- {n} (rc={p.poll()}) ---\n{self.log(n)[-3000:]}" for n, p in self.procs.items())

    def wait_for(self, what: str, pred, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if pred():
                    return
            except (httpx.HTTPError, ssl.SSLError):
                pass
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}\n{self.all_logs()}")

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from tiny_models import make_tiny_chat_model

    root = tmp_path_factory.mktemp("fleet")
    certs, foreign = root / "certs", root / "foreign"
    subprocess.run([sys.executable, "-m", "quantchat", "deploy", "certs", "--out", str(certs)], check=True,
                   capture_output=True, timeout=60)
    subprocess.run([sys.executable, "-m", "quantchat", "deploy", "certs", "--out", str(foreign)], check=True,
                   capture_output=True, timeout=60)
    f = Fleet(root, certs)
    f.foreign = foreign
    try:
        f.start("controller", "controller", "--port", str(f.cport), *f.tls("controller"),
                "--worker-secret-file", str(root / "worker.secret"), "--admin-secret-file", str(root / "admin.secret"),
                "--heartbeat-expiry", "5")
        f.start("api", "api", "--controller", f.controller, "--port", str(f.aport), *f.tls("api"),
                "--admin-secret-file", str(root / "admin.secret"), "--api-key-file", str(f.keys), "--key-grace", "3")
        model_dir = root / "tiny-chat"
        model_dir.mkdir()
        make_tiny_chat_model(model_dir)
        f.start("worker", "worker", "--model", str(model_dir), "--quant", "none", "--max-seq-len", "256",
                "--threads", "1", "--max-batch", "2", "--controller", f.controller, "--port", str(f.wport),
                *f.tls("worker"), "--worker-secret-file", str(root / "worker.secret"),
                "--admin-secret-file", str(root / "admin.secret"), "--heartbeat-interval", "0.5")
        f.ca = client_ctx(certs / "ca.pem")
        f.as_api = client_ctx(certs / "ca.pem", certs / "api.pem", certs / "api-key.pem")
        admin = {"Authorization": f"Bearer {f.admin_secret}"}

        def registered():
            r = httpx.get(f.controller + "/workers", headers=admin, verify=f.as_api, timeout=5)
            return r.status_code == 200 and [w["address"] for w in r.json()["workers"]] == [f.worker]

        f.wait_for("the worker to register over mutual TLS", registered, START_TIMEOUT)
        f.wait_for("the API to be ready", lambda: httpx.get(f.api + "/health", verify=f.ca, timeout=5).status_code
                   == 200, 30)
        yield f
    finally:
        f.close()


def chat(fleet: Fleet, key: str) -> httpx.Response:
    return httpx.post(fleet.api + "/v1/chat/completions", verify=fleet.ca, timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"messages": CHAT, "max_tokens": 6, "temperature": 0})


def test_a_chat_answer_through_the_mutual_tls_fleet(fleet):
    r = chat(fleet, "sk-first-0123456789")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] == 6
    for name in ("controller", "worker", "api"):
        log = fleet.log(name)
        assert "https://127.0.0.1" in log and "plain HTTP" not in log, log
    with pytest.raises(httpx.TransportError):  # the API speaks only TLS
        httpx.get(fleet.api.replace("https", "http") + "/health", timeout=5)


def test_the_fleet_refuses_certificates_of_another_ca(fleet):
    c, bad = fleet.certs, fleet.foreign
    reg = {"address": "https://127.0.0.1:1", "model": "evil", "max_model_len": 8}
    ws = {"Authorization": f"Bearer {fleet.worker_secret}"}
    for url in (fleet.controller, fleet.worker):
        # a worker certificate from another CA, or none: the handshake fails, whatever the secret
        for ctx in (client_ctx(c / "ca.pem", bad / "worker.pem", bad / "worker-key.pem"), client_ctx(c / "ca.pem")):
            with pytest.raises((httpx.TransportError, ssl.SSLError)):
                httpx.post(url + "/register", json=reg, headers=ws, verify=ctx, timeout=5)
        # the fleet's own certificate passes (so the refusals above are the certificate's)
        ok = client_ctx(c / "ca.pem", c / "worker.pem", c / "worker-key.pem")
        assert httpx.get(url + "/health", verify=ok, timeout=5).status_code == 200
    # a client that trusts only the other CA does not accept the controller either
    with pytest.raises((httpx.TransportError, ssl.SSLError)):
        httpx.get(fleet.controller + "/health", verify=client_ctx(bad / "ca.pem", bad / "api.pem", bad / "api-key.pem"),
                  timeout=5)


def test_each_role_has_its_own_secret(fleet):
    ctx = fleet.as_api
    ws = {"Authorization": f"Bearer {fleet.worker_secret}"}
    admin = {"Authorization": f"Bearer {fleet.admin_secret}"}
    reg = {"address": "https://127.0.0.1:1", "model": "evil", "max_model_len": 8}
    # the admin secret cannot register workers; the worker secret cannot list, dispatch or generate
    assert httpx.post(fleet.controller + "/register", json=reg, headers=admin, verify=ctx).status_code == 401
    assert httpx.get(fleet.controller + "/workers", headers=ws, verify=ctx).status_code == 401
    assert httpx.post(fleet.controller + "/dispatch", json={}, headers=ws, verify=ctx).status_code == 401
    assert httpx.get(fleet.worker + "/worker/status", headers=ws, verify=ctx).status_code == 401
    assert httpx.get(fleet.worker + "/worker/status", headers=admin, verify=ctx).status_code == 200
    assert httpx.get(fleet.controller + "/workers", headers=admin, verify=ctx).status_code == 200
    # neither is an API key
    for h in (ws, admin):
        assert httpx.get(fleet.api + "/v1/models", headers=h, verify=fleet.ca).status_code == 401


def test_api_keys_rotate_without_a_restart(fleet):
    assert chat(fleet, "sk-first-0123456789").status_code == 200
    assert chat(fleet, "sk-second-0123456789").status_code == 401
    touch_later(fleet.keys, hash_key("sk-second-0123456789") + "\n")
    deadline = time.monotonic() + 10
    while chat(fleet, "sk-second-0123456789").status_code != 200:  # read again within about a second
        assert time.monotonic() < deadline, fleet.log("api")
        time.sleep(0.2)
    t_rotated = time.monotonic()
    assert chat(fleet, "sk-first-0123456789").status_code == 200  # the old key within the 3 s grace window
    time.sleep(max(0.0, t_rotated + 3.5 - time.monotonic()))
    r = chat(fleet, "sk-first-0123456789")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert chat(fleet, "sk-second-0123456789").status_code == 200
    # SIGHUP reads the file again even when its mtime did not change
    mtime = fleet.keys.stat().st_mtime_ns
    fleet.keys.write_text("sk-third-0123456789\n")
    os.utime(fleet.keys, ns=(mtime, mtime))
    time.sleep(1.2)
    assert chat(fleet, "sk-third-0123456789").status_code == 401
    fleet.procs["api"].send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while chat(fleet, "sk-third-0123456789").status_code != 200:
        assert time.monotonic() < deadline, fleet.log("api")
        time.sleep(0.1)
    assert "SIGHUP" in fleet.log("api")


def test_a_worker_with_a_foreign_certificate_never_registers(fleet):
    """A real worker process that trusts the fleet's CA but shows a certificate of another CA: the
    controller refuses its TLS handshake, so it never registers (and says why in its log)."""
    port = free_port()
    bad = fleet.foreign
    model_dir = fleet.root / "tiny-chat"
    fleet.start("intruder", "worker", "--model", str(model_dir), "--quant", "none", "--max-seq-len", "64",
                "--threads", "1", "--max-batch", "1", "--controller", fleet.controller, "--port", str(port),
                "--tls-cert", str(bad / "worker.pem"), "--tls-key", str(bad / "worker-key.pem"),
                "--tls-ca", str(fleet.certs / "ca.pem"), "--worker-secret-file", str(fleet.root / "worker.secret"),
                "--admin-secret-file", str(fleet.root / "admin.secret"), "--heartbeat-interval", "0.5")
    try:
        fleet.wait_for("the intruder to try to register",
                       lambda: "is unreachable" in fleet.log("intruder"), START_TIMEOUT)
        time.sleep(1.5)  # a few more tries
        admin = {"Authorization": f"Bearer {fleet.admin_secret}"}
        r = httpx.get(fleet.controller + "/workers", headers=admin, verify=fleet.as_api, timeout=5)
        assert [w["address"] for w in r.json()["workers"]] == [fleet.worker]
        log = fleet.log("intruder")
        assert "registered with the controller" not in log, log
        assert "is this worker's certificate signed by the fleet CA" in log, log
        assert chat(fleet, "sk-second-0123456789").status_code in (200, 401)  # the fleet is unaffected
    finally:
        p = fleet.procs.pop("intruder")
        p.terminate()
        p.wait(timeout=10)
