"""Policy-gradient losses with off-policy corrections: small pure functions of tensors.

Shapes: B sequences x T tokens. `logprobs` is log π_θ of the sampled tokens under the
policy being trained (with gradient); `behaviour_logprobs` is log μ, recorded by the
actor that sampled them; `loss_mask` is False on prompt, padding and environment tokens.
Every loss returns `LossOutputs(loss, metrics)`; none of them logs or touches a device,
a process group or the buffer. The choice is a config value, a discriminated union on
`type`; an unknown name fails listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel

from learner.config import (
    M2PO,
    VCPO,
    DecoupledPPO,
    LossConfig,
    NoCorrection,
    SequenceIS,
    SequenceMaskedIS,
    TruncatedIS,
)


@dataclass(frozen=True)
class LossInputs:
    """What every loss may use ([B, T] unless stated)."""

    logprobs: torch.Tensor
    """log π_θ(a_t), with gradient."""
    behaviour_logprobs: torch.Tensor
    """log μ(a_t) of the policy version that sampled each token."""
    advantages: torch.Tensor
    """Per token (a sequence's advantage broadcast over its tokens)."""
    loss_mask: torch.Tensor
    """bool: tokens the policy sampled and that count in the loss."""
    proximal_logprobs: torch.Tensor | None = None
    """log π_prox: the policy at the start of this step (decoupled PPO's trust region)."""
    staleness: torch.Tensor | None = None
    """[B]: learner version minus the sequence's oldest token version (metrics only)."""
    entropy: torch.Tensor | None = None
    """Per-token entropy of π_θ, when the caller computed it (metrics only)."""
    normaliser: float | None = None
    """Divide token sums by this instead of this batch's loss-token count. A data-parallel
    learner passes (global loss tokens / world size), so that averaging the ranks'
    gradients gives the token mean over the global batch, however tokens are split."""


@dataclass(frozen=True)
class LossOutputs:
    """The scalar to backpropagate and figures about the batch."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    step_scale: float = 1.0
    """The fraction of the learning rate this batch's optimizer step should take (VCPO)."""


def no_correction(inputs: LossInputs, config: NoCorrection) -> LossOutputs:
    """L = -Σ_t m_t A_t log π_θ(a_t) / Σ_t m_t  (REINFORCE with group advantages).

    Ignores that the tokens came from μ ≠ π_θ: the gradient is biased by staleness.
    """
    loss = -_token_mean(inputs.advantages * inputs.logprobs, inputs)
    return LossOutputs(loss, _importance_metrics(inputs))


def truncated_is(inputs: LossInputs, config: TruncatedIS) -> LossOutputs:
    """L = -Σ_t m_t sg(min(ρ_t, c)) A_t log π_θ(a_t) / Σ_t m_t,  ρ_t = π_θ(a_t) / μ(a_t).

    Truncated importance sampling as in IMPALA's V-trace (Espeholt et al. 2018), used for
    LLM RL by prime-rl (AIPO) and OpenRLHF: unbiased up to the truncation, with variance
    bounded by c. sg is stop-gradient.
    """
    mask = inputs.loss_mask
    ratio = torch.exp(inputs.logprobs.detach() - inputs.behaviour_logprobs)
    weight = torch.clamp(ratio, max=config.clip_c)
    loss = -_token_mean(weight * inputs.advantages * inputs.logprobs, inputs)
    metrics = _importance_metrics(inputs)
    metrics["clip_fraction"] = _masked_mean((ratio > config.clip_c).float(), mask).item()
    return LossOutputs(loss, metrics)


def decoupled_ppo(inputs: LossInputs, config: DecoupledPPO) -> LossOutputs:
    """L = -Σ_t m_t w_t min(r_t A_t, clip(r_t, 1-ε, 1+ε) A_t) / Σ_t m_t.

    r_t = π_θ(a_t) / π_prox(a_t) keeps the update in a trust region around the proximal
    policy (the policy at the start of this step), and the behaviour weight
    w_t = sg(π_prox(a_t) / μ(a_t)) corrects for the tokens having come from μ.
    Decoupled PPO (Hilton et al. 2021), as used by AReaL (Fu et al. 2025).
    """
    if inputs.proximal_logprobs is None:
        raise ValueError("decoupled_ppo needs proximal_logprobs (log π at the start of the step)")
    mask = inputs.loss_mask
    ratio = torch.exp(inputs.logprobs - inputs.proximal_logprobs)
    behaviour_weight = torch.exp(inputs.proximal_logprobs - inputs.behaviour_logprobs).detach()
    if config.behaviour_weight_cap is not None:
        behaviour_weight = torch.clamp(behaviour_weight, max=config.behaviour_weight_cap)
    advantages = inputs.advantages
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - config.clip_eps, 1 + config.clip_eps) * advantages
    loss = -_token_mean(behaviour_weight * torch.minimum(unclipped, clipped), inputs)
    metrics = _importance_metrics(inputs)
    metrics["clip_fraction"] = _masked_mean((clipped < unclipped).float(), mask).item()
    metrics["behaviour_weight_max"] = _masked_max(behaviour_weight, mask)
    return LossOutputs(loss, metrics)


