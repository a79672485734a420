"""Checkpoint resolution: a spec -> a local directory of config, tokenizer and weights, with its identity.

Order: a local directory named by ``hf_id``; the Python package named by ``spec.package``
(unless a revision is pinned); the local Hugging Face cache; a download, unless offline.
Loading then happens from that directory only, so transformers never goes to the network
(and never sits in its retry loop when there is none).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cache.files import write_json
from cache.keys import hash_value
from cache.paths import hash_memo_path
from schemas import CheckpointError, ModelNotAvailableError, ModelSpec, UnsafeCheckpointError

__all__ = [
    "ResolvedCheckpoint",
    "check_weights",
    "content_hash",
    "hf_cache_dir",
    "is_offline",
    "load_config",
    "read_config",
    "resolve_checkpoint",
]

SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Files that define the values a checkpoint produces; README/.gitattributes etc. do not.
_IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".py")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint on local disk.

    `source` says where it came from ('local' directory, 'package', Hugging Face 'hub' cache);
    `revision` is the resolved commit hash for the Hub and None otherwise, where
    `content_hash(path)` identifies the files instead.
    """

    path: Path
    hf_id: str
    source: Literal["local", "package", "hub"]
    revision: str | None = None

    def identity(self, memo_dir: Path | None = None) -> dict[str, str]:
        """What pins these weights: the Hub commit, else a hash of the files (digests remembered under `memo_dir`)."""
        if self.revision is not None:
            return {"hf_id": self.hf_id, "revision": self.revision}
        return {"hf_id": self.hf_id, "content_hash": content_hash(self.path, memo_dir)}


def is_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read now rather than at import."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_cache_dir(kind: Literal["hub", "datasets"] = "hub") -> Path:
    """The Hugging Face cache in force now: $HF_HUB_CACHE / $HF_DATASETS_CACHE, else $HF_HOME/<kind>.

    Read at call time: huggingface_hub and datasets fix theirs when first imported.
    """
    override = os.environ.get({"hub": "HF_HUB_CACHE", "datasets": "HF_DATASETS_CACHE"}[kind])
    if override:
        return Path(override).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / kind


def resolve_checkpoint(spec: ModelSpec, revision: str | None = None) -> ResolvedCheckpoint:
    """Find `spec`'s checkpoint on disk, downloading it only when online and not cached."""
    revision = revision if revision is not None else spec.revision
    local = Path(spec.hf_id).expanduser()
    if local.is_dir():
        return ResolvedCheckpoint(local.resolve(), spec.hf_id, "local")
    if spec.package and revision is None:
        packaged = _package_path(spec.package)
        if packaged is not None:
            return ResolvedCheckpoint(packaged, spec.hf_id, "package")
    return _resolve_hub(spec.hf_id, revision)


def _package_path(package: str) -> Path | None:
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    path = Path(module.get_model_path())
    return path.resolve() if path.is_dir() else None


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedCheckpoint:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        found = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        if is_offline():
            pinned = f" at revision {revision!r}" if revision else ""
            raise ModelNotAvailableError(
                f"model {repo_id!r}{pinned} is not in the local Hugging Face cache {str(cache)!r} "
                "and downloads are off (HF_HUB_OFFLINE=1). Fix: run once with network access "
                "(unset HF_HUB_OFFLINE) to download it, point HF_HOME/HF_HUB_CACHE at a cache "
                "that holds it, or pass the path of a local model directory instead."
            ) from None
        found = _download(repo_id, revision, cache)
    path = Path(found)
    return ResolvedCheckpoint(path, repo_id, "hub", revision=path.name)  # snapshots/<commit>


def _download(repo_id: str, revision: str | None, cache: Path) -> str:
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = [s.rfilename for s in HfApi().model_info(repo_id, revision=revision).siblings or []]
        # Prefer safetensors: skip pickle, TF, Flax and ONNX weights when they are there.
        ignore = None
        if any(f.endswith(".safetensors") for f in files):
            ignore = [*PICKLE_WEIGHTS, "*.h5", "*.msgpack", "*.onnx", "onnx/*", "openvino/*"]
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, ignore_patterns=ignore)
    except (OSError, ValueError) as exc:  # the Hub's errors (HfHubHTTPError is an OSError), the network, the disk
        raise ModelNotAvailableError(
            f"could not download model {repo_id!r} into {str(cache)!r}: {exc}. Fix: check the id "
            "and your network or token, or pass the path of a local model directory."
        ) from exc


def read_config(path: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory; `CheckpointError` when there is none."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face model directory. "
            "Fix: point at the directory that save_pretrained() wrote."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{str(config_file)!r} is not valid JSON ({exc}). Fix: rewrite it with save_pretrained()."
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{str(config_file)!r} holds a JSON {type(config).__name__}, not an object of settings. "
            "Fix: rewrite it with save_pretrained()."
        )
    for name in _SIZE_FIELDS:
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise CheckpointError(
                f"{str(config_file)!r}: {name} is {value!r}, not a whole number of 0 or more. "
                "Fix: correct it, or rewrite the config with save_pretrained()."
            )
    return config


