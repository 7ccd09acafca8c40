"""The user's path through the `relay` console script, with a real vLLM engine for eval."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def relay(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("relay", path=str(Path(sys.executable).parent))
    return subprocess.run([executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_model_init_warmstart_eval(tmp_path: Path) -> None:
    settings = [
        "-c", str(REPO / "configs/demo.yaml"),
        "model.path=models/tiny", "warmstart.out_path=models/warm", "run_dir=runs/cli",
        "warmstart.steps=30", "warmstart.batch_size=16", "warmstart.n_examples=200",
        "eval.n_prompts=20",
    ]  # fmt: skip
    init = relay("model", "init", *settings, cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "models/tiny/config.json").is_file()
    again = relay("model", "init", *settings, cwd=tmp_path)
    assert "already at models/tiny" in again.stderr  # not rebuilt without --force

    warm = relay("warmstart", *settings, cwd=tmp_path)
    assert warm.returncode == 0, warm.stderr
    # The terminal shows Relay's progress, not Hugging Face's bars for loading and saving.
    for output in (init.stderr, warm.stderr):
        assert "Writing model shards" not in output and "Loading weights" not in output
    assert "warm start: 30 steps" in warm.stdout + warm.stderr
    report = json.loads((tmp_path / "runs/cli/warmstart.json").read_text())
    assert report["steps"] == 30
    assert report["final_loss"] < report["first_loss"]

    evaluation = relay("eval", *settings, "--model", "models/warm", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    # stdout carries the result alone (vLLM's logs go to stderr), so scripts can read it.
    (result_line,) = evaluation.stdout.strip().splitlines()
    assert result_line.startswith("models/warm: held-out accuracy ")
    assert result_line.endswith("s)") and "on 20 arithmetic prompts" in result_line
    result = json.loads((tmp_path / "runs/cli/eval-warm.json").read_text())
    assert result["n_prompts"] == 20
    assert 0.0 <= result["accuracy"] <= 1.0
    assert len(result["examples"]) == 5


def test_eval_without_a_model_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    result = relay("eval", "model.path=models/absent", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: model.path: no config.json in models/absent: run `relay model init` or "
        "`relay model fetch`, or give a Hugging Face model directory or hub id"
    ]
