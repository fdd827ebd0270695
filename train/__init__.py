"""Training: configuration, methods (MMGL, PASS), losses, schedules, checkpoints, and the
pre-training, fine-tuning and evaluation entry points."""
