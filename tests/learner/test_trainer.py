"""The learner step: batch alignment by hand, and real DeepSpeed (CPU, gloo) learning."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from buffer.schema import Completion, FinishReason, RolloutGroup, VersionRuns
from learner.advantages import grpo_no_std
from learner.batching import build_batch
from learner.logprobs import completion_logprobs, gather_logprobs
from tests.learner.synthetic import arithmetic_groups


def completion(
    tokens: list[int],
    logprobs: list[float],
    reward: float,
    mask: list[bool] | None = None,
    version: int = 0,
) -> Completion:
    return Completion(
        token_ids=np.array(tokens, np.int32),
        behaviour_logprobs=np.array(logprobs, np.float32),
        loss_mask=np.array(mask if mask is not None else [True] * len(tokens)),
        policy_versions=VersionRuns.constant(version, len(tokens)),
        reward=reward,
        finish_reason=FinishReason.STOP,
    )


def group(prompt: list[int], *completions: Completion) -> RolloutGroup:
    return RolloutGroup(
        "run", "g", "arithmetic", "p", np.array(prompt, np.int32), list(completions), "a", 0.0
    )


def chat_prompt(tokenizer: object, question: str) -> list[int]:
    """Token ids of `question` as a user turn, under the chat template."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reply(tokenizer: object, text: str) -> list[int]:
    """Token ids of a reply `text` ending with the end-of-sequence token."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_batch_alignment_by_hand() -> None:
    # Prompt [2, 35, 82] (3 tokens); completion 1: [5, 6, 3], reward 1; completion 2: [7, 3]
    # with its first token from the environment (masked), reward 0.
    # Advantages (grpo_no_std): mean 0.5 -> [+0.5, -0.5].
    # Token j of a completion is predicted at position prompt_len - 1 + j = 2 + j.
    first = completion([5, 6, 3], [-0.1, -0.2, -0.3], 1.0)
    second = completion([7, 3], [0.0, -0.4], 0.0, mask=[False, True], version=2)
    batch = build_batch([group([2, 35, 82], first, second)], grpo_no_std, 0, learner_version=5)
    assert batch.input_ids.tolist() == [[2, 35, 82, 5, 6, 3], [2, 35, 82, 7, 3, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert batch.loss_mask.tolist() == [
        [False, False, True, True, True],
        [False, False, False, True, False],
    ]
    assert torch.allclose(batch.behaviour_logprobs[0], torch.tensor([0, 0, -0.1, -0.2, -0.3]))
    assert torch.allclose(batch.behaviour_logprobs[1], torch.tensor([0, 0, 0.0, -0.4, 0]))
    assert batch.advantages.tolist() == [[0, 0, 0.5, 0.5, 0.5], [0, 0, 0, -0.5, 0]]
    assert batch.staleness.tolist() == [5, 3]  # learner version 5 minus versions 0 and 2


@pytest.fixture(scope="module")
def learner(warm_model_dir: Path) -> Iterator[object]:
    from learner.losses import TruncatedIS
    from learner.trainer import Learner, LearnerConfig

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The learner sets the launcher's variables (RANK, MASTER_PORT, ...); later tests
    # spawn vLLM processes, which must not inherit them.
    saved = dict(os.environ)
    config = LearnerConfig(lr=2e-4, loss=TruncatedIS())
    learner = Learner(str(warm_model_dir), config, master_port=port)
    yield learner
    learner.close()  # leaves alone a group that the session's in-process vLLM engine owns
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.slow
def test_deepspeed_step_raises_the_logprob_of_rewarded_completions(learner: object) -> None:
    tokenizer = learner.tokenizer
    prompt_ids = chat_prompt(tokenizer, "12+34=")
    right, wrong = reply(tokenizer, "46"), reply(tokenizer, "13")
    model = learner.engine.module

    def logprob_sums() -> tuple[float, float]:
        with torch.no_grad():
            a, b = completion_logprobs(model, prompt_ids, [right, wrong])
        return a.sum().item(), b.sum().item(), a.tolist(), b.tolist()

    right_before, wrong_before, right_lp, wrong_lp = logprob_sums()
    # Fresh data (behaviour = current policy): a fixed buffer replayed for 12 steps.
    batch = [
        group(
            prompt_ids,
            completion(right, right_lp, 1.0),
            completion(wrong, wrong_lp, 0.0),
            completion(right, right_lp, 1.0),
            completion(wrong, wrong_lp, 0.0),
        )
    ]
    metrics = [learner.step(batch, learner_version=0) for _ in range(12)]
    right_after, wrong_after, *_ = logprob_sums()
    # Measured here: right -4.53 -> about -4.0 (it dips first: both replies end with the
    # same end-of-turn token, pushed down after the wrong one); wrong -4.49 -> below -14.
    assert right_after > right_before + 0.25
    assert wrong_after < wrong_before - 3.0
    # The replayed buffer goes off-policy as the policy moves: weights leave 1.
    assert metrics[0]["learner/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics[-1]["learner/is_weight_max"] > 1.0
    assert all(np.isfinite(m["learner/loss"]) for m in metrics)


@pytest.mark.slow
def test_kl_penalty_to_the_reference_grows_as_the_policy_moves(
    learner: object, warm_model_dir: Path
) -> None:
    from learner.config import LearnerConfig
    from learner.trainer import Learner

    # Shares the module's process group (already initialised by the `learner` fixture).
    with_kl = Learner(str(warm_model_dir), LearnerConfig(lr=1e-3, kl_coef=0.1))
    tokenizer = with_kl.tokenizer
    groups = arithmetic_groups(tokenizer, 2)
    first = with_kl.step(groups, learner_version=0)
    later = [with_kl.step(groups, learner_version=0) for _ in range(3)]
    assert first["learner/kl_reference"] == pytest.approx(0.0, abs=1e-6)  # π = π_ref at first
    assert later[-1]["learner/kl_reference"] > 1e-4


@pytest.fixture
def recorded_losses(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, dict]]:
    """Every (LossInputs, metrics) the learner's loss sees, with log π's gradient kept."""
    import learner.trainer as trainer

    calls = []
    real = trainer.compute_loss

    def recording(config: object, inputs: object) -> object:
        inputs.logprobs.retain_grad()
        out = real(config, inputs)
        calls.append((inputs, out.metrics))
        return out

    monkeypatch.setattr(trainer, "compute_loss", recording)
    return calls


@pytest.mark.slow
def test_second_epoch_clips_tokens_that_left_the_trust_region(
    learner: object, warm_model_dir: Path, recorded_losses: list
) -> None:
    from learner.config import DecoupledPPO, LearnerConfig
    from learner.trainer import Learner

    eps = 0.1
    config = LearnerConfig(lr=1e-2, update_epochs=2, loss=DecoupledPPO(clip_eps=eps))
    ppo = Learner(str(warm_model_dir), config)
    metrics = ppo.step(arithmetic_groups(ppo.tokenizer, 4), learner_version=0)
    assert metrics["learner/optimizer_steps"] == 2
    (first, first_metrics), (second, second_metrics) = recorded_losses
    mask = first.loss_mask
    # π_prox is computed once, before the first update, and frozen for both passes.
    assert torch.equal(first.proximal_logprobs, second.proximal_logprobs)
    assert torch.equal(first.logprobs.detach()[mask], first.proximal_logprobs[mask])
    assert first_metrics["clip_fraction"] == 0.0
    # After one step of lr 1e-2 the policy left the trust region on some tokens.
    ratio = torch.exp(second.logprobs.detach() - second.proximal_logprobs)
    advantages = second.advantages
    clipped = mask & (
        ((advantages > 0) & (ratio > 1 + eps)) | ((advantages < 0) & (ratio < 1 - eps))
    )
    assert clipped.any() and second_metrics["clip_fraction"] > 0
    assert second_metrics["clip_fraction"] == pytest.approx(
        clipped.sum().item() / mask.sum().item()
    )
    # d/dlog π of -Σ w r A / N: 0 where clipped, -w r A / N elsewhere (dr/dlog π = r).
    weight = torch.exp(second.proximal_logprobs - second.behaviour_logprobs)
    expected = torch.where(clipped, 0.0, -weight * ratio * advantages / second.normaliser) * mask
    assert torch.count_nonzero(second.logprobs.grad[clipped]) == 0
    assert torch.allclose(second.logprobs.grad, expected, atol=1e-6)


@pytest.mark.slow
def test_proximal_policy_is_not_recomputed_between_minibatches(
    learner: object, warm_model_dir: Path, recorded_losses: list
) -> None:
    from transformers import AutoModelForCausalLM

    from learner.config import DecoupledPPO, LearnerConfig
    from learner.trainer import Learner

    ppo = Learner(str(warm_model_dir), LearnerConfig(lr=1e-3, minibatches=2, loss=DecoupledPPO()))
    groups = arithmetic_groups(ppo.tokenizer, 4)
    ppo.step(groups, learner_version=0)
    assert len(recorded_losses) == 2  # one optimizer step per minibatch of 2 groups
    later, _ = recorded_losses[1]
    # The second minibatch's π_prox is the policy before the first minibatch's update...
    start = AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype=torch.float32)
    batch = build_batch(groups[2:], ppo.advantage, ppo.tokenizer.pad_token_id, 0)
    with torch.no_grad():
        logits = start(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    before = gather_logprobs(logits[:, :-1], batch.input_ids[:, 1:])
    mask = later.loss_mask
    assert torch.allclose(later.proximal_logprobs[mask], before[mask], atol=1e-5)
    # ... while the policy being trained has moved.
    assert (later.logprobs.detach() - later.proximal_logprobs)[mask].abs().max() > 1e-3


@pytest.mark.slow
def test_one_update_of_decoupled_ppo_is_the_update_of_uncapped_tis(
    learner: object, warm_model_dir: Path
) -> None:
    from learner.config import DecoupledPPO, LearnerConfig, TruncatedIS
    from learner.trainer import Learner

    updated = []
    for loss in (DecoupledPPO(clip_eps=0.2), TruncatedIS(clip_c=1e9)):
        one = Learner(str(warm_model_dir), LearnerConfig(lr=1e-3, loss=loss))
        one.step(arithmetic_groups(one.tokenizer, 4), learner_version=0)
        updated.append(torch.cat([p.flatten() for p in one.state_dict().values()]))
    start = torch.cat([p.flatten() for p in learner.state_dict().values()])
    assert (updated[0] - start).abs().max() > 5e-4  # a real AdamW step of lr 1e-3
    # Equal gradients up to fp32 rounding (w r A vs sg(ρ) A log π), which AdamW's first
    # step, about lr g / (|g| + eps), magnifies near zero: measured 4.5e-6, allowed 2%
    # of one step.
    assert (updated[0] - updated[1]).abs().max() < 2e-5


@pytest.mark.slow
def test_vcpo_shrinks_one_optimizer_step_by_its_step_scale(warm_model_dir: Path) -> None:
    from learner.config import VCPO, LearnerConfig, TruncatedIS
    from learner.trainer import Learner

    moved, reported = [], []
    for loss in (TruncatedIS(clip_c=2.0), VCPO(clip_c=2.0, min_step_scale=0.01)):
        one = Learner(str(warm_model_dir), LearnerConfig(lr=1e-3, loss=loss))
        start = torch.cat([p.detach().flatten().clone() for p in one.state_dict().values()])
        groups = arithmetic_groups(one.tokenizer, 4)  # behaviour -2 per token: ESS < 1
        metrics = [one.step(groups, learner_version=0) for _ in range(2)]
        reported.append(metrics)
        # AdamW's first step moves each weight by about lr g / (|g| + eps) = lr: the
        # largest move is the step's learning rate.
        moved.append(torch.cat([p.flatten() for p in one.state_dict().values()]) - start)
    scale = reported[1][0]["learner/step_scale"]
    assert 0.01 < scale < 0.9
    assert reported[0][0]["learner/step_scale"] == 1.0
    # The learning rate itself is unchanged for the next step: the scale lasts one step.
    assert reported[1][1]["learner/lr"] == reported[0][1]["learner/lr"] == 1e-3
    first_tis = moved[0].abs().max().item()
    assert first_tis == pytest.approx(1e-3 * 2, rel=0.05)  # two steps of lr 1e-3, same sign
    # Two steps: the first at lr x scale, the second at about lr x its own scale.
    second_scale = reported[1][1]["learner/step_scale"]
    largest = moved[1].abs().max().item()
    assert 1e-3 * (scale + second_scale) * 0.8 <= largest <= 1e-3 * (scale + second_scale) * 1.05


@pytest.mark.slow
def test_learner_scores_tokens_at_the_sampling_temperature(
    learner: object, warm_model_dir: Path
) -> None:
    from learner.config import LearnerConfig
    from learner.trainer import Learner

    tempered = Learner(str(warm_model_dir), LearnerConfig(), temperature=0.5)
    batch = build_batch(arithmetic_groups(tempered.tokenizer, 1), grpo_no_std, 0, 0)
    with torch.no_grad():
        logits = tempered.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        expected = torch.log_softmax(logits.logits[:, :-1] / 0.5, -1)
        expected = expected.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        assert torch.allclose(tempered._logprobs(batch), expected, atol=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Learner(str(warm_model_dir), LearnerConfig(), temperature=0.0)


def test_packed_groups_by_hand() -> None:
    # Prompt [2, 35] and two completions [5, 6] and [7]: one row [2, 35, 5, 6, 7, pad].
    # Positions continue the prompt's for each completion: [0, 1, 2, 3, 2, 0].
    # Completion 1's tokens are scored at flat positions 1 (the prompt's last token scores
    # 5) and 2 (5 scores 6); completion 2's one token at position 1 too.
    first = completion([5, 6], [-0.1, -0.2], 1.0)
    second = completion([7], [-0.3], 0.0)
    batch = build_batch([group([2, 35], first, second)], grpo_no_std, 0, 0, pack=True)
    packed = batch.packed
    assert packed.input_ids.tolist() == [[2, 35, 5, 6, 7]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert packed.sources.tolist() == [1, 2, 1]
    assert packed.targets.tolist() == [5, 6, 7]
    assert packed.rows.tolist() == [0, 0, 1] and packed.columns.tolist() == [1, 2, 1]
    # Each completion sees the prompt and itself, never the other completion.
    assert packed.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ]


@pytest.mark.slow
def test_packed_groups_give_the_logprobs_and_gradients_of_one_row_per_completion(
    learner: object, warm_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = learner.tokenizer
    groups = arithmetic_groups(tokenizer, 3) + arithmetic_groups(tokenizer, 2, seed=7, prefix="h")
    # A multi-turn completion: environment tokens (masked out) between two replies.
    turns = completion([6, 9, 12, 13, 3, 8, 3], [-1.0] * 7, 1.0, mask=[1, 1, 0, 0, 0, 1, 1])
    shorter = list(groups[0].prompt_token_ids)[3:]
    groups.append(group(shorter, turns, completion([7, 3], [-1, -1], 0)))
    assert len({len(g.prompt_token_ids) for g in groups}) > 1  # rows of different widths
    unpacked = build_batch(groups, grpo_no_std, tokenizer.pad_token_id, 0)
    packed = build_batch(groups, grpo_no_std, tokenizer.pad_token_id, 0, pack=True)
    with torch.no_grad():
        one, other = learner._logprobs(unpacked), learner._logprobs(packed)
    mask = unpacked.loss_mask
    assert torch.allclose(one[mask], other[mask], atol=1e-5)
    # The same gradients: of -Σ A log π over loss tokens, on a plain copy of the policy.
    model = AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype=torch.float32)
    gradients = []
    for batch in (unpacked, packed):
        model.zero_grad()
        logprobs = learner._logprobs(batch, model)
        (-(logprobs * batch.advantages)[mask].sum()).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    scale = gradients[0].abs().max()
    assert scale > 0.1
    assert (gradients[0] - gradients[1]).abs().max() < 1e-5 * scale


def test_learning_rate_schedules_by_hand() -> None:
    from learner.config import LearnerConfig

    # 4 learner steps x 2 optimizer steps = 8; warm-up over 2: step 0 at 1/2, then 1.
    # linear: 1 - k/8; cosine: (1 + cos(π k/8)) / 2; constant: 1.
    linear = LearnerConfig(steps=4, minibatches=2, lr_schedule="linear", warmup_steps=2)
    assert [linear.lr_scale(k) for k in (0, 1, 4, 7)] == [0.5, 0.875, 0.5, 0.125]
    cosine = LearnerConfig(steps=4, minibatches=2, lr_schedule="cosine")
    assert cosine.lr_scale(4) == pytest.approx(0.5) and cosine.lr_scale(8) == pytest.approx(0.0)
    assert LearnerConfig(warmup_steps=4).lr_scale(1) == 0.5
    assert LearnerConfig().lr_scale(10**6) == 1.0


@pytest.mark.slow
def test_deepspeed_follows_the_learning_rate_schedule(
    learner: object, warm_model_dir: Path
) -> None:
    from learner.config import LearnerConfig
    from learner.trainer import Learner

    config = LearnerConfig(lr=1e-3, steps=3, lr_schedule="linear", warmup_steps=2)
    scheduled = Learner(str(warm_model_dir), config)
    groups = arithmetic_groups(scheduled.tokenizer, 2)
    used = [scheduled.step(groups, learner_version=0)["learner/lr"] for _ in range(3)]
    # Optimizer step k runs at 1e-3 x min(1, (k + 1) / 2) x (1 - k / 3).
    assert used == pytest.approx([5e-4, 1e-3 * 2 / 3, 1e-3 / 3])


def _weights(learner: object) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.engine.module.named_parameters()}


def _nan_behaviour(groups: list) -> list:
    """The groups with one trained token's behaviour log-prob NaN (one that got past put)."""
    import dataclasses

    first = groups[0].completions[0]
    logprobs = first.behaviour_logprobs.copy()
    logprobs[np.flatnonzero(first.loss_mask)[0]] = np.nan
    poisoned = dataclasses.replace(first, behaviour_logprobs=logprobs)
    head = dataclasses.replace(groups[0], completions=[poisoned, *groups[0].completions[1:]])
    return [head, *groups[1:]]


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_batch_changes_nothing_and_the_next_step_is_as_without_it(
    learner: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poison: str
) -> None:
    import learner.trainer as trainer

    clean = arithmetic_groups(learner.tokenizer, 2, seed=11)
    learner.save_checkpoint(tmp_path, "before", {})
    learner.step(clean, learner_version=0)
    expected = _weights(learner)
    learner.load_checkpoint(tmp_path)
    before = _weights(learner)
    steps = learner.engine.global_steps
    if poison == "loss":
        bad = _nan_behaviour(clean)
    else:  # a finite loss whose gradient is NaN (e.g. an overflow in backward)
        real = trainer.compute_loss

        def nan_gradient(config: object, inputs: object) -> object:
            inputs.logprobs.register_hook(lambda grad: grad * float("nan"))
            return real(config, inputs)

        monkeypatch.setattr(trainer, "compute_loss", nan_gradient)
        bad = clean
    with pytest.raises(trainer.NonFiniteStep, match=f"non-finite {poison}"):
        learner.step(bad, learner_version=0)
    monkeypatch.undo()
    after_skip = _weights(learner)
    assert all(torch.equal(after_skip[name], before[name]) for name in before)
    assert learner.engine.global_steps == steps  # no optimizer or LR-schedule step
    # Nothing of the skipped batch lingers in DeepSpeed's gradient buffers or Adam state.
    learner.step(clean, learner_version=0)
    got = _weights(learner)
    assert all(torch.allclose(got[name], expected[name], atol=1e-7) for name in expected)


