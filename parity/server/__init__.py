"""`parity serve`: an OpenAI-compatible HTTP server on an AsyncEngine, with token ids and RL control routes."""
