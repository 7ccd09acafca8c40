"""Configuration of the learner: the objective, the schedule, checkpoints.

Kept apart from the code that uses it so that loading a run config imports no torch.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class NoCorrection(BaseModel):
    """`none`: on-policy policy gradient applied to stale data (the naive baseline)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["none"] = "none"


class TruncatedIS(BaseModel):
    """`tis`: token-level truncated importance sampling."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["tis"] = "tis"
    clip_c: float = Field(2.0, gt=0)
    """Weights π/μ are truncated at this value."""


class DecoupledPPO(BaseModel):
    """`decoupled_ppo`: AReaL's decoupled PPO objective."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["decoupled_ppo"] = "decoupled_ppo"
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """Trust region around the proximal policy: ratio clipped to [1 - eps, 1 + eps]."""
    behaviour_weight_cap: float | None = Field(None, gt=0)
    """Optional cap on the behaviour weight π_prox/μ (None: uncapped)."""


class SequenceIS(BaseModel):
    """`seq_is`: sequence-level, length-normalised ratio with clipping (GSPO)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["seq_is"] = "seq_is"
    clip_low: float = Field(3e-4, gt=0, lt=1)
    """Sequence ratio clipped below at 1 - clip_low (GSPO uses 3e-4)."""
    clip_high: float = Field(4e-4, gt=0)
    """Sequence ratio clipped above at 1 + clip_high (GSPO uses 4e-4)."""


class M2PO(BaseModel):
    """`m2po`: M2PO's second-moment trust region, masking only the outlying tokens."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["m2po"] = "m2po"
    tau: float = Field(0.04, gt=0)
    """The most the kept tokens' mean (log π_θ/μ)² may be (M2PO's τ_M2, 0.04 in the paper)."""


class SequenceMaskedIS(BaseModel):
    """`seq_mis`: sequence-level masked importance sampling (TRL's default, verl's Geo-RS)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["seq_mis"] = "seq_mis"
    lower: float = Field(0.5, gt=0, le=1)
    """A sequence whose geometric-mean ratio is below this is masked out whole."""
    upper: float = Field(2.0, ge=1)
    """A sequence whose geometric-mean ratio is above this is masked out whole."""


class VCPO(BaseModel):
    """`vcpo`: truncated IS whose optimizer step shrinks with the batch's effective sample size."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["vcpo"] = "vcpo"
    clip_c: float = Field(2.0, gt=0)
    """Token weights π/μ are truncated at this value (as in `tis`)."""
    min_step_scale: float = Field(0.1, gt=0, le=1)
    """The learning rate is scaled by sqrt(ESS), but never below this fraction."""


LossConfig = Annotated[
    NoCorrection | TruncatedIS | DecoupledPPO | SequenceIS | M2PO | SequenceMaskedIS | VCPO,
    Field(discriminator="type"),
]


