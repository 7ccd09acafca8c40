"""The learner: importance-corrected policy gradients on stale batches from the buffer."""
