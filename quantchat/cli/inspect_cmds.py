"""``quantchat inspect --cpu`` (registered with ``inspect`` in quant_cmds): the CPU, which kernel variant
quantchat uses on it and why."""

from __future__ import annotations

import argparse
import json


def cmd_inspect_cpu(args: argparse.Namespace) -> int:
    from quantchat.kernels import cpu

    try:
        info = cpu.describe()
    except cpu.KernelsUnavailable as e:  # not x86-64, an unknown forced variant...
        info = {"cpu": cpu.cpu_model(), "variant": None, "why": str(e)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"CPU: {info['cpu']} ({info.get('machine', '?')}; torch dispatch level {info.get('torch_capability', '?')})")
    flags = info.get("flags") or {}
    if flags:
        have = [f for f, v in flags.items() if v]
        lack = [f for f, v in flags.items() if v is False]
        print(f"flags: {' '.join(have) or '-'}" + (f"; lacks {' '.join(lack)}" if lack else ""))
    for v in info.get("variants", []):
        mark = "*" if v["name"] == info.get("variant") else " "
        state = "supported" if not v["missing"] else f"needs {', '.join(v['missing'])}"
        print(f" {mark} {v['name']:<12} {state:<30} {v['adds']}")
    if info.get("variant"):
        print(f"in use: {info['variant']} ({info['why']})")
        print(f"code paths: {info['isa']}")
        print(f"library: {info.get('library') or '(loaded)'}; BLAS for float tiles: {info.get('blas')}")
    else:
        print(f"quantchat's CPU kernels are not in use: {info['why']} (torch's ops run instead)")
    if info.get("forced"):
        print(f"forced with QUANTCHAT_CPU_VARIANT={info['forced']}")
    else:
        print("QUANTCHAT_CPU_VARIANT=avx2|avx512_vnni|amx forces a lower variant (for comparing)")
    return 0
