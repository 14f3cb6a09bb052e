"""DSN parsing with several seed hosts, and password redaction.

Example::

    >>> dsn = parse_dsn("postgresql://admin:secret@h1:4327,h2/db")
    >>> dsn.hosts
    (Address(host='h1', port=4327), Address(host='h2', port=4327))
    >>> str(dsn)
    'postgresql://admin:***@h1:4327,h2:4327/db'
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote

import attrs

from ._errors import ConfigError

#: Picodata's default pgproto port.
DEFAULT_PORT = 4327

_SCHEMES = ("postgresql", "postgres")
# The password runs to the *last* '@' of the authority (as parse_dsn splits it)
# and may hold spaces; over-redacting is the safe side.
_PASSWORD_RE = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^/?#]*)(?P<at>@)", re.I)
_PARAM_RE = re.compile(r"(?P<head>\bpassword=)[^&\s]*", re.I)
# user:password@host without a scheme (a common typo).
_BARE_RE = re.compile(r"^(?P<head>[^:/@\s]*:)(?P<pw>[^/?#]*)(?P<at>@)")
_QUERY_PARAMS = frozenset({"sslmode", "connect_timeout", "application_name"})


@attrs.frozen(order=True)
class Address:
    """A ``host:port`` pair."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int = DEFAULT_PORT) -> Address:
        """Parse ``host``, ``host:port`` or ``[v6]:port``; raise :class:`ConfigError`."""
        text = text.strip()
        if not text:
            raise ConfigError("empty host in address")
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ConfigError(f"unterminated IPv6 address {text!r}")
            host, rest = text[1:end], text[end + 1 :]
            if rest and not rest.startswith(":"):
                raise ConfigError(f"bad address {text!r}")
            port_text = rest[1:] if rest else ""
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        elif ":" in text:
            raise ConfigError(f"bad address {text!r}: write IPv6 hosts as [addr]:port")
        else:
            host, port_text = text, ""
        if not host:
            raise ConfigError(f"empty host in address {text!r}")
        if not port_text:
            return cls(host, default_port)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"bad port {port_text!r} in address {text!r}: use 1..65535")
        return cls(host, int(port_text))


def _secret_repr(value: str | None) -> str:
    return "None" if value is None else "'***'"


@attrs.frozen
class Dsn:
    """A parsed ``postgresql://`` DSN with one or more seed hosts.

    The password never shows in ``str()`` or ``repr()``.
    """

    user: str
    password: str | None = attrs.field(repr=_secret_repr)
    hosts: tuple[Address, ...]
    database: str | None = None
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        auth = self.user + (":***" if self.password is not None else "")
        db = f"/{self.database}" if self.database else ""
        query = "&".join(f"{k}={v}" for k, v in self.params)
        return f"postgresql://{auth}@{','.join(map(str, self.hosts))}{db}" + (
            f"?{query}" if query else ""
        )


def parse_dsn(dsn: str) -> Dsn:
    """Parse a DSN such as ``postgresql://user:pw@h1:4327,h2:4327/db?sslmode=require``.

    Raises:
        ConfigError: the DSN is malformed; the message never contains the password.
    """
    if not isinstance(dsn, str):
        raise ConfigError(f"dsn must be a string, not {type(dsn).__name__}")
    shown = redact(dsn)
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ConfigError(f"bad DSN {shown!r}: it must start with postgresql://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hostlist = netloc.rpartition("@")
        user_text, colon, pw_text = userinfo.partition(":")
        user = unquote(user_text)
        password: str | None = unquote(pw_text) if colon else None
    else:
        user, password, hostlist = "", None, netloc
    if not user:
        raise ConfigError(f"bad DSN {shown!r}: no user name (postgresql://USER:PASSWORD@host:port)")
    if not hostlist:
        raise ConfigError(f"bad DSN {shown!r}: no host")
    try:
        hosts = tuple(Address.parse(part) for part in _split_hosts(hostlist))
    except ConfigError as exc:
        raise ConfigError(f"bad DSN {shown!r}: {exc}") from None
    params = tuple(parse_qsl(query, keep_blank_values=True))
    for key, _value in params:
        if key not in _QUERY_PARAMS:
            allowed = ", ".join(sorted(_QUERY_PARAMS))
            raise ConfigError(
                f"bad DSN {shown!r}: unsupported parameter {key!r} (allowed: {allowed})"
            )
    return Dsn(
        user=user, password=password, hosts=hosts, database=unquote(path) or None, params=params
    )


def _split_hosts(hostlist: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in hostlist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def redact(text: str) -> str:
    """Replace passwords in ``text`` with ``***``.

    Covers ``scheme://user:password@``, a ``password=`` parameter, and a DSN
    that starts with ``user:password@`` (no scheme).
    """
    text = _PASSWORD_RE.sub(r"\g<head>***\g<at>", text)
    text = _PARAM_RE.sub(r"\g<head>***", text)
    if "://" not in text:
        text = _BARE_RE.sub(r"\g<head>***\g<at>", text)
    return text
