"""`dataset`: a user's own prompts and answers from JSONL, Parquet or a `datasets` directory.

Each row gives a prompt (a string, or a list of {"role", "content"} messages) and a
reference answer, in columns named by the config. The held-out split is either its own
file (`test_path`, or a saved DatasetDict's "test" split) or a stable share of the rows by
a hash of the prompt. Replies are scored by a reward chosen by name or by import path:

- `exact`: the reply, stripped, equals the answer;
- `numeric`: the last number in the reply equals the answer's number;
- `math`: math-verify finds the reply's answer equivalent to the answer (LaTeX);
- `regex`: `answer_regex` is searched in the reply and its first group (or the whole
  match) equals the answer;
- `package.module:function`: a function `f(completion: str, answer: str, row: dict) ->
  float | bool`, given the reply, the reference and the whole row; a reward in [0, 1]
  where 1 (or True) counts as correct.

Every row is checked when the environment is built; errors name the file, row and column.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from envs.base import (
    EnvError,
    Message,
    Prompt,
    SingleTurnEnvironment,
    Split,
    Verdict,
    import_object,
)
from envs.math_problems import verify_math

RewardFunction = Callable[[str, str, dict], "float | bool"]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
BUILTIN_REWARDS = ("exact", "numeric", "math", "regex")


class DatasetConfig(BaseModel):
    """Prompts and answers from a file or a saved `datasets` directory, with a reward."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["dataset"] = "dataset"
    path: Path
    """A .jsonl file, a .parquet file, or a directory written by `datasets`' save_to_disk."""
    test_path: Path | None = None
    """Held-out rows in a file of their own (None: `test_percent` of `path`'s rows, or a
    saved DatasetDict's "test" split)."""
    test_percent: int = Field(10, ge=1, le=50)
    """Share of rows held out, by a stable hash of the prompt, when there is no test file."""
    prompt_column: str = "prompt"
    """A string, or a list of chat messages ({"role": ..., "content": ...})."""
    answer_column: str = "answer"
    system_prompt: str | None = None
    """Put before each prompt as a system message (None: the row's messages alone)."""
    reward: str = "exact"
    """exact, numeric, math, regex, or an import path package.module:function."""
    answer_regex: str | None = None
    """For reward regex: the pattern that finds the answer in a reply."""

    @field_validator("reward")
    @classmethod
    def _reward_known(cls, reward: str) -> str:
        if reward not in BUILTIN_REWARDS and ":" not in reward:
            raise ValueError(
                f"{reward!r} is neither one of {', '.join(BUILTIN_REWARDS)} nor an import "
                "path package.module:function"
            )
        return reward

    @field_validator("answer_regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a regular expression: {error}") from None
        return pattern

    @model_validator(mode="after")
    def _regex_has_a_pattern(self) -> DatasetConfig:
        if self.reward == "regex" and self.answer_regex is None:
            raise ValueError("reward regex needs answer_regex, the pattern of the answer")
        return self


class DatasetEnv(SingleTurnEnvironment):
    """Single-turn prompts from the user's data, scored by the configured reward."""

    name = "dataset"

    def __init__(self, config: DatasetConfig) -> None:
        self.config = config
        self.reward = _reward_function(config)
        self.rows = _split_rows(config)

    def prompts(self, split: Split, count: int, seed: int) -> list[Prompt]:
        pool = self.rows[split]
        if not pool:
            raise EnvError(f"dataset {self.config.path}: no {split.value} rows")
        if split is Split.TEST and count > len(pool):
            raise EnvError(
                f"dataset {self.config.path}: {len(pool)} test rows, asked for {count} "
                "(lower eval.n_prompts)"
            )
        rng = np.random.default_rng(seed)
        rounds = -(-count // len(pool))  # training draws cycle through the rows
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(rounds)])[:count]
        return [self._prompt(split, int(i)) for i in order]

    def _prompt(self, split: Split, index: int) -> Prompt:
        row = self.rows[split][index]
        prompt = row[self.config.prompt_column]
        messages = (
            [Message("user", prompt)]
            if isinstance(prompt, str)
            else [Message(m["role"], m["content"]) for m in prompt]
        )
        if self.config.system_prompt is not None:
            messages.insert(0, Message("system", self.config.system_prompt))
        reference = str(row[self.config.answer_column])
        return Prompt(f"dataset:{split.value}:{index}", tuple(messages), reference)

    def prompt_for_id(self, prompt_id: str) -> Prompt | None:
        """The prompt `prompt_id` names (for re-verifying a producer's rewards), or None."""
        found = re.fullmatch(r"dataset:(train|test):(\d+)", prompt_id)
        if found is None or int(found[2]) >= len(self.rows[Split(found[1])]):
            return None
        return self._prompt(Split(found[1]), int(found[2]))

    def score(self, prompt: Prompt, response: str) -> Verdict:
        if self.config.reward in BUILTIN_REWARDS:
            return _BUILTIN[self.config.reward](self.config, prompt.reference, response)
        _, split, index = prompt.prompt_id.split(":")
        row = self.rows[Split(split)][int(index)]
        try:
            reward = float(self.reward(response, prompt.reference, row))
        except Exception as error:  # a user's function must not crash the actor
            return Verdict(0.0, False, {"error": repr(error)[:200]})
        if not np.isfinite(reward):
            return Verdict(0.0, False, {"error": f"reward function returned {reward}"})
        return Verdict(reward, reward >= 1.0)


def _reward_function(config: DatasetConfig) -> RewardFunction | None:
    """The user's function for an import-path reward (None for the built-in ones)."""
    if config.reward in BUILTIN_REWARDS:
        return None
    found = import_object(config.reward, "env.reward")
    if not callable(found):
        raise EnvError(f"env.reward {config.reward!r} is not a function")
    return found


