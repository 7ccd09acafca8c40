"""Supervised warm start: the loss falls, the result is a loadable policy, bad envs are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.code_tests import CodeConfig, CodeEnv
from relay.errors import RelayError
from relay.warmstart import WarmstartConfig, _collate, build_examples, warmstart


def test_warmstart_lowers_the_loss_and_saves_a_policy(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = WarmstartConfig(
        steps=40, batch_size=16, lr=2e-3, warmup_steps=5, n_examples=300, out_path=tmp_path / "warm"
    )
    seen = []
    report = warmstart(
        str(tiny_model_dir),
        ArithmeticEnv(ArithmeticConfig()),
        config,
        seed=0,
        on_step=lambda s, loss: seen.append(s),
    )
    assert seen == list(range(1, 41))
    # A random 101-token model starts near ln(101) = 4.6 nats per token.
    assert report.first_loss > 3.5
    assert report.final_loss < report.first_loss - 1.0
    assert AutoModelForCausalLM.from_pretrained(report.out_path).config.model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(report.out_path).eos_token == "<|im_end|>"


def test_examples_supervise_only_the_reply(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ((ids, prompt_len),) = build_examples(ArithmeticEnv(ArithmeticConfig()), tokenizer, 1, seed=0)
    assert tokenizer.decode(ids[:prompt_len]).startswith("<|im_start|>u:")
    assert tokenizer.decode(ids[prompt_len:]).endswith("<|im_end|>")
    input_ids, attention_mask, labels = _collate(
        [(ids, prompt_len), (ids[:-1], prompt_len)], tokenizer.pad_token_id
    )
    assert (labels[0, :prompt_len] == -100).all()
    assert labels[0, prompt_len:].tolist() == ids[prompt_len:]
    assert labels[1, -1].item() == -100  # padding is not supervised
    assert input_ids[1, -1].item() == tokenizer.pad_token_id
    assert attention_mask[0].all()
    assert attention_mask[1].tolist() == [1] * (len(ids) - 1) + [0]


def test_env_without_demonstrations_is_refused(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(RelayError, match="no demonstrations"):
        build_examples(CodeEnv(CodeConfig()), tokenizer, 1, seed=0)
