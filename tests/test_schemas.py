"""The data contracts: validation, round trips, and the exported names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    spec = ModelSpec(
        name="x", hf_id="org/x", arch="encoder_only", dtype="bfloat16", tokenizer_kwargs={"a": 1}
    )
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


@pytest.mark.parametrize("module", [schemas, pipeline.models])
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
