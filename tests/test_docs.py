"""The documentation builds without a warning, and the tuning page lists every option."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from picopyn_actors import ClusterConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    missing = [
        name
        for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
        if importlib.util.find_spec(name.split(".")[0]) is None
        or (name.count(".") and importlib.util.find_spec(name) is None)
    ]
    if missing:
        pytest.skip(
            f"the docs toolchain is not installed ({', '.join(missing)}): pip install -e '.[docs]'"
        )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()


def test_tuning_lists_every_option() -> None:
    text = (DOCS / "tuning.md").read_text()
    internal = {"dsn", "selector", "connect_kwargs"}
    for field in attrs.fields(ClusterConfig):
        if field.name not in internal:
            assert f"`{field.name}`" in text, f"docs/tuning.md does not describe {field.name}"
    for option in ("tiers", "role", "strategy"):
        assert f"`{option}`" in text


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert page.name in nav, f"{page.name} is not in the mkdocs.yml nav"