class CheckpointConfig(BaseModel):
    """When the learner saves what it needs to resume."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    every_steps: int = Field(50, ge=0)
    """Save every N steps (and always at the end and on SIGTERM). Batches stay claimed in
    the buffer until the checkpoint holding their update is saved, so a crash loses no
    acked rollout. 0: save only at the end / on SIGTERM and ack every batch at once."""
    keep: int = Field(2, ge=1)
    """Checkpoints kept on disk (oldest deleted first)."""


class LearnerConfig(BaseModel):
    """The learner: optimizer, DeepSpeed settings, the objective and the schedule."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(100, gt=0)
    """Learner steps in the run: one sampled batch each (update_epochs x minibatches
    optimizer steps)."""
    batch_groups: int = Field(8, gt=0)
    """Rollout groups per step and per rank."""
    update_epochs: int = Field(1, ge=1)
    """Passes over each sampled batch (PPO's epochs). With more than one optimizer step per
    batch, decoupled_ppo's trust region around the frozen π_prox starts to act."""
    minibatches: int = Field(1, ge=1)
    """Each pass splits the batch into this many minibatches of whole groups, one optimizer
    step each."""
    micro_batches: int = Field(1, gt=0)
    """Gradient accumulation: each minibatch is split into this many forward/backwards."""
    world_size: int = Field(1, gt=0)
    """Data-parallel ranks."""
    push_every_steps: int = Field(1, gt=0)
    """Publish new weights (a new policy version) every N steps."""
    time_limit_s: float | None = Field(None, gt=0)
    """Stop after this many seconds of training (from the first sample), as a stop request
    does: the step ends, a checkpoint is saved, the policy exported. None: run all steps.
    The lr schedule still spans `steps`."""
    snapshot_every_steps: int = Field(0, ge=0)
    """Export the policy (Hugging Face format) to run_dir/snapshots/stepNNNNNNNN every N
    steps, at the start and at the end, each listed with its time in snapshots.jsonl, for
    learning curves evaluated after the run without pausing it (benchmarks/learning.py).
    0: never."""
    sample_timeout_s: float = Field(600.0, gt=0)
    """Fail when no full batch arrives for this long (are the actors running?)."""
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate (the peak, with a schedule)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After the warm-up: constant, or decayed to 0 at the run's last optimizer step
    (cosine or linear). A decayed rate ends the run on a settled policy."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from 0 to lr."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping."""
    zero_stage: Literal[0, 1, 2] = 1
    """DeepSpeed ZeRO stage (parameters stay whole on every rank, so publishing is local)."""
    pack_groups: bool = False
    """Forward each group as one row: its prompt once, then every completion, each seeing
    the prompt and itself only (an attention mask and position ids). Same log-probs and
    gradients as one row per completion without computing the prompt group_size times;
    the mask grows with the square of the row's length, so it suits short completions."""
    num_threads: int | None = Field(None, gt=0)
    """CPU threads of each learner rank's torch (None: torch's default, one per core).
    On a machine shared with actors, leave them their cores."""
    cpu_cores: str | None = None
    """CPU only: the cores every thread of the learner's process may run on, in taskset's
    list form ("1", "2-3,6"); None: any. Actors run at a lower priority (Ray's nice 15):
    a learner thread that lands on an actor's core (its weight publisher, a collective)
    all but stops that actor's engine. Give the learner cores no actor has."""

    @field_validator("cpu_cores")
    @classmethod
    def _core_list(cls, cores: str | None) -> str | None:
        if cores is not None:
            parse_cores(cores)
        return cores

    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 on CPU (log-probs must match the actors'); bf16 on GPU."""
    advantage: Literal["grpo", "grpo_no_std", "rloo"] = "grpo"
    """Advantage estimator (learner/advantages.py)."""
    loss: LossConfig = Field(default_factory=TruncatedIS)
    """Off-policy correction (learner/losses.py); `type` selects it."""
    max_behaviour_gap: float = Field(1.0, gt=0)
    """A producer whose fresh groups (sampled with the learner's current weights) carry
    behaviour log-probs this far (mean |log μ - log π| over a completion's tokens, in nats)
    from the learner's own is revoked: its log-probs are not its policy's. Honest actors
    on CPU fp32 differ by ~1e-5; GPU bf16 engines by a few hundredths."""
    kl_coef: float = Field(0.0, ge=0)
    """β of a KL(π || π_ref) penalty to the initial policy; 0 (the default) loads no reference."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _minibatches_hold_groups(self) -> LearnerConfig:
        if self.minibatches > self.batch_groups:
            raise ValueError(
                f"minibatches={self.minibatches} exceeds batch_groups={self.batch_groups}: "
                "a minibatch holds whole groups"
            )
        return self

    @property
    def optimizer_steps_per_batch(self) -> int:
        """update_epochs x minibatches."""
        return self.update_epochs * self.minibatches

    def lr_scale(self, optimizer_step: int) -> float:
        """The learning rate at `optimizer_step` (from 0) as a fraction of `lr`."""
        warmup = min(1.0, (optimizer_step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        total = self.steps * self.optimizer_steps_per_batch
        progress = min(1.0, optimizer_step / total)
        if self.lr_schedule == "cosine":
            return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.lr_schedule == "linear":
            return warmup * (1.0 - progress)
        return warmup


def parse_cores(cores: str) -> set[int]:
    """taskset's list form ("0", "1-3,6") as a set of core numbers."""
    chosen: set[int] = set()
    for part in cores.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise ValueError(f"{cores!r} is not a list of cores like '1' or '0-3,6'")
        chosen.update(range(int(low), int(high or low) + 1))
    return chosen
