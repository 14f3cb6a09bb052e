"""The pgproto front: a PostgreSQL v3 wire-protocol relay that speaks Picodata's dialect.

:class:`~picopyn_actors.testing.LocalCluster` (``strict=True``) puts one
front before each PostgreSQL server. Clients talk to the front; the front
talks to the server and imposes Picodata's rules on the way:

- the ``options`` startup parameter holds Picodata's comma-separated
  ``key=value`` session options (``pico_*`` keys may also come as startup
  parameters of their own, and win); a bad pair fails the login; none of it
  reaches PostgreSQL, nor does any other startup parameter but ``user`` and
  ``database``;
- no BackendKeyData is sent, and a CancelRequest only closes its socket;
- with ``pico_stmt_invalidation=true``, a statement parsed before the
  server's latest schema change fails at Bind with SQLSTATE 42999;
- BEGIN, START TRANSACTION, COMMIT, END, ROLLBACK, ABORT, SAVEPOINT, RELEASE
  and SET are answered by the front and never reach PostgreSQL;
  ReadyForQuery always says idle;
- COPY, LISTEN, NOTIFY, UNLISTEN, the FunctionCall message and a query
  string holding more than one statement are rejected;
- named statements are limited per node (``--statement-max``, shared by
  every client of the node): past it, Parse fails with XX000 "Statement
  storage is full";
- a malformed message is answered with 08P01 and the session stays open.

Schema changes are counted per server, from three sources: a CREATE, ALTER,
DROP, TRUNCATE, COMMENT, GRANT or REVOKE that completes through the front;
the notice that an event trigger of the server raises on any other DDL
(:data:`DDL_NOTICE`, swallowed here); and a counter that the harness raises
in the statistics file when it runs DDL on the server itself.

The front is its own process, one per node, standard library only, so that
it costs the test process nothing: LocalCluster runs it as
``python -I -S _front.py --listen-fd N ...`` with a listening socket it bound
itself. It prints ``ready`` on stdout once it serves, and exits when its
standard input reaches end of file (its owner is gone) or on SIGTERM.

Counters live in a small file of unsigned 64-bit slots (:data:`STATS_FIELDS`)
that the front maps into memory; the harness reads it at any time, even
while the front is paused, with :func:`read_stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import os
import re
import signal
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = [
    "DDL_NOTICE",
    "SERVER_SETUP_SQL",
    "STATS_FIELDS",
    "STATS_SIZE",
    "OptionError",
    "bump_harness_ddl",
    "count_statements",
    "error_response",
    "new_stats_file",
    "parse_options",
    "read_stats",
    "reset_gauges",
]

logger = logging.getLogger("picopyn_actors.testing.front")

# ---------------------------------------------------------------- the statistics file

STATS_FIELDS: Final = (
    "harness_ddl",  # raised by the harness only: schema changes it ran on the server
    "front_ddl",  # raised by the front only: schema changes it saw
    "logins",
    "logins_refused",
    "cancel_requests_ignored",
    "invalidations",
    "rejected_statements",
    "malformed_messages",
    "statements_refused",
    "statements_in_use",
    "sessions",
)
"""The slots of the statistics file, in order; each an unsigned 64-bit integer."""

STATS_SIZE: Final = 256
_U64: Final = struct.Struct("<Q")
_SLOT: Final = {name: i for i, name in enumerate(STATS_FIELDS)}
_HARNESS_DDL, _FRONT_DDL, _LOGINS, _REFUSED, _CANCELS = range(5)
_INVALIDATIONS, _REJECTED, _MALFORMED, _FULL, _STATEMENTS, _SESSIONS = range(5, 11)

DDL_NOTICE: Final = "picopyn-front: schema changed"
"""The notice the server's event trigger raises on DDL; the front swallows it."""
_DDL_NOTICE_BYTES: Final = DDL_NOTICE.encode()

SERVER_SETUP_SQL: Final = f"""
CREATE SCHEMA picopyn_front;
CREATE FUNCTION picopyn_front.schema_changed() RETURNS event_trigger LANGUAGE plpgsql
    AS $$ BEGIN RAISE NOTICE '{DDL_NOTICE}'; END $$;
CREATE EVENT TRIGGER picopyn_front_schema_changed ON ddl_command_end
    EXECUTE FUNCTION picopyn_front.schema_changed();
"""
"""Run once per server as superuser: an event trigger that reports every DDL to the front."""


def new_stats_file(path: str | os.PathLike[str]) -> None:
    """Create a statistics file with every counter at zero (if it does not exist)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, bytes(STATS_SIZE))
    finally:
        os.close(fd)


def reset_gauges(path: str | os.PathLike[str]) -> None:
    """Zero the gauges (statements in use, sessions) of a front that is gone."""
    fd = os.open(path, os.O_RDWR)
    try:
        for slot in (_STATEMENTS, _SESSIONS):
            os.pwrite(fd, _U64.pack(0), slot * 8)
    finally:
        os.close(fd)


def read_stats(path: str | os.PathLike[str]) -> dict[str, int]:
    """Every counter of a statistics file, by name."""
    with open(path, "rb") as f:
        data = f.read(STATS_SIZE)
    return {name: _U64.unpack_from(data, i * 8)[0] for i, name in enumerate(STATS_FIELDS)}


def bump_harness_ddl(path: str | os.PathLike[str]) -> None:
    """Count one schema change that the harness made on the server itself.

    Only the harness writes this slot, so there is no lost update; the front
    sees the new value at its next Bind.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        (value,) = _U64.unpack(os.pread(fd, 8, 0))
        os.pwrite(fd, _U64.pack(value + 1), 0)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- startup options


