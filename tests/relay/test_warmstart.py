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


def test_warmstart_stops_once_the_target_accuracy_is_reached(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import relay.warmstart

    # The checks' figures, in order (a double for the greedy decoding of held-out prompts).
    figures = iter([0.05, 0.2, 0.35, 0.9])
    checked_at = []

    def check(model: object, tokenizer: object, env: object, prompts: list, max_tokens: int):
        checked_at.append(len(prompts))
        return next(figures)

    monkeypatch.setattr(relay.warmstart, "greedy_accuracy", check)
    config = WarmstartConfig(
        steps=100, batch_size=8, n_examples=100, out_path=tmp_path / "warm",
        stop_at_accuracy=0.3, check_every_steps=10, check_prompts=20,
    )  # fmt: skip
    report = warmstart(str(tiny_model_dir), ArithmeticEnv(ArithmeticConfig()), config, seed=0)
    assert (report.steps, report.checked_accuracy) == (30, 0.35)  # the third check reached it
    assert checked_at == [20, 20, 20]
    assert (report.out_path / "config.json").is_file()
