"""Load new policy weights into a running vLLM engine, in chunks, without restarting it.

The learner's weights travel as a named-tensor stream: (name, dtype, shape, raw bytes)
tuples, sent to every vLLM worker with `LLM.collective_rpc` and applied by
`RelayWorkerExtension`, which vLLM mixes into its workers (`worker_extension_cls`).

On CPU, vLLM packs every linear layer's weight into a oneDNN/sgl handle after loading
and drops the `weight` parameter; the tied LM head keeps its weight but packs a copy. So
`load_weights` alone fails, and `reload_weights` leaves the packed LM head stale. The
extension re-creates the dropped parameters, loads, then repacks every layer from the
new weights (checked end to end in tests/actors/test_weight_sync.py). On GPU the same
calls load into the regular parameters; the repacking step finds nothing to do there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping

import torch

log = logging.getLogger(__name__)

WORKER_EXTENSION = "actors.weight_sync.RelayWorkerExtension"
"""What `build_llm` passes as vLLM's `worker_extension_cls`."""

PackedTensor = tuple[str, str, list[int], bytes]
"""(name, dtype name, shape, raw bytes in the host's byte order)."""


class RelayWorkerExtension:
    """Methods added to every vLLM worker; called through `LLM.collective_rpc`.

    Named `relay_*` so that they never clash with the worker's own methods.
    """

    def relay_load_weights(self, tensors: list[PackedTensor]) -> int:
        """Load a chunk of named tensors into the model; returns how many were loaded."""
        model = self.model_runner.model
        _restore_dropped_linear_weights(model)
        model.load_weights(_unpack(tensors))
        return len(tensors)

    def relay_finish_weight_update(self) -> int:
        """Repack layers from the new weights (CPU); returns how many were repacked."""
        repacked = 0
        for module in self.model_runner.model.modules():
            if hasattr(module, "cpu_linear") and hasattr(module, "quant_method"):
                module.quant_method.process_weights_after_loading(module)
                repacked += 1
        return repacked


def pack_state_dict(state_dict: Mapping[str, torch.Tensor]) -> list[PackedTensor]:
    """The wire form of a state dict (CPU copies, contiguous, raw bytes)."""
    packed = []
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        packed.append((name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), raw))
    return packed


def chunks(packed: list[PackedTensor], max_bytes: int) -> Iterator[list[PackedTensor]]:
    """Group tensors into chunks of at most `max_bytes` (a larger tensor travels alone).

    Chunking bounds what the worker must hold at once besides the model itself.
    """
    chunk: list[PackedTensor] = []
    size = 0
    for item in packed:
        if chunk and size + len(item[3]) > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[3])
    if chunk:
        yield chunk


def update_engine_weights(
    llm: object,
    state_dict: Mapping[str, torch.Tensor],
    *,
    chunk_mib: float = 64,
    timeout_s: float = 300,
) -> float:
    """Push `state_dict` into the running engine `llm`; returns the seconds it took.

    Each RPC has a time limit, so a stuck worker raises instead of hanging the actor.
    The prefix cache is reset: cached prompt KV computed by the old weights is stale.
    """
    started = time.perf_counter()
    packed = pack_state_dict(state_dict)
    for chunk in chunks(packed, int(chunk_mib * 1024 * 1024)):
        llm.collective_rpc("relay_load_weights", args=(chunk,), timeout=timeout_s)
    llm.collective_rpc("relay_finish_weight_update", timeout=timeout_s)
    llm.reset_prefix_cache()
    seconds = time.perf_counter() - started
    log.info("loaded %d tensors into vLLM in %.2fs", len(packed), seconds)
    return seconds


def _unpack(tensors: list[PackedTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, dtype, shape, raw in tensors:
        flat = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            if raw
            else torch.empty(0, dtype=torch.uint8)
        )
        yield name, flat.view(getattr(torch, dtype)).reshape(shape)


def _restore_dropped_linear_weights(model: torch.nn.Module) -> None:
    """Give CPU-packed linear layers a full-size `weight` again, so that they can load."""
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase
    from vllm.model_executor.parameter import ModelWeightParameter

    for module in model.modules():
        if not isinstance(module, LinearBase) or module.weight.numel() > 0:
            continue
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
