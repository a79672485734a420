"""A store's geometry: sizes, chunking and the shard plan, fixed before any shard runs.

Shards are contiguous example ranges; each shard's tokens start on a chunk boundary of the
*physical* token axis (a shard owns whole chunks, the tail of its last one unused), so no two
shards write one chunk. The logical token axis actcache's reader shows has no gaps: logical
token t of shard s is physical `phys_start + (t - tok_start)`. Example-axis arrays are chunked
by `example_chunk`, and shards start on multiples of it. `pipeline.plan` makes the plan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

__all__ = ["Axis", "Geometry", "ShardRange"]

Axis = Literal["token", "example", "edge", "shard"]


@dataclass(frozen=True)
class ShardRange:
    """Examples [ex_start, ex_stop), logical tokens [tok_start, tok_stop), physical start."""

    index: int
    ex_start: int
    ex_stop: int
    tok_start: int
    tok_stop: int
    phys_start: int

    @property
    def n_examples(self) -> int:
        return self.ex_stop - self.ex_start

    @property
    def n_tokens(self) -> int:
        return self.tok_stop - self.tok_start

    def phys_stop(self, token_chunk: int) -> int:
        """End of the physical span: the shard's tokens rounded up to whole chunks."""
        return self.phys_start + math.ceil(self.n_tokens / token_chunk) * token_chunk

    def axis_range(self, axis: Axis, geometry: Geometry) -> tuple[int, int]:
        """The [start, stop) this shard owns on an array's split axis."""
        if axis == "token":
            return self.phys_start, self.phys_stop(geometry.token_chunk)
        if axis == "shard":
            return self.index, self.index + 1
        last = self.ex_stop == geometry.n_examples
        return self.ex_start, self.ex_stop + (1 if axis == "edge" and last else 0)

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Geometry:
    """Sizes, chunking and shard plan, derived once from the tokenized lengths."""

    n_examples: int
    n_tokens: int
    token_chunk: int
    example_chunk: int
    shards: tuple[ShardRange, ...]

    @property
    def n_tokens_physical(self) -> int:
        return self.shards[-1].phys_stop(self.token_chunk) if self.shards else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_examples": self.n_examples,
            "n_tokens": self.n_tokens,
            "token_chunk": self.token_chunk,
            "example_chunk": self.example_chunk,
            "shards": [s.to_dict() for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Geometry:
        return cls(
            n_examples=data["n_examples"],
            n_tokens=data["n_tokens"],
            token_chunk=data["token_chunk"],
            example_chunk=data["example_chunk"],
            shards=tuple(ShardRange(**s) for s in data["shards"]),
        )
