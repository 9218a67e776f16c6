"""Evaluating a model on a dataset: predictions, per-example scores, metrics."""
