"""A griffe extension for the API reference: turn the reST roles of the
docstrings (``:class:`Cluster```, ``:func:`~x.open_cluster```) into Markdown
code spans, and ``Example::`` into ``Example:``, so that mkdocstrings renders
them cleanly."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")
_LITERAL_BLOCK = re.compile(r"::\n")


def _code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    target = target.strip()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring once, when its object is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(_code, obj.docstring.value)
            obj.docstring.value = _LITERAL_BLOCK.sub(":\n", text)