@pytest.mark.parametrize("every_steps", [0, 2], ids=["ack-after-step", "held-until-checkpoint"])
def test_claims_outlive_a_step_slower_than_the_visibility_timeout(
    learner: object, make_buffer: object, tmp_path: Path, every_steps: int
) -> None:
    from learner.config import CheckpointConfig, LearnerConfig
    from learner.loop import TrainingLoop

    # An evaluation four times longer than the visibility timeout, after every step: only
    # a heartbeat, not renewals at fixed points of the loop, keeps the claims alive.
    buffer = make_buffer(visibility_timeout_s=0.6, admission_control=False, max_staleness=100)
    buffer.put(arithmetic_groups(learner.tokenizer, 4, seed=7), "synthetic")
    config = LearnerConfig(
        steps=4, batch_groups=1, checkpoint=CheckpointConfig(every_steps=every_steps)
    )

    def slow_evaluation(_: object) -> dict[str, float]:
        time.sleep(2.4)
        # Another consumer's sample (it claims nothing: too few groups for 100) returns
        # expired claims to the buffer, as a second rank's would.
        assert buffer.sample(100).groups == []
        return {}

    loop = TrainingLoop(
        learner, buffer, config, tmp_path / "checkpoints", evaluate=slow_evaluation, eval_every=1
    )
    loop.start(resume=False)
    assert loop.run().step == 4
    counters = {
        k.decode(): int(v) for k, v in buffer.client.hgetall(buffer.key("counters")).items()
    }
    assert counters.get("redelivered", 0) == 0 and counters.get("stale_acks", 0) == 0
    assert counters["acked"] == 4 and counters["sampled"] == 4


