"""The data contracts: validation, round trips, and the exported names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import metrics
import pipeline.models
import schemas
from schemas import ARCHS, ConfigError, ModelSpec
from schemas.model import DTYPE_ALIASES

pytestmark = pytest.mark.unit

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**31), 2**31), names)
specs = st.builds(
    ModelSpec,
    name=names,
    hf_id=names,
    arch=st.sampled_from(ARCHS),
    dtype=st.sampled_from(sorted(DTYPE_ALIASES)),
    use_bitsandbytes=st.booleans(),
    tokenizer_kwargs=st.one_of(st.none(), st.dictionaries(names, json_scalars, max_size=4)),
    quant_bits=st.sampled_from([4, 8]),
    revision=st.one_of(st.none(), names),
    package=st.one_of(st.none(), names),
    description=names,
)


@given(specs)
def test_model_spec_round_trips_through_dict(spec: ModelSpec) -> None:
    data = spec.to_dict()
    assert ModelSpec.from_dict(data) == spec
    assert data["dtype"] in {"fp32", "fp16", "bf16"}


def test_model_spec_is_frozen_and_validated() -> None:
    spec = ModelSpec(name="x", hf_id="org/x", arch="encoder_only", dtype="bfloat16", tokenizer_kwargs={"a": 1})
    assert spec.dtype == "bf16"
    with pytest.raises(AttributeError):
        spec.name = "y"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.tokenizer_kwargs["a"] = 2  # type: ignore[index]
    with pytest.raises(ConfigError, match="unknown architecture family 'encoder'"):
        ModelSpec(name="x", hf_id="org/x", arch="encoder")
    with pytest.raises(ConfigError, match="invalid dtype 'int8'"):
        ModelSpec(name="x", hf_id="org/x", arch="seq2seq", dtype="int8")
    with pytest.raises(ConfigError, match="needs a name and an hf_id"):
        ModelSpec(name="", hf_id="org/x", arch="seq2seq")
    with pytest.raises(ConfigError, match=r"unknown ModelSpec field\(s\) \['colour'\]"):
        ModelSpec.from_dict(spec.to_dict() | {"colour": "red"})


@pytest.mark.parametrize("module", [schemas, pipeline.models, metrics])
def test_all_lists_exactly_the_public_names(module: object) -> None:
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith(module.__name__)
    }
    # isort-style order, as ruff keeps it: CONSTANTS, then Classes, then functions.
    assert sorted(module.__all__, key=lambda n: (not n.isupper(), not n[0].isupper(), n)) == module.__all__
    assert public <= set(module.__all__)
    assert all(hasattr(module, name) for name in module.__all__)


def test_schemas_imports_neither_torch_nor_the_other_layers() -> None:
    import subprocess
    import sys

    code = "import sys, schemas; print(sorted(m for m in ('torch','pipeline','cache') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@given(
    lengths=st.lists(st.integers(0, 50), max_size=60),
    shard_tokens=st.integers(1, 200),
    token_chunk=st.integers(1, 64),
    example_chunk=st.integers(1, 16),
)
def test_shard_plan_invariants(lengths: list[int], shard_tokens: int, token_chunk: int, example_chunk: int) -> None:
    from pipeline.plan import plan_geometry
    from schemas.geometry import Geometry

    g = plan_geometry(lengths, shard_tokens=shard_tokens, token_chunk=token_chunk, example_chunk=example_chunk)
    assert Geometry.from_dict(g.to_dict()) == g
    assert (g.n_examples, g.n_tokens) == (len(lengths), sum(lengths))
    ex = tok = phys = 0
    for i, s in enumerate(g.shards):
        assert s.index == i and (s.ex_start, s.tok_start) == (ex, tok)
        assert s.ex_start % example_chunk == 0 and s.phys_start % token_chunk == 0
        assert s.phys_start >= phys, "physical token regions never overlap"
        assert s.n_tokens == sum(lengths[s.ex_start : s.ex_stop]) and s.n_examples > 0
        if s.ex_stop != len(lengths):
            assert s.ex_stop % example_chunk == 0
        ex, tok, phys = s.ex_stop, s.tok_stop, s.phys_stop(token_chunk)
    assert ex == len(lengths) and tok == sum(lengths)


def test_default_shard_tokens_follow_the_bytes_a_token_stores() -> None:
    """Llama 3 8B's 33 states of 4096 bfloat16 (270 KB a token): ~1,490 tokens a shard; XLM-R base's
    13 x 768 (20 KB): the 16,384 cap; Llama 3 405B's 127 x 16384 (4.2 MB): the floor."""
    from pipeline.plan import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_TOKENS, MIN_SHARD_TOKENS, plan, shard_tokens_for
    from schemas.arrays import build_arrays

    def tokens(hidden: int, states: int, logits: str = "none", vocab: int | None = None) -> int:
        arrays = build_arrays(
            stacks={"decoder": hidden}, n_layers=states, store_dtype="bfloat16",
            poolings={"decoder": ("last", "mean")}, logits=logits, vocab=vocab,
        )  # fmt: skip
        return shard_tokens_for(arrays)

    # By hand: token id (int32) + special mask (int8) + the states; full logits add log-prob, entropy, vocab x 2.
    assert tokens(4096, 33) == DEFAULT_SHARD_BYTES // (4 + 1 + 33 * 4096 * 2) == 1489
    assert tokens(4096, 33, "full", 128_256) == DEFAULT_SHARD_BYTES // (4 + 1 + 33 * 4096 * 2 + 4 + 4 + 128_256 * 2)
    assert tokens(768, 13) == DEFAULT_SHARD_TOKENS
    assert tokens(16384, 127) == MIN_SHARD_TOKENS
    # Examples longer than a shard: one a shard, not blocks of four (4 x 8,192 tokens: 8.8 GB a buffer).
    geometry = plan([8192] * 10, shard_tokens=tokens(4096, 33), hidden=4096, store_dtype="bfloat16")
    assert [s.n_tokens for s in geometry.shards] == [8192] * 10
    geometry = plan([500] * 40, shard_tokens=tokens(4096, 33), hidden=4096, store_dtype="bfloat16")
    assert all(1489 <= s.n_tokens < 2 * 1489 for s in geometry.shards[:-1])


