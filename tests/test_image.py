"""The container image: kernels built in the build stage load in the runtime stage, which has no compiler
(a prebuilt build is taken only when its key matches these sources and this torch); and, where podman can
run containers, the image end to end: API + controller + one worker as containers, a chat answer through
the API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import json; from quantchat.kernels import cpu; ok = cpu.available(); "
         "print(json.dumps([ok, cpu.unavailable_reason(), cpu.build_info()]))")


def probe(env: dict) -> tuple[bool, str | None, dict]:
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    return tuple(json.loads(r.stdout.strip().splitlines()[-1]))


def test_prebuilt_kernels_load_without_a_compiler(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("CXX", "QUANTCHAT_NO_KERNELS", "QUANTCHAT_CPU_VARIANT")}
    ok, why, info = probe(base)  # built (or cached) with the compiler: writes the build's key file
    if not ok:
        pytest.skip(f"the CPU kernels cannot be built here: {why}")
    so = Path(info["path"])
    assert so.with_suffix(".key").is_file()
    kernels = tmp_path / "kernels"  # what the image's runtime stage has: the builds and their keys
    kernels.mkdir()
    shutil.copy2(so, kernels / so.name)
    shutil.copy2(so.with_suffix(".key"), kernels / so.with_suffix(".key").name)
    empty_bin = tmp_path / "bin"  # no compiler on PATH (python itself runs by its full path)
    empty_bin.mkdir()
    env = {**base, "PATH": str(empty_bin), "QUANTCHAT_KERNELS_DIR": str(kernels)}
    ok, why, info2 = probe(env)
    assert ok, why
    assert info2["compiler"] == "prebuilt" and info2["path"] == str(kernels / so.name)
    assert info2["variant"] == info["variant"]
    # a build for other sources or another torch (its key differs) is never loaded
    (kernels / so.with_suffix(".key").name).write_text("0123456789abcdef\n")
    ok, why, _ = probe(env)
    assert not ok and "no C++ compiler" in why and "no prebuilt" in why


# ---------------------------------------------------------------- end to end, with podman

IMAGE = os.environ.get("QUANTCHAT_TEST_IMAGE", "quantchat:0.1.0")


def podman_can_run() -> str | None:
    """None when podman builds and runs containers here, else why not."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman buildah mmdebstrap)"
    r = subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True)
    if r.returncode != 0:
        b = subprocess.run([str(ROOT / "scripts/build_image.sh"), "--offline", "--tag", IMAGE],
                           capture_output=True, text=True, timeout=3000)
        if b.returncode != 0:
            return f"scripts/build_image.sh failed: {(b.stdout + b.stderr)[-400:]}"
    r = subprocess.run(["podman", "run", "--rm", "--network=host", IMAGE, "--help"], capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        return f"podman cannot run containers here: {r.stderr.strip()[-300:]}"
    return None


@pytest.mark.slow
def test_image_end_to_end(tmp_path):
    why = podman_can_run()
    if why:
        pytest.skip(why)
    import httpx

    secret = "e2e-" + os.urandom(8).hex()
    names = [f"qc-e2e-{r}-{os.getpid()}" for r in ("controller", "worker", "api")]
    common = ["podman", "run", "-d", "--network=host", "--read-only", "--tmpfs", "/tmp",
              "--tmpfs", "/var/lib/quantchat:mode=1777", "-e", f"QUANTCHAT_SECRET={secret}"]
    roles = [
        ["-e", "QUANTCHAT_HEALTH_URL=http://127.0.0.1:28101/health", IMAGE, "controller", "--port", "28101"],
        ["-e", "QUANTCHAT_HEALTH_URL=http://127.0.0.1:28102/health", IMAGE, "worker", "--port", "28102",
         "--controller", "http://127.0.0.1:28101", "--max-seq-len", "512", "--threads", "2"],
        ["-e", "QUANTCHAT_HEALTH_URL=http://127.0.0.1:28100/health", IMAGE, "api", "--port", "28100",
         "--controller", "http://127.0.0.1:28101", "--api-key", "sk-e2e", "--no-web"],
    ]
    try:
        for name, args in zip(names, roles):
            subprocess.run([*common, "--name", name, *args], check=True, capture_output=True, timeout=120)
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get("http://127.0.0.1:28100/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, subprocess.run(["podman", "logs", names[1]], capture_output=True,
                                                          text=True).stderr[-2000:]
            time.sleep(1)
        r = httpx.post("http://127.0.0.1:28100/v1/chat/completions", timeout=120,
                       headers={"Authorization": "Bearer sk-e2e"},
                       json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip()
        hc = subprocess.run(["podman", "healthcheck", "run", names[2]], capture_output=True, text=True, timeout=60)
        assert hc.returncode == 0, hc.stdout + hc.stderr
    finally:
        subprocess.run(["podman", "rm", "-f", *names], capture_output=True, timeout=120)
