"""Every way loading a dataset fails ends in one error of its own type, with the cause chained and the fix named.

Each failure is the real one: a tmpfs that is full, a file-size limit, an immutable directory,
a file that is gone, a corrupt Parquet file, a Hugging Face cache without the config; and
`datasets` hands its progress-bar switch and log level back as it found them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.datasets import load_examples, resolve_dataset
from schemas import ConfigError, DatasetIOError, DatasetNotAvailableError
from tests import chaos, hfcache

REPO = Path(__file__).resolve().parents[1]


def _rows_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"sentence number {i} " * 4, "id": i}) + "\n" for i in range(n)))
    return path


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=chaos._env(), capture_output=True, text=True, **kwargs
    )


@contextlib.contextmanager
def _tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A real, small file system at `directory`: writes past `size` fail with ENOSPC. Skips where mount is refused."""
    directory.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@contextlib.contextmanager
def _immutable(directory: Path) -> Iterator[Path]:
    """`directory` with the immutable flag: even root gets EPERM creating anything in it. Skips where refused."""
    directory.mkdir(parents=True)
    done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot set the immutable flag here: {done.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


@pytest.mark.unit
def test_a_file_gone_since_it_was_resolved_is_not_available(tmp_path: Path) -> None:
    data = _rows_file(tmp_path / "rows.jsonl", 3)
    spec = resolve_dataset(str(data))
    data.unlink()
    with pytest.raises(DatasetNotAvailableError) as err:
        load_examples(spec, tmp_path / "arrow")
    message = str(err.value)
    assert repr(str(data)) in message and "does not exist" in message and "Fix: check the path" in message
    assert isinstance(err.value, FileNotFoundError)
    assert isinstance(err.value.__cause__, FileNotFoundError), "the OS's own error is chained"


@pytest.mark.unit
def test_a_full_disk_names_the_arrow_cache_and_the_fix(tmp_path: Path) -> None:
    data = _rows_file(tmp_path / "rows.jsonl", 5000)  # ~0.4 MB of rows; the file system holds 64 kB
    with _tmpfs(tmp_path / "small", "64k") as small:
        with pytest.raises(DatasetIOError) as err:
            load_examples(resolve_dataset(str(data)), small / "arrow")
    message = str(err.value)
    assert message.startswith(f"out of space writing the Arrow copy of {str(data)!r} under {str(small / 'arrow')!r}")
    assert "No space left on device" in message and "--cache-dir" in message and "MiB" in message
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert any(getattr(e, "errno", None) == errno.ENOSPC for e in _causes(err.value.__cause__))


@pytest.mark.unit
def test_an_immutable_arrow_cache_is_a_permission_error_with_the_fix(tmp_path: Path) -> None:
    data = _rows_file(tmp_path / "rows.jsonl", 3)
    with _immutable(tmp_path / "locked") as locked, pytest.raises(DatasetIOError) as err:
        load_examples(resolve_dataset(str(data)), locked)
    message = str(err.value)
    assert message.startswith(f"cannot write the Arrow copy of {str(data)!r} under {str(locked)!r}: ")
    assert "Operation not permitted" in message and "writable" in message and "--cache-dir" in message
    assert err.value.errno == errno.EPERM and isinstance(err.value.__cause__, PermissionError)


@pytest.mark.integration
def test_a_file_size_limit_through_the_cli_is_one_line_naming_the_limit(tiny_dir: Any, tmp_path: Path) -> None:
    data = _rows_file(tmp_path / "rows.jsonl", 5000)

    def limited() -> None:  # files above 100 kB fail with EFBIG (the CLI ignores SIGXFSZ, which would kill it)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    cache = tmp_path / "c"
    done = _cli("extract", "--model", str(tiny_dir("bert")), "--data", str(data), "--cache-dir", str(cache),
                preexec_fn=limited)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"actcache: error: a file-size limit stopped writing the Arrow copy of {str(data)!r}")
    assert "File too large" in lines[0] and "ulimit -f unlimited" in lines[0]


