"""What the key hashes is what the computation uses: pooling is chosen in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cache import open_activations
from pipeline.extract import ExtractConfig, extract
from pipeline.models import load_model
from schemas import ConfigError, OutputSpec


def test_pooling_is_spelled_once_per_choice_and_validated() -> None:
    assert OutputSpec(pooling=("first", "mean", "mean")).to_dict() == OutputSpec(pooling=("mean", "first")).to_dict()
    assert OutputSpec().poolings("encoder") == ("mean", "first")
    assert OutputSpec().poolings("decoder") == ("mean", "last")
    assert OutputSpec(pooling=("last",)).poolings("encoder") == ()
    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        OutputSpec(pooling=("max",))


@pytest.mark.integration
def test_the_pooling_asked_for_is_the_pooling_stored(tiny_dir: Any, tmp_path: Path) -> None:
    model = tiny_dir("bert")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a short one"}\n{"text": "and a longer sentence here"}\n')
    only_first = extract(ExtractConfig(model=str(model), data=str(data), pooling=("first",), cache_dir=str(tmp_path)))
    both = extract(ExtractConfig(model=str(model), data=str(data), cache_dir=str(tmp_path)))
    assert only_first.key != both.key, "pooling is keyed"
    stored = {spec.name for spec in only_first.manifest.arrays}
    assert "encoder_pooled_first" in stored and "encoder_pooled_mean" not in stored
    # Independent expectation: the [CLS] state of a direct forward pass.
    runner = load_model(str(model), device="cpu")
    texts = ["a short one", "and a longer sentence here"]
    states = runner.forward(runner.tokenize(texts)).encoder_hidden_states
    with open_activations(only_first.path) as acts:
        got = acts.pooled(layer=-1, how="first", lazy=False)
        with pytest.raises(ConfigError, match="no .mean. pooling"):
            acts.pooled(layer=-1, how="mean")
    expected = states[-1][:, 0].to(torch.float16).float().numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)
