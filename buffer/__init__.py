"""The replay buffer and the rollout contract between actors and the learner."""
