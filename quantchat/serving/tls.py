"""TLS for the fleet: a small CA and per-role certificates, and the SSL settings of servers and clients.

``make_certs`` (``quantchat deploy certs``) writes ``ca.pem`` / ``ca-key.pem`` and for each role
(api, controller, worker) ``ROLE.pem`` / ``ROLE-key.pem``: ECDSA P-256, for both server and client
authentication, with SANs for localhost, 127.0.0.1, ::1 and the names given. Keys are written 0600.

With ``--tls-ca`` a role speaks mutual TLS: as a server it asks every client for a certificate signed
by that CA and refuses the handshake without one (``ssl.CERT_REQUIRED``); as a client it verifies the
server against the CA and shows its own certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from quantchat.errors import QuantchatError

ROLES = ("api", "controller", "worker")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TLSConfig:
    """One process's TLS files: its certificate and key, and the fleet CA (mutual TLS) if given."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise QuantchatError("--tls-cert and --tls-key go together")
        for what, f in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if f and not Path(f).is_file():
                raise QuantchatError(f"{what} {f}: no such file")

    @property
    def server(self) -> bool:
        return bool(self.cert)

    def uvicorn_kwargs(self, require_client_cert: bool) -> dict:
        """uvicorn.run's ssl_* arguments (nothing for plain HTTP)."""
        if not self.server:
            if self.ca and require_client_cert:
                raise QuantchatError("--tls-ca (mutual TLS) needs this server's own --tls-cert and --tls-key")
            return {}
        kw = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.ca and require_client_cert:
            kw |= {"ssl_ca_certs": self.ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return kw

    def client_context(self) -> ssl.SSLContext | None:
        """The SSL context of this process's outgoing fleet connections (None: system defaults)."""
        if not self.ca and not self.cert:
            return None
        ctx = ssl.create_default_context(cafile=self.ca) if self.ca else ssl.create_default_context()
        if self.cert:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as e:
                raise QuantchatError(f"{self.cert}: cannot load the certificate and key ({e})") from None
        return ctx


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "quantchat fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(names: list[str]):
    from cryptography import x509

    out, seen = [], set()
    for n in names:
        n = n.strip().strip("[]")
        if not n or n.lower() in seen:
            continue
        seen.add(n.lower())
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n.lower()))
    return x509.SubjectAlternativeName(out)


def _write(path: Path, data: bytes, private: bool) -> None:
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(out: str | Path, hosts: list[str] | tuple[str, ...] = (), roles: tuple[str, ...] = ROLES,
               days: int = 365, ca_name: str = "quantchat fleet CA", force: bool = False) -> dict[str, Path]:
    """A new CA and one certificate per role in ``out``; the paths written, by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if days < 1:
        raise QuantchatError("--days must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = ["ca.pem", "ca-key.pem"] + [f for r in roles for f in (f"{r}.pem", f"{r}-key.pem")]
    existing = [t for t in targets if (out / t).exists()]
    if existing and not force:
        raise QuantchatError(f"{out}: {', '.join(existing)} already exist (--force replaces them, and every "
                             "certificate signed by the old CA stops being trusted)")
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = _name(ca_name)
    ca_cert = (x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=max(days, 3650)))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=True, crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    written: dict[str, Path] = {}
    _write(out / "ca-key.pem", _key_pem(ca_key), private=True)
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    written |= {"ca": out / "ca.pem", "ca-key": out / "ca-key.pem"}
    names = [*LOCAL_NAMES, *hosts]
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(f"quantchat-{role}")).issuer_name(ca_subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=True,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(_san(names + [role]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(out / f"{role}-key.pem", _key_pem(key), private=True)
        _write(out / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
        written |= {role: out / f"{role}.pem", f"{role}-key": out / f"{role}-key.pem"}
    return written
