"""Synthetic rollout groups of real token ids, for learner tests that need no actor."""

from __future__ import annotations

import numpy as np

from buffer.schema import Completion, FinishReason, RolloutGroup, VersionRuns


def arithmetic_groups(
    tokenizer, n_groups: int, group_size: int = 4, seed: int = 0, prefix: str = "g"
) -> list[RolloutGroup]:
    """Addition prompts with random digit replies; reward 1 for the right sum.

    Behaviour log-probs are a made-up -2 per token: the data is deliberately off-policy.
    Reply lengths differ (1 to 4 digits), so rows have different numbers of loss tokens.
    """
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n_groups):
        a, b = (int(x) for x in rng.integers(10, 100, size=2))
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{a}+{b}="}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completions = []
        for j in range(group_size):
            reply = str(a + b) if j % 2 == 0 else str(int(rng.integers(0, 10 ** (1 + j % 4))))
            ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            completions.append(
                Completion(
                    token_ids=np.array(ids, np.int32),
                    behaviour_logprobs=np.full(len(ids), -2.0, np.float32),
                    loss_mask=np.ones(len(ids), np.bool_),
                    policy_versions=VersionRuns.constant(0, len(ids)),
                    reward=float(reply == str(a + b)),
                    finish_reason=FinishReason.STOP,
                )
            )
        groups.append(
            RolloutGroup(
                run_id="test",
                group_id=f"{prefix}{i}",
                env_name="arithmetic",
                prompt_id=f"{a}+{b}=",
                prompt_token_ids=np.array(prompt_ids, np.int32),
                completions=completions,
                actor_id="synthetic",
                created_at=0.0,
            )
        )
    return groups
