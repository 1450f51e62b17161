"""Parity inside the trainer: weight sync, sleep/wake, trainer-side logprobs, and the GRPO loop.

Kept import-light: the engine imports `sleep` and `weight_sync` from here.
"""
