"""Adapters that put parity inside other RL frameworks (optional extras: `pip install parity[trl]`)."""
