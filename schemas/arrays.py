"""The arrays of a store: `ArraySpec` (dims, split axis, dtype, fill, description) and which a request stores."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from schemas.errors import ConfigError
from schemas.geometry import Axis, Geometry, ShardRange
from schemas.store import (
    BFLOAT16_NAN_BITS,
    LOGITS_ENTROPY,
    LOGITS_FULL,
    LOGITS_TARGET_LOGPROB,
    LOGITS_TOPK_IDS,
    LOGITS_TOPK_VALUES,
    OFFSETS,
    PHYSICAL_DTYPES,
    POOLINGS,
    SHARD_COMMITTED,
    SPECIAL_MASK,
    STACKS,
    TOKEN_IDS,
    TOKEN_START,
    TOKEN_STOP,
    chunk_key,
    describe_array,
    hidden_name,
    pooled_name,
)

__all__ = ["ArraySpec", "build_arrays", "commit_array", "index_arrays", "physical_dtype", "store_itemsize"]


def physical_dtype(dtype: str) -> str:
    """The numpy dtype the store keeps values of logical dtype `dtype` in (bfloat16: its raw bits, uint16)."""
    return PHYSICAL_DTYPES.get(dtype, dtype)


def store_itemsize(dtype: str) -> int:
    """Bytes a value of logical dtype `dtype` takes in the store before compression (bfloat16: its raw 2)."""
    return int(np.dtype(physical_dtype(dtype)).itemsize)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: `dims` names every axis; `axis` is the one shards split.

    'token' arrays are ragged over tokens, 'example' arrays have one row per example,
    'edge' arrays have n_examples + 1 rows (offsets). `leading` and `trailing` are the
    sizes of the dims before and after that axis; `dtype` is the logical dtype.
    """

    name: str
    axis: Axis
    dims: tuple[str, ...]
    leading: tuple[int, ...]
    trailing: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "leading", tuple(self.leading))
        object.__setattr__(self, "trailing", tuple(self.trailing))
        if len(self.dims) != len(self.leading) + 1 + len(self.trailing):
            raise ConfigError(f"array {self.name!r}: {len(self.dims)} dims for its shape")

    @property
    def physical_dtype(self) -> str:
        return physical_dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes one step of the split axis holds (a token's, an example's), as stored."""
        return math.prod(self.leading) * math.prod(self.trailing) * store_itemsize(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))

    @property
    def fill_value(self) -> float | int:
        """What rows no shard wrote read as: NaN for floats (bfloat16's NaN bit pattern), -1 for ids, 0 for flags."""
        if self.dtype == "bfloat16":
            return BFLOAT16_NAN_BITS
        if self.is_float:
            return float("nan")
        return 0 if self.dtype.startswith("uint") else -1

    def attributes(self) -> dict[str, Any]:
        """The array's own description, stored with it (what it holds, and how to decode it)."""
        attrs: dict[str, Any] = {"description": describe_array(self.name), "actcache_dtype": self.dtype}
        if self.dtype == "bfloat16":
            attrs["encoding"] = (
                "bfloat16 values stored as their uint16 bit patterns; NaN fill. Decode: "
                "(x.astype('uint32') << 16).view('float32')"
            )
        return attrs

    def axis_length(self, geometry: Geometry) -> int:
        return {
            "token": geometry.n_tokens_physical,
            "example": geometry.n_examples,
            "edge": geometry.n_examples + 1,
            "shard": len(geometry.shards),
        }[self.axis]

    def axis_chunk(self, geometry: Geometry) -> int:
        return {"token": geometry.token_chunk, "shard": 1}.get(self.axis, geometry.example_chunk)

    def shape(self, geometry: Geometry) -> tuple[int, ...]:
        return (*self.leading, self.axis_length(geometry), *self.trailing)

    def chunks(self, geometry: Geometry) -> tuple[int, ...]:
        return (*(1 for _ in self.leading), self.axis_chunk(geometry), *self.trailing)

    def shard_chunks(self, shard: ShardRange, geometry: Geometry) -> list[str]:
        """Keys of every chunk of this array that `shard` writes, and no other shard does."""
        start, stop = shard.axis_range(self.axis, geometry)
        if stop <= start:
            return []
        step = self.axis_chunk(geometry)
        along = range(start // step, math.ceil(stop / step))
        tail = (0,) * len(self.trailing)  # trailing dims are never split
        return [
            chunk_key((*lead, c, *tail)) for lead in itertools.product(*(range(n) for n in self.leading)) for c in along
        ]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArraySpec:
        return cls(**data)


def index_arrays() -> tuple[ArraySpec, ...]:
    """The row maps every store has: `offsets` (gap-free axis) and `token_start`/`token_stop` (stored rows)."""
    return (
        ArraySpec(OFFSETS, "edge", ("example_edge",), (), (), "int64"),
        ArraySpec(TOKEN_START, "example", ("example",), (), (), "int64"),
        ArraySpec(TOKEN_STOP, "example", ("example",), (), (), "int64"),
    )


def commit_array() -> ArraySpec:
    """`shard_committed`: a shard's own one-element chunk, written after all its data (so last in a store)."""
    return ArraySpec(SHARD_COMMITTED, "shard", ("shard",), (), (), "uint8")


def build_arrays(
    *,
    stacks: Mapping[str, int],
    n_layers: int,
    store_dtype: str,
    poolings: Mapping[str, Sequence[str]],
    token_level: bool = True,
    logits: str = "none",
    vocab: int | None = None,
) -> tuple[ArraySpec, ...]:
    """The arrays of a store: `stacks` maps each stored stack to its hidden size.

    `n_layers` is the number of stored layers; `logits` is a parsed logits mode
    ('none', 'topk:K', 'full'; full needs `vocab`). Offsets are added by the writer.
    """
    arrays = [
        ArraySpec(TOKEN_IDS, "token", ("token",), (), (), "int32"),
        ArraySpec(SPECIAL_MASK, "token", ("token",), (), (), "int8"),
    ]
    for stack, hidden in stacks.items():
        if stack not in STACKS:
            raise ConfigError(f"unknown stack {stack!r}; stacks are {', '.join(STACKS)}")
        if token_level:
            arrays.append(
                ArraySpec(
                    hidden_name(stack),
                    "token",
                    ("layer", "token", "hidden"),
                    (n_layers,),
                    (hidden,),
                    store_dtype,
                )
            )
        for how in poolings.get(stack, ()):
            if how not in POOLINGS:
                raise ConfigError(f"unknown pooling {how!r}; use {', '.join(POOLINGS)}")
            arrays.append(
                ArraySpec(
                    pooled_name(stack, how),
                    "example",
                    ("layer", "example", "hidden"),
                    (n_layers,),
                    (hidden,),
                    store_dtype,
                )
            )
    if logits.startswith("topk:"):
        k = int(logits.split(":")[1])
        arrays += [
            ArraySpec(LOGITS_TOPK_VALUES, "token", ("token", "k"), (), (k,), "float32"),
            ArraySpec(LOGITS_TOPK_IDS, "token", ("token", "k"), (), (k,), "int32"),
        ]
    if logits != "none":
        arrays += [
            ArraySpec(LOGITS_TARGET_LOGPROB, "token", ("token",), (), (), "float32"),
            ArraySpec(LOGITS_ENTROPY, "token", ("token",), (), (), "float32"),
        ]
    if logits == "full":
        if not vocab:
            raise ConfigError("full logits need the vocabulary size")
        arrays.append(ArraySpec(LOGITS_FULL, "token", ("token", "vocab"), (), (vocab,), store_dtype))
    return tuple(arrays)
