"""vLLM on the tiny model: sampled log-probs are what the learner recomputes, episodes are right.

These use a real vLLM engine (the CPU build in CI) and the real `transformers` model.
"""

from __future__ import annotations

import pytest
import torch

from actors.config import EvalConfig
from actors.episodes import SamplingConfig, render_prompt, run_episodes
from actors.evaluation import evaluate
from envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from envs.base import Message, Split
from learner.logprobs import completion_logprobs
from tests.actors.logprob_check import LOGPROB_TOLERANCE, worst_difference
from tests.actors.tool_echo import ToolEchoEnv

pytestmark = pytest.mark.slow


def test_sampled_logprobs_match_transformers(
    vllm_engine: object, hf_model: torch.nn.Module, tokenizer: object
) -> None:
    env = ArithmeticEnv(ArithmeticConfig())
    prompts = [render_prompt(tokenizer, p.messages) for p in env.prompts(Split.TEST, 8, seed=3)]
    assert worst_difference(vllm_engine, hf_model, prompts, max_tokens=24) < LOGPROB_TOLERANCE


def test_sampled_logprobs_at_a_temperature_are_those_of_the_tempered_policy(
    vllm_engine: object, hf_model: torch.nn.Module, tokenizer: object
) -> None:
    # Sampled at T = 0.6, μ is softmax(logits / 0.6): what the learner scores. The raw
    # model's log-probs (T = 1) are far from it, so the check tells the two apart.
    env = ArithmeticEnv(ArithmeticConfig())
    prompts = [render_prompt(tokenizer, p.messages) for p in env.prompts(Split.TEST, 8, seed=4)]
    tempered = worst_difference(vllm_engine, hf_model, prompts, max_tokens=24, temperature=0.6)
    assert tempered < LOGPROB_TOLERANCE
    raw = worst_difference(
        vllm_engine, hf_model, prompts, max_tokens=24, temperature=0.6, scored_at=1.0
    )
    assert raw > 0.05


def test_multi_turn_episode_masks_environment_tokens(
    vllm_engine: object, hf_model: torch.nn.Module, tokenizer: object
) -> None:
    env = ToolEchoEnv()
    episodes = run_episodes(
        vllm_engine,
        tokenizer,
        env,
        env.prompts(Split.TRAIN, 4, 0),
        SamplingConfig(temperature=1.0, max_tokens=12),
        max_model_len=128,
    )
    finished = [e for e in episodes if len(e.transcript) == 5]
    assert finished, "the warm model should end its turns, letting the environment answer"
    for episode in finished:
        # assistant, tool, assistant, tool, assistant: the third assistant turn hits the limit.
        assert [m.role for m in episode.transcript] == ["assistant", "tool"] * 2 + ["assistant"]
        assert episode.finish_reason.value == "turn_limit"
        mask = torch.tensor(episode.loss_mask)
        env_text = tokenizer.decode(
            [t for t, m in zip(episode.token_ids, episode.loss_mask, strict=True) if not m]
        )
        assert (
            env_text == "<|im_start|>t:<result>1</result><|im_end|><|im_start|>a:"
            "<|im_start|>t:<result>3</result><|im_end|><|im_start|>a:"
        )
        assert all(
            lp == 0.0
            for lp, m in zip(episode.behaviour_logprobs, episode.loss_mask, strict=True)
            if not m
        )
        # Sampled tokens of later turns were conditioned on the environment's tokens:
        # recomputing over the whole context must reproduce their log-probs.
        with torch.no_grad():
            (recomputed,) = completion_logprobs(
                hf_model, episode.prompt_token_ids, [episode.token_ids]
            )
        sampled = torch.tensor(episode.behaviour_logprobs)[mask]
        assert (sampled - recomputed[mask]).abs().max().item() < LOGPROB_TOLERANCE


def test_evaluation_agrees_with_transformers_greedy_decoding(
    vllm_engine: object, hf_model: torch.nn.Module, tokenizer: object
) -> None:
    env = ArithmeticEnv(ArithmeticConfig())
    config = EvalConfig(n_prompts=40, max_tokens=6, temperature=0.0, seed=5)
    report = evaluate(vllm_engine, tokenizer, env, config, max_model_len=128)
    assert report.n_prompts == 40
    correct = 0
    for prompt in env.prompts(Split.TEST, 40, seed=5):
        ids = torch.tensor([render_prompt(tokenizer, prompt.messages)])
        with torch.no_grad():
            out = hf_model.generate(
                ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id
            )
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        correct += env.verify(prompt, [Message("assistant", reply)]).correct
    # Greedy decoding in float32 on both sides: the same answers, so the same accuracy
    # (one near-tie may break differently).
    assert abs(report.accuracy - correct / 40) <= 1 / 40
