"""Stores read by people who never install actcache: zarr-python, xarray and tensorstore get the same values.

Stores are written by the real pipeline (`actcache extract`) for every model family and
storage dtype, with several shards (so the token axis has gaps), top-k logits, and a
partial store (killed after two shards). Each is then read in a fresh process in which
actcache cannot be imported, using only the store's own arrays and attributes, and
compared value for value with actcache's reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache import open_activations
from schemas.store import OFFSETS, SHARD_COMMITTED, TOKEN_START, TOKEN_STOP, hidden_name
from tests import chaos
from tests.texts import SENTENCES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]

# What a metrics author with only zarr, xarray and tensorstore writes. Runs with actcache unimportable.
READER = r"""
import json, sys
for name in ("cache", "pipeline", "schemas", "tests"):
    sys.modules[name] = None  # a process without actcache
import numpy as np, tensorstore as ts, xarray as xr, zarr

path, out = sys.argv[1], sys.argv[2]
g = zarr.open_group(path, mode="r")
info = dict(g.attrs["actcache"])
start, stop = g["token_start"][:], g["token_stop"][:]
done = g["shard_committed"][:] == 1
spans = zip(g["shard_example_start"][:], g["shard_example_stop"][:], done)
examples = np.concatenate([np.arange(a, b) for a, b, d in spans if d] + [np.zeros(0, int)]).astype(int)
rows = np.concatenate([np.arange(start[i], stop[i]) for i in examples] + [np.zeros(0, int)]).astype(int)

def decode(array, values):  # the array's own attributes say how
    return (values.astype("uint32") << 16).view("float32") if "encoding" in array.attrs else values

found, report = {}, {"complete": info["complete"], "committed": done.tolist(), "gaps_are_fill": {}}
report["consolidated"] = "consolidated_metadata" in json.load(open(path + "/zarr.json"))
for name, array in g.arrays():
    dims = tuple(array.metadata.dimension_names)
    if "token" not in dims and "example" not in dims:
        continue
    axis, index = (dims.index("token"), rows) if "token" in dims else (dims.index("example"), examples)
    values = decode(array, array[...])
    found["zarr/" + name] = np.take(values, index, axis=axis)
    if array.dtype.kind in "iuf":  # tensorstore: Google's own Zarr v3 implementation
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/{name}"}}).result()
        found["ts/" + name] = np.take(decode(array, t.read().result()), index, axis=axis)
    if "token" in dims:  # rows that hold no committed token read as NaN or -1, never as data
        other = np.setdiff1d(np.arange(values.shape[axis]), rows)
        rest = np.take(values, other, axis=axis)
        report["gaps_are_fill"][name] = bool(np.isnan(rest).all() if rest.dtype.kind == "f" else (rest == -1).all())

tree = xr.open_datatree(path, engine="zarr")
ds = tree.to_dataset()
report["coords"] = sorted(str(c) for c in ds.coords)
report["layer"] = ds["layer"].values.tolist()
report["columns"] = info["metadata_columns"]
for column, name in info["metadata_columns"].items():
    found["xr/" + name] = np.array([str(v) for v in ds[name].values[examples]])
for name in ds.data_vars:
    if "token" in ds[name].dims:
        found["xr/" + name] = np.take(decode(g[name], ds[name].values), rows, axis=ds[name].dims.index("token"))
