"""Training: losses, optimizer, train step, state, checkpoints, metrics and the trainer."""
