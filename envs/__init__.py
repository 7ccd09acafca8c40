"""Tasks and verifiers: what the policy is asked and how its answers are scored."""
