"""The `actcache` command line (also `python -m pipeline`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from schemas import ActcacheError

__all__ = ["build_parser", "main"]

EPILOG = """\
examples:
  actcache models                      list the registered model keys
  make extract MODEL=labse DATA=xnli   cache LaBSE's hidden states over XNLI

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
    return parser


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
