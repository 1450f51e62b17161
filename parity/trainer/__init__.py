"""The trainer-side library: logprobs of rollout tokens, the trainable parity model, RL losses."""
