"""Errors raised by the stand-in cluster."""

from __future__ import annotations

__all__ = ["LocalClusterError", "UnknownNodeError"]


class LocalClusterError(Exception):
    """The stand-in cluster could not do what was asked.

    Messages name the node and say what to do. They never hold a password or
    a DSN.
    """


class UnknownNodeError(LocalClusterError, ValueError):
    """No node of the cluster has the given name."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown node {name!r}; the cluster's nodes are: {', '.join(known)}")
        self.name = name
        self.known = known
