"""The store layout, spelled once: file and array names, dimensions, geometry, manifest.

A cache root holds::

    <root>/stores/<key>.zarr/              one Zarr v3 group per cache key, metadata consolidated
        zarr.json                          the group; attribute `actcache`: format, schema version,
                                           completeness and how to index the store
        manifest.json                      `Manifest` (written atomically; `complete` once all shards are)
        shards/<index>.json                a shard's commit marker: its ranges and chunk checksums
        shards/<index>.claim               a shard's claim (flock-ed while a process writes it)
        token_start, token_stop            (example,) int64: example i's rows in every token-level
                                           array are token_start[i]:token_stop[i]
        offsets                            (example_edge,) int64: the same on the gap-free axis actcache shows
        layer                              (layer,) int32: the model's hidden-state index of each stored layer
        <metadata columns>                 (example,): id, language, label, field, ... as coordinates
        shard_example_start, _stop         (shard,) int64: the example rows of each shard
        shard_committed                    (shard,) uint8: 1 once a shard's data is all written
        token_ids, special_mask            (token,): every stored token, and 1 where it is a special token
        <stack>_hidden_states              (layer, token, hidden): stack is 'encoder' or 'decoder'
        <stack>_pooled_<how>               (layer, example, hidden): how is 'mean', 'first' or 'last'
        logits_topk_values, logits_topk_ids  (token, k)
        logits_target_logprob, logits_entropy  (token,): log-prob of the observed (MLM, seq2seq)
                                           or next (causal) token; entropy of the distribution
        logits_full                        (token, vocab), only when asked for
    <root>/aliases/<model>__<data>.json    human names -> keys

Geometry: token-axis arrays are ragged and padding-free, token-major. Shards are contiguous
example ranges; each shard's tokens start on a chunk boundary of the *physical* token axis
(a shard owns whole chunks, the tail of its last one unused and filled with NaN or -1), so
no two shards write one chunk. The logical token axis actcache's reader shows has no gaps:
logical token t of shard s is physical `phys_start + (t - tok_start)`. Example-axis arrays
are chunked by `example_chunk`, and shards start on multiples of it. Every chunk ends in a
CRC32C checksum (Zarr v3's `crc32c` codec), so every Zarr client rejects a corrupt chunk.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from schemas.errors import ConfigError, SchemaVersionError, StoreCorruptError

__all__ = [
    "ALIASES_DIR",
    "BFLOAT16_NAN_BITS",
    "CHUNK_KEY_ENCODING",
    "CLAIM_SUFFIX",
    "DATASETS_DIR",
    "DIMENSIONS",
    "FORMAT_NAME",
    "HASHES_DIR",
    "HOW_TO_READ",
    "LAYER",
    "LOGITS_ENTROPY",
    "LOGITS_FULL",
    "LOGITS_TARGET_LOGPROB",
    "LOGITS_TOPK_IDS",
    "LOGITS_TOPK_VALUES",
    "MANIFEST_ATTR",
    "MANIFEST_FILE",
    "MARKER_SUFFIX",
    "OFFSETS",
    "PHYSICAL_DTYPES",
    "POOLINGS",
    "ROOT_ATTR",
    "ROOT_DIRS",
    "SCHEMA_VERSION",
    "SHARDS_DIR",
    "SHARD_COMMITTED",
    "SHARD_EXAMPLE_START",
    "SHARD_EXAMPLE_STOP",
    "SPECIAL_MASK",
    "STACKS",
    "STORES_DIR",
    "STORE_SUFFIX",
    "SUPPORTED_SCHEMA_VERSIONS",
    "TOKENIZED_DIR",
    "TOKEN_IDS",
    "TOKEN_START",
    "TOKEN_STOP",
    "ZARR_JSON",
    "ArraySpec",
    "Geometry",
    "Manifest",
    "ShardRange",
    "build_arrays",
    "chunk_key",
    "commit_array",
    "default_token_chunk",
    "hidden_name",
    "index_arrays",
    "metadata_name",
    "plan_geometry",
    "pooled_name",
]

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (2,)
FORMAT_NAME = "actcache-activations"
ROOT_ATTR = "actcache"  # the root group's attribute: format, schema_version, key, complete, how_to_read
HOW_TO_READ = (
    "Example i is row i of every array with dimension 'example' and rows token_start[i]:token_stop[i] of "
    "every array with dimension 'token' (rows of no example read as NaN or -1), and layer position j is the "
    "model's hidden state layer[j] (0 = embeddings). The store is complete where this attribute's 'complete' "
    "is true; otherwise only the shards s with shard_committed[s] == 1 are written, holding examples "
    "shard_example_start[s]:shard_example_stop[s] (token_start is -1 for the others)."
)

STORES_DIR = "stores"
ALIASES_DIR = "aliases"
HASHES_DIR = "hashes"  # remembered SHA-256 digests of local model files (see pipeline.models.hub.content_hash)
TOKENIZED_DIR = "tokenized"  # tokenized datasets, by content hash
DATASETS_DIR = "datasets"  # Hugging Face datasets' Arrow copies of local data files (its cache_dir for them)
ROOT_DIRS = (STORES_DIR, ALIASES_DIR, HASHES_DIR, TOKENIZED_DIR, DATASETS_DIR)  # everything actcache puts in a root
STORE_SUFFIX = ".zarr"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
MARKER_SUFFIX = ".json"
CLAIM_SUFFIX = ".claim"
ZARR_JSON = "zarr.json"  # a Zarr v3 node's metadata file; the root's attributes carry actcache's signature
MANIFEST_ATTR = "actcache_manifest"  # the creation-time manifest, kept in the group's attributes

OFFSETS = "offsets"
TOKEN_START = "token_start"
TOKEN_STOP = "token_stop"
TOKEN_IDS = "token_ids"
SPECIAL_MASK = "special_mask"
LOGITS_TOPK_VALUES = "logits_topk_values"
LOGITS_TOPK_IDS = "logits_topk_ids"
LOGITS_TARGET_LOGPROB = "logits_target_logprob"
LOGITS_ENTROPY = "logits_entropy"
LOGITS_FULL = "logits_full"
SHARD_COMMITTED = "shard_committed"
# Written once, at creation: coordinates and the shard table (not part of any shard).
LAYER = "layer"
SHARD_EXAMPLE_START = "shard_example_start"
SHARD_EXAMPLE_STOP = "shard_example_stop"
DIMENSIONS = ("layer", "token", "example", "example_edge", "hidden", "k", "vocab", "shard")

STACKS = ("encoder", "decoder")
POOLINGS = ("mean", "first", "last")

# numpy has no bfloat16: it is stored as its raw 16 bits and widened to float32 on read.
PHYSICAL_DTYPES = {"bfloat16": "uint16"}
BFLOAT16_NAN_BITS = 0x7FC0


def _describe(name: str) -> str:
    """What array `name` holds, in a sentence for someone who never installs actcache."""
    fixed = {
        OFFSETS: "example i is rows offsets[i]:offsets[i+1] of the token axis with the gaps between shards removed",
        TOKEN_START: "first row of example i in every array with dimension 'token'",
        TOKEN_STOP: "end (exclusive) of example i's rows in every array with dimension 'token'",
        TOKEN_IDS: "the tokenizer's id of every stored token (no padding); -1 in rows that hold no token",
        SPECIAL_MASK: "1 where the token is a special token ([CLS], </s>, ...), else 0; -1 in rows that hold no token",
        LOGITS_TOPK_VALUES: "the k largest raw logits at each token, largest first",
        LOGITS_TOPK_IDS: "the vocabulary ids of logits_topk_values",
        LOGITS_TARGET_LOGPROB: "log-probability of the observed token (masked LM, seq2seq) or of the next token "
        "(causal LM; NaN on an example's last token)",
        LOGITS_ENTROPY: "entropy (nats) of the predicted distribution at each token",
        LOGITS_FULL: "every logit at each token",
        SHARD_COMMITTED: "1 once shard s's data is all written; 0 while it is missing",
    }
    if name in fixed:
        return fixed[name]
    stack, _, rest = name.partition("_")
    if rest == "hidden_states":
        return f"{stack} hidden states of every stored token (layer, token, hidden); NaN in rows that hold no token"
    if rest.startswith("pooled_"):
        how = rest.removeprefix("pooled_")
        what = {"mean": "mean over all real tokens, special ones included", "first": "the first token's state",
                "last": "the last real token's state"}.get(how, how)  # fmt: skip
        return f"{stack} hidden states pooled per example (layer, example, hidden): {what}"
    return name


Axis = Literal["token", "example", "edge", "shard"]


def hidden_name(stack: str) -> str:
    """Array name of a stack's token-level hidden states."""
    return f"{stack}_hidden_states"


