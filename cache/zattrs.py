"""What Zarr clients see of a store: array codecs, fills and attributes, root attributes, consolidated metadata.

Every array ends its codec chain in `crc32c`, so zarr-python, tensorstore and actcache
all reject a corrupt chunk. Compressors are chosen per kind of array, by measurement on
a MiniLM store of 3,360 texts (74,728 tokens, 4 shards; bytes stored / raw, chunk read):

    array                 none    Blosc lz4+shuffle   Blosc zstd-1+shuffle
    hidden states fp16    2.14*   1.91 (4.7-6.9 GB/s)  1.82 (1.1-1.6 GB/s)   * B/value, with the gaps
    pooled fp16           1.07    0.95                 0.87
    token_ids int32       1.00    0.40                 0.29
    special_mask int8     1.00    0.19                 0.11
    token_start int64     1.07    0.21                 0.17

Floats get lz4: uncompressed hidden states would read no faster through actcache (its
reader decodes lz4 into place on every core) while the unused rows at the end of each
shard's last chunk (NaN, ~6% at the default chunking) would cost their full size; zstd
saves 5% more and reads 3-4x slower. Integers get zstd-1: a third smaller than lz4 at
the same read time, on arrays too small for speed to matter. Text gets the checksum alone.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from schemas.manifest import Manifest
from schemas.store import (
    CHUNK_KEY_ENCODING,
    FORMAT_NAME,
    HOW_TO_READ,
    LAYER,
    MANIFEST_ATTR,
    ROOT_ATTR,
    SCHEMA_VERSION,
    SHARD_EXAMPLE_START,
    SHARD_EXAMPLE_STOP,
    ZARR_JSON,
    metadata_name,
)

__all__ = [
    "EVERY_CHUNK",
    "ExampleColumns",
    "compressors",
    "consolidate",
    "create_arrays",
    "metadata_columns",
    "root_attributes",
    "set_complete",
    "store_version",
    "zarr_group",
]


# Example metadata as given to a new store: a pyarrow Table (the pipeline's), or column -> values.
ExampleColumns = Any


def compressors(dtype: str) -> list[Any]:
    """The codecs after `bytes` for an array of logical `dtype` (see the table above)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    if dtype == "bfloat16" or np.dtype(dtype).kind == "f":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    if np.dtype(dtype).kind in "iub":
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()]
    return [Crc32cCodec()]


# Every chunk is written, even one that holds only the fill (a label column of -1s, text all missing,
# a shard's padding): a reader takes an absent chunk file for a lost one, so deletions are detectable.
EVERY_CHUNK = {"write_empty_chunks": True}

# Decoding a text chunk makes a Python string per value on the way (~100 B each): a reader's peak
# memory for the examples table is one chunk of these, so they are kept short.
TEXT_CHUNK = 65_536


def _static(group: Any, name: str, values: np.ndarray, dims: tuple[str, ...], description: str) -> None:
    """A small array written whole at creation (a coordinate, the shard table, a numeric metadata column)."""
    array = _static_array(group, name, values.shape, values.dtype, dims, description)
    if values.size:
        array[...] = values


def _static_array(
    group: Any, name: str, shape: tuple[int, ...], dtype: Any, dims: tuple[str, ...], description: str
) -> Any:
    text = np.dtype(dtype).kind in "OUST"
    return group.create_array(
        name,
        shape=shape,
        chunks=(max(1, min(shape[0], TEXT_CHUNK)),) if text else "auto",
        dtype=str if text else dtype,
        compressors=compressors("str" if text else np.dtype(dtype).name),
        fill_value="" if text else (-1 if np.dtype(dtype).kind in "iu" else np.nan),
        dimension_names=dims,
        attributes={"description": description},
        config=EVERY_CHUNK,
    )


def _metadata(group: Any, name: str, column: str, values: Any) -> None:
    """An example metadata column: numbers where every value is one, else text (None -> ''), written a
    text chunk at a time so an Arrow column of millions of rows is never as many Python strings at once."""
    description = f"example metadata column {column!r}, one value per example"
    numbers = _numbers(values)
    if numbers is not None:
        _static(group, name, numbers, ("example",), description)
        return
    n = len(values)
    array = _static_array(group, name, (n,), object, ("example",), description)
    for start in range(0, n, TEXT_CHUNK):
        array[start : start + TEXT_CHUNK] = _texts(values[start : start + TEXT_CHUNK])


def _numbers(values: Any) -> np.ndarray | None:
    """`values` (an Arrow column or a sequence) as numbers, or None if one is not a number (a bool, a null, text)."""
    if _is_arrow(values):
        import pyarrow as pa

        kind = values.type
        if (pa.types.is_integer(kind) or pa.types.is_floating(kind)) and not values.null_count:
            return np.asarray(values.to_numpy())
        return None
    values = list(values)
    if values and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
        return np.asarray(values)
    return None


