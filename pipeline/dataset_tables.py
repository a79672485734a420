"""A dataset's tables, read through Hugging Face `datasets`: local files and Hub ids, offline-aware.

What goes wrong is told by the exception's type, never its text: the Hub's answer
(``DatasetNotFoundError``), no network and no cached copy (``ConnectionError``), a file that
is not what its suffix says (a parse error), a system that refuses a read or a write
(``OSError`` with an errno: no space, a file-size limit, no permission), each with its own
message and fix. `datasets`' progress bars and log lines are off while it runs (our error
is the one line the user sees) and set back as they were afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.models.hub import hf_cache_dir
from schemas import ConfigError
from schemas.dataset import DatasetSpec
from schemas.errors import DatasetIOError, DatasetNotAvailableError

__all__ = ["FILE_BUILDERS", "load_tables", "quiet_datasets", "text_value"]

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def text_value(value: Any, column: str, row: int) -> str:
    """A text value; a missing one (None) is an empty example (counted, stored, never a crash)."""
    if value is None or isinstance(value, str):
        return value or ""
    raise ConfigError(
        f"text column {column!r} holds {type(value).__name__} values, not text: row {row} is {repr(value)[:60]}. "
        "Fix: pick a column of strings with --text-column, or convert this one to strings first."
    )


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Within: no `datasets` progress bars and no log lines below CRITICAL. On exit both are as they were.

    Both switches are process-wide and the user's: a library turns them off only while it
    works. Log lines go because an error such as "Failed to load JSON from file ..." would
    come before our own one-line error, which says the same with the fix.
    """
    import datasets

    level = datasets.logging.get_verbosity()
    # HF_DATASETS_DISABLE_PROGRESS_BARS=0 forces bars on: that switch is the user's (datasets would warn).
    ours = datasets.is_progress_bar_enabled() and datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not False
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if ours:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if ours:
            datasets.enable_progress_bars()


def load_tables(spec: DatasetSpec, arrow_cache: Path | None) -> tuple[list[tuple[str | None, Any]], str | None]:
    """The tables of `spec` (one per config, with its name) and the Hub commit they were prepared from."""
    with quiet_datasets():
        if spec.source in ("files", "package"):
            return [(None, _read_file(spec, arrow_cache))], None
        return _read_hub(spec)


def _read_file(spec: DatasetSpec, arrow_cache: Path | None) -> Any:
    """The table of a local file, read through `datasets` (which keeps an Arrow copy under `arrow_cache`)."""
    import datasets

    path = Path(spec.path)
    cache = arrow_cache if arrow_cache is not None else Path(datasets.config.HF_DATASETS_CACHE)
    where = f"the Arrow copy of {spec.path!r} under {str(cache)!r}"
    try:
        empty = not _has_content(path)
    except OSError as exc:  # missing, a directory, not readable: before datasets wraps it in its own words
        raise _os_error(spec, exc, where) from exc
    if empty:
        raise _no_rows(spec)
    # A file is one split: 'train' as `datasets` names it, 'test' for the shipped sample.
    name = "test" if spec.source == "package" else "train"
    try:
        loaded = datasets.load_dataset(
            FILE_BUILDERS[path.suffix.lower()],
            data_files={name: spec.path},
            cache_dir=str(arrow_cache) if arrow_cache is not None else None,
        )
    except datasets.exceptions.DatasetGenerationError as exc:
        # The builder wraps what stopped it: the system refusing a write, or the file's own content.
        refused = _refused(exc)
        if refused is not None:
            raise _os_error(spec, refused, where) from exc
        raise _unreadable(spec, _locate_problem(path) or _root_cause(exc)) from exc
    except OSError as exc:
        if exc.errno is None and not isinstance(exc, FileNotFoundError):
            raise _unreadable(spec, _one_line(exc)) from exc  # pyarrow's OSError for a corrupt Parquet footer
        raise _os_error(spec, exc, where) from exc
    except ValueError as exc:  # a parse error datasets does not wrap (a .parquet that is not one)
        raise _unreadable(spec, _locate_problem(path) or _one_line(exc)) from exc
    except StopIteration as exc:  # datasets infers the features from the first rows, and there were none
        raise _no_rows(spec) from exc
    return _split(loaded, spec).data.table


