"""``quantchat deploy``: what an operator needs to run the fleet securely (no torch import).

- ``deploy certs --out DIR [--host NAME ...]``: a small CA and per-role certificates for mutual TLS.
- ``deploy keygen``: a new random key (for an API key, the worker or admin secret) and its hashed entry.
- ``deploy hash-key``: the ``sha256:HEX`` entry of a key read from stdin, for key files that hold no plain keys.
- ``deploy checkpoint-key --out FILE``: a new 256-bit key for encrypting or signing quantized checkpoints.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from pathlib import Path

from quantchat.cli.common import status
from quantchat.errors import QuantchatError

_ROLE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def cmd_certs(args: argparse.Namespace) -> int:
    from quantchat.serving.tls import ROLES, make_certs

    roles = tuple(dict.fromkeys(args.role or ROLES))
    for r in roles:
        if not _ROLE.match(r):
            raise QuantchatError(f"--role {r!r}: use lowercase letters, digits and '-'")
    written = make_certs(args.out, hosts=args.host, roles=roles, days=args.days, force=args.force)
    names = ", ".join(["localhost", "127.0.0.1", "::1", *args.host])
    status(f"wrote a CA and certificates for {', '.join(roles)} to {args.out} (names: {names}; "
           f"{args.days} days). Keep ca-key.pem offline; give each role its ROLE.pem, ROLE-key.pem and ca.pem")
    for name, path in written.items():
        print(path)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from quantchat.serving.keys import hash_key

    key = secrets.token_urlsafe(args.bytes)
    print(key)
    print(hash_key(key))
    status("line 1: the key (for the sender: a client, a worker, an API server); line 2: its entry for the "
           "receiver's key file")
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from quantchat.serving.keys import hash_key

    lines = [s.strip() for s in sys.stdin.read().splitlines() if s.strip()]
    if not lines:
        raise QuantchatError("give the key(s) on stdin, one a line")
    for k in lines:
        print(hash_key(k))
    return 0


def cmd_checkpoint_key(args: argparse.Namespace) -> int:
    import os

    out = Path(args.out)
    if out.exists() and not args.force:
        raise QuantchatError(f"{out} already exists (--force replaces it)")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_bytes(32).hex() + "\n")
    status(f"wrote a 256-bit key to {out} (mode 0600): quantchat quantize --encrypt-key-file / --sign-key-file")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="certificates and keys for a secure fleet")
    dsub = p.add_subparsers(dest="deploy_command", metavar="VERB")
    dsub.required = True

    c = dsub.add_parser("certs", help="a small CA and certificates per role (mutual TLS)")
    c.add_argument("--out", required=True, help="folder to write ca.pem, ROLE.pem, ROLE-key.pem to")
    c.add_argument("--host", action="append", default=[],
                   help="extra DNS name or address in every certificate (repeatable; localhost, 127.0.0.1 and ::1 "
                        "are always in)")
    c.add_argument("--role", action="append", default=[],
                   help="roles to make certificates for (repeatable; default: api, controller, worker)")
    c.add_argument("--days", type=int, default=365, help="validity of the role certificates (default 365)")
    c.add_argument("--force", action="store_true", help="replace existing files")
    c.set_defaults(func=cmd_certs)

    k = dsub.add_parser("keygen", help="a new random key and its sha256 entry")
    k.add_argument("--bytes", type=int, default=32, help="random bytes (default 32)")
    k.set_defaults(func=cmd_keygen)

    h = dsub.add_parser("hash-key", help="the sha256:HEX key-file entry of each key on stdin")
    h.set_defaults(func=cmd_hash_key)

    ck = dsub.add_parser("checkpoint-key", help="a new key file for encrypted / signed quantized checkpoints")
    ck.add_argument("--out", required=True)
    ck.add_argument("--force", action="store_true")
    ck.set_defaults(func=cmd_checkpoint_key)
