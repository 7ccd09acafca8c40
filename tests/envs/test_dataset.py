"""env.type dataset: the user's rows from JSONL, Parquet or a saved `datasets` directory,
scored by a reward chosen by name or import path; errors name the file, row and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envs.base import EnvError, Message, Split
from envs.registry import make_env
from relay.config import RunConfig, load_config
from relay.errors import ConfigError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def additions(count: int) -> list[dict]:
    return [{"question": f"What is {i}+{i + 1}?", "sum": 2 * i + 1, "id": i} for i in range(count)]


def dataset_env(**env: object):
    """The environment as a user configures it: the env section of a run config."""
    return make_env(RunConfig.model_validate({"env": {"type": "dataset", **env}}).env)


def test_jsonl_rows_split_by_a_stable_hash_with_the_system_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sums.jsonl", additions(200))
    env = dataset_env(path=str(path), prompt_column="question", answer_column="sum",
                      system_prompt="Answer with a number.", test_percent=20)  # fmt: skip
    train, test = env.rows[Split.TRAIN], env.rows[Split.TEST]
    assert len(train) + len(test) == 200 and 20 <= len(test) <= 60
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    again = dataset_env(path=str(path), prompt_column="question", answer_column="sum",
                        test_percent=20)  # fmt: skip
    assert again.rows[Split.TEST] == test  # the split depends on the prompt only

    prompts = env.prompts(Split.TRAIN, 300, seed=1)  # more than there are: cycles the rows
    assert len(prompts) == 300 and len({p.prompt_id for p in prompts}) == len(train)
    assert prompts == env.prompts(Split.TRAIN, 300, seed=1)
    first = prompts[0]
    assert first.messages[0] == Message("system", "Answer with a number.")
    row = train[int(first.prompt_id.rsplit(":", 1)[1])]
    assert first.messages[1] == Message("user", row["question"])
    assert first.reference == str(row["sum"])
    with pytest.raises(EnvError, match=r"test rows, asked for 1000 \(lower eval.n_prompts\)"):
        env.prompts(Split.TEST, 1000, seed=0)


def test_parquet_with_a_test_file_and_chat_message_prompts(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist([
            {"messages": [{"role": "user", "content": r["question"]}], "answer": str(r["sum"])}
            for r in rows
        ])  # fmt: skip

    rows = additions(30)
    pq.write_table(table(rows[:20]), tmp_path / "train.parquet")
    pq.write_table(table(rows[20:]), tmp_path / "test.parquet")
    env = dataset_env(
        path=str(tmp_path / "train.parquet"), test_path=str(tmp_path / "test.parquet"),
        prompt_column="messages", reward="numeric",
    )  # fmt: skip
    assert (len(env.rows[Split.TRAIN]), len(env.rows[Split.TEST])) == (20, 10)
    (prompt,) = env.prompts(Split.TEST, 1, seed=0)
    assert prompt.messages == (Message("user", prompt.messages[0].content),)
    assert prompt.messages[0].content.startswith("What is 2")
    assert env.score(prompt, f"The sum is {prompt.reference}.").correct
    assert not env.score(prompt, "The sum is 3.").correct


def test_a_saved_dataset_dict_brings_its_own_splits(tmp_path: Path) -> None:
    import datasets

    rows = additions(12)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows[:8]), "test": datasets.Dataset.from_list(rows[8:]),
    }).save_to_disk(str(tmp_path / "saved"))  # fmt: skip
    env = dataset_env(path=str(tmp_path / "saved"), prompt_column="question", answer_column="sum")
    assert [r["id"] for r in env.rows[Split.TEST]] == [8, 9, 10, 11]
    assert len(env.prompts(Split.TRAIN, 8, seed=0)) == 8

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "train-only")
    )
    with pytest.raises(EnvError, match="needs train and test splits; it has train"):
        dataset_env(path=str(tmp_path / "train-only"), prompt_column="question")


def test_rewards_by_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "answer": "1/2"}])

    def verdict(reward: str, reply: str, **extra: object) -> bool:
        env = dataset_env(path=str(path), reward=reward, test_percent=1, **extra)
        (prompt,) = env.prompts(Split.TRAIN, 1, seed=0)
        return env.score(prompt, reply).correct

    assert verdict("exact", " 1/2\n") and not verdict("exact", "1/2.")
    assert verdict("math", "so $\\frac{1}{2}$") and not verdict("math", "$\\frac{1}{3}$")
    assert verdict("regex", "ANSWER: 1/2 done", answer_regex=r"ANSWER: (\S+)")
    assert not verdict("regex", "1/2", answer_regex=r"ANSWER: (\S+)")
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"prompt": "p", "answer": "1,234"}])
    env = dataset_env(path=str(numbers), reward="numeric", test_percent=1)
    (prompt,) = env.prompts(Split.TRAIN, 1, seed=0)
    assert env.score(prompt, "12 + 1222 = 1234").correct  # the last number counts
    assert not env.score(prompt, "1234 or 1235").correct
    assert env.score(prompt, "no idea").details["reason"] == "no number in the reply"


def test_a_reward_function_by_import_path_sees_the_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def partial(completion, answer, row):\n"
        "    if completion == 'boom':\n"
        "        raise RuntimeError('bad reply')\n"
        "    return 1.0 if completion == answer else 0.5 * (row['id'] == 3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_jsonl(tmp_path / "rows.jsonl", additions(5))
    env = dataset_env(path=str(path), prompt_column="question", answer_column="sum",
                      reward="my_rewards:partial", test_path=str(path))  # fmt: skip
    by_id = {int(p.prompt_id.rsplit(":", 1)[1]): p for p in env.prompts(Split.TEST, 5, seed=0)}
    assert env.score(by_id[3], "7").correct  # 3+4
    half = env.score(by_id[3], "8")
    assert (half.reward, half.correct) == (0.5, False)
    assert env.score(by_id[2], "8").reward == 0.0
    failed = env.score(by_id[2], "boom")
    assert failed.reward == 0.0 and "bad reply" in failed.details["error"]

    with pytest.raises(EnvError, match=r"env.reward 'my_rewards:missing': cannot import it"):
        dataset_env(path=str(path), prompt_column="question", reward="my_rewards:missing")


def test_errors_name_the_file_row_and_column(tmp_path: Path) -> None:
    rows = additions(3)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(EnvError, match=r"rows.jsonl: row 1: no column 'prompt' \(columns: "
                                       r"question, sum, id\)"):  # fmt: skip
        dataset_env(path=str(path))
    (tmp_path / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(EnvError, match=r"broken.jsonl: row 2: not JSON"):
        dataset_env(path=str(tmp_path / "broken.jsonl"), prompt_column="question")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(EnvError, match=r"latin1.jsonl: row 1: not UTF-8"):
        dataset_env(path=str(tmp_path / "latin1.jsonl"))
    (tmp_path / "deep.jsonl").write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(EnvError, match=r"deep.jsonl: row 1: JSON nested too deeply"):
        dataset_env(path=str(tmp_path / "deep.jsonl"))
    write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "p", "answer": ""}])
    with pytest.raises(EnvError, match=r"empty.jsonl: row 1: column 'answer' must be a non-empty"):
        dataset_env(path=str(tmp_path / "empty.jsonl"))
    write_jsonl(
        tmp_path / "odd.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": 3, "answer": "a"}]
    )
    with pytest.raises(EnvError, match=r"odd.jsonl: row 2: column 'prompt' must be a string or"):
        dataset_env(path=str(tmp_path / "odd.jsonl"))
    with pytest.raises(EnvError, match=r"dataset file .*missing.jsonl does not exist"):
        dataset_env(path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(EnvError, match=r"expected a .jsonl or .parquet file"):
        dataset_env(path=str(write_jsonl(tmp_path / "rows.csv", rows)))
    with pytest.raises(ConfigError, match=r"env.reward: .*'bleu' is neither one of exact"):
        load_config(None, ["env.type=dataset", f"env.path={path}", "env.reward=bleu"], environ={})
    with pytest.raises(ConfigError, match=r"reward regex needs answer_regex"):
        load_config(None, ["env.type=dataset", f"env.path={path}", "env.reward=regex"], environ={})