class OptionError(Exception):
    """A startup option that Picodata refuses; the login fails with this message."""


_BOOL_KEYS: Final = ("pico_stmt_invalidation", "pico_query_metadata")
_INT_KEYS: Final = ("sql_motion_row_max", "sql_vdbe_opcode_max")
_READ_PREFERENCES: Final = ("leader", "replica", "any")
_RUST_I64: Final = re.compile(r"[+-]?[0-9]+")


def _parse_bool(key: str, value: str) -> bool:
    # Rust's bool::from_str: exactly "true" or "false".
    if value == "true":
        return True
    if value == "false":
        return False
    raise OptionError(
        f"error parsing value for option {key}: provided string was not `true` or `false`"
    )


def _parse_limit(key: str, value: str) -> int:
    if not value:
        reason = "cannot parse integer from empty string"
    elif not _RUST_I64.fullmatch(value):
        reason = "invalid digit found in string"
    elif not -(2**63) <= int(value) < 2**63:
        reason = "number too large to fit in target type"
    else:
        if int(value) < 0:
            raise OptionError(f"value for option {key} should be positive")
        return int(value)
    raise OptionError(f"value for option {key} is too large: {reason}")


def parse_options(params: dict[str, str]) -> tuple[dict[str, object], list[str]]:
    """Picodata's session options from the startup parameters.

    Returns the options and the unknown keys (to log). Follows Picodata's
    ``src/pgproto/client/startup.rs``: ``options`` is split on ``,`` and each
    pair on ``=`` (a pair without ``=`` fails, text after a second ``=`` is
    ignored); ``pico_*`` keys given as startup parameters of their own win.

    Raises:
        OptionError: a pair without ``=``, a bad boolean, a bad integer or an
            unknown ``read_preference``.
    """
    options: dict[str, object] = {}
    unknown: list[str] = []
    raw = params.get("options")
    if raw is not None:
        for pair in raw.split(","):
            parts = pair.split("=")
            if len(parts) < 2:
                raise OptionError("option without value")
            key, value = parts[0], parts[1]
            if key in _BOOL_KEYS:
                options[key] = _parse_bool(key, value)
            elif key in _INT_KEYS:
                options[key] = _parse_limit(key, value)
            elif key == "read_preference":
                if value not in _READ_PREFERENCES:
                    raise OptionError(
                        f"unknown read_preference value: '{value}', "
                        "expected one of leader, replica, any"
                    )
                options[key] = value
            elif key == "forward":
                options[key] = value
            else:
                unknown.append(key)
    for key in _BOOL_KEYS:
        if key in params:
            options[key] = _parse_bool(key, params[key])
    return options, unknown


# ---------------------------------------------------------------- SQL classification

_NORMAL, _DDL, _STUB, _REJECT, _FORGET = range(5)