report["mean_over_tokens_keeps"] = sorted(str(v) for v in ds.mean("token").data_vars)
found = {k: v if v.dtype.kind in "iufb" else np.array([str(x) for x in v.ravel()]) for k, v in found.items()}
np.savez(out, **found)
print(json.dumps(report))
"""

CASES = {
    "bert-float16": ("bert", "float16", []),
    "mt5-bfloat16": ("mt5", "bfloat16", []),
    "llama-float32": ("llama", "float32", []),
    "xlmr-float16": ("xlmr", "float16", ["--shard-tokens", "100000"]),  # one shard, no gaps
    "bert-plain": ("bert_plain", "float16", []),
}


@pytest.fixture(scope="module")
def stores(tiny_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interop")
    data = root / "texts.jsonl"
    rows = [{"id": i, "text": t, "language": ["en", "de", "fr"][i % 3]} for i, t in enumerate(SENTENCES * 2)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    made = {}
    for case, (family, dtype, extra) in CASES.items():
        args = [
            sys.executable, "-m", "pipeline", "extract", "--model", str(tiny_dir(family)), "--data", str(data),
            "--store-dtype", dtype, "--shard-tokens", "40", *extra, "--quiet", "--cache-dir", str(root / case),
        ]  # fmt: skip
        done = subprocess.run(args, cwd=REPO, env=chaos._env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        made[case] = Path(done.stdout.strip().splitlines()[-1])
    partial = [*args[:-1], str(root / "partial")]  # the last case again, killed after its second shard
    killed = subprocess.run(
        partial, cwd=REPO, env=chaos._env(ACTCACHE_CRASH_AT="after-marker:2"), capture_output=True, timeout=300
    )
    assert killed.returncode == -9
    made["partial"] = next((root / "partial").glob("stores/*.zarr"))
    return made


def _read_without_actcache(store: Path, out: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", READER, str(store), str(out)], cwd="/", env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with np.load(out) as found:
        return json.loads(done.stdout), dict(found)


@pytest.mark.parametrize("case", [*CASES, "partial"])
def test_zarr_xarray_and_tensorstore_read_what_actcache_reads(
    stores: dict[str, Path], case: str, tmp_path: Path
) -> None:
    store = stores[case]
    report, found = _read_without_actcache(store, tmp_path / "found.npz")
    acts = open_activations(str(store), allow_partial=True)
    mine = acts.to_xarray()
    n_shards = len(acts.manifest.geometry.shards)
    assert report["complete"] == (case != "partial") == acts.manifest.complete
    assert report["consolidated"], "one read opens the store, before and after it completes"
    assert report["committed"] == [s.index in {c.index for c in acts.shards} for s in acts.manifest.geometry.shards]
    assert (sum(report["committed"]) == 2 < n_shards) if case == "partial" else all(report["committed"])
    assert report["layer"] == list(acts.layers) == mine["layer"].values.tolist()
    assert all(report["gaps_are_fill"].values()), report["gaps_are_fill"]
    skip = {OFFSETS, TOKEN_START, TOKEN_STOP, SHARD_COMMITTED}
    compared = set()
    for spec in acts.manifest.arrays:
        if spec.name in skip:
            continue
        expected = mine[spec.name].values
        for reader in ("zarr", "ts", "xr"):
            if f"{reader}/{spec.name}" in found:
                np.testing.assert_array_equal(found[f"{reader}/{spec.name}"], expected, err_msg=f"{reader} {spec.name}")
                compared.add(reader)
    assert compared == {"zarr", "ts", "xr"}
    for column, name in report["columns"].items():
        assert found[f"xr/{name}"].tolist() == acts.examples[column].astype(str).tolist()
        assert name in report["coords"], "metadata columns are coordinates in xarray"
    for stack in acts.stacks:
        assert hidden_name(stack) in report["mean_over_tokens_keeps"], "hidden states are data, not a coordinate"


def test_a_flipped_byte_raises_in_every_reader(stores: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    store = Path(shutil.copytree(stores["bert-float16"], tmp_path / "s.zarr"))
    name = hidden_name("encoder")
    chunk = next(p for p in sorted((store / name / "c").rglob("*")) if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    code = (
        "import sys\n"
        "for n in ('cache', 'pipeline', 'schemas', 'tests'): sys.modules[n] = None\n"
        "import zarr, tensorstore as ts\n"
        "path, name = sys.argv[1], sys.argv[2]\n"
        "for label, read in [('zarr', lambda: zarr.open_group(path, mode='r')[name][...]),\n"
        "    ('tensorstore', lambda: ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file',\n"
        "        'path': f'{path}/{name}'}}).result().read().result())]:\n"
        "    try:\n"
        "        read()\n"
        "        print(label, 'read it')\n"
        "    except Exception as exc:\n"
        "        print(label, 'raised', type(exc).__name__, str(exc)[:80].replace(chr(10), ' '))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(store), name], capture_output=True, text=True, cwd="/")
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["zarr"].startswith("raised") and "checksum" in lines["zarr"].lower(), done.stdout
    assert lines["tensorstore"].startswith("raised"), done.stdout
    from schemas import StoreCorruptError

    acts = open_activations(str(store))
    with pytest.raises(StoreCorruptError, match=r"shard\(s\) \[0\]: chunk file .* fails its CRC32C .*actcache verify"):
        for layer in acts.layers:
            acts.hidden(layer, lazy=False)