def sequence_is(inputs: LossInputs, config: SequenceIS) -> LossOutputs:
    """L = -mean_i min(s_i A_i, clip(s_i, 1-ε_low, 1+ε_high) A_i).

    s_i = exp(Σ_t m_t (log π_θ - log μ) / Σ_t m_t) is the length-normalised sequence
    ratio and A_i the sequence's advantage: GSPO (Zheng et al. 2025). Sequences are
    averaged, not tokens, so on-policy it equals token-mean policy gradient only when all
    sequences have the same length.
    """
    mask = inputs.loss_mask.float()
    lengths = mask.sum(dim=1)
    present = lengths > 0
    safe_lengths = lengths.clamp(min=1)
    log_ratio = ((inputs.logprobs - inputs.behaviour_logprobs) * mask).sum(dim=1) / safe_lengths
    ratio = torch.exp(log_ratio)
    advantages = (inputs.advantages * mask).sum(dim=1) / safe_lengths
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high) * advantages
    per_sequence = torch.minimum(unclipped, clipped)
    loss = -per_sequence[present].mean() if present.any() else per_sequence.sum() * 0
    metrics = _importance_metrics(inputs)
    metrics["clip_fraction"] = (
        (clipped < unclipped)[present].float().mean().item() if present.any() else 0.0
    )
    metrics["sequence_ratio_max"] = ratio[present].max().item() if present.any() else 1.0
    return LossOutputs(loss, metrics)


def m2po(inputs: LossInputs, config: M2PO) -> LossOutputs:
    """L = -Σ_t m_t k_t r_t A_t / Σ_t m_t,  r_t = π_θ(a_t) / μ(a_t), k_t ∈ {0, 1}.

    The second-moment mask k drops the loss tokens with the largest (log r_t)², largest
    first, until the mean (log r)² of the tokens kept is at most τ: however stale the batch,
    only its outliers go, where a fixed clip would cut ever more tokens. The ratio itself
    is differentiated, with no clip. M2PO (Zheng et al. 2025, "Prosperity before
    Collapse"), as in AReaL. The batch is what one call sees: a micro-batch of one rank.
    """
    mask = inputs.loss_mask
    log_ratio = inputs.logprobs - inputs.behaviour_logprobs
    keep = second_moment_mask(log_ratio.detach() ** 2, mask, config.tau)
    # exp only where kept: a dropped token's ratio may overflow, and inf x 0 is NaN.
    ratio = torch.exp(torch.where(keep, log_ratio, log_ratio.new_zeros(())))
    loss = -_token_mean(keep * ratio * inputs.advantages, inputs)
    metrics = _importance_metrics(inputs)
    squared = log_ratio.detach()[mask] ** 2
    metrics["clip_fraction"] = 1.0 - _masked_mean(keep.float(), mask).item()
    metrics["second_moment"] = squared.mean().item() if squared.numel() else 0.0
    return LossOutputs(loss, metrics)