def _exact(config: DatasetConfig, reference: str, response: str) -> Verdict:
    correct = response.strip() == reference.strip()
    return Verdict(float(correct), correct, {"extracted": response.strip()[:200]})


def _numeric(config: DatasetConfig, reference: str, response: str) -> Verdict:
    found = NUMBER.findall(response[-2000:])
    if not found:
        return Verdict(0.0, False, {"extracted": None, "reason": "no number in the reply"})
    try:
        correct = abs(float(found[-1].replace(",", "")) - float(reference.replace(",", ""))) < 1e-6
    except ValueError:
        return Verdict(0.0, False, {"extracted": found[-1], "reason": "answer is not a number"})
    return Verdict(float(correct), correct, {"extracted": found[-1]})


def _regex(config: DatasetConfig, reference: str, response: str) -> Verdict:
    match = re.search(config.answer_regex or "", response)
    if match is None:
        return Verdict(0.0, False, {"extracted": None, "reason": "answer_regex did not match"})
    answer = (match.group(1) if match.groups() else match.group(0)).strip()
    correct = answer == reference.strip()
    return Verdict(float(correct), correct, {"extracted": answer[:200]})


def _math(config: DatasetConfig, reference: str, response: str) -> Verdict:
    return verify_math(reference, response, max_answer_chars=2000, timeout_s=5)


_BUILTIN = {"exact": _exact, "numeric": _numeric, "math": _math, "regex": _regex}


# -- reading and checking rows -------------------------------------------------------------
def _split_rows(config: DatasetConfig) -> dict[Split, list[dict]]:
    """The checked rows of each split."""
    rows = _read(config.path)
    if isinstance(rows, dict):  # a saved DatasetDict: its own train and test splits
        missing = {"train", "test"} - set(rows)
        if missing:
            raise EnvError(
                f"{config.path}: a DatasetDict needs train and test splits; it has "
                f"{', '.join(sorted(rows))}"
            )
        splits = {Split.TRAIN: rows["train"], Split.TEST: rows["test"]}
        sources = {Split.TRAIN: f"{config.path}[train]", Split.TEST: f"{config.path}[test]"}
    elif config.test_path is not None:
        test = _read(config.test_path)
        if isinstance(test, dict):
            raise EnvError(f"{config.test_path}: test_path must hold one split, not a DatasetDict")
        splits = {Split.TRAIN: rows, Split.TEST: test}
        sources = {Split.TRAIN: str(config.path), Split.TEST: str(config.test_path)}
    else:
        for number, row in enumerate(rows, start=1):
            _check_row(config, str(config.path), number, row)
        splits = {Split.TRAIN: [], Split.TEST: []}
        for row in rows:
            splits[_held_out(row[config.prompt_column], config.test_percent)].append(row)
        return splits
    for split, split_rows in splits.items():
        for number, row in enumerate(split_rows, start=1):
            _check_row(config, sources[split], number, row)
    return splits


def _held_out(prompt: Any, test_percent: int) -> Split:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return Split.TEST if int.from_bytes(digest, "little") % 100 < test_percent else Split.TRAIN


def _check_row(config: DatasetConfig, source: str, number: int, row: Any) -> None:
    where = f"{source}: row {number}"
    if not isinstance(row, dict):
        raise EnvError(f"{where}: expected an object of columns, got {type(row).__name__}")
    for column in (config.prompt_column, config.answer_column):
        if column not in row:
            raise EnvError(
                f"{where}: no column {column!r} (columns: {', '.join(map(str, row)) or 'none'})"
            )
    prompt, answer = row[config.prompt_column], row[config.answer_column]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise EnvError(f"{where}: column {config.prompt_column!r} is empty")
    elif not (isinstance(prompt, list) and prompt and all(map(_is_message, prompt))):
        raise EnvError(
            f"{where}: column {config.prompt_column!r} must be a string or a list of "
            '{"role": ..., "content": ...} messages'
        )
    if answer is None or isinstance(answer, (dict, list)) or str(answer).strip() == "":
        raise EnvError(
            f"{where}: column {config.answer_column!r} must be a non-empty string or number"
        )


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("role"), str)
        and isinstance(value.get("content"), str)
    )


def _read(path: Path) -> list[dict] | dict[str, list[dict]]:
    """Rows of a JSONL or Parquet file, or of a saved Dataset (a DatasetDict: per split)."""
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise EnvError(f"dataset file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise EnvError(
                f"{path}: reading Parquet needs pyarrow: pip install 'relay-rl[data]'"
            ) from None
        try:
            return parquet.read_table(path).to_pylist()
        except Exception as error:  # pyarrow's errors name no common base class
            raise EnvError(f"{path}: not a readable Parquet file ({error})") from None
    if path.suffix not in (".jsonl", ".json"):
        raise EnvError(f"{path}: expected a .jsonl or .parquet file, or a datasets directory")
    rows = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    rows.append(json.loads(line))
            except UnicodeDecodeError as error:
                raise EnvError(f"{path}: row {number}: not UTF-8 ({error.reason})") from None
            except json.JSONDecodeError as error:
                raise EnvError(f"{path}: row {number}: not JSON ({error.msg})") from None
            except RecursionError:
                raise EnvError(f"{path}: row {number}: JSON nested too deeply") from None
    return rows


def _read_saved_dataset(path: Path) -> list[dict] | dict[str, list[dict]]:
    try:
        import datasets
    except ImportError:
        raise EnvError(
            f"{path}: reading a datasets directory needs datasets: pip install 'relay-rl[data]'"
        ) from None
    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise EnvError(f"{path}: not a directory written by save_to_disk ({error})") from None
    if isinstance(saved, datasets.DatasetDict):
        return {name: list(split) for name, split in saved.items()}
    return list(saved)
