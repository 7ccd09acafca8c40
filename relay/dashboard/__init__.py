"""The live dashboard, Prometheus metrics and terminal view of a run."""
