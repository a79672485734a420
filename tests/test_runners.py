"""Every runner family against a direct Hugging Face forward pass of the same checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import transformers

from pipeline.models import (
    BaseModelRunner,
    DecoderModelRunner,
    EncoderModelRunner,
    Seq2SeqModelRunner,
    load_model,
)
from tests.factory import xlmr_tokenizer
from tests.texts import SENTENCES

pytestmark = pytest.mark.integration

EXACT = 1e-6  # same inputs, same shapes: the runner adds nothing to the arithmetic
BATCHED = 1e-5  # alone vs padded batch: other kernel shapes, float32 rounding only (abs and rel)


class RunnerConformance:
    """The contract every runner family meets; subclasses name the family and its direct model."""

    family: ClassVar[str]
    runner_class: ClassVar[type[BaseModelRunner]]
    auto_class: ClassVar[str]
    stacks: ClassVar[tuple[str, ...]]
    has_logits: ClassVar[bool] = True
    skips_head: ClassVar[bool] = True  # forward(logits=False) runs the body alone (`base_model`)

    @pytest.fixture(scope="class")
    @classmethod
    def path(cls, tiny_dir: Any) -> Path:
        return tiny_dir(cls.family)

    @pytest.fixture(scope="class")
    @classmethod
    def runner(cls, path: Path) -> BaseModelRunner:
        return load_model(path, device="cpu", dtype="fp32")

    @pytest.fixture(scope="class")
    @classmethod
    def direct(cls, path: Path) -> tuple[Any, Any]:
        model = getattr(transformers, cls.auto_class).from_pretrained(path, dtype=torch.float32)
        return model.eval(), transformers.AutoTokenizer.from_pretrained(path)

    def direct_forward(self, direct: tuple[Any, Any], text: str) -> tuple[torch.Tensor, Any]:
        model, tokenizer = direct
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return ids, model(input_ids=ids, output_hidden_states=True)

    def direct_stacks(self, out: Any) -> dict[str, tuple[torch.Tensor, ...]]:
        return {self.stacks[0]: out.hidden_states}

    def test_load_model_picks_the_family_runner(self, runner: BaseModelRunner) -> None:
        assert type(runner) is self.runner_class
        assert runner.model.config.output_hidden_states is True
        assert not runner.model.training

    @pytest.mark.parametrize("index", [0, 2, 5, 9])
    def test_single_example_equals_direct_forward(
        self, runner: BaseModelRunner, direct: tuple[Any, Any], index: int
    ) -> None:
        ids, expected = self.direct_forward(direct, SENTENCES[index])
        got = runner.forward(runner.tokenize([SENTENCES[index]]))
        assert torch.equal(got.input_ids.cpu(), ids)
        assert set(got.stacks()) == set(self.stacks)
        for name, states in self.direct_stacks(expected).items():
            mine = got.stacks()[name]
            assert len(mine) == len(states) == runner.model.config.num_hidden_layers + 1
            for layer, (a, b) in enumerate(zip(mine, states, strict=True)):
                torch.testing.assert_close(a, b, atol=EXACT, rtol=0, msg=f"{name} layer {layer}")
        if self.has_logits:
            torch.testing.assert_close(got.logits, expected.logits, atol=EXACT, rtol=0)
        else:
            assert got.logits is None

    def test_batching_does_not_change_any_example(self, runner: BaseModelRunner, direct: tuple[Any, Any]) -> None:
        texts = SENTENCES[:12]
        batch = runner.tokenize(texts)
        lengths = batch["attention_mask"].sum(1)
        assert lengths.min() < lengths.max(), "the batch must pad some examples"
        got = runner.forward(batch)
        for i, text in enumerate(texts):
            _, alone = self.direct_forward(direct, text)
            n = int(lengths[i])
            for name, states in self.direct_stacks(alone).items():
                for layer, (a, b) in enumerate(zip(got.stacks()[name], states, strict=True)):
                    torch.testing.assert_close(
                        a[i, :n],
                        b[0, :n],
                        atol=BATCHED,
                        rtol=BATCHED,
                        msg=f"example {i} {name} layer {layer}",
                    )
            if self.has_logits:
                torch.testing.assert_close(got.logits[i, :n], alone.logits[0, :n], atol=BATCHED, rtol=BATCHED)

    def test_without_logits_the_head_is_not_run_and_the_states_are_the_same(
        self, runner: BaseModelRunner, direct: tuple[Any, Any]
    ) -> None:
        """`forward(batch, logits=False)` (what `extract --logits none` asks) skips the language-model
        head where transformers gives the model a body apart from it; mT5 has none (its `base_model`
        is the model itself), so it runs whole."""
        head = runner.model.get_output_embeddings()
        calls: list[int] = []
        hook = head.register_forward_hook(lambda *_: calls.append(1)) if head is not None else None
        try:
            got = runner.forward(runner.tokenize([SENTENCES[2]]), logits=False)
        finally:
            if hook is not None:
                hook.remove()
        assert calls == ([] if self.skips_head or head is None else [1])
        assert (got.logits is None) == (self.skips_head or not self.has_logits)
        _, expected = self.direct_forward(direct, SENTENCES[2])
        for name, states in self.direct_stacks(expected).items():
            for layer, (a, b) in enumerate(zip(got.stacks()[name], states, strict=True)):
                torch.testing.assert_close(a, b, atol=EXACT, rtol=0, msg=f"{name} layer {layer}")

    def test_hidden_states_start_with_the_embeddings(self, runner: BaseModelRunner) -> None:
        batch = runner.tokenize(SENTENCES[:3])
        got = runner.forward(batch)
        with torch.no_grad():
            expected = self.embeddings(runner.model, batch)
        first = got.stacks()[self.stacks[0]][0]
        torch.testing.assert_close(first, expected, atol=EXACT, rtol=0)

    def embeddings(self, model: Any, batch: Any) -> torch.Tensor:
        """The embedding output computed from the model's own modules, without a forward pass."""
        return model.get_input_embeddings()(batch["input_ids"])