def _read_hub(spec: DatasetSpec) -> tuple[list[tuple[str | None, Any]], str | None]:
    """The tables of a Hub dataset's configs, from the Hugging Face datasets cache (or a download when online)."""
    configs: list[str | None] = list(spec.configs) if spec.configs else [None]
    splits = [_split(_load_hub_config(spec, c), spec) for c in configs]
    revisions = {_prepared_revision(split) for split in splits}
    revision = revisions.pop() if len(revisions) == 1 else None
    return [(c if spec.configs else None, split.data.table) for c, split in zip(configs, splits, strict=True)], revision


def _load_hub_config(spec: DatasetSpec, config: str | None) -> Any:
    """One config of a Hub dataset (a DatasetDict of its splits), each failure mapped by its type."""
    import datasets
    from huggingface_hub import errors as hub_errors

    cache = hf_cache_dir("datasets")  # read now: `datasets` fixes its default at import time
    named = f"dataset {spec.path!r}" + (f" (config {config!r})" if config else "")
    try:
        return datasets.load_dataset(spec.path, config, cache_dir=str(cache))
    except (datasets.exceptions.DatasetNotFoundError, hub_errors.RepositoryNotFoundError) as exc:
        # The Hub answered: no such dataset or revision, or a gated or private one (RevisionNotFoundError comes
        # wrapped in DatasetNotFoundError).
        raise DatasetNotAvailableError(
            f"{named} cannot be loaded from the Hub: {_one_line(exc)}. Fix: check the id (org/name, as on "
            "huggingface.co/datasets); for a gated or private dataset, accept its terms and log in (hf auth login)."
        ) from exc
    except (ConnectionError, hub_errors.LocalEntryNotFoundError) as exc:
        # No network (OfflineModeIsEnabled is a ConnectionError; datasets raises a plain one naming it) and no copy.
        raise _not_available(spec, exc) from exc
    except hub_errors.HfHubHTTPError as exc:  # any other answer of the Hub (rate limit, server error)
        raise DatasetNotAvailableError(
            f"{named}: the Hub answered {_one_line(exc)}. Fix: retry later, or run offline (HF_HUB_OFFLINE=1) "
            "from a cache that holds it."
        ) from exc
    except FileNotFoundError as exc:  # datasets' DataFilesNotFoundError, or no data file at a path-like id
        raise DatasetNotAvailableError(
            f"{named} was found neither on disk nor on the Hub: {_one_line(exc)}. Fix: pass a Hub id (org/name) "
            "or a local file (--data path.jsonl)."
        ) from exc
    except datasets.exceptions.DatasetGenerationError as exc:
        refused = _refused(exc)
        if refused is not None:
            raise _os_error(spec, refused, f"{named} into {str(cache)!r}") from exc
        raise ConfigError(f"could not prepare {named}: {_root_cause(exc)}. Fix: check the dataset's files.") from exc
    except OSError as exc:
        raise _os_error(spec, exc, f"{named} into {str(cache)!r}") from exc
    except ValueError as exc:
        if datasets.config.HF_HUB_OFFLINE:  # offline, datasets' cache builder raises ValueError for a config it lacks
            raise DatasetNotAvailableError(
                f"{named} cannot be loaded from the local Hugging Face datasets cache {str(cache)!r}: "
                f"{_one_line(exc)}. Fix: pass --config with a cached config, or run once with network access "
                "(unset HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) to cache this one."
            ) from exc
        raise ConfigError(
            f"could not load {named}: {_one_line(exc)}. Fix: check --config and --split against the dataset's page."
        ) from exc


def _split(loaded: Any, spec: DatasetSpec) -> Any:
    if spec.split not in loaded:
        raise ConfigError(
            f"dataset {spec.name!r} has no split {spec.split!r}; it has {sorted(loaded)}. Fix: --split NAME."
        )
    split = loaded[spec.split]
    # `.data.table` is the table before any indices mapping (a select or shuffle), so one is made the
    # table; loaded splits have none, and flattening would copy the whole table to disk for nothing
    # (a second Arrow file as big as the dataset's). datasets has no public test for a mapping: a
    # version without `_indices` gets the copy.
    if getattr(split, "_indices", True) is not None:
        split = split.flatten_indices()
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
            text_value(json.loads(value) if encoded and value is not None else value, column, row)


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


