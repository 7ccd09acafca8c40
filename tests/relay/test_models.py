"""Models as users bring them: hub ids resolved once, another tokenizer or chat template,
tokenizers without a pad token, and learner batches on the engine's device."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.episodes import render_prompt
from envs.base import Message
from learner.advantages import grpo_no_std
from learner.batching import build_batch, padding_id
from relay.config import RunConfig
from relay.errors import RelayError
from relay.models import prepare_model, resolve_model_path
from tests.learner.synthetic import arithmetic_groups

TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "


def resolve_offline(hub_cache: Path, repo_id: str) -> subprocess.CompletedProcess:
    """`resolve_model_path` in a process of its own: huggingface_hub reads HF_HUB_OFFLINE
    and the cache location when imported."""
    code = (
        "import sys\nfrom relay.models import resolve_model_path\nfrom relay.errors import "
        "RelayError\ntry:\n    print(resolve_model_path(sys.argv[1], 'model.path'))\n"
        "except RelayError as e:\n    print(e)\n    sys.exit(1)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    return subprocess.run([sys.executable, "-c", code, repo_id], env=env, text=True,
                          capture_output=True, timeout=120)  # fmt: skip


def test_a_hub_id_resolves_to_its_snapshot_and_a_missing_one_says_why(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The layout huggingface_hub keeps: a snapshot per revision, refs/main naming it.
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    found = resolve_offline(tmp_path / "hub", "someone/tiny")
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == repo / "snapshots" / "0123abcd"

    missing = resolve_offline(tmp_path / "hub", "someone/absent")
    assert missing.returncode == 1, missing.stderr
    assert "model.path: 'someone/absent' is not a local directory" in missing.stdout
    assert "Hugging Face hub" in missing.stdout

    with pytest.raises(RelayError, match=r"model.path: no config.json in .*empty: run `relay"):
        (tmp_path / "empty").mkdir()
        resolve_model_path(str(tmp_path / "empty"), "model.path")
    assert resolve_model_path(str(tiny_model_dir), "model.path") == str(tiny_model_dir)


def test_a_chat_template_and_tokenizer_of_ones_own(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    settings = {"path": str(tiny_model_dir), "tokenizer_path": str(tiny_model_dir),
                "chat_template": str(tmp_path / "template.jinja")}  # fmt: skip
    config = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "model": settings})
    prepare_model(config)
    prepared = Path(config.model.path)
    assert prepared == tmp_path / "run" / "model"
    assert (config.model.tokenizer_path, config.model.chat_template) == (None, None)
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    assert tokenizer.chat_template == TEMPLATE
    ids = render_prompt(tokenizer, [Message("user", "1+2=")])
    assert tokenizer.decode(ids) == "[user] 1+2=\n[assistant] "
    # The weights are the model's own, linked, not copied.
    assert (prepared / "model.safetensors").resolve() == (tiny_model_dir / "model.safetensors")
    AutoModelForCausalLM.from_pretrained(prepared)
    assert AutoTokenizer.from_pretrained(tiny_model_dir).chat_template != TEMPLATE

    # Resuming prepares it again from the user's config (a template given inline).
    again = RunConfig.model_validate(
        {"run_dir": str(tmp_path / "run"), "model": {**settings, "chat_template": "{{ 'x' }}"}}
    )
    prepare_model(again)
    assert AutoTokenizer.from_pretrained(again.model.path).chat_template == "{{ 'x' }}"


def test_batches_move_to_the_device_whole(warm_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(warm_model_dir)
    batch = build_batch(arithmetic_groups(tokenizer, 2), grpo_no_std, 0, 1, pack=True)
    moved = batch.to(torch.device("meta"))
    tensors = [v for v in vars(moved).values() if isinstance(v, torch.Tensor)]
    tensors += [v for v in vars(moved.packed).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 6 + 7 and all(t.device.type == "meta" for t in tensors)


@pytest.mark.slow
def test_a_tokenizer_without_a_pad_token_trains(warm_model_dir: Path, tmp_path: Path) -> None:
    from learner.trainer import Learner, LearnerConfig

    model = tmp_path / "no-pad"
    shutil.copytree(warm_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert tokenizer.pad_token_id is None and padding_id(tokenizer) == tokenizer.eos_token_id

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = dict(os.environ)
    learner = Learner(str(model), LearnerConfig(lr=1e-4), master_port=port)
    try:
        metrics = learner.step(arithmetic_groups(tokenizer, 4), learner_version=1)
        assert metrics["learner/tokens"] > 0 and torch.isfinite(
            torch.tensor(metrics["learner/loss"])
        )
    finally:
        learner.close()
        os.environ.clear()
        os.environ.update(saved)
