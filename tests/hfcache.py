"""A Hugging Face cache built offline, laid out as huggingface_hub and datasets lay out downloads.

Models: ``hub/models--<org>--<name>/{blobs,refs/main,snapshots/<commit>}``, each file a
content-addressed blob with a relative symlink from the snapshot, as ``hf_hub_download``
leaves them; the files themselves come from ``save_pretrained``. Datasets: what
``load_dataset`` prepares, written by the library's own Parquet builder into
``datasets/<namespace>___<name>/<config>/0.0.0/<commit>/`` (``<name>-<split>.arrow`` and
``dataset_info.json``), which is what ``datasets`` reads when offline.

    python -m tests.hfcache DIR      # build one, then: HF_HOME=DIR HF_HUB_OFFLINE=1 make extract ...
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.factory import save_tiny

# Registry id -> tiny family standing in for it.
MODELS = {
    "sentence-transformers/LaBSE": "bert_plain",
    "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2": "bert_plain",
    "bert-base-multilingual-cased": "bert",
    "xlm-roberta-base": "xlmr",
    "google/mt5-base": "mt5",
    "meta-llama/Meta-Llama-3-8B": "llama",
}
XNLI_ID = "facebook/xnli"
XNLI_COMMIT = "b8dd5d7af51114dbda02c0e3f6133f332186418e"
SAMPLE = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "xnli_sample.jsonl"


def commit_for(repo_id: str, seed: int) -> str:
    return hashlib.sha1(f"{repo_id}@{seed}".encode()).hexdigest()


def repo_dir(home: Path, repo_id: str, kind: str = "models") -> Path:
    return home / "hub" / f"{kind}--{repo_id.replace('/', '--')}"


def add_snapshot(home: Path, repo_id: str, source: Path, commit: str, *, main: bool = True) -> Path:
    """Put `source`'s files in the hub cache as snapshot `commit` (blobs + symlinks); move refs/main to it."""
    repo = repo_dir(home, repo_id)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


def add_model(home: Path, repo_id: str, family: str, *, seed: int = 0, main: bool = True) -> str:
    """A tiny `family` checkpoint (weights from `seed`) as a new commit of `repo_id`; its commit hash."""
    commit = commit_for(repo_id, seed)
    with tempfile.TemporaryDirectory() as tmp:
        add_snapshot(home, repo_id, save_tiny(family, Path(tmp), seed=seed), commit, main=main)
    return commit


def add_xnli(home: Path, rows_per_language: int = 4) -> None:
    """XNLI's 15 per-language configs, test and validation splits, from the shipped sample."""
    os.environ["HF_DATASETS_CACHE"] = str(home / "datasets")
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    namespace, name = XNLI_ID.split("/")
    with tempfile.TemporaryDirectory() as tmp:
        for language in sorted({r["language"] for r in rows}):
            mine = [r for r in rows if r["language"] == language]
            files = {}
            for split, part in (("test", mine[:rows_per_language]), ("validation", mine[-2:])):
                files[split] = [str(Path(tmp) / f"{language}-{split}.parquet")]
                table = pa.table({k: [r[k] for r in part] for k in ("premise", "hypothesis", "label")})
                pq.write_table(table, files[split][0])
            builder = Parquet(
                cache_dir=str(home / "datasets"), dataset_name=name, config_name=language,
                config_id=language, data_files=files, hash=XNLI_COMMIT,
            )  # fmt: skip
            datasets.disable_progress_bars()
            builder.download_and_prepare()
    # The builder names the folder after the dataset; a Hub download puts it under
    # '<namespace>___<name>', which is where datasets' offline lookup searches.
    shutil.move(home / "datasets" / name, home / "datasets" / f"{namespace}___{name}")
    for lock in (home / "datasets").rglob("*.lock"):
        lock.unlink()
    del os.environ["HF_DATASETS_CACHE"]


def build(home: Path) -> Path:
    """A whole cache: every registry model (on main) and XNLI."""
    for repo_id, family in MODELS.items():
        add_model(home, repo_id, family)
    add_xnli(home)
    return home


if __name__ == "__main__":
    print(build(Path(sys.argv[1]).absolute()))