@given(specs, st.lists(st.integers(0, 30), min_size=1, max_size=20), st.booleans())
def test_manifest_round_trips_through_dict(spec: ModelSpec, lengths: list[int], complete: bool) -> None:
    from pipeline.plan import plan_geometry
    from schemas.arrays import build_arrays
    from schemas.manifest import Manifest

    manifest = Manifest(
        key="0" * 32,
        request={"model": spec.to_dict(), "dataset": {"content_hash": "x"}},
        geometry=plan_geometry(lengths, shard_tokens=25, token_chunk=8, example_chunk=4),
        arrays=build_arrays(
            stacks={"encoder": 16, "decoder": 16},
            n_layers=3,
            store_dtype="bfloat16",
            poolings={"encoder": ("mean", "first"), "decoder": ("last",)},
            logits="topk:5",
        ),
        layers=(0, 2, 5),
        n_states=6,
        stacks=("encoder", "decoder"),
        complete=complete,
    )
    assert Manifest.from_dict(manifest.to_dict()) == manifest


@given(
    st.one_of(
        st.just("all"),
        st.just("-1"),
        st.lists(st.integers(-13, 12), min_size=1, max_size=5).map(lambda v: ",".join(map(str, v))),
    )
)
def test_output_spec_round_trip_and_layer_resolution(layers: str) -> None:
    from schemas.request import OutputSpec

    spec = OutputSpec(layers=layers)
    assert OutputSpec.from_dict(spec.to_dict()) == spec
    resolved = spec.resolve_layers(13)
    assert list(resolved) == sorted(set(resolved)) and all(0 <= i < 13 for i in resolved)


@pytest.mark.parametrize("bad", ["topk:0", "topk:-2", "topk", "top5", "all", ""])
def test_invalid_logits_modes(bad: str) -> None:
    from schemas.request import OutputSpec

    with pytest.raises(ConfigError, match="'topk:K' with K >= 1"):
        OutputSpec(logits=bad)


def test_invalid_layers_and_store_dtype() -> None:
    from schemas.request import OutputSpec

    with pytest.raises(ConfigError, match="layer 13 is out of range.*13 hidden states"):
        OutputSpec(layers="0,13").resolve_layers(13)
    with pytest.raises(ConfigError, match="invalid layers 'x,y'"):
        OutputSpec(layers="x,y")
    with pytest.raises(ConfigError, match="invalid storage dtype 'int8'"):
        OutputSpec(store_dtype="int8")
