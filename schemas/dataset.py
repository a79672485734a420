"""The dataset contract: where texts come from and how rows become examples."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from schemas.errors import ConfigError

__all__ = ["DatasetSpec"]

Source = Literal["hub", "files", "package"]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset and how to read it.

    `path` is a Hub id ('facebook/xnli') or a file ('.jsonl', '.json', '.csv', '.parquet');
    `configs` are Hub configs to concatenate in order, each adding its name as the
    `language` column (XNLI's per-language configs); `text_columns` are read as separate
    examples, row by row (premise then hypothesis of row 0, then of row 1, ...) unless
    `pair` is set, which tokenizes them together as one example; `limit` keeps the first
    N rows of each language (each config, or each value of a `language` column), else the
    first N rows.
    """

    name: str
    source: Source
    path: str
    split: str = "test"
    text_columns: tuple[str, ...] = ("text",)
    configs: tuple[str, ...] | None = None
    pair: bool = False
    limit: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.source not in ("hub", "files", "package"):
            raise ConfigError(f"unknown dataset source {self.source!r}; use hub, files or package")
        columns = tuple(self.text_columns)
        if not columns:
            raise ConfigError(f"dataset {self.name!r} needs at least one text column (--text-column)")
        if self.pair and len(columns) != 2:
            raise ConfigError(f"pair mode tokenizes two columns together; got {list(columns)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be a positive number of rows, got {self.limit!r}")
        object.__setattr__(self, "text_columns", columns)
        if self.configs is not None:
            object.__setattr__(self, "configs", tuple(self.configs))

    def with_(self, **changes: Any) -> DatasetSpec:
        """A copy with `changes`; None values leave a field as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetSpec:
        return cls(**data)
