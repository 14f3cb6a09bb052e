"""Picodata's bucket function: which bucket a sharding key's values fall in.

Pure code, no I/O. :func:`bucket_id` is Picodata's own computation, read from
its source (``src/sql/router.rs``, ``calculate_bucket_id``): the key values
become a Tarantool tuple, and Tarantool's key hash (``tuple_hash_field`` in
``src/box/tuple_hash.cc`` of Picodata's Tarantool fork, seed 13) runs over it:
MurmurHash3 (x86, 32 bits) over each value's MessagePack encoding in key
order, then ``% bucket_count + 1``. Per type:

- ``integer``/``unsigned``: the most compact MessagePack integer
  (``0..127`` one byte; other non-negative values as ``uint 8/16/32/64``;
  negative ones as ``fixint``/``int 8/16/32/64``).
- ``string``: the UTF-8 bytes only, without the MessagePack header.
- ``double``: a whole finite number hashes as the integer it equals (so
  ``5.0`` and ``5`` share a bucket); any other double as its 8 big-endian
  IEEE 754 bytes, without the ``0xcb`` marker. A NaN parameter is NULL to
  Picodata.
- ``boolean``: ``0xc2``/``0xc3``.
- ``decimal``: MessagePack extension 1 (``MP_DECIMAL``): scale, then packed
  BCD digits with a sign nibble (``0xc`` or ``0xd``).
- ``uuid``: extension 2, the 16 bytes in RFC 4122 order.
- ``datetime``: extension 4: seconds since the epoch (int64, little endian),
  then, unless all are zero, nanoseconds (int32), the UTC offset in minutes
  (int16) and a time zone index (int16).
- NULL (``None``): ``0xc0``.

Values are taken as Picodata receives them from asyncpg's binary parameters:

- a ``Decimal`` with a positive exponent arrives expanded (``1E+2`` is
  ``100``); trailing fractional zeros are kept (``1.50`` and ``1.5`` differ);
- an aware ``datetime`` arrives as UTC (offset 0, microsecond precision). A
  naive one is refused: asyncpg would read it in the client's local time
  zone;
- a whole ``float`` becomes an integer on the server (saturating at the
  int64 limits) before it is cast back to the column's type, and a float
  smaller than 2**-52 in magnitude becomes 0.

Example::

    >>> bucket_id(["kek", 1], ["string", "integer"], 3000)
    2036
    >>> key = sharding_key(
    ...     '{"ShardedImplicitly": [["code"], "murmur3", "default"]}',
    ...     '[{"name": "code", "field_type": "integer", "is_nullable": false}]',
    ... )
    >>> key.bucket([1], 3000)
    Bucket(tier='default', bucket_id=1934)
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs

from ._errors import ConfigError

__all__ = [
    "KEY_TYPES",
    "Bucket",
    "ShardingKey",
    "bucket_id",
    "murmur3_32",
    "sharding_key",
]

SEED: Final = 13
"""Tarantool's ``HASH_SEED``."""
DECIMAL_MAX_DIGITS: Final = 38
"""Tarantool's ``DECIMAL_MAX_DIGITS``: a decimal holds at most 38 digits."""

_M32: Final = 0xFFFFFFFF
_C1: Final = 0xCC9E2D51
_C2: Final = 0x1B873593
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_UINT64_MAX: Final = 2**64 - 1
_NIL: Final = b"\xc0"
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_F64_EPSILON: Final = 2.0**-52
_TWO_63: Final = 2.0**63

_BE_DOUBLE = struct.Struct(">d")
_DATETIME_SHORT = struct.Struct("<q")
_DATETIME_LONG = struct.Struct("<qihh")


