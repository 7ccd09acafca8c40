"""The locally built tiny model: a character tokenizer and a Qwen2 that load like hub models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from relay.tiny_model import CHARACTERS, IM_END, build_tokenizer

TEXTS = ["12+34=46", "a b\nc", "def f(x):\n\treturn x*2  # ok", "<|im_start|>u:1+1=<|im_end|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_auto_tokenizer_matches_the_built_one(tiny_model_dir: Path, text: str) -> None:
    # transformers rebuilds a qwen2 model's tokenizer as a byte-level Qwen2Tokenizer;
    # the vocabulary is chosen so that it still gives one token per character.
    built = build_tokenizer()
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_one_token_per_character() -> None:
    tokenizer = build_tokenizer()
    assert len(tokenizer(CHARACTERS)["input_ids"]) == len(CHARACTERS)
    assert tokenizer(IM_END)["input_ids"] == [tokenizer.eos_token_id]


def test_chat_template_ends_with_the_assistant_turn(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1="}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>u:1+1=<|im_end|><|im_start|>a:"


def test_model_loads_with_from_pretrained(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert (
        model.config.hidden_size // model.config.num_attention_heads == 32
    )  # vLLM CPU needs >= 32
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)
    assert model.config.vocab_size == len(build_tokenizer())
