"""Configuration of the rollout actors, their sampling, their engines and held-out
evaluation on an engine (no torch, vLLM or Ray import, so configs load fast)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SamplingConfig(BaseModel):
    """How completions are sampled."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(1.0, ge=0)
    """1.0 samples from the policy itself (what importance weights assume); 0 is greedy."""
    max_tokens: int = Field(16, gt=0)
    """Token budget of one assistant turn."""
    ignore_eos: bool = False
    """Keep sampling past end-of-sequence up to max_tokens (fixed-length benchmarks and
    tests). Unlike a minimum length, it leaves the sampling distribution, and so the
    recorded log-probs, untouched."""


class EngineConfig(BaseModel):
    """How each actor's vLLM engine is built."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations; float32 on CPU keeps vLLM's log-probs equal to the learner's."""
    max_model_len: int = Field(256, gt=0)
    """Longest prompt + completion in tokens."""
    max_num_seqs: int = Field(256, gt=0)
    """Sequences the engine batches at once."""
    kvcache_gib: int = Field(1, gt=0)
    """CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """GPU only: share of GPU memory vLLM may take."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine (tensor parallelism)."""
    enforce_eager: bool = True
    """Skip CUDA graph capture (faster start; set False on GPU for throughput)."""
    in_process: bool | None = None
    """Run vLLM's engine core and its one worker in the calling process instead of two
    processes of their own. None: in process on CPU, where scheduling, the model and the
    actor's own Python share the same cores (measured on 2 cores: ~30% less CPU per
    generated group), in separate processes on GPU, where they overlap GPU work."""


class ActorConfig(BaseModel):
    """How many actors run, what each keeps in flight, and how they follow new weights."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_actors: int = Field(1, ge=0)
    """Ray actors, each with its own vLLM engine. 0: a learner-only run, which actors join
    from elsewhere with `relay actor --buffer URL`."""
    group_size: int = Field(8, gt=1)
    """Completions per prompt (the group whose rewards make the advantages)."""
    groups_in_flight: int = Field(8, gt=0)
    """Groups each engine works on at once; a finished group is replaced at once."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """How rollouts are sampled; the learner scores tokens at the same temperature."""
    skip_uniform_groups: bool = False
    """Do not put a group whose rewards are all equal: with group-relative advantages it
    carries no gradient (DAPO's dynamic sampling). Its slot goes to a new group; counted
    as the buffer's `dropped_uniform`."""
    weight_updates: Literal["in_flight", "drain"] = "in_flight"
    """in_flight: load new weights between two engine steps, running sequences go on (their
    later tokens carry the new version); drain: stop admitting, finish what runs, then load."""
    transport: Literal["ray", "redis", "nccl"] = "ray"
    """Where actors fetch weights: Ray's object store, the weight store in the buffer's Redis
    (what `relay actor --buffer redis://...` outside the Ray cluster uses), or an NCCL
    broadcast from the learner's GPU to the actors' GPUs (GPU clusters only)."""
    weight_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The precision weights travel in. auto: the engines' dtype, so nothing is lost that
    the engine would keep. bfloat16 on a float32 engine halves a full frame and makes
    deltas small (most bfloat16 values survive an RL step unchanged), at the price of
    sampling from the policy rounded to bfloat16; the learner's importance weights see
    that difference like any other staleness."""
    full_weights_every: int = Field(32, gt=0)
    """An actor on the Redis store loads a full frame after this many deltas in a row."""
    weights_in_redis: bool | None = None
    """Also publish every version to the weight store in the buffer's Redis, where actors
    outside the Ray cluster (`relay actor --buffer URL`) fetch them. None: only when no
    actor gets them another way (transport redis, num_actors 0, or `relay learn`); False
    with in-cluster actors keeps a model per version out of Redis' append-only file."""
    weight_poll_s: float = Field(0.2, gt=0)
    """How often an actor checks for a newer policy version (on a thread of its own, which
    also fetches it: the actor's loop never waits for weights)."""
    weight_timeout_s: float = Field(300.0, gt=0)
    """Longest a weight fetch or load may take before the actor fails (and is restarted)."""
    metrics_every_s: float = Field(5.0, gt=0)
    """How often each actor writes its health and throughput to the buffer."""
    max_restarts: int = Field(3, ge=0)
    """Ray restarts a crashed actor this many times; it rejoins at the latest version."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs Ray reserves per actor."""
    cpu_cores: list[str] | None = None
    """CPU only: the cores each actor's engine runs on, by actor index (cycled), in vLLM's
    VLLM_CPU_OMP_THREADS_BIND form ("0", "2-3"). None: vLLM's own choice, which gives
    every engine on a machine the same cores. Ray runs actors at a lower priority (nice
    15) than the learner, so an actor sharing the learner's core uses what it leaves."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves per actor (engine.tensor_parallel_size on GPU clusters)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per actor, e.g. {"generation": 1} to place actors on node types."""

    @model_validator(mode="after")
    def _weights_reach_the_actors(self) -> ActorConfig:
        if self.transport == "redis" and self.weights_in_redis is False:
            raise ValueError(
                "weights_in_redis=false leaves actors with transport=redis no weights to fetch"
            )
        return self

    @field_validator("transport")
    @classmethod
    def _nccl_needs_gpus(cls, transport: str) -> str:
        if transport == "nccl":
            import torch  # only here: configs load without torch otherwise

            if not torch.cuda.is_available():
                raise ValueError(
                    "nccl broadcasts weights between GPUs and this machine has no CUDA "
                    "device; use ray (one Ray cluster) or redis (actors anywhere)"
                )
        return transport

    @field_validator("sampling")
    @classmethod
    def _sampled_not_greedy(cls, sampling: SamplingConfig) -> SamplingConfig:
        if sampling.temperature <= 0:
            raise ValueError(
                "temperature must be > 0 for rollouts: the learner trains on the tempered "
                "policy softmax(logits / temperature), and greedy decoding has none"
            )
        return sampling


class EvalConfig(BaseModel):
    """Held-out evaluation."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_prompts: int = Field(500, gt=0)
    """Test-split prompts to evaluate on."""
    max_tokens: int = Field(16, gt=0)
    """Token budget per assistant turn."""
    temperature: float = Field(0.0, ge=0)
    """0 is greedy decoding."""
    seed: int = 1234
    """Chooses the test prompts; fixed so that runs are compared on the same ones."""
    every_steps: int = Field(0, ge=0)
    """`relay run`: greedy accuracy of the learner's policy on `in_run_prompts` held-out
    prompts every N steps (single-turn tasks; 0: never). The final figure uses vLLM."""
    in_run_prompts: int = Field(100, gt=0)
    before: bool = True
    """`relay run`: evaluate the starting policy too, so the run reports before and after.
    The first actor does it on its own engine before it starts generating, so no engine
    is started for it (a learner-only run, with no actors, starts one)."""