def second_moment_mask(squared: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """True on the loss tokens M2PO keeps: the most tokens, smallest `squared` first, whose
    mean is at most `tau` (sorted ascending, the running mean only grows)."""
    values = squared[mask]
    order = torch.argsort(values)
    running_mean = torch.cumsum(values[order], 0) / torch.arange(1, values.numel() + 1)
    n_kept = int((running_mean <= tau).cumprod(0).sum())
    kept = torch.zeros_like(values, dtype=torch.bool)
    kept[order[:n_kept]] = True
    keep = torch.zeros_like(mask)
    keep[mask] = kept
    return keep


def sequence_masked_is(inputs: LossInputs, config: SequenceMaskedIS) -> LossOutputs:
    """L = -Σ_i k_i sg(g_i) Σ_t m_t A_t log π_θ(a_t) / Σ_t m_t.

    g_i = exp(mean_t (log π_θ - log μ)) is sequence i's geometric-mean ratio, and
    k_i = [lower ≤ g_i ≤ upper]: a sequence that drifted too far from its sampler is
    masked out whole, the others are weighted by g_i (so every weight lies in
    [lower, upper]). Sequence-level masked IS: TRL's default correction (it uses the
    product of ratios), verl's Geo-RS (the geometric mean, which does not grow with length).
    """
    mask = inputs.loss_mask.float()
    lengths = mask.sum(dim=1)
    present = lengths > 0
    log_ratio = (inputs.logprobs.detach() - inputs.behaviour_logprobs) * mask
    ratio = torch.exp(log_ratio.sum(dim=1) / lengths.clamp(min=1))
    keep = (ratio >= config.lower) & (ratio <= config.upper)
    weight = torch.where(keep, ratio, ratio.new_zeros(()))[:, None]
    loss = -_token_mean(weight * inputs.advantages * inputs.logprobs, inputs)
    metrics = _importance_metrics(inputs)
    metrics["clip_fraction"] = (~keep)[present].float().mean().item() if present.any() else 0.0
    metrics["sequence_ratio_max"] = ratio[present].max().item() if present.any() else 1.0
    return LossOutputs(loss, metrics)


def vcpo(inputs: LossInputs, config: VCPO) -> LossOutputs:
    """`tis`'s loss, with the optimizer step scaled by s = max(sqrt(ESS), min_step_scale).

    ESS = (Σ_t w_t)² / (n Σ_t w_t²) ∈ (0, 1] over the n loss tokens' truncated weights
    w_t = min(π_θ/μ, c): when a few tokens carry the batch's weight, the gradient is
    noisy and the step shrinks; square-root scaling suits Adam. VCPO's ESS-guided step
    scaling (Huang et al. 2026, "Stable Asynchrony"), without its optimal baseline, and
    with the ESS of the weights this loss applies (VCPO takes sequence ratios).
    """
    out = truncated_is(inputs, TruncatedIS(clip_c=config.clip_c))
    ratio = torch.exp(inputs.logprobs.detach() - inputs.behaviour_logprobs)
    weights = torch.clamp(ratio, max=config.clip_c)[inputs.loss_mask]
    spread = weights.numel() * float((weights**2).sum())
    ess = float(weights.sum()) ** 2 / spread if spread > 0 else float(not weights.numel())
    scale = max(math.sqrt(ess), config.min_step_scale) if math.isfinite(ess) else 1.0
    return LossOutputs(out.loss, out.metrics, step_scale=scale)


LOSSES: dict[str, Callable[[LossInputs, BaseModel], LossOutputs]] = {
    "none": no_correction,
    "tis": truncated_is,
    "decoupled_ppo": decoupled_ppo,
    "seq_is": sequence_is,
    "m2po": m2po,
    "seq_mis": sequence_masked_is,
    "vcpo": vcpo,
}


def get_loss(name: str) -> Callable[[LossInputs, BaseModel], LossOutputs]:
    """The loss called `name`; an unknown name fails listing the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def compute_loss(config: LossConfig, inputs: LossInputs) -> LossOutputs:
    """Dispatch on `config.type`, with every per-token input zeroed off the loss mask.

    Whatever a masked position holds (padding, environment tokens; NaN from a broken
    producer) then never reaches the loss, its metrics or its gradient: NaN * 0 is NaN,
    and so is the gradient of exp(NaN) times 0, so masking a product afterwards is not
    enough.
    """
    mask = inputs.loss_mask

    def kept(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else torch.where(mask, values, values.new_zeros(()))

    inputs = dataclasses.replace(
        inputs,
        logprobs=kept(inputs.logprobs),
        behaviour_logprobs=kept(inputs.behaviour_logprobs),
        advantages=kept(inputs.advantages),
        proximal_logprobs=kept(inputs.proximal_logprobs),
        entropy=kept(inputs.entropy),
    )
    return get_loss(config.type)(inputs, config)


def _importance_metrics(inputs: LossInputs) -> dict[str, float]:
    """How far the sampling policy is from the current one, over loss tokens.

    ρ = π_θ/μ: mean, max, effective sample size (Σρ)² / (n Σρ²) in (0, 1], and the k3
    estimate of KL(μ || π_θ): mean(ρ - 1 - log ρ) (Schulman 2020).
    """
    mask = inputs.loss_mask
    log_ratio = (inputs.logprobs.detach() - inputs.behaviour_logprobs)[mask]
    if log_ratio.numel() == 0:
        return {"tokens": 0.0}
    ratio = torch.exp(log_ratio)
    metrics = {
        "tokens": float(log_ratio.numel()),
        "is_weight_mean": ratio.mean().item(),
        "is_weight_max": ratio.max().item(),
        "is_ess": (ratio.sum() ** 2 / (ratio.numel() * (ratio**2).sum())).item(),
        "kl_behaviour": (ratio - 1 - log_ratio).mean().item(),
    }
    if inputs.staleness is not None:
        metrics["staleness_mean"] = inputs.staleness.float().mean().item()
        metrics["staleness_max"] = inputs.staleness.max().item()
    if inputs.entropy is not None:
        metrics["entropy"] = _masked_mean(inputs.entropy.detach(), mask).item()
    return metrics


def _token_mean(values: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """Σ over loss tokens, divided by their count (or by `inputs.normaliser`)."""
    if inputs.normaliser is None:
        return _masked_mean(values, inputs.loss_mask)
    return (values * inputs.loss_mask.to(values.dtype)).sum() / max(inputs.normaliser, 1e-9)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _masked_max(values: torch.Tensor, mask: torch.Tensor) -> float:
    selected = values[mask]
    return selected.max().item() if selected.numel() else 0.0


def reference_kl(inputs: LossInputs, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(π_θ || π_ref) per loss token, k3 estimator: exp(r) - r - 1 with r = log π_ref - log π_θ.

    Unbiased for samples from π_θ and always >= 0 (Schulman 2020); the penalty GRPO
    (Shao et al. 2024) adds as β·KL. Averaged like the policy loss (`_token_mean`).
    """
    log_ratio = reference_logprobs - inputs.logprobs
    return _token_mean(torch.exp(log_ratio) - log_ratio - 1, inputs)
