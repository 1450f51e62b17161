"""The `parity` command line."""
