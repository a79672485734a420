"""Icechunk vs plain zarr + fsspec (s3fs) writing the same activation array to a moto S3 server.

Run in its own venv (icechunk is no dependency of actcache):
    python3 -m venv /tmp/icevenv
    /tmp/icevenv/bin/pip install icechunk zarr==3.1.6 s3fs "moto[server]" numcodecs tensorstore
    /tmp/icevenv/bin/python bench/icechunk_vs_zarr.py [--tokens N] [--reps R] [--skip-bench] [--skip-interop]
        [--obstore]

The moto server runs in its own (spawned) process, a fresh one per timed run (so its memory is freed and
its GIL is not the client's), wrapped by a WSGI middleware that counts requests per method and body bytes.

Variants, alternated round-robin, R reps each:
  zarr+fsspec   zarr.open_group("s3://...") (FsspecStore over s3fs), per shard: the shard's chunks, then
                one small JSON marker PUT (the project's manifest-last protocol)
  zarr+obstore  (only with --obstore) the same layout and markers through zarr.storage.ObjectStore
                (obstore, Rust S3 client)
  ice/shard     Icechunk, one writable session + commit per shard (per-shard atomic commit)
  ice/once      Icechunk, one writable session for all shards, one commit at the end
Array: uint16 (13, tokens, 768), chunks (1, 4096, 768), zstd level 1 (zarr's ZstdCodec) in all three;
fill_value 0; shards of 4096*8 tokens written with arr[:, a:b, :] = block (zarr's default async concurrency).
Timed: from creating the group/array (or repository) to the last marker/commit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import time
import traceback

import numpy as np

LAYERS, HIDDEN, CHUNK_TOK, SHARD_TOK = 13, 768, 4096, 4096 * 8
METHODS = ["GET", "PUT", "POST", "HEAD", "DELETE", "OTHER"]
BYTES_IN = len(METHODS)
COND_PUT = BYTES_IN + 1  # PUTs carrying If-Match / If-None-Match (conditional writes)
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# ----------------------------------------------------------------------------- moto server (child process)
def _serve(port_q, counts) -> None:
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    app = DomainDispatcherApplication(create_backend_app)

    def counting(environ, start_response):
        m = environ.get("REQUEST_METHOD", "OTHER")
        i = METHODS.index(m) if m in METHODS else METHODS.index("OTHER")
        with counts.get_lock():
            counts[i] += 1
            counts[BYTES_IN] += int(environ.get("CONTENT_LENGTH") or 0)
            if m == "PUT" and ("HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ):
                counts[COND_PUT] += 1
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
    port_q.put(server.server_address[1])
    server.serve_forever()


class Server:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.counts = ctx.Array("q", len(METHODS) + 2)
        q = ctx.Queue()
        self.proc = ctx.Process(target=_serve, args=(q, self.counts), daemon=True)
        self.proc.start()
        self.endpoint = f"http://127.0.0.1:{q.get(timeout=60)}"
        os.environ.update(CREDS, AWS_ENDPOINT_URL=self.endpoint)
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket="bench")

    def reset(self) -> None:
        with self.counts.get_lock():
            for i in range(len(self.counts)):
                self.counts[i] = 0

    def snapshot(self) -> dict[str, int]:
        with self.counts.get_lock():
            c = list(self.counts)
        out = {m: c[i] for i, m in enumerate(METHODS) if c[i]}
        out["cond_PUT"] = c[COND_PUT]
        out["MB_in"] = round(c[BYTES_IN] / 1e6, 1)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


# ----------------------------------------------------------------------------- writers
def storage_options(ep: str) -> dict:
    return {"endpoint_url": ep, "key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}


def ice_storage(ep: str, prefix: str):
    import icechunk

    return icechunk.s3_storage(
        bucket="bench",
        prefix=prefix,
        region="us-east-1",
        endpoint_url=ep,
        allow_http=True,
        access_key_id="testing",
        secret_access_key="testing",
        force_path_style=True,
    )


def create_array(group, tokens: int):
    import zarr

    return group.create_array(
        "layers",
        shape=(LAYERS, tokens, HIDDEN),
        chunks=(1, CHUNK_TOK, HIDDEN),
        dtype="uint16",
        compressors=zarr.codecs.ZstdCodec(level=1),
        fill_value=0,
    )


def shards(tokens: int):
    return [(a, min(a + SHARD_TOK, tokens)) for a in range(0, tokens, SHARD_TOK)]


def write_plain(ep: str, prefix: str, tokens: int, block: np.ndarray) -> None:
    import s3fs
    import zarr

    marker_fs = s3fs.S3FileSystem(endpoint_url=ep, key="testing", secret="testing", skip_instance_cache=True)
    group = zarr.open_group(f"s3://bench/{prefix}", mode="w", storage_options=storage_options(ep))
    arr = create_array(group, tokens)
    for i, (a, b) in enumerate(shards(tokens)):
        arr[:, a:b, :] = block[:, : b - a, :]
        marker = json.dumps({"shard": i, "start": a, "stop": b, "committed": True}).encode()
        marker_fs.pipe_file(f"bench/{prefix}/shards/{i:05d}.json", marker)


def write_obstore(ep: str, prefix: str, tokens: int, block: np.ndarray) -> None:
    """Same plain layout and marker protocol as write_plain, through zarr's ObjectStore on obstore (Rust client)."""
    import obstore
    import zarr
    from obstore.store import S3Store

    s3 = S3Store(
        "bench",
        prefix=prefix,
        endpoint=ep,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
        client_options={"allow_http": True},
    )
    group = zarr.open_group(zarr.storage.ObjectStore(s3), mode="w")
    arr = create_array(group, tokens)
    for i, (a, b) in enumerate(shards(tokens)):
        arr[:, a:b, :] = block[:, : b - a, :]
        obstore.put(s3, f"shards/{i:05d}.json", json.dumps({"shard": i, "start": a, "stop": b}).encode())


