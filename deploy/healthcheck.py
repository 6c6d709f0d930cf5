#!/usr/bin/env python3
"""The image's health check: GET $QUANTCHAT_HEALTH_URL (default http://127.0.0.1:8000/health); exit 0 on a 200.

Standard library only (starts in well under a second; no torch). For a role behind mutual TLS the check
shows the pod's own certificate: $QUANTCHAT_HEALTH_CA (the fleet CA, to verify the server),
$QUANTCHAT_HEALTH_CERT and $QUANTCHAT_HEALTH_KEY. ``--alive``: also exit 0 on a 503 that is not a failed
model load (a worker still loading, an API server with no worker yet: the process is alive, only not ready),
for liveness probes that must not restart a pod that is merely waiting.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.request


def check(url: str, alive: bool = False, timeout: float = 4.0) -> tuple[bool, str]:
    ctx = None
    if url.startswith("https://"):
        ca = os.environ.get("QUANTCHAT_HEALTH_CA") or None
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False  # 127.0.0.1 inside the pod; the CA still vouches for the certificate
        cert = os.environ.get("QUANTCHAT_HEALTH_CERT")
        if cert:
            ctx.load_cert_chain(cert, os.environ.get("QUANTCHAT_HEALTH_KEY") or None)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:  # noqa: S310 - our own /health
            return r.status == 200, f"{r.status}"
    except urllib.error.HTTPError as e:
        body = e.read(4096).decode("utf-8", "replace")
        try:
            status = json.loads(body).get("status")
        except (ValueError, AttributeError):
            status = None
        return alive and e.code == 503 and status != "failed", f"{e.code} {body[:200]}"
    except (OSError, ssl.SSLError) as e:
        return False, f"{type(e).__name__}: {e}"


def main(argv: list[str]) -> int:
    url = os.environ.get("QUANTCHAT_HEALTH_URL", "http://127.0.0.1:8000/health")
    args = [a for a in argv if a != "--alive"]
    if args:
        url = args[0]
    ok, why = check(url, alive="--alive" in argv)
    if not ok:
        print(f"unhealthy: {url}: {why}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
