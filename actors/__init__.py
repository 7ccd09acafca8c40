"""Rollout actors: vLLM engines that turn prompts into scored, version-tagged rollouts."""
