"""The rollout engine: requests in, Rollouts (tokens + logprobs) out. Imports nothing of the trainer side."""
