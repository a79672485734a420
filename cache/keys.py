"""Content addresses: one typed hasher (`Hasher`), and the cache key of an `ExtractionRequest` made with it."""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import math
import struct
import sys
from collections.abc import Callable
from typing import Any

from schemas.request import ExtractionRequest
from schemas.store import SCHEMA_VERSION

__all__ = ["KEY_LENGTH", "Hasher", "cache_key", "canonical_json", "hash_value", "is_key"]

KEY_LENGTH = 32  # hex characters: 128 bits
_HEX_LENGTH = 64  # a whole SHA-256 digest
_NAN = struct.pack(">d", math.nan)  # every NaN is one value, whatever its sign or payload bits
_U64 = struct.Struct(">Q").pack


class Hasher:
    """SHA-256 over a sequence of values, each encoded with its type, so values that print alike hash apart.

    >>> Hasher().update(1).hexdigest(8) == Hasher().update("1").hexdigest(8)
    False

    Each value is a one-byte type tag and a length-prefixed payload (a container: its item
    count, then each item), so no two different sequences of values give the same bytes.
    Types: None, bool, int, float (NaN, inf, -inf, -0.0 each distinct), str, bytes
    (bytearray, memoryview), list, tuple, dict (in the order of its keys' encodings, so
    insertion order does not matter), numpy scalars and arrays (dtype, shape, little-endian
    bytes), datetime, date, time, timedelta, Decimal. Anything else is a `TypeError` naming
    its type: hashing it by its `str()` would give it the key of that string.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, value: Any) -> Hasher:
        """Add `value` (a whole value or none of it: a `TypeError` leaves the hasher as it was)."""
        chunks: list[bytes] = []
        _encode(value, chunks)
        self._sha.update(b"".join(chunks))
        return self

    def update_json(self, value: dict[str, Any] | list[Any]) -> Hasher:
        """Add the canonical JSON text of an object or array (see `canonical_json`), untagged.

        JSON is itself a typed encoding ("1", 1, 1.0, true, null differ), and an object's or
        array's text ends where its brackets close, so it mixes with tagged values
        unambiguously (no tag is '{' or '['). `cache_key` hashes a request so: the keys
        stay those of earlier versions.
        """
        if not isinstance(value, dict | list):
            raise TypeError(
                f"update_json takes a dict or a list (a JSON text that closes its own brackets), not "
                f"{_type_name(value)}. Fix: wrap it in a list, or use update()."
            )
        self._sha.update(canonical_json(value).encode("utf-8"))
        return self

    def update_column(self, column: Any) -> Hasher:
        """Add an Arrow column (a pyarrow Array or ChunkedArray) by its values, read from its buffers.

        Equal values hash alike whatever file they came from: chunking, slicing, 32- or 64-bit
        string offsets, dictionary encoding, integer and float widths do not count. Null, "",
        0 and NaN differ, and so do text, bytes, integer, float and bool columns. A column is a
        kind tag, its length, and the digests of its null positions, value sizes and value bytes
        (each a stream, so chunk boundaries leave no mark). Other types (timestamps, decimals,
        lists, structs, uint64) are hashed value by value as `update` would, a chunk at a time.
        """
        import numpy as np
        import pyarrow as pa

        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        # A column of nulls only is one kind whatever its type: a .jsonl says null, a .parquet string.
        kind = b"N" if column.null_count == len(column) else _column_kind(column.type)
        nulls, sizes, data = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        at = 0
        for chunk in chunks:
            if pa.types.is_dictionary(chunk.type):
                chunk = chunk.dictionary_decode()
            if pa.types.is_string_view(chunk.type) or pa.types.is_binary_view(chunk.type):
                chunk = chunk.cast(pa.large_string() if kind == b"s" else pa.large_binary())
            if chunk.null_count:
                valid = chunk.is_valid().to_numpy(zero_copy_only=False)
                nulls.update((np.flatnonzero(~valid) + at).astype("<i8").tobytes())
            _COLUMN_ENCODERS[kind](chunk, sizes, data)
            at += len(chunk)
        self._sha.update(b"C" + kind + _U64(at) + nulls.digest() + sizes.digest() + data.digest())
        return self

    def hexdigest(self, length: int | None = None) -> str:
        """The digest so far as lowercase hex: all 64 characters, or the first `length`."""
        if length is not None and not 1 <= length <= _HEX_LENGTH:
            raise ValueError(f"a digest length is 1 to {_HEX_LENGTH} hex characters, got {length!r}")
        return self._sha.hexdigest()[:length]


def hash_value(*values: Any, length: int | None = KEY_LENGTH) -> str:
    """The `Hasher` digest of `values` in order (`length` hex characters; None for all 64).

    >>> hash_value({"b": 1, "a": [1.0, None]}) == hash_value({"a": [1.0, None], "b": 1})
    True
    """
    hasher = Hasher()
    for value in values:
        hasher.update(value)
    return hasher.hexdigest(length)


def _sized(tag: bytes, payload: bytes) -> bytes:
    return tag + _U64(len(payload)) + payload


def _count(tag: bytes, n: int) -> bytes:
    return tag + _U64(n)


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _float(value: float) -> bytes:
    return b"f" + (_NAN if math.isnan(value) else struct.pack(">d", value))


def _sequence(tag: bytes, value: list[Any] | tuple[Any, ...], out: list[bytes]) -> None:
    out.append(_count(tag, len(value)))
    for item in value:
        _encode(item, out)


def _first(pair: tuple[bytes, Any]) -> bytes:
    return pair[0]


def _mapping(value: dict[Any, Any], out: list[bytes]) -> None:
    items = []
    for key, item in value.items():
        encoded: list[bytes] = []
        _encode(key, encoded)
        items.append((b"".join(encoded), item))
    items.sort(key=_first)
    out.append(_count(b"d", len(items)))
    for key_bytes, item in items:
        out.append(key_bytes)
        _encode(item, out)


# Unbound methods of the base types, so a subclass (an IntEnum, a pandas Timestamp) is hashed as the
# value it holds, not as its own __str__ would spell it.
_SCALARS: dict[type, Callable[[Any], bytes]] = {
    type(None): lambda v: b"N",
    bool: lambda v: b"T" if v else b"F",
    int: lambda v: _sized(b"i", int.__repr__(v).encode("ascii")),
    float: _float,
    str: lambda v: _sized(b"s", str.encode(v, "utf-8", "surrogatepass")),
    bytes: lambda v: _sized(b"b", bytes(v)),
    bytearray: lambda v: _sized(b"b", bytes(v)),
    memoryview: lambda v: _sized(b"b", v.tobytes()),
    # A datetime is a date: datetime comes first; isoformat keeps the UTC offset of an aware one.
    dt.datetime: lambda v: _sized(b"D", dt.datetime.isoformat(v).encode("ascii")),
    dt.date: lambda v: _sized(b"y", dt.date.isoformat(v).encode("ascii")),
    dt.time: lambda v: _sized(b"h", dt.time.isoformat(v).encode("ascii")),
    dt.timedelta: lambda v: b"e" + struct.pack(">qqq", v.days, v.seconds, v.microseconds),
    # str() of a Decimal keeps its exponent: Decimal('1.0') and Decimal('1.00') are different data.
    decimal.Decimal: lambda v: _sized(b"m", decimal.Decimal.__str__(v).encode("ascii")),
}


def _encode(value: Any, out: list[bytes]) -> None:
    """Append the typed encoding of `value` to `out`."""
    scalar = _SCALARS.get(type(value))  # exact types first: one lookup for nearly every value
    if scalar is not None:
        out.append(scalar(value))
    elif isinstance(value, list):
        _sequence(b"l", value, out)
    elif isinstance(value, tuple):
        _sequence(b"t", value, out)
    elif isinstance(value, dict):
        _mapping(value, out)
    elif not _encode_numpy(value, out):  # before subclasses: np.float64 is a float, np.str_ a str
        base = next((kind for kind in _SCALARS if isinstance(value, kind)), None)
        if base is None:
            raise TypeError(
                f"cannot hash a {_type_name(value)} value ({repr(value)[:60]}): a content hash takes None, "
                "bool, int, float, str, bytes, list, tuple, dict, numpy scalars and arrays, datetime, date, "
                "time, timedelta and Decimal. Fix: convert it to one of those first (its str() would hash "
                "like that string)."
            )
        out.append(_SCALARS[base](value))


def _encode_numpy(value: Any, out: list[bytes]) -> bool:
    """Encode a numpy scalar or array; False for anything else."""
    np = sys.modules.get("numpy")  # a value can only be a numpy object if numpy is imported: never import it here
    if np is None or not isinstance(value, np.ndarray | np.generic):
        return False
    array = np.asarray(value)
    if array.dtype.fields is not None:
        raise TypeError(f"cannot hash a structured numpy array (dtype {array.dtype}). Fix: hash its fields one by one.")
    tag = b"n" if isinstance(value, np.generic) else b"a"
    out.append(_count(tag, array.ndim))
    out.extend(_U64(n) for n in array.shape)
    if array.dtype.hasobject:
        out.append(b"O")
        for item in array.ravel(order="C"):
            _encode(item, out)
        return True
    # Little-endian, C order: the same array hashes the same on every machine and in any memory layout.
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    out.append(_sized(b"s", array.dtype.str.encode("ascii")))
    out.append(_sized(b"b", array.tobytes()))
    return True


def _column_kind(kind: Any) -> bytes:
    """The tag of an Arrow type's column encoding (see `Hasher.update_column`)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return b"s"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return b"b"
    if pa.types.is_integer(kind) and kind != pa.uint64():  # every other width fits int64
        return b"i"
    if pa.types.is_floating(kind):
        return b"f"
    if pa.types.is_boolean(kind):
        return b"T"
    if pa.types.is_null(kind):
        return b"N"
    return b"O"


