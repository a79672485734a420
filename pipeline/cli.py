"""The `actcache` command line (also `python -m pipeline`)."""

from __future__ import annotations

import argparse
import gc
import math
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from cache import faults
from pipeline.stop import RESUME_HINT, StopFlag, Terminated, handled_signals, signal_name
from schemas import ActcacheError, Interrupted

__all__ = ["build_parser", "console", "main"]

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
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error, not just its line")
    parser.set_defaults(debug=False)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `actcache extract ... --debug` works too, without resetting `actcache --debug extract`.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True), common)
    models = commands.add_parser("models", help="list the registered models and how each loads")
    models.set_defaults(func=_cmd_models)
    _add_extract(commands)
    _add_metrics(commands)

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
            sub.add_argument("store", metavar="KEY|ALIAS|PATH", help="a cache key, an alias (model__data) or a path")
        if name == "verify":
            sub.add_argument(
                "--no-reset",
                dest="reset",
                action="store_false",
                help="only report; leave corrupt shards marked done",
            )
        if name == "gc":
            sub.add_argument(
                "--older-than", type=_days, default=7.0, metavar="DAYS", help="age in days, 0 or more (default 7)"
            )
            sub.add_argument(
                "--format",
                type=int,
                action="append",
                dest="formats",
                default=[],
                metavar="N",
                help="also remove every store of schema version N, which this actcache cannot read (ls: 'format N')",
            )
        sub.set_defaults(func=func)
    return parser


class _Commands:
    """The subparsers action, each command given the options every command takes (`--debug`)."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self.action, self.common = action, common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.common], **kwargs)


EXTRACT_HELP = """\
Run a model over a dataset and cache every layer's hidden states (and logits) in a
content-addressed Zarr store. The same command again is a cache hit (the model is not
loaded); after a crash or Ctrl-C it resumes from the committed shards.

examples:
  actcache extract --model minilm-l6 --data sample                  offline, shipped data
  actcache extract --model labse --data xnli --split validation
  actcache extract --model xlmr --data texts.jsonl --text-column sentence --limit 1000
  actcache extract --model llama3 --data xnli --layers 0,16,-1 --logits topk:20
  actcache extract --model ./my-checkpoint --data corpus.parquet --store-dtype bfloat16

The last line printed is the store's path; read it with
  from cache import open_activations; acts = open_activations(model=..., data=...)
