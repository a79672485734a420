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

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline.models.hub import hf_cache_dir
from schemas import ConfigError
from schemas.dataset import DatasetSpec
from schemas.errors import ActcacheError

__all__ = [
    "DATASETS",
    "XNLI_LANGUAGES",
    "DatasetNotAvailableError",
    "Examples",
    "load_examples",
    "resolve_dataset",
]

XNLI_LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
SAMPLE_FILE = Path(__file__).with_name("data") / "xnli_sample.jsonl"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

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


class DatasetNotAvailableError(ActcacheError, FileNotFoundError):
    """The dataset is neither registered, nor a local file, nor loadable from the Hub or its cache."""


@dataclass(frozen=True)
class Examples:
    """Examples in dataset order: `texts` (str, or a (str, str) pair), metadata columns, identity.

    `content_hash` hashes every text and metadata value used, in order: the dataset's
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
    tables, revision = _load_tables(spec, arrow_cache)
    texts: list[Any] = []
    metadata: dict[str, list[Any]] = {}
    digest = hashlib.sha256()
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
            values = [_text(row[c], c, row_index) for c in spec.text_columns]
            units = (
                [(tuple(values), None)]
                if spec.pair
                else [(v, c) for v, c in zip(values, spec.text_columns, strict=True)]
            )
            for text, field in units:
                record = dict(base) | ({"field": field} if field else {})
                for name in [*metadata, *(k for k in record if k not in metadata)]:
                    metadata.setdefault(name, [None] * len(texts)).append(record.get(name))
                texts.append(text)
                digest.update(json.dumps([text, record], sort_keys=True, default=str, ensure_ascii=False).encode())
                digest.update(b"\n")
    return Examples(spec, texts, metadata, digest.hexdigest(), revision)


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


def _text(value: Any, column: str, row: int) -> str:
    """A text value; a missing one (None) is an empty example (counted, stored, never a crash)."""
    if value is None or isinstance(value, str):
        return value or ""
    raise ConfigError(
        f"text column {column!r} holds {type(value).__name__} values, not text: row {row} is {repr(value)[:60]}. "
        "Fix: pick a column of strings with --text-column, or convert this one to strings first."
    )


def _load_tables(spec: DatasetSpec, arrow_cache: Path | None) -> tuple[list[tuple[str | None, Any]], str | None]:
    """The tables of `spec` (one per config, with its name) and the Hub commit they were prepared from."""
    import datasets

    datasets.disable_progress_bars()
    # Offline, datasets warns twice per config that it uses its cache: that is the point here.
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        return _read_tables(spec, arrow_cache)
    finally:
        datasets.logging.set_verbosity(level)


def _read_tables(spec: DatasetSpec, arrow_cache: Path | None) -> tuple[list[tuple[str | None, Any]], str | None]:
    import datasets

    try:
        if spec.source in ("files", "package"):
            builder = FILE_BUILDERS[Path(spec.path).suffix.lower()]
            # A file is one split: 'train' as `datasets` names it, 'test' for the shipped sample.
            name = "test" if spec.source == "package" else "train"
            cache_dir = str(arrow_cache) if arrow_cache is not None else None
            loaded = datasets.load_dataset(builder, data_files={name: spec.path}, cache_dir=cache_dir)
            return [(None, _split(loaded, spec).data.table)], None
        configs: list[str | None] = list(spec.configs) if spec.configs else [None]
        cache = str(hf_cache_dir("datasets"))  # read now: `datasets` fixes its default at import time
        splits = [_split(datasets.load_dataset(spec.path, c, cache_dir=cache), spec) for c in configs]
        revisions = {_prepared_revision(split) for split in splits}
        revision = revisions.pop() if len(revisions) == 1 else None
        return [
            (c if spec.configs else None, split.data.table) for c, split in zip(configs, splits, strict=True)
        ], revision
    except (ConfigError, DatasetNotAvailableError):
        raise
    except datasets.exceptions.DatasetGenerationError as exc:
        where = _locate_problem(Path(spec.path)) or _root_cause(exc)
        raise ConfigError(
            f"could not read {spec.path!r}: {where}. Fix: make the file valid UTF-8 {Path(spec.path).suffix}."
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        if spec.source == "hub" and "Couldn't find" not in str(exc) and "offline" not in str(exc).lower():
            raise ConfigError(f"could not read dataset {spec.name!r} ({spec.path}): {exc}") from None
        if spec.source != "hub":
            raise ConfigError(
                f"could not read {spec.path!r}: {_first_line(exc)}. Fix: check that the file is valid "
                f"UTF-8 {Path(spec.path).suffix} (the line number above, where given, is where it breaks)."
            ) from None
        raise _not_available(spec, exc) from None
    except (ConnectionError, OSError, FileNotFoundError) as exc:
        raise _not_available(spec, exc) from None


def _split(loaded: Any, spec: DatasetSpec) -> Any:
    if spec.split not in loaded:
        raise ConfigError(
            f"dataset {spec.name!r} has no split {spec.split!r}; it has {sorted(loaded)}. Fix: --split NAME."
        )
    split = loaded[spec.split].flatten_indices()
    _check_text_columns(split, spec)
    return split


def _check_text_columns(split: Any, spec: DatasetSpec) -> None:
    """`ConfigError` for a text column whose values are not strings (numbers, lists, objects; None is fine).

    Mixed JSON values come as a `Json` feature, kept encoded in Arrow: decoded here to name the row.
    """
    import datasets

    for column in spec.text_columns:
        feature = split.features.get(column)
        if feature is None or (isinstance(feature, datasets.Value) and feature.dtype in _TEXT_DTYPES):
            continue  # a missing column is reported with the dataset's columns
        encoded = type(feature).__name__ == "Json"
        for row, value in enumerate(split.data.table.column(column).to_pylist()):
            _text(json.loads(value) if encoded and value is not None else value, column, row)


_TEXT_DTYPES = ("string", "large_string", "null")


def _not_available(spec: DatasetSpec, exc: BaseException) -> DatasetNotAvailableError:
    cache = str(hf_cache_dir("datasets"))
    configs = f" (configs {', '.join(spec.configs)})" if spec.configs else ""
    return DatasetNotAvailableError(
        f"dataset {spec.path!r}{configs} is not in the local Hugging Face datasets cache {cache!r} and "
        f"cannot be downloaded here ({_first_line(exc)}). Fix: run once with network access (unset "
        "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) to cache it, point HF_HOME at a cache that holds it, "
        "or pass a local file (--data path.jsonl)."
    )


def _locate_problem(path: Path) -> str | None:
    """'line N: what is wrong' for a file that is not UTF-8, or a .jsonl line that is not JSON."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"line {number} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            if path.suffix.lower() == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except ValueError as exc:
                    return f"line {number} is not valid JSON ({exc})"
    return None


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's first line: the parser's own words (with its row or line number)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _prepared_revision(split: Any) -> str | None:
    """The Hub commit a prepared split came from: datasets caches it under .../<version>/<commit>/."""
    files = split.cache_files
    return Path(files[0]["filename"]).parent.name if files else None
