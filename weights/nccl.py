"""NCCL weight transfer into the actors' vLLM engines (GPU clusters).

The learner's side of vLLM's weight-transfer API (vLLM >= 0.32, `WeightTransferConfig(
backend="nccl")` on the actors' engines): a trainer engine broadcasts every tensor from
the learner's GPU to the actors' GPUs. The actors' Ray handles implement vLLM's
`VLLMWeightSyncClient` protocol (actors/ray_actor.py), pausing their scheduler for the
transfer and recording where each running sequence switched version.

Written against vLLM's documented interface; NOT run by this project: its machines have
no GPU. The Ray object store and Redis transports are the ones tested here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from weights.wire import Frame


class NcclTransport:
    """Publishes a version by NCCL broadcast to every actor engine."""

    name = "nccl"

    def __init__(
        self,
        actor_handles: Sequence[object],
        params: Mapping[str, torch.Tensor],
        *,
        master_address: str,
        master_port: int,
        world_size: int,
        timeout_s: float = 300,
    ) -> None:
        """`world_size`: 1 (this learner) + the GPUs of all actor engines."""
        from vllm.distributed.weight_transfer import (
            ParamMeta,
            RayVLLMWeightSyncClient,
            WeightSource,
            WeightTransferTrainerFactory,
        )
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        class SnapshotSource(WeightSource):
            """The publisher's copy of the weights, moved to this GPU tensor by tensor."""

            def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
                self.state = dict(state)

            def metadata(self) -> list:
                return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.state.items()]

            def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
                for name, tensor in self.state.items():
                    yield name, tensor.to("cuda", non_blocking=True)

        self.handles = list(actor_handles)
        self.timeout_s = timeout_s
        self.source = SnapshotSource(params)
        self.engine = WeightTransferTrainerFactory.trainer_init(
            NCCLTrainerInitInfo(
                master_address=master_address, master_port=master_port,
                world_size=world_size, rank=0,
            ),
            client=RayVLLMWeightSyncClient(self.handles),
            source=self.source,
        )  # fmt: skip

    def publish(self, frame: Frame) -> None:
        import ray

        ray.get([h.relay_expect_version.remote(frame.version) for h in self.handles],
                timeout=self.timeout_s)  # fmt: skip
        self.source.state = frame.tensors()
        self.engine.send_weights()