class TestBertRunner(RunnerConformance):
    family = "bert"
    runner_class = EncoderModelRunner
    auto_class = "AutoModelForMaskedLM"
    stacks = ("encoder",)

    def embeddings(self, model: Any, batch: Any) -> torch.Tensor:
        return model.base_model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])

    def test_masked_lm_head_is_loaded(self, runner: EncoderModelRunner) -> None:
        assert runner.has_lm_head
        assert isinstance(runner.model, transformers.BertForMaskedLM)


class TestBertWithoutHeadRunner(TestBertRunner):
    """A checkpoint saved as a plain `BertModel`, as LaBSE and MiniLM are."""

    family = "bert_plain"
    auto_class = "AutoModel"
    has_logits = False
    skips_head = False  # no head to skip: the checkpoint is the body

    def test_masked_lm_head_is_loaded(self, runner: EncoderModelRunner) -> None:
        assert not runner.has_lm_head, "a head missing from the checkpoint must not be invented"
        assert type(runner.model) is transformers.BertModel


class TestXlmrRunner(TestBertRunner):
    family = "xlmr"

    def embeddings(self, model: Any, batch: Any) -> torch.Tensor:
        return model.base_model.embeddings(input_ids=batch["input_ids"])

    def test_masked_lm_head_is_loaded(self, runner: EncoderModelRunner) -> None:
        assert runner.has_lm_head
        assert isinstance(runner.model, transformers.XLMRobertaForMaskedLM)


class TestLlamaRunner(RunnerConformance):
    family = "llama"
    runner_class = DecoderModelRunner
    auto_class = "AutoModelForCausalLM"
    stacks = ("decoder",)

    def test_pads_with_end_of_text_on_the_right(self, runner: DecoderModelRunner) -> None:
        assert runner.tokenizer.pad_token == "<|end_of_text|>"
        batch = runner.tokenize(["A", SENTENCES[1]])
        assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][0, 0] == 1
        assert batch["input_ids"][0, -1] == runner.tokenizer.eos_token_id


class TestMt5Runner(RunnerConformance):
    family = "mt5"
    runner_class = Seq2SeqModelRunner
    auto_class = "AutoModelForSeq2SeqLM"
    stacks = ("encoder", "decoder")
    skips_head = False  # transformers gives T5 no body apart from its head

    def direct_forward(self, direct: tuple[Any, Any], text: str) -> tuple[torch.Tensor, Any]:
        model, tokenizer = direct
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        # The documented policy, spelled out independently: [start] + input_ids[:-1].
        start = torch.full((1, 1), model.config.decoder_start_token_id)
        decoder_ids = torch.cat([start, ids[:, :-1]], dim=1)
        with torch.no_grad():
            return ids, model(input_ids=ids, decoder_input_ids=decoder_ids, output_hidden_states=True)

    def direct_stacks(self, out: Any) -> dict[str, tuple[torch.Tensor, ...]]:
        return {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}

    def test_decoder_input_policy_start(self, path: Path) -> None:
        runner = load_model(path, device="cpu", decoder_input="start")
        out = runner.forward(runner.tokenize(SENTENCES[:3]))
        assert out.decoder_hidden_states[0].shape[:2] == (3, 1)
        assert out.logits.shape[:2] == (3, 1)
        assert (out.extra["decoder_input_ids"] == runner.model.config.decoder_start_token_id).all()

    def test_cross_attentions_in_extra_on_request(self, path: Path) -> None:
        runner = load_model(path, device="cpu", output_attentions=True)
        out = runner.forward(runner.tokenize(SENTENCES[:2]))
        cross = out.extra["cross_attentions"]
        assert len(cross) == runner.model.config.num_decoder_layers
        batch, heads, target, source = cross[0].shape
        assert (batch, heads) == (2, runner.model.config.num_heads)
        assert target == source == out.input_ids.shape[1]
        # Each query's attention over real source tokens sums to one.
        torch.testing.assert_close(cross[0].sum(-1), torch.ones(batch, heads, target), atol=1e-5, rtol=0)


def test_a_bart_without_logits_runs_its_body_alone(tmp_path: Path) -> None:
    """Unlike mT5, BART-style seq2seq models have a body apart from the head (`BartModel`): with
    `logits=False` it runs alone, with the same states of both stacks and no logits."""
    tokenizer = xlmr_tokenizer()
    config = transformers.BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BartForConditionalGeneration(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    runner = load_model(tmp_path, device="cpu", dtype="fp32")
    assert type(runner) is Seq2SeqModelRunner
    batch = runner.tokenize(SENTENCES[:3])
    full, body = runner.forward(batch), runner.forward(batch, logits=False)
    assert full.logits is not None and body.logits is None
    for name in ("encoder", "decoder"):
        for layer, (a, b) in enumerate(zip(full.stacks()[name], body.stacks()[name], strict=True)):
            torch.testing.assert_close(b, a, atol=EXACT, rtol=0, msg=f"{name} layer {layer}")
