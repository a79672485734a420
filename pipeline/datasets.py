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
from pipeline.dataset_tables import FILE_BUILDERS, load_tables, text_value
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
    """Examples in dataset order: `texts` (str, or a (str, str) pair), metadata columns, identity.

    `content_hash` hashes every text and metadata value used, in order, each with its type
    (`cache.keys.Hasher`: a datetime and its ISO string, 1 and "1", differ): the dataset's
    identity in the cache key, whatever path or mtime the files have.
    """

    spec: DatasetSpec
    texts: list[Any]
    metadata: dict[str, list[Any]]
    content_hash: str
    revision: str | None = None

    def __len__(self) -> int:
        return len(self.texts)

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
    """
    tables, revision = load_tables(spec, arrow_cache)
    texts: list[Any] = []
    metadata: dict[str, list[Any]] = {}
    hasher = Hasher()
    for language, table in tables:
        columns = table.column_names
        missing = [c for c in spec.text_columns if c not in columns]
        if missing:
            raise ConfigError(
                f"dataset {spec.name!r} has no column {missing[0]!r}; its columns are {columns}. "
                "Fix: pick text columns with --text-column."
            )
        rows = _limited(table.to_pylist(), spec.limit, "language" in columns)
        meta_columns = [c for c in columns if c not in spec.text_columns]
        for row_index, row in enumerate(rows):
            base = {c: row[c] for c in meta_columns}
            if language is not None:
                base.setdefault("language", language)
            base.setdefault("row", row_index)
            values = [text_value(row[c], c, row_index) for c in spec.text_columns]
            units = (
                [(tuple(values), None)]
                if spec.pair
                else [(v, c) for v, c in zip(values, spec.text_columns, strict=True)]
            )
            for text, field in units:
                record = dict(base) | ({"field": field} if field else {})
                for name in record:
                    if name not in metadata:  # a column first seen here: None for the examples before
                        metadata[name] = [None] * len(texts)
                for name, column in metadata.items():
                    column.append(record.get(name))
                texts.append(text)
                hasher.update([text, record])
    return Examples(spec, texts, metadata, hasher.hexdigest(), revision)


def _limited(rows: list[dict[str, Any]], limit: int | None, per_language: bool) -> list[dict[str, Any]]:
    """The first `limit` rows, of each language when rows carry one (a multilingual sample stays so)."""
    if limit is None:
        return rows
    if not per_language:
        return rows[:limit]
    seen: dict[Any, int] = {}
    kept = []
    for row in rows:
        seen[row["language"]] = seen.get(row["language"], 0) + 1
        if seen[row["language"]] <= limit:
            kept.append(row)
    return kept
