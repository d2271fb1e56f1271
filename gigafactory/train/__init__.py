"""Training: the loop, optimizer and schedule, checkpoints and metrics."""