def test_learner_cores_are_parsed_and_every_thread_pinned() -> None:
    import subprocess
    import sys

    from learner.config import parse_cores

    assert parse_cores("0-2,5") == {0, 1, 2, 5}
    for bad in ("a", "3-1", "1,", "-2"):
        with pytest.raises(ValueError, match="not a list of cores"):
            parse_cores(bad)
    # In a process of its own: a thread started before pinning and one started after both
    # end up on core 0 only; a core the machine lacks is refused, naming the field.
    script = """
import os, threading
from learner.trainer import pin_process
done = threading.Event()
early = threading.Thread(target=done.wait); early.start()
pin_process({0})
late = threading.Thread(target=done.wait); late.start()
print(sorted({frozenset(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')},
             key=sorted))
done.set()
try:
    pin_process({100000})
except ValueError as error:
    print(error)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "[frozenset({0})]"
    assert lines[1].startswith("learner.cpu_cores: cores [100000] are not available here")


@pytest.mark.slow
def test_forged_behaviour_logprobs_of_fresh_groups_are_measured(learner: object) -> None:
    # The learner's own log-probs of its fresh groups are what an honest actor reports
    # (here: recomputed); a forger's made-up ones are far from them. Stale groups are not
    # measured (NaN): the policy moved since they were sampled.
    tokenizer = learner.tokenizer
    prompt_ids = chat_prompt(tokenizer, "1+2=")
    answer = reply(tokenizer, "3")
    with torch.no_grad():
        (honest,) = completion_logprobs(learner.engine.module, prompt_ids, [answer])
    honest = honest.tolist()
    forged = [-0.01] * len(answer)
    version = 7
    groups = [
        group(prompt_ids, completion(answer, honest, 1.0, version=version),
              completion(answer, honest, 0.0, version=version)),
        group(prompt_ids, completion(answer, forged, 1.0, version=version),
              completion(answer, honest, 0.0, version=version)),
        group(prompt_ids, completion(answer, forged, 1.0, version=version - 1),
              completion(answer, forged, 0.0, version=version - 1)),
    ]  # fmt: skip
    learner.step(groups, learner_version=version)
    fresh_honest, fresh_forged, stale = learner.behaviour_gaps
    assert fresh_honest < 1e-3
    assert fresh_forged > 1.0  # |log π - (-0.01)| averaged over the reply's tokens
    assert np.isnan(stale)