def write_ice(ep: str, prefix: str, tokens: int, block: np.ndarray, per_shard: bool) -> None:
    import icechunk
    import zarr

    repo = icechunk.Repository.create(ice_storage(ep, prefix))
    session = repo.writable_session("main")
    arr = create_array(zarr.group(store=session.store), tokens)
    for i, (a, b) in enumerate(shards(tokens)):
        if per_shard and i > 0:
            session = repo.writable_session("main")
            arr = zarr.open_array(session.store, path="layers", mode="r+")
        arr[:, a:b, :] = block[:, : b - a, :]
        if per_shard:
            session.commit(f"shard {i}")
    if not per_shard:
        session.commit("all shards")


VARIANTS = {
    "zarr+fsspec (marker/shard)": lambda ep, t, blk: write_plain(ep, "plain", t, blk),
    "icechunk (commit/shard)": lambda ep, t, blk: write_ice(ep, "ice", t, blk, per_shard=True),
    "icechunk (one commit)": lambda ep, t, blk: write_ice(ep, "ice", t, blk, per_shard=False),
}


def bench(tokens: int, reps: int) -> None:
    rng = np.random.default_rng(0)
    block = rng.standard_normal((LAYERS, SHARD_TOK, HIDDEN), dtype=np.float32).astype(np.float16).view(np.uint16)
    import numcodecs

    sample = block[0, :CHUNK_TOK].tobytes()
    ratio = len(numcodecs.Zstd(level=1).encode(sample)) / len(sample)
    nbytes = LAYERS * tokens * HIDDEN * 2
    print(
        f"array uint16 {(LAYERS, tokens, HIDDEN)} = {nbytes / 1e9:.2f} GB uncompressed, {len(shards(tokens))} shards "
        f"of {SHARD_TOK} tokens, {LAYERS * -(-tokens // CHUNK_TOK)} chunks; zstd-1 ratio {ratio:.3f}",
        flush=True,
    )
    results: dict[str, list[tuple[float, dict]]] = {k: [] for k in VARIANTS}
    for r in range(reps):
        for name, fn in VARIANTS.items():
            server = Server()
            try:
                server.reset()
                t0 = time.perf_counter()
                fn(server.endpoint, tokens, block)
                dt = time.perf_counter() - t0
                counts = server.snapshot()
            finally:
                server.stop()
            results[name].append((dt, counts))
            print(f"  rep {r} {name:28s} {dt:7.2f} s  {nbytes / 1e6 / dt:7.1f} MB/s  {counts}", flush=True)
    print("\n| variant | median s | median MB/s | best MB/s | requests (last rep) |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        times = [t for t, _ in runs]
        med = statistics.median(times)
        print(f"| {name} | {med:.2f} | {nbytes / 1e6 / med:.1f} | {nbytes / 1e6 / min(times):.1f} | {runs[-1][1]} |")


# ----------------------------------------------------------------------------- interop + distributed writers
def _try(label: str, fn) -> None:
    try:
        out = fn()
        print(f"  YES  {label}: {out}")
    except Exception as e:  # report, keep going
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"  NO   {label}: {msg[:400]}")


def _fork_worker(blob: bytes, a: int, b: int) -> bytes:
    import zarr

    fork = pickle.loads(blob)
    arr = zarr.open_array(fork.store, path="layers", mode="r+")
    arr[:, a:b, :] = np.full((LAYERS, b - a, HIDDEN), 7, np.uint16)
    return pickle.dumps(fork)


