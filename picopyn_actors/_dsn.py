"""DSN parsing with several seed hosts, and password redaction.

Example::

    >>> dsn = parse_dsn("postgresql://admin:secret@h1:4327,h2/db")
    >>> dsn.hosts
    (Address(host='h1', port=4327), Address(host='h2', port=4327))
    >>> str(dsn)
    'postgresql://admin:***@h1:4327,h2:4327/db'
"""

from __future__ import annotations

import math
import re
from urllib.parse import parse_qsl, quote, unquote

import attrs

from ._errors import ConfigError

#: Picodata's default pgproto port.
DEFAULT_PORT = 4327

_SCHEMES = ("postgresql", "postgres")
# In free text (an error message, a log line), a password runs from the
# colon after the user name to the last '@' before the next blank: it may
# hold '/', '?', '#' and '@'. Over-redacting is the safe side.
_PASSWORD_RE = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>\S*)(?P<at>@)", re.I)
_PARAM_RE = re.compile(r"(?P<head>\bpassword=)[^&\s]*", re.I)
# user:password@host without a scheme (a common typo).
_BARE_RE = re.compile(r"^(?P<head>[^:/@\s]*:)(?P<pw>\S*)(?P<at>@)")
_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
_QUERY_PARAMS = frozenset({"sslmode", "connect_timeout", "application_name", "options"})


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
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
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

    The user name and password run to the *last* ``@`` of the DSN, so a
    password may hold ``/``, ``?``, ``#`` or ``@`` unencoded; percent-encode
    an ``@`` anywhere after the hosts (in ``application_name``, say).
    A fragment (``#...`` after the hosts) is refused.

    Raises:
        ConfigError: the DSN is malformed; the message never contains the password.
    """
    if not isinstance(dsn, str):
        raise ConfigError(f"dsn must be a string, not {type(dsn).__name__}")
    shown = redact_dsn(dsn)
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ConfigError(f"bad DSN {shown!r}: it must start with postgresql://")
    userinfo, at, rest = rest.rpartition("@")
    if not at:
        userinfo, rest = "", userinfo + rest
    hostlist, path, query, fragment = _split_location(rest)
    if fragment is not None:
        raise ConfigError(
            f"bad DSN {shown!r}: a fragment ('#...') is not allowed after the hosts "
            "(percent-encode '#' as %23)"
        )
    user_text, colon, pw_text = userinfo.partition(":")
    user = unquote(user_text)
    password: str | None = unquote(pw_text) if colon else None
    if not user:
        raise ConfigError(f"bad DSN {shown!r}: no user name (postgresql://USER:PASSWORD@host:port)")
    if not hostlist:
        raise ConfigError(f"bad DSN {shown!r}: no host")
    try:
        hosts = tuple(Address.parse(part) for part in _split_hosts(hostlist))
    except ConfigError as exc:
        raise ConfigError(f"bad DSN {shown!r}: {exc}") from None
    params = tuple(parse_qsl(query, keep_blank_values=True))
    for key, value in params:
        problem = _check_param(key, value)
        if problem:
            raise ConfigError(f"bad DSN {shown!r}: {problem}")
    return Dsn(
        user=user, password=password, hosts=hosts, database=unquote(path) or None, params=params
    )


def _split_location(rest: str) -> tuple[str, str, str, str | None]:
    """``hosts[/path][?query][#fragment]`` -> its four parts (fragment ``None`` if absent)."""
    rest, hash_sign, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    hostlist, _, path = rest.partition("/")
    return hostlist, path, query, fragment if hash_sign else None


def _check_param(key: str, value: str) -> str | None:
    """What is wrong with one DSN query parameter, or ``None``."""
    if key not in _QUERY_PARAMS:
        allowed = ", ".join(sorted(_QUERY_PARAMS))
        return f"unsupported parameter {key!r} (allowed: {allowed})"
    if key == "sslmode" and value not in _SSLMODES:
        return f"sslmode must be one of {', '.join(sorted(_SSLMODES))}, got {value!r}"
    if key == "connect_timeout":
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            return f"connect_timeout must be a positive number of seconds, got {value!r}"
    if "\x00" in value:
        return f"parameter {key!r} holds a NUL character"
    return None


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


def redact(text: str, secret: str | None = None) -> str:
    """Replace passwords in free text (an error message, a log line) with ``***``.

    Covers ``scheme://user:password@`` (the password runs to the last ``@``
    before the next blank), a ``password=`` parameter, and text that starts
    with ``user:password@`` (no scheme). When the caller knows the password
    (``secret``), every occurrence of it, plain or percent-encoded, goes too:
    the only sure way for a password with blanks in free text.
    """
    if secret:
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, "***")
    text = _PASSWORD_RE.sub(r"\g<head>***\g<at>", text)
    text = _PARAM_RE.sub(r"\g<head>***", text)
    if "://" not in text:
        text = _BARE_RE.sub(r"\g<head>***\g<at>", text)
    return text


def redact_dsn(dsn: str) -> str:
    """A DSN as it may be shown: the password, which runs from the first ``:``
    after ``scheme://`` to the *last* ``@`` of the whole text, becomes ``***``.

    Works on the raw text, before (and whether or not) it parses, so that a
    password holding ``/``, ``?``, ``#``, ``@`` or blanks never shows.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        scheme, rest = "", dsn
    userinfo, at, hosts = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            rest = f"{user}:***@{hosts}"
    return redact(f"{scheme}{sep}{rest}")