def _texts(values: Any) -> np.ndarray:
    """A slice of a text metadata column as strings: None -> '', anything else its str()."""
    if _is_arrow(values):
        import pyarrow as pa

        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            return np.asarray(values.fill_null("").to_numpy(zero_copy_only=False), dtype=object)
        values = values.to_pylist()
    return np.asarray(["" if v is None else str(v) for v in values], dtype=object)


def _is_arrow(values: Any) -> bool:
    return type(values).__module__.startswith("pyarrow")


def metadata_columns(columns: Sequence[str]) -> dict[str, str]:
    """Example metadata column -> the array that holds it."""
    return {column: metadata_name(column) for column in columns}


def create_arrays(group: Any, manifest: Manifest, examples: ExampleColumns | None) -> None:
    """Create every array of `manifest` (empty, with codecs, fill and attributes), the coordinates,
    the shard table and the example metadata, then the root's attributes (incomplete)."""
    geometry = manifest.geometry
    names = [] if examples is None else examples.column_names if _is_arrow(examples) else list(examples)
    columns = metadata_columns(names)
    for column, name in columns.items():
        _metadata(group, name, column, examples[column])  # type: ignore[index]  # columns come from examples
    for spec in manifest.arrays:
        attrs = spec.attributes()
        if "example" in spec.dims and columns:
            attrs["coordinates"] = " ".join(columns.values())  # xarray shows the metadata as coordinates
        group.create_array(
            spec.name,
            shape=spec.shape(geometry),
            chunks=tuple(max(1, c) for c in spec.chunks(geometry)),
            dtype=spec.physical_dtype,
            compressors=compressors(spec.dtype),
            fill_value=spec.fill_value,
            dimension_names=spec.dims,
            chunk_key_encoding=dict(CHUNK_KEY_ENCODING),
            attributes=attrs,
            config=EVERY_CHUNK,
        )
    layer = np.asarray(manifest.layers, dtype=np.int32)
    _static(group, LAYER, layer, ("layer",), "the model's hidden-state index of each stored layer (0 = embeddings)")
    starts = np.asarray([s.ex_start for s in geometry.shards], dtype=np.int64)
    stops = np.asarray([s.ex_stop for s in geometry.shards], dtype=np.int64)
    _static(group, SHARD_EXAMPLE_START, starts, ("shard",), "first example of each shard")
    _static(group, SHARD_EXAMPLE_STOP, stops, ("shard",), "end (exclusive) of each shard's examples")
    group.attrs[ROOT_ATTR] = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "key": manifest.key,
        "complete": False,
        "how_to_read": HOW_TO_READ,
        "stacks": list(manifest.stacks),
        "n_states": manifest.n_states,
        "metadata_columns": columns,
    }


def set_complete(path: Path, complete: bool) -> None:
    """Say in the root's attributes whether every shard is committed.

    The root is opened with its consolidated metadata, which zarr writes back with the new
    attributes in the same (atomic) write of zarr.json: readers never see the store unconsolidated.
    """
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs[ROOT_ATTR] = {**root_attributes(group), "complete": complete}


def zarr_group(path: Path, mode: str = "r") -> Any:
    """The store's root group as it is on disk now (not its consolidated copy)."""
    import zarr

    return zarr.open_group(str(path), mode=mode, use_consolidated=False)  # type: ignore[arg-type]


def store_version(path: Path) -> int | None:
    """The schema version of the actcache store at `path`, from its signature; None if it is not one.

    The signature is the root group's `actcache` attribute naming actcache's format and a
    version (format 2 on), or the creation manifest format 1 kept there. Read from zarr.json
    as JSON: no zarr import, and nothing else in the directory is trusted.
    """
    try:
        meta = json.loads((path / ZARR_JSON).read_bytes())
    except (OSError, ValueError):  # absent, unreadable, not JSON, not UTF-8
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if not isinstance(attrs, dict):
        return None
    ours, legacy = attrs.get(ROOT_ATTR), attrs.get(MANIFEST_ATTR)
    if isinstance(ours, dict) and ours.get("format") == FORMAT_NAME:
        version = ours.get("schema_version")
    elif isinstance(legacy, dict) and legacy.get("schema_version") == 1 and isinstance(legacy.get("key"), str):
        version = 1
    else:
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def root_attributes(group: Any) -> dict[str, Any]:
    """The root's `actcache` attribute (format, schema_version, complete, metadata_columns, ...); {} if absent."""
    value: Any = group.attrs.get(ROOT_ATTR)
    return dict(value) if isinstance(value, dict) else {}


def consolidate(path: Path) -> None:
    """Consolidate the metadata, so a client opens the store with one read (once, at creation)."""
    import zarr

    with warnings.catch_warnings():
        # "not part of the Zarr format 3 specification" yet, though zarr and xarray read it; and the walk
        # meets manifest.json and shards/, actcache's own files, which are no Zarr nodes.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        warnings.filterwarnings("ignore", message="Object at .* is not recognized", category=UserWarning)
        zarr.consolidate_metadata(str(path))  # a str: zarr opens a URL through fsspec