@pytest.mark.integration
def test_a_bad_jsonl_through_the_cli_is_exactly_one_line_naming_file_line_and_fix(
    tiny_dir: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    broken_line = '{"text": \n'
    bad.write_text('{"text": "fine"}\n' + broken_line, encoding="utf-8")
    with pytest.raises(ValueError) as parsed:
        json.loads(broken_line)  # the parser's own words for that line
    done = _cli("extract", "--model", str(tiny_dir("bert")), "--data", str(bad), "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 2, done.stderr
    # datasets logs "Failed to load JSON from file ..." before raising: only our line may reach the user.
    assert done.stderr == (
        f"actcache: error: could not read {str(bad)!r}: line 2 is not valid JSON ({parsed.value}). "
        "Fix: make the file valid UTF-8 .jsonl (where a line or row is named, that is where it breaks).\n"
    ), done.stderr
    assert done.stdout == ""


@pytest.mark.unit
def test_a_corrupt_parquet_file_is_the_files_fault_not_the_disks(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["a sentence"] * 500}), good)
    raw = good.read_bytes()
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(raw[:4] + bytes(len(raw) - 12) + raw[-8:])  # magic bytes and footer length kept
    with pytest.raises(ConfigError) as err:
        load_examples(resolve_dataset(str(corrupt)), tmp_path / "arrow")
    message = str(err.value)
    assert f"could not read {str(corrupt)!r}: " in message and "write it again as Parquet" in message
    # pyarrow says so with an OSError that has no errno: no system call failed.
    assert any(type(e) is OSError and e.errno is None for e in _causes(err.value))


@pytest.mark.unit
def test_an_empty_file_says_it_has_no_rows(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'.*empty.jsonl' is empty: it has no rows to read\. Fix: "):
        load_examples(resolve_dataset(str(empty)), tmp_path / "arrow")


@pytest.fixture(scope="module")
def xnli_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hf")
    hfcache.add_xnli(home, rows_per_language=1)
    return home


@pytest.mark.unit
def test_offline_a_config_not_in_the_cache_names_it_the_cached_ones_and_the_fix(
    xnli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(xnli_home))
    assert len(load_examples(resolve_dataset("xnli", config="en"))) == 2, "the cache serves a config it holds"
    with pytest.raises(DatasetNotAvailableError) as err:
        load_examples(resolve_dataset("xnli", config="en,xx"))
    message = str(err.value)
    assert "dataset 'facebook/xnli' (config 'xx')" in message and str(xnli_home / "datasets") in message
    assert "'de', 'el', 'en'" in message, "the configs the cache does hold, from datasets' own message"
    assert "--config" in message and "HF_HUB_OFFLINE" in message
    assert type(err.value.__cause__) is ValueError


@pytest.mark.unit
def test_offline_without_any_cached_copy_chains_datasets_connection_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    with pytest.raises(DatasetNotAvailableError) as err:
        load_examples(resolve_dataset("org/absent"))
    message = str(err.value)
    assert "'org/absent' is not in the local Hugging Face datasets cache" in message
    assert "OfflineModeIsEnabled" in message and "--data path.jsonl" in message
    assert type(err.value.__cause__) is ConnectionError, "datasets 5 turns huggingface_hub's error into this"


@pytest.fixture()
def datasets_state() -> Iterator[Any]:
    """The test may change datasets' switches: they are handed back afterwards."""
    import datasets

    bars, level = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    yield datasets
    datasets.logging.set_verbosity(level)
    (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()


@pytest.mark.parametrize(("bars", "level"), [(True, "INFO"), (False, "WARNING"), (True, "DEBUG")])
@pytest.mark.unit
def test_loading_and_tokenizing_hand_datasets_state_back(
    datasets_state: Any, tiny_dir: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str], bars: bool, level: str
) -> None:
    import transformers

    from pipeline.tokenize import tokenize_examples

    datasets = datasets_state
    (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()
    datasets.logging.set_verbosity(getattr(datasets.logging, level))
    before = (datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir("bert"))
    capfd.readouterr()

    examples = load_examples(resolve_dataset(str(_rows_file(tmp_path / "rows.jsonl", 20))), tmp_path / "arrow")
    assert (datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()) == before, "after a load"
    tokenize_examples(examples, tokenizer, max_length=16, cache_dir=tmp_path / "tok", tok_hash="t")
    assert (datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()) == before, "after tokenizing"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": \n', encoding="utf-8")
    with pytest.raises(ConfigError):
        load_examples(resolve_dataset(str(bad)), tmp_path / "arrow")
    assert (datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()) == before, "after a failed load"
    err = capfd.readouterr().err
    assert "examples/s" not in err, "no progress bars (Generating train split, Map) while actcache works"


@pytest.mark.unit
def test_a_user_forced_progress_bar_setting_is_left_alone(tmp_path: Path) -> None:
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import datasets; from pipeline.datasets import load_examples, resolve_dataset\n"
        f"load_examples(resolve_dataset({str(_rows_file(tmp_path / 'rows.jsonl', 3))!r}), None)\n"
        "print(datasets.is_progress_bar_enabled())\n"
    )
    env = chaos._env(HF_DATASETS_DISABLE_PROGRESS_BARS="0", HF_DATASETS_CACHE=str(tmp_path / "hfd"))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # datasets warns (here: raises) when its env switch is overridden
    assert done.stdout.strip() == "True"
    assert os.listdir(tmp_path / "hfd"), "without an arrow_cache the copy goes to datasets' own cache"