def interop() -> None:
    import icechunk
    import tensorstore as ts
    import zarr

    server = Server()
    ep = server.endpoint
    try:
        tokens = 2 * CHUNK_TOK
        rng = np.random.default_rng(1)
        data = rng.standard_normal((LAYERS, tokens, HIDDEN), dtype=np.float32).astype(np.float16).view(np.uint16)
        group = zarr.open_group("s3://bench/plain", mode="w", storage_options=storage_options(ep))
        create_array(group, tokens)[:] = data
        repo = icechunk.Repository.create(ice_storage(ep, "ice"))
        s = repo.writable_session("main")
        create_array(zarr.group(store=s.store), tokens)[:] = data
        s.commit("interop")
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=ep, key="testing", secret="testing", skip_instance_cache=True)
        print("objects under plain/:", sorted(p.split("bench/")[1] for p in fs.find("bench/plain"))[:6], "...")
        print("objects under ice/:  ", sorted(p.split("bench/")[1] for p in fs.find("bench/ice")))

        def zarr_read(prefix):
            g = zarr.open_group(f"s3://bench/{prefix}", mode="r", storage_options=storage_options(ep))
            a = g["layers"][:]
            return f"equal={np.array_equal(a, data)}"

        def ts_read(prefix):
            spec = {
                "driver": "zarr3",
                "kvstore": {
                    "driver": "s3",
                    "bucket": "bench",
                    "path": f"{prefix}/layers/",
                    "endpoint": ep,
                    "aws_region": "us-east-1",
                },
            }
            a = ts.open(spec, read=True).result().read().result()
            return f"equal={np.array_equal(a, data)}"

        def ice_read():
            r = icechunk.Repository.open(ice_storage(ep, "ice"))
            a = zarr.open_array(r.readonly_session("main").store, path="layers", mode="r")[:]
            return f"equal={np.array_equal(a, data)}"

        print("interop:")
        _try("plain store   <- zarr.open_group('s3://bench/plain') (FsspecStore)", lambda: zarr_read("plain"))
        _try("plain store   <- tensorstore zarr3 + s3 kvstore", lambda: ts_read("plain"))
        _try("icechunk repo <- zarr.open_group('s3://bench/ice') (FsspecStore, no icechunk)", lambda: zarr_read("ice"))
        _try("icechunk repo <- tensorstore zarr3 + s3 kvstore on ice/", lambda: ts_read("ice"))
        _try("icechunk repo <- icechunk Repository.open + zarr", ice_read)

        print("distributed writers:")

        # (a) fork/merge: coordinator forks, pickled ForkSessions go to 2 worker processes, coordinator merges + commits
        def fork_merge():
            from concurrent.futures import ProcessPoolExecutor

            s = repo.writable_session("main")
            forks = [s.fork() for _ in range(2)]
            with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
                done = list(
                    pool.map(_fork_worker, [pickle.dumps(f) for f in forks], [0, CHUNK_TOK], [CHUNK_TOK, 2 * CHUNK_TOK])
                )
            s.merge(*[pickle.loads(b) for b in done])
            sid = s.commit("fork/merge")
            a = zarr.open_array(repo.readonly_session("main").store, path="layers", mode="r")[:]
            return f"snapshot {sid}, all 7s={bool((a == 7).all())}"

        _try("fork -> pickle -> 2 spawned workers write disjoint chunks -> merge -> one commit", fork_merge)

        # (b) two independent writable sessions from the same snapshot, disjoint chunks
        def two_sessions(rebase):
            sa, sb = repo.writable_session("main"), repo.writable_session("main")
            zarr.open_array(sa.store, path="layers", mode="r+")[0, :CHUNK_TOK] = 1
            zarr.open_array(sb.store, path="layers", mode="r+")[1, :CHUNK_TOK] = 2
            sa.commit("a")
            return sb.commit("b", rebase_with=icechunk.ConflictDetector() if rebase else None)

        _try("2 sessions, disjoint chunks, 2nd commit without rebase_with", lambda: two_sessions(False))
        _try("2 sessions, disjoint chunks, 2nd commit(rebase_with=ConflictDetector())", lambda: two_sessions(True))

        def same_chunk():
            sa, sb = repo.writable_session("main"), repo.writable_session("main")
            zarr.open_array(sa.store, path="layers", mode="r+")[2, :CHUNK_TOK] = 3
            zarr.open_array(sb.store, path="layers", mode="r+")[2, :CHUNK_TOK] = 4
            sa.commit("a")
            return sb.commit("b", rebase_with=icechunk.ConflictDetector())

        _try("2 sessions, SAME chunk, 2nd commit(rebase_with=ConflictDetector())", same_chunk)
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-interop", action="store_true")
    p.add_argument(
        "--obstore",
        action="store_true",
        help="add zarr.storage.ObjectStore (obstore) as a 4th variant; "
        "note it sends ~5.6 MB chunks as multipart uploads (PUT parts + POSTs), not one PUT each",
    )
    args = p.parse_args()
    import icechunk
    import moto
    import numcodecs
    import s3fs
    import zarr

    print(
        f"python {sys.version.split()[0]} icechunk {icechunk.__version__} zarr {zarr.__version__} s3fs "
        f"{s3fs.__version__} moto {moto.__version__} numcodecs {numcodecs.__version__} numpy {np.__version__}; "
        f"zarr async.concurrency={zarr.config.get('async.concurrency')}; cpus={os.cpu_count()}",
        flush=True,
    )
    t0 = time.perf_counter()
    if args.obstore:
        VARIANTS["zarr+obstore (marker/shard)"] = lambda ep, t, blk: write_obstore(ep, "obs", t, blk)
    if not args.skip_bench:
        bench(args.tokens, args.reps)
    if not args.skip_interop:
        try:
            interop()
        except Exception:
            traceback.print_exc()
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
