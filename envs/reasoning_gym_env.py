"""reasoning-gym's procedural datasets as single-turn tasks, scored by their own verifiers.

`dataset` is any name `reasoning_gym.create_dataset` knows (106 in 0.1.25: `countdown`,
`basic_arithmetic`, `word_sorting`, ...), and `config` goes to it unchanged. Problems are
generated on demand. Train prompts come from even generator seeds and test prompts from
odd ones, so the two splits never share a seed. A reply is scored by the dataset's own
`score_answer` against the generated entry, reward in [0, 1], correct at 1. An answer
inside `<answer>...</answer>` is taken from there, as reasoning-gym's prompts ask.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from envs.base import EnvError, Message, Prompt, SingleTurnEnvironment, Split, Verdict

_KEPT_ENTRIES = 100_000
"""Generated entries kept for scoring (a prompt is verified soon after it is drawn)."""


class ReasoningGymConfig(BaseModel):
    """A reasoning-gym dataset by name, with its own config passed through."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["reasoning_gym"] = "reasoning_gym"
    dataset: str = "countdown"
    """A reasoning-gym dataset name (`reasoning_gym.factory.DATASETS`)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The dataset's own settings (e.g. countdown's min_numbers, max_numbers), unchanged."""
    system_prompt: str | None = None
    """Put before each question as a system message (None: the question alone)."""

    @field_validator("dataset")
    @classmethod
    def _known(cls, name: str) -> str:
        known = sorted(_datasets())
        if name not in known:
            close = [k for k in known if name.split("_")[0] in k][:8] or known[:8]
            raise ValueError(
                f"unknown reasoning-gym dataset {name!r}; {len(known)} exist, e.g. "
                f"{', '.join(close)} (reasoning_gym.factory.DATASETS)"
            )
        return name


def _datasets() -> dict[str, Any]:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as error:  # an optional dependency
        raise ValueError(
            "env.type reasoning_gym needs the reasoning-gym package: pip install 'relay-rl[tasks]'"
        ) from error
    return DATASETS


class ReasoningGymEnv(SingleTurnEnvironment):
    """One reasoning-gym dataset; problems generated per draw."""

    name = "reasoning_gym"

    def __init__(self, config: ReasoningGymConfig) -> None:
        self.config = config
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self._scorer = self._generate(0, 1)  # checks the dataset's config now

    def _generate(self, seed: int, size: int) -> Any:
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(
                self.config.dataset, seed=seed, size=size, **self.config.config
            )
        except (TypeError, ValueError, AssertionError) as error:
            raise EnvError(
                f"env.config for reasoning-gym dataset {self.config.dataset!r}: {error}"
            ) from None

    def prompts(self, split: Split, count: int, seed: int) -> list[Prompt]:
        generator_seed = 2 * seed + (0 if split is Split.TRAIN else 1)
        dataset = self._generate(generator_seed, count)
        prompts = []
        for index in range(count):
            entry = dataset[index]
            prompt_id = f"{self.config.dataset}-{generator_seed}-{index}"
            self._keep(prompt_id, entry)
            messages = [Message("user", entry["question"])]
            if self.config.system_prompt is not None:
                messages.insert(0, Message("system", self.config.system_prompt))
            prompts.append(Prompt(prompt_id, tuple(messages), str(entry["answer"])))
        return prompts

    def score(self, prompt: Prompt, response: str) -> Verdict:
        entry = self._entries.get(prompt.prompt_id)
        if entry is None:
            entry = self._regenerate(prompt.prompt_id)
        answer = _tagged_answer(response)
        try:
            reward = float(self._scorer.score_answer(answer, entry))
        except Exception as error:  # a verifier must not crash the actor on odd replies
            return Verdict(reward=0.0, correct=False, details={"error": repr(error)[:200]})
        reward = min(1.0, max(0.0, reward))
        return Verdict(reward=reward, correct=reward >= 1.0, details={"answer": answer[:200]})

    def _keep(self, prompt_id: str, entry: dict) -> None:
        self._entries[prompt_id] = entry
        while len(self._entries) > _KEPT_ENTRIES:
            self._entries.popitem(last=False)

    def _regenerate(self, prompt_id: str) -> dict:
        """The entry of a prompt drawn elsewhere or long ago, from the seed in its id."""
        generator_seed, index = (int(part) for part in prompt_id.rsplit("-", 2)[1:])
        return self._generate(generator_seed, index + 1)[index]


def _tagged_answer(response: str) -> str:
    start, end = response.rfind("<answer>"), response.rfind("</answer>")
    if start != -1 and end > start:
        return response[start + len("<answer>") : end].strip()
    return response.strip()
