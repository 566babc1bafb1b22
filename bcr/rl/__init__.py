"""Training: config, rollout engines, packing, rewards/advantages, the trainer, checkpoints, run dirs."""