# ---------------------------------------------------------------- MurmurHash3


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3, x86 32-bit variant (Tarantool's ``PMurHash32``), unsigned."""
    h = seed & _M32
    length = len(data)
    nblocks = length >> 2
    if nblocks:
        for k in struct.unpack_from(f"<{nblocks}I", data):
            k = (k * _C1) & _M32
            k = ((k << 15) | (k >> 17)) & _M32
            h ^= (k * _C2) & _M32
            h = ((h << 13) | (h >> 19)) & _M32
            h = (h * 5 + 0xE6546B64) & _M32
    if length & 3:
        k = int.from_bytes(data[nblocks << 2 :], "little")
        k = (k * _C1) & _M32
        k = ((k << 15) | (k >> 17)) & _M32
        h ^= (k * _C2) & _M32
    h ^= length
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


# ---------------------------------------------------------------- MessagePack pieces


def _mp_int(value: int) -> bytes:
    """The most compact MessagePack integer, as Tarantool's ``mp_encode_(u)int``."""
    if value >= 0:
        if value < 0x80:
            return bytes((value,))
        if value < 0x100:
            return b"\xcc" + bytes((value,))
        if value < 0x10000:
            return b"\xcd" + value.to_bytes(2, "big")
        if value < 0x100000000:
            return b"\xce" + value.to_bytes(4, "big")
        return b"\xcf" + value.to_bytes(8, "big")
    if value >= -32:
        return bytes((value & 0xFF,))
    if value >= -0x80:
        return b"\xd0" + value.to_bytes(1, "big", signed=True)
    if value >= -0x8000:
        return b"\xd1" + value.to_bytes(2, "big", signed=True)
    if value >= -0x80000000:
        return b"\xd2" + value.to_bytes(4, "big", signed=True)
    return b"\xd3" + value.to_bytes(8, "big", signed=True)


_FIXEXT: Final = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def _mp_ext(ext_type: int, payload: bytes) -> bytes:
    size = len(payload)
    marker = _FIXEXT.get(size)
    if marker is not None:
        return bytes((marker, ext_type)) + payload
    if size < 0x100:
        return bytes((0xC7, size, ext_type)) + payload
    return b"\xc8" + size.to_bytes(2, "big") + bytes((ext_type,)) + payload


def _decimal_payload(sign: int, digits: Sequence[int], scale: int) -> bytes:
    """``MP_DECIMAL`` payload: scale, then BCD digits and a sign nibble (``decimal_pack``)."""
    nibbles = list(digits)
    if len(nibbles) % 2 == 0:
        nibbles.insert(0, 0)
    nibbles.append(0xD if sign else 0xC)
    packed = bytes((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, len(nibbles), 2))
    return _mp_int(scale) + packed


def _datetime_payload(seconds: int, nsec: int = 0, tzoffset: int = 0, tzindex: int = 0) -> bytes:
    """``MP_DATETIME`` payload: 8 bytes, or 16 when any of the last three is set."""
    if nsec == 0 and tzoffset == 0 and tzindex == 0:
        return _DATETIME_SHORT.pack(seconds)
    return _DATETIME_LONG.pack(seconds, nsec, tzoffset, tzindex)


# ---------------------------------------------------------------- per-type encoders
# Each returns the bytes Tarantool's key hash feeds to MurmurHash3 for one
# value, or raises _Reject with what is wrong; None is handled by the caller.


class _Reject(Exception):
    """A value that does not fit its column type (becomes a ConfigError)."""


def _kind(value: object) -> str:
    return type(value).__name__


def _check_int(value: object, low: int, high: int) -> int:
    if type(value) is bool or not isinstance(value, int):
        raise _Reject(f"expected int, got {_kind(value)}")
    if not low <= value <= high:
        raise _Reject(f"{value} is out of range [{low}, {high}]")
    return value


def _enc_integer(value: object) -> bytes:
    return _mp_int(_check_int(value, _INT64_MIN, _INT64_MAX))


def _enc_unsigned(value: object) -> bytes:
    return _mp_int(_check_int(value, 0, _UINT64_MAX))


def _enc_string(value: object) -> bytes:
    if not isinstance(value, str):
        raise _Reject(f"expected str, got {_kind(value)}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Reject(f"not valid UTF-8 ({exc.reason})") from None


def _enc_boolean(value: object) -> bytes:
    if type(value) is not bool:
        raise _Reject(f"expected bool, got {_kind(value)}")
    return b"\xc3" if value else b"\xc2"


def _hash_double(number: float) -> bytes:
    """A double as Tarantool's key hash reads it: whole and in range as an integer."""
    if math.isfinite(number) and number.is_integer() and -_TWO_63 <= number < 2.0 * _TWO_63:
        return _mp_int(int(number))
    return _BE_DOUBLE.pack(number)


def _as_float(value: object) -> float:
    if type(value) is bool or not isinstance(value, int | float):
        raise _Reject(f"expected float or int, got {_kind(value)}")
    try:
        return float(value)
    except OverflowError:
        raise _Reject(f"{value} does not fit a double") from None


def _sbroad_double(number: float) -> float | int | None:
    """What sbroad's ``Value::from(f64)`` makes of a double parameter.

    NaN is NULL; a finite double whose fraction is below machine epsilon
    becomes an int64 (Rust's saturating ``as i64``); anything else stays a
    double.
    """
    if math.isnan(number):
        return None
    if math.isinf(number) or abs(math.fmod(number, 1.0)) >= _F64_EPSILON:
        return number
    if abs(number) < 2.2250738585072014e-308 and number != 0.0:  # subnormal
        return number
    if number >= _TWO_63:
        return _INT64_MAX
    if number <= -_TWO_63:
        return _INT64_MIN
    return int(number)


def _enc_double(value: object) -> bytes:
    converted = _sbroad_double(_as_float(value))
    if converted is None:
        return _NIL
    # A double column casts the integer back to a double.
    return _hash_double(float(converted))


def _enc_decimal(value: object) -> bytes:
    if type(value) is int:
        value = decimal.Decimal(value)
    if not isinstance(value, decimal.Decimal):
        raise _Reject(f"expected Decimal or int, got {_kind(value)}")
    if not value.is_finite():
        raise _Reject(f"{value} is not a finite number")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    if exponent > 0:
        # asyncpg's binary NUMERIC has no positive exponent: 1E+2 arrives as 100.
        if digits == (0,):
            exponent = 0
        else:
            if len(digits) + exponent > DECIMAL_MAX_DIGITS:
                raise _Reject(f"{value} has more than {DECIMAL_MAX_DIGITS} digits")
            digits = digits + (0,) * exponent
            exponent = 0
    if len(digits) > DECIMAL_MAX_DIGITS:
        raise _Reject(f"{value} has more than {DECIMAL_MAX_DIGITS} digits")
    scale = -exponent
    return _mp_ext(1, _decimal_payload(sign, digits, scale))


def _enc_uuid(value: object) -> bytes:
    if isinstance(value, str):
        try:
            value = uuid.UUID(value)
        except ValueError:
            raise _Reject(f"{value!r} is not a uuid") from None
    if not isinstance(value, uuid.UUID):
        raise _Reject(f"expected uuid.UUID or str, got {_kind(value)}")
    return b"\xd8\x02" + value.bytes


def _enc_datetime(value: object) -> bytes:
    if not isinstance(value, datetime.datetime):
        raise _Reject(f"expected datetime.datetime, got {_kind(value)}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise _Reject(
            "naive datetime: give it a tzinfo (asyncpg would send it in the local time zone)"
        )
    delta = value - _EPOCH
    seconds = delta.days * 86400 + delta.seconds
    return _mp_ext(4, _datetime_payload(seconds, delta.microseconds * 1000))


def _enc_number(value: object) -> bytes:
    """``number`` (releases before 25.x): the value keeps the type it arrived with."""
    if isinstance(value, decimal.Decimal):
        return _enc_decimal(value)
    if isinstance(value, float):
        converted = _sbroad_double(value)
        if converted is None:
            return _NIL
        if isinstance(converted, int):
            return _mp_int(converted)
        return _hash_double(converted)
    if type(value) is int:
        return _enc_integer(value)
    raise _Reject(f"expected int, float or Decimal, got {_kind(value)}")


def _enc_scalar(value: object) -> bytes:
    """``scalar``/``any``: the value keeps the type it arrived with."""
    if type(value) is bool:
        return _enc_boolean(value)
    if isinstance(value, str):
        return _enc_string(value)
    if isinstance(value, uuid.UUID):
        return _enc_uuid(value)
    if isinstance(value, datetime.datetime):
        return _enc_datetime(value)
    return _enc_number(value)


_Encoder = Callable[[object], bytes]

_ENCODERS: Final[Mapping[str, _Encoder]] = {
    "integer": _enc_integer,
    "unsigned": _enc_unsigned,
    "string": _enc_string,
    "double": _enc_double,
    "boolean": _enc_boolean,
    "decimal": _enc_decimal,
    "uuid": _enc_uuid,
    "datetime": _enc_datetime,
    "number": _enc_number,
    "scalar": _enc_scalar,
    "any": _enc_scalar,
}

_ALIASES: Final[Mapping[str, str]] = {
    "int": "integer",
    "int2": "integer",
    "int4": "integer",
    "int8": "integer",
    "smallint": "integer",
    "bigint": "integer",
    "text": "string",
    "varchar": "string",
    "bool": "boolean",
    "numeric": "decimal",
    "float8": "double",
    "timestamptz": "datetime",
}

KEY_TYPES: Final = tuple(_ENCODERS)
"""The Picodata field types a sharding key column can have (aliases aside)."""


def canonical_type(name: object) -> str:
    """The Picodata field type for *name* (``"INT"`` -> ``"integer"``, ``"varchar(8)"`` ...).

    Raises:
        ConfigError: not a type a sharding key can have.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a column type must be a string, got {_kind(name)}")
    key = name.strip().lower()
    if key.startswith("varchar(") and key.endswith(")"):
        key = "varchar"
    key = _ALIASES.get(key, key)
    if key not in _ENCODERS:
        raise ConfigError(
            f"unknown sharding key type {name!r}; known: {', '.join(KEY_TYPES)} "
            f"(and the aliases {', '.join(_ALIASES)})"
        )
    return key


def _canonical_types(types: Sequence[str]) -> tuple[str, ...]:
    return tuple(canonical_type(t) for t in types)


def _str_tuple(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(items)


def _bool_tuple(items: Sequence[bool]) -> tuple[bool, ...]:
    return tuple(bool(item) for item in items)


# ---------------------------------------------------------------- the public function


@attrs.frozen
class Bucket:
    """Where a key lives: a bucket of a tier.

    A value object, made by :meth:`ShardingKey.bucket` or directly.
    """

    tier: str
    """Name of the tier whose buckets the table lives in."""
    bucket_id: int
    """``1..bucket_count`` of that tier."""


_EncoderRow = tuple[tuple[_Encoder, ...], tuple[str, ...]]
_ENCODER_CACHE: dict[tuple[str, ...], _EncoderRow] = {}
_CACHE_LIMIT: Final = 256


def _encoders_for(types: Sequence[str]) -> _EncoderRow:
    key = tuple(types)
    row = _ENCODER_CACHE.get(key)
    if row is None:
        names = tuple(canonical_type(t) for t in key)
        row = (tuple(_ENCODERS[n] for n in names), names)
        if len(_ENCODER_CACHE) >= _CACHE_LIMIT:
            _ENCODER_CACHE.clear()
        _ENCODER_CACHE[key] = row
    return row


def _check_bucket_count(bucket_count: object) -> int:
    if type(bucket_count) is not int or bucket_count < 1:
        raise ConfigError(f"bucket_count must be a positive int, got {bucket_count!r}")
    return bucket_count


def _key_bytes(
    values: Sequence[object],
    encoders: tuple[_Encoder, ...],
    names: tuple[str, ...],
    columns: tuple[str, ...] | None = None,
    nullable: tuple[bool, ...] | None = None,
) -> bytes:
    if len(values) != len(encoders):
        raise ConfigError(
            f"the sharding key has {len(encoders)} column(s) ({', '.join(names)}), "
            f"got {len(values)} value(s)"
        )
    parts = []
    for index, value in enumerate(values):
        if value is None:
            if nullable is not None and not nullable[index]:
                where = f"column {columns[index]!r}" if columns else f"key column {index}"
                raise ConfigError(f"{where} ({names[index]}) is NOT NULL, got None")
            parts.append(_NIL)
            continue
        try:
            parts.append(encoders[index](value))
        except _Reject as exc:
            where = f"column {columns[index]!r}" if columns else f"key column {index}"
            raise ConfigError(f"{where} ({names[index]}): {exc}") from None
    return b"".join(parts)


def bucket_id(values: Sequence[object], types: Sequence[str], bucket_count: int) -> int:
    """The bucket Picodata puts a row with these sharding key values in.

    Args:
        values: the key's values in key order (``int``, ``str``, ``float``,
            ``bool``, ``Decimal``, ``uuid.UUID``, aware ``datetime`` or ``None``).
        types: each key column's Picodata type (``integer``, ``unsigned``,
            ``string``, ``double``, ``boolean``, ``decimal``, ``uuid``,
            ``datetime``, ``number``, ``scalar``, or an alias such as ``int``,
            ``text``, ``varchar``, ``bool``, ``numeric``).
        bucket_count: the tier's ``_pico_tier.bucket_count`` (3000 by default).

    Returns:
        ``1..bucket_count``.

    Raises:
        ConfigError: an unknown type, a wrong number of values, a value of the
            wrong Python type or out of the column type's range, or a bad
            ``bucket_count``. The message names the key column.
    """
    count = _check_bucket_count(bucket_count)
    encoders, names = _encoders_for(types)
    return murmur3_32(_key_bytes(values, encoders, names), SEED) % count + 1


# ---------------------------------------------------------------- from a _pico_table row


def _loads(raw: object, what: str, table: str) -> Any:
    if isinstance(raw, str | bytes):
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"table {table!r}: {what} is not valid JSON ({exc})") from None
    return raw


@attrs.frozen
class ShardingKey:
    """A sharded table's key: its tier, columns and their types, ready to hash.

    Build one with :func:`sharding_key` from a ``_pico_table`` row, or
    directly from column types (no I/O)::

        key = ShardingKey(tier="default", columns=("tenant", "code"),
                          types=("string", "integer"))
        key.bucket(["acme", 7], bucket_count=3000)
    """

    tier: str
    columns: tuple[str, ...] = attrs.field(converter=_str_tuple)
    """The key's column names, in key order."""
    types: tuple[str, ...] = attrs.field(converter=_canonical_types)
    """Each key column's Picodata field type (aliases resolved)."""
    nullable: tuple[bool, ...] = attrs.field(default=(), converter=_bool_tuple)
    """Whether each key column accepts NULL; empty means none does."""
    table: str = ""
    """The table's name, for error messages."""
    _encoders: tuple[_Encoder, ...] = attrs.field(init=False, eq=False, repr=False)
    _nullable: tuple[bool, ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.columns:
            raise ConfigError(f"table {self.table!r}: a sharding key needs at least one column")
        if len(self.types) != len(self.columns):
            raise ConfigError(
                f"table {self.table!r}: {len(self.columns)} key columns but {len(self.types)} types"
            )
        if self.nullable and len(self.nullable) != len(self.columns):
            raise ConfigError(
                f"table {self.table!r}: {len(self.columns)} key columns but "
                f"{len(self.nullable)} nullability flags"
            )
        object.__setattr__(self, "_encoders", tuple(_ENCODERS[t] for t in self.types))
        flags = self.nullable or (False,) * len(self.columns)
        object.__setattr__(self, "_nullable", tuple(bool(f) for f in flags))

    def bucket_id(self, values: Sequence[object], bucket_count: int) -> int:
        """``1..bucket_count`` for *values* (see :func:`bucket_id`).

        Raises:
            ConfigError: wrong number or types of values, or ``None`` for a
                NOT NULL column; the message names the column.
        """
        count = _check_bucket_count(bucket_count)
        data = _key_bytes(values, self._encoders, self.types, self.columns, self._nullable)
        return murmur3_32(data, SEED) % count + 1

    def bucket(self, values: Sequence[object], bucket_count: int) -> Bucket:
        """The :class:`Bucket` of *values* in this key's tier."""
        return Bucket(self.tier, self.bucket_id(values, bucket_count))


def sharding_key(distribution: object, format: object, *, table: str = "") -> ShardingKey:
    """Parse a ``_pico_table`` row's ``distribution`` and ``format`` into a :class:`ShardingKey`.

    Args:
        distribution: JSON text (as asyncpg returns it) or the decoded value,
            e.g. ``{"ShardedImplicitly": [["tenant", "code"], "murmur3", "default"]}``.
        format: JSON text or the decoded list of
            ``{"name", "field_type", "is_nullable"}`` maps.
        table: the table's name, for error messages.

    Raises:
        ConfigError: the table is global or sharded another way, a key column
            is missing from the format, or a type cannot be a key.
    """
    dist = _loads(distribution, "distribution", table)
    fields = _loads(format, "format", table)
    if isinstance(dist, Mapping) and "ShardedImplicitly" in dist:
        spec = dist["ShardedImplicitly"]
        if isinstance(spec, Mapping):
            spec = [spec.get("sharding_key"), spec.get("sharding_fn"), spec.get("tier")]
        if not (isinstance(spec, Sequence) and len(spec) == 3):
            raise ConfigError(f"table {table!r}: cannot read distribution {dist!r}")
        columns, sharding_fn, tier = spec
    elif isinstance(dist, Mapping) and "Global" in dist:
        raise ConfigError(f"table {table!r} is global, not sharded: it has no buckets")
    else:
        raise ConfigError(
            f"table {table!r}: unsupported distribution {dist!r} "
            "(only ShardedImplicitly tables have a computed bucket_id)"
        )
    if str(sharding_fn).lower() != "murmur3":
        raise ConfigError(f"table {table!r}: unsupported sharding function {sharding_fn!r}")
    if not isinstance(tier, str) or not tier:
        raise ConfigError(f"table {table!r}: distribution names no tier: {dist!r}")
    if not isinstance(columns, Sequence) or isinstance(columns, str):
        raise ConfigError(f"table {table!r}: cannot read sharding key {columns!r}")
    if not isinstance(fields, Sequence) or isinstance(fields, str):
        raise ConfigError(f"table {table!r}: cannot read format {fields!r}")
    by_name: dict[str, Mapping[str, Any]] = {}
    for field in fields:
        if not isinstance(field, Mapping) or not isinstance(field.get("name"), str):
            raise ConfigError(f"table {table!r}: cannot read format entry {field!r}")
        by_name[field["name"]] = field
    types = []
    nullable = []
    for column in columns:
        field = by_name.get(column) if isinstance(column, str) else None
        if field is None:
            raise ConfigError(
                f"table {table!r}: sharding key column {column!r} is not in its format"
            )
        types.append(field.get("field_type", field.get("type")))
        nullable.append(bool(field.get("is_nullable", False)))
    return ShardingKey(tier=tier, columns=columns, types=types, nullable=nullable, table=table)
