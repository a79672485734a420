"""Content addresses: a cache key is a hash of the canonical JSON of an `ExtractionRequest`."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from schemas.request import ExtractionRequest
from schemas.store import SCHEMA_VERSION

__all__ = ["KEY_LENGTH", "cache_key", "canonical_json", "is_key"]

KEY_LENGTH = 32  # hex characters: 128 bits


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
    payload = canonical_json({"schema_version": SCHEMA_VERSION, "request": request.to_dict()})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def is_key(text: str) -> bool:
    """True when `text` has the shape of a cache key (lowercase hex of `KEY_LENGTH`)."""
    return len(text) == KEY_LENGTH and all(c in "0123456789abcdef" for c in text)
