"""Shared fixtures: a tiny Llama + byte-level BPE tokenizer built offline, and a few records.

The model folder is built once per session (well under a second) and is a normal Hugging Face
causal-LM folder, so training tests can pass its path anywhere a model name goes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rmkit.data.records import Record

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "User: how do I bake bread? Assistant: Mix flour, water, salt and yeast, then bake.",
    "User: what is a reward model? Assistant: A model that scores responses.",
    "Academic writing cites sources; business writing states the bottom line first.",
    "Stories need characters, conflict and a resolution. Poems need rhythm.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ' \" ( ) [ ] { }",
]
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>"]  # ids 0, 1, 2

# `auto` precision would be bf16 on CPUs with AMX or avx512_bf16 and fp32 on others: the tests
# pin fp32 (inherited by every subprocess they start) so they assert the same on every machine;
# tests/test_hardware.py checks `auto` itself with the pin removed
os.environ["RMKIT_PRECISION"] = "fp32"


def build_tiny_tokenizer():
    """Byte-level BPE (any text encodes, no unknown tokens); adds <bos> in front of a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def build_tiny_model(out: Path) -> Path:
    """A random 2-layer Llama (hidden 32, tied embeddings) + tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


@pytest.fixture
def tiny_records() -> list[Record]:
    """A pair, a 3-response group with a tie below the top, and a group tied at the top."""
    return [
        Record("User: how do I bake bread? Assistant:", (" Mix flour, water and yeast, then bake.", " No idea."),
               (1.0, 0.0), source="tiny", domain="business"),
        Record("User: what is a reward model? Assistant:",
               (" A model that scores responses.", " A fox.", " Bread."), (2.0, 1.0, 1.0), source="tiny",
               domain="academy"),
        Record("User: tell a story. Assistant:", (" A fox met a dog.", " Once upon a time.", " No."),
               (1.0, 1.0, 0.0), source="tiny", domain="literature"),
    ]
