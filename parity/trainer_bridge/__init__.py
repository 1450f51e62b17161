"""Parity inside the trainer: weight sync, sleep/wake, trainer-side logprobs, and the GRPO loop.

  weight_sync    Engine.update_weights: trainer weights -> engine parameters, validated, in place
  sleep          Engine.sleep / wake_up: release KV cache and weights between rollouts (vLLM levels 1, 2)
  logprobs       trainer_logprobs: the trainer's logprobs of rollout tokens, aligned with the engine's
  parity_forward the engine's model code with autograd, for bitwise trainer/engine parity
  losses         group advantages and the clipped, IS-corrected policy loss
  tasks, train_config, grpo, tracking   `parity train`: built-in tasks, YAML config, the loop, W&B

Kept import-light: the engine imports `sleep` and `weight_sync` from here.
"""
