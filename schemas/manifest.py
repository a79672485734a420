"""`Manifest`: what a store holds and how far it got (its `manifest.json`), read only at a known schema version."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from schemas.arrays import ArraySpec
from schemas.errors import SchemaVersionError, StoreCorruptError
from schemas.geometry import Geometry
from schemas.store import SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS

__all__ = ["Manifest"]


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
