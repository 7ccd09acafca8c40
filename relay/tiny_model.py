"""A tiny character-level Qwen2 policy built locally, since no model can be downloaded here.

`build_tiny_model` writes a Hugging Face model directory (config, safetensors weights,
`tokenizer.json` with a chat template) that `from_pretrained` and vLLM load like any
hub model, so the rest of Relay keeps its real loading path.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from relay.config_models import TinyModelConfig

log = logging.getLogger(__name__)

PAD, BOS, IM_START, IM_END, UNK = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END, UNK]
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n\t"
"""The vocabulary: printable ASCII. Other characters are not representable."""

# Qwen-style chat markup kept short: every character is a token for this model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'][0] }}:{{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>a:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, plus chat special tokens."""
    # Byte-level symbols (space is "Ġ", newline "Ċ") because transformers rebuilds any
    # tokenizer of a `qwen2` model as a byte-level Qwen2Tokenizer from tokenizer.json;
    # with this vocabulary and no merges both give one token per character.
    to_symbol = {chr(b): s for b, s in zip(range(256), _byte_level_symbols(), strict=True)}
    characters = [to_symbol[c] for c in CHARACTERS]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=IM_END,
        unk_token=UNK,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: Path, shape: TinyModelConfig) -> Path:
    """Create a randomly initialised tiny Qwen2 policy and its tokenizer in `out_dir`."""
    tokenizer = build_tokenizer()
    torch.manual_seed(shape.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),  # exact: padding ids would be sampled by an untrained model
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built tiny Qwen2 (%.2fM parameters) in %s", n_params / 1e6, out_dir)
    return out_dir


def _byte_level_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest shift past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, shift = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shift))
            shift += 1
    return symbols
