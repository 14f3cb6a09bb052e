"""Virtual environments for the benchmark: one per peer, pinned, under bench/.venvs/.

Every peer runs in its own environment so that their dependencies cannot
clash (picopyn 0.2.0 and 3.x both pin asyncpg, for instance). Every
environment gets the same asyncpg release, so the drivers under the clients
are identical and only the client layers differ.

An environment is built once and reused while its requirement list is
unchanged (a stamp file records it); ``--rebuild-envs`` forces a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENVS = BENCH / ".venvs"

ASYNCPG = "asyncpg==0.30.0"  # what picopyn 0.2.0 and 3.2.0 both pin
PICOPYN_SEED = "picopyn==0.2.0"
PICOPYN_NEW = "picopyn==3.2.0"  # newest on PyPI when this was written: `pip index versions picopyn`


def project_requirements() -> list[str]:
    """picopyn_actors' own dependencies, read from pyproject.toml (the project is not installed:
    its working tree is put on PYTHONPATH, so the benchmark always measures the checkout)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps: list[str] = list(data["project"]["dependencies"])
    return [d for d in deps if not d.replace(" ", "").startswith("asyncpg")]


def specs() -> dict[str, list[str]]:
    """Environment name -> requirements."""
    return {
        # The parent process, picopyn_actors peers and the profiler.
        "bench": [
            *project_requirements(),
            ASYNCPG,
            "matplotlib==3.11.2",
            "py-spy==0.4.3",
        ],
        "asyncpg": [ASYNCPG],
        "picopyn-0.2.0": [PICOPYN_SEED, ASYNCPG],
        "picopyn-3": [PICOPYN_NEW, ASYNCPG],
    }


def python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def _stamp(requirements: list[str]) -> str:
    text = json.dumps({"python": sys.version, "requirements": requirements}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def ensure(name: str, *, rebuild: bool = False, log=print) -> Path:
    """Create (or reuse) environment ``name``; return its python."""
    requirements = specs()[name]
    root = VENVS / name
    stamp_file = root / ".bench-stamp"
    stamp = _stamp(requirements)
    if not rebuild and stamp_file.exists() and stamp_file.read_text() == stamp:
        return python(name)
    log(f"building environment {name}: {' '.join(requirements)}")
    base = os.environ.get("BENCH_BASE_PYTHON", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(root)], check=True)
    subprocess.run(
        [
            str(python(name)),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *requirements,
        ],
        check=True,
    )
    stamp_file.write_text(stamp)
    return python(name)


def freeze(name: str) -> list[str]:
    """``pip freeze`` of an environment, for the results file."""
    out = subprocess.run(
        [str(python(name)), "-m", "pip", "freeze", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line and not line.startswith("#")]