def _no_rows(spec: DatasetSpec) -> ConfigError:
    return ConfigError(f"{spec.path!r} is empty: it has no rows to read. Fix: pass a file with at least one row.")


def _unreadable(spec: DatasetSpec, problem: str) -> ConfigError:
    suffix = Path(spec.path).suffix.lower()
    fix = (
        "write it again as Parquet (pandas: DataFrame.to_parquet), or pass the rows as .jsonl or .csv"
        if suffix == ".parquet"
        else f"make the file valid UTF-8 {suffix} (where a line or row is named, that is where it breaks)"
    )
    return ConfigError(f"could not read {spec.path!r}: {problem.rstrip('.')}. Fix: {fix}.")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _os_error(spec: DatasetSpec, exc: OSError, writing: str) -> DatasetIOError | DatasetNotAvailableError:
    """The error for a read or write the system refused, by type and errno; `writing`: what was being written."""
    reason = exc.strerror or _one_line(exc)
    path = Path(spec.path)
    if isinstance(exc, FileNotFoundError) and spec.source != "hub" and not path.is_file():
        return DatasetNotAvailableError(
            f"dataset file {spec.path!r} does not exist (any more). Fix: check the path, or restore the file, "
            "and rerun."
        )
    if exc.errno in _NO_SPACE:
        size = f" (about {path.stat().st_size / 2**20:.1f} MiB: the size of the file)" if path.is_file() else ""
        message = (
            f"out of space writing {writing} ({reason}). Fix: free space there{size}, or pass --cache-dir DIR on "
            "a larger disk, and rerun."
        )
    elif exc.errno == errno.EFBIG:
        message = (
            f"a file-size limit stopped writing {writing} ({reason}). Fix: raise the limit (ulimit -f unlimited), "
            "or pass --cache-dir DIR on a file system that allows larger files, and rerun."
        )
    elif isinstance(exc, PermissionError) and exc.filename is not None and Path(exc.filename) == path:
        message = (
            f"cannot read {spec.path!r}: {reason}. Fix: make the file readable for this user (chmod u+r), "
            "or pass a copy you can read."
        )
    elif isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        at = f" at {exc.filename!r}" if exc.filename else ""
        message = (
            f"cannot write {writing}: {reason}{at}. Fix: make that directory writable for this user (its owner "
            "and mode; lsattr shows an immutable flag, mount a read-only file system), or pass --cache-dir DIR "
            "you can write."
        )
    else:
        at = f" at {exc.filename!r}" if exc.filename else ""
        message = (
            f"could not read {spec.path!r} or write {writing}: {reason}{at}. Fix: check that path (its "
            "permissions, the disk, a link that points elsewhere) and rerun."
        )
    error = DatasetIOError(message)
    error.errno = exc.errno  # callers test it as for any OSError (set alone, it leaves the message as it is)
    return error


def _refused(exc: BaseException) -> OSError | None:
    """The first OSError with an errno among `exc`'s causes: the system refused a read or a write.

    An OSError without one is pyarrow's word for a file it cannot parse, which is the file's fault.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _has_content(path: Path) -> bool:
    """True when the file holds anything but whitespace (reads only up to the first byte that is not)."""
    with open(path, "rb") as fh:
        return any(block.strip() for block in iter(lambda: fh.read(1 << 16), b""))


def _locate_problem(path: Path) -> str | None:
    """'line N: what is wrong' for a text file that is not UTF-8, or a .jsonl line that is not JSON."""
    if path.suffix.lower() == ".parquet":  # binary: its lines mean nothing
        return None
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


def _one_line(exc: BaseException) -> str:
    """All of `exc`'s message on one line (datasets lists what it has on the lines after the first)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _prepared_revision(split: Any) -> str | None:
    """The Hub commit a prepared split came from: datasets caches it under .../<version>/<commit>/."""
    files = split.cache_files
    return Path(files[0]["filename"]).parent.name if files else None