def load_config(path: Path, *, trust_remote_code: bool = False) -> Any:
    """The transformers config object of a model directory (no weights read)."""
    from transformers import AutoConfig

    read_config(path)  # a missing or broken config.json gets its own message
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"transformers cannot read the config of {str(path)!r}: {exc}. Fix: rewrite it with save_pretrained()."
        ) from exc


_SIZE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
    "max_position_embeddings", "d_model", "num_layers", "num_decoder_layers", "num_heads", "d_ff", "n_layer", "n_embd",
)  # fmt: skip


def check_weight_files(path: Path) -> None:
    """`CheckpointError` naming a weight file that is truncated or not what its name says.

    A safetensors file is an 8-byte header length, a JSON header and the tensors, whose
    offsets the header gives: the file must be exactly that long. A .bin is a zip archive
    (torch.save) whose directory must be whole. Nothing but the headers is read.
    """
    fix = "Fix: copy or save the weights again (save_pretrained()); the file is damaged or not a weight file."
    for file in sorted(p for pattern in SAFE_WEIGHTS for p in path.glob(pattern)):
        try:
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size)) if 0 < size < 100 << 20 else None
        except (ValueError, UnicodeDecodeError):
            header = None
        ends = [
            t["data_offsets"][1]
            for k, t in (header.items() if isinstance(header, dict) else ())
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2
        ]
        if not isinstance(header, dict) or file.stat().st_size != 8 + size + max(ends, default=0):
            raise CheckpointError(f"weight file {str(file)!r} is not a whole safetensors file. {fix}")
    if any(path.glob("*.safetensors")):
        return  # transformers loads those, never the pickles beside them
    for file in sorted(p for pattern in PICKLE_WEIGHTS for p in path.glob(pattern)):
        if not zipfile.is_zipfile(file):
            raise CheckpointError(f"weight file {str(file)!r} is not a whole torch.save archive. {fix}")


def check_weights(path: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> bool:
    """Refuse directories that cannot be loaded safely or whole; return True when weights are safetensors."""
    config = read_config(path)
    if "auto_map" in config and not trust_remote_code:
        raise UnsafeCheckpointError(
            f"{str(path)!r} ships its own model code (auto_map in config.json); loading it runs "
            "that code. Fix: pass trust_remote_code=True (--trust-remote-code) if you trust it."
        )
    if any(any(path.glob(pattern)) for pattern in SAFE_WEIGHTS):
        check_weight_files(path)
        return True
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if not pickles:
        raise CheckpointError(
            f"{str(path)!r} holds no weight files (no *.safetensors, no pytorch_model.bin). "
            "Fix: save the model there with save_pretrained(), or pass another directory."
        )
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{str(path)!r} has only pickle weights ({', '.join(pickles)}); unpickling runs "
            "arbitrary code. Fix: convert them to safetensors, or pass allow_pickle=True "
            "(--allow-pickle) if you trust the files."
        )
    check_weight_files(path)
    return False


def content_hash(path: Path, memo_dir: Path | None = None) -> str:
    """The `Hasher` digest (64 hex) of the (name, SHA-256) pairs of the files that determine a checkpoint's outputs.

    With `memo_dir` (a cache root), each file's digest is remembered there under its
    (size, mtime, ctime, inode), so a run reads only the files that changed since the last:
    a cache hit on a 16 GB local directory reads none of it.
    """
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _IDENTITY_SUFFIXES)
    memo_file = hash_memo_path(memo_dir, root) if memo_dir is not None else None
    known = _read_memo(memo_file, root)
    current: dict[str, dict[str, Any]] = {}
    for file in files:
        st = file.stat()
        name = file.relative_to(root).as_posix()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = known.get(name)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp:
            entry = {"stamp": stamp, "sha256": _file_sha256(file)}
        current[name] = entry
    if memo_file is not None and current != known:
        with contextlib.suppress(OSError):  # a read-only cache only costs the next run a rehash
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(memo_file, {"directory": str(root), "files": current})
    # Typed and length-prefixed: no file name can run into the next digest, as a joined string could.
    return hash_value([[name, entry["sha256"]] for name, entry in current.items()], length=None)


def _read_memo(memo_file: Path | None, root: Path) -> dict[str, Any]:
    """The remembered digests of `root`'s files; empty when there are none or the file is unreadable."""
    if memo_file is None:
        return {}
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(memo, dict) or memo.get("directory") != str(root) or not isinstance(memo.get("files"), dict):
        return {}
    return dict(memo["files"])


def _file_sha256(file: Path) -> str:
    """The plain SHA-256 of a file's bytes (what `sha256sum` prints and the Hub's LFS pointers hold), read in blocks."""
    with open(file, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
