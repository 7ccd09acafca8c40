"""Losses against numbers computed by hand, and their on-policy consistency."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from pydantic import TypeAdapter

from learner.config import M2PO, VCPO, SequenceMaskedIS
from learner.losses import (
    DecoupledPPO,
    LossConfig,
    LossInputs,
    NoCorrection,
    SequenceIS,
    TruncatedIS,
    compute_loss,
    get_loss,
    second_moment_mask,
)

LN = math.log


def inputs(
    logprobs: list, behaviour: list, advantages: list, mask: list | None = None, **extra: object
) -> tuple[LossInputs, torch.Tensor]:
    current = torch.tensor(logprobs, requires_grad=True)
    mask_tensor = (
        torch.tensor(mask) if mask is not None else torch.ones_like(current, dtype=torch.bool)
    )
    tensors = {k: torch.tensor(v) for k, v in extra.items()}
    return (
        LossInputs(
            current, torch.tensor(behaviour), torch.tensor(advantages), mask_tensor, **tensors
        ),
        current,
    )


# Two tokens: π = [0.5, 0.25], μ = [0.25, 0.5] -> ρ = π/μ = [2, 0.5]; A = [1, 1].
PI, MU, ONES = [[LN(0.5), LN(0.25)]], [[LN(0.25), LN(0.5)]], [[1.0, 1.0]]


def test_none_by_hand() -> None:
    batch, current = inputs(PI, MU, ONES)
    out = compute_loss(NoCorrection(), batch)
    # L = -(ln 0.5 + ln 0.25) / 2 = -(-0.693147 - 1.386294) / 2 = 1.039721
    assert out.loss.item() == pytest.approx(1.039721, abs=1e-6)
    out.loss.backward()
    # dL/dlog π_t = -A_t / N = -0.5 each
    assert torch.allclose(current.grad, torch.tensor([[-0.5, -0.5]]))


def test_tis_by_hand() -> None:
    batch, current = inputs(PI, MU, ONES)
    out = compute_loss(TruncatedIS(clip_c=1.5), batch)
    # w = min(ρ, 1.5) = [1.5, 0.5]
    # L = -(1.5 x ln 0.5 + 0.5 x ln 0.25) / 2 = -(-1.039721 - 0.693147) / 2 = 0.866434
    assert out.loss.item() == pytest.approx(0.866434, abs=1e-6)
    out.loss.backward()
    # dL/dlog π_t = -w_t A_t / N = [-0.75, -0.25]: the weight is not differentiated.
    assert torch.allclose(current.grad, torch.tensor([[-0.75, -0.25]]))
    m = out.metrics
    assert m["clip_fraction"] == 0.5  # one of two ratios above 1.5
    assert m["is_weight_mean"] == pytest.approx(1.25)  # (2 + 0.5) / 2
    assert m["is_weight_max"] == pytest.approx(2.0)
    assert m["is_ess"] == pytest.approx(6.25 / 8.5)  # (2.5)^2 / (2 x (4 + 0.25)) = 0.735294
    # k3: (2 - 1 - ln 2) = 0.306853 and (0.5 - 1 + ln 2) = 0.193147 -> mean 0.25
    assert m["kl_behaviour"] == pytest.approx(0.25, abs=1e-6)


def test_tis_bounds_the_weights() -> None:
    # ρ = e^10 on the first token: its gradient weight is c = 2, not 22026.
    batch, current = inputs([[0.0, LN(0.5)]], [[-10.0, LN(0.5)]], ONES)
    compute_loss(TruncatedIS(clip_c=2.0), batch).loss.backward()
    assert torch.allclose(current.grad, torch.tensor([[-1.0, -0.5]]))  # -[2, 1] x 1 / 2


def test_decoupled_ppo_by_hand() -> None:
    # π_θ = [0.5, 0.25], π_prox = [0.4, 0.25], μ = [0.2, 0.5], A = [1, -1], ε = 0.2
    # r = π_θ/π_prox = [1.25, 1.0]; w = π_prox/μ = [2, 0.5]
    # token 1: min(1.25 x 1, clip(1.25) = 1.2 x 1) = 1.2 (clipped); x w = 2.4
    # token 2: min(1.0 x -1, 1.0 x -1) = -1;                          x w = -0.5
    # L = -(2.4 - 0.5) / 2 = -0.95
    batch, current = inputs(
        [[LN(0.5), LN(0.25)]], [[LN(0.2), LN(0.5)]], [[1.0, -1.0]],
        proximal_logprobs=[[LN(0.4), LN(0.25)]],
    )  # fmt: skip
    out = compute_loss(DecoupledPPO(clip_eps=0.2), batch)
    assert out.loss.item() == pytest.approx(-0.95, abs=1e-6)
    out.loss.backward()
    # Clipped token: no gradient. Token 2: d(w r A)/dlog π = w r A = 0.5 x 1 x -1 = -0.5;
    # dL = -(-0.5) / 2 = 0.25
    assert torch.allclose(current.grad, torch.tensor([[0.0, 0.25]]), atol=1e-6)
    assert out.metrics["clip_fraction"] == 0.5
    assert out.metrics["behaviour_weight_max"] == pytest.approx(2.0)


def test_decoupled_ppo_with_one_update_per_batch_is_uncapped_tis() -> None:
    # One optimizer step per batch: π_prox is π_θ itself (detached), so r = 1 inside the
    # trust region and w = π_θ/μ = ρ = [2, 0.5], uncapped. Gradient of
    # -(w r A) / N with dr/dlog π = r = 1: -[2 x 1, 0.5 x 1] / 2 = [-1, -0.25], what
    # truncated IS gives when the truncation never bites (c = 1e9).
    batch, current = inputs(PI, MU, ONES)
    batch = dataclasses.replace(batch, proximal_logprobs=current.detach())
    out = compute_loss(DecoupledPPO(clip_eps=0.2), batch)
    out.loss.backward()
    assert torch.allclose(current.grad, torch.tensor([[-1.0, -0.25]]))
    assert out.metrics["clip_fraction"] == 0.0
    tis_batch, tis_current = inputs(PI, MU, ONES)
    compute_loss(TruncatedIS(clip_c=1e9), tis_batch).loss.backward()
    assert torch.equal(current.grad, tis_current.grad)


def test_decoupled_ppo_caps_the_behaviour_weight() -> None:
    # Same as above with the weight capped at 1: token 1 -> 1.2 x 1 = 1.2; token 2 -> -0.5
    # L = -(1.2 - 0.5) / 2 = -0.35
    batch, _ = inputs(
        [[LN(0.5), LN(0.25)]], [[LN(0.2), LN(0.5)]], [[1.0, -1.0]],
        proximal_logprobs=[[LN(0.4), LN(0.25)]],
    )  # fmt: skip
    assert compute_loss(DecoupledPPO(behaviour_weight_cap=1.0), batch).loss.item() == pytest.approx(
        -0.35, abs=1e-6
    )


def test_decoupled_ppo_needs_the_proximal_policy() -> None:
    batch, _ = inputs(PI, MU, ONES)
    with pytest.raises(ValueError, match="proximal_logprobs"):
        compute_loss(DecoupledPPO(), batch)


def test_seq_is_by_hand() -> None:
    # Sequence 1: log π - log μ = [ln 2, 0] -> mean ln 2 / 2 -> s = sqrt(2) = 1.414214, A = 1
    # Sequence 2: one token, log ratio ln 0.5 -> s = 0.5, A = -1 (second token masked)
    # ε = 0.2: seq 1 min(1.414, 1.2) = 1.2; seq 2 min(-0.5, clip(0.5) = 0.8 x -1) = -0.8
    # L = -(1.2 - 0.8) / 2 = -0.2; both clipped, so no gradient.
    batch, current = inputs(
        [[LN(0.5), LN(0.5)], [LN(0.25), 0.0]],
        [[LN(0.25), LN(0.5)], [LN(0.5), 0.0]],
        [[1.0, 1.0], [-1.0, -1.0]],
        mask=[[True, True], [True, False]],
    )
    out = compute_loss(SequenceIS(clip_low=0.2, clip_high=0.2), batch)
    assert out.loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert out.metrics["sequence_ratio_max"] == pytest.approx(math.sqrt(2), abs=1e-6)
    assert out.metrics["clip_fraction"] == 1.0
    out.loss.backward()
    assert torch.count_nonzero(current.grad) == 0


# Four tokens of one sequence, log π = -1 each, log r = log π - log μ = [0.1, -0.2, 0.3, 2.0]:
# (log r)² = [0.01, 0.04, 0.09, 4.0], mean 1.035. Sorted ascending, the running means are
# 0.01, 0.025, 0.046667, 1.035.
M2_LOGPROBS, M2_BEHAVIOUR = [[-1.0] * 4], [[-1.1, -0.8, -1.3, -3.0]]


def test_m2po_by_hand() -> None:
    batch, current = inputs(M2_LOGPROBS, M2_BEHAVIOUR, [[1.0, 1.0, -1.0, 1.0]])
    out = compute_loss(M2PO(tau=0.05), batch)
    # τ = 0.05 keeps the three smallest (running mean 0.046667 <= 0.05), drops log r = 2.
    # r = [e^0.1, e^-0.2, e^0.3] = [1.105171, 0.818731, 1.349859]
    # L = -(1.105171 + 0.818731 - 1.349859) / 4 = -0.574043 / 4 = -0.143511
    assert out.loss.item() == pytest.approx(-0.143511, abs=1e-6)
    out.loss.backward()
    # d(r A)/dlog π = r A: dL = -[1.105171, 0.818731, -1.349859, 0] / 4; dropped token: 0
    expected = torch.tensor([[-0.276293, -0.204683, 0.337465, 0.0]])
    assert torch.allclose(current.grad, expected, atol=1e-6)
    assert out.metrics["clip_fraction"] == pytest.approx(0.25)
    assert out.metrics["second_moment"] == pytest.approx(1.035, abs=1e-6)


def test_m2po_drops_outliers_only_until_the_second_moment_fits() -> None:
    squared = torch.tensor([[0.01, 0.04, 0.09, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # τ = 0.04: running means 0.01, 0.025 fit, 0.046667 does not: the two largest go.
    assert second_moment_mask(squared, mask, 0.04).tolist() == [[True, True, False, False]]
    assert second_moment_mask(squared, mask, 2.0).tolist() == [[True] * 4]  # 1.035 <= 2
    assert second_moment_mask(squared, mask, 0.001).tolist() == [[False] * 4]
    # Off the loss mask nothing is kept, and masked values do not count in the mean.
    partial = torch.tensor([[True, False, True, True]])
    assert second_moment_mask(squared, partial, 0.05).tolist() == [[True, False, True, False]]


def test_m2po_survives_a_ratio_that_overflows() -> None:
    # log r = 200 would make exp overflow to inf; the token is dropped, and inf x 0 must
    # not turn the loss or the gradient into NaN.
    batch, current = inputs([[0.0, -1.0]], [[-200.0, -1.0]], ONES)
    out = compute_loss(M2PO(), batch)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.5)  # only the second token, r = 1: -(1 x 1) / 2
    assert torch.allclose(current.grad, torch.tensor([[0.0, -0.5]]))


def test_seq_mis_by_hand() -> None:
    # Sequence 1: log r = [ln 2, 0] -> g = exp(ln 2 / 2) = 1.414214 in [0.5, 2]: kept, A = 1
    # Sequence 2: log r = [ln 4, ln 4] -> g = 4 > 2: masked out whole, A = 1
    # Sequence 3: one loss token, log r = ln 0.5 -> g = 0.5 (the bound is kept), A = -1
    # Loss tokens: 2 + 2 + 1 = 5.
    # L = -(1.414214 x 1 x (ln 0.5 + ln 0.5) + 0.5 x -1 x ln 0.25) / 5
    #   = -(-1.960516 + 0.693147) / 5 = 0.253474
    batch, current = inputs(
        [[LN(0.5), LN(0.5)], [LN(0.5), LN(0.5)], [LN(0.25), 0.0]],
        [[LN(0.25), LN(0.5)], [LN(0.125), LN(0.125)], [LN(0.5), 0.0]],
        [[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]],
        mask=[[True, True], [True, True], [True, False]],
    )
    out = compute_loss(SequenceMaskedIS(lower=0.5, upper=2.0), batch)
    assert out.loss.item() == pytest.approx(0.253474, abs=1e-6)
    out.loss.backward()
    # dL/dlog π = -k g A / 5: [-0.282843] x 2, the masked sequence 0, then +0.1
    expected = torch.tensor([[-0.282843, -0.282843], [0.0, 0.0], [0.1, 0.0]])
    assert torch.allclose(current.grad, expected, atol=1e-6)
    assert out.metrics["clip_fraction"] == pytest.approx(1 / 3)
    assert out.metrics["sequence_ratio_max"] == pytest.approx(4.0, abs=1e-5)


def test_vcpo_by_hand() -> None:
    batch, _ = inputs(PI, MU, ONES)
    out = compute_loss(VCPO(clip_c=1.5), batch)
    # The loss and gradient of tis with c = 1.5 (test_tis_by_hand): 0.866434.
    assert out.loss.item() == pytest.approx(0.866434, abs=1e-6)
    # w = [1.5, 0.5]: ESS = 2² / (2 x (2.25 + 0.25)) = 0.8, step scale sqrt(0.8) = 0.894427
    assert out.step_scale == pytest.approx(0.894427, abs=1e-6)
    # One weight of 2 among ten tokens of ratio e^-20: ESS ≈ 4 / (10 x 4) = 0.1,
    # sqrt 0.316 -> raised to min_step_scale 0.5.
    skewed, _ = inputs([[0.0] * 10], [[-LN(2.0)] + [20.0] * 9], [[1.0] * 10])
    assert compute_loss(VCPO(min_step_scale=0.5), skewed).step_scale == 0.5
    assert compute_loss(VCPO(min_step_scale=0.1), skewed).step_scale == pytest.approx(
        math.sqrt(0.1), abs=1e-6
    )


@pytest.mark.parametrize(
    "config",
    [
        TruncatedIS(), DecoupledPPO(), SequenceIS(), DecoupledPPO(behaviour_weight_cap=1.0),
        M2PO(), SequenceMaskedIS(), VCPO(),
    ],
    ids=lambda c: c.type,
)  # fmt: skip
def test_on_policy_every_correction_is_policy_gradient(config: LossConfig) -> None:
    # With μ = π_prox = π_θ every weight and ratio is 1 (and inside the clip range), so
    # each corrected loss has the gradient of plain policy gradient. Sequences have
    # equal lengths, where seq_is's sequence mean equals the token mean.
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5))
    advantages = torch.randn(3, 1).expand(3, 5).contiguous()
    mask = torch.ones(3, 5, dtype=torch.bool)

    def gradient(config: LossConfig) -> torch.Tensor:
        logits.grad = None
        logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
        frozen = logprobs.detach()
        batch = LossInputs(logprobs, frozen, advantages, mask, proximal_logprobs=frozen)
        compute_loss(config, batch).loss.backward()
        return logits.grad.clone()

    assert torch.allclose(gradient(config), gradient(NoCorrection()), atol=1e-6)


def test_metrics_include_staleness_and_entropy() -> None:
    batch, _ = inputs(PI, MU, ONES, staleness=[3], entropy=[[1.0, 2.0]])
    metrics = compute_loss(NoCorrection(), batch).metrics
    assert (metrics["staleness_mean"], metrics["staleness_max"], metrics["entropy"]) == (
        3.0,
        3.0,
        1.5,
    )


def test_masked_tokens_do_not_count() -> None:
    # The masked second token has a huge ratio and advantage; nothing changes.
    batch, _ = inputs([[LN(0.5), 0.0]], [[LN(0.5), -20.0]], [[1.0, 100.0]], mask=[[True, False]])
    out = compute_loss(TruncatedIS(), batch)
    assert out.loss.item() == pytest.approx(-LN(0.5))
    assert out.metrics["is_weight_max"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "config",
    [
        NoCorrection(),
        TruncatedIS(),
        DecoupledPPO(),
        SequenceIS(),
        M2PO(),
        SequenceMaskedIS(),
        VCPO(),
    ],
    ids=lambda c: c.type,
)
def test_non_finite_values_off_the_mask_reach_neither_loss_nor_gradient(
    config: LossConfig,
) -> None:
    # A producer's NaN or inf on environment tokens (off the mask) changes nothing: the
    # loss, its metrics and the gradient equal those of the same batch with zeros there.
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[True, False, True, True], [True, True, False, False]])

    def run(poison: float) -> tuple[float, dict, torch.Tensor]:
        logits.grad = None
        logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
        behaviour = (logprobs.detach() - 0.1).masked_fill(~mask, poison)
        advantages = torch.tensor([[1.0] * 4, [-1.0] * 4]).masked_fill(~mask, poison)
        batch = LossInputs(
            logprobs, behaviour, advantages, mask, proximal_logprobs=behaviour.clone()
        )
        out = compute_loss(config, batch)
        out.loss.backward()
        return out.loss.item(), out.metrics, logits.grad.clone()

    clean_loss, clean_metrics, clean_grad = run(0.0)
    for poison in (float("nan"), float("inf"), -float("inf")):
        loss, metrics, grad = run(poison)
        assert math.isfinite(loss) and loss == pytest.approx(clean_loss)
        assert metrics == pytest.approx(clean_metrics)
        assert torch.isfinite(grad).all() and torch.allclose(grad, clean_grad)


def test_loss_config_is_a_discriminated_union() -> None:
    adapter = TypeAdapter(LossConfig)
    assert adapter.validate_python({"type": "tis", "clip_c": 3}).clip_c == 3
    with pytest.raises(ValueError, match="'none', 'tis', 'decoupled_ppo', 'seq_is', 'm2po'"):
        adapter.validate_python({"type": "ppo"})
    with pytest.raises(ValueError, match="valid: decoupled_ppo, m2po, none, seq_is, seq_mis, tis"):
        get_loss("ppo")
    with pytest.raises(ValueError, match="tau"):
        adapter.validate_python({"type": "m2po", "tau": 0})


def test_normaliser_replaces_the_local_token_count() -> None:
    # Two loss tokens with A * log π = 1 * -1 and 1 * -3: local mean -(-4)/2 = 2. A rank
    # told that the global batch has 8 tokens over 2 ranks divides by 4 instead: 1.
    base = dict(
        logprobs=torch.tensor([[-1.0, -3.0]]),
        behaviour_logprobs=torch.tensor([[-1.0, -3.0]]),
        advantages=torch.tensor([[1.0, 1.0]]),
        loss_mask=torch.tensor([[True, True]]),
    )
    assert compute_loss(NoCorrection(), LossInputs(**base)).loss.item() == pytest.approx(2.0)
    scaled = LossInputs(**base, normaliser=4.0)
    assert compute_loss(NoCorrection(), scaled).loss.item() == pytest.approx(1.0)


def test_reference_kl_is_zero_at_the_reference_and_k3_elsewhere() -> None:
    from learner.losses import reference_kl

    logprobs = torch.tensor([[-1.0, -2.0, -5.0]])
    mask = torch.tensor([[True, True, False]])
    inputs = LossInputs(logprobs, logprobs, torch.zeros(1, 3), mask)
    assert reference_kl(inputs, logprobs).item() == 0.0
    # r = log π_ref - log π = [+1, -1] on the two loss tokens:
    # k3 = (e - 1 - 1 + e^-1 + 1 - 1) / 2 = (e + 1/e - 2) / 2 ≈ 0.5431.
    reference = logprobs + torch.tensor([[1.0, -1.0, 7.0]])
    expected = (math.e + 1 / math.e - 2) / 2
    assert reference_kl(inputs, reference).item() == pytest.approx(expected, rel=1e-6)
