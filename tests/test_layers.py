"""The architecture's rules, checked: imports go one way (the layers contract in pyproject.toml), and the
CLI's light verbs start without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(config: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_imports_follow_the_layers():
    r = _lint(ROOT / "pyproject.toml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_the_layers_contract_catches_a_backward_import(tmp_path):
    """The same check with two layers swapped must fail: the engine imports the sampler, so a contract
    that puts sampling above engine is broken (the check can fail)."""
    cfg = tmp_path / "swapped.toml"
    cfg.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_package = "quantchat"

        [[tool.importlinter.contracts]]
        name = "swapped"
        type = "layers"
        containers = ["quantchat"]
        layers = ["sampling", "engine"]
    """))
    r = _lint(cfg)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr
    assert "quantchat.engine" in r.stdout and "quantchat.sampling" in r.stdout


@pytest.mark.parametrize("argv", [["--help"], ["models", "--json"], ["chat", "--help"], ["bench", "--help"]])
def test_light_verbs_start_without_torch(argv, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from quantchat.cli.main import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        heavy = sorted(m for m in ("torch", "transformers", "matplotlib") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    env = {**os.environ, "QUANTCHAT_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout[-2000:]