def pooled_name(stack: str, how: str) -> str:
    """Array name of a stack's pooled hidden states."""
    return f"{stack}_pooled_{how}"


def metadata_name(column: str) -> str:
    """Array name of an example metadata column: the column's own name, unless a store name has it."""
    taken = {*DIMENSIONS, OFFSETS, TOKEN_START, TOKEN_STOP, TOKEN_IDS, SPECIAL_MASK, SHARD_COMMITTED}
    taken |= {SHARD_EXAMPLE_START, SHARD_EXAMPLE_STOP}
    reserved = column in taken or column.startswith(("encoder_", "decoder_", "logits_", "example_"))
    return f"example_{column}" if reserved or not column else column


def chunk_key(coords: Sequence[int]) -> str:
    """Where a chunk lives inside its array's directory (Zarr v3 'default' encoding, '/' separator)."""
    return "c/" + "/".join(str(int(c)) for c in coords)


CHUNK_KEY_ENCODING = {"name": "default", "separator": "/"}


def default_token_chunk(hidden: int, itemsize: int, target_bytes: int = 2 << 20) -> int:
    """Tokens per chunk so that one layer's chunk is about `target_bytes` (a power of two, 256..65536)."""
    tokens = max(1, target_bytes // max(1, hidden * itemsize))
    return int(min(65536, max(256, 2 ** round(math.log2(tokens)))))


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
        return PHYSICAL_DTYPES.get(self.dtype, self.dtype)

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
        attrs: dict[str, Any] = {"description": _describe(self.name), "actcache_dtype": self.dtype}
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


def plan_geometry(lengths: Sequence[int], *, shard_tokens: int, token_chunk: int, example_chunk: int) -> Geometry:
    """Split examples into shards of about `shard_tokens` tokens, in blocks of `example_chunk`.

    A shard closes once it holds `shard_tokens` tokens or more; it always ends on a
    multiple of `example_chunk` (or at the last example), and its tokens start on a
    multiple of `token_chunk` of the physical axis.
    """
    for name, value in (
        ("shard_tokens", shard_tokens),
        ("token_chunk", token_chunk),
        ("example_chunk", example_chunk),
    ):
        if int(value) < 1:
            raise ConfigError(f"{name} must be a positive number of tokens/examples, got {value!r}")
    if any(n < 0 for n in lengths):
        raise ConfigError("token lengths cannot be negative")
    shards: list[ShardRange] = []
    ex_start = tok_start = phys_start = 0
    tokens = 0
    n = len(lengths)
    for block_start in range(0, n, example_chunk):
        block_stop = min(n, block_start + example_chunk)
        tokens += sum(lengths[block_start:block_stop])
        if tokens >= shard_tokens or block_stop == n:
            shard = ShardRange(len(shards), ex_start, block_stop, tok_start, tok_start + tokens, phys_start)
            shards.append(shard)
            ex_start, tok_start, phys_start = block_stop, shard.tok_stop, shard.phys_stop(token_chunk)
            tokens = 0
    return Geometry(n, tok_start, int(token_chunk), int(example_chunk), tuple(shards))


@dataclass(frozen=True)
class Manifest:
    """What a store holds and how far it got; `manifest.json` of a store.

    `layers` are the stored hidden-state indices (0 = embeddings) of a model with
    `n_states` hidden states; `stacks` the stored stacks ('encoder', 'decoder');
    `request` the keyed inputs (canonical dict), `provenance` what is recorded but not
    keyed (batch size, device, versions, host, times), `stats` counts filled in by the
    writer (truncated examples, non-finite values, ...).
    """

    key: str
    request: Mapping[str, Any]
    geometry: Geometry
    arrays: tuple[ArraySpec, ...]
    layers: tuple[int, ...]
    n_states: int
    stacks: tuple[str, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    complete: bool = False
    created_at: str = ""
    completed_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    def array(self, name: str) -> ArraySpec:
        for spec in self.arrays:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def has_array(self, name: str) -> bool:
        return any(spec.name == name for spec in self.arrays)

    def with_(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "key": self.key,
            "complete": self.complete,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "aliases": list(self.aliases),
            "layers": list(self.layers),
            "n_states": self.n_states,
            "stacks": list(self.stacks),
            "request": dict(self.request),
            "provenance": dict(self.provenance),
            "stats": dict(self.stats),
            "geometry": self.geometry.to_dict(),
            "arrays": [a.to_dict() for a in self.arrays],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            if isinstance(version, int) and version < SCHEMA_VERSION:
                fix = (
                    f"it is of an older format, which this actcache no longer reads: remove such stores with "
                    f"`actcache gc --format {version}` (or this one with `actcache rm KEY`) and extract again"
                )
            else:
                fix = "upgrade actcache to read it, or remove the store (actcache rm KEY) and extract again"
            raise SchemaVersionError(
                f"store written with schema version {version!r}; this actcache reads versions "
                f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}. Fix: {fix}."
            )
        try:
            return cls(
                key=data["key"],
                request=data["request"],
                geometry=Geometry.from_dict(data["geometry"]),
                arrays=tuple(ArraySpec.from_dict(a) for a in data["arrays"]),
                layers=tuple(data["layers"]),
                n_states=data["n_states"],
                stacks=tuple(data["stacks"]),
                provenance=data.get("provenance", {}),
                stats=data.get("stats", {}),
                aliases=tuple(data.get("aliases", ())),
                complete=bool(data["complete"]),
                created_at=data.get("created_at", ""),
                completed_at=data.get("completed_at"),
                schema_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorruptError(
                f"manifest is missing or mangling a field ({exc!r}). Fix: run `actcache verify` "
                "on the store, or remove it and extract again."
            ) from None


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
