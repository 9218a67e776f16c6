"""Decoding: the core (one state, one prefill, one step) and the loops built on it."""
