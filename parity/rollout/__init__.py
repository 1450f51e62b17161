"""The generation engine: scheduler, block manager, model runner, sampler, models."""
