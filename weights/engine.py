"""Load new policy weights into a running vLLM engine, in chunks, without restarting it.

The learner's weights arrive as chunks of (name, tensor) pairs (views of a frame in the
wire dtype, `weights.wire`), sent to every vLLM worker with `LLM.collective_rpc` and applied by
`RelayWorkerExtension`, which vLLM mixes into its workers (`worker_extension_cls`).

On CPU, vLLM packs every linear layer's weight into a oneDNN/sgl handle after loading
and drops the `weight` parameter; the tied LM head keeps its weight but packs a copy. So
`load_weights` alone fails, and `reload_weights` leaves the packed LM head stale. Before
its first load the extension switches every packed layer back to torch's plain linear
over a full-size weight parameter, so that every load is an in-place copy and no layer
needs repacking (checked end to end in tests/actors/test_engine_weights.py). On GPU the
same calls load into the regular parameters; no layer has a CPU kernel to switch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from weights.wire import tensor_chunks

log = logging.getLogger(__name__)

WORKER_EXTENSION = "weights.engine.RelayWorkerExtension"
"""What `build_llm` passes as vLLM's `worker_extension_cls`."""


class RelayWorkerExtension:
    """Methods added to every vLLM worker; called through `LLM.collective_rpc`.

    Named `relay_*` so that they never clash with the worker's own methods.
    """

    def relay_load_weights(self, tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load a chunk of named tensors into the model (each converted to the engine's
        dtype as it is copied in); returns how many were loaded."""
        model = self.model_runner.model
        _use_plain_linear(model)
        model.load_weights(iter(tensors))
        return len(tensors)

    def relay_finish_weight_update(self) -> dict[str, int]:
        """Returns `relay_request_progress()` once the new weights are in.

        Runs between two engine steps, so the progress it returns is exactly how many
        tokens each running request sampled with the old weights.
        """
        return self.relay_request_progress()

    def relay_request_progress(self) -> dict[str, int]:
        """Tokens sampled so far by each request the worker holds, by vLLM request id."""
        return {
            request_id: len(state.output_token_ids)
            for request_id, state in self.model_runner.requests.items()
        }


def update_engine_weights(
    llm: object,
    state_dict: Mapping[str, torch.Tensor],
    *,
    chunk_mib: float = 64,
    timeout_s: float = 300,
) -> WeightLoad:
    """Push `state_dict` into the running engine `llm`; returns the seconds it took."""
    tensors = ((name, tensor.detach().to("cpu")) for name, tensor in state_dict.items())
    return load_chunks(llm, tensor_chunks(tensors, int(chunk_mib * 1024 * 1024)), timeout_s)


@dataclass(frozen=True)
class WeightLoad:
    """What one weight update did: its duration and where it cut running requests."""

    seconds: float
    tensors: int
    bytes: int
    progress: dict[str, int]
    """vLLM request id -> tokens it had sampled with the old weights at the switch."""


def load_chunks(
    llm: object,
    chunks: Iterable[list[tuple[str, torch.Tensor]]],
    timeout_s: float = 300,
    pause: bool = True,
) -> WeightLoad:
    """Stream chunks of (name, tensor) pairs (from the learner or a weight source) into `llm`.

    The engine's scheduler is paused ("keep": running requests stay, with their KV cache)
    for the whole update. Without the pause the engine process, which runs ahead of its
    client, would take steps between two chunks with half-updated weights. Each RPC has a
    time limit, so a stuck worker raises instead of hanging the actor. The prefix cache
    is reset afterwards when no request is running (cached prompt KV of the old weights
    is stale); running requests keep their KV, as PipelineRL's in-flight updates do.
    `pause=False` when the caller pauses the scheduler itself (`paused_engine`).
    """
    started = time.perf_counter()
    loaded = nbytes = 0
    with paused_engine(llm) if pause else contextlib.nullcontext():
        for chunk in chunks:
            llm.collective_rpc("relay_load_weights", args=(chunk,), timeout=timeout_s)
            loaded += len(chunk)
            nbytes += sum(t.numel() * t.element_size() for _, t in chunk)
        (progress, *_) = llm.collective_rpc("relay_finish_weight_update", timeout=timeout_s)
    if not progress:
        llm.reset_prefix_cache()
    seconds = time.perf_counter() - started
    log.debug("loaded %d tensors (%.1f MB) into vLLM in %.2fs", loaded, nbytes / 1e6, seconds)
    return WeightLoad(seconds, loaded, nbytes, progress)


@contextlib.contextmanager
def paused_engine(llm: object) -> Iterator[None]:
    """No engine step runs inside: running requests wait with their KV cache.

    An in-process engine core (`engine.in_process`) steps only when its caller asks, so
    there is nothing to pause; an engine process of its own runs ahead and is paused.
    """
    core = llm.llm_engine.engine_core
    if not hasattr(core, "call_utility"):
        yield
        return
    core.call_utility("pause_scheduler", "keep", False)
    try:
        yield
    finally:
        core.call_utility("resume_scheduler")


def _use_plain_linear(model: torch.nn.Module) -> None:
    """On CPU, make every layer multiply by its own weight parameter (torch's linear).

    vLLM's CPU backend packs each linear layer's weight into a oneDNN handle after
    loading and drops the parameter (the tied LM head keeps it and packs a copy), so
    loaded weights would not reach the packed copies; repacking every layer costs more
    than the load itself. A layer switched here gets a full-size weight parameter again
    (filled by the load that follows: every update carries the whole policy) and keeps
    it; later updates are plain in-place copies. On GPU nothing has `cpu_linear`.
    """
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase
    from vllm.model_executor.parameter import ModelWeightParameter

    for module in model.modules():
        if not hasattr(module, "cpu_linear") or module.cpu_linear is torch.nn.functional.linear:
            continue
        if isinstance(module, LinearBase) and module.weight.numel() == 0:
            uses_v2 = module.quant_method.__class__.__name__ in WEIGHT_LOADER_V2_SUPPORTED
            weight = ModelWeightParameter(
                data=torch.empty(
                    module.output_size_per_partition,
                    module.input_size_per_partition,
                    dtype=module.params_dtype,
                ),
                input_dim=1,
                output_dim=0,
                weight_loader=module.weight_loader_v2 if uses_v2 else module.weight_loader,
            )
            module.register_parameter("weight", weight)
        module.cpu_linear = torch.nn.functional.linear
        module._cpu_skip_gemm_dispatch = True  # vLLM's own repack keeps the plain path
