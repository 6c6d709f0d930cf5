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

from quantchat.benchmark.serving import stop

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
        if not os.environ.get("QUANTCHAT_TEST_BUILD_IMAGE"):  # a 1.5 GB build: only when asked
            return (f"no image {IMAGE}: build it with scripts/build_image.sh --offline --tag {IMAGE} "
                    "(or set QUANTCHAT_TEST_BUILD_IMAGE=1 to let this test build it)")
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


@pytest.mark.slow
def test_image_rootfs_end_to_end_chroot(tmp_path):
    """Where podman builds images but cannot run containers (this sandbox): the image's own root filesystem
    (podman image mount), as user 10001 under chroot, QUANTCHAT_HOME bind-mounted: controller + worker +
    API from the image on 127.0.0.1, the image's health check, a chat answer; the kernels are the
    prebuilt ones (no compiler in the image)."""
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.skip("needs podman and root (podman image mount, chroot)")
    if subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True).returncode != 0:
        pytest.skip(f"no image {IMAGE}: build it with scripts/build_image.sh")
    m = subprocess.run(["podman", "image", "mount", IMAGE], capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"podman image mount failed: {m.stderr.strip()[-200:]}")
    root = Path(m.stdout.strip())
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o777)
    mounts = []
    try:
        for src, dst in (("/proc", root / "proc"), (str(home), root / "var/lib/quantchat")):
            r = subprocess.run(["mount", "--bind", src, str(dst)], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot bind-mount into the image: {r.stderr.strip()}")
            mounts.append(dst)
        assert not any((root / "usr/bin" / c).exists() for c in ("g++", "gcc", "c++", "cc")), "a compiler in the image"
        env = ["/usr/bin/env", "-i", "PATH=/opt/venv/bin:/usr/bin:/bin", "HOME=/var/lib/quantchat",
               "QUANTCHAT_HOME=/var/lib/quantchat", "QUANTCHAT_KERNELS_DIR=/opt/quantchat/kernels",
               "QUANTCHAT_SECRET=e2e-" + os.urandom(8).hex()]
        run = ["chroot", "--userspec=10001:10001", str(root), *env]
        r = subprocess.run([*run, "python3", "-c", "from quantchat.kernels import cpu; cpu.available(); "
                            "print(cpu.build_info().get('compiler'), cpu.unavailable_reason())"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        if "avx2" in Path("/proc/cpuinfo").read_text():
            assert r.stdout.split()[0] == "prebuilt", r.stdout
        ports = {"api": 28200, "controller": 28201, "worker": 28202}
        curl = f"http://127.0.0.1:{ports['controller']}"
        procs = [subprocess.Popen([*run, "quantchat", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for args in (["controller", "--port", str(ports["controller"])],
                              ["worker", "--port", str(ports["worker"]), "--controller", curl,
                               "--max-seq-len", "512", "--threads", "2"],
                              ["api", "--port", str(ports["api"]), "--controller", curl, "--api-key", "sk-e2e",
                               "--no-web"])]
        try:
            health = [*run, "python3", "/opt/quantchat/healthcheck.py", f"http://127.0.0.1:{ports['api']}/health"]
            deadline = time.time() + 300
            while subprocess.run(health, capture_output=True).returncode != 0:
                assert time.time() < deadline and all(p.poll() is None for p in procs), "the fleet did not start"
                time.sleep(1)
            import httpx

            r = httpx.post(f"http://127.0.0.1:{ports['api']}/v1/chat/completions", timeout=120,
                           headers={"Authorization": "Bearer sk-e2e"},
                           json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"].strip()
            assert list(home.iterdir()), "the default model is converted into QUANTCHAT_HOME"
        finally:
            stop(procs)
    finally:
        for dst in reversed(mounts):
            subprocess.run(["umount", str(dst)], capture_output=True)
        subprocess.run(["podman", "image", "unmount", IMAGE], capture_output=True)
