"""Serving PaliGemma: a continuous-batching engine (engine.py, pure JAX) and an HTTP server on it."""
