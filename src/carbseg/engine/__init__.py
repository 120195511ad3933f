"""Training loop, evaluation, inference and checkpoints."""
