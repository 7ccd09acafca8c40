"""Moving a policy from the learner into running engines: the wire form and interfaces
(`wire`), the transports (`redis_store`, `ray_store`, `nccl`), the learner's publisher
(`publisher`) and loading into a live vLLM engine (`engine`)."""
