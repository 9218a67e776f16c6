"""Converters from other PaliGemma checkpoint formats to ours (see paligemma_jax/checkpoints/checkpoint.py)."""
