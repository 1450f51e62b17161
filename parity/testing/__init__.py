"""Tiny random-init models written as HF checkpoints, with an in-process tokenizer (tests and the CLI fallback)."""