_LEADING_WORD: Final = re.compile(r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*([A-Za-z_]+)", re.S)
_SECOND_WORD: Final = re.compile(r"\s+([A-Za-z_]+)")
_TOKEN: Final = re.compile(
    r"[Ee]'(?:[^'\\]|\\.|'')*'?"  # E'...' with backslash escapes
    r"|'(?:[^']|'')*'?"  # '...'
    r'|"(?:[^"]|"")*"?'  # "identifier"
    r"|--[^\n]*"  # line comment
    r"|/\*.*?(?:\*/|\Z)"  # block comment
    r"|\$((?:[A-Za-z_][A-Za-z_0-9]*)?)\$.*?(?:\$\1\$|\Z)"  # $tag$ ... $tag$
    r"|;",
    re.S,
)

_STUB_TAGS: Final = {
    "BEGIN": "BEGIN",
    "START": "START TRANSACTION",
    "COMMIT": "COMMIT",
    "END": "COMMIT",
    "ROLLBACK": "ROLLBACK",
    "ABORT": "ROLLBACK",
    "SAVEPOINT": "SAVEPOINT",
    "RELEASE": "RELEASE",
    "SET": "SET",
}
_REJECTED_WORDS: Final = ("COPY", "LISTEN", "NOTIFY", "UNLISTEN")
_DDL_WORDS: Final = ("CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "GRANT", "REVOKE")


def count_statements(sql: str) -> int:
    """How many statements *sql* holds (``;`` inside strings and comments does not count)."""
    if ";" not in sql:
        return 1 if _has_code(sql) else 0
    count = 0
    nonempty = False
    last = 0
    for match in _TOKEN.finditer(sql):
        if sql[last : match.start()].strip():
            nonempty = True
        text = match.group()
        if text == ";":
            count += nonempty
            nonempty = False
        elif not text.startswith(("--", "/*")):
            nonempty = True
        last = match.end()
    if sql[last:].strip():
        nonempty = True
    return count + nonempty


def _has_code(sql: str) -> bool:
    return any(
        not m.group().startswith(("--", "/*"))
        for m in re.finditer(r"--[^\n]*|/\*.*?(?:\*/|\Z)|\S", sql, re.S)
    )


def _classify(sql: str) -> tuple[int, str]:
    """``(kind, detail)``: the tag of a stub, the reason of a rejection, or ``""``."""
    match = _LEADING_WORD.match(sql)
    word = match.group(1).upper() if match else ""
    if word in _REJECTED_WORDS:
        return _REJECT, f"{word} is not supported"
    if count_statements(sql) > 1:
        return _REJECT, "a query string holding more than one statement is not supported"
    tag = _STUB_TAGS.get(word)
    if tag is not None:
        return _STUB, tag
    if word in _DDL_WORDS:
        return _DDL, ""
    if word == "DEALLOCATE" or word == "DISCARD":
        assert match is not None
        return _FORGET, sql[match.end() :]
    return _NORMAL, ""


# ---------------------------------------------------------------- wire messages

_I16: Final = struct.Struct("!h")
_I32: Final = struct.Struct("!i")
_U32: Final = struct.Struct("!I")

_SSL_REQUEST: Final = 80877103
_GSSENC_REQUEST: Final = 80877104
_CANCEL_REQUEST: Final = 80877102
_MAX_STARTUP: Final = 10000
_MAX_MESSAGE: Final = 1 << 30
_READ_SIZE: Final = 65536

READY_IDLE: Final = b"Z\x00\x00\x00\x05I"
_PARSE_COMPLETE: Final = b"1\x00\x00\x00\x04"
_BIND_COMPLETE: Final = b"2\x00\x00\x00\x04"
_CLOSE_COMPLETE: Final = b"3\x00\x00\x00\x04"
_NO_DATA: Final = b"n\x00\x00\x00\x04"
_NO_PARAMETERS: Final = b"t\x00\x00\x00\x06\x00\x00"
_SYNC: Final = b"S\x00\x00\x00\x04"

# Message types, as bytes values.
_Q, _P, _B, _E, _D, _C, _H, _S, _X, _F = b"QPBEDCHSXF"
_COPY_MESSAGES: Final = frozenset(b"dcf")
_EXTENDED: Final = frozenset(b"PBEDCH")
_DATA_ROW, _ERROR, _NOTICE, _READY, _KEY_DATA, _NOTIFICATION, _AUTH = b"DENZKAR"


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + _U32.pack(len(body) + 4) + body


def error_response(code: str, message: str, severity: str = "ERROR") -> bytes:
    """An ErrorResponse with severity, SQLSTATE and message."""
    fields = b"".join(
        key + value.encode() + b"\x00"
        for key, value in ((b"S", severity), (b"V", severity), (b"C", code), (b"M", message))
    )
    return _message(b"E", fields + b"\x00")


def _command_complete(tag: str) -> bytes:
    return _message(b"C", tag.encode() + b"\x00")


class _Malformed(Exception):
    """A message the front answers with 08P01."""


def _cstring(body: bytes, pos: int) -> tuple[bytes, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise _Malformed("a string is not terminated")
    return body[pos:end], end + 1


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("invalid UTF-8 in a string") from None


def _expect_end(body: bytes, pos: int) -> None:
    if pos != len(body):
        raise _Malformed("the message length does not match its content")


# ---------------------------------------------------------------- the node


class _Node:
    """What the sessions of one front share: counters, the statement limit, the server."""

    def __init__(
        self, stats: mmap.mmap, statement_max: int, upstream: tuple[str, int], name: str
    ) -> None:
        self.stats = stats
        self.statement_max = statement_max
        self.upstream = upstream
        self.name = name
        self.values: list[int] = [
            int(_U64.unpack_from(stats, i * 8)[0]) for i in range(len(STATS_FIELDS))
        ]
        self.sessions: set[_Session] = set()
        for slot in (_STATEMENTS, _SESSIONS):
            self.set(slot, 0)

    def set(self, slot: int, value: int) -> None:
        self.values[slot] = value
        _U64.pack_into(self.stats, slot * 8, value)

    def count(self, slot: int, delta: int = 1) -> None:
        self.set(slot, self.values[slot] + delta)

    def epoch(self) -> int:
        """The server's schema version as the front knows it."""
        return int(_U64.unpack_from(self.stats, 0)[0]) + self.values[_FRONT_DDL]

    def schema_changed(self) -> None:
        self.count(_FRONT_DDL)


# ---------------------------------------------------------------- one session

_PG, _STUB_KIND = 0, 1


class _Stmt:
    """A statement (or a portal) of a session, as the front sees it."""

    __slots__ = ("ddl", "epoch", "kind", "tag")

    def __init__(self, kind: int, epoch: int, ddl: bool, tag: str) -> None:
        self.kind = kind
        self.epoch = epoch
        self.ddl = ddl
        self.tag = tag


# Pending entries: answered by the front (_LOCAL) or by the server, each kind
# ending at one of the message types in _ENDS. A quiet Sync is one the front
# sent in place of a client's Flush; its ReadyForQuery is not passed on.
_LOCAL, _PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE, _SYNC_ENTRY, _QUERY, _QUIET_SYNC = range(9)
_ENDS: Final[tuple[frozenset[int], ...]] = (
    frozenset(),
    frozenset(b"1"),
    frozenset(b"2"),
    frozenset(b"Tn"),
    frozenset(b"CIs"),
    frozenset(b"3"),
    frozenset(b"Z"),
    frozenset(b"Z"),
    frozenset(b"Z"),
)
_SYNCS: Final = (_SYNC_ENTRY, _QUERY, _QUIET_SYNC)


class _Entry:
    """One client message whose answer the client has not had yet.

    *batch* numbers the server's batches (a Sync sent to the server ends
    one); *round* numbers the client's (its Sync or Query ends one).
    """

    __slots__ = ("batch", "data", "done", "kind", "round", "stat", "undo")

    def __init__(
        self,
        kind: int,
        batch: int,
        round_: int,
        data: bytes = b"",
        undo: Callable[[], None] | None = None,
        done: Callable[[], None] | None = None,
        stat: int = -1,
    ) -> None:
        self.kind = kind
        self.batch = batch
        self.round = round_
        self.data = data
        self.undo = undo
        self.done = done
        self.stat = stat


_INIT, _CONNECTING, _AUTH_PHASE, _READY_PHASE, _CLOSED = range(5)


def _small_reads(transport: asyncio.BaseTransport) -> None:
    """Read at most 64 KiB at a time.

    asyncio's socket transport reads into a fresh 256 KiB buffer, which glibc
    maps and unmaps around every read: three system calls per message. Below
    malloc's mmap threshold the buffer comes from the heap. (An attribute of
    CPython's selector transport; without it, reads stay as they were.)
    """
    if hasattr(transport, "max_size"):
        transport.max_size = _READ_SIZE


class _Upstream(asyncio.Protocol):
    """The session's connection to the PostgreSQL server."""

    def __init__(self, session: _Session) -> None:
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session.upstream_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()

    def pause_writing(self) -> None:
        if self.session.client is not None:
            self.session.client.pause_reading()

    def resume_writing(self) -> None:
        if self.session.client is not None:
            self.session.client.resume_reading()


class _Session(asyncio.Protocol):
    """One client connection and its connection to the server."""

    def __init__(self, node: _Node) -> None:
        self.node = node
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.phase = _INIT
        self.cbuf = bytearray()
        self.cneed = 0
        self.ubuf = bytearray()
        self.uneed = 0
        self.cout: list[bytes] = []
        self.uout: list[bytes] = []
        self.stmts: dict[bytes, _Stmt] = {}
        self.portals: dict[bytes, _Stmt] = {}
        self.pending: deque[_Entry] = deque()
        self.batch = 0
        self.round = 0
        self.unsynced = False  # the server got messages since its last Sync
        self.bound = False  # ... and one of them was a Bind
        self.discarding = False
        self.in_batch = False
        self.invalidation = False
        self.named = 0
        self.logged_in = False
        self.startup: bytes | None = None  # the login to send, once the client's is checked
        self.unreachable = False
        self.connect_task: asyncio.Task[None] | None = None

    # -- the client side ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client = transport
        _small_reads(transport)
        self.node.sessions.add(self)
        # Connect to the server at once, as a plain relay would: the server's
        # fork overlaps the client's SSLRequest and startup packet.
        self.connect_task = asyncio.get_running_loop().create_task(self._connect())

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.phase == _READY_PHASE:
            if self.cbuf:
                self.cbuf += data
                if len(self.cbuf) < self.cneed:
                    return
                data = bytes(self.cbuf)
                self.cbuf.clear()
            rest = self._client_messages(data)
            if rest:
                self.cbuf += rest
            self._flush()
        elif self.phase == _INIT:
            self.cbuf += data
            self._startup()
        elif self.phase == _CONNECTING:
            self.cbuf += data
        elif self.phase == _AUTH_PHASE:
            self.cbuf += data
            self._relay_auth()

    def _flush(self) -> None:
        if self.cout and self.client is not None:
            self.client.write(b"".join(self.cout))
        self.cout.clear()
        if self.uout and self.upstream is not None:
            self.upstream.write(b"".join(self.uout))
        self.uout.clear()

    def _refuse(self, code: str, message: str) -> None:
        """Fail the login: an ErrorResponse, then close."""
        self.node.count(_REFUSED)
        if self.client is not None:
            self.client.write(error_response(code, message, "FATAL"))
        self.close()

    def _startup(self) -> None:
        buf = self.cbuf
        while self.phase == _INIT and len(buf) >= 4:
            (length,) = _U32.unpack_from(buf, 0)
            if length < 8 or length > _MAX_STARTUP:
                self._refuse("08P01", "protocol violation: invalid startup packet length")
                return
            if len(buf) < length:
                return
            packet = bytes(buf[:length])
            del buf[:length]
            (code,) = _U32.unpack_from(packet, 4)
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                assert self.client is not None
                self.client.write(b"N")
            elif code == _CANCEL_REQUEST:
                self.node.count(_CANCELS)
                logger.info("cancel request ignored")
                self.close()
            elif code >> 16 != 3:
                self._refuse("0A000", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
            else:
                self._login(packet[8:])

    def _login(self, raw: bytes) -> None:
        try:
            words = [_text(w) for w in raw.split(b"\x00")]
        except _Malformed:
            self._refuse("08P01", "protocol violation: invalid UTF-8 in the startup packet")
            return
        if len(words) < 2 or words[-1] != "" or words[-2] != "" or len(words) % 2:
            self._refuse("08P01", "protocol violation: invalid startup packet layout")
            return
        params = dict(zip(words[0:-2:2], words[1:-2:2], strict=True))
        user = params.get("user")
        if not user:
            self._refuse("08P01", "protocol violation: parameter 'user' is missing")
            return
        try:
            options, unknown = parse_options(params)
        except OptionError as exc:
            logger.info("login refused: %s", exc)
            self._refuse("XX000", str(exc))
            return
        for key in unknown:
            logger.warning("unknown option: '%s'", key)
        self.invalidation = bool(options.get("pico_stmt_invalidation", False))
        startup = b"user\x00" + user.encode() + b"\x00"
        startup += b"database\x00" + params.get("database", user).encode() + b"\x00\x00"
        self.startup = _U32.pack(len(startup) + 8) + _U32.pack(196608) + startup
        self.phase = _CONNECTING
        if self.upstream is not None or self.unreachable:
            self._log_in()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: _Upstream(self), self.node.upstream[0], self.node.upstream[1]
            )
        except OSError as exc:
            logger.info("cannot reach the server: %s", exc)
            self.unreachable = True
        else:
            if self.phase == _CLOSED:
                transport.close()
                return
            self.upstream = transport
            _small_reads(transport)
        if self.phase == _CONNECTING:
            self._log_in()

    def _log_in(self) -> None:
        """Send the checked login to the server (connected, or found unreachable)."""
        if self.upstream is None:
            self._refuse("08006", f"node {self.node.name} cannot reach its server")
            return
        assert self.startup is not None
        self.phase = _AUTH_PHASE
        self.upstream.write(self.startup)
        self._relay_auth()

    def _relay_auth(self) -> None:
        """Pass the password exchange on, framed, until the login ends.

        Anything else the client sends early waits for the end of the login,
        then goes through the dialect's rules like every other message.
        """
        buf = self.cbuf
        pos = 0
        while len(buf) - pos >= 5 and buf[pos] == 0x70:  # 'p': a password message
            (length,) = _U32.unpack_from(buf, pos + 1)
            if length < 4 or length > _MAX_STARTUP:
                self._refuse("08P01", "protocol violation: invalid message length")
                return
            if len(buf) - pos < 1 + length:
                break
            pos += 1 + length
        if pos and self.upstream is not None:
            self.upstream.write(bytes(buf[:pos]))
            del buf[:pos]

    # -- client messages, once logged in ---------------------------------------------

    def _client_messages(self, data: bytes) -> bytes:
        """Handle every complete message of *data*; return the incomplete rest."""
        n = len(data)
        pos = 0
        while n - pos >= 5:
            kind = data[pos]
            (length,) = _U32.unpack_from(data, pos + 1)
            if length < 4:
                self._malformed(0, "invalid message length")
                pos += 5
                continue
            if length > _MAX_MESSAGE:
                self._local(error_response("08P01", "protocol violation: message too long"))
                self._flush()
                self.close()
                return b""
            end = pos + 1 + length
            if end > n:
                self.cneed = end - pos
                return data[pos:]
            if self.discarding and kind != _S:
                if kind == _X:
                    self._terminate(data[pos:end])
                    return b""
                pos = end
                continue
            try:
                if kind == _B:
                    self._bind(data[pos + 5 : end], data[pos:end])
                elif kind == _E:
                    self._execute(data[pos + 5 : end], data[pos:end])
                elif kind == _S:
                    self._sync(data[pos + 5 : end], data[pos:end])
                elif kind == _P:
                    self._parse(data[pos + 5 : end], data[pos:end])
                elif kind == _D:
                    self._describe(data[pos + 5 : end], data[pos:end])
                elif kind == _Q:
                    self._query(data[pos + 5 : end], data[pos:end])
                elif kind == _C:
                    self._close_message(data[pos + 5 : end], data[pos:end])
                elif kind == _H:
                    if length != 4:
                        raise _Malformed("the message length does not match its content")
                    self._flush_message(data[pos:end])
                elif kind == _X:
                    self._terminate(data[pos:end])
                    return b""
                elif kind == _F:
                    self._refuse_message("feature is not supported: FunctionCall")
                elif kind in _COPY_MESSAGES:
                    pass  # outside COPY, PostgreSQL ignores them too
                else:
                    raise _Malformed(f"invalid frontend message type {kind!r}")
            except _Malformed as exc:
                self._malformed(kind, str(exc))
                if kind == _S:
                    self._sync(b"", _SYNC)
            pos = end
        self.cneed = 0
        return data[pos:]

    def _local(self, data: bytes, stat: int = -1, undo: Callable[[], None] | None = None) -> None:
        """Answer the client from the front, in order with the server's answers."""
        if self.pending:
            self.pending.append(_Entry(_LOCAL, self.batch, self.round, data, undo, None, stat))
        else:
            self.cout.append(data)
            if stat >= 0:
                self.node.count(stat)

    def _fail(self, data: bytes, stat: int) -> None:
        """An error the front raised in an extended-query batch: skip to the next Sync."""
        self.in_batch = True
        self._local(data, stat)
        self.discarding = True

    def _refuse_message(self, message: str, code: str = "0A000", stat: int = _REJECTED) -> None:
        """An error for a message that is not part of an extended-query batch."""
        if self.in_batch:
            self._fail(error_response(code, message), stat)
        else:
            self._local(error_response(code, message) + READY_IDLE, stat)
            self.round += 1

    def _malformed(self, kind: int, reason: str) -> None:
        message = f"protocol violation: {reason}"
        if kind in _EXTENDED:
            self._fail(error_response("08P01", message), _MALFORMED)
        elif kind == _S:
            self._local(error_response("08P01", message), _MALFORMED)
        else:
            self._refuse_message(message, "08P01", _MALFORMED)

    def _forward(self, raw: bytes, kind: int, undo: Callable[[], None] | None = None) -> None:
        self.uout.append(raw)
        self.unsynced = True
        self.pending.append(_Entry(kind, self.batch, self.round, b"", undo))

    def _flush_message(self, raw: bytes) -> None:
        """Flush. After Parse or Describe only, a Sync instead, as Picodata holds no locks.

        asyncpg prepares with Parse, Describe, Flush; PostgreSQL would keep the
        implicit transaction, and the table locks of the Parse, open until the
        client's next Sync, so that a concurrent ALTER TABLE waits. With no
        portal open, a Sync changes nothing else the client can see.
        """
        if self.unsynced and not self.bound:
            self.uout.append(_SYNC)
            self.pending.append(_Entry(_QUIET_SYNC, self.batch, self.round))
            self.batch += 1
            self.unsynced = False
        else:
            self.uout.append(raw)

    def _query(self, body: bytes, raw: bytes) -> None:
        if not body or body[-1] != 0 or body.find(b"\x00") != len(body) - 1:
            raise _Malformed("the query string holds a NUL character or is not terminated")
        kind, detail = _classify(_text(body[:-1]))
        if kind == _STUB:
            self._local(_command_complete(detail) + READY_IDLE)
        elif kind == _REJECT:
            self._local(error_response("0A000", detail) + READY_IDLE, _REJECTED)
        else:
            entry = _Entry(_QUERY, self.batch, self.round)
            if kind == _DDL:
                entry.done = self.node.schema_changed
            elif kind == _FORGET:
                entry.done = lambda: self._forget(detail)
            self.uout.append(raw)
            self.pending.append(entry)
            self.batch += 1
            self.unsynced = self.bound = False
        self.round += 1

    def _parse(self, body: bytes, raw: bytes) -> None:
        name, pos = _cstring(body, 0)
        query, pos = _cstring(body, pos)
        (count,) = _I16.unpack_from(body, pos) if len(body) >= pos + 2 else (-1,)
        if count < 0:
            raise _Malformed("invalid parameter type count")
        _expect_end(body, pos + 2 + 4 * count)
        shown = _text(name)
        kind, detail = _classify(_text(query))
        self.in_batch = True
        if kind == _REJECT:
            self._fail(error_response("0A000", detail), _REJECTED)
            return
        previous = self.stmts.get(name)
        if name and previous is not None:
            if previous.kind == _STUB_KIND:
                self._fail(
                    error_response("42P05", f'prepared statement "{shown}" already exists'), -1
                )
            else:
                self._forward(raw, _PARSE)  # the server answers 42P05
            return
        if name and self.node.values[_STATEMENTS] >= self.node.statement_max:
            limit = self.node.statement_max
            self._fail(
                error_response(
                    "XX000",
                    f"Statement storage is full. Current size limit: {limit}. Please, increase "
                    'storage limit using: ALTER SYSTEM SET "pg_statement_max" TO <new-limit>',
                ),
                _FULL,
            )
            return
        stub = kind == _STUB
        stmt = _Stmt(_STUB_KIND if stub else _PG, self.node.epoch(), kind == _DDL, detail)
        self._put_statement(name, stmt)
        undo = lambda: self._put_statement(name, previous)  # noqa: E731
        if stub:
            self._local(_PARSE_COMPLETE, undo=undo)
        else:
            self._forward(raw, _PARSE, undo)

    def _put_statement(self, name: bytes, stmt: _Stmt | None) -> None:
        """Set (or with None remove) one statement, keeping the node's count of named ones."""
        had = name in self.stmts
        if stmt is None:
            self.stmts.pop(name, None)
        else:
            self.stmts[name] = stmt
        if name and had != (stmt is not None):
            delta = 1 if stmt is not None else -1
            self.named += delta
            self.node.count(_STATEMENTS, delta)

    def _forget(self, rest: str) -> None:
        """Mirror a DEALLOCATE or DISCARD that the server ran."""
        words = rest.replace(";", " ").split()
        if words and words[0].upper() == "PREPARE":
            words = words[1:]
        if not words:
            return
        if words[0].upper() == "ALL":
            for name in [n for n in self.stmts if n]:
                self._put_statement(name, None)
        else:
            target = words[0].strip('"').encode()
            if target in self.stmts:
                self._put_statement(target, None)

    def _bind(self, body: bytes, raw: bytes) -> None:
        portal, pos = _cstring(body, 0)
        name, pos = _cstring(body, pos)
        try:
            (formats,) = _I16.unpack_from(body, pos)
            pos += 2 + 2 * formats
            (values,) = _I16.unpack_from(body, pos)
            pos += 2
            for _ in range(values):
                (size,) = _I32.unpack_from(body, pos)
                pos += 4 + max(size, 0)
            (results,) = _I16.unpack_from(body, pos)
            pos += 2 + 2 * results
        except struct.error:
            raise _Malformed("the message length does not match its content") from None
        if formats < 0 or values < 0 or results < 0:
            raise _Malformed("invalid count in a Bind message")
        _expect_end(body, pos)
        self.in_batch = True
        stmt = self.stmts.get(name)
        if stmt is None:
            self.portals.pop(portal, None)
            self._forward(raw, _BIND)
        elif stmt.kind == _STUB_KIND:
            self.portals[portal] = stmt
            self._local(_BIND_COMPLETE)
        elif self.invalidation and not stmt.ddl and stmt.epoch != self.node.epoch():
            shown = name.decode("utf-8", "replace")
            self._fail(
                error_response("42999", f"prepared statement {shown} has been invalidated"),
                _INVALIDATIONS,
            )
        else:
            self.portals[portal] = stmt
            self._forward(raw, _BIND)
        self.bound = True

    def _execute(self, body: bytes, raw: bytes) -> None:
        portal, pos = _cstring(body, 0)
        _expect_end(body, pos + 4)
        self.in_batch = True
        stmt = self.portals.get(portal)
        if stmt is not None and stmt.kind == _STUB_KIND:
            self._local(_command_complete(stmt.tag))
            return
        self.uout.append(raw)
        self.unsynced = True
        entry = _Entry(_EXECUTE, self.batch, self.round)
        if stmt is not None and stmt.ddl:
            entry.done = self.node.schema_changed
        self.pending.append(entry)

    def _describe(self, body: bytes, raw: bytes) -> None:
        if not body:
            raise _Malformed("empty Describe message")
        target = body[0]
        name, pos = _cstring(body, 1)
        _expect_end(body, pos)
        self.in_batch = True
        if target == 0x53:  # 'S'
            stmt = self.stmts.get(name)
            if stmt is not None and stmt.kind == _STUB_KIND:
                self._local(_NO_PARAMETERS + _NO_DATA)
                return
        elif target == 0x50:  # 'P'
            stmt = self.portals.get(name)
            if stmt is not None and stmt.kind == _STUB_KIND:
                self._local(_NO_DATA)
                return
        else:
            raise _Malformed(f"unknown describe type {target!r}")
        self._forward(raw, _DESCRIBE)

    def _close_message(self, body: bytes, raw: bytes) -> None:
        if not body:
            raise _Malformed("empty Close message")
        target = body[0]
        name, pos = _cstring(body, 1)
        _expect_end(body, pos)
        self.in_batch = True
        if target == 0x53:  # 'S'
            previous = self.stmts.get(name)
            if previous is None:
                self._forward(raw, _CLOSE)
                return
            self._put_statement(name, None)
            undo = lambda: self._put_statement(name, previous)  # noqa: E731
            if previous.kind == _STUB_KIND:
                self._local(_CLOSE_COMPLETE, undo=undo)
            else:
                self._forward(raw, _CLOSE, undo)
        elif target == 0x50:  # 'P'
            stmt = self.portals.pop(name, None)
            if stmt is not None and stmt.kind == _STUB_KIND:
                self._local(_CLOSE_COMPLETE)
            else:
                self._forward(raw, _CLOSE)
        else:
            raise _Malformed(f"unknown close type {target!r}")

    def _sync(self, body: bytes, raw: bytes) -> None:
        if body:
            raise _Malformed("the message length does not match its content")
        self.uout.append(raw)
        self.pending.append(_Entry(_SYNC_ENTRY, self.batch, self.round))
        self.batch += 1
        self.round += 1
        self.unsynced = self.bound = False
        self.discarding = False
        self.in_batch = False
        self.portals.clear()

    def _terminate(self, raw: bytes) -> None:
        self.uout.append(raw)
        self._flush()
        self.close()

    # -- server messages ----------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        if self.ubuf:
            self.ubuf += data
            if len(self.ubuf) < self.uneed:
                return
            data = bytes(self.ubuf)
            self.ubuf.clear()
        if self.phase == _READY_PHASE:
            rest = self._server_messages(data, 0)
        else:
            rest = self._server_login(data)
        if rest:
            self.ubuf += rest
        self._flush()

    def _server_login(self, data: bytes) -> bytes:
        """The server's side of the login: drop BackendKeyData, count the outcome."""
        n = len(data)
        pos = start = 0
        while n - pos >= 5:
            kind = data[pos]
            (length,) = _U32.unpack_from(data, pos + 1)
            end = pos + 1 + length
            if end > n:
                break
            if kind == _KEY_DATA:
                self.cout.append(data[start:pos])
                start = end
            elif kind == _ERROR:
                self.node.count(_REFUSED)
            elif kind == _READY:
                self.cout.append(data[start:pos])
                self.cout.append(READY_IDLE)
                self.phase = _READY_PHASE
                self.logged_in = True
                self.node.count(_LOGINS)
                self.node.count(_SESSIONS)
                if self.cbuf:  # the client pipelined a query after its password
                    early = bytes(self.cbuf)
                    self.cbuf.clear()
                    self.cbuf += self._client_messages(early)
                return self._server_messages(data, end)
            pos = end
        self.cout.append(data[start:pos])
        self.uneed = 0
        return data[pos:]

    def _server_messages(self, data: bytes, pos: int) -> bytes:
        """Relay the server's answers, in order with the front's own; return the rest."""
        n = len(data)
        start = pos
        cout = self.cout
        pending = self.pending
        while n - pos >= 5:
            kind = data[pos]
            (length,) = _U32.unpack_from(data, pos + 1)
            end = pos + 1 + length
            if end > n:
                self.uneed = end - pos
                if start < pos:
                    cout.append(data[start:pos])
                return data[pos:]
            if kind == _DATA_ROW:
                pos = end
                continue
            if kind == _READY:
                cout.append(data[start:pos])
                start = end
                if self._ready():
                    cout.append(READY_IDLE)
                self._emit_locals()
            elif kind == _ERROR:
                if pending and pending[0].kind not in _SYNCS:
                    cout.append(data[start:end])
                    start = end
                    self._server_error()
            elif kind == _NOTICE:
                if _DDL_NOTICE_BYTES in data[pos:end]:
                    self.node.schema_changed()
                    cout.append(data[start:pos])
                    start = end
            elif kind in (_KEY_DATA, _NOTIFICATION):
                cout.append(data[start:pos])
                start = end
            elif pending and kind in _ENDS[pending[0].kind]:
                entry = pending.popleft()
                if entry.done is not None:
                    entry.done()
                if pending and pending[0].kind == _LOCAL:
                    cout.append(data[start:end])
                    start = end
                    self._emit_locals()
            pos = end
        self.uneed = 0
        if start < pos:
            cout.append(data[start:pos])
        return data[pos:]

    def _emit_locals(self) -> None:
        pending = self.pending
        while pending and pending[0].kind == _LOCAL:
            entry = pending.popleft()
            self.cout.append(entry.data)
            if entry.stat >= 0:
                self.node.count(entry.stat)

    def _ready(self) -> bool:
        """ReadyForQuery: the Sync or Query at the head is answered; pass it on?"""
        pending = self.pending
        while pending:
            entry = pending.popleft()
            if entry.kind in _SYNCS:
                if entry.done is not None:
                    entry.done()
                return entry.kind != _QUIET_SYNC
            if entry.undo is not None:  # skipped by the server
                entry.undo()
        return True

    def _server_error(self) -> None:
        """The server failed an extended-query message: it skips the rest of the batch."""
        pending = self.pending
        failed = pending.popleft()
        skipped = [e for e in pending if e.batch == failed.batch and e.kind not in _SYNCS]
        if skipped:
            kept = [e for e in pending if e.batch != failed.batch or e.kind in _SYNCS]
            pending.clear()
            pending.extend(kept)
        for entry in (*reversed(skipped), failed):
            if entry.undo is not None:
                entry.undo()
        if failed.round == self.round:  # the client's batch goes on: skip it to its Sync
            self.discarding = True
        self._emit_locals()

    # -- the end -------------------------------------------------------------------------

    def close(self) -> None:
        if self.phase == _CLOSED:
            return
        self.phase = _CLOSED
        self.node.sessions.discard(self)
        if self.named:
            self.node.count(_STATEMENTS, -self.named)
            self.named = 0
        if self.logged_in:
            self.node.count(_SESSIONS, -1)
        if self.cout and self.client is not None:
            self.client.write(b"".join(self.cout))
            self.cout.clear()
        if self.client is not None:
            self.client.close()
        if self.upstream is not None:
            self.upstream.close()

    def abort(self) -> None:
        for transport in (self.client, self.upstream):
            if transport is not None:
                transport.abort()
        self.close()


# ---------------------------------------------------------------- the process


async def _serve(args: argparse.Namespace, stats: mmap.mmap) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=args.listen_fd)
    node = _Node(stats, args.statement_max, (args.upstream_host, args.upstream_port), args.name)
    server = await loop.create_server(lambda: _Session(node), sock=sock, backlog=128)
    stopped = asyncio.Event()

    def stdin_ready() -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            logger.info("standard input closed: the owner is gone")
            loop.remove_reader(0)
            stopped.set()

    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    loop.add_reader(0, stdin_ready)
    os.write(1, b"ready\n")
    logger.info(
        "front of %s serving on %s, server %s:%d",
        args.name,
        sock.getsockname(),
        args.upstream_host,
        args.upstream_port,
    )
    await stopped.wait()
    server.close()
    for session in list(node.sessions):
        session.abort()
    logger.info("front of %s stopped", args.name)


def main(argv: list[str] | None = None) -> int:
    """Run one front until its standard input closes or it gets SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen-fd", type=int, required=True, help="a bound, listening socket")
    parser.add_argument("--upstream-host", default="127.0.0.1")
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--stats", required=True, help="the statistics file")
    parser.add_argument("--statement-max", type=int, default=100000)
    parser.add_argument("--name", default="node")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s [%(process)d] %(levelname)s %(message)s",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(args.stats, "r+b") as f:
        stats = mmap.mmap(f.fileno(), STATS_SIZE)
    asyncio.run(_serve(args, stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
