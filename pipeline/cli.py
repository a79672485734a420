"""The `actcache` command line (also `python -m pipeline`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from schemas import ActcacheError

__all__ = ["build_parser", "main"]

EPILOG = """\
examples:
  actcache models                      list the registered model keys
  make extract MODEL=labse DATA=xnli   cache LaBSE's hidden states over XNLI
  actcache ls                          what is cached, complete or not, and its size
  actcache show minilm-l6__sample      one store's manifest (by alias, key or path)
  actcache verify KEY                  recompute checksums; corrupt shards become pending
  actcache gc --older-than 7           remove incomplete stores untouched for a week

The cache root is --cache-dir, else $ACTCACHE_DIR, else ~/.cache/actcache.

Offline use: set HF_HUB_OFFLINE=1; models then load from the local Hugging Face cache
(HF_HOME) or from a local directory, and a missing one is a clear error, not a retry loop.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actcache",
        description="Cache layer-indexed hidden states and logits of Hugging Face models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models = commands.add_parser("models", help="list the registered models and how each loads")
    models.set_defaults(func=_cmd_models)

    store_commands = {
        "ls": ("list the stores in the cache", _cmd_ls),
        "show": ("print a store's manifest, size and completeness", _cmd_show),
        "verify": ("recompute a store's checksums; corrupt shards become pending", _cmd_verify),
        "rm": ("remove a store", _cmd_rm),
        "gc": ("remove incomplete stores untouched for some days", _cmd_gc),
    }
    for name, (text, func) in store_commands.items():
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--cache-dir", help="cache root (default: $ACTCACHE_DIR, else ~/.cache/actcache)")
        if name in ("show", "verify", "rm"):
            sub.add_argument(
                "store", metavar="KEY|ALIAS|PATH", help="a cache key, an alias (model__data) or a path"
            )
        if name == "verify":
            sub.add_argument(
                "--no-reset",
                dest="reset",
                action="store_false",
                help="only report; leave corrupt shards marked done",
            )
        if name == "gc":
            sub.add_argument(
                "--older-than", type=float, default=7.0, metavar="DAYS", help="age in days (default 7)"
            )
        sub.set_defaults(func=func)
    return parser


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _root(args: argparse.Namespace) -> Any:
    from cache import cache_root

    return cache_root(args.cache_dir)


def _cmd_ls(args: argparse.Namespace) -> int:
    from cache import list_stores

    root = _root(args)
    infos = list_stores(root)
    if not infos:
        print(f"no stores in {root}")
        return 0
    print(f"{'key':32}  {'state':10}  {'shards':>9}  {'examples':>9}  {'tokens':>11}  {'size':>10}  aliases")
    for i in infos:
        state = "error" if i.error else ("complete" if i.complete else "partial")
        shards = f"{i.shards_done}/{i.shards_total}"
        sizes = f"{i.n_examples:>9}  {i.n_tokens:>11}  {_size(i.bytes):>10}"
        print(f"{i.key:32}  {state:10}  {shards:>9}  {sizes}  {', '.join(i.aliases) or '-'}")
    print(f"{len(infos)} store(s) in {root}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import json

    from cache import find_store, read_manifest, store_bytes
    from cache.integrity import marker_path

    path = find_store(args.store, _root(args))
    manifest = read_manifest(path)
    shards = manifest.geometry.shards
    done = sum(marker_path(path, s.index).is_file() for s in shards)
    data = manifest.to_dict()
    data["geometry"] = {k: v for k, v in data["geometry"].items() if k != "shards"} | {
        "n_shards": len(shards)
    }
    print(json.dumps(data, indent=2, sort_keys=True))
    state = "complete" if manifest.complete else f"incomplete: {done}/{len(shards)} shards done"
    print(f"path: {path}\nsize on disk: {_size(store_bytes(path))}\nstate: {state}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from cache import verify

    report = verify(args.store, _root(args), reset=args.reset)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_rm(args: argparse.Namespace) -> int:
    from cache import remove_store

    print(f"removed {remove_store(args.store, _root(args))}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from cache import gc

    removed = gc(args.older_than, _root(args))
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} incomplete store(s) older than {args.older_than:g} days removed")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from pipeline.models.registry import REGISTRY

    rows = [("key", "hugging face id", "arch", "dtype", "quantized", "description")]
    for spec in REGISTRY.values():
        quant = f"{spec.quant_bits}-bit" if spec.use_bitsandbytes else "-"
        rows.append((spec.name, spec.hf_id, spec.arch, spec.dtype, quant, spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `actcache` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ActcacheError as exc:
        print(f"actcache: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actcache: interrupted", file=sys.stderr)
        return 130
