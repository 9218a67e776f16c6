"""Converters from other PaliGemma checkpoint formats to a converted checkpoint (see
paligemma_jax/checkpoints/checkpoint.py)."""
