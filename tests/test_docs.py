"""The documentation builds without a warning, and the tuning page lists every option."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
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


def _documented_defaults() -> dict[str, str]:
    """Option name -> the first code span of its default cell, from the tuning table."""
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*)\|", (DOCS / "tuning.md").read_text(), re.M)
    defaults = {}
    for name, cell in rows:
        code = re.search(r"`([^`]+)`", cell)
        if code:
            defaults[name] = code.group(1)
    return defaults


def test_tuning_lists_every_option_with_its_default() -> None:
    documented = _documented_defaults()
    internal = {"dsn", "selector", "connect_kwargs"}
    for field in attrs.fields(ClusterConfig):
        if field.name in internal:
            continue
        assert field.name in documented, f"docs/tuning.md does not describe {field.name}"
        if isinstance(field.default, attrs.Factory):
            expected = repr(field.default.factory())
            assert documented[field.name] == expected, field.name
        else:
            value = ast.literal_eval(documented[field.name])
            assert value == field.default, f"{field.name}: docs say {value!r}"
    for option in ("tiers", "role", "backend"):
        assert option in documented


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert page.name in nav, f"{page.name} is not in the mkdocs.yml nav"


def test_the_state_diagram_is_the_transition_table() -> None:
    from picopyn_actors._events import TRANSITIONS

    text = (DOCS / "concepts.md").read_text()
    diagram = text[text.index("stateDiagram-v2") :]
    diagram = diagram[: diagram.index("```")]
    drawn = {
        (a, b) for a, b in re.findall(r"^\s+([A-Z]+) --> ([A-Z]+)\b", diagram, re.M)
    }
    table = {(old.name, new.name) for old, news in TRANSITIONS.items() for new in news}
    assert drawn == table
