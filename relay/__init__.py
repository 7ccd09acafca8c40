"""Relay: configuration, the CLI, and the driver that wires envs, actors, buffer and learner."""
