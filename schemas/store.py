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

Token-axis arrays are ragged and padding-free, token-major; the unused tail of a shard's
last chunk reads NaN or -1 (`schemas.geometry` says how shards own whole chunks). Every chunk
ends in a CRC32C checksum (Zarr v3's `crc32c` codec), so every Zarr client rejects a corrupt
chunk. The arrays themselves are `schemas.arrays`; the manifest is `schemas.manifest`.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    "INCOMPLETE_SUFFIX",
    "LAYER",
    "LOGITS_ENTROPY",
    "LOGITS_FULL",
    "LOGITS_TARGET_LOGPROB",
    "LOGITS_TOPK_IDS",
    "LOGITS_TOPK_VALUES",
    "MANIFEST_ATTR",
    "MANIFEST_FILE",
    "MARKER_SUFFIX",
    "METRICS_DIR",
    "OFFSETS",
    "PHYSICAL_DTYPES",
    "POOLINGS",
    "POOLING_BY_STACK",
    "ROOT_ATTR",
    "ROOT_DIRS",
    "SCHEMA_VERSION",
    "SHARDS_DIR",
    "SHARD_COMMITTED",
    "SHARD_EXAMPLE_START",
    "SHARD_EXAMPLE_STOP",
    "SPECIAL_MASK",
    "STACKS",
    "STACKS_BY_ARCH",
    "STORES_DIR",
    "STORE_SUFFIX",
    "SUPPORTED_SCHEMA_VERSIONS",
    "TOKENIZED_DIR",
    "TOKEN_IDS",
    "TOKEN_START",
    "TOKEN_STOP",
    "WRITERS_SUFFIX",
    "ZARR_JSON",
    "chunk_key",
    "describe_array",
    "hidden_name",
    "metadata_name",
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
METRICS_DIR = "metrics"  # results of metrics jobs, by the stores' keys and the metric's parameters
DATASETS_DIR = "datasets"  # Hugging Face datasets' Arrow copies of local data files (its cache_dir for them)
ROOT_DIRS = (
    STORES_DIR,
    ALIASES_DIR,
    HASHES_DIR,
    TOKENIZED_DIR,
    DATASETS_DIR,
    METRICS_DIR,
)  # everything actcache puts in a root
STORE_SUFFIX = ".zarr"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
MARKER_SUFFIX = ".json"
CLAIM_SUFFIX = ".claim"
WRITERS_SUFFIX = ".writers"  # `<key>.zarr.writers`: the writer lease, flock-ed shared by writers (see cache.lease)
INCOMPLETE_SUFFIX = ".incomplete"  # `<key>.zarr.<hex>.incomplete`: a store being created, renamed when whole
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
# The stacks stored per model family; mT5's decoder lines up with its input tokens ("shifted" policy).
STACKS_BY_ARCH = {"encoder_only": ("encoder",), "decoder_only": ("decoder",), "seq2seq": ("encoder", "decoder")}
POOLINGS = ("mean", "first", "last")
# Mean over every real position, special tokens included (as sentence-transformers pools), plus the
# position that summarises a sequence in each kind of stack. `OutputSpec.pooling` picks among these.
POOLING_BY_STACK = {"encoder": ("mean", "first"), "decoder": ("mean", "last")}

# numpy has no bfloat16: it is stored as its raw 16 bits and widened to float32 on read.
PHYSICAL_DTYPES = {"bfloat16": "uint16"}
BFLOAT16_NAN_BITS = 0x7FC0


def describe_array(name: str) -> str:
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
