"""The dataset registry and loading: a name or a file -> rows -> examples (one text, or a pair, each).

Registered: ``xnli`` (the Hub's facebook/xnli, all 15 languages of a split, test by
default) and ``sample`` (an XNLI-shaped sample in 15 languages and 7 scripts that ships
inside the package, so the default job runs offline). Anything else: a local file
(.jsonl, .json, .csv, .parquet) or a Hub dataset id with --config/--split/--text-column.

Premise and hypothesis are separate examples by default: the metrics this cache feeds
(cross-lingual similarity, probes) compare sentence representations, and a pair would
mix two sentences in every token's context. ``--pair`` stores them as one example.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cache.keys import Hasher
from pipeline.dataset_tables import FILE_BUILDERS, load_tables
from schemas import ConfigError
from schemas.dataset import DatasetSpec
from schemas.errors import DatasetNotAvailableError

__all__ = [
    "DATASETS",
    "XNLI_LANGUAGES",
    "DatasetNotAvailableError",  # defined in schemas.errors; importable from here as before
    "Examples",
    "load_examples",
    "resolve_dataset",
]

XNLI_LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
SAMPLE_FILE = Path(__file__).with_name("data") / "xnli_sample.jsonl"

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        "xnli": DatasetSpec(
            name="xnli",
            source="hub",
            path="facebook/xnli",
            split="test",
            configs=XNLI_LANGUAGES,
            text_columns=("premise", "hypothesis"),
            description="XNLI, 15 languages x 5,010 test pairs; `language` column from the config",
        ),
        "sample": DatasetSpec(
            name="sample",
            source="package",
            path=str(SAMPLE_FILE),
            split="test",
            text_columns=("premise", "hypothesis"),
            description="210 XNLI-shaped pairs in XNLI's 15 languages, shipped with actcache",
        ),
    }
)


@dataclass(frozen=True)
class Examples:
    """Examples in dataset order, as Arrow columns: texts, metadata, and the rows' identity.

    `texts` has a ``text`` column (and ``text_pair`` with --pair), never null; `metadata` one
    row per example: the dataset's other columns, ``language`` (from the config), ``row`` (the
    row's index in its table) and ``field`` (which text column) where they apply. Both stay in
    Arrow memory: a 10-million-row dataset is never ten million Python strings.

    `content_hash` hashes the rows used, column by column from their Arrow data
    (`cache.keys.Hasher.update_column`: the same rows from a .jsonl, .csv or .parquet hash
    alike; a datetime and its ISO string, 1 and "1", differ), with the text columns and
    pairing that make examples of them: the dataset's identity in the cache key, whatever path
    or mtime the files have.
    """

    spec: DatasetSpec
    texts: Any  # pyarrow.Table
    metadata: Any  # pyarrow.Table
    content_hash: str
    revision: str | None = None

    def __len__(self) -> int:
        return int(self.texts.num_rows)

    def text(self, index: int) -> str | tuple[str, str]:
        """The text of one example (a pair with --pair)."""
        row = [self.texts.column(c)[index].as_py() for c in self.texts.column_names]
        return (row[0], row[1]) if len(row) == 2 else row[0]

    def n_empty(self) -> int:
        """Examples with no text but whitespace (with --pair: on both sides), a slice at a time: trimming
        makes a copy of the texts, which is kept to one slice's."""
        import pyarrow.compute as pc

        empty = 0
        for start in range(0, len(self), _SLICE):
            part = self.texts.slice(start, _SLICE)
            blank = [pc.equal(pc.utf8_trim_whitespace(part.column(c)), "") for c in part.column_names]
            empty += int(pc.sum(blank[0] if len(blank) == 1 else pc.and_(*blank)).as_py() or 0)
        return empty

    def identity(self) -> dict[str, Any]:
        """The keyed description of these examples."""
        s = self.spec
        return {
            "name": s.name,
            "path": s.path if s.source == "hub" else None,  # a file is identified by content only
            "revision": self.revision,
            "configs": list(s.configs) if s.configs else None,
            "split": s.split,
            "text_columns": list(s.text_columns),
            "pair": s.pair,
            "limit": s.limit,
            "content_hash": self.content_hash,
        }


def resolve_dataset(
    data: str,
    *,
    split: str | None = None,
    config: str | None = None,
    text_columns: tuple[str, ...] | None = None,
    pair: bool | None = None,
    limit: int | None = None,
) -> DatasetSpec:
    """A `DatasetSpec` for a registry name, a local file or a Hub id, with the CLI's overrides."""
    overrides: dict[str, Any] = {"split": split, "text_columns": text_columns, "pair": pair, "limit": limit}
    repeated = sorted({c for c in text_columns or () if list(text_columns or ()).count(c) > 1})
    if repeated:
        raise ConfigError(
            f"--text-column {repeated[0]!r} is given more than once, which would store every example twice. "
            "Fix: name each text column once."
        )
    if config is not None:
        overrides["configs"] = tuple(c for c in config.split(",") if c)
    if data in DATASETS:
        return DATASETS[data].with_(**overrides)
    path = Path(data).expanduser()
    if path.exists() and config is not None:
        raise ConfigError(
            f"--config {config!r} applies to Hub datasets, and {data!r} is a local file, which has none. "
            "Fix: leave --config out (or split the file by its own columns)."
        )
    if path.exists():
        if path.suffix.lower() not in FILE_BUILDERS or not path.is_file():
            raise ConfigError(f"cannot read {data!r}: local datasets are files ending in {', '.join(FILE_BUILDERS)}")
        spec = DatasetSpec(name=path.stem, source="files", path=str(path.resolve()), split="train")
        return spec.with_(**overrides)
    if "/" in data and not data.startswith((".", "/")):
        return DatasetSpec(name=data.replace("/", "-"), source="hub", path=data, split="train").with_(**overrides)
    raise DatasetNotAvailableError(
        f"unknown dataset {data!r}: not a registered name ({', '.join(sorted(DATASETS))}), not an existing "
        "file, not a Hub id (org/name). Fix: pass one of those, e.g. --data sample or --data texts.jsonl."
    )