def _variable(chunk: Any, sizes: Any, data: Any) -> None:
    """Text or bytes: each value's size, then the values' bytes back to back (nulls are empty)."""
    import numpy as np
    import pyarrow as pa

    if chunk.null_count:
        chunk = chunk.fill_null(b"" if pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type) else "")
    offsets = chunk.buffers()[1]
    large = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
    width = np.int64 if large else np.int32
    ends = np.frombuffer(offsets, dtype=width, count=len(chunk) + 1, offset=chunk.offset * np.dtype(width).itemsize)
    sizes.update(np.diff(ends).astype("<i8").tobytes())
    if ends[-1] > ends[0]:
        data.update(memoryview(chunk.buffers()[2])[int(ends[0]) : int(ends[-1])])


def _fixed(dtype: str, fill: Any) -> Callable[[Any, Any, Any], None]:
    """Numbers and bools: little-endian values of `dtype` (nulls as `fill`; every NaN one value)."""

    def encode(chunk: Any, sizes: Any, data: Any) -> None:
        import numpy as np

        values = np.asarray(chunk.fill_null(fill).to_numpy(zero_copy_only=False)).astype(dtype)
        if values.dtype.kind == "f":
            values[np.isnan(values)] = np.nan
        data.update(values.tobytes())

    return encode


def _values(chunk: Any, sizes: Any, data: Any) -> None:
    out: list[bytes] = []
    for value in chunk.to_pylist():
        _encode(value, out)
    data.update(b"".join(out))


_COLUMN_ENCODERS: dict[bytes, Callable[[Any, Any, Any], None]] = {
    b"s": _variable,
    b"b": _variable,
    b"i": _fixed("<i8", 0),
    b"f": _fixed("<f8", 0.0),
    b"T": _fixed("u1", False),
    b"N": lambda chunk, sizes, data: None,
    b"O": _values,
}


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept, NaN refused: one text per value.

    JSON keeps types apart ("1" vs 1 vs 1.0 vs true vs null), so equal text means equal
    typed values.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(request: ExtractionRequest) -> str:
    """The store key of `request`: stable across processes, paths and machines.

    The schema version is hashed with it, so a layout change never reuses old stores.
    """
    return Hasher().update_json({"schema_version": SCHEMA_VERSION, "request": request.to_dict()}).hexdigest(KEY_LENGTH)


def is_key(text: str) -> bool:
    """True when `text` has the shape of a cache key (lowercase hex of `KEY_LENGTH`)."""
    return len(text) == KEY_LENGTH and all(c in "0123456789abcdef" for c in text)
