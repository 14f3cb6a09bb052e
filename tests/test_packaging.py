"""The version is defined once, and the changelog keeps up with it.

Building, checking and installing the wheel is scripts/check-package's job
(run by scripts/test on a full run): it takes half a minute and the registry.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import picopyn_actors
from picopyn_actors._version import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_one_version_everywhere() -> None:
    assert picopyn_actors.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+|\.dev\d+)?", __version__)
    # The installed metadata comes from the same place (reinstall after a bump).
    assert importlib.metadata.version("picopyn_actors") == __version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "picopyn_actors._version.__version__"


def test_cli_version_is_the_package_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "picopyn_actors", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"picopyn-actors {__version__}"


def test_changelog_has_unreleased_and_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, re.M)
    assert headings, "no '## [version] - date' headings"
    assert headings[0] == ("Unreleased", "")
    released = [version for version, date in headings[1:] if date]
    assert len(released) == len(headings) - 1, "every release heading has a date"
    assert __version__ in released, f"CHANGELOG.md has no section for {__version__}"
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        kinds = re.findall(r"^### (\w+)$", section, re.M)
        allowed = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
        assert set(kinds) <= allowed, kinds
