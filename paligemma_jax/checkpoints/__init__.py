"""Weights in and out: converted checkpoints (stored with Orbax), Hugging Face, the Hub,
big_vision .npz."""
