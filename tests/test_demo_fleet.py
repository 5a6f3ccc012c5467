"""The bundled demo fleet needs nothing beyond prefork's own dependencies."""

from __future__ import annotations

import json
import subprocess
import sys

# What `prefork[cpu]` adds: a bare `pip install prefork` has none of these.
CPU_EXTRA = ("sqlmodel", "sqlalchemy", "pydantic", "aiosqlite")


def test_the_demo_fleet_loads_without_the_cpu_extra() -> None:
    code = (
        "import json, sys\n"
        f"for name in {CPU_EXTRA!r}:\n"
        "    sys.modules[name] = None  # importing it now raises ImportError, as if absent\n"
        "from prefork.fleet import load_fleet\n"
        "fleet = load_fleet('demo')\n"
        "print(json.dumps([w.name for w in fleet.workers]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["clock", "primes", "flaky"]
