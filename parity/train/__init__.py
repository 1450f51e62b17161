"""The `parity train` application: the GRPO loop, built-in tasks, evaluation, YAML config, tracking."""