def load_examples(spec: DatasetSpec, arrow_cache: Path | None = None) -> Examples:
    """Load `spec`'s rows (offline from the local cache when HF_DATASETS_OFFLINE is set) as examples.

    `arrow_cache` is where `datasets` keeps its Arrow copy of a local file (under actcache's
    cache root, so `actcache gc` cleans it); Hub datasets stay in the Hugging Face cache.
    Everything here is column-wise Arrow work: linear in rows, no Python object per row.
    """
    import pyarrow as pa

    tables, revision = load_tables(spec, arrow_cache)
    hasher = Hasher().update([_HASH_SCHEME, list(spec.text_columns), spec.pair])
    texts, metadata = [], []
    for language, table in tables:
        columns = table.column_names
        missing = [c for c in spec.text_columns if c not in columns]
        if missing:
            raise ConfigError(
                f"dataset {spec.name!r} has no column {missing[0]!r}; its columns are {columns}. "
                "Fix: pick text columns with --text-column."
            )
        table = _limited(table, spec.limit, "language" in columns)
        hasher.update([language, table.num_rows, sorted(columns)])
        for name in sorted(columns):
            hasher.update_column(table.column(name))
        text_table, meta_table = _examples_of(table, language, spec)
        texts.append(text_table)
        metadata.append(meta_table)
    text = pa.concat_tables(texts, promote_options="permissive")  # a config with a null text has large strings
    try:
        meta = pa.concat_tables(metadata, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ConfigError(
            f"the configs of dataset {spec.name!r} disagree on a metadata column's type ({exc}). "
            "Fix: pick one config with --config, or load configs whose columns agree."
        ) from exc
    return Examples(spec, text, meta, hasher.hexdigest(), revision)


_SLICE = 65_536  # examples per pass where a pass over the texts makes a copy

# Bumped whenever what `load_examples` hashes changes meaning, so no old hash is reused.
_HASH_SCHEME = "arrow-columns-1"


def _examples_of(table: Any, language: str | None, spec: DatasetSpec) -> tuple[Any, Any]:
    """One table's examples: (texts, metadata), one row per example.

    Without --pair each text column is its own example, row by row (row 0's first text, row
    0's second, row 1's first, ...); the row's metadata is repeated for each.
    """
    import numpy as np
    import pyarrow as pa

    rows, per_row = table.num_rows, 1 if spec.pair else len(spec.text_columns)
    strings = [_text_column(table.column(c)) for c in spec.text_columns]
    if spec.pair:
        texts = pa.table({"text": strings[0], "text_pair": strings[1]})
    elif per_row == 1:
        texts = pa.table({"text": strings[0]})
    else:
        interleaved = np.arange(rows * per_row).reshape(per_row, rows).T.ravel()
        stacked = [chunk for s in strings for chunk in s.cast(pa.large_string()).chunks]
        texts = pa.table({"text": pa.chunked_array(stacked, pa.large_string()).take(interleaved)})
    meta = table.drop_columns(list(spec.text_columns))
    if language is not None and "language" not in meta.column_names:
        meta = meta.append_column("language", pa.repeat(pa.scalar(language, pa.string()), rows))
    if "row" not in meta.column_names:
        meta = meta.append_column("row", pa.array(np.arange(rows, dtype=np.int64)))
    if per_row > 1:
        meta = meta.take(np.repeat(np.arange(rows), per_row))
    if not spec.pair:
        names = pa.array(list(spec.text_columns), pa.string())
        fields = names.take(np.tile(np.arange(per_row), rows)) if per_row > 1 else pa.repeat(names[0], rows)
        if "field" in meta.column_names:  # the example's own field wins over a column of that name
            meta = meta.drop_columns(["field"])
        meta = meta.append_column("field", fields)
    return texts, meta


def _text_column(column: Any) -> Any:
    """A text column with a missing value (null) as an empty text (counted, stored, never a crash).

    A column of strings without nulls is returned as it is: a view of the memory-mapped Arrow copy,
    not a copy in memory.
    """
    import pyarrow as pa

    if (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) and not column.null_count:
        return column
    return column.cast(pa.large_string()).fill_null("")


def _limited(table: Any, limit: int | None, per_language: bool) -> Any:
    """The first `limit` rows, of each language when rows carry one (a multilingual sample stays so)."""
    import numpy as np

    if limit is None:
        return table
    if not per_language:
        return table.slice(0, limit)
    codes = table.column("language").dictionary_encode().combine_chunks().indices
    codes = np.asarray(codes.fill_null(-1).to_numpy(zero_copy_only=False))  # a null language is one more language
    order = np.argsort(codes, kind="stable")
    ranked = np.empty(len(codes), np.int64)
    ranked[order] = np.arange(len(codes)) - np.searchsorted(codes[order], codes[order])
    return table.filter(ranked < limit)
