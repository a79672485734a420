"""The staged extraction: resolve -> tokenize -> plan -> run/write -> finalize.

>>> from pipeline.extract import ExtractConfig, extract
>>> result = extract(ExtractConfig(model="minilm-l6", data="sample"))   # doctest: +SKIP
>>> result.path                                                          # the store
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cache import StoreWriter, cache_root, store_bytes, store_path
from cache.catalog import read_manifest, remove_store
from cache.creation import created
from cache.faults import crash_point
from cache.paths import alias_name, ensure_writable, work_dir
from pipeline.datasets import resolve_dataset
from pipeline.models.helpers import coerce_device
from pipeline.models.quantization import check_quantizable
from pipeline.plan import DEFAULT_MAX_FULL_LOGITS_GB, check_full_logits, plan, shard_tokens_for
from pipeline.reduce import Reducer
from pipeline.residency import MappedRanges
from pipeline.resolve import Resolved, resolve
from pipeline.run import RunHooks, run_shards
from pipeline.stop import StopFlag
from schemas import ConfigError, OutputSpec
from schemas.arrays import build_arrays
from schemas.manifest import Manifest
from schemas.store import POOLINGS, STACKS_BY_ARCH

__all__ = ["ExtractConfig", "ExtractResult", "extract"]


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction, as the CLI spells it (see `actcache extract --help`)."""

    model: str
    data: str
    split: str | None = None
    config: str | None = None
    text_columns: tuple[str, ...] | None = None
    pair: bool | None = None
    limit: int | None = None
    layers: str | None = "all"
    logits: str = "topk:10"
    store_dtype: str = "float16"
    pooling: tuple[str, ...] = POOLINGS
    batch_size: int = 32
    shard_tokens: int | None = None  # None: pipeline.plan.shard_tokens_for the store's bytes per token
    device: str | None = None
    dtype: str | None = None
    revision: str | None = None
    quantization: bool | int | None = None
    cache_dir: str | None = None
    force: bool = False
    quiet: bool = False
    summary_json: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    max_full_logits_gb: float = DEFAULT_MAX_FULL_LOGITS_GB
    workers: int | None = None  # start a local Dask cluster of this many worker processes
    scheduler: str | None = None  # or attach to a running Dask scheduler at this address

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shard_tokens is not None and self.shard_tokens < 1:
            raise ConfigError(f"--shard-tokens must be at least 1, got {self.shard_tokens}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.workers is not None and self.scheduler:
            raise ConfigError("--workers starts a local cluster and --scheduler attaches to one: pass one of them")


def _check_summary_path(summary_json: str | None) -> None:
    if not summary_json:
        return
    path = Path(summary_json).expanduser()
    if path.is_dir():
        raise ConfigError(f"--summary-json {summary_json!r} is a directory. Fix: pass a file path, like run.json.")
    if not path.parent.is_dir():
        raise ConfigError(
            f"--summary-json {summary_json!r}: the folder {str(path.parent)!r} does not exist. "
            "Fix: create it, or pass a path in an existing folder."
        )


@dataclass
class ExtractResult:
    key: str
    path: Path
    cache_hit: bool
    manifest: Manifest
    summary: dict[str, Any] = field(default_factory=dict)


def extract(
    cfg: ExtractConfig,
    out: TextIO | None = None,
    *,
    stop: StopFlag | None = None,
    hooks: RunHooks | None = None,
    client: Any = None,
    runner: Any = None,
) -> ExtractResult:
    """Run (or resume, or find in the cache) one extraction; the store's path is printed last.

    `stop` lets a host stop the run gracefully after the batch in hand (the CLI sets it on
    Ctrl-C and SIGTERM); `hooks` let it tune its process around the run (`pipeline.tuning`).
    Neither is needed from Python: a KeyboardInterrupt there keeps every committed shard.
    `client` (a `distributed.Client`), like `cfg.workers` or `cfg.scheduler`, runs the shards
    as tasks on a Dask cluster (`pipeline.distributed`); the client is the caller's, left open.
    `runner` is for benches and tests only: a loaded runner used instead of loading `cfg.model`
    (`bench.standin`'s zero-cost stand-in); its `forward(batch, *, logits)` is called with
    `logits=False` when no logits are stored. The key stays `cfg.model`'s, so the runner must compute
    what that checkpoint would: the stand-in's checkpoint directory is its own, with its own key.
    """
    out = out or sys.stdout
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=out, flush=True))
    started = time.perf_counter()
    stages = _Stages()
    coerce_device(cfg.device)  # a device this machine lacks is an error even when the store is cached
    _check_summary_path(cfg.summary_json)  # before the run, not after the store is complete
    distributed = client is not None or cfg.workers is not None or bool(cfg.scheduler)
    if distributed and runner is not None:
        raise ConfigError("a runner given to extract() runs in this process: pass no client, workers or scheduler")
    root = ensure_writable(cache_root(cfg.cache_dir))
    side = work_dir(root)  # tokenized and Arrow copies, weight digests: local even when the stores are not
    dataset = resolve_dataset(
        cfg.data,
        split=cfg.split,
        config=cfg.config,
        text_columns=cfg.text_columns,
        pair=cfg.pair,
        limit=cfg.limit,
    )
    outputs = OutputSpec(layers=cfg.layers, logits=cfg.logits, store_dtype=cfg.store_dtype, pooling=cfg.pooling)
    resolved = resolve(
        cfg.model,
        dataset,
        outputs,
        revision=cfg.revision,
        dtype=cfg.dtype,
        quantization=cfg.quantization,
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle=cfg.allow_pickle,
        cache_dir=side,
    )
    stages.lap("resolve")
    path = store_path(root, resolved.key)
    alias = alias_name(resolved.spec.name, dataset.name)
    if created(path) and cfg.force:
        remove_store(path, root)  # refused while another process writes it
    if created(path) and read_manifest(path).complete:
        manifest = read_manifest(path)
        say(f"cache hit: {alias} is already extracted (key {resolved.key}); the model was not loaded.")
        summary = _summary(manifest, path, time.perf_counter() - started, 0)
        _finish(cfg, say, out, summary | {"cache_hit": True})
        return ExtractResult(resolved.key, path, True, manifest, summary)

    say(f"{alias}: {len(resolved.examples)} examples, model {resolved.spec.hf_id} -> key {resolved.key}")
    if resolved.quant_bits:  # a layer bitsandbytes cannot take on this device fails now, before any work
        check_quantizable(
            resolved.prepared.checkpoint.path,
            resolved.quant_bits,
            coerce_device(cfg.device),
            model_name=resolved.spec.name,
            trust_remote_code=cfg.trust_remote_code,
        )
    from tqdm.auto import tqdm

    # Shown only once tokenizing has taken 2 s: a cached or small dataset's stays silent.
    with tqdm(
        total=len(resolved.examples),
        unit="ex",
        unit_scale=True,
        disable=cfg.quiet,
        file=sys.stderr,
        desc="tokenize",
        delay=2.0,
    ) as bar:
        tokenized = resolved.tokenize(side, progress=bar.update)
    stages.lap("tokenize")
    crash_point("after-tokenize")
    if len(tokenized.lengths) == 0:
        raise ConfigError(f"dataset {dataset.name!r} gave no examples (split {dataset.split!r}); nothing to extract")
    stacks = STACKS_BY_ARCH[resolved.spec.arch]
    poolings = {stack: outputs.poolings(stack) for stack in stacks}
    store_arrays = functools.partial(
        build_arrays,
        stacks={s: resolved.hidden_size for s in stacks},
        n_layers=len(resolved.layers),
        store_dtype=outputs.store_dtype,
        poolings=poolings,
        token_level=outputs.token_level,
        vocab=resolved.vocab_size,
    )
    # Sized before the model is loaded, for the logits asked for (a model without a head stores none,
    # and a vocabulary of unknown size is sized without full logits).
    sized_logits = "none" if outputs.logits == "full" and not resolved.vocab_size else outputs.logits
    shard_tokens = (
        cfg.shard_tokens if cfg.shard_tokens is not None else shard_tokens_for(store_arrays(logits=sized_logits))
    )
    geometry = plan(
        tokenized.lengths,
        shard_tokens=shard_tokens,
        hidden=resolved.hidden_size,
        store_dtype=outputs.store_dtype,
    )
    stages.lap("plan")
    if estimate := check_full_logits(outputs, geometry.n_tokens, resolved.vocab_size, cfg.max_full_logits_gb):
        say(estimate)

    with contextlib.ExitStack() as scope:
        if distributed:
            from pipeline import distributed as dist

            cluster = scope.enter_context(
                dist.connect(workers=cfg.workers, scheduler=cfg.scheduler, client=client, say=say)
            )
            worker_model = dist.WorkerModel(
                spec=resolved.spec.to_dict(),
                checkpoint=resolved.prepared.checkpoint,
                identity=dict(resolved.request.model),
                memo_dir=str(side),
                device=cfg.device,
                dtype=resolved.dtype,
                quantization=cfg.quantization,
                trust_remote_code=cfg.trust_remote_code,
                allow_pickle=cfg.allow_pickle,
                gpu_per_worker=dist.gpu_per_worker(cfg.workers, cfg.device),
            )
            shared = dist.share_tokenized(_arrow_file(tokenized), root)
            facts = dist.describe_model(cluster, worker_model, shared)
            has_logits, device, runner = facts["has_lm_head"], facts["device"], None
            cluster_facts = {
                "workers": cfg.workers or facts["workers"],
                "scheduler": cfg.scheduler or facts["scheduler"],
            }
        elif runner is None:
            from pipeline.models import load_model

            runner = load_model(
                resolved.spec,
                device=cfg.device,
                dtype=resolved.dtype,
                revision=cfg.revision,
                quantization=cfg.quantization,
                trust_remote_code=cfg.trust_remote_code,
                allow_pickle=cfg.allow_pickle,
                prepared=resolved.prepared,
            )
        if not distributed:
            has_logits, device = getattr(runner, "has_lm_head", True), str(runner.device)
            cluster_facts = {"workers": None, "scheduler": None}
        stages.lap("load model")
        logits_mode = outputs.logits if has_logits else "none"
        arrays = store_arrays(logits=logits_mode)
        writer = StoreWriter.open_or_create(
            root,
            resolved.request,
            geometry=geometry,
            arrays=arrays,
            layers=resolved.layers,
            n_states=resolved.n_states,
            stacks=stacks,
            examples=resolved.examples.metadata,
            aliases=(alias,),
            provenance=_provenance(cfg, device, resolved, shard_tokens) | cluster_facts,
        )
        scope.callback(writer.close)  # the writer lease, until the run is done: the store may be removed again
        # The texts and metadata are read for the last time (the store has the metadata): their
        # memory-mapped pages leave the resident set instead of staying there through the run.
        n_empty = resolved.examples.n_empty()
        MappedRanges([resolved.examples.texts, resolved.examples.metadata]).release()
        pending = writer.pending_shards()
        done = len(writer.geometry.shards) - len(pending)
        if done:
            say(f"resuming: {done}/{len(writer.geometry.shards)} shards already committed")
        if not has_logits and outputs.logits != "none":
            say(f"note: {resolved.spec.name} has no LM head in its checkpoint; no logits are stored")
        reducer = Reducer(
            layers=resolved.layers,
            stacks=stacks,
            poolings=poolings,
            store_dtype=outputs.store_dtype,
            topk=outputs.topk,
            logits=logits_mode,
            target="next" if resolved.spec.arch == "decoder_only" else "observed",
            token_level=outputs.token_level,
        )
        stages.lap("open store")
        total = sum(s.n_tokens for s in pending)
        with tqdm(total=total, unit="tok", unit_scale=True, disable=cfg.quiet, file=sys.stderr, desc="extract") as bar:
            if runner is None:
                job = dist.ShardJob(
                    model=worker_model,
                    store=str(writer.path),
                    run=writer.run,
                    tokenized=shared,
                    reducer=reducer,
                    batch_size=cfg.batch_size,
                    torch_threads=dist.local_torch_threads(cfg.workers),
                )
                stats = dist.run_on_cluster(
                    cluster, job, pending, store_key=writer.key, total_shards=len(writer.geometry.shards),
                    progress=bar, stop=stop, hooks=hooks,
                )  # fmt: skip
            else:
                stats = run_shards(
                    runner, tokenized, writer, reducer, batch_size=cfg.batch_size, progress=bar, stop=stop, hooks=hooks
                )
        stages.lap("run")
        elapsed = time.perf_counter() - started
        manifest = writer.finalize(
            stats={
                "n_truncated": tokenized.n_truncated,
                "n_empty": n_empty,
            }
        )
    _warn_nonfinite(manifest, say)
    summary = _summary(manifest, writer.path, elapsed, stats.tokens)
    summary["padding_share"] = 1 - stats.tokens / stats.computed_positions if stats.computed_positions else 0.0
    summary["computed_positions"] = stats.computed_positions
    stages.lap("finalize")
    summary["stage_seconds"] = stages.seconds
    summary["writer_seconds"] = round(stats.write_seconds, 2)
    _finish(cfg, say, out, summary | {"cache_hit": False})
    return ExtractResult(resolved.key, writer.path, False, manifest, summary)