"""


def _add_extract(commands: Any) -> None:
    from pipeline.plan import DEFAULT_MAX_FULL_LOGITS_GB, DEFAULT_SHARD_BYTES, DEFAULT_SHARD_TOKENS

    p = commands.add_parser(
        "extract",
        help="cache a model's hidden states over a dataset",
        description=EXTRACT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--model",
        required=True,
        metavar="KEY|PATH",
        help="a registry key (actcache models) or a model directory",
    )
    what.add_argument(
        "--data",
        required=True,
        metavar="NAME|PATH",
        help="xnli, sample, a .jsonl/.json/.csv/.parquet file, or a Hub id",
    )
    what.add_argument("--split", help="dataset split (xnli/sample: test; files: train)")
    what.add_argument("--config", help="Hub dataset config(s), comma-separated (xnli: its 15 languages)")
    what.add_argument(
        "--text-column",
        action="append",
        dest="text_columns",
        metavar="COL",
        help="text column; repeat for several (xnli/sample: premise and hypothesis)",
    )
    what.add_argument(
        "--pair",
        action="store_true",
        default=None,
        help="tokenize two text columns together as one example (default: separate examples)",
    )
    what.add_argument(
        "--limit",
        type=int,
        help="first N rows of each language (xnli, sample, any data with a language column), else first N rows",
    )
    what.add_argument("--revision", help="model branch, tag or commit to pin")
    stored = p.add_argument_group("what to store")
    stored.add_argument(
        "--layers",
        default="all",
        help="all (default), one index like -1, or a list like 0,6,12 (0 = embeddings)",
    )
    stored.add_argument("--logits", default="topk:10", help="none | topk:K (default topk:10) | full")
    stored.add_argument("--store-dtype", default="float16", help="float16 (default) | bfloat16 | float32")
    stored.add_argument(
        "--pooling",
        type=_pooling_list,
        default=None,
        help="pooled arrays to store, of mean,first,last (default all): encoders pool mean and first, "
        "decoders mean and last",
    )
    stored.add_argument(
        "--max-full-logits-gb",
        type=float,
        default=DEFAULT_MAX_FULL_LOGITS_GB,
        help=f"refuse --logits full above this size (default {DEFAULT_MAX_FULL_LOGITS_GB:g})",
    )
    how = p.add_argument_group("how to run (not part of the cache key)")
    how.add_argument(
        "--batch-size", type=int, default=32, help="at most this many examples per forward pass (default 32)"
    )
    how.add_argument(
        "--shard-tokens",
        type=int,
        help=(
            "tokens per shard, the unit of commit and resume (default: about as many as hold "
            f"{DEFAULT_SHARD_BYTES >> 20} MiB of per-token arrays, at most {DEFAULT_SHARD_TOKENS:,}; "
            "a run holds two shards in memory)"
        ),
    )
    how.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    how.add_argument("--dtype", help="model precision: fp32, bf16, fp16 (default: the model's preferred)")
    how.add_argument(
        "--quantize",
        type=int,
        choices=(4, 8),
        dest="quantization",
        help="load decoder-only models in 8 or 4 bits",
    )
    how.add_argument(
        "--no-quantize",
        action="store_false",
        dest="quantization",
        default=None,
        help="load in full precision even where the registry quantizes (llama3)",
    )
    how.add_argument(
        "--cache-dir",
        help="cache root (default: $ACTCACHE_DIR, else ~/.cache/actcache): every file actcache writes goes there "
        "(stores, tokenized data, datasets' Arrow copies of local files); Hub models and datasets are read from "
        "the Hugging Face cache ($HF_HOME). An object store URL (s3://bucket/prefix, gs://...) takes the stores "
        "and aliases, with endpoint and credentials from the standard environment (AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, ...); the data copies then stay in the local default",
    )
    how.add_argument("--force", action="store_true", help="remove an existing store for this request and extract again")
    how.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary; print only the store path")
    how.add_argument(
        "--summary-json", metavar="FILE", help="also write the run's summary (sizes, times, padding) as JSON"
    )
    how.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own Python code to run")
    how.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights; unpickling runs code")
    how.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run the shards on a local Dask cluster of N worker processes, started and closed by this command "
        "(the cores split between them; on a CUDA machine worker i takes cuda:i, so pass N = the GPU count). "
        "Each worker loads the model once and writes its shards straight to the store",
    )
    how.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the shards on the running Dask cluster at ADDRESS (tcp://host:8786: a dask scheduler, "
        "dask-jobqueue's SLURMCluster, dask-cuda's LocalCUDACluster), left running; the cache root must be one "
        "every worker reaches: a shared filesystem path, or an object store URL",
    )
    p.set_defaults(func=_cmd_extract)


METRICS_HELP = """\
Layer-wise analyses of cached activations, read out of core, per layer (and layer pair),
within STORE and against --against STORE_B over the same examples. --metrics (comma-separated;
default {defaults}, as far as the stores' metadata allows):
{metrics}
Writes OUT/metrics.csv (metric, store, store_b, layer, layer_b, src_lang, tgt_lang, value,
ci_low, ci_high: the --bootstrap interval, empty without it), PNG plots (intervals as bands)
and OUT/report.html. Results are cached by the stores' keys and the parameters: the same
command again is instant. Runs without torch or transformers.

examples:
  actcache metrics minilm-l6__sample --out metrics-out          the store make extract makes
  actcache metrics --model mbert --data xnli --against xlmr__xnli --metrics cka --out cka
  actcache metrics labse__xnli --metrics retrieval --center --layers 0,6,12 --out retrieval
  actcache metrics labse__xnli --metrics cka_debiased,mknn,retrieval_margin --bootstrap 1000 --out paper
"""


class _MetricsHelp(argparse.RawDescriptionHelpFormatter):
    """Lists the metrics `metrics.job` defines, with what each measures, when help is printed (not on
    every command: the metrics package is not imported otherwise)."""

    def add_text(self, text: str | None) -> None:
        if text and "{metrics}" in text:
            import textwrap

            from metrics.job import DEFAULT_METRICS, METRICS

            lines = (
                textwrap.fill(what, width=92, initial_indent=f"  {name:<17} ", subsequent_indent=" " * 20)
                for name, what in METRICS.items()
            )
            text = text.replace("{metrics}", "\n".join(lines)).replace("{defaults}", ",".join(DEFAULT_METRICS))
        super().add_text(text)


def _add_metrics(commands: Any) -> None:
    p = commands.add_parser(
        "metrics",
        help="retrieval, CKA, mutual k-NN and probes per layer over cached stores, with intervals, plots, a report",
        description=METRICS_HELP,
        formatter_class=_MetricsHelp,
    )
    p.add_argument("store", nargs="?", metavar="STORE", help="a key, alias (model__data), path or URL")
    p.add_argument("--model", help="with --data: the store `actcache extract --model M --data D` made")
    p.add_argument("--data", help="see --model")
    p.add_argument("--against", metavar="STORE_B", help="a second store over the same examples: CKA between the two")
    p.add_argument(
        "--metrics",
        type=lambda text: tuple(m for m in text.split(",") if m),
        help="comma-separated names of the metrics listed above (default: see above)",
    )
    p.add_argument("--layers", default="all", help="all (default), or a list like 0,6,-1 (0 = embeddings)")
    p.add_argument("--pooling", default="mean", help="the stored pooled vectors to use: mean (default), first, last")
    p.add_argument("--center", action="store_true", help="retrieval: subtract each language's mean vector first")
    p.add_argument(
        "--align-column",
        help="the metadata column translations share (default: id where translations share it, else each "
        "item's index within its language, as XNLI's rows align); items align within one field (premise, hypothesis)",
    )
    p.add_argument("--folds", type=int, default=5, help="probes: stratified folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="the probes' folds and the bootstrap's resamples (default 0)")
    p.add_argument("--mknn-k", type=int, default=10, help="mknn: neighbours per example (default 10)")
    p.add_argument("--margin-k", type=int, default=4, help="retrieval_margin: neighbours in the margin (default 4)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="B",
        help="95%% intervals from B resamples of the examples (aligned groups for retrieval, random halves for "
        "CKA; 0 = none, the default; 1000 for a paper). Cost: CKA makes B more passes over the store, the others "
        "resample per-example results",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where metrics.csv, the PNGs and report.html go")
    p.add_argument("--cache-dir", help="cache root (default: $ACTCACHE_DIR, else ~/.cache/actcache)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="compute again, ignoring cached results")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar; print only the report's path")
    p.set_defaults(func=_cmd_metrics)


def _cmd_metrics(args: argparse.Namespace) -> int:
    from cache import alias_name
    from metrics import MetricsConfig, run_metrics
    from schemas import ConfigError
    from schemas.request import parse_layers

    if (args.store is None) == (args.model is None or args.data is None):
        raise ConfigError("name one store: STORE (a key, alias or path), or both --model and --data")
    fields = {k: v for k, v in vars(args).items() if k in MetricsConfig.__dataclass_fields__}
    store = args.store or alias_name(args.model, args.data)
    config = MetricsConfig(**fields | {"store": store, "layers": parse_layers(args.layers)})
    say = (lambda text: None) if args.quiet else (lambda text: print(f"actcache: {text}", file=sys.stderr))
    result = run_metrics(config, say=say)
    for note in result.notes:
        say(note)
    if not args.quiet:
        for png in result.plots:
            print(png, file=sys.stderr)
        print(result.csv, file=sys.stderr)
    print(result.report)
    return 0


def _days(text: str) -> float:
    """An age in days: a finite number, 0 or more (a negative one or NaN would make every store old)."""
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not math.isfinite(days) or days < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the age must be a finite number of days, 0 or more")
    return days


def _joined_values(argv: Sequence[str], options: Sequence[str] = ("--layers", "--older-than")) -> list[str]:
    """`--layers -1,-7` as `--layers=-1,-7`: argparse takes a value that starts with '-' for an option.

    So is `--older-than -1` (or `-inf`): its own check then says what is wrong with it.
    """
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        if items[i] in options and i + 1 < len(items) and _negative_number(items[i + 1]):
            out.append(f"{items[i]}={items[i + 1]}")
            i += 2
        else:
            out.append(items[i])
            i += 1
    return out


def _negative_number(text: str) -> bool:
    return text.startswith("-") and (text[1:2].isdigit() or text[1:].lower() in ("inf", "infinity", "nan"))


def _pooling_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.extract import ExtractConfig, extract
    from pipeline.tuning import ProcessTuning

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug", "stop")}
    if fields.get("text_columns"):
        fields["text_columns"] = tuple(fields["text_columns"])
    if fields.get("pooling") is None:
        fields.pop("pooling", None)
    config = ExtractConfig(**fields)
    with ProcessTuning() as tuning:
        result = extract(config, stop=args.stop, hooks=tuning)
    return 0 if result.manifest.complete else 3


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
    from schemas.store import SCHEMA_VERSION

    root = _root(args)
    infos = list_stores(root)
    if not infos:
        print(f"no stores in {root}")
        return 0
    print(f"{'key':32}  {'state':10}  {'shards':>9}  {'examples':>9}  {'tokens':>11}  {'size':>10}  aliases")
    for i in infos:
        old_format = i.schema_version is not None and i.schema_version != SCHEMA_VERSION
        state = (
            f"format {i.schema_version}"
            if old_format
            else ("error" if i.error else ("complete" if i.complete else "partial"))
        )
        shards = f"{i.shards_done}/{i.shards_total}"
        sizes = f"{i.n_examples:>9}  {i.n_tokens:>11}  {_size(i.bytes):>10}"
        print(f"{i.key:32}  {state:10}  {shards:>9}  {sizes}  {', '.join(i.aliases) or '-'}")
    print(f"{len(infos)} store(s) in {root}")
    for i in infos:
        if i.error and not (i.schema_version is not None and i.schema_version != SCHEMA_VERSION):
            print(f"{i.key}: {' '.join(i.error.split())}")
    old = sorted({i.schema_version for i in infos if i.schema_version not in (None, SCHEMA_VERSION)})
    if old:
        print(f"stores of format {', '.join(map(str, old))} cannot be read by this actcache (format {SCHEMA_VERSION}); "
              f"remove them with: actcache gc {' '.join(f'--format {v}' for v in old)}")  # fmt: skip
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import json

    from cache import find_store, read_manifest, store_bytes
    from cache.integrity import committed

    path = find_store(args.store, _root(args))
    manifest = read_manifest(path)
    shards = manifest.geometry.shards
    done = len(committed(path, shards))
    data = manifest.to_dict()
    data["geometry"] = {k: v for k, v in data["geometry"].items() if k != "shards"} | {"n_shards": len(shards)}
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

    result = gc(args.older_than, _root(args), formats=args.formats)
    for path in result.removed:
        print(f"removed {path}")
    for kept in result.kept:  # on stderr: each needs a look, and stdout stays the list of what went
        print(f"actcache: kept {kept.path}: {' '.join(kept.reason.split())}", file=sys.stderr)
    formats = "".join(f", or of format {v}" for v in args.formats)
    kept_note = f"; {len(result.kept)} kept that gc cannot prove abandoned (listed on stderr)" if result.kept else ""
    print(
        f"{len(result.removed)} removed: stores incomplete and untouched for {args.older_than:g} days{formats}, "
        f"and tokenized or Arrow copies of data unused as long{kept_note}"
    )
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


def _explain(exc: BaseException) -> tuple[str, int]:
    """One line for an error that reached the top, and the exit status it gets."""
    if isinstance(exc, Interrupted):
        return f"actcache: {exc}", 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        return f"actcache: stopped by {signal_name(signum)}; committed shards are kept, {RESUME_HINT}", 128 + signum
    if isinstance(exc, ActcacheError):
        return f"actcache: error: {exc}", 2
    if isinstance(exc, OSError):
        where = f" ({exc.filename!s})" if exc.filename else ""
        return (
            f"actcache: error: {exc.strerror or exc}{where}. Fix: check that path (its permissions, the disk, "
            "a link that points elsewhere); rerun with --debug for the traceback.",
            1,
        )
    return (
        f"actcache: error: unexpected {type(exc).__name__}: {exc}. Rerun with --debug for the traceback, "
        "and report it with the command you ran.",
        1,
    )


def console() -> NoReturn:
    """The `actcache` console script and `python -m pipeline`: `main()`, then exit with its status.

    The process ends here, so what it holds is frozen out of the garbage collector first: the
    interpreter's shutdown otherwise traverses every object left (a run's modules and caches,
    ~470k objects) in several collections: 0.7 s of a 2,000-text extract's 14.3-14.9 s and 0.6 s
    of a million-row cache hit's 4.1-4.2 s here (`bench/results/2026-12-04-vm-epyc-exit-freeze-ab.json`).
    Objects are still freed as the modules go and `atexit` handlers still run; only objects in
    reference cycles are left unfinalized, and every file the command writes is closed by then.
    `main()` itself changes nothing of the sort: callers in Python keep their collector.
    """
    status = main()
    gc.freeze()
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (`console` is the script that exits with it).

    Every error ends as one line naming the problem and the fix (`--debug` adds the traceback).
    The process-wide set-up (signal handlers, test-only crash points) is undone on return.
    """
    args = build_parser().parse_args(_joined_values(sys.argv[1:] if argv is None else argv))
    args.stop = StopFlag()
    faults.arm_from_environment()
    try:
        with handled_signals(args.stop):
            return int(args.func(args))
    except BrokenPipeError:  # `actcache ls | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        message, status = _explain(exc)
        if args.debug:
            traceback.print_exc()
        print(" ".join(message.split()), file=sys.stderr)  # one line, whatever a cause's text holds
        return status
    finally:
        faults.disarm()
