"""Tiny random checkpoints of every model family, built offline from configs.

Each is a real `save_pretrained` directory (config, safetensors weights, tokenizer trained
with the `tokenizers` library and wrapped in the family's own tokenizer class), so the
runners load it exactly as they would a downloaded checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tests.texts import TRAINING_CORPUS

HIDDEN = 32
LAYERS = 2
MAX_LEN = 64
VOCAB = 300

FAMILIES = ("bert", "bert_plain", "xlmr", "mt5", "llama", "llama_wide")


def _train(tokenizer: Tokenizer, trainer: trainers.Trainer) -> Tokenizer:
    tokenizer.train_from_iterator(TRAINING_CORPUS, trainer=trainer)
    return tokenizer


def bert_tokenizer() -> transformers.PreTrainedTokenizerBase:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    _train(tok, trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return transformers.BertTokenizer(
        tokenizer_object=tok, do_lower_case=False, model_max_length=MAX_LEN,
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
    )  # fmt: skip


def _unigram(specials: list[str], unk: str) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return _train(tok, trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials, unk_token=unk))


def xlmr_tokenizer() -> transformers.PreTrainedTokenizerBase:
    tok = _unigram(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return transformers.XLMRobertaTokenizer(tokenizer_object=tok, model_max_length=MAX_LEN)


def mt5_tokenizer() -> transformers.PreTrainedTokenizerBase:
    tok = _unigram(["<pad>", "</s>", "<unk>"], "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.T5Tokenizer(tokenizer_object=tok, extra_ids=0, model_max_length=MAX_LEN)


def llama_tokenizer() -> transformers.PreTrainedTokenizerBase:
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _train(
        tok,
        trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=[bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    # Like the real Llama 3 checkpoint: a byte-level BPE in the generic fast class, no pad token.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, model_max_length=MAX_LEN
    )


def _bert_config(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=MAX_LEN, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def build_bert() -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    tokenizer = bert_tokenizer()
    return transformers.BertForMaskedLM(_bert_config(tokenizer)), tokenizer


def build_bert_plain() -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    """A sentence-encoder-shaped checkpoint: `BertModel`, no masked-LM head (like LaBSE, MiniLM)."""
    tokenizer = bert_tokenizer()
    return transformers.BertModel(_bert_config(tokenizer)), tokenizer


def build_xlmr() -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    tokenizer = xlmr_tokenizer()
    config = transformers.XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=MAX_LEN + 2,  # positions start after the pad id
        pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
    )  # fmt: skip
    return transformers.XLMRobertaForMaskedLM(config), tokenizer


def build_mt5() -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    tokenizer = mt5_tokenizer()
    config = transformers.MT5Config(
        vocab_size=len(tokenizer), d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=4, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.MT5ForConditionalGeneration(config), tokenizer


def build_llama(hidden: int = HIDDEN) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    tokenizer = llama_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN * 2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config), tokenizer


def build_llama_wide() -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    """A Llama whose every quantized layer fits bitsandbytes' packed AVX512-BF16 4-bit kernel.

    That kernel needs in_features % 64 == 0 and out_features % 32 == 0: q/o 64 -> 64, k/v
    64 -> 32 (2 kv heads of 16), gate/up 64 -> 128, down 128 -> 64.
    """
    return build_llama(hidden=2 * HIDDEN)


BUILDERS: dict[str, Callable[[], tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]]] = {
    "bert": build_bert,
    "bert_plain": build_bert_plain,
    "xlmr": build_xlmr,
    "mt5": build_mt5,
    "llama": build_llama,
    "llama_wide": build_llama_wide,
}


def save_tiny(family: str, directory: Path, seed: int = 0) -> Path:
    """Build the tiny `family` checkpoint with a fixed seed and `save_pretrained` it to `directory`."""
    torch.manual_seed(seed)
    model, tokenizer = BUILDERS[family]()
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