class _Stages:
    """Wall seconds per stage of one run, for the summary (where the time went)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now


def _arrow_file(tokenized: Any) -> str:
    """The Arrow file `tokenize_examples` saved under <root>/tokenized/: all a worker needs of the data."""
    files = tokenized.dataset.cache_files
    if not files:
        raise ConfigError("the tokenized dataset has no file under the cache root for workers to read; rerun")
    return str(files[0]["filename"])


def _provenance(cfg: ExtractConfig, device: str, resolved: Resolved, shard_tokens: int) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    import zarr

    return {
        "batch_size": cfg.batch_size,
        "shard_tokens": shard_tokens,
        "device": device,
        "model_source": resolved.prepared.checkpoint.source,
        "model_path": str(resolved.prepared.checkpoint.path),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "zarr": zarr.__version__,
        },
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _warn_nonfinite(manifest: Manifest, say: Any) -> None:
    counts = manifest.stats.get("nonfinite", {})
    bad = {stack: per_layer for stack, per_layer in counts.items() if any(per_layer)}
    if bad:
        layers = {s: [manifest.layers[i] for i, n in enumerate(v) if n] for s, v in bad.items()}
        say(
            f"warning: non-finite values (inf/NaN) in stored activations: {bad} by stored layer, at layers {layers}. "
            "float16 overflows above 65504; rerun with --store-dtype bfloat16 or --store-dtype float32."
        )


def _summary(manifest: Manifest, path: Path, seconds: float, computed_tokens: int) -> dict[str, Any]:
    size = store_bytes(path)
    return {
        "key": manifest.key,
        "path": str(path),
        "complete": manifest.complete,
        "examples": manifest.geometry.n_examples,
        "tokens": manifest.geometry.n_tokens,
        "truncated": manifest.stats.get("n_truncated", 0),
        "empty": manifest.stats.get("n_empty", 0),
        "shards": len(manifest.geometry.shards),
        "bytes": size,
        "seconds": round(seconds, 2),
        "tokens_computed": computed_tokens,  # by this run: 0 on a cache hit, the pending shards' on a resume
        "tokens_per_s": round(computed_tokens / seconds, 1) if seconds > 0 and computed_tokens else None,
    }


def _finish(cfg: ExtractConfig, say: Any, out: TextIO, summary: dict[str, Any]) -> None:
    """The summary (printed, and as JSON where asked), then the store path as the last line."""
    _print_summary(say, summary)
    if cfg.summary_json:
        Path(cfg.summary_json).expanduser().write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(summary["path"], file=out, flush=True)


def _print_summary(say: Any, s: dict[str, Any]) -> None:
    rate = f", {s['tokens_per_s']:.0f} tokens/s" if s.get("tokens_per_s") else ""
    if s.get("computed_positions"):
        rate += f", {100 * s['padding_share']:.1f}% of computed positions were padding"
    state = "complete" if s["complete"] else "INCOMPLETE (rerun the same command to finish)"
    say(
        f"{state}: {s['examples']} examples, {s['tokens']} tokens ({s['truncated']} truncated, {s['empty']} empty), "
        f"{s['shards']} shards, {s['bytes'] / 2**20:.1f} MiB on disk, {s['seconds']:.1f} s{rate}"
    )
    if stages := s.get("stage_seconds"):
        times = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items())
        say(f"time: {times} (writing in the background: {s['writer_seconds']:.1f} s)")
    say(f"key {s['key']}")
