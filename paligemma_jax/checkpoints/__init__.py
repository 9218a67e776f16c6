"""Weights in and out: our checkpoints (Orbax), Hugging Face, the Hub, big_vision .npz."""
