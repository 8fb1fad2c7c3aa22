"""Evaluation of listener generation: metrics and non-learned baselines."""
